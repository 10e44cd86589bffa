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
        rows.append(dict(op=op, shape=shape, variant=variant, ms=t, rel_err=err, **extra))
        say(f"  {op} {shape} {variant:>18}: {t:8.3f} ms" + (f"  err {err:.1e}" if err is not None else "") +
            "".join(f"  {k}={v}" for k, v in extra.items()))

    def attempt(op, shape, variant, f, **extra):
        try:
            f()
        except Exception as e:
            say(f"  {op} {shape} {variant}: FAILED {type(e).__name__}: {str(e)[:400]}")
            if args.verbose:
                say(traceback.format_exc())
            rows.append(dict(op=op, shape=shape, variant=variant, ms=None, error=f"{type(e).__name__}: {str(e)[:400]}"))

    if "ag" in args.ops:
        for M, N, K, layout in AG_SHAPES:
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
            t_base = bench(base)
            record("ag_gemm", shape, "nccl+cublas", t_base, 0.0)
            attempt("ag_gemm", shape, "nccl+cublas graph", lambda: record("ag_gemm", shape, "nccl+cublas graph",
                                                                           bench(graphed(base))))
            t_coll = bench(lambda: dist.all_gather_into_tensor(full, a))
            t_mm = bench(lambda: full @ b)
            record("ag_gemm", shape, "collective alone", t_coll)
            record("ag_gemm", shape, "matmul alone", t_mm)
            record("ag_gemm", shape, "overlap bound", max(t_mm, t_coll))

            def torch_fused():
                f = lambda: torch.ops.symm_mem.fused_all_gather_matmul(a, [b], 0, group, return_A=False)[1][0]
                record("ag_gemm", shape, "torch symm_mem", bench(f), rel_err(f(), ref))
            attempt("ag_gemm", shape, "torch symm_mem", torch_fused)
            auto = choose_mode("ag_matmul", M, N, K, W)
            if auto.mode == "off":  # the cost model keeps the BSP program: that is what auto runs
                record("ag_gemm", shape, "ours auto", t_base, 0.0, choice="off (fallback: NCCL+cuBLAS)",
                       reason=auto.reason)
            variants = [("push", None), ("pull", None)] + [(f"push comm={c}", c) for c in args.comm]
            for variant, comm in variants:
                def ours(variant=variant, comm=comm):
                    from bspfuse.tile import choose_config
                    mode = variant.split()[0]
                    cfg = choose_config("ag_matmul", M, N, K, W, comm_programs=comm) if comm else None
                    op = FusedAllGatherMatmul(heap, Ml, N, K, torch.bfloat16, mode=mode, config=cfg, debug=args.debug)
                    out = op(a, b)
                    err = rel_err(out, ref)
                    t = bench(lambda: op(a, b))
                    record("ag_gemm", shape, f"ours {variant}", t, err, comm_programs=op.config.comm_programs,
                           tile=str(op.config))
                    if variant == auto.mode:
                        record("ag_gemm", shape, "ours auto", t, err, choice=auto.mode, reason=auto.reason)
                    heap.free(op.flags)
                    for buf in (op.staging, op.a_heap):
                        if buf is not None:
                            heap.free(buf)
                attempt("ag_gemm", shape, f"ours {variant}", ours)
            del a, b, full, ref

    for kind, shapes in (("rs", RS_SHAPES), ("ar", AR_SHAPES)):
        if kind not in args.ops:
            continue
        for M, N, K, layout in shapes:
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
            t_base = bench(base)
            record(name, shape, "nccl+cublas", t_base, 0.0)
            attempt(name, shape, "nccl+cublas graph", lambda: record(name, shape, "nccl+cublas graph",
                                                                      bench(graphed(base))))
            part = a @ b
            t_mm = bench(lambda: a @ b)
            if kind == "rs":
                t_coll = bench(lambda: dist.reduce_scatter_tensor(out, part))
            else:
                t_coll = bench(lambda: dist.all_reduce(part))
            record(name, shape, "collective alone", t_coll)
            record(name, shape, "matmul alone", t_mm)
            record(name, shape, "overlap bound", max(t_mm, t_coll))
            if kind == "rs":
                def torch_fused():
                    f = lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, group)
                    record(name, shape, "torch symm_mem", bench(f), rel_err(f(), ref))
                attempt(name, shape, "torch symm_mem", torch_fused)

            auto = choose_mode("matmul_rs" if kind == "rs" else "matmul_ar", M, N, K, W)
            if auto.mode == "off":  # the cost model keeps the BSP program: that is what auto runs
                record(name, shape, "ours auto", t_base, 0.0, choice="off (fallback: NCCL+cuBLAS)", reason=auto.reason)
            for mode in ("push", "pull", "direct"):
                def ours(mode=mode):
                    cls = FusedMatmulReduceScatter if kind == "rs" else FusedMatmulAllReduce
                    op = cls(heap, M, N, Kl, torch.bfloat16, mode=mode, debug=args.debug)
                    res = op(a, b)
                    err = rel_err(res, ref)
                    t = bench(lambda: op(a, b))
                    record(name, shape, f"ours {mode}", t, err, tile=str(op.config),
                           host_ms=round(host_ms(lambda: op(a, b)), 3))
                    if mode == auto.mode:
                        record(name, shape, "ours auto", t, err, choice=auto.mode, reason=auto.reason)
                    if args.profile_host and mode == "direct":  # every rank calls: the kernels wait on each other
                        profile_host(lambda: op(a, b), f"{name} {shape} direct", show=rank == 0)
                    if mode == "direct":  # our GEMM with no communication: the bound our kernels can reach
                        record(name, shape, "ours gemm alone", bench(lambda: op.local_matmul(a, b)),
                               rel_err(op.local_matmul(a, b), a @ b))
                    dist.barrier()  # a peer may still read this rank's buffers (pull) until it is done
                    for buf in op.buffers():
                        heap.free(buf)
                attempt(name, shape, f"ours {mode}", ours)
            del a, b, out, part, ref
    return rows


