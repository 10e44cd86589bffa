"""torch.fx front end: a GraphModule with functional collectives -> one graph-IR Program.

The fx graph is what one rank runs (aten ops on per-rank shapes, `meta["val"]` on every node), with
collectives written as `_c10d_functional.<collective>` + `wait_tensor`. Capture maps it node by node:

    all_gather_into_tensor -> wait_tensor [-> split -> getitem x W -> cat(d)]  => all_gather(dim=d) + wait
    [split(d) -> getitem x W -> cat(0) ->] reduce_scatter_tensor -> wait_tensor => reduce_scatter(dim=d) + wait
    all_reduce -> wait_tensor                                                  => all_reduce + wait
    mm / matmul                                                                => matmul
    addmm(bias, a, b) / linear(x, w, bias)                                     => [transpose +] matmul + bias
    t / permute([1, 0]) / transpose(0, 1) of a 2-D tensor                      => transpose
    view / _unsafe_view / reshape                                              => reshape
    relu gelu silu sigmoid tanh neg exp, add sub mul div (two tensors)         => pointwise
    anything else                                                              => opaque (types from meta["val"])

Placeholders become inputs: one that feeds an all_gather is `sharded(gather dim)`, every other one `local`.

Example::

    with fake_process_group(4) as pg, FakeTensorMode():
        gm = make_fx(f)(torch.empty(64, 32, dtype=torch.bfloat16), ...)
    print(capture(gm))
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
import torch.fx

from bspfuse.ir import Builder, IRError, Layout, Program, Value, dim, dim_str, dims_equal, local, sharded


class CaptureError(Exception):
    """A graph that capture cannot translate: one line naming the fx node, its op and shapes."""


DTYPE_NAMES = {
    torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64",
    torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "bool", torch.uint8: "u8",
}

AG, RS, AR, WAIT = ("_c10d_functional.all_gather_into_tensor", "_c10d_functional.reduce_scatter_tensor",
                    "_c10d_functional.all_reduce", "_c10d_functional.wait_tensor")
UNARY = {"aten.relu": "relu", "aten.gelu": "gelu", "aten.silu": "silu", "aten.sigmoid": "sigmoid",
         "aten.tanh": "tanh", "aten.neg": "neg", "aten.exp": "exp"}
BINARY = {"aten.add": "add", "aten.sub": "sub", "aten.mul": "mul", "aten.div": "div"}
VIEWS = ("aten.view", "aten._unsafe_view", "aten.reshape")
WORLD_SIZE_META = "bspfuse_world_size"  # gm.meta key: the group size `trace` traced under


# ------------------------------------------------------------------------------------------ public API


def capture(gm: torch.fx.GraphModule, world_size: int | None = None, name: str | None = None,
            group: str | None = None) -> Program:
    """Translate an fx graph (from make_fx / AOT autograd, with functional collectives) into a Program.

    world_size defaults to the group size the collectives record; a different `world_size`, or
    collectives over groups of different sizes, is a CaptureError. all_reduce records no size: a graph
    of only all_reduces takes `world_size`, else the size `trace` recorded, else the live group's.
    A graph with collectives over several process groups needs `group`: the one whose collectives become
    IR collectives; the others stay opaque ops (e.g. TP on one mesh dimension, data parallel on another).

    Example::

        program = capture(gm)          # gm: all_gather_into_tensor -> wait_tensor -> mm
        print(program)                 # all_gather + wait + matmul
    """
    return capture_with_nodes(gm, world_size, name, group)[0]


def capture_with_nodes(gm: torch.fx.GraphModule, world_size: int | None = None, name: str | None = None,
                       group: str | None = None) -> tuple[Program, dict[str, list[torch.fx.Node]]]:
    """`capture`, plus where each IR value came from: value name -> the fx nodes that compute it, in graph
    order (more than one where capture folded a node into another, e.g. a gather's split/cat into its
    wait). This is how a rewrite of the Program finds its way back into the fx graph."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise CaptureError(f"capture needs a torch.fx.GraphModule, got {type(gm).__name__}")
    c = _Capture(gm, world_size, name or _program_name(gm), group)
    program = c.run()
    nodes: dict[str, list[torch.fx.Node]] = {}
    for node in c.nodes:
        for v in c._values(node):
            nodes.setdefault(v.name, []).append(node)
    return program, nodes


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[Any]:
    """Make the default process group a `fake` one (no communication, CPU-only) of `world_size` ranks.

    Reuses a group that already has this size and rank; otherwise replaces a fake group of another size
    for the block and restores it afterwards. Yields the group (`dist.group.WORLD`).

    Example::

        with fake_process_group(8) as pg, FakeTensorMode():
            gm = make_fx(f)(x, w)      # f calls torch.ops._c10d_functional.* with pg.group_name
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    previous = None
    if dist.is_initialized():
        if dist.get_world_size() == world_size and dist.get_rank() == rank:
            yield dist.group.WORLD
            return
        if dist.get_backend() != "fake":
            raise CaptureError(f"a '{dist.get_backend()}' process group of {dist.get_world_size()} ranks is already "
                               f"initialized; cannot make a fake one of {world_size} ranks")
        previous = (dist.get_world_size(), dist.get_rank())
        dist.destroy_process_group()
    dist.init_process_group(backend="fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        if previous is not None:
            dist.init_process_group(backend="fake", store=FakeStore(), rank=previous[1], world_size=previous[0])


def trace(fn: Callable, example_inputs, world_size: int | None = None) -> torch.fx.GraphModule:
    """Trace `fn(*example_inputs)` with make_fx under FakeTensorMode: no GPU and no real memory.

    `fn` is a function or an nn.Module (its parameters and buffers become graph inputs named after
    them). Inputs may be real, fake or `device="meta"` tensors; only their shapes and dtypes are used.
    With `world_size`, tracing runs on a fake process group of that size (see `fake_process_group`),
    and the size is recorded on the graph for `capture`.

    Example::

        x = torch.empty(1024, 8192, dtype=torch.bfloat16, device="meta")
        gm = trace(lambda x: x @ x.t(), [x])
    """
    import inspect

    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = list(example_inputs)
    names: list[str] = []
    if isinstance(fn, torch.nn.Module):
        module = fn
        state = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        keys = list(state)
        try:
            arg_names = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            arg_names = []
        names = keys + [arg_names[i] if i < len(arg_names) else f"input{i}" for i in range(len(inputs))]
        inputs = list(state.values()) + inputs

        def fn(*flat):
            return torch.func.functional_call(module, dict(zip(keys, flat[:len(keys)])), tuple(flat[len(keys):]))

    group = fake_process_group(world_size) if world_size is not None else contextlib.nullcontext()
    with group, FakeTensorMode():
        fakes = [torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype,
                                     device="cpu" if t.is_meta else t.device) if isinstance(t, torch.Tensor) else t
                 for t in inputs]
        gm = make_fx(fn, tracing_mode="fake")(*fakes)
        recorded = world_size if world_size is not None else dist.get_world_size() if dist.is_initialized() else None
    if names and hasattr(torch.fx.Node, "_rename"):  # readable input names; cosmetic, so optional
        for node, want in zip([n for n in gm.graph.nodes if n.op == "placeholder"], names):
            node._rename(_identifier(want))
        gm.recompile()
    if recorded is not None:
        gm.meta[WORLD_SIZE_META] = recorded
    return gm


# ------------------------------------------------------------------------------------------ helpers


def _identifier(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return s if s and not s[0].isdigit() else f"p{s}"



def _program_name(gm) -> str:
    cls = type(gm).__name__
    return cls if cls.isidentifier() and cls != "GraphModule" else "captured"


def _target_name(node: torch.fx.Node) -> str:
    """'aten.mm' for an aten overload (packet name), 'getitem' for operator.getitem, else a readable name."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t.overloadpacket)
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t)
    if node.op in ("call_method", "call_module"):
        return f"{node.op}:{t}"
    return getattr(t, "__name__", str(t))


