"""The bspfuse command, in-process: golden `inspect` output per stage, analyze, one-line user errors, and the
progress `run` shows on stderr."""
import io
import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from bspfuse import execute
from bspfuse.cli import main

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = Path(__file__).parent.parent / "examples"
SP_MLP = str(EXAMPLES / "sp_mlp.bsp")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    # Messages name paths as the user wrote them: run from the root, as a user would.
    monkeypatch.chdir(EXAMPLES.parent)


def _without_estimates(text: str) -> str:
    """The part of `inspect` output that stays when the device model is recalibrated: the cost model's
    estimate lines dropped."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("cost model on "))


@pytest.mark.parametrize("stage", ["graph", "fused", "tile"])
def test_inspect_golden(capsys, stage):
    code, out, err = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", stage, "--mode", "push")
    assert code == 0, err
    path = GOLDEN / f"inspect_sp_mlp_{stage}.txt"
    if os.environ.get("BSPFUSE_UPDATE_GOLDEN"):
        path.write_text(_without_estimates(out))
    assert _without_estimates(out) == path.read_text()
    assert "\x1b[" not in out  # piped: no colors


def _estimate_lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.lstrip().startswith("cost model on ")]


def _model_estimates(T: int, H: int, F: int, world: int = 2) -> list[str]:
    """What the cost model says of sp_mlp's two candidates: AG+GEMM [T, H] x [H, F/W], GEMM+RS [T, F/W] x [F/W, H]."""
    from bspfuse.passes import Estimate
    from bspfuse.passes.fuse_gemm import choose_mode

    choices = [choose_mode("ag_matmul", T, F // world, H, world), choose_mode("matmul_rs", T, H, F, world)]
    return [str(Estimate("H200", c.mode, c.estimates_us)) for c in choices]


def test_inspect_estimates_come_from_the_cost_model(capsys):
    code, out, err = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "fused", "--mode", "push")
    assert code == 0, err
    assert _estimate_lines(out) == _model_estimates(T=256, H=128, F=256)
    assert all(" us" in line for line in _estimate_lines(out))


def test_direct_mode_can_be_forced(capsys):
    code, out, err = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "tile", "--mode", "direct")
    assert code == 0, err
    assert "kind=ag_matmul mode=direct" in out and "kind=matmul_rs mode=direct" in out, out


def test_recalibrating_the_model_keeps_the_golden(capsys, monkeypatch):
    from dataclasses import replace

    from bspfuse import devices

    _, before, _ = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "fused", "--mode", "push")
    h200 = devices.DEVICES["H200"]
    slower = replace(h200, matmul_tflops=devices.Figure(h200.matmul_tflops.value / 10, "assumed: a slower GPU"),
                     collective_latency_us=devices.Figure(1.0, "assumed: a faster network"))
    monkeypatch.setitem(devices.DEVICES, "H200", slower)
    _, after, _ = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "fused", "--mode", "push")
    assert _estimate_lines(after) != _estimate_lines(before)
    assert _without_estimates(after) == _without_estimates(before)


def test_size_rebinds_the_program(capsys):
    code, out, err = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "fused", "--mode", "push",
                          "--size", "T=8192", "--size", "H=4096", "--size", "F=16384")
    assert code == 0, err
    assert _estimate_lines(out) == _model_estimates(T=8192, H=4096, F=16384)


def test_size_of_no_dimension(capsys):
    err = _one_line_error(capsys, "inspect", "examples/sp_mlp.bsp", "--size", "Q=4")
    assert err.startswith("examples/sp_mlp.bsp:5:") and "size Q given to the compiler is not a dimension" in err


def test_size_on_a_python_target(capsys):
    err = _one_line_error(capsys, "analyze", "examples/sp_mlp.py:build", "--size", "T=4")
    assert err == "error: --size binds sizes of a .bsp program; examples/sp_mlp.py:build builds its own shapes"


def test_size_malformed(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "examples/sp_mlp.bsp", "--size", "T"])
    assert exit_.value.code == 2 and "'T' should be NAME=VALUE" in capsys.readouterr().err


def test_inspect_fused_names_every_decision(capsys):
    code, out, _ = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "fused", "--mode", "off")
    assert code == 0
    assert out.count("not fused") == 2 and "turned off by the user" in out


def test_inspect_triton(capsys):
    code, out, err = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", "triton", "--mode", "push")
    assert code == 0, err
    assert out.count("@triton.jit") >= 2
    assert "iris." in out


def test_analyze_json_totals(capsys):
    code, out, err = _run(capsys, "analyze", "examples/sp_mlp.py:build", "--world", "8", "--json")
    assert code == 0, err
    totals = json.loads(out)["totals"]
    for tax in ("launch_tax_us", "bulk_synchronous_tax_us", "data_locality_tax_us"):
        assert totals[tax] > 0


