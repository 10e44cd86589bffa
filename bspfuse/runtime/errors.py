"""Errors raised by the runtime, and the host side of bounded device waits.

A kernel launched in debug mode passes an error buffer (``new_error_buffer``) and a
``MAX_SPINS > 0`` to ``iris.wait_until``. A wait that gives up writes a record into
the buffer; ``raise_if_wait_timed_out`` reads it after the launch and turns it into a
``RemoteWaitTimeout`` that names the rank, the flag (heap allocation name and element)
and the value waited for. Hangs become errors.

Example::

    err = new_error_buffer(heap.device)
    consumer[grid](..., err, MAX_SPINS=100_000)
    raise_if_wait_timed_out(err, heap)   # raises RemoteWaitTimeout, or resets err
"""
from __future__ import annotations

from typing import Mapping

import torch

# Layout of the int64 error record that iris.wait_until writes (first timeout wins).
ERR_COUNT = 0  # number of waits that timed out (0: none)
ERR_RANK = 1
ERR_FLAG_ADDR = 2  # this process's address of the flag element
ERR_EXPECTED = 3
ERR_OBSERVED = 4
ERR_PID0 = 5
ERR_PID1 = 6
ERR_SPINS = 7  # MAX_SPINS of the wait that gave up
ERR_RECORD_LEN = 8


class BspfuseRuntimeError(RuntimeError):
    """Base class of the runtime's errors."""


class HeapExhausted(BspfuseRuntimeError):
    """An allocation did not fit in the symmetric heap."""


class NotOnHeap(BspfuseRuntimeError, ValueError):
    """A tensor given to an RMA entry point was not allocated on the symmetric heap."""


class RemoteWaitTimeout(BspfuseRuntimeError):
    """A bounded ``iris.wait_until`` gave up: the signal it waited for never came."""


class RankFailed(BspfuseRuntimeError):
    """A rank raised an exception (or died) inside ``launch``.

    ``rank`` is the failing rank, ``remote_type`` the exception's class name and
    ``remote_traceback`` the rank's traceback text.
    """

    def __init__(self, message: str, rank: int | None = None, remote_type: str = "",
                 remote_traceback: str = ""):
        super().__init__(message)
        self.rank = rank
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class LaunchTimeout(BspfuseRuntimeError):
    """Ranks did not finish within ``launch(..., timeout_s=...)`` and were killed."""


def new_error_buffer(device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed int64 record for ``iris.wait_until(..., err_ptr, MAX_SPINS)``."""
    return torch.zeros(ERR_RECORD_LEN, dtype=torch.int64, device=device)


def describe_wait_timeout(record: list[int], heap=None,
                          names: Mapping[str, torch.Tensor] | None = None) -> str:
    """The message for one error record (see the ERR_* layout)."""
    addr = record[ERR_FLAG_ADDR] & (2**64 - 1)
    flag = _describe_address(addr, heap, names)
    others = record[ERR_COUNT] - 1
    text = (f"rank {record[ERR_RANK]}: wait_until timed out on flag {flag}: waited for a value "
            f">= {record[ERR_EXPECTED]}, last saw {record[ERR_OBSERVED]} "
            f"(program ({record[ERR_PID0]}, {record[ERR_PID1]}), gave up after "
            f"{record[ERR_SPINS]} spins)")
    if others > 0:
        text += f"; {others} more wait(s) on this rank also timed out"
    return text + ". The signal that sets this flag never arrived: check the producer's " \
                  "iris.signal (its to_rank and epoch value) and that it ran at all."


def raise_if_wait_timed_out(err: torch.Tensor, heap=None,
                            names: Mapping[str, torch.Tensor] | None = None,
                            reset: bool = True) -> None:
    """Raise ``RemoteWaitTimeout`` if a bounded ``iris.wait_until`` gave up.

    ``err`` is the buffer passed to the kernel, ``heap`` the rank's ``SymmetricHeap``
    (its named allocations name the flag), ``names`` extra ``{name: tensor}`` for flags
    that live outside the heap. With ``reset`` the buffer is zeroed for the next launch.
    """
    if err.dtype != torch.int64 or err.numel() < ERR_RECORD_LEN:
        raise ValueError(f"error buffer must be int64 with >= {ERR_RECORD_LEN} elements "
                         f"(got {err.dtype}, {err.numel()}); make it with new_error_buffer()")
    record = err.detach().reshape(-1)[:ERR_RECORD_LEN].cpu().tolist()
    if record[ERR_COUNT] == 0:
        return
    if reset:
        err.zero_()
    raise RemoteWaitTimeout(describe_wait_timeout(record, heap, names))


def _describe_address(addr: int, heap, names: Mapping[str, torch.Tensor] | None) -> str:
    for name, t in (names or {}).items():
        start = t.data_ptr()
        if start <= addr < start + max(t.numel(), 1) * t.element_size():
            return _element_name(name, t.shape, (addr - start) // t.element_size())
    if heap is not None:
        return heap.describe_address(addr)
    return f"at address {addr:#x}"


def _element_name(name: str, shape, flat_index: int) -> str:
    """'flags[1, 3]' for element ``flat_index`` of a row-major tensor of ``shape``."""
    shape = tuple(shape)
    if not shape:
        return name
    index = []
    for extent in reversed(shape):
        index.append(flat_index % extent if extent else 0)
        flat_index = flat_index // extent if extent else 0
    return f"{name}[{', '.join(str(i) for i in reversed(index))}]"