def _full_target(node: torch.fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else _target_name(node)


def _dim_of(s) -> Any:
    return int(s) if isinstance(s, int) or (hasattr(s, "node") and s.node.is_constant()) else dim(str(s))


def _shape(t: torch.Tensor) -> tuple:
    return tuple(_dim_of(s) for s in t.shape)


def _type_text(val) -> str:
    if isinstance(val, torch.Tensor):
        dtype = DTYPE_NAMES.get(val.dtype, str(val.dtype).replace("torch.", ""))
        return f"{dtype}[{', '.join(dim_str(_dim_of(s)) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_type_text(v) for v in val) + ")"
    return type(val).__name__


def _where(node: torch.fx.Node) -> str:
    """`fx node 'mm' = aten.mm.default(x_1: bf16[64, 32], w_1: bf16[32, 16])`: what the user traced."""
    args = []
    for a in torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n)[0]:
        if isinstance(a, torch.fx.Node):
            args.append(f"{a.name}: {_type_text(a.meta.get('val'))}")
        elif isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
            args.append("[" + ", ".join(x.name if isinstance(x, torch.fx.Node) else repr(x) for x in a) + "]")
        else:
            args.append(repr(a))
    return f"fx node '{node.name}' = {_full_target(node)}({', '.join(args)})"


