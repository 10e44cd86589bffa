"""Timing candidates on GPUs: the real host objects with the candidate's tile and schedule, every output checked
against a float32 matmul (and its collective) before it is timed, and the unfused program (NCCL + cuBLAS; at
world 1 cuBLAS alone) timed beside them; a decode step through FlashDecode at each stage and knob setting,
checked against float64. On every rank of `launch(..., backend="cuda")`.

    entries = tune_on_gpus([Problem("matmul_rs", 8192, 4096, 3584)], world=1)   # -> [Entry], rank 0's

Every rank runs the same candidates in the same order with the same number of calls (collective kernels), so
the call count comes from a first-order estimate (the device table's rates), not from a rank's own timing.
"""
from __future__ import annotations

import time

import torch

from bspfuse.runtime.errors import HeapExhausted
from bspfuse.tune.search import UNFUSED, Candidate, DecodeProblem, Problem, Tuner

TORCH_DTYPE = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
TOLERANCE = {"bf16": 2e-2, "f16": 5e-3, "f32": 1e-3}


def _rates() -> tuple[float, float]:
    """(matmul flop/s, HBM bytes/s) that set a timing's call count: the H100's in the device table."""
    from bspfuse.devices import H100

    return H100.matmul_tflops.value * 1e12, H100.hbm_gbps.value * 1e9


class WrongResult(RuntimeError):
    """A candidate ran but its output differs from the reference: it is never timed or chosen."""


