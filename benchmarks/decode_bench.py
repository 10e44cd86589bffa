"""Flash Decode across GPUs: every stage against the BSP baseline, the baseline in a CUDA graph, and the floor.

Run on the 2-GPU machine (both ranks at once)::

    python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/decode_bench.py \\
        --json benchmarks/results/decode_h200x2.json --plot benchmarks/results/decode_h200x2.png

Redraw the plot from a result file, no GPU needed::

    python3 benchmarks/decode_bench.py --from-json benchmarks/results/decode_h200x2.json --plot decode.png

What it measures, bf16, the KV cache split along the sequence (every rank holds `S` keys per batch entry):

- ``local``: our split-KV kernel and the merge of its splits on one GPU, no communication.
- ``allgather``: NCCL all-gather of the packed fp32 (O, LSE) alone.
- ``bsp`` (stage 0): local kernels + NCCL all-gather + our merge kernel; ``bsp_graph``: the same step
  replayed from a CUDA graph (no launch tax).
- ``stage1`` (RMA all-gather + heap barrier), ``stage2`` (per-tile flags), ``stage3`` (one fused kernel);
  ``stage3_graph``: stage 3 replayed from a CUDA graph (it keeps its epochs on the device).
- ``floor``: K+V bytes over the highest rate at which a plain read kernel read a shape's K and V in this
  run (read_rate.py; ``copy_floor_us`` uses a large device copy's rate, read+write, instead) plus one
  cross-GPU flag round trip measured in this run (rma_bench.py's ping-pong: many round trips
  inside one kernel launch, the launch's time divided by their number).

Timing: CUDA events, warm-up first, a host barrier (NCCL barrier + device sync) before each timed step and the
median over steps of the slower rank; plus ``b2b``: many steps back to back with no barrier, the mean per step
(launch and sync overhead is what the fused stages remove); ``loop``: a decode loop whose host waits for every
token (each step followed by a device synchronize, no barrier between steps), the median wall time per step on
the slower rank; and ``host``: the CPU time of the step's call (what a step costs the host before the GPU has
it all). Steps run as an engine's decode loop would: the same FlashDecode, its step bound once to static input
and result tensors (``FlashDecode.bind``), for the baseline as for ours. Every stage is also checked against a
float64 reference over the full KV on a few shapes with fresh random inputs, in the same run. The whole run is
budgeted to finish in under 6 minutes (shapes past the budget are skipped, and said so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

HEADS = [(96, 12, 128), (32, 8, 128)]  # (Hq, Hkv, D)
BATCHES = [1, 8, 32]
LENGTHS = [1 << p for p in range(12, 19)]  # per-rank KV length: 4K .. 256K
STAGES = ("bsp", "stage1", "stage2", "stage3")
VARIANTS = ("local", "allgather", "bsp", "bsp_graph", "stage1", "stage2", "stage3", "stage3_graph")
B2B_VARIANTS = ("bsp", "bsp_graph", "stage2", "stage3", "stage3_graph")
LOOP_VARIANTS = ("bsp", "bsp_graph", "stage3", "stage3_graph")
TARGETS = {"stage3_vs_bsp_b1_short": 1.5, "stage3_vs_bsp_geomean": 1.15, "stage3_vs_floor_long": 1.2}


# ------------------------------------------------------------------------------------------------ timing


def _barrier():
    import torch.distributed as dist

    dist.barrier()
    torch.cuda.synchronize()


def _slowest(x: float) -> float:
    """The largest x over the ranks (so that every rank runs the same number of barriers)."""
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def time_steps(step, iters: int) -> tuple[list[float], list[float]]:
    """Microseconds of each of `iters` steps, each started right after a barrier of all ranks, on the GPU
    (CUDA events) and on the host (the call of `step`)."""
    device, host = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        _barrier()
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) * 1e3)
    return device, host


def time_loop(step, n: int) -> float:
    """Median microseconds per step of a decode loop whose host waits for every token: `n` steps, each
    followed by a device synchronize, no barrier between them (the ranks keep each other in step through the
    data they exchange); wall time on the host, from one synchronize's return to the next."""
    _barrier()
    times, t0 = [], time.perf_counter()
    for _ in range(n):
        step()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e6)
        t0 = t1
    return statistics.median(times)


