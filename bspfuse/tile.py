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


@dataclass(frozen=True)
class AccumulateSplit:
    """Split-K: add the tile's partial over this work item's K slice into `buffer` (float32) and count it in
    `counter[tile]`; the item that completes the count reads the sum back (zeroing the buffer for the next
    call) and runs the rest of the tile's statements, the others stop here."""
    buffer: str
    counter: str


Stmt = object


# ----------------------------------------------------------------------------------------------- interface
# What a generated kernel takes and what its host lays out for it, declared once: codegen renders the
# signature, the flag arrays' offsets and every heap buffer's addressing from these; the host objects
# allocate, bind arguments by name and address the same buffers from them; heap_bytes sums them.

# Symbolic sizes are Python expressions over WORLD, M_BOUND (the most rows of one rank a call may have), M_LOCAL
# (a call's rows of one rank), N, K, BM, BN, cdiv and these derived names:
DERIVED_SIZES = {
    "NB": "cdiv(M_BOUND, BM)",  # row blocks of one rank's rows at the bound
    "TILES": "NB * cdiv(N, BN)",  # output tiles of one rank's rows at the bound
}


def size_of(expr: str, env: dict) -> int:
    """The value of a symbolic size for the sizes in `env` (WORLD, M_BOUND, N, K, BM, BN, ...)."""
    names = {"cdiv": lambda a, b: -(-a // b), **env}
    for name, derived in DERIVED_SIZES.items():
        names.setdefault(name, eval(derived, {"__builtins__": {}}, names))  # noqa: S307 - our own expressions
    value = eval(expr, {"__builtins__": {}}, names)  # noqa: S307
    assert isinstance(value, int) and value >= 0, (expr, value)
    return value


@dataclass(frozen=True)
class HeapBuffer:
    """A buffer on the symmetric heap, of the op's dtype (or float32: dtype "f32"): `slots` slots (they alternate
    between calls by epoch parity) of `owners` blocks of M_BOUND rows, each row `cols` elements. Owner o's rows
    start o * owner_rows rows into a slot: M_BOUND, or M_LOCAL where a call's blocks are packed (AR's result is
    then contiguous). `param` is the kernel parameter that points at it."""
    name: str
    param: str
    cols: str
    slots: int = 1
    owners: str = "WORLD"
    owner_rows: str = "M_BOUND"
    dtype: str = "op"

    @property
    def rows(self) -> str:
        return f"{self.slots} * {self.owners} * M_BOUND"

    def row_start(self, slot: str, owner: str) -> str:
        """The first row of `owner`'s block in `slot` (both expressions)."""
        terms = [f"({slot}) * {self.owners} * M_BOUND"] if self.slots > 1 else []
        terms += [f"({owner}) * {self.owner_rows}"] if self.owners != "1" else []
        return " + ".join(terms) or "0"

    def __str__(self) -> str:
        slots = f"{self.slots} slots x " if self.slots > 1 else ""
        return f"{self.name} [{slots}{self.owners} x M_BOUND, {self.cols}]" + (" f32" if self.dtype == "f32" else "")


@dataclass(frozen=True)
class FlagArray:
    """int32 flags [WORLD, per_rank] (per_rank a symbolic size), raised to a call's epoch and never reset. The
    op keeps its arrays in one buffer (parameter flag_ptr), in the order the tile program lists them."""
    name: str
    per_rank: str
    doc: str = ""

    def __str__(self) -> str:
        return f"{self.name} [WORLD, {self.per_rank}]"


# Parameter roles: how the host binds a parameter and how long it keeps what it bound.
ROLES = {
    "operand": "a call's input (A, or its descriptor): bound per call, let go after the launch",
    "output": "a call's output (C): bound per call, let go after the launch",
    "weight": "B, its descriptor, a bias: kept while the same tensor comes back",
    "heap": "one of the op's heap buffers (HeapBuffer.param)",
    "flags": "the op's flag arrays (FlagArray), one buffer",
    "state": "kept by the op for its life: the wait-error record, the heap's bases, the epoch ticket",
    "scalar": "an integer: a size, a stride, the rank, the epoch",
}


@dataclass(frozen=True)
class Param:
    name: str
    role: str

    def __post_init__(self):
        assert self.role in ROLES, self.role


@dataclass(frozen=True)
class KernelInterface:
    """A kernel's parameters in order (with roles), its constexprs, heap buffers and flag arrays."""
    name: str
    params: tuple[Param, ...]
    constexprs: tuple[str, ...]
    buffers: tuple[HeapBuffer, ...]
    flags: tuple[FlagArray, ...]

    def names(self, *roles: str) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if not roles or p.role in roles)

    def buffer(self, name: str) -> HeapBuffer:
        return next(b for b in self.buffers if b.name == name)

    def flag_offset(self, name: str) -> str:
        """Where flag array `name` starts in the flag buffer (a symbolic size)."""
        before = []
        for f in self.flags:
            if f.name == name:
                return " + ".join(before) or "0"
            before.append(f"WORLD * {f.per_rank}")
        raise KeyError(f"{self.name}: no flag array {name!r} (it has {', '.join(f.name for f in self.flags)})")

    def flag_words(self) -> str:
        return " + ".join(f"WORLD * {f.per_rank}" for f in self.flags) or "0"

    def binder(self):
        """A function taking every parameter by keyword (and nothing else) and returning them in the kernel's
        order: the host binds a launch's arguments by name at the cost of one call."""
        names = ", ".join(self.names())
        scope: dict = {}
        exec(f"def {self.name}_arguments(*, {names}):\n    return ({names},)", scope)  # noqa: S102 - our names
        return scope[f"{self.name}_arguments"]

    def missing(self, given) -> str:
        """The parameters not in `given` (names), with their roles: for an error message."""
        return "; ".join(f"{p.name} ({p.role}: {ROLES[p.role]})" for p in self.params if p.name not in given)




@dataclass(frozen=True)
class TileConfig:
    BM: int = 128
    BN: int = 256
    BK: int = 64
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    comm_programs: int = 0
    # split_k > 1: each output tile's K range in split_k slices, each a work item of its own (stage_split_k), so
    # a GEMM of few tiles (a few rows) still has work for every SM
    split_k: int = 1

    def __str__(self) -> str:
        s = f"{self.BM}x{self.BN}x{self.BK} group_m={self.GROUP_M} warps={self.num_warps} stages={self.num_stages}"
        s += f" comm_programs={self.comm_programs}" if self.comm_programs else ""
        return s + (f" split_k={self.split_k}" if self.split_k > 1 else "")

    @classmethod
    def parse(cls, text: str) -> "TileConfig":
        """The config __str__ wrote ("128x256x64 group_m=8 warps=8 stages=3 split_k=2")."""
        tile, *fields = text.split()
        BM, BN, BK = map(int, tile.split("x"))
        kw = dict(f.split("=") for f in fields)
        return cls(BM, BN, BK, int(kw["group_m"]), int(kw["warps"]), int(kw["stages"]),
                   int(kw.get("comm_programs", 0)), int(kw.get("split_k", 1)))


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
    heap_buffers: tuple[HeapBuffer, ...] = ()  # what the host must allocate on the symmetric heap
    flags: tuple[FlagArray, ...] = ()
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

    def has_buffer(self, name: str) -> bool:
        return any(b.name == name for b in self.heap_buffers)


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
             f"  heap buffers: {', '.join(map(str, tp.heap_buffers)) or '-'}",
             f"  flags: {', '.join(map(str, tp.flags)) or '-'}"]
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

