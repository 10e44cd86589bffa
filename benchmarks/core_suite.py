"""The fused kernels' GEMM core, tuned, against cuBLAS over the GEMMs of the models people run (one GPU).

    python3 benchmarks/core_suite.py --json benchmarks/results/core_suite_h100.json \\
        --table bspfuse/tune/tables/H100.json --plot benchmarks/results/core_suite_h100.png

Each row is one GEMM of a tensor-parallel layer as a world of one: the column-parallel projections (q/k/v
joined, gate/up joined) through the AG+GEMM kernel, the row-parallel ones (o, down) through the GEMM+RS
kernel (GEMM+AR runs the same core), at TP 2, 4 and 8 and M tokens in {1, 8, 32, 128, 512, 2048, 8192,
16384}, B as an nn.Linear weight (weight.t()). `bspfuse tune`'s search (bspfuse.tune: the cost model's best
--keep candidates) picks each row's config; the best is timed again beside cuBLAS, and both outputs are
checked against a float64 reference. Two times each: on the device alone (``*_us``, ``ratio``: the calls
queued behind a busy GPU, so no host time between kernels, as under a CUDA graph) and back to back from the
host (``*_b2b_us``, ``ratio_b2b``: what an eager program gets; at small M both sides take their host's time
per call there). For M <= 256 the row also gives the rate at which the kernel reads the weight (device time)
against the HBM copy rate measured in the same run. The entries go into --table
(the tuned table the package ships for this GPU). A suite too long for one run goes in shards
(``--shard 0/4`` ... ``3/4``, each GEMM with all its Ms, ``--budget-s`` to end in time), joined by
``--merge``.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results_file  # noqa: E402  (benchmarks/, the script's own folder)

# hidden, q width (heads x head dim), kv width, ffn: the dense parts of each model
MODELS = {
    "llama3-8b": (4096, 4096, 1024, 14336),
    "llama3-70b": (8192, 8192, 1024, 28672),
    "llama3-405b": (16384, 16384, 1024, 53248),
    "qwen2.5-7b": (3584, 3584, 512, 18944),
    "qwen2.5-32b": (5120, 5120, 1024, 27648),
    "qwen2.5-72b": (8192, 8192, 1024, 29568),
    "mixtral-8x7b": (4096, 4096, 1024, 14336),  # attention; an expert's FFN has the same widths
}
TPS = (2, 4, 8)
MS = (1, 8, 32, 128, 512, 2048, 8192, 16384)


def suite(models, tps, ms) -> list[tuple[str, str, int, int, int]]:
    """(name, op, M, N, K) of every GEMM, each shape once (the first model that has it names it)."""
    out, seen = [], set()
    for model in models:
        h, q, kv, ffn = MODELS[model]
        for tp in tps:
            gemms = [("qkv", "ag_matmul", (q + 2 * kv) // tp, h), ("o", "matmul_rs", h, q // tp),
                     ("gate_up", "ag_matmul", 2 * ffn // tp, h), ("down", "matmul_rs", h, ffn // tp)]
            for proj, op, n, k in gemms:
                for m in ms:
                    if (op, m, n, k) not in seen:
                        seen.add((op, m, n, k))
                        out.append((f"{model} tp{tp} {proj}", op, m, n, k))
    return out


def copy_rate(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted once each)."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * 2 * 20 / (start.elapsed_time(end) * 1e-3)


def run(ctx, args):
    from bspfuse.tune import Problem
    from bspfuse.tune.measure import GpuTimer, gpu_model, tune_in_rank

    gpu = gpu_model()
    rows_spec = suite(args.models, args.tps, args.ms)
    if args.limit:
        rows_spec = rows_spec[:args.limit]
    groups: dict = {}  # the Ms of one GEMM tune together (its host objects serve them all)
    for spec in rows_spec:
        groups.setdefault(spec[1:2] + spec[3:], []).append(spec)
    groups = list(groups.values())
    # a shard takes every Nth GEMM of a fixed shuffle (consecutive GEMMs are one model's four projections,
    # so a plain stride would give one shard only q/k/v), in suite order
    order = list(range(len(groups)))
    random.Random(0).shuffle(order)
    groups = [groups[i] for i in sorted(order[args.shard[0]::args.shard[1]])]
    hbm = copy_rate(ctx.device)
    t_start, tune_s, rows, entries = time.time(), 0.0, [], []
    result = lambda: dict(rows=rows, entries=[e.to_json() for e in entries], gpu=gpu,  # noqa: E731
                          hbm_copy_gbps=round(hbm / 1e9, 1), tune_seconds=round(tune_s, 1),
                          seconds=round(time.time() - t_start, 1))
    for group in groups:
        if args.budget_s and time.time() - t_start > args.budget_s:
            rows += [dict(name=name, op=op, M=m, N=n, K=k, layout="nk", error="not run: --budget-s spent")
                     for name, op, m, n, k in group]
            continue
        problems = [Problem(op, m, n, k, 1, "bf16", "nk") for _, op, m, n, k in group]
        t0 = time.time()
        group_entries = tune_in_rank(ctx, problems, gpu, keep=args.keep, rep_ms=args.tune_rep_ms, progress=True)
        tune_s += time.time() - t0
        entries += group_entries
        timer = GpuTimer(ctx, rep_ms=args.rep_ms)
        try:
            rows += [time_row(timer, spec, p, entry, hbm) for spec, p, entry in zip(group, problems, group_entries)]
        finally:
            timer.close()
        save(args, result())  # after every GEMM: a run stopped from outside keeps what it measured
    return result()


def save(args, out: dict) -> None:
    """The rows to --json, the tuned entries into --table."""
    from bspfuse.tune import Entry, TunedTable

    results_file.save(args.json, out["rows"], **{k: out[k] for k in ("seconds", "gpu", "hbm_copy_gbps", "tune_seconds")})
    if args.table:
        table = TunedTable.load(paths=[args.table] if os.path.exists(args.table) else [], save_to=args.table)
        for e in out["entries"]:
            table.put(Entry.from_json(e))
        table.save()


def time_row(timer, spec, p, entry, hbm) -> dict:
    """The tuned config of one GEMM timed back to back beside cuBLAS, both checked against float64."""
    name, op, m, n, k = spec
    row = dict(name=name, op=op, M=m, N=n, K=k, layout="nk", tune_s=entry.seconds)
    if entry.best is None:
        return dict(row, error="no candidate ran", cublas_us=entry.unfused_us)
    a, b, _ = timer.inputs(p)
    ref = a.double() @ b.double()
    cublas = a @ b
    ours_fn = timer.fused_call(p, entry.best, a, b)
    ours = ours_fn()
    err = lambda x: float((x.double() - ref).norm() / ref.norm())  # noqa: E731
    # alternating, the best of three each: on the device alone (the kernels), and back to back from the host
    # (an eager program's time per call: the host's where that is longer)
    best = {}
    for _ in range(3):
        for side, fn in (("cublas", lambda: a @ b), ("ours", ours_fn)):
            for key, seconds in zip(("b2b_us", "us"), timer.time_gemm(fn, p)):
                best[f"{side}_{key}"] = min(seconds * 1e6, best.get(f"{side}_{key}", seconds * 1e6))
    row.update({k: round(v, 2) for k, v in best.items()})
    row.update(ratio=round(best["ours_us"] / best["cublas_us"], 4),
               ratio_b2b=round(best["ours_b2b_us"] / best["cublas_b2b_us"], 4), rel_err=err(ours),
               cublas_rel_err=err(cublas), config=str(entry.best.config), schedule=entry.best.schedule)
    if m <= 256:
        weight = n * k * 2
        row.update(weight_read_fraction=round(weight / (best["ours_us"] * 1e-6) / hbm, 3),
                   cublas_weight_read_fraction=round(weight / (best["cublas_us"] * 1e-6) / hbm, 3))
    print(f"{name:28} {op:10} {m:6}x{n:6}x{k:6}  device: cublas {row['cublas_us']:9.1f} us ours {row['ours_us']:9.1f} "
          f"us {row['ratio']:.3f}  back to back: {row['cublas_b2b_us']:.1f} {row['ours_b2b_us']:.1f} "
          f"{row['ratio_b2b']:.3f}  err {row['rel_err']:.1e} (cublas {row['cublas_rel_err']:.1e})", flush=True)
    return row


def summary(rows) -> str:
    ok = [r for r in rows if "ratio" in r]
    if not ok:
        return "no rows"
    geo = math.exp(sum(math.log(r["ratio"]) for r in ok) / len(ok))
    worst = max(ok, key=lambda r: r["ratio"])
    missing = len(rows) - len(ok)
    geo_b2b = math.exp(sum(math.log(r["ratio_b2b"]) for r in ok) / len(ok)) if all("ratio_b2b" in r for r in ok) \
        else float("nan")
    lines = [f"{len(ok)} GEMMs, on the device (back to back from the host: geomean {geo_b2b:.3f}): geomean "
             f"ours/cuBLAS {geo:.3f}; {sum(r['ratio'] > 1.10 for r in ok)} above 1.10; "
             f"worst {worst['ratio']:.3f} ({worst['op']} {worst['M']}x{worst['N']}x{worst['K']})"
             + (f"; {missing} without a time ({', '.join(sorted({r['error'] for r in rows if 'ratio' not in r}))})"
                if missing else "")]
    for m in sorted({r["M"] for r in ok}):
        at = [r["ratio"] for r in ok if r["M"] == m]
        lines.append(f"  M={m:6}: geomean {math.exp(sum(map(math.log, at)) / len(at)):.3f} over {len(at)}, "
                     f"max {max(at):.3f}")
    small = [r for r in ok if "weight_read_fraction" in r]
    if small:
        lines.append(f"  M<=256: weight read at {min(r['weight_read_fraction'] for r in small):.2f}-"
                     f"{max(r['weight_read_fraction'] for r in small):.2f} of the copy rate (cuBLAS "
                     f"{min(r['cublas_weight_read_fraction'] for r in small):.2f}-"
                     f"{max(r['cublas_weight_read_fraction'] for r in small):.2f})")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for op, marker in (("ag_matmul", "o"), ("matmul_rs", "s")):
        pts = [(r["M"], r["ratio"]) for r in rows if r.get("op") == op and "ratio" in r]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, alpha=0.6, label={"ag_matmul": "AG+GEMM core (column-parallel)",
                                                                     "matmul_rs": "GEMM+RS/AR core (row-parallel)"}[op])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.1, color="r", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("ours / cuBLAS time (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/3")
    return int(i), int(n)


def merge(paths: list[str], out: str, plot_path: str | None) -> None:
    """One results file from the shards' (their rows in suite order, their seconds summed)."""
    import json

    shards = [json.load(open(p)) for p in paths]
    order = {(op, m, n, k): i for i, (_, op, m, n, k) in enumerate(suite(list(MODELS), TPS, MS))}
    rows = sorted((r for s in shards for r in s["rows"]),
                  key=lambda r: order.get((r["op"], r["M"], r["N"], r["K"]), len(order)))
    meta = dict(shards[0]["meta"], commands=[s["meta"]["command"] for s in shards], command=" ".join(sys.argv),
                seconds=round(sum(s["meta"]["seconds"] for s in shards), 1),
                tune_seconds=round(sum(s["meta"]["tune_seconds"] for s in shards), 1))
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if plot_path:
        plot(rows, plot_path)
    print(summary(rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/core_suite_h100.json")
    p.add_argument("--table", help="also write the tuned entries here (a table shipped in bspfuse/tune/tables)")
    p.add_argument("--plot", help="the ratio against M, as a PNG")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tps", nargs="+", type=int, default=list(TPS))
    p.add_argument("--ms", nargs="+", type=int, default=list(MS))
    p.add_argument("--limit", type=int, default=0, help="only the first N GEMMs (a smoke run)")
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--tune-rep-ms", type=float, default=10.0, dest="tune_rep_ms")
    p.add_argument("--rep-ms", type=float, default=30.0, dest="rep_ms")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="only every Nth GEMM (all its Ms) from the Ith, 0-based: the suite split over several runs")
    p.add_argument("--budget-s", type=float, default=0, dest="budget_s",
                   help="start no GEMM after this many seconds (its rows say not run): a run that must end in time")
    p.add_argument("--merge", nargs="+", metavar="SHARD.json",
                   help="no GPU run: join shards' results into --json (and --plot), print the summary")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.json, args.plot)
        return
    from bspfuse.runtime import launch

    out = launch(run, 1, backend="cuda", heap_bytes=24 << 30, args=(args,), timeout_s=3600)[0]
    save(args, out)
    if args.plot:
        plot(out["rows"], args.plot)
    print(summary(out["rows"]))


if __name__ == "__main__":
    main()
