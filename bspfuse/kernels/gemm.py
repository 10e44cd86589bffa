"""Host side of the fused GEMM kernels: heap buffers, epochs, descriptors and the launch.

Each object is built once per shape (it generates, compiles and allocates) and called per step::

    op = FusedAllGatherMatmul(heap, M_local=1024, N=8192, K=8192, dtype=torch.bfloat16, mode="push")
    c = op(a_shard, b)          # all_gather(a_shard) @ b, one kernel, no host flag reset between calls

B may be row-major [K, N] or, as in a transformer, `weight.t()` of an nn.Linear weight stored [N, K]:
both are read in place (`b_operand`; the layout is compiled into the kernel, see bspfuse.tile.B_LAYOUTS),
any other strides are copied. A is read in place when its rows are contiguous (`a_operand`). The
constructor's `b_layout` is the variant compiled up front; B in the other layout compiles that variant
on its first call::

    op = FusedMatmulReduceScatter(heap, M=8192, N=8192, K_local=14336, b_layout="nk")
    out = op(x, linear.weight.t())   # no copy of the weight

M is a bound, not a shape: heap buffers and flags are laid out for it, and a call may pass fewer rows (a
dynamic sequence length; the kernels take a call's rows at run time and compile once). A may also be 3-D,
[B, S, K], as under sequence parallelism with batch > 1: the gathered or scattered dim is then the sequence
(dim 1), and the kernels map rows themselves (no copy or permute of their inputs or outputs)::

    op = FusedAllGatherMatmul(heap, M_local=4096, N=8192, K=8192)     # at most 4096 rows per rank
    c = op(x, w.t())          # x [2, 1000, K] -> c [2, W * 1000, N]: batch row b holds rank 0's 1000 rows, ...

Flags never need a reset: each call raises them to a fresh epoch. Buffers a peer writes into alternate
between two slots by epoch parity; a rank cannot run two calls ahead of a peer (each call waits for that
peer's data of the same call), so a slot is never overwritten while it is read. The kernels count their
epochs themselves (a ticket counter on the device) except where the host needs the epoch too (copy_engine
writes flags, all-reduce returns a slot): those calls pass it, and only they cannot replay from a CUDA graph.
"""
from __future__ import annotations

import math
import torch
import triton
from triton.runtime._allocation import _allocator as _triton_allocator
from triton.tools.tensor_descriptor import TensorDescriptor

from bspfuse.codegen.load import load_kernel
from bspfuse.codegen.triton import generate
from bspfuse.runtime.errors import ERR_RECORD_LEN, raise_if_wait_timed_out
from bspfuse.runtime.fastlaunch import FastLaunch
from bspfuse.runtime.heap import Epoch
from bspfuse.lowering import plan_kernel, target_of
from bspfuse.runtime.target import device_target, uses_tma
from bspfuse.tile import AG_MODES, AG_WEIGHT_PARAMS, SCATTER_MODES, TileConfig, kernel_interface, size_of

IR_DTYPE = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


# What a fused op keeps across calls (flags, buffers, its error record and ticket, the scratch below) lives
# on the symmetric heap, not in PyTorch's caching allocator: an op is built, and its first kernel asks for
# scratch, at the op's first call, which may be a warm-up that Inductor's CUDA graph trees run with the
# thread's allocations routed into the graph's memory pool, and that pool must hold only tensors the graph
# tracks (runtime.torch_ops builds ops on a helper thread for the same reason).
_scratch: dict = {"heap": None, "buffer": None}
SCRATCH_BYTES = 1 << 20  # at least: 132 programs x a few 128-byte descriptors (backend.check_plan reserves it)


def _scratch_on_heap(size: int, alignment: int, stream):
    """Global scratch for descriptors a kernel makes on the device, asked for at every launch. The fused
    kernels run one after another on the compute stream, so one buffer serves them all (it only grows):
    no allocation on the launch path."""
    heap, buf = _scratch["heap"], _scratch["buffer"]
    if buf is None or buf.numel() < size:
        if buf is not None:
            heap.free(buf)
        buf = _scratch["buffer"] = heap.empty(max(size, SCRATCH_BYTES), dtype=torch.int8, name="device descriptors")
    return buf


def _set_allocator(heap):
    """Descriptors made on the device (the AG kernel's A operand) need scratch space from this allocator.
    Triton keeps its allocator per thread (a context variable): every launching thread sets it."""
    if not uses_tma(device_target(heap.device)):
        return
    if _scratch["heap"] is not heap:
        if _scratch["buffer"] is not None:
            _scratch["heap"].free(_scratch["buffer"])
        _scratch.update(heap=heap, buffer=None)
    if _triton_allocator.get() is not _scratch_on_heap:
        triton.set_allocator(_scratch_on_heap)


def _sim(heap) -> bool:
    return heap.device.type == "cpu"


def tma_unsupported(dtype: torch.dtype, **dims: int) -> str | None:
    """Why the tensor-memory (TMA) loads cannot serve these sizes, or None. Rows must be 16-byte aligned."""
    item = torch.empty((), dtype=dtype).element_size()
    bad = [f"{k}={v}" for k, v in dims.items() if (v * item) % 16]
    return (f"rows of {', '.join(bad)} {str(dtype).replace('torch.', '')} elements are not 16-byte aligned "
            "(the kernel's TMA loads need it)") if bad else None


