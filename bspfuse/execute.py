"""Run a Program: the unfused reference on the CPU, and the (fused) program per rank in `launch`.

    reference(program, inputs_by_rank)   float64, all ranks at once: the meaning of the BSP program
    random_inputs(program, world, seed)  per-rank inputs that respect the layouts
    run_fused(ctx, program, inputs)      one rank, inside launch(...): fused ops through the kernels
    choose_backend(backend, world)       "sim" or "cuda", or why the GPUs asked for are not there
    memory_needs(program, world, ...)    the bytes a check needs at its peak, against what is available
    check(program, world, ...)           all of the above, with relative errors against the reference

Collectives the passes did not fuse run through a small RMA fallback on the symmetric heap (copy in,
barrier, read every peer's copy, barrier); each is recorded in `Execution.fallbacks`, never as fusion.

Example::

    result = check(parse_file("examples/sp_mlp.bsp"), world_size=2)
    print(result.report()); assert result.ok
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from bspfuse.ir import DTYPE_BYTES, FLOAT_DTYPES, Op, Program, Value, concrete

TORCH_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
               "i8": torch.int8, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool, "u8": torch.uint8}
TOLERANCE = {"bf16": 2e-2, "f16": 5e-3, "f32": 1e-4, "f64": 1e-10}


class ExecuteError(Exception):
    """A program this executor cannot run: names the op and why."""


def _shape(program: Program, v: Value) -> tuple[int, ...]:
    return tuple(concrete(d, program.sizes, program.world_size) for d in v.type.shape)


def _where(op: Op) -> str:
    names = ", ".join(f"%{v.name}" for v in op.outputs)
    return f"{names} ({op.origin})" if op.origin else names


# ----------------------------------------------------------------------------------------------- inputs


def random_inputs(program: Program, world_size: int | None = None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fresh random inputs, one dict {input name: tensor} per rank.

    Floats are normal, scaled by 1/sqrt(rows) when the input is a matmul's B operand so products stay
    O(1); replicated inputs are equal on every rank; ints are lengths in [1, rows] (never zero)."""
    world = world_size or program.world_size
    if world is None:
        raise ExecuteError(f"program {program.name}: the world size is not known (pass --world)")
    g = torch.Generator().manual_seed(seed)
    users = program.users()
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for v in program.inputs:
        shape, dtype = _shape(program, v), v.type.dtype
        as_b = any(u.opcode in ("matmul",) and len(u.inputs) > 1 and u.inputs[1] is v for u in users.get(v, []))
        scale = 1.0 / math.sqrt(shape[0]) if as_b and shape else 1.0
        same = v.type.layout.kind == "replicated"
        first = None
        for r in range(world):
            if same and first is not None:
                out[r][v.name] = first.clone()
                continue
            if dtype in FLOAT_DTYPES:
                t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(TORCH_DTYPE[dtype])
            else:
                hi = max(1, shape[-1] if shape else 1)
                t = torch.randint(1, hi + 1, shape, generator=g).to(TORCH_DTYPE[dtype])
            out[r][v.name] = first = t
    return out


# ----------------------------------------------------------------------------------------------- reference

_UNARY = {
    "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "neg": torch.neg,
    "exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda x: x,
}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "bias": torch.add}


def _pointwise(fn: str, xs):
    if fn in _UNARY:
        return _UNARY[fn](xs[0])
    return _BINARY[fn](xs[0], xs[1])


def _epilogue(acc, fns, extra):
    bias = iter(extra)
    for fn in fns:
        acc = acc + next(bias) if fn == "bias" else _UNARY[fn](acc)
    return acc


def merge_states_math(o, lse):
    """Merge n attention states o [n, B, H, D], lse [n, B, H] (natural log) in float64; empty states
    (lse = -inf) count for nothing."""
    o, lse = o.double(), lse.double()
    m = lse.max(dim=0).values
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - safe_m)
    total = w.sum(dim=0)
    out = (w.unsqueeze(-1) * o).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out, safe_m + torch.log(total)


