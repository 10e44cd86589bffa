"""Flash Decode: decode attention over a KV cache split across ranks, its states all-gathered and merged.

    # decode_partial -> reshape, all_gather(dim 0), wait (O and LSE) -> merge_states  =>  flash_decode{stage}

The BSP program (what the source language and a captured graph produce)::

    %o, %lse = decode_partial(%q, %k, %v[, %block_table][, %kv_lens])
    %o1 = reshape(%o) {shape=[1, B, Hq, D]}          %l1 = reshape(%lse) {shape=[1, B, Hq]}
    %og = wait(all_gather(%o1) {dim=0})              %lg = wait(all_gather(%l1) {dim=0})
    %out, %out_lse = merge_states(%og, %lg)

becomes one ``flash_decode`` op over the decode_partial's operands, keeping its attributes (``scale``;
``paged``: operand 3 is the block table; ``kv_lens``: the next operand is the per-batch length) and
adding ``stage`` (see ``bspfuse.kernels.flash_decode``) and ``result_types``. The stage comes from the
options (per-site mode, then a ``stage`` attribute on merge_states or decode_partial as a hint, then the
global mode): auto takes the stage `bspfuse tune` measured fastest for this step on the device (stage 0, the
BSP program, where nothing fused measured faster), else 3; push gives 3; stage0 (or bsp) .. stage3 pick one;
off leaves the program alone.
"""
from __future__ import annotations

from bspfuse.ir import Op, Program, Value, concrete
from bspfuse.passes import Decision, Estimate, Options, Pass

NAME = "fuse_flash_decode"
MODES = {"auto": 3, "push": 3, "bsp": 0, "stage0": 0, "stage1": 1, "stage2": 2, "stage3": 3}
STAGE_PLANS = {
    0: "stage 0 (BSP): split kernel, merge of splits, all_gather of the packed (O, LSE), merge of ranks",
    1: "stage 1: the all_gather becomes an RMA put kernel and a heap barrier",
    2: "stage 2: RMA put with per-(batch, head-tile) flags; the merge of ranks waits per tile, no barrier",
    3: "stage 3: one kernel per step; the last split of a tile pushes it with a flag, merges consume tiles "
       "as they arrive",
}
KERNEL_DTYPES = ("f16", "bf16", "f32")


class _NoMatch(Exception):
    """Why a merge_states is not the Flash Decode pattern (the Decision's reason)."""


def _producer(v: Value, opcode: str, what: str) -> Op:
    op = v.producer
    if op is None or op.opcode != opcode:
        found = "a program input" if op is None else f"{op.opcode}"
        raise _NoMatch(f"{what} %{v.name} is {found}, expected the result of {opcode}")
    return op


def _gathered_state(v: Value, what: str) -> tuple[Value, list[Op]]:
    """%v = wait(all_gather(reshape(%x) to [1, ...]) on dim 0) -> (%x, the three ops)."""
    wait = _producer(v, "wait", what)
    gather = _producer(wait.inputs[0], "all_gather", what)
    if gather.attrs.get("dim") != 0:
        raise _NoMatch(f"merge_states merges over dim 0 but %{gather.outputs[0].name} gathers dim "
                       f"{gather.attrs.get('dim')}")
    reshape = _producer(gather.inputs[0], "reshape", f"the gathered {what}")
    x = reshape.inputs[0]
    shape = list(reshape.outputs[0].type.shape)
    if shape != [1] + list(x.type.shape):
        raise _NoMatch(f"reshape %{reshape.outputs[0].name} to {shape} does not just add a leading dim of 1 "
                       f"to %{x.name} {list(x.type.shape)}")
    return x, [reshape, gather, wait]


def _match(merge: Op) -> tuple[Op, list[Op]]:
    """The decode_partial a merge_states finishes, and every op the fusion replaces."""
    og, lg = merge.inputs
    o, o_ops = _gathered_state(og, "O")
    lse, l_ops = _gathered_state(lg, "LSE")
    decode = _producer(o, "decode_partial", "the gathered O")
    if lse.producer is not decode:
        raise _NoMatch(f"O and LSE come from different ops (%{o.name} and %{lse.name})")
    if (o, lse) != tuple(decode.outputs):
        raise _NoMatch(f"the gathered O and LSE are swapped (%{o.name} is decode_partial's result "
                       f"{decode.outputs.index(o)})")
    return decode, [decode, *o_ops, *l_ops, merge]


def _check_fusible(program: Program, decode: Op, ops: list[Op]) -> None:
    q, k = decode.inputs[0], decode.inputs[1]
    if q.type.dtype not in KERNEL_DTYPES:
        raise _NoMatch(f"q %{q.name} is {q.type.dtype}; the kernels take {', '.join(KERNEL_DTYPES)}")
    head_dim = q.type.shape[2]
    if isinstance(head_dim, int) and head_dim > 512:
        raise _NoMatch(f"head dim {head_dim} of q %{q.name} is above the kernels' limit of 512")
    if q.type.layout.kind in ("sharded", "partial"):
        raise _NoMatch(f"q %{q.name} is {q.type.layout}; every rank must attend the same queries")
    if k.type.layout.kind == "replicated":
        raise _NoMatch(f"the KV cache %{k.name} is replicated: there is nothing to gather")
    expected = 3 + bool(decode.attrs.get("paged")) + bool(decode.attrs.get("kv_lens"))
    if len(decode.inputs) != expected:
        raise _NoMatch(f"decode_partial has {len(decode.inputs)} operands; its attributes (paged, kv_lens) "
                       f"call for {expected}")
    for extra in decode.inputs[3:]:
        if extra.type.dtype not in ("i32", "i64"):
            raise _NoMatch(f"%{extra.name} (block table or kv_lens) is {extra.type.dtype}, expected i32")
    inside = set(map(id, ops))
    users = program.users()
    outputs = set(map(id, program.outputs))
    for op in ops[:-1]:  # every intermediate must die inside the pattern
        for v in op.outputs:
            if id(v) in outputs:
                raise _NoMatch(f"%{v.name} is a program output: fusing would drop it")
            outside = [u for u in users.get(v, []) if id(u) not in inside]
            if outside:
                raise _NoMatch(f"%{v.name} is also read by {outside[0].opcode} "
                               f"(%{outside[0].outputs[0].name}): fusing would drop it")


