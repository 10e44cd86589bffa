"""The `bspfuse` command: analyze, inspect, compile, run, bench.

    bspfuse analyze examples/sp_mlp.py:build --world 8 [--json] [--plot timeline.png]
    bspfuse inspect examples/sp_mlp.bsp --stage graph|fused|tile|triton [--mode auto|pull|push|direct|off]
    bspfuse compile examples/sp_mlp.bsp -o kernels.py
    bspfuse run examples/sp_mlp.bsp --world 2            # fused vs. the unfused reference, GPUs or simulator
    bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --size T=8192 --size H=4096
    bspfuse bench                                         # how to run the GPU benchmarks

A TARGET is `file.bsp` (the source language) or `file.py:function` (a function returning an fx graph, a
(model, inputs) pair or a Program); `--size NAME=VALUE` rebinds a size of a .bsp program. Anything the
user got wrong prints one line to stderr and exits 2, a run too large for this machine's memory too (before
anything is allocated). `run` shows each rank's op and tiles on stderr while it runs (`--no-progress`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

USER_ERROR = 2


class UserError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from bspfuse.analysis import AnalysisError
    from bspfuse.capture_fx import CaptureError
    from bspfuse.execute import ExecuteError
    from bspfuse.grammar import SourceError
    from bspfuse.ir import IRError
    from bspfuse.targets import TargetError

    return (UserError, SourceError, TargetError, CaptureError, IRError, AnalysisError, ExecuteError, OSError)


def load_target(target: str, world: int | None, sizes: dict[str, int] | None = None):
    """The Program a TARGET names: `file.bsp` through the grammar, `file.py:function` through targets.
    `sizes` rebinds sizes of a .bsp program (`--size T=4096`)."""
    if os.path.isdir(target):
        raise UserError(f"{target}: is a directory; a target is path/to/file.bsp or path/to/file.py:function")
    if target.endswith(".bsp"):
        from bspfuse.grammar import parse_file

        if not os.path.isfile(target):
            raise UserError(f"{target}: no such file")
        return parse_file(target, world_size=world, sizes=sizes)
    if ":" in target:
        from bspfuse.targets import load_program

        if sizes:
            raise UserError(f"--size binds sizes of a .bsp program; {target} builds its own shapes")
        return load_program(target, world_size=world)
    raise UserError(f"target '{target}' should be path/to/file.bsp or path/to/file.py:function")


def _program(args):
    """The program of a command's TARGET, --world and --size arguments."""
    return load_target(args.target, args.world, dict(args.size))