# AG+GEMM: A on its owner's heap, where peers read it (direct, pull); peers' rows staged by slot and source rank
A_ON_HEAP = HeapBuffer("a", "a_ptr", "K", owners="1")
ROWS_INBOX = HeapBuffer("inbox", "stage_ptr", "K", slots=2)  # push: peers put their rows here
ROWS_STAGING = HeapBuffer("staging", "stage_ptr", "K", slots=2)  # pull: this rank gets peers' rows here
ENTERED = FlagArray("entered", "1", "[peer]: the peer entered this call, its A may be read")
ROWS_STAGED = FlagArray("staged", "NB", "[source rank, row block]: the block is in my staging")
ARRIVED = FlagArray("arrived", "NB", "[source rank, row block]: the peer put the block into my inbox")
DONE_READING = FlagArray("done_reading", "1", "[peer]: the peer's comm programs read my A (a count)")
# GEMM+RS/AR: partials by slot and source rank; a rank's own staged partials by owner; AR's result by slot
PARTIALS_INBOX = HeapBuffer("inbox", "inbox_ptr", "N", slots=2)
PARTIALS_STAGED = HeapBuffer("staging", "stage_ptr", "N")  # push: read by this rank's comm programs
PARTIALS_SHARED = HeapBuffer("staging", "stage_ptr", "N", slots=2)  # pull: read by the owners
AR_OUT = HeapBuffer("out", "out_ptr", "N", slots=2, owner_rows="M_LOCAL")
PARTIAL_READY = FlagArray("partial_ready", "TILES", "[source rank, tile]: the peer's partial of my tile is ready")
FINAL_READY = FlagArray("final_ready", "TILES", "[owner rank, tile]: the owner's finished tile is in my out")
TILE_STAGED = FlagArray("staged", "TILES", "[position t]: this rank stored its tile t locally")
# split-K: the K slices' partial sums of this rank's tiles, and how many slices of each tile were added
SPLIT_PARTIALS = HeapBuffer("k_partials", "acc_ptr", "N", dtype="f32")
K_DONE = FlagArray("k_done", "TILES", "[position t]: K slices of tile t added (a count: SPLIT_K a call)")


