"""One entry point that runs a function on every rank with a symmetric heap.

``launch(fn, world_size, backend=...)`` calls ``fn(ctx, *args, **kwargs)`` once per rank
and returns the per-rank results in rank order. ``ctx`` is a ``RankContext``.

- ``backend="sim"``: ``world_size`` CPU processes (spawn), heaps in shared memory,
  kernels in Triton's interpreter. This is how CI runs distributed kernels.
- ``backend="cuda"``: one process per GPU. Under torchrun (``RANK``/``WORLD_SIZE`` set)
  ``fn`` runs in this process and the results of all ranks are all-gathered; otherwise
  ``launch`` spawns ``world_size`` processes itself (one per local GPU).
- ``backend="auto"``: cuda under torchrun with a GPU, else sim.

``fn`` must be a top-level function of an importable module (spawned processes import
it by name) and its result must pickle. A rank's exception is re-raised here with the
rank and its traceback; ranks still running after ``timeout_s`` are killed
(``LaunchTimeout``).

Example::

    from bspfuse.runtime import launch, iris

    @triton.jit
    def pull(x, out, heap_bases, rank, peer, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out + offs, iris.load(x + offs, rank, peer, heap_bases))

    def work(ctx, n):
        x = ctx.heap.full((n,), float(ctx.rank), name="x")
        out = ctx.heap.zeros(n, name="out")
        ctx.barrier()
        pull[(1,)](x, out, ctx.heap.heap_bases, ctx.rank, (ctx.rank + 1) % ctx.world_size, N=n)
        ctx.barrier()
        return out.cpu()

    results = launch(work, 2, backend="sim", args=(16,))   # [tensor of 1.0, tensor of 0.0]
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from typing import Any, Callable

import torch

from .errors import BspfuseRuntimeError, LaunchTimeout, RankFailed
from .heap import SymmetricHeap

BACKENDS = ("sim", "cuda", "auto")
DEFAULT_HEAP_BYTES = 64 << 20
STARTUP_TIMEOUT_S = 180.0  # spawning, importing torch and attaching heaps
ERROR_GRACE_S = 2.0  # after a rank fails, how long to wait for the others' reports


@dataclass
class RankContext:
    """What ``fn`` gets on every rank."""
    rank: int
    world_size: int
    heap: SymmetricHeap
    backend: str
    device: torch.device

    def barrier(self) -> None:
        """Same as ``heap.barrier()``: all ranks' device work done, all ranks here."""
        self.heap.barrier()


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        from .cuda import under_torchrun
        return "cuda" if torch.cuda.is_available() and under_torchrun() else "sim"
    return backend


