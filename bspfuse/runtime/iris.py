"""Device API for remote memory access from ``@triton.jit`` kernels (Iris-compatible).

Every remote access is pointer translation plus an ordinary ``tl.load``/``tl.store``/
``tl.atomic_*``: ``translate`` maps a pointer into this process's view of a peer's heap
with ``heap_bases[peer] + (ptr - heap_bases[me])``. The pointer must point into the
symmetric heap (``SymmetricHeap``), ``heap_bases`` is ``heap.heap_bases``.

Rank arguments follow Iris exactly: the FIRST rank argument is the rank whose address
space the pointer is in (the current rank), the second is the peer. For ``copy`` both
pointers are local and ``cur_rank`` names the current rank.

Every function works on a scalar pointer or a block of pointers (``mask`` and ``other``
as in ``tl.load``). ``hint`` (constexpr int or tuple) re-asserts the alignment and
contiguity that translation hides from the compiler, so loads and stores vectorize:
pass e.g. ``hint=16`` for a contiguous block of at least 16 elements whose first
element is 16-byte aligned.

Memory order: ``load/store/get/put/copy`` are relaxed. Atomics take ``sem``
("acquire", "release", "acq_rel", "relaxed"; default "acq_rel") and ``scope``
("cta", "gpu", "sys"). Unlike Iris the default scope is "sys", because a "gpu"-scoped
flag is not guaranteed to be seen by another GPU (Iris issue 462); pass scope="gpu"
for atomics that only the local GPU observes. ``signal``/``wait_until`` are the
cross-GPU flag helpers: a release store and an acquire spin, both at "sys" scope, with
epoch semantics (wait for ``flag >= value``; flags are never reset, see ``Epoch``).

Example (each rank pushes its block to the next rank and raises a flag there)::

    from bspfuse.runtime import iris

    @triton.jit
    def ring_push(x, inbox, flags, heap_bases, rank, world, epoch, err,
                  N: tl.constexpr, MAX_SPINS: tl.constexpr):
        offs = tl.arange(0, N)
        peer = (rank + 1) % world
        iris.put(x + offs, inbox + offs, rank, peer, heap_bases)
        iris.signal(flags, epoch, rank, peer, heap_bases)
        iris.wait_until(flags, epoch, rank, err, MAX_SPINS)   # from rank - 1
"""
import triton
import triton.language as tl

from bspfuse.runtime import target

# Atomics' defaults. (A plain string default of a constexpr parameter does not compile
# when the caller omits it; a tl.constexpr default does.)
DEFAULT_SEM = tl.constexpr("acq_rel")
DEFAULT_SCOPE = tl.constexpr("sys")


@triton.jit
def translate(ptr, from_rank, to_rank, heap_bases, hint: tl.constexpr = None):
    """``ptr`` in ``from_rank``'s address space -> the same heap element on ``to_rank``."""
    from_base = tl.load(heap_bases + from_rank)
    to_base = tl.load(heap_bases + to_rank)
    offset = tl.cast(ptr, tl.uint64) - tl.cast(from_base, tl.uint64)
    moved = tl.cast(tl.cast(to_base, tl.pointer_type(tl.int8)) + offset, ptr.dtype)
    if hint is not None:
        moved = tl.max_contiguous(tl.multiple_of(moved, hint), hint)
    return moved


@triton.jit
def load(pointer, to_rank, from_rank, heap_bases, mask=None, other=None, hint: tl.constexpr = None):
    """Read ``pointer`` (an address on ``to_rank``, the current rank) from ``from_rank``'s heap."""
    remote = translate(pointer, to_rank, from_rank, heap_bases, hint)
    return tl.load(remote, mask=mask, other=other)


@triton.jit
def store(pointer, value, from_rank, to_rank, heap_bases, mask=None, hint: tl.constexpr = None):
    """Write ``value`` to ``pointer`` (an address on ``from_rank``, the current rank) on
    ``to_rank``."""
    remote = translate(pointer, from_rank, to_rank, heap_bases, hint)
    tl.store(remote, value, mask=mask)


