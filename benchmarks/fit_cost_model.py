"""Fit the cost model's GEMM figures to recorded measurements, and report its error on shapes left out.

    python3 benchmarks/fit_cost_model.py benchmarks/results/core_suite_h100.json

The cost model (passes/fuse_gemm.py, choose_mode) times a matmul as max(flops / R, bytes / B) + C: R the
achieved matmul rate, B the rate its operands stream from HBM, C a fixed cost per call. This fits R, B and C
for cuBLAS (the unfused program) and for the fused kernels' GEMM core from core_suite.py's rows, minimising the
squared log error on the models it trains on, and prints the error on the models it left out (by default
every model whose name sorts last in each family: held out, never seen by the fit). The fitted figures go into
bspfuse/devices.py with this script and the data file as their source.
"""
from __future__ import annotations

import argparse
import json
import math


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data", nargs="+", help="core_suite.py JSON files of one GPU")
    p.add_argument("--hold-out", nargs="*", help="models left out of the fit (default: the last of each family)")
    p.add_argument("--json", help="write the fitted figures and errors here")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
