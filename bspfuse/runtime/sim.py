"""The simulator backend: N ranks as N CPU processes, each heap a shared-memory segment.

Every rank process maps every rank's segment, so ``heap_bases[r]`` is this process's
address of rank r's heap and ``iris.translate`` works exactly as on GPUs. Kernels run
in Triton's interpreter (``TRITON_INTERPRET=1`` is set for the child processes before
they import anything), so remote loads, stores, atomics and spin-waits are real
accesses to shared memory by concurrent processes.

What the interpreter does and does not give (triton 3.6):
- 32- and 64-bit integer and float atomics are ``std::atomic`` operations on the raw
  address: hardware atomics, correct across processes.
- 16-bit float ``atomic_add`` (fp16) is guarded by a process-local mutex, so it is NOT
  atomic across processes, and bf16 ``atomic_add``/``atomic_xchg`` are not supported
  at all. ``patch_interpreter`` replaces both with a compare-and-swap loop on the
  aligned 32-bit word around the element (real hardware CAS).
- The interpreter runs the programs of a launch one after another. ``patch_interpreter``
  runs them as a GPU does instead: concurrently, each program a thread, one running at a
  time (``Programs``). A program hands over when it spins on a flag (it read the same
  value twice) or raises one, so a comm program moves a tile while the GEMM programs
  compute, and a program may wait for any other program of its launch. Programs start
  in order, a new one when the running one finishes or hands over as the last started,
  so a launch that never waits runs exactly as before. When every started program of
  every launch on this rank spins, the rank sleeps 0.2 ms before the next hand-over,
  leaving the core to the rank that will write the flag (world sizes above the core
  count still make progress quickly).
- Calls of ``@triton.jit`` device functions from a kernel re-patch ``triton.language``
  each time (about 2 ms a call); ``patch_interpreter`` skips that while a kernel runs,
  which makes kernels that call ``iris.*`` in loops about 1.5x faster.
- Given the rank's progress record (``launch.RankProgress``), ``patch_interpreter`` keeps
  it up to date as kernels run: the kernel's name, the program running and, in the fused
  GEMMs, the tiles begun (the generated kernels map every tile through one call of
  ``runtime.tiles.swizzle``). The launcher shows it.
"""
from __future__ import annotations

import ctypes
import inspect
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import torch
import triton

from .errors import BspfuseRuntimeError


