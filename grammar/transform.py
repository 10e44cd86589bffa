"""Parse tree -> graph IR, through `bspfuse.ir.Builder` (so the front end and the IR cannot disagree on types).

One method per grammar rule or alias, named like the rule and like the IR op it makes (`add`, `neg`,
`call` dispatching on the op name). Nested calls become single-assignment ops named after the statement
(`let h = gelu(matmul(x, w))` gives `%h_matmul` then `%h`). A collective the program does not wait for
itself (`wait(p)`) gets its wait here, so the IR always holds start + wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from lark import Token, Tree

from bspfuse import ir
from bspfuse.ir import (COLLECTIVES, DTYPES, POINTWISE_BINARY, POINTWISE_UNARY, REDUCE_OPS, WORLD, Builder,
                        IRError, Layout, Program, Value, dim_str)

from .errors import SourceError, did_you_mean
from .names import why_reserved

REQUIRED = object()
HINT_MODES = ("pull", "push", "auto", "off")
FLASH_DECODE_STAGES = (0, 1, 2, 3)
LAYOUTS = ("sharded", "replicated", "partial", "local")


@dataclass(frozen=True)
class Signature:
    """What a call takes: its tensor operands by name (None: one or more), keyword arguments as
    {name: (kind 'int' | 'name', default or REQUIRED)}, and the attribute a `[d0, d1, ...]` list fills."""

    operands: tuple[str, ...] | None = ("x",)
    kwargs: dict = field(default_factory=dict)
    shape: str | None = None

    def usage(self, op: str) -> str:
        args = list(self.operands) if self.operands is not None else ["a", "b", "..."]
        if self.shape:
            args.append("[d0, d1, ...]")
        args += [f"{k}=..." if d is REQUIRED else f"{k}={d}" for k, (_, d) in self.kwargs.items()]
        return f"{op}({', '.join(args)})"


_DIM = {"dim": ("int", REQUIRED)}
_REDUCE = {"reduce": ("name", "sum")}
SIGNATURES = {
    "matmul": Signature(("a", "b")),
    "all_gather": Signature(("x",), _DIM),
    "reduce_scatter": Signature(("x",), {**_DIM, **_REDUCE}),
    "all_reduce": Signature(("x",), _REDUCE),
    "wait": Signature(("x",)),
    "reshape": Signature(("x",), shape="shape"),
    "transpose": Signature(("x",)),
    "split": Signature(("x",), _DIM, shape="sizes"),
    "cat": Signature(None, _DIM),
    "decode_partial": Signature(("q", "k", "v")),
    "merge_states": Signature(("o", "lse")),
    **{fn: Signature(("x",)) for fn in POINTWISE_UNARY},
    **{fn: Signature(("x", "y")) for fn in POINTWISE_BINARY},
}
POINTWISE = POINTWISE_UNARY + POINTWISE_BINARY
MAX_DEPTH = 100  # nesting of expressions and dimensions; deeper is a typo or a generated file


def _size_symbol(name: str) -> sympy.Symbol:
    return WORLD if name == "world" else sympy.Symbol(name, positive=True, integer=True)


class ProgramBuilder:
    """Builds one verified Program from the parse tree of one `program { ... }`."""

    def __init__(self, text: str, filename: str, world_size: int | None = None, sizes: dict | None = None):
        self.text = text
        self.filename = filename
        self.world_arg = world_size
        self.sizes_arg = dict(sizes or {})
        self.stmt: str | None = None  # the statement being built, as messages name it ("let h")
        self.stmt_node = None
        self.hints: dict = {}
        self.base = "v"  # intermediates of the current statement are named base_op
        self.values: dict[str, Value] = {}
        self.taken: set[str] = set()
        self.depth = 0

    # ------------------------------------------------------------------------------------------ helpers

    def pos(self, node) -> tuple[int, int]:
        if isinstance(node, Token) and node.line is not None:
            return node.line, node.column
        if isinstance(node, Tree) and not node.meta.empty:
            return node.meta.line, node.meta.column
        if self.stmt_node is not None and node is not self.stmt_node:
            return self.pos(self.stmt_node)
        return 1, 1

    def error(self, node, message: str) -> SourceError:
        line, column = self.pos(node)
        prefix = f"{self.stmt}: " if self.stmt else ""
        return SourceError(self.filename, line, column, prefix + message, self.text)

    def origin(self, node) -> str:
        line, column = self.pos(node)
        return f"{self.filename}:{line}:{column}"

    def written(self, node) -> str:
        """What the user wrote for a node, as one line."""
        if isinstance(node, Token):
            return str(node)
        if isinstance(node, Tree) and not node.meta.empty:
            return " ".join(self.text[node.meta.start_pos:node.meta.end_pos].split())
        return "?"

    def fresh(self, base: str) -> str:
        """A name no user name and no earlier intermediate has: base, base_1, base_2, ..."""
        name, n = base, 0
        while name in self.taken or name in self.declared:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name

    def check_new_name(self, tok: Token, what: str) -> None:
        name = str(tok)
        reason = why_reserved(name)
        if reason:
            raise self.error(tok, reason)
        if name in self.symbols or name in self.size_values:
            raise self.error(tok, f"'{name}' is a size; a {what} needs another name")
        if name in self.values:
            raise self.error(tok, f"'{name}' is already defined at line {self.values_at[name]}: "
                                  "a name is assigned once")

    def begin(self, label: str, node) -> None:
        self.stmt, self.stmt_node, self.hints = label, node, {}

    # ------------------------------------------------------------------------------------------ program

    def build(self, tree: Tree) -> Program:
        (program,) = tree.children
        return self.program(program)

    def program(self, tree: Tree) -> Program:
        name, *rest = tree.children
        self.header = name
        part = {c.data: c for c in rest if isinstance(c, Tree) and c.data in ("params", "sizes")}
        statements = [c for c in rest if isinstance(c, Tree) and c.data in ("input", "let", "output")]
        reason = why_reserved(str(name))
        if reason:
            raise self.error(name, reason)
        self.world = self.params(part.get("params"))
        self.size_values = self.sizes(part.get("sizes"))
        self.scan(tree, statements)
        self.b = Builder(str(name), self.world, self.size_values)
        returned = None
        for st in statements:
            if returned is not None:
                self.stmt = None
                raise self.error(st, f"statement after the return at line {returned.meta.line}: "
                                     "return comes last")
            getattr(self, st.data)(st)
            if st.data == "output":
                returned = st
        if returned is None:
            self.stmt = None
            line, column = tree.meta.end_line, max(tree.meta.end_column - 1, 1)
            raise SourceError(self.filename, line, column, f"program {name} has no return", self.text)
        self.stmt = None
        return self.b.build()

    def params(self, tree: Tree | None) -> int | None:
        world, seen = None, set()
        for p in tree.children if tree is not None else ():
            if p is None:
                continue
            pname, value = p.children
            if pname != "world":
                raise self.error(pname, f"unknown parameter '{pname}': a program takes only world, "
                                        f"e.g. program {self.header}(world = 2)")
            if pname in seen:
                raise self.error(pname, "world is given twice")
            seen.add(str(pname))
            if value is not None:
                world = int(value)
                if world < 1:
                    raise self.error(value, f"world = {world}: the world size must be at least 1")
        if self.world_arg is not None:
            w = self.world_arg
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise self.error(self.header, f"world size {w!r} given to the compiler must be a positive integer")
            world = w
        return world

    def sizes(self, tree: Tree | None) -> dict[str, int]:
        values: dict[str, int] = {}
        self.size_tokens: dict[str, Token] = {}
        for s in tree.children if tree is not None else ():
            if s is None:
                continue
            sname, value = s.children
            if sname == "world":
                raise self.error(sname, f"world is set in the header: program {self.header}(world = 2)")
            reason = why_reserved(str(sname))
            if reason:
                raise self.error(sname, reason)
            if sname in values:
                raise self.error(sname, f"size {sname} is bound twice")
            if int(value) < 1:
                raise self.error(value, f"size {sname} = {value} must be at least 1")
            values[str(sname)] = int(value)
            self.size_tokens[str(sname)] = sname
        for k, v in self.sizes_arg.items():
            if k == "world":
                raise self.error(self.header, "world is not a size: pass the world size on its own "
                                              "(world_size, --world)")
            if not isinstance(k, str) or why_reserved(k):
                raise self.error(self.header, f"size name {k!r} given to the compiler is not a valid size name")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self.error(self.header, f"size {k}={v!r} given to the compiler must be a positive integer")
            values[k] = v
        return values

    def scan(self, tree: Tree, statements: list[Tree]) -> None:
        """What the whole program says before any statement is built: its size symbols, its names, and
        which collectives it waits for itself."""
        self.symbols: dict[str, Token] = {}
        for t in tree.iter_subtrees_topdown():
            if t.data == "dim_symbol" and t.children[0] != "world":
                self.symbols.setdefault(str(t.children[0]), t.children[0])
        for s, tok in self.symbols.items():
            reason = why_reserved(s)
            if reason:
                raise self.error(tok, reason)
        for s in self.size_values:
            if s not in self.symbols:
                known = ", ".join(self.symbols) or "none"
                if s in self.size_tokens:
                    raise self.error(self.size_tokens[s], f"size {s} is bound but no shape uses it "
                                                          f"(the shapes use: {known})")
                raise self.error(self.header, f"size {s} given to the compiler is not a dimension of program "
                                              f"{self.header} (its dimensions: {known})")
        self.env: dict | None = None  # symbol -> value, when every dimension is a known number
        if self.size_values:
            for s, tok in self.symbols.items():
                if s not in self.size_values:
                    raise self.error(tok, f"size {s} has no value: bind it in the header, "
                                          f"sizes ({', '.join([*self.size_values, s + ' = ...'])})")
            if self.world is None:
                raise self.error(self.header, f"the world size is unknown: write program {self.header}(world = 2) "
                                              "or give it to the compiler")
        if self.world is not None and all(s in self.size_values for s in self.symbols):
            self.env = {_size_symbol(s): v for s, v in self.size_values.items()}

        self.declared: dict[str, Token] = {}
        for st in statements:
            if st.data == "input":
                tokens = [st.children[0]]
            elif st.data == "let":
                tokens = st.children[0].children
            else:
                tokens = []
            for tok in tokens:
                self.declared.setdefault(str(tok), tok)
        self.waited: set[str] = set()
        for call in tree.find_data("call"):
            args = [a for a in call.children[1:] if a is not None]
            if call.children[0] == "wait" and args and isinstance(args[0], Tree) and args[0].data == "ref":
                self.waited.add(str(args[0].children[0]))
        self.values_at: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ statements

    def input(self, tree: Tree) -> None:
        name, tensor_type = tree.children
        self.begin(f"input {name}", tree)
        self.check_new_name(name, "tensor")
        dtype, *dims, layout = tensor_type.children
        dims = [d for d in dims if d is not None]
        if dtype not in DTYPES:
            raise self.error(dtype, f"unknown dtype '{dtype}'{did_you_mean(str(dtype), DTYPES)} "
                                    f"(dtypes: {', '.join(DTYPES)})")
        raw = [self.dim(d) for d in dims]
        shape = [self.finish_dim(r, d) for r, d in zip(raw, dims)]
        lay = self.layout(layout, len(shape))
        if lay.kind == "sharded":
            for i, (r, d) in enumerate(zip(raw, dims)):
                if i != lay.dim and WORLD in r.free_symbols:
                    raise self.error(d, f"dim {i} ({self.written(d)}) depends on world but the layout is "
                                        f"sharded({lay.dim}): a per-rank shape divides only its sharded dim")
        value = self.b.input(str(name), str(dtype), shape, lay)
        self.taken.add(value.name)
        self.bind(name, value)

    def let(self, tree: Tree) -> None:
        targets, expr, hints = tree.children
        names = [str(t) for t in targets.children]
        self.begin("let " + ", ".join(names), tree)
        for i, tok in enumerate(targets.children):
            self.check_new_name(tok, "tensor")
            if str(tok) in names[:i]:
                raise self.error(tok, f"'{tok}' is bound twice in one let")
        self.hints = self.hint_attrs(hints)
        self.base = names[0]
        n_ops = len(self.b.program.ops)
        values = self.expr(expr, names, pending_ok=len(names) == 1 and names[0] in self.waited)
        if hints is not None and len(self.b.program.ops) == n_ops:
            raise self.error(hints, f"hints need an op to apply to, and {self.written(expr)} makes none")
        if len(values) != len(names):
            what = self.written(expr.children[0]) if expr.data == "call" else self.written(expr)
            raise self.error(expr, f"{what} gives {_count(len(values), 'result')} but {_count(len(names), 'name')} "
                                   f"{'is' if len(names) == 1 else 'are'} bound")
        for tok, v in zip(targets.children, values):
            self.taken.add(v.name)
            self.bind(tok, v)

    def output(self, tree: Tree) -> None:
        self.begin("return", tree)
        self.base = "out"
        outs: list[Value] = []
        for e in tree.children:
            names = None if e.data == "ref" else [self.fresh("out")]
            v = self.one(e, names)
            if v.type.pending:
                raise self.error(e, f"{self.written(e)} is the pending result of a collective: "
                                    f"return wait({self.written(e)})")
            if v in outs:
                raise self.error(e, f"{self.written(e)} is returned twice")
            outs.append(v)
        self.b.output(*outs)

    def bind(self, tok: Token, value: Value) -> None:
        self.values[str(tok)] = value
        self.values_at[str(tok)] = tok.line

    def hint_attrs(self, tree: Tree | None) -> dict:
        attrs: dict = {}
        for h in tree.children if tree is not None else ():
            if h is None:
                continue
            key, value = h.children
            if key == "fuse":
                if value.type != "NAME" or value not in HINT_MODES:
                    raise self.error(value, f"fuse={value}: the mode is one of {', '.join(HINT_MODES)}")
                attr, v = "hint_mode", str(value)
            elif key == "tile":
                if value.type == "NAME":
                    raise self.error(value, f"tile={value}: write the tile as sizes, e.g. tile=128x256x64")
                v = tuple(int(x) for x in value.split("x"))
                if len(v) > 3:
                    raise self.error(value, f"tile={value}: at most three sizes (MxNxK)")
                if any(x < 1 or x & (x - 1) for x in v):
                    raise self.error(value, f"tile={value}: tile sizes are powers of two")
                attr = "hint_tile"
            elif key == "stage":  # the Flash Decode stage (passes/fuse_decode.py reads `stage`)
                if value.type != "INT" or int(value) not in FLASH_DECODE_STAGES:
                    raise self.error(value, f"stage={value}: the Flash Decode stage is one of 0, 1, 2, 3")
                attr, v = "stage", int(value)
            else:
                raise self.error(key, f"unknown hint '{key}'{did_you_mean(str(key), ('fuse', 'tile', 'stage'))} "
                                      "(hints: fuse=pull|push|auto|off, tile=MxNxK, stage=0..3)")
            if attr in attrs:
                raise self.error(key, f"hint {key} is given twice")
            attrs[attr] = v
        return attrs

    def layout(self, tree: Tree | None, rank: int) -> Layout:
        if tree is None:
            return ir.replicated()
        name, arg = tree.children
        if name == "sharded":
            if arg is None:
                raise self.error(name, "sharded needs the dim it splits, e.g. sharded(0)")
            d = self.int_of(arg)
            if d is None:
                raise self.error(arg, f"sharded({arg}): the dim is an integer, e.g. sharded(0)")
            if not -rank <= d < rank:
                raise self.error(arg, f"sharded({d}) is out of range for a rank-{rank} tensor")
            return ir.sharded(d % rank)
        if name == "partial":
            if arg is None:
                return ir.partial("sum")
            if not isinstance(arg, Token) or arg.type != "NAME" or arg not in REDUCE_OPS:
                raise self.error(arg, f"partial({self.written(arg)}): the reduction is one of "
                                      f"{', '.join(REDUCE_OPS)}")
            return ir.partial(str(arg))
        if name in ("replicated", "local"):
            if arg is not None:
                raise self.error(arg, f"{name} takes no argument")
            return Layout(str(name))
        raise self.error(name, f"unknown layout '{name}'{did_you_mean(str(name), LAYOUTS)} "
                               "(layouts: sharded(d), replicated, partial, local)")

    def int_of(self, node) -> int | None:
        if isinstance(node, Token) and node.type == "INT":
            return int(node)
        if isinstance(node, Tree) and node.data == "negative_int":
            return -int(node.children[0])
        return None

    # ------------------------------------------------------------------------------------------ expressions

    def expr(self, tree: Tree, names: list[str] | None = None, pending_ok: bool = False) -> tuple[Value, ...]:
        """The values of an expression; `names` name the values of its outermost op."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(tree, f"expression nested more than {MAX_DEPTH} deep: split it into lets")
        try:
            return getattr(self, tree.data)(tree, names, pending_ok)
        finally:
            self.depth -= 1

    def one(self, tree: Tree, names: list[str] | None = None, pending_ok: bool = False) -> Value:
        values = self.expr(tree, names, pending_ok)
        if len(values) != 1:
            op = self.written(tree.children[0]) if tree.data == "call" else self.written(tree)
            names = ", ".join("abcdefgh"[:len(values)]) if len(values) <= 8 else "a, b, ..."
            raise self.error(tree, f"{op} gives {len(values)} results: bind them first, let {names} = {op}(...)")
        return values[0]

    def ref(self, tree: Tree, names, pending_ok) -> tuple[Value, ...]:
        (tok,) = tree.children
        name = str(tok)
        if name in self.values:
            return (self.values[name],)
        if name in self.declared:
            raise self.error(tok, f"'{name}' is used before its definition at line {self.declared[name].line}")
        if name in self.symbols or name in self.size_values or name == "world":
            raise self.error(tok, f"'{name}' is a size, not a tensor")
        raise self.error(tok, f"'{name}' is not defined{did_you_mean(name, self.values)}")

    def add(self, tree, names, pending_ok):
        return self.pointwise("add", tree, names)

    def sub(self, tree, names, pending_ok):
        return self.pointwise("sub", tree, names)

    def mul(self, tree, names, pending_ok):
        return self.pointwise("mul", tree, names)

    def div(self, tree, names, pending_ok):
        return self.pointwise("div", tree, names)

    def neg(self, tree, names, pending_ok):
        return self.pointwise("neg", tree, names)

    def pointwise(self, fn: str, tree: Tree, names) -> tuple[Value, ...]:
        ins = [self.one(c) for c in tree.children]
        return self.make("pointwise", ins, {"fn": fn}, names, tree, fn)

    def call(self, tree: Tree, names, pending_ok) -> tuple[Value, ...]:
        name, *args = tree.children
        op = str(name)
        sig = SIGNATURES.get(op)
        if sig is None:
            hint = did_you_mean(op, SIGNATURES) or f" (ops: {', '.join(SIGNATURES)})"
            raise self.error(name, f"unknown op '{op}'{hint}")
        tensors, shape, kwargs = [], None, {}
        for a in args:
            if a is None:
                continue
            if a.data == "kwarg":
                key, value = a.children
                if key not in sig.kwargs:
                    raise self.error(key, f"{op} takes no argument '{key}'{did_you_mean(str(key), sig.kwargs)}; "
                                          f"usage: {sig.usage(op)}")
                if key in kwargs:
                    raise self.error(key, f"{key} is given twice")
                kwargs[str(key)] = self.kwarg(value, sig.kwargs[str(key)][0], key)
            elif a.data == "shape":
                if sig.shape is None or shape is not None:
                    raise self.error(a, f"{op} takes no shape list here; usage: {sig.usage(op)}")
                shape = a
            else:
                if kwargs:
                    raise self.error(a, f"tensor operand {self.written(a)} after a keyword argument; "
                                        f"usage: {sig.usage(op)}")
                tensors.append(a)
        if (len(tensors) != len(sig.operands)) if sig.operands is not None else not tensors:
            want = _count(len(sig.operands), "tensor operand") if sig.operands is not None else "tensor operands"
            raise self.error(name, f"{op} takes {want}, got {len(tensors)}; usage: {sig.usage(op)}")
        if sig.shape and shape is None:
            raise self.error(name, f"{op} needs a shape list; usage: {sig.usage(op)}")
        for key, (_, default) in sig.kwargs.items():
            if key not in kwargs:
                if default is REQUIRED:
                    raise self.error(name, f"{op} needs {key}=...; usage: {sig.usage(op)}")
                kwargs[key] = default

        ins = [self.one(t, pending_ok=op == "wait") for t in tensors]
        attrs = dict(kwargs)
        if "dim" in attrs and -ins[0].type.rank <= attrs["dim"] < 0:
            attrs["dim"] += ins[0].type.rank
        if sig.shape:
            dims = [d for d in shape.children if d is not None]
            attrs[sig.shape] = tuple(self.finish_dim(self.dim(d), d) for d in dims)
        if op in POINTWISE:
            return self.make("pointwise", ins, {"fn": op, **attrs}, names, tree, op)
        if op in COLLECTIVES and not pending_ok:
            # A collective the program does not wait for itself: start + wait, the wait named as the user named it.
            final = names or [self.fresh(f"{self.base}_{op}")]
            (start,) = self.make(op, ins, attrs, [self.fresh(f"{final[0]}_start")], tree, op)
            return self.make("wait", [start], {}, final, tree, "wait", hinted=False)
        return self.make(op, ins, attrs, names, tree, op)

    def kwarg(self, value, kind: str, key: Token):
        if kind == "int":
            n = self.int_of(value)
            if n is None:
                raise self.error(value, f"{key}={self.written(value)}: {key} is an integer")
            return n
        if not isinstance(value, Token) or value.type != "NAME":
            raise self.error(value, f"{key}={self.written(value)}: {key} is a name, e.g. {key}=sum")
        return str(value)

    def make(self, opcode: str, ins: list[Value], attrs: dict, names: list[str] | None, node, label: str,
             hinted: bool = True):
        """Add one op through the Builder, with the statement's hints unless `hinted` is False (a wait the
        front end adds has no kernel to tune); an IRError becomes a SourceError at `node`."""
        names = names or [self.fresh(f"{self.base}_{label}")]
        for v in ins:
            if v.type.pending and opcode != "wait":
                raise self.error(node, f"{label} reads {v.name}, the pending result of {v.producer.opcode}: "
                                       f"wait({v.name}) first")
        try:
            outs = self.b.op(opcode, ins, {**attrs, **self.hints} if hinted else attrs, names)
        except IRError as e:
            raise self.error(node, str(e)) from None
        outs[0].producer.origin = self.origin(node)
        for v in outs:
            self.taken.add(v.name)
            if self.env is not None:
                self.check_concrete(v.type.shape, node, f"{label} gives a shape whose")
        return outs

    # ------------------------------------------------------------------------------------------ dimensions

    def dim(self, tree: Tree) -> sympy.Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(tree, f"dimension nested more than {MAX_DEPTH} deep")
        try:
            return getattr(self, tree.data)(tree)
        finally:
            self.depth -= 1

    def dim_int(self, tree: Tree) -> sympy.Expr:
        return sympy.Integer(int(tree.children[0]))

    def dim_symbol(self, tree: Tree) -> sympy.Expr:
        return _size_symbol(str(tree.children[0]))

    def dim_add(self, tree: Tree) -> sympy.Expr:
        a, b = tree.children
        return self.dim(a) + self.dim(b)

    def dim_sub(self, tree: Tree) -> sympy.Expr:
        a, b = tree.children
        return self.dim(a) - self.dim(b)

    def dim_mul(self, tree: Tree) -> sympy.Expr:
        a, b = tree.children
        return self.dim(a) * self.dim(b)

    def dim_div(self, tree: Tree) -> sympy.Expr:
        a, b = tree.children
        den = self.dim(b)
        if den == 0:
            raise self.error(b, f"division by zero in the dimension {self.written(tree)}")
        return self.dim(a) / den

    def finish_dim(self, raw: sympy.Expr, node: Tree):
        """A dimension as the IR holds it (world replaced by its value when known), checked positive and whole."""
        d = sympy.simplify(raw.subs(WORLD, self.world) if self.world is not None else raw)
        if d.is_positive is False or d.is_integer is False:
            raise self.error(node, f"dimension {self.written(node)} = {dim_str(d)} is not a positive whole number")
        if self.env is not None:
            self.check_concrete((d,), node, f"dimension {self.written(node)}", index=False)
        return int(d) if d.is_Integer else d

    def check_concrete(self, shape, node, what: str, index: bool = True) -> None:
        for i, d in enumerate(shape):
            if isinstance(d, int):
                v = sympy.Integer(d)
            else:
                v = sympy.sympify(d).subs(self.env)
            if not (v.is_Integer and v > 0):
                where = f"{what} dim {i} is" if index else f"{what} is"
                sizes = ", ".join(f"{k}={n}" for k, n in self.size_values.items())
                raise self.error(node, f"{where} {dim_str(d)} = {v} for world={self.world}"
                                       f"{', ' + sizes if sizes else ''}: not a positive whole number")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
