"""Fusion passes over the graph IR: each a named value with a `before -> after` line, run in an explicit list.

A pass returns data: the rewritten program and one `Decision` per candidate it looked at, applied or not,
with the reason. The verifier runs after every pass. Silent non-fusion is the complaint users have about
other compilers; here every candidate gets a line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bspfuse.devices import device as lookup_device
from bspfuse.ir import Program
from bspfuse.verify import verify


@dataclass(frozen=True)
class Estimate:
    """What the cost model says of one candidate on `device`: the schedule it picks and each schedule's
    estimated time. Kept apart from the decision's reason, which stays the same when the model is
    recalibrated."""

    device: str
    mode: str  # push | pull | direct | off (the unfused, bulk-synchronous schedule)
    us: dict  # schedule -> estimated (or measured) microseconds, e.g. {"bsp": 30.1, "push": 4.7}
    measured: bool = False  # the times were measured on the device (bspfuse tune), not estimated
    problem: object = None  # the fused GEMM as bspfuse.tune.Problem, where one was decided

    def __str__(self) -> str:
        picks = "BSP (no fusion)" if self.mode == "off" else self.mode
        times = ", ".join(f"{schedule} {us:g} us" for schedule, us in self.us.items())
        if self.measured:
            return f"measured on {self.device}: {picks}; {times}"
        return f"cost model on {self.device}: {picks}; estimated {times}"


@dataclass(frozen=True)
class Decision:
    pass_name: str
    site: str  # the ops it looked at, by value name, then (where) what the user wrote
    applied: bool
    reason: str
    estimate: Estimate | None = None  # when the cost model was asked
    what: str = ""  # the pattern in plain words: "all-gather + matmul"
    schedule: str = ""  # how the fused kernel moves data (push, pull, direct, copy_engine, a decode stage)

    @property
    def where(self) -> str:
        """What the user wrote: a module path ("layer.self_attn.q_proj"), a file position, else the ops."""
        names, _, origin = self.site.partition(" (")
        origin = origin.rstrip(")")
        return origin.split(" in ", 1)[1] if " in " in origin else origin or names

    @property
    def headline(self) -> str:
        """One plain sentence: what was fused and how, or what was left alone."""
        what = f"the {self.what} of {self.where}" if self.what else self.where
        if self.applied:
            return f"fused: {what} runs as one kernel" + (f", schedule {self.schedule}" if self.schedule else "")
        return f"not fused: {what}"

    @property
    def verdict(self) -> str:
        """The decision without the cost model's numbers: `[pass] headline: why [the ops (origin)]`."""
        return f"[{self.pass_name}] {self.headline}: {self.reason} [{self.site}]"

    def __str__(self) -> str:
        return self.verdict + (f" ({self.estimate})" if self.estimate else "")


@dataclass(frozen=True)
class Options:
    """What the user can force. mode: auto | pull | push | direct | copy_engine | off (per fusion), plus device
    and tuning knobs. direct: AG+GEMM loads remote rows in place; GEMM+RS/AR store partials from the GEMM
    epilogue. copy_engine (AG+GEMM; elsewhere the cost model decides): the host's copy stream moves the rows.

    Example::

        run_passes(program, options=Options(device="H100"))  # the cost model on the H100's figures
    """

    mode: str = "auto"
    device: str = "H200"  # the device table's entry the cost model reads (bspfuse.devices.DEVICES)
    modes: dict = field(default_factory=dict)  # per-site override: {value name: mode}
    # Fuse where the kernels can although the cost model picks BSP (the simulator does, since it runs to
    # check the kernels, not to be fast); the decision says so and keeps the model's estimate.
    fuse_unprofitable: bool = False
    # The fused ops will be replayed from a CUDA graph: no schedule whose host side runs every call
    # (AG+GEMM copy_engine and direct: bspfuse.tile.HOST_SIDE_AG_MODES).
    replayable: bool = False
    # The backend's: ranks per host, where a process group's placement is found (None: LOCAL_WORLD_SIZE or the
    # host's GPUs), and the most rows (batch x sequence) a fused GEMM of a dynamic graph takes (None: the
    # symbolic size's bound, else DEFAULT_MAX_TOKENS).
    ranks_per_host: int | None = None
    max_tokens: int | None = None
    # Training: keep the forward's gathered activations for the backward (the fused AG+GEMM writes them out),
    # or save the shard and gather again in the backward (backend.recompute_gathers).
    save_gathered: bool = True

    def __post_init__(self):
        try:
            lookup_device(self.device)
        except ValueError as e:
            raise ValueError(f"Options(device={self.device!r}): {e}") from None

    def mode_for(self, site: str) -> str:
        return self.modes.get(site, self.mode)


@dataclass(frozen=True)
class Pass:
    name: str
    before_after: str
    run: Callable[[Program, Options], tuple[Program, list[Decision]]]

    def __str__(self) -> str:
        return f"{self.name}: {self.before_after}"


@dataclass
class Stage:
    pass_: Pass
    program: Program
    decisions: list[Decision]


@dataclass
class PassLog:
    """Every stage's program and decisions, so `bspfuse inspect` can show each."""

    input: Program
    stages: list[Stage]

    @property
    def program(self) -> Program:
        return self.stages[-1].program if self.stages else self.input

    @property
    def decisions(self) -> list[Decision]:
        return [d for s in self.stages for d in s.decisions]


def run_passes(program: Program, passes: list[Pass] | None = None, options: Options | None = None) -> PassLog:
    """Run `passes` (default: PIPELINE) in order, verifying before the first and after each."""
    options = options or Options()
    verify(program)
    log = PassLog(program, [])
    current = program
    for p in passes if passes is not None else PIPELINE:
        current, decisions = p.run(current.copy(), options)
        verify(current)
        log.stages.append(Stage(p, current, decisions))
    return log


PIPELINE: list[Pass] = []  # filled at the end of this module, in the order the rewrites apply


from bspfuse.passes.fuse_gemm import fuse_allgather_matmul, fuse_matmul_allreduce, fuse_matmul_reduce_scatter  # noqa: E402
from bspfuse.passes.fuse_decode import fuse_flash_decode  # noqa: E402

PIPELINE[:] = [fuse_allgather_matmul, fuse_matmul_reduce_scatter, fuse_matmul_allreduce, fuse_flash_decode]