class GpuTimer:
    """timer(problem, candidate) -> seconds per call on this rank's GPU, inside a launch (`ctx`).

    Host objects take M as a bound, so one object serves every M of a (op, N, K, layout) up to `m_bounds`'s
    value for it (default: the problem's own M): tuning the Ms of one GEMM in a row builds each candidate's
    object once. Objects of another GEMM are freed when the next one starts."""

    def __init__(self, ctx, rep_ms: float = 20.0, seed: int = 0, m_bounds: dict | None = None):
        self.ctx, self.rep_ms, self.seed = ctx, rep_ms, seed
        self.m_bounds = m_bounds or {}
        self._inputs: dict = {}
        self._ops: dict = {}  # (schedule, config) -> host object, for the GEMM of self._gemm
        self._gemm = None
        self._spin_rate = None  # torch.cuda._sleep's cycles per second, once measured

    def inputs(self, p: Problem):
        """(this rank's A, B, the float32 reference of this rank's output), drawn once per problem."""
        if p not in self._inputs:
            self._inputs.clear()  # one problem's tensors at a time
            dev, dt, r, W = self.ctx.device, TORCH_DTYPE[p.dtype], self.ctx.rank, p.world
            g = torch.Generator(device=dev).manual_seed(self.seed)
            a_all = [torch.randn(p.M, p.K, device=dev, generator=g).to(dt) for _ in range(W)]
            w = (torch.randn(p.N, p.K, device=dev, generator=g) / p.K ** 0.5).to(dt)
            b = w.t() if p.b_layout == "nk" else w.t().contiguous()
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
        return self.time_gemm(fn, p), self.time_gemm(fn, p, device_alone=True)

    def time_gemm(self, fn, p: Problem, device_alone: bool = False) -> float:
        """Seconds per call of a GEMM of problem p (time_calls with the call count for its flops)."""
        return self.time_calls(fn, max(p.flops / _rates()[0], 2e-6), device_alone)

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
            return self.time_calls(step, max(2 * k.numel() * k.element_size() / _rates()[1], 2e-6))
        finally:
            fd.close()

    @staticmethod
    def gemm(p: Problem | DecodeProblem) -> tuple:
        """The GEMM a problem times (its host objects serve every M up to a bound); a decode step is its own."""
        return (p.kind, p.N, p.K, p.world, p.dtype, p.b_layout) if isinstance(p, Problem) else (p,)

    def close(self) -> None:
        """Free every host object's heap buffers (collective)."""
        if self._ops:
            self.ctx.heap.barrier()
            for op in self._ops.values():
                for buf in op.buffers():
                    self.ctx.heap.free(buf)
        self._ops.clear()

    def time_calls(self, fn, guess_s: float, device_alone: bool = False) -> float:
        """Seconds per call over a fixed count of back-to-back calls, after warm-up. The count comes from
        `guess_s` (a first-order estimate, the same on every rank: collective kernels must be called as often
        on each), not from this rank's own timing.

        device_alone: the calls are queued while a spin kernel holds the GPU for longer than the host takes to
        queue them all (timed first), and timed from the spin's end: the device's time per call with no host
        time between calls, as when a CUDA graph replays them or the host runs ahead. Back to back (the
        default), a call shorter than the host's time per call takes the host's time."""
        # queued calls stay under the driver's queue of pending launches (about a thousand): a full queue
        # would hold the host back while the spin runs, and the calls after it would again wait for the host
        calls = int(min(400 if device_alone else 2000, max(5, self.rep_ms * 1e-3 / guess_s)))
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.ctx.barrier()
        if device_alone:
            host_s = self._host_seconds(fn, calls)
            self.ctx.barrier()
            torch.cuda._sleep(int(1.5 * host_s * self._spin_cycles_per_s()) + 10_000)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / calls

    def _host_seconds(self, fn, calls: int) -> float:
        """Seconds the host takes to queue `calls` calls (the longest of any rank: every rank spins as long)."""
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = torch.tensor([time.perf_counter() - t0], device=self.ctx.device)
        torch.cuda.synchronize()
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(host, op=dist.ReduceOp.MAX)
        return float(host)

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
        from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulAllReduce, FusedMatmulReduceScatter

        if self.gemm(p) != self._gemm:
            self.close()
            self._gemm = self.gemm(p)
        key = (cand.schedule, cand.config)
        op = self._ops.get(key)
        if op is None or (op.M_local if p.kind == "ag_matmul" else op.M) < p.M:
            if op is not None:
                self.ctx.heap.barrier()
                for buf in op.buffers():
                    self.ctx.heap.free(buf)
                del self._ops[key]
            heap, dt, M = self.ctx.heap, TORCH_DTYPE[p.dtype], max(p.M, self.m_bounds.get(self.gemm(p), 0))

            def build():
                if p.kind == "ag_matmul":
                    return FusedAllGatherMatmul(heap, M, p.N, p.K, dt, mode=cand.schedule, config=cand.config,
                                                b_layout=p.b_layout)
                cls = FusedMatmulReduceScatter if p.kind == "matmul_rs" else FusedMatmulAllReduce
                return cls(heap, M, p.N, p.K, dt, config=cand.config, b_layout=p.b_layout, mode=cand.schedule)
            try:
                op = build()
            except HeapExhausted:  # the GEMM's other candidates' objects go (rebuilt when next timed), then again
                gemm = self._gemm
                self.close()
                self._gemm = gemm
                op = build()
            self._ops[key] = op
        return lambda: op(a, b)


class _Progress:
    """One line on stderr per problem, rewritten as its candidates are measured (rank 0 only)."""

    def __init__(self, show: bool):
        self.show, self.problem = show, None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.show:
            import sys

            print(f"\r[tune] {self.problem}: {done}/{total} {label[:60]:60}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)


def tune_in_rank(ctx, problems: list[Problem], gpu: str, keep: int = 12, rep_ms: float = 20.0,
                 progress: bool = True) -> list:
    """Tune `problems` inside a launch (every rank, same list): the Ms of one GEMM one after another, so each
    candidate's host object is built once for them."""
    order = sorted(problems, key=lambda p: (GpuTimer.gemm(p), p.M))
    bounds: dict = {}
    for p in order:
        bounds[GpuTimer.gemm(p)] = max(bounds.get(GpuTimer.gemm(p), 0), p.M)
    report = _Progress(progress and ctx.rank == 0)
    timer = GpuTimer(ctx, rep_ms, m_bounds=bounds)
    tuner = Tuner(timer, gpu, keep=keep, progress=report,
                  num_sms=torch.cuda.get_device_properties(ctx.device).multi_processor_count)
    entries = {}
    try:
        for p in order:
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


__all__ = ["GpuTimer", "UNFUSED", "WrongResult", "gpu_model", "tune_in_rank", "tune_on_gpus"]
