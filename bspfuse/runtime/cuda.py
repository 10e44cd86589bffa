"""The CUDA backend: the heap is one ``torch.distributed._symmetric_memory`` allocation.

``symm_mem.empty`` + ``symm_mem.rendezvous`` give every rank a buffer that all peers
have mapped; ``handle.buffer_ptrs`` is this process's address of every rank's buffer,
which is exactly ``heap_bases``. Ranks come from torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) or from ``launch``'s own spawned processes, which set the same
variables. NVLink multicast is never used.
"""
from __future__ import annotations

import datetime
import os

import torch

from .heap import SymmetricHeap


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Set the device from LOCAL_RANK and start the NCCL process group (once)."""
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device}
        if timeout_s:
            kwargs["timeout"] = datetime.timedelta(seconds=max(timeout_s, 60))
        dist.init_process_group("nccl", **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


class SymmMemBacking:
    """A rendezvoused symmetric-memory buffer of ``nbytes`` bytes on this rank's GPU."""

    def __init__(self, nbytes: int, device: torch.device, group=None):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        group = group or dist.group.WORLD
        self.world_size = dist.get_world_size(group)
        # the heap, then (in its tail) heap_bases: every allocation of the heap stays out of PyTorch's
        # caching allocator, whose allocations may be routed into a CUDA graph's pool (kernels.gemm)
        tail = -(-8 * self.world_size // 256) * 256
        whole = symm_mem.empty(nbytes + tail, dtype=torch.uint8, device=device)
        whole.zero_()
        self._handle = symm_mem.rendezvous(whole, group.group_name)
        self._group = group
        self.rank = dist.get_rank(group)
        self.bases = [int(p) for p in self._handle.buffer_ptrs]
        self.buffer = whole[:nbytes]
        self.bases_tensor = whole[nbytes:nbytes + 8 * self.world_size].view(torch.int64)
        self.bases_tensor.copy_(torch.tensor(self.bases, dtype=torch.int64))
        self._nbytes = nbytes
        self.barrier()

    def barrier(self) -> None:
        import torch.distributed as dist
        torch.cuda.synchronize()
        dist.barrier(group=self._group)
        torch.cuda.synchronize()

    def peer_buffer(self, rank: int) -> torch.Tensor:
        if rank == self.rank:
            return self.buffer
        return self._handle.get_buffer(rank, (self._nbytes,), torch.uint8)


def make_heap(nbytes: int, timeout_s: float | None = None) -> SymmetricHeap:
    """This rank's heap (starts the process group if needed)."""
    _, _, device = init_distributed(timeout_s)
    return SymmetricHeap(nbytes, backing=SymmMemBacking(nbytes, device))
