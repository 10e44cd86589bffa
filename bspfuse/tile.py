"""Tile IR: what one fused kernel does, per output tile and per communication chunk.

A fused GEMM kernel is a persistent grid with two kinds of programs:

    comm programs (pid < COMM)   move chunks of an operand between ranks (put/get + signal)
    gemm programs (the rest)     loop over output tiles: wait, load, dot, epilogue, store/put + signal

A `TileProgram` lists both as statements. Lowering a fused graph op gives the *direct* form, where a
tile reads a peer's rows with a remote load (correct, but every N-tile would pull the same A tile across
NVLink again: on 2xH200, 2026-11-22, such a kernel took 5.7-6.5x the time of the matmul alone at four
shapes, 1.18 against 0.21 ms at 1024x8192x8192). The rewrites `stage_pull` and `stage_push` turn that
remote load into "fetch each chunk once into a local buffer + per-chunk flag" and "wait on the flag +
local load"; pull and push differ only in which side issues the transfer and where the flags live. Tile
sizes and the number of comm programs are attributes, so one autotuner can search both together.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bspfuse.devices import H200 as TILES_MEASURED_ON


# ----------------------------------------------------------------------------------------------- statements
# Ranks are symbolic: "me", "src" (the rank a tile's rows come from), "dst" (the rank a tile's rows go to),
# "peer" (a loop over the other ranks). Buffers are named; the host allocates the ones on the heap.

@dataclass(frozen=True)
class Signal:
    """Raise `flag[index]` on `rank` to this call's epoch (release, system scope); op="add" counts instead,
    for a flag that several programs raise once each per call. deferred: raise it when the program's next
    tile is computed (before that tile's waits), so the release finds the announced stores long complete
    instead of stalling the GEMM until its remote stores are acknowledged."""
    flag: str
    index: str
    rank: str
    op: str = "set"
    deferred: bool = False


@dataclass(frozen=True)
class Wait:
    """Spin until the local `flag[index]` reaches this call's epoch (acquire, system scope)."""
    flag: str
    index: str
    count: str = "1"  # how many signals per epoch (a counter raised by several programs)


@dataclass(frozen=True)
class LoadA:
    """The GEMM's A operand for this tile, from `buffer` on `rank` (remote when rank is not "me")."""
    buffer: str
    rank: str


@dataclass(frozen=True)
class MoveChunk:
    """Copy one chunk of rows: `get` reads `src_buffer` on a peer into a local buffer, `put` writes a
    local chunk into a peer's buffer."""
    kind: str  # get | put
    src_buffer: str
    dst_buffer: str
    rank: str


@dataclass(frozen=True)
class Dot:
    pass


@dataclass(frozen=True)
class Epilogue:
    fns: tuple[str, ...]  # pointwise functions applied to the fp32 accumulator, in order ("bias" reads a vector)


@dataclass(frozen=True)
class StoreTile:
    """Store the tile into `buffer` on `rank` (a remote store when rank is not "me")."""
    buffer: str
    rank: str


@dataclass(frozen=True)
class AddPeerPartials:
    """acc += every other rank's partial of this tile, after waiting on its flag: from this rank's `buffer`
    where the peers put them (rank="me"), or read from each source rank's `buffer` (rank="src")."""
    buffer: str
    flag: str
    rank: str = "me"


Stmt = object


@dataclass(frozen=True)
class TileConfig:
    BM: int = 128
    BN: int = 256
    BK: int = 64
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    comm_programs: int = 0

    def __str__(self) -> str:
        s = f"{self.BM}x{self.BN}x{self.BK} group_m={self.GROUP_M} warps={self.num_warps} stages={self.num_stages}"
        return s + (f" comm_programs={self.comm_programs}" if self.comm_programs else "")


# How a kernel reads B[K, N] (both without a copy; any other strides are copied to "kn" by the host):
#   kn  row-major [K, N] storage: tiles [BK, BN] go straight into the dot
#   nk  B is the transpose of a row-major [N, K] tensor, e.g. an nn.Linear weight passed as weight.t():
#       tiles [BN, BK] of that storage are transposed in the dot
B_LAYOUTS = ("kn", "nk")


@dataclass(frozen=True)
class TileProgram:
    """One fused kernel. `order` names how gemm programs walk the M-blocks:

    local_first   AG+GEMM: this rank's rows first, then each peer's, so remote data has time to arrive
    interleaved   GEMM+RS / GEMM+AR: tiles of rows the other ranks own (partials that must travel) lead by
                  LAG local tiles; after the lead, each group of WORLD tiles is one tile of every peer's rows
                  (rank r sends to r+1, r+2, ... in turn, so no two ranks write one peer at once) and one own
                  tile, whose partials the peers made LAG tiles earlier. Traffic is spread over the whole
                  GEMM: partials leave at an even rate and AR's finished tiles go back as they are made.
    """
    kind: str  # ag_matmul | matmul_rs | matmul_ar
    name: str
    dtype: str
    order: str
    prologue: tuple = ()  # comm programs, once per call
    per_chunk: tuple = ()  # comm programs, per chunk of rows
    per_tile: tuple = ()  # gemm programs, per output tile (the phase of own rows for RS/AR: see per_own_tile)
    per_own_tile: tuple = ()  # gemm programs, for tiles of the rows this rank owns (RS/AR)
    per_own_chunk: tuple = ()  # comm programs, per tile of the rows this rank owns (AR: finished tiles out)
    comm_epilogue: tuple = ()  # comm programs, after their chunks
    host_per_chunk: tuple = ()  # the host, per chunk of rows: enqueued on a copy stream, so no SM moves them
    gemm_epilogue: tuple = ()  # gemm programs, after their tiles
    config: TileConfig = field(default_factory=TileConfig)
    mode: str = "direct"  # direct | pull | push
    heap_buffers: tuple[str, ...] = ()  # what the host must allocate on the symmetric heap
    flags: tuple[str, ...] = ()
    b_layout: str = "kn"  # B_LAYOUTS: how the kernel reads B[K, N]
    # AG+GEMM: how many weights share the gathered A (C_j = A @ B_j; their column tiles form one N range,
    # so projections of the same input, e.g. wq/wk/wv or w1/w3, run as one wider GEMM)
    weights: int = 1

    def __post_init__(self):
        if self.b_layout not in B_LAYOUTS:
            raise ValueError(f"{self.name}: b_layout {self.b_layout!r} is not one of {', '.join(B_LAYOUTS)}")
        if self.weights > 1 and self.kind != "ag_matmul":
            raise ValueError(f"{self.name}: only AG+GEMM programs take several weights")
        if is_gated(self) and self.weights != 2:
            raise ValueError(f"{self.name}: the swiglu epilogue multiplies two weights' tiles, got {self.weights}")

    def with_(self, **kw) -> "TileProgram":
        return dataclasses.replace(self, **kw)


def gated_config(cfg: TileConfig) -> TileConfig:
    """A gated program keeps two accumulators: half the columns per tile (128x256 -> 128x128) holds the same
    registers and does the same MMA work per tile as the single-weight tile."""
    return dataclasses.replace(cfg, BN=min(cfg.BN, 128))


def ag_config(cfg: TileConfig, mode: str | None, gated: bool = False) -> TileConfig:
    """AG+GEMM's config for its mode: direct and copy_engine run no comm programs (every SM multiplies), push
    and pull at least one; a gated (swiglu) program takes gated_config's tile."""
    comm = 0 if mode in ("direct", "copy_engine") else max(1, cfg.comm_programs)
    return dataclasses.replace(gated_config(cfg) if gated else cfg, comm_programs=comm)


def is_gated(tp: TileProgram) -> bool:
    """AG+GEMM whose epilogue is swiglu: each tile accumulates A @ B_0 and A @ B_1 over the same columns and
    stores silu(first) * second, one [M, N] result for the two weights."""
    return any(isinstance(s, Epilogue) and "swiglu" in s.fns for s in tp.per_tile)


def _fmt(s) -> str:
    name = type(s).__name__
    args = ", ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s)
                     if getattr(s, f.name) != f.default)
    return f"{name}({args})"


