"""The Flash Decode kernels on one GPU, as a world of one: where a step's device time goes at batch 1.

    python3 -m torch.distributed.run --nproc_per_node=1 benchmarks/decode_core_bench.py \\
        --json benchmarks/results/decode_core_h100.json

A decode step at short context was far above its floor (K+V bytes at HBM speed) even back to back
(decode_bench.py, BENCHMARKS.md). This times, back to back on one GPU with no peer, the pieces of a step and
variants of their tuning, so the gap can be split into its parts:

- ``split``: decode_split_kernel alone (every split's state to HBM);
- ``merge``: merge_states_kernel over the split kernel's states, CHUNK (1-16) states a load;
- ``fused``: FlashDecode stage 3 at world size 1 (one launch: splits, the last split's merge, the push of
  the tile to its own gather slot with a flag, the merge program), called back to back with the same
  tensors; ``fused ... graph``: its default form's steps replayed from a CUDA graph, as an engine runs them;
- ``read``: a plain kernel that reads the same K and V bytes once, with as many programs as the split
  kernel (what streaming alone costs with this grid);

for each (heads, KV length) at batch 1, with the default tuning (``choose_num_splits``, FlashDecode's pipeline
depth and wait backoff) and variants (splits halved or doubled, FUSED_VARIANTS), and the timeline of a fused
step (when its programs reached each phase, FlashDecode(timeline=True)). Every fused variant's result is
checked against decode_partial's in the same run. The floor is K+V bytes at the highest rate the read kernel
reached in the run, over its shapes and 1 GiB of K and V (a read, not a copy: a copy also writes, and a step
ran below the copy-rate floor);
copy_floor_us keeps K+V bytes over the copy rate. A world of one has no peer: no flag round trip is added.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from read_rate import best_read_rate, read_kv  # noqa: E402  (benchmarks/, the script's own folder)

HEADS = [(96, 12, 128), (32, 8, 128)]
LENGTHS = [4096, 16384, 65536, 131072]
# FlashDecode's own choices first, then variants (its keyword arguments); other split counts run the first two
# the default, then a shallower pipeline, twice the warps, and half the keys a loop step (fewer bytes in flight
# each, more of them)
FUSED_VARIANTS = [{}, {"num_stages": 3}, {"num_warps": 8}, {"block_n": 32}]


def us_per_call(fn, calls: int = 200) -> float:
    """Device time per call, back to back (on the CPU simulator: wall time of a few calls, a smoke test)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from gpu_timing import ms_per_call

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return statistics.median(ms_per_call(fn, calls) for _ in range(3)) * 1e3


def graph_us_per_step(step, steps: int = 20) -> float:
    """Device time per step of `steps` steps captured in one CUDA graph and replayed (no launch gaps)."""
    step()  # prepared (and compiled) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            step()
    return us_per_call(graph.replay, 20) / steps