def _size(text: str) -> tuple[str, int]:
    """`--size NAME=VALUE` -> (NAME, VALUE), VALUE a positive integer."""
    name, eq, value = (part.strip() for part in text.partition("="))
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"'{text}' should be NAME=VALUE, e.g. T=4096")
    if not re.fullmatch(r"[+-]?\d+", value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': {name} must be a positive integer")
    return name, int(value)


def _fuse(program, mode: str, fuse_unprofitable: bool = False):
    from bspfuse.passes import Options, run_passes

    return run_passes(program, options=Options(mode=mode, fuse_unprofitable=fuse_unprofitable))


def decision_lines(decisions, indent: str = "") -> list[str]:
    """One line per fusion decision and, under it, the cost model's estimate when it was asked. The
    estimate is the only part that changes when the device model is recalibrated."""
    lines = []
    for d in decisions:
        lines.append(indent + d.verdict)
        if d.estimate is not None:
            lines.append(f"{indent}    {d.estimate}")
    return lines


# ----------------------------------------------------------------------------------------------- commands


def cmd_analyze(args) -> int:
    from bspfuse.analysis import analyze

    program = _program(args)
    report = analyze(program, device=args.device, skew_us=args.skew_us)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.table())
    if args.plot:
        from bspfuse.plot import plot_timeline

        path = plot_timeline(report, args.plot)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def inspect_text(program, stage: str, mode: str = "auto", target: str = "H200") -> str:
    """What `bspfuse inspect` prints for one stage (plain text); tile and triton are planned for `target`
    (lowering.TARGETS: a GPU model, or "sim"), each fused op's tile program under its `launch:` line."""
    if stage == "graph":
        return str(program)
    log = _fuse(program, mode)
    fused = log.program
    if stage == "fused":
        lines = [str(fused), "", "decisions:"]
        lines += decision_lines(log.decisions, "  ") or ["  (no candidates)"]
        return "\n".join(lines)
    from bspfuse.codegen.triton import generate
    from bspfuse.lowering import TARGETS, plan_fused
    from bspfuse.runtime.target import uses_tma
    from bspfuse.tile import print_tile_program

    parts, machine = [], TARGETS[target]
    for op in fused.ops:
        plan = plan_fused(op, fused, machine)
        if plan is not None:
            tp = plan.tile_program
            parts.append(f"{plan.launch_line} (%{op.outputs[0].name} on {machine})\n" + print_tile_program(tp)
                         if stage == "tile" else generate(tp, tma=uses_tma(machine.kernel_target)).source)
        elif op.opcode == "flash_decode":
            from bspfuse.codegen.decode import decode_sources
            from bspfuse.tile_decode import decode_program, print_decode_program

            decode_stage = op.attrs.get("stage", 3)
            parts.append(print_decode_program(decode_program(decode_stage), f"%{op.outputs[0].name}")
                         if stage == "tile" else
                         "\n\n".join(ks.source for ks in decode_sources(decode_stage).values()))
    if not parts:
        return f"program {fused.name}: no fused GEMM ops to lower (see --stage fused for why)"
    sep = "\n\n" if stage == "tile" else "\n\n# " + "-" * 98 + "\n\n"
    return sep.join(parts)


_PY_KEYWORDS = r"\b(def|return|for|in|if|else|elif|while|import|from|as|and|or|not|range|True|False|None)\b"


def highlight(text: str, stage: str) -> str:
    """ANSI colors for a terminal: comments dim, keywords bold, iris calls and fused ops colored."""
    def line(s: str) -> str:
        code, hash_, comment = s.partition("#") if stage == "triton" else (s, "", "")
        code = re.sub(r"\biris\.\w+", lambda m: f"\x1b[35m{m.group(0)}\x1b[0m", code)
        code = re.sub(r"@triton\.jit|\btl\.\w+", lambda m: f"\x1b[36m{m.group(0)}\x1b[0m", code)
        code = re.sub(r"\bfused_\w+|\bflash_decode\b", lambda m: f"\x1b[1;32m{m.group(0)}\x1b[0m", code)
        code = re.sub(r"\[\w+\] fused\b", lambda m: f"\x1b[32m{m.group(0)}\x1b[0m", code)
        code = re.sub(r"\bnot fused\b", lambda m: f"\x1b[33m{m.group(0)}\x1b[0m", code)
        code = re.sub(r"\bcost model on .*", lambda m: f"\x1b[2m{m.group(0)}\x1b[0m", code)
        if stage == "triton":
            code = re.sub(_PY_KEYWORDS, lambda m: f"\x1b[1m{m.group(0)}\x1b[0m", code)
        return code + (f"\x1b[2m#{comment}\x1b[0m" if hash_ else "")

    return "\n".join(line(s) for s in text.split("\n"))


def cmd_inspect(args) -> int:
    program = _program(args)
    text = inspect_text(program, args.stage, args.mode, args.machine)
    print(highlight(text, args.stage) if sys.stdout.isatty() else text)
    return 0


def cmd_compile(args) -> int:
    from bspfuse.execute import compile_module

    program = _program(args)
    log = _fuse(program, args.mode)
    text = compile_module(log.program, source=os.path.basename(args.target))
    with open(args.output, "w") as f:
        f.write(text)
    fused = [op for op in log.program.ops if op.opcode.startswith("fused_") or op.opcode == "flash_decode"]
    print(f"wrote {args.output}: {len(fused)} fused op(s) of {log.program.name}")
    return 0