@triton.jit
def get(from_ptr, to_ptr, from_rank, to_rank, heap_bases, mask=None, other=None,
        hint: tl.constexpr = None):
    """Copy ``from_ptr`` on peer ``to_rank`` into local ``to_ptr`` (``from_rank``: current rank)."""
    remote = translate(from_ptr, from_rank, to_rank, heap_bases, hint)
    tl.store(to_ptr, tl.load(remote, mask=mask, other=other), mask=mask)


@triton.jit
def put(from_ptr, to_ptr, from_rank, to_rank, heap_bases, mask=None, other=None,
        hint: tl.constexpr = None):
    """Copy local ``from_ptr`` into ``to_ptr`` on peer ``to_rank`` (``from_rank``: current rank)."""
    remote = translate(to_ptr, from_rank, to_rank, heap_bases, hint)
    tl.store(remote, tl.load(from_ptr, mask=mask, other=other), mask=mask)


@triton.jit
def copy(src_ptr, dst_ptr, from_rank, to_rank, cur_rank, heap_bases, mask=None, other=None,
         hint: tl.constexpr = None):
    """Copy ``src_ptr`` on ``from_rank`` to ``dst_ptr`` on ``to_rank`` (both ``cur_rank`` addresses).

    ``cur_rank`` should be ``from_rank`` (a push) or ``to_rank`` (a pull).
    """
    src = translate(src_ptr, cur_rank, from_rank, heap_bases, hint)
    dst = translate(dst_ptr, cur_rank, to_rank, heap_bases, hint)
    tl.store(dst, tl.load(src, mask=mask, other=other), mask=mask)


# ---- atomics: (pointer, val, from_rank = current, to_rank = peer, heap_bases) -> old value


