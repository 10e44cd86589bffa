"""Triton kernels of split-KV decode attention, and the merge of attention states.

An attention state over a set of keys is (O, LSE): the softmax-weighted mean of their values and the
natural-log sum of exp of their scores, fp32. Two states merge exactly::

    M = max(LSE_a, LSE_b)    O = (e^(LSE_a-M) O_a + e^(LSE_b-M) O_b) / (e^(LSE_a-M) + e^(LSE_b-M))
    LSE = M + log(e^(LSE_a-M) + e^(LSE_b-M))

so splits of the KV length inside a GPU and shards of it across GPUs are the same merge at two
levels. An empty set of keys is the state (O = 0, LSE = -inf); every merge here ignores it without
producing a NaN (guarded both by the length and by the weight sum being 0).

Work is cut into *tiles*: one batch entry and up to BLOCK_H query heads that share one KV head (GQA),
so the heads of a group are the M dimension of ``tl.dot`` and K/V are read once per group. Tile
``t`` is ``(b, kv_head, sub)`` with ``t = (b * Hkv + kv_head) * HEAD_TILES + sub``.

Kernels (the host side is ``bspfuse.kernels.flash_decode``):

- ``decode_split_kernel``: grid (tiles, splits); each program attends one tile over one split of its
  batch entry's KV length and writes an fp32 state per (head, split).
- ``merge_states_kernel``: grid (tiles,); merges n states per head, CHUNK at a time. Used for the splits
  inside a GPU and for the ranks across GPUs; with ``WAIT`` it waits for a per-tile epoch flag of each
  source.
- ``put_states_kernel``: grid (tiles,); RMA all-gather: puts this rank's state tile into every
  rank's gather buffer, optionally raising a per-tile flag there.
- ``fused_decode_kernel``: one launch per decode step: split attention, the intra-GPU merge by the last
  split of a tile (an atomic counter), the push of the merged tile to every rank with a per-tile flag,
  and the cross-rank merge as the tiles arrive.
"""
from __future__ import annotations

import triton
import triton.language as tl

from bspfuse.runtime import iris, target

LOG2E = 1.4426950408889634  # the host passes qk_scale = scale * LOG2E


# ------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 inputs (exact "ieee" dot rather than tf32), and bf16 under the interpreter, whose
    # bf16 dot is wrong in triton 3.6 (it multiplies the raw bits).
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_heads(tile, Hkv, GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr):
    """Tile index -> (batch, kv head, query heads [BLOCK_H], valid-head mask)."""
    sub = tile % HEAD_TILES
    bk = tile // HEAD_TILES
    kvh = bk % Hkv
    b = bk // Hkv
    g = sub * BLOCK_H + tl.arange(0, BLOCK_H)
    return b, kvh, kvh * GROUP + g, g < GROUP


@triton.jit
def _merge_step(m, l, acc, lse, o):
    """Fold a chunk of states (o [BLOCK_H, CHUNK, BLOCK_D], lse [BLOCK_H, CHUNK]) into the running
    (max, weight sum, acc) of each head. Heads lead, so the warps split the heads and each thread holds its
    elements of every state of the chunk: the sums over the chunk stay in registers."""
    m_new = tl.maximum(m, tl.max(lse, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: weights stay 0
    alpha = tl.exp(m - m_safe)
    w = tl.exp(lse - m_safe[:, None])
    o = tl.where(w[:, :, None] > 0, o, 0.0)  # an empty state contributes nothing, whatever its O holds
    return m_new, l * alpha + tl.sum(w, 1), acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)


@triton.jit
def _merge_finish(m, l, acc):
    """(O, LSE) of a running (max, weight sum, weighted sum); guarded by the weight sum: (0, -inf) if empty."""
    valid = l > 0
    o = tl.where(valid[:, None], acc / tl.where(valid, l, 1.0)[:, None], 0.0)
    lse = tl.where(valid, m + tl.log(tl.where(valid, l, 1.0)), float("-inf"))
    return o, lse


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, b, kvh, heads, hmask, split, num_splits, S,
            stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
            stride_bt, qk_scale, BLOCK_H: tl.constexpr,
            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
            HAS_LENS: tl.constexpr, DOT_F32: tl.constexpr):
    """The state of one tile's heads over split `split` of batch entry b's keys: (O fp32, LSE fp32).

    qk_scale is scale * log2(e): scores live in base 2 inside the loop, the LSE leaves in natural log.
    PAGE > 0: k/v are [blocks, PAGE, Hkv, D] and bt_ptr the block table; else k/v are [B, S, Hkv, D].
    """
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if HAS_LENS:
        kv_len = tl.load(lens_ptr + b)
    else:
        kv_len = S
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        if PAGE > 0:
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_n // PAGE, mask=nmask, other=0)
            k_rows = page.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_kn
            v_rows = page.to(tl.int64) * stride_vb + (offs_n % PAGE) * stride_vn
        else:
            k_rows = b.to(tl.int64) * stride_kb + offs_n * stride_kn
            v_rows = b.to(tl.int64) * stride_vb + offs_n * stride_vn
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_F32) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # every block has a valid key: m_new is finite
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m = m_new
    return _merge_finish(m * 0.6931471805599453, l, acc)  # the running max back to natural log (* ln 2)


