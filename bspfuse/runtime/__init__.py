"""Runtime: the symmetric heap, the Iris-style device API and the launcher.

    from bspfuse.runtime import SymmetricHeap, launch, RankContext, Epoch, iris
"""
from . import iris
from .errors import (HeapExhausted, LaunchTimeout, NotOnHeap, RankFailed, RemoteWaitTimeout,
                     new_error_buffer, raise_if_wait_timed_out)
from .heap import Epoch, SymmetricHeap
from .launch import RankContext, launch

__all__ = ["SymmetricHeap", "launch", "RankContext", "Epoch", "HeapExhausted", "NotOnHeap",
           "RemoteWaitTimeout", "RankFailed", "LaunchTimeout", "new_error_buffer",
           "raise_if_wait_timed_out", "iris"]
