"""Fused GEMMs built for a bound on rows and called with fewer; 3-D activations gathered and scattered on dim 1.

A host object's M is a bound (a dynamic sequence length): one object, called with several row counts in a
row (not multiples of the tile or of 16), against the float64 reference, and a call past the bound is an
error naming it. Under sequence parallelism with batch > 1 the activation is [B, S, H] and the collective's
dim is the sequence: AG+GEMM's C is [B, W * S, N] (torch.cat of the ranks' shards on dim 1, times B) and
GEMM+RS's result is rank r's [B, S, N] of the sum, the kernels mapping rows themselves; S is never a multiple
of the tile's rows here, so tiles straddle segments. The torch ops take both (and `max_rows`) in the
simulator, their fake implementations give the shapes with symbolic sizes, and the new kernel forms compile
for sm_90 with TMA where a tile lies in one segment.
"""
import tempfile
import textwrap

import pytest
import torch

from bspfuse.runtime import launch
from bspfuse.tile import TileConfig

SMALL = TileConfig(BM=16, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=2, comm_programs=1)
BF16 = torch.bfloat16
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _inputs(seed, *shapes, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


# ------------------------------------------------------------------------------------------ a bound on rows


def _bounded(ctx):
    """One object per op, built for 40 rows a rank, called with 37, 16, 40 and 5 (the flags' layout and the
    heap slots are the bound's; a call's rows only say how many tiles it has)."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter

    r, W, K, N = ctx.rank, ctx.world_size, 24, 40
    errors, messages, launchers, empties = {}, {}, {}, {}
    for mode in ("push", "pull"):
        op = FusedAllGatherMatmul(ctx.heap, 40, N, K, BF16, mode=mode, config=SMALL, debug=True)
        for call, M in enumerate((37, 16, 40, 5)):
            shards = _inputs(10 * call, *[(M, K)] * W)
            (b,) = _inputs(10 * call + 1, (K, N))
            errors[f"ag {mode} M={M}"] = _rel(op(shards[r], b), torch.cat(shards).double() @ b.double())
            if mode == "push":
                errors[f"ag gathered M={M}"] = _rel(op.gathered(shards[r]), torch.cat(shards).double())
        launchers[f"ag {mode}"] = len(op._launchers)
        with pytest.raises(ValueError) as past:
            op(torch.zeros(41, K, dtype=BF16), b)
        messages[f"ag {mode}"] = str(past.value)
        empties[f"ag {mode}"] = tuple(op(torch.zeros(2, 0, K, dtype=BF16), b).shape)  # no rows: no launch
    for name, cls, mode in (("rs", FusedMatmulReduceScatter, "push"), ("rs", FusedMatmulReduceScatter, "direct"),
                            ("ar", FusedMatmulAllReduce, "push")):
        op = cls(ctx.heap, 40 * W, N, K, BF16, config=SMALL, debug=True, mode=mode)
        for call, M in enumerate((37 * W, 16 * W, 40 * W, 5 * W)):
            a_all = _inputs(10 * call + 2, *[(M, K)] * W)
            b_all = _inputs(10 * call + 3, *[(K, N)] * W)
            ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
            out = op(a_all[r], b_all[r])
            errors[f"{name} {mode} M={M}"] = _rel(out, ref.chunk(W)[r] if name == "rs" else ref)
        launchers[f"{name} {mode}"] = len(op._launchers)
        with pytest.raises(ValueError) as past:
            op(torch.zeros(41 * W, K, dtype=BF16), b_all[r])
        messages[f"{name} {mode}"] = str(past.value)
        empties[f"{name} {mode}"] = tuple(op(torch.zeros(0, K, dtype=BF16), b_all[r]).shape)
        shards = _inputs(99, *[(6 * W, K)] * W)  # a call after the empty one: the epochs still agree
        ref = sum(a.double() for a in shards) @ b_all[0].double()
        errors[f"{name} {mode} after no rows"] = _rel(op(shards[r], b_all[0]), ref.chunk(W)[r] if name == "rs" else ref)
    return errors, messages, launchers, empties


def test_one_object_serves_every_row_count_up_to_its_bound():
    for rank, (errors, messages, launchers, empties) in enumerate(
            launch(_bounded, 2, backend="sim", heap_bytes=16 << 20, timeout_s=600)):
        assert len(errors) == 4 * 6 + 3, errors
        assert empties == {"ag push": (2, 0, 40), "ag pull": (2, 0, 40), "rs push": (0, 40), "rs direct": (0, 40),
                           "ar push": (0, 40)}, empties
        for name, err in errors.items():
            assert err < TOL[BF16], f"rank {rank} {name}: relative error {err}"
        assert set(launchers.values()) == {1}, launchers  # one launch variant for every M
        for name, message in messages.items():
            rows = 41 if name.startswith("ag") else 82
            assert f"has {rows} rows, more than the bound of {40 if name.startswith('ag') else 80} rows" in message
            assert "max_tokens" in message, message


# ------------------------------------------------------------------------------------------ rows in segments


def _cat1(shards):
    return torch.cat(shards, dim=1).double()


def _segments(ctx):
    """3-D A, B = 2 or 3 batch rows of S = 20, 7 or 11 rows (16-row tiles straddle segments), against the
    references on dim 1; one object is called with 2-D, 3-D and 3-D of B = 1 in turn (the variant with the
    row mapping and the one without share its flags)."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter

    r, W, K = ctx.rank, ctx.world_size, 24
    errors = {}
    for mode in ("push", "pull", "copy_engine", "direct"):
        op = FusedAllGatherMatmul(ctx.heap, 48, 40, K, BF16, mode=mode, config=SMALL, debug=True)
        for call, shape in enumerate(((2, 20, K), (3, 7, K), (35, K), (1, 13, K))):
            shards = _inputs(20 * call, *[shape] * W)
            (b,) = _inputs(20 * call + 1, (K, 40))
            full = _cat1(shards) if len(shape) == 3 else torch.cat(shards).double()
            c = op(shards[r], b)
            assert c.shape == (*full.shape[:-1], 40), (mode, shape, c.shape)
            errors[f"ag {mode} {shape}"] = _rel(c, full @ b.double())
            if mode != "direct":
                gathered = op.gathered(shards[r])
                errors[f"ag {mode} gathered {shape}"] = (0.0 if gathered.shape == full.shape and torch.equal(
                    gathered.double(), full) else float("inf"))
    # three weights read as nn.Linear weights (the last one copied into their layout), bias+relu on the first
    op = FusedAllGatherMatmul(ctx.heap, 24, (40, 16, 24), K, BF16, mode="push", epilogue=("bias", "relu"),
                              config=SMALL, debug=True, b_layout="nk")
    for call, shape in enumerate(((3, 7, K), (2, 11, K))):
        shards = _inputs(30 + call, *[shape] * W)
        weights = _inputs(40 + call, (40, K), (16, K), (24, K))
        (bias,) = _inputs(50 + call, (40,))
        cs = op(shards[r], [weights[0].t(), weights[1].t(), weights[2].t().contiguous()], bias)
        refs = [_cat1(shards) @ w.double().t() for w in weights]
        refs[0] = (refs[0] + bias.double()).clamp_min(0)
        for j, (c, ref) in enumerate(zip(cs, refs)):
            errors[f"ag three weights {shape} C{j}"] = _rel(c, ref)
    op = FusedAllGatherMatmul(ctx.heap, 24, (40, 40), K, BF16, mode="pull", epilogue=("swiglu",), config=SMALL,
                              debug=True, b_layout="nk")
    shards = _inputs(60, *[(2, 11, K)] * W)
    w1, w3 = _inputs(61, (40, K), (40, K))
    ref = torch.nn.functional.silu(_cat1(shards) @ w1.double().t()) * (_cat1(shards) @ w3.double().t())
    errors["ag swiglu (2, 11)"] = _rel(op(shards[r], [w1.t(), w3.t()])[0], ref)
    # GEMM+RS: A [B, W * S, K] -> [B, S, N], rank r's rows b * W * S + r * S + j of the sum
    for mode in ("push", "pull", "direct"):
        op = FusedMatmulReduceScatter(ctx.heap, 36 * W, 40, K, BF16, config=SMALL, debug=True, mode=mode)
        for call, shape in enumerate(((2, 11 * W, K), (3, 7 * W, K), (26 * W, K), (2, 18 * W, K))):
            a_all = _inputs(70 + call, *[shape] * W)
            b_all = _inputs(80 + call, *[(K, 40)] * W)
            total = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
            ref = total.chunk(W, dim=1 if len(shape) == 3 else 0)[r]
            out = op(a_all[r], b_all[r])
            errors[f"rs {mode} {shape}"] = _rel(out, ref) if out.shape == ref.shape else float("inf")
    # GEMM+AR: order-free; a 3-D A keeps its leading shape
    op = FusedMatmulAllReduce(ctx.heap, 36 * W, 40, K, BF16, config=SMALL, debug=True, mode="push")
    for call, shape in enumerate(((2, 9 * W, K), (3, 5 * W, K))):
        a_all = _inputs(90 + call, *[shape] * W)
        b_all = _inputs(95 + call, *[(K, 40)] * W)
        ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
        out = op(a_all[r], b_all[r])
        errors[f"ar push {shape}"] = _rel(out, ref) if out.shape == ref.shape else float("inf")
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_rows_in_segments_are_gathered_and_scattered_on_dim_1(world):
    results = launch(_segments if world == 2 else _segments_world4, world, backend="sim", heap_bytes=16 << 20,
                     timeout_s=600)
    for rank, errors in enumerate(results):
        for name, err in errors.items():
            assert err < TOL[BF16], f"rank {rank} {name}: relative error {err}"


def _segments_world4(ctx):
    """At world 4 (four simulated ranks on two cores are slow): AG+GEMM push and GEMM+RS pull, one call each."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulReduceScatter

    r, W, K = ctx.rank, ctx.world_size, 16
    shards = _inputs(1, *[(2, 9, K)] * W)
    (b,) = _inputs(2, (K, 32))
    ag = FusedAllGatherMatmul(ctx.heap, 24, 32, K, BF16, mode="push", config=SMALL, debug=True)
    errors = {"ag push": _rel(ag(shards[r], b), _cat1(shards) @ b.double())}
    rs = FusedMatmulReduceScatter(ctx.heap, 24 * W, 32, K, BF16, config=SMALL, debug=True, mode="pull")
    a_all = _inputs(3, *[(2, 5 * W, K)] * W)
    b_all = _inputs(4, *[(K, 32)] * W)
    ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all)).chunk(W, dim=1)[r]
    errors["rs pull"] = _rel(rs(a_all[r], b_all[r]), ref)
    return errors


# ------------------------------------------------------------------------------------------ the torch ops


def test_host_object_key_is_the_bound_not_the_segment():
    from bspfuse.runtime.torch_ops import host_object_key

    def key(a_shape, max_rows=0):
        return host_object_key("matmul_reduce_scatter", "g", a_shape, [(64, 96)], BF16, "push", "", max_rows)

    assert key((2, 40, 64), 128) == key((3, 26, 64), 128) == key((128, 64)) == key((2, 64, 64))  # rows 128
    assert key((2, 40, 64)) == key((80, 64)) != key((3, 40, 64))  # static: the call's own rows
    assert key((2, 40, 64)) == host_object_key("matmul_reduce_scatter", "g", (80, 64), [(64, 96)], BF16, "push", "")


def _ops(ctx, init_file):
    """The ops with 3-D inputs and a bound, called directly and from a graph compiled with dynamic=True, for two
    sequence lengths: one host object per op serves both, and the graph compiles once."""
    import torch.distributed as dist

    from bspfuse.runtime import torch_ops

    ops = torch.ops.bspfuse
    r, W, K, N = ctx.rank, ctx.world_size, 32, 48
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=W)
    group = dist.group.WORLD.group_name
    errors, objects = {}, []
    w1, w3, w2 = _inputs(1, (N, K), (N, K), (K, N))  # nn.Linear-style [out, in] weights, w2 row-major [N, K]
    try:
        with torch_ops.use_heap(group, ctx.heap), torch.no_grad():
            for call, seq in enumerate((7, 12)):
                shards = _inputs(10 + call, *[(2, seq, K)] * W)
                full = _cat1(shards)
                c1, c3, gathered = ops.all_gather_matmul(shards[r], [w1.t(), w3.t()], None, group, "push", "", True,
                                                         2 * 16)
                errors[f"ag C0 S={seq}"] = _rel(c1, full @ w1.double().t())
                errors[f"ag C1 S={seq}"] = _rel(c3, full @ w3.double().t())
                errors[f"ag gathered S={seq}"] = _rel(gathered, full)
                a_all = _inputs(20 + call, *[(2, W * seq, N)] * W)
                total = sum(a.double() for a in a_all) @ w2.double().t()
                rs = ops.matmul_reduce_scatter(a_all[r], w2.t(), None, group, "pull", "", 2 * W * 16)
                errors[f"rs S={seq}"] = _rel(rs, total.chunk(W, dim=1)[r])
                ar = ops.matmul_all_reduce(a_all[r], w2.t(), None, group, "push", "", 2 * W * 16)
                errors[f"ar S={seq}"] = _rel(ar, total)
                objects.append(len(torch_ops._OPS))
            # a graph compiled with symbolic sizes: AG (swiglu) then RS, as a sequence-parallel MLP
            compiles = []

            def count(gm, example_inputs):
                compiles.append(gm)
                return gm.forward

            def mlp(x, w1, w3, w2):
                (h, _) = ops.all_gather_matmul(x, [w1.t(), w3.t()], None, group, "push", "swiglu", False, 2 * 16)
                return ops.matmul_reduce_scatter(h, w2.t(), None, group, "push", "", 2 * W * 16)

            compiled = torch.compile(mlp, backend=count, dynamic=True, fullgraph=True)
            for call, seq in enumerate((9, 14)):
                shards = _inputs(30 + call, *[(2, seq, K)] * W)
                full = _cat1(shards)
                h = torch.nn.functional.silu(full @ w1.double().t()) * (full @ w3.double().t())
                ref = (h.to(BF16).double() @ w2.double().t()) * W  # every rank's rows alike: the sum is W times
                errors[f"compiled S={seq}"] = _rel(compiled(shards[r], w1, w3, w2), ref.chunk(W, dim=1)[r])
            objects.append(len(torch_ops._OPS))
    finally:
        dist.destroy_process_group()
    return errors, objects, len(compiles)


def test_ops_take_3d_inputs_and_a_bound_in_the_simulator(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    for rank, (errors, objects, compiles) in enumerate(launch(_ops, 2, backend="sim", heap_bytes=16 << 20,
                                                              args=(init_file,), timeout_s=600)):
        assert objects == [3, 3, 5], objects  # one object per op (and per epilogue) for every length
        assert compiles == 1, compiles  # dynamic=True: the second length reuses the graph
        for name, err in errors.items():
            assert err < TOL[BF16], f"rank {rank} {name}: relative error {err}"


@pytest.fixture
def fake_group():
    """A `fake` default process group of 2 ranks (no communication): what the fake implementations ask for the
    world size."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group(backend="fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def test_fake_implementations_give_the_shapes_with_symbolic_sizes(fake_group):
    import bspfuse.runtime.torch_ops  # noqa: F401  (defines the ops)
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv, StatelessSymbolicContext,
                                                       statically_known_true)

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def symbolic(name, *shape):
        sizes = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(shape))
        return mode.from_tensor(torch.empty(*shape, dtype=BF16), source=ConstantSource(name), symbolic_context=sizes)

    def same(x, *want):
        return len(x.shape) == len(want) and all(statically_known_true(d == w) for d, w in zip(x.shape, want))

    ops, g = torch.ops.bspfuse, fake_group
    x, x2, w, w_up = symbolic("x", 3, 10, 32), symbolic("x2", 20, 32), symbolic("w", 48, 32), symbolic("w_up", 48, 32)
    B, S, K, N = x.shape[0], x.shape[1], x.shape[2], w.shape[0]
    with mode:
        c, c_up, gathered = ops.all_gather_matmul(x, [w.t(), w_up.t()], None, g, "push", "", True, 64)
        assert same(c, B, 2 * S, N) and same(c_up, B, 2 * S, w_up.shape[0]) and same(gathered, B, 2 * S, K)
        h, none = ops.all_gather_matmul(x, [w.t(), w_up.t()], None, g, "pull", "swiglu", False)
        assert same(h, B, 2 * S, N) and none.numel() == 0
        (c2, _) = ops.all_gather_matmul(x2, [w.t()], None, g, "push", "", False, 64)
        assert same(c2, 2 * x2.shape[0], N)
        out = w.shape[1]  # w [N, K'] read as B [N, K']: [B, 2S, N] -> [B, S, K']
        assert same(ops.matmul_reduce_scatter(c, w, None, g, "push", "", 256), B, S, out)
        assert same(ops.matmul_reduce_scatter(c2, w, None, g, "direct", ""), x2.shape[0], out)
        assert same(ops.matmul_all_reduce(c, w, None, g, "push", "", 256), B, 2 * S, out)
        assert same(ops.matmul_all_reduce(x2, w.t(), None, g, "push", ""), x2.shape[0], N)