def _stage(options: Options, site: str, merge: Op, decode: Op) -> tuple[int | None, bool]:
    """The stage asked for at this site (None: off) and whether it was auto, or _NoMatch for a mode decode has
    no form of."""
    mode = options.modes.get(site)
    if mode is None:
        hint = merge.attrs.get("stage", decode.attrs.get("stage"))
        mode = f"stage{hint}" if hint is not None else options.mode
    if mode == "off":
        return None, False
    if mode not in MODES:
        raise _NoMatch(f"mode '{mode}' has no Flash Decode form (use auto, push, bsp, stage0..stage3 or off)")
    return MODES[mode], mode == "auto"


def _decode_problem(program: Program, decode: Op):
    """The step as bspfuse.tune.DecodeProblem (this rank's keys), or None where a size is not known."""
    from bspfuse.tune import DecodeProblem

    def dims(v: Value) -> list:
        return [concrete(d, program.sizes, program.world_size) for d in v.type.shape]
    (B, Hq, D), k = dims(decode.inputs[0]), dims(decode.inputs[1])
    paged = bool(decode.attrs.get("paged"))
    S = dims(decode.inputs[3])[1] * k[1] if paged else k[1]
    sizes = (B, Hq, k[2], D, S, program.world_size)
    if not all(isinstance(n, int) for n in sizes) or decode.inputs[0].type.dtype not in KERNEL_DTYPES:
        return None
    return DecodeProblem(*sizes, decode.inputs[0].type.dtype, paged)


def _measured(program: Program, options: Options, decode: Op) -> tuple[int, Estimate] | None:
    """The stage measured fastest for this step on options.device (replayed from a CUDA graph where the
    options say steps replay), with the times per stage: stage 0 unless a fused stage measured faster."""
    from bspfuse import tune

    problem = _decode_problem(program, decode)
    entry = tune.table().get(options.device, problem) if problem is not None else None
    times = entry.decode_stage_times(options.replayable) if entry is not None else {}
    fused = {s: us for s, us in times.items() if s != "stage0"}
    if "stage0" not in times or not fused:
        return None
    best = min(fused, key=fused.get)
    stage = 0 if times["stage0"] <= fused[best] else int(best.removeprefix("stage"))
    graph = " (CUDA graphs)" if options.replayable else ""
    return stage, Estimate(options.device + graph, f"stage{stage}", times, measured=True, problem=problem)


def _fuse(program: Program, decode: Op, ops: list[Op], stage: int) -> Op:
    merge = ops[-1]
    attrs = {k: v for k, v in decode.attrs.items() if k != "stage"}
    attrs["stage"] = stage
    attrs["result_types"] = [v.type for v in merge.outputs]
    fused = Op("flash_decode", decode.inputs, attrs, merge.outputs, merge.origin or decode.origin)
    for v in fused.outputs:
        v.producer = fused
    at = program.ops.index(merge)
    program.ops[at] = fused
    gone = set(map(id, ops[:-1]))
    program.ops = [op for op in program.ops if id(op) not in gone]
    return fused


def run(program: Program, options: Options) -> tuple[Program, list[Decision]]:
    decisions = []
    for merge in program.find("merge_states"):
        out = merge.outputs[0]
        site = f"%{out.name} = merge_states(%{merge.inputs[0].name}, %{merge.inputs[1].name})" + (
            f" ({merge.origin})" if merge.origin else "")
        what = "split-KV attention, gather and merge"
        try:
            decode, ops = _match(merge)
            _check_fusible(program, decode, ops)
            stage, auto = _stage(options, out.name, merge, decode)
        except _NoMatch as e:
            decisions.append(Decision(NAME, site, False, str(e), what=what))
            continue
        if stage is None:
            decisions.append(Decision(NAME, site, False, "disabled by the options (mode off)", what=what))
            continue
        measured = _measured(program, options, decode) if auto else None
        reason, estimate = STAGE_PLANS[stage], None
        if measured is not None:
            stage, estimate = measured
            reason = f"{STAGE_PLANS[stage]}; measured the fastest stage on {options.device}"
        _fuse(program, decode, ops, stage)
        decisions.append(Decision(NAME, site, True, reason, estimate, what=what, schedule=f"stage {stage}"))
    return program, decisions


fuse_flash_decode = Pass(
    NAME, "decode_partial -> all_gather(O), all_gather(LSE) -> merge_states  =>  flash_decode{stage}", run)
