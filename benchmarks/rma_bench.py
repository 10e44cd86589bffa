"""RMA on 2 GPUs: correctness of every iris operation, NVLink bandwidth and flag latency.

Run on the 2-GPU machine from the repository root:

    python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/rma_bench.py \
        [--json benchmarks/results/rma_h200x2.json] [--mib 512] [--iters 20]

It prints PASS/FAIL for every check of ``bspfuse.runtime.checks`` (the same checks the
simulator tests run), then times, with both ranks working at once:
- one Triton kernel reading the peer's buffer (remote loads, 16-byte vectors) and one
  writing into it (remote stores), sweeping the number of programs, against
  ``torch`` ``copy_`` through a peer view of the same buffer;
- the round trip of one flag (ping-pong with epoch flags, many rounds in one kernel).
Each measurement is the median over ``--iters`` timed iterations (CUDA events, a barrier
before each, the slower rank's time). A table comes last; JSON goes to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bspfuse.runtime import (Epoch, iris, launch, new_error_buffer,  # noqa: E402
                             raise_if_wait_timed_out)
from bspfuse.runtime.checks import run_rma_checks  # noqa: E402

BLOCK = 4096  # elements (int32) per program per step: 16 KiB
PROGRAM_SWEEP = (8, 16, 32, 66, 132, 264)
PING_PONG_ROUNDS = 10_000


@triton.jit
def remote_read_kernel(src, dst, heap_bases, rank, peer, n_elems, BLOCK: tl.constexpr):
    """dst (local) <- src on ``peer``, grid-stride over ``n_elems`` (a multiple of BLOCK)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, n_elems, step):
        offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        v = iris.load(src + offs, rank, peer, heap_bases, hint=16)
        tl.store(dst + offs, v)


@triton.jit
def remote_write_kernel(src, dst, heap_bases, rank, peer, n_elems, BLOCK: tl.constexpr):
    """dst on ``peer`` <- src (local), grid-stride over ``n_elems`` (a multiple of BLOCK)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, n_elems, step):
        offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        iris.store(dst + offs, tl.load(src + offs), rank, peer, heap_bases, hint=16)


@triton.jit
def ping_pong_kernel(flag, heap_bases, rank, peer, base, rounds, err, MAX_SPINS: tl.constexpr):
    """Rank 0 raises the peer's flag and waits for its own; the peer answers. Epochs, no reset."""
    for i in range(rounds):
        e = base + i
        if rank == 0:
            iris.signal(flag, e, rank, peer, heap_bases)
            iris.wait_until(flag, e, rank, err, MAX_SPINS)
        else:
            iris.wait_until(flag, e, rank, err, MAX_SPINS)
            iris.signal(flag, e, rank, peer, heap_bases)


