"""B in nn.Linear's layout (weight.t(), a [K, N] view of [N, K] storage) reaches the fused GEMMs without a copy.

Every kernel runs with B row-major ("kn") and as the transpose of a row-major [N, K] tensor ("nk"), in bf16
and f32, on shapes that are not multiples of the tiles, against the float64 reference; the kernels read
A through a longer row stride (a column slice) too. The TMA forms of the "nk" kernels compile for sm_90
with tensor-memory loads and tensor-core dots (in a fresh process: an interpreted kernel cannot compile);
they include GEMM+RS direct and pull and GEMM+AR push, so every scatter form compiles.
"""
import textwrap

import pytest
import torch

from bspfuse.codegen.triton import generate
from bspfuse.kernels.gemm import a_operand, b_operand
from bspfuse.runtime import launch
from bspfuse.tile import TileConfig, lower_matmul_reduce_scatter, print_tile_program

SMALL = TileConfig(BM=16, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=2, comm_programs=1)
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def test_operands_choose_a_layout_without_copying():
    w = torch.randn(40, 24)  # nn.Linear(24, 40).weight: [N, K]
    layout, storage = b_operand(w.t())
    assert layout == "nk" and storage.data_ptr() == w.data_ptr() and storage.shape == (40, 24)
    b = torch.randn(24, 40)
    layout, storage = b_operand(b)
    assert layout == "kn" and storage is b
    every_other_column = torch.randn(24, 80)[:, ::2]
    layout, storage = b_operand(every_other_column)
    assert layout == "kn" and storage.is_contiguous() and torch.equal(storage, every_other_column)
    a_wide = torch.randn(16, 64)
    assert a_operand(a_wide[:, :24]).data_ptr() == a_wide.data_ptr()  # a column slice: rows stay contiguous
    assert a_operand(a_wide[:, 3:27]).is_contiguous()  # its rows start off 16-byte alignment: copied


def test_layout_shows_in_tile_program_and_kernel():
    tp = lower_matmul_reduce_scatter("rs", "bf16", (), SMALL, b_layout="nk")
    assert print_tile_program(tp).splitlines()[0].endswith("b_layout=nk")
    assert "b_desc.load([pid_n * BN, k * BK]).T" in generate(tp, tma=True).source
    assert "rn[None, :].to(tl.int64) * stride_b + kk[:, None]" in generate(tp, tma=False).source
    with pytest.raises(ValueError, match="b_layout 'tn'"):
        lower_matmul_reduce_scatter("rs", "bf16", (), SMALL, b_layout="tn")


def _as(layout, b):
    return b if layout == "kn" else b.t().contiguous().t()  # "nk": weight.t() of a row-major [N, K] weight


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _every_kernel(ctx):
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter

    r, W = ctx.rank, ctx.world_size
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(5)
        M_local, N, K = 20, 40, 24
        for built_for in ("kn", "nk"):  # the layout compiled up front; the other compiles on its first call
            ag = FusedAllGatherMatmul(ctx.heap, M_local, N, K, dtype, mode="push", config=SMALL, debug=True,
                                      b_layout=built_for)
            rs = FusedMatmulReduceScatter(ctx.heap, M_local * W, N, K, dtype, config=SMALL, debug=True,
                                          b_layout=built_for)
            ar = FusedMatmulAllReduce(ctx.heap, M_local * W, N, K, dtype, config=SMALL, debug=True,
                                      b_layout=built_for)
            for layout in ("kn", "nk"):
                shards = [torch.randn(M_local, K + 8, generator=g).to(dtype)[:, :K] for _ in range(W)]  # A: a slice
                b = torch.randn(K, N, generator=g).to(dtype)
                ref = torch.cat(shards).double() @ b.double()
                errors[f"ag {dtype} built {built_for} called {layout}"] = _rel(ag(shards[r], _as(layout, b)), ref)
                a_all = [torch.randn(M_local * W, K + 8, generator=g).to(dtype)[:, :K] for _ in range(W)]
                b_all = [torch.randn(K, N, generator=g).to(dtype) for _ in range(W)]
                ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
                errors[f"rs {dtype} built {built_for} called {layout}"] = _rel(rs(a_all[r], _as(layout, b_all[r])),
                                                                               ref.chunk(W)[r])
                errors[f"ar {dtype} built {built_for} called {layout}"] = _rel(ar(a_all[r], _as(layout, b_all[r])),
                                                                               ref)
    return errors


def test_every_kernel_reads_both_b_layouts():
    for rank, errors in enumerate(launch(_every_kernel, 2, backend="sim", heap_bytes=16 << 20, timeout_s=600)):
        assert len(errors) == 24
        for name, err in errors.items():
            tol = TOL[torch.bfloat16 if "bfloat16" in name else torch.float32]
            assert err < tol, f"rank {rank} {name}: relative error {err}"


