"""The verifier: runs after every pass. Types, shapes, layouts, single definition, acyclic, pending values."""
from __future__ import annotations

from bspfuse.ir import IRError, Program, infer


class VerifyError(IRError):
    pass


def verify(p: Program) -> Program:
    """Check every invariant of `p`; raise VerifyError naming the first broken one. Returns `p`."""
    defined: set[int] = set()
    names: dict[str, object] = {}

    def define(v, where):
        if id(v) in defined:
            raise VerifyError(f"{where}: %{v.name} is defined twice")
        if v.name in names:
            raise VerifyError(f"{where}: two values are named %{v.name}")
        defined.add(id(v))
        names[v.name] = v

    for v in p.inputs:
        if v.producer is not None:
            raise VerifyError(f"input %{v.name} claims a producer")
        define(v, "inputs")
    for i, op in enumerate(p.ops):
        where = f"op {i} ({op.opcode}{', from ' + op.origin if op.origin else ''})"
        for v in op.inputs:
            if id(v) not in defined:
                raise VerifyError(f"{where}: uses %{v.name} before it is defined (a cycle or a dangling value)")
        try:
            expected = infer(op.opcode, [v.type for v in op.inputs], op.attrs, p.world_size, op.origin)
        except IRError as e:
            raise VerifyError(f"{where}: {e}") from None
        if len(expected) != len(op.outputs):
            raise VerifyError(f"{where}: has {len(op.outputs)} results, its rule gives {len(expected)}")
        for v, t in zip(op.outputs, expected):
            if v.producer is not op:
                raise VerifyError(f"{where}: result %{v.name} does not point back at its op")
            if v.type != t:
                raise VerifyError(f"{where}: %{v.name} is typed {v.type}, the rule gives {t}")
            define(v, where)
    for v in p.outputs:
        if id(v) not in defined:
            raise VerifyError(f"output %{v.name} is not defined")
        if v.type.pending:
            raise VerifyError(f"output %{v.name} is a collective's pending result: it needs a wait")
    for v, users in p.users().items():
        if v.type.pending:
            bad = [u for u in users if u.opcode != "wait"]
            if bad:
                raise VerifyError(f"%{v.name} is pending but read by {bad[0].opcode}: only wait may read it")
    return p