@triton.jit
def _merge_tile(o_ptr, lse_ptr, row, hmask, n_states, stride_on, stride_ln, flags, flag_stride, epoch, cur_rank,
                err_ptr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                WAIT: tl.constexpr, MAX_SPINS: tl.constexpr, SLEEP_NS: tl.constexpr, TARGET: tl.constexpr):
    """Merge n_states states of a tile's heads (rows `row` = b * Hq + head): state i is
    o_ptr[i * stride_on + row * D + :D] and lse_ptr[i * stride_ln + row]. WAIT: first wait until
    flags[i * flag_stride] reaches `epoch` (the tile's flag from source i), polling every SLEEP_NS (iris.wait_until).

    CHUNK states are loaded at once, as one [BLOCK_H, CHUNK, BLOCK_D] block (heads first: _merge_step), so the
    merge of n splits costs about n / CHUNK memory round trips rather than n (it is the tail of every decode
    step). The fused kernel's merge of the splits on an H100 (benchmarks/decode_core_bench.py), 22 at 96/12
    heads / 33 at 32/8: 11.6 / 8-10 us with the chunk's states leading (warps split the chunk, the sums
    crossed warps through shared memory), 3.3 / 7.2 us with one [BLOCK_H, BLOCK_D] load per state, 3.6 / 3.6
    us heads first."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, CHUNK)
    omask = hmask[:, None] & (offs_d < D)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i0 in range(0, n_states, CHUNK):
        if WAIT:
            for j in tl.static_range(CHUNK):
                if i0 + j < n_states:
                    iris.wait_until(flags + (i0 + j) * flag_stride, epoch, cur_rank, err_ptr, MAX_SPINS, SLEEP_NS,
                                    TARGET)
        state = i0 + offs_c
        smask = state < n_states
        # .cg: other programs (or peers) wrote these; read them from L2, never from a stale L1 line
        lse = tl.load(lse_ptr + state[None, :] * stride_ln + row[:, None], mask=hmask[:, None] & smask[None, :],
                      other=float("-inf"), cache_modifier=".cg")
        o = tl.load(o_ptr + state[None, :, None] * stride_on + (row[:, None] * D + offs_d[None, :])[:, None, :],
                    mask=smask[None, :, None] & omask[:, None, :], other=0.0, cache_modifier=".cg")
        m, l, acc = _merge_step(m, l, acc, lse, o)
    return _merge_finish(m, l, acc)


# per program: start, SM, attended, then a split's count / a merge program's ranks merged, the last split's splits
# merged and pushed / a merge program's stored result, 1 on the last split of a tile
TIMELINE_FIELDS = tl.constexpr(8)


@triton.jit
def _read_timer(x, WHAT: tl.constexpr, TARGET: tl.constexpr):
    """The GPU's global timer in ns (WHAT "time") or this program's SM ("sm"); 0 when WHAT is "". x: any
    scalar (inline assembly takes an operand)."""
    if WHAT == "time":
        return target.global_timer(x, TARGET)
    elif WHAT == "sm":
        return target.sm_id(x, TARGET).to(tl.int64)
    else:
        return tl.zeros([], tl.int64)


@triton.jit
def _stamp(timeline, t, k: tl.constexpr, ENABLED: tl.constexpr, TARGET: tl.constexpr):
    """TIMELINE (GPU only): timeline[t, k] = the global timer (ns); k = 1 records the SM instead."""
    if ENABLED:
        tl.store(timeline + t.to(tl.int64) * TIMELINE_FIELDS + k,
                 _read_timer(t, "sm" if k == 1 else "time", TARGET))


# ------------------------------------------------------------------------------------------------ kernels
# Buffers of states are state-major: o [n, B, Hq, D] fp32 and lse [n, B, Hq] fp32 (n = splits or ranks),
# addressed with a state stride so a gather buffer's slot stride (its padded payload) fits too.


@triton.jit
def decode_split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, mid_o, mid_lse, S, B, Hq, Hkv, num_splits,
                        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                        stride_bt, qk_scale,
                        GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                        HAS_LENS: tl.constexpr, DOT_F32: tl.constexpr):
    """Grid (tiles, splits): each tile's state over each split -> mid_o [splits, B, Hq, D], mid_lse."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b, kvh, heads, hmask = _tile_heads(tile, Hkv, GROUP, HEAD_TILES, BLOCK_H)
    o, lse = _attend(q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, b, kvh, heads, hmask, split, num_splits, S,
                     stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                     stride_bt, qk_scale, BLOCK_H, D, BLOCK_D, BLOCK_N, PAGE, HAS_LENS, DOT_F32)
    offs_d = tl.arange(0, BLOCK_D)
    row = (split * B + b).to(tl.int64) * Hq + heads
    tl.store(mid_o + row[:, None] * D + offs_d[None, :], o, mask=hmask[:, None] & (offs_d < D)[None, :])
    tl.store(mid_lse + row, lse, mask=hmask)