def _decode_args(op: Op, xs):
    q, k, v, rest = xs[0], xs[1], xs[2], list(xs[3:])
    block_table = rest.pop(0) if op.attrs.get("paged") else None
    kv_lens = rest.pop(0) if op.attrs.get("kv_lens") else None
    return q, k, v, kv_lens, block_table


def reference(program: Program, inputs_by_rank: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The BSP semantics of `program` in float64 on the CPU, every rank at once: one list of outputs per rank.

    Collectives read every rank's value: all_gather concatenates, reduce_scatter sums and keeps rank r's
    chunk, all_reduce sums. Fused ops are evaluated by what they replaced, so a fused program runs too."""
    from bspfuse.kernels.flash_decode import reference_decode

    W = len(inputs_by_rank)
    envs: list[dict[Value, torch.Tensor]] = [{} for _ in range(W)]
    for v in program.inputs:
        for r in range(W):
            t = inputs_by_rank[r][v.name]
            envs[r][v] = t.double() if t.is_floating_point() else t
    for op in program.ops:
        xs = [[env[v] for v in op.inputs] for env in envs]
        code, a = op.opcode, op.attrs
        if code in ("all_gather", "reduce_scatter", "all_reduce"):
            outs = _collective_reference(code, a, [x[0] for x in xs])
        elif code == "fused_allgather_matmul":
            full, n = torch.cat([x[0] for x in xs], dim=0), a.get("weights", 1)
            if "swiglu" in a.get("epilogue", ()):  # silu(A @ W_gate) * (A @ W_up), shaped as the product it replaced
                outs = [(torch.nn.functional.silu(full @ x[1]) * (full @ x[2])).reshape(_shape(program, op.outputs[0]))
                        for x in xs]
            else:
                outs = [(_epilogue(full @ x[1], a.get("epilogue", ()), x[1 + n:]), *(full @ b for b in x[2:1 + n]))
                        for x in xs]
            kept = (full,) if a.get("gathered_out") else ()
            outs = [(o if isinstance(o, tuple) else (o,)) + kept for o in outs]
        elif code in ("fused_matmul_reduce_scatter", "fused_matmul_allreduce"):
            total = sum(x[0] @ x[1] for x in xs)
            parts = total.chunk(W, dim=0) if code == "fused_matmul_reduce_scatter" else [total] * W
            outs = [_epilogue(parts[r], a.get("epilogue", ()), xs[r][2:]) for r in range(W)]
        elif code == "flash_decode":
            states = [reference_decode(*_decode_args(op, x), scale=a.get("scale")) for x in xs]
            merged = merge_states_math(torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states]))
            outs = [merged] * W
        elif code == "decode_partial":
            outs = [reference_decode(*_decode_args(op, x), scale=a.get("scale")) for x in xs]
        else:
            outs = [_local_op(program, op, x, torch.float64) for x in xs]
        for r in range(W):
            res = outs[r] if isinstance(outs[r], (tuple, list)) else (outs[r],)
            for v, t in zip(op.outputs, res):
                envs[r][v] = t
    return [[env[v] for v in program.outputs] for env in envs]


def _collective_reference(code: str, attrs: dict, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    W = len(xs)
    if code == "all_gather":
        full = torch.cat(xs, dim=attrs["dim"])
        return [full] * W
    total = sum(xs)
    if attrs.get("reduce", "sum") == "avg":
        total = total / W
    if code == "all_reduce":
        return [total] * W
    return list(total.chunk(W, dim=attrs["dim"]))


def _local_op(program: Program, op: Op, xs, float_dtype):
    """Ops that need no other rank: the same torch code for the reference and for a rank."""
    code, a = op.opcode, op.attrs
    if code == "wait":
        return xs[0]
    if code == "matmul":
        return xs[0] @ xs[1]
    if code == "pointwise":
        return _pointwise(a["fn"], xs)
    if code == "reshape":
        return xs[0].reshape(_shape(program, op.outputs[0]))
    if code == "transpose":
        return xs[0].transpose(0, 1)
    if code == "split":
        sizes = [concrete(s, program.sizes, program.world_size) for s in a["sizes"]]
        return tuple(xs[0].split(sizes, dim=a["dim"]))
    if code == "cat":
        return torch.cat(xs, dim=a["dim"])
    if code == "merge_states":
        o, lse = merge_states_math(xs[0], xs[1])
        return o.to(xs[0].dtype), lse.float() if float_dtype != torch.float64 else lse
    if code == "opaque":
        raise ExecuteError(f"{_where(op)}: cannot execute opaque op {a.get('target', a.get('name', '?'))}")
    raise ExecuteError(f"{_where(op)}: cannot execute op {code}")


# ----------------------------------------------------------------------------------------------- one rank


@dataclass
class Execution:
    """What one rank computed, and how: the collectives that ran through the unfused fallback."""
    outputs: list[torch.Tensor]
    fallbacks: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)
    device: str = ""  # what ran it: the simulator or the GPU's name


def rma_collective(heap, code: str, x: torch.Tensor, dim: int = 0, reduce: str = "sum") -> torch.Tensor:
    """An unfused collective through the heap: copy in, barrier, read every peer's copy, barrier."""
    W, r = heap.world_size, heap.rank
    buf = heap.empty(*x.shape, dtype=x.dtype, name=f"fallback.{code}")
    buf.copy_(x)
    heap.barrier()
    parts = [heap.peer_tensor(buf, p).clone() if p != r else x.clone() for p in range(W)]
    heap.barrier()
    heap.free(buf)
    if code == "all_gather":
        return torch.cat(parts, dim=dim)
    total = sum(p.float() for p in parts)
    if reduce == "avg":
        total = total / W
    total = total.to(x.dtype)
    return total if code == "all_reduce" else total.chunk(W, dim=dim)[r].contiguous()




def make_fused_gemm(heap, op: Op, program: Program, config=None, debug: bool = False):
    """The host object from bspfuse.kernels.gemm that runs a fused GEMM op (constructing it is collective)."""
    from bspfuse.kernels import gemm
    from bspfuse.lowering import gemm_shape, weight_widths

    m, n, k = gemm_shape(op, program)
    dtype = TORCH_DTYPE[op.outputs[0].type.dtype]
    epilogue = tuple(op.attrs.get("epilogue", ()))
    name = op.outputs[0].name
    if op.opcode == "fused_allgather_matmul":
        return gemm.FusedAllGatherMatmul(heap, m, weight_widths(op, program), k, dtype,
                                         mode=op.attrs.get("mode", "push"), epilogue=epilogue, config=config,
                                         debug=debug, name=name)
    cls = gemm.FusedMatmulReduceScatter if op.opcode == "fused_matmul_reduce_scatter" else gemm.FusedMatmulAllReduce
    return cls(heap, m, n, k, dtype, epilogue=epilogue, config=config, debug=debug, name=name,
               mode=op.attrs.get("mode", "push"))


def run_fused(ctx, program: Program, inputs: dict[str, torch.Tensor], config=None, cache: dict | None = None,
              debug: bool = False) -> Execution:
    """Run `program` on this rank (inside `launch`): fused GEMMs through their host objects (cached in
    `cache` by op), flash_decode through FlashDecode, plain ops through torch, unfused collectives
    through `rma_collective`. `config`: the fused GEMMs' TileConfig (default: lowering.plan_kernel's for
    the target the heap is on)."""
    from bspfuse.kernels.flash_decode import FlashDecode, reference_decode
    from bspfuse.runtime.launch import report_progress

    heap = ctx.heap
    device = heap.device
    cache = cache if cache is not None else {}
    ex = Execution([], device="simulator (Triton interpreter)" if device.type == "cpu"
                   else torch.cuda.get_device_name(device))
    env: dict[Value, torch.Tensor] = {v: inputs[v.name].to(device) for v in program.inputs}
    for step, op in enumerate(program.ops, 1):
        xs = [env[v] for v in op.inputs]
        code, a = op.opcode, op.attrs
        key = (op.outputs[0].name, code)
        what = f"%{op.outputs[0].name} {code}" + (f" ({a['mode']})" if "mode" in a else
                                                  f" (stage {a['stage']})" if "stage" in a else "")
        report_progress(what, step, len(program.ops))
        if code in ("fused_allgather_matmul", "fused_matmul_reduce_scatter", "fused_matmul_allreduce"):
            if key not in cache:
                cache[key] = make_fused_gemm(heap, op, program, config, debug)
            report_progress(what, step, len(program.ops), tiles=gemm_tiles(cache[key], xs[0]))
            n = a.get("weights", 1)
            bias = xs[1 + n] if "bias" in a.get("epilogue", ()) else None
            res = cache[key](xs[0], xs[1] if n == 1 else list(xs[1:1 + n]), bias)
            res = res.clone() if code == "fused_matmul_allreduce" else res  # the heap slot is reused
            res = tuple(res) if isinstance(res, list) else (res,)  # one result per weight
            res = (res[0].reshape(_shape(program, op.outputs[0])), *res[1:])  # swiglu: shaped as the product was
            if a.get("gathered_out"):  # the gathered A feeds other ops too
                res = (*res, cache[key].gathered(xs[0]))
            ex.fused.append(f"%{op.outputs[0].name}: {code} ({a.get('mode', 'push')})\n    {cache[key].plan.launch_line} "
                            f"(%{op.outputs[0].name} on {cache[key].target})")
        elif code == "flash_decode":
            if key not in cache:
                cache[key] = FlashDecode.from_op(op, heap, sizes=program.sizes)
            q, k, v, kv_lens, block_table = _decode_args(op, xs)
            res = cache[key](q, k, v, kv_lens=kv_lens, block_table=block_table)
            ex.fused.append(f"%{op.outputs[0].name}: flash_decode (stage {a.get('stage')})")
        elif code in ("all_gather", "reduce_scatter", "all_reduce"):
            res = rma_collective(heap, code, xs[0].contiguous(), a.get("dim", 0), a.get("reduce", "sum"))
            ex.fallbacks.append(f"%{op.outputs[0].name}: {code} through the RMA fallback (not fused)")
        elif code == "decode_partial":
            o, lse = reference_decode(*_decode_args(op, xs), scale=a.get("scale"))
            res = (o.to(xs[0].dtype).to(device), lse.float().to(device))
        else:
            res = _local_op(program, op, xs, torch.float32)
        res = res if isinstance(res, (tuple, list)) else (res,)
        for v, t in zip(op.outputs, res):
            env[v] = t
    ex.outputs = [env[v].cpu() for v in program.outputs]
    return ex


def gemm_tiles(host, a: torch.Tensor) -> int:
    """The output tiles a call of the fused GEMM `host` (bspfuse.kernels.gemm) with A `a` walks on this rank:
    every rank's rows times the column tiles (of every weight, unless a gated epilogue pairs them)."""
    cfg, W, rows = host.config, host.world, math.prod(a.shape[:-1])
    if host.kind == "ag_matmul":  # a holds this rank's rows
        widths = host.Ns[:1] if host.gated else host.Ns
        return W * -(-rows // cfg.BM) * sum(-(-n // cfg.BN) for n in widths)
    return W * -(-(rows // W) // cfg.BM) * -(-host.N // cfg.BN)  # a holds every rank's rows, partial sums


def _rank_main(ctx, program: Program, inputs_by_rank, debug: bool = False) -> Execution:
    return run_fused(ctx, program, inputs_by_rank[ctx.rank], debug=debug)


# ----------------------------------------------------------------------------------------------- checking


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of `out` against the float64 `ref` (absolute when ref is zero)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        return math.inf
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    return err / denom if denom > 0 else err


@dataclass
class CheckResult:
    program: str
    world_size: int
    rows: list[tuple[int, str, str, float, float]]  # rank, output name, dtype, error, tolerance
    fallbacks: list[str]
    fused: list[str]
    device: str

    @property
    def ok(self) -> bool:
        return all(err <= tol for *_, err, tol in self.rows)

    def report(self) -> str:
        lines = [f"{self.program} on {self.world_size} rank{'s' if self.world_size != 1 else ''}, {self.device}"]
        lines += [f"  fused: {f}" for f in self.fused] or ["  fused: nothing"]
        lines += [f"  fallback: {f}" for f in self.fallbacks]
        for rank, name, dtype, err, tol in self.rows:
            verdict = "ok" if err <= tol else "MISMATCH"
            lines.append(f"  rank {rank} %{name} ({dtype}): relative error {err:.3e} (tolerance {tol:g}) {verdict}")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def choose_backend(backend: str, world_size: int) -> str:
    """The backend to run `world_size` ranks on, "sim" or "cuda", for `backend` sim | cuda | auto. auto:
    cuda under torchrun or when this host has a GPU per rank, else sim. Asking for cuda without the GPUs
    is an ExecuteError that says what is missing."""
    from bspfuse.runtime.cuda import under_torchrun

    if backend == "sim":
        return "sim"
    if backend not in ("cuda", "auto"):
        raise ExecuteError(f"backend '{backend}': the backends are sim, cuda and auto")
    gpus = torch.cuda.device_count()
    if under_torchrun():
        launched = int(os.environ["WORLD_SIZE"])
        if launched != world_size:
            raise ExecuteError(f"--world {world_size} under torchrun with WORLD_SIZE={launched}: start torchrun "
                               f"with --nproc_per_node {world_size}, or pass --world {launched}")
        if gpus == 0 and backend == "cuda":
            raise ExecuteError("backend cuda under torchrun, but this process sees no CUDA GPU")
        return "cuda" if gpus else "sim"
    if gpus >= world_size:
        return "cuda"
    if backend == "auto":
        return "sim"
    if gpus == 0:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        raise ExecuteError(f"backend cuda: no CUDA GPU is visible (torch {torch.__version__} with {built}); "
                           "run on the simulator with --backend sim")
    raise ExecuteError(f"backend cuda with --world {world_size} needs {world_size} GPUs on this host, one per "
                       f"rank; {gpus} visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def heap_bytes_for(program: Program, world_size: int) -> int:
    """A symmetric heap large enough for `program`: the fused kernels keep at most two slots per peer of
    an operand or result, and a fallback collective one copy of its input; 32 MiB more for flags."""
    total = 0
    for v in program.values():
        item = torch.empty((), dtype=TORCH_DTYPE[v.type.dtype]).element_size()
        total += math.prod(_shape(program, v)) * item
    return (32 << 20) + 2 * world_size * total


# ----------------------------------------------------------------------------------------------- memory

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
    sized = [(v.name, v.type.dtype, _shape(program, v), _bytes(program, [v])) for v in _owned(program)]
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
            B, Hq, D = _shape(fused, op.inputs[0])
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


def check(program: Program, world_size: int | None = None, fused: Program | None = None, backend: str = "sim",
          seed: int = 0, timeout_s: float = 600.0, progress: bool | None = None) -> CheckResult:
    """Run `fused` (default: `program` itself) on every rank and compare it with the reference of `program`.
    backend: sim | cuda | auto, as in `choose_backend`. A run that would not fit in memory raises
    NotEnoughMemory before anything is allocated. `progress`: the ranks' progress lines (see `launch`)."""
    from bspfuse.runtime import launch

    world = world_size or program.world_size
    fused = fused if fused is not None else program
    backend = choose_backend(backend, world)
    check_memory(program, world, fused, backend)
    inputs = random_inputs(program, world, seed)
    ref = reference(program, inputs)
    runs = launch(_rank_main, world, backend=backend, args=(fused, inputs), heap_bytes=heap_bytes_for(program, world),
                  timeout_s=timeout_s, progress=progress)
    rows = []
    for rank, (run, expected) in enumerate(zip(runs, ref)):
        for v, out, want in zip(program.outputs, run.outputs, expected):
            rows.append((rank, v.name, v.type.dtype, rel_error(out, want), TOLERANCE.get(v.type.dtype, 0.0)))
    return CheckResult(program.name, world, rows, runs[0].fallbacks, runs[0].fused, runs[0].device)


# ----------------------------------------------------------------------------------------------- compile


_TORCH_NAME = {"f16": "torch.float16", "bf16": "torch.bfloat16", "f32": "torch.float32", "f64": "torch.float64"}


def compile_module(program: Program, source: str = "<program>") -> str:
    """A standalone Python module for the fused `program`: the Triton source of every fused GEMM inline, one per
    kernel target (runtime.target: TMA on NVIDIA GPUs, pointer loads on AMD's and in the simulator), and
    `run(ctx, inputs) -> outputs`, one line per op, on bspfuse's host objects and runtime. Names in the text
    are checked identifiers or repr() strings."""
    from bspfuse.codegen.triton import generate
    from bspfuse.lowering import GEMM_KINDS, SIM, TARGETS, gemm_shape, plan_fused, weight_widths
    from bspfuse.runtime.target import uses_tma

    W = program.world_size
    if W is None:
        raise ExecuteError(f"program {program.name}: the world size is not known (pass --world)")
    var = {}
    for v in program.values():
        if not v.name.isidentifier():
            raise ExecuteError(f"value name {v.name!r} is not an identifier")
        var[v] = f"v_{v.name}"
    kernels, makers, body = [], [], []
    for v in program.inputs:
        body.append(f"    {var[v]} = inputs[{v.name!r}].to(device)")
    for op in program.ops:
        outs = ", ".join(var[v] for v in op.outputs) + ("," if len(op.outputs) == 1 else "")
        ins = [var[v] for v in op.inputs]
        code, a = op.opcode, op.attrs
        name = op.outputs[0].name
        if code in GEMM_KINDS:
            for machine in (SIM, TARGETS["H200"], TARGETS["MI300X"]):  # kernel targets sim, cuda, hip
                target = machine.kernel_target
                ks = generate(plan_fused(op, program, machine).tile_program, tma=uses_tma(target))
                kernels.append(f"KERNELS[({name!r}, {target!r})] = ({ks.name!r}, {ks.source!r})\n")
            m, n, k = gemm_shape(op, program)
            dtype = _TORCH_NAME[op.outputs[0].type.dtype]
            epi = tuple(a.get("epilogue", ()))
            n_w = a.get("weights", 1)
            if code == "fused_allgather_matmul":
                widths = weight_widths(op, program) if n_w > 1 else n
                ctor = (f"gemm.FusedAllGatherMatmul(heap, {m}, {widths}, {k}, {dtype}, mode={a.get('mode', 'push')!r}, "
                        f"epilogue={epi!r}, name={name!r})")
            else:
                cls = "FusedMatmulReduceScatter" if code == "fused_matmul_reduce_scatter" else "FusedMatmulAllReduce"
                ctor = (f"gemm.{cls}(heap, {m}, {n}, {k}, {dtype}, mode={a.get('mode', 'push')!r}, epilogue={epi!r}, "
                        f"name={name!r})")
            makers.append(f"def _make_{name}(heap):\n    return _inline({ctor}, {name!r})\n")
            bias = ins[1 + n_w] if "bias" in epi else "None"
            weights = ins[1] if n_w == 1 else f"[{', '.join(ins[1:1 + n_w])}]"
            call = f"_op(ctx, {name!r}, _make_{name})({ins[0]}, {weights}, {bias})"
            if "swiglu" in epi:  # one product, shaped as the op it replaced
                call = f"{call}[0].reshape({list(_shape(program, op.outputs[0]))})"
            elif n_w > 1:  # one result per weight
                call = f"*{call}"
            if a.get("gathered_out"):  # the gathered A feeds other ops too: the last result
                call = f"{call}, _op(ctx, {name!r}, _make_{name}).gathered({ins[0]})"
            body.append(f"    {outs} = {call}" + (".clone()," if code == "fused_matmul_allreduce" else ","))
        elif code == "flash_decode":
            q, kk = op.inputs[0].type, op.inputs[1].type
            B, Hq, D = (concrete(d, program.sizes, W) for d in q.shape)
            Hkv = concrete(kk.shape[2], program.sizes, W)
            ctor = (f"FlashDecode(heap, {W}, heap.rank, {B}, {Hq}, {Hkv}, {D}, {_TORCH_NAME[q.dtype]}, "
                    f"stage={int(a['stage'])}, scale={a.get('scale')!r})")
            makers.append(f"def _make_{name}(heap):\n    return {ctor}\n")
            extra = ins[3:]
            bt = extra.pop(0) if a.get("paged") else "None"
            lens = extra.pop(0) if a.get("kv_lens") else "None"
            body.append(f"    {outs} = _op(ctx, {name!r}, _make_{name})({ins[0]}, {ins[1]}, {ins[2]}, "
                        f"kv_lens={lens}, block_table={bt})")
        elif code in ("all_gather", "reduce_scatter", "all_reduce"):
            body.append(f"    {outs} = _rt.rma_collective(ctx.heap, {code!r}, {ins[0]}.contiguous(), "
                        f"{int(a.get('dim', 0))}, {a.get('reduce', 'sum')!r}),  # not fused: RMA fallback")
        elif code == "wait":
            body.append(f"    {outs} = {ins[0]},")
        elif code == "matmul":
            body.append(f"    {outs} = {ins[0]} @ {ins[1]},")
        elif code == "pointwise":
            body.append(f"    {outs} = _rt._pointwise({a['fn']!r}, [{', '.join(ins)}]),")
        elif code == "reshape":
            shape = tuple(concrete(d, program.sizes, W) for d in op.outputs[0].type.shape)
            body.append(f"    {outs} = {ins[0]}.reshape({shape!r}),")
        elif code == "transpose":
            body.append(f"    {outs} = {ins[0]}.transpose(0, 1),")
        elif code == "cat":
            body.append(f"    {outs} = torch.cat([{', '.join(ins)}], dim={int(a['dim'])}),")
        elif code == "split":
            sizes = [concrete(s, program.sizes, W) for s in a["sizes"]]
            body.append(f"    {outs} = tuple({ins[0]}.split({sizes!r}, dim={int(a['dim'])}))")
        elif code == "merge_states":
            body.append(f"    {outs} = _rt.merge_states_math({ins[0]}, {ins[1]})")
            body.append(f"    {var[op.outputs[0]]}, {var[op.outputs[1]]} = {var[op.outputs[0]]}.to({ins[0]}.dtype), "
                        f"{var[op.outputs[1]]}.float()")
        else:
            raise ExecuteError(f"{_where(op)}: `bspfuse compile` cannot emit op {code}")
    outputs = ", ".join(f"{v.name!r}: {var[v]}" for v in program.outputs)
    body.append(f"    return {{{outputs}}}")
    return _MODULE.format(source=source, name=program.name, world=W, kernels="".join(kernels),
                          makers="\n\n".join(makers), body="\n".join(body))


_MODULE = '''"""Compiled by bspfuse from {source}: program {name} for {world} ranks.

`run(ctx, inputs)` runs one rank inside `bspfuse.runtime.launch` (ctx is its RankContext; inputs maps
input names to this rank's tensors) and returns {{output name: tensor}}. Example::

    results = launch(rank_main, {world}, backend="sim", args=(inputs_by_rank,))
"""
import torch

from bspfuse import execute as _rt
from bspfuse.codegen.load import load_kernel
from bspfuse.codegen.triton import KernelSource
from bspfuse.kernels import gemm
from bspfuse.kernels.flash_decode import FlashDecode
from bspfuse.tile import TileConfig

WORLD_SIZE = {world}
KERNELS = {{}}  # (op, kernel target: "cuda" | "hip" | "sim") -> (kernel name, Triton source)
{kernels}
_OPS = {{}}


def _inline(host, name):
    kname, source = KERNELS[(name, host.target.kernel_target)]
    host.kernel = load_kernel(KernelSource(kname, source, [], []))
    return host


def _op(ctx, name, make):
    key = (id(ctx.heap), name)
    if key not in _OPS:
        _OPS[key] = make(ctx.heap)
    return _OPS[key]


{makers}


def run(ctx, inputs):
    """One step of {name} on this rank: {{output name: tensor}}."""
    device = ctx.heap.device
{body}


def rank_main(ctx, inputs_by_rank):
    """For launch(): run with this rank's inputs; outputs come back on the CPU."""
    return {{k: v.cpu() for k, v in run(ctx, inputs_by_rank[ctx.rank]).items()}}
'''
