"""`torch.compile(model, backend="bspfuse")`: fuse the collectives of a compiled model into bspfuse kernels.

Dynamo captures the model, AOT autograd splits forward and backward, and Inductor compiles both. In each
graph, at Inductor's post-grad stage (where PyTorch's own async-TP pass runs), bspfuse:

    normalize_collectives   fx -> fx   flatten collectives to 2-D rows, fold reshape chains
    capture_with_nodes      fx -> IR   (bspfuse.capture_fx)
    run_passes              IR -> IR   the fusion passes and their decisions (passes/)
    check_plan                         heap budget, same shapes on every rank: errors before any launch
    rewrite                 IR -> fx   fused sites become calls to torch.ops.bspfuse.* (runtime/torch_ops)

and Inductor compiles everything else as usual. Each process group whose ranks share a host is captured
on its own; sites the passes decline (unaligned rows, the cost model, a group across hosts, all-to-all,
...) stay Inductor's; every such decision is logged with its reason on the `bspfuse` logger, and
`reports()` returns all decisions of this process. `explain` plans a model the same way on the CPU.

Options (`torch.compile(..., backend="bspfuse", options={...})`): `mode` (auto | push | pull | copy_engine |
off), `heap_bytes` (the symmetric heap per group; default BSPFUSE_HEAP_BYTES or 4 GiB), `max_tokens` (dynamic
shapes: the most rows a fused GEMM takes), `ranks_per_host` (where a group's placement is found), `inner` ("inductor",
or "eager": run the rewritten graph as it is, no Inductor, e.g. in the CPU simulator), `cudagraphs` (True:
Inductor replays the forward from a CUDA graph, as mode="reduce-overhead" does; the fused ops count their
epochs on the device, and AG+GEMM avoids the schedules whose host side runs every call).

Example::

    model = parallelize_module(block, mesh, plan)          # DTensor tensor + sequence parallel
    compiled = torch.compile(model, backend="bspfuse")
    y = compiled(x)
    for report in bspfuse.backend.reports():
        print(report)
"""
from __future__ import annotations

import itertools
import logging
import math
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from bspfuse.capture_fx import (AG, AR, RS, VIEWS, WAIT, CaptureError, _origin, _same_size, _target_name,
                                capture_with_nodes)
from bspfuse.passes import Decision, Options, run_passes
from bspfuse.runtime import torch_ops

log = logging.getLogger("bspfuse")

MODES = ("auto", "push", "pull", "copy_engine", "off")  # options['mode']
_RUNS_THE_REST = {"inductor": "Inductor", "eager": "PyTorch eager"}  # options['inner'] -> what reports name
FUSED_OPS = {  # fused IR op -> the torch.ops.bspfuse op that runs it
    "fused_allgather_matmul": "all_gather_matmul",
    "fused_matmul_reduce_scatter": "matmul_reduce_scatter",
    "fused_matmul_allreduce": "matmul_all_reduce",
}


class BspfuseCompileError(RuntimeError):
    """A model bspfuse will not run: the message names the site and what is wrong, before any launch."""


@dataclass
class Report:
    """What bspfuse did with one graph: every decision, and graph-level fallbacks (backward, no collectives)."""

    graph: str
    decisions: list[Decision] = field(default_factory=list)
    fallback: str | None = None  # why the whole graph was left alone
    note: str | None = None  # what else the user should know about this graph (e.g. why it will not replay)
    saved_bytes: int | None = None  # a training forward's tensors saved for the backward (explain, eager)
    rest: str = "Inductor"  # what runs everything bspfuse does not fuse (options['inner'])

    @property
    def fused(self) -> list[Decision]:
        return [d for d in self.decisions if d.applied]

    def __str__(self) -> str:
        head = f"bspfuse, {self.graph}: " + (f"left to {self.rest}: {self.fallback}" if self.fallback else
                                             f"{len(self.fused)} of {len(self.decisions)} sites fused")
        note = [f"  note: {self.note}"] if self.note else []
        saved = [f"  saved for the backward: {self.saved_bytes / 2**20:.1f} MiB"] if self.saved_bytes else []
        return "\n".join([head] + [f"  {d}" for d in self.decisions] + note + saved)


_REPORTS: list[Report] = []
# group name -> host object (torch_ops.host_object_key) -> its heap bytes: what the compiled graphs will
# allocate. Sites that share a key share one object, within a graph and across graphs (recompiles).
_PLANNED_HEAP: dict[str, dict[tuple, int]] = {}


def reports() -> list[Report]:
    """Every graph's report, in compile order, since the process started (or `reset()`)."""
    return list(_REPORTS)


def reset() -> None:
    """Forget the reports and the heap plan, e.g. between tests. Host objects already built keep their heap
    buffers: a process that goes on running compiled graphs should not call this."""
    _REPORTS.clear()
    _PLANNED_HEAP.clear()


def _record(report: Report) -> Report:
    _REPORTS.append(report)
    log.info("%s", report)
    return report


# ------------------------------------------------------------------------------------------ normalize (fx -> fx)


