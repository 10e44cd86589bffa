"""One rank of a (fused) program inside `launch`: fused GEMMs and Flash Decode through their host objects,
plain ops through torch, unfused collectives through a small RMA fallback on the symmetric heap."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bspfuse.execute.reference import decode_args, local_op
from bspfuse.execute.values import TORCH_DTYPE, shape_of
from bspfuse.ir import Op, Program, Value


@dataclass
class Execution:
    """What one rank computed, and how: the collectives that ran through the unfused fallback."""
    outputs: list[torch.Tensor]
    fallbacks: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)
    device: str = ""  # what ran it: the simulator or the GPU's name


def rma_collective(heap, code: str, x: torch.Tensor, dim: int = 0, reduce: str = "sum") -> torch.Tensor:
    """An unfused collective through the heap: copy in, barrier, read every peer's copy, barrier."""
    W, r = heap.world_size, heap.rank
    buf = heap.empty(*x.shape, dtype=x.dtype, name=f"fallback.{code}")
    buf.copy_(x)
    heap.barrier()
    parts = [heap.peer_tensor(buf, p).clone() if p != r else x.clone() for p in range(W)]
    heap.barrier()
    heap.free(buf)
    if code == "all_gather":
        return torch.cat(parts, dim=dim)
    total = sum(p.float() for p in parts)
    if reduce == "avg":
        total = total / W
    total = total.to(x.dtype)
    return total if code == "all_reduce" else total.chunk(W, dim=dim)[r].contiguous()




def make_fused_gemm(heap, op: Op, program: Program, config=None, debug: bool = False):
    """The host object from bspfuse.kernels.gemm that runs a fused GEMM op (constructing it is collective)."""
    from bspfuse.kernels import gemm
    from bspfuse.lowering import gemm_shape, weight_widths

    m, n, k = gemm_shape(op, program)
    dtype = TORCH_DTYPE[op.outputs[0].type.dtype]
    epilogue = tuple(op.attrs.get("epilogue", ()))
    name = op.outputs[0].name
    if op.opcode == "fused_allgather_matmul":
        return gemm.FusedAllGatherMatmul(heap, m, weight_widths(op, program), k, dtype,
                                         mode=op.attrs.get("mode", "push"), epilogue=epilogue, config=config,
                                         debug=debug, name=name)
    cls = gemm.FusedMatmulReduceScatter if op.opcode == "fused_matmul_reduce_scatter" else gemm.FusedMatmulAllReduce
    return cls(heap, m, n, k, dtype, epilogue=epilogue, config=config, debug=debug, name=name,
               mode=op.attrs.get("mode", "push"))


def run_fused(ctx, program: Program, inputs: dict[str, torch.Tensor], config=None, cache: dict | None = None,
              debug: bool = False) -> Execution:
    """Run `program` on this rank (inside `launch`): fused GEMMs through their host objects (cached in
    `cache` by op), flash_decode through FlashDecode, plain ops through torch, unfused collectives
    through `rma_collective`. `config`: the fused GEMMs' TileConfig (default: lowering.plan_kernel's for
    the target the heap is on)."""
    from bspfuse.kernels.flash_decode import FlashDecode, reference_decode
    from bspfuse.runtime.launch import report_progress

    heap = ctx.heap
    device = heap.device
    cache = cache if cache is not None else {}
    ex = Execution([], device="simulator (Triton interpreter)" if device.type == "cpu"
                   else torch.cuda.get_device_name(device))
    env: dict[Value, torch.Tensor] = {v: inputs[v.name].to(device) for v in program.inputs}
    for step, op in enumerate(program.ops, 1):
        xs = [env[v] for v in op.inputs]
        code, a = op.opcode, op.attrs
        key = (op.outputs[0].name, code)
        what = f"%{op.outputs[0].name} {code}" + (f" ({a['mode']})" if "mode" in a else
                                                  f" (stage {a['stage']})" if "stage" in a else "")
        report_progress(what, step, len(program.ops))
        if code in ("fused_allgather_matmul", "fused_matmul_reduce_scatter", "fused_matmul_allreduce"):
            if key not in cache:
                cache[key] = make_fused_gemm(heap, op, program, config, debug)
            report_progress(what, step, len(program.ops), tiles=gemm_tiles(cache[key], xs[0]))
            n = a.get("weights", 1)
            bias = xs[1 + n] if "bias" in a.get("epilogue", ()) else None
            res = cache[key](xs[0], xs[1] if n == 1 else list(xs[1:1 + n]), bias)
            res = res.clone() if code == "fused_matmul_allreduce" else res  # the heap slot is reused
            res = tuple(res) if isinstance(res, list) else (res,)  # one result per weight
            res = (res[0].reshape(shape_of(program, op.outputs[0])), *res[1:])  # swiglu: shaped as the product was
            if a.get("gathered_out"):  # the gathered A feeds other ops too
                res = (*res, cache[key].gathered(xs[0]))
            ex.fused.append(f"%{op.outputs[0].name}: {code} ({a.get('mode', 'push')})\n    "
                            f"{cache[key].plan.launch_line} (%{op.outputs[0].name} on {cache[key].target})")
        elif code == "flash_decode":
            if key not in cache:
                cache[key] = FlashDecode.from_op(op, heap, sizes=program.sizes)
            q, k, v, kv_lens, block_table = decode_args(op, xs)
            res = cache[key](q, k, v, kv_lens=kv_lens, block_table=block_table)
            ex.fused.append(f"%{op.outputs[0].name}: flash_decode (stage {a.get('stage')})")
        elif code in ("all_gather", "reduce_scatter", "all_reduce"):
            res = rma_collective(heap, code, xs[0].contiguous(), a.get("dim", 0), a.get("reduce", "sum"))
            ex.fallbacks.append(f"%{op.outputs[0].name}: {code} through the RMA fallback (not fused)")
        elif code == "decode_partial":
            o, lse = reference_decode(*decode_args(op, xs), scale=a.get("scale"))
            res = (o.to(xs[0].dtype).to(device), lse.float().to(device))
        else:
            res = local_op(program, op, xs, torch.float32)
        res = res if isinstance(res, (tuple, list)) else (res,)
        for v, t in zip(op.outputs, res):
            env[v] = t
    ex.outputs = [env[v].cpu() for v in program.outputs]
    return ex


def gemm_tiles(host, a: torch.Tensor) -> int:
    """The output tiles a call of the fused GEMM `host` (bspfuse.kernels.gemm) with A `a` walks on this rank:
    every rank's rows times the column tiles (of every weight, unless a gated epilogue pairs them)."""
    cfg, W, rows = host.config, host.world, math.prod(a.shape[:-1])
    if host.kind == "ag_matmul":  # a holds this rank's rows
        widths = host.Ns[:1] if host.gated else host.Ns
        return W * -(-rows // cfg.BM) * sum(-(-n // cfg.BN) for n in widths)
    return W * -(-(rows // W) // cfg.BM) * -(-host.N // cfg.BN)  # a holds every rank's rows, partial sums


def rank_main(ctx, program: Program, inputs_by_rank, debug: bool = False) -> Execution:
    return run_fused(ctx, program, inputs_by_rank[ctx.rank], debug=debug)
