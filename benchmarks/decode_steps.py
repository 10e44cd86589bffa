"""Flash Decode stage 3 steps of one checkout on one GPU (a world of one): called, bound, replayed from a graph.

    python3 benchmarks/decode_steps.py CHECKOUT OUT.json        # bspfuse imported from CHECKOUT
    python3 benchmarks/decode_steps.py --report A.json B.json ...

Compares two versions of the kernels (say, before and after a change) in one machine start: run it for each
checkout, alternating, twice, and --report joins the files (the least time of each checkout per shape, after
over before, and after over the floor). Per shape (batch 1, heads x KV length): FlashDecode(stage=3) with its
own choices, timed back to back three ways: ``call`` (fd(q, k, v, out=...) with the same tensors each step),
``bound`` (FlashDecode.bind's step) and ``graph`` (20 bound steps in one CUDA graph, replayed: no launch gaps);
every result is checked against a float64 reference. The floor is K+V bytes at the highest rate the plain
read kernel (read_rate.py) reached over the run's shapes.
"""
import json
import statistics
import sys
from pathlib import Path

HEADS = [(96, 12, 128), (32, 8, 128), (64, 8, 128)]
LENGTHS = [4096, 16384, 65536, 131072]


def us(fn, calls=300):
    """Median over 5 rounds of the device time per call, `calls` calls back to back after a warm-up."""
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        rounds.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(rounds)


def run(ctx):
    import torch

    from bspfuse.kernels import flash_decode as F
    from read_rate import read_kv

    torch.manual_seed(1)
    rows = []
    for Hq, Hkv, D in HEADS:
        for S in LENGTHS:
            q = torch.randn(1, Hq, D, device=ctx.device, dtype=torch.bfloat16)
            k = torch.randn(1, S, Hkv, D, device=ctx.device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            lens = torch.full((1,), S, dtype=torch.int32, device=ctx.device)
            qg = q.double().view(1, Hkv, Hq // Hkv, D)
            s = torch.einsum("bhgd,bshd->bhgs", qg, k.double()) * D ** -0.5
            ref = torch.einsum("bhgs,bshd->bhgd", torch.softmax(s, -1), v.double()).reshape(1, Hq, D)
            err = lambda o: float((o.double() - ref).norm() / ref.norm())  # noqa: E731
            fd = F.FlashDecode(ctx.heap, 1, 0, 1, Hq, Hkv, D, torch.bfloat16, stage=3)
            worst = err(fd(q, k, v, kv_lens=lens)[0])
            out = (torch.empty_like(q), torch.empty(1, Hq, dtype=torch.float32, device=ctx.device))
            called = us(lambda: fd(q, k, v, kv_lens=lens, out=out))
            step = fd.bind(q, k, v, kv_lens=lens, out=out)
            bound = us(step)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    step()
            replayed = us(graph.replay, 20) / 20
            out[0].fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, err(out[0]))
            read = min(us(read_kv(k, v, n)) for n in (264 // Hkv, 528 // Hkv, 1056 // Hkv))
            fd.close()
            rows.append(dict(Hq=Hq, Hkv=Hkv, S=S, us=called, bound_us=bound, graph_us=replayed, err=worst,
                             read_us=read, kv_bytes=4 * k.numel()))
            print(Hq, Hkv, S, f"{called:.1f} bound {bound:.1f} graph {replayed:.1f} us err {worst:.1e}", flush=True)
    return rows


def report(paths):
    runs = [json.load(open(p)) for p in paths]
    by: dict = {}
    for r in runs:
        for row in r["rows"]:
            by.setdefault((row["Hq"], row["Hkv"], row["S"]), {}).setdefault(r["checkout"], []).append(row)
    checkouts = list(dict.fromkeys(r["checkout"] for r in runs))
    rate = max(row["kv_bytes"] / row["read_us"] for r in runs for row in r["rows"])
    print(f"{runs[0]['device']}: read rate {rate / 1e6:.2f} TB/s; us per step (least of the runs): "
          f"{' -> '.join(checkouts)}, after/before, after/floor")
    for key, d in by.items():
        floor = d[checkouts[0]][0]["kv_bytes"] / rate
        line = f"{key[0]}/{key[1]} S={key[2]:6} floor {floor:6.1f}"
        for f in ("us", "bound_us", "graph_us"):
            t = [min(x[f] for x in d[c]) for c in checkouts]
            line += f" | {f[:-3] or 'call'} " + " ".join(f"{x:6.1f}" for x in t) + f" {t[-1] / t[0]:5.3f} {t[-1] / floor:5.2f}x"
        print(line + f" err<={max(x['err'] for v in d.values() for x in v):.1e}")


def main():
    if sys.argv[1] == "--report":
        return report(sys.argv[2:])
    checkout, out = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(Path(checkout).resolve()))
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    import torch

    from bspfuse.runtime import launch

    rows = launch(run, 1, backend="cuda", heap_bytes=1 << 30, timeout_s=600)[0]
    Path(out).write_text(json.dumps(dict(checkout=checkout, device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