def copy_rate(device) -> float:
    x = torch.empty(1 << 31 if device.type == "cuda" else 1 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = us_per_call(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (t * 1e-6)


def step_timeline(ctx, F, splits, q, k, v, lens, **kw) -> dict | str:
    """FlashDecode.timeline() of the 5th of 5 steps back to back, or what went wrong."""
    B, Hq, D = q.shape
    try:
        fd = F.FlashDecode(ctx.heap, 1, 0, B, Hq, k.shape[2], D, torch.bfloat16, stage=3, num_splits=splits,
                           timeline=True, **kw)
        for _ in range(5):
            fd(q, k, v, kv_lens=lens)
        torch.cuda.synchronize()
        phases = fd.timeline()
        fd.close()
        return phases
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


def run(ctx, opts) -> dict:
    from bspfuse.codegen.decode import decode_kernels
    from bspfuse.kernels import decode as K
    from bspfuse.kernels import flash_decode as F
    from bspfuse.runtime.fastlaunch import FastLaunch
    from bspfuse.runtime.target import device_target

    torch.manual_seed(0)
    sms = F._num_sms(ctx.device)
    rate = copy_rate(ctx.device)
    rows = []
    for (Hq, Hkv, D), S in itertools.product(opts["heads"], opts["lengths"]):
        B = 1
        q = torch.randn(B, Hq, D, device=ctx.device, dtype=torch.bfloat16)
        k = torch.randn(B, S, Hkv, D, device=ctx.device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((B,), S, dtype=torch.int32, device=ctx.device)
        t = F.decode_tiling(B, Hq, Hkv, D, device=ctx.device)
        base = F.choose_num_splits(t, S, sms)
        ref_o, ref_lse = F.decode_partial(q, k, v, kv_lens=lens, num_splits=base)
        floor = 2 * k.numel() * 2 / rate * 1e6
        row = {"Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "splits": base, "kv_bytes": 2 * k.numel() * 2,
               "copy_floor_us": floor, "us": {}, "err": {}}
        kv = F._check_inputs(q, k, v, lens, None, B, Hq, Hkv, D, None)
        out = (torch.empty_like(q), torch.empty(B, Hq, dtype=torch.float32, device=ctx.device))
        for splits in sorted({max(1, base // 2), base, min(F.MAX_SPLITS, 2 * base)}):
            mid_o = torch.empty(splits, B, Hq, D, dtype=torch.float32, device=ctx.device)
            mid_lse = torch.empty(splits, B, Hq, dtype=torch.float32, device=ctx.device)
            launch = F._split_launch(t, splits, kv.layout, 4 if F.one_wave(t, splits, sms) else None)
            args = F._split_args(kv, t, splits, D ** -0.5 * K.LOG2E, mid_o, mid_lse)
            row["us"][f"split s{splits}"] = us_per_call(lambda: launch(*args))
            row["us"][f"read s{splits}"] = us_per_call(read_kv(k, v, splits, t.block_n))
            launch(*args)  # the states the merges below fold
            for chunk in (1, 2, 4, 8, 16):
                merge = FastLaunch(decode_kernels(0)["merge_splits"], (t.num_tiles,),
                                   **dict(t.constexprs(), BLOCK_H=F.merge_h(t)), CHUNK=chunk, WAIT=False, MAX_SPINS=0, SLEEP_NS=0,
                                   TARGET=device_target(ctx.device), num_warps=t.num_warps)
                margs = F._merge_args(t, mid_o, mid_lse, splits, B * Hq * D, B * Hq, *out, out[1])
                row["us"][f"merge s{splits} chunk{chunk}"] = us_per_call(lambda: merge(*margs))
            chunks = [{"merge_chunk": c} for c in (1, 2, 4, 16)]
            variants = FUSED_VARIANTS + chunks if splits == base else FUSED_VARIANTS[:2]
            for kw in variants:
                name = f"fused s{splits}" + "".join(f" {key}={x}" for key, x in kw.items())
                try:
                    fd = F.FlashDecode(ctx.heap, 1, 0, B, Hq, Hkv, D, torch.bfloat16, stage=3, num_splits=splits, **kw)
                    step = lambda: fd(q, k, v, kv_lens=lens, out=out)  # noqa: E731
                    row["us"][name] = us_per_call(step)
                    if not kw and splits == base and ctx.device.type == "cuda":  # as an engine replays it
                        row["us"][name + " graph"] = graph_us_per_step(step)
                    o, lse = step()
                    row["err"][name] = ((o.float() - ref_o.float()).norm() / ref_o.float().norm()).item()
                    fd.close()
                except Exception as e:  # a variant that does not compile or fit: reported, the rest go on
                    row["us"][name] = float("nan")
                    row["err"][name] = f"{type(e).__name__}: {str(e)[:200]}"
                if (not kw or "merge_chunk" in kw) and ctx.device.type == "cuda":  # the phases of one step
                    row.setdefault("timeline", {})[name] = step_timeline(ctx, F, splits, q, k, v, lens, **kw)
        rows.append(row)
        print(f"{Hq}/{Hkv} S={S}: copy floor {floor:.1f} " + ", ".join(f"{n} {x:.1f}" for n, x in row["us"].items()),
              flush=True)
    read_rate = max([r["kv_bytes"] / (us * 1e-6) for r in rows for name, us in r["us"].items()
                     if name.startswith("read") and us == us and us > 0]
                    + ([best_read_rate(ctx.device, us_per_call)] if ctx.device.type == "cuda" else []))
    for r in rows:  # the floor: K+V bytes at the best read rate of the run
        r["floor_us"] = r["kv_bytes"] / read_rate * 1e6
    return {"device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu simulator",
            "read_bytes_per_s": read_rate,
            "copy_bytes_per_s": rate, "sms": sms, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--heads", default=",".join(f"{a}/{b}/{c}" for a, b, c in HEADS))
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--backend", default="cuda", help="cuda, or sim for a smoke test on the CPU (small shapes)")
    args = p.parse_args(argv)
    from bspfuse.runtime import launch

    opts = {"heads": [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")], "lengths": args.lengths}
    result = launch(run, 1, backend=args.backend, heap_bytes=64 << 20, args=(opts,), timeout_s=600)[0]
    result.update(torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}: copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s, read "
          f"{result['read_bytes_per_s'] / 1e12:.2f} TB/s (the floor's rate); us per step back to back (no peer), "
          "ratio to the floor")
    for r in result["rows"]:
        print(f"{r['Hq']}/{r['Hkv']} S={r['S'] // 1024}K splits {r['splits']} floor {r['floor_us']:.1f}")
        for name, us in r["us"].items():
            err = r["err"].get(name, "")
            err = err if isinstance(err, str) else f"{err:.1e}"
            print(f"   {name:<28} {us:8.1f} {us / r['floor_us']:6.2f}x  {err}")
        for name, phases in r.get("timeline", {}).items():
            if isinstance(phases, str):
                print(f"   timeline of {name}: {phases}")
                continue
            print(f"   timeline of {name}, us after the first start (median / last): " + ", ".join(
                f"{p} {v['median']:.1f}/{v['max']:.1f}" if isinstance(v, dict) else f"{p} {v}"
                for p, v in phases.items()))


if __name__ == "__main__":
    main()
