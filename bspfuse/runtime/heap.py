"""The symmetric heap: one buffer per rank, the same allocation at the same offset on every rank.

Every tensor a kernel reaches remotely lives in the heap, so ``iris.translate`` can turn
this process's pointer into the address of the same tensor on a peer with
``heap_bases[peer] + (ptr - heap_bases[me])``.

Unlike Iris's bump allocator, memory is freed and reused: a first-fit free list, sorted
by offset, coalesced on free, with 256-byte alignment. The allocator is a pure function
of the call sequence, so ranks that make the same calls get the same offsets. That is
what makes the heap symmetric: allocate in the same order on every rank.

Example::

    heap = ctx.heap                                   # from launch(...)
    x = heap.zeros(4, 128, dtype=torch.float32, name="x")
    flags = heap.zeros(4, dtype=torch.int32, name="flags")
    heap.barrier()                                    # peers may now touch x and flags
    kernel[(4,)](x, flags, heap.heap_bases, ctx.rank)
    heap.free(x)
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import HeapExhausted, NotOnHeap, _element_name

ALIGNMENT = 256


@dataclass
class _Allocation:
    offset: int
    size: int  # bytes reserved (a multiple of ALIGNMENT)
    shape: tuple
    dtype: torch.dtype
    name: str | None


class FreeList:
    """First-fit allocator over ``[0, capacity)`` with coalescing; offsets are ALIGNMENT-aligned."""

    def __init__(self, capacity: int):
        self.capacity = capacity - capacity % ALIGNMENT
        self._starts: list[int] = [0] if self.capacity else []  # free blocks, sorted
        self._sizes: list[int] = [self.capacity] if self.capacity else []

    @staticmethod
    def reserved_size(nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` takes (at least one unit)."""
        return max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)

    @property
    def free_bytes(self) -> int:
        return sum(self._sizes)

    @property
    def largest_free_block(self) -> int:
        return max(self._sizes, default=0)

    def allocate(self, nbytes: int) -> int | None:
        size = self.reserved_size(nbytes)
        for i, block in enumerate(self._sizes):
            if block >= size:
                offset = self._starts[i]
                if block == size:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += size
                    self._sizes[i] -= size
                return offset
        return None

    def release(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, offset)
        self._starts.insert(i, offset)
        self._sizes.insert(i, size)
        if i + 1 < len(self._starts) and offset + size == self._starts[i + 1]:  # merge right
            self._sizes[i] += self._sizes.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:  # merge left
            self._sizes[i - 1] += self._sizes.pop(i)
            self._starts.pop(i)

    def blocks(self) -> list[tuple[int, int]]:
        """Free blocks as (offset, size), sorted by offset."""
        return list(zip(self._starts, self._sizes))


