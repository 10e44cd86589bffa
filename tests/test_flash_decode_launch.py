"""The direct launch path (bspfuse.runtime.fastlaunch) hands the CUDA launcher exactly what Triton's JIT
hands it, and takes the JIT again whenever it must.

No GPU: a stand-in driver (benchmarks/decode_host_bench.py: StubDriver) compiles the kernels for sm_90
as on an H200 and records each launch instead of running it. A launch record is compared after
normalizing what legitimately differs: the JIT passes launch metadata and its (empty) hook chains where
the direct path passes None, and tensors where the direct path passes their addresses. The checks run
in a fresh process without TRITON_INTERPRET (an interpreted @triton.jit cannot be compiled).
"""
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = textwrap.dedent('''
    import json, os, sys
    import torch, triton
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from decode_host_bench import StubLauncher, install_stub_driver
    install_stub_driver()
    from bspfuse.codegen.decode import decode_kernels
    from bspfuse.kernels import decode as K

    JIT_RUNS = {}

    def count_jit_runs(kernel):
        run = kernel.run
        def counted(*args, **kwargs):
            JIT_RUNS[kernel.__name__] = JIT_RUNS.get(kernel.__name__, 0) + 1
            return run(*args, **kwargs)
        kernel.run = counted

    def record(call):
        """(kernel, grid, stream, function, metadata, every parameter's value, tensors as addresses)."""
        name, args = call
        values = [a.data_ptr() if hasattr(a, "data_ptr") else a for a in args[9:]]
        return [name, list(args[:5]), list(args[5]), [v if isinstance(v, (int, float, bool)) else repr(v)
                                                      for v in values]]

    def launched(fn):
        """The records of the launches fn makes, and how many of them went through the JIT."""
        StubLauncher.calls.clear()
        before = sum(JIT_RUNS.values())
        fn()
        return [record(c) for c in StubLauncher.calls], sum(JIT_RUNS.values()) - before
''')

FAST_LAUNCH = PRELUDE + textwrap.dedent('''
    from bspfuse.kernels.flash_decode import decode_tiling, merge_chunk
    from bspfuse.runtime.fastlaunch import FastLaunch

    t = decode_tiling(2, 8, 2, 64, device="cuda")
    meta = dict(t.constexprs(), CHUNK=merge_chunk(4, t), WAIT=False, MAX_SPINS=0, SLEEP_NS=0, TARGET="cuda",
                num_warps=t.num_warps)
    o, lse = torch.randn(16, 2, 8, 64), torch.randn(16, 2, 8)
    out_o, out_lse = torch.empty(2, 8, 64, dtype=torch.bfloat16), torch.empty(2, 8)
    kernel = decode_kernels(2)["merge_ranks"]
    count_jit_runs(kernel)

    def args(n=4, out=out_o):
        return (o, lse, out, out_lse, n, 2 * 8 * 64, 2 * 8, 8, 2, out_lse, 0, 0, out_lse)

    def jit(*a):
        return lambda: kernel[(t.num_tiles,)](*a, **meta)

    fast = FastLaunch(kernel, (t.num_tiles,), **meta)
    report = {"jit": launched(jit(*args())), "fast": [launched(lambda: fast(*args())) for _ in range(3)]}
    other_out = torch.empty_like(out_o)  # a new tensor of the same specialization: still direct
    report["new_tensor"] = (launched(lambda: fast(*args(out=other_out))), launched(jit(*args(out=other_out))))
    # 16 states: a multiple of 16, another specialization (the JIT compiles it), then back to 4: direct
    report["respecialized"] = (launched(lambda: fast(*args(n=16))), launched(jit(*args(n=16))))
    report["back"] = launched(lambda: fast(*args()))
    fast.forget((0, 2))  # the last call's o and out: no longer held (a CUDA graph's pool must not be)
    report["forgotten"] = [fast._plan.args[i] is None and fast._plan.values[i] is None for i in (0, 2)]
    report["after_forget"] = launched(lambda: fast(*args()))  # checks those two again, still direct
    hooked = []
    triton.knobs.runtime.launch_enter_hook.add(hooked.append)  # a profiler: every launch through the JIT
    report["hooked"] = launched(lambda: fast(*args()))[1], len(hooked)
    triton.knobs.runtime.launch_enter_hook.remove(hooked.append)
    os.environ["BSPFUSE_FAST_LAUNCH"] = "0"
    off = FastLaunch(kernel, (t.num_tiles,), **meta)
    report["off"] = [launched(lambda: off(*args()))[1] for _ in range(2)], off.direct
    print(json.dumps(report))
''')

