"""Fuse a collective with the matmul beside it into one kernel, and choose pull, push or no fusion.

    fuse_allgather_matmul:       wait(all_gather(x, 0)) -> matmul(., w) [-> pointwise]*  =>  fused_allgather_matmul(x, w)
    fuse_matmul_reduce_scatter:  matmul(a, w) -> wait(reduce_scatter(., 0)) [-> pointwise]*  =>  fused_matmul_reduce_scatter(a, w)
    fuse_matmul_allreduce:       matmul(a, w) -> wait(all_reduce(.)) [-> pointwise]*  =>  fused_matmul_allreduce(a, w)

Each candidate gets a Decision: fused (with the mode and the cost model's numbers) or not (with why).
"""
from __future__ import annotations

from dataclasses import dataclass

from bspfuse.ir import Op, Program, Value, concrete
from bspfuse.passes import Decision, Options, Pass

# Pointwise functions the GEMM epilogue can apply to the fp32 accumulator (bias reads a vector).
EPILOGUE_FNS = ("relu", "gelu", "silu", "sigmoid", "tanh", "neg", "identity", "bias")
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


# ----------------------------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class DeviceModel:
    """Rates the choice is made with (H200 figures measured on the 2-GPU machine, BASELINES.md)."""
    matmul_flops: float = 750e12  # achieved bf16 matmul rate
    link_bytes: float = 366e9  # peer copy, per direction
    sm_push_bytes: float = 20e9  # one SM storing to a peer (rma_bench.py measures it)
    nccl_latency_s: float = 30e-6  # a small NCCL collective, launch to completion
    nccl_efficiency: float = 0.65  # NCCL's bulk rate over the link rate (all_gather 64 MB: 0.197 ms)
    # AG+GEMM push, fitted to the same run: below ~2k rows the GEMM is too short to hide the first chunks.
    flag_round_trip_s: float = 3e-6  # 2.9 us measured (rma_bench.py, 2026-11-22)
    hbm_bytes: float = 3.8e12
    num_sms: int = 132
    # What the GEMM+RS / GEMM+AR kernels add over the matmul alone, fitted to the 2xH200 run of
    # 2026-11-22 (BENCHMARKS.md): a fixed part plus the moved bytes at an exposed rate. The partial
    # tiles are stored to peers from the GEMM's epilogue, so that traffic is not yet hidden behind
    # compute; the all-reduce kernel also pays a tail of final tiles broadcast at the end.
    epilogue_push_fixed_s: dict = None
    epilogue_push_bytes: float = 0.52e12

    def push_fixed(self, kind: str) -> float:
        return (self.epilogue_push_fixed_s or {"matmul_rs": 72e-6, "matmul_ar": 200e-6})[kind]


H200 = DeviceModel()


@dataclass(frozen=True)
class Choice:
    mode: str  # push | pull | off
    reason: str
    estimates_us: dict


