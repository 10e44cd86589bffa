"""Flash Decode's tile IR: the stages are rewrites of the BSP program, and codegen prints every kernel from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from bspfuse.codegen.decode import decode_sources
from bspfuse.tile_decode import (REWRITES, CountSplits, HostStep, MergeStates, PutState, decode_program, lower_decode,
                                 print_decode_program)


def test_each_stage_is_the_one_before_rewritten():
    bsp = lower_decode()
    assert [s.what for s in bsp.steps if isinstance(s, HostStep)] == ["all_gather"]
    rma = decode_program(1)
    assert [getattr(s, "name", getattr(s, "what", None)) for s in rma.steps] == \
        ["split", "merge_splits", "put", "barrier", "merge_ranks"]
    flags = decode_program(2)
    assert not any(isinstance(s, HostStep) for s in flags.steps)  # no host sync left
    assert flags.kernel("put").statements("tile") == (PutState("gather", "arrived"),)
    assert flags.kernel("merge_ranks").statements("tile")[0] == MergeStates("gather", "ranks", "arrived")
    fused = decode_program(3)
    assert [k.name for k in fused.kernels] == ["fused"] and len(fused.steps) == 1
    split = fused.kernels[0].statements("split")
    assert isinstance(split[2], CountSplits) and split[-1] == PutState("gather", "arrived")
    for stage, rewrite in enumerate(REWRITES):  # a rewrite takes only the stage it rewrites
        wrong = decode_program((stage + 1) % len(REWRITES))
        with pytest.raises(ValueError, match=f"takes a stage-{stage} decode program"):
            rewrite(wrong)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_codegen_prints_every_statement_of_every_kernel(stage):
    program = decode_program(stage)
    sources = decode_sources(stage)
    assert set(sources) == {k.name for k in program.kernels}
    for kernel in program.kernels:
        text = sources[kernel.name].source
        assert print_decode_program(program) in text  # the program in the module's header
        body = text[text.index("def "):]
        for _, _, statements in kernel.roles:
            for s in statements:
                assert f"# {type(s).__name__}(" in body, (kernel.name, s)
        assert "@triton.jit\ndef fused_decode_kernel" not in text.replace(body, "")


def test_inspect_prints_the_decode_program_and_its_kernels(capsys):
    from bspfuse.cli import main

    example = str(Path(__file__).resolve().parents[1] / "examples" / "flash_decode.bsp")
    assert main(["inspect", example, "--stage", "tile"]) == 0
    tile = capsys.readouterr().out
    assert "decode_program %" in tile and "CountSplits(counter=tile_count)" in tile and "hand-written" not in tile
    assert main(["inspect", example, "--stage", "triton"]) == 0
    assert "def fused_decode_kernel(" in capsys.readouterr().out