def test_analyze_table_and_plot(capsys, tmp_path):
    png = tmp_path / "taxes.png"
    code, out, err = _run(capsys, "analyze", "examples/sp_mlp.bsp", "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_says_it_needs_gpus(capsys):
    code, out, _ = _run(capsys, "bench")
    assert code == 0 and "GPUs" in out and "benchmarks/run_all.sh" in out and "torchrun" in out


def _one_line_error(capsys, *argv):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err and out == ""
    return err.strip()


def test_missing_file(capsys):
    err = _one_line_error(capsys, "inspect", "examples/nope.bsp", "--stage", "graph")
    assert err == "examples/nope.bsp: no such file"


def test_missing_python_file(capsys):
    err = _one_line_error(capsys, "analyze", "nope.py:build")
    assert len(err.splitlines()) == 1 and "nope.py" in err


def test_missing_function(capsys):
    err = _one_line_error(capsys, "analyze", "examples/sp_mlp.py:nope")
    assert len(err.splitlines()) == 1 and "'nope' is not defined" in err


def test_bsp_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.bsp"
    bad.write_text("program p(world = 2) {\n  input x : bf16[4, 4] replicated\n  let y = matmul(x,, x)\n  return y\n}\n")
    err = _one_line_error(capsys, "inspect", str(bad), "--stage", "graph")
    assert err.splitlines()[0].startswith(f"{bad}:3:")


def test_collective_on_int_dtype(capsys, tmp_path):
    target = tmp_path / "int_gather.py"
    target.write_text(
        "from bspfuse.ir import Builder, sharded\n\n\n"
        "def build(world_size=2):\n"
        "    b = Builder('int_gather', world_size=world_size)\n"
        "    x = b.input('x', 'i32', (4, 8), sharded(0))\n"
        "    b.output(b.wait(b.all_gather(x, dim=0)))\n"
        "    return b.build()\n")
    err = _one_line_error(capsys, "analyze", f"{target}:build")
    assert len(err.splitlines()) == 1 and "i32" in err and "all_gather" in err


# ----------------------------------------------------------------------------------------------- progress


def test_run_shows_each_ranks_op_and_tiles_on_stderr(capsys, monkeypatch):
    import importlib

    launch_module = importlib.import_module("bspfuse.runtime.launch")  # the module, not runtime's function
    monkeypatch.setenv("BSPFUSE_PROGRESS", "1")  # as on a terminal, though stderr is not one
    monkeypatch.setattr(launch_module, "TERMINAL_EVERY_S", 0.05)  # often enough to see the op on any machine
    code = main(["run", "examples/row_parallel_allreduce.bsp", "--world", "2", "--backend", "sim"])
    out, err = capsys.readouterr()
    assert code == 0 and out.rstrip().endswith("PASS"), out + err
    assert "] rank 0: starting" in err and "] rank 1: " in err, err
    assert re.search(r"\] rank [01]: op 1/1 %y fused_matmul_allreduce \(\w+\), tile \d+/32, \d+ s", err), err
    assert "rank 0:" not in out


def test_run_without_progress(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(execute, "check", lambda *args, **kwargs: seen.update(kwargs) or _passed())
    assert main(["run", "examples/sp_mlp.bsp", "--world", "2", "--backend", "sim", "--no-progress"]) == 0
    assert seen["progress"] is False
    assert main(["run", "examples/sp_mlp.bsp", "--world", "2", "--backend", "sim"]) == 0
    assert seen["progress"] is None  # the default: a terminal, or a launch that takes a while


def _passed():
    return execute.CheckResult("sp_mlp", 2, [], [], [], "simulator")


def count_tiles(ctx):
    """On this rank: each fused GEMM's tiles as the simulator counted them in a call, and gemm_tiles' count."""
    import importlib

    import torch

    from bspfuse.execute import gemm_tiles
    from bspfuse.lowering import SIM_CONFIG
    from bspfuse.kernels import gemm

    launcher = importlib.import_module("bspfuse.runtime.launch")  # the module (bspfuse.runtime.launch is the function)

    heap, cfg = ctx.heap, SIM_CONFIG  # 16 x 32 tiles: 24 rows and 40 columns end in part tiles
    a, a_all = torch.randn(24, 16, dtype=torch.bfloat16), torch.randn(48, 16, dtype=torch.bfloat16)
    b32, b40 = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(16, 40, dtype=torch.bfloat16)
    calls = [(gemm.FusedAllGatherMatmul(heap, 24, 40, 16, config=cfg, name="ag"), a, b40),
             (gemm.FusedAllGatherMatmul(heap, 24, (32, 40), 16, config=cfg, name="ag_two"), a, [b32, b40]),
             (gemm.FusedAllGatherMatmul(heap, 24, (32, 32), 16, epilogue=("swiglu",), config=cfg, name="ag_swiglu"),
              a, [b32, b32]),
             (gemm.FusedMatmulReduceScatter(heap, 48, 40, 16, config=cfg, name="rs"), a_all, b40),
             (gemm.FusedMatmulAllReduce(heap, 48, 40, 16, config=cfg, name="ar"), a_all, b40)]
    counts = {}
    for host, a_, b in calls:
        launcher.report_progress(host.name, tiles=gemm_tiles(host, a_))
        host(a_, b)
        counts[host.name] = (launcher._progress.numbers[launcher.RankProgress.TILE_COUNT], gemm_tiles(host, a_))
    return counts


def test_the_simulator_counts_the_tiles_the_host_objects_expect():
    from bspfuse.runtime import launch

    for rank, counts in enumerate(launch(count_tiles, 2, heap_bytes=4 << 20, timeout_s=240, progress=False)):
        assert counts == {"ag": (8, 8), "ag_two": (12, 12), "ag_swiglu": (4, 4), "rs": (8, 8), "ar": (8, 8)}, rank


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _lines(stream=None, enabled=None, world=2):
    from bspfuse.runtime.launch import RankProgress, _ProgressLines

    records = [RankProgress(multiprocessing.get_context("spawn")) for _ in range(world)]
    return records, _ProgressLines(records, count_tiles, enabled, stream=stream or io.StringIO())


def test_progress_lines_say_op_tiles_and_time(monkeypatch):
    monkeypatch.delenv("BSPFUSE_PROGRESS", raising=False)
    (r0, r1), lines = _lines()
    r0.start("%h fused_allgather_matmul (push)", 1, 2, tiles=64)
    for _ in range(17):
        r0.tile()
    start = lines.start
    lines.show(start + 4, ready={0, 1}, pending={0, 1})
    assert lines.stream.getvalue() == ""  # not a terminal: nothing from a launch shorter than a few seconds
    lines.show(start + 6, ready={0, 1}, pending={0, 1})
    first, second = lines.stream.getvalue().splitlines()  # (the clock here is the test's: 6 s in the op too)
    assert first == "[6 s] rank 0: op 1/2 %h fused_allgather_matmul (push), tile 17/64, 5 s, about 17 s left"
    assert second == "[6 s] rank 1: running count_tiles"
    lines.show(start + 7, ready={0, 1}, pending={0, 1})
    assert len(lines.stream.getvalue().splitlines()) == 2  # the next lines come 10 s later
    r1.start("%out flash_decode (stage 3)", 1, 1, tiles=0)
    r1.kernel("fused_decode_kernel")
    r1.programs(8)
    r1.program(3)
    lines.show(start + 16, ready={0, 1}, pending={1})
    assert lines.stream.getvalue().splitlines()[2:] == [
        "[16 s] rank 0: done",
        "[16 s] rank 1: op 1/1 %out flash_decode (stage 3), fused_decode_kernel program 3/8, 15 s, about 47 s left"]


def test_progress_on_a_terminal_is_redrawn_in_place_and_cleared(monkeypatch):
    monkeypatch.delenv("BSPFUSE_PROGRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "60")
    records, lines = _lines(_Terminal())
    records[0].start("%y_matmul_and_a_long_name fused_matmul_reduce_scatter (push)", 2, 2, tiles=1024)
    lines.show(lines.start + 1, ready=set(), pending={0, 1})
    lines.show(lines.start + 2, ready=set(), pending={0, 1})
    lines.close()
    text = lines.stream.getvalue()
    assert text.count("\x1b[2F") == 2 and text.endswith("\x1b[2F\x1b[J")  # up over the 2 lines, then cleared
    drawn = [line.removeprefix("\x1b[2F").removeprefix("\x1b[2K") for line in text.split("\n")[2:4]]
    assert drawn == ["[2 s] rank 0: op 2/2 %y_matmul_and_a_l..., tile 0/1024, 1 s",  # the op's name gives way
                     "[2 s] rank 1: starting (imports, heap)"]


def test_progress_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BSPFUSE_PROGRESS", "0")
    _, lines = _lines(_Terminal())
    lines.show(lines.start + 100, ready=set(), pending={0, 1})
    assert lines.stream.getvalue() == ""
    _, lines = _lines(_Terminal(), enabled=False)
    lines.show(lines.start + 100, ready=set(), pending={0, 1})
    assert lines.stream.getvalue() == ""