def cmd_run(args) -> int:
    from bspfuse.execute import NotEnoughMemory, check, check_memory, choose_backend
    from bspfuse.runtime.cuda import under_torchrun

    program = _program(args)
    world = args.world or program.world_size
    if world is None:
        raise UserError(f"{args.target}: the world size is not known; pass --world N")
    backend = choose_backend(args.backend, world)
    # The simulator runs to check the kernels, not to be fast: it also fuses what the cost model keeps
    # bulk-synchronous on the GPU, and the decision says so. On GPUs the cost model decides.
    log = _fuse(program, args.mode, fuse_unprofitable=backend == "sim")
    try:
        check_memory(program, world, log.program, backend)  # before anything is printed or allocated
    except NotEnoughMemory as e:
        raise UserError(_too_large(args, program, world, e)) from None
    speaks = not under_torchrun() or os.environ["RANK"] == "0"  # under torchrun, rank 0 reports for all
    if speaks:
        print("\n".join(decision_lines(log.decisions)), flush=True)
    result = check(program, world, log.program, backend=backend, seed=args.seed,
                   progress=False if args.no_progress else None)
    if speaks:
        print(result.report())
    return 0 if result.ok else 1


def _too_large(args, program, world: int, e) -> str:
    """A run that does not fit, said in what the user wrote: the --size given (or the program's own sizes) of
    a .bsp program; of file.py:function, which tensors are largest."""
    on = f"too large to run on {world} rank{'s' if world > 1 else ''}"
    if args.target.endswith(".bsp"):
        given = " ".join(f"--size {name}={value}" for name, value in args.size)
        sizes = given or f"{args.target} (sizes {', '.join(f'{k}={v}' for k, v in program.sizes.items())})"
        return f"{sizes}: {on}: it {e.need}"
    return f"{args.target}: {on}: it {e.need}; its largest tensors, per rank: {e.tensors}"


BENCH_TEXT = """\
The benchmarks need GPUs: at least 2 NVIDIA GPUs on one host (H100/H200 class), CUDA and torchrun.
They do not run on this CPU simulator.

On a 2-GPU machine, from the repository root:

    bash benchmarks/run_all.sh OUTDIR          # every benchmark; results and plots land in OUTDIR

or one at a time, under torchrun:

    torchrun --nproc_per_node 2 benchmarks/gemm_bench.py     # fused AG+GEMM / GEMM+RS / GEMM+AR vs NCCL+cuBLAS
    torchrun --nproc_per_node 2 benchmarks/decode_bench.py   # Flash Decode stages 0-3
    torchrun --nproc_per_node 2 benchmarks/rma_bench.py      # one-sided put/get bandwidth per SM
    torchrun --nproc_per_node 2 benchmarks/block_bench.py    # a Llama layer under torch.compile, TP + SP

and on one GPU:

    python3 benchmarks/core_bench.py [--ag]    # the fused kernels' GEMM core vs cuBLAS
    python3 benchmarks/host_bench.py           # a call's host time, piece by piece

BENCHMARKS.md describes the results and how they were measured."""


def cmd_explain(args) -> int:
    from bspfuse.backend import explain
    from bspfuse.targets import load_function

    make = load_function(args.target)
    built = {}

    def build(mesh):
        built["model"], built["inputs"] = make(mesh)
        return built["model"]

    mesh = {}
    if args.mesh:
        shape = tuple(int(n) for n in args.mesh.lower().split("x"))
        mesh = {"mesh_shape": shape, "mesh_dim_names": ("dp", "tp")[-len(shape):]}
    for report in explain(build, lambda _mesh: built["inputs"], args.world, train=args.train, dynamic=args.dynamic,
                          options={"mode": args.mode}, **mesh):
        print(report)
    return 0