def choose_mode(kind: str, M: int, N: int, K: int, world_size: int, dtype: str = "bf16",
                device: DeviceModel = H200, a_on_heap: bool = False) -> Choice:
    """Estimate BSP, push and pull for one fused op (M, N, K of the whole logical matmul) and pick the
    fastest. The estimates are first-order: they say which resource bounds each schedule."""
    from bspfuse.tile import default_comm_programs

    W, item = world_size, DTYPE_BYTES.get(dtype, 2)
    k_eff = K if kind == "ag_matmul" else K / W  # RS/AR multiply a K-shard on every rank
    t_mm = 2 * M * N * k_eff / device.matmul_flops
    if kind == "ag_matmul":
        moved = (W - 1) / W * M * K * item  # rows of A each rank receives
    elif kind == "matmul_rs":
        moved = (W - 1) / W * M * N * item  # partials each rank sends
    else:
        moved = 2 * (W - 1) / W * M * N * item  # partials out, finished tiles back
    t_nccl = device.nccl_latency_s + moved / (device.link_bytes * device.nccl_efficiency)
    est = {"bsp": t_mm + t_nccl}
    if kind == "ag_matmul":
        comm = default_comm_programs(kind, M, N, K, W)
        t_gemm = t_mm * device.num_sms / (device.num_sms - comm)  # comm programs take SMs from the GEMM
        t_link = moved / min(device.link_bytes, comm * device.sm_push_bytes)
        first_chunk = 128 * K * item / device.sm_push_bytes  # the first remote rows, if local rows run out
        local_part = t_gemm / W
        exposed = max(0.0, t_link - (t_gemm - local_part)) + (first_chunk if local_part < first_chunk else 0)
        est["push"] = t_gemm + exposed + device.flag_round_trip_s
        copy_in = 0.0 if a_on_heap else M / W * K * item * 2 / device.hbm_bytes
        est["pull"] = est["push"] + copy_in + 2 * device.flag_round_trip_s  # entry and exit handshakes
    else:
        # Tiles of peers' rows are computed first and pushed from the epilogue; own rows wait at the end.
        est["push"] = t_mm + device.push_fixed(kind) + moved / device.epilogue_push_bytes
    us = {k: round(v * 1e6, 1) for k, v in est.items()}
    best = min(est, key=est.get)
    if best == "bsp":
        return Choice("off", f"the unfused schedule is estimated faster ({us})", us)
    why = {"push": "push: peers' rows/partials move once, written by the producer, no handshake",
           "pull": "pull: A is already on the heap and reads are consumer-paced"}[best]
    return Choice(best, f"{why}; estimated {us[best]} us against BSP {us['bsp']} us", us)


# ----------------------------------------------------------------------------------------------- matching


def _site(*ops: Op) -> str:
    names = ", ".join(f"%{o.outputs[0].name}" for o in ops)
    origin = next((o.origin for o in ops if o.origin), None)
    return names + (f" ({origin})" if origin else "")


def _sole_user(users, v: Value) -> Op | None:
    us = users.get(v, [])
    return us[0] if len(us) == 1 else None


def _absorb_epilogue(users, v: Value, outputs: list[Value]) -> tuple[list[Op], list[str], list[Value]]:
    """The chain of pointwise ops after `v` that the epilogue can apply, each the sole user of the last."""
    chain, fns, extra = [], [], []
    while v not in outputs:
        nxt = _sole_user(users, v)
        if nxt is None or nxt.opcode != "pointwise" or nxt.attrs.get("fn") not in EPILOGUE_FNS:
            break
        if nxt.attrs["fn"] == "bias":
            other = [x for x in nxt.inputs if x is not v]
            if len(other) != 1 or other[0].type.rank != 1 or nxt.inputs[0] is not v:
                break
            extra.append(other[0])
        elif len(nxt.inputs) != 1:
            break
        chain.append(nxt)
        fns.append(nxt.attrs["fn"])
        v = nxt.outputs[0]
    return chain, fns, extra


def _shape(p: Program, v: Value) -> list[int] | None:
    try:
        return [concrete(d, p.sizes, p.world_size) for d in v.type.shape]
    except ValueError:
        return None


def _replace(p: Program, old: list[Op], new: Op) -> None:
    """Put `new` where the last of `old` stood; redirect uses of the last old result to new's result."""
    last = old[-1]
    idx = p.ops.index(last)
    p.ops[idx] = new
    for o in old[:-1]:
        p.ops.remove(o)
    result = last.outputs[0]
    new.outputs[0].name = result.name
    for op in p.ops:
        op.inputs = tuple(new.outputs[0] if x is result else x for x in op.inputs)
    p.outputs = [new.outputs[0] if x is result else x for x in p.outputs]


def _fused(opcode: str, inputs, attrs: dict, result: Value, origin) -> Op:
    op = Op(opcode, tuple(inputs), dict(attrs, result_types=[result.type]), origin=origin)
    op.outputs = (Value(result.name, result.type, op),)
    return op