def lower_allgather_matmul(name: str, dtype: str, epilogue: tuple[str, ...], config: TileConfig,
                           b_layout: str = "kn", weights: int = 1) -> TileProgram:
    """fused_allgather_matmul -> the direct tile program: each tile loads A rows from the rank that owns them.
    With several weights, a tile's columns fall in one of them and it stores into that weight's C; the
    epilogue belongs to the first weight (the matmul whose pointwise chain the pass absorbed)."""
    return TileProgram("ag_matmul", name, dtype, "local_first",
                       per_tile=(LoadA("a", "src"), Dot(), Epilogue(epilogue), StoreTile("c", "me")),
                       config=config, heap_buffers=(A_ON_HEAP,), b_layout=b_layout, weights=weights)


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
                       config=config, heap_buffers=(PARTIALS_INBOX,), flags=(PARTIAL_READY,), b_layout=b_layout)


def lower_matmul_allreduce(name: str, dtype: str, epilogue: tuple[str, ...], config: TileConfig,
                           b_layout: str = "kn") -> TileProgram:
    """fused_matmul_allreduce -> reduce-scatter as above, then the owner stores each finished tile into every
    peer's output (with a flag); at the end each rank waits for the tiles it does not own."""
    rs = lower_matmul_reduce_scatter(name, dtype, epilogue, config, b_layout)
    return rs.with_(kind="matmul_ar",
                    per_own_tile=rs.per_own_tile + _STORE_FINAL_REMOTELY,
                    gemm_epilogue=(Wait("final_ready", "tile"),),
                    heap_buffers=(PARTIALS_INBOX, AR_OUT), flags=(PARTIAL_READY, FINAL_READY))


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
        heap_buffers=(A_ON_HEAP, ROWS_STAGING), flags=(ENTERED, ROWS_STAGED, DONE_READING))


def _stage_push_rows(tp: TileProgram) -> TileProgram:
    # LoadA(a, src) per tile  ->  comm: put own chunk into every peer's inbox ; Signal(arrived, peer)
    #                             gemm: Wait(arrived[src, chunk]) ; LoadA(inbox, me)
    _expect_remote_load(tp)
    per_tile = tuple(s for s in tp.per_tile if not isinstance(s, LoadA))
    return tp.with_(
        mode="push",
        per_chunk=(MoveChunk("put", "a", "inbox", "peer"), Signal("arrived", "chunk", "peer")),
        per_tile=(Wait("arrived", "chunk"), LoadA("inbox", "me")) + per_tile,
        heap_buffers=(ROWS_INBOX,), flags=(ARRIVED,))


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
        heap_buffers=_heap(tp, PARTIALS_INBOX, PARTIALS_STAGED), flags=_flags(tp, PARTIAL_READY, TILE_STAGED))


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
        heap_buffers=_heap(tp, PARTIALS_SHARED), flags=_flags(tp, PARTIAL_READY))


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


def _heap(tp: TileProgram, *partial_buffers: HeapBuffer) -> tuple[HeapBuffer, ...]:
    return partial_buffers + ((AR_OUT,) if tp.kind == "matmul_ar" else ())


def _flags(tp: TileProgram, *partial_flags: FlagArray) -> tuple[FlagArray, ...]:
    # AR moves finished tiles through the comm programs too: they wait on "staged" and raise "final_ready".
    extra = (TILE_STAGED, FINAL_READY) if tp.kind == "matmul_ar" else ()
    return tuple(dict.fromkeys(partial_flags + extra))


def _expect_direct_scatter(tp: TileProgram) -> None:
    if tp.mode != "direct" or not all(s in tp.per_tile for s in _STORE_PARTIAL_REMOTELY):
        raise ValueError(f"{tp.name}: staging rewrites a direct program that stores partials remotely, "
                         f"got mode {tp.mode}")


