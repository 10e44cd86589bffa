"""The bspfuse command, in-process: golden `inspect` output per stage, analyze, and one-line user errors."""
import json
import os
from pathlib import Path

import pytest

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
