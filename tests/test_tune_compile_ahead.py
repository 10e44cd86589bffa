"""Compiling a GEMM's candidate kernels ahead of timing them (measure.compile_ahead), on the CPU: Triton's own JIT
dispatch runs with a stand-in driver that reports an sm_90 GPU, so every kernel compiles for sm_90 (no GPU needed)
and a launch of a compiled kernel stops at the stand-in (`Launched`) instead of running."""
from __future__ import annotations

import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import JITFunction, driver

from bspfuse.runtime import SymmetricHeap
from bspfuse.runtime.launch import RankContext
from bspfuse.tile import TileConfig
from bspfuse.tune import measure
from bspfuse.tune.search import UNFUSED, Candidate, DecodeProblem, Problem, Tuner

STAND_IN = "sm_90 stand-in"  # the device the stand-in driver reports: the key of what it puts in JIT caches


class Launched(RuntimeError):
    """A compiled kernel was about to be launched (the stand-in driver has no launcher)."""


class Sm90StandIn:
    """Triton's active driver as far as dispatch and compile ask: an sm_90 GPU; anything a launch asks raises."""

    def get_current_device(self):
        return STAND_IN

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise Launched(name)


@triton.jit
def copy_rows(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)


pytestmark = pytest.mark.skipif(not isinstance(copy_rows, JITFunction),
                                reason="Triton's interpreter (TRITON_INTERPRET) compiles nothing")


@pytest.fixture
def sm90(monkeypatch):
    """The stand-in driver active and no cache hook; after the test, the JIT caches it filled are emptied."""
    monkeypatch.setattr(driver, "_active", Sm90StandIn())
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
    yield
    for name, module in list(sys.modules.items()):
        if name == __name__ or name.startswith("bspfuse_generated_"):
            for obj in list(vars(module).values()):
                if isinstance(obj, JITFunction):
                    obj.device_caches.pop(STAND_IN, None)


def finds_compiled(call) -> bool:
    """Whether `call` goes to launch its kernel (stopped by the stand-in driver) without asking for a compile."""
    asked = []
    previous = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = lambda **kw: asked.append(kw) or True  # declined: nothing launches
    try:
        call()
    except Launched:
        return not asked
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
    return False


def test_every_kernel_a_call_asks_for_is_compiled_once_into_its_jit_cache(sm90):
    x, y = torch.empty(64), torch.empty(64)
    calls = [lambda: copy_rows[(1,)](x, y, 64, BLOCK=64),
             lambda: copy_rows[(1,)](x, y, 64, BLOCK=64),  # the same specialization: compiled once
             lambda: copy_rows[(1,)](x, y, 1, BLOCK=64),  # n == 1 specializes
             lambda: 1 / 0]
    preloads = []

    def earlier_hook(**kw):  # a hook set before: it is back afterwards, and sees the compiles (not declined)
        preloads.append(kw["is_manual_warmup"])

    triton.knobs.runtime.jit_cache_hook = earlier_hook
    done = measure.compile_ahead(calls, workers=2)
    assert triton.knobs.runtime.jit_cache_hook is earlier_hook
    assert (done.kernels, done.workers, done.failed) == (2, 2, [])
    assert list(done.call_errors) == [3] and isinstance(done.call_errors[3], ZeroDivisionError)
    assert preloads == [True, True]  # two compiles, through Triton's JITFunction.preload
    assert len(copy_rows.device_caches[STAND_IN][0]) == 2
    assert finds_compiled(lambda: copy_rows[(1,)](x, y, 64, BLOCK=64))
    assert finds_compiled(lambda: copy_rows[(1,)](x, y, 1, BLOCK=64))
    assert not finds_compiled(lambda: copy_rows[(1,)](x, y, 64, BLOCK=32))  # never asked for


