"""Fuse a collective with the matmul beside it into one kernel, and choose pull, push or no fusion.

    fuse_allgather_matmul:       wait(all_gather(x, 0)) -> matmul(., w) [-> pointwise]*  =>  fused_allgather_matmul(x, w)
    fuse_matmul_reduce_scatter:  matmul(a, w) -> wait(reduce_scatter(., 0)) [-> pointwise]*  =>  fused_matmul_reduce_scatter(a, w)
    fuse_matmul_allreduce:       matmul(a, w) -> wait(all_reduce(.)) [-> pointwise]*  =>  fused_matmul_allreduce(a, w)

Each candidate gets a Decision: fused (with the mode and the cost model's numbers) or not (with why).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from bspfuse.devices import Device, device as lookup_device
from bspfuse.ir import Op, Program, Value, concrete, dims_equal, infer
from bspfuse.passes import Decision, Estimate, Options, Pass
from bspfuse.tile import HOST_SIDE_AG_MODES
from bspfuse.tune.search import Problem

# Pointwise functions the GEMM epilogue can apply to the fp32 accumulator (bias reads a vector).
EPILOGUE_FNS = ("relu", "gelu", "silu", "sigmoid", "tanh", "neg", "identity", "bias")
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


# ----------------------------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class DeviceModel:
    """The cost model's view of one device-table entry (bspfuse.devices, where each figure's source is), in
    seconds, bytes/s and flop/s: `DeviceModel.of("H100")`. The estimates are device times per call in a stream
    of calls, the host launching ahead (as in a forward pass); a single call after an idle host adds 15-50 us of
    launch to every schedule (host_bench.py)."""
    name: str
    matmul_flops: float  # achieved bf16 matmul rate
    link_bytes: float  # peer copy, per direction
    sm_push_bytes: float  # one program storing to a peer
    nccl_latency_s: float  # a small NCCL collective
    nccl_efficiency: float  # NCCL's bulk rate over the link rate
    flag_round_trip_s: float
    hbm_bytes: float  # read + write
    num_sms: int
    smem_bytes: int  # shared memory one program may take
    # GEMM+RS/AR direct: the epilogue's remote stores (partials; AR also finished tiles) cost time beyond the
    # GEMM, the traffic at an exposed rate plus a tail per dependent hop; push's comm programs each move staged
    # tiles at a rate (wait, copy, flag)
    direct_exposed_bytes: float
    direct_hop_s: float
    comm_program_bytes: float
    # AG+GEMM copy_engine: the side stream's copies move at the peer copy rate and leave every SM to the GEMM,
    # plus a fixed cost per call (stream waits, flag writes)
    copy_engine_fixed_s: float
    # a fused schedule must be estimated this much faster than BSP to be chosen (the spread between runs)
    min_gain: float
    # a GEMM: max(flops / rate, bytes / stream rate) + fixed; cuBLAS's (matmul_flops, hbm_bytes, matmul_fixed_s)
    # and the fused kernels' core's
    matmul_fixed_s: float
    core_flops: float
    core_bytes: float
    core_fixed_s: float
    # the AG+GEMM schedules auto chooses among (all are estimated and shown)
    ag_auto_modes: tuple = ("push", "pull", "copy_engine")

    @classmethod
    def of(cls, name: str | Device) -> DeviceModel:
        """The table's figures for `name` ('H200', 'H100', ... or a Device), converted."""
        d = lookup_device(name)
        return cls(d.name, matmul_flops=d.matmul_tflops.value * 1e12, link_bytes=d.link_gbps.value * 1e9,
                   sm_push_bytes=d.sm_push_gbps.value * 1e9, nccl_latency_s=d.collective_latency_us.value * 1e-6,
                   nccl_efficiency=d.nccl_efficiency.value, flag_round_trip_s=d.flag_round_trip_us.value * 1e-6,
                   hbm_bytes=d.hbm_gbps.value * 1e9, num_sms=int(d.num_sms.value),
                   smem_bytes=int(d.program_smem_kb.value * 1024),
                   direct_exposed_bytes=d.direct_exposed_gbps.value * 1e9, direct_hop_s=d.direct_hop_us.value * 1e-6,
                   comm_program_bytes=d.comm_program_gbps.value * 1e9,
                   copy_engine_fixed_s=d.copy_engine_fixed_us.value * 1e-6, min_gain=d.min_gain.value,
                   matmul_fixed_s=d.matmul_fixed_us.value * 1e-6, core_flops=d.core_matmul_tflops.value * 1e12,
                   core_bytes=d.core_stream_gbps.value * 1e9, core_fixed_s=d.core_fixed_us.value * 1e-6)

    def gemm_s(self, flops: float, bytes_: float, fused: bool = False) -> float:
        """Seconds of one GEMM of `flops` reading and writing `bytes_`: cuBLAS's, or the fused kernels' core's."""
        if fused:
            return max(flops / self.core_flops, bytes_ / self.core_bytes) + self.core_fixed_s
        return max(flops / self.matmul_flops, bytes_ / self.hbm_bytes) + self.matmul_fixed_s


