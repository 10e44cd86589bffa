"""One planning function (lowering.plan_kernel) for what `inspect` shows and what runs: for every example and
schedule, the `launch:` lines `bspfuse inspect --stage tile --target sim` prints are the ones the simulator's
host objects launch with, and `bspfuse run --backend sim` prints the same."""
from __future__ import annotations

import pathlib

import pytest

from bspfuse.cli import inspect_text, main
from bspfuse.runtime.launch import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["sp_mlp", "swiglu_mlp", "attn_out_reduce_scatter", "row_parallel_allreduce"]


def _launch_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("launch:")]


def _host_lines(ctx, cases):
    from bspfuse.execute import make_fused_gemm

    out = []
    for fused in cases:
        out.append([f"{host.plan.launch_line} (%{op.outputs[0].name} on {host.target})"
                    for op in fused.ops if op.opcode in ("fused_allgather_matmul", "fused_matmul_reduce_scatter",
                                                         "fused_matmul_allreduce")
                    for host in [make_fused_gemm(ctx.heap, op, fused)]])
    return out


def test_inspect_shows_what_the_simulator_launches():
    from bspfuse.cli import _fuse
    from bspfuse.grammar import parse

    cases = []
    for name in EXAMPLES:
        path = ROOT / "examples" / f"{name}.bsp"
        program = parse(path.read_text(), filename=str(path))
        assert program.world_size == 2, name
        for mode in ("push", "pull", "direct"):
            cases.append((name, mode, _launch_lines(inspect_text(program, "tile", mode, "sim")),
                          _fuse(program, mode).program))
    launched = launch(_host_lines, 2, backend="sim", heap_bytes=32 << 20, args=([c[3] for c in cases],),
                      timeout_s=300)[0]
    for (name, mode, shown, _), lines in zip(cases, launched):
        assert shown and shown == lines, (name, mode, shown, lines)


def test_run_prints_the_launch_lines_inspect_shows(capsys):
    main(["inspect", "examples/sp_mlp.bsp", "--stage", "tile", "--target", "sim", "--mode", "push"])
    shown = _launch_lines(capsys.readouterr().out)
    assert main(["run", "examples/sp_mlp.bsp", "--world", "2", "--backend", "sim", "--mode", "push"]) == 0
    assert _launch_lines(capsys.readouterr().out) == shown and len(shown) == 2, shown


def test_a_gpu_target_plans_comm_programs_only_where_the_schedule_moves_data():
    from bspfuse.lowering import TARGETS, plan_kernel

    direct = plan_kernel("matmul_rs", "direct", 8192, 8192, 4096, 2, "bf16", (), TARGETS["H100"])
    push = plan_kernel("matmul_rs", "push", 8192, 8192, 4096, 2, "bf16", (), TARGETS["H100"])
    assert direct.config.comm_programs == 0 and push.config.comm_programs > 0  # direct stores from the epilogue
    assert direct.programs == push.programs == 132