def print_tile_program(tp: TileProgram) -> str:
    layout = f" b_layout={tp.b_layout}" if tp.b_layout != "kn" else ""
    layout += f" weights={tp.weights}" if tp.weights > 1 else ""
    lines = [f"tile_program {tp.name} kind={tp.kind} mode={tp.mode} dtype={tp.dtype} order={tp.order}{layout}",
             f"  config: {tp.config}",
             f"  heap buffers: {', '.join(tp.heap_buffers) or '-'}; flags: {', '.join(tp.flags) or '-'}"]
    for title, body in (("host (copy engine) per chunk", tp.host_per_chunk),
                        ("comm prologue", tp.prologue), ("comm per chunk", tp.per_chunk),
                        ("comm per own tile", tp.per_own_chunk), ("comm after chunks", tp.comm_epilogue),
                        ("gemm per tile", tp.per_tile),
                        ("gemm per own tile", tp.per_own_tile), ("gemm after tiles", tp.gemm_epilogue)):
        if body:
            lines.append(f"  {title}:")
            lines.extend(f"    {_fmt(s)}" for s in body)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- lowering


def lower_allgather_matmul(name: str, dtype: str, epilogue: tuple[str, ...], config: TileConfig,
                           b_layout: str = "kn", weights: int = 1) -> TileProgram:
    """fused_allgather_matmul -> the direct tile program: each tile loads A rows from the rank that owns them.
    With several weights, a tile's columns fall in one of them and it stores into that weight's C; the
    epilogue belongs to the first weight (the matmul whose pointwise chain the pass absorbed)."""
    return TileProgram("ag_matmul", name, dtype, "local_first",
                       per_tile=(LoadA("a", "src"), Dot(), Epilogue(epilogue), StoreTile("c", "me")),
                       config=config, heap_buffers=("a",), b_layout=b_layout, weights=weights)