def _is(node, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and _target_name(node) == name


def _is_collective(node) -> bool:
    return _is(node, AG) or _is(node, RS) or _is(node, AR)


def _val(node: torch.fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _static(*nodes) -> bool:
    """Every node is a tensor of known sizes: the rewrites below that need them leave a dynamic graph's
    nodes as they are (capture and the passes handle its symbolic sizes)."""
    return all(isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
               and all(isinstance(d, int) for d in n.meta["val"].shape) for n in nodes)


def _reshape(graph: torch.fx.Graph, x: torch.fx.Node, shape) -> torch.fx.Node:
    node = graph.call_function(torch.ops.aten.reshape.default, (x, _shape_args(graph, shape)))
    node.meta["val"] = _val(x).reshape(shape)
    return node


def _shape_args(graph: torch.fx.Graph, shape) -> list:
    """A shape as fx arguments: ints, the graph's input of a symbol (a dynamic size), and -1 for one size
    that is neither (e.g. batch * seq)."""
    out, inferred = [], False
    for d in shape:
        if isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.is_constant()):
            out.append(int(d))
            continue
        node = next((n for n in graph.find_nodes(op="placeholder") if isinstance(n.meta.get("val"), torch.SymInt)
                     and n.meta["val"].node.expr == d.node.expr), None)
        if node is None and inferred:
            raise CaptureError(f"cannot spell the shape {list(shape)} in the graph: two sizes are products of symbols")
        out.append(node if node is not None else -1)
        inferred = inferred or node is None
    return out


def _fold_split_cat(graph: torch.fx.Graph) -> None:
    # cat([split(x, c, d)[0..W-1]], 0) with every dim before d of size 1 -> reshape(x): the same bytes
    for cat in [n for n in graph.nodes if _is(n, "aten.cat")]:
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim != 0 or not parts or not all(_is(p, "getitem") for p in parts):
            continue
        split = parts[0].args[0]
        if not _is(split, "aten.split") or [p.args for p in parts] != [(split, i) for i in range(len(parts))]:
            continue
        x, d = split.args[0], split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if not _static(x, cat):
            continue
        shape = tuple(_val(x).shape)
        d = d % len(shape)
        if any(s != 1 for s in shape[:d]) or len(split.users) != len(parts) or len(_val(split)) != len(parts):
            continue
        with graph.inserting_before(cat):
            cat.replace_all_uses_with(_reshape(graph, x, tuple(_val(cat).shape)))
        graph.erase_node(cat)
        for p in parts:
            graph.erase_node(p)
        graph.erase_node(split)


def _flatten_collectives(graph: torch.fx.Graph) -> None:
    # wait(all_gather(x[.., H]))    -> reshape(wait(all_gather(reshape(x, [-1, H]))), shape)   (rows gather)
    # wait(reduce_scatter(y[.., H])) -> reshape(wait(reduce_scatter(reshape(y, [-1, H]))), shape)
    # wait(all_reduce(y[.., H]))     -> reshape(wait(all_reduce(reshape(y, [-1, H]))), shape)
    # Collectives work on dim 0 of contiguous data, so the 2-D form moves exactly the same bytes.
    # A gather or scatter on another dim (split/cat around it: [batch, seq, H] sharded on seq) stays 3-D:
    # capture sees it as such, and the fused kernels map its rows.
    for coll in [n for n in graph.nodes if _is_collective(n)]:
        x = coll.args[0]
        if not _static(x, coll) or _val(x).dim() <= 2 or len(coll.users) != 1 or not _is(next(iter(coll.users)), WAIT):
            continue
        wait = next(iter(coll.users))
        if (_is(coll, AG) and any(_is(u, "aten.split") for u in wait.users)) or (_is(coll, RS) and _is(x, "aten.cat")):
            continue
        shape = tuple(_val(wait).shape)
        with graph.inserting_before(coll):
            flat = _reshape(graph, x, (-1, _val(x).shape[-1]))
            coll2 = graph.call_function(coll.target, (flat, *coll.args[1:]), dict(coll.kwargs))
            coll2.meta["val"] = _val(coll).reshape(-1, _val(x).shape[-1])
            wait2 = graph.call_function(wait.target, (coll2,))
            wait2.meta["val"] = coll2.meta["val"]
        with graph.inserting_after(wait):
            back = _reshape(graph, wait2, shape)
        wait.replace_all_uses_with(back)
        graph.erase_node(wait)
        graph.erase_node(coll)


def _drop_noop_slices(graph: torch.fx.Graph) -> None:
    # slice(x, d, 0, >= size) -> x   (DTensor's redistribution leaves these behind; Inductor drops them too)
    for node in [n for n in graph.nodes if _is(n, "aten.slice")]:
        x, d, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
        if not (isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor)):
            continue
        if node.kwargs or not all(isinstance(a, (int, type(None))) for a in (d, start, step)):
            continue
        size = _val(x).shape[d]
        whole = end is None or _same_size(end, size) or (isinstance(end, int) and (
            end >= sys.maxsize or (isinstance(size, int) and end >= size)))
        if (start or 0) == 0 and step == 1 and whole:
            node.replace_all_uses_with(x)
            graph.erase_node(node)


def _fold_reshapes(graph: torch.fx.Graph) -> None:
    # reshape(reshape(x, s1), s2) -> reshape(x, s2); reshape(x, shape of x) -> x
    for node in list(graph.nodes):
        if not any(_is(node, v) for v in VIEWS) or not isinstance(node.args[1], (list, tuple)):
            continue
        src = node.args[0]
        while any(_is(src, v) for v in VIEWS) and isinstance(src.args[1], (list, tuple)):
            src = src.args[0]
        if not _static(src, node):
            continue
        if tuple(_val(src).shape) == tuple(_val(node).shape):
            node.replace_all_uses_with(src)
        elif src is not node.args[0]:
            node.args = (src, *node.args[1:])
    graph.eliminate_dead_code()


