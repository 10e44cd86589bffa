"""Which names a program may use. User names become IR value names and, from there, names in generated
Triton and Python source, so a name is checked once here and used unescaped afterwards."""
from __future__ import annotations

import builtins
import keyword
import re

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Names the generated kernels, launchers and runtime use themselves.
GENERATED_CODE_NAMES = frozenset({
    "tl", "triton", "torch", "iris", "np", "numpy", "math", "os", "sys", "dist", "libdevice",
    "heap_bases", "rank", "world", "world_size", "pid", "program_id", "num_programs", "grid", "stream",
    "device", "dtype", "kernel", "launch", "args", "kwargs", "self", "cls", "flags", "epoch", "signal",
    "inbox", "buffers", "heap", "meta",
})
LANGUAGE_WORDS = frozenset({"program", "input", "let", "return", "sizes"})

RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) \
    | GENERATED_CODE_NAMES | LANGUAGE_WORDS


def why_reserved(name: str) -> str | None:
    """Why `name` cannot name a tensor, size or program, or None when it can."""
    if not IDENTIFIER.match(name):
        return f"'{name}' is not an identifier ([A-Za-z_][A-Za-z0-9_]*)"
    if name.startswith("__"):
        return f"'{name}' is reserved: names starting with '__' belong to generated code"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"'{name}' is reserved: it is a Python keyword"
    if name in LANGUAGE_WORDS:
        return f"'{name}' is reserved: it is a word of the language"
    if name in GENERATED_CODE_NAMES:
        return f"'{name}' is reserved: generated code uses it"
    if name in RESERVED:
        return f"'{name}' is reserved: it is a Python builtin"
    return None