# The direct program stores a partial into its owner's inbox from the GEMM's epilogue; push turns that into
# a local store + flag, pull into a local store the owner reads.
_STORE_PARTIAL_REMOTELY = (StoreTile("inbox", "dst"), Signal("partial_ready", "tile", "dst", deferred=True))
# ... and AR's finished tile into every peer's output; push and pull move it with the comm programs.
_STORE_FINAL_REMOTELY = (StoreTile("out", "peer"), Signal("final_ready", "tile", "peer", deferred=True))


def lower_matmul_reduce_scatter(name: str, dtype: str, epilogue: tuple[str, ...], config: TileConfig,
                                b_layout: str = "kn") -> TileProgram:
    """fused_matmul_reduce_scatter -> the direct tile program: partial tiles of other ranks' rows are stored
    straight into their inbox from the GEMM's epilogue (with a flag); tiles of own rows add the peers'
    partials, apply the epilogue and store."""
    return TileProgram("matmul_rs", name, dtype, "interleaved",
                       per_tile=(LoadA("a", "me"), Dot(), *_STORE_PARTIAL_REMOTELY),
                       per_own_tile=(LoadA("a", "me"), Dot(), AddPeerPartials("inbox", "partial_ready"),
                                     Epilogue(epilogue), StoreTile("out", "me")),
                       config=config, heap_buffers=("inbox",), flags=("partial_ready",), b_layout=b_layout)


def lower_matmul_allreduce(name: str, dtype: str, epilogue: tuple[str, ...], config: TileConfig,
                           b_layout: str = "kn") -> TileProgram:
    """fused_matmul_allreduce -> reduce-scatter as above, then the owner stores each finished tile into every
    peer's output (with a flag); at the end each rank waits for the tiles it does not own."""
    rs = lower_matmul_reduce_scatter(name, dtype, epilogue, config, b_layout)
    return rs.with_(kind="matmul_ar",
                    per_own_tile=rs.per_own_tile + _STORE_FINAL_REMOTELY,
                    gemm_epilogue=(Wait("final_ready", "tile"),),
                    heap_buffers=("inbox", "out"), flags=("partial_ready", "final_ready"))


# ----------------------------------------------------------------------------------------------- rewrites


def stage_pull(tp: TileProgram) -> TileProgram:
    """The consumer fetches what it needs: AG+GEMM's comm programs get peers' rows; GEMM+RS/AR's owner
    reads the peers' partials from their staging in its epilogue (each moves once, no inbox write)."""
    return _stage_pull_rows(tp) if tp.kind == "ag_matmul" else _stage_pull_partials(tp)