COMPILE = textwrap.dedent('''
    import json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bspfuse.codegen.load import load_kernel
    from bspfuse.codegen.triton import generate
    from bspfuse.tile import (STAGING, TileConfig, choose_config, gated_config, lower_allgather_matmul,
                              lower_matmul_allreduce, lower_matmul_reduce_scatter, stage_split_k)

    TY = {"bf16": "bf16", "f32": "fp32"}

    def compile_one(tp):
        ks = generate(tp, tma=True)
        fn = load_kernel(ks)
        cfg, ty = tp.config, TY[tp.dtype]
        b_block = [cfg.BK, cfg.BN] if tp.b_layout == "kn" else [cfg.BN, cfg.BK]
        values = dict(WORLD=2, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, COMM=cfg.comm_programs,
                      LAG=124, NUM_PROGRAMS=132, CHUNK_K=128, MAX_SPINS=0, TARGET="cuda", VEC=16, FLAG_BLOCKS=8,
                      SEGMENTED=False, SPLIT_K=cfg.split_k)
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in ks.constexprs:
                sig[name] = "constexpr"
            elif name in ("a_desc", "b_desc"):
                block = [cfg.BM, cfg.BK] if name == "a_desc" else b_block
                sig[name] = f"tensordesc<{ty}[{block[0]}, {block[1]}]>"
            elif name == "acc_ptr":  # split-K's float32 sums
                sig[name] = "*fp32"
            elif name in ("flag_ptr", "err_ptr", "heap_bases", "ticket_ptr"):
                sig[name] = "*i32" if name == "flag_ptr" else "*i64"
            else:
                sig[name] = "*" + ty if name.endswith("_ptr") else "i32"
            if name.endswith("_ptr") or name in ("heap_bases", "M_BOUND", "N", "K") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as Triton's launcher marks multiples of 16 (M_LOCAL: never)
        constexprs = {k: v for k, v in values.items() if k in ks.constexprs}
        k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ops = re.findall(r"\\b(wgmma\\.mma_async[.\\w]*|cp\\.async\\.bulk\\.tensor[.\\w]*|st\\.global[.\\w]*)",
                         k.asm["ptx"])
        atomics = re.findall(r"\\b((?:red|atom)\\.[.\\w]*)", k.asm["ptx"])
        return {"kind": tp.kind, "dtype": tp.dtype, "ops": sorted(set(ops)), "atomics": sorted(set(atomics))}

    shape = dict(M=4096, N=8192, K=4096, world_size=2)
    out = [compile_one(lower_matmul_reduce_scatter("rs", "bf16", (), choose_config("matmul_rs", **shape), "nk")),
           compile_one(STAGING["push"](lower_matmul_allreduce("ar", "bf16", ("relu",),
                                                              choose_config("matmul_ar", **shape), "nk"))),
           compile_one(STAGING["push"](lower_allgather_matmul("ag", "bf16", ("bias",),
                                                              choose_config("ag_matmul", **shape), "nk"))),
           compile_one(STAGING["pull"](lower_matmul_reduce_scatter("rs", "f32", (), TileConfig(64, 64, 32, 8, 4, 3),
                                                                   "nk"))),
           compile_one(STAGING["push"](lower_allgather_matmul("ag3", "bf16", (), choose_config("ag_matmul", **shape),
                                                              "nk", weights=3))),
           compile_one(STAGING["copy_engine"](lower_allgather_matmul("agce", "bf16", (),
                                                                     choose_config("ag_matmul", **shape), "nk"))),
           compile_one(STAGING["copy_engine"](lower_allgather_matmul(
               "swiglu", "bf16", ("swiglu",), gated_config(choose_config("ag_matmul", **shape)), "nk", weights=2))),
           compile_one(stage_split_k(lower_matmul_reduce_scatter("rsk", "bf16", (), TileConfig(64, 64, 128, 1, 4, 4,
                                                                                              split_k=4), "nk"))),
           compile_one(stage_split_k(STAGING["copy_engine"](lower_allgather_matmul(
               "agk", "bf16", (), TileConfig(64, 64, 128, 1, 4, 4, split_k=4), "nk"))))]
    print(json.dumps(out))
''')


