"""Malformed programs: each gives one SourceError naming what the user wrote, at the right line:col.

An expected message ending in '...' is a prefix: the rest is the IR's own wording (bspfuse/ir.py).
"""
import pytest

try:
    from bspfuse.grammar import SourceError, parse
except ImportError:  # before packaging: the top-level grammar/ folder is the package
    from grammar import SourceError, parse

HEAD = "program p(world = 2) sizes (T = 8, H = 4) {\n  input x : bf16[T/world, H] sharded(0)\n"

CASES = [
    ("syntax_error", HEAD + "  let y = matmul(x, w) +\n  return y\n}",
     "4:3: syntax error: unexpected 'return'; expected '(', '-' or a name"),
    ("syntax_error_at_end", HEAD + "  return x\n",
     "3:11: syntax error: unexpected end of file; expected '(', ')', '*', '+', ',', '-', '/', '@', 'input', "
     "'let', 'return' or '}'"),
    ("matmul_operator", HEAD + "  let y = x @ x\n  return y\n}",
     "3:15: syntax error: unexpected 'x'; expected '[' (after @ come hints, @[fuse=push, tile=128x256x64]; "
     "multiply with matmul(a, b))"),
    ("bad_character", HEAD + "  let y = gelu(x) $\n  return y\n}",
     "3:19: syntax error: unexpected character '$'"),
    ("unknown_op", HEAD + "  let y = gelux(x)\n  return y\n}",
     "3:11: let y: unknown op 'gelux'; did you mean 'gelu'?"),
    ("unknown_op_far_from_any", HEAD + "  let y = frobnicate(x)\n  return y\n}",
     "3:11: let y: unknown op 'frobnicate' (ops: matmul, all_gather, reduce_scatter, all_reduce, wait, reshape, "
     "transpose, split, cat, decode_partial, merge_states, relu, gelu, silu, neg, exp, tanh, sigmoid, identity, "
     "add, sub, mul, div, bias)"),
    ("undefined_name", HEAD + "  let y = gelu(z)\n  return y\n}",
     "3:16: let y: 'z' is not defined"),
    ("undefined_name_close", HEAD + "  let xs = gelu(x)\n  let y = gelu(xz)\n  return y\n}",
     "4:16: let y: 'xz' is not defined; did you mean 'x'?"),
    ("used_before_definition", HEAD + "  let y = gelu(z)\n  let z = relu(x)\n  return y\n}",
     "3:16: let y: 'z' is used before its definition at line 4"),
    ("reassignment", HEAD + "  let y = gelu(x)\n  let y = relu(y)\n  return y\n}",
     "4:7: let y: 'y' is already defined at line 3: a name is assigned once"),
    ("input_reassigned", HEAD + "  input x : bf16[H]\n  return x\n}",
     "3:9: input x: 'x' is already defined at line 2: a name is assigned once"),
    ("bad_layout", "program p {\n  input x : bf16[8, 4] shardd(0)\n  return x\n}",
     "2:24: input x: unknown layout 'shardd'; did you mean 'sharded'? (layouts: sharded(d), replicated, partial, "
     "local)"),
    ("layout_dim_out_of_range", "program p {\n  input x : bf16[8, 4] sharded(2)\n  return x\n}",
     "2:32: input x: sharded(2) is out of range for a rank-2 tensor"),
    ("layout_without_dim", "program p {\n  input x : bf16[8, 4] sharded\n  return x\n}",
     "2:24: input x: sharded needs the dim it splits, e.g. sharded(0)"),
    ("world_on_the_wrong_dim", "program p(world = 2) {\n  input x : bf16[8, H/world] sharded(0)\n  return x\n}",
     "2:21: input x: dim 1 (H/world) depends on world but the layout is sharded(0): a per-rank shape divides only "
     "its sharded dim"),
    ("matmul_shape_mismatch", HEAD + "  input w : bf16[T, H]\n  let y = matmul(x, w)\n  return y\n}",
     "4:11: let y: matmul contracts a[..., H] with b[T, ...]: the inner dimensions differ"),
    ("layout_rule_violation", "program p(world = 2) {\n  input x : bf16[8, 4] partial\n"
     "  input w : bf16[4, 4] sharded(1)\n"
     "  let y = matmul(x, w)\n  return y\n}",
     "4:11: let y: matmul of partial(sum) by sharded(1) has no layout rule..."),
    ("unknown_dtype", HEAD + "  input w : bf15[H, H]\n  return x\n}",
     "3:13: input w: unknown dtype 'bf15'; did you mean 'bf16'? (dtypes: f16, bf16, f32, f64, i8, i32, i64, bool, "
     "u8)"),
    ("reserved_builtin", HEAD + "  let len = gelu(x)\n  return len\n}",
     "3:7: let len: 'len' is reserved: it is a Python builtin"),
    ("reserved_keyword", HEAD + "  let lambda = gelu(x)\n  return lambda\n}",
     "3:7: let lambda: 'lambda' is reserved: it is a Python keyword"),
    ("reserved_generated_code_name", HEAD + "  let heap_bases = gelu(x)\n  return heap_bases\n}",
     "3:7: let heap_bases: 'heap_bases' is reserved: generated code uses it"),
    ("reserved_dunder", HEAD + "  let __y = gelu(x)\n  return __y\n}",
     "3:7: let __y: '__y' is reserved: names starting with '__' belong to generated code"),
    ("collective_on_integers", "program p(world = 2) {\n  input x : i32[8, 4] sharded(0)\n"
     "  let y = all_gather(x, dim=0)\n  return y\n}",
     "3:11: let y: all_gather of dtype i32 is not supported..."),
    ("symbol_without_size", "program p(world = 2) sizes (T = 8) {\n  input x : bf16[T/world, H] sharded(0)\n"
     "  return x\n}",
     "2:27: size H has no value: bind it in the header, sizes (T, H = ...)"),
    ("world_unknown_with_sizes", "program p sizes (T = 8) {\n  input x : bf16[T]\n  return x\n}",
     "1:9: the world size is unknown: write program p(world = 2) or give it to the compiler"),
    ("size_not_whole", "program p(world = 2) sizes (T = 7) {\n  input x : bf16[T/world] sharded(0)\n  return x\n}",
     "2:18: input x: dimension T/world is T/2 = 7/2 for world=2, T=7: not a positive whole number"),
    ("size_unused", "program p(world = 2) sizes (T = 8, U = 2) {\n  input x : bf16[T]\n  return x\n}",
     "1:36: size U is bound but no shape uses it (the shapes use: T)"),
    ("zero_dimension", "program p {\n  input x : bf16[4 - 4]\n  return x\n}",
     "2:18: input x: dimension 4 - 4 = 0 is not a positive whole number"),
    ("division_by_zero", "program p {\n  input x : bf16[T/(2-2)]\n  return x\n}",
     "2:21: input x: division by zero in the dimension T/(2-2)"),
    ("too_few_results", "program p(world = 2) {\n  input q : bf16[2, 8, 64]\n"
     "  input k : bf16[2, 128, 2, 64] sharded(1)\n"
     "  let o = decode_partial(q, k, k)\n  return o\n}",
     "4:11: let o: decode_partial gives 2 results but 1 name is bound"),
    ("too_many_results", HEAD + "  let a, b = gelu(x)\n  return a\n}",
     "3:14: let a, b: gelu gives 1 result but 2 names are bound"),
    ("multiple_results_nested", "program p {\n  input x : f32[8]\n  let y = neg(split(x, [4, 4], dim=0))\n"
     "  return y\n}",
     "3:15: let y: split gives 2 results: bind them first, let a, b = split(...)"),
    ("pending_read", HEAD + "  let s = all_gather(x, dim=0)\n  let y = gelu(s)\n  let z = wait(s)\n  return y\n}",
     "4:11: let y: gelu reads s, the pending result of all_gather: wait(s) first"),
    ("pending_returned", HEAD + "  let s = all_gather(x, dim=0)\n  let z = wait(s)\n  return s\n}",
     "5:10: return: s is the pending result of a collective: return wait(s)"),
    ("wait_on_a_plain_value", HEAD + "  let y = wait(x)\n  return y\n}",
     "3:11: let y: wait on a value that is not the result of a collective"),
    ("missing_dim", HEAD + "  let y = all_gather(x)\n  return y\n}",
     "3:11: let y: all_gather needs dim=...; usage: all_gather(x, dim=...)"),
    ("wrong_operand_count", HEAD + "  let y = matmul(x)\n  return y\n}",
     "3:11: let y: matmul takes 2 tensor operands, got 1; usage: matmul(a, b)"),
    ("unknown_keyword", HEAD + "  let y = all_gather(x, axis=0)\n  return y\n}",
     "3:25: let y: all_gather takes no argument 'axis'; usage: all_gather(x, dim=...)"),
    ("dim_not_an_integer", HEAD + "  let y = all_gather(x, dim=first)\n  return y\n}",
     "3:29: let y: dim=first: dim is an integer"),
    ("bad_hint_mode", HEAD + "  let y = all_gather(x, dim=0) @[fuse=pushh]\n  return y\n}",
     "3:39: let y: fuse=pushh: the mode is one of pull, push, auto, off"),
    ("bad_tile", HEAD + "  let y = all_gather(x, dim=0) @[tile=100x64]\n  return y\n}",
     "3:39: let y: tile=100x64: tile sizes are powers of two"),
    ("unknown_hint", HEAD + "  let y = all_gather(x, dim=0) @[fuze=push]\n  return y\n}",
     "3:34: let y: unknown hint 'fuze'; did you mean 'fuse'? (hints: fuse=pull|push|auto|off, tile=MxNxK, "
     "stage=0..3)"),
    ("hint_without_op", HEAD + "  let y = x @[fuse=push]\n  return y\n}",
     "3:13: let y: hints need an op to apply to, and x makes none"),
    ("no_return", HEAD + "  let y = gelu(x)\n}",
     "4:1: program p has no return"),
    ("statement_after_return", HEAD + "  return x\n  let y = gelu(x)\n}",
     "4:3: statement after the return at line 3: return comes last"),
    ("unknown_parameter", "program p(world = 2, ranks = 4) {\n  input x : f32[4]\n  return x\n}",
     "1:22: unknown parameter 'ranks': a program takes only world, e.g. program p(world = 2)"),
    ("world_zero", "program p(world = 0) {\n  input x : f32[4]\n  return x\n}",
     "1:19: world = 0: the world size must be at least 1"),
    ("tensor_named_like_a_size", HEAD + "  input T : bf16[H]\n  return T\n}",
     "3:9: input T: 'T' is a size; a tensor needs another name"),
    ("too_deep", HEAD + "  let y = " + "neg(" * 150 + "x" + ")" * 150 + "\n  return y\n}",
     "3:411: let y: expression nested more than 100 deep: split it into lets"),
]