def launch(fn: Callable[..., Any], world_size: int, backend: str = "sim",
           heap_bytes: int = DEFAULT_HEAP_BYTES, args: tuple = (), kwargs: dict | None = None,
           timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    ``timeout_s`` bounds the run of ``fn`` (process start-up is bounded separately).
    Under torchrun with backend "cuda" the returned list holds every rank's result.
    """
    kwargs = dict(kwargs or {})
    backend = resolve_backend(backend)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "cuda":
        from .cuda import under_torchrun
        if under_torchrun():
            return _run_under_torchrun(fn, world_size, heap_bytes, args, kwargs, timeout_s)
        if torch.cuda.device_count() < world_size:
            raise RuntimeError(f"backend 'cuda' needs {world_size} GPUs, "
                               f"found {torch.cuda.device_count()}")
    _check_picklable(fn)
    return _Supervisor(fn, world_size, backend, heap_bytes, args, kwargs, timeout_s).run()


# ---- torchrun: this process is one rank ---------------------------------------------

def _run_under_torchrun(fn, world_size, heap_bytes, args, kwargs, timeout_s):
    import torch.distributed as dist
    from .cuda import make_heap
    heap = make_heap(heap_bytes, timeout_s)
    if heap.world_size != world_size:
        raise ValueError(f"launch(world_size={world_size}) under torchrun with "
                         f"WORLD_SIZE={heap.world_size}")
    ctx = RankContext(heap.rank, heap.world_size, heap, "cuda", heap.device)
    try:
        outcome = ("ok", fn(ctx, *args, **kwargs))
    except Exception as e:  # every rank must reach the all-gather below
        outcome = ("err", type(e).__name__, str(e), traceback.format_exc())
    outcomes = [None] * world_size
    dist.all_gather_object(outcomes, outcome)
    for rank, o in enumerate(outcomes):
        if o[0] == "err":
            raise RankFailed(f"rank {rank} raised {o[1]}: {o[2]}\n\n--- traceback from rank "
                             f"{rank} ---\n{o[3]}", rank, o[1], o[3])
    return [o[1] for o in outcomes]


# ---- spawned ranks ------------------------------------------------------------------

def _check_picklable(fn) -> None:
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise TypeError(f"launch needs a top-level function of an importable module (ranks are "
                        f"spawned processes that import it by name); {fn!r} cannot be pickled: "
                        f"{e}") from None


class _Supervisor:
    def __init__(self, fn, world_size, backend, heap_bytes, args, kwargs, timeout_s):
        self.fn, self.world_size, self.backend = fn, world_size, backend
        self.heap_bytes, self.args, self.kwargs = heap_bytes, args, kwargs
        self.timeout_s = timeout_s
        self.results: dict[int, Any] = {}
        self.failures: list[tuple[int, str, str, str, bytes | None]] = []
        self.others_killed: list[int] = []

    def run(self) -> list[Any]:
        mp = multiprocessing.get_context("spawn")
        segments, procs, conns = [], [], []
        setup: dict[str, Any] = {"backend": self.backend, "heap_bytes": self.heap_bytes,
                                 "timeout_s": self.timeout_s}
        env = {}
        if self.backend == "sim":
            from . import sim
            segments = sim.create_segments(self.world_size, self.heap_bytes)
            setup["segments"] = [s.name for s in segments]
            setup["barrier"] = mp.Barrier(self.world_size)
            env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        else:
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                   "WORLD_SIZE": str(self.world_size)}
        try:
            for rank in range(self.world_size):
                parent_end, child_end = mp.Pipe(duplex=False)
                p = mp.Process(target=_rank_main, name=f"bspfuse-rank{rank}", daemon=True,
                               args=(rank, self.world_size, setup, child_end, self.fn,
                                     self.args, self.kwargs))
                rank_env = dict(env, **({"RANK": str(rank), "LOCAL_RANK": str(rank)}
                                        if self.backend == "cuda" else {}))
                with _environment(rank_env):
                    p.start()
                child_end.close()
                procs.append(p)
                conns.append(parent_end)
            self._supervise(procs, conns)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
            for c in conns:
                c.close()
            if segments:
                from . import sim
                sim.destroy_segments(segments)
        if self.failures:
            self._raise_failure()
        return [self.results[r] for r in range(self.world_size)]

    def _supervise(self, procs, conns) -> None:
        pending = set(range(self.world_size))
        ready: set[int] = set()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        give_up_at = None  # set when the first failure arrives
        started = False
        while pending:
            now = time.monotonic()
            limit = deadline if give_up_at is None else min(deadline, give_up_at)
            if now >= limit:
                break
            wait_for([conns[r] for r in pending] + [procs[r].sentinel for r in pending],
                     timeout=limit - now)
            for r in sorted(pending):
                state = self._drain(r, conns[r], ready)
                if state == "closed" or (state == "open" and not procs[r].is_alive()
                                         and not conns[r].poll()):
                    procs[r].join(1)
                    self.failures.append((r, "ProcessDied", f"rank {r} exited with code "
                                          f"{procs[r].exitcode} without reporting a result",
                                          "", None))
                    state = "done"
                if state == "done":
                    pending.discard(r)
            if not started and len(ready) == self.world_size:  # fn starts now on every rank
                started = True
                deadline = time.monotonic() + self.timeout_s
            if self.failures and give_up_at is None:
                give_up_at = time.monotonic() + ERROR_GRACE_S
        if pending and not self.failures:
            what = (f"did not finish within timeout_s={self.timeout_s:g}" if started else
                    f"did not start within {STARTUP_TIMEOUT_S:g} s")
            hint = (" A rank is probably spinning on a flag nobody sets: pass MAX_SPINS > 0 "
                    "and an error buffer to iris.wait_until to get the flag's name."
                    if started else "")
            raise LaunchTimeout(
                f"{self.backend} launch of {_qualname(self.fn)} on {self.world_size} ranks: "
                f"ranks {sorted(pending)} {what} and were killed (finished: "
                f"{sorted(self.results)}).{hint}")
        self.others_killed = sorted(pending)

    def _drain(self, rank, conn, ready) -> str:
        """Read what ``rank`` sent: "done" (result or error), "closed" (pipe ended) or "open"."""
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "ready":
                    ready.add(rank)
                elif msg[0] == "ok":
                    self.results[rank] = pickle.loads(msg[1])
                    return "done"
                else:
                    self.failures.append((rank, msg[1], msg[2], msg[3], msg[4]))
                    return "done"
        except (EOFError, OSError):
            return "closed"
        return "open"

    def _raise_failure(self) -> None:
        rank, type_name, message, tb, exc_bytes = self.failures[0]
        others = [f"rank {r} ({t})" for r, t, *_ in self.failures[1:]]
        killed = self.others_killed
        notes = []
        if others:
            notes.append("also failed: " + ", ".join(others))
        if killed:
            notes.append(f"killed after the failure: ranks {killed}")
        text = f"rank {rank} raised {type_name}: {message}" if not message.startswith(
            f"rank {rank}") else message
        if notes:
            text += "\n(" + "; ".join(notes) + ")"
        if tb:
            text += f"\n\n--- traceback from rank {rank} ---\n{tb}"
        original = None
        if exc_bytes is not None:
            try:
                original = pickle.loads(exc_bytes)
            except Exception:
                original = None
        if isinstance(original, BspfuseRuntimeError) and not isinstance(original, RankFailed):
            err = type(original).__new__(type(original))
            err.args = (text,)
            err.rank, err.remote_type, err.remote_traceback = rank, type_name, tb
            raise err from None
        raise RankFailed(text, rank, type_name, tb) from None


def _rank_main(rank, world_size, setup, conn, fn, args, kwargs) -> None:
    """Body of a spawned rank process."""
    try:
        heap = _make_rank_heap(rank, world_size, setup)
        conn.send(("ready",))
        if setup["backend"] == "sim":  # every rank has mapped every heap
            heap._backing.barrier(timeout_s=STARTUP_TIMEOUT_S)
        ctx = RankContext(rank, world_size, heap, setup["backend"], heap.device)
        result = fn(ctx, *args, **kwargs)
        payload = pickle.dumps(_portable(result))
        if setup["backend"] == "cuda":
            torch.cuda.synchronize()
        conn.send(("ok", payload))
    except BaseException as e:
        try:
            exc_bytes = pickle.dumps(e)
        except Exception:
            exc_bytes = None
        conn.send(("err", type(e).__name__, str(e), traceback.format_exc(), exc_bytes))
    finally:
        conn.close()


def _make_rank_heap(rank, world_size, setup) -> SymmetricHeap:
    if setup["backend"] == "sim":
        from . import sim
        torch.set_num_threads(1)
        sim.patch_interpreter()
        backing = sim.SharedMemoryBacking(rank, world_size, setup["segments"],
                                          setup["heap_bytes"], setup["barrier"],
                                          max(setup["timeout_s"], 1.0))
        return SymmetricHeap(setup["heap_bytes"], backing=backing)
    from .cuda import make_heap
    return make_heap(setup["heap_bytes"], setup["timeout_s"])


def _portable(value):
    """Results travel by pickle: copy tensors out of the heap into compact CPU tensors."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone(memory_format=torch.contiguous_format)
    if isinstance(value, (list, tuple)):
        items = [_portable(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


class _environment:
    """Set environment variables while child processes start (spawn copies os.environ)."""

    def __init__(self, values: dict[str, str]):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