def stage_push(tp: TileProgram) -> TileProgram:
    """The producer sends what it made: AG+GEMM's comm programs put own rows; GEMM+RS/AR's GEMM programs
    stage partials locally and comm programs put them into the owner's inbox while the GEMM goes on."""
    return _stage_push_rows(tp) if tp.kind == "ag_matmul" else _stage_push_partials(tp)


def _stage_pull_rows(tp: TileProgram) -> TileProgram:
    # LoadA(a, src) per tile  ->  comm: Wait(peer entered) ; get chunk into staging ; Signal(staged, me)
    #                             gemm: Wait(staged[chunk]) ; LoadA(staging, me)
    _expect_remote_load(tp)
    per_tile = tuple(s for s in tp.per_tile if not isinstance(s, LoadA))
    return tp.with_(
        mode="pull",
        prologue=(Signal("entered", "me", "peer"),),
        per_chunk=(Wait("entered", "src"), MoveChunk("get", "a", "staging", "src"), Signal("staged", "chunk", "me")),
        per_tile=(Wait("staged", "chunk"), LoadA("staging", "me")) + per_tile,
        # A peer may overwrite its A as soon as this call returns: keep it until every peer has read it.
        comm_epilogue=(Signal("done_reading", "me", "peer", op="add"), Wait("done_reading", "peer", count="COMM")),
        heap_buffers=("a", "staging"), flags=("entered", "staged", "done_reading"))


def _stage_push_rows(tp: TileProgram) -> TileProgram:
    # LoadA(a, src) per tile  ->  comm: put own chunk into every peer's inbox ; Signal(arrived, peer)
    #                             gemm: Wait(arrived[src, chunk]) ; LoadA(inbox, me)
    _expect_remote_load(tp)
    per_tile = tuple(s for s in tp.per_tile if not isinstance(s, LoadA))
    return tp.with_(
        mode="push",
        per_chunk=(MoveChunk("put", "a", "inbox", "peer"), Signal("arrived", "chunk", "peer")),
        per_tile=(Wait("arrived", "chunk"), LoadA("inbox", "me")) + per_tile,
        heap_buffers=("inbox",), flags=("arrived",))


def stage_copy_engine(tp: TileProgram) -> TileProgram:
    """push with the moves taken off the SMs: the host enqueues each chunk's copy into every peer's staging
    and the chunk's flag (a stream memory write, ordered after the copy) on a copy stream, so every SM runs
    the GEMM. AG+GEMM only: the rows exist before the kernel starts, unlike GEMM+RS/AR's partials."""
    if tp.kind != "ag_matmul":
        raise ValueError(f"{tp.name}: the copy engine moves rows that exist before the kernel (AG+GEMM), "
                         f"not {tp.kind}'s partials")
    push = _stage_push_rows(tp)
    return push.with_(mode="copy_engine", per_chunk=(), host_per_chunk=push.per_chunk)


def _rewrite(body: tuple, rules: dict) -> tuple:
    """Each statement of `body` that is a key of `rules` replaced by that rule's statements."""
    return tuple(out for s in body for out in rules.get(s, (s,)))


_STAGE_PARTIAL = (StoreTile("staging", "me"), Signal("staged", "tile", "me"))


def _stage_push_partials(tp: TileProgram) -> TileProgram:
    # gemm: StoreTile(inbox, dst) ; Signal(partial_ready, dst)  ->  StoreTile(staging, me) ; Signal(staged, me)
    # comm: Wait(staged[tile]) ; put staging tile into dst's inbox ; Signal(partial_ready, dst)
    _expect_direct_scatter(tp)
    return _stage_finals(tp).with_(
        mode="push",
        per_tile=_rewrite(tp.per_tile, {_STORE_PARTIAL_REMOTELY[0]: (_STAGE_PARTIAL[0],),
                                        _STORE_PARTIAL_REMOTELY[1]: (_STAGE_PARTIAL[1],)}),
        per_chunk=(Wait("staged", "tile"), MoveChunk("put", "staging", "inbox", "dst"),
                   Signal("partial_ready", "tile", "dst")),
        heap_buffers=_heap(tp, "inbox", "staging"), flags=_flags(tp, "partial_ready", "staged"))