def test_nk_kernels_compile_for_sm90_with_tma_and_tensor_cores(run_script):
    kernels = run_script(COMPILE)
    assert [k["kind"] for k in kernels] == ["matmul_rs", "matmul_ar", "ag_matmul", "matmul_rs"] + ["ag_matmul"] * 3 \
        + ["matmul_rs", "ag_matmul"]
    for k in kernels:
        assert any(o.startswith("cp.async.bulk.tensor.2d") for o in k["ops"]), k  # B (and A) through TMA
        if k["dtype"] == "bf16":
            assert any(o.startswith("wgmma.mma_async") for o in k["ops"]), k  # the transposed tile feeds wgmma
        if k["kind"] != "ag_matmul":
            assert "st.global.v4.b32" in k["ops"], k  # tiles leave (to peers, staging, out) as 16-byte stores
    # Finished tiles of the output go out through TMA stores, except where the kernel reads them back after a
    # flag (AR push moves its finished tiles on: those stay ordinary stores, ordered before the flag).
    tma_store = [any(o.startswith("cp.async.bulk.tensor") and ".global.shared" in o for o in k["ops"])
                 for k in kernels]
    assert tma_store == [True, False, True, True, True, True, True, True, True], kernels
    for k in kernels[-2:]:  # split-K adds its slices' float32 partials with atomics
        assert any(o.startswith(("red.", "atom.")) and o.endswith("f32") for o in k["atomics"]), k


def _weight_reuse(ctx):
    from bspfuse.kernels.gemm import FusedMatmulReduceScatter

    rs = FusedMatmulReduceScatter(ctx.heap, 20, 40, 24, torch.float32, config=SMALL, debug=True, b_layout="nk")
    a = torch.randn(20, 24)
    w = torch.randn(40, 24)  # an nn.Linear weight, passed as w.t() (a new view object every call)
    wide = torch.randn(24, 80)
    errors = []
    for step in range(4):
        if step == 1:
            w.mul_(-2)  # updated in place (an optimizer step): same memory, new values
        if step == 2:
            w = torch.randn(40, 24)  # another weight of the same shape
        b = w.t() if step < 3 else wide[:, ::2]  # step 3: strides no kernel reads, so B is copied
        errors.append(_rel(rs(a, b), a.double() @ b.double()))
        if step == 3:
            wide.add_(1)  # the copy must be made again: the source changed
            errors.append(_rel(rs(a, wide[:, ::2]), a.double() @ wide[:, ::2].double()))
    return errors


def test_b_derived_once_per_weight_follows_in_place_updates_and_new_weights():
    errors = launch(_weight_reuse, 1, backend="sim", heap_bytes=4 << 20, timeout_s=300)[0]
    assert len(errors) == 5 and max(errors) < TOL[torch.float32], errors


def _bad_out(ctx):
    from bspfuse.kernels.gemm import FusedAllGatherMatmul

    ag = FusedAllGatherMatmul(ctx.heap, 20, 40, 24, torch.float32, mode="push", config=SMALL, debug=True)
    a, b = torch.randn(20, 24), torch.randn(24, 40)
    errors = []
    for out in (torch.empty(20, 41), torch.empty(20, 40, dtype=torch.float64), torch.empty(40, 20).t()):
        try:
            ag(a, b, out=out)
            errors.append("accepted")
        except ValueError as e:
            errors.append(str(e))
    good = torch.empty(20, 40)
    return errors, _rel(ag(a, b, out=good), a.double() @ b.double()), ag(a, b, out=good).data_ptr() == good.data_ptr()


def test_ag_out_must_be_a_tensor_the_kernel_can_store_whole_tiles_into():
    errors, err, same = launch(_bad_out, 1, backend="sim", heap_bytes=4 << 20, timeout_s=300)[0]
    assert "out must be a [20, 40] torch.float32" in errors[0] and "got [20, 41]" in errors[0], errors
    assert "torch.float64" in errors[1], errors
    assert "rows must be contiguous" in errors[2], errors
    assert err < TOL[torch.float32] and same


def test_a_and_b_of_one_shape_get_descriptors_of_their_own():
    # GEMM+RS with B = weight.t() of a square weight and BM == BN: A [M, K] and B's storage [N, K] have one
    # shape, strides and block. One descriptor rebased for both made the kernel read A twice (2xH200,
    # 8192x8192x8192 with 128x128 tiles: relative error 90).
    from types import SimpleNamespace

    from bspfuse.kernels.gemm import _Fused
    from bspfuse.lowering import TARGETS

    op = _Fused.__new__(_Fused)
    op.heap, op._descs, op._last_b = SimpleNamespace(device=torch.device("cuda")), {}, (None, None)
    op.target = TARGETS["H100"]  # what the constructor derives from the heap's device (lowering.target_of)
    op.config = TileConfig(BM=128, BN=128, BK=64)
    a, w = torch.randn(256, 128), torch.randn(256, 128)
    _, layout, storage, b_desc = op._operands(a, w.t())
    a_desc = op._desc("a", a, [op.config.BM, op.config.BK])
    assert layout == "nk" and storage.data_ptr() == w.data_ptr() and storage.shape == a.shape
    assert a_desc is not b_desc and a_desc.base is a and b_desc.base is storage
    a2 = torch.randn(256, 128)
    assert op._desc("a", a2, [128, 64]) is a_desc and a_desc.base is a2  # rebased, not rebuilt
    assert b_desc.base is storage