def _common_checks(p: Program, mm: Op, coll: Op) -> str | None:
    dtype = mm.outputs[0].type.dtype
    if dtype not in ("bf16", "f16", "f32"):
        return f"dtype {dtype}: the fused kernels handle bf16, f16 and f32"
    if p.world_size is None:
        return "the world size is not known"
    a, b = mm.inputs
    if a.type.rank != 2:
        return f"the matmul's A operand has rank {a.type.rank}; the fused kernel takes 2-D A (reshape first)"
    shapes = [_shape(p, v) for v in (a, b)]
    if None in shapes:
        return "the shapes are symbolic with no sizes bound"
    item = DTYPE_BYTES[dtype]
    (m, k), (_, n) = shapes
    for name, size in (("N", n), ("K", k)):
        if size * item % 16:
            return f"{name}={size} {dtype} rows are not 16-byte aligned (the kernel's TMA loads need it)"
    return None


def _decide(p: Program, options: Options, site_value: str, kind: str, M: int, N: int, K: int, dtype: str) -> Choice:
    forced = options.mode_for(site_value)
    auto = choose_mode(kind, M, N, K, p.world_size, dtype)
    if forced == "auto":
        return auto
    if forced == "off":
        return Choice("off", "fusion turned off by the user", auto.estimates_us)
    if forced == "pull" and kind != "ag_matmul":
        return Choice("push", f"pull was asked for, but {kind} only has a push form (partials are produced "
                              f"where they are computed)", auto.estimates_us)
    return Choice(forced, f"{forced} forced by the user (the cost model would pick {auto.mode}: {auto.reason})",
                  auto.estimates_us)


def _hint_mode(op: Op, options: Options) -> Options:
    hint = op.attrs.get("hint_mode")
    if hint and hint != "auto":
        return Options(mode=hint, device=options.device, modes=options.modes)
    return options


# ----------------------------------------------------------------------------------------------- passes


def _run_allgather_matmul(p: Program, options: Options):
    decisions, users = [], p.users()
    for ag in list(p.find("all_gather")):
        w = _sole_user(users, ag.outputs[0])
        if w is None or w.opcode != "wait":
            continue
        gathered = w.outputs[0]
        us = users.get(gathered, [])
        mms = [u for u in us if u.opcode == "matmul"]
        site = _site(ag, w, *mms[:1])
        say = lambda ok, why: decisions.append(Decision("fuse_allgather_matmul", site, ok, why))
        if not mms:
            say(False, "the gathered tensor feeds no matmul")
            continue
        if len(us) != 1:
            say(False, f"the gathered tensor has {len(us)} users; fusing would still need it materialized")
            continue
        mm = mms[0]
        if mm.inputs[0] is not gathered:
            say(False, "the gathered tensor is the matmul's B operand, not A: only row-gathered A fuses")
            continue
        if ag.attrs["dim"] != 0:
            say(False, f"gather on dim {ag.attrs['dim']}: the kernel gathers rows (dim 0) of A")
            continue
        why = _common_checks(p, mm, ag)
        if why:
            say(False, why)
            continue
        g = p.graph()
        import networkx as nx
        b_prod = mm.inputs[1].producer
        if b_prod is not None and (b_prod is ag or b_prod is w or nx.has_path(g, ag, b_prod)):
            say(False, "B depends on the gathered A: fusing would form a cycle")
            continue
        (M, K), (_, N) = _shape(p, gathered), _shape(p, mm.inputs[1])
        dtype = gathered.type.dtype
        opts = _hint_mode(mm, _hint_mode(ag, options))
        choice = _decide(p, opts, mm.outputs[0].name, "ag_matmul", M, N, K, dtype)
        if choice.mode == "off":
            say(False, choice.reason)
            continue
        chain, fns, extra = _absorb_epilogue(users, mm.outputs[0], p.outputs)
        last = (chain[-1] if chain else mm).outputs[0]
        fused = _fused("fused_allgather_matmul", [ag.inputs[0], mm.inputs[1], *extra],
                       {"mode": choice.mode, "epilogue": fns, "dim": 0}, last, mm.origin or ag.origin)
        _replace(p, [ag, w, mm, *chain], fused)
        users = p.users()
        say(True, f"{choice.reason}" + (f"; epilogue {'+'.join(fns)} fused" if fns else ""))
    return p, decisions


