"""Host side of decode attention with the KV cache split along the sequence across ranks.

Single GPU, the two graph-IR ops::

    o, lse = decode_partial(q, k, v, kv_lens=lens)          # split-KV kernel + merge of the splits
    o, lse = merge_states(o_n, lse_n)                       # merge n states [n, B, H, D], [n, B, H]

Across ranks, one ``FlashDecode`` per rank (built in the same order on every rank: it allocates on
the symmetric heap and ends with a heap barrier)::

    fd = FlashDecode(ctx.heap, ctx.world_size, ctx.rank, B=1, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16)
    out, lse = fd(q, k_shard, v_shard, kv_lens=lens)        # every rank; q is the same on all ranks

``stage`` picks the schedule of one decode step (launches counted per step):

- 0, BSP: split kernel, merge of the splits, ``torch.distributed.all_gather_into_tensor`` of the packed
  fp32 (O, LSE) (NCCL on GPUs, gloo in the simulator; with no process group, the RMA put kernel and a
  heap barrier), merge of the ranks: 3 kernels + 1 collective.
- 1, RMA all-gather: split, merge of the splits into this rank's slot of the gather buffer, a put
  kernel copying it to every peer, a heap barrier (host), merge of the ranks: 4 kernels + 1 barrier.
- 2, fine-grained waits: as 1, but the put kernel raises a per-(batch, head-tile) flag on every rank and
  the merge of the ranks waits per tile and source instead of a barrier: 4 kernels, no host sync.
- 3, fused push: 1 kernel (``fused_decode_kernel``): the last split of a tile merges the tile's splits,
  pushes it to every rank and raises the tile's flag; merge programs consume tiles as they arrive.

Flags carry epochs (``Epoch``) and counters are reset on the device, so steps need no host reset. The
gather buffer is double-buffered by epoch parity: a rank can be at most one step ahead of a peer's
reads of it (it needs the peer's tiles of a step before finishing that step).

The KV length of each (batch, KV head) tile is cut into ``choose_num_splits`` splits so that batch 1
fills the GPU; the splits' states merge CHUNK at a time (``merge_chunk``). At batch 1 a step is short
enough that its host side matters: every launch goes through ``bspfuse.runtime.fastlaunch``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from operator import is_

import torch
import triton

from bspfuse.codegen.decode import decode_kernels, decode_sources
from bspfuse.tile_decode import HostStep, decode_program
from bspfuse.kernels import decode as K
from bspfuse.runtime import Epoch
from bspfuse.runtime.errors import new_error_buffer, raise_if_wait_timed_out
from bspfuse.runtime.fastlaunch import FastLaunch
from bspfuse.runtime.target import device_target

STAGES = (0, 1, 2, 3)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 64
# a split streams at least this many BLOCK_N blocks, or its fixed cost dominates: at 4K keys, 32/8 and 64/8 heads,
# 32 splits of 2 blocks ran a step in 13.2 and 13.6 us against 14.6 and 14.5 with 16 of 4 (one H100, 2026-12-08,
# benchmarks/results/decode_core_4k_64k_h100.json)
MIN_SPLIT_BLOCKS = 2
# The split choice's cost model (choose_num_splits), in units of one BLOCK_N block of K and V streamed by
# one SM at its share of HBM bandwidth (about 1 us on an H200 at D = 128, BLOCK_N = 64):
SPLIT_OVERHEAD_BLOCKS = 2  # a program's fixed cost: q, the pipeline's fill, the state's store, the count
MERGE_STEP_BLOCKS = 1  # one step of the merge of splits (an L2 round trip for a chunk of states)
PROGRAMS_TO_SATURATE = 2  # programs an SM needs at once to keep enough K/V bytes in flight
MERGE_REGISTERS = 64  # fp32 registers a thread may spend on one chunk of states in a merge
# ... in the fused kernel's merge of splits, which holds nothing else by then: at 64/8 heads and 4K keys (16
# splits) folding all 16 at once took 14.6 us a step against 16.8 in chunks of 8 (one H100, 2026-12-08,
# decode_core_bench.py's merge_chunk variants; 96/12's timeline likewise)
FUSED_MERGE_REGISTERS = 128
# On GPUs, a waiting merge sleeps this long between polls (iris.wait_until's SLEEP_NS); 0: a tight loop.
# 64-1024 ns changed no step time on one H100 (benchmarks/decode_core_bench.py).
WAIT_SLEEP_NS = 0


# ------------------------------------------------------------------------------------------------ tiling


@dataclass(frozen=True)
class DecodeTiling:
    """How heads and keys are cut into programs; constexprs of every decode kernel."""

    B: int
    Hq: int
    Hkv: int
    D: int
    group: int  # query heads per KV head
    block_h: int  # query heads per tile: the M of tl.dot (>= 16)
    head_tiles: int  # tiles per KV head
    block_d: int
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int

    @property
    def num_tiles(self) -> int:
        return self.B * self.Hkv * self.head_tiles

    def constexprs(self) -> dict:
        return dict(GROUP=self.group, HEAD_TILES=self.head_tiles, BLOCK_H=self.block_h, D=self.D,
                    BLOCK_D=self.block_d)


def decode_tiling(B: int, Hq: int, Hkv: int, D: int, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, device: torch.device | str = "cpu") -> DecodeTiling:
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"flash decode: {Hq} query heads do not group evenly over {Hkv} KV heads")
    if D < 1 or D > 512:
        raise ValueError(f"flash decode: head dim {D} is outside 1..512")
    group = Hq // Hkv
    block_h = min(max(16, triton.next_power_of_2(group)), 64)
    block_d = max(16, triton.next_power_of_2(D))
    gpu = torch.device(device).type == "cuda"
    if block_n is None:
        block_n = (64 if block_d <= 128 else 32) if gpu else 16
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"flash decode: block_n must be a power of two >= 16, got {block_n}")
    return DecodeTiling(B, Hq, Hkv, D, group, block_h, -(-group // block_h), block_d, block_n,
                        num_warps or 4, num_stages or (3 if gpu else 1))


def merge_h(tiling: DecodeTiling) -> int:
    """Head rows a merge holds: the group's heads, not the (>= 16) rows tl.dot needs. Equal to block_h
    whenever a KV head has several head tiles, so the tile numbering is the same."""
    return min(tiling.block_h, triton.next_power_of_2(tiling.group))


def merge_chunk(n_states: int, tiling: DecodeTiling, registers: int = MERGE_REGISTERS) -> int:
    """States a merge loads and folds in one step (a power of two): as many as fit `registers` fp32
    registers a thread for their [chunk, MERGE_H, BLOCK_D] values of O (merge_h)."""
    fit = registers * 32 * tiling.num_warps // (merge_h(tiling) * tiling.block_d)
    return max(1, min(triton.next_power_of_2(n_states), 1 << max(fit, 1).bit_length() - 1))


def choose_num_splits(tiling: DecodeTiling, kv_capacity: int, num_sms: int) -> int:
    """Splits of the KV length per tile, from the tiles (batch x KV heads x head tiles), the longest KV
    length and the SM count.

    At batch 1 there are only a few tiles, so each is split along the keys; the time of a step is that
    of the busiest SM. With s splits it runs ceil(tiles * s / SMs) programs of ceil(blocks / s) blocks
    each plus a fixed cost, at full speed only with PROGRAMS_TO_SATURATE or more programs, then the
    merge of the splits, s / chunk steps. The cheapest s wins: tiles * s lands on (or just under) a whole
    number of programs per SM (8 tiles on 132 SMs: 33 splits, 2 per SM, where "about 3 per SM" gave 50
    splits and a 4th program on a few SMs, a quarter more time), and long splits beat many short ones
    once every SM is busy. Each split streams at least MIN_SPLIT_BLOCKS blocks; at most MAX_SPLITS.
    Any split count is correct for any length: splits past a batch entry's keys are empty states.
    """
    blocks = max(1, -(-kv_capacity // tiling.block_n))
    chunk = merge_chunk(MAX_SPLITS, tiling)

    def cost(s: int) -> int:
        per_sm = -(-tiling.num_tiles * s // num_sms)
        merge = 0 if s == 1 else -(-s // chunk) * MERGE_STEP_BLOCKS
        return max(per_sm, PROGRAMS_TO_SATURATE) * (-(-blocks // s) + SPLIT_OVERHEAD_BLOCKS) + merge

    longest = max(1, min(MAX_SPLITS, blocks // MIN_SPLIT_BLOCKS))
    return min(range(1, longest + 1), key=cost)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the simulator: a couple of splits, so the merge of splits is exercised


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class _KV:
    """Checked decode inputs and the strides and constexprs the kernels take."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lens: torch.Tensor | None
    table: torch.Tensor | None
    capacity: int  # most keys a batch entry can have
    page: int
    layout: tuple = ()  # what the attending kernels are compiled for: (page size or 0, has lengths, fp32 dots)
    strides: tuple = ()  # q's, k's and v's strides and the block table's row stride, in the kernels' order

    def __post_init__(self):
        q, k, v = self.q, self.k, self.v
        if not self.layout:
            self.layout = (self.page, self.lens is not None, _dot_f32(q.dtype, q.device))
        if not self.strides:
            bt = self.table.stride(0) if self.table is not None else 0
            self.strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                            v.stride(1), v.stride(2), bt)

    def args(self):
        q, k, v = self.q, self.k, self.v
        table = self.table if self.table is not None else q
        lens = self.lens if self.lens is not None else q
        return (q, k, v, lens, table)