def cmd_tune(args) -> int:
    """Measure the fused GEMMs' space on this host's GPUs and keep the fastest in the tuning cache."""
    import torch

    from bspfuse import tune

    if not torch.cuda.is_available() or torch.cuda.device_count() < args.world:
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"bspfuse tune: measures the kernels on {args.world} GPU{'s' if args.world > 1 else ''} of this host; "
              f"torch sees {seen} (torch {torch.__version__}{', a CPU build' if not torch.version.cuda else ''}). "
              "Without a GPU the cost model decides (bspfuse analyze, inspect).", file=sys.stderr)
        return USER_ERROR
    problems = [tune.Problem(kind, m, n, k, args.world, args.dtype, args.layout) for kind, m, n, k in args.shape]
    problems += [tune.DecodeProblem(*sizes, args.world, args.dtype) for sizes in args.decode]
    if args.model:
        problems += _model_problems(args)
    if not problems:
        print("bspfuse tune: nothing to tune: give --shape OP:MxNxK or --decode B,Hq,Hkv,D,S (repeatable), or "
              "--model file.py:function", file=sys.stderr)
        return USER_ERROR
    from bspfuse.tune.measure import tune_on_gpus

    out = args.out or tune.cache_path()  # the table to update: only its own entries are written back
    table = tune.TunedTable.load(paths=[out], save_to=out)
    for entry in tune_on_gpus(list(dict.fromkeys(problems)), args.world, keep=args.keep, rep_ms=args.rep_ms):
        table.put(entry)
        best = f"{entry.best.label}: {entry.best_us:g} us" if entry.best else "no fused candidate ran"
        print(f"{entry.problem}: {best}; unfused {entry.unfused_us} us; auto takes {entry.choice()} "
              f"(tuned in {entry.seconds:.1f} s)")
    print(f"saved {len(table.entries)} entries to {table.save()}")
    return 0


def _model_problems(args) -> list:
    """The fused GEMMs `explain` finds in a model (forward, and backward with --train)."""
    from bspfuse.backend import explain
    from bspfuse.targets import load_function

    make, built = load_function(args.model), {}

    def build(mesh):
        built["model"], built["inputs"] = make(mesh)
        return built["model"]
    problems = []
    for report in explain(build, lambda _mesh: built["inputs"], args.world, train=args.train):
        problems += [d.estimate.problem for d in report.decisions if d.estimate and d.estimate.problem]
    return problems


def _shape_arg(text: str):
    m = re.fullmatch(r"(ag_matmul|matmul_rs|matmul_ar):(\d+)x(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected OP:MxNxK with OP ag_matmul, matmul_rs or matmul_ar "
                                         "(M, N, K as the kernels take them: AG M = one rank's rows, RS/AR K = "
                                         "one rank's K)")
    return m.group(1), *map(int, m.groups()[1:])


def _decode_arg(text: str):
    m = re.fullmatch(r"(\d+),(\d+),(\d+),(\d+),(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected B,Hq,Hkv,D,S (batch, query and KV heads, head dim, "
                                         "this rank's KV length), e.g. 1,32,8,128,65536")
    return tuple(map(int, m.groups()))


def cmd_bench(args) -> int:
    print(BENCH_TEXT)
    return 0


# ----------------------------------------------------------------------------------------------- main


