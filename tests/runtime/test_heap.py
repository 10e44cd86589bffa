"""The symmetric heap (allocator, creators, checks) and the host side of wait errors; host only."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bspfuse.runtime import (Epoch, HeapExhausted, NotOnHeap, RemoteWaitTimeout, SymmetricHeap,
                             new_error_buffer, raise_if_wait_timed_out)
from bspfuse.runtime.errors import (ERR_COUNT, ERR_EXPECTED, ERR_FLAG_ADDR, ERR_OBSERVED,
                                    ERR_RANK, ERR_SPINS)
from bspfuse.runtime.heap import ALIGNMENT, FreeList


def offset(heap, t):
    return heap.offset_of(t)


def test_offsets_are_aligned_and_deterministic():
    sizes = [(3,), (100, 7), (1,), (1000,)]
    heaps = [SymmetricHeap(1 << 20) for _ in range(2)]
    offsets = [[offset(h, h.empty(*s, dtype=torch.float16)) for s in sizes] for h in heaps]
    assert offsets[0] == offsets[1] == [0, 256, 1792, 2048]
    empty = heaps[0].zeros(0, 5)  # takes no heap memory, counts as symmetric, frees as a no-op
    assert empty.shape == (0, 5) and heaps[0].is_symmetric(empty)
    used = heaps[0].used_bytes
    heaps[0].free(empty)
    assert heaps[0].used_bytes == used
    assert all(o % ALIGNMENT == 0 for o in offsets[0])
    t = heaps[0].empty(1)
    assert heaps[0].heap_bases.dtype == torch.int64
    assert heaps[0].heap_bases.tolist() == [t.data_ptr() - heaps[0].offset_of(t)]


def test_free_reuses_first_fit_and_coalesces():
    heap = SymmetricHeap(4096)
    a, b, c = (heap.empty(64, dtype=torch.float32) for _ in range(3))  # 256 bytes each
    assert [offset(heap, t) for t in (a, b, c)] == [0, 256, 512]
    assert heap.used_bytes == 768 and heap.free_bytes == 4096 - 768
    heap.free(b)
    d = heap.empty(10, dtype=torch.int32)
    assert offset(heap, d) == 256  # first fit takes b's hole
    heap.free(a)
    heap.free(d)  # a and d's blocks merge with each other
    assert heap._free.blocks()[0] == (0, 512)
    e = heap.empty(128, dtype=torch.float32)  # 512 bytes: fits only in the merged hole
    assert offset(heap, e) == 0
    heap.free(c)
    heap.free(e)
    assert heap._free.blocks() == [(0, 4096)] and heap.used_bytes == 0


def test_exhaustion_names_requested_free_and_largest_block():
    heap = SymmetricHeap(2048)
    ts = [heap.empty(256, dtype=torch.uint8, name=f"t{i}") for i in range(8)]
    for t in ts[::2]:
        heap.free(t)  # 1024 bytes free, in 256-byte holes
    with pytest.raises(HeapExhausted) as info:
        heap.empty(512, dtype=torch.uint8, name="big")
    msg = str(info.value)
    assert "512 bytes" in msg and "big" in msg and "1024 of 2048 bytes free" in msg
    assert "largest free block 256 bytes" in msg
    with pytest.raises(HeapExhausted):
        SymmetricHeap(1024).zeros(2000)


def test_free_rejects_views_double_free_and_outside_tensors():
    heap = SymmetricHeap(4096)
    t = heap.zeros(64)
    with pytest.raises(ValueError, match="not the start of a live allocation"):
        heap.free(t[1:])
    heap.free(t)
    with pytest.raises(ValueError, match="already freed"):
        heap.free(t)
    with pytest.raises(NotOnHeap):
        heap.free(torch.zeros(4))


def test_creators_values_shapes_dtypes():
    heap = SymmetricHeap(1 << 16)
    assert torch.equal(heap.zeros(2, 3), torch.zeros(2, 3))
    assert torch.equal(heap.ones((2, 3), dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32))
    assert torch.equal(heap.full((4,), 7), torch.full((4,), 7))
    assert heap.full((2,), 1.5).dtype == torch.get_default_dtype()
    assert heap.full((2,), True).dtype == torch.bool
    assert torch.equal(heap.arange(5), torch.arange(5))
    assert torch.equal(heap.arange(1, 10, 3, dtype=torch.float32), torch.arange(1., 10., 3.))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(heap.randn(8, generator=g1), torch.randn(8, generator=g2))
    x = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    for make, want in [(heap.zeros_like, torch.zeros_like(x)),
                       (heap.ones_like, torch.ones_like(x))]:
        t = make(x)
        assert torch.equal(t, want) and heap.is_symmetric(t)
    assert torch.equal(heap.full_like(x, 9), torch.full_like(x, 9))
    assert heap.empty_like(x, dtype=torch.float64).dtype == torch.float64
    assert heap.randn_like(x, dtype=torch.float32).shape == (2, 3)
    y = heap.as_symmetric(x.t(), name="y")
    assert torch.equal(y, x.t()) and y.is_contiguous() and heap.is_symmetric(y)
    assert heap.zeros(3, requires_grad=True).requires_grad


def test_check_symmetric_rejects_outside_tensors_with_a_clear_message():
    heap = SymmetricHeap(4096)
    inside = heap.zeros(4, 4)
    heap.check_symmetric(inside[1:, 2:], "argument 'x'")  # views of heap tensors are fine
    with pytest.raises(NotOnHeap, match=r"argument 'x' \(shape \(4,\), torch.float32.*"
                                        r"not on rank 0's symmetric heap.*as_symmetric"):
        heap.check_symmetric(torch.zeros(4), "argument 'x'")
    with pytest.raises(NotOnHeap, match="must be a tensor"):
        heap.check_symmetric(3, "argument 'n'")
    assert not heap.is_symmetric(torch.zeros(4))


def test_peer_tensor_and_describe_address():
    heap = SymmetricHeap(4096)
    heap.zeros(3)
    flags = heap.zeros(2, 3, dtype=torch.int32, name="flags")
    assert heap.peer_tensor(flags, 0).data_ptr() == flags.data_ptr()
    assert heap.describe_address(flags[1, 2:].data_ptr()) == "flags[1, 2]"
    assert "no live allocation" in heap.describe_address(heap._base + 3000)
    assert "not on the symmetric heap" in heap.describe_address(8)


def test_epoch_counts_up_and_guards_overflow():
    e = Epoch()
    assert (e.next(), e.next(), e.next(1000), e.next(), e.value) == (1, 2, 3, 1003, 1003)
    with pytest.raises(OverflowError):
        Epoch(start=2**31 - 2).next(5)
    with pytest.raises(ValueError):
        e.next(0)


def test_raise_if_wait_timed_out_names_rank_flag_and_values():
    heap = SymmetricHeap(4096)
    heap.zeros(10)
    flags = heap.zeros(4, dtype=torch.int32, name="ready")
    err = new_error_buffer()
    raise_if_wait_timed_out(err, heap)  # nothing recorded: no error
    err[ERR_COUNT], err[ERR_RANK], err[ERR_FLAG_ADDR] = 3, 1, flags[2:].data_ptr()
    err[ERR_EXPECTED], err[ERR_OBSERVED], err[ERR_SPINS] = 17, 16, 500
    with pytest.raises(RemoteWaitTimeout) as info:
        raise_if_wait_timed_out(err, heap)
    msg = str(info.value)
    for part in ["rank 1", "flag ready[2]", ">= 17", "last saw 16", "500 spins", "2 more wait(s)"]:
        assert part in msg, (part, msg)
    assert torch.equal(err, torch.zeros_like(err))  # reset for the next launch
    outside = torch.zeros(3, dtype=torch.int64)
    err[ERR_COUNT], err[ERR_FLAG_ADDR] = 1, outside[1:].data_ptr()
    with pytest.raises(RemoteWaitTimeout, match=r"flag mine\[1\]"):
        raise_if_wait_timed_out(err, heap, names={"mine": outside})
    with pytest.raises(ValueError, match="int64"):
        raise_if_wait_timed_out(torch.zeros(8, dtype=torch.int32), heap)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), max_size=60))
def test_allocator_never_overlaps_and_always_coalesces(ops):
    capacity = 16 * 1024
    fl = FreeList(capacity)
    live = {}
    for alloc, n in ops:
        if alloc or not live:
            off = fl.allocate(n)
            if off is None:
                assert fl.largest_free_block < FreeList.reserved_size(n)
                continue
            live[off] = FreeList.reserved_size(n)
        else:
            off = sorted(live)[n % len(live)]
            fl.release(off, live.pop(off))
        spans = sorted(live.items()) + fl.blocks()
        spans.sort()
        assert sum(s for _, s in spans) == capacity  # live + free tile the heap exactly
        assert all(a + s == b for (a, s), (b, _) in zip(spans, spans[1:]))
        blocks = fl.blocks()
        assert all(a + s < b for (a, s), (b, _) in zip(blocks, blocks[1:]))  # coalesced
    for off, size in list(live.items()):
        fl.release(off, size)
    assert fl.blocks() == [(0, capacity)]