def _origin(node: torch.fx.Node) -> str:
    """The node's name, and the module the user wrote where dynamo recorded it: `mm_3 in attention.wo`."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")  # backward: the forward's
    if not stack:
        return node.name
    # dynamo names the compiled module L['self'] (or L['args'][0], L['fn'], ...): the path below it is the user's
    path = re.sub(r"^L\['[^']+'\](\[\d+\])?\.?", "", str(list(stack.values())[-1][0]))
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path).lstrip(".")
    return f"{node.name} in {path}" if path else node.name


def _arg(node: torch.fx.Node, i: int, key: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _group(name) -> str:
    return str(getattr(name, "group_name", name))


# ------------------------------------------------------------------------------------------ pattern scan


class _Gather:
    """all_gather_into_tensor -> wait_tensor [-> split -> getitem x W -> cat(d)], recognized as one gather."""

    def __init__(self, ag, wait, dim_, result, absorbed):
        self.ag, self.wait, self.dim, self.result, self.absorbed = ag, wait, dim_, result, absorbed


class _Scatter:
    """[split(x, chunk, d) -> getitem x W -> cat(0) ->] reduce_scatter_tensor, recognized as one scatter."""

    def __init__(self, rs, source, dim_, absorbed):
        self.rs, self.source, self.dim, self.absorbed = rs, source, dim_, absorbed


def _is(node, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and _target_name(node) == name


def _split_cat_chunks(split, cat, world: int) -> bool:
    """True when `cat` concatenates exactly split's W chunks in order, and nothing else reads them."""
    pieces = cat.args[0]
    if len(pieces) != world or len(split.users) != world:
        return False
    for i, g in enumerate(pieces):
        if not (_is(g, "getitem") and g.args[0] is split and g.args[1] == i and list(g.users) == [cat]):
            return False
    return True


def _norm_dim(d: int, rank: int) -> int:
    return d % rank if rank else d


def _find_gather(ag: torch.fx.Node, world: int) -> _Gather | None:
    waits = [u for u in ag.users if _is(u, WAIT)]
    if len(ag.users) != 1 or not waits:
        return _Gather(ag, None, 0, None, set())
    wait = waits[0]
    shard = ag.args[0].meta.get("val")
    users = list(wait.users)
    if len(users) == 1 and _is(users[0], "aten.split") and isinstance(shard, torch.Tensor):
        split = users[0]
        cats = {u for g in split.users for u in g.users}
        if len(cats) == 1 and _arg(split, 2, "dim", 0) == 0 and _same_size(split.args[1], shard.shape[0]):
            cat = cats.pop()
            if _is(cat, "aten.cat") and _split_cat_chunks(split, cat, world):
                d = _norm_dim(_arg(cat, 1, "dim", 0), shard.dim())
                if d != 0:
                    return _Gather(ag, wait, d, cat, {split, cat, *split.users})
    return _Gather(ag, wait, 0, wait, set())


def _find_scatter(rs: torch.fx.Node, world: int) -> _Scatter:
    cat = rs.args[0]
    if _is(cat, "aten.cat") and _arg(cat, 1, "dim", 0) == 0 and list(cat.users) == [rs] and cat.args[0]:
        split = cat.args[0][0].args[0] if _is(cat.args[0][0], "getitem") else None
        if _is(split, "aten.split") and _split_cat_chunks(split, cat, world):
            src = split.args[0].meta.get("val")
            d = _norm_dim(_arg(split, 2, "dim", 0), src.dim()) if isinstance(src, torch.Tensor) else 0
            if d != 0 and _same_size(split.args[1], src.shape[d], world):
                return _Scatter(rs, split.args[0], d, {split, cat, *split.users})
    return _Scatter(rs, rs.args[0], 0, set())


