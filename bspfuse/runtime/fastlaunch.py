"""Launch a compiled Triton kernel again without the JIT's per-call dispatch.

``kernel[grid](*args, **meta)`` does a lot of Python on every call before the kernel starts: it binds
and specializes every argument (dtype, 16-byte alignment of pointers, integers equal to 1 or multiples
of 16), formats the options into a cache key, looks the compiled kernel up, checks the kernel's globals
and builds launch metadata for the profiler hooks. For a decode step that is a few kernels of 20-50
arguments, this dispatch is a large part of the step. ``FastLaunch`` fixes the grid and the
constexprs/options once; its first call goes through the JIT (compiling if needed) and remembers the
compiled kernel's launcher, function handle and packed metadata together with the specialization of
every argument. A later call re-specializes only the arguments that are not the very objects of the
previous call, and if nothing changed it calls the launcher directly (Triton's CUDA launcher: its C entry
point, with the scratch memory and the descriptors' TMA maps it would prepare again at every launch
kept from earlier launches; see _c_entry)::

    merge = FastLaunch(decode_kernels(0)["merge_splits"], (tiles,), GROUP=4, HEAD_TILES=1, ..., num_warps=4)
    merge(o, lse, out_o, out_lse, n, ...)        # the JIT; then the compiled kernel's launcher

It falls back to the JIT whenever the direct path does not apply: in Triton's interpreter (no compiled
kernel), with launch hooks installed (a profiler sees every launch as usual), on a device or argument
specialization not seen before (the JIT compiles it; the next call is direct again), on another Triton
version than the one whose launcher convention this follows, or with ``BSPFUSE_FAST_LAUNCH=0``.

Like a CUDA graph, the direct path keeps the address of every tensor it has checked and passes the
same tensor object by that address from then on: a tensor must not get new storage in place (``set_``,
a growing ``resize_``) between launches. A new tensor object is always checked again.
"""
from __future__ import annotations

import os
from itertools import compress
from operator import is_not

import triton

# Triton 3.6's JITFunction.run ends in
#   kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
#              enter_hook, exit_hook, *every_parameter_value)
# (constexprs included); other versions order or filter these differently.
LAUNCHER_CONVENTION_VERSIONS = ("3.6.",)


def fast_launch_enabled() -> bool:
    return (os.environ.get("BSPFUSE_FAST_LAUNCH", "1") != "0"
            and triton.__version__.startswith(LAUNCHER_CONVENTION_VERSIONS))


class _Plan:
    """A compiled kernel at one specialization, and the arguments of its last launch."""

    __slots__ = ("launcher", "function", "metadata", "device", "specs", "args", "values", "entry", "descs",
                 "desc_metas", "desc_args", "scratch", "scratch_size", "scratch_align", "cooperative", "pdl")

    def __init__(self, compiled, device, specs):
        self.launcher = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.device = device
        self.specs = specs
        self.entry = None  # the launcher's C entry point, where it can be called directly (_c_entry)
        c_entry = _c_entry(compiled.run)
        if c_entry is not None:
            self.entry, self.descs, self.desc_metas = c_entry
            self.desc_args = [None] * len(self.descs)  # per descriptor: (what it described, its launch arguments)
            run = compiled.run
            self.scratch, self.scratch_align = {}, run.global_scratch_align
            self.scratch_size = run.global_scratch_size * run.num_ctas
            self.cooperative, self.pdl = run.launch_cooperative_grid, run.launch_pdl

    def rebind(self, args) -> None:
        self.args = list(args)
        # tensors the JIT just checked go to the launcher as addresses (no per-call pointer query)
        self.values = [a.data_ptr() if hasattr(a, "data_ptr") else a for a in args]

    def launch(self, grid, stream, tail) -> None:
        if self.entry is None:
            self.launcher(grid[0], grid[1], grid[2], stream, self.function, self.metadata, None, None, None,
                          *self.values, *tail)
            return
        values = self.values if not self.descs else self._with_descriptors_expanded()
        self.entry(grid[0], grid[1], grid[2], stream, self.function, self.cooperative, self.pdl,
                   self._scratch(grid, stream), None, self.metadata, None, None, None, *values, *tail)

    def _scratch(self, grid, stream):
        """The global scratch of a kernel that makes descriptors on the device. Triton asks the allocator for
        it at every launch; launches on one stream run one after another, so the first one of each stream
        serves them all (as an address, which the launcher takes without a pointer query)."""
        if not self.scratch_size:
            return None
        kept = self.scratch.get(stream)
        if kept is None:
            from triton.runtime import _allocation
            size = grid[0] * grid[1] * grid[2] * self.scratch_size
            buf = _allocation._allocator.get()(size, self.scratch_align, stream)
            kept = self.scratch[stream] = (buf, buf.data_ptr())
        return kept[1]

    def _with_descriptors_expanded(self) -> list:
        """The arguments with each host tensor descriptor expanded as Triton's launcher expands it (a TMA map
        encoded by the driver, then shape and strides). A descriptor's expansion is kept while it describes
        the same memory, shape, strides and block: a weight's is encoded once, not at every launch."""
        from triton.backends.nvidia.driver import make_tensordesc_arg
        values, out, start = self.values, [], 0
        for k, i in enumerate(self.descs):
            out += values[start:i]
            d = values[i]
            what = (d.base.data_ptr(), *d.shape, *d.strides, *d.block_shape, d.padding)
            kept = self.desc_args[k]
            if kept is None or kept[0] != what:
                expanded = make_tensordesc_arg(d, self.desc_metas[k])
                if hasattr(expanded[0], "data_ptr"):  # a descriptor passed as pointer, shape and strides
                    expanded[0] = expanded[0].data_ptr()
                kept = self.desc_args[k] = (what, expanded)
            out += kept[1]
            start = i + 1
        out += values[start:]
        return out


