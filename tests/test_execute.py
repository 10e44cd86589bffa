"""`bspfuse run` and `bspfuse compile` against the unfused float64 reference, in the multi-rank simulator."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from bspfuse.cli import main
from bspfuse.execute import random_inputs, reference, rel_error
from bspfuse.grammar import parse_file
from bspfuse.runtime import launch

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("example, mode", [
    ("sp_mlp", "auto"), ("row_parallel_allreduce", "auto"), ("attn_out_reduce_scatter", "auto"),
    ("flash_decode", "auto"),
    ("row_parallel_allreduce", "push"), ("attn_out_reduce_scatter", "push"),  # the fused GEMM+AR / GEMM+RS
])
def test_run_example_passes(capsys, example, mode):
    code = main(["run", str(ROOT / "examples" / f"{example}.bsp"), "--world", "2", "--mode", mode])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("PASS")
    if mode == "push":
        assert "fused: %" in out and "fallback" not in out


def test_reference_semantics():
    program = parse_file(str(ROOT / "examples" / "row_parallel_allreduce.bsp"))
    inputs = random_inputs(program, 2, seed=3)
    assert not torch.equal(inputs[0]["x"], inputs[1]["x"])
    (y0,), (y1,) = reference(program, inputs)
    want = sum(inputs[r]["x"].double() @ inputs[r]["w"].double() for r in range(2))
    assert torch.equal(y0, y1) and rel_error(y0, want) < 1e-12


def test_compiled_module_runs_without_the_cli(capsys, tmp_path, monkeypatch):
    out = tmp_path / "sp_mlp_kernels.py"
    assert main(["compile", str(ROOT / "examples" / "sp_mlp.bsp"), "-o", str(out), "--mode", "push"]) == 0
    text = out.read_text()
    assert text.count("@triton.jit") >= 4 and "iris." in text and "def run(ctx, inputs)" in text
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned ranks import it by name
    module = importlib.import_module("sp_mlp_kernels")
    program = parse_file(str(ROOT / "examples" / "sp_mlp.bsp"))
    inputs = random_inputs(program, 2, seed=5)
    expected = reference(program, inputs)
    results = launch(module.rank_main, 2, backend="sim", args=(inputs,), timeout_s=300)
    for rank in range(2):
        assert rel_error(results[rank]["y"], expected[rank][0]) < 2e-2
    sys.modules.pop("sp_mlp_kernels", None)
