"""The meaning of a BSP program: every rank at once, in float64, on the CPU."""
from __future__ import annotations

import torch

from bspfuse.execute.values import ExecuteError, shape_of, where
from bspfuse.ir import Op, Program, Value, concrete

_UNARY = {
    "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "neg": torch.neg,
    "exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda x: x,
}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "bias": torch.add}


def pointwise(fn: str, xs):
    if fn in _UNARY:
        return _UNARY[fn](xs[0])
    return _BINARY[fn](xs[0], xs[1])


def _epilogue(acc, fns, extra):
    bias = iter(extra)
    for fn in fns:
        acc = acc + next(bias) if fn == "bias" else _UNARY[fn](acc)
    return acc


def merge_states_math(o, lse):
    """Merge n attention states o [n, B, H, D], lse [n, B, H] (natural log) in float64; empty states
    (lse = -inf) count for nothing."""
    o, lse = o.double(), lse.double()
    m = lse.max(dim=0).values
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - safe_m)
    total = w.sum(dim=0)
    out = (w.unsqueeze(-1) * o).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out, safe_m + torch.log(total)


def decode_args(op: Op, xs):
    q, k, v, rest = xs[0], xs[1], xs[2], list(xs[3:])
    block_table = rest.pop(0) if op.attrs.get("paged") else None
    kv_lens = rest.pop(0) if op.attrs.get("kv_lens") else None
    return q, k, v, kv_lens, block_table


def reference(program: Program, inputs_by_rank: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The BSP semantics of `program` in float64 on the CPU, every rank at once: one list of outputs per rank.

    Collectives read every rank's value: all_gather concatenates, reduce_scatter sums and keeps rank r's
    chunk, all_reduce sums. Fused ops are evaluated by what they replaced, so a fused program runs too."""
    from bspfuse.kernels.flash_decode import reference_decode

    W = len(inputs_by_rank)
    envs: list[dict[Value, torch.Tensor]] = [{} for _ in range(W)]
    for v in program.inputs:
        for r in range(W):
            t = inputs_by_rank[r][v.name]
            envs[r][v] = t.double() if t.is_floating_point() else t
    for op in program.ops:
        xs = [[env[v] for v in op.inputs] for env in envs]
        code, a = op.opcode, op.attrs
        if code in ("all_gather", "reduce_scatter", "all_reduce"):
            outs = _collective_reference(code, a, [x[0] for x in xs])
        elif code == "fused_allgather_matmul":
            full, n = torch.cat([x[0] for x in xs], dim=0), a.get("weights", 1)
            if "swiglu" in a.get("epilogue", ()):  # silu(A @ W_gate) * (A @ W_up), shaped as the product it replaced
                outs = [(torch.nn.functional.silu(full @ x[1]) * (full @ x[2])).reshape(shape_of(program, op.outputs[0]))
                        for x in xs]
            else:
                outs = [(_epilogue(full @ x[1], a.get("epilogue", ()), x[1 + n:]), *(full @ b for b in x[2:1 + n]))
                        for x in xs]
            kept = (full,) if a.get("gathered_out") else ()
            outs = [(o if isinstance(o, tuple) else (o,)) + kept for o in outs]
        elif code in ("fused_matmul_reduce_scatter", "fused_matmul_allreduce"):
            total = sum(x[0] @ x[1] for x in xs)
            parts = total.chunk(W, dim=0) if code == "fused_matmul_reduce_scatter" else [total] * W
            outs = [_epilogue(parts[r], a.get("epilogue", ()), xs[r][2:]) for r in range(W)]
        elif code == "flash_decode":
            states = [reference_decode(*decode_args(op, x), scale=a.get("scale")) for x in xs]
            merged = merge_states_math(torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states]))
            outs = [merged] * W
        elif code == "decode_partial":
            outs = [reference_decode(*decode_args(op, x), scale=a.get("scale")) for x in xs]
        else:
            outs = [local_op(program, op, x, torch.float64) for x in xs]
        for r in range(W):
            res = outs[r] if isinstance(outs[r], (tuple, list)) else (outs[r],)
            for v, t in zip(op.outputs, res):
                envs[r][v] = t
    return [[env[v] for v in program.outputs] for env in envs]


def _collective_reference(code: str, attrs: dict, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    W = len(xs)
    if code == "all_gather":
        full = torch.cat(xs, dim=attrs["dim"])
        return [full] * W
    total = sum(xs)
    if attrs.get("reduce", "sum") == "avg":
        total = total / W
    if code == "all_reduce":
        return [total] * W
    return list(total.chunk(W, dim=attrs["dim"]))


def local_op(program: Program, op: Op, xs, float_dtype):
    """Ops that need no other rank: the same torch code for the reference and for a rank."""
    code, a = op.opcode, op.attrs
    if code == "wait":
        return xs[0]
    if code == "matmul":
        return xs[0] @ xs[1]
    if code == "pointwise":
        return pointwise(a["fn"], xs)
    if code == "reshape":
        return xs[0].reshape(shape_of(program, op.outputs[0]))
    if code == "transpose":
        return xs[0].transpose(0, 1)
    if code == "split":
        sizes = [concrete(s, program.sizes, program.world_size) for s in a["sizes"]]
        return tuple(xs[0].split(sizes, dim=a["dim"]))
    if code == "cat":
        return torch.cat(xs, dim=a["dim"])
    if code == "merge_states":
        o, lse = merge_states_math(xs[0], xs[1])
        return o.to(xs[0].dtype), lse.float() if float_dtype != torch.float64 else lse
    if code == "opaque":
        raise ExecuteError(f"{where(op)}: cannot execute opaque op {a.get('target', a.get('name', '?'))}")
    raise ExecuteError(f"{where(op)}: cannot execute op {code}")