def _size_expr(x):
    """A size as a sympy expression: an int, a SymInt, or an fx node computing one (dynamic shapes)."""
    import sympy

    x = x.meta.get("val") if isinstance(x, torch.fx.Node) else x
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return sympy.Integer(x) if isinstance(x, int) else None


def _same_size(chunk, size, times: int = 1) -> bool:
    """chunk * times == size, for static and symbolic sizes alike."""
    a, b = _size_expr(chunk), _size_expr(size)
    return a is not None and b is not None and (a * times - b).expand() == 0


def _no_op_view_source(node: torch.fx.Node) -> torch.fx.Node:
    """Walk back through views that keep the shape (DTensor graphs view a placeholder before gathering)."""
    while (_target_name(node) in VIEWS and isinstance(node.args[0], torch.fx.Node)
           and tuple(node.meta["val"].shape) == tuple(node.args[0].meta["val"].shape)):
        node = node.args[0]
    return node


# ------------------------------------------------------------------------------------------ the capture


class _Capture:
    def __init__(self, gm: torch.fx.GraphModule, world_size: int | None, name: str, group: str | None = None):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.group = group  # None: the graph's one group
        self.world = self._world_size(world_size)
        self.b = Builder(name, self.world)
        self.env: dict[torch.fx.Node, Any] = {}  # node -> Value, tuple of Values (multi-result) or None (scalar)
        self.gathers: dict[torch.fx.Node, _Gather] = {}
        self.scatters: dict[torch.fx.Node, _Scatter] = {}
        self.absorbed: set[torch.fx.Node] = set()
        self.alias: dict[torch.fx.Node, torch.fx.Node] = {}  # cat of a recognized gather -> its wait
        self.input_layouts: dict[torch.fx.Node, Layout] = {}

    # -- pre-pass: group size, collective patterns, input layouts

    def _world_size(self, requested: int | None) -> int | None:
        sizes: dict[int, torch.fx.Node] = {}
        groups: dict[str, torch.fx.Node] = {}
        for n in self.nodes:
            tn = _target_name(n) if n.op == "call_function" else ""
            if tn not in (AG, RS, AR) or not self._ours(n):
                continue
            groups.setdefault(_group(_arg(n, {AG: 2, RS: 3, AR: 2}[tn], "group_name")), n)
            if tn != AR:  # all_reduce does not record its group size
                sizes.setdefault(int(_arg(n, 1 if tn == AG else 2, "group_size")), n)
        if len(groups) > 1:
            (g1, n1), (g2, n2) = list(groups.items())[:2]
            raise CaptureError(f"{_where(n2)}: collectives over more than one process group ('{g1}' at "
                               f"'{n1.name}', '{g2}' here); pass group= to capture one of them")
        if len(sizes) > 1:
            (s1, n1), (s2, n2) = list(sizes.items())[:2]
            raise CaptureError(f"{_where(n2)}: group size {s2} differs from group size {s1} of '{n1.name}'")
        found = next(iter(sizes), None)
        if requested is not None and found is not None and requested != found:
            raise CaptureError(f"{_where(sizes[found])}: the graph's collectives use group size {found}, "
                               f"but world size {requested} was asked for")
        if requested is not None or found is not None or not groups:
            return requested if requested is not None else found
        # Only all_reduces: the size `trace` recorded, else the live group of that name.
        recorded = getattr(self.gm, "meta", {}).get(WORLD_SIZE_META)
        if recorded is not None:
            return int(recorded)
        group, node = next(iter(groups.items()))
        live = self._resolve_group_size(group)
        if live is None:
            raise CaptureError(f"{_where(node)}: the graph does not record its group size and process group "
                               f"'{group}' is not initialized here; pass world_size")
        return live

    def _ours(self, node) -> bool:
        """Whether a collective is over the captured group (the others stay opaque)."""
        if self.group is None:
            return True
        i = {AG: 2, RS: 3, AR: 2}.get(_target_name(node))
        return i is None or _group(_arg(node, i, "group_name")) == self.group

    @staticmethod
    def _resolve_group_size(group: str) -> int | None:
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group

            return _resolve_process_group(group).size()
        except Exception:  # the group lives in another process, or was destroyed: fall back to other collectives
            return None

    def _scan(self) -> None:
        world = self.world or 1
        for n in self.nodes:
            if n.op != "call_function":
                continue
            tn = _target_name(n)
            if not self._ours(n):
                continue
            if tn == AG:
                g = _find_gather(n, world)
                self.gathers[n] = g
                self.absorbed |= g.absorbed
                if g.result is not g.wait:
                    self.alias[g.result] = g.wait
                src = _no_op_view_source(n.args[0])
                if src.op == "placeholder":
                    want = sharded(g.dim)
                    self.input_layouts[src] = want if self.input_layouts.get(src, want) == want else local()
            elif tn == RS:
                s = _find_scatter(n, world)
                self.scatters[n] = s
                self.absorbed |= s.absorbed

    # -- main walk

    def run(self) -> Program:
        self._scan()
        for node in self.nodes:
            if node in self.absorbed and node not in self.alias:
                continue
            if node.op == "placeholder" or node.op == "get_attr":
                self._input(node)
            elif node.op == "output":
                self._output(node)
            elif node in self.alias:
                self.env[node] = self.env[self.alias[node]]
            else:
                self._call(node)
        try:
            return self.b.build(verify=True)
        except IRError as e:  # a capture bug rather than a user error, but still one line
            raise CaptureError(f"the captured program does not verify: {e}") from None

    def _input(self, node) -> None:
        val = node.meta.get("val")
        if val is None and node.op == "get_attr":
            val = getattr(self.gm, node.target, None)
        if val is None and node.op == "placeholder":
            raise CaptureError(f"input '{node.name}' has no meta['val']; trace with make_fx (or run "
                               "FakeTensorProp) so every node carries its type")
        if not isinstance(val, torch.Tensor):
            self.env[node] = None  # a scalar (SymInt, int): shapes already come from meta["val"]
            return
        layout = self.input_layouts.get(node, local())
        self.env[node] = self.b.input(node.name, self._dtype(node, val), _shape(val), layout)

    def _output(self, node) -> None:
        outs: list[Value] = []
        torch.fx.node.map_arg(node.args, lambda n: outs.extend(self._values(n)))
        self.b.output(*outs)

    def _values(self, n) -> list[Value]:
        v = self.env.get(n)
        if isinstance(v, Value):
            return [v]
        if isinstance(v, tuple):
            return [x for x in v if isinstance(x, Value)]
        return []

    def _call(self, node) -> None:
        if node.op != "call_function":
            self._opaque(node)
            return
        if "val" not in node.meta:
            raise CaptureError(f"{_where(node)}: has no meta['val']; trace with make_fx (or run FakeTensorProp) "
                               "so every node carries its type")
        val = node.meta["val"]
        tn = _target_name(node)
        if not isinstance(val, (torch.Tensor, list, tuple)):
            self.env[node] = None  # sym_size and other shape arithmetic: not data
            return
        handler = _HANDLERS.get(tn)
        if tn in (AG, RS, AR) and not self._ours(node):
            handler = None  # another group's collective: opaque here
        if handler is not None and handler.collective:
            self.env[node] = self._collective(node, handler)
            return
        start = len(self.b.program.ops)
        try:
            result = handler(self, node) if handler is not None else None
        except IRError:
            result = None  # the IR has no rule for this form (dtype promotion, odd layout): keep it opaque
        if result is None:
            del self.b.program.ops[start:]
            self._opaque(node)
            return
        self._check_type(node, result)
        self.env[node] = result

    def _collective(self, node, handler) -> Any:
        try:
            return handler(self, node)
        except IRError as e:
            msg = str(e)
            msg = msg[len(node.name) + 2:] if msg.startswith(node.name + ": ") else msg
            raise CaptureError(f"{_where(node)}: {msg}") from None

    def _check_type(self, node, result) -> None:
        val = node.meta["val"]
        if isinstance(result, Value) and isinstance(val, torch.Tensor):
            t = result.type
            if t.dtype != self._dtype(node, val) or len(t.shape) != val.dim() or not all(
                    dims_equal(a, b) for a, b in zip(t.shape, _shape(val))):
                raise CaptureError(f"{_where(node)}: captured as {t}, but fx records {_type_text(val)} "
                                   "(a capture bug: please report it)")

    def _dtype(self, node, val: torch.Tensor) -> str:
        if val.dtype not in DTYPE_NAMES:
            raise CaptureError(f"{_where(node)}: dtype {val.dtype} has no IR name (known: "
                               f"{', '.join(sorted(DTYPE_NAMES.values()))})")
        return DTYPE_NAMES[val.dtype]

    def _opaque(self, node) -> None:
        val = node.meta.get("val")
        if val is None:
            raise CaptureError(f"{_where(node)}: has no meta['val']; trace with make_fx (or run FakeTensorProp) "
                               "so every node carries its type")
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        inputs: list[Value] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.extend(self._values(n)))
        results = [{"dtype": self._dtype(node, t), "shape": [dim_str(d) for d in _shape(t)], "layout": "local"}
                   for t in vals if isinstance(t, torch.Tensor)]
        names = [node.name] if len(results) == 1 else [f"{node.name}_{i}" for i in range(len(results))]
        outs = iter(self.b.op("opaque", inputs, {"target": _full_target(node), "results": results}, names,
                              origin=_origin(node)))
        got = [next(outs) if isinstance(t, torch.Tensor) else None for t in vals]
        self.env[node] = tuple(got) if isinstance(val, (list, tuple)) else got[0]

    # -- handlers: one per fx op family; `None` means "keep it opaque"

    def value(self, node, i: int, key: str = "") -> Value | None:
        a = _arg(node, i, key)
        v = self.env.get(a) if isinstance(a, torch.fx.Node) else None
        return v if isinstance(v, Value) else None

    def tensor(self, node, source) -> Value:
        """The Value a collective reads; anything else is a user error."""
        v = self.env.get(source) if isinstance(source, torch.fx.Node) else None
        if not isinstance(v, Value):
            raise CaptureError(f"{_where(node)}: its input is not a tensor")
        return v


