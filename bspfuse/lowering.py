"""Fused graph op -> tile program: the step between `passes/` and `codegen/`.

    fused_allgather_matmul {mode=push|pull|copy_engine}   ->  lower_allgather_matmul, then STAGING[mode]
    fused_matmul_reduce_scatter {mode=direct|push|pull}  ->  lower_matmul_reduce_scatter, then STAGING[mode]
    fused_matmul_allreduce {mode=direct|push|pull}       ->  lower_matmul_allreduce, then STAGING[mode]

Shapes come from the op's operands with the program's sizes bound; the tile config from `choose_config`
(the same choice the host objects in `bspfuse.kernels.gemm` make), unless one is given.

Example::

    log = run_passes(program)
    for op in log.program.ops:
        tp = lower_fused(op, log.program)      # None for ops that are not fused GEMMs
"""
from __future__ import annotations

import math

from bspfuse.ir import Op, Program, concrete
from bspfuse.tile import (STAGING, TileConfig, TileProgram, ag_config, choose_config, lower_allgather_matmul,
                          lower_matmul_allreduce, lower_matmul_reduce_scatter)

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


def gemm_config(op: Op, program: Program) -> TileConfig:
    """The tile config the host object would choose for `op` on a GPU (AG push/pull: one comm program at least;
    copy_engine and direct: none)."""
    kind = GEMM_KINDS[op.opcode]
    W = program.world_size
    m, n, k = gemm_shape(op, program)
    if kind != "ag_matmul":
        return choose_config(kind, m, n, k, W)
    gated = "swiglu" in op.attrs.get("epilogue", ())
    return ag_config(choose_config(kind, m * W, n, k, W), op.attrs.get("mode"), gated)


def lower_fused(op: Op, program: Program, config: TileConfig | None = None) -> TileProgram | None:
    """The tile program of a fused GEMM op (pull/push staging applied), or None for any other op."""
    kind = GEMM_KINDS.get(op.opcode)
    if kind is None:
        return None
    dtype = op.outputs[0].type.dtype
    epilogue = tuple(op.attrs.get("epilogue", ()))
    more = {"weights": op.attrs["weights"]} if op.attrs.get("weights", 1) > 1 else {}
    tp = _LOWER[kind](op.outputs[0].name, dtype, epilogue, config or gemm_config(op, program), **more)
    mode = op.attrs.get("mode", "push")
    if mode in STAGING:
        tp = STAGING[mode](tp)
    return tp
