"""The bspfuse source language: a few lines of text -> a verified graph IR Program.

A program names its world size and sizes, declares per-rank inputs with layouts, and computes with
single-assignment `let`s; a collective written without a `wait` gets one::

    program sp_mlp(world = 2) sizes (T = 256, H = 128, F = 256) {
      input x  : bf16[T/world, H] sharded(0)
      input w1 : bf16[H, F/world] sharded(1)
      input w2 : bf16[F/world, H] sharded(0)
      let xg = all_gather(x, dim=0)
      let h  = gelu(matmul(xg, w1))
      let y  = reduce_scatter(matmul(h, w2), dim=0) @[fuse=push, tile=128x128x64]
      return y
    }

Example::

    from bspfuse.grammar import SourceError, parse_file
    try:
        program = parse_file("examples/sp_mlp.bsp", world_size=4)
    except SourceError as e:
        print(e)  # examples/sp_mlp.bsp:7:15: let h: ... then the line and a caret

The grammar is `bspfuse.lark`; `transform.py` turns its parse tree into IR.
"""
from __future__ import annotations

from os import PathLike

from bspfuse.ir import Program

from .errors import SourceError
from .parser import parse_tree
from .transform import ProgramBuilder

__all__ = ["SourceError", "parse", "parse_file"]


def parse(text: str, filename: str = "<string>", world_size: int | None = None,
          sizes: dict | None = None) -> Program:
    """Parse one program into verified graph IR; `world_size` and `sizes` override the program's own."""
    tree = parse_tree(text, filename)
    builder = ProgramBuilder(text, filename, world_size, sizes)
    try:
        return builder.build(tree)
    except RecursionError:
        raise builder.error(builder.stmt_node, "expression nested too deeply") from None


def parse_file(path: str | PathLike, world_size: int | None = None, sizes: dict | None = None) -> Program:
    """`parse` the file at `path`; messages name the path as given."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError(str(path), line, column, "the file is not UTF-8 text") from None
    return parse(text, str(path), world_size, sizes)