@triton.jit
def copy_tiles(a_desc, out, BM: tl.constexpr, BK: tl.constexpr):
    offs = tl.arange(0, BM)[:, None] * BK + tl.arange(0, BK)[None, :]
    tl.store(out + offs, a_desc.load([tl.program_id(0) * BM, 0]))


def test_a_kernel_taking_a_tensor_descriptor_compiles_ahead(sm90):
    """The GPU's GEMM kernels read through TMA descriptors: their specialization goes through the recorded data
    too, and a launch with another descriptor of the same shape and block finds the kernel compiled."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = torch.empty(64, 64, dtype=torch.bfloat16)
    desc = lambda: TensorDescriptor.from_tensor(torch.empty(64, 64, dtype=torch.bfloat16), [32, 64])  # noqa: E731
    done = measure.compile_ahead([lambda: copy_tiles[(2,)](desc(), out, BM=32, BK=64)], workers=2)
    assert (done.kernels, done.failed, done.call_errors) == (1, [], {})
    assert finds_compiled(lambda: copy_tiles[(2,)](desc(), out, BM=32, BK=64))


def test_the_hook_is_put_back_when_a_call_is_interrupted(sm90):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure.compile_ahead([interrupted])
    assert triton.knobs.runtime.jit_cache_hook is None


def test_kernels_compile_on_the_pool_s_threads_and_one_failure_stops_no_other(sm90, monkeypatch):
    """Triton's compile itself is stood in for (a sleep, one of them failing); the rest is Triton's own: the
    recorded requests, preload, the async compile mode and its installing of each kernel."""
    x, y = torch.empty(64), torch.empty(64)
    copy_rows.device_caches[STAND_IN]  # the JIT's state for the device: it sets the `compile` stood in for here
    threads, blocks = set(), []

    def compile(src, target, options, _env_vars=None):
        block = src.constants[(3,)]
        threads.add(threading.current_thread().name)
        blocks.append(block)
        time.sleep(0.3)
        if block == 32:
            raise RuntimeError("ptxas: out of registers")
        return SimpleNamespace(block=block)

    monkeypatch.setattr(copy_rows, "compile", compile)
    calls = [lambda b=b: copy_rows[(1,)](x, y, 64, BLOCK=b) for b in (16, 32, 64, 128, 16)]
    t0 = time.perf_counter()
    done = measure.compile_ahead(calls, workers=4)
    assert time.perf_counter() - t0 < 0.3 * 4  # the four compiles' sleeps overlapped
    assert sorted(blocks) == [16, 32, 64, 128] and len(threads) > 1
    assert all(name.startswith("compile_ahead") for name in threads)
    assert done.kernels == 3 and done.call_errors == {}
    [(name, error)] = done.failed
    assert name.endswith(":copy_rows") and "out of registers" in str(error)
    assert sorted(k.block for k in copy_rows.device_caches[STAND_IN][0].values()) == [16, 64, 128]


# ----------------------------------------------------------------------------------------------- the GEMMs

SMALL = [TileConfig(16, 32, 16, 1, 4, 2), TileConfig(32, 32, 16, 1, 4, 3)]
GEMM = [Problem("matmul_rs", M, 64, 48, world=1, b_layout="nk") for M in (16, 40)]


def small_candidates(p):
    """Two small tiles (each its own kernel), and the unfused program, at every M."""
    return [Candidate(UNFUSED), *(Candidate("direct", c) for c in SMALL)]


def test_a_gemm_s_candidates_compile_ahead_on_objects_of_their_own_that_timing_never_sees(sm90, monkeypatch):
    """One throwaway host object per candidate, called at each M, freed; the object timed afterwards is
    another, and its first call finds the kernel compiled."""
    from bspfuse.kernels.gemm import FusedMatmulReduceScatter

    heap = SymmetricHeap(16 << 20)
    free = heap.free_bytes
    timer = measure.GpuTimer(RankContext(0, 1, heap, "sim", torch.device("cpu")),
                             m_bounds={measure.GpuTimer.gemm(GEMM[0]): 40})
    built, called = [], []
    build, call = timer._build, FusedMatmulReduceScatter.__call__
    monkeypatch.setattr(timer, "_build", lambda *args: built.append(build(*args)) or built[-1])
    monkeypatch.setattr(FusedMatmulReduceScatter, "__call__",
                        lambda op, a, b: called.append((op, a.shape[0], op.M)) or call(op, a, b))

    done = timer._compile_ahead(GEMM, small_candidates)
    assert (done.kernels, done.call_errors, done.failed) == (2, {}, [])
    throwaway = list(built)
    assert [op.config for op in throwaway] == SMALL
    assert called == [(op, M, 40) for op in throwaway for M in (16, 40)]  # at the bound the timer builds for
    assert heap.free_bytes == free and timer._ops == {}

    for cand in small_candidates(GEMM[0])[1:]:
        a, b, _ = timer.inputs(GEMM[0])
        assert finds_compiled(timer.fused_call(GEMM[0], cand, a, b))
    assert len(timer._ops) == 2 and not any(op is t for op in timer._ops.values() for t in throwaway)
    timer.close()
    assert heap.free_bytes == free


def test_nothing_compiles_ahead_off_a_gpu_and_a_failure_warns_once_and_tuning_goes_on(monkeypatch):
    cpu = measure.GpuTimer(RankContext(0, 1, SymmetricHeap(1 << 20), "sim", torch.device("cpu")))
    assert cpu.compile_ahead(GEMM, lambda p: pytest.fail("candidates asked for off a GPU")) is None

    gpu = measure.GpuTimer(SimpleNamespace(device=torch.device("cuda"), world_size=1))
    tries = []

    def broken(problems, candidates):
        tries.append(problems)
        raise RuntimeError("the hook's interface changed")

    monkeypatch.setattr(gpu, "_compile_ahead", broken)
    assert gpu.compile_ahead([DecodeProblem(1, 8, 8, 64, 4096)], small_candidates) is None and tries == []
    with pytest.warns(UserWarning, match="compiling kernels ahead failed .*the hook's interface changed"):
        assert gpu.compile_ahead(GEMM, small_candidates) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpu.compile_ahead(GEMM, small_candidates) is None  # off from then on, no second warning
    assert tries == [GEMM]


def test_tuning_compiles_each_gemm_ahead_before_timing_any_of_its_problems(monkeypatch, capsys):
    problems = [Problem("matmul_rs", 64, 4096, 1024, world=1), Problem("matmul_ar", 32, 2048, 1024, world=1),
                Problem("matmul_rs", 8, 4096, 1024, world=1)]
    events = []

    def ahead(timer, group, candidates):
        events.append(("ahead", [p.M for p in group]))
        assert candidates(group[0]) == Tuner(None, "H100", keep=3).candidates(group[0])
        return measure.CompiledAhead(kernels=5, workers=16, seconds=4.23)

    def timed(timer, p, cand):
        if not events or events[-1] != ("time", p.kind, p.M):
            events.append(("time", p.kind, p.M))
        return 10e-6

    monkeypatch.setattr(measure.GpuTimer, "compile_ahead", ahead)
    monkeypatch.setattr(measure.GpuTimer, "__call__", timed)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    ctx = RankContext(0, 1, SymmetricHeap(1 << 20), "cuda", torch.device("cpu"))
    entries = measure.tune_in_rank(ctx, problems, "H100", keep=3)
    assert [e.problem for e in entries] == problems
    assert events == [("ahead", [32]), ("time", "matmul_ar", 32),
                      ("ahead", [8, 64]), ("time", "matmul_rs", 8), ("time", "matmul_rs", 64)]
    lines = [line for line in capsys.readouterr().err.splitlines() if "ahead" in line]
    assert lines == ["[tune] compiled 5 kernels ahead on 16 threads in 4.2 s"] * 2