def _expect_remote_load(tp: TileProgram) -> None:
    if tp.mode != "direct" or not any(isinstance(s, LoadA) and s.rank == "src" for s in tp.per_tile):
        raise ValueError(f"{tp.name}: staging rewrites a direct program with a remote LoadA, got mode {tp.mode}")


def stage_split_k(tp: TileProgram) -> TileProgram:
    """Split each output tile's K range over config.split_k work items: after its Dot, an item adds its partial
    into a float32 buffer; the item that completes a tile goes on with the tile's statements (an AG+GEMM item
    waits for its rows first, as the tile did).
    # gemm: [Wait ;] LoadA ; Dot ; rest  ->  [Wait ;] LoadA ; Dot (one K slice) ; AccumulateSplit ; rest (last)"""
    if tp.kind == "ag_matmul" and (tp.mode == "direct" or tp.weights > 1):
        raise ValueError(f"{tp.name}: split-K takes an AG+GEMM of one weight that stages its rows (push, pull, "
                         f"copy_engine), not {tp.mode} with {tp.weights} weight(s)")
    acc = AccumulateSplit(SPLIT_PARTIALS.name, K_DONE.name)
    return tp.with_(per_tile=_rewrite(tp.per_tile, {Dot(): (Dot(), acc)}),
                    per_own_tile=_rewrite(tp.per_own_tile, {Dot(): (Dot(), acc)}),
                    heap_buffers=tp.heap_buffers + (SPLIT_PARTIALS,), flags=tp.flags + (K_DONE,))


STAGING = {"pull": stage_pull, "push": stage_push, "copy_engine": stage_copy_engine}
AG_MODES = ("push", "pull", "copy_engine", "direct")
# AG+GEMM modes whose host side must run every call, so a CUDA graph cannot replay them (the other modes'
# kernels count their epochs on the device)
HOST_SIDE_AG_MODES = {"copy_engine": "the host enqueues the row copies and their flags for each call",
                      "direct": "the host barriers before and after each call"}
SCATTER_MODES = ("push", "pull", "direct")  # GEMM+RS / GEMM+AR: a STAGING rewrite, or the direct program


# ----------------------------------------------------------------------------------------------- the interface


def kernel_interface(tp: TileProgram) -> KernelInterface:
    """The parameters, constexprs, heap buffers and flag arrays of tp's kernel, in the order codegen renders
    them and the host binds them."""
    P = Param
    bias = (P("bias_ptr", "weight"),) if any(isinstance(s, Epilogue) and "bias" in s.fns
                                            for s in tp.per_tile + tp.per_own_tile) else ()
    heap = tuple(P(b.param, "heap") for b in tp.heap_buffers if b.param not in ("a_ptr", "out_ptr"))
    kept = (P("flag_ptr", "flags"), P("err_ptr", "state"), P("heap_bases", "state"), P("rank", "scalar"),
            P("epoch", "scalar"), P("ticket_ptr", "state"))
    sizes = tuple(P(n, "scalar") for n in ("M_LOCAL", "M_BOUND", "SEG", "N", "K", "stride_am", "stride_b"))
    common = ("WORLD", "BM", "BN", "BK", "GROUP_M", "COMM", "NUM_PROGRAMS", "MAX_SPINS", "VEC", "SEGMENTED")
    if tp.kind == "ag_matmul":
        more = tuple(P(n.format(j), role) for j in range(1, tp.weights)
                     for n, role in zip(AG_WEIGHT_PARAMS, ("weight", "output", "scalar", "scalar", "scalar")))
        params = ((P("a_ptr", "operand"), P("b_desc", "weight"), P("b_ptr", "weight"), P("c_ptr", "output"))
                  + bias + heap + kept + sizes + (P("stride_cm", "scalar"),) + more)
        constexprs = common + ("CHUNK_K", "TARGET", "SPLIT_K") + (("FLAG_BLOCKS",) if tp.host_per_chunk else ())
    else:
        params = ((P("a_desc", "operand"), P("a_ptr", "operand"), P("b_desc", "weight"), P("b_ptr", "weight"),
                   P("out_ptr", "output")) + bias + heap + kept + sizes)
        constexprs = common + ("LAG", "SPLIT_K")
    return KernelInterface(tp.name, params, constexprs, tp.heap_buffers, tp.flags)


# Weight j >= 1 of an AG+GEMM with several (weight 0 uses b_desc/b_ptr, c_ptr, N, stride_b, stride_cm).
AG_WEIGHT_PARAMS = ("b{}_ptr", "c{}_ptr", "N{}", "stride_b{}", "stride_cm{}")


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
