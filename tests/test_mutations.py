"""Mutation tests: break one step of a fused kernel's protocol and the simulator must say so.

Each case builds a fused GEMM's host object in debug mode (bounded waits), regenerates its kernel from a
mutated tile program or source, and runs it on 2 simulated ranks: a dropped signal, or a wait for the wrong
epoch, must end in a RemoteWaitTimeout naming the rank and the flag (an error, not a hang, and not a silent
wrong answer). One case per schedule that has a flag protocol. AG+GEMM direct has none (host barriers around
a kernel that reads peers' rows in place) and copy_engine's flags are written by the host's copy stream.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bspfuse.runtime.launch import launch
from bspfuse.tile import Signal, TileConfig

SMALL = TileConfig(16, 32, 16, 2, 4, 2, 1)
STATEMENT_LISTS = ("prologue", "per_chunk", "per_tile", "per_own_tile", "per_own_chunk", "comm_epilogue",
                   "gemm_epilogue")


def _drop_first_signal(tp):
    """The tile program with its first Signal statement removed: that flag is never raised."""
    for name in STATEMENT_LISTS:
        body = getattr(tp, name)
        for i, s in enumerate(body):
            if isinstance(s, Signal):
                return tp.with_(**{name: body[:i] + body[i + 1:]}), s.flag
    raise AssertionError(f"{tp.name} raises no flag")


def _run_mutated(ctx, kind, mode, mutation):
    from bspfuse.codegen.load import load_kernel
    from bspfuse.codegen.triton import generate
    from bspfuse.kernels import gemm
    from bspfuse.runtime.errors import RemoteWaitTimeout

    W, M, N, K = ctx.world_size, 32, 32, 32
    if kind == "ag_matmul":
        op = gemm.FusedAllGatherMatmul(ctx.heap, M // W, N, K, torch.bfloat16, mode=mode, config=SMALL, debug=True)
    else:
        cls = gemm.FusedMatmulReduceScatter if kind == "matmul_rs" else gemm.FusedMatmulAllReduce
        op = cls(ctx.heap, M, N, K, torch.bfloat16, config=SMALL, debug=True, mode=mode)
    if mutation == "drop_signal":
        tp, flag = _drop_first_signal(op.tile_program)
        source = generate(tp, tma=False)
    else:  # every bounded wait asks for the epoch after this call's: it never comes
        source = generate(op.tile_program, tma=False)
        waits = source.source.count(", epoch, rank, err_ptr, MAX_SPINS")
        assert waits, "no bounded wait found in the generated source"
        source = dataclasses.replace(source, source=source.source.replace(", epoch, rank, err_ptr, MAX_SPINS",
                                                                          ", epoch + 1, rank, err_ptr, MAX_SPINS"))
        flag = None
    op.kernel, op.max_spins = load_kernel(source), 1 << 12  # a few thousand spins: enough, and quick
    op._launchers.clear()
    a = torch.randn(M // W if kind == "ag_matmul" else M, K, dtype=torch.bfloat16)
    b = torch.randn(K, N, dtype=torch.bfloat16)
    try:
        op(a, b)
    except RemoteWaitTimeout as e:
        return {"timeout": str(e), "flag": flag}
    return {"timeout": None, "flag": flag}


SCHEDULES = [("ag_matmul", "push"), ("ag_matmul", "pull"), ("matmul_rs", "direct"), ("matmul_rs", "push"),
             ("matmul_rs", "pull"), ("matmul_ar", "direct"), ("matmul_ar", "push"), ("matmul_ar", "pull")]
CASES = [(k, m, "drop_signal") for k, m in SCHEDULES] + [("ag_matmul", "push", "wrong_epoch"),
                                                         ("matmul_ar", "push", "wrong_epoch")]


@pytest.mark.parametrize("kind,mode,mutation", CASES, ids=["-".join(c) for c in CASES])
def test_a_broken_protocol_times_out_naming_the_flag(kind, mode, mutation):
    results = launch(_run_mutated, 2, backend="sim", heap_bytes=8 << 20, args=(kind, mode, mutation), timeout_s=300)
    timeouts = [r["timeout"] for r in results if r["timeout"]]
    assert timeouts, f"{kind} {mode} with {mutation}: every rank finished; the mutation went unnoticed"
    for text in timeouts:  # e.g. "rank 1 waited for flag bspfuse...flags[3] to reach 2 ..."
        assert "rank" in text and ".flags[" in text, text
