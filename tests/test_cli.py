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


@pytest.mark.parametrize("stage", ["graph", "fused", "tile"])
def test_inspect_golden(capsys, stage):
    code, out, err = _run(capsys, "inspect", "examples/sp_mlp.bsp", "--stage", stage, "--mode", "push")
    assert code == 0, err
    path = GOLDEN / f"inspect_sp_mlp_{stage}.txt"
    if os.environ.get("BSPFUSE_UPDATE_GOLDEN"):
        path.write_text(out)
    assert out == path.read_text()
    assert "\x1b[" not in out  # piped: no colors


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