def _check_inputs(q, k, v, kv_lens, block_table, B, Hq, Hkv, D, dtype) -> _KV:
    def shape(t):
        return list(t.shape)

    if q.dim() != 3 or tuple(q.shape) != (B, Hq, D):
        raise ValueError(f"flash decode: q must be [B={B}, Hq={Hq}, D={D}], got {shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != Hkv or t.shape[3] != D:
            raise ValueError(f"flash decode: {name} must be [B, S, Hkv={Hkv}, D={D}] (or [blocks, page, Hkv, D] "
                             f"with a block table), got {shape(t)}")
        if t.dtype != q.dtype:
            raise ValueError(f"flash decode: {name} is {t.dtype} but q is {q.dtype}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"flash decode: k {shape(k)} and v {shape(v)} differ in shape")
    if dtype is not None and q.dtype != dtype:
        raise ValueError(f"flash decode: built for {dtype}, got q of {q.dtype}")
    if q.dtype not in DTYPES:
        raise ValueError(f"flash decode: dtype {q.dtype} is not supported (fp16, bf16, fp32)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if block_table is not None:
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"flash decode: block_table must be [B={B}, max_blocks], got {shape(block_table)}")
        block_table = block_table.to(torch.int32).contiguous()
        page = k.shape[1]
        capacity = block_table.shape[1] * page
    else:
        if k.shape[0] != B:
            raise ValueError(f"flash decode: k has batch {k.shape[0]}, q has {B} (a paged cache needs a block_table)")
        page, capacity = 0, k.shape[1]
    if kv_lens is not None:
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"flash decode: kv_lens must be [B={B}], got {shape(kv_lens)}")
        if kv_lens.dtype != torch.int32 or kv_lens.device != q.device or not kv_lens.is_contiguous():
            kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    return _KV(q, k, v, kv_lens, block_table, capacity, page)


def _dot_f32(dtype: torch.dtype, device: torch.device) -> bool:
    # fp32: an exact dot rather than tf32. bf16 on the CPU: triton 3.6's interpreter multiplies bf16 bits.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu")


# ------------------------------------------------------------------------------------------------ launches
# Every kernel launch goes through a FastLaunch (bspfuse.runtime.fastlaunch): grid and constexprs fixed
# when it is made, the step's arguments passed positionally in the kernel's order (the *_args helpers).


def _attend_meta(tiling: DecodeTiling, layout: tuple, num_stages: int | None = None) -> dict:
    """Constexprs and options of the kernels that attend (split, fused) for a KV layout (_KV.layout)."""
    page, has_lens, dot_f32 = layout
    return dict(tiling.constexprs(), BLOCK_N=tiling.block_n, PAGE=page, HAS_LENS=has_lens, DOT_F32=dot_f32,
                num_warps=tiling.num_warps, num_stages=num_stages or tiling.num_stages)


def one_wave(tiling: DecodeTiling, num_splits: int, num_sms: int) -> bool:
    """Whether every split program is resident at once at two programs per SM (batch 1 at any length)."""
    return tiling.num_tiles * num_splits <= 2 * num_sms


def _split_launch(tiling: DecodeTiling, num_splits: int, layout: tuple, num_stages: int | None = None,
                  kernel=None) -> FastLaunch:
    """The split attention (`kernel`: a generated split kernel; default stage 0's)."""
    return FastLaunch(kernel or decode_kernels(0)["split"], (tiling.num_tiles, num_splits),
                      **_attend_meta(tiling, layout, num_stages))


def _split_args(kv: _KV, tiling: DecodeTiling, num_splits: int, qk_scale: float, mid_o, mid_lse) -> tuple:
    return (*kv.args(), mid_o, mid_lse, kv.capacity, tiling.B, tiling.Hq, tiling.Hkv, num_splits, *kv.strides,
            qk_scale)


def _merge_launch(tiling: DecodeTiling, n_states: int, target: str, wait: bool = False, max_spins: int = 0,
                  sleep_ns: int = 0, kernel=None) -> FastLaunch:
    """A merge of n states per tile: `kernel` (a generated merge kernel; default stage 0's merge of the splits),
    waiting for each source's flag where `wait`."""
    # a waiting merge takes its sources one at a time, as their tiles arrive
    chunk = 1 if wait else merge_chunk(n_states, tiling)
    return FastLaunch(kernel or decode_kernels(0)["merge_splits"], (tiling.num_tiles,),
                      **dict(tiling.constexprs(), BLOCK_H=merge_h(tiling)),
                      CHUNK=chunk, WAIT=wait, MAX_SPINS=max_spins, SLEEP_NS=sleep_ns, TARGET=target,
                      num_warps=tiling.num_warps)


def _merge_args(tiling: DecodeTiling, o, lse, n, stride_on, stride_ln, out_o, out_lse, flags, epoch=0, rank=0,
                err=None) -> tuple:
    """Arguments of merge_states_kernel; without a wait, flags and err are any tensor (never read)."""
    return (o, lse, out_o, out_lse, n, stride_on, stride_ln, tiling.Hq, tiling.Hkv, flags, epoch, rank,
            err if err is not None else flags)


# the one-GPU ops share their launches between calls of the same shapes
_cached_split_launch = functools.lru_cache(maxsize=64)(_split_launch)
_cached_merge_launch = functools.lru_cache(maxsize=64)(_merge_launch)


# ------------------------------------------------------------------------------------------------ one GPU


def decode_partial(q, k, v, kv_lens=None, block_table=None, *, scale: float | None = None,
                   num_splits: int | None = None, block_n: int | None = None):
    """Decode attention over this GPU's keys: (O [B, Hq, D] in q's dtype, LSE [B, Hq] fp32, natural log).

    q [B, Hq, D]; k, v [B, S, Hkv, D], or [blocks, page, Hkv, D] with block_table [B, max_blocks] (i32);
    kv_lens [B]: keys per batch entry (default: all S). An entry with no keys gives (0, -inf).

    Example::

        o, lse = decode_partial(q, k, v, kv_lens=torch.tensor([5, 0]))
    """
    B, Hq, D = q.shape
    kv = _check_inputs(q, k, v, kv_lens, block_table, B, Hq, k.shape[2], D, None)
    tiling = decode_tiling(B, Hq, k.shape[2], D, block_n, device=q.device)
    splits = num_splits or choose_num_splits(tiling, kv.capacity, _num_sms(q.device))
    mid_o = torch.empty(splits, B, Hq, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(splits, B, Hq, dtype=torch.float32, device=q.device)
    qk_scale = (scale if scale is not None else D ** -0.5) * K.LOG2E
    _cached_split_launch(tiling, splits, kv.layout)(*_split_args(kv, tiling, splits, qk_scale, mid_o, mid_lse))
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    _cached_merge_launch(tiling, splits, device_target(q.device))(
        *_merge_args(tiling, mid_o, mid_lse, splits, B * Hq * D, B * Hq, out, lse, lse))
    return out, lse


def merge_states(o: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype | None = None):
    """Merge n attention states: o [n, B, H, D], lse fp32 [n, B, H] (natural log) -> (O [B, H, D], LSE [B, H]).

    States with LSE = -inf (no keys) are ignored; if all are empty the result is (0, -inf).
    """
    if o.dim() != 4 or lse.dim() != 3 or tuple(lse.shape) != tuple(o.shape[:3]) or lse.dtype != torch.float32:
        raise ValueError(f"merge_states needs o [n, B, H, D] and fp32 lse [n, B, H], got {list(o.shape)} "
                         f"({o.dtype}) and {list(lse.shape)} ({lse.dtype})")
    n, B, H, D = o.shape
    o, lse = o.contiguous(), lse.contiguous()
    tiling = decode_tiling(B, H, 1, D, device=o.device)  # all heads as one group: any H works
    out = torch.empty(B, H, D, dtype=out_dtype or o.dtype, device=o.device)
    out_lse = torch.empty(B, H, dtype=torch.float32, device=o.device)
    _cached_merge_launch(tiling, n, device_target(o.device))(
        *_merge_args(tiling, o, lse, n, B * H * D, B * H, out, out_lse, out_lse))
    return out, out_lse


# ------------------------------------------------------------------------------------------------ ranks


@dataclass
class _StepLaunches:
    """The kernels of one step (for one KV layout): ``fused`` for stage 3, the rest for stages 0-2."""

    fused: FastLaunch | None = None
    split: FastLaunch | None = None
    merge_splits: FastLaunch | None = None
    put: FastLaunch | None = None
    merge_ranks: FastLaunch | None = None


class FlashDecode:
    """Decode attention over a KV cache split along the sequence across ranks; one object per rank.

    Owns its heap buffers (a double-buffered fp32 gather buffer of every rank's (O, LSE), per-tile flags)
    and its epoch. Build it on every rank in the same order (it allocates on the symmetric heap and ends
    with a barrier); call it on every rank once per decode step; ``close()`` frees the heap buffers.

    Example::

        fd = FlashDecode(ctx.heap, ctx.world_size, ctx.rank, B=2, Hq=8, Hkv=2, D=32,
                         dtype=torch.float16, stage=3)
        for step in range(n):
            out, lse = fd(q, k, v, kv_lens=lens)   # the same q on every rank, this rank's KV shard

    A step's host work is small: buffers, views and argument lists are made once (at the first step of
    each KV layout), and every kernel launch after the first goes straight to the compiled kernel
    (``bspfuse.runtime.fastlaunch``). ``fd(..., out=(o, lse))`` also skips allocating the result.

    Arguments beyond the shapes: ``scale`` (default D**-0.5), ``num_splits`` (default: ``choose_num_splits``
    for the first step's KV capacity and this GPU's SMs, then kept: any split count is correct for any length),
    ``block_n``, ``num_warps``, ``num_stages``; ``max_spins`` > 0 bounds every flag wait (debug: a wait
    that gives up raises RemoteWaitTimeout naming rank, tile and flag); ``wait_sleep_ns``: how often a
    waiting merge polls its flags on a GPU (default WAIT_SLEEP_NS; 0: a tight loop); ``timeline`` (stage 3 on
    a GPU, a diagnostic): every step records when each program reached each phase, read by ``timeline()``;
    ``merge_chunk``: splits' states the fused kernel's merge folds at once (default ``merge_chunk()`` with
    FUSED_MERGE_REGISTERS);
    ``group`` the process group of stage 0's collective (default: the default group, if one is initialized).
    """

    def __init__(self, heap, world_size: int, rank: int, B: int, Hq: int, Hkv: int, D: int,
                 dtype: torch.dtype = torch.bfloat16, stage: int = 3, *, scale: float | None = None,
                 num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, max_spins: int = 0, wait_sleep_ns: int | None = None,
                 timeline: bool = False, merge_chunk: int | None = None, group=None):
        if stage not in STAGES:
            raise ValueError(f"FlashDecode: stage must be one of {STAGES}, got {stage!r}")
        if dtype not in DTYPES:
            raise ValueError(f"FlashDecode: dtype {dtype} is not supported (fp16, bf16, fp32)")
        if not 0 <= rank < world_size:
            raise ValueError(f"FlashDecode: rank {rank} is outside world size {world_size}")
        self.heap, self.world_size, self.rank = heap, world_size, rank
        self.B, self.Hq, self.Hkv, self.D, self.dtype, self.stage = B, Hq, Hkv, D, dtype, stage
        self.scale = scale if scale is not None else D ** -0.5
        self.qk_scale = self.scale * K.LOG2E
        self.device = heap.device
        self.target = device_target(self.device)
        self.tiling = decode_tiling(B, Hq, Hkv, D, block_n, num_warps, num_stages, self.device)
        self.num_splits = num_splits
        self.split_merge_chunk = merge_chunk
        self.num_stages = num_stages  # None: the tiling's, or a deeper pipeline for one wave (_prepare)
        self.max_spins = max_spins
        gpu = self.target != "sim"  # the simulator's waits spin: its programs share no SM
        self.wait_sleep_ns = (WAIT_SLEEP_NS if wait_sleep_ns is None else wait_sleep_ns) if gpu else 0
        if timeline and not (gpu and stage == 3):
            raise ValueError("FlashDecode: timeline=True needs stage 3 on a GPU (it reads the GPU's global timer)")
        self._timeline = None  # [programs, K.TIMELINE_FIELDS] int64 once the split count is known, if asked for
        self._want_timeline = timeline
        self.group = group
        self.epoch = Epoch()
        # One rank's state, packed: O [B, Hq, D] then LSE [B, Hq], padded to 16 floats (64 bytes), so a
        # stage-0 collective moves one buffer and every slot starts aligned.
        self._o_numel = B * Hq * D
        self.slot = -(-(self._o_numel + B * Hq) // 16) * 16
        tiles = self.tiling.num_tiles
        self.gather = heap.zeros(2, world_size, self.slot, dtype=torch.float32, name="flash_decode.gather")
        # per epoch parity: O [W, B*Hq*D] and LSE [W, B*Hq] of every rank's slot, then this rank's own
        self._gather_views = [(buf[:, :self._o_numel], buf[:, self._o_numel:], buf[rank, :self._o_numel],
                               buf[rank, self._o_numel:], buf[rank]) for buf in self.gather]
        self.flags = heap.zeros(world_size, tiles, dtype=torch.int32, name="flash_decode.flags")
        self.tile_count = torch.zeros(tiles, dtype=torch.int32, device=self.device)
        self.ticket = torch.zeros(1, dtype=torch.int64, device=self.device)  # stage 3: tickets, hence epochs
        self.err = new_error_buffer(self.device)
        self._mid = None  # (O, LSE) of every split, once the split count is known
        self._gathered = None  # stage 0's all-gather destination (flat, O and LSE views), from the first step
        self._launches: dict[tuple, _StepLaunches] = {}  # by KV layout (_KV.layout)
        self._last = None  # (k, v, block_table as passed, their checked _KV): a decoder passes the same cache
        self._repeat = None  # (the last call's tensors, its step): a call with the very same tensors repeats it
        heap.barrier()  # peers may signal into our flags from their first step on

    @classmethod
    def from_op(cls, op, heap, sizes: dict | None = None, **kwargs) -> "FlashDecode":
        """The FlashDecode that runs a graph-IR ``flash_decode`` op (what ``fuse_flash_decode`` makes).

        Its operands are q, k, v, then the block table if ``paged``, then kv_lens if ``kv_lens``; call the
        result with the same tensors: ``fd(q, k, v, kv_lens=..., block_table=...)``. ``sizes`` binds
        symbolic dims; ``kwargs`` go to the constructor (tuning, ``max_spins``).
        """
        from bspfuse.ir import concrete

        if op.opcode != "flash_decode":
            raise ValueError(f"FlashDecode.from_op needs a flash_decode op, got {op.opcode}")
        world = heap.world_size
        q, k = op.inputs[0].type, op.inputs[1].type
        B, Hq, D = (concrete(d, sizes, world) for d in q.shape)
        Hkv = concrete(k.shape[2], sizes, world)
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[q.dtype]
        return cls(heap, world, heap.rank, B, Hq, Hkv, D, dtype, stage=op.attrs["stage"],
                   scale=op.attrs.get("scale"), **kwargs)

    def close(self) -> None:
        """Free the heap buffers (collective, like construction)."""
        self._repeat = self._last = None
        self.heap.barrier()
        self.heap.free(self.flags)
        self.heap.free(self.gather)

    # -------------------------------------------------------------------------------------------- step

    def __call__(self, q, k, v, kv_lens=None, block_table=None, *, out=None):
        """One decode step: (O [B, Hq, D] in the model dtype, LSE [B, Hq] fp32) over every rank's keys.

        ``out=(o, lse)``: contiguous tensors of those shapes and dtypes to write the result into (and
        return); by default each step returns new tensors. A step given the very tensors of the last one
        (a decoder with static buffers, written in place) repeats that step's prepared launch, as ``bind``
        does, without checking them again."""
        if out is not None and self._repeat is not None:
            held, step = self._repeat
            if all(map(is_, held, (q, k, v, kv_lens, block_table, *out))):
                return step()
        kv = self._same_cache(q, k, v, kv_lens, block_table)
        if kv is None:
            kv = _check_inputs(q, k, v, kv_lens, block_table, self.B, self.Hq, self.Hkv, self.D, self.dtype)
            self._last = (k, v, block_table, kv)
        launches = self._launches.get(kv.layout) or self._prepare(kv)
        out_o, out_lse = self._outputs(out)
        if out is not None and not self._copied(kv, q, k, v, kv_lens, block_table):
            step = self._bound_step(kv, launches, out_o, out_lse)
            self._repeat = ((q, k, v, kv_lens, block_table, out_o, out_lse), step)
            return step()
        return self._step(kv, launches, out_o, out_lse)

    def bind(self, q, k, v, kv_lens=None, block_table=None, *, out):
        """A decode step over these very tensors, checked and prepared once::

            step = fd.bind(q, k, v, kv_lens=lens, out=(o, lse))
            for _ in range(n):
                ...  # write this step's query into q, its keys into the cache, lengths into lens (in place)
                o, lse = step()

        as an engine with static buffers (and a CUDA graph) runs: the host work of a step is then its
        launches (stage 3: one kernel launch with an argument list made here; 5.9 against 17.5 us of host time
        a step on a 2-core CPU with launches stubbed, benchmarks/decode_host_bench.py). The tensors must be
        usable as they are (contiguous last dim, lengths int32 on this device, block table int32), since
        a copy would not see the values written into them later."""
        kv = _check_inputs(q, k, v, kv_lens, block_table, self.B, self.Hq, self.Hkv, self.D, self.dtype)
        copied = self._copied(kv, q, k, v, kv_lens, block_table)
        if copied:
            raise ValueError(f"FlashDecode.bind: {copied} would be copied to be used (a contiguous last dim, "
                             f"int32 lengths and block table on {self.device}), so later writes into it would "
                             f"not reach the kernels; pass it in that form")
        launches = self._launches.get(kv.layout) or self._prepare(kv)
        return self._bound_step(kv, launches, *self._outputs(out))

    @staticmethod
    def _copied(kv: "_KV", q, k, v, kv_lens, block_table) -> str | None:
        """The name of the first input the checked step uses a copy of (not usable as it is), else None."""
        for name, given, used in (("q", q, kv.q), ("k", k, kv.k), ("v", v, kv.v), ("kv_lens", kv_lens, kv.lens),
                                  ("block_table", block_table, kv.table)):
            if given is not used:
                return name
        return None

    def _bound_step(self, kv: "_KV", launches, out_o, out_lse):
        """The step over these tensors with its host work done once: stage 3 (no timeline, no wait limit to
        check) is one launch with its argument list made here."""
        if self.stage == 3 and self._timeline is None and not self.max_spins:
            fused, args, result = launches.fused, self._fused_args(kv, out_o, out_lse), (out_o, out_lse)

            def step():
                fused(*args)
                return result
            return step
        return lambda: self._step(kv, launches, out_o, out_lse)

    def _step(self, kv, launches, out_o, out_lse):
        if self.stage == 3:  # counts its epochs on the device
            self._fused_step(kv, launches, out_o, out_lse)
        else:
            self._bsp_step(kv, launches, out_o, out_lse)
        if self.max_spins:
            raise_if_wait_timed_out(self.err, self.heap, {"flash_decode.flags": self.flags})
        return out_o, out_lse

    def _same_cache(self, q, k, v, kv_lens, block_table) -> _KV | None:
        """The checked inputs of this step without checking k, v and the block table again when they are the
        very tensors of the last step (a decoder's KV cache; written in place between steps), and q and
        kv_lens are laid out as then; None where anything differs (the full check runs)."""
        if self._last is None:
            return None
        last_k, last_v, last_table, kv = self._last
        if k is not last_k or v is not last_v or block_table is not last_table:
            return None
        if q.shape != kv.q.shape or q.stride() != kv.q.stride() or q.dtype != kv.q.dtype or q.device != kv.q.device:
            return None
        if kv_lens is None:
            if kv.lens is not None:
                return None
        elif (kv.lens is None or kv_lens.shape != kv.lens.shape or kv_lens.dtype != torch.int32
              or kv_lens.device != q.device or not kv_lens.is_contiguous()):
            return None
        return _KV(q, kv.k, kv.v, kv_lens, kv.table, kv.capacity, kv.page, kv.layout, kv.strides)

    def launches(self) -> list[str]:
        """What one step launches, in order (kernels, collectives, host barriers): the stage's decode program
        (bspfuse.tile_decode). Stage 0 with no process group gathers with stage 1's put kernel and a barrier."""
        sources, out = decode_sources(self.stage), []
        for s in decode_program(self.stage).steps:
            if isinstance(s, HostStep):
                out.append("heap.barrier" if s.what == "barrier" else "all_gather_into_tensor" if self._collective()
                           else f"{decode_sources(1)['put'].name}, heap.barrier")
            elif s.name == "merge_ranks" and s.statements("tile")[0].wait:
                out.append(f"{sources[s.name].name}(WAIT)")
            else:
                out.append(sources[s.name].name)
        return out

    def _tuned(self, kv: _KV):
        """The split count and pipeline depth `bspfuse tune` measured fastest for this step at this stage on this
        GPU (bspfuse.tune.DecodeProblem), or None."""
        if self.device.type != "cuda":
            return None
        from bspfuse import tune
        from bspfuse.lowering import target_of

        dtype = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[self.dtype]
        problem = tune.DecodeProblem(self.B, self.Hq, self.Hkv, self.D, kv.capacity, self.world_size, dtype,
                                     kv.page > 0)
        entry = tune.table().get(target_of(self.device).name, problem)
        return entry.best_decode_config(self.stage) if entry is not None else None

    def _prepare(self, kv: _KV) -> "_StepLaunches":
        """At the first step of a KV layout: the split count (first step only), buffers and launches."""
        t, W = self.tiling, self.world_size
        if self.num_splits is None:  # fixed at the first step: stage 3 derives epochs from a program count
            tuned = self._tuned(kv)
            if tuned is not None and self.num_stages is None:
                self.num_stages = tuned.num_stages
            self.num_splits = tuned.splits if tuned else choose_num_splits(t, kv.capacity, _num_sms(self.device))
        splits = self.num_splits
        # One wave of split programs (batch 1): a deeper K/V pipeline (4 stages, 104 KB of shared memory,
        # so exactly two programs an SM, evenly placed) and, in the fused kernel, tickets handed out
        # KV-head-fastest as decode_split_kernel's grid is, so neighbouring SMs stream the same rows. Over
        # several waves (larger batches) split-fastest tickets finish tiles early and hide their pushes.
        wave = self.device.type == "cuda" and one_wave(t, splits, _num_sms(self.device))
        stages = self.num_stages or (4 if wave else None)
        if self._mid is None:
            B, Hq, D = self.B, self.Hq, self.D
            self._mid = (torch.empty(splits, B, Hq, D, dtype=torch.float32, device=self.device),
                         torch.empty(splits, B, Hq, dtype=torch.float32, device=self.device))
        if self.stage == 0 and self._gathered is None and self._collective():
            flat = torch.empty(W * self.slot, dtype=torch.float32, device=self.device)  # gloo wants 1-D
            self._gathered = (flat, flat.view(W, self.slot), flat.view(W, self.slot)[:, self._o_numel:])
        if self.stage == 3:
            if self._want_timeline and self._timeline is None:
                self._timeline = torch.zeros(t.num_tiles * (splits + 1), K.TIMELINE_FIELDS.value, dtype=torch.int64,
                                             device=self.device)
            launches = _StepLaunches(fused=FastLaunch(
                decode_kernels(3)["fused"], (t.num_tiles * splits + t.num_tiles,), **_attend_meta(t, kv.layout, stages),
                WORLD=W, ONE_SPLIT=splits == 1, TILE_FASTEST=wave, MERGE_H=merge_h(t),
                RANK_CHUNK=min(triton.next_power_of_2(W), 4),
                SPLIT_CHUNK=self.split_merge_chunk or merge_chunk(splits, t, FUSED_MERGE_REGISTERS),
                MAX_SPINS=self.max_spins, SLEEP_NS=self.wait_sleep_ns, TARGET=self.target,
                TIMELINE=self._want_timeline))
        else:  # the stage's kernels; the flags the put raises and the merge of ranks waits for are its statements'
            kernels, program = decode_kernels(self.stage), decode_program(self.stage)
            # stage 0 with no process group: its all-gather is stage 1's put kernel (and a heap barrier)
            put = "put" if "put" in kernels else None
            put_kernel, put_program = (kernels, program) if put else (decode_kernels(1), decode_program(1))
            signal = put_program.kernel("put").statements("tile")[0].flag is not None
            wait = program.kernel("merge_ranks").statements("tile")[0].wait is not None
            launches = _StepLaunches(
                split=_split_launch(t, splits, kv.layout, stages, kernels["split"]),
                merge_splits=_merge_launch(t, splits, self.target, kernel=kernels["merge_splits"]),
                put=FastLaunch(put_kernel["put"], (t.num_tiles,), WORLD=W, **t.constexprs(), SIGNAL=signal,
                               num_warps=t.num_warps),
                merge_ranks=_merge_launch(t, W, self.target, wait=wait, max_spins=self.max_spins,
                                          sleep_ns=self.wait_sleep_ns, kernel=kernels["merge_ranks"]))
        self._launches[kv.layout] = launches
        return launches

    def _outputs(self, out):
        B, Hq, D = self.B, self.Hq, self.D
        if out is None:
            return (torch.empty(B, Hq, D, dtype=self.dtype, device=self.device),
                    torch.empty(B, Hq, dtype=torch.float32, device=self.device))
        o, lse = out
        for name, t, shape, dtype in (("o", o, (B, Hq, D), self.dtype), ("lse", lse, (B, Hq), torch.float32)):
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != self.device or not t.is_contiguous():
                raise ValueError(f"FlashDecode: out {name} must be a contiguous {list(shape)} {dtype} tensor on "
                                 f"{self.device}, got {list(t.shape)} {t.dtype} on {t.device}"
                                 f"{'' if t.is_contiguous() else ', not contiguous'}")
        return o, lse

    def _collective(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def _bsp_step(self, kv, launches, out_o, out_lse):
        t, W, r, slot, splits = self.tiling, self.world_size, self.rank, self.slot, self.num_splits
        BH = self.B * self.Hq
        mid_o, mid_lse = self._mid
        launches.split(*_split_args(kv, t, splits, self.qk_scale, mid_o, mid_lse))
        epoch = self.epoch.next()
        gather_o, gather_lse, own_o, own_lse, own_slot = self._gather_views[epoch % 2]
        # the merge of the splits writes this rank's state into its own slot of the gather buffer
        launches.merge_splits(*_merge_args(t, mid_o, mid_lse, splits, BH * self.D, BH, own_o, own_lse, self.flags))
        if self._gathered is not None:  # stage 0 with a process group: its collective
            import torch.distributed as dist

            flat, gathered_o, gathered_lse = self._gathered
            all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13
            all_gather(flat, own_slot, group=self.group)
            launches.merge_ranks(*_merge_args(t, gathered_o, gathered_lse, W, slot, slot, out_o, out_lse, self.flags))
            return
        fine = self.stage == 2
        launches.put(gather_o, gather_lse, slot, slot, self.Hq, self.Hkv, self.flags, epoch, r, self.heap.heap_bases)
        if not fine:
            self.heap.barrier()
        launches.merge_ranks(*_merge_args(t, gather_o, gather_lse, W, slot, slot, out_o, out_lse, self.flags, epoch,
                                          r, self.err))

    def _fused_step(self, kv, launches, out_o, out_lse):
        if self._timeline is not None:
            self._timeline.zero_()  # only this step's programs leave marks
        launches.fused(*self._fused_args(kv, out_o, out_lse))

    def _fused_args(self, kv, out_o, out_lse) -> tuple:
        t = self.tiling
        mid_o, mid_lse = self._mid
        gather_o, gather_lse = self._gather_views[0][:2]  # the kernel picks the epoch's parity itself
        timeline = self._timeline if self._timeline is not None else self.err  # never written without TIMELINE
        return (*kv.args(), mid_o, mid_lse, gather_o, gather_lse, out_o, out_lse, self.flags, self.tile_count,
                self.ticket, self.rank, self.heap.heap_bases, self.err, timeline, kv.capacity, self.B, self.Hq,
                self.Hkv, t.num_tiles, self.num_splits, self.gather.stride(0), self.slot, self.slot, *kv.strides,
                self.qk_scale)

    def timeline(self) -> dict:
        """When the programs of the last step (``timeline=True``) reached each phase, in microseconds after the
        first program started: the spread of the starts, the split programs' attention (median and last), the
        last split of each tile (counted, its merge of the splits, its push), the merge programs (started,
        merged once their flags were up, stored) and the most programs that ran on one SM."""
        if self._timeline is None:
            raise ValueError("FlashDecode.timeline(): build it with timeline=True and run a step first")
        x = self._timeline.cpu()
        work = self.tiling.num_tiles * self.num_splits
        t0 = int(x[:, 0].min())
        us = (x.double() - t0) / 1e3
        split, merge, last = us[:work], us[work:], x[:work, 6] == 1

        def stats(v):  # None for a phase no program reached (one split a tile: no merge of splits)
            return {"median": round(float(v.median()), 2), "max": round(float(v.max()), 2)} if len(v) else None

        phases = {"start": stats(us[:, 0]), "attended": stats(split[:, 2]), "last_split_counted": stats(split[last, 3]),
                  "splits_merged": stats(split[last, 4]), "pushed": stats(split[last, 5]),
                  "merge_started": stats(merge[:, 0]), "ranks_merged": stats(merge[:, 3]), "end": stats(merge[:, 5])}
        return {**{k: v for k, v in phases.items() if v is not None},
                "programs_per_sm_max": int(torch.bincount(x[:, 1]).max())}


def reference_decode(q, k, v, kv_lens=None, block_table=None, scale: float | None = None):
    """float64 (O, LSE) on the CPU over one rank's (or the full, unsharded) KV: the tests' reference.
    Same argument conventions as ``decode_partial``."""
    q64 = q.detach().double().cpu()
    B, Hq, D = q64.shape
    k64, v64 = k.detach().double().cpu(), v.detach().double().cpu()
    if block_table is not None:
        bt = block_table.long().cpu()
        k64 = k64[bt].flatten(1, 2)  # [B, max_blocks * page, Hkv, D]
        v64 = v64[bt].flatten(1, 2)
    Hkv = k64.shape[2]
    scale = scale if scale is not None else D ** -0.5
    lens = kv_lens.long().cpu().tolist() if kv_lens is not None else [k64.shape[1]] * B
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        n = lens[b]
        if n == 0:
            continue
        kb = k64[b, :n].repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        vb = v64[b, :n].repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q64[b], kb) * scale
        lse[b] = torch.logsumexp(s, dim=1)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=1), vb)
    return out, lse
