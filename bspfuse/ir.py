"""The graph IR: a small, fixed set of ops over typed values.

A `Program` is what one rank runs (per-rank shapes, like an fx graph), plus the world size and, for every
value, its *layout*: how the per-rank tensors relate to one logical tensor.

    replicated     every rank holds the same data
    sharded(d)     rank r holds the r-th slice along dim d
    partial(sum)   every rank holds a summand; the logical tensor is the sum over ranks
    local          rank-specific data with no claim about the whole (weights seen by a captured fx graph)

Collectives are split into a start and an explicit `wait`, exactly as in the BSP program, so the taxes
are visible as nodes: a collective's result is *pending* and only `wait` may read it.

Example::

    b = Builder("mlp", world_size=2)
    x = b.input("x", "bf16", (512, 1024), sharded(0))
    w = b.input("w", "bf16", (1024, 4096), local())
    xg = b.wait(b.all_gather(x, dim=0))
    y = b.matmul(xg, w)
    b.output(y)
    print(b.build())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import sympy

# ----------------------------------------------------------------------------------------------- types

DTYPES = ("f16", "bf16", "f32", "f64", "i8", "i32", "i64", "bool", "u8")
DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "i8": 1, "i32": 4, "i64": 8, "bool": 1, "u8": 1}
FLOAT_DTYPES = ("f16", "bf16", "f32", "f64")

Dim = Any  # int or sympy expression
WORLD = sympy.Symbol("world", positive=True, integer=True)


def dim(x: int | str | sympy.Expr) -> Dim:
    """Normalize a dimension: ints stay ints, strings like 'M/world' become sympy expressions."""
    if isinstance(x, bool):
        raise TypeError(f"a dimension cannot be a bool: {x!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        names = {n: sympy.Symbol(n, positive=True, integer=True) for n in _identifiers(x)}
        names["world"] = WORLD
        x = sympy.sympify(x, locals=names)
    x = sympy.simplify(x)
    return int(x) if x.is_Integer else x


def _identifiers(text: str) -> list[str]:
    import re

    return re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text)


def dim_str(d: Dim) -> str:
    return str(d).replace(" ", "")


def concrete(d: Dim, env: dict[str, int] | None = None, world_size: int | None = None) -> int:
    """The integer value of a dim, given values for its symbols."""
    if isinstance(d, int):
        return d
    subs = {sympy.Symbol(k, positive=True, integer=True): v for k, v in (env or {}).items()}
    if world_size is not None:
        subs[WORLD] = world_size
    v = sympy.sympify(d).subs(subs)
    if not v.is_number:
        raise ValueError(f"dimension {dim_str(d)} has unbound symbols {sorted(map(str, v.free_symbols))}")
    if not v.is_integer:
        raise ValueError(f"dimension {dim_str(d)} is not a whole number ({v}) for the given sizes")
    return int(v)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


@dataclass(frozen=True)
class Layout:
    kind: str  # replicated | sharded | partial | local
    dim: int | None = None  # for sharded
    reduce: str | None = None  # for partial

    def __str__(self) -> str:
        if self.kind == "sharded":
            return f"sharded({self.dim})"
        if self.kind == "partial":
            return f"partial({self.reduce})"
        return self.kind


def replicated() -> Layout:
    return Layout("replicated")


def sharded(d: int) -> Layout:
    return Layout("sharded", dim=d)


def partial(reduce: str = "sum") -> Layout:
    return Layout("partial", reduce=reduce)


def local() -> Layout:
    return Layout("local")


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]
    layout: Layout = field(default_factory=replicated)
    pending: bool = False  # the result of a collective start: only `wait` may read it

    def __str__(self) -> str:
        dims = ", ".join(dim_str(d) for d in self.shape)
        return f"{self.dtype}[{dims}] {self.layout}" + (" pending" if self.pending else "")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_(self, **kw) -> "TensorType":
        return dataclasses.replace(self, **kw)

    def numel(self, env=None, world_size=None) -> int:
        n = 1
        for d in self.shape:
            n *= concrete(d, env, world_size)
        return n

    def nbytes(self, env=None, world_size=None) -> int:
        return self.numel(env, world_size) * DTYPE_BYTES[self.dtype]


# ----------------------------------------------------------------------------------------------- graph


@dataclass(eq=False)
class Value:
    name: str
    type: TensorType
    producer: "Op | None" = None  # None for program inputs

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False)
class Op:
    opcode: str
    inputs: tuple[Value, ...]
    attrs: dict[str, Any]
    outputs: tuple[Value, ...] = ()
    origin: str | None = None  # what the user wrote: an fx node name, or file:line

    def __repr__(self) -> str:
        return f"Op({self.opcode} -> {', '.join(map(repr, self.outputs))})"


@dataclass(eq=False)
class Program:
    name: str
    world_size: int | None
    inputs: list[Value]
    ops: list[Op]
    outputs: list[Value]
    sizes: dict[str, int] = field(default_factory=dict)  # values for symbolic dims, when known

    def __str__(self) -> str:
        from bspfuse.printer import print_program

        return print_program(self)

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        for op in self.ops:
            yield from op.outputs

    def users(self) -> dict[Value, list[Op]]:
        out: dict[Value, list[Op]] = {v: [] for v in self.values()}
        for op in self.ops:
            for v in op.inputs:
                out.setdefault(v, []).append(op)
        return out

    def find(self, opcode: str) -> list[Op]:
        return [op for op in self.ops if op.opcode == opcode]

    def copy(self) -> "Program":
        """A deep copy: new Values and Ops, so a pass can rewrite without touching its input."""
        vmap: dict[Value, Value] = {}
        inputs = []
        for v in self.inputs:
            vmap[v] = Value(v.name, v.type)
            inputs.append(vmap[v])
        ops = []
        for op in self.ops:
            new = Op(op.opcode, tuple(vmap[v] for v in op.inputs), dict(op.attrs), origin=op.origin)
            outs = []
            for v in op.outputs:
                vmap[v] = Value(v.name, v.type, new)
                outs.append(vmap[v])
            new.outputs = tuple(outs)
            ops.append(new)
        return Program(self.name, self.world_size, inputs, ops, [vmap[v] for v in self.outputs], dict(self.sizes))

    def graph(self):
        """A networkx DiGraph of ops (edges follow values), for reachability and cycle checks."""
        import networkx as nx

        g = nx.DiGraph()
        for op in self.ops:
            g.add_node(op)
            for v in op.inputs:
                if v.producer is not None:
                    g.add_edge(v.producer, op)
        return g


# ----------------------------------------------------------------------------------------------- ops

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce")
POINTWISE_UNARY = ("relu", "gelu", "silu", "neg", "exp", "tanh", "sigmoid", "identity")
POINTWISE_BINARY = ("add", "sub", "mul", "div", "bias")
REDUCE_OPS = ("sum", "avg")


class IRError(Exception):
    """A malformed program: names the op and what is wrong with it."""


def _err(origin: str | None, msg: str) -> IRError:
    return IRError(f"{origin}: {msg}" if origin else msg)


def infer(opcode: str, inputs: Sequence[TensorType], attrs: dict, world_size: int | None,
          origin: str | None = None) -> list[TensorType]:
    """The result types of an op, or IRError naming what does not fit. One rule per opcode."""
    rule = _RULES.get(opcode)
    if rule is None:
        raise _err(origin, f"unknown op '{opcode}'")
    for i, t in enumerate(inputs):
        if t.pending and opcode != "wait":
            raise _err(origin, f"input {i} of {opcode} is the pending result of a collective; it needs a wait first")
    return rule(list(inputs), attrs, world_size, origin)


def _world(world_size: int | None) -> Dim:
    return world_size if world_size is not None else WORLD


def _matmul(ins, attrs, ws, origin):
    if len(ins) != 2:
        raise _err(origin, f"matmul takes 2 operands, got {len(ins)}")
    a, b = ins
    if a.rank < 2 or b.rank != 2:
        raise _err(origin, f"matmul needs a[..., M, K] and b[K, N], got {a} and {b}")
    if not dims_equal(a.shape[-1], b.shape[0]):
        raise _err(origin, f"matmul contracts a[..., {dim_str(a.shape[-1])}] with b[{dim_str(b.shape[0])}, ...]: "
                           "the inner dimensions differ")
    if a.dtype != b.dtype:
        raise _err(origin, f"matmul operands differ in dtype: {a.dtype} and {b.dtype}")
    la, lb = a.layout, b.layout
    last = a.rank - 1
    if "local" in (la.kind, lb.kind):
        layout = local()
    elif la.kind == "replicated" and lb.kind == "replicated":
        layout = replicated()
    elif la.kind == "sharded" and la.dim != last and lb.kind == "replicated":
        layout = la  # rows split: each rank multiplies its rows
    elif la.kind == "replicated" and lb.kind == "sharded" and lb.dim == 1:
        layout = sharded(last)  # columns split
    elif la.kind == "sharded" and la.dim == last and lb.kind == "sharded" and lb.dim == 0:
        layout = partial("sum")  # contraction split: summands
    elif la.kind == "partial" and lb.kind == "replicated":
        layout = la  # linear in a
    else:
        raise _err(origin, f"matmul of {la} by {lb} has no layout rule (e.g. sharded(0) x replicated -> sharded(0), "
                           f"sharded({last}) x sharded(0) -> partial(sum))")
    return [TensorType(a.dtype, tuple(a.shape[:-1]) + (b.shape[1],), layout)]


def _pointwise(ins, attrs, ws, origin):
    fn = attrs.get("fn")
    if fn in POINTWISE_UNARY:
        if len(ins) != 1:
            raise _err(origin, f"{fn} takes one operand")
        (x,) = ins
        if x.layout.kind == "partial" and fn not in ("neg", "identity"):
            raise _err(origin, f"{fn} of a partial sum is not the {fn} of the sum: reduce first")
        return [x]
    if fn in POINTWISE_BINARY:
        if len(ins) != 2:
            raise _err(origin, f"{fn} takes two operands")
        x, y = ins
        if x.dtype != y.dtype:
            raise _err(origin, f"{fn} operands differ in dtype: {x.dtype} and {y.dtype}")
        shape = _broadcast(x.shape, y.shape, fn, origin)
        lx, ly = x.layout, y.layout
        if lx == ly:
            if lx.kind == "partial" and fn in ("mul", "div"):
                raise _err(origin, f"{fn} of two partial sums is not a partial sum")
            layout = lx
        elif ly.kind == "replicated" and not (lx.kind == "partial" and fn in ("add", "sub", "bias")):
            layout = lx
        elif lx.kind == "replicated" and not (ly.kind == "partial" and fn in ("add", "sub", "bias")):
            layout = ly
        elif "local" in (lx.kind, ly.kind):
            layout = local()
        else:
            raise _err(origin, f"{fn} of {lx} and {ly}: layouts must match (or one be replicated)")
        return [TensorType(x.dtype, shape, layout)]
    raise _err(origin, f"unknown pointwise function '{fn}'")


def _broadcast(a, b, fn, origin):
    if len(b) > len(a):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if dims_equal(x, y) or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise _err(origin, f"{fn}: shapes do not broadcast ({dim_str(x)} vs {dim_str(y)})")
    return tuple(out)


def _check_dim(t: TensorType, d: int, what: str, origin):
    if not -t.rank <= d < t.rank:
        raise _err(origin, f"{what} dim {d} is out of range for a rank-{t.rank} tensor")
    return d % t.rank


def _collective_dtype(t: TensorType, opcode: str, origin):
    if t.dtype not in FLOAT_DTYPES:
        raise _err(origin, f"{opcode} of dtype {t.dtype} is not supported (supported: {', '.join(FLOAT_DTYPES)})")


def _all_gather(ins, attrs, ws, origin):
    (x,) = ins
    _collective_dtype(x, "all_gather", origin)
    d = _check_dim(x, attrs["dim"], "all_gather", origin)
    if x.layout.kind not in ("sharded", "local") or (x.layout.kind == "sharded" and x.layout.dim != d):
        raise _err(origin, f"all_gather on dim {d} needs an input sharded on dim {d}, got {x.layout}")
    shape = list(x.shape)
    shape[d] = dim(shape[d] * _world(ws)) if not isinstance(shape[d], int) or ws is None else shape[d] * ws
    return [TensorType(x.dtype, tuple(shape), replicated(), pending=True)]


def _reduce_scatter(ins, attrs, ws, origin):
    (x,) = ins
    _collective_dtype(x, "reduce_scatter", origin)
    d = _check_dim(x, attrs["dim"], "reduce_scatter", origin)
    if attrs.get("reduce", "sum") not in REDUCE_OPS:
        raise _err(origin, f"reduce_scatter reduce op '{attrs.get('reduce')}' is not one of {REDUCE_OPS}")
    if x.layout.kind not in ("partial", "local"):
        raise _err(origin, f"reduce_scatter needs a partial-sum input, got {x.layout}")
    shape = list(x.shape)
    w = _world(ws)
    if isinstance(shape[d], int) and isinstance(w, int):
        if shape[d] % w:
            raise _err(origin, f"reduce_scatter on dim {d}: size {shape[d]} is not divisible by world size {w}")
        shape[d] //= w
    else:
        shape[d] = dim(sympy.sympify(shape[d]) / w)
    return [TensorType(x.dtype, tuple(shape), sharded(d), pending=True)]


def _all_reduce(ins, attrs, ws, origin):
    (x,) = ins
    _collective_dtype(x, "all_reduce", origin)
    if attrs.get("reduce", "sum") not in REDUCE_OPS:
        raise _err(origin, f"all_reduce reduce op '{attrs.get('reduce')}' is not one of {REDUCE_OPS}")
    if x.layout.kind not in ("partial", "local"):
        raise _err(origin, f"all_reduce needs a partial-sum input, got {x.layout}")
    return [x.with_(layout=replicated(), pending=True)]


def _wait(ins, attrs, ws, origin):
    (x,) = ins
    if not x.pending:
        raise _err(origin, "wait on a value that is not the result of a collective")
    return [x.with_(pending=False)]


def _reshape(ins, attrs, ws, origin):
    (x,) = ins
    shape = tuple(dim(s) for s in attrs["shape"])
    n_in = sympy.Mul(*[sympy.sympify(s) for s in x.shape])
    n_out = sympy.Mul(*[sympy.sympify(s) for s in shape])
    if sympy.simplify(n_in - n_out) != 0:
        raise _err(origin, f"reshape from {[dim_str(s) for s in x.shape]} to {[dim_str(s) for s in shape]} "
                           "changes the number of elements")
    layout = x.layout
    if layout.kind == "sharded":
        # A sharded dim survives a reshape that keeps the dims before it and only merges or splits dims
        # after it (e.g. [S/w, B, H] -> [S/w*B, H] stays row-sharded).
        d = layout.dim
        keeps = (len(shape) > d and all(dims_equal(a, b) for a, b in zip(x.shape[:d], shape[:d]))
                 and sympy.simplify(sympy.sympify(shape[d]) / sympy.sympify(x.shape[d])).is_integer)
        layout = layout if keeps else local()
    return [TensorType(x.dtype, shape, layout)]


def _split(ins, attrs, ws, origin):
    (x,) = ins
    d = _check_dim(x, attrs["dim"], "split", origin)
    sizes = [dim(s) for s in attrs["sizes"]]
    total = sympy.Add(*[sympy.sympify(s) for s in sizes])
    if sympy.simplify(total - sympy.sympify(x.shape[d])) != 0:
        raise _err(origin, f"split sizes {[dim_str(s) for s in sizes]} do not add up to dim {d} ({dim_str(x.shape[d])})")
    outs = []
    for s in sizes:
        shape = list(x.shape)
        shape[d] = s
        layout = x.layout if x.layout.kind != "sharded" or x.layout.dim != d else local()
        outs.append(TensorType(x.dtype, tuple(shape), layout))
    return outs


def _cat(ins, attrs, ws, origin):
    if not ins:
        raise _err(origin, "cat of nothing")
    first = ins[0]
    d = _check_dim(first, attrs["dim"], "cat", origin)
    for t in ins[1:]:
        if t.dtype != first.dtype or t.rank != first.rank:
            raise _err(origin, f"cat operands differ: {first} and {t}")
        for i in range(t.rank):
            if i != d and not dims_equal(t.shape[i], first.shape[i]):
                raise _err(origin, f"cat on dim {d}: operands differ on dim {i}")
    shape = list(first.shape)
    shape[d] = dim(sympy.Add(*[sympy.sympify(t.shape[d]) for t in ins]))
    layouts = {t.layout for t in ins}
    layout = layouts.pop() if len(layouts) == 1 else local()
    return [TensorType(first.dtype, tuple(shape), layout)]


def _transpose(ins, attrs, ws, origin):
    (x,) = ins
    if x.rank != 2:
        raise _err(origin, f"transpose needs a rank-2 tensor, got {x}")
    layout = x.layout
    if layout.kind == "sharded":
        layout = sharded(1 - layout.dim)
    return [TensorType(x.dtype, (x.shape[1], x.shape[0]), layout)]


def _opaque(ins, attrs, ws, origin):
    return [TensorType(t["dtype"], tuple(dim(s) for s in t["shape"]), _parse_layout(t.get("layout", "local")))
            for t in attrs["results"]]


def _decode_partial(ins, attrs, ws, origin):
    # q [B, Hq, D], k/v [B, S, Hkv, D] (contiguous) or [blocks, page, Hkv, D] with a block table -> (O [B, Hq, D], LSE f32 [B, Hq])
    q, k, v = ins[:3]
    if q.rank != 3 or k.rank != 4 or v.rank != 4:
        raise _err(origin, f"decode_partial needs q[B, Hq, D], k and v [B, S, Hkv, D]; got {q}, {k}, {v}")
    if not dims_equal(q.shape[2], k.shape[3]):
        raise _err(origin, f"decode_partial: head dim of q ({dim_str(q.shape[2])}) and k ({dim_str(k.shape[3])}) differ")
    hq, hkv = q.shape[1], k.shape[2]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise _err(origin, f"decode_partial: {hq} query heads do not group evenly over {hkv} KV heads")
    # A KV cache split over ranks gives each rank a partial attention state: rank-specific data that
    # only merge_states turns into the answer, so its layout is `local` (replicated KV gives replicated).
    kv = {k.layout.kind, v.layout.kind}
    lay = replicated() if kv == {"replicated"} and q.layout.kind == "replicated" else local()
    B = q.shape[0]
    return [TensorType(q.dtype, (B, hq, v.shape[3]), lay), TensorType("f32", (B, hq), lay)]


def _merge_states(ins, attrs, ws, origin):
    # o [n, B, H, D], lse f32 [n, B, H] (n states to merge: splits or ranks) -> o [B, H, D], lse [B, H]
    o, lse = ins
    if o.rank != 4 or lse.rank != 3 or lse.dtype != "f32":
        raise _err(origin, f"merge_states needs o[n, B, H, D] and f32 lse[n, B, H]; got {o}, {lse}")
    return [TensorType(o.dtype, tuple(o.shape[1:]), replicated()), TensorType("f32", tuple(lse.shape[1:]), replicated())]


def _fused(ins, attrs, ws, origin):
    # A fused op keeps the result types the pass computed from the ops it replaced.
    return [TensorType(t.dtype, t.shape, t.layout) for t in attrs["result_types"]]


def _parse_layout(text: str | Layout) -> Layout:
    if isinstance(text, Layout):
        return text
    text = text.strip()
    if text in ("replicated", "local"):
        return Layout(text)
    if text.startswith("sharded(") and text.endswith(")"):
        return sharded(int(text[8:-1]))
    if text.startswith("partial(") and text.endswith(")"):
        return partial(text[8:-1])
    raise ValueError(f"unknown layout '{text}'")


parse_layout = _parse_layout

_RULES = {
    "matmul": _matmul,
    "pointwise": _pointwise,
    "all_gather": _all_gather,
    "reduce_scatter": _reduce_scatter,
    "all_reduce": _all_reduce,
    "wait": _wait,
    "reshape": _reshape,
    "split": _split,
    "cat": _cat,
    "transpose": _transpose,
    "opaque": _opaque,
    "decode_partial": _decode_partial,
    "merge_states": _merge_states,
}
FUSED_OPCODES = ("fused_allgather_matmul", "fused_matmul_reduce_scatter", "fused_matmul_allreduce", "flash_decode")
for _name in FUSED_OPCODES:
    _RULES[_name] = _fused
OPCODES = tuple(_RULES)


# ----------------------------------------------------------------------------------------------- builder


class Builder:
    """Builds a Program op by op, inferring every result type (so front ends cannot disagree on types)."""

    def __init__(self, name: str, world_size: int | None = None, sizes: dict[str, int] | None = None):
        self.program = Program(name, world_size, [], [], [], dict(sizes or {}))
        self._names: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        import re

        base = re.sub(r"[^A-Za-z0-9_]", "_", hint) or "v"
        if base[0].isdigit():
            base = "v" + base
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        taken = {v.name for v in self.program.values()}
        name = base if n == 0 else f"{base}_{n}"
        while name in taken:
            n += 1
            self._names[base] = n + 1
            name = f"{base}_{n}"
        return name

    def input(self, name: str, dtype: str, shape: Sequence, layout: Layout | str = "replicated") -> Value:
        if dtype not in DTYPES:
            raise IRError(f"input '{name}': unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
        v = Value(self.fresh(name), TensorType(dtype, tuple(dim(s) for s in shape), _parse_layout(layout)))
        self.program.inputs.append(v)
        return v

    def op(self, opcode: str, inputs: Sequence[Value], attrs: dict | None = None, names: Sequence[str] | None = None,
           origin: str | None = None) -> tuple[Value, ...]:
        attrs = dict(attrs or {})
        types = infer(opcode, [v.type for v in inputs], attrs, self.program.world_size, origin)
        op = Op(opcode, tuple(inputs), attrs, origin=origin)
        names = list(names or [])
        op.outputs = tuple(Value(self.fresh(names[i] if i < len(names) else opcode), t, op) for i, t in enumerate(types))
        self.program.ops.append(op)
        return op.outputs

    def _one(self, opcode, inputs, attrs=None, name=None, origin=None) -> Value:
        return self.op(opcode, inputs, attrs, [name] if name else None, origin)[0]

    def matmul(self, a, b, name=None, origin=None):
        return self._one("matmul", [a, b], {}, name, origin)

    def pointwise(self, fn, *xs, name=None, origin=None):
        return self._one("pointwise", list(xs), {"fn": fn}, name, origin)

    def all_gather(self, x, dim, name=None, origin=None):
        return self._one("all_gather", [x], {"dim": dim}, name, origin)

    def reduce_scatter(self, x, dim, reduce="sum", name=None, origin=None):
        return self._one("reduce_scatter", [x], {"dim": dim, "reduce": reduce}, name, origin)

    def all_reduce(self, x, reduce="sum", name=None, origin=None):
        return self._one("all_reduce", [x], {"reduce": reduce}, name, origin)

    def wait(self, x, name=None, origin=None):
        return self._one("wait", [x], {}, name, origin)

    def reshape(self, x, shape, name=None, origin=None):
        return self._one("reshape", [x], {"shape": tuple(shape)}, name, origin)

    def output(self, *vs: Value) -> None:
        self.program.outputs.extend(vs)

    def build(self, verify: bool = True) -> Program:
        if verify:
            from bspfuse.verify import verify as _verify

            _verify(self.program)
        return self.program
