"""A stable text form of a Program: golden tests compare it, `bspfuse inspect --stage graph` prints it."""
from __future__ import annotations

from bspfuse.ir import Layout, Program, TensorType, dim_str


def _attr(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_attr(x) for x in v) + "]"
    if isinstance(v, TensorType):
        return str(v)
    if isinstance(v, Layout):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_attr(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, str):
        return v if v.replace("_", "").replace(".", "").isalnum() else repr(v)
    try:
        return dim_str(v)
    except Exception:  # pragma: no cover - any other attribute prints as Python does
        return repr(v)


HIDDEN_ATTRS = ("result_types",)  # restated by the result types themselves


def print_op(op) -> str:
    outs = ", ".join(f"%{v.name}" for v in op.outputs)
    args = ", ".join(f"%{v.name}" for v in op.inputs)
    attrs = {k: v for k, v in op.attrs.items() if k not in HIDDEN_ATTRS and v is not None}
    attr_text = " {" + ", ".join(f"{k}={_attr(v)}" for k, v in sorted(attrs.items())) + "}" if attrs else ""
    types = ", ".join(str(v.type) for v in op.outputs)
    return f"{outs} = {op.opcode}({args}){attr_text} : {types}"


def print_program(p: Program) -> str:
    world = p.world_size if p.world_size is not None else "world"
    lines = [f"program {p.name}(world={world}) {{"]
    for v in p.inputs:
        lines.append(f"  input %{v.name}: {v.type}")
    for op in p.ops:
        lines.append("  " + print_op(op))
    lines.append("  output " + ", ".join(f"%{v.name}" for v in p.outputs))
    lines.append("}")
    return "\n".join(lines)