def _emit(c: _Capture, opcode: str, inputs, attrs, name: str, origin: str) -> Value:
    return c.b.op(opcode, inputs, attrs, [name], origin=origin)[0]


def _handler(collective: bool = False):
    def wrap(fn: Callable) -> Callable:
        fn.collective = collective
        return fn
    return wrap


@_handler(collective=True)
def _all_gather(c: _Capture, node):
    g = c.gathers[node]
    return c.b.all_gather(c.tensor(node, node.args[0]), g.dim, name=node.name, origin=_origin(node))


@_handler(collective=True)
def _reduce_scatter(c: _Capture, node):
    s = c.scatters[node]
    return c.b.reduce_scatter(c.tensor(node, s.source), s.dim, reduce=str(_arg(node, 1, "reduce_op")).lower(),
                              name=node.name, origin=_origin(node))


@_handler(collective=True)
def _all_reduce(c: _Capture, node):
    return c.b.all_reduce(c.tensor(node, node.args[0]), reduce=str(_arg(node, 1, "reduce_op")).lower(),
                          name=node.name, origin=_origin(node))


@_handler(collective=True)
def _wait(c: _Capture, node):
    x = c.tensor(node, node.args[0])
    if not x.type.pending:
        return x  # a wait on an already-waited tensor changes nothing
    return c.b.wait(x, name=node.name, origin=_origin(node))