def timed_ms(ctx, fn, iters: int, warmup: int = 3) -> float:
    """Median over ``iters`` of one call's time, barrier first, max over ranks."""
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        ctx.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor([statistics.median(times)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def measure_bandwidth(ctx, mib: int, iters: int, out: dict) -> None:
    heap, rank = ctx.heap, ctx.rank
    peer = (rank + 1) % ctx.world_size
    n = (mib << 20) // 4 // BLOCK * BLOCK
    nbytes = n * 4
    src = heap.empty(n, dtype=torch.int32, name="bw_src")
    dst = heap.empty(n, dtype=torch.int32, name="bw_dst")
    src.copy_(torch.arange(n, device=ctx.device, dtype=torch.int32) + rank)
    ctx.barrier()
    rows = out.setdefault("bandwidth", [])

    def record(op, programs, fn, check):
        try:
            dst.fill_(-1)
            ctx.barrier()
            fn()
            ctx.barrier()
            ok = bool(check())
            ms = timed_ms(ctx, fn, iters)
            rows.append({"op": op, "programs": programs, "MiB": nbytes / 2**20, "ms": ms,
                         "GBps": nbytes / ms / 1e6, "correct": ok})
        except Exception:
            out.setdefault("errors", []).append(f"{op} programs={programs}: "
                                                f"{traceback.format_exc()}")

    peer_src = heap.peer_tensor(src, peer)
    peer_dst = heap.peer_tensor(dst, peer)
    def peer_data_arrived():  # reads and writes both leave the peer's src in our dst
        head = torch.arange(1 << 20, device=ctx.device, dtype=torch.int32) + peer
        return torch.equal(dst[:1 << 20], head)

    for programs in PROGRAM_SWEEP:
        record("triton remote read", programs,
               lambda p=programs: remote_read_kernel[(p,)](src, dst, heap.heap_bases, rank, peer,
                                                          n, BLOCK=BLOCK, num_warps=8),
               peer_data_arrived)
    for programs in PROGRAM_SWEEP:
        record("triton remote write", programs,
               lambda p=programs: remote_write_kernel[(p,)](src, dst, heap.heap_bases, rank,
                                                           peer, n, BLOCK=BLOCK, num_warps=8),
               peer_data_arrived)
    record("copy_ from peer view (read)", 0, lambda: dst.copy_(peer_src), peer_data_arrived)
    record("copy_ into peer view (write)", 0, lambda: peer_dst.copy_(src), peer_data_arrived)
    local = torch.empty_like(src)
    record("local copy_ (reference)", 0, lambda: local.copy_(src), lambda: True)
    ctx.barrier()
    heap.free(src)
    heap.free(dst)


def measure_latency(ctx, iters: int, out: dict) -> None:
    heap, rank = ctx.heap, ctx.rank
    peer = (rank + 1) % ctx.world_size
    flag = heap.zeros(1, dtype=torch.int32, name="ping_pong_flag")
    err = new_error_buffer(ctx.device)
    epoch = Epoch()
    ctx.barrier()

    def run(rounds):
        ping_pong_kernel[(1,)](flag, heap.heap_bases, rank, peer, epoch.next(rounds), rounds, err,
                               MAX_SPINS=200_000_000)

    run(10)  # compile and check once
    ctx.barrier()
    raise_if_wait_timed_out(err, heap)
    ms = timed_ms(ctx, lambda: run(PING_PONG_ROUNDS), iters=max(iters // 2, 3), warmup=1)
    raise_if_wait_timed_out(err, heap)
    out["latency"] = {"rounds_per_kernel": PING_PONG_ROUNDS, "kernel_ms": ms,
                      "round_trip_us": ms * 1e3 / PING_PONG_ROUNDS,
                      "one_way_us_estimate": ms * 1e3 / PING_PONG_ROUNDS / 2}
    heap.free(flag)


def bench_rank(ctx, mib: int, iters: int) -> dict:
    out: dict = {"rank": ctx.rank, "device": torch.cuda.get_device_name(ctx.device),
                 "torch": torch.__version__, "triton": triton.__version__}
    try:
        out["checks"] = {k: list(v) for k, v in run_rma_checks(ctx).items()}
    except Exception:
        out.setdefault("errors", []).append(f"checks: {traceback.format_exc()}")
    ctx.barrier()
    for what, fn in (("bandwidth", lambda: measure_bandwidth(ctx, mib, iters, out)),
                     ("latency", lambda: measure_latency(ctx, iters, out))):
        try:
            fn()
        except Exception:
            out.setdefault("errors", []).append(f"{what}: {traceback.format_exc()}")
        try:
            ctx.barrier()
        except Exception:
            pass
    return out


def report(results: list[dict]) -> dict:
    first = results[0]
    print("\n== RMA checks (all ranks) ==")
    names = list(first.get("checks", {}))
    for name in names:
        fails = [(r["rank"], r.get("checks", {}).get(name, (False, "not run on this rank"))[1])
                 for r in results if not r.get("checks", {}).get(name, [False])[0]]
        print(f"{'PASS' if not fails else 'FAIL'}  {name}" +
              "".join(f"\n      rank {rk}: {d}" for rk, d in fails))
    for r in results:
        for e in r.get("errors", []):
            print(f"\nERROR on rank {r['rank']}: {e}")
    print("\n== NVLink bandwidth, both ranks at once, rank 0's buffer size "
          f"{(first.get('bandwidth') or [{}])[0].get('MiB', 0):.0f} MiB ==")
    print(f"{'op':32s} {'programs':>8s} {'ms':>9s} {'GB/s':>9s} correct")
    for row in first.get("bandwidth", []):
        print(f"{row['op']:32s} {row['programs'] or '-':>8} {row['ms']:9.3f} {row['GBps']:9.1f} "
              f"{row['correct']}")
    lat = first.get("latency")
    if lat:
        print(f"\nflag round trip (ping-pong, {lat['rounds_per_kernel']} rounds in one kernel): "
              f"{lat['round_trip_us']:.2f} us (one way ~{lat['one_way_us_estimate']:.2f} us)")
    n_checks = len(names) * len(results)
    n_pass = sum(bool(r.get("checks", {}).get(k, [False])[0]) for r in results for k in names)
    print(f"\nchecks passed: {n_pass}/{n_checks}; device: {first.get('device')}")
    return {"device": first.get("device"), "world_size": len(results), "torch": first.get("torch"),
            "triton": first.get("triton"), "checks_passed": n_pass, "checks_total": n_checks,
            "ranks": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results"
                                              / "rma_h200x2.json"))
    parser.add_argument("--mib", type=int, default=512, help="buffer size per rank")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 2)))
    args = parser.parse_args()
    heap_bytes = 2 * (args.mib << 20) + (64 << 20)
    results = launch(bench_rank, args.world_size, backend="cuda", heap_bytes=heap_bytes,
                     args=(args.mib, args.iters), timeout_s=1800)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = report(results)
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
