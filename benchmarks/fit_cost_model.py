"""Fit the cost model's GEMM figures to recorded measurements, and report its error on shapes left out.

    python3 benchmarks/fit_cost_model.py benchmarks/results/core_suite_h100.json

The cost model (passes/fuse_gemm.py, choose_mode) times a matmul as max(flops / R, bytes / B) + C: R the
achieved matmul rate, B the rate its operands stream from HBM, C a fixed cost per call. This fits R, B and C
for cuBLAS (the unfused program) and for the fused kernels' GEMM core from core_suite.py's rows, minimising the
squared log error on the models it trains on, and prints the error on the models it left out (by default
every model whose name sorts last in each family: held out, never seen by the fit). The fitted figures go into
bspfuse/devices.py with this script and the data file as their source.

    python3 benchmarks/fit_cost_model.py benchmarks/results/core_suite_h100.json --table bspfuse/tune/tables/H100.json

--table also fits the constants the tuner ranks its space with (bspfuse/tune/search.py: estimate's
TILE_EFFICIENCY_EXP, PER_SM_STREAM, SPLIT_K_TRAFFIC) to every candidate the table measured on the device: each
problem's estimates against its measured times, in log, each problem centred on its own mean (ranking needs
only the ratios between a problem's candidates). It reports the error and how often the model's pick among the
measured candidates was within 5% of the fastest, fitted and left out, for the constants in search.py and the
fitted ones. The candidates are those the ranking of the day chose to measure: the fit sees no others.
"""
from __future__ import annotations

import argparse
import json
import math
import os


def predict(row, R: float, B: float, C: float) -> float:
    M, N, K = row["M"], row["N"], row["K"]
    return max(2 * M * N * K / R, 2 * (M * K + K * N + M * N) / B) + C


def fit(rows, key: str) -> tuple[float, float, float]:
    """(R flop/s, B bytes/s, C s) minimising the squared log error of `key` (microseconds) over rows: a coarse
    grid, then coordinate refinement (three parameters; no solver needed)."""
    def loss(p):
        return sum((math.log(predict(r, *p)) - math.log(r[key] * 1e-6)) ** 2 for r in rows)

    best = min(((R * 1e12, B * 1e9, C * 1e-6) for R in (300, 450, 600, 750, 900) for B in (1500, 2500, 3500, 4500)
                for C in (1, 3, 6, 10)), key=loss)
    step = [0.2, 0.2, 0.5]
    for _ in range(200):
        improved = False
        for i in range(3):
            for f in (1 + step[i], 1 / (1 + step[i])):
                trial = list(best)
                trial[i] *= f
                if loss(trial) < loss(best):
                    best, improved = tuple(trial), True
        if not improved:
            step = [s / 2 for s in step]
            if max(step) < 1e-3:
                break
    return best