class SharedMemoryBacking:
    """Maps every rank's segment into this process; ``buffer`` is this rank's."""

    def __init__(self, rank: int, world_size: int, names: list[str], nbytes: int,
                 barrier, barrier_timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self._segments = [shared_memory.SharedMemory(name=n) for n in names]
        self._views = [torch.frombuffer(s.buf, dtype=torch.uint8, count=nbytes)
                       for s in self._segments]
        self.buffer = self._views[rank]
        self.bases = [v.data_ptr() for v in self._views]
        self._barrier = barrier
        self._barrier_timeout_s = barrier_timeout_s

    def barrier(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self._barrier_timeout_s
        try:
            self._barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            raise BspfuseRuntimeError(
                f"rank {self.rank}: heap.barrier() broke: another rank failed or did not "
                f"reach the barrier within {timeout_s:g} s") from None

    def peer_buffer(self, rank: int) -> torch.Tensor:
        return self._views[rank]


def create_segments(world_size: int, nbytes: int) -> list[shared_memory.SharedMemory]:
    """The parent makes one zero-filled segment per rank (pages are allocated lazily)."""
    segments = []
    try:
        for _ in range(world_size):
            segments.append(shared_memory.SharedMemory(create=True, size=nbytes))
    except BaseException:
        destroy_segments(segments)
        raise
    return segments


def destroy_segments(segments) -> None:
    for s in segments:
        try:
            s.close()
            s.unlink()
        except (FileNotFoundError, BufferError):
            pass


# ---- interpreter patches (applied in each simulated rank) ----------------------------

_patched = False
SPIN_BACKOFF_S = 2e-4


def patch_interpreter(progress=None) -> None:
    """Make the interpreter's atomics cross-process safe and let spinning ranks yield; with
    ``progress`` (a ``launch.RankProgress``), count the running kernel's programs and tiles in it."""
    global _patched
    if _patched:
        return
    from triton.runtime import interpreter
    interpreter._interpreter = _CrossProcessAtomics(interpreter._interpreter)
    _patch_concurrent_programs(interpreter)
    _patch_nested_calls(interpreter)
    _patch_bf16_dot(interpreter)
    if progress is not None:
        _patch_progress(interpreter, progress)
    _patched = True


TILE_FUNCTION = "swizzle"  # runtime.tiles: every fused GEMM tile starts with one call of it


def _patch_progress(interpreter, progress) -> None:
    """Write what the interpreter runs into ``progress``: each launch's kernel name and program count,
    the program it is on (the grid runs one program after another), and a tile at each call of
    TILE_FUNCTION. A few integer stores a call, against milliseconds the call itself takes."""
    executor, function = interpreter.GridExecutor, interpreter.InterpretedFunction
    builder = interpreter.InterpreterBuilder
    run_grid, call = executor.__call__, function.__call__
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def grid_call(self, *args, **kwargs):
        progress.kernel(self.fn.__name__)
        return run_grid(self, *args, **kwargs)

    def device_call(self, *args, **kwargs):
        if self.fn.__name__ == TILE_FUNCTION:
            progress.tile()
        return call(self, *args, **kwargs)

    def set_grid_dim(self, nx, ny, nz):
        progress.programs(nx * ny * nz)
        return set_dim(self, nx, ny, nz)

    def set_grid_idx(self, x, y, z):
        _, ny, nz = self.grid_dim
        progress.program((x * ny + y) * nz + z + 1)
        return set_idx(self, x, y, z)

    executor.__call__, function.__call__ = grid_call, device_call
    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx


def _patch_bf16_dot(interpreter) -> None:
    """tl.dot on bf16 operands: the interpreter keeps bf16 as raw uint16 bits and multiplies
    the bits (triton 3.6). Widen bf16 operands to float32 first, as the tensor cores would."""
    builder = interpreter.InterpreterBuilder
    dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == interpreter.tl.bfloat16:
            bits = h.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


# ---- the programs of a launch, run concurrently

_thread = threading.local()


def _program_state():
    """The calling program's state (its last flag read); outside a launch, the thread's."""
    if not hasattr(_thread, "last_read"):
        _thread.last_read = None
    return _thread


class _Abort(BaseException):
    """Unwinds a program whose launch failed in another program."""


class Programs:
    """The programs of one launch, each a thread, one running at a time: the running program holds the turn
    and hands it over at a flag (``hand_over``), as an SM's warps leave the issue slots to others while they
    poll. The order is round robin over started programs; the last started hands over to a new program
    while there are any, so every program starts within one round (a persistent kernel's programs are all
    resident on a GPU). One error stops every program and is raised from ``run``."""

    current: "Programs | None" = None  # the launch running in this process (launches do not nest)

    def __init__(self, count: int, body):
        self.count, self.body = count, body
        self.cv = threading.Condition()
        self.started, self.live, self.spinning = 0, [], set()
        self.turn, self.error = None, None

    def run(self) -> None:
        if self.count == 1:  # nothing to interleave
            self.body(0)
            return
        Programs.current = self
        try:
            with self.cv:
                self._start()
                self.cv.wait_for(lambda: self.error is not None or (not self.live and self.started == self.count))
                error = self.error
                if error is not None:  # the others unwind (_Abort) at their next turn
                    self.cv.wait_for(lambda: not self.live)
        finally:
            Programs.current = None
        if error is not None:
            raise error

    @staticmethod
    def hand_over(spinning: bool) -> None:
        """Called by the running program at a flag read that saw nothing new (spinning) or a flag write."""
        self = Programs.current
        if self is None or getattr(_thread, "program", None) is None:
            if spinning:
                time.sleep(SPIN_BACKOFF_S)
            return
        me = _thread.program
        with self.cv:
            if spinning:
                self.spinning.add(me)
            else:
                self.spinning.clear()
            if spinning and self.started == self.count and self.spinning >= set(self.live):
                time.sleep(SPIN_BACKOFF_S)  # every program waits for another rank: give it the core
            self._pass(me)
            self.cv.wait_for(lambda: self.turn == me or self.error is not None)
            if self.error is not None:
                raise _Abort()

    @staticmethod
    def progressed() -> None:
        self = Programs.current
        if self is not None:
            self.spinning.clear()

    def _start(self) -> None:
        i = self.started
        self.started += 1
        self.live.append(i)
        self.turn = i
        threading.Thread(target=self._program, args=(i,), name=f"program {i}", daemon=True).start()

    def _pass(self, me: int) -> None:
        """The turn goes to the next started program, or to a new one after the last started."""
        at = self.live.index(me)
        if at == len(self.live) - 1 and self.started < self.count:
            self._start()
        else:
            self.turn = self.live[(at + 1) % len(self.live)]
        self.cv.notify_all()

    def _program(self, i: int) -> None:
        _thread.program, _thread.last_read = i, None
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i or self.error is not None)
        try:
            if self.error is None:
                self.body(i)
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - raised again by run()
            with self.cv:
                self.error = self.error or e
        finally:
            with self.cv:
                at = self.live.index(i)
                self.live.remove(i)
                self.spinning.discard(i)
                if self.error is None and (self.live or self.started < self.count):
                    if self.started < self.count:
                        self._start()
                    else:
                        self.turn = self.live[at % len(self.live)]
                self.cv.notify_all()


def _patch_concurrent_programs(interpreter) -> None:
    """Run a launch's programs as ``Programs`` instead of one after another. The builder's program index
    becomes per thread; the rest of GridExecutor.__call__ is triton 3.6's."""
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    needed = ("_init_args_hst", "_restore_args_dev")
    if not all(hasattr(executor, n) for n in needed) or not hasattr(interpreter, "_implicit_cvt"):
        return  # another triton version: keep its behaviour
    builder.grid_idx = property(lambda self: getattr(_thread, "grid_idx", None),
                                lambda self, value: setattr(_thread, "grid_idx", value))
    run_builder = interpreter.interpreter_builder

    def grid_call(self, *args_dev, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = interpreter._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else interpreter._implicit_cvt(arg)
                    for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1, ) * (3 - len(grid))
            run_builder.set_grid_dim(*grid)
            _, ny, nz = grid

            def program(i: int) -> None:
                run_builder.set_grid_idx(i // (ny * nz), i // nz % ny, i % nz)
                self.fn(**args)

            try:
                Programs(grid[0] * ny * nz, program).run()
            except Exception as e:
                if triton.knobs.compilation.front_end_debugging:
                    raise
                raise interpreter.InterpreterError(repr(e)) from e
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    executor.__call__ = grid_call


def _patch_nested_calls(interpreter) -> None:
    """Skip re-patching triton.language on every nested @triton.jit call.

    The interpreter rebuilds its patches of ``triton.language`` (``inspect.getmembers``
    over the whole module) at each call of a device function from a kernel, about 2 ms
    a call: most of the time of a kernel that calls ``iris.*`` in a loop. While a
    kernel runs, the modules it sees are already patched, so a nested call whose
    language modules are among them can skip that step.
    """
    executor, function = interpreter.GridExecutor, interpreter.InterpretedFunction
    if not (hasattr(interpreter, "_patch_lang") and hasattr(function, "rewrite")):
        return  # another triton version: keep its behaviour
    patched: list[frozenset] = []  # language modules patched by the running kernels
    langs_of: dict = {}

    def langs(fn) -> frozenset:
        if fn not in langs_of:
            langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                     if v is interpreter.tl or v is interpreter.tl.core)
        return langs_of[fn]

    run_grid = executor.__call__

    def grid_call(self, *args, **kwargs):
        patched.append(langs(self.fn))
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched.pop()

    def device_call(self, *args, **kwargs):
        need = langs(self.fn)
        if not patched or not need <= patched[-1]:
            interpreter._patch_lang(self.fn)
            if patched:
                patched[-1] = patched[-1] | need
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    executor.__call__ = grid_call
    function.__call__ = device_call


class _CrossProcessAtomics:
    """Wraps ``triton._C.libtriton.interpreter``; forwards everything it does not fix."""

    def __init__(self, native):
        self._native = native
        self._fadd, self._xchg = native.RMW_OP.FADD, native.RMW_OP.XCHG
        self._add = native.RMW_OP.ADD

    def __getattr__(self, name):
        return getattr(self._native, name)

    def atomic_rmw(self, op, ptr, val, mask, sem):
        if val.dtype.itemsize == 2 and op in (self._fadd, self._xchg):
            return self._rmw16(op, ptr, val, mask, sem)
        out = self._native.atomic_rmw(op, ptr, val, mask, sem)
        if val.dtype.kind in "iu":
            if op == self._add and not val.any():
                self._after_flag_read(ptr, out)  # an atomic add of 0 reads a flag
            elif op in (self._add, self._xchg):
                Programs.hand_over(spinning=False)  # a flag raised: let the programs that wait for it run
        return out

    def atomic_cas(self, ptr, cmp, val, sem):
        out = self._native.atomic_cas(ptr, cmp, val, sem)
        if np.array_equal(cmp, val):
            self._after_flag_read(ptr, out)  # a CAS that cannot change anything reads a flag
        return out

    @staticmethod
    def _after_flag_read(ptr, seen) -> None:
        """A program that reads the same flag value again is spinning: it hands over (Programs)."""
        state = _program_state()
        key = (ptr.tobytes(), seen.tobytes())
        spinning = key == state.last_read
        state.last_read = key
        if spinning:
            Programs.hand_over(spinning=True)
        else:
            Programs.progressed()

    def _rmw16(self, op, ptr, val, mask, sem):
        ptrs = ptr.reshape(-1)
        vals = np.broadcast_to(val, ptr.shape).reshape(-1).view(np.uint16)
        masks = np.broadcast_to(mask, ptr.shape).reshape(-1)
        old = np.zeros(ptrs.shape, dtype=np.uint16)
        is_bf16 = val.dtype == np.uint16  # the interpreter stores bf16 as its bits
        for i in range(ptrs.size):
            if masks[i]:
                old[i] = self._cas_loop16(int(ptrs[i]), int(vals[i]), op, is_bf16, sem)
        return old.view(val.dtype).reshape(ptr.shape)

    def _cas_loop16(self, addr: int, value_bits: int, op, is_bf16: bool, sem) -> int:
        word_addr, shift = addr & ~3, (addr & 2) * 8
        word_ptr = np.array([word_addr], dtype=np.uint64)
        current = ctypes.c_uint32.from_address(word_addr).value
        while True:
            old_bits = (current >> shift) & 0xFFFF
            new_bits = value_bits if op == self._xchg else _add16(old_bits, value_bits, is_bf16)
            desired = (current & ~(0xFFFF << shift) & 0xFFFFFFFF) | (new_bits << shift)
            seen = int(self._native.atomic_cas(word_ptr, np.array([current], dtype=np.uint32),
                                               np.array([desired], dtype=np.uint32), sem)[0])
            if seen == current:
                return old_bits
            current = seen


def _add16(a_bits: int, b_bits: int, is_bf16: bool) -> int:
    """Round-to-nearest-even sum of two 16-bit floats given as bits (exact in float64)."""
    if is_bf16:
        a, b = (float(np.array(x << 16, dtype=np.uint32).view(np.float32))
                for x in (a_bits, b_bits))
        s = torch.tensor(a + b, dtype=torch.float64).to(torch.bfloat16)
        return int(s.view(torch.int16).item()) & 0xFFFF
    a, b = (float(np.array(x, dtype=np.uint16).view(np.float16)) for x in (a_bits, b_bits))
    return int(np.array(a + b, dtype=np.float16).view(np.uint16))