def time_back_to_back(step, n: int) -> float:
    """Mean microseconds per step over `n` steps launched back to back after one barrier."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _barrier()
    start.record()
    for _ in range(n):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def capture_graph(step):
    """A CUDA graph of one step (warmed up on a side stream, as capture needs); returns a replay function."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


def measure_hbm_bandwidth(nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Bytes per second of a device copy, read + write (what the floor divides K+V bytes by)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times, _ = time_steps(lambda: y.copy_(x), iters)
    del x, y
    return 2 * nbytes / (statistics.median(times) * 1e-6)


def measure_flag_round_trip(ctx) -> float:
    """Microseconds of one cross-GPU flag round trip (iris.signal there, iris.wait_until back): rma_bench's
    ping-pong, many rounds in one kernel launch (its launch cost spread over them). Two ranks only."""
    from rma_bench import measure_latency  # benchmarks/, this script's directory

    if ctx.world_size != 2:
        return float("nan")  # the ping-pong pairs rank r with r + 1
    out: dict = {}
    measure_latency(ctx, 6, out)
    return out["latency"]["round_trip_us"]


# ------------------------------------------------------------------------------------------------ inputs


def _shared_seed(ctx) -> int:
    import torch.distributed as dist

    seed = torch.tensor([int.from_bytes(os.urandom(4), "little") >> 1], device=ctx.device)
    dist.broadcast(seed, 0)
    return int(seed.item())


def make_inputs(seed, rank, B, Hq, Hkv, D, S, device, lens=None):
    """q (the same on every rank), this rank's K/V shard and lengths, from fresh seeds."""
    gq = torch.Generator(device=device).manual_seed(seed)
    gk = torch.Generator(device=device).manual_seed(seed + 1 + rank)
    q = torch.randn(B, Hq, D, generator=gq, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, D, generator=gk, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, generator=gk, device=device, dtype=torch.bfloat16)
    if lens is None:
        lens = torch.full((B,), S, dtype=torch.int32, device=device)
    return q, k, v, lens.to(device=device, dtype=torch.int32)


def reference(q, shards, lens_by_rank, scale):
    """float64 (O, LSE) over the full KV (every rank's valid keys, in rank order), on the GPU."""
    B, Hq, D = q.shape
    Hkv = shards[0][0].shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=q.device)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(B):
        keys = torch.cat([k[b, :int(lens[b])] for (k, _), lens in zip(shards, lens_by_rank)]).double()
        if keys.shape[0] == 0:
            continue
        vals = torch.cat([v[b, :int(lens[b])] for (_, v), lens in zip(shards, lens_by_rank)]).double()
        qb = q[b].double().view(Hkv, Hq // Hkv, D)
        s = torch.einsum("kgd,lkd->kgl", qb, keys) * scale
        lse[b] = torch.logsumexp(s, -1).reshape(Hq)
        out[b] = torch.einsum("kgl,lkd->kgd", torch.softmax(s, -1), vals).reshape(Hq, D)
    return out, lse


# ------------------------------------------------------------------------------------------------ rank side


def _outputs(q):
    """A step's result tensors, made once and passed to every step (out=)."""
    B, Hq, _ = q.shape
    return torch.empty_like(q), torch.empty(B, Hq, dtype=torch.float32, device=q.device)


def _make(ctx, stage, B, Hq, Hkv, D, **kw):
    from bspfuse.kernels.flash_decode import FlashDecode

    return FlashDecode(ctx.heap, ctx.world_size, ctx.rank, B, Hq, Hkv, D, torch.bfloat16,
                       stage=STAGES.index(stage), **kw)


def check_correctness(ctx, B, Hq, Hkv, D, S, ragged: bool) -> dict:
    """Every stage (and both graphs) against the float64 reference, fresh inputs, two steps each."""
    seed = _shared_seed(ctx)
    W = ctx.world_size
    g = torch.Generator().manual_seed(seed)
    lens_by_rank = [torch.randint(1, S + 1, (B,), generator=g) if ragged else torch.full((B,), S) for _ in range(W)]
    if ragged:
        lens_by_rank[W - 1][0] = 0  # an empty shard
    shards = [make_inputs(seed, r, B, Hq, Hkv, D, S, ctx.device)[1:3] for r in range(W)]
    q, k, v, lens = make_inputs(seed, ctx.rank, B, Hq, Hkv, D, S, ctx.device, lens_by_rank[ctx.rank])
    errors = {}
    for name in ("bsp", "bsp_graph", "stage1", "stage2", "stage3", "stage3_graph"):
        fd = _make(ctx, name.replace("_graph", ""), B, Hq, Hkv, D)
        q_in = q.clone()
        result_buffers = _outputs(q)
        step = fd.bind(q_in, k, v, kv_lens=lens, out=result_buffers)
        if name.endswith("_graph"):
            replay, result = capture_graph(step)
            step = lambda: (replay(), result)[1]  # noqa: E731
        worst_o = worst_l = 0.0
        for i in range(2):
            q_in.copy_(torch.randn(q.shape, generator=torch.Generator(device=ctx.device).manual_seed(seed + 99 + i),
                                   device=ctx.device, dtype=q.dtype))
            out, out_lse = step()
            ro, rl = reference(q_in, shards, lens_by_rank, fd.scale)
            worst_o = max(worst_o, ((out.double() - ro).norm() / ro.norm()).item())
            finite = torch.isfinite(rl)
            worst_l = max(worst_l, (out_lse.double() - rl)[finite].abs().max().item())
        errors[name] = {"rel_err_o": worst_o, "max_err_lse": worst_l, "ok": worst_o < 2e-2 and worst_l < 1e-3}
        torch.cuda.synchronize()
        fd.close()
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "ragged": ragged, "seed": seed, "errors": errors}