def summarize(rows):
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["shape"]), {})[r["variant"]] = r
    # alone: our GEMM without communication (RS/AR), the bound our fused kernels can reach
    columns = ["nccl+cublas", "nccl+cublas graph", "torch symm_mem", "overlap bound", "ours gemm alone", "ours push",
               "ours pull", "ours direct", "ours auto"]
    heads = ["nccl", "graph", "torch", "bound", "alone", "push", "pull", "direct", "auto"]
    lines = [f"{'op':8} {'shape':27} " + " ".join(f"{h:>7}" for h in heads) +
             f" {'auto/nccl':>9} {'auto/bound':>10} {'err':>7}"]
    speedups = []
    for (op, shape), v in by.items():
        g = lambda k: v.get(k, {}).get("ms")
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
        lines.append(f"geometric mean speedup of auto over NCCL+cuBLAS: "
                     f"{math.exp(sum(map(math.log, speedups)) / len(speedups)):.3f}x over {len(speedups)} shapes")
    return "\n".join(lines)


def plot(rows, path):
    """Speedup over NCCL+cuBLAS per shape: each variant, and the overlap bound as the ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {}
    for r in rows:
        if r.get("ms"):
            by.setdefault(f"{r['op']}\n{r['shape']}", {})[r["variant"]] = r["ms"]
    names = list(by)
    variants = ["nccl+cublas graph", "torch symm_mem", "ours direct", "ours push", "ours pull", "ours auto",
                "overlap bound"]
    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ys = [by[n]["nccl+cublas"] / by[n][v] if v in by[n] else 0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], ys, width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, fontsize=7)
    ax.set_ylabel("speedup over NCCL+cuBLAS (higher is better)")
    ax.set_title("Fused GEMM + collective on 2x H200, bf16")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--from-json", help="no run: read this result file (with --plot, draw it)")
    p.add_argument("--plot", help="write a PNG of speedup per shape")
    p.add_argument("--json", default="benchmarks/results/gemm_h200x2.json")
    p.add_argument("--ops", default="ag,rs,ar")
    p.add_argument("--comm", default="", help="extra comm-program counts to sweep for AG push, e.g. 4,8,16")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--profile-host", action="store_true", help="cProfile the direct RS/AR calls on rank 0")
    p.add_argument("--debug", action="store_true", help="bounded waits in our kernels: a hang becomes an error")
    args = p.parse_args()
    args.ops = args.ops.split(",")
    args.comm = [int(c) for c in args.comm.split(",") if c]
    if args.from_json:
        rows = json.load(open(args.from_json))["rows"]
        print(summarize(rows))
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
        print(summarize(rows), flush=True)
        if args.plot:
            plot(rows, args.plot)


if __name__ == "__main__":
    main()