@_handler()
def _matmul(c: _Capture, node):
    a, b = c.value(node, 0), c.value(node, 1)
    if a is None or b is None:
        return None
    return c.b.matmul(a, b, name=node.name, origin=_origin(node))


@_handler()
def _addmm(c: _Capture, node):  # addmm(bias, a, b) -> matmul + bias
    bias, a, b = c.value(node, 0), c.value(node, 1), c.value(node, 2)
    if None in (bias, a, b) or _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        return None
    mm = c.b.matmul(a, b, name=f"{node.name}_mm", origin=_origin(node))
    return c.b.pointwise("bias", mm, bias, name=node.name, origin=_origin(node))


@_handler()
def _linear(c: _Capture, node):  # linear(x, w, bias) -> transpose(w) + matmul [+ bias]
    x, w = c.value(node, 0), c.value(node, 1)
    b_node = _arg(node, 2, "bias")
    bias = c.value(node, 2, "bias")
    if x is None or w is None or (b_node is not None and bias is None):
        return None
    wt = _emit(c, "transpose", [w], {}, f"{node.name}_t", _origin(node))
    mm = c.b.matmul(x, wt, name=node.name if bias is None else f"{node.name}_mm", origin=_origin(node))
    return mm if bias is None else c.b.pointwise("bias", mm, bias, name=node.name, origin=_origin(node))