def _c_entry(run):
    """(C entry point, indices of descriptor arguments, their TMA metadata) of Triton 3.6's CUDA launcher, or
    None for any other launcher (a stand-in driver, another backend): then the launcher is called as is.

    CudaLauncher.__call__ asks the allocator for scratch memory and, for kernels with tensor-descriptor
    arguments, wraps the C function in Python that encodes every descriptor's TMA map again: both at
    every launch. Calling the C function with both prepared saves that host time on every call."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except ImportError:
        return None
    if type(run) is not CudaLauncher or run.profile_scratch_size:
        return None
    entry = run.launch
    code = getattr(entry, "__code__", None)
    if code is None:  # no descriptor arguments: the C function itself
        return entry, (), ()
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in entry.__closure__ or ())))
    if not {"launcher", "tensordesc_indices", "tensordesc_meta"} <= cells.keys():
        return None  # a wrapper this does not know
    descs = tuple(sorted(cells["tensordesc_indices"]))
    return cells["launcher"], descs, tuple(cells["tensordesc_meta"] or (None,) * len(descs))


class FastLaunch:
    """``kernel[grid](*args, **meta)`` with grid and meta fixed; arguments positional, in signature order,
    every parameter after them a constexpr given in ``meta`` (or defaulted)."""

    def __init__(self, kernel, grid, **meta):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.meta = meta
        self._jit = kernel[grid]
        self._plans: dict = {}
        self._plan: _Plan | None = None
        self._direct = fast_launch_enabled() and isinstance(kernel, triton.runtime.JITFunction)
        # set by _prepare at the first launch through the JIT
        self._n_args = None
        self._tail = ()  # the constexprs' values, after the positional arguments
        self._spec_flags = ()  # per positional argument: (is_const, specialize, align), as the JIT's binder
        self._specialize = self._backend = self._get_device = self._get_stream = None

    @property
    def direct(self) -> bool:
        """Whether the next call with the last call's specialization goes straight to the launcher."""
        return self._direct and self._plan is not None

    def __call__(self, *args) -> None:
        plan = self._plan
        if plan is not None and not _hooks_installed():
            device = self._get_device()
            if not (device == plan.device and len(args) == len(plan.args) and self._same_specialization(plan, args)):
                plan = self._plans.get((device, self._specs(args))) if len(args) == self._n_args else None
                if plan is not None:
                    plan.rebind(args)
                    self._plan = plan
            if plan is not None:
                plan.launch(self.grid, self._get_stream(device), self._tail)
                return
        self._launch_through_jit(args)

    def forget(self, positions) -> None:
        """Let go of the last launch's arguments at these positions (a call's own activations and outputs,
        new tensors at every call anyway): a launcher kept between calls then holds no tensor of a finished
        call. Inductor's CUDA graph trees require that of every tensor made in a graph's memory pool."""
        plan = self._plan
        if plan is not None:
            for i in positions:
                plan.args[i] = plan.values[i] = None

    def _same_specialization(self, plan: _Plan, args) -> bool:
        """Whether args specialize as the plan's last ones (only those not identical are looked at); if
        so, the plan takes them. The identity test runs over all arguments at C speed (map); a step
        changes a few of them (new activations and outputs, recomputed integers)."""
        prev, values, specs = plan.args, plan.values, plan.specs
        for i in compress(range(len(args)), map(is_not, args, prev)):
            a, p = args[i], prev[i]
            if type(a) is int and type(p) is int and a == p:
                continue
            if self._spec(a, i) != specs[i]:
                return False
            prev[i] = values[i] = a  # a new tensor: the launcher reads (and checks) its pointer
        return True

    # ------------------------------------------------------------------------------------------------ slow path

    def _launch_through_jit(self, args) -> None:
        compiled = self._jit(*args, **self.meta)
        if self._direct and self._n_args is None:
            self._direct = self._prepare(len(args), compiled)
        if not self._direct or len(args) != self._n_args:
            self._direct, self._plan = False, None
            return
        device = self._get_device()
        specs = self._specs(args)
        plan = self._plans.get((device, specs))
        if plan is None:
            plan = self._plans[device, specs] = _Plan(compiled, device, specs)
        plan.rebind(args)
        self._plan = plan

    def _prepare(self, n_args: int, compiled) -> bool:
        """Whether the direct path applies to this kernel; if so, the per-kernel constants it needs."""
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")) or self.kernel.pre_run_hooks:
            return False
        params = self.kernel.params
        runtime, rest = params[:n_args], params[n_args:]
        if any(p.is_constexpr or p.annotation_type for p in runtime) or not all(p.is_constexpr for p in rest):
            return False
        from triton._C.libtriton import native_specialize_impl
        from triton.compiler import make_backend
        from triton.runtime import driver

        active = driver.active
        self._get_device, self._get_stream = active.get_current_device, active.get_current_stream
        self._backend = make_backend(active.get_current_target())
        self._specialize = native_specialize_impl
        self._spec_flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                            for p in runtime]
        self._tail = tuple(self.meta[p.name] if p.name in self.meta else p.default for p in rest)
        self._n_args = n_args
        return True

    def _spec(self, arg, i: int):
        return self._specialize(self._backend, arg, *self._spec_flags[i])

    def _specs(self, args) -> tuple:
        return tuple(self._spec(a, i) for i, a in enumerate(args))


def _hooks_installed() -> bool:
    runtime = triton.knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(exit_, "calls", exit_))