def _run_matmul_collective(kind: str, coll_name: str, opcode: str, pass_name: str):
    def run(p: Program, options: Options):
        decisions, users = [], p.users()
        for coll in list(p.find(coll_name)):
            w = _sole_user(users, coll.outputs[0])
            mm = coll.inputs[0].producer
            site = _site(*(x for x in (mm, coll) if x is not None))
            say = lambda ok, why: decisions.append(Decision(pass_name, site, ok, why))
            if w is None or w.opcode != "wait":
                say(False, "the collective has no single wait")
                continue
            if mm is None or mm.opcode != "matmul":
                say(False, f"the {coll_name} input is not produced by a matmul "
                           f"({mm.opcode if mm else 'a program input'})")
                continue
            if len(users.get(mm.outputs[0], [])) != 1:
                say(False, "the matmul result has other users besides the collective (kept unfused)")
                continue
            if kind == "matmul_rs" and coll.attrs["dim"] != 0:
                say(False, f"scatter on dim {coll.attrs['dim']}: the kernel scatters rows (dim 0)")
                continue
            if coll.attrs.get("reduce", "sum") != "sum":
                say(False, f"reduce op {coll.attrs['reduce']}: the kernel sums")
                continue
            why = _common_checks(p, mm, coll)
            if why:
                say(False, why)
                continue
            (M, Kl), (_, N) = _shape(p, mm.inputs[0]), _shape(p, mm.inputs[1])
            if M % p.world_size:
                say(False, f"M={M} rows do not split evenly over {p.world_size} ranks")
                continue
            opts = _hint_mode(coll, _hint_mode(mm, options))
            choice = _decide(p, opts, w.outputs[0].name, kind, M, N, Kl * p.world_size, mm.outputs[0].type.dtype)
            if choice.mode == "off":
                say(False, choice.reason)
                continue
            chain, fns, extra = _absorb_epilogue(users, w.outputs[0], p.outputs)
            last = (chain[-1] if chain else w).outputs[0]
            fused = _fused(opcode, [mm.inputs[0], mm.inputs[1], *extra],
                           {"mode": choice.mode, "epilogue": fns, **({"dim": 0} if kind == "matmul_rs" else {})},
                           last, mm.origin or coll.origin)
            _replace(p, [mm, coll, w, *chain], fused)
            users = p.users()
            say(True, f"{choice.reason}" + (f"; epilogue {'+'.join(fns)} fused" if fns else ""))
        return p, decisions
    return run


fuse_allgather_matmul = Pass(
    "fuse_allgather_matmul",
    "wait(all_gather(x, 0)) -> matmul(., w) [-> pointwise]* => fused_allgather_matmul(x, w) {pull|push}",
    _run_allgather_matmul)
fuse_matmul_reduce_scatter = Pass(
    "fuse_matmul_reduce_scatter",
    "matmul(a, w) -> wait(reduce_scatter(., 0)) [-> pointwise]* => fused_matmul_reduce_scatter(a, w) {push}",
    _run_matmul_collective("matmul_rs", "reduce_scatter", "fused_matmul_reduce_scatter", "fuse_matmul_reduce_scatter"))
fuse_matmul_allreduce = Pass(
    "fuse_matmul_allreduce",
    "matmul(a, w) -> wait(all_reduce(.)) [-> pointwise]* => fused_matmul_allreduce(a, w) {push}",
    _run_matmul_collective("matmul_ar", "all_reduce", "fused_matmul_allreduce", "fuse_matmul_allreduce"))
