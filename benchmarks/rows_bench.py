"""What a bound on rows (dynamic sequence length) and rows in segments ([batch, seq, H] sharded on seq) cost the
fused GEMM kernels, on one GPU as a world of one, next to the static 2-D call and cuBLAS.

    python3 benchmarks/rows_bench.py --json benchmarks/results/rows_h100.json
    python3 benchmarks/rows_bench.py --static-only     # only the static calls (runs on older checkouts too)

For each op and shape: an object built for exactly M rows, called with [M, K] ("static"); an object built for
a bound of 2M rows, called with [M, K] ("bound 2M"); the static object called with [4, M/4, K] ("4 segments":
the segmented variant, each segment a whole number of row tiles) and the bound object with [4, S, K], S not
a multiple of the row tile ("4 segments, straddling": the tiles across a segment's end take the pointer
path). At a world of one a segment's rows land where they would anyway, so this times the variants' cost,
not their mapping (the simulator's tests check that at world 2 and 4). Every call's output is checked
against a float64 product of fresh random inputs in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results_file  # noqa: E402  (benchmarks/, the script's own folder)

# (op, rows, N, K): a Llama-3-8B layer at TP 2 (q/k/v, gate/up joined; o and down; down at decode size)
SHAPES = [("all_gather_matmul", 8192, 3072, 4096), ("all_gather_matmul", 8192, 14336, 4096),
          ("matmul_reduce_scatter", 8192, 4096, 7168), ("matmul_all_reduce", 512, 4096, 7168)]


def _check(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    ref = a.double().reshape(-1, a.shape[-1]) @ b.double()
    return ((out.double().reshape(ref.shape) - ref).norm() / ref.norm()).item()


def _poisoned_empty_cache(device) -> None:
    """The next allocations likely reuse NaN-filled memory: an output element the kernel never wrote fails."""
    torch.full((1 << 28,), float("nan"), dtype=torch.bfloat16, device=device)
    torch.cuda.synchronize()


def run(ctx, args):
    import triton

    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter

    classes = {"all_gather_matmul": FusedAllGatherMatmul, "matmul_reduce_scatter": FusedMatmulReduceScatter,
               "matmul_all_reduce": FusedMatmulAllReduce}
    dev, bf = ctx.heap.device, dict(dtype=torch.bfloat16, device=ctx.heap.device)
    rows = []
    for op_name, M, N, K in SHAPES:
        kw = {"mode": "push"} if op_name == "all_gather_matmul" else {"mode": "direct"}
        made = {"static": classes[op_name](ctx.heap, M, N, K, torch.bfloat16, b_layout="nk", **kw)}
        if not args.static_only:
            made["bound"] = classes[op_name](ctx.heap, 2 * M, N, K, torch.bfloat16, b_layout="nk", **kw)
        S = M // 4 - 8  # not a multiple of any row tile
        calls = [("static", "static", (M, K))]
        if not args.static_only:
            calls += [("bound 2M", "bound", (M, K)), ("4 segments", "static", (4, M // 4, K)),
                      ("4 segments, straddling", "bound", (4, S, K))]
        w = torch.randn(N, K, **bf) / K ** 0.5
        for variant, which, shape in calls:
            op = made[which]
            a = torch.randn(*shape, **bf)
            _poisoned_empty_cache(dev)
            err = _check(op(a, w.t()), a, w.t())
            ms = triton.testing.do_bench(lambda: op(a, w.t()), warmup=25, rep=args.rep, return_mode="median")
            rows.append(dict(op=op_name, shape=f"{M}x{N}x{K}", variant=variant, rows=a.numel() // K, ms=ms,
                             rel_err=err))
        a = torch.randn(M, K, **bf)
        ms = triton.testing.do_bench(lambda: a @ w.t(), warmup=25, rep=args.rep, return_mode="median")
        rows.append(dict(op=op_name, shape=f"{M}x{N}x{K}", variant="cublas", rows=M, ms=ms,
                         rel_err=_check(a @ w.t(), a, w.t())))
        for op in made.values():
            for buf in op.buffers():
                ctx.heap.free(buf)
    return rows


def summarize(rows) -> str:
    lines = [f"{'op':22} {'shape':16} {'variant':24} {'rows':>6} {'ms':>8} {'/cuBLAS':>8} {'rel err':>9}"]
    base = {(r["op"], r["shape"]): r["ms"] for r in rows if r["variant"] == "cublas"}
    for r in rows:
        per_row = r["ms"] / r["rows"] / (base[(r["op"], r["shape"])] / int(r["shape"].split("x")[0]))
        lines.append(f"{r['op']:22} {r['shape']:16} {r['variant']:24} {r['rows']:6d} {r['ms']:8.3f} "
                     f"{per_row:8.3f} {r['rel_err']:9.2e}")
    return "\n".join(lines) + "\n(/cuBLAS: time per row over cuBLAS's at the full M)"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/rows_h100.json")
    p.add_argument("--rep", type=int, default=100, help="milliseconds do_bench times each call")
    p.add_argument("--static-only", action="store_true")
    args = p.parse_args()
    from bspfuse.runtime import launch

    t0 = time.time()
    rows = launch(run, 1, backend="cuda", heap_bytes=3 << 30, args=(args,), timeout_s=900)[0]
    results_file.save(args.json, rows, seconds=round(time.time() - t0, 1))
    print(summarize(rows), flush=True)
    bad = [r for r in rows if not r["rel_err"] < 2e-2]
    if bad:
        print(f"FAIL: {len(bad)} outputs off the float64 reference: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
