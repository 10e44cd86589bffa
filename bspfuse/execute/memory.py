"""The bytes a check needs at its peak, against what the machine has: refused before anything is allocated."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bspfuse.execute.values import TORCH_DTYPE, ExecuteError, shape_of
from bspfuse.ir import DTYPE_BYTES, FLOAT_DTYPES, Program, Value


def heap_bytes_for(program: Program, world_size: int) -> int:
    """A symmetric heap large enough for `program`: the fused kernels keep at most two slots per peer of
    an operand or result, and a fallback collective one copy of its input; 32 MiB more for flags."""
    total = 0
    for v in program.values():
        item = torch.empty((), dtype=TORCH_DTYPE[v.type.dtype]).element_size()
        total += math.prod(shape_of(program, v)) * item
    return (32 << 20) + 2 * world_size * total


_VIEWS = ("wait", "reshape", "transpose", "split")  # results that alias their input's memory


class NotEnoughMemory(ExecuteError):
    """A check that would not fit in memory, found before anything is allocated: `need` says where, how
    much and for what; `largest` lists the program's largest tensors (name, dtype, shape, bytes a rank)."""

    def __init__(self, program: Program, world: int, need: "MemoryNeed"):
        self.need = need
        self.largest = largest_tensors(program)
        ranks = f"{world} rank{'s' if world > 1 else ''}"
        super().__init__(f"{program.name} on {ranks} {need}; the largest tensors, per rank: {self.tensors}")

    @property
    def tensors(self) -> str:
        """'%x bf16[4096, 8192] (64.0 MiB), ...'"""
        return ", ".join(f"%{name} {dtype}{list(shape)} ({format_bytes(n)})" for name, dtype, shape, n in self.largest)


