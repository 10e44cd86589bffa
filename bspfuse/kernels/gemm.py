"""Host side of the fused GEMM kernels: heap buffers, epochs, descriptors and the launch.

Each object is built once per shape (it generates, compiles and allocates) and called per step::

    op = FusedAllGatherMatmul(heap, M_local=1024, N=8192, K=8192, dtype=torch.bfloat16, mode="push")
    c = op(a_shard, b)          # all_gather(a_shard) @ b, one kernel, no host flag reset between calls

Flags never need a reset: each call raises them to a fresh epoch. Buffers a peer writes into alternate
between two slots by epoch parity; a rank cannot run two calls ahead of a peer (each call waits for that
peer's data of the same call), so a slot is never overwritten while it is read.
"""
from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from bspfuse.codegen.load import load_kernel
from bspfuse.codegen.triton import generate
from bspfuse.runtime.errors import new_error_buffer, raise_if_wait_timed_out
from bspfuse.runtime.heap import Epoch
from bspfuse.tile import (STAGING, TileConfig, choose_config, lower_allgather_matmul, lower_matmul_allreduce,
                          lower_matmul_reduce_scatter)

IR_DTYPE = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_allocator(heap):
    # Descriptors made on the device (the AG kernel's A operand) need scratch space from this allocator.
    if not _sim(heap):
        triton.set_allocator(_scratch)


def _sim(heap) -> bool:
    return heap.device.type == "cpu"


def num_programs(heap) -> int:
    """One program per SM on a GPU; in the simulator programs run one after another, so one per role."""
    if _sim(heap):
        return 0
    return torch.cuda.get_device_properties(heap.device).multi_processor_count


def tma_unsupported(dtype: torch.dtype, **dims: int) -> str | None:
    """Why the tensor-memory (TMA) loads cannot serve these sizes, or None. Rows must be 16-byte aligned."""
    item = torch.empty((), dtype=dtype).element_size()
    bad = [f"{k}={v}" for k, v in dims.items() if (v * item) % 16]
    return (f"rows of {', '.join(bad)} {str(dtype).replace('torch.', '')} elements are not 16-byte aligned "
            "(the kernel's TMA loads need it)") if bad else None


def _vec(*sizes: int) -> int:
    return 16 if all(s % 16 == 0 for s in sizes) else 1


class _Fused:
    kind = ""

    def __init__(self, heap, M: int, N: int, K: int, dtype: torch.dtype, epilogue=(), config: TileConfig | None = None,
                 debug: bool = False, name: str | None = None):
        if dtype not in IR_DTYPE:
            raise TypeError(f"fused GEMM supports {', '.join(map(str, IR_DTYPE))}, not {dtype}")
        self.heap, self.rank, self.world = heap, heap.rank, heap.world_size
        self.N, self.K, self.dtype = N, K, dtype
        self.epilogue = tuple(epilogue)
        why = tma_unsupported(dtype, N=N, K=K)
        if why:
            raise ValueError(f"{name or self.kind}: {why}")
        self.sms = num_programs(heap)
        self.config = config or choose_config(self.kind, M, N, K, self.world, num_sms=self.sms or 132)
        # A bounded wait turns a hang into an error naming rank and flag; release mode spins freely. The
        # bound is generous: in the simulator one rank may still be busy with earlier work for seconds.
        self.max_spins = (1 << 24 if not _sim(heap) else 1 << 21) if debug else 0
        self.err = new_error_buffer(heap.device)
        _set_allocator(heap)
        self.epoch = Epoch()
        self.name = name or f"{self.kind}_{IR_DTYPE[dtype]}_w{self.world}"

    def _ready(self):
        # Construction is collective: a peer that is ahead could otherwise raise a flag here before this
        # rank's zeroing of the same flags, and the zeroing would erase it.
        self.heap.barrier()

    def _compile(self, tp):
        self.tile_program = tp
        self.kernel_source = generate(tp, tma=not _sim(self.heap))
        self.kernel = load_kernel(self.kernel_source)

    def _check(self):
        if self.max_spins:
            raise_if_wait_timed_out(self.err, self.heap)

    def _desc(self, t, block):
        # The simulator's kernels load through pointers (generate(tma=False)); any valid value fills the slot.
        return TensorDescriptor.from_tensor(t, block) if not _sim(self.heap) else t

    def _bias(self, bias):
        if ("bias" in self.epilogue) != (bias is not None):
            raise ValueError(f"{self.name}: the epilogue {self.epilogue} and the bias argument disagree")
        return bias if bias is not None else self.err  # any valid pointer; never read without "bias"


