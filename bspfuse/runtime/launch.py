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

Spawned ranks show their progress on stderr: a line per rank with what ``fn`` said it runs
(``report_progress``), the tiles or programs of the running kernel in the simulator, and the
time. On a terminal the lines are redrawn every second; elsewhere (a log) they come every
10 s once a launch has run 5 s. ``progress=False`` or ``BSPFUSE_PROGRESS=0`` turns them off,
``progress=True`` or ``BSPFUSE_PROGRESS=1`` shows them every second anywhere.

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

import ctypes
import multiprocessing
import os
import pickle
import shutil
import socket
import sys
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
           timeout_s: float = 300.0, progress: bool | None = None) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    ``timeout_s`` bounds the run of ``fn`` (process start-up is bounded separately).
    Under torchrun with backend "cuda" the returned list holds every rank's result.
    ``progress``: show the spawned ranks' progress on stderr (None: BSPFUSE_PROGRESS, else
    on a terminal, or in a log once the launch has run a few seconds; see the module's text).
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
    return _Supervisor(fn, world_size, backend, heap_bytes, args, kwargs, timeout_s, progress).run()


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
    def __init__(self, fn, world_size, backend, heap_bytes, args, kwargs, timeout_s, progress=None):
        self.fn, self.world_size, self.backend = fn, world_size, backend
        self.heap_bytes, self.args, self.kwargs = heap_bytes, args, kwargs
        self.timeout_s = timeout_s
        self.progress = progress
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
        records = [RankProgress(mp) for _ in range(self.world_size)]
        lines = _ProgressLines(records, self.fn, self.progress)
        try:
            for rank in range(self.world_size):
                parent_end, child_end = mp.Pipe(duplex=False)
                p = mp.Process(target=_rank_main, name=f"bspfuse-rank{rank}", daemon=True,
                               args=(rank, self.world_size, setup, child_end, self.fn,
                                     self.args, self.kwargs, records[rank]))
                rank_env = dict(env, **({"RANK": str(rank), "LOCAL_RANK": str(rank)}
                                        if self.backend == "cuda" else {}))
                with _environment(rank_env):
                    p.start()
                child_end.close()
                procs.append(p)
                conns.append(parent_end)
            self._supervise(procs, conns, lines)
        finally:
            lines.close()
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

    def _supervise(self, procs, conns, lines: "_ProgressLines") -> None:
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
            lines.show(now, ready, pending)
            wait_for([conns[r] for r in pending] + [procs[r].sentinel for r in pending],
                     timeout=max(0.0, min(limit, lines.next_at) - now))
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


# ---- progress: what each spawned rank runs, on the launcher's stderr ---------------------

PROGRESS_ENV = "BSPFUSE_PROGRESS"  # "0": never, "1": every second anywhere; unset: see _ProgressLines
_SETTINGS = {"0": False, "off": False, "no": False, "1": True, "on": True, "yes": True}
TERMINAL_EVERY_S = 1.0
LOG_AFTER_S, LOG_EVERY_S = 5.0, 10.0  # not a terminal: the first lines after 5 s, then every 10 s


class RankProgress:
    """One rank's progress in shared memory: the rank writes it (``report_progress``, and the
    simulator as a kernel runs), the launcher reads it. Numbers are single int64 stores; the two
    names are guarded by a sequence number, so a reader never sees half of one and half of the
    next."""

    SEQ, SINCE_NS, STEP, STEPS, TILES, TILE_COUNT, PROGRAM, PROGRAMS = range(8)
    TEXT = 120

    def __init__(self, mp):
        self.numbers = mp.RawArray(ctypes.c_int64, 8)
        self.what = mp.RawArray(ctypes.c_char, self.TEXT)
        self.kernel_name = mp.RawArray(ctypes.c_char, self.TEXT)

    # the rank's side
    def start(self, what: str, step: int, steps: int, tiles: int) -> None:
        n = self.numbers
        n[self.SEQ] += 1  # odd: the names are being written
        self.what.value = what.encode()[:self.TEXT - 1]
        self.kernel_name.value = b""
        n[self.SEQ] += 1
        n[self.SINCE_NS] = time.monotonic_ns()
        n[self.STEP], n[self.STEPS], n[self.TILES], n[self.TILE_COUNT] = step, steps, tiles, 0
        n[self.PROGRAM] = n[self.PROGRAMS] = 0

    def kernel(self, name: str) -> None:
        n = self.numbers
        n[self.SEQ] += 1
        self.kernel_name.value = name.encode()[:self.TEXT - 1]
        n[self.SEQ] += 1

    def programs(self, count: int) -> None:
        self.numbers[self.PROGRAM], self.numbers[self.PROGRAMS] = 0, count

    def program(self, index: int) -> None:
        self.numbers[self.PROGRAM] = index

    def tile(self) -> None:
        self.numbers[self.TILE_COUNT] += 1

    # the launcher's side
    def read(self) -> tuple[str, str, list[int]] | None:
        """(what, kernel, numbers), or None before the rank said anything."""
        n = self.numbers
        for _ in range(100):
            seq = n[self.SEQ]
            if seq % 2 == 0:
                what, kernel, numbers = self.what.value.decode(errors="replace"), \
                    self.kernel_name.value.decode(errors="replace"), list(n)
                if n[self.SEQ] == seq:
                    return (what, kernel, numbers) if seq else None
            time.sleep(1e-4)
        return None


