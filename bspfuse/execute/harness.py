"""Check a program against its reference: the backend, the heap, the run on every rank and the errors."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bspfuse.execute.inputs import random_inputs
from bspfuse.execute.memory import check_memory, heap_bytes_for
from bspfuse.execute.rank import rank_main
from bspfuse.execute.reference import reference
from bspfuse.execute.values import TOLERANCE, ExecuteError
from bspfuse.ir import Program


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
    runs = launch(rank_main, world, backend=backend, args=(fused, inputs), heap_bytes=heap_bytes_for(program, world),
                  timeout_s=timeout_s, progress=progress)
    rows = []
    for rank, (run, expected) in enumerate(zip(runs, ref)):
        for v, out, want in zip(program.outputs, run.outputs, expected):
            rows.append((rank, v.name, v.type.dtype, rel_error(out, want), TOLERANCE.get(v.type.dtype, 0.0)))
    return CheckResult(program.name, world, rows, runs[0].fallbacks, runs[0].fused, runs[0].device)