def bench_shape(ctx, B, Hq, Hkv, D, S, budget_s: float) -> dict:
    """Every variant at one shape on this rank: per-step times (lists) and back-to-back means."""
    import torch.distributed as dist

    from bspfuse.kernels.flash_decode import decode_partial
    from read_rate import read_kv  # benchmarks/, this script's directory

    q, k, v, lens = make_inputs(_shared_seed(ctx), ctx.rank, B, Hq, Hkv, D, S, ctx.device)
    out = _outputs(q)
    steps, host, b2b, loop, splits = {}, {}, {}, {}, None
    fds = []

    def run(name, step):
        for _ in range(3):  # warm-up (and compile)
            step()
        t0 = time.perf_counter()
        first, first_host = time_steps(step, 3)
        per = _slowest(max(statistics.median(first) * 1e-6, (time.perf_counter() - t0) / 3))  # same counts on all
        iters = int(min(100, max(10, budget_s / per)))
        more, more_host = time_steps(step, iters)
        steps[name] = first + more
        host[name] = statistics.median(first_host + more_host)
        if name in B2B_VARIANTS:
            b2b[name] = time_back_to_back(step, int(min(200, max(10, 0.4 * budget_s / per))))
        if name in LOOP_VARIANTS:
            loop[name] = time_loop(step, int(min(100, max(10, 0.3 * budget_s / per))))

    for stage in STAGES:
        fd = _make(ctx, stage, B, Hq, Hkv, D)
        fds.append(fd)
        step = fd.bind(q, k, v, kv_lens=lens, out=out)
        run(stage, step)
        splits = fd.num_splits
        if stage in ("bsp", "stage3"):
            replay, _ = capture_graph(step)
            run(f"{stage}_graph", replay)
    timeline = None
    if B == 1:  # where a fused step's time goes on this rank (FlashDecode(timeline=True)), the 5th of 5 steps
        fd = _make(ctx, "stage3", B, Hq, Hkv, D, num_splits=splits, timeline=True)
        step = fd.bind(q, k, v, kv_lens=lens, out=out)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        timeline = fd.timeline()
        fd.close()
    run("local", lambda: decode_partial(q, k, v, kv_lens=lens, num_splits=splits))
    reads = []  # the floor's rate: this rank's K and V read once by a plain read kernel, a few grids
    for n in sorted({splits, 2 * splits, 4 * splits}):
        read = read_kv(k, v, n)
        read()  # compiles
        reads.append(time_back_to_back(read, 50))
    packed = torch.zeros(fds[0].slot, dtype=torch.float32, device=ctx.device)
    gathered = torch.empty(ctx.world_size * fds[0].slot, dtype=torch.float32, device=ctx.device)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    run("allgather", lambda: all_gather(gathered, packed))
    torch.cuda.synchronize()
    for fd in reversed(fds):
        fd.close()
    del q, k, v
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "splits": splits, "steps_us": steps, "host_us": host,
            "b2b_us": b2b, "loop_us": loop, "read_us": min(reads), "timeline": timeline}


