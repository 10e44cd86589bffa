"""The fused GEMM kernels against the unfused reference, in the multi-rank simulator.

Shapes are random and deliberately not multiples of the tile sizes; every call draws fresh inputs, and
several calls in a row check that epoch flags need no reset between calls. GEMM+RS and GEMM+AR run in
every mode (push: staged partials moved by comm programs; pull: the owner reads them; direct).
"""
import pytest
import torch

from bspfuse.runtime import launch
from bspfuse.tile import TileConfig

SMALL = TileConfig(BM=16, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=2, comm_programs=1)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _inputs(seed, *shapes, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _check_ag(ctx, M_local, N, K, dtype, modes, epilogue, calls):
    from bspfuse.kernels.gemm import FusedAllGatherMatmul

    r, W = ctx.rank, ctx.world_size
    errors = {}
    for mode in modes:
        op = FusedAllGatherMatmul(ctx.heap, M_local, N, K, dtype, mode=mode, epilogue=epilogue, config=SMALL, debug=True)
        worst = 0.0
        for call in range(calls):
            shards = _inputs(100 * call + 7, *[(M_local, K)] * W, dtype=dtype)
            b, bias = _inputs(100 * call + 8, (K, N), (N,), dtype=dtype)
            c = op(shards[r], b, bias if "bias" in epilogue else None)
            ref = torch.cat(shards).double() @ b.double()
            if "bias" in epilogue:
                ref = ref + bias.double()
            if "gelu" in epilogue:
                ref = torch.nn.functional.gelu(ref)
            worst = max(worst, _rel(c, ref))
        errors[mode] = worst
    return errors


def _check_ag_weights(ctx, M_local, Ns, K, dtype, modes, calls, epilogue=()):
    """Several weights sharing the gathered A, given as nn.Linear weights ([N, K] storage, read as .t()) but
    for the last, row-major [K, N] (the kernel reads it after a copy into the others' layout). The epilogue
    (bias, relu) is the first weight's only."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul

    r, W = ctx.rank, ctx.world_size
    errors = {}
    for mode in modes:
        op = FusedAllGatherMatmul(ctx.heap, M_local, Ns, K, dtype, mode=mode, epilogue=epilogue, config=SMALL,
                                  debug=True, b_layout="nk")
        worst = 0.0
        for call in range(calls):
            shards = _inputs(100 * call + 9, *[(M_local, K)] * W, dtype=dtype)
            weights = _inputs(100 * call + 10, *[(n, K) for n in Ns], dtype=dtype)
            (bias,) = _inputs(100 * call + 11, (Ns[0],), dtype=dtype)
            bs = [w.t() for w in weights[:-1]] + [weights[-1].t().contiguous()]
            cs = op(shards[r], bs, bias if "bias" in epilogue else None)
            full = torch.cat(shards).double()
            refs = [full @ w.double().t() for w in weights]
            if epilogue == ("swiglu",):  # one product: silu(A @ W_0) * (A @ W_1)
                refs = [torch.nn.functional.silu(refs[0]) * refs[1]]
            elif epilogue:
                refs[0] = (refs[0] + bias.double()).clamp_min(0)
            assert len(cs) == len(refs)
            worst = max([worst] + [_rel(c, ref) for c, ref in zip(cs, refs)])
        errors[mode] = worst
    return errors


def _check_scatter(ctx, kind, M, N, K, dtype, modes, epilogue, calls):
    from bspfuse.kernels.gemm import FusedMatmulAllReduce, FusedMatmulReduceScatter

    r, W = ctx.rank, ctx.world_size
    cls = FusedMatmulReduceScatter if kind == "rs" else FusedMatmulAllReduce
    errors = {}
    for mode in modes:
        op = cls(ctx.heap, M, N, K, dtype, epilogue=epilogue, config=SMALL, debug=True, mode=mode)
        worst = 0.0
        for call in range(calls):
            a_all = _inputs(100 * call + 1, *[(M, K)] * W, dtype=dtype)
            b_all = _inputs(100 * call + 2, *[(K, N)] * W, dtype=dtype)
            out = op(a_all[r], b_all[r])
            ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
            if "relu" in epilogue:
                ref = ref.clamp_min(0)
            if kind == "rs":
                ref = ref.chunk(W)[r]
            worst = max(worst, _rel(out, ref))
        errors[mode] = worst
    return errors


def _ag_world(ctx):
    return {
        "bf16 push/pull/direct/copy_engine": _check_ag(ctx, 37, 40, 40, torch.bfloat16,
                                                       ("push", "pull", "direct", "copy_engine"), (), 3),
        # 7 row blocks a rank: the copy engine moves (and flags) chunks of 2
        "bf16 copy_engine chunks": _check_ag(ctx, 100, 32, 24, torch.bfloat16, ("copy_engine",), (), 2),
        "f32 push gelu+bias": _check_ag(ctx, 16, 32, 24, torch.float32, ("push",), ("bias", "gelu"), 2),
        "f16 pull": _check_ag(ctx, 20, 56, 24, torch.float16, ("pull",), (), 2),
        "bf16 three weights": _check_ag_weights(ctx, 21, (40, 16, 24), 32, torch.bfloat16,
                                                ("push", "pull", "direct", "copy_engine") if ctx.world_size == 2
                                                else ("copy_engine",), 2),
        "f32 two weights bias+relu": _check_ag_weights(ctx, 12, (24, 8), 16, torch.float32, ("push",), 1,
                                                       ("bias", "relu")),
        "bf16 swiglu": _check_ag_weights(ctx, 19, (40, 40), 24, torch.bfloat16,
                                         ("copy_engine", "direct") if ctx.world_size == 2 else ("push",), 2, ("swiglu",)),
    }


def _scatter_world(ctx):
    W = ctx.world_size
    # every mode at world 2; at world 4 (4 simulated ranks on 2 cores are slow) fewer calls and modes
    every, calls = ("push", "pull", "direct"), (3 if W == 2 else 2)
    rs_f32, ar_f32 = (("push", "pull"),) * 2 if W == 2 else (("push",), ("pull",))
    return {
        "rs bf16": _check_scatter(ctx, "rs", 30 * W, 56, 24, torch.bfloat16, every, (), calls),
        "rs f32 relu": _check_scatter(ctx, "rs", 16 * W, 32, 16, torch.float32, rs_f32, ("relu",), 2),
        "ar bf16": _check_scatter(ctx, "ar", 18 * W, 40, 24, torch.bfloat16, every, (), calls),
        "ar f32": _check_scatter(ctx, "ar", 20 * W, 36, 20, torch.float32, ar_f32, (), 2),
        "ar f16 relu": _check_scatter(ctx, "ar", 8 * W, 24, 16, torch.float16, ("push",), ("relu",), 1),
    }


TOL_BY_NAME = {"bf16": 2e-2, "f16": 2e-3, "f32": 1e-5}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("which", ["allgather_matmul", "matmul_scatter"])
def test_fused_gemm_matches_reference(world, which):
    fn = _ag_world if which == "allgather_matmul" else _scatter_world
    for rank, results in enumerate(launch(fn, world, backend="sim", heap_bytes=16 << 20, timeout_s=600)):
        for name, err in results.items():
            errs = err.values() if isinstance(err, dict) else [err]
            tol = TOL_BY_NAME[name.split()[1] if which == "matmul_scatter" else name.split()[0]]
            for e in errs:
                assert e < tol, f"rank {rank} {name}: relative error {err}"


def _tickets_after_calls(ctx):
    """(ticket counter, programs per call, calls, worst error) per op kind and mode: the kernels count their
    epochs on the device, so the host passes the same epoch (0) every call, as a CUDA graph's replay does."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulReduceScatter

    W, r, calls, out = ctx.world_size, ctx.rank, 3, {}
    for mode in ("push", "pull"):
        op = FusedAllGatherMatmul(ctx.heap, 21, 40, 24, torch.bfloat16, mode=mode, config=SMALL)
        worst = 0.0
        for call in range(calls):
            shards = _inputs(call, *[(21, 24)] * W, dtype=torch.bfloat16)
            (b,) = _inputs(50 + call, (24, 40), dtype=torch.bfloat16)
            worst = max(worst, _rel(op(shards[r], b), torch.cat(shards).double() @ b.double()))
        out[f"ag {mode}"] = (int(op.ticket), op.plan.programs, calls, worst)
    for mode in ("push", "pull", "direct"):
        op = FusedMatmulReduceScatter(ctx.heap, 16 * W, 32, 24, torch.bfloat16, config=SMALL, mode=mode)
        worst = 0.0
        for call in range(calls):
            a_all = _inputs(call, *[(16 * W, 24)] * W, dtype=torch.bfloat16)
            b_all = _inputs(50 + call, *[(24, 32)] * W, dtype=torch.bfloat16)
            ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all)).chunk(W)[r]
            worst = max(worst, _rel(op(a_all[r], b_all[r]), ref))
        out[f"rs {mode}"] = (int(op.ticket), op.plan.programs, calls, worst)
    return out


def test_kernels_count_their_epochs_on_the_device():
    for rank, results in enumerate(launch(_tickets_after_calls, 2, backend="sim", heap_bytes=16 << 20, timeout_s=300)):
        for name, (tickets, programs, calls, worst) in results.items():
            assert tickets == programs * calls, (rank, name, tickets, programs, calls)
            assert worst < 2e-2, (rank, name, worst)


def test_a_launch_lets_go_of_exactly_the_calls_own_tensors():
    # FastLaunch.forget after each launch: A (and its descriptor) and every C, not weights, flags or buffers
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulReduceScatter
    from bspfuse.runtime import SymmetricHeap

    heap = SymmetricHeap(1 << 20)
    ag = FusedAllGatherMatmul(heap, 16, (32, 16, 16), 32, torch.bfloat16, mode="push", config=SMALL, b_layout="nk")
    rs = FusedMatmulReduceScatter(heap, 16, 32, 16, torch.bfloat16, config=SMALL, mode="push")
    assert [ag.kernel_source.params[i] for i in ag._per_call_args] == ["a_ptr", "c_ptr", "c1_ptr", "c2_ptr"]
    assert [rs.kernel_source.params[i] for i in rs._per_call_args] == ["a_desc", "a_ptr", "out_ptr"]