def _fold_silu(graph: torch.fx.Graph) -> None:
    # Inductor decomposes silu before this pass runs: x / (1 + exp(-x)) (or x * sigmoid(x)) -> aten.silu(x), so
    # the passes see a SwiGLU gate. _expand_silu decomposes the ones no fused kernel took back again.
    aten = torch.ops.aten
    for node in list(graph.nodes):
        x = None
        if _is(node, "aten.div") and len(node.args) == 2 and not node.kwargs:  # no rounding mode
            x, den = node.args
            one_plus = _is(den, "aten.add") and len(den.args) == 2 and not den.kwargs and 1 in den.args
            e = next((a for a in den.args if a != 1), None) if one_plus else None
            if not (_is(e, "aten.exp") and _is(e.args[0], "aten.neg") and e.args[0].args[0] is x):
                x = None
        elif _is(node, "aten.mul") and len(node.args) == 2:
            a, b = node.args
            x = next((u for u, v in ((a, b), (b, a)) if _is(v, "aten.sigmoid") and v.args[0] is u), None)
        if isinstance(x, torch.fx.Node):
            with graph.inserting_before(node):
                silu = graph.call_function(aten.silu.default, (x,))
            silu.meta["val"] = _val(node)
            node.replace_all_uses_with(silu)
    graph.eliminate_dead_code()