def run_rank(ctx, opts: dict) -> dict:
    import torch.distributed as dist

    started = time.perf_counter()
    props = torch.cuda.get_device_properties(ctx.device)
    meta = {"device": props.name, "sms": props.multi_processor_count, "world_size": ctx.world_size,
            "torch": torch.__version__, "triton": __import__("triton").__version__}
    meta["hbm_bytes_per_s"] = measure_hbm_bandwidth()
    meta["flag_round_trip_us"] = measure_flag_round_trip(ctx)
    checks = [check_correctness(ctx, *shape) for shape in opts["checks"]]
    shapes, skipped = [], []
    free = torch.tensor([torch.cuda.mem_get_info(ctx.device)[0]], device=ctx.device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    limit = min(opts["max_kv_gib"] * (1 << 30), 0.6 * free.item())
    for Hq, Hkv, D in opts["heads"]:
        for B in opts["batches"]:
            for S in opts["lengths"]:
                kv_bytes = 2 * B * S * Hkv * D * 2
                elapsed = _slowest(time.perf_counter() - started)  # every rank skips the same shapes
                shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S}
                if kv_bytes > limit:
                    skipped.append(dict(shape, why=f"K+V {kv_bytes / 2**30:.1f} GiB per rank is over the limit"))
                elif elapsed > opts["time_budget_s"]:
                    skipped.append(dict(shape, why=f"time budget of {opts['time_budget_s']} s spent"))
                else:
                    shapes.append(bench_shape(ctx, B, Hq, Hkv, D, S, opts["budget_per_variant_s"]))
                torch.cuda.empty_cache()
    return {"meta": meta, "checks": checks, "shapes": shapes, "skipped": skipped,
            "elapsed_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ report


def combine(per_rank: list[dict]) -> dict:
    """One result from every rank's: per step the slower rank, then the median; floors and ratios."""
    first = per_rank[0]
    meta = dict(first["meta"])
    meta["hbm_bytes_per_s"] = min(r["meta"]["hbm_bytes_per_s"] for r in per_rank)
    meta["flag_round_trip_us"] = max(r["meta"]["flag_round_trip_us"] for r in per_rank[:2])
    kv_bytes_of = lambda s: 2 * s["B"] * s["S"] * s["Hkv"] * s["D"] * 2  # noqa: E731
    meta["read_bytes_per_s"] = max((kv_bytes_of(s) / (s["read_us"] * 1e-6) for r in per_rank for s in r["shapes"]),
                                   default=float("nan"))
    rows = []
    for i, shape in enumerate(first["shapes"]):
        row = {k: shape[k] for k in ("B", "Hq", "Hkv", "D", "S", "splits")}
        kv_bytes = kv_bytes_of(shape)
        row["kv_bytes_per_rank"] = kv_bytes
        row["floor_us"] = kv_bytes / meta["read_bytes_per_s"] * 1e6 + meta["flag_round_trip_us"]
        row["copy_floor_us"] = kv_bytes / meta["hbm_bytes_per_s"] * 1e6 + meta["flag_round_trip_us"]
        row["us"], row["b2b_us"], row["host_us"], row["loop_us"] = {}, {}, {}, {}
        for name in shape["steps_us"]:
            slowest = [max(vals) for vals in zip(*(r["shapes"][i]["steps_us"][name] for r in per_rank))]
            row["us"][name] = statistics.median(slowest)
        for name in shape.get("host_us", {}):
            row["host_us"][name] = max(r["shapes"][i]["host_us"][name] for r in per_rank)
        for name in shape["b2b_us"]:
            row["b2b_us"][name] = max(r["shapes"][i]["b2b_us"][name] for r in per_rank)
        for name in shape.get("loop_us", {}):
            row["loop_us"][name] = max(r["shapes"][i]["loop_us"][name] for r in per_rank)
        if shape.get("timeline"):
            row["timeline_by_rank"] = [r["shapes"][i]["timeline"] for r in per_rank]
        bsp = row["us"]["bsp"]
        row["speedup_vs_bsp"] = {n: bsp / row["us"][n] for n in ("bsp_graph", "stage1", "stage2", "stage3",
                                                                   "stage3_graph")}
        row["stage3_vs_floor"] = row["us"]["stage3"] / row["floor_us"]
        rows.append(row)
    checks = []
    for i, check in enumerate(first["checks"]):
        merged = dict(check)
        merged["errors"] = {n: {"rel_err_o": max(r["checks"][i]["errors"][n]["rel_err_o"] for r in per_rank),
                                "max_err_lse": max(r["checks"][i]["errors"][n]["max_err_lse"] for r in per_rank),
                                "ok": all(r["checks"][i]["errors"][n]["ok"] for r in per_rank)}
                            for n in check["errors"]}
        checks.append(merged)
    return {"meta": meta, "checks": checks, "rows": rows, "skipped": first["skipped"],
            "summary": summarize(rows), "elapsed_s": max(r["elapsed_s"] for r in per_rank)}


def _geomean(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def _target_values(rows, bsp_us, stage3_us) -> dict:
    """The three target figures from one timing of BSP and stage 3 (us per step, by row)."""
    speedup = [bsp_us(r) / stage3_us(r) for r in rows]
    short = [x for x, r in zip(speedup, rows) if r["B"] == 1 and r["S"] <= 16384]
    long = [stage3_us(r) / r["floor_us"] for r in rows if r["S"] >= 131072]
    return {"stage3_vs_bsp_b1_short": min(short) if short else float("nan"),
            "stage3_vs_bsp_geomean": _geomean(speedup),
            "stage3_vs_floor_long": max(long) if long else float("nan")}


def _met(values: dict) -> dict:
    return {k: {"target": v, "value": values[k], "met": (values[k] <= v) if k.endswith("floor_long") else
                (values[k] >= v)} for k, v in TARGETS.items()}


def summarize(rows) -> dict:
    """The targets in three timings: per step with a barrier before each (its launch time and the ranks' skew
    after the barrier count), back to back (a decode loop whose host runs ahead, as an engine's does: device
    time per step), and a decode loop whose host waits for every token with no barrier between steps (launch
    and wake-up count; the ranks' skew is what the loop itself leaves). The floor is a device-time floor."""
    out = _target_values(rows, lambda r: r["us"]["bsp"], lambda r: r["us"]["stage3"])
    for name in ("bsp_graph", "stage1", "stage2", "stage3_graph"):
        out[f"{name}_vs_bsp_geomean"] = _geomean([r["speedup_vs_bsp"][name] for r in rows])
    out["targets"] = _met(out)
    for timing, key in (("b2b_us", "back_to_back"), ("loop_us", "loop")):
        if all("bsp" in r.get(timing, {}) and "stage3" in r.get(timing, {}) for r in rows):
            out[key] = _target_values(rows, lambda r: r[timing]["bsp"], lambda r: r[timing]["stage3"])
            out[f"targets_{key}"] = _met(out[key])
    return out


def print_report(result: dict) -> None:
    meta = result["meta"]
    print(f"\n{meta['device']} x{meta['world_size']}, torch {meta['torch']}, triton {meta['triton']}: "
          f"HBM {meta['hbm_bytes_per_s'] / 1e12:.2f} TB/s (copy, read+write), "
          f"flag round trip {meta['flag_round_trip_us']:.2f} us, run {result['elapsed_s']:.0f} s")
    for c in result["checks"]:
        errs = ", ".join(f"{n} {e['rel_err_o']:.1e}/{e['max_err_lse']:.1e}{'' if e['ok'] else ' FAIL'}"
                         for n, e in c["errors"].items())
        print(f"check B={c['B']} {c['Hq']}/{c['Hkv']}/{c['D']} S={c['S']}{' ragged' if c['ragged'] else ''}: "
              f"rel err O / max err LSE: {errs}")
    for s in result["skipped"]:
        print(f"skipped B={s['B']} {s['Hq']}/{s['Hkv']} S={s['S']}: {s['why']}")
    cols = ("floor", "local", "allgather", "bsp", "bsp_graph", "stage1", "stage2", "stage3", "stage3_graph")
    head = f"{'heads':>9} {'B':>3} {'S/rank':>7} {'split':>5} " + " ".join(f"{c[:10]:>10}" for c in cols)
    print("\nmicroseconds per step (median of the slower rank; barrier before each step; host: the step's call)")
    print(head + f" {'bsp/s3':>7} {'s3/floor':>8} {'b2b bsp':>8} {'b2b s3':>7} {'b2b s3g':>8} {'loop bsp':>8} "
                 f"{'loop s3':>7} {'loop s3g':>8} {'host bsp':>8} {'host s3':>7}")
    nan = float("nan")
    for r in result["rows"]:
        vals = [r["floor_us"]] + [r["us"].get(c, nan) for c in cols[1:]]
        host = r.get("host_us", {})  # results from before host times were taken have none
        print(f"{r['Hq']:>4}/{r['Hkv']:<4} {r['B']:>3} {r['S'] // 1024:>6}K {r['splits']:>5} "
              + " ".join(f"{x:>10.1f}" for x in vals)
              + f" {r['speedup_vs_bsp']['stage3']:>7.2f} {r['stage3_vs_floor']:>8.2f}"
              + f" {r['b2b_us'].get('bsp', nan):>8.1f} {r['b2b_us'].get('stage3', nan):>7.1f}"
              + f" {r['b2b_us'].get('stage3_graph', nan):>8.1f}"
              + "".join(f" {r.get('loop_us', {}).get(n, nan):>{w}.1f}" for n, w in (("bsp", 8), ("stage3", 7),
                                                                                     ("stage3_graph", 8)))
              + f" {host.get('bsp', nan):>8.1f} {host.get('stage3', nan):>7.1f}")
    timelines = [r for r in result["rows"] if r.get("timeline_by_rank")]
    if timelines:
        print("\nstage 3's timeline at batch 1, per rank (us after its first program started, the last program "
              "of each phase; rank clocks are not compared)")
        for r in timelines:
            for rank, t in enumerate(r["timeline_by_rank"]):
                print(f"{r['Hq']:>4}/{r['Hkv']:<4} {r['S'] // 1024:>6}K rank {rank}: " + ", ".join(
                    f"{p} {v['max']:.1f}" for p, v in t.items() if isinstance(v, dict)))
    summary = summarize(result["rows"])
    for title, key in (("per step", "targets"), ("back to back", "targets_back_to_back"),
                       ("decode loop", "targets_loop")):
        if key in summary:
            print(f"\ntargets, {title}: " + "; ".join(
                f"{k} {t['value']:.2f} ({'<=' if k.endswith('floor_long') else '>='} {t['target']}: "
                f"{'met' if t['met'] else 'NOT met'})" for k, t in summary[key].items()))


def plot(result: dict, png: str) -> None:
    """Speedup over the BSP baseline against per-rank KV length, one panel per (heads, batch), a line per stage
    (per step, a barrier before each), and stage 3 in the other two timings (the baseline in the same timing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    heads = sorted({(r["Hq"], r["Hkv"], r["D"]) for r in rows}, reverse=True)
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(len(heads), len(batches), figsize=(4 * len(batches), 3.2 * len(heads)), squeeze=False,
                             sharey=True)
    for i, h in enumerate(heads):
        for j, B in enumerate(batches):
            ax = axes[i][j]
            sel = sorted((r for r in rows if (r["Hq"], r["Hkv"], r["D"]) == h and r["B"] == B), key=lambda r: r["S"])
            for name in ("bsp_graph", "stage1", "stage2", "stage3", "stage3_graph"):
                ax.plot([r["S"] for r in sel], [r["speedup_vs_bsp"][name] for r in sel], marker="o", label=name)
            for timing, label in (("loop_us", "stage3, decode loop"), ("b2b_us", "stage3, back to back")):
                if all("stage3" in r.get(timing, {}) for r in sel):
                    ax.plot([r["S"] for r in sel], [r[timing]["bsp"] / r[timing]["stage3"] for r in sel],
                            linestyle=":", marker="x", label=label)
            ax.plot([r["S"] for r in sel], [r["us"]["bsp"] / r["floor_us"] for r in sel], "k--", label="floor")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"Hq/Hkv/D {h[0]}/{h[1]}/{h[2]}, batch {B}", fontsize=9)
            ax.set_xlabel("KV length per rank")
            if j == 0:
                ax.set_ylabel("speedup over BSP")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Flash Decode, {result['meta']['device']} x{result['meta']['world_size']}, bf16")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write every number here")
    p.add_argument("--plot", help="draw speedup vs KV length per stage into this PNG")
    p.add_argument("--from-json", help="no run: read this result file (then --plot draws it)")
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="per-rank KV lengths")
    p.add_argument("--heads", default=",".join(f"{a}/{b}/{c}" for a, b, c in HEADS), help="Hq/Hkv/D,...")
    p.add_argument("--max-kv-gib", type=float, default=32.0, help="skip shapes whose K+V per rank is larger")
    p.add_argument("--time-budget-s", type=float, default=270.0, help="skip the shapes left after this long")
    p.add_argument("--budget-per-variant-s", type=float, default=0.2, help="timed steps per variant, in seconds")
    args = p.parse_args(argv)

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print_report(result)
        if args.plot:
            plot(result, args.plot)
        return

    from bspfuse.runtime import launch

    heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    checks = [(1, heads[0][0], heads[0][1], heads[0][2], 4096, False),
              (8, heads[-1][0], heads[-1][1], heads[-1][2], 16384, True),
              (32, heads[0][0], heads[0][1], heads[0][2], 4096, True)]
    opts = {"heads": heads, "batches": args.batches, "lengths": args.lengths, "checks": checks,
            "max_kv_gib": args.max_kv_gib, "time_budget_s": args.time_budget_s,
            "budget_per_variant_s": args.budget_per_variant_s}
    world = int(os.environ.get("WORLD_SIZE", "2"))
    per_rank = launch(run_rank, world, backend="cuda", heap_bytes=256 << 20, args=(opts,), timeout_s=600)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    result = combine(per_rank)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print_report(result)


if __name__ == "__main__":
    main()