def _vec(*sizes: int) -> int:
    return 16 if all(s % 16 == 0 for s in sizes) else 1


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """t [..., C] as a 2-D [rows, C] view without a copy, or None where its leading dims do not flatten."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _rows_readable(t: torch.Tensor) -> bool:
    # What both the TMA descriptor and the pointer loads need of a 2-D operand: contiguous rows, a row
    # stride that does not overlap rows, base and row stride 16-byte aligned.
    item = t.element_size()
    return (t.stride(1) == 1 and t.stride(0) >= t.shape[1] and (t.stride(0) * item) % 16 == 0
            and t.data_ptr() % 16 == 0)


def a_operand(a: torch.Tensor) -> torch.Tensor:
    """A as the kernels read it: `a` itself when its rows are contiguous (a row stride longer than K, as
    in a column slice, is fine), else `a.contiguous()` (a copy)."""
    return a if _rows_readable(a) else a.contiguous()


def b_operand(b: torch.Tensor) -> tuple[str, torch.Tensor]:
    """B[K, N] as the kernels read it, with its layout (bspfuse.tile.B_LAYOUTS)::

        b row-major [K, N]                   -> ("kn", b)        no copy
        b = w.t(), w row-major [N, K]        -> ("nk", w)        no copy (nn.Linear's weight)
        any other strides                    -> ("kn", b.contiguous())   a copy of B
    """
    if _rows_readable(b):
        return "kn", b
    if _rows_readable(b.t()):
        return "nk", b.t()
    return "kn", b.contiguous()


class _Fused:
    kind = ""

    def __init__(self, heap, M: int, N: int, K: int, dtype: torch.dtype, epilogue=(), config: TileConfig | None = None,
                 debug: bool = False, name: str | None = None):
        if dtype not in IR_DTYPE:
            raise TypeError(f"fused GEMM supports {', '.join(map(str, IR_DTYPE))}, not {dtype}")
        self.heap, self.rank, self.world = heap, heap.rank, heap.world_size
        self.N, self.K, self.dtype = N, K, dtype
        self.epilogue = tuple(epilogue)
        why = tma_unsupported(dtype, N=N, K=K)
        if why:
            raise ValueError(f"{name or self.kind}: {why}")
        self.target = target_of(heap.device)
        # A bounded wait turns a hang into an error naming rank and flag; release mode spins freely. The
        # bound is generous: in the simulator one rank may still be busy with earlier work for seconds.
        self.max_spins = (1 << 24 if not _sim(heap) else 1 << 21) if debug else 0
        self.err = heap.zeros(ERR_RECORD_LEN, dtype=torch.int64, name=f"{name or self.kind}.err")
        self.epoch = Epoch()  # the host's count of calls; the kernels count their own (ticket) where they can
        self.ticket = heap.zeros(1, dtype=torch.int64, name=f"{name or self.kind}.ticket")  # triton._epoch_and_pid
        self._descs = {}  # (operand, block, dtype) -> the descriptor _desc rebases
        self._last_b = (None, None)  # (B's address, shape, strides) -> its layout, storage, descriptor
        self.name = name or f"{self.kind}_{IR_DTYPE[dtype]}_w{self.world}"

    def _ready(self):
        # Construction is collective: a peer that is ahead could otherwise raise a flag here before this
        # rank's zeroing of the same flags, and the zeroing would erase it.
        self.heap.barrier()

    def _plan(self, mode: str, M: int, N: int, K: int, config, b_layout: str, weights: int = 1, name: str = ""):
        """The tile program and grid this object runs (lowering.plan_kernel: what `inspect --target` prints)."""
        self.plan = plan_kernel(self.kind, mode, M, N, K, self.world, IR_DTYPE[self.dtype], self.epilogue,
                                self.target, b_layout=b_layout, weights=weights, config=config,
                                name=name or self.name)
        self.config = self.plan.config

    def _lower(self, b_layout: str):
        return self.plan.tile_program.with_(b_layout=b_layout)

    def _compile(self, b_layout: str, M_bound: int):
        """Build the kernel for the B layout the constructor names (a call with B in the other layout compiles
        that variant once, `_kernel_for`, so neither layout is ever copied) and allocate what its interface
        declares for M_bound rows per rank: each heap buffer and the flag arrays."""
        self.tile_program = self._lower(b_layout)
        self.kernel_source = self._generate(self.tile_program)
        self.interface = iface = self.kernel_source.interface  # every B layout's kernel has the same
        self._per_call_args = tuple(i for i, p in enumerate(iface.params) if p.role in ("operand", "output"))
        self._arguments = iface.binder()
        self.kernel = load_kernel(self.kernel_source)
        self._other_layouts = {}
        self._launchers = {}
        cfg = self.config
        self.sizes = _layout_sizes(self.world, M_bound, self.N, self.K, cfg)
        self._offsets = {}  # (buffer, slot, owner) -> its first row (_row_offset)
        # buffers of sums (float32) and flags start at zero; the kernels zero the sums again after each use
        made = {}
        try:
            for name, shape, dtype, zeroed in _allocations(iface, self.sizes, self.dtype):
                made[name] = (self.heap.zeros if zeroed else self.heap.empty)(*shape, dtype=dtype,
                                                                              name=f"{self.name}.{name}")
        except BaseException:  # a buffer that does not fit: nothing of this object stays on the heap
            for t in (*made.values(), self.err, self.ticket):
                self.heap.free(t)
            raise
        self.flags = made.pop("flags")
        self.bufs = made
        # what every launch passes the same: the buffers, flags, kept state and the sizes of the bound
        fixed = dict(flag_ptr=self.flags, err_ptr=self.err, heap_bases=self.heap.heap_bases, ticket_ptr=self.ticket,
                     M_BOUND=M_bound, K=self.K, **{b.param: self.bufs[b.name] for b in iface.buffers
                                                   if b.param not in iface.names("operand")})
        self._fixed = {k: v for k, v in fixed.items() if k in iface.names()}

    def buffers(self) -> list[torch.Tensor]:
        """The heap buffers this object holds (a caller that is done with it frees these): its flags, buffers,
        error record and ticket. (A small one left behind splits the free space around it: objects built
        and freed one after another, as a tuner does, then fragment the heap.)"""
        return [self.flags, *self.bufs.values(), self.err, self.ticket]

    def _row_offset(self, buffer: str, slot: int, owner: int) -> int:
        """The first row of `owner`'s block in `slot` of heap buffer `buffer` (tile.HeapBuffer's layout). Owner
        0 and blocks laid out by M_BOUND only: a buffer packed by a call's rows (M_LOCAL) is addressed from 0.
        Worked out once per (buffer, slot, owner): calls ask for it, and evaluating the layout's expressions
        took tens of microseconds of host time."""
        key = (buffer, slot, owner)
        if key not in self._offsets:
            start = self.interface.buffer(buffer).row_start(str(slot), str(owner))
            self._offsets[key] = size_of(start, {**self.sizes, "M_LOCAL": 0})
        return self._offsets[key]

    def _rows_at(self, buffer: str, slot: int, owner: int) -> torch.Tensor:
        """Heap buffer `buffer`'s rows from `owner`'s block in `slot` on."""
        return self.bufs[buffer][self._row_offset(buffer, slot, owner):]

    def _flag_span(self, name: str) -> tuple[int, int]:
        """(first element, entries per rank) of flag array `name` in the flag buffer (tile.FlagArray's layout)."""
        f = next(f for f in self.interface.flags if f.name == name)
        return size_of(self.interface.flag_offset(name), self.sizes), size_of(f.per_rank, self.sizes)

    def _flag_arrays(self) -> dict[str, torch.Tensor]:
        """Each flag array as a [WORLD, per_rank] view, named op.array: a timed-out wait names its flag by it."""
        out = {}
        for f in self.interface.flags:
            start, n = self._flag_span(f.name)
            out[f"{self.name}.{f.name}"] = self.flags[start:start + self.world * n].view(self.world, n)
        return out

    def _bind(self, fixed: dict | None = None, **per_call):
        """The launch's arguments in the kernel's order, bound by name (tile.KernelInterface): what every launch
        passes the same (`fixed`, else this object's) and this call's."""
        fixed = self._fixed if fixed is None else fixed
        try:
            return self._arguments(**fixed, **per_call)
        except TypeError as e:
            missing = self.interface.missing({*fixed, *per_call})
            raise TypeError(f"{self.name}: {e}" + (f"; unbound: {missing}" if missing else "")) from None

    def _kernel_for(self, b_layout: str):
        if b_layout == self.tile_program.b_layout:
            return self.kernel
        if b_layout not in self._other_layouts:
            self._other_layouts[b_layout] = load_kernel(self._generate(self._lower(b_layout)))
        return self._other_layouts[b_layout]

    def _generate(self, tp):
        return generate(tp, tma=uses_tma(self.target.kernel_target))

    def _forget_call(self, launcher: FastLaunch) -> None:
        """After a launch: keep no tensor of this call (its A, its outputs; see FastLaunch.forget), since
        the call may have run in a CUDA graph's memory pool (a warm-up or a capture)."""
        launcher.forget(self._per_call_args)
        for (operand, *_), desc in self._descs.items():
            if operand == "a":
                desc.base = None

    def _launcher(self, key: tuple, b_layout: str, programs: int, meta) -> FastLaunch:
        """The launch of one variant (B layout, world): Triton's JIT dispatch of a 30-argument kernel costs
        about as much host time as a small GEMM takes on the GPU (gemm_bench's host_ms); FastLaunch keeps
        the compiled launcher. `meta` (the constexprs) is called only when the variant is new."""
        _set_allocator(self.heap)  # before every launch, on the launching thread (ops may be built on another)
        launcher = self._launchers.get(key)
        if launcher is None:
            launcher = self._launchers[key] = FastLaunch(self._kernel_for(b_layout), (programs,), **meta())
        return launcher

    def _operands(self, a, b):
        """(A, B's layout, B's storage, B's descriptor) for this call, without copies where the layouts allow.
        B is usually the same weight call after call: what was derived from it is kept while its memory,
        shape and strides stay the same (a copied B is derived again: its source may have changed)."""
        key = (b.data_ptr(), b.shape, b.stride())
        if key != self._last_b[0]:
            cfg = self.config
            b_layout, storage = b_operand(b)
            derived = (b_layout, storage,
                       self._desc("b", storage, [cfg.BK, cfg.BN] if b_layout == "kn" else [cfg.BN, cfg.BK]))
            if storage.data_ptr() != b.data_ptr():  # a copy: never reused
                return (a_operand(a), *derived)
            self._last_b = (key, derived)
        return (a_operand(a), *self._last_b[1])

    def _check(self):
        if self.max_spins:
            raise_if_wait_timed_out(self.err, self.heap, self._flag_arrays())

    def _within_bound(self, a: torch.Tensor, rows: int, bound: int) -> None:
        if rows > bound:
            raise ValueError(f"{self.name}: A{list(a.shape)} has {rows} rows, more than the bound of {bound} rows "
                             f"this op was built for (the bound is set when the op is constructed: the compiler's "
                             f"option max_tokens)")

    def _desc(self, operand: str, t, block):
        """A tensor descriptor of `t` in `block` tiles, for one operand ("a" or "b"). The operand's last one of
        the same shape and strides is rebased instead of rebuilt: checking a new descriptor, and specializing
        the launch on it, took a large part of a call's host time. One is kept per operand, block and dtype
        (a call of other rows replaces it), so calls of ever new lengths keep no more.
        Each operand has its own: A and B of one call can have the same shape (a square weight given as
        weight.t() with BM == BN), and rebasing one descriptor for both would read A twice. Kernels without
        TMA (the simulator's, AMD's) load through pointers (generate(tma=False)); any valid value fills the slot
        there."""
        if not uses_tma(self.target.kernel_target):
            return t
        key = (operand, tuple(block), t.dtype)
        desc = self._descs.get(key)
        if desc is None or desc.shape != t.shape or tuple(desc.strides) != t.stride():
            desc = self._descs[key] = TensorDescriptor.from_tensor(t, block)
        desc.base = t
        return desc

    def _bias(self, bias) -> dict:
        if ("bias" in self.epilogue) != (bias is not None):
            raise ValueError(f"{self.name}: the epilogue {self.epilogue} and the bias argument disagree")
        return {"bias_ptr": bias} if bias is not None else {}


class FusedAllGatherMatmul(_Fused):
    """C[M, N] = all_gather(A, dim 0) @ B, as one kernel. mode: push | pull | copy_engine (the host's copy stream
    moves the rows) | direct (naive remote loads).

    N may list several widths: then the call takes one B per width and returns [A @ B_0, A @ B_1, ...] from
    the same kernel, the gathered rows moving once for all (projections of one input: wq/wk/wv, w1/w3); the
    epilogue (and bias) applies to B_0's C only. epilogue=("swiglu",) with two weights of one width returns
    the one product [silu(A @ B_0) * (A @ B_1)] (an MLP's gate and up projections)::

        op = FusedAllGatherMatmul(heap, M_local=4096, N=(4096, 512, 512), K=8192, b_layout="nk")
        q, k, v = op(x_shard, [wq.weight.t(), wk.weight.t(), wv.weight.t()])

    M_local is the most rows a call's A may have. A [M, K] (M <= M_local) gives C [W * M, N], rank-major; A
    [B, S, K] (B * S <= M_local) gives C [B, W * S, N], all_gather on dim 1: batch row b holds rank 0's S rows,
    then rank 1's, ...

    Constructing one is collective (every rank, same arguments): it allocates heap buffers and barriers."""

    kind = "ag_matmul"

    def __init__(self, heap, M_local: int, N, K: int, dtype=torch.bfloat16, mode: str = "push", epilogue=(),
                 config: TileConfig | None = None, debug: bool = False, name: str | None = None, b_layout: str = "kn"):
        self.Ns = (N,) if isinstance(N, int) else tuple(N)
        super().__init__(heap, M_local * heap.world_size, sum(self.Ns), K, dtype, epilogue, config, debug, name)
        why = tma_unsupported(dtype, **{f"N{j}": n for j, n in enumerate(self.Ns)}) if len(self.Ns) > 1 else None
        self.gated = "swiglu" in self.epilogue
        if self.gated and (len(self.Ns) != 2 or self.Ns[0] != self.Ns[1]):
            why = f"the swiglu epilogue multiplies two weights of one width, got widths {self.Ns}"
        if why:
            raise ValueError(f"{self.name}: {why}")
        self.M_local, self.mode = M_local, mode
        if mode not in AG_MODES:
            raise ValueError(f"{self.name}: mode {mode!r} is not one of {', '.join(AG_MODES)}")
        self._plan(mode, M_local, sum(self.Ns), K, config, b_layout, len(self.Ns), f"{self.name}_{mode}")
        self._compile(b_layout, M_local)
        # pull and direct read A from the owner's heap (tile.A_ON_HEAP): it must live there (copied in if not).
        self.a_heap = self.bufs.get("a")
        self.peer_rows = next((b.name for b in self.interface.buffers if b.param == "stage_ptr"), None)
        if mode == "copy_engine":
            self._copies = _CopyEngineRows(self, triton.cdiv(M_local, self.config.BM))
        self._ready()

    def __call__(self, a: torch.Tensor, b, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None):
        """C = all_gather(a) @ b; `b` a list of one B per width in N gives the list of their Cs. A 3-D a
        [B, S, K] is gathered on dim 1 (C [B, W * S, N])."""
        cfg, W = self.config, self.world
        single = isinstance(b, torch.Tensor)
        bs = [b] if single else list(b)
        if a.dim() not in (2, 3) or a.shape[-1] != self.K or [tuple(x.shape) for x in bs] != [(self.K, n)
                                                                                               for n in self.Ns]:
            want = ", ".join(f"B[{self.K}, {n}]" for n in self.Ns)
            raise ValueError(f"{self.name}: expected A[M, {self.K}] or A[B, S, {self.K}] and {want}, "
                             f"got A{list(a.shape)} and {', '.join(f'B{list(x.shape)}' for x in bs)}")
        if out is not None and len(bs) > 1:
            raise ValueError(f"{self.name}: out= takes a single weight's C")
        batch, seg = (1, a.shape[0]) if a.dim() == 2 else a.shape[:2]
        rows = batch * seg
        self._within_bound(a, rows, self.M_local)
        shape = (W * rows,) if a.dim() == 2 else (batch, W * seg)  # C's leading dims
        if rows == 0:  # nothing to gather on any rank (every rank calls with the same shapes): no launch
            cs = [a.new_empty(*shape, n) for n in (self.Ns[:1] if self.gated else self.Ns)]
            return (self._out(out, shape, a.device) if out is not None else cs[0]) if single else cs
        a = a.reshape(rows, self.K)
        if self.a_heap is not None and a.data_ptr() != self.a_heap.data_ptr():
            self.a_heap[:rows].copy_(a)
            a = self.a_heap[:rows]
        a, b_layout, b, b_desc = self._operands(a, bs[0])
        c = (self._out(out, shape, a.device) if out is not None
             else torch.empty(*shape, self.Ns[0], dtype=self.dtype, device=a.device))
        more, more_c = {}, []
        for j, (bj, n) in enumerate(zip(bs[1:], self.Ns[1:]), 1):
            layout, storage = b_operand(bj)
            if layout != b_layout:  # the kernel reads every B in B_0's layout: this one is copied into it
                storage = (bj.t() if b_layout == "nk" else bj).contiguous()
            if not self.gated:  # gated: the one C holds silu(A @ B_0) * (A @ B_1)
                more_c.append(torch.empty(*shape, n, dtype=self.dtype, device=a.device))
            values = (storage, more_c[-1] if more_c else c, n, storage.stride(0), n)
            more.update((name.format(j), v) for name, v in zip(AG_WEIGHT_PARAMS, values))
        programs = self.plan.programs
        if self.mode == "direct":  # no flags: peers read A straight from the heap, between host barriers
            self.heap.barrier()
        epoch = self.epoch.next()
        copies = self._copies if self.mode == "copy_engine" else None
        if copies is not None:
            copies.before_launch(a, epoch)
        segmented = batch > 1
        launch = self._launcher((b_layout, segmented), b_layout, programs, lambda: dict(
            WORLD=W, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, COMM=cfg.comm_programs,
            NUM_PROGRAMS=programs, CHUNK_K=128, MAX_SPINS=self.max_spins, TARGET=self.target.kernel_target,
            SPLIT_K=cfg.split_k,
            VEC=_vec(self.K), SEGMENTED=segmented, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({"FLAG_BLOCKS": self._copies.blocks_per_flag} if self.mode == "copy_engine" else {})))
        # copy_engine's flags are written by the host: its kernel takes the host's epoch; the others count
        # their own (epoch 0), so a CUDA graph can replay them
        launch(*self._bind(None, a_ptr=a, b_desc=b_desc, b_ptr=b, c_ptr=c, **self._bias(bias), rank=self.rank,
                           epoch=epoch if copies is not None else 0, M_LOCAL=rows, SEG=seg, N=self.Ns[0],
                           stride_am=a.stride(0), stride_b=b.stride(0), stride_cm=c.stride(-2), **more))
        self._forget_call(launch)
        if self.mode == "direct":
            self.heap.barrier()
        if copies is not None:
            copies.after_launch(a, epoch)
        self._check()
        return c if single else [c, *more_c]

    def _out(self, out: torch.Tensor, shape: tuple, device) -> torch.Tensor:
        """A caller's C: the kernel stores whole tiles into it (through TMA on a GPU), so its rows must be
        contiguous, 16-byte aligned and not overlap."""
        want = (*shape, self.N)
        if tuple(out.shape) != want or out.dtype != self.dtype or out.device != device:
            raise ValueError(f"{self.name}: out must be a {list(want)} {self.dtype} tensor on {device}, "
                             f"got {list(out.shape)} {out.dtype} on {out.device}")
        rows = _rows_view(out)
        if rows is None or not _rows_readable(rows):
            raise ValueError(f"{self.name}: out's rows must be contiguous with a 16-byte aligned start and row "
                             f"stride; got strides {out.stride()} (pass out.contiguous() and copy back)")
        return out

    def gathered(self, a: torch.Tensor) -> torch.Tensor:
        """all_gather(A) of the call just made with this `a`, as a fresh tensor: [W * M, K] rank-major for a
        2-D a, [B, W * S, K] (gathered on dim 1) for a 3-D one; the peers' rows from the staging slot that
        call filled, this rank's own rows from `a`. Call it before the next call: the slot is refilled two
        calls later."""
        if self.peer_rows is None:
            raise ValueError(f"{self.name}: direct mode keeps no staged copy of the peers' rows")
        W, r, K = self.world, self.rank, self.K
        batch, seg = (1, a.shape[0]) if a.dim() == 2 else a.shape[:2]
        rows = batch * seg
        slot = self.epoch.value % 2
        out = a.new_empty(batch, W, seg, K)  # every row is written once: peers' from staging, this rank's from a
        for p in range(W):
            out[:, p].copy_((a if p == r else self._rows_at(self.peer_rows, slot, p)[:rows]).reshape(batch, seg, K))
        return out.view(W * rows, K) if a.dim() == 2 else out.view(batch, W * seg, K)


class _CopyEngineRows:
    """AG+GEMM's copy_engine mode, on the host: this rank's rows go into every peer's staging slot as a few
    large copies on a side stream (the GPU's copy engines move them; no SM does), each followed by a stream
    memory write of the chunk's flag to this call's epoch, ordered after the copy. The kernel's tiles of a
    peer's rows wait on that flag. The side stream starts after the main stream's work before the kernel (A
    is ready, and the kernel that read this slot two calls ago is done); the copies are enqueued after the
    kernel's launch, so they add nothing to the host's path to it, and the main stream waits for them after
    the kernel (A may be freed or overwritten after the call). In the simulator a launch returns when the
    kernel is done: there a thread, started before the launch, is the copy stream."""

    CHUNK_BYTES = 16 << 20  # per copy and flag: the first rows arrive early, the host enqueues few operations

    def __init__(self, op: "FusedAllGatherMatmul", nb: int):
        heap, W, r = op.heap, op.world, op.rank
        self.op, self.sim = op, _sim(heap)
        # the simulator's sizes are tiny: there 4 chunks (as row blocks allow), so chunked flags are exercised
        rows_bytes = op.M_local * op.K * op.dtype.itemsize
        chunks = min(nb, 4, 4 if self.sim else max(1, round(rows_bytes / self.CHUNK_BYTES)))
        self.blocks_per_flag = -(-nb // chunks)
        self.rows_per_flag = self.blocks_per_flag * op.config.BM
        # The peers that need these rows soonest come first: peer p multiplies its own rows, then p+1's, ...
        self.peers = [(heap.peer_tensor(op.bufs[op.peer_rows], p), heap.peer_tensor(op.flags, p))
                      for p in ((r - s) % W for s in range(1, W))]
        start, per_rank = op._flag_span("arrived")
        self.offset = start + r * per_rank  # this rank's flags in a peer's "arrived" array [WORLD, NB]
        self.stream = None if self.sim else _copy_stream(heap.device)
        self._thread = None

    def before_launch(self, a: torch.Tensor, epoch: int) -> None:
        if not self.peers:  # a world of one: nothing to move, no stream to order
            return
        if self.sim:  # the copy stream runs beside the kernel: plain copies, then the flag
            import threading

            self._thread = threading.Thread(target=self._copy, name="copy stream",
                                            args=(a, epoch, lambda flags, i, value: flags.__setitem__(i, value)))
            self._thread.start()
        else:
            self.stream.wait_stream(torch.cuda.current_stream())

    def after_launch(self, a: torch.Tensor, epoch: int) -> None:
        if not self.peers:
            return
        if self.sim:
            self._thread.join()
        else:
            with torch.cuda.stream(self.stream):
                self._copy(a, epoch, _write_flag)
            torch.cuda.current_stream().wait_stream(self.stream)

    def _copy(self, a: torch.Tensor, epoch: int, write_flag) -> None:
        op, M = self.op, a.shape[0]  # a call's rows, at most the bound op.M_local that staging is laid out for
        rows = op._row_offset(op.peer_rows, epoch % 2, op.rank)  # the slot's rows of this rank in a peer's staging
        for staging, flags in self.peers:
            for i, r0 in enumerate(range(0, M, self.rows_per_flag)):
                r1 = min(M, r0 + self.rows_per_flag)
                staging[rows + r0:rows + r1].copy_(a[r0:r1])
                write_flag(flags, self.offset + i, epoch)


_copy_streams: dict = {}


def _copy_stream(device):
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device=device)
    return _copy_streams[device]


def _write_flag(flags: torch.Tensor, i: int, value: int) -> None:
    """flags[i] = value as a stream operation (cuStreamWriteValue32, through torch's symmetric memory): the copy
    engines' front end writes it after the stream's earlier copies, so no SM is needed (the GEMM holds them
    all, spinning on these very flags)."""
    from torch._C._distributed_c10d import _SymmetricMemory

    _SymmetricMemory.stream_write_value32(flags.view(torch.uint32), i, value)


class _FusedScatter(_Fused):
    def __init__(self, heap, M: int, N: int, K_local: int, dtype=torch.bfloat16, epilogue=(),
                 config: TileConfig | None = None, debug: bool = False, name: str | None = None, b_layout: str = "kn",
                 mode: str = "direct"):
        super().__init__(heap, M, N, K_local, dtype, epilogue, config, debug, name)
        W = self.world
        if M % W:
            raise ValueError(f"{self.name}: M={M} rows do not split evenly over {W} ranks")
        if mode not in SCATTER_MODES:
            raise ValueError(f"{self.name}: mode {mode!r} is not one of {', '.join(SCATTER_MODES)}")
        self.M, self.M_local, self.mode = M, M // W, mode
        self._plan(mode, M, N, K_local, config, b_layout)
        self._compile(b_layout, self.M_local)
        self._fixed.update({"N": N} if "N" in self.interface.names() else {})
        self._ready()

    def __call__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        a, batch, seg, shape = self._rows(a, b)
        rows = a.shape[0]
        if rows == 0:  # no rows on any rank (every rank calls with the same shapes): no launch
            return a.new_empty(shape)
        epoch = self.epoch.next()
        if "out" in self.bufs:  # AR returns the slot of its out (tile.AR_OUT) that this call fills: the host picks it
            result = self._rows_at("out", epoch % 2, 0)[:rows].view(shape)
            out = {}
        else:  # RS counts its epochs on the device (0), so a CUDA graph can replay it
            result = torch.empty(shape, dtype=self.dtype, device=a.device)
            out, epoch = {"out_ptr": result}, 0
        self._launch(a, b, bias, out, epoch, self.rank, self.world, batch, seg)
        self._check()
        return result

    def local_matmul(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A @ B (+ epilogue) through this object's kernel launched as a world of one: the same GEMM with no
        communication and no flags, what the fused kernel would cost if the collective were free (a
        benchmark's bound). Only for mode="direct", whose kernel then touches no peer; not collective."""
        if self.mode != "direct":
            raise ValueError(f"{self.name}: local_matmul needs mode='direct', not {self.mode!r}")
        self._rows(a, b)
        flat = a.reshape(-1, self.K)  # a world of one owns every row, in any order
        out = torch.empty(flat.shape[0], self.N, dtype=self.dtype, device=a.device)
        if flat.shape[0]:  # an even epoch: slot 0, AR's out offset 0; out in place of AR's heap buffer
            self._launch(flat, b, bias, {}, 2, 0, 1, 1, flat.shape[0],
                         fixed={**self._fixed, "M_BOUND": self.M, "out_ptr": out})
        return out.view(*a.shape[:-1], self.N)

    def _rows(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int, int, tuple]:
        """(A as [rows, K], its batch rows B, the rows S of a segment, the result's shape). RS scatters a 3-D
        A [B, W * S, K] on dim 1: rank r gets [B, S, N], rows b*W*S + r*S + j. AR reduces every row: any A is
        its rows (one segment)."""
        W = self.world
        if a.dim() not in (2, 3) or a.shape[-1] != self.K or tuple(b.shape) != (self.K, self.N):
            raise ValueError(f"{self.name}: expected A[M, {self.K}] or A[B, W * S, {self.K}] and "
                             f"B[{self.K}, {self.N}], got A{list(a.shape)} and B{list(b.shape)}")
        rows = a.shape[:-1].numel()
        split = a.shape[1] if a.dim() == 3 and self.kind == "matmul_rs" else rows  # the rows split over ranks
        if split % W:
            what = f"dim 1 ({split} rows)" if split != rows else f"{rows} rows"
            raise ValueError(f"{self.name}: A{list(a.shape)}'s {what} do not split evenly over {W} ranks")
        self._within_bound(a, rows, self.M)
        if self.kind == "matmul_ar" or a.dim() == 2:
            shape = (*a.shape[:-1], self.N) if self.kind == "matmul_ar" else (rows // W, self.N)
            return a.reshape(rows, self.K), 1, rows // W, shape
        batch, seg = a.shape[0], a.shape[1] // W
        return a.reshape(rows, self.K), batch, seg, (batch, seg, self.N)

    def _launch(self, a, b, bias, out: dict, epoch: int, rank: int, world: int, batch: int, seg: int,
                fixed: dict | None = None):
        cfg = self.config
        a, b_layout, b, b_desc = self._operands(a, b)
        programs = self.plan.programs
        segmented = batch > 1
        launch = self._launcher((b_layout, world, segmented), b_layout, programs, lambda: dict(
            WORLD=world, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, COMM=cfg.comm_programs,
            LAG=interleave_lag(programs - cfg.comm_programs, world), NUM_PROGRAMS=programs, SPLIT_K=cfg.split_k,
            MAX_SPINS=self.max_spins, VEC=_vec(self.N), SEGMENTED=segmented, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages))
        if segmented:  # A as [B * WORLD, S, K], so that a TMA box holds rows of one segment of one owner
            a_desc = self._desc("a", a.as_strided((batch * world, seg, self.K), (seg * a.stride(0), a.stride(0), 1)),
                                [1, cfg.BM, cfg.BK])
        else:
            a_desc = self._desc("a", a, [cfg.BM, cfg.BK])
        launch(*self._bind(fixed, a_desc=a_desc, a_ptr=a, b_desc=b_desc, b_ptr=b, **out, **self._bias(bias), rank=rank,
                           epoch=epoch, M_LOCAL=a.shape[0] // world, SEG=seg, stride_am=a.stride(0),
                           stride_b=b.stride(0)))
        self._forget_call(launch)


def interleave_lag(gemm_programs: int, world: int) -> int:
    """How many local tiles an own tile trails the peer tiles of its index in the "interleaved" order: two
    waves of the GEMM programs, so the peers' partials of a tile were made two tile-times before it (none
    in a world of one)."""
    return max(1, -(-2 * gemm_programs // world)) if world > 1 else 0


class FusedMatmulReduceScatter(_FusedScatter):
    """out[M/W, N] = reduce_scatter(A[M, K_local] @ B[K_local, N], dim 0), as one kernel; M is the most rows a
    call may have (any call's rows must split evenly over the ranks). A 3-D A [B, W * S, K_local] is scattered
    on dim 1: out [B, S, N], rank r's rows b*W*S + r*S + j of the sum. Own and peer tiles
    interleave, so traffic spreads over the GEMM. mode: direct (partials stored to their owner from the
    GEMM's epilogue, flags raised a tile later; the fastest measured where K_local is ~4k), push (staged
    locally, comm programs put them to the owner; gains where K_local is large), pull (staged locally,
    the owner reads them in its epilogue)."""

    kind = "matmul_rs"


class FusedMatmulAllReduce(_FusedScatter):
    """out[M, N] = all_reduce(A[M, K_local] @ B[K_local, N]), as one kernel (M a bound, as for GEMM+RS; a 3-D A
    is reduced as its rows, out of the same leading shape): a reduce-scatter of the partials
    (mode as for FusedMatmulReduceScatter), then each finished tile goes to every peer as soon as it is final
    (push and pull: by the comm programs). The result lives on the heap (the first rows of a slot laid out for
    the bound) and stays valid until the next call (peers write the other slot meanwhile), like a CUDA graph's
    static output."""

    kind = "matmul_ar"


def heap_bytes(opcode: str, M: int, N: int, K: int, world: int, dtype: torch.dtype, mode: str = "push",
               target=None) -> int:
    """Symmetric-heap bytes the host object of a fused op allocates, known before it is built (a compiler
    checks its budget with this): what its kernel's interface declares. M, N, K as
    bspfuse.lowering.gemm_shape gives them: AG (M_local, N, K), RS/AR (M, N, K_local), M the object's bound on
    rows (what it is built with: calls of fewer rows use the same buffers). On a GPU `target`
    (lowering.Target) the bytes of the plan that runs there (a tuned config included); without one an upper
    bound for the unsplit kernels: flags counted for the smallest tile."""
    from bspfuse.lowering import GEMM_KINDS, SIM
    from bspfuse.runtime.heap import FreeList

    kind = GEMM_KINDS[opcode]
    smallest = TileConfig(BM=16, BN=16, BK=16, GROUP_M=1, num_warps=4, num_stages=2, comm_programs=1)
    on_gpu = target is not None and not target.sim
    plan = plan_kernel(kind, mode, M, N, K, world, IR_DTYPE[dtype], (), target if on_gpu else SIM,
                       config=None if on_gpu else smallest)
    sizes = _layout_sizes(world, M if kind == "ag_matmul" else M // world, N, K, plan.config)
    buffers = [8 * ERR_RECORD_LEN, 8]  # the error record and the ticket
    buffers += [math.prod(shape) * elem.itemsize
                for _, shape, elem, _ in _allocations(kernel_interface(plan.tile_program), sizes, dtype)]
    return sum(FreeList.reserved_size(b) for b in buffers)


def _allocations(iface, sizes: dict, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype, bool]]:
    """(name, shape, dtype, zeroed) of every heap allocation a kernel interface declares for these sizes: each
    HeapBuffer (the op's dtype, or float32 sums, which start at zero), then "flags", all flag arrays in one
    int32 buffer (at least one element)."""
    out = [(b.name, (size_of(b.rows, sizes), size_of(b.cols, sizes)), torch.float32 if b.dtype == "f32" else dtype,
            b.dtype == "f32") for b in iface.buffers]
    return out + [("flags", (max(1, size_of(iface.flag_words(), sizes)),), torch.int32, True)]


def _layout_sizes(world: int, M_bound: int, N: int, K: int, cfg: TileConfig) -> dict:
    """The values of the names a kernel interface's sizes are written in (tile.size_of)."""
    return dict(WORLD=world, M_BOUND=M_bound, N=N, K=K, BM=cfg.BM, BN=cfg.BN)
