"""Tuned entries: what tuning measured, keyed by GPU, world, op, dtype, M bucket, N, K and B layout; the user's
cache over the tables shipped with the package, entries of changed kernels ignored."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bspfuse.tile import TileConfig
from bspfuse.tune.search import UNFUSED, UNFUSED_STAGE, Candidate, DecodeConfig, DecodeProblem, Problem

SHIPPED = Path(__file__).parent / "tables"  # measured on the machines named in their entries
FORMAT = 1


# ----------------------------------------------------------------------------------------------- entries


def kernel_fingerprint(problem: Problem, cand: Candidate) -> str:
    """A hash of the kernel source a candidate runs: an entry measured with another version of the kernels no
    longer matches. The source depends on the op, schedule, dtype, B layout and config, not on the sizes."""
    if cand.config is None:
        return "unfused"
    if isinstance(problem, DecodeProblem):
        return _decode_fingerprint(int(cand.schedule.removeprefix("stage")))
    return _fingerprint(problem.kind, cand.schedule, problem.dtype, problem.b_layout, cand.config)


@functools.lru_cache(maxsize=None)
def _decode_fingerprint(stage: int) -> str:
    """The stage's generated kernels and the device functions they call."""
    import inspect

    from bspfuse.codegen.decode import decode_sources
    from bspfuse.kernels import decode

    text = "".join(ks.source for ks in decode_sources(stage).values()) + inspect.getsource(decode)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _fingerprint(kind: str, schedule: str, dtype: str, b_layout: str, config: TileConfig) -> str:
    from bspfuse.codegen.triton import generate
    from bspfuse.lowering import TARGETS, plan_kernel

    tp = plan_kernel(kind, schedule, 256, 256, 256, 2, dtype, (), TARGETS["H100"], b_layout=b_layout, config=config,
                     name="kernel").tile_program
    return hashlib.sha256(generate(tp, tma=True).source.encode()).hexdigest()[:16]


