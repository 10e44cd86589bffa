"""The source language front end: each example's IR against a golden text, plus what the language
promises (auto waits, names, hints, origins, sizes and world overrides, the error format)."""
import os
from pathlib import Path

import pytest

try:
    from bspfuse.grammar import SourceError, parse, parse_file
    from bspfuse.grammar.names import why_reserved
except ImportError:  # before packaging: the top-level grammar/ folder is the package
    from grammar import SourceError, parse, parse_file
    from grammar.names import why_reserved
from bspfuse.ir import dim
from bspfuse.printer import print_program
from bspfuse.verify import verify

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.bsp"))


def example(name: str):
    """Parse examples/<name>.bsp, named as a user would type it, so origins read examples/<name>.bsp:line:col."""
    return parse((ROOT / "examples" / f"{name}.bsp").read_text(), f"examples/{name}.bsp")


def check_golden(name: str, text: str) -> None:
    """Compare with tests/golden/bsp_<name>.txt (BSPFUSE_UPDATE_GOLDEN=1 rewrites it)."""
    path = GOLDEN / f"bsp_{name}.txt"
    if os.environ.get("BSPFUSE_UPDATE_GOLDEN"):
        path.write_text(text + "\n")
    assert text + "\n" == path.read_text(), f"{path.name} differs; BSPFUSE_UPDATE_GOLDEN=1 rewrites it"