def _expand_silu(graph: torch.fx.Graph) -> None:
    """aten.silu left in a post-grad graph as x / (1 + exp(-x)), Inductor's own decomposition."""
    aten = torch.ops.aten
    for node in list(graph.find_nodes(op="call_function", target=aten.silu.default)):
        (x,) = node.args
        with graph.inserting_before(node):
            out = x
            for target, args in ((aten.neg.default, ()), (aten.exp.default, ()), (aten.add.Tensor, (1,))):
                out = graph.call_function(target, (out, *args))
                out.meta["val"] = _val(node)
            out = graph.call_function(aten.div.Tensor, (x, out))
            out.meta["val"] = _val(node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def normalize_collectives(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite a graph so collectives and matmuls meet as the fusion passes expect (in place; returns gm).
    A fused graph that keeps a silu must get _expand_silu before Inductor lowers it."""
    _drop_noop_slices(gm.graph)
    _fold_split_cat(gm.graph)
    _flatten_collectives(gm.graph)
    _fold_reshapes(gm.graph)
    _fold_silu(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


# ------------------------------------------------------------------------------------------ plan (IR)


@dataclass(frozen=True)
class Concat:
    """An operand the passes made by concatenating others (a sum of matmuls runs as one GEMM over their K's
    side by side): the rewrite builds it in fx."""

    parts: tuple
    dim: int


@dataclass
class Site:
    """One fused op, as the fx rewrite needs it."""

    opcode: str
    inputs: list  # fx nodes (or Concat): a, b (AG+GEMM: one per weight)[, bias]
    results: list[list[torch.fx.Node]]  # per fused result: the fx nodes that computed it
    attrs: dict
    group: str
    world: int
    shapes: tuple  # A's rows [M, K], the weights' shapes and the dtype: what every rank must agree on
    heap_bytes: int
    dynamic: bool = False  # A's rows are symbolic: shapes[0][0] is their bound

    @property
    def epilogue(self) -> str:  # as torch.ops.bspfuse takes it
        return "+".join(self.attrs.get("epilogue", ()))

    @property
    def key(self) -> tuple:  # the host object it will run on
        a, b, dtype = self.shapes
        return torch_ops.host_object_key(FUSED_OPS[self.opcode], self.group, a, b, dtype, self.attrs["mode"],
                                         self.epilogue, self.max_rows)

    @property
    def max_rows(self) -> int:  # as torch.ops.bspfuse takes it: 0 for a static shape
        return self.shapes[0][0] if self.dynamic else 0

    @property
    def bound(self) -> tuple:  # the op's trailing max_rows argument, left out where it is the default
        return (self.max_rows,) if self.dynamic else ()


def _meta(x) -> torch.Tensor:
    if isinstance(x, Concat):
        return torch.cat([_meta(p) for p in x.parts], x.dim)
    return _val(x)


def _group_name(collective: torch.fx.Node) -> str:
    return str(collective.args[-1])  # all_gather_into_tensor, reduce_scatter_tensor, all_reduce: the group last


def plan(gm: torch.fx.GraphModule, options: Options, graph_name: str,
         group: str | None = None) -> tuple[Report, list[Site]]:
    """Capture the normalized graph (the collectives of `group`; None: its only group), run the passes, and
    describe each fused op in fx terms."""
    from bspfuse.kernels.gemm import heap_bytes
    from bspfuse.lowering import gemm_shape, target_of, weights_of

    program, nodes = capture_with_nodes(gm, name=graph_name, group=group)
    program.sizes.update(_example_sizes(gm))  # dynamic shapes: the passes check the example's sizes
    passes_log = run_passes(program, options=options)
    report = Report(graph_name, passes_log.decisions)
    fused = passes_log.program
    group = group or next((_group_name(n) for n in gm.graph.nodes if _is_collective(n)), "")
    def fx_of(v):
        if v.name in nodes:
            return nodes[v.name][0]
        if v.producer is not None and v.producer.opcode == "cat":
            return Concat(tuple(fx_of(x) for x in v.producer.inputs), v.producer.attrs["dim"])
        raise CaptureError(f"the fused program reads %{v.name}, which no fx node computes (a bspfuse bug)")

    sites = []
    gpu = target_of(torch.device("cuda", torch.cuda.current_device())) if torch.cuda.is_available() else None
    for op in fused.ops:
        if op.opcode not in FUSED_OPS:
            continue
        inputs = [fx_of(v) for v in op.inputs]
        M, N, K = gemm_shape(op, fused)
        a, bs = _meta(inputs[0]), [_meta(fx_of(v)) for v in weights_of(op)]
        rows = math.prod(a.shape[:-1])
        dynamic = not isinstance(rows, int)
        if dynamic:  # a dynamic length: the kernels take M at run time, the heap the bound
            M = rows = _row_bound(rows, op.opcode, fused.world_size, options)
        sites.append(Site(op.opcode, inputs, [nodes[v.name] for v in op.outputs], dict(op.attrs), group,
                          fused.world_size, ((rows, a.shape[-1]), tuple(tuple(b.shape) for b in bs), a.dtype),
                          heap_bytes(op.opcode, M, N, K, fused.world_size, a.dtype, op.attrs["mode"], gpu), dynamic))
    if any(s.dynamic for s in sites):
        report.note = _dynamic_note(sites)
    return report, sites


DEFAULT_MAX_TOKENS = 8192  # rows (batch x sequence) a fused GEMM of a dynamic graph is built for, unless told


def _example_sizes(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Each symbol of a dynamic graph's shapes -> its value in the example the graph was traced with."""
    sizes = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for d in (val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                known = getattr(env, "backed_var_to_val", None) or env.var_to_val
                for sym in d.node.expr.free_symbols:
                    if sym in known:
                        sizes[str(sym)] = int(known[sym])
    return sizes


def _row_bound(rows: torch.SymInt, opcode: str, world: int, options: Options) -> int:
    """The most rows of A a dynamic site's kernel takes: from options['max_tokens'] (rows of the whole
    matmul: AG+GEMM's A holds 1/world of them), else the symbols' upper bounds (mark_dynamic(max=...)), else
    DEFAULT_MAX_TOKENS."""
    tokens = options.max_tokens
    if tokens is None:
        import sympy
        from torch.utils._sympy.numbers import int_oo

        env, expr = rows.node.shape_env, rows.node.expr
        uppers = {s: env.var_to_range[s].upper for s in expr.free_symbols if s in env.var_to_range}
        if len(uppers) == len(expr.free_symbols) and all(u.is_number and u not in (int_oo, sympy.oo)
                                                           for u in uppers.values()):
            return int(expr.subs({s: sympy.Integer(int(u)) for s, u in uppers.items()}))
        tokens = DEFAULT_MAX_TOKENS
    return tokens // world if opcode == "fused_allgather_matmul" else tokens


def _dynamic_note(sites: list[Site]) -> str:
    bounds = ", ".join(sorted({f"{FUSED_OPS[s.opcode]} up to {s.shapes[0][0]} rows of A" for s in sites if s.dynamic}))
    return (f"the sequence length is dynamic: the fused kernels take their rows at run time and nothing recompiles "
            f"per length; heap buffers are sized for {bounds} (options['max_tokens'] sets the bound; a longer call "
            "is an error naming it)")


def check_plan(sites: list[Site], group: str, heap_limit: int, graph_name: str) -> None:
    """Errors a user must see before anything runs: shapes that differ between the ranks of `group` (an
    exchange every rank of it makes, with or without sites), then the heap budget."""
    from bspfuse.kernels import gemm

    _check_same_on_every_rank(sites, group, graph_name)  # first: a rank that raised here alone would hang it
    new: dict[str, dict[tuple, Site]] = {}
    for s in sites:
        if s.key not in _PLANNED_HEAP.get(s.group, {}):
            new.setdefault(s.group, {})[s.key] = s
    for group_name, objects in new.items():
        limit = torch_ops.size_heap(group_name, heap_limit)
        total = sum(_PLANNED_HEAP.get(group_name, {}).values()) + sum(s.heap_bytes for s in objects.values())
        total += gemm.SCRATCH_BYTES  # the scratch of descriptors made on the device, one per heap
        if total > limit:
            worst = max(objects.values(), key=lambda s: s.heap_bytes)
            more = ("raise options={'heap_bytes': ...} or BSPFUSE_HEAP_BYTES" if limit == heap_limit else
                    "the heap was made before this graph compiled: give heap_bytes to the first compile of the group")
            raise BspfuseCompileError(
                f"{graph_name}: the fused kernels of process group '{group_name}' need {total / 2**20:.1f} MiB of "
                f"symmetric heap, more than its {limit / 2**20:.1f} MiB (the largest: "
                f"{worst.opcode} with A{list(worst.shapes[0])} B{list(worst.shapes[1])}, "
                f"{worst.heap_bytes / 2**20:.1f} MiB); {more}, or compile with options={{'mode': 'off'}}")
    for group_name, objects in new.items():
        _PLANNED_HEAP.setdefault(group_name, {}).update((key, s.heap_bytes) for key, s in objects.items())


_EXCHANGES: dict[str, int] = {}  # group name -> compile-time exchanges this process has made over it


def _check_same_on_every_rank(sites: list[Site], group: str, graph_name: str) -> None:
    """Every rank of `group` publishes its fused sites under the same exchange number in the process
    group's store and reads everyone's. A store, not a collective: no tensors under the compiler's fake
    mode, and a rank that compiles alone (its guards failed, its peers' did not) gets an error naming the
    ranks that never came, after BSPFUSE_EXCHANGE_TIMEOUT_S (default 600 s), instead of hanging."""
    import datetime
    import os
    import pickle

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from torch.distributed.distributed_c10d import _get_default_store, _resolve_process_group

    pg = _resolve_process_group(group)
    if dist.get_backend(pg) == "fake":
        return
    store, ranks, me = _get_default_store(), dist.get_process_group_ranks(pg), dist.get_rank()
    n = _EXCHANGES[group] = _EXCHANGES.get(group, 0) + 1

    def key(rank: int) -> str:
        return f"bspfuse/{group}/{n}/{rank}"

    mine = [(s.opcode, s.shapes) for s in sites]
    store.set(key(me), pickle.dumps(mine))
    timeout_s = float(os.environ.get("BSPFUSE_EXCHANGE_TIMEOUT_S", 600))
    try:
        store.wait([key(r) for r in ranks], datetime.timedelta(seconds=timeout_s))
    except RuntimeError:  # the store's timeout: DistStoreError from a TCPStore, RuntimeError from a FileStore
        missing = [r for r in ranks if not store.check([key(r)])]
        raise BspfuseCompileError(
            f"{graph_name}: rank(s) {missing} of process group '{group}' did not reach this compile (number {n} "
            f"here) within {timeout_s:.0f} s: bspfuse needs every rank to compile the same graphs in the same "
            "order (did only this rank recompile, e.g. because a shape changed on it?)") from None
    for r in ranks:
        theirs = pickle.loads(store.get(key(r)))
        if theirs != mine:
            at = next((j for j, (m, t) in enumerate(zip(mine, theirs)) if m != t), min(len(mine), len(theirs)))
            here, there = (x[at] if at < len(x) else "nothing" for x in (mine, theirs))
            raise BspfuseCompileError(
                f"{graph_name}: rank {r} compiled different fused sites than rank {me} (site {at}: here "
                f"{here}, there {there}): bspfuse's kernels need every rank to run the same shapes; pad the "
                "inputs, or mark the differing dimension dynamic so the site falls back")


# ------------------------------------------------------------------------------------------ rewrite (IR -> fx)


def rewrite(gm: torch.fx.GraphModule, sites: list[Site]) -> torch.fx.GraphModule:
    """Replace each site's nodes by one call to its torch.ops.bspfuse op; dead nodes are removed."""
    graph = gm.graph
    taken_over: dict[torch.fx.Node, torch.fx.Node] = {}  # a node an earlier site replaced -> what replaced it

    def operand(x):  # e.g. A is the result of a fused all-gather, or a concatenation the passes asked for
        if isinstance(x, Concat):
            parts = [operand(p) for p in x.parts]
            node = graph.call_function(torch.ops.aten.cat.default, (parts, x.dim))
            node.meta["val"] = torch.cat([_val(p) for p in parts], x.dim)
            return node
        return taken_over.get(x, x)

    for s in sites:
        target = getattr(torch.ops.bspfuse, FUSED_OPS[s.opcode]).default
        n = s.attrs.get("weights", 1)
        first_result = min((nodes[0] for nodes in s.results), key=_position(graph))
        with graph.inserting_before(first_result):
            a, *rest = (operand(x) for x in s.inputs)
            bs, rest = rest[:n], rest[n:]
            bias = rest[0] if "bias" in s.attrs.get("epilogue", ()) else None
            wanted = [_val(r[0]) for r in s.results]  # the shapes the graph reads
            if s.opcode == "fused_allgather_matmul":  # results: one per weight, then the gathered A (or empty)
                if s.attrs.get("dim", 0) == 0 and _val(a).dim() > 2:
                    a = _reshape(graph, a, (-1, _val(a).shape[-1]))  # dim 0: rank-major rows, as the kernel's
                want = bool(s.attrs.get("gathered_out"))
                call = graph.call_function(target, (a, bs, bias, s.group, s.attrs["mode"], s.epilogue, want,
                                                    *s.bound))
                av = _val(a)  # [M, K] -> Cs [W*M, N]; [batch, S, K] (dim 1) -> [batch, W*S, N]
                rows = (s.world * av.shape[0],) if av.dim() == 2 else (av.shape[0], s.world * av.shape[1])
                widths = [_val(b).shape[1] for b in bs][:1 if "swiglu" in s.attrs.get("epilogue", ()) else None]
                vals = [av.new_empty(*rows, w) for w in widths]
                vals.append(av.new_empty(*rows, av.shape[-1]) if want else av.new_empty(0))
                call.meta["val"] = vals
                outs = []
                for i, v in enumerate(vals):
                    item = graph.call_function(operator.getitem, (call, i))
                    item.meta["val"] = v
                    same = i >= len(wanted) or tuple(v.shape) == tuple(wanted[i].shape)
                    outs.append(item if same else _reshape(graph, item, tuple(wanted[i].shape)))
            else:
                if s.attrs.get("dim", 0) == 1:  # [batch * seq, K] rows -> [batch, seq, K], scattered on seq
                    a = _reshape(graph, a, (wanted[0].shape[0], -1, _val(a).shape[-1]))
                call = graph.call_function(target, (a, bs[0], bias, s.group, s.attrs["mode"], s.epilogue, *s.bound))
                call.meta["val"] = _val(a).new_empty(*_val(a).shape[:-1], _val(bs[0]).shape[1]) \
                    if s.opcode == "fused_matmul_allreduce" else wanted[0]
                outs = [call if tuple(_val(call).shape) == tuple(wanted[0].shape)
                        else _reshape(graph, call, tuple(wanted[0].shape))]
        for result_nodes, new in zip(s.results, outs):
            for old in result_nodes:
                old.replace_all_uses_with(new)
                taken_over[old] = new
    # a kept result (the gathered A) may have users ahead of the fused call: Inductor's stable sort moves them
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(graph)
    _erase_dead(graph)
    graph.lint()
    gm.recompile()
    return gm


def _position(graph: torch.fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


def _erase_dead(graph: torch.fx.Graph) -> None:
    # Collectives and waits count as side-effecting in fx, so eliminate_dead_code keeps them: drop the
    # ones nothing reads any more by hand.
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and (
                _is(node, WAIT) or _is_collective(node) or not node.is_impure()):
            graph.erase_node(node)


_COLLECTIVE_NAMES = {"all_to_all_single": "all-to-all", "broadcast": "broadcast", "all_gather_into_tensor_coalesced":
                     "coalesced all-gather", "reduce_scatter_tensor_coalesced": "coalesced reduce-scatter",
                     "all_reduce_coalesced": "coalesced all-reduce"}


def _other_collective(node) -> str | None:
    """What a collective no pass takes is called (all-to-all, broadcast, an in-place c10d op, ...), else None."""
    if node.op != "call_function" or _is_collective(node) or _is(node, WAIT):
        return None
    name = _target_name(node)
    namespace, _, op = name.partition(".")
    if namespace not in ("_c10d_functional", "c10d", "_c10d_functional_autograd"):
        return None
    return _COLLECTIVE_NAMES.get(op, op)


def placement(group: str, ranks_per_host: int | None = None) -> tuple[bool, str]:
    """Whether the ranks of process group `group` share one host, and how that was found. Ranks r and s
    share a host when r // R == s // R, R the ranks per host: `ranks_per_host` if given (the backend's
    option), else LOCAL_WORLD_SIZE (set by torchrun), else the GPUs this host has; a fake or CPU group with
    none of these is one host (the simulator's ranks are processes of this machine)."""
    import os

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    ranks = dist.get_process_group_ranks(pg)
    if ranks_per_host:
        per, how = ranks_per_host, f"options['ranks_per_host']={ranks_per_host}"
    elif os.environ.get("LOCAL_WORLD_SIZE"):
        per, how = int(os.environ["LOCAL_WORLD_SIZE"]), f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']}"
    elif torch.cuda.is_available() and dist.get_backend(pg) != "fake":
        per, how = torch.cuda.device_count(), f"{torch.cuda.device_count()} GPUs on this host"
    else:
        return True, "its ranks are processes of this host"
    hosts = sorted({r // per for r in ranks})
    if len(hosts) == 1:
        return True, f"ranks {ranks} on host {hosts[0]} ({how} ranks per host)"
    return False, f"ranks {ranks} span hosts {hosts} ({how} ranks per host)"


def fuse_graph(gm: torch.fx.GraphModule, options: Options, graph_name: str, heap_limit: int,
               rest: str = "Inductor") -> Report:
    """normalize -> capture -> passes -> checks -> rewrite, on one graph (in place). Each process group
    whose ranks share a host is captured and fused on its own; every other collective stays torch's."""
    collectives = [n for n in gm.graph.nodes if _is_collective(n)]
    unfusable = [(n, kind) for n in gm.graph.nodes if (kind := _other_collective(n))]
    if not collectives and not unfusable:
        return _record(Report(graph_name, fallback="no collectives in this graph", rest=rest))
    decisions = [Decision("collectives", _origin(n), False, f"{kind}: no pass fuses {kind}; it stays torch's")
                 for n, kind in unfusable]
    normalize_collectives(gm)
    groups = list(dict.fromkeys(_group_name(n) for n in gm.graph.nodes if _is_collective(n)))
    report, sites, fused_groups = Report(graph_name, decisions, rest=rest), [], []
    for group in groups:
        one_host, where = placement(group, options.ranks_per_host)
        if not one_host:
            report.decisions += [Decision("collectives", _origin(n), False, (
                f"{_target_name(n).split('.')[-1]} over process group '{group}': {where}; a group across hosts "
                "stays on torch.distributed (NCCL)")) for n in gm.graph.nodes if _is_collective(n)
                and _group_name(n) == group]
            continue
        try:
            found, group_sites = plan(gm, options, graph_name, group if len(groups) > 1 else None)
        except CaptureError as e:
            report.decisions.append(Decision("capture", f"process group '{group}'", False, f"not captured: {e}"))
            continue
        report.decisions += found.decisions
        report.note = found.note or report.note
        sites += group_sites
        fused_groups.append(group)
    try:
        for group in fused_groups:
            check_plan([s for s in sites if s.group == group], group, heap_limit, graph_name)
        if sites:
            rewrite(gm, sites)
        if options.replayable and any(s.opcode == "fused_matmul_allreduce" for s in sites):
            report.note = ("Inductor runs this graph without a CUDA graph: the fused GEMM+all-reduce returns the "
                           "slot of its output the host picked for the call")
    finally:
        _expand_silu(gm.graph)
        gm.recompile()
    return _record(report)


# ------------------------------------------------------------------------------------------ entry points


def _device(options: dict) -> str:
    """The device the passes decide for: options['device'], else this process's GPU where the device table has
    it (its tuned entries and figures), else the table's default."""
    from bspfuse.devices import DEVICES

    if "device" in options:
        if options["device"] not in DEVICES:
            raise BspfuseCompileError(f"options['device'] must be one of {', '.join(DEVICES)}, "
                                      f"got {options['device']!r}")
        return options["device"]
    if torch.cuda.is_available():
        from bspfuse.tune.measure import gpu_model

        if (here := gpu_model()) in DEVICES:
            return here
    return Options.device


def _options(options: dict | None) -> tuple[Options, int, str]:
    options = dict(options or {})
    known = {"mode", "heap_bytes", "inner", "cudagraphs", "ranks_per_host", "max_tokens", "save_gathered", "device"}
    unknown = set(options) - known
    if unknown:
        raise BspfuseCompileError(f"unknown bspfuse option(s) {sorted(unknown)}; known: {sorted(known)}")
    mode, inner = options.get("mode", "auto"), options.get("inner", "inductor")
    if mode not in MODES:
        raise BspfuseCompileError(f"options['mode'] must be one of {', '.join(MODES)}, got {mode!r}")
    if inner not in ("inductor", "eager"):
        raise BspfuseCompileError(f"options['inner'] must be 'inductor' or 'eager', got {inner!r}")
    cudagraphs, save_gathered = options.get("cudagraphs", False), options.get("save_gathered", True)
    for key, value in (("cudagraphs", cudagraphs), ("save_gathered", save_gathered)):
        if value not in (True, False):
            raise BspfuseCompileError(f"options['{key}'] must be True or False, got {value!r}")
    if cudagraphs and inner != "inductor":
        raise BspfuseCompileError("options['cudagraphs'] needs inner='inductor' (Inductor's CUDA graph trees "
                                  "replay the compiled forward)")
    sizes = {}
    for key in ("ranks_per_host", "max_tokens"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BspfuseCompileError(f"options['{key}'] must be a positive int, got {value!r}")
        sizes[key] = value
    return (Options(mode=mode, replayable=cudagraphs, save_gathered=save_gathered, device=_device(options), **sizes),
            int(options.get("heap_bytes", torch_ops.DEFAULT_HEAP_BYTES)), inner)


_GRAPH_IDS = itertools.count()


def _compile_graphs(gm: torch.fx.GraphModule, example_inputs, opts: Options, heap_limit: int,
                    finish: Callable[[torch.fx.GraphModule], Callable], ids=_GRAPH_IDS,
                    rest: str = "Inductor") -> Callable:
    """AOT autograd splits the model into its forward and backward graphs; each is fused (fuse_graph) and
    then handed to `finish` (run as it is, or only its shapes: explain)."""
    from torch._dynamo.backends.common import aot_autograd

    from torch._functorch.partitioners import default_partition

    graph_id = next(ids)
    saved: list[int] = []

    def partition(joint, inputs, *, num_fwd_outputs, **kw):
        if not opts.save_gathered:
            recompute_gathers(joint.graph)
        fw, bw = default_partition(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kw)
        outs = fw.graph.find_nodes(op="output")[0].args[0][num_fwd_outputs:]
        saved.append(_distinct_bytes(n.meta.get("val") for n in outs if isinstance(n, torch.fx.Node)))
        return fw, bw

    def compiler(which: str):
        def compile_one(fx_gm, _inputs):
            report = fuse_graph(fx_gm, opts, f"graph {graph_id} {which}", heap_limit, rest)
            if which == "forward" and saved and saved[-1]:
                report.saved_bytes = saved[-1]
            return finish(fx_gm)
        return compile_one

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        partition_fn=partition)(gm, example_inputs)


def _distinct_bytes(vals) -> int:
    """Bytes of the memory behind `vals`, each storage once (views of one tensor are saved as one)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    storages = {StorageWeakRef(v.untyped_storage()): v.untyped_storage().nbytes() for v in vals
                if isinstance(v, torch.Tensor)}
    return sum(storages.values())


_SHAPE_OPS = ("aten.split", "aten.split_with_sizes", "getitem", "aten.cat", "aten.slice", "aten.permute", "aten.t",
              *VIEWS)


def recompute_gathers(joint: torch.fx.Graph) -> None:
    """options['save_gathered']=False: the forward's all-gathers (and the reshapes of what they gather) are
    marked to be recomputed, so the partitioner saves a rank's shard for the backward and the backward
    gathers it again, instead of saving the gathered activation (W times larger)."""
    from torch.utils.checkpoint import CheckpointPolicy

    for node in joint.nodes:
        if not _is(node, AG) or node.meta.get("partitioner_tag") == "is_backward":
            continue
        todo = [node]
        while todo:
            n = todo.pop()
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta.setdefault("ac_graph_id", 0)
            todo += [u for u in n.users if _is(u, WAIT) or any(_is(u, op) for op in _SHAPE_OPS)]


def bspfuse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None) -> Callable:
    """The torch.compile backend (registered as "bspfuse"); see the module docstring."""
    opts, heap_limit, inner = _options(options)
    if inner == "eager":
        from torch._functorch.aot_autograd import make_boxed_func

        return _compile_graphs(gm, example_inputs, opts, heap_limit, make_boxed_func, rest=_RUNS_THE_REST[inner])

    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    graph_id = next(_GRAPH_IDS)

    def inner_compile(fx_gm, inputs, **kwargs):
        name = f"graph {graph_id} {'backward' if kwargs.get('is_backward') else 'forward'}"
        with inductor_config.patch(post_grad_custom_post_pass=_PostGradPass(opts, name, heap_limit),
                                   fx_graph_cache=False):
            return compile_fx_inner(fx_gm, inputs, **kwargs)

    regather = {} if opts.save_gathered else {"joint_custom_pre_pass": recompute_gathers}

    # cudagraphs: Inductor replays each compiled forward from a CUDA graph, as mode="reduce-overhead" does; the
    # passes then use only schedules that replay (Options.replayable) and a graph with an op that cannot
    # (matmul_all_reduce) runs without one, as Inductor logs
    with inductor_config.patch({"triton.cudagraphs": opts.replayable, **regather}):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile)


class _PostGradPass(CustomGraphPass):
    def __init__(self, options: Options, graph_name: str, heap_limit: int):
        self.options, self.graph_name, self.heap_limit = options, graph_name, heap_limit

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_graph(graph.owning_module, self.options, self.graph_name, self.heap_limit)

    def uuid(self):
        return None  # never cache: the pass plans the symmetric heap as a side effect


def _shapes_only(gm: torch.fx.GraphModule) -> Callable:
    """A compiled graph that computes nothing: it runs `gm` on fake tensors and returns uninitialized
    tensors of the results' shapes (what explain needs to go on to the backward graph)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(args):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            outs = torch.fx.Interpreter(gm).run(*fakes)
        args.clear()
        return [torch.empty_strided(o.shape, o.stride(), dtype=o.dtype) if isinstance(o, torch.Tensor) else o
                for o in outs]

    run._boxed_call = True
    return run


def explain(build: Callable[[Any], torch.nn.Module], inputs: Callable[[Any], Any], world_size: int, *,
            train: bool = False, dynamic: bool = False, mesh_shape: tuple | None = None,
            mesh_dim_names: tuple | None = None, options: dict | None = None) -> list[Report]:
    """What the backend would fuse in `build(mesh)(*inputs(mesh))`, on the CPU: a fake process group of
    `world_size` ranks, the model's memory left uninitialized and its graphs run on fake tensors, so nothing
    is computed and no GPU is needed. The forward (and with `train=True`, the backward of the outputs' sum)
    goes through the backend's own planning (fuse_graph); returns one Report per graph, as `reports()` does,
    without adding them there. `mesh_shape`/`mesh_dim_names` make a device mesh of several dimensions (e.g.
    (2, 4), ("dp", "tp")); `dynamic=True` compiles for every sequence length at once.

    Example::

        for report in explain(lambda mesh: parallelize(LlamaBlock(cfg), mesh),
                              lambda mesh: torch.randn(1, 4096 // 2, 8192, dtype=torch.bfloat16), world_size=2):
            print(report)
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils._pytree import tree_leaves

    from bspfuse.capture_fx import fake_process_group

    opts, heap_limit, inner = _options(options)
    shape = tuple(mesh_shape) if mesh_shape else (world_size,)
    if len(shape) > 1 and mesh_dim_names is None:
        raise BspfuseCompileError(f"a mesh of shape {shape} needs mesh_dim_names, one name per dimension")
    if math.prod(shape) != world_size:
        raise BspfuseCompileError(f"mesh_shape {shape} holds {math.prod(shape)} ranks, not world_size={world_size}")

    ids = itertools.count()  # graphs numbered from 0 in every explain

    def backend(gm, example_inputs):
        return _compile_graphs(gm, example_inputs, opts, heap_limit, _shapes_only, ids, _RUNS_THE_REST[inner])

    saved = list(_REPORTS), {g: dict(o) for g, o in _PLANNED_HEAP.items()}
    torch._dynamo.reset()
    try:
        with fake_process_group(world_size):
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=tuple(mesh_dim_names) if mesh_dim_names else None)
            with torch.device("meta"):
                model = build(mesh)
            model = model.to_empty(device="cpu")  # uninitialized memory: only shapes matter here
            args = inputs(mesh)
            args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
            args = tuple(torch.empty_like(a, device="cpu") if isinstance(a, torch.Tensor) and a.is_meta else a
                         for a in args)  # inputs made while the model was built on the meta device
            compiled = torch.compile(model, backend=backend, dynamic=dynamic or None)
            del _REPORTS[:]
            with torch.enable_grad() if train else torch.no_grad():
                out = compiled(*args)
                if train:
                    loss = sum(t.float().sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                               and t.requires_grad)
                    if not isinstance(loss, torch.Tensor):
                        raise BspfuseCompileError("train=True, but no output of the model requires grad")
                    loss.backward()
            return list(_REPORTS)
    finally:
        _REPORTS[:], planned = saved
        _PLANNED_HEAP.clear()
        _PLANNED_HEAP.update(planned)
        torch._dynamo.reset()


def _register() -> None:
    # After `pip install` the entry point (pyproject.toml) makes the name known without this import.
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if _BACKENDS.get("bspfuse") is None:
        register_backend(bspfuse_backend, name="bspfuse")


_register()