@triton.jit(do_not_specialize=["epoch"])  # a new epoch every step: one compiled kernel for all of them
def merge_states_kernel(o_ptr, lse_ptr, out_o, out_lse, n_states, stride_on, stride_ln, Hq, Hkv,
                        flags, epoch, cur_rank, err_ptr,
                        GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, WAIT: tl.constexpr, MAX_SPINS: tl.constexpr,
                        SLEEP_NS: tl.constexpr, TARGET: tl.constexpr):
    """Grid (tiles,): merge n_states states per head into out_o [B, Hq, D] (any float dtype) and
    out_lse [B, Hq] fp32. WAIT: wait for the tile's flag from each source, flags[i * tiles + tile] >= epoch,
    just before reading that source's state (per-tile waits, no barrier). TARGET: runtime.target."""
    tile = tl.program_id(0)
    b, kvh, heads, hmask = _tile_heads(tile, Hkv, GROUP, HEAD_TILES, BLOCK_H)
    row = b.to(tl.int64) * Hq + heads
    o, lse = _merge_tile(o_ptr, lse_ptr, row, hmask, n_states, stride_on, stride_ln, flags + tile,
                         tl.num_programs(0), epoch, cur_rank, err_ptr, BLOCK_H, D, BLOCK_D, CHUNK, WAIT, MAX_SPINS,
                         SLEEP_NS, TARGET)
    offs_d = tl.arange(0, BLOCK_D)
    omask = hmask[:, None] & (offs_d < D)[None, :]
    tl.store(out_o + row[:, None] * D + offs_d[None, :], o.to(out_o.dtype.element_ty), mask=omask)
    tl.store(out_lse + row, lse, mask=hmask)


