"""`bspfuse compile`: a fused program as a standalone Python module."""
from __future__ import annotations

from bspfuse.execute.values import ExecuteError, shape_of, where
from bspfuse.ir import Program, concrete

_TORCH_NAME = {"f16": "torch.float16", "bf16": "torch.bfloat16", "f32": "torch.float32", "f64": "torch.float64"}


def compile_module(program: Program, source: str = "<program>") -> str:
    """A standalone Python module for the fused `program`: the Triton source of every fused GEMM inline, one per
    kernel target (runtime.target: TMA on NVIDIA GPUs, pointer loads on AMD's and in the simulator), and
    `run(ctx, inputs) -> outputs`, one line per op, on bspfuse's host objects and runtime. Names in the text
    are checked identifiers or repr() strings."""
    from bspfuse.codegen.triton import generate
    from bspfuse.lowering import GEMM_KINDS, SIM, TARGETS, gemm_shape, plan_fused, weight_widths
    from bspfuse.runtime.target import uses_tma

    W = program.world_size
    if W is None:
        raise ExecuteError(f"program {program.name}: the world size is not known (pass --world)")
    var = {}
    for v in program.values():
        if not v.name.isidentifier():
            raise ExecuteError(f"value name {v.name!r} is not an identifier")
        var[v] = f"v_{v.name}"
    kernels, makers, body = [], [], []
    for v in program.inputs:
        body.append(f"    {var[v]} = inputs[{v.name!r}].to(device)")
    for op in program.ops:
        outs = ", ".join(var[v] for v in op.outputs) + ("," if len(op.outputs) == 1 else "")
        ins = [var[v] for v in op.inputs]
        code, a = op.opcode, op.attrs
        name = op.outputs[0].name
        if code in GEMM_KINDS:
            for machine in (SIM, TARGETS["H200"], TARGETS["MI300X"]):  # kernel targets sim, cuda, hip
                target = machine.kernel_target
                ks = generate(plan_fused(op, program, machine).tile_program, tma=uses_tma(target))
                kernels.append(f"KERNELS[({name!r}, {target!r})] = ({ks.name!r}, {ks.source!r})\n")
            m, n, k = gemm_shape(op, program)
            dtype = _TORCH_NAME[op.outputs[0].type.dtype]
            epi = tuple(a.get("epilogue", ()))
            n_w = a.get("weights", 1)
            if code == "fused_allgather_matmul":
                widths = weight_widths(op, program) if n_w > 1 else n
                ctor = (f"gemm.FusedAllGatherMatmul(heap, {m}, {widths}, {k}, {dtype}, mode={a.get('mode', 'push')!r}, "
                        f"epilogue={epi!r}, name={name!r})")
            else:
                cls = "FusedMatmulReduceScatter" if code == "fused_matmul_reduce_scatter" else "FusedMatmulAllReduce"
                ctor = (f"gemm.{cls}(heap, {m}, {n}, {k}, {dtype}, mode={a.get('mode', 'push')!r}, epilogue={epi!r}, "
                        f"name={name!r})")
            makers.append(f"def _make_{name}(heap):\n    return _inline({ctor}, {name!r})\n")
            bias = ins[1 + n_w] if "bias" in epi else "None"
            weights = ins[1] if n_w == 1 else f"[{', '.join(ins[1:1 + n_w])}]"
            call = f"_op(ctx, {name!r}, _make_{name})({ins[0]}, {weights}, {bias})"
            if "swiglu" in epi:  # one product, shaped as the op it replaced
                call = f"{call}[0].reshape({list(shape_of(program, op.outputs[0]))})"
            elif n_w > 1:  # one result per weight
                call = f"*{call}"
            if a.get("gathered_out"):  # the gathered A feeds other ops too: the last result
                call = f"{call}, _op(ctx, {name!r}, _make_{name}).gathered({ins[0]})"
            body.append(f"    {outs} = {call}" + (".clone()," if code == "fused_matmul_allreduce" else ","))
        elif code == "flash_decode":
            q, kk = op.inputs[0].type, op.inputs[1].type
            B, Hq, D = (concrete(d, program.sizes, W) for d in q.shape)
            Hkv = concrete(kk.shape[2], program.sizes, W)
            ctor = (f"FlashDecode(heap, {W}, heap.rank, {B}, {Hq}, {Hkv}, {D}, {_TORCH_NAME[q.dtype]}, "
                    f"stage={int(a['stage'])}, scale={a.get('scale')!r})")
            makers.append(f"def _make_{name}(heap):\n    return {ctor}\n")
            extra = ins[3:]
            bt = extra.pop(0) if a.get("paged") else "None"
            lens = extra.pop(0) if a.get("kv_lens") else "None"
            body.append(f"    {outs} = _op(ctx, {name!r}, _make_{name})({ins[0]}, {ins[1]}, {ins[2]}, "
                        f"kv_lens={lens}, block_table={bt})")
        elif code in ("all_gather", "reduce_scatter", "all_reduce"):
            body.append(f"    {outs} = rma_collective(ctx.heap, {code!r}, {ins[0]}.contiguous(), "
                        f"{int(a.get('dim', 0))}, {a.get('reduce', 'sum')!r}),  # not fused: RMA fallback")
        elif code == "wait":
            body.append(f"    {outs} = {ins[0]},")
        elif code == "matmul":
            body.append(f"    {outs} = {ins[0]} @ {ins[1]},")
        elif code == "pointwise":
            body.append(f"    {outs} = pointwise({a['fn']!r}, [{', '.join(ins)}]),")
        elif code == "reshape":
            shape = tuple(concrete(d, program.sizes, W) for d in op.outputs[0].type.shape)
            body.append(f"    {outs} = {ins[0]}.reshape({shape!r}),")
        elif code == "transpose":
            body.append(f"    {outs} = {ins[0]}.transpose(0, 1),")
        elif code == "cat":
            body.append(f"    {outs} = torch.cat([{', '.join(ins)}], dim={int(a['dim'])}),")
        elif code == "split":
            sizes = [concrete(s, program.sizes, W) for s in a["sizes"]]
            body.append(f"    {outs} = tuple({ins[0]}.split({sizes!r}, dim={int(a['dim'])}))")
        elif code == "merge_states":
            body.append(f"    {outs} = merge_states_math({ins[0]}, {ins[1]})")
            body.append(f"    {var[op.outputs[0]]}, {var[op.outputs[1]]} = {var[op.outputs[0]]}.to({ins[0]}.dtype), "
                        f"{var[op.outputs[1]]}.float()")
        else:
            raise ExecuteError(f"{where(op)}: `bspfuse compile` cannot emit op {code}")
    outputs = ", ".join(f"{v.name!r}: {var[v]}" for v in program.outputs)
    body.append(f"    return {{{outputs}}}")
    return _MODULE.format(source=source, name=program.name, world=W, kernels="".join(kernels),
                          makers="\n\n".join(makers), body="\n".join(body))


