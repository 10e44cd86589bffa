"""The fused kernels as PyTorch operators, so a compiled fx graph (Inductor's or plain) can call them.

    torch.ops.bspfuse.all_gather_matmul(a, bs, bias, group, mode, epilogue, return_gathered, max_rows=0)
        -> [c for each b in bs] + [gathered]          (one kernel; several bs share the gathered A;
                                                       epilogue "swiglu": [silu(a @ bs[0]) * (a @ bs[1])])
    torch.ops.bspfuse.matmul_reduce_scatter(a, b, bias, group, mode, epilogue, max_rows=0) -> out
    torch.ops.bspfuse.matmul_all_reduce(a, b, bias, group, mode, epilogue, max_rows=0) -> out

`a` is 2-D, or 3-D under sequence parallelism with batch > 1, where the collective's dim is the sequence
(dim 1), as the functional collectives gather and scatter it there:

    all_gather_matmul       a [M, K] -> cs [W * M, N_j], gathered [W * M, K]
                            a [B, S, K] -> cs [B, W * S, N_j], gathered [B, W * S, K]
    matmul_reduce_scatter   a [M, K] -> [M / W, N];  a [B, W * S, K] -> [B, S, N]
    matmul_all_reduce       a [..., K] -> [..., N]

`max_rows` is the most rows a's calls may have (all of a's dims but the last multiplied), for a dynamic
sequence length: the host object and its heap buffers are built for that bound and serve every call of
fewer rows. 0: the call's own rows (a static shape).

`group` names the process group (as functional collectives do); `mode` is the kernel's schedule (push,
pull or direct: bspfuse.kernels.gemm); `epilogue` is the pointwise chain the kernel applies to each output
tile, "+"-joined ("bias+gelu"; "" for none). Each call finds the symmetric heap of that group (made on
first use: torch symmetric memory on a GPU, `size_heap` bytes; on the CPU a heap registered with
`use_heap`, e.g. a simulator rank's) and the host object for its `host_object_key` (built on first use,
which is collective: every rank makes the same calls in the same order, as SPMD programs do). Objects are
shared by every call site with the same key: calls alternate between two buffer slots, so sharing is safe
and a model of many identical layers needs one set of buffers.

Results are fresh tensors (never views of the heap), so a compiler may hold, free or reuse them.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

import torch

from .errors import BspfuseRuntimeError
from .heap import SymmetricHeap

DEFAULT_HEAP_BYTES = int(os.environ.get("BSPFUSE_HEAP_BYTES", 4 << 30))
_HEAPS: dict[str, SymmetricHeap] = {}
_HEAP_BYTES: dict[str, int] = {}  # group name -> size its heap is made with, where a compiler asked (size_heap)
_OPS: dict[tuple, object] = {}
# GEMM+AR returns the slot of its heap output that the host picked for the call: replaying it from a CUDA
# graph would return the same slot every time. The other ops count their epochs on the device
# (kernels.gemm); their modes whose host side must run every call (tile.HOST_SIDE_AG_MODES) are refused
# while a graph is captured.
_HOST_EPOCH = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@contextlib.contextmanager
def use_heap(group_name: str, heap: SymmetricHeap) -> Iterator[SymmetricHeap]:
    """Run the bspfuse ops of `group_name` on `heap` inside the block (the simulator's ranks use this)."""
    previous = _HEAPS.get(group_name)
    _HEAPS[group_name] = heap
    try:
        yield heap
    finally:
        _OPS.clear()
        if previous is None:
            _HEAPS.pop(group_name, None)
        else:
            _HEAPS[group_name] = previous


def heap_for(group_name: str, device: torch.device) -> SymmetricHeap:
    """The heap of `group_name`: the registered one, else (on a GPU) a new symmetric-memory heap."""
    if group_name in _HEAPS:
        return _HEAPS[group_name]
    if device.type != "cuda":
        raise BspfuseRuntimeError(f"no symmetric heap for process group '{group_name}' on {device}: on the CPU, "
                                  "run the compiled model inside bspfuse.runtime.torch_ops.use_heap(group, heap)")
    from torch.distributed.distributed_c10d import _resolve_process_group

    from .cuda import SymmMemBacking
    group = _resolve_process_group(group_name)
    nbytes = _HEAP_BYTES.get(group_name, DEFAULT_HEAP_BYTES)
    _HEAPS[group_name] = SymmetricHeap(nbytes, backing=SymmMemBacking(nbytes, device, group))
    return _HEAPS[group_name]


def size_heap(group_name: str, nbytes: int) -> int:
    """Make the heap of `group_name` `nbytes` large when it is made; returns the size it has or will have
    (a heap already made or registered keeps its own)."""
    if group_name in _HEAPS:
        return _HEAPS[group_name].nbytes
    _HEAP_BYTES[group_name] = nbytes
    return nbytes


def host_object_key(op: str, group_name: str, a_shape, b_shapes, dtype: torch.dtype, mode: str,
                    epilogue: str, max_rows: int = 0) -> tuple:
    """What makes calls of torch.ops.bspfuse.<op> share one host object (and its heap buffers): its rows are
    the bound `max_rows` where one is given, else A's rows (its dims but the last multiplied). A segment's
    length (a 3-D A's dim 1) is no part of it: calls of every sequence length share the object::

        host_object_key("matmul_reduce_scatter", "0", (2, 512, 4096), [(4096, 8192)], torch.bfloat16, "push", "",
                        max_rows=8192)   # rows 8192: so is [4, 1000, 4096]'s with this bound, [8192, 4096]'s without
    """
    rows = max_rows if max_rows > 0 else math.prod(a_shape[:-1])
    return op, group_name, rows, tuple(b[1] for b in b_shapes), a_shape[-1], dtype, mode, epilogue


def _host_object(op: str, group_name: str, a: torch.Tensor, bs: list[torch.Tensor], mode: str, epilogue: str,
                 max_rows: int):
    key = host_object_key(op, group_name, a.shape, [b.shape for b in bs], a.dtype, mode, epilogue, max_rows)
    found = _OPS.get(key)
    if found is None:
        found = _off_graph_pools(a.device, lambda: _new_host_object(key, op, group_name, a, bs, mode, epilogue))
    return found


def _off_graph_pools(device: torch.device, build):
    """build() on a helper thread. An op is built at its first call, which may be a warm-up that Inductor's
    CUDA graph trees run with this thread's allocations routed into the graph's memory pool (which must
    hold only tensors the graph tracks); what the op keeps (the heap's rendezvous, the barrier's tensor)
    would land there. The routing is per thread: built on another, it lands in the ordinary pools."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return build()
    import threading

    result: dict = {}

    def run():
        torch.cuda.set_device(device)
        try:
            result["value"] = build()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = e
        torch.cuda.synchronize(device)  # what the build enqueued (zero fills) is done before the caller uses it

    worker = threading.Thread(target=run, name="bspfuse-build")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _new_host_object(key, op, group_name, a, bs, mode, epilogue):
    from bspfuse.kernels import gemm

    heap = heap_for(group_name, a.device)
    cls = {"all_gather_matmul": gemm.FusedAllGatherMatmul, "matmul_reduce_scatter": gemm.FusedMatmulReduceScatter,
           "matmul_all_reduce": gemm.FusedMatmulAllReduce}[op]
    _, _, rows, widths, K = key[:5]  # rows: the bound, where the call gave one
    _OPS[key] = cls(heap, rows, widths if len(widths) > 1 else widths[0], K, a.dtype, mode=mode,
                    epilogue=tuple(f for f in epilogue.split("+") if f),
                    name=f"bspfuse_{op}_{len(_OPS)}", b_layout=gemm.b_operand(bs[0])[0])
    return _OPS[key]


# The ops are defined on a Library with a plain dispatcher kernel rather than with torch.library.custom_op:
# custom_op's Python wrappers cost 18-23 us a call on a 2-core CPU against 5-10 us here, and the host's path
# to each fused kernel is on the critical path of a step whose GPU is waiting (a forward's first GEMM, a
# decode step). The ops never see autograd: bspfuse rewrites forward graphs that AOT autograd runs inside its
# own autograd.Function, with detached tensors.
_LIB = torch.library.Library("bspfuse", "DEF")
_LIB.define("all_gather_matmul(Tensor a, Tensor[] bs, Tensor? bias, str group, str mode, str epilogue, "
            "bool return_gathered, int max_rows=0) -> Tensor[]")
_LIB.define("matmul_reduce_scatter(Tensor a, Tensor b, Tensor? bias, str group, str mode, str epilogue, "
            "int max_rows=0) -> Tensor")
_LIB.define("matmul_all_reduce(Tensor a, Tensor b, Tensor? bias, str group, str mode, str epilogue, "
            "int max_rows=0) -> Tensor", tags=_HOST_EPOCH)


def _kernel(name: str):
    """Register the decorated function as the op's kernel for every device (a GPU, or a simulator rank)."""
    def register(fn):
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return register


@_kernel("all_gather_matmul")
def all_gather_matmul(a: torch.Tensor, bs: list[torch.Tensor], bias: Optional[torch.Tensor], group: str, mode: str,
                      epilogue: str, return_gathered: bool, max_rows: int = 0) -> list[torch.Tensor]:
    from bspfuse.tile import HOST_SIDE_AG_MODES

    if (mode in HOST_SIDE_AG_MODES or return_gathered) and a.is_cuda and torch.cuda.is_current_stream_capturing():
        why = HOST_SIDE_AG_MODES.get(mode, "the gathered rows are read from the slot the host counted to")
        raise BspfuseRuntimeError(f"all_gather_matmul ({mode}{', returning the gathered rows' if return_gathered else ''}) "
                                  f"cannot be captured in a CUDA graph: {why}; use mode push or pull")
    op = _host_object("all_gather_matmul", group, a, bs, mode, epilogue, max_rows)
    cs = op(a, bs, bias)
    return [*cs, op.gathered(a) if return_gathered else a.new_empty(0)]


# The shapes below are written with a's sizes as they come: under a graph compiled with dynamic=True they are
# SymInts, and W * S, T // W stay expressions of them.


@torch.library.register_fake("bspfuse::all_gather_matmul", lib=_LIB)
def _(a, bs, bias, group, mode, epilogue, return_gathered, max_rows=0):
    W = _group_size(group)
    lead = (W * a.shape[0],) if a.dim() == 2 else (a.shape[0], W * a.shape[1])  # [B, S, K]: gathered on dim 1
    cs = bs[:1] if "swiglu" in epilogue.split("+") else bs  # swiglu: one product of the two weights
    return [*(a.new_empty(*lead, b.shape[1]) for b in cs), a.new_empty(*lead, a.shape[-1]) if return_gathered
            else a.new_empty(0)]


@_kernel("matmul_reduce_scatter")
def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], group: str, mode: str,
                          epilogue: str, max_rows: int = 0) -> torch.Tensor:
    return _host_object("matmul_reduce_scatter", group, a, [b], mode, epilogue, max_rows)(a, b, bias)


@torch.library.register_fake("bspfuse::matmul_reduce_scatter", lib=_LIB)
def _(a, b, bias, group, mode, epilogue, max_rows=0):
    W = _group_size(group)
    lead = (a.shape[0] // W,) if a.dim() == 2 else (a.shape[0], a.shape[1] // W)  # [B, W * S, K]: dim 1
    return a.new_empty(*lead, b.shape[1])


@_kernel("matmul_all_reduce")
def matmul_all_reduce(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], group: str, mode: str,
                      epilogue: str, max_rows: int = 0) -> torch.Tensor:
    op = _host_object("matmul_all_reduce", group, a, [b], mode, epilogue, max_rows)
    return op(a, b, bias).clone()  # the heap slot is reused


@torch.library.register_fake("bspfuse::matmul_all_reduce", lib=_LIB)
def _(a, b, bias, group, mode, epilogue, max_rows=0):
    return a.new_empty(*a.shape[:-1], b.shape[1])


def _group_size(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()
