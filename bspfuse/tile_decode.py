"""Tile IR of Flash Decode: a decode step as kernels of per-tile statements, and its stages as rewrites.

A decode step attends one query per (batch, query head) over a KV cache split along the sequence across
ranks. Its work is cut into *tiles* (a batch entry and the query heads of one KV head) and each tile's KV
length into *splits* (so batch 1 fills the GPU). A tile's attention over a set of keys is a *state* (O, LSE),
and states merge exactly: the splits' states on a GPU, then the ranks' states across GPUs.

The BSP program (stage 0) is what a user writes::

    kernel split        per (tile, split):  Attend ; StoreState(mid)
    kernel merge_splits per tile:           MergeStates(mid over splits) ; StoreState(gather, own slot)
    host all_gather of the gather buffer (a collective)
    kernel merge_ranks  per tile:           MergeStates(gather over ranks) ; StoreState(out)

and each stage is a rewrite of the one before, as pull and push are for the GEMMs (bspfuse.tile):

    stage_rma    (0 -> 1)  the collective becomes a put kernel (PutState into every peer's slot) and a host barrier
    stage_flags  (1 -> 2)  the put raises a flag per (tile, rank); the merge of ranks waits per tile and source:
                           no barrier
    stage_fused  (2 -> 3)  one persistent launch: split programs count their tile's splits (CountSplits), the last
                           merges them and pushes the tile with its flag; merge programs take tiles as they arrive

`bspfuse.codegen.decode` prints each kernel; the device functions its statements call (the attention of a
split, the merge of a chunk of states, the push of a tile) are in `bspfuse.kernels.decode`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------- statements
# Buffers of states: "mid" (the splits' states, [splits, B, Hq, D] + [splits, B, Hq]), "gather" (one slot per
# rank, on the symmetric heap: double-buffered by epoch parity where the kernels count epochs), "out" (the
# step's result in q's dtype, LSE fp32).


@dataclass(frozen=True)
class Attend:
    """The tile's state over its split of the batch entry's keys (online softmax over BLOCK_N blocks)."""


@dataclass(frozen=True)
class StoreState:
    """Store the state into `buffer`: "mid" at the split, "gather" at this rank's slot, "out"."""
    buffer: str


@dataclass(frozen=True)
class MergeStates:
    """Merge the tile's states from `buffer` over `over` ("splits" or "ranks"); `wait`: first wait for the
    flag of each source (per tile), else the states are there already."""
    buffer: str
    over: str
    wait: str | None = None


@dataclass(frozen=True)
class PutState:
    """Put the tile's state from this rank's slot of `buffer` into the same slot on every peer; `flag`: then
    raise the tile's flag from this rank there (its own last)."""
    buffer: str
    flag: str | None = None


@dataclass(frozen=True)
class CountSplits:
    """Count the tile's finished splits in `counter`; the split that completes the count goes on (and resets
    it for the next step), the others stop here."""
    counter: str


@dataclass(frozen=True)
class HostStep:
    """Host work between kernels: "all_gather" (a collective of the gather buffer) or "barrier" (the heap's)."""
    what: str


@dataclass(frozen=True)
class DecodeKernel:
    """One launch. `roles`: (role, grid, statements) in program order: "split" per (tile, split), "tile" per
    tile; a fused kernel has both roles in one grid, split programs first."""
    name: str
    roles: tuple

    def statements(self, role: str) -> tuple:
        return next(body for r, _, body in self.roles if r == role)


@dataclass(frozen=True)
class DecodeProgram:
    stage: int
    steps: tuple  # DecodeKernel | HostStep, in order

    @property
    def kernels(self) -> tuple[DecodeKernel, ...]:
        return tuple(s for s in self.steps if isinstance(s, DecodeKernel))

    def kernel(self, name: str) -> DecodeKernel:
        return next(k for k in self.kernels if k.name == name)

    def with_(self, **kw) -> "DecodeProgram":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------- the program