def _target_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="file.bsp or file.py:function")
    p.add_argument("--world", type=int)
    p.add_argument("--size", type=_size, action="append", default=[], metavar="NAME=VALUE",
                   help="rebind a size of a .bsp program (repeatable)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bspfuse", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    modes = ("auto", "pull", "push", "direct", "copy_engine", "off")

    a = sub.add_parser("analyze", help="the three taxes of the BSP program, per op")
    _target_arguments(a)
    a.add_argument("--device", default="H200")
    a.add_argument("--json", action="store_true")
    a.add_argument("--plot", metavar="FILE.png")
    a.add_argument("--skew-us", type=float, dest="skew_us")
    a.set_defaults(fn=cmd_analyze)

    i = sub.add_parser("inspect", help="print one stage of the pipeline")
    _target_arguments(i)
    i.add_argument("--stage", choices=("graph", "fused", "tile", "triton"), default="fused")
    i.add_argument("--mode", choices=modes, default="auto")
    i.add_argument("--target", dest="machine", choices=("H200", "H100", "MI300X", "sim"), default="H200",
                   help="the machine the tile and triton stages are planned for (default H200)")
    i.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("compile", help="write a standalone module: Triton kernels + run(ctx, inputs)")
    _target_arguments(c)
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--mode", choices=modes, default="auto")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="run the fused program on N ranks and check it against the reference")
    _target_arguments(r)
    r.add_argument("--backend", choices=("sim", "cuda", "auto"), default="auto",
                   help="auto (default): cuda when there is a GPU per rank, else the simulator")
    r.add_argument("--mode", choices=modes, default="auto")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true", dest="no_progress",
                   help="no progress lines on stderr (also BSPFUSE_PROGRESS=0); by default they show on a "
                        "terminal, and in a log once the ranks have run a few seconds")
    r.set_defaults(fn=cmd_run)

    e = sub.add_parser("explain", help="what torch.compile(backend='bspfuse') fuses in a model, forward and backward, "
                                       "planned on the CPU (fake process group, nothing computed)")
    e.add_argument("target", metavar="file.py:function",
                   help="function(mesh) -> (parallelized model, its example inputs: a tensor or a tuple)")
    e.add_argument("--world", type=int, default=2)
    e.add_argument("--train", action="store_true", help="also the backward of the outputs' sum")
    e.add_argument("--dynamic", action="store_true", help="one graph for every sequence length")
    e.add_argument("--mesh", metavar="DPxTP", help="a 2-D mesh, e.g. 2x4 (dims named dp, tp)")
    e.add_argument("--mode", choices=modes, default="auto")
    e.set_defaults(fn=cmd_explain)

    t = sub.add_parser("tune", help="measure the fused GEMMs' tiles and schedules on this host's GPUs; the fastest "
                                    "go into the tuning cache that compile, run and the backend read")
    t.add_argument("--shape", type=_shape_arg, action="append", default=[], metavar="OP:MxNxK",
                   help="e.g. matmul_rs:8192x4096x3584 (repeatable)")
    t.add_argument("--decode", type=_decode_arg, action="append", default=[], metavar="B,Hq,Hkv,D,S",
                   help="a Flash Decode step: its stages, split counts and pipeline depths (repeatable)")
    t.add_argument("--model", metavar="file.py:function", help="every fused GEMM explain finds in the model")
    t.add_argument("--train", action="store_true", help="with --model: the backward's GEMMs too")
    t.add_argument("--world", type=int, default=1)
    t.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16")
    t.add_argument("--layout", choices=("nk", "kn"), default="nk", help="B as weight.t() (nk, default) or row-major")
    t.add_argument("--keep", type=int, default=12, help="fused candidates measured per shape (the cost model's best)")
    t.add_argument("--rep-ms", type=float, default=20.0, dest="rep_ms",
                   help="milliseconds of calls timed per candidate")
    t.add_argument("--out", type=Path, help="the table to update (default: the user's cache, "
                                            "$BSPFUSE_CACHE_DIR or ~/.cache/bspfuse/tuned.json)")
    t.set_defaults(fn=cmd_tune)

    b = sub.add_parser("bench", help="how to run the GPU benchmarks")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bspfuse` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if getattr(args, "world", None) is not None and args.world < 1:
        print(f"bspfuse: error: --world must be at least 1, got {args.world}", file=sys.stderr)
        return USER_ERROR
    hook = sys.excepthook
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(_one_line(e), file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("bspfuse: interrupted", file=sys.stderr)
        return 130
    finally:
        # torch.distributed.init_process_group wraps sys.excepthook to write "[rank0]: " before every line of a
        # traceback, and destroy_process_group leaves it: tracing a file.py:function target makes a fake
        # group for a while. This is one process, so its tracebacks are not prefixed.
        sys.excepthook = hook


def _one_line(e: BaseException) -> str:
    from bspfuse.grammar import SourceError

    text = str(e).strip() or type(e).__name__
    if isinstance(e, SourceError):
        return text  # file:line:col, the line and a caret
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or text}"
    first = text.splitlines()[0]
    return f"error: {first}" if not re.match(r"^\S+:\d+|^\S+\.(py|bsp)\b", first) else first


if __name__ == "__main__":
    sys.exit(main())
