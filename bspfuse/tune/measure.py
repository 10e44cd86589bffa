"""Timing candidates on GPUs: the real host objects with the candidate's tile and schedule, every output checked
against a float32 matmul (and its collective) before it is timed, and the unfused program (NCCL + cuBLAS; at
world 1 cuBLAS alone) timed beside them; a decode step through FlashDecode at each stage and knob setting,
checked against float64. On every rank of `launch(..., backend="cuda")`.

    entries = tune_on_gpus([Problem("matmul_rs", 8192, 4096, 3584)], world=1)   # -> [Entry], rank 0's

Every rank runs the same candidates in the same order with the same number of calls (collective kernels), so
the call count comes from a first-order estimate (the device table's rates), not from a rank's own timing.

Triton compiles each candidate's kernel at its first call, about a second each and one after another: before a
GEMM's candidates are timed, every kernel they will ask for is compiled at once on threads (`compile_ahead`).
"""
from __future__ import annotations

import itertools
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch

from bspfuse.runtime.errors import HeapExhausted
from bspfuse.tune.search import UNFUSED, Candidate, DecodeProblem, Problem, Tuner

TORCH_DTYPE = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
TOLERANCE = {"bf16": 2e-2, "f16": 5e-3, "f32": 1e-3}
# the host queued each call in under this share of the device's time per call: the device never waited for it
HOST_AHEAD = 0.8


def _rates() -> tuple[float, float]:
    """(matmul flop/s, HBM bytes/s) that set a timing's call count: the H100's in the device table."""
    from bspfuse.devices import H100

    return H100.matmul_tflops.value * 1e12, H100.hbm_gbps.value * 1e9


class WrongResult(RuntimeError):
    """A candidate ran but its output differs from the reference: it is never timed or chosen."""


@dataclass
class CompiledAhead:
    """What compile_ahead did: kernels compiled (each JITFunction and specialization once), on how many threads, in
    how many seconds; the kernels whose compile failed, as ("module:name", error), and the calls that raised
    (index in `calls`: the error)."""
    kernels: int
    workers: int
    seconds: float
    failed: list = field(default_factory=list)
    call_errors: dict = field(default_factory=dict)


def compile_ahead(calls, workers: int | None = None) -> CompiledAhead:
    """Run each zero-argument callable in `calls` with every Triton compile it asks for recorded and declined,
    then compile what was recorded at once on `workers` threads (default: the CPUs, at most 16), each kernel
    installed in its JITFunction's cache as its own launch would: the next launch of that specialization finds
    it compiled. Triton's compile releases the GIL in its heavy parts, so threads overlap (4 GEMM kernels for
    sm_90 on 2 CPU cores: 1.9 s on one thread, 1.1 s on two).

        compile_ahead([lambda: op(a, b) for op in throwaway_ops])   # then op(a, b) of like ops compiles nothing

    Declined (Triton's jit_cache_hook returns True), a launch returns None and runs nothing, so the calls' host
    state may end up odd: FastLaunch, for one, never again takes its direct path after such a first launch. Let
    the calls use objects made for them and dropped after. A kernel already compiled is not asked for: it
    launches as usual. A call that raises is skipped (its error kept); a kernel that fails to compile does not
    stop the others (its error kept), and fails again where it is next launched."""
    import triton
    from concurrent.futures import ThreadPoolExecutor
    from triton.runtime._async_compile import AsyncCompileMode

    t0 = time.perf_counter()
    wanted: dict = {}  # (JITFunction's id, specialization) -> (JITFunction, specialization), in order asked

    def record(*, fn, compile, **_):  # Triton 3.6's JITFunction._call_hook keywords
        jit, data = fn.jit_function, compile["specialization_data"]
        wanted.setdefault((id(jit), data), (jit, data))
        return True  # declined: nothing compiles, nothing launches

    runtime = triton.knobs.runtime
    previous, runtime.jit_cache_hook = runtime.jit_cache_hook, record
    call_errors = {}
    try:
        for i, call in enumerate(calls):
            try:
                call()
            except Exception as e:  # noqa: BLE001 - kept for the caller; the others still run
                call_errors[i] = e
    finally:
        runtime.jit_cache_hook = previous
    workers = workers or min(_cpus(), 16)
    failed, pending = [], []
    # the preloads run here (each submits its compile to the pool); leaving the mode waits for every compile
    # and installs each kernel in its JITFunction's cache
    with ThreadPoolExecutor(workers, thread_name_prefix="compile_ahead") as pool, \
            AsyncCompileMode(pool, ignore_errors=True):
        for jit, data in wanted.values():
            try:
                pending.append((jit, jit.preload(data)))
            except Exception as e:  # noqa: BLE001 - one kernel's failure stops no other
                failed.append((_kernel_name(jit), e))
    compiled = 0
    for jit, future in pending:
        if future is None:  # a cache hook set before this one declined the compile
            continue
        if future.kernel is not None:
            compiled += 1
        else:
            failed.append((_kernel_name(jit), future.future.exception()))
    return CompiledAhead(compiled, workers, time.perf_counter() - t0, failed, call_errors)