_progress: RankProgress | None = None  # in a spawned rank: its record


def report_progress(what: str, step: int = 0, steps: int = 0, tiles: int = 0) -> None:
    """Tell the launcher what this rank runs now; its progress line shows ``what``, ``step`` of
    ``steps`` when given, and the time since this call. ``tiles``: the tiles the kernel about to
    run walks, when the caller knows (the simulator counts them as they finish). Does nothing
    outside a spawned rank (under torchrun, or in the launching process)::

        report_progress(f"%{name} fused_allgather_matmul", step=2, steps=5, tiles=64)
    """
    if _progress is not None:
        _progress.start(what, step, steps, tiles)


class _ProgressLines:
    """The launcher's stderr lines, one per rank: on a terminal redrawn in place every second (and
    cleared at the end), elsewhere printed as they are every LOG_EVERY_S once the launch has run
    LOG_AFTER_S, so a test log or a pipe gets nothing from a short launch."""

    def __init__(self, records: list[RankProgress], fn, enabled: bool | None, stream=None):
        self.records, self.fn_name = records, getattr(fn, "__name__", "fn")
        self.stream = stream or sys.stderr
        self.terminal = _isatty(self.stream)
        if enabled is None:
            enabled = _SETTINGS.get(os.environ.get(PROGRESS_ENV, "").strip().lower())  # None when unset
        often = enabled or self.terminal
        first, self.every = (TERMINAL_EVERY_S, TERMINAL_EVERY_S) if often else (LOG_AFTER_S, LOG_EVERY_S)
        self.start = time.monotonic()
        self.next_at = self.start + first if enabled is not False else float("inf")
        self.drawn = 0  # lines on the terminal to redraw

    def show(self, now: float, ready: set[int], pending: set[int]) -> None:
        if now < self.next_at:
            return
        self.next_at = now + self.every
        width = shutil.get_terminal_size().columns - 1 if self.terminal else None
        lines = [_fit(*self._line(r, now, r in ready, r in pending), width) for r in range(len(self.records))]
        if self.terminal:
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        else:
            self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:  # the results follow where the progress was
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.flush()
            self.drawn = 0

    def _line(self, rank: int, now: float, ready: bool, pending: bool) -> tuple[str, str, str]:
        """(head, what the rank runs, how far it is): on a terminal, `what` gives way to fit its width."""
        head = f"[{_duration(now - self.start)}] rank {rank}: "
        if not pending:
            return head, "done", ""
        said = self.records[rank].read()
        if said is None:
            return head, f"running {self.fn_name}" if ready else "starting (imports, heap)", ""
        what, kernel, n = said
        since = n[RankProgress.SINCE_NS] / 1e9 or self.start  # 0: fn never said what it runs
        what, op = what or f"running {self.fn_name}", now - since
        step = f"op {n[RankProgress.STEP]}/{n[RankProgress.STEPS]} " if n[RankProgress.STEPS] else ""
        # the item running now, of how many: the tiles the caller announced, else the grid's programs
        at, total, unit = n[RankProgress.TILE_COUNT], n[RankProgress.TILES], "tile"
        if not total and n[RankProgress.PROGRAMS] > 1:
            at, total, unit = n[RankProgress.PROGRAM], n[RankProgress.PROGRAMS], f"{kernel} program"
        work = f", {unit} {at}/{total}" if total else (f", {kernel}" if kernel else "")
        rest = op * (total - at + 1) / (at - 1) if total and at > 1 else 0  # the items before this one took op
        left = f", about {_duration(rest)} left" if rest >= 1 else ""
        return head, f"{step}{what}", f"{work}, {_duration(op)}{left}"


def _fit(head: str, what: str, tail: str, width: int | None) -> str:
    over = len(head) + len(what) + len(tail) - width if width else 0
    if over > 0:
        what = what[:max(8, len(what) - over - 3)] + "..."
    return (head + what + tail)[:width] if width else head + what + tail


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _rank_main(rank, world_size, setup, conn, fn, args, kwargs, progress=None) -> None:
    """Body of a spawned rank process."""
    global _progress
    _progress = progress
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
        sim.patch_interpreter(_progress)
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
