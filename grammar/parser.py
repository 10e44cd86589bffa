"""Text -> lark parse tree, with syntax errors turned into one-line SourceErrors."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lark import Lark, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from .errors import SourceError

GRAMMAR = Path(__file__).with_name("bspfuse.lark")

# How a message names a terminal that is a pattern rather than a fixed string.
_TERMINAL_WORDS = {"NAME": "a name", "INT": "an integer", "TILE": "a tile size such as 128x64x32",
                   "$END": "the end of the file"}


@lru_cache(maxsize=None)
def lark_parser() -> Lark:
    return Lark(GRAMMAR.read_text(encoding="utf-8"), parser="lalr", lexer="basic", propagate_positions=True,
                maybe_placeholders=True)


def parse_tree(text: str, filename: str) -> Tree:
    try:
        return lark_parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None


def _syntax_error(e: UnexpectedInput, text: str, filename: str) -> SourceError:
    line, column = getattr(e, "line", 1), getattr(e, "column", 1)
    if isinstance(e, UnexpectedToken):
        if e.token.type == "$END":
            found = "end of file"
            line, column = _end_of(text)
        else:
            found = f"'{e.token.value}'"
        expected = e.expected
    elif isinstance(e, UnexpectedCharacters):
        found = f"character {e.char!r}"
        expected = ()  # the lexer would allow any token here: listing them all helps nobody
    elif isinstance(e, UnexpectedEOF):
        found = "end of file"
        line, column = _end_of(text)
        expected = e.expected
    else:  # pragma: no cover - lark has no other UnexpectedInput today
        found, expected = "input", ()
    if not isinstance(line, int) or line < 1:
        line, column = _end_of(text)
    message = f"syntax error: unexpected {found}"
    words = sorted({_terminal_word(t) for t in expected})
    if words:
        message += "; expected " + (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0])
    if isinstance(e, UnexpectedToken) and e.token.type != "$END" and text[:e.token.start_pos].rstrip().endswith("@"):
        message += " (after @ come hints, @[fuse=push, tile=128x256x64]; multiply with matmul(a, b))"
    return SourceError(filename, line, column, message, text)


def _terminal_word(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = lark_parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if isinstance(pattern, PatternStr) else name.lower()


def _end_of(text: str) -> tuple[int, int]:
    """The position just past the last non-blank character."""
    lines = text.rstrip().split("\n")
    return len(lines), len(lines[-1]) + 1