def test_the_four_examples_exist():
    assert {"sp_mlp", "row_parallel_allreduce", "attn_out_reduce_scatter", "flash_decode"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_golden_ir(name):
    program = example(name)
    verify(program)
    check_golden(name, print_program(program))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_header_says_what_and_how_to_run(name):
    text = (ROOT / "examples" / f"{name}.bsp").read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, "an example opens with a comment saying what it shows"
    assert f"bspfuse run examples/{name}.bsp --world 2" in "\n".join(header)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_sizes_world_and_origins(name):
    program = example(name)
    assert program.world_size == 2
    assert program.sizes and all(isinstance(v, int) and v > 0 for v in program.sizes.values())
    lines = (ROOT / "examples" / f"{name}.bsp").read_text().splitlines()
    for op in program.ops:
        path, line, column = op.origin.rsplit(":", 2)
        assert path == f"examples/{name}.bsp"
        # The origin points at what made the op: a call's name or an operand of an operator.
        assert lines[int(line) - 1][int(column) - 1].isalpha()


def test_sp_mlp_ir_in_detail():
    p = example("sp_mlp")
    assert [op.opcode for op in p.ops] == ["all_gather", "wait", "matmul", "pointwise", "matmul", "reduce_scatter",
                                          "wait"]
    assert [v.name for v in p.outputs] == ["y"]
    assert str(p.outputs[0].type) == "bf16[T/2, H] sharded(0)"
    assert p.sizes == {"T": 256, "H": 128, "F": 256}
    assert p.ops[0].origin == "examples/sp_mlp.bsp:9:12"  # all_gather(x, dim=0); its wait shares it
    assert p.ops[1].origin == p.ops[0].origin


def test_flash_decode_states_are_gathered_along_a_new_rank_dim():
    p = example("flash_decode")
    ag = p.find("all_gather")
    assert [str(op.outputs[0].type) for op in ag] == ["bf16[2, B, Hq, D] replicated pending",
                                                      "f32[2, B, Hq] replicated pending"]
    (merge,) = p.find("merge_states")
    assert [v.name for v in merge.outputs] == ["out", "out_lse"]
    assert [v.name for v in p.outputs] == ["out"]


def test_world_and_sizes_given_to_the_compiler_win():
    p = example("sp_mlp")
    q = parse_file(ROOT / "examples" / "sp_mlp.bsp", world_size=4, sizes={"T": 512})
    assert q.world_size == 4 and q.sizes == {"T": 512, "H": 128, "F": 256}
    assert str(q.inputs[0].type) == "bf16[T/4, H] sharded(0)"
    assert str(p.inputs[0].type) == "bf16[T/2, H] sharded(0)"


SYMBOLIC = """
program tp(world) {
  input x : bf16[M, K/world] sharded(1)
  input w : bf16[K/world, N] sharded(0)
  return all_reduce(matmul(x, w))
}
"""


def test_without_sizes_the_program_stays_symbolic():
    p = parse(SYMBOLIC)
    assert p.world_size is None and p.sizes == {}
    assert str(p.inputs[0].type) == "bf16[M, K/world] sharded(1)"
    assert [op.opcode for op in p.ops] == ["matmul", "all_reduce", "wait"]
    assert [v.name for v in p.outputs] == ["out"]
    assert str(p.outputs[0].type) == "bf16[M, N] replicated"


def test_explicit_and_automatic_waits_give_the_same_ir():
    auto = parse("program p(world = 2) { input x : f32[4, 8] local\n let y = all_reduce(x)\n return y }")
    spelled = parse("program p(world = 2) { input x : f32[4, 8] local\n let s = all_reduce(x)\n"
                    " let y = wait(s)\n return y }")
    nested = parse("program p(world = 2) { input x : f32[4, 8] local\n let y = wait(all_reduce(x))\n return y }")
    shape = [(op.opcode, [str(v.type) for v in op.outputs]) for op in auto.ops]
    assert shape == [(op.opcode, [str(v.type) for v in op.outputs]) for op in spelled.ops]
    assert shape == [(op.opcode, [str(v.type) for v in op.outputs]) for op in nested.ops]
    assert [v.name for v in spelled.values()] == ["x", "s", "y"]
    assert [v.name for v in auto.values()] == ["x", "y_start", "y"]


def test_nested_calls_and_operators_flatten_to_named_ops():
    p = parse("""
    program p {
      input x : f32[8, 4]
      input w : f32[4, 4]
      input b : f32[4]
      let y = -relu(matmul(x, w) + b) * x   # operators are add, sub, mul, div, neg
      let y_matmul = x                       # a user name the intermediates must avoid
      return y, y_matmul
    }""")
    text = print_program(p)
    assert [(op.opcode, op.attrs.get("fn")) for op in p.ops] == [
        ("matmul", None), ("pointwise", "add"), ("pointwise", "relu"), ("pointwise", "neg"), ("pointwise", "mul")]
    assert [v.name for op in p.ops for v in op.outputs] == ["y_matmul_1", "y_add", "y_relu", "y_neg", "y"]
    assert "output %y, %x" in text  # a let of a plain name binds the same value


def test_hints_land_on_every_op_of_their_statement():
    p = parse("program p(world = 2) {\n input x : bf16[64/world, 32] sharded(0)\n input w : bf16[32, 16]\n"
              " let y = matmul(all_gather(x, dim=0), w) @[fuse=push, tile=128x256x64]\n let z = gelu(y)\n return z }")
    hinted = [op for op in p.ops if "hint_mode" in op.attrs]
    assert [op.opcode for op in hinted] == ["all_gather", "matmul"]  # not the wait the front end adds
    assert all(op.attrs["hint_mode"] == "push" and op.attrs["hint_tile"] == (128, 256, 64) for op in hinted)
    assert "hint_mode" not in p.ops[-1].attrs
    assert p.find("all_gather")[0].outputs[0].type.shape == (64, 32)


def test_split_cat_transpose_reshape_and_negative_dims():
    H = dim("H")
    p = parse("""
    program p(world = 2) sizes (S = 16, H = 8) {
      input x : f32[S/world, H] sharded(0)
      let a, b = split(x, [H/2, H/2], dim=-1)
      let c = cat(b, a, dim=1)
      let t = transpose(reshape(c, [S/world, H]))
      let g = all_gather(x, dim=-2)
      return t, g
    }""")
    assert [op.opcode for op in p.ops] == ["split", "cat", "reshape", "transpose", "all_gather", "wait"]
    assert p.find("split")[0].attrs == {"dim": 1, "sizes": (H / 2, H / 2)}
    assert p.find("all_gather")[0].attrs == {"dim": 0}
    assert [str(v.type) for v in p.outputs] == ["f32[H, S/2] sharded(1)", "f32[S, H] replicated"]


def test_source_error_format():
    text = "program p {\n  input x : f32[4]\n  let y = gelux(x)\n  return y\n}\n"
    with pytest.raises(SourceError) as info:
        parse(text, "model.bsp")
    e = info.value
    assert (e.filename, e.line, e.column) == ("model.bsp", 3, 11)
    assert e.message == "let y: unknown op 'gelux'; did you mean 'gelu'?"
    assert str(e).splitlines() == ["model.bsp:3:11: let y: unknown op 'gelux'; did you mean 'gelu'?",
                                   "  let y = gelux(x)",
                                   "          ^"]


def test_parse_file_names_the_path_and_rejects_non_utf8(tmp_path):
    bad = tmp_path / "bad.bsp"
    bad.write_bytes(b"program p {\n  input \xff : f32[4]\n}\n")
    with pytest.raises(SourceError) as info:
        parse_file(bad)
    assert (info.value.line, info.value.column) == (2, 9)
    assert info.value.filename == str(bad)


@pytest.mark.parametrize("name, reserved", [("x", False), ("h_matmul", False), ("lambda", True), ("match", True),
                                            ("len", True), ("tl", True), ("heap_bases", True), ("world", True),
                                            ("__x", True), ("9x", True)])
def test_reserved_names(name, reserved):
    assert (why_reserved(name) is not None) == reserved


def test_flash_decode_stage_hint():
    text = (ROOT / "examples" / "flash_decode.bsp").read_text()
    text = text.replace("merge_states(o_all, lse_all)", "merge_states(o_all, lse_all) @[stage=1]")
    p = parse(text)
    assert p.find("merge_states")[0].attrs == {"stage": 1}
    assert all("stage" not in op.attrs for op in p.ops if op.opcode != "merge_states")


def test_language_words_cannot_name_tensors():
    with pytest.raises(SourceError, match="unexpected 'return'; expected a name"):
        parse("program p {\n  input return : f32[4]\n  return x\n}")