@dataclass
class MemoryNeed:
    """What a check needs of one memory (host memory, shared memory, a GPU's) at its peak, by part."""
    memory: str
    parts: dict[str, int]
    available: int

    @property
    def needed(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{what} {format_bytes(n)}" for what, n in self.parts.items() if n)
        return (f"needs {format_bytes(self.needed)} of {self.memory} ({parts}); "
                f"{format_bytes(self.available)} is available")


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    e = min(4, max(0, n.bit_length() - 1) // 10)  # 1024**e <= n, up to TiB
    return f"{n} B" if e == 0 else f"{n / 1024 ** e:.1f} {'KMGT'[e - 1]}iB"


def _owned(program: Program) -> list[Value]:
    """The values with memory of their own: the inputs and the results of every op but a view."""
    return [*program.inputs, *(v for op in program.ops if op.opcode not in _VIEWS for v in op.outputs)]


def _bytes(program: Program, values, float_bytes: int | None = None) -> int:
    """Bytes of `values` on one rank; floats at `float_bytes` an element when given (the reference's 8)."""
    total = 0
    for v in values:
        item = float_bytes if float_bytes and v.type.dtype in FLOAT_DTYPES else DTYPE_BYTES[v.type.dtype]
        total += v.type.numel(program.sizes, program.world_size) * item
    return total


def largest_tensors(program: Program, n: int = 3) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The `n` largest values of `program` on one rank: (name, dtype, shape, bytes), largest first."""
    sized = [(v.name, v.type.dtype, shape_of(program, v), _bytes(program, [v])) for v in _owned(program)]
    return sorted(sized, key=lambda t: -t[3])[:n]


def _heap_used(fused: Program) -> int:
    """Heap bytes the ops of `fused` allocate on one rank: the fused GEMMs' buffers, Flash Decode's states
    and flags, and the largest unfused collective's copy of its input (freed after it)."""
    from bspfuse.kernels.gemm import heap_bytes
    from bspfuse.lowering import GEMM_KINDS, gemm_shape

    W, total, copy = fused.world_size, 0, 0
    for op in fused.ops:
        if op.opcode in GEMM_KINDS:
            m, n, k = gemm_shape(op, fused)
            dtype = TORCH_DTYPE[op.outputs[0].type.dtype]
            total += heap_bytes(op.opcode, m, n, k, W, dtype, op.attrs.get("mode", "push"))
        elif op.opcode == "flash_decode":
            B, Hq, D = shape_of(fused, op.inputs[0])
            total += 4 * W * (2 * (B * Hq * (D + 1) + 16) + B * Hq)
        elif op.opcode in ("all_gather", "reduce_scatter", "all_reduce"):
            copy = max(copy, _bytes(fused, op.inputs[:1]))
    return total + copy


def memory_needs(program: Program, world: int, fused: Program | None = None, backend: str = "sim"
                 ) -> list[MemoryNeed]:
    """What `check(program, world, fused, backend)` needs at its peak of each memory it uses, and what is
    available: host memory (every rank's inputs, the float64 reference of every rank, and the ranks: a
    spawned rank gets every rank's inputs, and in the simulator holds its values and heap too), the
    simulator's shared memory (its heaps), and on GPUs each rank's GPU (heap, inputs and values)."""
    fused = fused if fused is not None else program
    inputs, outputs = _bytes(program, program.inputs), _bytes(program, program.outputs)
    widest = max((v.type.numel(program.sizes, program.world_size) for v in program.inputs), default=0)
    everyone = world * inputs
    phases = [
        {"inputs of every rank": everyone, "one input drawn in float64": 8 * widest},
        {"inputs of every rank": everyone, "the float64 reference": world * _bytes(program, _owned(program), 8)},
    ]
    from bspfuse.runtime.cuda import under_torchrun

    torchrun = backend == "cuda" and under_torchrun()
    made, heap = _bytes(fused, _owned(fused)[len(fused.inputs):]), _heap_used(fused)  # a rank's values but inputs
    if not torchrun:
        rank = everyone + 2 * outputs + (made + heap if backend == "sim" else 0)  # results: a copy, pickled
        what = "simulated ranks (inputs, values, heap)" if backend == "sim" else "ranks' inputs"
        phases.append({"inputs of every rank": everyone,
                       "results": world * (_bytes(program, program.outputs, 8) + outputs),
                       f"{world} {what}": world * rank})
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if torchrun else 1  # each draws and checks all
    peak = max(phases, key=lambda parts: sum(parts.values()))
    needs = [MemoryNeed("host memory", {k: processes * n for k, n in peak.items()}, available_memory())]
    if backend == "sim" and os.path.isdir("/dev/shm"):  # the heaps: POSIX shared memory, a tmpfs of its own size
        fs = os.statvfs("/dev/shm")
        needs.append(MemoryNeed("shared memory (/dev/shm)", {f"{world} heaps": world * heap},
                                fs.f_bavail * fs.f_frsize))
    if backend == "cuda":
        gpus = [int(os.environ.get("LOCAL_RANK", 0))] if torchrun else range(world)
        parts = {"heap": heap_bytes_for(program, world), "inputs and values": inputs + made}
        needs += [MemoryNeed(f"GPU {g}", parts, _gpu_available(g, sum(parts.values()))) for g in gpus]
    return needs


def available_memory() -> int:
    """Host memory this process may still take: MemAvailable (Linux; psutil's, else the free pages,
    elsewhere), capped by its cgroup's limit less its usage when the cgroup (a container) has one."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            import psutil

            available = psutil.virtual_memory().available
        except ImportError:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroups = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2, then v1
               ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
    for limit, usage in cgroups:
        try:
            with open(limit) as f, open(usage) as g:
                available = min(available, int(f.read()) - int(g.read()))
            break
        except (OSError, ValueError):  # no such file, or "max" (no limit)
            continue
    return available


def _gpu_available(device: int, needed: int) -> int:
    """Free bytes of GPU `device`. Asking (torch.cuda.mem_get_info) makes a CUDA context here that stays for
    the run, so it is asked only when `needed` comes near the GPU's whole memory."""
    total = torch.cuda.get_device_properties(device).total_memory
    return total if needed < total // 2 else torch.cuda.mem_get_info(device)[0]


def check_memory(program: Program, world: int, fused: Program | None = None, backend: str = "sim") -> None:
    """Raise NotEnoughMemory when `check` would need more of some memory than is available."""
    for need in memory_needs(program, world, fused, backend):
        if need.needed > need.available:
            raise NotEnoughMemory(program, world, need)