_MODULE = '''"""Compiled by bspfuse from {source}: program {name} for {world} ranks.

`run(ctx, inputs)` runs one rank inside `bspfuse.runtime.launch` (ctx is its RankContext; inputs maps
input names to this rank's tensors) and returns {{output name: tensor}}. Example::

    results = launch(rank_main, {world}, backend="sim", args=(inputs_by_rank,))
"""
import torch

from bspfuse.codegen.load import load_kernel
from bspfuse.codegen.triton import KernelSource
from bspfuse.execute.rank import rma_collective
from bspfuse.execute.reference import merge_states_math, pointwise
from bspfuse.kernels import gemm
from bspfuse.kernels.flash_decode import FlashDecode
from bspfuse.tile import TileConfig

WORLD_SIZE = {world}
KERNELS = {{}}  # (op, kernel target: "cuda" | "hip" | "sim") -> (kernel name, Triton source)
{kernels}
_OPS = {{}}


def _inline(host, name):
    kname, source = KERNELS[(name, host.target.kernel_target)]
    host.kernel = load_kernel(KernelSource(kname, source, host.interface))
    return host


def _op(ctx, name, make):
    key = (id(ctx.heap), name)
    if key not in _OPS:
        _OPS[key] = make(ctx.heap)
    return _OPS[key]


{makers}


def run(ctx, inputs):
    """One step of {name} on this rank: {{output name: tensor}}."""
    device = ctx.heap.device
{body}


def rank_main(ctx, inputs_by_rank):
    """For launch(): run with this rank's inputs; outputs come back on the CPU."""
    return {{k: v.cpu() for k, v in run(ctx, inputs_by_rank[ctx.rank]).items()}}
'''
