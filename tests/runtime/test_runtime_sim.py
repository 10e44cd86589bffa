"""Every RMA operation, message passing and bounded waits, in the simulator at world sizes 2 and 4.

One launch per world size runs all RMA checks (``bspfuse.runtime.checks``) and returns
their results; the other tests check how launch reports failures.
"""
import time

import pytest
import torch
import triton
import triton.language as tl

from bspfuse.runtime import (LaunchTimeout, RankFailed, RemoteWaitTimeout, iris, launch,
                             new_error_buffer, raise_if_wait_timed_out)
from bspfuse.runtime.checks import run_rma_checks


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rma_check_passes(world_size):
    results = launch(run_rma_checks, world_size, backend="sim", heap_bytes=1 << 20,
                     timeout_s=240)
    assert len(results) == world_size
    names = set(results[0])
    assert {"put[float32]", "get[bfloat16]", "copy_push[int64]", "atomic_cas race",
            "atomic_add bf16", "message passing 1000 rounds (first launch)",
            "wait_until timeout"} <= names
    failures = [f"rank {r}: {name}: {detail}" for r, checks in enumerate(results)
                for name, (ok, detail) in checks.items() if not ok]
    assert not failures, "\n".join(failures)


@triton.jit
def _consumer(flags, err, rank, epoch, MAX_SPINS: tl.constexpr):
    iris.wait_until(flags + 2, epoch, rank, err, MAX_SPINS)


def missing_signal(ctx):
    """Rank 1 waits for epoch 3 on a flag that no rank signals."""
    flags = ctx.heap.zeros(4, dtype=torch.int32, name="tile_ready")
    err = new_error_buffer(ctx.device)
    ctx.barrier()
    if ctx.rank == 1:
        _consumer[(1,)](flags, err, ctx.rank, 3, MAX_SPINS=100)
        raise_if_wait_timed_out(err, ctx.heap)
    return ctx.rank


def test_missing_signal_raises_remote_wait_timeout_in_the_parent():
    with pytest.raises(RemoteWaitTimeout) as info:
        launch(missing_signal, 2, heap_bytes=1 << 16, timeout_s=60)
    msg = str(info.value)
    for part in ["rank 1", "flag tile_ready[2]", ">= 3", "last saw 0", "traceback from rank 1",
                 "missing_signal"]:
        assert part in msg, (part, msg)
    assert info.value.rank == 1


def fails_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("bad shard shape (3, 5)")
    return "fine"


def test_rank_exception_reaches_the_parent_with_rank_and_traceback():
    with pytest.raises(RankFailed) as info:
        launch(fails_on_rank_1, 2, heap_bytes=1 << 16, timeout_s=60)
    msg = str(info.value)
    assert "rank 1 raised ValueError: bad shard shape (3, 5)" in msg
    assert "fails_on_rank_1" in info.value.remote_traceback
    assert info.value.rank == 1 and info.value.remote_type == "ValueError"


def dies_on_rank_1(ctx):
    if ctx.rank == 1:
        import os
        os._exit(3)
    return ctx.rank


def test_rank_that_dies_is_reported():
    with pytest.raises(RankFailed, match="rank 1 exited with code 3 without reporting"):
        launch(dies_on_rank_1, 2, heap_bytes=1 << 16, timeout_s=60)


def hangs_on_rank_0(ctx):
    if ctx.rank == 0:
        time.sleep(3600)
    return ctx.rank


def test_hung_rank_is_killed_after_timeout():
    start = time.monotonic()
    with pytest.raises(LaunchTimeout, match=r"ranks \[0\] did not finish within timeout_s=1 "
                                            r".*finished: \[1\]"):
        launch(hangs_on_rank_0, 2, heap_bytes=1 << 16, timeout_s=1)
    assert time.monotonic() - start < 60


def test_launch_rejects_functions_spawned_ranks_cannot_import():
    with pytest.raises(TypeError, match="top-level function"):
        launch(lambda ctx: 0, 2)
    with pytest.raises(ValueError, match="backend"):
        launch(fails_on_rank_1, 2, backend="mpi")


def test_auto_backend_is_sim_without_gpus_or_torchrun():
    from bspfuse.runtime.launch import resolve_backend
    assert resolve_backend("auto") == "sim"