_WHY = {"push": "each rank writes its data into its peers' buffers as soon as it is ready, and no rank waits to be "
                "asked",
        "pull": "A is already on the heap, and each rank reads the rows it needs when it gets to them",
        "direct": "each partial tile goes to the rank that owns its rows as soon as the GEMM makes it, so the "
                  "traffic spreads over the GEMM",
        "copy_engine": "the GPU's copy engines move the rows, so every SM multiplies"}


@dataclass(frozen=True)
class Choice:
    mode: str  # push | pull | direct | off
    reason: str
    estimates_us: dict


def choose_mode(kind: str, M: int, N: int, K: int, world_size: int, dtype: str = "bf16",
                device: str | Device | DeviceModel = "H200", a_on_heap: bool = False, copy_bytes: int = 0) -> Choice:
    """Estimate BSP and the fused schedules of one op (M, N, K of the whole logical matmul) on `device` (a name
    in the device table, an entry, or a DeviceModel) and pick the fastest: AG+GEMM push or pull, GEMM+RS/AR
    direct or push. The estimates are first-order device times per call in a stream of calls (the host's
    launch is left out: every schedule pays one); they say which resource bounds each schedule."""
    from bspfuse.tile import choose_config

    device = device if isinstance(device, DeviceModel) else DeviceModel.of(device)
    W, item = world_size, DTYPE_BYTES.get(dtype, 2)
    if W == 1:
        t = device.gemm_s(2 * M * N * K, (M * K + K * N + M * N) * item)
        return Choice("off", "a world of one rank: the collective moves nothing, so there is nothing to overlap",
                      {"bsp": round(t * 1e6, 1)})
    k_eff = K if kind == "ag_matmul" else K / W  # RS/AR multiply a K-shard on every rank
    # a few rows multiply a whole weight: then reading it from HBM, not the MMAs, bounds the GEMM; the unfused
    # program's GEMM is cuBLAS's (t_mm), the fused schedules' the fused kernels' core (t_core)
    flops, operand_bytes = 2 * M * N * k_eff, (M * k_eff + k_eff * N + M * N) * item
    t_mm, t_core = device.gemm_s(flops, operand_bytes), device.gemm_s(flops, operand_bytes, fused=True)
    if kind == "ag_matmul":
        moved = (W - 1) / W * M * K * item  # rows of A each rank receives
    elif kind == "matmul_rs":
        moved = (W - 1) / W * M * N * item  # partials each rank sends
    else:
        moved = 2 * (W - 1) / W * M * N * item  # partials out, finished tiles back
    t_nccl = device.nccl_latency_s + moved / (device.link_bytes * device.nccl_efficiency)
    est = {"bsp": t_mm + t_nccl}
    if kind == "ag_matmul":
        cfg = choose_config(kind, M, N, K, W, device.num_sms)
        comm = cfg.comm_programs
        t_gemm = t_core * device.num_sms / (device.num_sms - comm)  # comm programs take SMs from the GEMM
        push_rate = min(device.link_bytes, comm * device.sm_push_bytes)
        t_link = moved / push_rate
        first_chunk = cfg.BM * K * item / push_rate  # the first remote rows, if local rows run out
        local_part = t_gemm / W
        exposed = max(0.0, t_link - (t_gemm - local_part)) + (first_chunk if local_part < first_chunk else 0)
        est["push"] = t_gemm + exposed + device.flag_round_trip_s
        copy_in = 0.0 if a_on_heap else M / W * K * item * 2 / device.hbm_bytes
        est["pull"] = est["push"] + copy_in + 2 * device.flag_round_trip_s  # entry and exit handshakes
        # copy_engine: all SMs multiply; the copies (a quarter of the rows first) run beside them
        local_part = t_core / W
        exposed = max(0.0, moved / device.link_bytes - (t_core - local_part)) \
            + max(0.0, moved / (W - 1) / 4 / device.link_bytes - local_part)
        est["copy_engine"] = t_core + exposed + device.copy_engine_fixed_s
    else:
        # Both interleave own and peer tiles, so traffic spreads over the GEMM. direct stores from the
        # epilogue (flags raised a tile later); push stages tiles locally and comm programs move them,
        # taking SMs from the GEMM and moving at most comm * comm_program_bytes, from the end of the
        # first wave of tiles on (nothing is staged before it).
        hops = 2 if kind == "matmul_ar" else 1
        est["direct"] = t_core + hops * device.direct_hop_s + moved / device.direct_exposed_bytes
        cfg = choose_config(kind, M, N, K // W, W, device.num_sms)
        gemm_programs = device.num_sms - cfg.comm_programs
        t_gemm = t_core * device.num_sms / gemm_programs
        tiles = -(-M // W // cfg.BM) * W * -(-N // cfg.BN)
        first_wave = t_gemm / -(-tiles // gemm_programs)
        t_move = moved / (cfg.comm_programs * device.comm_program_bytes)
        est["push"] = max(t_gemm, first_wave + t_move) + hops * device.direct_hop_s
    for schedule in est:  # operands the fused schedules copy first (read and written once)
        est[schedule] += 0 if schedule == "bsp" else 2 * copy_bytes / device.hbm_bytes
    us = {k: round(v * 1e6, 1) for k, v in est.items()}
    chosen = {k: v for k, v in est.items() if kind != "ag_matmul" or k == "bsp" or k in device.ag_auto_modes}
    best = min(chosen, key=chosen.get)
    sm_modes = [m for m in ("push", "pull") if m in chosen]
    if best == "copy_engine" and sm_modes and est[best] > (1 - device.min_gain) * min(est[m] for m in sm_modes):
        # copy_engine and push measured within 3% of each other, either way, at N >= 8192 (gemm_bench, three
        # machine starts); it clearly wins where push's comm programs take a larger share (N <= 5120)
        best = min(sm_modes, key=est.get)
    if best == "bsp":
        return Choice("off", "the unfused schedule is estimated faster", us)
    if est[best] > est["bsp"] * (1 - device.min_gain):
        return Choice("off", f"{best} is estimated less than {device.min_gain:.0%} faster than the unfused "
                             "schedule, within the spread between runs", us)
    return Choice(best, _WHY[best], us)


# ----------------------------------------------------------------------------------------------- matching


def _site(*ops: Op) -> str:
    names = ", ".join(f"%{o.outputs[0].name}" for o in ops)
    origins = [o.origin for o in ops if o.origin]
    # from torch.compile, the matmul that names a module the user wrote ("mm_3 in attention.wo"), not the
    # collective DTensor inserted; from source, the first position
    named = [o.origin for o in sorted(ops, key=lambda o: o.opcode != "matmul") if o.origin and " in " in o.origin]
    origin = named[0] if named else origins[0] if origins else None
    return names + (f" ({origin})" if origin else "")


def _sole_user(users, v: Value) -> Op | None:
    us = users.get(v, [])
    return us[0] if len(us) == 1 else None


def _absorb_epilogue(users, v: Value, outputs: list[Value]) -> tuple[list[Op], list[str], list[Value]]:
    """The chain of pointwise ops after `v` that the epilogue can apply, each the sole user of the last."""
    chain, fns, extra = [], [], []
    while v not in outputs:
        nxt = _sole_user(users, v)
        if nxt is not None and nxt.opcode == "reshape" and dims_equal(nxt.outputs[0].type.shape[-1], v.type.shape[-1]):
            chain.append(nxt)  # [M, N] <-> [batch, seq, N]: the same rows (the rewrite reshapes the result)
            v = nxt.outputs[0]
            continue
        # x + b with b a vector of x's last dim (torch writes a linear's bias after an all-reduce so): a bias
        bias_add = (nxt is not None and nxt.opcode == "pointwise" and nxt.attrs.get("fn") == "add"
                    and len(nxt.inputs) == 2 and any(x is not v and x.type.rank == 1
                                                    and dims_equal(x.type.shape[0], v.type.shape[-1])
                                                    for x in nxt.inputs))
        if nxt is None or nxt.opcode != "pointwise" or (nxt.attrs.get("fn") not in EPILOGUE_FNS and not bias_add):
            break
        if nxt.attrs.get("approximate", "none") != "none":  # the kernel's gelu is the exact (erf) one
            break
        if nxt.attrs["fn"] == "bias" or bias_add:
            other = [x for x in nxt.inputs if x is not v]
            if len(other) != 1 or other[0].type.rank != 1 or (nxt.inputs[0] is not v and not bias_add) or extra:
                break  # the kernel reads one bias vector
            extra.append(other[0])
            chain.append(nxt)
            fns.append("bias")
            v = nxt.outputs[0]
            continue
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


def _replace(p: Program, old: list[Op], new: Op, replaced: list[Value]) -> None:
    """Put `new` where the last of `old` stood and redirect uses of each `replaced` value to new's result of
    the same position; then restore def-before-use order (a kept value may have users ahead of `new`)."""
    idx = p.ops.index(old[-1])
    p.ops[idx] = new
    for o in old[:-1]:
        p.ops.remove(o)
    subst = dict(zip(replaced, new.outputs))
    for op in p.ops:
        op.inputs = tuple(subst.get(x, x) for x in op.inputs)
    p.outputs = [subst.get(x, x) for x in p.outputs]
    _stable_topological_sort(p)


def _stable_topological_sort(p: Program) -> None:
    """Order ops so every value is defined before use, moving as little as possible (Kahn's algorithm,
    always taking the earliest ready op of the current order)."""
    import heapq

    position = {op: i for i, op in enumerate(p.ops)}
    users = p.users()
    waiting = {op: sum(1 for v in set(op.inputs) if v.producer is not None) for op in p.ops}
    ready = [position[op] for op, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        op = p.ops[heapq.heappop(ready)]
        order.append(op)
        for v in op.outputs:
            for u in set(users.get(v, [])):
                waiting[u] -= sum(1 for x in set(u.inputs) if x is v)
                if waiting[u] == 0:
                    heapq.heappush(ready, position[u])
    p.ops[:] = order  # a cycle would drop ops here; the verifier after the pass names it


def _fused(opcode: str, inputs, attrs: dict, results: list[Value], origin) -> Op:
    op = Op(opcode, tuple(inputs), dict(attrs, result_types=[r.type for r in results]), origin=origin)
    op.outputs = tuple(Value(r.name, r.type, op) for r in results)
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


def _decide(p: Program, options: Options, site_value: str, kind: str, M: int, N: int, K: int,
            dtype: str, copy_bytes: int = 0) -> tuple[Choice, Estimate]:
    """The mode to fuse with ("off": not at all) and the cost model's view, which the Decision carries
    apart from the reason so that recalibrating the model changes only the estimate. Where `bspfuse tune`
    measured this GEMM on the device (bspfuse.tune), auto takes the measurement instead, and never a fused
    schedule that measured slower than the unfused program."""
    forced = options.mode_for(site_value)
    device = DeviceModel.of(options.device)
    if options.replayable:
        device = replace(device, ag_auto_modes=("push", "pull"))
    problem = Problem.of_logical(kind, M, N, K, p.world_size, dtype)
    auto = choose_mode(kind, M, N, K, p.world_size, dtype, device=device, copy_bytes=copy_bytes)
    estimate = Estimate(device.name, auto.mode, auto.estimates_us, problem=problem)
    measured = _measured(device, problem, options)
    if measured is not None:
        auto, estimate = measured
    if options.replayable and kind == "ag_matmul" and forced in HOST_SIDE_AG_MODES:
        return Choice(auto.mode, f"{forced} cannot replay from a CUDA graph ({HOST_SIDE_AG_MODES[forced]}); "
                                 f"{auto.reason}", auto.estimates_us), estimate
    if forced == "auto" and auto.mode == "off" and options.fuse_unprofitable:
        return Choice("push", f"push, to check the kernel: the cost model keeps BSP on {device.name} ({auto.reason})",
                      auto.estimates_us), estimate
    if forced == "auto":
        return auto, estimate
    if forced == "off":
        return Choice("off", "fusion turned off by the user", auto.estimates_us), estimate
    if forced == "copy_engine" and kind != "ag_matmul":
        return Choice(auto.mode, f"copy_engine moves AG+GEMM's rows only (partials exist only inside the kernel); "
                                 f"{auto.reason}", auto.estimates_us), estimate
    return Choice(forced, f"{forced} forced by the user", auto.estimates_us), estimate


def _measured(device: DeviceModel, problem: Problem, options: Options) -> tuple[Choice, Estimate] | None:
    """auto's choice from a tuned entry of this GEMM on this device and world (either B layout), if any: the
    fastest schedule measured, the unfused program whenever it measured as fast or faster."""
    from bspfuse import tune

    for layout in ("nk", "kn"):
        entry = tune.table().get(device.name, replace(problem, b_layout=layout))
        if entry is not None and entry.unfused_us is not None:
            break
    else:
        return None
    times = {("bsp" if s == tune.UNFUSED else s): us for s, us in entry.schedule_times().items()
             if s == tune.UNFUSED or not options.replayable or s not in HOST_SIDE_AG_MODES}
    fused = {s: us for s, us in times.items() if s != "bsp"}
    if not fused or min(fused.values()) >= times["bsp"]:
        why = "every fused schedule measured slower than the unfused program" if fused else \
            "no fused schedule ran when it was tuned"
        return Choice("off", why, times), Estimate(device.name, "off", times, measured=True, problem=problem)
    best = min(fused, key=fused.get)
    return (Choice(best, f"{_WHY[best]}; measured the fastest", times),
            Estimate(device.name, best, times, measured=True, problem=problem))


def _hint_mode(op: Op, options: Options) -> Options:
    hint = op.attrs.get("hint_mode")
    if hint and hint != "auto":
        return replace(options, mode=hint)
    return options


# ----------------------------------------------------------------------------------------------- passes


def _merges_rows(op: Op, v: Value) -> bool:
    """`op` reshapes `v` ([..., H]) into rows [prod(...), H]: the row order is kept."""
    if op.opcode != "reshape" or op.inputs[0] is not v or v.type.rank < 2:
        return False
    out = op.outputs[0].type
    return out.rank == 2 and dims_equal(out.shape[1], v.type.shape[-1])


def _read_as_b(users, v: Value) -> bool:
    """Whether `v`, through reshapes and transposes, reaches some matmul as its B operand."""
    todo, seen = [v], set()
    while todo:
        x = todo.pop()
        for u in users.get(x, []):
            if u.opcode == "matmul" and u.inputs[1] is x:
                return True
            if u.opcode in ("reshape", "transpose") and u not in seen:
                seen.add(u)
                todo.append(u.outputs[0])
    return False


def _run_allgather_matmul(p: Program, options: Options):
    decisions, users = [], p.users()
    for ag in list(p.find("all_gather")):
        w = _sole_user(users, ag.outputs[0])
        if w is None or w.opcode != "wait":
            continue
        gathered = w.outputs[0]
        us = users.get(gathered, [])
        # the gathered A as rows: itself, or [batch, seq, H] reshaped to [batch * seq, H] (once per matmul)
        views = [u for u in us if _merges_rows(u, gathered)]
        rows = [gathered, *(v.outputs[0] for v in views)]
        mms = [u for r in rows for u in users.get(r, []) if u.opcode == "matmul" and u.inputs[0] is r]
        site = _site(ag, w, *mms[:1])
        say = lambda ok, why, estimate=None: decisions.append(
            Decision("fuse_allgather_matmul", site, ok, why, estimate, "all-gather + matmul",
                     choice.mode if ok else ""))
        choice = None
        if not mms:
            if _read_as_b(users, gathered):
                say(False, "the gathered tensor is read only as a matmul's B operand (a weight gradient, x^T @ dy): "
                           "the kernel gathers the rows of A")
                continue
            readers = ", ".join(sorted({u.opcode if u.opcode != "opaque" else u.attrs["target"] for u in us}))
            say(False, f"no matmul reads the gathered tensor as its A operand (its readers: {readers or 'none'})")
            continue
        d, rank = ag.attrs["dim"], gathered.type.rank
        if not (d == 0 or (d == 1 and rank == 3)):
            say(False, f"gather on dim {d} of a rank-{rank} tensor: the kernel gathers rows (dim 0) or the "
                       "sequence of a [batch, seq, hidden] tensor (dim 1)")
            continue
        why = _common_checks(p, mms[0], ag)
        if why:
            say(False, why)
            continue
        g = p.graph()
        import networkx as nx

        def independent(mm: Op) -> bool:  # B must not depend on the gathered A, or fusing forms a cycle
            b_prod = mm.inputs[1].producer
            return b_prod is None or not (b_prod in (ag, w) or nx.has_path(g, ag, b_prod))

        candidates = [mm for mm in mms if independent(mm)]
        if not candidates:
            say(False, "B depends on the gathered A: fusing would form a cycle")
            continue
        # Matmuls of the gathered A with other weights (wq/wk/wv, w1/w3) join the kernel: their column tiles
        # extend its N range, so the rows move once for all and no copy of the gathered A is needed. The widest
        # comes first (its epilogue fuses when it is alone). Any other user reads the gathered A the kernel
        # leaves behind (a last result, copied out of its staging buffer).
        candidates.sort(key=lambda m: -_shape(p, m.inputs[1])[1])
        mm = candidates[0]
        joined = [m for m in candidates[1:] if _joins(p, mm, m)]
        site = _site(ag, w, mm, *joined)
        (M, K) = _shape(p, mm.inputs[0])
        N = sum(_shape(p, m.inputs[1])[1] for m in [mm, *joined])
        dtype = gathered.type.dtype
        opts = _hint_mode(mm, _hint_mode(ag, options))
        choice, estimate = _decide(p, opts, mm.outputs[0].name, "ag_matmul", M, N, K, dtype)
        if choice.mode == "off":
            say(False, choice.reason, estimate)
            continue
        fused_mms = {mm, *joined}
        used_views = [v for v in views if v.outputs[0] not in p.outputs
                      and all(u in fused_mms for u in users.get(v.outputs[0], []))]
        # every other reader of the gathered A: ops, and the program's outputs (a training forward returns it,
        # saved for the backward)
        readers = [u for u in us if u not in fused_mms and u not in used_views]
        returned = any(o is gathered or o.producer in views for o in p.outputs)
        others = len(readers) + sum(1 for o in p.outputs if o is gathered)
        if others and choice.mode == "direct":
            say(False, f"the gathered tensor has {others} more readers and direct mode keeps no gathered copy",
                estimate)
            continue
        if others and options.replayable:
            say(False, f"the gathered tensor has {others} more readers: the kernel's copy of it sits in the slot "
                       "the host counted to, which a CUDA graph's replay would not count", estimate)
            continue
        gate = _swiglu(p, users, mm, joined[0]) if len(joined) == 1 else None
        if gate:  # silu(A @ W_gate) * (A @ W_up): one kernel computes both tiles and stores their product
            (mm, up), chain, product = gate
            joined, fns, extra, results = [up], ["swiglu"], [], [product]
        else:
            chain, fns, extra = _absorb_epilogue(users, mm.outputs[0], p.outputs)  # the widest's own chain
            results = [(chain[-1] if chain else mm).outputs[0], *(m.outputs[0] for m in joined)]
        results += [gathered] if others else []
        fused = _fused("fused_allgather_matmul", [ag.inputs[0], mm.inputs[1], *(m.inputs[1] for m in joined), *extra],
                       {"mode": choice.mode, "epilogue": fns, "dim": d, "gathered_out": bool(others),
                        **({"weights": 1 + len(joined)} if joined else {})},
                       results, mm.origin or ag.origin)
        _replace(p, sorted([ag, w, *used_views, mm, *chain, *joined], key=p.ops.index), fused, results)
        users = p.users()
        names = ", ".join(_name(m) for m in joined)
        kept = (f"; the kernel also writes out the gathered A for {others} other reader{'s' if others > 1 else ''}"
                + (" (the graph returns it: saved for the backward)" if returned else "")) if others else ""
        say(True, f"{choice.reason}" + (f"; the {'+'.join(fns)} after it is applied in the kernel, to each tile "
                                        "before it is stored" if fns and not gate else "")
            + ("; rows of each batch interleave ranks (gathered on the sequence dim): the kernel stores them "
               "in place" if d == 1 else "")
            + (f"; {names} join{'s' if len(joined) == 1 else ''} it: {1 + len(joined)} weights share the "
               "gathered A" if joined else "")
            + (f"; silu({_name(mm)}) * {_name(up)} is computed in the kernel (SwiGLU): one [M, N] product is stored "
               "instead of two" if gate else "")
            + kept, estimate)
    return p, decisions


# Ops a SwiGLU gate may pass through between the matmuls and their product: reshapes, and dtype casts
# around the silu (Inductor computes it in float32).
_TRANSPARENT = ("reshape",)
_CASTS = ("prims.convert_element_type.default",)


def _through(users, v: Value, outputs) -> tuple[Value, list[Op]]:
    """Follow `v` through sole-user reshapes and casts: the value reached and the ops passed."""
    passed = []
    while v not in outputs:
        nxt = _sole_user(users, v)
        if nxt is None or not (nxt.opcode in _TRANSPARENT or nxt.attrs.get("target") in _CASTS):
            break
        passed.append(nxt)
        v = nxt.outputs[0]
    return v, passed


def _swiglu(p: Program, users, a: Op, b: Op):
    """((gate matmul, up matmul), ops replaced, the product's value) when silu(gate) * up is all that reads
    the two matmuls of the same gathered A (of equal widths), else None."""
    if _shape(p, a.outputs[0]) != _shape(p, b.outputs[0]):
        return None
    for gate, up in ((a, b), (b, a)):
        g, g_ops = _through(users, gate.outputs[0], p.outputs)
        silu = _sole_user(users, g) if g not in p.outputs else None
        if silu is None or silu.opcode != "pointwise" or silu.attrs.get("fn") != "silu":
            continue
        s, s_ops = _through(users, silu.outputs[0], p.outputs)
        u, u_ops = _through(users, up.outputs[0], p.outputs)
        mul = _sole_user(users, s) if s not in p.outputs else None
        if (mul is None or mul.opcode != "pointwise" or mul.attrs.get("fn") != "mul" or set(mul.inputs) != {s, u}
                or _sole_user(users, u) is not mul or mul.outputs[0].type.dtype != gate.outputs[0].type.dtype):
            continue
        return (gate, up), [*g_ops, silu, *s_ops, *u_ops, mul], mul.outputs[0]
    return None


def _joins(p: Program, mm: Op, other: Op) -> bool:
    """Whether `other` (a matmul of the same gathered A) can share mm's kernel: same dtypes, a 2-D B of known
    width whose rows the kernel can load (16-byte aligned)."""
    b, shape = other.inputs[1], _shape(p, other.inputs[1])
    return (other.outputs[0].type.dtype == mm.outputs[0].type.dtype and b.type.dtype == mm.inputs[1].type.dtype
            and shape is not None and len(shape) == 2 and (shape[1] * DTYPE_BYTES[b.type.dtype]) % 16 == 0)


def _name(op: Op) -> str:
    return f"%{op.outputs[0].name}" + (f" ({op.origin})" if op.origin else "")


def _summed_matmuls(p: Program, users, v: Value) -> tuple[list[Op], list[Op], str | None]:
    """The matmuls whose sum is `v`, through reshapes that keep the rows ([b*s, N] <-> [b, s, N]) and adds
    (a backward graph sums the input gradients of q/k/v, or of gate/up): (matmuls, ops passed, None), or
    ([], [], why not). Every value on the way is read by the next op alone."""
    op = v.producer
    if op is None:
        return [], [], "a program input"
    if op.opcode == "matmul":
        return [op], [], None
    if op.opcode == "reshape" and dims_equal(op.inputs[0].type.shape[-1], v.type.shape[-1]):
        inner = op.inputs[0]
    elif op.opcode == "pointwise" and op.attrs.get("fn") == "add" and len(op.inputs) == 2 and all(
            x.type.shape == v.type.shape for x in op.inputs):
        inner = None
    else:
        return [], [], f"{op.opcode if op.opcode != 'opaque' else op.attrs['target']} (%{v.name})"
    found, passed = [], [op]
    for x in ([inner] if inner is not None else op.inputs):
        if _sole_user(users, x) is not op or x in p.outputs:
            return [], [], f"%{x.name}, which has readers besides the sum"
        mms, more, why = _summed_matmuls(p, users, x)
        if why:
            return [], [], why
        found += mms
        passed += more
    return found, passed, None


def _concat(p: Program, values: list[Value], dim: int, name: str, origin) -> tuple[Op, Value]:
    """A cat op of `values` (not yet placed in the program) and its result."""
    op = Op("cat", tuple(values), {"dim": dim}, origin=origin)
    (t,) = infer("cat", [v.type for v in values], op.attrs, p.world_size, origin)
    taken = {v.name for v in p.values()}
    while name in taken:
        name += "_"
    op.outputs = (Value(name, t, op),)
    return op, op.outputs[0]


def _run_matmul_collective(kind: str, coll_name: str, opcode: str, pass_name: str):
    what = "matmul + " + coll_name.replace("_", "-")

    def run(p: Program, options: Options):
        decisions, users = [], p.users()
        for coll in list(p.find(coll_name)):
            w = _sole_user(users, coll.outputs[0])
            mms, passed, not_mm = _summed_matmuls(p, users, coll.inputs[0])
            site = _site(*mms, coll) if mms else _site(coll)
            say = lambda ok, why, estimate=None: decisions.append(
                Decision(pass_name, site, ok, why, estimate, what, choice.mode if ok else ""))
            choice = None
            if w is None or w.opcode != "wait":
                say(False, "the collective has no single wait")
                continue
            if not_mm:
                say(False, f"the {coll_name} input is not a matmul or a sum of matmuls: it comes from {not_mm}")
                continue
            mm = mms[0]
            if len(users.get(mm.outputs[0], [])) != 1:
                say(False, "the matmul result has other users besides the collective (kept unfused)")
                continue
            src, d = coll.inputs[0], coll.attrs.get("dim", 0)
            if kind == "matmul_rs" and not (d == 0 or (d == 1 and src.type.rank == 3)):
                say(False, f"scatter on dim {d} of a rank-{src.type.rank} tensor: the kernel scatters rows (dim 0) "
                           "or the sequence of a [batch, seq, hidden] tensor (dim 1)")
                continue
            if coll.attrs.get("reduce", "sum") != "sum":
                say(False, f"reduce op {coll.attrs['reduce']}: the kernel sums")
                continue
            why = _common_checks(p, mm, coll)
            shapes = [(_shape(p, m.inputs[0]), _shape(p, m.inputs[1])) for m in mms]
            if not why and len({(a[0], b[1]) for a, b in shapes}) > 1:
                why = f"the summed matmuls have different shapes {[(a, b) for a, b in shapes]}"
            if not why and len({(m.inputs[0].type.dtype, m.inputs[1].type.dtype) for m in mms}) > 1:
                why = "the summed matmuls have different dtypes"
            if why:
                say(False, why)
                continue
            M, N = shapes[0][0][0], shapes[0][1][1]
            Kl = sum(a[1] for a, _ in shapes)
            split = _shape(p, src)[d] if kind == "matmul_rs" else M
            if split % p.world_size:
                say(False, f"{'M' if d == 0 else 'the sequence'}={split} rows do not split evenly over "
                           f"{p.world_size} ranks")
                continue
            item = DTYPE_BYTES[mm.outputs[0].type.dtype]
            copied = (M + N) * Kl * item if len(mms) > 1 else 0  # the concatenated A and B
            opts = _hint_mode(coll, _hint_mode(mm, options))
            choice, estimate = _decide(p, opts, w.outputs[0].name, kind, M, N, Kl * p.world_size,
                                       mm.outputs[0].type.dtype, copy_bytes=copied)
            if choice.mode == "off":
                say(False, choice.reason, estimate)
                continue
            chain, fns, extra = _absorb_epilogue(users, w.outputs[0], p.outputs)
            last = (chain[-1] if chain else w).outputs[0]
            cats = []
            a, b = mm.inputs
            if len(mms) > 1:  # sum_i A_i @ B_i = [A_1 .. A_n] @ [B_1; ..; B_n]: one GEMM over the K's
                (cat_a, a), (cat_b, b) = (_concat(p, [m.inputs[i] for m in mms], 1 - i, f"{mm.outputs[0].name}_{x}",
                                                  mm.origin) for i, x in ((0, "a_cat"), (1, "b_cat")))
                cats = [cat_a, cat_b]
            fused = _fused(opcode, [a, b, *extra],
                           {"mode": choice.mode, "epilogue": fns, **({"dim": d} if kind == "matmul_rs" else {})},
                           [last], mm.origin or coll.origin)
            old = sorted([*mms, *passed, coll, w, *chain], key=p.ops.index)
            p.ops[p.ops.index(old[0]):p.ops.index(old[0])] = cats
            _replace(p, old, fused, [last])
            users = p.users()
            summed = (f"; the sum of {len(mms)} matmuls ({', '.join(_name(m) for m in mms)}) is one GEMM over their "
                      f"K's side by side (A [{M}, {Kl}] and B [{Kl}, {N}] are copied together first)"
                      if len(mms) > 1 else "")
            rows = ("; rows of each batch interleave ranks (scattered on the sequence dim): the kernel reads them "
                    "in place" if kind == "matmul_rs" and d == 1 else "")
            say(True, f"{choice.reason}" + (f"; the {'+'.join(fns)} after it is applied in the kernel, to each tile "
                                            "before it is stored" if fns else "") + summed + rows, estimate)
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
