"""The GEMM core of the fused kernels against cuBLAS on one GPU (no communication).

    python3 benchmarks/core_bench.py --json benchmarks/results/core_h100.json

Every fused kernel spends most of its time in the same tile loop; when that loop is slower than cuBLAS no
amount of overlap wins it back (BENCHMARKS.md, issue 4). This runs the GEMM+RS kernel as a world of one
(`local_matmul`: all tiles own, no flags) for the layer's shapes, with variants of the generated source
that change only how the loop is scheduled and how a tile is stored, next to cuBLAS and a plain persistent
TMA kernel written by hand (the form that ran at 0.91-1.02x cuBLAS's speed on an H200, 2026-11-22, at
1024, 4096 and 16384 x 8192 x 8192 and 8192 x 14336 x 8192). Every variant's output is
checked against cuBLAS on random inputs in the same run. --layer instead times the layer's GEMMs one after
another, sustained, with the SM clock they ran at (the steady state of a model's forward).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results_file  # noqa: E402  (benchmarks/, the script's own folder)
from gpu_timing import ClockSampler, energy_per_call, ms_per_call  # noqa: E402

from bspfuse.runtime.tiles import swizzle  # noqa: E402

# (M, N, K, B layout): GEMMs of benchmarks/block_bench.py's layer at seq 8192 on 2 ranks, and two AG+GEMM shapes
# of gemm_bench.py (BENCHMARKS.md, "Fused GEMM + collective").
SHAPES = [(4096, 8192, 8192, "kn"), (16384, 8192, 8192, "kn"), (8192, 5120, 8192, "nk"), (8192, 8192, 4096, "nk"),
          (8192, 14336, 8192, "nk"), (8192, 8192, 14336, "nk")]


@triton.jit
def hand_written(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, B_NK: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = swizzle(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if B_NK:
                b = b_desc.load([pid_n * BN, k * BK]).T
            else:
                b = b_desc.load([k * BK, pid_n * BN])
            acc = tl.dot(a_desc.load([pid_m * BM, k * BK]), b, acc)
        c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


LOOP = "for t in range(pid - COMM, n_tiles, NUM_PROGRAMS - COMM):"
TMA_STORE = "own_desc.store([c * BM, pid_n * BN], acc.to(tl.bfloat16))"
POINTER_STORE = "tl.store(out_ptr + tile_off, acc.to(tl.bfloat16), mask=mask)"


def patched(source: str, flatten: bool, tma_store: bool) -> str:
    """The generated GEMM+RS source (own tiles stored through a TMA descriptor) with the tile loop flattened
    into the K loop (one software pipeline across tiles) and/or own tiles stored with pointer stores, as
    before the TMA store was generated."""
    for needed in (LOOP, TMA_STORE):
        assert needed in source, f"generated source changed: {needed!r} not found"
    if flatten:
        source = source.replace(LOOP, LOOP.replace("range(", "tl.range(").replace("):", ", flatten=True):"))
    if not tma_store:
        source = source.replace(TMA_STORE, POINTER_STORE)
    return source


AG_SHAPES = [(8192, 14336, 8192, "nk"), (8192, 4096, 8192, "nk"), (4096, 8192, 8192, "kn"), (16384, 8192, 8192, "kn")]
AG_STORE = "c_desc.store([src, c * BM, pid_n * BN], acc.to(tl.bfloat16).reshape(1, BM, BN))"
AG_C_DESC = ("c_desc = tl.make_tensor_descriptor(c_ptr, shape=[WORLD, M_LOCAL, N], strides=[M_LOCAL * stride_cm, "
             "stride_cm, 1], block_shape=[1, BM, BN])")
AG_A_DESC = ("a_tile_desc = tl.make_tensor_descriptor(a_base, shape=[M_LOCAL, K], strides=[a_stride, 1], "
             "block_shape=[BM, BK])")


def patched_ag(source: str, store: str, hoist_a: bool) -> str:
    """The AG+GEMM kernel (a world of one: every tile reads local rows) with C stored through the 3-D
    descriptor it has ("tma3d"), a 2-D one over all rows (valid when M_LOCAL is a multiple of BM: "tma2d"),
    or pointer stores ("pointer"); hoist_a makes A's descriptor once per program instead of once per tile
    (right only in a world of one, where every tile reads this rank's A)."""
    for needed in (AG_STORE, AG_C_DESC, AG_A_DESC):
        assert needed in source, f"generated source changed: {needed!r} not found"
    indent = source[:source.index(AG_STORE)].rsplit("\n", 1)[1]
    if store == "pointer":
        source = source.replace(AG_STORE, "out_rows = (src * M_LOCAL + rm).to(tl.int64)\n" + indent +
                                "tl.store(c_ptr + out_rows[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16), "
                                "mask=(rm < M_LOCAL)[:, None] & (rn < N)[None, :])")
    elif store == "tma2d":
        source = source.replace(AG_C_DESC, "c_desc = tl.make_tensor_descriptor(c_ptr, shape=[WORLD * M_LOCAL, N], "
                                "strides=[stride_cm, 1], block_shape=[BM, BN])")
        source = source.replace(AG_STORE, "c_desc.store([src * M_LOCAL + c * BM, pid_n * BN], acc.to(tl.bfloat16))")
    if hoist_a:
        source = source.replace(AG_A_DESC, "a_tile_desc = a_once")
        source = source.replace("        for tile_id in range(", "        a_once = tl.make_tensor_descriptor(a_ptr, "
                                "shape=[M_LOCAL, K], strides=[stride_am, 1], block_shape=[BM, BK])\n"
                                "        for tile_id in range(", 1)
    return source


def problem(ctx, time_it, prefix: str, M: int, N: int, K: int, layout: str):
    """(name, A, B, cuBLAS's A @ B, flops) of one shape, cuBLAS timed: B row-major or an nn.Linear weight's
    transpose."""
    bf = dict(device=ctx.device, dtype=torch.bfloat16)
    shape = f"{prefix}{M}x{N}x{K}" + (" B=w.t()" if layout == "nk" else "")
    torch.manual_seed(0)
    a = torch.randn(M, K, **bf)
    b = torch.randn(K, N, **bf) / 64 if layout == "kn" else (torch.randn(N, K, **bf) / 64).t()
    ref = a @ b
    flops = 2 * M * N * K
    time_it(shape, "cublas", lambda: a @ b, ref, flops)
    return shape, a, b, ref, flops


def run_ag(ctx, args, time_it):
    from bspfuse.codegen.load import load_kernel
    from bspfuse.kernels.gemm import FusedAllGatherMatmul
    from bspfuse.tile import TileConfig

    for M, N, K, layout in AG_SHAPES:
        shape, a, b, ref, flops = problem(ctx, time_it, "AG ", M, N, K, layout)
        op = FusedAllGatherMatmul(ctx.heap, M, N, K, torch.bfloat16, mode="push", b_layout=layout,
                                  config=TileConfig(128, 256, 64, 8, 8, 3, 0))
        generated = op.kernel_source
        for store in ("tma3d", "tma2d", "pointer"):
            for hoist_a in (False, True):
                op.kernel = load_kernel(dataclasses.replace(generated,
                                                            source=patched_ag(generated.source, store, hoist_a)))
                op._launchers.clear()
                time_it(shape, f"ours {store}" + (" a-once" if hoist_a else ""), lambda: op(a, b), ref, flops)
        for buf in op.buffers():
            ctx.heap.free(buf)


def run_swiglu(ctx, args, time_it):
    """The MLP's gate and up projections at the layer's per-rank shape: cuBLAS's two matmuls and the pointwise
    silu(gate) * up, our kernel with both weights joined (then the same pointwise), and our swiglu epilogue
    (one product stored) at several tiles, all as a world of one (copy_engine mode: no comm programs)."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul
    from bspfuse.tile import TileConfig

    M, N, K = 8192, 14336, 8192
    bf = dict(device=ctx.device, dtype=torch.bfloat16)
    torch.manual_seed(0)
    a = torch.randn(M, K, **bf)
    w_gate, w_up = (torch.randn(N, K, **bf) / 64 for _ in range(2))
    bs = [w_gate.t(), w_up.t()]
    ref = torch.nn.functional.silu(a @ bs[0]) * (a @ bs[1])
    flops, shape = 4 * M * N * K, f"swiglu {M}x{N}x{K} x2 B=w.t()"
    time_it(shape, "cublas x2 + pointwise", lambda: torch.nn.functional.silu(a @ bs[0]) * (a @ bs[1]), ref, flops)
    joined = FusedAllGatherMatmul(ctx.heap, M, (N, N), K, torch.bfloat16, mode="copy_engine", b_layout="nk",
                                  config=TileConfig(128, 256, 64, 8, 8, 3, 0))

    def two_then_pointwise():
        g, u = joined(a, bs)
        return torch.nn.functional.silu(g) * u
    time_it(shape, "ours 2 weights + pointwise", two_then_pointwise, ref, flops)
    for BM, BN, BK, warps, stages in args.swiglu_tiles:
        op = FusedAllGatherMatmul(ctx.heap, M, (N, N), K, torch.bfloat16, mode="copy_engine", b_layout="nk",
                                  epilogue=("swiglu",), config=TileConfig(BM, BN, BK, 8, warps, stages, 0))
        time_it(shape, f"ours swiglu {BM}x{BN}x{BK}w{warps}s{stages}", lambda: op(a, bs)[0], ref, flops)
        for buf in op.buffers():
            ctx.heap.free(buf)


LAYER_DIMS = (8192, 8192, 4096, 512, 14336)  # tokens, hidden, q and kv widths per rank, ffn per rank


def run_layer(ctx, args):
    """The GEMMs of one rank of the Llama layer at 8192 tokens on 2 ranks (block_bench.py), one after another
    as in the layer (wq+wk+wv, wo, w1+w3, w2), repeated back to back for --layer-iters layers: the GPU runs
    at its power limit there, so what counts is the time a GEMM takes while its neighbours heat the chip,
    not alone. cuBLAS (separate matmuls, as Inductor runs them) against our kernels as a world of one
    (AG+GEMM copy_engine with 3 and with 2 weights + swiglu, GEMM+RS direct's local_matmul) at each
    --layer-tiles config; each GEMM is also timed alone (back to back, same count). Mean SM clock per block."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulReduceScatter
    from bspfuse.tile import TileConfig, gated_config

    M, H, NQ, NKV, F = LAYER_DIMS
    bf = dict(device=ctx.device, dtype=torch.bfloat16)
    torch.manual_seed(0)
    x, attn, act = torch.randn(M, H, **bf), torch.randn(M, NQ, **bf), torch.randn(M, F, **bf)
    wq, wk, wv = (torch.randn(n, H, **bf) / 64 for n in (NQ, NKV, NKV))
    wo, w2 = torch.randn(H, NQ, **bf) / 64, torch.randn(H, F, **bf) / 64
    w1, w3 = (torch.randn(F, H, **bf) / 64 for _ in range(2))
    silu = torch.nn.functional.silu
    cublas = {"wq+wk+wv": lambda: torch.cat([x @ wq.t(), x @ wk.t(), x @ wv.t()], 1),
              "wo": lambda: attn @ wo.t(), "w1+w3 swiglu": lambda: silu(x @ w1.t()) * (x @ w3.t()),
              "w2": lambda: act @ w2.t()}
    refs = {name: fn() for name, fn in cublas.items()}
    timed_cublas = {"wq+wk+wv": lambda: (x @ wq.t(), x @ wk.t(), x @ wv.t()), "wo": cublas["wo"],
                    "w1+w3 swiglu": lambda: (x @ w1.t(), x @ w3.t()), "w2": cublas["w2"]}  # no cat, no pointwise
    rows = []

    def measure(variant, steps, check):
        errs = {name: ((check(name, fn()).float() - refs[name].float()).norm() / refs[name].float().norm()).item()
                for name, fn in steps.items()}
        for _ in range(3):
            for fn in steps.values():
                fn()
        torch.cuda.synchronize()
        n = args.layer_iters
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(len(steps) + 1)] for _ in range(n)]
        with ClockSampler() as clock:
            for it in range(n):
                for j, fn in enumerate(steps.values()):
                    events[it][j].record()
                    fn()
                events[it][-1].record()
            torch.cuda.synchronize()
        per_step = {name: statistics.median(events[it][j].elapsed_time(events[it][j + 1]) for it in range(n))
                    for j, name in enumerate(steps)}
        layer = statistics.median(events[it][0].elapsed_time(events[it][-1]) for it in range(n))
        alone = {}
        for name, fn in steps.items():
            with ClockSampler() as alone_clock:
                ms = ms_per_call(fn, n)
            alone[name] = (ms, alone_clock.mean_mhz)
        energy = energy_per_call(lambda: [fn() for fn in steps.values()], seconds=1.0)
        row = dict(variant=variant, layer_ms=layer, clock_mhz=clock.mean_mhz, clock_low_mhz=clock.low_mhz,
                   energy=energy, in_layer_ms=per_step, alone_ms={k: v[0] for k, v in alone.items()},
                   alone_clock_mhz={k: v[1] for k, v in alone.items()}, rel_err=errs)
        rows.append(row)
        print(f"  {variant:34s} layer {layer:7.3f} ms at {clock.mean_mhz} MHz (low {clock.low_mhz}); in layer / alone: "
              + ", ".join(f"{k} {per_step[k]:.3f}/{alone[k][0]:.3f}" for k in steps)
              + "  err " + " ".join(f"{v:.1e}" for v in errs.values())
              + (f"; {energy['j_per_call']:.3f} J per layer at {energy['mean_w']:.0f} W" if energy else ""), flush=True)

    measure("cublas", timed_cublas, lambda name, _: cublas[name]())
    for BM, BN, BK, G, warps, stages in args.layer_tiles:
        cfg, ops = TileConfig(BM, BN, BK, G, warps, stages, 0), []
        try:
            ops.append(qkv := FusedAllGatherMatmul(ctx.heap, M, (NQ, NKV, NKV), H, mode="copy_engine", b_layout="nk",
                                                   config=cfg))
            ops.append(mlp := FusedAllGatherMatmul(ctx.heap, M, (F, F), H, mode="copy_engine", b_layout="nk",
                                                   epilogue=("swiglu",),
                                                   config=dataclasses.replace(gated_config(cfg), BM=min(BM, 128))))
            for K_local in (NQ, F):  # wo, w2: GEMM+RS direct, timed through its world-of-one local_matmul
                ops.append(FusedMatmulReduceScatter(ctx.heap, M, H, K_local, b_layout="nk", mode="direct", config=cfg))
            out_proj, down = ops[2:]
            steps = {"wq+wk+wv": lambda: qkv(x, [wq.t(), wk.t(), wv.t()]),
                     "wo": lambda: out_proj.local_matmul(attn, wo.t()),
                     "w1+w3 swiglu": lambda: mlp(x, [w1.t(), w3.t()])[0],
                     "w2": lambda: down.local_matmul(act, w2.t())}
            measure(f"ours {BM}x{BN}x{BK} g{G} w{warps} s{stages}", steps,
                    lambda name, out: torch.cat(out, 1) if isinstance(out, list) else out)
        except Exception as e:  # a config that does not fit must not hide the others
            print(f"  ours {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(variant=f"ours {cfg}", error=f"{type(e).__name__}: {str(e)[:300]}"))
        for op in ops:
            for buf in op.buffers():
                ctx.heap.free(buf)
    return rows


def run(ctx, args):
    from triton.testing import do_bench
    from triton.tools.tensor_descriptor import TensorDescriptor

    from bspfuse.codegen.load import load_kernel
    from bspfuse.kernels.gemm import FusedMatmulReduceScatter
    from bspfuse.tile import TileConfig

    bf = dict(device=ctx.device, dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, {sms} SMs",
          flush=True)
    rows = []

    def time_it(shape, variant, fn, ref, flops):
        try:
            out = fn()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
        except Exception as e:  # one variant failing to compile must not hide the others
            print(f"  {shape} {variant}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(shape=shape, variant=variant, ms=None, error=f"{type(e).__name__}: {str(e)[:300]}"))
            return
        rows.append(dict(shape=shape, variant=variant, ms=ms, rel_err=err, tflops=flops / ms / 1e9))
        print(f"  {shape} {variant:>28}: {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  err {err:.1e}", flush=True)

    if args.layer_tiles:
        return run_layer(ctx, args)
    if args.ag:
        run_ag(ctx, args, time_it)
        return rows
    if args.swiglu_tiles:
        run_swiglu(ctx, args, time_it)
        return rows
    for M, N, K, layout in SHAPES:
        shape, a, b, ref, flops = problem(ctx, time_it, "", M, N, K, layout)

        BM, BN, BK = 128, 256, 64
        c = torch.empty(M, N, **bf)
        a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
        b_store = b if layout == "kn" else b.t()
        b_desc = TensorDescriptor.from_tensor(b_store, [BK, BN] if layout == "kn" else [BN, BK])
        c_desc = TensorDescriptor.from_tensor(c, [BM, BN])

        def hand(stages):
            hand_written[(sms,)](a_desc, b_desc, c_desc, M, N, K, BM=BM, BN=BN, BK=BK, GROUP_M=8, NUM_SMS=sms,
                                 B_NK=layout == "nk", num_warps=8, num_stages=stages)
            return c
        time_it(shape, "hand-written flat+tma-store", lambda: hand(3), ref, flops)

        for stages in (3, 4):
            op = FusedMatmulReduceScatter(ctx.heap, M, N, K, torch.bfloat16, b_layout=layout, mode="direct",
                                          config=TileConfig(BM, BN, BK, 8, 8, stages, 0))
            generated = op.kernel_source
            for flatten, tma_store in ((False, False), (True, False), (False, True), (True, True)):
                if stages == 4 and tma_store:
                    continue  # 4 stages of 128x256x64 and a 64 KiB store buffer exceed shared memory
                op.kernel = load_kernel(dataclasses.replace(
                    generated, source=patched(generated.source, flatten, tma_store)))
                op._launchers.clear()
                name = "ours" + ("+flat" if flatten else "") + ("+tma-store" if tma_store else "") + f" s{stages}"
                time_it(shape, name, lambda: op.local_matmul(a, b), ref, flops)
            for buf in op.buffers():
                ctx.heap.free(buf)
    return rows


def summarize(rows) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ms = {(r["shape"], r["variant"]): r["ms"] for r in rows}
    lines = ["time over cuBLAS (lower is better)", "shape".ljust(24) + "".join(v[:14].rjust(16) for v in variants)]
    for s in shapes:
        base = ms.get((s, "cublas"))
        lines.append(s.ljust(24) + "".join(
            (f"{ms[(s, v)] / base:.3f}" if ms.get((s, v)) and base else "-").rjust(16) for v in variants))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/core_h100.json")
    p.add_argument("--rep", type=int, default=200, help="milliseconds do_bench times each variant")
    p.add_argument("--ag", action="store_true", help="the AG+GEMM kernel's store and A-descriptor variants instead")
    p.add_argument("--swiglu", default="", help="the SwiGLU epilogue against cuBLAS instead, at these tiles, e.g. "
                   "128x128x64w8s3,128x128x64w8s4")
    p.add_argument("--layer", default="", help="the layer's GEMMs in sequence, sustained, against cuBLAS instead, "
                   "at these tiles (BMxBNxBK g GROUP_M w warps s stages), e.g. 128x256x64g8w8s3,256x128x64g8w8s3")
    p.add_argument("--layer-iters", type=int, default=30)
    args = p.parse_args()
    args.layer_tiles = [tuple(map(int, re.fullmatch(r"(\d+)x(\d+)x(\d+)g(\d+)w(\d+)s(\d+)", t).groups()))
                        for t in args.layer.split(",") if t]
    args.swiglu_tiles = [tuple(map(int, re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", t).groups()))
                         for t in args.swiglu.split(",") if t]
    from bspfuse.runtime import launch
    t0 = time.time()
    heap_bytes = (6 << 30) if args.layer_tiles else (1 << 30)  # the layer's GEMM+RS objects hold 2 x M x N inboxes
    rows = launch(run, 1, backend="cuda", heap_bytes=heap_bytes, args=(args,), timeout_s=900)[0]
    results_file.save(args.json, rows, seconds=round(time.time() - t0, 1))
    if not args.layer_tiles:
        print(summarize(rows), flush=True)


if __name__ == "__main__":
    main()