# ------------------------------------------------------------------------------------------ sm_90


COMPILE = textwrap.dedent('''
    import json, re
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from bspfuse.codegen.load import load_kernel
    from bspfuse.codegen.triton import generate
    from bspfuse.tile import (STAGING, choose_config, gated_config, lower_allgather_matmul,
                              lower_matmul_reduce_scatter)

    SM90 = GPUTarget("cuda", 90, 32)

    def compile_one(tp, segmented):
        ks = generate(tp, tma=True)
        fn = load_kernel(ks)
        cfg = tp.config
        values = dict(WORLD=2, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, COMM=cfg.comm_programs,
                      LAG=124, NUM_PROGRAMS=132, CHUNK_K=128, MAX_SPINS=0, TARGET="cuda", VEC=16, FLAG_BLOCKS=8,
                      SEGMENTED=segmented)
        b_block = [cfg.BK, cfg.BN] if tp.b_layout == "kn" else [cfg.BN, cfg.BK]
        a_block = [1, cfg.BM, cfg.BK] if segmented else [cfg.BM, cfg.BK]  # the host's A descriptor (RS)
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in ks.constexprs:
                sig[name] = "constexpr"
            elif name in ("a_desc", "b_desc"):
                sig[name] = f"tensordesc<bf16[{', '.join(map(str, a_block if name == 'a_desc' else b_block))}]>"
            elif name in ("flag_ptr", "err_ptr", "heap_bases", "ticket_ptr"):
                sig[name] = "*i32" if name == "flag_ptr" else "*i64"
            else:
                sig[name] = "*bf16" if name.endswith("_ptr") else "i32"
            # as Triton's launcher marks multiples of 16; never M_LOCAL or SEG (do_not_specialize)
            if name.endswith("_ptr") or name in ("heap_bases", "M_BOUND", "N", "K") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = {k: v for k, v in values.items() if k in ks.constexprs}
        k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=SM90,
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ops = re.findall(r"\\b(wgmma\\.mma_async|cp\\.async\\.bulk\\.tensor\\.\\dd\\.\\w+|st\\.global|cp\\.async\\.cg)",
                         k.asm["ptx"])
        backend = make_backend(SM90)
        rows = {name: {native_specialize_impl(backend, m, False, not p.do_not_specialize, True) for m in (1, 16, 17)}
                for name, p in zip(fn.arg_names, fn.params) if name in ("M_LOCAL", "SEG")}
        return {"kind": tp.kind, "segmented": segmented, "ops": sorted(set(ops)),
                "specializations": {name: len(s) for name, s in rows.items()}}

    shape = dict(M=4096, N=8192, K=4096, world_size=2)
    rs, ag = choose_config("matmul_rs", **shape), choose_config("ag_matmul", **shape)
    kernels = [lower_matmul_reduce_scatter("rs", "bf16", (), rs, "nk"),
               STAGING["pull"](lower_matmul_reduce_scatter("rs_pull", "bf16", (), rs, "nk")),
               STAGING["push"](lower_allgather_matmul("ag", "bf16", ("bias",), ag, "nk")),
               STAGING["push"](lower_allgather_matmul("ag3", "bf16", (), ag, "nk", weights=3)),
               STAGING["copy_engine"](lower_allgather_matmul("swiglu", "bf16", ("swiglu",), gated_config(ag), "nk",
                                                             weights=2))]
    print(json.dumps([compile_one(tp, segmented) for segmented in (False, True) for tp in kernels]))
''')


