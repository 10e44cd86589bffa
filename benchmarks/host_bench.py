"""Host time of one call, piece by piece, on one GPU: where a short fused kernel's launch time goes.

    python3 benchmarks/host_bench.py [--json benchmarks/results/host_h100.json]

Single fused calls (a decode step, a GEMM at small M) pay the host's time before the GPU has the kernel.
decode_bench.py and gemm_bench.py measure that as a whole (their "host" columns); this script splits it:
launches of empty kernels (the floor: driver plus launcher), a torch op and cuBLAS for comparison, and
our calls with everything reused (the fast path) or fresh. Each figure is the median of many calls,
the GPU idle before each (synchronized), and the same after a short sleep (a host that waited for the
GPU, as a decode loop does). Also on the CPU with launches stubbed: decode_host_bench.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results_file  # noqa: E402  (benchmarks/, the script's own folder)


@triton.jit
def empty_kernel(x):
    pass


@triton.jit
def empty_kernel_40(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
                    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9):
    pass


def host_us(fn, calls: int, sleep_s: float = 0.0) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        if sleep_s:
            time.sleep(sleep_s)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def run(ctx, args):
    from bspfuse.kernels.flash_decode import FlashDecode
    from bspfuse.kernels.gemm import FusedMatmulReduceScatter
    from bspfuse.runtime.fastlaunch import FastLaunch

    dev = ctx.device
    x = torch.zeros(16, device=dev)
    one = FastLaunch(empty_kernel, (1,))
    forty = FastLaunch(empty_kernel_40, (1,))
    ptrs = [torch.zeros(16, device=dev) for _ in range(20)]
    forty_args = (*ptrs, *range(1000, 1020))
    q = torch.randn(1, 96, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 16384, 12, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((1,), 16384, device=dev, dtype=torch.int32)
    fd = FlashDecode(ctx.heap, 1, 0, 1, 96, 12, 128, torch.bfloat16, stage=3)
    out = (torch.empty(1, 96, 128, device=dev, dtype=torch.bfloat16), torch.empty(1, 96, device=dev))
    a = torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    rs = FusedMatmulReduceScatter(ctx.heap, 1024, 8192, 4096, torch.bfloat16, mode="direct", b_layout="nk")
    small = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    pieces = {
        "empty triton kernel, FastLaunch, 1 arg": lambda: one(x),
        "empty triton kernel, FastLaunch, 40 args": lambda: forty(*forty_args),
        "empty triton kernel, JIT dispatch, 1 arg": lambda: empty_kernel[(1,)](x),
        "torch add (64 floats)": lambda: x.add_(1),
        "cuBLAS 64x64 matmul": lambda: small @ small,
        "torch.empty x2 (decode outputs)": lambda: (torch.empty(1, 96, 128, device=dev, dtype=torch.bfloat16),
                                                    torch.empty(1, 96, device=dev)),
        "decode stage 3 step, out given, same inputs": lambda: fd(q, k, v, kv_lens=lens, out=out),
        "decode stage 3 step, new outputs": lambda: fd(q, k, v, kv_lens=lens),
        "decode stage 3 step, new q": lambda: fd(q.clone(), k, v, kv_lens=lens, out=out),
        "GEMM+RS direct 1024x8192x4096, B=w.t()": lambda: rs(a, w.t()),
        "cuBLAS 1024x8192x4096, B=w.t()": lambda: a @ w.t(),
    }
    rows = []
    for name, fn in pieces.items():
        for _ in range(5):
            fn()
        idle = host_us(fn, args.calls)
        slept = host_us(fn, max(20, args.calls // 10), sleep_s=0.002)
        rows.append(dict(piece=name, host_us=round(idle, 1), host_us_after_sleep=round(slept, 1)))
        print(f"{name:<48} {idle:8.1f} us   after 2 ms sleep {slept:8.1f} us", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/host_h100.json")
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    from bspfuse.runtime import launch
    rows = launch(run, 1, backend="cuda", heap_bytes=1 << 30, args=(args,), timeout_s=600)[0]
    results_file.save(args.json, rows)


if __name__ == "__main__":
    main()
