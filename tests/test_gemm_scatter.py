"""GEMM+RS / GEMM+AR tile programs: the direct form and its push and pull rewrites.

A golden of the printed programs of GEMM+AR (it has both halves: partials to their owner, finished tiles
back to every peer) before and after each rewrite; the rewrites take only a direct program; and the direct
kernel launched as a world of one (`local_matmul`, the benchmarks' bound) is a plain GEMM. The kernels of
every mode run against the unfused reference in test_fused_gemm.py.
"""
import os
from pathlib import Path

import pytest
import torch

from bspfuse.runtime import launch
from bspfuse.tile import STAGING, TileConfig, lower_matmul_allreduce, lower_matmul_reduce_scatter, print_tile_program

GOLDEN = Path(__file__).parent / "golden" / "tile_matmul_ar.txt"
SMALL = TileConfig(BM=16, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=2)


def test_rewrites_print_as_the_golden():
    direct = lower_matmul_allreduce("y", "bf16", ("relu",), SMALL)
    text = "\n\n".join(print_tile_program(tp) for tp in (direct, STAGING["push"](direct), STAGING["pull"](direct)))
    if os.environ.get("BSPFUSE_UPDATE_GOLDEN"):
        GOLDEN.write_text(text + "\n")
    assert text + "\n" == GOLDEN.read_text()


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_rewrites_take_only_a_direct_program(mode):
    staged = STAGING[mode](lower_matmul_reduce_scatter("y", "bf16", (), SMALL))
    with pytest.raises(ValueError, match="y: staging rewrites a direct program"):
        STAGING[mode](staged)


def _local(ctx):
    from bspfuse.kernels.gemm import FusedMatmulAllReduce, FusedMatmulReduceScatter

    errors = {}
    g = torch.Generator().manual_seed(3)
    for cls in (FusedMatmulReduceScatter, FusedMatmulAllReduce):
        M, N, K = 18 * ctx.world_size, 40, 24
        a, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
        op = cls(ctx.heap, M, N, K, torch.bfloat16, epilogue=("relu",), config=SMALL, mode="direct")
        ref = (a.double() @ w.double().t()).clamp_min(0)
        errors[cls.kind] = ((op.local_matmul(a, w.t()).double() - ref).norm() / ref.norm()).item()
        with pytest.raises(ValueError, match="local_matmul needs mode='direct'"):
            cls(ctx.heap, M, N, K, torch.bfloat16, config=SMALL, mode="push").local_matmul(a, w.t())
    return errors


def test_local_matmul_is_the_plain_gemm():
    for rank, errors in enumerate(launch(_local, 2, backend="sim", heap_bytes=16 << 20, timeout_s=300)):
        assert set(errors) == {"matmul_rs", "matmul_ar"}
        assert all(e < 2e-2 for e in errors.values()), (rank, errors)


def _split_k_world(ctx):
    """GEMM+RS, GEMM+AR and AG+GEMM with split-K (a tile's K in slices, summed in float32) in every schedule that
    has it, two calls each (the float32 sums and the slice counters carry over): worst relative error against
    float64."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter
    from bspfuse.tile import TileConfig

    W, r, out = ctx.world_size, ctx.rank, {}
    cfg = TileConfig(16, 32, 16, 1, 4, 2, 1, split_k=3)  # K = 80: five K-blocks in slices of two (the last one)
    for mode in ("push", "pull", "copy_engine"):
        op = FusedAllGatherMatmul(ctx.heap, 24, 40, 80, torch.bfloat16, mode=mode, config=cfg, debug=True,
                                  epilogue=("relu",))
        worst = 0.0
        for call in range(2):
            g = torch.Generator().manual_seed(call)
            shards = [torch.randn(24, 80, generator=g).to(torch.bfloat16) for _ in range(W)]
            b = torch.randn(80, 40, generator=g).to(torch.bfloat16)
            ref = torch.relu(torch.cat(shards).double() @ b.double())
            worst = max(worst, float((op(shards[r], b).double() - ref).norm() / ref.norm()))
        out[f"ag_matmul {mode}"] = (worst, "k_partials" in op.bufs, str(op.config))
    for cls in (FusedMatmulReduceScatter, FusedMatmulAllReduce):
        for mode in ("direct", "push", "pull"):
            op = cls(ctx.heap, 16 * W, 40, 80, torch.bfloat16, config=cfg, mode=mode, debug=True)
            worst = 0.0
            for call in range(2):
                g = torch.Generator().manual_seed(call)
                a_all = [torch.randn(16 * W, 80, generator=g).to(torch.bfloat16) for _ in range(W)]
                b_all = [torch.randn(80, 40, generator=g).to(torch.bfloat16) for _ in range(W)]
                total = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
                ref = total.chunk(W)[r] if cls is FusedMatmulReduceScatter else total
                got = op(a_all[r], b_all[r]).double()
                worst = max(worst, float((got - ref).norm() / ref.norm()))
            out[f"{cls.kind} {mode}"] = (worst, "k_partials" in op.bufs, str(op.config))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_split_k_sums_each_tile_over_its_k_slices(world):
    for rank, results in enumerate(launch(_split_k_world, world, backend="sim", heap_bytes=16 << 20, timeout_s=300)):
        for name, (worst, split, config) in results.items():
            assert split and "split_k=3" in config, (name, config)
            assert worst < 2e-2, (rank, name, worst)
