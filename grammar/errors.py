"""The one error the front end raises: what the user wrote, where, and why it does not work."""
from __future__ import annotations

import difflib
from typing import Iterable


class SourceError(Exception):
    """An error in a .bsp program, at `filename:line:column` (both 1-based).

    `str(err)` is the one-line message, then the source line and a caret under the column::

        sp_mlp.bsp:7:15: let h: matmul contracts a[..., H] with b[F/2, ...]: the inner dimensions differ
          let h = gelu(matmul(xg, w2))
                       ^
    """

    def __init__(self, filename: str, line: int, column: int, message: str, source: str | None = None):
        self.filename = filename
        self.line = line
        self.column = column
        self.message = message
        self.source_line = _line_of(source, line)
        super().__init__(self.header)

    @property
    def header(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}: {self.message}"

    def __str__(self) -> str:
        if self.source_line is None:
            return self.header
        # Keep tabs in the caret's indent so it lines up under the same character.
        indent = "".join(c if c == "\t" else " " for c in self.source_line[: max(self.column - 1, 0)])
        return f"{self.header}\n{self.source_line}\n{indent}^"


def _line_of(source: str | None, line: int) -> str | None:
    if source is None:
        return None
    lines = source.splitlines()
    return lines[line - 1] if 1 <= line <= len(lines) else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """'; did you mean 'gelu'?' when something close is known, else ''."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