@_handler()
def _transpose(c: _Capture, node):  # t(x), permute(x, [1, 0]), transpose(x, 0, 1) on 2-D
    x = c.value(node, 0)
    if x is None:
        return None
    tn = _target_name(node)
    if x.type.rank < 2 and tn == "aten.t":
        return x  # t of a vector is the vector
    if x.type.rank != 2:
        return None
    if tn == "aten.permute":
        order = [_norm_dim(int(d), 2) for d in node.args[1]]
        if order == [0, 1]:
            return x
        if order != [1, 0]:
            return None
    if tn == "aten.transpose":
        d0, d1 = (_norm_dim(int(d), 2) for d in node.args[1:3])
        if d0 == d1:
            return x
    return _emit(c, "transpose", [x], {}, node.name, _origin(node))


@_handler()
def _reshape(c: _Capture, node):
    x = c.value(node, 0)
    if x is None or not isinstance(node.meta["val"], torch.Tensor) or not isinstance(_arg(node, 1, "size"),
                                                                                      (list, tuple)):
        return None  # e.g. view(x, dtype)
    return c.b.reshape(x, _shape(node.meta["val"]), name=node.name, origin=_origin(node))


@_handler()
def _unary(c: _Capture, node):
    x = c.value(node, 0)
    if x is None or len(node.args) > 1:
        return None
    attrs = {"fn": UNARY[_target_name(node)]}
    approximate = node.kwargs.get("approximate", "none")
    if approximate != "none":
        attrs["approximate"] = approximate
    return _emit(c, "pointwise", [x], attrs, node.name, _origin(node))


@_handler()
def _binary(c: _Capture, node):
    x, y = c.value(node, 0), c.value(node, 1)
    if x is None or y is None or _arg(node, 2, "alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
        return None  # a Python scalar operand, alpha, or an integer division stays opaque
    return c.b.pointwise(BINARY[_target_name(node)], x, y, name=node.name, origin=_origin(node))


@_handler()
def _getitem(c: _Capture, node):
    parts = c.env.get(node.args[0])
    if isinstance(parts, tuple) and isinstance(node.args[1], int) and isinstance(parts[node.args[1]], Value):
        return parts[node.args[1]]
    raise CaptureError(f"{_where(node)}: indexes something capture did not keep as a list of tensors")


@_handler()
def _split(c: _Capture, node):  # a split that is not part of a recognized collective
    x = c.value(node, 0)
    if x is None:
        return None
    d = _norm_dim(_arg(node, 2, "dim", 0), x.type.rank)
    sizes = [_shape(t)[d] for t in node.meta["val"]]
    names = [f"{node.name}_{i}" for i in range(len(sizes))]
    return c.b.op("split", [x], {"dim": d, "sizes": sizes}, names, origin=_origin(node))


@_handler()
def _cat(c: _Capture, node):
    xs = [c.env.get(a) for a in node.args[0]]
    if not xs or not all(isinstance(v, Value) for v in xs):
        return None
    d = _norm_dim(_arg(node, 1, "dim", 0), xs[0].type.rank)
    return _emit(c, "cat", xs, {"dim": d}, node.name, _origin(node))


_HANDLERS: dict[str, Callable] = {
    AG: _all_gather, RS: _reduce_scatter, AR: _all_reduce, WAIT: _wait,
    "aten.mm": _matmul, "aten.matmul": _matmul, "aten.addmm": _addmm, "aten.linear": _linear,
    "aten.t": _transpose, "aten.permute": _transpose, "aten.transpose": _transpose,
    **{name: _reshape for name in VIEWS},
    **{name: _unary for name in UNARY},
    **{name: _binary for name in BINARY},
    "getitem": _getitem, "aten.split": _split, "aten.split_with_sizes": _split, "aten.cat": _cat,
}