@dataclass
class Entry:
    """What tuning one problem on one GPU measured: each candidate's microseconds (None: it failed), the fastest
    fused candidate and the unfused program's time."""
    gpu: str
    problem: Problem
    times_us: dict  # candidate label -> us or None
    best: Candidate | None  # the fastest fused candidate that ran (None: none did)
    fingerprint: str = ""
    measured: str = ""  # ISO date
    seconds: float = 0.0  # how long tuning took
    # candidate label -> us on the device alone (the calls queued behind a busy GPU: no host time between them);
    # times_us are back to back from the host, what an eager program gets. The best is the fastest on the device.
    device_us: dict = dataclasses.field(default_factory=dict)

    @property
    def unfused_us(self) -> float | None:
        """The unfused program's time (a decode step's: its best stage-0 time)."""
        times = self.schedule_times()
        return times.get(UNFUSED, times.get(UNFUSED_STAGE))

    @property
    def best_us(self) -> float | None:
        return self.times_us.get(self.best.label) if self.best else None

    def schedule_times(self) -> dict:
        """The best microseconds measured per schedule (the unfused program's under UNFUSED)."""
        out: dict = {}
        for label, us in self.times_us.items():
            schedule = label.split(" ", 1)[0]
            if us is not None and (schedule not in out or us < out[schedule]):
                out[schedule] = us
        return out

    def decode_runs(self, graph: bool) -> dict:
        """A decode entry's measured candidates timed with (or without) CUDA graphs: {(stage, config): us}."""
        runs = {}
        for label, us in self.times_us.items():
            stage, config = label.split(" ", 1)
            config = DecodeConfig.parse(config)
            if us is not None and config.graph == graph:
                runs[(int(stage.removeprefix("stage")), config)] = us
        return runs

    def decode_stage_times(self, graph: bool) -> dict:
        """The best microseconds per stage ("stage0" ...), with (or without) CUDA graphs."""
        out: dict = {}
        for (stage, _), us in self.decode_runs(graph).items():
            out[f"stage{stage}"] = min(us, out.get(f"stage{stage}", us))
        return dict(sorted(out.items()))

    def best_decode_config(self, stage: int, graph: bool = False) -> DecodeConfig | None:
        """A decode entry's fastest measured knobs at `stage` (a stage the user forced may not be the best)."""
        runs = {config: us for (s, config), us in self.decode_runs(graph).items() if s == stage}
        return min(runs, key=runs.get) if runs else None

    def choice(self) -> str:
        """The schedule auto takes: the fastest fused one, unless the unfused program measured faster."""
        if self.best is None or self.best_us is None:
            return UNFUSED
        if self.unfused_us is not None and self.unfused_us <= self.best_us:
            return UNFUSED
        return self.best.schedule

    def to_json(self) -> dict:
        cfg = dataclasses.asdict(self.best.config) if self.best and self.best.config else None
        return {"key": self.problem.key(self.gpu), "gpu": self.gpu, "problem": dataclasses.asdict(self.problem),
                "best": {"schedule": self.best.schedule, "config": cfg} if self.best else None,
                "times_us": self.times_us, "device_us": self.device_us, "fingerprint": self.fingerprint,
                "measured": self.measured, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        decode = d["problem"].get("kind") == "flash_decode"
        problem = DecodeProblem(**d["problem"]) if decode else Problem(**d["problem"])
        best, config = d["best"], DecodeConfig if decode else TileConfig
        cand = Candidate(best["schedule"], config(**best["config"]) if best["config"] else None) if best else None
        times, device = ({str(k): (None if v is None else float(v)) for k, v in d.get(f, {}).items()}
                         for f in ("times_us", "device_us"))
        entry = cls(str(d["gpu"]), problem, times, cand, str(d["fingerprint"]), str(d.get("measured", "")),
                    float(d.get("seconds", 0.0)), device)
        if d["key"] != problem.key(entry.gpu):
            raise ValueError(f"key {d['key']!r} does not match its problem")
        return entry


def shipped_tables() -> list[Path]:
    """The tables shipped with the package (measured on the GPUs their entries name)."""
    return sorted(SHIPPED.glob("*.json"))


def cache_path() -> Path:
    """The user's tuning cache: $BSPFUSE_CACHE_DIR, else $XDG_CACHE_HOME/bspfuse, else ~/.cache/bspfuse."""
    base = os.environ.get("BSPFUSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bspfuse")
    return Path(base) / "tuned.json"


@dataclass
class TunedTable:
    """Entries by key; `load` reads the user's cache over the shipped tables."""
    entries: dict = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, paths: list[Path] | None = None, save_to: Path | None = None) -> "TunedTable":
        """Entries of `paths` (default: the shipped tables, then the user's cache, later ones winning), saved to
        `save_to` (default: the user's cache). A file or entry that is not valid, or whose kernel changed since it
        was measured, is skipped with one warning per file."""
        paths = paths if paths is not None else shipped_tables() + [cache_path()]
        table = cls(path=save_to or cache_path())
        for path in paths:
            if not Path(path).exists():
                continue
            skipped, why = 0, ""
            try:
                data = json.loads(Path(path).read_text())
                if data.get("format") != FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
                items = data["entries"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                warnings.warn(f"bspfuse: ignoring the tuning table {path}: {e}", stacklevel=2)
                continue
            for d in items:
                try:
                    entry = Entry.from_json(d)
                    if entry.best is not None and entry.fingerprint != kernel_fingerprint(entry.problem, entry.best):
                        raise ValueError("its kernel changed since it was measured")
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    skipped, why = skipped + 1, why or str(e)
                    continue
                table.entries[d["key"]] = entry
            if skipped:
                warnings.warn(f"bspfuse: ignoring {skipped} entr{'y' if skipped == 1 else 'ies'} of {path} "
                              f"(e.g. {why}); tune again to replace them", stacklevel=2)
        return table

    def get(self, gpu: str, problem: Problem) -> Entry | None:
        return self.entries.get(problem.key(gpu))

    def put(self, entry: Entry) -> None:
        self.entries[entry.problem.key(entry.gpu)] = entry

    def save(self, path: Path | None = None) -> Path:
        path = Path(path or self.path or cache_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "entries": [e.to_json() for _, e in sorted(self.entries.items())]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(path)
        return path


_TABLE: list = []


def table(reload: bool = False) -> TunedTable:
    """The process's tuned table, loaded once (again with `reload`, e.g. after the cache changed)."""
    if reload:
        _TABLE.clear()
    if not _TABLE:
        _TABLE.append(TunedTable.load())
    return _TABLE[0]


def lookup(gpu: str, problem: Problem) -> tuple[Entry | None, str]:
    """The entry planning uses for a problem on a GPU, and where it came from: the problem itself
    ("tuned"), or, at world >= 2 with no entry of its own, the same GEMM tuned as a world of one ("tile tuned
    as a world of one": its tile, not its schedule or comm programs), else (None, "")."""
    t = table()
    entry = t.get(gpu, problem)
    if entry is not None:
        return entry, "tuned"
    if problem.world > 1:
        rows = problem.M * problem.world if problem.kind == "ag_matmul" else problem.M
        alone = t.get(gpu, dataclasses.replace(problem, M=rows, world=1))
        if alone is not None and alone.best is not None:
            return alone, "tile tuned as a world of one"
    return None, ""