def _stage_pull_partials(tp: TileProgram) -> TileProgram:
    # gemm: StoreTile(inbox, dst)                 ->  StoreTile(staging, me)   (the flag still goes to dst)
    # own:  AddPeerPartials(inbox, rank=me)       ->  AddPeerPartials(staging, rank=src): remote loads
    _expect_direct_scatter(tp)
    staged = _stage_finals(tp)
    add = next(s for s in tp.per_own_tile if isinstance(s, AddPeerPartials))
    return staged.with_(
        mode="pull",
        per_tile=_rewrite(tp.per_tile, {_STORE_PARTIAL_REMOTELY[0]: (_STAGE_PARTIAL[0],)}),
        per_own_tile=_rewrite(staged.per_own_tile, {add: (AddPeerPartials("staging", add.flag, "src"),)}),
        heap_buffers=_heap(tp, "staging"), flags=_flags(tp, "partial_ready"))


def _stage_finals(tp: TileProgram) -> TileProgram:
    # AR, own tile: StoreTile(out, peer) ; Signal(final_ready, peer)  ->  Signal(staged, me)
    #   comm: Wait(staged[tile]) ; put the finished tile into every peer's out ; Signal(final_ready, peer)
    if tp.kind != "matmul_ar":
        return tp
    return tp.with_(
        per_own_tile=_rewrite(tp.per_own_tile, {_STORE_FINAL_REMOTELY[0]: (),
                                                _STORE_FINAL_REMOTELY[1]: (Signal("staged", "tile", "me"),)}),
        per_own_chunk=(Wait("staged", "tile"), MoveChunk("put", "out", "out", "peer"),
                       Signal("final_ready", "tile", "peer")))


def _heap(tp: TileProgram, *partial_buffers: str) -> tuple[str, ...]:
    return partial_buffers + (("out",) if tp.kind == "matmul_ar" else ())


def _flags(tp: TileProgram, *partial_flags: str) -> tuple[str, ...]:
    # AR moves finished tiles through the comm programs too: they wait on "staged" and raise "final_ready".
    extra = ("staged", "final_ready") if tp.kind == "matmul_ar" else ()
    return tuple(dict.fromkeys(partial_flags + extra))


def _expect_direct_scatter(tp: TileProgram) -> None:
    if tp.mode != "direct" or not all(s in tp.per_tile for s in _STORE_PARTIAL_REMOTELY):
        raise ValueError(f"{tp.name}: staging rewrites a direct program that stores partials remotely, "
                         f"got mode {tp.mode}")


def _expect_remote_load(tp: TileProgram) -> None:
    if tp.mode != "direct" or not any(isinstance(s, LoadA) and s.rank == "src" for s in tp.per_tile):
        raise ValueError(f"{tp.name}: staging rewrites a direct program with a remote LoadA, got mode {tp.mode}")


STAGING = {"pull": stage_pull, "push": stage_push, "copy_engine": stage_copy_engine}
AG_MODES = ("push", "pull", "copy_engine", "direct")
# AG+GEMM modes whose host side must run every call, so a CUDA graph cannot replay them (the other modes'
# kernels count their epochs on the device)
HOST_SIDE_AG_MODES = {"copy_engine": "the host enqueues the row copies and their flags for each call",
                      "direct": "the host barriers before and after each call"}
SCATTER_MODES = ("push", "pull", "direct")  # GEMM+RS / GEMM+AR: a STAGING rewrite, or the direct program


# ----------------------------------------------------------------------------------------------- configs


