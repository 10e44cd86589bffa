"""Fused graph op -> tile program: the step between `passes/` and `codegen/`.

    fused_allgather_matmul {mode=push|pull|copy_engine}   ->  lower_allgather_matmul, then STAGING[mode]
    fused_matmul_reduce_scatter {mode=direct|push|pull}  ->  lower_matmul_reduce_scatter, then STAGING[mode]
    fused_matmul_allreduce {mode=direct|push|pull}       ->  lower_matmul_allreduce, then STAGING[mode]

Shapes come from the op's operands with the program's sizes bound; the tile config from `choose_config`
(the same choice the host objects in `bspfuse.kernels.gemm` make), unless one is given.

`plan_kernel` is the one place that turns (op, shapes, target) into the tile program and its config: the
CLI (`inspect`, `compile`, `run`), the backend and the host objects all ask it, so what `inspect --target`
prints is what runs there. A Target names the machine: a GPU model and its SM count, or the simulator.

Example::

    log = run_passes(program)
    for op in log.program.ops:
        plan = plan_fused(op, log.program, TARGETS["H100"])      # None for ops that are not fused GEMMs
        print(plan.launch_line)    # launch: matmul_rs direct, tile 128x256x64 (8 warps, 3 stages), 132 programs, ...
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bspfuse.ir import Op, Program, concrete
from bspfuse.tile import (STAGING, TileConfig, TileProgram, ag_config, choose_config, lower_allgather_matmul,
                          lower_matmul_allreduce, lower_matmul_reduce_scatter, stage_split_k)

GEMM_KINDS = {
    "fused_allgather_matmul": "ag_matmul",
    "fused_matmul_reduce_scatter": "matmul_rs",
    "fused_matmul_allreduce": "matmul_ar",
}
_LOWER = {"ag_matmul": lower_allgather_matmul, "matmul_rs": lower_matmul_reduce_scatter,
          "matmul_ar": lower_matmul_allreduce}


def gemm_shape(op: Op, program: Program) -> tuple[int, int, int]:
    """(M, N, K) as the host objects take them: AG+GEMM (M_local, N, K); GEMM+RS/AR (M, N, K_local). An
    AG+GEMM with several weights has N = the sum of their widths (the kernel's column range)."""
    *lead, k = (concrete(d, program.sizes, program.world_size) for d in op.inputs[0].type.shape)
    return math.prod(lead), sum(weight_widths(op, program)), k  # A [batch, seq, K] (gathered on seq): its rows


def weight_widths(op: Op, program: Program) -> tuple[int, ...]:
    """N of each weight of a fused GEMM op: its inputs 1 .. op.attrs["weights"] (one unless weights join)."""
    return tuple(concrete(v.type.shape[1], program.sizes, program.world_size) for v in weights_of(op))


def weights_of(op: Op) -> tuple:
    """The B operands of a fused GEMM op (inputs after A; bias and other epilogue operands follow them)."""
    return op.inputs[1:1 + op.attrs.get("weights", 1)]


@dataclass(frozen=True)
class Target:
    """The machine a kernel is planned for: a GPU model and its SM count, or the simulator, and the kernel
    target its kernels compile for (runtime.target's TARGET: "cuda", "hip" or "sim")."""

    name: str
    num_sms: int
    kernel_target: str = "cuda"

    @property
    def sim(self) -> bool:
        return self.kernel_target == "sim"

    def __str__(self) -> str:
        return "the simulator" if self.sim else f"{self.name} ({self.num_sms} SMs)"


# The simulator: a few "SMs", so a persistent kernel has programs of every role (a comm program and two GEMM
# programs where the GPU has comm programs) and they interleave as on a GPU (runtime.sim.Programs).
SIM = Target("sim", 3, "sim")
# MI300X: 304 compute units; kernel target "hip" (pointer loads, AMDGCN), compiled in CI but not yet run
TARGETS = {"sim": SIM, "H100": Target("H100", 132), "H200": Target("H200", 132), "MI300X": Target("MI300X", 304, "hip")}
# Triton's interpreter runs every program on the CPU: small tiles keep it quick.
SIM_CONFIG = TileConfig(BM=16, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=2, comm_programs=1)


def target_of(device) -> Target:
    """The Target a torch device is: the simulator for the CPU, else the GPU's model, SM count and kernel target."""
    import torch

    from bspfuse.runtime.target import device_target

    if device.type != "cuda":
        return SIM
    props = torch.cuda.get_device_properties(device)
    return Target(next((m for m in ("H100", "H200", "MI300X") if m in props.name), props.name),
                  props.multi_processor_count, device_target(device))


@dataclass(frozen=True)
class KernelPlan:
    """What runs for one fused op on one target: its tile program (config included) and its grid."""

    tile_program: TileProgram
    programs: int
    tuned: str = ""  # where the config came from when bspfuse tune measured it (tune.lookup), else ""

    @property
    def config(self) -> TileConfig:
        return self.tile_program.config

    @property
    def launch_line(self) -> str:
        tp, c = self.tile_program, self.config
        return (f"launch: {tp.kind} {tp.mode}, tile {c.BM}x{c.BN}x{c.BK} ({c.num_warps} warps, {c.num_stages} "
                f"stages, group {c.GROUP_M}), {self.programs} programs, {c.comm_programs} comm programs"
                + (f" ({self.tuned})" if self.tuned else ""))


def plan_kernel(kind: str, mode: str, M: int, N: int, K: int, world: int, dtype: str, epilogue: tuple,
                target: Target, *, b_layout: str = "kn", weights: int = 1, config: TileConfig | None = None,
                name: str = "kernel") -> KernelPlan:
    """(op, target) -> (tile program, config): the tile chosen for the shape on the target (or `config`), the
    pull/push/copy_engine rewrite, how many programs move data and the grid. M, N, K as the host objects
    take them: AG+GEMM (M_local, N, K), GEMM+RS/AR (M, N, K_local).

    The simulator's differences from a GPU are here and nowhere else: its tile (SIM_CONFIG) and its few
    programs (SIM.num_sms); the roles, how many programs move data (one, as SIM_CONFIG asks) and the
    protocol are the GPU's."""
    rows = M * world if kind == "ag_matmul" else M
    cfg, tuned = config, ""
    if cfg is None and target.sim:
        cfg = SIM_CONFIG
    elif cfg is None:
        cfg = choose_config(kind, rows, N, K, world, target.num_sms)
        cfg, tuned = _tuned(kind, mode, M, N, K, world, dtype, b_layout, target, cfg)
    if kind == "ag_matmul":
        cfg = ag_config(cfg, mode, gated="swiglu" in epilogue and config is None)  # a given config keeps its tile
    more = {"weights": weights} if weights > 1 else {}
    tp = _LOWER[kind](name, dtype, tuple(epilogue), cfg, b_layout, **more)
    tp = STAGING[mode](tp) if mode in STAGING else tp
    tp = stage_split_k(tp) if cfg.split_k > 1 else tp
    if kind == "ag_matmul":
        comm = cfg.comm_programs
    else:  # comm programs move the staged tiles
        comm = max(1, cfg.comm_programs) if (tp.per_chunk or tp.per_own_chunk) else 0
    if comm >= target.num_sms:
        raise ValueError(f"{name}: {comm} comm programs leave no GEMM program on {target}")
    tp = tp.with_(config=dataclasses.replace(cfg, comm_programs=comm))
    return KernelPlan(tp, target.num_sms, tuned)


def _tuned(kind: str, mode: str, M: int, N: int, K: int, world: int, dtype: str, b_layout: str, target: Target,
           chosen: TileConfig) -> tuple[TileConfig, str]:
    """The config `bspfuse tune` measured fastest for this GEMM on this GPU, if it did (its tile and, for the
    same schedule and world, its comm programs), else `chosen`."""
    from bspfuse import tune

    entry, source = tune.lookup(target.name, tune.Problem(kind, M, N, K, world, dtype, b_layout))
    if entry is None or entry.best is None:
        return chosen, ""
    best = entry.best.config
    if entry.problem.world != world or entry.best.schedule != mode:  # only its tile applies here
        best = dataclasses.replace(best, comm_programs=chosen.comm_programs)
    return best, source


def plan_fused(op: Op, program: Program, target: Target, config: TileConfig | None = None) -> KernelPlan | None:
    """plan_kernel for a fused GEMM op of a program (None for any other op)."""
    kind = GEMM_KINDS.get(op.opcode)
    if kind is None:
        return None
    m, n, k = gemm_shape(op, program)
    return plan_kernel(kind, op.attrs.get("mode", "push"), m, n, k, program.world_size, op.outputs[0].type.dtype,
                       tuple(op.attrs.get("epilogue", ())), target, weights=op.attrs.get("weights", 1),
                       config=config, name=op.outputs[0].name)