def test_row_mapping_kernels_compile_for_sm90_with_tma_and_one_specialization_for_every_m(run_script):
    kernels = run_script(COMPILE)
    assert len(kernels) == 10
    for k in kernels:
        assert "wgmma.mma_async" in k["ops"], k
        assert k["specializations"] == {"M_LOCAL": 1, "SEG": 1}, k  # M = 1, 16, 17: one compiled kernel
        if k["kind"] == "matmul_rs" and k["segmented"]:
            # A as [B * WORLD, S, K]: a tile inside one segment is one 3-D TMA box; one that straddles two
            # loads its rows through pointers (cp.async)
            assert "cp.async.bulk.tensor.3d.shared" in k["ops"] and "cp.async.cg" in k["ops"], k
        elif k["kind"] == "matmul_rs":
            assert "cp.async.bulk.tensor.3d.shared" not in k["ops"] and "cp.async.cg" not in k["ops"], k
        if k["kind"] == "ag_matmul":
            # C's tiles through 3-D TMA stores, as [WORLD, M_LOCAL, N] or [B * WORLD, S, N]; a straddling tile
            # with masked pointer stores (the swiglu kernel, copy_engine, has no other ordinary store)
            assert "cp.async.bulk.tensor.3d.global" in k["ops"], k  # global <- shared: a store
            if k["segmented"]:
                assert "st.global" in k["ops"], k
