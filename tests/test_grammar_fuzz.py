"""Fuzz the front end: whatever the text, `parse` gives a verified Program or a SourceError, never another
exception. Random characters, random token soups, and random edits of the examples."""
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from bspfuse.grammar import SourceError, parse
except ImportError:  # before packaging: the top-level grammar/ folder is the package
    from grammar import SourceError, parse
from bspfuse.ir import Program
from bspfuse.printer import print_program
from bspfuse.verify import verify

EXAMPLES = [p.read_text() for p in sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.bsp"))]
TOKENS = ["program", "p", "(", ")", "world", "=", "2", "sizes", "T", "H", "{", "}", "input", "let", "return", "x",
          "y", ":", "bf16", "f32", "i32", "[", "]", ",", "/", "*", "+", "-", "sharded(0)", "sharded(1)", "partial",
          "local", "replicated", "matmul", "all_gather", "reduce_scatter", "all_reduce", "wait", "gelu", "reshape",
          "split", "cat", "transpose", "decode_partial", "merge_states", "dim=0", "dim=-1", "@", "fuse=push",
          "tile=64x64x32", "0", "1", "128x64", "#", "\n", "len", "__x"]
SETTINGS = dict(max_examples=70, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def check(text: str, world_size=None, sizes=None) -> None:
    try:
        program = parse(text, "fuzz.bsp", world_size=world_size, sizes=sizes)
    except SourceError as e:
        assert isinstance(e.line, int) and e.line >= 1 and isinstance(e.column, int) and e.column >= 1
        assert str(e).startswith(f"fuzz.bsp:{e.line}:{e.column}: ") and "\n" not in e.message
        return
    assert isinstance(program, Program)
    verify(program)
    print_program(program)


worlds = st.one_of(st.none(), st.integers(min_value=-1, max_value=8))
sizes = st.one_of(st.none(), st.dictionaries(st.sampled_from(["T", "H", "F", "Q", "world"]),
                                             st.integers(min_value=-2, max_value=1024), max_size=2))


@settings(**SETTINGS)
@given(st.text(alphabet="program(world=2){}input x:bf16[T/world,H]sharded(0)let y=all_gather(x,dim=0)@#\n -*+",
               max_size=200), worlds)
def test_random_text(text, world_size):
    check(text, world_size)


@settings(**SETTINGS)
@given(st.lists(st.sampled_from(TOKENS), max_size=60), st.booleans(), worlds, sizes)
def test_token_soup(tokens, with_header, world_size, sizes):
    head = "program p(world = 2) sizes (T = 8, H = 4) {\n input x : bf16[T/world, H] sharded(0)\n"
    check((head if with_header else "") + " ".join(tokens), world_size, sizes)


@st.composite
def mutated_example(draw):
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        a = draw(st.integers(min_value=0, max_value=len(text)))
        b = min(len(text), a + draw(st.integers(min_value=0, max_value=16)))
        edit = draw(st.sampled_from(["delete", "insert", "duplicate", "move"]))
        if edit == "delete":
            text = text[:a] + text[b:]
        elif edit == "insert":
            text = text[:a] + " " + draw(st.sampled_from(TOKENS)) + " " + text[a:]
        elif edit == "duplicate":
            text = text[:a] + text[a:b] * 2 + text[b:]
        else:
            c = draw(st.integers(min_value=0, max_value=len(text)))
            text = text[:c] + text[a:b] + text[c:]
    return text


@settings(**SETTINGS)
@given(mutated_example(), worlds, sizes)
def test_mutated_examples(text, world_size, sizes):
    check(text, world_size, sizes)