class FusedAllGatherMatmul(_Fused):
    """C[M, N] = all_gather(A, dim 0) @ B, as one kernel. mode: push | pull | direct (naive remote loads).

    Constructing one is collective (every rank, same arguments): it allocates heap buffers and barriers."""

    kind = "ag_matmul"

    def __init__(self, heap, M_local: int, N: int, K: int, dtype=torch.bfloat16, mode: str = "push", epilogue=(),
                 config: TileConfig | None = None, debug: bool = False, name: str | None = None):
        super().__init__(heap, M_local * heap.world_size, N, K, dtype, epilogue, config, debug, name)
        self.M_local, self.mode = M_local, mode
        cfg = self.config
        if mode == "direct":
            cfg = TileConfig(cfg.BM, cfg.BN, cfg.BK, cfg.GROUP_M, cfg.num_warps, cfg.num_stages, 0)
        elif cfg.comm_programs < 1:
            cfg = TileConfig(cfg.BM, cfg.BN, cfg.BK, cfg.GROUP_M, cfg.num_warps, cfg.num_stages, 1)
        if _sim(heap) and cfg.comm_programs > 1:
            cfg = TileConfig(cfg.BM, cfg.BN, cfg.BK, cfg.GROUP_M, cfg.num_warps, cfg.num_stages, 1)
        self.config = cfg
        tp = lower_allgather_matmul(f"{self.name}_{mode}", IR_DTYPE[dtype], self.epilogue, cfg)
        if mode != "direct":
            tp = STAGING[mode](tp)
        self._compile(tp)
        W, nb = self.world, triton.cdiv(M_local, cfg.BM)
        sizes = {"entered": W, "staged": W * nb, "arrived": W * nb, "done_reading": W}
        self.flags = heap.zeros(max(1, sum(sizes[f] for f in tp.flags)), dtype=torch.int32, name=f"{self.name}.flags")
        self.staging = (heap.empty(2 * W * M_local, K, dtype=dtype, name=f"{self.name}.staging")
                        if mode != "direct" else None)
        # pull and direct read A from the owner's heap: it must live there (copied in if it does not).
        self.a_heap = heap.empty(M_local, K, dtype=dtype, name=f"{self.name}.a") if mode in ("pull", "direct") else None
        self._ready()

    def __call__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        cfg, W = self.config, self.world
        if tuple(a.shape) != (self.M_local, self.K) or tuple(b.shape) != (self.K, self.N):
            raise ValueError(f"{self.name}: expected A[{self.M_local}, {self.K}] and B[{self.K}, {self.N}], "
                             f"got A{list(a.shape)} and B{list(b.shape)}")
        if self.a_heap is not None and a.data_ptr() != self.a_heap.data_ptr():
            self.a_heap.copy_(a)
            a = self.a_heap
        a, b = a.contiguous(), b.contiguous()
        c = out if out is not None else torch.empty(W * self.M_local, self.N, dtype=self.dtype, device=a.device)
        b_desc = self._desc(b, [cfg.BK, cfg.BN])
        staging = self.staging if self.staging is not None else a
        programs = (cfg.comm_programs + 1) if _sim(self.heap) else self.sms
        if self.mode == "direct":  # no flags: peers read A straight from the heap, between host barriers
            self.heap.barrier()
        epoch = self.epoch.next()
        self.kernel[(programs,)](
            a, b_desc, b, c, self._bias(bias), staging, self.flags, self.err, self.heap.heap_bases,
            self.rank, epoch, self.M_local, self.N, self.K, a.stride(0), c.stride(0),
            WORLD=W, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, COMM=cfg.comm_programs,
            NUM_PROGRAMS=programs, CHUNK_K=128, MAX_SPINS=self.max_spins, PROXY_FENCE=not _sim(self.heap),
            VEC=_vec(self.K), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if self.mode == "direct":
            self.heap.barrier()
        self._check()
        return c


class _FusedScatter(_Fused):
    lower = None

    def __init__(self, heap, M: int, N: int, K_local: int, dtype=torch.bfloat16, epilogue=(),
                 config: TileConfig | None = None, debug: bool = False, name: str | None = None):
        super().__init__(heap, M, N, K_local, dtype, epilogue, config, debug, name)
        W = self.world
        if M % W:
            raise ValueError(f"{self.name}: M={M} rows do not split evenly over {W} ranks")
        self.M, self.M_local, self.mode = M, M // W, "push"
        cfg = self.config
        self._compile(type(self).lower(self.name, IR_DTYPE[dtype], self.epilogue, cfg))
        tiles = triton.cdiv(self.M_local, cfg.BM) * triton.cdiv(N, cfg.BN)
        n_flags = W * tiles * (2 if self.kind == "matmul_ar" else 1)
        self.flags = heap.zeros(n_flags, dtype=torch.int32, name=f"{self.name}.flags")
        self.inbox = heap.empty(2 * W * self.M_local, N, dtype=dtype, name=f"{self.name}.inbox")
        self.out_heap = (heap.empty(2 * M, N, dtype=dtype, name=f"{self.name}.out")
                         if self.kind == "matmul_ar" else None)
        self._ready()

    def __call__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        cfg, W = self.config, self.world
        if tuple(a.shape) != (self.M, self.K) or tuple(b.shape) != (self.K, self.N):
            raise ValueError(f"{self.name}: expected A[{self.M}, {self.K}] and B[{self.K}, {self.N}], "
                             f"got A{list(a.shape)} and B{list(b.shape)}")
        a, b = a.contiguous(), b.contiguous()
        epoch = self.epoch.next()
        if self.out_heap is not None:
            out_arg = self.out_heap
            result = self.out_heap[(epoch % 2) * self.M:(epoch % 2 + 1) * self.M]
        else:
            out_arg = result = torch.empty(self.M_local, self.N, dtype=self.dtype, device=a.device)
        programs = 1 if _sim(self.heap) else self.sms
        self.kernel[(programs,)](
            self._desc(a, [cfg.BM, cfg.BK]), a, self._desc(b, [cfg.BK, cfg.BN]), b, out_arg, self._bias(bias), self.inbox, self.flags, self.err, self.heap.heap_bases,
            self.rank, epoch, self.M_local, self.N, self.K,
            WORLD=W, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, NUM_PROGRAMS=programs,
            MAX_SPINS=self.max_spins, VEC=_vec(self.N), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self._check()
        return result


class FusedMatmulReduceScatter(_FusedScatter):
    """out[M/W, N] = reduce_scatter(A[M, K_local] @ B[K_local, N], dim 0), as one kernel (push)."""

    kind = "matmul_rs"
    lower = staticmethod(lower_matmul_reduce_scatter)


class FusedMatmulAllReduce(_FusedScatter):
    """out[M, N] = all_reduce(A[M, K_local] @ B[K_local, N]), as one kernel. The result lives on the heap
    and stays valid until the call after next (two slots alternate), like a CUDA graph's static output."""

    kind = "matmul_ar"
    lower = staticmethod(lower_matmul_allreduce)