def lower_decode() -> DecodeProgram:
    """flash_decode -> the BSP tile program (stage 0)."""
    return DecodeProgram(0, (
        DecodeKernel("split", (("split", "tiles x splits", (Attend(), StoreState("mid"))),)),
        DecodeKernel("merge_splits", (("tile", "tiles", (MergeStates("mid", "splits"), StoreState("gather"))),)),
        HostStep("all_gather"),
        DecodeKernel("merge_ranks", (("tile", "tiles", (MergeStates("gather", "ranks"), StoreState("out"))),)),
    ))


def stage_rma(p: DecodeProgram) -> DecodeProgram:
    # host all_gather  ->  kernel put: PutState(gather) ; host barrier
    _expect(p, 0)
    steps = []
    for s in p.steps:
        steps += ([DecodeKernel("put", (("tile", "tiles", (PutState("gather"),)),)), HostStep("barrier")]
                  if s == HostStep("all_gather") else [s])
    return p.with_(stage=1, steps=tuple(steps))


def stage_flags(p: DecodeProgram) -> DecodeProgram:
    # put: PutState(gather) -> PutState(gather, flag) ; host barrier -> - ; merge_ranks waits per tile and source
    _expect(p, 1)
    steps = []
    for s in p.steps:
        if s == HostStep("barrier"):
            continue
        if isinstance(s, DecodeKernel) and s.name == "put":
            s = DecodeKernel("put", (("tile", "tiles", (PutState("gather", "arrived"),)),))
        elif isinstance(s, DecodeKernel) and s.name == "merge_ranks":
            s = DecodeKernel("merge_ranks", (("tile", "tiles", (MergeStates("gather", "ranks", "arrived"),
                                                                  StoreState("out"))),))
        steps.append(s)
    return p.with_(stage=2, steps=tuple(steps))


def stage_fused(p: DecodeProgram) -> DecodeProgram:
    # split ; merge_splits ; put ; merge_ranks  ->  one kernel:
    #   split programs: Attend ; StoreState(mid) ; CountSplits ; (the last) MergeStates(mid) ; PutState(flag)
    #   tile programs:  MergeStates(gather, ranks, wait) ; StoreState(out)
    # (one split: its state goes straight to the push; codegen compiles both forms, ONE_SPLIT picks)
    _expect(p, 2)
    by_name = {k.name: k for k in p.kernels}
    split = by_name["split"].statements("split")
    assert split[-1] == StoreState("mid"), split
    merge = tuple(s for s in by_name["merge_splits"].statements("tile") if s != StoreState("gather"))
    fused = DecodeKernel("fused", (
        ("split", "tiles x splits", split + (CountSplits("tile_count"),) + merge + by_name["put"].statements("tile")),
        ("tile", "tiles", by_name["merge_ranks"].statements("tile")),
    ))
    return p.with_(stage=3, steps=(fused,))


REWRITES = (stage_rma, stage_flags, stage_fused)  # stage s is REWRITES[:s] applied to lower_decode()


def decode_program(stage: int) -> DecodeProgram:
    """The tile program of a decode step at `stage` (0-3): the BSP program rewritten stage by stage."""
    if stage not in range(len(REWRITES) + 1):
        raise ValueError(f"flash_decode: stage must be 0-{len(REWRITES)}, got {stage!r}")
    p = lower_decode()
    for rewrite in REWRITES[:stage]:
        p = rewrite(p)
    return p


def _expect(p: DecodeProgram, stage: int) -> None:
    if p.stage != stage:
        raise ValueError(f"this rewrite takes a stage-{stage} decode program, got stage {p.stage}")


def _fmt(s) -> str:
    args = ", ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s)
                     if getattr(s, f.name) != f.default)
    return f"{type(s).__name__}({args})"


def print_decode_program(p: DecodeProgram, name: str = "flash_decode") -> str:
    lines = [f"decode_program {name} stage={p.stage}"]
    for s in p.steps:
        if isinstance(s, HostStep):
            lines.append(f"  host: {s.what}")
            continue
        lines.append(f"  kernel {s.name}:")
        for role, grid, body in s.roles:
            lines.append(f"    {role} programs ({grid}):")
            lines.extend(f"      {_fmt(stmt)}" for stmt in body)
    return "\n".join(lines)