@triton.jit(do_not_specialize=["epoch"])
def put_states_kernel(gather_o, gather_lse, stride_on, stride_ln, Hq, Hkv, flags, epoch, rank, heap_bases,
                      WORLD: tl.constexpr, GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, SIGNAL: tl.constexpr):
    """Grid (tiles,): RMA all-gather. This rank's state sits in its own slot of the gather buffer
    (state `rank`); put each tile of it into the same slot on every peer. SIGNAL: then raise the tile's
    flag from this rank, flags[rank * tiles + tile], to `epoch` on every rank (itself included)."""
    tile = tl.program_id(0)
    b, kvh, heads, hmask = _tile_heads(tile, Hkv, GROUP, HEAD_TILES, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * Hq + heads
    omask = hmask[:, None] & (offs_d < D)[None, :]
    o_ptrs = gather_o + rank * stride_on + row[:, None] * D + offs_d[None, :]
    l_ptrs = gather_lse + rank * stride_ln + row
    o = tl.load(o_ptrs, mask=omask)
    lse = tl.load(l_ptrs, mask=hmask)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            iris.store(o_ptrs, o, rank, peer, heap_bases, mask=omask)
            iris.store(l_ptrs, lse, rank, peer, heap_bases, mask=hmask)
    if SIGNAL:
        for peer in tl.static_range(WORLD):
            iris.signal(flags + rank * tl.num_programs(0) + tile, epoch, rank, peer, heap_bases)


@triton.jit
def _push_tile(o, lse, row, hmask, omask, gather_o, gather_lse, stride_on, stride_ln, flags, rank, tile, num_tiles,
               epoch, heap_bases, WORLD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, TARGET: tl.constexpr):
    """Put a merged tile into this rank's slot of every rank's gather buffer, then raise its flag there:
    the peers' flags first (the long pole), this rank's own last, behind one release fence on NVIDIA GPUs
    (iris.signal_all). From the merged tile to its flags raised on H200s (FlashDecode.timeline): 1.3-3.1 us
    at world 2 and 1.8-5.4 at world 4, against 2.3-4.4 and 4.3-9.7 with a release atomic a flag."""
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = gather_o + rank * stride_on + row[:, None] * D + offs_d[None, :]
    l_ptrs = gather_lse + rank * stride_ln + row
    for peer in tl.static_range(WORLD):
        iris.store(o_ptrs, o, rank, peer, heap_bases, mask=omask)
        iris.store(l_ptrs, lse, rank, peer, heap_bases, mask=hmask)
    iris.signal_all(flags + rank * num_tiles + tile, epoch, rank, heap_bases, WORLD, TARGET)


@triton.jit
def fused_decode_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, mid_o, mid_lse, gather_o, gather_lse,
                        out_o, out_lse, flags, tile_count, ticket, rank, heap_bases, err_ptr, timeline,
                        S, B, Hq, Hkv, num_tiles, num_splits, stride_parity, stride_on, stride_ln,
                        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                        stride_bt, qk_scale,
                        WORLD: tl.constexpr, GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                        HAS_LENS: tl.constexpr, DOT_F32: tl.constexpr, ONE_SPLIT: tl.constexpr,
                        SPLIT_CHUNK: tl.constexpr, MAX_SPINS: tl.constexpr, TILE_FASTEST: tl.constexpr,
                        MERGE_H: tl.constexpr, RANK_CHUNK: tl.constexpr, SLEEP_NS: tl.constexpr,
                        TARGET: tl.constexpr, TIMELINE: tl.constexpr):
    """One launch per decode step. Grid (tiles * splits + tiles,).

    Each program takes a ticket from a local int64 counter that is never reset: step e hands out tickets
    [(e-1) n, e n) for n programs, so the ticket gives the step's epoch (no host epoch: a step can be
    replayed from a CUDA graph) and the program's work, in ticket order whatever order the hardware starts
    programs in. Tickets below tiles * splits are split attention (split fastest; TILE_FASTEST: KV head
    fastest, as decode_split_kernel's grid, for a grid that runs in one wave), the rest cross-rank merges.
    A merge spins only once every split is held by a running program, and splits never wait, so each rank
    finishes its splits whatever its peers do: no deadlock however few programs fit at once.

    A split stores its state into mid (mid_o [splits, B, Hq, D]) and counts itself in tile_count[tile];
    the last split of a tile resets the count, merges the tile's splits, puts the merged state into its
    slot of every rank's gather buffer (of the two, the one of the epoch's parity: gather_o + parity *
    stride_parity) and raises flags[rank * tiles + tile] to the epoch there, the peers' first. A merge
    program waits for its tile's flags RANK_CHUNK ranks at a time and merges each chunk as it arrives. Merges
    hold only the group's MERGE_H head rows (BLOCK_H pads them for tl.dot). No host work between steps.
    A waiting merge program shares its SM with split programs still streaming K/V: it polls every SLEEP_NS.
    TARGET: runtime.target (the flags of a pushed tile, the waits' sleep, the timeline's clock).
    TIMELINE (a diagnostic, GPU only): each program writes the global timer at its phases into
    timeline [programs, TIMELINE_FIELDS] (by ticket; FlashDecode(timeline=True), FlashDecode.timeline()).
    """
    num_work = num_tiles * num_splits
    n = num_work + num_tiles
    started = _read_timer(n, "time" if TIMELINE else "", TARGET)
    ticket_all = tl.atomic_add(ticket, 1, sem="relaxed", scope="gpu")
    epoch = (ticket_all // n + 1).to(tl.int32)
    t = (ticket_all % n).to(tl.int32)
    if TIMELINE:
        tl.store(timeline + t.to(tl.int64) * TIMELINE_FIELDS, started)
        _stamp(timeline, t, 1, TIMELINE, TARGET)
    parity = (epoch % 2).to(tl.int64)
    gather_o += parity * stride_parity
    gather_lse += parity * stride_parity
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    if t < num_work:
        if TILE_FASTEST:  # the order of decode_split_kernel's grid (tiles, splits)
            tile = t % num_tiles
            split = t // num_tiles
        else:
            tile = t // num_splits
            split = t % num_splits
        b, kvh, heads, hmask = _tile_heads(tile, Hkv, GROUP, HEAD_TILES, BLOCK_H)
        o, lse = _attend(q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, b, kvh, heads, hmask, split, num_splits, S,
                         stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                         stride_bt, qk_scale, BLOCK_H, D, BLOCK_D, BLOCK_N, PAGE, HAS_LENS, DOT_F32)
        _stamp(timeline, t, 2, TIMELINE, TARGET)
        omask = hmask[:, None] & dmask
        row = b.to(tl.int64) * Hq + heads
        if ONE_SPLIT:
            _push_tile(o, lse, row, hmask, omask, gather_o, gather_lse, stride_on, stride_ln, flags, rank, tile,
                       num_tiles, epoch, heap_bases, WORLD, D, BLOCK_D, TARGET)
        else:
            srow = split.to(tl.int64) * B * Hq + row
            tl.store(mid_o + srow[:, None] * D + offs_d[None, :], o, mask=omask)
            tl.store(mid_lse + srow, lse, mask=hmask)
            tl.debug_barrier()  # every thread's stores come before the count that publishes them
            done = tl.atomic_add(tile_count + tile, 1, sem="acq_rel", scope="gpu")
            _stamp(timeline, t, 3, TIMELINE, TARGET)
            if done == num_splits - 1:
                tl.atomic_xchg(tile_count + tile, 0, sem="relaxed", scope="gpu")
                # the merge holds only the group's heads (MERGE_H <= BLOCK_H rows): a larger SPLIT_CHUNK fits
                _, _, mheads, mmask = _tile_heads(tile, Hkv, GROUP, HEAD_TILES, MERGE_H)
                mrow = b.to(tl.int64) * Hq + mheads
                mo, mlse = _merge_tile(mid_o, mid_lse, mrow, mmask, num_splits, B * Hq * D, B * Hq,
                                       flags, 0, epoch, rank, err_ptr, MERGE_H, D, BLOCK_D, SPLIT_CHUNK, False, 0, 0,
                                       TARGET)
                _stamp(timeline, t, 4, TIMELINE, TARGET)
                _push_tile(mo, mlse, mrow, mmask, mmask[:, None] & dmask, gather_o, gather_lse, stride_on,
                           stride_ln, flags, rank, tile, num_tiles, epoch, heap_bases, WORLD, D, BLOCK_D, TARGET)
                _stamp(timeline, t, 5, TIMELINE, TARGET)
                if TIMELINE:
                    tl.store(timeline + t.to(tl.int64) * TIMELINE_FIELDS + 6, 1)
    else:
        tile = t - num_work
        rb, _, rheads, rmask = _tile_heads(tile, Hkv, GROUP, HEAD_TILES, MERGE_H)
        rrow = rb.to(tl.int64) * Hq + rheads
        # RANK_CHUNK sources at once: every flag of the chunk is waited for, then one load of their states
        ro, rlse = _merge_tile(gather_o, gather_lse, rrow, rmask, WORLD, stride_on, stride_ln, flags + tile,
                               num_tiles, epoch, rank, err_ptr, MERGE_H, D, BLOCK_D, RANK_CHUNK, True, MAX_SPINS,
                               SLEEP_NS, TARGET)
        _stamp(timeline, t, 3, TIMELINE, TARGET)
        tl.store(out_o + rrow[:, None] * D + offs_d[None, :], ro.to(out_o.dtype.element_ty),
                 mask=rmask[:, None] & dmask)
        tl.store(out_lse + rrow, rlse, mask=rmask)
        _stamp(timeline, t, 5, TIMELINE, TARGET)