def choose_config(kind: str, M: int, N: int, K: int, world_size: int, num_sms: int = 132,
                  comm_programs: int | None = None) -> TileConfig:
    """Tile sizes that fill the GPU: the largest tile whose count still covers most SMs, with two rules
    measured on 2xH200 (gemm_bench.py --tiles, back to back, 2026-11-22):

    - a tile is never more than twice as tall as the rows of its row block: GEMM+AR at M=128 has 64 rows
      per owner, and a 128-row tile there wastes half of every MMA (64x128 tiles: 45 against 56 us);
    - AG+GEMM keeps at least 3 waves of tiles, or the rows of this rank (the first wave) cannot hide the
      peers' first chunks: at 1024 rows 64x256 tiles (4 waves) took 0.21 ms against 0.26 with 128x256.

    128x256x64 with 3 stages and 8 warps is the tile that reached cuBLAS speed on an H200 (a persistent TMA
    kernel: 0.91-1.02x cuBLAS's speed at four shapes of 1024-16384 rows, 2026-11-22; the generated kernels'
    GEMM core on an H100: BENCHMARKS.md, "The GEMM core against cuBLAS"); smaller problems (decode-sized M,
    or a reduce-scatter's per-rank rows) need smaller tiles to fill 132 SMs.
    """
    rows = M // world_size if kind in ("matmul_rs", "matmul_ar") else M
    blocks_per_row_block = world_size if kind != "ag_matmul" else 1  # RS/AR: one row block per owner
    waves = 3 if kind == "ag_matmul" else 0.75
    wide, tall = [(128, 256, 64, 8, 3), (64, 256, 64, 4, 4)], [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]
    # AG+GEMM prefers a wide 4-warp tile to a tall square one at the same count (1024 rows: 64x256 0.21 ms,
    # 128x128 0.26 ms); RS/AR measured the other way at 1024 rows (128x128 0.136-0.146, 64x256 0.138-0.160)
    candidates = wide + tall if kind == "ag_matmul" else [wide[0], tall[0], wide[1], tall[1]]
    chosen = candidates[-1]
    for BM, BN, BK, warps, stages in candidates:
        if BM >= 2 * rows and BM > 64:
            continue
        tiles = -(-rows // BM) * blocks_per_row_block * -(-N // BN)
        if tiles >= waves * num_sms:
            chosen = (BM, BN, BK, warps, stages)
            break
    BM, BN, BK, warps, stages = chosen
    if comm_programs is None:
        comm_programs = default_comm_programs(kind, M, N, K, world_size)
    group = group_rows(BM, BN, num_sms)
    if kind == "ag_matmul":
        # local_first walks this rank's row blocks before a peer's: a group that reached into a peer's rows
        # would wait for them at once (1024 rows with 64-row blocks: 0.208 -> 0.295 ms). A group is a
        # divisor of the row blocks one rank owns.
        blocks = -(-(M // world_size) // BM)
        group = max(d for d in range(1, min(group, blocks) + 1) if blocks % d == 0)
    return TileConfig(BM, BN, BK, group, warps, stages, comm_programs)


def group_rows(BM: int, BN: int, num_sms: int) -> int:
    """GROUP_M: how many row blocks a wave of tiles spans, so that the A rows and B columns one wave reads
    (GROUP_M * BM rows, num_sms / GROUP_M * BN columns) are about equal: the fewest bytes for L2 and HBM
    per wave, GROUP_M = sqrt(num_sms * BN / BM). 128x256 tiles on 132 SMs: 16 (the layer's GEMMs in
    sequence on an H100, core_bench.py --layer: 9.69-9.82 ms with 16 against 9.74-10.00 with 8; 4 slower,
    24 and 32 about as 16). A gated tile (two weights' 128 columns) reads as much B as a 256-column one,
    which is why gated_config keeps the single-weight tile's value."""
    return max(1, round((num_sms * BN / BM) ** 0.5))


def default_comm_programs(kind: str, M: int, N: int, K: int, world_size: int) -> int:
    """Programs that move data while the GEMM computes; how many follows from the rate it must move.

    AG+GEMM eats A at (bytes of A) / (GEMM time); at a matmul rate of R flop/s that is 2*K bytes per 2*N*K
    flops, so remote rows are needed at about R / N bytes/s times (W-1)/W. GEMM+RS/AR (K is K_local there)
    make an output element per 2*K flops and send (W-1)/W of them as partials, AR as many again as
    finished tiles. Each program moves `sm_push_gbps`; add one program of slack. R and the push rate are
    the H200's in the device table, where the tiles were measured: the kernels take the same tiles on every
    device, so the cost model estimates the tiles that run.
    """
    if world_size == 1:
        return 0
    rate, per_program = TILES_MEASURED_ON.matmul_tflops.value * 1e12, TILES_MEASURED_ON.sm_push_gbps.value * 1e9
    if kind == "ag_matmul":
        need = rate / N * (world_size - 1) / world_size  # bytes/s of remote A
    else:  # K is K_local: each output element costs 2*K flops; its partial (RS), and for AR its final, go out
        need = rate / (2 * K) * 2 * (world_size - 1) / world_size * (2 if kind == "matmul_ar" else 1)
    return int(min(32, max(2, -(-need // per_program) + 1)))
