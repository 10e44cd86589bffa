"""Fused GEMM + collective kernels against the baselines, side by side in one process group.

    python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/gemm_bench.py --json benchmarks/results/gemm_h200x2.json

For every shape: NCCL+cuBLAS (bulk-synchronous), the same under a CUDA graph, PyTorch's symm_mem fused op
(where one exists), the collective alone, the matmul alone, the overlap bound max(matmul, collective), and
ours (AG: push / pull; RS and AR: push / pull / direct; auto as the cost model picks). Shapes marked
"B=w.t()" pass B as the transpose of an nn.Linear weight, which every variant reads without a copy. Every
variant's output is checked against the unfused reference on fresh random inputs in the same run. Both
ranks time at once; the reported time is the slower rank's median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results_file  # noqa: E402  (benchmarks/, the script's own folder)
from gpu_timing import ms_per_call  # noqa: E402

# (M, N, K, B's layout): "kn" B is row-major [K, N]; "nk" B is weight.t() of an nn.Linear weight [N, K], which
# every variant takes as it is (cuBLAS and ours without a copy).
AG_SHAPES = [(1024, 8192, 8192, "kn"), (4096, 8192, 8192, "kn"), (8192, 14336, 8192, "kn"), (16384, 8192, 8192, "kn"),
             (4096, 8192, 8192, "nk")]
RS_SHAPES = [(1024, 8192, 8192, "kn"), (4096, 8192, 8192, "kn"), (16384, 8192, 8192, "kn"), (8192, 8192, 28672, "kn"),
             (8192, 8192, 28672, "nk")]
AR_SHAPES = [(128, 8192, 8192, "kn"), (1024, 8192, 8192, "kn"), (4096, 8192, 8192, "kn"), (1024, 8192, 8192, "nk")]


def bench(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench_back_to_back(fn, calls=20, warmup=3, warmup_s=0.0):
    """Device time per call when calls follow each other with the host running ahead (as in a model's
    forward, where the GPU is busy with the previous op while the host launches): one barrier, then
    `calls` calls between two events, the slower rank reported. `bench` times one call after a barrier,
    host launch included. warmup_s > 0: first that many seconds of calls (the same count on every rank),
    so the GPU is timed at the clock its power limit allows under sustained load, not the higher one it
    boosts to after idling (on an H200 the difference reached 10% in the Llama layer)."""
    for _ in range(warmup):
        fn()
    if warmup_s > 0:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        for _ in range(calls_in(warmup_s, time.perf_counter() - t0)):
            fn()
    else:  # after a warm-up the calls keep the ranks in step; a barrier here would let the GPU idle
        dist.barrier()
        torch.cuda.synchronize()
    t = torch.tensor([ms_per_call(fn, calls)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def calls_in(seconds: float, per_call_s: float) -> int:
    """How many calls take `seconds`, the same on every rank (the largest rank's count): fused calls are
    collective, and a rank that made one call more than its peer would wait for it forever."""
    n = torch.tensor([int(seconds / max(per_call_s, 1e-6)) + 1], device="cuda")
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def host_ms(fn, calls=10):
    """Median host time of one call with an idle GPU: the launch overhead a short kernel cannot hide."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def profile_host(fn, what, show, calls=50):
    """Where the host time of one call goes (cProfile, GPU idle between calls), printed where `show`."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    if show:
        print(f"host profile of {what}, {calls} calls:", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def profile_cold(fn, what, show, calls=10):
    """Device time of the kernels of one call after a barrier (the profiler's view), printed where `show`:
    with `bench`'s figure for the same call it splits a single call's time into kernels and what precedes
    them (host launch, the peer's skew)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            dist.barrier()
            torch.cuda.synchronize()
            fn()
            torch.cuda.synchronize()
    if show:
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        print(f"kernels of one call after a barrier, {what} ({calls} calls):", flush=True)
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[:4]:
            print(f"    {e.device_time_total / calls:9.1f} us per call  {e.count // calls} launches  {e.key[:70]}",
                  flush=True)


def graphed(fn):
    """fn captured in a CUDA graph (NCCL collectives included); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def tile_config(variant, kind, M, N, K, world, comm=None):
    """The config a variant names ("push 64x128x64w4s4": BM x BN x BK, warps, stages), None for the default,
    or the default with `comm` communication programs."""
    import dataclasses
    import re

    from bspfuse.tile import choose_config
    m = re.search(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", variant)
    if not m and not comm:
        return None
    cfg = choose_config(kind, M, N, K, world, comm_programs=comm)
    if m:
        BM, BN, BK, warps, stages = map(int, m.groups())
        cfg = dataclasses.replace(cfg, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    return cfg


def weight(K, N, layout, **kw):
    """B[K, N] scaled to keep bf16 sums small: row-major, or the transpose of a row-major [N, K] weight."""
    return torch.randn(K, N, **kw) / 64 if layout == "kn" else (torch.randn(N, K, **kw) / 64).t()


def shape_name(M, N, K, layout):
    return f"{M}x{N}x{K}" + (" B=w.t()" if layout == "nk" else "")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run(ctx, args):
    import torch.distributed._symmetric_memory  # noqa: F401  registers torch.ops.symm_mem
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter
    from bspfuse.passes.fuse_gemm import choose_mode

    heap, rank, W = ctx.heap, ctx.rank, ctx.world_size
    group = dist.group.WORLD.group_name
    bf = dict(device=ctx.device, dtype=torch.bfloat16)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, world {W}")
    rows = []

    def record(op, shape, variant, t, err=None, **extra):
        """t: ms, or (ms, ms back to back) from `timed`."""
        if isinstance(t, tuple):
            t, extra["ms_b2b"] = t
        rows.append(dict(op=op, shape=shape, variant=variant, ms=t, rel_err=err, **extra))
        say(f"  {op} {shape} {variant:>18}: {t:8.3f} ms" + (f"  err {err:.1e}" if err is not None else "") +
            "".join(f"  {k}={v}" for k, v in extra.items()))

    def timed(fn):
        """(one call after a barrier, back to back) in ms: the first is the figure the targets are read in."""
        return bench(fn), round(bench_back_to_back(fn), 4)

    def bound(*parts):
        """The overlap bound, max(matmul alone, collective alone), in both timings."""
        return tuple(max(p[i] for p in parts) for i in range(2))

    def attempt(op, shape, variant, f, **extra):
        try:
            f()
        except Exception as e:
            say(f"  {op} {shape} {variant}: FAILED {type(e).__name__}: {str(e)[:400]}")
            if args.verbose:
                say(traceback.format_exc())
            rows.append(dict(op=op, shape=shape, variant=variant, ms=None, error=f"{type(e).__name__}: {str(e)[:400]}"))

    if "ag" in args.ops:
        for M, N, K, layout in args.shapes.get("ag", AG_SHAPES):
            if args.max_m and M > args.max_m:
                continue
            shape = shape_name(M, N, K, layout)
            Ml = M // W
            torch.manual_seed(1000 + rank)
            a = torch.randn(Ml, K, **bf)
            torch.manual_seed(7)
            b = weight(K, N, layout, **bf)
            full = torch.empty(M, K, **bf)

            def base():
                dist.all_gather_into_tensor(full, a)
                return full @ b

            ref = base()
            t_base = timed(base)
            record("ag_gemm", shape, "nccl+cublas", t_base, 0.0)
            if args.profile_cold:
                profile_cold(base, f"ag_gemm {shape} nccl+cublas", show=rank == 0)
            attempt("ag_gemm", shape, "nccl+cublas graph", lambda: record("ag_gemm", shape, "nccl+cublas graph",
                                                                           timed(graphed(base))))
            t_coll = timed(lambda: dist.all_gather_into_tensor(full, a))
            t_mm = timed(lambda: full @ b)
            record("ag_gemm", shape, "collective alone", t_coll)
            record("ag_gemm", shape, "matmul alone", t_mm)
            record("ag_gemm", shape, "overlap bound", bound(t_mm, t_coll))

            def torch_fused():
                f = lambda: torch.ops.symm_mem.fused_all_gather_matmul(a, [b], 0, group, return_A=False)[1][0]
                record("ag_gemm", shape, "torch symm_mem", timed(f), rel_err(f(), ref))
            attempt("ag_gemm", shape, "torch symm_mem", torch_fused)
            auto = choose_mode("ag_matmul", M, N, K, W)
            if auto.mode == "off":  # the cost model keeps the BSP program: that is what auto runs
                record("ag_gemm", shape, "ours auto", t_base, 0.0, choice="off (fallback: NCCL+cuBLAS)",
                       reason=auto.reason)
            variants = ([("push", None), ("pull", None), ("copy_engine", None)] + [(f"push comm={c}", c) for c in args.comm] +
                        [(f"push {t}", None) for t in args.tiles])
            for variant, comm in variants:
                def ours(variant=variant, comm=comm):
                    mode = variant.split()[0]
                    cfg = tile_config(variant, "ag_matmul", M, N, K, W, comm)
                    op = FusedAllGatherMatmul(heap, Ml, N, K, torch.bfloat16, mode=mode, config=cfg, debug=args.debug)
                    out = op(a, b)
                    err = rel_err(out, ref)
                    t = timed(lambda: op(a, b))
                    record("ag_gemm", shape, f"ours {variant}", t, err, comm_programs=op.config.comm_programs,
                           tile=str(op.config))
                    if variant == auto.mode:
                        record("ag_gemm", shape, "ours auto", t, err, choice=auto.mode, reason=auto.reason)
                        if args.profile_cold:
                            profile_cold(lambda: op(a, b), f"ag_gemm {shape} {variant}", show=rank == 0)
                    for buf in op.buffers():
                        heap.free(buf)
                attempt("ag_gemm", shape, f"ours {variant}", ours)
            del a, b, full, ref

    for kind, shapes in (("rs", args.shapes.get("rs", RS_SHAPES)), ("ar", args.shapes.get("ar", AR_SHAPES))):
        if kind not in args.ops:
            continue
        for M, N, K, layout in shapes:
            if args.max_m and M > args.max_m:
                continue
            shape = shape_name(M, N, K, layout)
            Kl = K // W
            torch.manual_seed(2000 + rank)
            a = torch.randn(M, Kl, **bf)
            b = weight(Kl, N, layout, **bf)
            name = "gemm_rs" if kind == "rs" else "gemm_ar"
            out = torch.empty(M // W, N, **bf)

            if kind == "rs":
                def base():
                    dist.reduce_scatter_tensor(out, a @ b)
                    return out
            else:
                def base():
                    c = a @ b
                    dist.all_reduce(c)
                    return c
            ref = base().clone()
            t_base = timed(base)
            record(name, shape, "nccl+cublas", t_base, 0.0)
            if args.profile_cold:
                profile_cold(base, f"{name} {shape} nccl+cublas", show=rank == 0)
            attempt(name, shape, "nccl+cublas graph", lambda: record(name, shape, "nccl+cublas graph",
                                                                      timed(graphed(base))))
            part = a @ b
            t_mm = timed(lambda: a @ b)
            if kind == "rs":
                t_coll = timed(lambda: dist.reduce_scatter_tensor(out, part))
            else:
                t_coll = timed(lambda: dist.all_reduce(part))
            record(name, shape, "collective alone", t_coll)
            record(name, shape, "matmul alone", t_mm)
            record(name, shape, "overlap bound", bound(t_mm, t_coll))
            if kind == "rs":
                def torch_fused():
                    f = lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, group)
                    record(name, shape, "torch symm_mem", timed(f), rel_err(f(), ref))
                attempt(name, shape, "torch symm_mem", torch_fused)

            kind_name = "matmul_rs" if kind == "rs" else "matmul_ar"
            auto = choose_mode(kind_name, M, N, K, W)
            if auto.mode == "off":  # the cost model keeps the BSP program: that is what auto runs
                record(name, shape, "ours auto", t_base, 0.0, choice="off (fallback: NCCL+cuBLAS)", reason=auto.reason)
            for variant in ["push", "pull", "direct"] + [f"{m} {t}" for t in args.tiles for m in ("direct", "push")]:
                def ours(variant=variant):
                    mode = variant.split()[0]
                    cls = FusedMatmulReduceScatter if kind == "rs" else FusedMatmulAllReduce
                    op = cls(heap, M, N, Kl, torch.bfloat16, mode=mode, debug=args.debug,
                             config=tile_config(variant, kind_name, M, N, Kl, W))
                    res = op(a, b)
                    err = rel_err(res, ref)
                    t = timed(lambda: op(a, b))
                    record(name, shape, f"ours {variant}", t, err, tile=str(op.config),
                           host_ms=round(host_ms(lambda: op(a, b)), 3))
                    if variant == auto.mode:
                        record(name, shape, "ours auto", t, err, choice=auto.mode, reason=auto.reason)
                    if args.profile_host and variant == "direct":  # every rank calls: the kernels wait on each other
                        profile_host(lambda: op(a, b), f"{name} {shape} direct", show=rank == 0)
                    if args.profile_cold and variant == auto.mode:
                        profile_cold(lambda: op(a, b), f"{name} {shape} {variant}", show=rank == 0)
                    if mode == "direct":  # our GEMM with no communication: the bound our kernels can reach
                        alone = "ours gemm alone" + variant[len("direct"):]
                        record(name, shape, alone, timed(lambda: op.local_matmul(a, b)),
                               rel_err(op.local_matmul(a, b), a @ b))
                    dist.barrier()  # a peer may still read this rank's buffers (pull) until it is done
                    for buf in op.buffers():
                        heap.free(buf)
                attempt(name, shape, f"ours {variant}", ours)
            del a, b, out, part, ref
    return rows


TIMINGS = {"ms": "one call after a barrier", "ms_b2b": "back to back"}


def summarize(rows, key="ms"):
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["shape"]), {})[r["variant"]] = r
    # alone: our GEMM without communication (RS/AR), the bound our fused kernels can reach
    columns = ["nccl+cublas", "nccl+cublas graph", "torch symm_mem", "overlap bound", "ours gemm alone", "ours push",
               "ours pull", "ours direct", "ours copy_engine", "ours auto"]
    heads = ["nccl", "graph", "torch", "bound", "alone", "push", "pull", "direct", "ce", "auto"]
    lines = [f"{'op':8} {'shape':27} " + " ".join(f"{h:>7}" for h in heads) +
             f" {'auto/nccl':>9} {'auto/bound':>10} {'err':>7}"]
    speedups = []
    for (op, shape), v in by.items():
        g = lambda k: v.get(k, {}).get(key)
        f = lambda x: f"{x:7.3f}" if x else "      -"
        auto = g("ours auto")
        if auto and g("nccl+cublas"):
            speedups.append(g("nccl+cublas") / auto)
        err = v.get("ours auto", {}).get("rel_err")
        lines.append(f"{op:8} {shape:27} " + " ".join(f(g(c)) for c in columns) + " "
                     f"{(g('nccl+cublas') / auto if auto else 0):9.2f} {(auto / g('overlap bound') if auto else 0):10.2f} "
                     f"{(err if err is not None else float('nan')):7.1e}")
    if speedups:
        import math
        lines.append(f"geometric mean speedup of auto over NCCL+cuBLAS ({TIMINGS[key]}): "
                     f"{math.exp(sum(map(math.log, speedups)) / len(speedups)):.3f}x over {len(speedups)} shapes")
    return "\n".join(lines)


def plot(rows, path):
    """Speedup over NCCL+cuBLAS per shape, in both timings: each variant, and the overlap bound as the ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = ["nccl+cublas graph", "torch symm_mem", "ours direct", "ours push", "ours pull", "ours copy_engine",
                "ours auto", "overlap bound"]
    fig, axes = plt.subplots(2, 1, figsize=(14, 9))
    for ax, key in zip(axes, TIMINGS):
        by = {}
        for r in rows:
            if r.get(key):
                by.setdefault(f"{r['op']}\n{r['shape']}", {})[r["variant"]] = r[key]
        names = list(by)
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ys = [by[n]["nccl+cublas"] / by[n][v] if v in by[n] else 0 for n in names]
            ax.bar([x + i * width for x in range(len(names))], ys, width, label=v)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, fontsize=7)
        ax.set_ylabel("speedup over NCCL+cuBLAS")
        ax.set_title(f"Fused GEMM + collective on 2x H200, bf16: {TIMINGS[key]}")
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--from-json", help="no run: read this result file (with --plot, draw it)")
    p.add_argument("--plot", help="write a PNG of speedup per shape")
    p.add_argument("--json", default="benchmarks/results/gemm_h200x2.json")
    p.add_argument("--ops", default="ag,rs,ar")
    p.add_argument("--comm", default="", help="extra comm-program counts to sweep for AG push, e.g. 4,8,16")
    p.add_argument("--shapes", default="", help="other shapes than the issue's, e.g. ag:8192x4096x8192:nk,rs:8192x8192x8192:kn "
                   "(M x N x K of the whole matmul; kn: B row-major, nk: B = w.t())")
    p.add_argument("--max-m", type=int, default=0, help="only shapes with at most this many rows M")
    p.add_argument("--tiles", default="",
                   help="extra tile configs for AG push and RS/AR direct and push, e.g. 64x128x64w4s4,128x128x64w8s4")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--profile-host", action="store_true", help="cProfile the direct RS/AR calls on rank 0")
    p.add_argument("--profile-cold", action="store_true",
                   help="kernel device times of single calls after a barrier, NCCL+cuBLAS and auto (rank 0 prints)")
    p.add_argument("--debug", action="store_true", help="bounded waits in our kernels: a hang becomes an error")
    args = p.parse_args()
    args.ops = args.ops.split(",")
    args.comm = [int(c) for c in args.comm.split(",") if c]
    args.tiles = [t for t in args.tiles.split(",") if t]
    shapes = {}
    for spec in filter(None, args.shapes.split(",")):
        op, dims, layout = spec.split(":")
        shapes.setdefault(op, []).append((*map(int, dims.split("x")), layout))
    args.shapes = shapes
    if args.from_json:
        rows = json.load(open(args.from_json))["rows"]
        print(summarize(rows))
        print(summarize(rows, "ms_b2b"))
        if args.plot:
            plot(rows, args.plot)
        return
    from bspfuse.runtime import launch
    t0 = time.time()
    results = launch(run, int(os.environ.get("WORLD_SIZE", "2")), backend="cuda", heap_bytes=3 << 30,
                     args=(args,), timeout_s=900)
    rows = results[0]
    if int(os.environ.get("RANK", "0")) == 0:
        results_file.save(args.json, rows, world_size=int(os.environ.get("WORLD_SIZE", "2")),
                          seconds=round(time.time() - t0, 1))
        print(summarize(rows, "ms_b2b"))
        print(summarize(rows), flush=True)
        if args.plot:
            plot(rows, args.plot)


if __name__ == "__main__":
    main()
