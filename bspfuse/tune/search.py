"""The search: a fused GEMM problem, its joint space (tile, split-K, comm programs, schedule, and the unfused
program), the cost model that ranks it and the tuner that measures the best of it; a Flash Decode step and its
space (stages, splits, pipeline depth), measured whole."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bspfuse.tile import AG_MODES, SCATTER_MODES, TileConfig

if TYPE_CHECKING:
    from bspfuse.tune.table import Entry

KINDS = ("ag_matmul", "matmul_rs", "matmul_ar")
UNFUSED = "unfused"  # the schedule name of the bulk-synchronous program (collective + cuBLAS)
UNFUSED_STAGE = "stage0"  # a decode step's bulk-synchronous program (split, merge, all_gather, merge)


def m_bucket(M: int) -> int:
    """The power of two at or above M: a tuned entry serves every M up to its bucket."""
    return 1 << max(0, math.ceil(math.log2(max(1, M))))


@dataclass(frozen=True)
class Problem:
    """One fused GEMM: M, N, K as the host objects take them (AG+GEMM: M = this rank's rows; GEMM+RS/AR: M
    rows, K = K_local), the world size, dtype and B's layout (tile.B_LAYOUTS)."""
    kind: str
    M: int
    N: int
    K: int
    world: int = 1
    dtype: str = "bf16"
    b_layout: str = "nk"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"op {self.kind!r} is not one of {', '.join(KINDS)}")
        if min(self.M, self.N, self.K, self.world) < 1:
            raise ValueError(f"{self}: sizes and world must be positive")

    @classmethod
    def of_logical(cls, kind: str, M: int, N: int, K: int, world: int, dtype: str = "bf16",
                   b_layout: str = "nk") -> "Problem":
        """The problem of a logical matmul [M, K] @ [K, N] (the pass's view: all rows, all of K) over `world`."""
        if kind == "ag_matmul":
            return cls(kind, max(1, M // world), N, K, world, dtype, b_layout)
        return cls(kind, M, N, max(1, K // world), world, dtype, b_layout)

    def key(self, gpu: str) -> str:
        return (f"{gpu}|w{self.world}|{self.kind}|{self.dtype}|m{m_bucket(self.M)}|n{self.N}|k{self.K}|"
                f"{self.b_layout}")

    @property
    def flops(self) -> int:
        rows = self.M * self.world if self.kind == "ag_matmul" else self.M
        return 2 * rows * self.N * self.K

    def __str__(self) -> str:
        return f"{self.kind} {self.M}x{self.N}x{self.K} w{self.world} {self.dtype} B {self.b_layout}"


@dataclass(frozen=True)
class DecodeProblem:
    """One Flash Decode step: batch B, Hq query and Hkv KV heads of dim D, this rank's KV length S, the world,
    dtype and whether the cache is paged. Its schedules are the stages (bspfuse.tile_decode), stage 0 the
    unfused (BSP) program."""
    B: int
    Hq: int
    Hkv: int
    D: int
    S: int
    world: int = 1
    dtype: str = "bf16"
    paged: bool = False
    kind: str = "flash_decode"

    def __post_init__(self):
        if min(self.B, self.Hq, self.Hkv, self.D, self.S, self.world) < 1 or self.Hq % self.Hkv:
            raise ValueError(f"{self}: sizes must be positive and Hq a multiple of Hkv")

    def key(self, gpu: str) -> str:
        return (f"{gpu}|w{self.world}|flash_decode|{self.dtype}|b{self.B}|h{self.Hq}/{self.Hkv}|d{self.D}|"
                f"s{m_bucket(self.S)}|{'paged' if self.paged else 'contiguous'}")

    def __str__(self) -> str:
        return (f"flash_decode B={self.B} heads {self.Hq}/{self.Hkv} D={self.D} KV {self.S} w{self.world} "
                f"{self.dtype}{' paged' if self.paged else ''}")


@dataclass(frozen=True)
class DecodeConfig:
    """A decode step's knobs: splits of each tile's KV length, the K/V pipeline depth (None: the tiling's), and
    whether steps were timed replayed from a CUDA graph (what an inference engine runs)."""
    splits: int
    num_stages: int | None = None
    graph: bool = False

    def __str__(self) -> str:
        return (f"splits={self.splits}" + (f" stages={self.num_stages}" if self.num_stages else "")
                + (" graph" if self.graph else ""))

    @classmethod
    def parse(cls, text: str) -> "DecodeConfig":
        """The config a candidate's label names ("splits=22 stages=4 graph", as __str__ writes it)."""
        words = text.split()
        fields = dict(part.split("=") for part in words if "=" in part)
        return cls(int(fields["splits"]), int(fields["stages"]) if "stages" in fields else None, "graph" in words)


@dataclass(frozen=True)
class Candidate:
    schedule: str  # push | pull | direct | copy_engine | unfused; a decode step's stage0 .. stage3
    config: TileConfig | DecodeConfig | None = None  # None for the unfused program

    @property
    def label(self) -> str:
        return self.schedule if self.config is None else f"{self.schedule} {self.config}"


# ----------------------------------------------------------------------------------------------- the space

# (BM, BN, BK): accumulators up to 128x256, a stage's operand tiles up to 128x64 + 64x256 elements. Narrow and
# deep tiles serve a few rows: at M = 1 a 16x32 tile gives a 4096-wide weight 128 tiles, one per SM, each
# streaming its columns' K in 256-deep steps.
TILES = [(BM, BN, BK) for BM in (16, 32, 64, 128, 256) for BN in (32, 64, 128, 256) for BK in (64, 128, 256)
         if BM * BN <= 128 * 256 and BM * BK + BK * BN <= 128 * 64 + 64 * 256 and (BN >= 64 or BM <= 32)]
WARPS_STAGES = [(4, 3), (4, 4), (8, 3), (8, 4), (4, 5)]


def schedules(problem: Problem) -> tuple[str, ...]:
    """The fused schedules of the problem's op; a world of one runs the GEMM alone (no peer to overlap with):
    AG+GEMM's copy_engine (no comm programs) and GEMM+RS/AR's direct."""
    if problem.world == 1:
        return ("copy_engine",) if problem.kind == "ag_matmul" else ("direct",)
    return tuple(m for m in AG_MODES if m != "direct") if problem.kind == "ag_matmul" else SCATTER_MODES


def space(problem: Problem, num_sms: int, smem_bytes: int | None = None) -> list[Candidate]:
    """Every candidate: schedules x tiles x (warps, stages) x GROUP_M x comm programs, and the unfused program;
    with smem_bytes (the device's, a program), none whose tiles need more shared memory (tile_smem_bytes)."""
    from bspfuse.tile import default_comm_programs, group_rows

    out = [Candidate(UNFUSED)]
    rows = problem.M * problem.world if problem.kind == "ag_matmul" else problem.M
    for schedule in schedules(problem):
        moves = problem.world > 1 and schedule in ("push", "pull")
        base = default_comm_programs(problem.kind, problem.M, problem.N, problem.K, problem.world)
        comms = sorted({max(1, base // 2), max(1, base), min(32, base * 2)}) if moves else [0]
        for BM, BN, BK in TILES:
            if BM > 2 * max(16, rows):  # a tile twice the rows wastes half of every MMA or more
                continue
            row_blocks = math.ceil((rows // problem.world if problem.kind != "ag_matmul" else rows) / BM)
            groups = sorted({min(g, row_blocks) for g in (1, 8, group_rows(BM, BN, num_sms))})  # > blocks: same
            tiles = math.ceil(rows / BM) * math.ceil(problem.N / BN)
            k_blocks = math.ceil(problem.K / BK)
            # split-K: where the tiles leave SMs idle, a tile's K in slices of at least 4 K-blocks
            splits = [1] + [s for s in (2, 4, 8) if tiles * s <= 2 * num_sms and k_blocks >= 4 * s]
            for (warps, stages), group, comm, split in ((ws, g, c, sk) for ws in WARPS_STAGES for g in groups
                                                        for c in comms for sk in splits):
                if BM * BN >= 128 * 256 and warps == 4:  # a 128x256 accumulator needs 8 warps' registers
                    continue
                if smem_bytes and tile_smem_bytes(BM, BN, BK, stages, problem.dtype) > smem_bytes:
                    continue
                out.append(Candidate(schedule, TileConfig(BM, BN, BK, group, warps, stages, comm, split)))
    return out


def tile_smem_bytes(BM: int, BN: int, BK: int, stages: int, dtype: str) -> int:
    """Shared memory a GEMM program takes: the A and B blocks of each pipeline stage and the output tile staged
    for its TMA store (128x256x64 at 4 stages: 262144 bytes; Triton asked 262176 with its barriers)."""
    item = 4 if dtype == "f32" else 2
    return (stages * (BM * BK + BK * BN) + BM * BN) * item


DECODE_STAGES = ("stage0", "stage1", "stage2", "stage3")
# stages whose step replays from a CUDA graph: stage 1 has the host barrier every step, stage 2 kernels take the
# host's epoch (FlashDecode); stage 0's collective and stage 3's ticket epochs replay
REPLAYABLE_STAGES = ("stage0", "stage3")


def decode_space(problem: DecodeProblem, num_sms: int) -> list[Candidate]:
    """Every stage with the split count choose_num_splits gives, half and twice it, and two K/V pipeline depths
    (3 and 4: at 4K keys 3 ran a step 3-4% faster than the 4 FlashDecode takes for one wave of splits, at 64K the
    same; one H100, decode_core_4k_64k_h100.json), and the stages that replay from a CUDA graph again replayed:
    a few dozen candidates, all measured (no pruning)."""
    from bspfuse.kernels.flash_decode import MAX_SPLITS, choose_num_splits, decode_tiling

    tiling = decode_tiling(problem.B, problem.Hq, problem.Hkv, problem.D, device="cuda")
    base = choose_num_splits(tiling, problem.S, num_sms)
    splits = sorted({max(1, base // 2), base, min(MAX_SPLITS, 2 * base)})
    return [Candidate(stage, DecodeConfig(n, depth, graph)) for graph in (False, True) for stage in DECODE_STAGES
            if not graph or stage in REPLAYABLE_STAGES for n in splits for depth in (3, 4)]


def estimate(problem: Problem, cand: Candidate, device) -> float:
    """Seconds the cost model gives a candidate, to rank the space (`device`: passes.fuse_gemm.DeviceModel).
    The GEMM: waves of tiles over the SMs, each tile's MMAs at a rate that falls with its size and its operand
    bytes streamed at its share of HBM (a program reaches at most PER_SM_STREAM times an even share, so a grid
    of fewer tiles than SMs reads slower), and a floor of every byte read once; the schedule's communication
    as fuse_gemm.choose_mode estimates it."""
    from bspfuse.passes.fuse_gemm import choose_mode

    p, item = problem, 2 if problem.dtype in ("bf16", "f16") else 4
    rows = p.M * p.world if p.kind == "ag_matmul" else p.M
    logical_k = p.K * (p.world if p.kind != "ag_matmul" else 1)
    if cand.config is None:
        return choose_mode(p.kind, rows, p.N, logical_k, p.world, p.dtype, device=device).estimates_us["bsp"] * 1e-6
    c = cand.config
    sms = device.num_sms - c.comm_programs
    owners = p.world if p.kind != "ag_matmul" else 1
    block_rows = rows // owners
    tiles = math.ceil(block_rows / c.BM) * owners * math.ceil(p.N / c.BN)
    items = tiles * c.split_k  # work items: a tile's K slices (split-K), else its tiles
    waves = math.ceil(items / max(1, sms))
    active = min(items, sms)
    k_item = p.K / c.split_k
    efficiency = min(1.0, (c.BM * c.BN / (128 * 256)) ** TILE_EFFICIENCY_EXP) * (0.9 if c.num_stages < 3 else 1.0)
    t_mma = waves * 2 * c.BM * c.BN * k_item / (device.matmul_flops / device.num_sms * efficiency)
    per_tile_rate = min(PER_SM_STREAM * device.hbm_bytes / device.num_sms, device.hbm_bytes / active)
    t_stream = waves * (min(c.BM, block_rows) + c.BN) * k_item * item / per_tile_rate
    if c.split_k > 1:  # each slice adds a float32 tile, the last reads and zeroes it
        t_stream += SPLIT_K_TRAFFIC * (items + 2 * tiles) * c.BM * c.BN * 4 * 2 / device.hbm_bytes
    floor = (rows * p.K + p.K * p.N + rows * p.N) * item / device.hbm_bytes
    t = max(t_mma, t_stream, floor) + 0.05 * (t_mma + t_stream)  # ties at the floor: the less work first
    if p.world > 1:
        est = choose_mode(p.kind, rows, p.N, logical_k, p.world, p.dtype, device=device).estimates_us
        gemm_alone = max(2 * rows * p.N * p.K / device.matmul_flops, floor)
        t += max(0.0, est.get(cand.schedule, est["bsp"]) * 1e-6 - gemm_alone)  # the schedule's exposed comm
    return t


# A program streams at most this many times an even share of HBM. 1.0: at M = 1 the GEMM core read a 58.7 MB
# weight at 1.07 TB/s with fewer tiles than SMs (one H100, 2026-12-07, issue 19's table), about an even share
# per busy SM; a first-order figure for ranking, fitted with the two below (it stayed 1.0).
PER_SM_STREAM = 1.0
# A tile's MMA rate falls as (its area over 128x256's) ** TILE_EFFICIENCY_EXP; split-K's float32 partials cost
# SPLIT_K_TRAFFIC times their bytes at the copy rate. Fitted with PER_SM_STREAM to the device
# times of the 3989 candidates core_suite measured on an H100 (512 problems), each problem's estimates in log
# against its measured times (benchmarks/fit_cost_model.py --table, cost_model_fit_h100.json; 0.35 and 1.0
# before): on the two models left out the mean error went from 0.097 to 0.076, and the model's pick among the
# measured came within 5% of the fastest in 44% of problems, against 37%
TILE_EFFICIENCY_EXP = 0.8
SPLIT_K_TRAFFIC = 2.5


def prune(problem: Problem, candidates: list[Candidate], device, keep: int) -> list[Candidate]:
    """The unfused program and the `keep` fused candidates the cost model ranks best, taken from each schedule
    in turn and at most a third of a schedule's share of one tile shape (BM x BN, whatever its BK and split-K),
    the schedule's best candidate without split-K among them: the measured set spans schedules and tile shapes,
    not only the warps, stages and K-splits of one tile. (On an H100, core_suite's AG+GEMM at 512x2304x3584
    measured only 128x256 and 256x128 tiles split 2 and 4 ways, ranked first by the model: 2.2x cuBLAS's time,
    split 4 slower than split 2 by half.)"""
    ranked = sorted((c for c in candidates if c.config is not None), key=lambda c: estimate(problem, c, device))
    by_schedule: dict = {}
    for c in ranked:
        by_schedule.setdefault(c.schedule, []).append(c)
    cap = max(1, keep // max(1, len(by_schedule)) // 3)
    unsplit = (next((c for c in q if c.config.split_k == 1), None) for q in by_schedule.values())
    kept = [c for c in unsplit if c is not None][:keep]
    per_tile = {(c.schedule, c.config.BM, c.config.BN): 1 for c in kept}
    queues = [iter(q) for q in by_schedule.values()]
    while queues and len(kept) < keep:
        for q in list(queues):
            for c in q:
                tile = (c.schedule, c.config.BM, c.config.BN)
                if c not in kept and per_tile.get(tile, 0) < cap:
                    per_tile[tile] = per_tile.get(tile, 0) + 1
                    kept.append(c)
                    break
            else:
                queues.remove(q)
            if len(kept) == keep:
                break
    return [c for c in candidates if c.config is None] + sorted(kept, key=ranked.index)


# ----------------------------------------------------------------------------------------------- the tuner


class Tuner:
    """Measures a problem's pruned space with `timer(problem, candidate) -> seconds` (None or an exception: the
    candidate cannot run; it is recorded as failed). `device`: the device table's entry the cost model prunes
    with; `progress(done, total, label)` is told of each measurement."""

    def __init__(self, timer, gpu: str, keep: int = 12, progress=None, num_sms: int | None = None):
        from bspfuse.passes.fuse_gemm import DeviceModel

        self.timer, self.gpu, self.keep, self.progress = timer, gpu, keep, progress
        self.device = DeviceModel.of(gpu)
        self.num_sms = num_sms or self.device.num_sms

    def candidates(self, problem: Problem | DecodeProblem) -> list[Candidate]:
        if isinstance(problem, DecodeProblem):
            return decode_space(problem, self.num_sms)
        return prune(problem, space(problem, self.num_sms, self.device.smem_bytes), self.device, self.keep)

    def tune(self, problem: Problem) -> Entry:
        """Every candidate timed; a timer gives seconds back to back, or (back to back, on the device alone)."""
        t0 = time.time()
        cands = self.candidates(problem)
        times: dict = {}
        device: dict = {}
        for i, cand in enumerate(cands):
            try:
                seconds = self.timer(problem, cand)
            except Exception as e:  # noqa: BLE001 - a candidate that does not compile or run is skipped
                seconds = None
                warnings.warn(f"bspfuse tune: {problem}: {cand.label} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}", stacklevel=2)
            b2b, alone = seconds if isinstance(seconds, tuple) else (seconds, None)
            times[cand.label] = None if b2b is None else round(b2b * 1e6, 2)
            if alone is not None:
                device[cand.label] = round(alone * 1e6, 2)
            if self.progress:
                self.progress(i + 1, len(cands), cand.label)
        fused = [c for c in cands if c.config is not None and c.schedule != UNFUSED_STAGE
                 and times.get(c.label) is not None]
        # the kernel that is fastest on the device: back to back, calls shorter than the host's time per call
        # all take that time, and the fastest of them would be chance
        best = min(fused, key=lambda c: (device.get(c.label, times[c.label]), times[c.label])) if fused else None
        from bspfuse.tune.table import Entry, kernel_fingerprint

        return Entry(self.gpu, problem, times, best, kernel_fingerprint(problem, best) if best else "",
                     time.strftime("%Y-%m-%d"), round(time.time() - t0, 2), device)
