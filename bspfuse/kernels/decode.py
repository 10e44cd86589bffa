"""Device functions of split-KV decode attention, and the merge of attention states.

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

These are the device functions the statements of a decode tile program call (``bspfuse.tile_decode``); the
kernels of every stage are generated from that program (``bspfuse.codegen.decode``), and the host side is
``bspfuse.kernels.flash_decode``:

- ``attend``: one tile's state over one split of its batch entry's KV length (Attend);
- ``merge_tile``: a tile's n states merged CHUNK at a time, waiting per source for a flag if asked
  (MergeStates);
- ``push_tile``: a merged tile into this rank's slot of every rank's gather buffer, then its flag
  (PutState in the fused kernel).
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
def tile_heads(tile, Hkv, GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr):
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
def attend(q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, b, kvh, heads, hmask, split, num_splits, S,
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
def merge_tile(o_ptr, lse_ptr, row, hmask, n_states, stride_on, stride_ln, flags, flag_stride, epoch, cur_rank,
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
def read_timer(x, WHAT: tl.constexpr, TARGET: tl.constexpr):
    """The GPU's global timer in ns (WHAT "time") or this program's SM ("sm"); 0 when WHAT is "". x: any
    scalar (inline assembly takes an operand)."""
    if WHAT == "time":
        return target.global_timer(x, TARGET)
    elif WHAT == "sm":
        return target.sm_id(x, TARGET).to(tl.int64)
    else:
        return tl.zeros([], tl.int64)


@triton.jit
def stamp(timeline, t, k: tl.constexpr, ENABLED: tl.constexpr, TARGET: tl.constexpr):
    """TIMELINE (GPU only): timeline[t, k] = the global timer (ns); k = 1 records the SM instead."""
    if ENABLED:
        tl.store(timeline + t.to(tl.int64) * TIMELINE_FIELDS + k,
                 read_timer(t, "sm" if k == 1 else "time", TARGET))


@triton.jit
def push_tile(o, lse, row, hmask, omask, gather_o, gather_lse, stride_on, stride_ln, flags, rank, tile, num_tiles,
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