@pytest.mark.parametrize("source, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_program(source, expected):
    with pytest.raises(SourceError) as info:
        parse(source, "bad.bsp")
    e = info.value
    got = f"{e.line}:{e.column}: {e.message}"
    if expected.endswith("..."):
        assert got.startswith(expected[:-3])
    else:
        assert got == expected
    assert str(e).startswith(f"bad.bsp:{got}\n")
    assert len(str(e).splitlines()) == 3 and str(e).splitlines()[2].endswith("^")


def test_there_are_many_cases():
    assert len(CASES) >= 12


@pytest.mark.parametrize("kwargs, expected", [
    ({"world_size": 0}, "1:9: world size 0 given to the compiler must be a positive integer"),
    ({"sizes": {"T": -1}}, "1:9: size T=-1 given to the compiler must be a positive integer"),
    ({"sizes": {"Q": 4}}, "1:9: size Q given to the compiler is not a dimension of program p (its dimensions: T, H)"),
    ({"sizes": {"world": 4}}, "1:9: world is not a size: pass the world size on its own (world_size, --world)"),
    ({"world_size": 3}, "2:18: input x: dimension T/world is T/3 = 8/3 for world=3, T=8, H=4: not a positive whole "
                        "number"),
])
def test_bad_arguments_from_the_compiler(kwargs, expected):
    with pytest.raises(SourceError) as info:
        parse(HEAD + "  return x\n}", "bad.bsp", **kwargs)
    assert f"{info.value.line}:{info.value.column}: {info.value.message}" == expected