@triton.jit
def atomic_add(pointer, val, from_rank, to_rank, heap_bases, mask=None,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank += val``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_add(remote, val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_sub(pointer, val, from_rank, to_rank, heap_bases, mask=None,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank -= val``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_add(remote, -val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_cas(pointer, cmp, val, from_rank, to_rank, heap_bases,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """If ``*pointer@to_rank == cmp`` store ``val``; returns the old value (no mask, like Triton)."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    element = remote.dtype.element_ty  # tl.atomic_cas does not convert cmp and val itself
    return tl.atomic_cas(remote, tl.cast(cmp, element), tl.cast(val, element), sem=sem,
                         scope=scope)


@triton.jit
def atomic_xchg(pointer, val, from_rank, to_rank, heap_bases, mask=None,
                sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """Store ``val`` into ``*pointer@to_rank``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_xchg(remote, val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_and(pointer, val, from_rank, to_rank, heap_bases, mask=None,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank &= val``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_and(remote, val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_or(pointer, val, from_rank, to_rank, heap_bases, mask=None,
              sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank |= val``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_or(remote, val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_xor(pointer, val, from_rank, to_rank, heap_bases, mask=None,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank ^= val``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_xor(remote, val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_min(pointer, val, from_rank, to_rank, heap_bases, mask=None,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank = min(*pointer@to_rank, val)``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_min(remote, val, mask=mask, sem=sem, scope=scope)


@triton.jit
def atomic_max(pointer, val, from_rank, to_rank, heap_bases, mask=None,
               sem: tl.constexpr = DEFAULT_SEM, scope: tl.constexpr = DEFAULT_SCOPE):
    """``*pointer@to_rank = max(*pointer@to_rank, val)``; returns the old value."""
    remote = translate(pointer, from_rank, to_rank, heap_bases)
    return tl.atomic_max(remote, val, mask=mask, sem=sem, scope=scope)


# ---- cross-GPU flags with epoch semantics


@triton.jit
def signal(flag_ptr, value, from_rank, to_rank, heap_bases):
    """Release-store ``value`` (an epoch) into ``flag_ptr`` on ``to_rank``, at "sys" scope.

    A CTA barrier first orders every thread's earlier stores (e.g. a ``put`` of the
    tile the flag announces) before the flag; the release then publishes them.
    """
    remote = translate(flag_ptr, from_rank, to_rank, heap_bases)
    tl.debug_barrier()
    tl.atomic_xchg(remote, value, sem="release", scope="sys")


@triton.jit
def signal_all(flag_ptr, value, from_rank, heap_bases, WORLD: tl.constexpr, TARGET: tl.constexpr):
    """``signal`` the same flag on every rank, the peers first (``from_rank + 1``, ...) and ``from_rank``'s own
    last, as one group of releases (``target.begin_release``: on NVIDIA GPUs one ``fence.acq_rel.sys`` and a
    relaxed write a flag, elsewhere a release atomic a flag)."""
    tl.debug_barrier()
    target.begin_release(tl.cast(value, tl.int32), TARGET)
    for i in tl.static_range(1, WORLD + 1):
        remote = translate(flag_ptr, from_rank, (from_rank + i) % WORLD, heap_bases)
        target.release_flag(remote, value, TARGET)


@triton.jit
def wait_until(flag_ptr, value, cur_rank, err_ptr, MAX_SPINS: tl.constexpr, SLEEP_NS: tl.constexpr = 0,
               TARGET: tl.constexpr = None):
    """Spin (acquire, "sys" scope) until the local flag ``*flag_ptr >= value``; return what it read.

    ``MAX_SPINS == 0`` spins forever (release mode; ``err_ptr`` may be None).
    ``MAX_SPINS > 0`` (debug) gives up after that many reads and records
    [count, rank, flag address, expected, observed, pid0, pid1, MAX_SPINS] into the
    int64 ``err_ptr`` (``errors.new_error_buffer``); the first timeout's record wins
    and later waits on a rank with a recorded timeout give up at once.
    ``errors.raise_if_wait_timed_out(err, heap)`` turns the record into an exception.

    ``SLEEP_NS > 0``: a waiter that shares its SM with programs doing work polls with plain ("relaxed", "sys")
    loads, sleeping about SLEEP_NS between them (``target.sleep``: name the ``TARGET``), and acquires once the
    flag is up; a tight loop of acquire atomics takes issue slots and L2 atomic throughput from its
    neighbours. 0: the tight loop.
    """
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    if MAX_SPINS > 0:
        spins = 0
        if tl.load(err_ptr, volatile=True) != 0:  # an earlier wait already timed out
            spins = MAX_SPINS
        while (seen < value) & (spins < MAX_SPINS):
            if SLEEP_NS > 0:
                target.sleep(SLEEP_NS, TARGET)
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
            spins += 1
        if seen < value:  # record layout: errors.ERR_*
            earlier = tl.atomic_add(err_ptr, 1, sem="relaxed", scope="gpu")
            if earlier == 0:
                tl.store(err_ptr + 1, tl.cast(cur_rank, tl.int64))
                tl.store(err_ptr + 2, tl.cast(flag_ptr, tl.int64))
                tl.store(err_ptr + 3, tl.cast(value, tl.int64))
                tl.store(err_ptr + 4, tl.cast(seen, tl.int64))
                tl.store(err_ptr + 5, tl.cast(tl.program_id(0), tl.int64))
                tl.store(err_ptr + 6, tl.cast(tl.program_id(1), tl.int64))
                tl.store(err_ptr + 7, tl.cast(MAX_SPINS, tl.int64))
    elif SLEEP_NS > 0:
        if seen < value:
            while seen < value:
                target.sleep(SLEEP_NS, TARGET)
                seen = tl.load(flag_ptr, volatile=True)  # ld.volatile: relaxed at "sys" scope, not cached in L1
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")  # orders the reads that follow
    else:
        while seen < value:
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    return seen