FLASH_DECODE = PRELUDE + textwrap.dedent('''
    from bspfuse.kernels.flash_decode import FlashDecode
    from bspfuse.runtime import SymmetricHeap

    for k in {k for stage in range(4) for k in decode_kernels(stage).values()}:  # every stage's kernels
        count_jit_runs(k)
    B, Hq, Hkv, D, S = 1, 8, 2, 64, 300
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, D, generator=g).to(torch.bfloat16)
    k, v = torch.randn(2, B, S, Hkv, D, generator=g).to(torch.bfloat16)
    lens = torch.tensor([S - 7], dtype=torch.int32)
    out = (torch.empty(B, Hq, D, dtype=torch.bfloat16), torch.empty(B, Hq))
    report = {}
    for stage in (2, 3):
        fd = FlashDecode(SymmetricHeap(1 << 20), 1, 0, B, Hq, Hkv, D, torch.bfloat16, stage=stage, num_splits=5,
                         block_n=64, num_stages=3)
        step = lambda: fd(q, k, v, kv_lens=lens, out=out)
        first = launched(step)  # through the JIT: compiles, remembers
        direct = [launched(step) for _ in range(2)]
        hook = lambda metadata: None
        triton.knobs.runtime.launch_enter_hook.add(hook)  # forces the JIT path, for the reference
        through_jit = [launched(step) for _ in range(2)]
        triton.knobs.runtime.launch_enter_hook.remove(hook)
        epochs = {n: decode_kernels(2)[k].arg_names.index("epoch")
                  for n, k in (("merge_states_kernel", "merge_ranks"), ("put_states_kernel", "put"))}
        report[stage] = {"first": first, "direct": direct, "jit": through_jit, "epoch_index": epochs,
                         "launches": fd.launches()}
    print(json.dumps(report))
''')


def test_fast_launch_matches_the_jit_and_falls_back(run_script):
    r = run_script(FAST_LAUNCH)
    jit, jit_runs = r["jit"]
    assert jit_runs == 1 and len(jit) == 1
    assert [runs for _, runs in r["fast"]] == [1, 0, 0]  # the first call through the JIT, then direct
    assert all(records == jit for records, _ in r["fast"]), (r["fast"], jit)
    (fast, fast_runs), (ref, _) = r["new_tensor"]
    assert fast == ref and fast_runs == 0
    (fast, fast_runs), (ref, _) = r["respecialized"]
    assert fast == ref and fast != jit and fast_runs == 1  # a new specialization goes through the JIT
    assert r["back"] == [jit, 0]  # ... and the first one is still direct
    assert r["forgotten"] == [True, True] and r["after_forget"] == [jit, 0]
    assert r["hooked"] == [1, 1]  # the hook saw the launch, which went through the JIT
    assert r["off"] == [[1, 1], False]  # BSPFUSE_FAST_LAUNCH=0: every launch through the JIT


def _without_epochs(records, epoch_index):
    """Records with the epoch argument blanked: it is the only argument that changes between steps."""
    out = []
    for name, head, meta, values in records:
        if name in epoch_index:
            values = values[:epoch_index[name]] + [None] + values[epoch_index[name] + 1:]
        out.append([name, head, meta, values])
    return out


def test_flash_decode_steps_launch_as_through_the_jit(run_script):
    report = run_script(FLASH_DECODE)
    for stage, r in report.items():
        kernels = [n.split("(")[0] for n in r["launches"] if not n.startswith("heap")]
        first, first_runs = r["first"]
        assert [rec[0] for rec in first] == kernels and first_runs == len(kernels), (stage, first)
        assert [runs for _, runs in r["direct"]] == [0, 0], stage  # no launch after the first step via the JIT
        assert [runs for _, runs in r["jit"]] == [len(kernels)] * 2, stage
        steps = [_without_epochs(s, r["epoch_index"]) for s in [first] + [rec for rec, _ in r["direct"] + r["jit"]]]
        # the stages with host epochs alternate between the two halves of the gather buffer by epoch parity
        for parity in (0, 1):
            assert all(s == steps[parity] for s in steps[parity::2]), (stage, parity)