class LocalBacking:
    """A one-rank heap in ordinary memory (host tests, single-process use)."""

    def __init__(self, nbytes: int, device: torch.device | str = "cpu"):
        raw = torch.zeros(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
        skip = -raw.data_ptr() % ALIGNMENT
        self.buffer = raw[skip:skip + nbytes]
        self.rank, self.world_size = 0, 1
        self.bases = [self.buffer.data_ptr()]

    def barrier(self) -> None:
        if self.buffer.is_cuda:
            torch.cuda.synchronize(self.buffer.device)

    def peer_buffer(self, rank: int) -> torch.Tensor:
        assert rank == 0
        return self.buffer


class SymmetricHeap:
    """One rank's symmetric heap.

    ``SymmetricHeap(nbytes)`` makes a one-rank heap in host memory; inside ``launch``
    every rank gets ``ctx.heap``, backed by shared memory (sim) or
    ``torch.distributed._symmetric_memory`` (cuda). Allocate in the same order on every
    rank; creators write only the local copy, so call ``barrier()`` before peers read.
    """

    def __init__(self, nbytes: int, *, device: torch.device | str = "cpu", backing=None):
        self._backing = backing if backing is not None else LocalBacking(nbytes, device)
        buf = self._backing.buffer
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.data_ptr() % ALIGNMENT:
            raise ValueError("heap backing must be a 1-D, 256-byte aligned uint8 tensor")
        self._buffer = buf
        self._base = buf.data_ptr()
        self._nbytes = buf.numel()
        self._free = FreeList(self._nbytes)
        self._allocs: dict[int, _Allocation] = {}
        self._alloc_starts: list[int] = []  # sorted offsets of live allocations
        self.heap_bases = getattr(self._backing, "bases_tensor", None)  # a backing may keep it (cuda's does)
        if self.heap_bases is None:
            self.heap_bases = torch.tensor(list(self._backing.bases), dtype=torch.int64, device=buf.device)
        """int64 tensor on the heap's device: THIS process's address of every rank's heap."""

    # ---- identity -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._backing.rank

    @property
    def world_size(self) -> int:
        return self._backing.world_size

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes reserved by live allocations (rounded up to the 256-byte alignment)."""
        return self._free.capacity - self._free.free_bytes

    @property
    def free_bytes(self) -> int:
        return self._free.free_bytes

    @property
    def largest_free_block(self) -> int:
        return self._free.largest_free_block

    def barrier(self) -> None:
        """Wait until every rank's device work so far is done and every rank got here."""
        self._backing.barrier()

    # ---- creators (torch-style) -----------------------------------------------------
    def empty(self, *size, dtype: torch.dtype | None = None, device=None,
              requires_grad: bool = False, name: str | None = None) -> torch.Tensor:
        """An uninitialised tensor on the heap (reused memory keeps old contents)."""
        shape = _parse_size(size)
        dtype = dtype or torch.get_default_dtype()
        self._check_device(device)
        nbytes = _numel(shape) * _itemsize(dtype)
        if nbytes == 0:  # torch gives empty tensors no address: nothing to place or free
            return self._buffer[:0].view(dtype).view(shape).requires_grad_(requires_grad)
        offset = self._free.allocate(nbytes)
        if offset is None:
            raise HeapExhausted(
                f"rank {self.rank}: cannot allocate {nbytes} bytes for "
                f"{name or 'a tensor'} of shape {tuple(shape)} and dtype {dtype} on the symmetric "
                f"heap: {self.free_bytes} of {self._free.capacity} bytes free, largest free "
                f"block {self.largest_free_block} bytes. Free tensors with heap.free(t) or "
                f"launch with a larger heap_bytes.")
        size_reserved = FreeList.reserved_size(nbytes)
        self._allocs[offset] = _Allocation(offset, size_reserved, tuple(shape), dtype, name)
        bisect.insort(self._alloc_starts, offset)
        t = self._buffer[offset:offset + nbytes].view(dtype).view(shape)
        return t.requires_grad_(requires_grad) if requires_grad else t

    def zeros(self, *size, dtype=None, device=None, requires_grad=False, name=None):
        return self._filled(lambda t: t.zero_(), size, dtype, device, requires_grad, name)

    def ones(self, *size, dtype=None, device=None, requires_grad=False, name=None):
        return self._filled(lambda t: t.fill_(1), size, dtype, device, requires_grad, name)

    def full(self, size, fill_value, *, dtype=None, device=None, requires_grad=False, name=None):
        if dtype is None:
            dtype = torch.tensor(fill_value).dtype
        return self._filled(lambda t: t.fill_(fill_value), (size,), dtype, device,
                            requires_grad, name)

    def randn(self, *size, dtype=None, device=None, requires_grad=False, name=None,
              generator: torch.Generator | None = None):
        return self._filled(lambda t: t.normal_(generator=generator), size, dtype, device,
                            requires_grad, name)

    def arange(self, start, end=None, step=1, *, dtype=None, device=None,
               requires_grad=False, name=None):
        if end is None:
            start, end = 0, start
        values = torch.arange(start, end, step, dtype=dtype, device=self.device)
        t = self.empty(values.shape, dtype=values.dtype, device=device, name=name)
        t.copy_(values)
        return t.requires_grad_(requires_grad) if requires_grad else t

    def empty_like(self, t: torch.Tensor, *, dtype=None, requires_grad=False, name=None):
        return self.empty(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad, name=name)

    def zeros_like(self, t: torch.Tensor, *, dtype=None, requires_grad=False, name=None):
        return self.zeros(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad, name=name)

    def ones_like(self, t: torch.Tensor, *, dtype=None, requires_grad=False, name=None):
        return self.ones(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad, name=name)

    def full_like(self, t: torch.Tensor, fill_value, *, dtype=None, requires_grad=False, name=None):
        return self.full(t.shape, fill_value, dtype=dtype or t.dtype,
                         requires_grad=requires_grad, name=name)

    def randn_like(self, t: torch.Tensor, *, dtype=None, requires_grad=False, name=None,
                   generator: torch.Generator | None = None):
        return self.randn(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad,
                          name=name, generator=generator)

    def as_symmetric(self, t: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
        """A heap copy of an outside tensor (contiguous, same shape and dtype)."""
        out = self.empty(t.shape, dtype=t.dtype, name=name)
        out.copy_(t.detach())
        return out

    # ---- release and queries --------------------------------------------------------
    def free(self, t: torch.Tensor) -> None:
        """Return ``t``'s memory to the heap. Free in the same order on every rank.

        ``t`` must be a tensor a creator returned (not a view into the middle of one);
        tensors still pointing at freed memory see whatever is allocated there next.
        """
        self.check_symmetric(t, "heap.free's argument")
        if t.numel() == 0:
            return
        offset = t.data_ptr() - self._base
        alloc = self._allocs.pop(offset, None)
        if alloc is None:
            raise ValueError(f"rank {self.rank}: heap.free got a tensor at heap offset "
                             f"{offset:#x}, which is not the start of a live allocation "
                             f"(already freed, or a view into another allocation)")
        self._alloc_starts.pop(bisect.bisect_left(self._alloc_starts, offset))
        self._free.release(alloc.offset, alloc.size)

    def is_symmetric(self, t: torch.Tensor) -> bool:
        """True when every byte ``t`` can reach lies inside this rank's heap."""
        if t.device != self.device:
            return False
        if t.numel() == 0:
            return True  # nothing to reach
        lo, hi = _byte_extent(t)
        return self._base <= lo and hi <= self._base + self._nbytes

    def check_symmetric(self, t, what: str = "argument") -> None:
        """Raise ``NotOnHeap`` (naming ``what``) unless ``t`` lives on the heap."""
        if not isinstance(t, torch.Tensor):
            raise NotOnHeap(f"{what} must be a tensor on the symmetric heap, "
                            f"got {type(t).__name__}")
        if not self.is_symmetric(t):
            raise NotOnHeap(
                f"{what} (shape {tuple(t.shape)}, {t.dtype}, {t.device}, data_ptr "
                f"{t.data_ptr():#x}) is not on rank {self.rank}'s symmetric heap: peers cannot "
                f"reach it. Allocate it with heap.zeros/empty/... or copy it in with "
                f"heap.as_symmetric(t).")

    def offset_of(self, t: torch.Tensor) -> int:
        """Byte offset of ``t``'s first element inside the heap (same on every rank)."""
        self.check_symmetric(t)
        return t.data_ptr() - self._base

    def peer_tensor(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        """A host-side view of ``t``'s copy on ``rank`` (same shape, strides and dtype).

        In the simulator that is shared memory; on CUDA it is the peer GPU's memory
        (usable with copy_, e.g. to time the copy engine). Reads race with the peer's
        writes unless a barrier separates them.
        """
        self.check_symmetric(t)
        peer = self._backing.peer_buffer(rank)[:self._free.capacity].view(t.dtype)
        elem_offset = (t.data_ptr() - self._base) // t.element_size()
        return torch.as_strided(peer, t.shape, t.stride(), peer.storage_offset() + elem_offset)

    def allocations(self) -> list[tuple[int, int, str | None, tuple, torch.dtype]]:
        """Live allocations as (offset, reserved bytes, name, shape, dtype), by offset."""
        return [(a.offset, a.size, a.name, a.shape, a.dtype)
                for a in (self._allocs[o] for o in self._alloc_starts)]

    def describe_address(self, addr: int) -> str:
        """Name the heap element at ``addr`` (any rank's heap, this process's address)."""
        bases = self._backing.bases
        for r in range(len(bases)):
            if bases[r] <= addr < bases[r] + self._nbytes:
                text = self._describe_offset(addr - bases[r])
                return text if r == self.rank else f"{text} on rank {r}"
        return f"at address {addr:#x} (not on the symmetric heap)"

    def _describe_offset(self, offset: int) -> str:
        i = bisect.bisect_right(self._alloc_starts, offset) - 1
        if i >= 0:
            a = self._allocs[self._alloc_starts[i]]
            itemsize = _itemsize(a.dtype)
            if offset < a.offset + max(_numel(a.shape) * itemsize, 1):
                name = a.name or f"<unnamed {a.dtype} {a.shape} at heap offset {a.offset:#x}>"
                return _element_name(name, a.shape, (offset - a.offset) // itemsize)
        return f"at heap offset {offset:#x} (no live allocation)"

    # ---- internals ------------------------------------------------------------------
    def _filled(self, fill: Callable, size, dtype, device, requires_grad, name):
        t = self.empty(*size, dtype=dtype, device=device, name=name)
        fill(t)
        return t.requires_grad_(requires_grad) if requires_grad else t

    def _check_device(self, device) -> None:
        if device is not None and torch.device(device).type != self.device.type:
            raise ValueError(f"the heap lives on {self.device}; cannot allocate on {device}")

    def __repr__(self) -> str:
        return (f"SymmetricHeap(rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device}, used={self.used_bytes}, free={self.free_bytes})")


class Epoch:
    """A host-side, monotonically increasing counter for epoch flags.

    Flags are never reset: each launch signals fresh values and waits for ``flag >= e``,
    so a flag left at an older epoch by the previous call can never satisfy a new wait.
    Keep one ``Epoch`` per rank and advance it identically on every rank.

    Example::

        epoch = Epoch()
        e = epoch.next()                 # 1, then 2, ...
        kernel[grid](..., flags, e)      # producer: iris.signal(flags, e, ...);
                                         # consumer: iris.wait_until(flags, e, ...)
        base = epoch.next(1000)          # 1000 fresh values base .. base + 999 for a
                                         # kernel that loops 1000 rounds
    """

    def __init__(self, start: int = 0, max_value: int = 2**31 - 1):
        self._value = start
        self.max_value = max_value

    @property
    def value(self) -> int:
        """The last value handed out (flags start at 0, so the first one is 1)."""
        return self._value

    def next(self, n: int = 1) -> int:
        """Reserve ``n`` fresh values; return the first of them."""
        if n < 1:
            raise ValueError(f"Epoch.next(n) needs n >= 1, got {n}")
        if self._value + n > self.max_value:
            raise OverflowError(f"epoch would pass {self.max_value} (the flag dtype's limit); "
                                f"use int64 flags and Epoch(max_value=2**63 - 1)")
        first = self._value + 1
        self._value += n
        return first


def _parse_size(size: Sequence) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    shape = tuple(int(s) for s in size)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in size {shape}")
    return shape


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) bytes that any element of ``t`` occupies."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        span = (size - 1) * stride
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    item = t.element_size()
    return start + lo * item, start + (hi + 1) * item