def errors(rows, key: str, params) -> dict:
    errs = sorted(abs(predict(r, *params) / (r[key] * 1e-6) - 1) for r in rows)
    return {"rows": len(errs), "median_abs_error": round(errs[len(errs) // 2], 3),
            "p90_abs_error": round(errs[int(0.9 * (len(errs) - 1))], 3), "max_abs_error": round(errs[-1], 3)}


RANKING = ("TILE_EFFICIENCY_EXP", "PER_SM_STREAM", "SPLIT_K_TRAFFIC")


def measured_candidates(table: str, model_of: dict) -> list:
    """[(problem, model name, [(candidate, device seconds)])] of a tuned table's GEMM entries."""
    from bspfuse.tile import TileConfig
    from bspfuse.tune import Candidate, Problem

    out = []
    for e in json.load(open(table))["entries"]:
        if e["problem"].get("kind") not in ("ag_matmul", "matmul_rs", "matmul_ar"):
            continue
        p, device = Problem(**e["problem"]), e.get("device_us") or {}
        pts = []
        for label, us in e["times_us"].items():
            schedule, _, config = label.partition(" ")
            if config and us is not None:  # a fused candidate ("copy_engine 128x256x64 group_m=1 ..."), measured
                pts.append((Candidate(schedule, TileConfig.parse(config)), device.get(label, us) * 1e-6))
        if len(pts) >= 3:
            out.append((p, model_of.get((p.kind, p.N, p.K), "?"), pts))
    return out


def ranking_error(data, device) -> dict:
    """Mean |centred log error| of estimate over every candidate, and the share of problems whose estimated
    best (among the measured) ran within 5% of the measured best."""
    from bspfuse.tune.search import estimate

    errs, hits = [], []
    for p, _, pts in data:
        logs = [math.log(estimate(p, c, device)) - math.log(t) for c, t in pts]
        mean = sum(logs) / len(logs)
        errs += [abs(x - mean) for x in logs]
        picked = min(pts, key=lambda x: estimate(p, x[0], device))[1]
        hits.append(picked <= 1.05 * min(t for _, t in pts))
    return {"problems": len(data), "mean_abs_log_error": round(sum(errs) / len(errs), 4),
            "pick_within_5pct": round(sum(hits) / len(hits), 3)}


def fit_ranking(train, test, device) -> dict:
    """The ranking constants minimising the training error: a grid, then halving steps around the best."""
    from bspfuse.tune import search

    def loss(values):
        for name, v in zip(RANKING, values):
            setattr(search, name, v)
        return ranking_error(train, device)["mean_abs_log_error"]

    given = tuple(getattr(search, n) for n in RANKING)
    out = {"given": dict(zip(RANKING, given)), "given_train": (loss(given), ranking_error(train, device))[1],
           "given_held_out": ranking_error(test, device)}
    best = min(((a, b, c) for a in (0.2, 0.35, 0.5, 0.7, 1.0) for b in (0.5, 1.0, 2.0) for c in (1.0, 2.0, 3.0, 5.0)),
               key=loss)
    step = [0.2, 0.2, 0.2]
    while max(step) > 0.01:
        improved = False
        for i in range(3):
            for f in (1 + step[i], 1 / (1 + step[i])):
                trial = list(best)
                trial[i] = round(trial[i] * f, 3)
                if loss(trial) < loss(best):
                    best, improved = tuple(trial), True
        if not improved:
            step = [x / 2 for x in step]
    loss(best)
    out.update(fitted=dict(zip(RANKING, best)), fitted_train=ranking_error(train, device),
               fitted_held_out=ranking_error(test, device))
    loss(given)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data", nargs="+", help="core_suite.py JSON files of one GPU")
    p.add_argument("--hold-out", nargs="*", help="models left out of the fit (default: the last of each family)")
    p.add_argument("--json", help="write the fitted figures and errors here")
    p.add_argument("--table", help="a tuned table of the same GPU: also fit the tuner's ranking constants")
    args = p.parse_args()
    rows = [r for path in args.data for r in json.load(open(path))["rows"] if "ratio" in r]
    models = sorted({r["name"].split()[0] for r in rows})
    held = set(args.hold_out) if args.hold_out is not None else {
        max(m for m in models if m.split("-")[0] == family) for family in {m.split("-")[0] for m in models}}
    train = [r for r in rows if r["name"].split()[0] not in held]
    test = [r for r in rows if r["name"].split()[0] in held]
    out = {"data": args.data, "held_out": sorted(held)}
    for name, key in (("cublas", "cublas_us"), ("fused_core", "ours_us")):
        R, B, C = fit(train, key)
        out[name] = {"matmul_tflops": round(R / 1e12, 1), "stream_gbps": round(B / 1e9, 1),
                     "fixed_us": round(C * 1e6, 2), "train": errors(train, key, (R, B, C)), "held_out": errors(test, key, (R, B, C)) if test else None}
        print(f"{name:10}: R {R / 1e12:6.1f} TFLOP/s, B {B / 1e9:7.1f} GB/s, C {C * 1e6:5.2f} us; "
              f"train {out[name]['train']}; held out ({', '.join(sorted(held))}) {out[name]['held_out']}")
    if args.table:
        import sys

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from bspfuse.passes.fuse_gemm import DeviceModel

        data = measured_candidates(args.table, {(r["op"], r["N"], r["K"]): r["name"].split()[0] for r in rows})
        device = DeviceModel.of(json.load(open(args.table))["entries"][0]["gpu"])
        out["ranking"] = dict(table=args.table, **fit_ranking([d for d in data if d[1] not in held],
                                                              [d for d in data if d[1] in held], device))
        print("ranking:", {k: v for k, v in out["ranking"].items() if k != "table"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
