"""A Llama-3-70B-sized decoder layer under TP + SP (DTensor), forward latency, side by side in one process group.

    python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/block_bench.py --json OUT/block_h200x2.json

Variants, all on the same parallelized module (examples/llama_block.py, torchtitan's plan), batch 1, bf16:
eager TP (DTensor), torch.compile with Inductor (also under CUDA graphs), Inductor with PyTorch's async TP (`_micro_pipeline_tp`,
symmetric memory enabled for the group), and torch.compile(backend="bspfuse") (auto: the cost model
decides per site; also with `cudagraphs`, Inductor replaying the forward from a CUDA graph; push: every site
fused with push; copy_engine). Each compiled variant's output is checked against eager
on fresh random inputs in the same run; every bspfuse decision is printed. Both ranks time at once (CUDA
events): each forward after a barrier (the slower rank's median), and forwards back to back (device time per
forward with the host running ahead, as layers follow each other in a model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "examples")]

from gemm_bench import bench, bench_back_to_back, calls_in, rel_err  # noqa: E402
from gpu_timing import ClockSampler, energy_per_call  # noqa: E402

SEQS = (4096, 8192, 2048)  # the targets first, should the time budget run out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--seqs", type=int, nargs="*", default=list(SEQS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup-s", type=float, default=1.0,
                        help="seconds of forwards before the back-to-back timing and the profile: the GPU then runs "
                             "at the clock its power limit allows under sustained load (steady state)")
    parser.add_argument("--energy-s", type=float, default=1.0,
                        help="seconds of forwards back to back between two reads of NVML's energy counter: joules "
                             "per forward (0: off)")
    parser.add_argument("--time-budget-s", type=float, default=480.0)
    parser.add_argument("--profile-seq", type=int, default=8192,
                        help="profile every variant at this length: device time per kernel class (0: off)")
    parser.add_argument("--variants", default="", help="only these variants, comma-separated (default: all)")
    parser.add_argument("--profile-host", action="store_true",
                        help="at --profile-seq, every rank's host: its slowest ops and CUDA runtime calls per step")
    parser.add_argument("--group-m", type=int, default=0,
                        help="our kernels' GROUP_M instead of the rule's (bspfuse.tile.group_rows): an A/B of the rule")
    args = parser.parse_args()

    import torch._dynamo
    import torch.distributed._symmetric_memory as symm_mem
    from torch.distributed.device_mesh import init_device_mesh

    import bspfuse.backend
    import bspfuse.tile
    from llama_block import LlamaBlock, LlamaConfig, parallelize

    if args.group_m:
        bspfuse.tile.group_rows = lambda *_: args.group_m
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    W = dist.get_world_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    mesh = init_device_mesh("cuda", (W,))
    group = dist.group.WORLD.group_name
    torch._dynamo.config.automatic_dynamic_shapes = False  # each sequence length compiles its own static graph
    torch._dynamo.config.cache_size_limit = 64
    symm_mem.enable_symm_mem_for_group(group)

    cfg = LlamaConfig(max_seq=max(args.seqs))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = parallelize(LlamaBlock(cfg).to(torch.bfloat16), mesh)
    say(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, world {W}, "
        f"hidden {cfg.hidden}, heads {cfg.heads}/{cfg.kv_heads}, ffn {cfg.ffn}")

    def compiled(backend, **kw):
        torch._dynamo.reset()
        return torch.compile(model, backend=backend, **kw)

    variants = {
        "eager TP": lambda: model,
        "inductor": lambda: compiled("inductor"),
        "inductor, CUDA graphs": lambda: compiled("inductor", mode="reduce-overhead"),
        "inductor + async TP": lambda: compiled("inductor", options={"_micro_pipeline_tp": True}),
        "bspfuse auto": lambda: compiled("bspfuse"),
        "bspfuse auto, CUDA graphs": lambda: compiled("bspfuse", options={"cudagraphs": True}),
        "bspfuse push": lambda: compiled("bspfuse", options={"mode": "push"}),
        "bspfuse copy_engine": lambda: compiled("bspfuse", options={"mode": "copy_engine"}),
    }
    if args.variants:
        variants = {k: variants[k] for k in _names(args.variants, variants)}
    rows, start = [], time.time()
    for seq in args.seqs:
        gen = torch.Generator(device="cuda").manual_seed(1000 + seq * W + rank)
        x = torch.randn(1, seq // W, cfg.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        with torch.no_grad():
            ref = model(x)
        for name, make in variants.items():
            if time.time() - start > args.time_budget_s:
                say(f"time budget spent: skipping {name} at seq {seq}")
                continue
            try:
                bspfuse.backend.reset()
                t0 = time.time()
                fn = make()
                with torch.no_grad():
                    out = fn(x)  # compiles
                    torch.cuda.synchronize()
                    compile_s = time.time() - t0
                    err = rel_err(out, ref)
                    ms = bench(lambda: fn(x), iters=args.iters)
                    with ClockSampler() as clock:
                        ms_b2b = bench_back_to_back(lambda: fn(x), calls=2 * args.iters, warmup_s=args.warmup_s)
                    energy = (energy_per_call(lambda: fn(x), calls=calls_in(args.energy_s, ms_b2b / 1e3))
                              if args.energy_s > 0 else None)
                fused = [str(r) for r in bspfuse.backend.reports()] if name.startswith("bspfuse") else []
                kernels = (_profile(lambda: fn(x), warm=calls_in(args.warmup_s, ms_b2b / 1e3))
                           if seq == args.profile_seq else None)
                if args.profile_host and seq == args.profile_seq:
                    _profile_host(lambda: fn(x), name, rank, W)
                if kernels:
                    kernels["timeline by rank"] = [None] * W
                    dist.all_gather_object(kernels["timeline by rank"], kernels.pop("timeline"))
                if kernels and "bspfuse sites" in kernels:  # every rank's: a rank that waits for its peer shows it
                    per_rank = [None] * W
                    dist.all_gather_object(per_rank, kernels["bspfuse sites"])
                    kernels["bspfuse sites by rank"] = per_rank
                clocks, energies = [None] * W, [None] * W
                dist.all_gather_object(clocks, str(clock))
                dist.all_gather_object(energies, energy)
                rows.append(dict(seq=seq, variant=name, ms=ms, ms_b2b=ms_b2b, b2b_clock_by_rank=clocks,
                                 energy_by_rank=energies, rel_err=err, compile_s=round(compile_s, 1),
                                 bspfuse=fused, kernels_ms=kernels))
                say(f"seq {seq:5d}  {name:20s} {ms:8.3f} ms  back to back {ms_b2b:8.3f} ms  rel err {err:.2e}  "
                    f"(compile {compile_s:.0f} s)  back to back at " + " / ".join(clocks)
                    + ("; J per forward " + " / ".join(f"{e['j_per_call']:.3f} at {e['mean_w']:.0f} W" for e in energies)
                       if all(energies) else ""))
                if kernels:
                    say("    device ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in kernels.items()
                                                           if not k.startswith(("bspfuse sites", "timeline"))))
                    for r, line in enumerate(kernels["timeline by rank"]):
                        say(f"    main stream, rank {r}: {line}")
                    for r, per_site in enumerate(kernels.get("bspfuse sites by rank", [])):
                        say(f"    fused kernels, rank {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_site.items()))
                for line in fused:
                    say("    " + line.replace("\n", "\n    "))
            except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others' numbers
                rows.append(dict(seq=seq, variant=name, error=f"{type(e).__name__}: {e}"))
                say(f"seq {seq:5d}  {name:20s} FAILED: {type(e).__name__}: {str(e)[:400]}")
                if rank == 0:
                    traceback.print_exc()
            if args.json and rank == 0:
                _write(args.json, rows)
    torch._dynamo.reset()

    for key, what in (("ms", "each forward after a barrier"), ("ms_b2b", "forwards back to back")):
        ours = [v for v in variants if v.startswith("bspfuse")]
        say(f"\n{what}\nseq    " + "".join(f"{v:>21s}" for v in variants) + "   best baseline over: " + ", ".join(ours))
        for seq in args.seqs:
            got = {r["variant"]: r.get(key) for r in rows if r["seq"] == seq}
            base = [got.get(v) for v in variants if not v.startswith("bspfuse") and got.get(v)]
            ratios = [f"{min(base) / got[v]:.3f}x" if base and got.get(v) else "-" for v in ours]
            say(f"{seq:<7d}" + "".join(f"{got[v]:21.3f}" if got.get(v) else f"{'-':>21s}" for v in variants)
                + "   " + ", ".join(ratios))
    say("\njoules per forward, back to back (mean of the ranks)\nseq    " + "".join(f"{v:>21s}" for v in variants))
    for seq in args.seqs:
        got = {r["variant"]: r.get("energy_by_rank") for r in rows if r["seq"] == seq}
        joules = {v: sum(e["j_per_call"] for e in got[v]) / W for v in variants if got.get(v) and all(got[v])}
        say(f"{seq:<7d}" + "".join(f"{joules[v]:21.3f}" if v in joules else f"{'-':>21s}" for v in variants))
    dist.destroy_process_group()


def _names(listed: str, known) -> list[str]:
    """The variants a comma-separated list names (a name may hold a comma: "inductor, CUDA graphs")."""
    parts, names, i = listed.split(","), [], 0
    while i < len(parts):
        j = next((j for j in range(len(parts), i, -1) if ",".join(parts[i:j]).strip() in known), None)
        if j is None:
            raise SystemExit(f"--variants: unknown variant {parts[i].strip()!r}; known: {'; '.join(known)}")
        names.append(",".join(parts[i:j]).strip())
        i = j
    return names


KERNEL_CLASSES = (  # first match wins: (class, substrings of the kernel name, lower case)
    ("nccl", ("nccl",)),
    ("bspfuse fused", ("bspfuse_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm (cuBLAS)", ("gemm", "nvjet", "cutlass", "sm90_xmma", "wgmma")),
    ("copy", ("memcpy", "copy", "cat")),
)


def _profile(step, steps: int = 3, warm: int = 0) -> dict:
    """Device time per step by kernel class (cuBLAS GEMMs, attention, NCCL, our fused kernels, copies, the
    rest: Inductor's pointwise/norm kernels), over `steps` steps that follow `warm` unprofiled ones back to
    back (the steady state). Kernels of one step overlap only where streams do, so the classes' sum can
    exceed the step."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warm):
            step()
    torch.cuda.synchronize()  # the profile holds whole steps; a moment's idle does not undo the warm clock
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    sites: dict[str, float] = {}  # each fused site's kernel (its name carries the site's number)
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not us or e.key.startswith("cuda") or "Memset" in e.key:
            continue
        name = e.key.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in name for k in keys)), "other (pointwise, norms)")
        out[cls] = out.get(cls, 0.0) + us / 1000 / steps
        if cls == "bspfuse fused":
            sites[e.key] = round(us / 1000 / steps, 4)
    result = {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
    if sites:
        result["bspfuse sites"] = dict(sorted(sites.items()))
    result["timeline"] = _idle(prof, steps)
    return result


def _idle(prof, steps: int) -> dict:
    """Where the main stream (the one with the most kernel time) sits idle in the profiled steps: the span
    from its first kernel to its last, the idle time in it per step, and the longest gaps with the kernels
    around them (a gap is host latency, a wait on another stream, or a peer's lateness outside our kernels)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name)).get("traceEvents", [])
    kernels: dict = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            kernels.setdefault(e.get("tid"), []).append((float(e["ts"]), float(e["dur"]), e.get("name", "?")))
    if not kernels:
        return {}
    stream = max(kernels.values(), key=lambda ks: sum(k[1] for k in ks))
    stream.sort()
    gaps = [(nxt[0] - (cur[0] + cur[1]), cur[2][:40], nxt[2][:40]) for cur, nxt in zip(stream, stream[1:])]
    span = stream[-1][0] + stream[-1][1] - stream[0][0]
    idle = sum(g for g, _, _ in gaps if g > 0)
    last = [k for k in stream if k[0] >= stream[0][0] + (steps - 1) * span / steps]  # about the last step
    return {"span_ms_per_step": round(span / 1000 / steps, 3), "idle_ms_per_step": round(idle / 1000 / steps, 3),
            "longest_gaps_us": [(round(g, 1), a, b) for g, a, b in sorted(gaps, reverse=True)[:6]],
            "last_step_kernels_over_20us": [(name[:48], round(dur, 1)) for _, dur, name in last if dur > 20]}


def _profile_host(step, name: str, rank: int, world: int, steps: int = 3) -> None:
    """Where each rank's host spends a forward step (CPU ops by self time, CUDA runtime calls such as
    synchronizations and allocations; the synchronize that closes the profiled steps is among them), and
    how long enqueueing a step takes on the host: a rank whose host falls
    behind leaves its GPU idle and makes its peers wait inside their fused kernels."""
    from torch.profiler import ProfilerActivity, profile

    enqueue = []  # without the profiler: the host's time to enqueue a forward on an idle GPU
    for _ in range(5):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            step()
        enqueue.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        host_ms = (time.perf_counter() - t0) * 1e3 / steps
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    lines = [f"rank {rank}, {name}: host {host_ms:.2f} ms per step (enqueue) under the profiler, "
             f"{sorted(enqueue)[2]:.2f} ms without it; top CPU self time per step:"]
    lines += [f"    {e.self_cpu_time_total / 1000 / steps:8.3f} ms  x{e.count // steps:<4d} {e.key[:80]}" for e in rows]
    gathered = [None] * world
    dist.all_gather_object(gathered, "\n".join(lines))
    if rank == 0:
        print("\n".join(gathered), flush=True)
        print(f"rank 0, {name}: the first step's lead-in, host ops (>= 15 us), launches and kernels until the first "
              "kernel of 200 us or more (us from the step's first host op)\n" + _lead_in(prof), flush=True)


def _lead_in(prof) -> str:
    """The host's path from a step's start to its first large kernel: each CPU op of 15 us or more, every
    kernel launch and every kernel, in time order. A per-forward timing pays all of it; back to back hides it."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name)).get("traceEvents", [])
    keep = [e for e in events if "ts" in e and "dur" in e and (
        e.get("cat") == "kernel" or (e.get("cat") == "cuda_runtime" and "aunch" in e.get("name", ""))
        or (e.get("cat") == "cpu_op" and float(e["dur"]) >= 15))]
    keep.sort(key=lambda e: float(e["ts"]))
    host = [e for e in keep if e.get("cat") != "kernel"]
    if not host:
        return "    (no host events)"
    t0, lines = float(host[0]["ts"]), []
    for e in keep:
        lines.append(f"    +{float(e['ts']) - t0:8.1f} {float(e['dur']):8.1f}  {e['cat'][:8]:8s} {e['name'][:70]}")
        if e.get("cat") == "kernel" and float(e["dur"]) >= 200:
            break
    return "\n".join(lines[:80])


def _write(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "world_size": dist.get_world_size(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