def _kernel_name(jit) -> str:
    return f"{jit.fn.__module__}:{jit.fn.__qualname__}"


def _cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class GpuTimer:
    """timer(problem, candidate) -> seconds per call on this rank's GPU, inside a launch (`ctx`).

    Host objects take M as a bound, so one object serves every M of a (op, N, K, layout) up to `m_bounds`'s
    value for it (default: the problem's own M): tuning the Ms of one GEMM in a row builds each candidate's
    object once. Objects of another GEMM are freed when the next one starts; `compile_ahead` compiles the
    kernels of a GEMM's candidates before they are timed."""

    def __init__(self, ctx, rep_ms: float = 20.0, seed: int = 0, m_bounds: dict | None = None):
        self.ctx, self.rep_ms, self.seed = ctx, rep_ms, seed
        self.m_bounds = m_bounds or {}
        self._inputs: dict = {}
        self._ops: dict = {}  # (schedule, config) -> host object, for the GEMM of self._gemm
        self._gemm = None
        self._spin_rate = None  # torch.cuda._sleep's cycles per second, once measured
        self._ahead = True  # off after compile_ahead failed unexpectedly (warned once)

    def inputs(self, p: Problem):
        """(this rank's A, B, the float32 reference of this rank's output), drawn once per problem."""
        if p not in self._inputs:
            self._inputs.clear()  # one problem's tensors at a time
            dev, dt, r, W = self.ctx.device, TORCH_DTYPE[p.dtype], self.ctx.rank, p.world
            g = torch.Generator(device=dev).manual_seed(self.seed)
            a_all = [torch.randn(p.M, p.K, device=dev, generator=g).to(dt) for _ in range(W)]
            w = (torch.randn(p.N, p.K, device=dev, generator=g) / p.K ** 0.5).to(dt)
            b = _weight_operand(w, p.b_layout)
            if p.kind == "ag_matmul":  # every rank holds its rows; C is the gathered rows times B
                ref = torch.cat(a_all).float() @ b.float()
            else:  # every rank's partial product of the same B, summed (scattered for RS)
                total = sum(a.float() @ b.float() for a in a_all)
                ref = total.chunk(W)[r] if p.kind == "matmul_rs" else total
            self._inputs[p] = (a_all[r], b, ref)
        return self._inputs[p]

    def __call__(self, p: Problem | DecodeProblem, cand: Candidate) -> float:
        if isinstance(p, DecodeProblem):
            return self._decode(p, cand)
        a, b, ref = self.inputs(p)
        fn = self._unfused(p, a, b) if cand.config is None else self.fused_call(p, cand, a, b)
        out = fn()
        err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err <= TOLERANCE[p.dtype]:
            raise WrongResult(f"{cand.label}: relative error {err:.2e} against the float32 reference")
        return self.time_gemm(fn, p)

    def time_gemm(self, fn, p: Problem) -> tuple[float, float]:
        """(back to back, on the device alone) seconds per call of a GEMM of problem p (time_calls with the call
        count for its flops)."""
        return self.time_calls(fn, max(p.flops / _rates()[0], 2e-6))

    def _decode(self, p: DecodeProblem, cand: Candidate) -> float:
        """A decode step at the candidate's stage and knobs (FlashDecode), its O checked against float64 over
        every rank's keys; the query is the same on every rank, each holds S keys."""
        from bspfuse.kernels.flash_decode import FlashDecode, reference_decode

        dev, dt, r, W = self.ctx.device, TORCH_DTYPE[p.dtype], self.ctx.rank, p.world
        if p not in self._inputs:
            self._inputs.clear()
            g = torch.Generator(device=dev).manual_seed(self.seed)
            q = torch.randn(p.B, p.Hq, p.D, device=dev, generator=g).to(dt)
            kv = [torch.randn(2, p.B, p.S, p.Hkv, p.D, device=dev, generator=g).to(dt) for _ in range(W)]
            ref_o, _ = reference_decode(q, torch.cat([x[0] for x in kv], 1), torch.cat([x[1] for x in kv], 1))
            self._inputs[p] = (q, kv[r][0], kv[r][1], ref_o.to(dev))
        q, k, v, ref_o = self._inputs[p]
        fd = FlashDecode(self.ctx.heap, W, r, p.B, p.Hq, p.Hkv, p.D, dt, stage=int(cand.schedule.removeprefix("stage")),
                         num_splits=cand.config.splits, num_stages=cand.config.num_stages)
        try:
            out = (torch.empty_like(q), torch.empty(p.B, p.Hq, dtype=torch.float32, device=dev))
            step = lambda: fd(q, k, v, out=out)  # noqa: E731
            step()  # the first step prepares the launches (and compiles): never inside a capture
            if cand.config.graph:  # the step replayed from a CUDA graph, as an inference engine runs it
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                step = lambda: (graph.replay(), out)[1]  # noqa: E731
            o, _ = step()
            err = float((o.double() - ref_o).norm() / ref_o.norm().clamp_min(1e-30))
            if not err <= TOLERANCE[p.dtype]:
                raise WrongResult(f"{cand.label}: relative error {err:.2e} against the float64 reference")
            # back to back only: a stage's host work (stage 1's barrier, stage 2's epochs) is part of its time
            return self._timed_pass(step, self._count(max(2 * k.numel() * k.element_size() / _rates()[1], 2e-6)))[0]
        finally:
            fd.close()

    @staticmethod
    def gemm(p: Problem | DecodeProblem) -> tuple:
        """The GEMM a problem times (its host objects serve every M up to a bound); a decode step is its own."""
        return (p.kind, p.N, p.K, p.world, p.dtype, p.b_layout) if isinstance(p, Problem) else (p,)

    def close(self) -> None:
        """Free every host object's heap buffers (collective)."""
        self._free(*self._ops.values())
        self._ops.clear()

    def _free(self, *ops) -> None:
        """Free these host objects' heap buffers once every rank's work on them is done (collective)."""
        if ops:
            self.ctx.heap.barrier()
            for op in ops:
                for buf in op.buffers():
                    self.ctx.heap.free(buf)

    def compile_ahead(self, problems: list, candidates) -> CompiledAhead | None:
        """Compile the kernels of every fused candidate of `problems` (the Ms of one GEMM; `candidates(problem)`
        lists a problem's, Tuner.candidates) at once, before any of them is timed (collective: every rank, the
        same lists). None where nothing is compiled: no fused GEMM among the problems, or not on a GPU (the
        simulator interprets its kernels). Never raises: a failure is warned of once and turns this off (the
        kernels then compile at their first timed call)."""
        problems = [p for p in problems if isinstance(p, Problem)]
        if not problems or self.ctx.device.type != "cuda" or not self._ahead:
            return None
        try:
            return self._compile_ahead(problems, candidates)
        except Exception as e:  # noqa: BLE001 - tuning goes on without it
            self._ahead = False
            warnings.warn(f"bspfuse tune: compiling kernels ahead failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); each compiles at its first call",
                          stacklevel=2)
            return None

    def _compile_ahead(self, problems: list[Problem], candidates) -> CompiledAhead:
        """compile_ahead's work: the previous GEMM's objects freed, then one throwaway host object per candidate
        (and M bound), called at each M it is timed at (Triton specializes integers on == 1 and multiples of 16),
        compile_ahead recording the kernels they ask for, and freed. The objects timed later are never among
        them: a declined first launch would take their launchers off the direct path for good."""
        self._enter_gemm(problems[0])
        runs: dict = {}  # (schedule, config, M bound) -> (candidate, {M: problem})
        for p in problems:
            for cand in candidates(p):
                if cand.config is not None:
                    key = (cand.schedule, cand.config, self._bound(p))
                    runs.setdefault(key, (cand, {}))[1].setdefault(p.M, p)
        calls = [partial(self._run_throwaway, cand, list(ps.values()), bound)
                 for (_, _, bound), (cand, ps) in runs.items()]
        # this host's CPUs shared among its ranks, which compile the same kernels at the same time
        return compile_ahead(calls, max(1, min(16, _cpus() // max(1, self.ctx.world_size))))

    def _run_throwaway(self, cand: Candidate, problems: list[Problem], bound: int) -> None:
        """A host object of the candidate built for this call alone, called once at each problem's M on inputs
        of its shapes, then freed. Their values never matter: a kernel runs only where it was compiled before
        (another GEMM's candidate of the same kernel), on every rank alike, and its output is dropped."""
        op = self._build(problems[0], cand, bound)
        try:
            dev, dt = self.ctx.device, TORCH_DTYPE[problems[0].dtype]
            for p in problems:
                op(torch.empty(p.M, p.K, dtype=dt, device=dev),
                   _weight_operand(torch.empty(p.N, p.K, dtype=dt, device=dev), p.b_layout))
        finally:
            self._free(op)

    def _enter_gemm(self, p: Problem) -> None:
        """Make p's GEMM the current one: the host objects of another are freed (collective)."""
        if self.gemm(p) != self._gemm:
            self.close()
            self._gemm = self.gemm(p)

    def _bound(self, p: Problem) -> int:
        """The rows a host object for p is built for: m_bounds's value for p's GEMM, at least p's M."""
        return max(p.M, self.m_bounds.get(self.gemm(p), 0))

    def _build(self, p: Problem, cand: Candidate, M: int):
        """The candidate's host object for p's GEMM, for up to M rows (AG+GEMM: this rank's; collective)."""
        from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter

        heap, dt = self.ctx.heap, TORCH_DTYPE[p.dtype]
        if p.kind == "ag_matmul":
            return FusedAllGatherMatmul(heap, M, p.N, p.K, dt, mode=cand.schedule, config=cand.config,
                                        b_layout=p.b_layout)
        cls = FusedMatmulReduceScatter if p.kind == "matmul_rs" else FusedMatmulAllReduce
        return cls(heap, M, p.N, p.K, dt, config=cand.config, b_layout=p.b_layout, mode=cand.schedule)

    def time_calls(self, fn, guess_s: float) -> tuple[float, float]:
        """(back to back, on the device alone) seconds per call, each over a fixed count of calls after warm-up.
        The count comes from `guess_s` (a first-order estimate, the same on
        every rank: collective kernels must be called as often on each), not from this rank's own timing.

        Back to back, a call shorter than the host's time per call takes the host's time. On the device alone,
        no host time between calls, as when a CUDA graph replays them or the host runs ahead: the back-to-back
        pass also times the host's queueing of its calls, and where the host queued each in under HOST_AHEAD of
        the device's time per call (on every rank), the device never waited for it and the back-to-back time is
        the device's; otherwise the calls are queued again while a spin kernel holds the GPU for longer than the
        host took, and timed from the spin's end."""
        b2b, host = self._timed_pass(fn, self._count(guess_s))
        if host < HOST_AHEAD * b2b:
            return b2b, b2b
        # queued calls stay under the driver's queue of pending launches (about a thousand): a full queue
        # would hold the host back while the spin runs, and the calls after it would again wait for the host
        calls = self._count(guess_s, most=400)
        return b2b, self._timed_pass(fn, calls, spin_s=1.5 * host * calls)[0]

    def _count(self, guess_s: float, most: int = 2000) -> int:
        """Calls that take about rep_ms at `guess_s` seconds each: at least 5, at most `most`."""
        return int(min(most, max(5, self.rep_ms * 1e-3 / guess_s)))

    def _timed_pass(self, fn, calls: int, spin_s: float = 0.0) -> tuple[float, float]:
        """(device seconds per call, host seconds per call to queue it), each the largest of any rank, over
        `calls` calls after three warm-up calls; spin_s: first a spin kernel that holds the GPU that long."""
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.ctx.barrier()
        if spin_s:
            torch.cuda._sleep(int(spin_s * self._spin_cycles_per_s()) + 10_000)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        both = torch.tensor([start.elapsed_time(end) * 1e-3 / calls, host / calls], dtype=torch.float64)
        if self.ctx.world_size > 1:  # every rank decides alike whether to spin, and spins as long
            import torch.distributed as dist

            both = both.to(self.ctx.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return float(both[0]), float(both[1])

    def _spin_cycles_per_s(self) -> float:
        """The rate of torch.cuda._sleep's spin (GPU clock cycles per second), measured once."""
        if self._spin_rate is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1_000_000)  # warm
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            self._spin_rate = 20_000_000 / (start.elapsed_time(end) * 1e-3)
        return self._spin_rate

    def _unfused(self, p: Problem, a, b):
        """The bulk-synchronous program: the collective then cuBLAS (AG), or cuBLAS then the collective."""
        import torch.distributed as dist

        W = p.world
        if W == 1:
            return lambda: a @ b
        if p.kind == "ag_matmul":
            full = a.new_empty(W * p.M, p.K)
            return lambda: (dist.all_gather_into_tensor(full, a), full @ b)[1]
        if p.kind == "matmul_rs":
            out = a.new_empty(p.M // W, p.N)
            return lambda: (dist.reduce_scatter_tensor(out, a @ b), out)[1]

        def all_reduce():
            c = a @ b
            dist.all_reduce(c)
            return c
        return all_reduce

    def fused_call(self, p: Problem, cand: Candidate, a, b):
        """The candidate's host object for p (built once per GEMM and config), called on (a, b)."""
        self._enter_gemm(p)
        key = (cand.schedule, cand.config)
        op = self._ops.get(key)
        if op is None or (op.M_local if p.kind == "ag_matmul" else op.M) < p.M:
            if op is not None:
                self._free(self._ops.pop(key))
            try:
                op = self._build(p, cand, self._bound(p))
            except HeapExhausted:  # the GEMM's other candidates' objects go (rebuilt when next timed), then again
                self.close()
                op = self._build(p, cand, self._bound(p))
            self._ops[key] = op
        return lambda: op(a, b)


def _weight_operand(w: torch.Tensor, b_layout: str) -> torch.Tensor:
    """B as a problem of this layout passes it, from its weight w [N, K] (an nn.Linear's): w.t() for "nk", a
    row-major [K, N] copy for "kn"."""
    return w.t() if b_layout == "nk" else w.t().contiguous()


class _Progress:
    """One line on stderr per problem, rewritten as its candidates are measured (rank 0 only)."""

    def __init__(self, show: bool):
        self.show, self.problem = show, None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.show:
            import sys

            print(f"\r[tune] {self.problem}: {done}/{total} {label[:60]:60}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    def ahead(self, done: CompiledAhead | None) -> None:
        """One line for a GEMM's kernels compiled ahead (nothing where none were: not on a GPU)."""
        if self.show and done is not None:
            import sys

            failed = len(done.failed) + len(done.call_errors)
            print(f"[tune] compiled {done.kernels} kernels ahead on {done.workers} threads in {done.seconds:.1f} s"
                  + (f" ({failed} failed here, tried again when timed)" if failed else ""),
                  file=sys.stderr, flush=True)


def gemm_order(problems: list) -> tuple[list, dict]:
    """The problems in tuning order, the Ms of one GEMM together and rising (a decode step is a group of its
    own), and each GEMM's largest M: the rows its candidates' host objects are built for (GpuTimer.m_bounds)."""
    rows = lambda p: p.M if isinstance(p, Problem) else 0  # noqa: E731
    order = sorted(problems, key=lambda p: (repr(GpuTimer.gemm(p)), rows(p)))
    bounds: dict = {}
    for p in order:
        bounds[GpuTimer.gemm(p)] = max(bounds.get(GpuTimer.gemm(p), 0), rows(p))
    return order, bounds


def tune_in_rank(ctx, problems: list[Problem], gpu: str, keep: int = 12, rep_ms: float = 20.0,
                 progress: bool = True) -> list:
    """Tune `problems` inside a launch (every rank, same list): the Ms of one GEMM one after another, so each
    candidate's host object is built once for them, and the kernels of all their candidates compiled at once
    before the first is timed."""
    order, bounds = gemm_order(problems)
    report = _Progress(progress and ctx.rank == 0)
    timer = GpuTimer(ctx, rep_ms, m_bounds=bounds)
    tuner = Tuner(timer, gpu, keep=keep, progress=report,
                  num_sms=torch.cuda.get_device_properties(ctx.device).multi_processor_count)
    entries = {}
    try:
        for _, same_gemm in itertools.groupby(order, key=GpuTimer.gemm):
            same_gemm = list(same_gemm)
            report.ahead(timer.compile_ahead(same_gemm, tuner.candidates))
            for p in same_gemm:
                report.problem = p
                entries[p] = tuner.tune(p)
    finally:
        timer.close()
    return [entries[p] for p in problems]


def gpu_model(device=None) -> str:
    """The device table's name for this process's GPU (H100, H200, MI300X), else the name torch reports."""
    from bspfuse.lowering import target_of

    return target_of(torch.device("cuda", torch.cuda.current_device() if device is None else device)).name


def tune_on_gpus(problems: list[Problem], world: int, keep: int = 12, rep_ms: float = 20.0,
                 progress: bool = True, heap_bytes: int = 8 << 30):
    """Tune every problem on `world` GPUs of this host (launch's cuda backend); rank 0's entries."""
    from bspfuse.runtime import launch

    gpu = gpu_model(0)
    return launch(tune_in_rank, world, backend="cuda", heap_bytes=heap_bytes,
                  args=(problems, gpu, keep, rep_ms, progress), timeout_s=24 * 3600)[0]


__all__ = ["CompiledAhead", "GpuTimer", "UNFUSED", "WrongResult", "compile_ahead", "gpu_model", "tune_in_rank",
           "tune_on_gpus"]
