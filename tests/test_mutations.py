"""Mutation tests: break one step of a fused kernel's protocol and the simulator must say so.

Each case builds a fused GEMM's host object in debug mode (bounded waits), regenerates its kernel from a
mutated tile program or source, and runs it on 2 simulated ranks: a dropped signal, or a wait for the wrong
epoch, must end in a RemoteWaitTimeout naming the rank and the flag array (an error, not a hang, and not a
silent wrong answer). One case per schedule that has a flag protocol. AG+GEMM direct has none (host barriers
around a kernel that reads peers' rows in place) and copy_engine's flags are written by the host's copy stream.

A flag raised before the data it announces is written must give a wrong result: the simulator runs a
launch's programs concurrently (runtime.sim.Programs), so the comm program that waits for a GEMM program's
staged tile moves it as soon as the flag is up.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from bspfuse.runtime.launch import launch
from bspfuse.tile import Signal, StoreTile, TileConfig

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


def _signal_before_store(tp):
    """The tile program with a GEMM program's first `StoreTile; Signal` pair swapped: the flag goes up first."""
    body = tp.per_tile
    for i in range(len(body) - 1):
        if isinstance(body[i], StoreTile) and isinstance(body[i + 1], Signal) and not body[i + 1].deferred:
            return tp.with_(per_tile=body[:i] + (body[i + 1], body[i]) + body[i + 2:]), body[i + 1].flag
    raise AssertionError(f"{tp.name} has no store followed by its flag")


def _inputs(kind, rank, M, N, K, W):
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(M // W if kind == "ag_matmul" else M, K, generator=g).to(torch.bfloat16)
    return a, torch.randn(K, N, generator=g).to(torch.bfloat16)


def _reference(kind, rank, M, N, K, W):
    ins = [_inputs(kind, r, M, N, K, W) for r in range(W)]
    if kind == "ag_matmul":
        return torch.cat([a for a, _ in ins]).double() @ ins[rank][1].double()
    total = sum(a.double() @ b.double() for a, b in ins)
    return total.chunk(W)[rank] if kind == "matmul_rs" else total


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
    if mutation in ("drop_signal", "signal_early"):
        tp, flag = (_drop_first_signal if mutation == "drop_signal" else _signal_before_store)(op.tile_program)
        source = generate(tp, tma=False)
    elif mutation == "wrong_epoch":  # every bounded wait asks for the epoch after this call's: it never comes
        source = generate(op.tile_program, tma=False)
        waits = source.source.count(", epoch, rank, err_ptr, MAX_SPINS")
        assert waits, "no bounded wait found in the generated source"
        source = dataclasses.replace(source, source=source.source.replace(", epoch, rank, err_ptr, MAX_SPINS",
                                                                          ", epoch + 1, rank, err_ptr, MAX_SPINS"))
        flag = None
    else:
        source, flag = generate(op.tile_program, tma=False), None
    op.kernel, op.max_spins = load_kernel(source), 1 << 12  # a few thousand spins: enough, and quick
    op._launchers.clear()
    a, b = _inputs(kind, ctx.rank, M, N, K, W)
    try:
        out = op(a, b)
    except RemoteWaitTimeout as e:
        return {"timeout": str(e), "flag": flag, "error": None}
    ref = _reference(kind, ctx.rank, M, N, K, W)
    return {"timeout": None, "flag": flag, "error": float((out.double() - ref).norm() / ref.norm())}


SCHEDULES = [("ag_matmul", "push"), ("ag_matmul", "pull"), ("matmul_rs", "direct"), ("matmul_rs", "push"),
             ("matmul_rs", "pull"), ("matmul_ar", "direct"), ("matmul_ar", "push"), ("matmul_ar", "pull")]
CASES = [(k, m, "drop_signal") for k, m in SCHEDULES] + [("ag_matmul", "push", "wrong_epoch"),
                                                         ("matmul_ar", "push", "wrong_epoch")]
EARLY = [("matmul_rs", "push"), ("matmul_ar", "push")]  # a GEMM program's staged tile, moved by a comm program


@pytest.mark.parametrize("kind,mode,mutation", CASES, ids=["-".join(c) for c in CASES])
def test_a_broken_protocol_times_out_naming_the_flag(kind, mode, mutation):
    results = launch(_run_mutated, 2, backend="sim", heap_bytes=8 << 20, args=(kind, mode, mutation), timeout_s=300)
    timeouts = [r["timeout"] for r in results if r["timeout"]]
    assert timeouts, f"{kind} {mode} with {mutation}: every rank finished; the mutation went unnoticed"
    for text in timeouts:
        # e.g. "rank 0: wait_until timed out on flag ag_matmul_bf16_w2.arrived[1, 0]: ..." (array [rank, index]).
        # Programs run concurrently: the first wait to give up may be one downstream of the dropped flag.
        assert re.match(r"rank \d+: wait_until timed out on flag \w+\.\w+\[\d+, \d+\]", text), text
    dropped = results[0]["flag"]
    if dropped in ("arrived", "staged", "entered"):  # nothing else waits first: the flag itself is named
        assert any(f".{dropped}[" in text for text in timeouts), timeouts


def test_the_unmutated_kernels_pass_the_same_check():
    for kind, mode in EARLY:
        results = launch(_run_mutated, 2, backend="sim", heap_bytes=8 << 20, args=(kind, mode, "none"), timeout_s=300)
        assert all(r["timeout"] is None and r["error"] < 2e-2 for r in results), results


@pytest.mark.parametrize("kind,mode", EARLY, ids=["-".join(c) for c in EARLY])
def test_a_flag_raised_before_its_data_gives_a_wrong_result(kind, mode):
    results = launch(_run_mutated, 2, backend="sim", heap_bytes=8 << 20, args=(kind, mode, "signal_early"),
                     timeout_s=300)
    assert any(r["timeout"] or r["error"] > 0.05 for r in results), \
        f"{kind} {mode}: a flag raised before its tile was stored went unnoticed: {results}"
