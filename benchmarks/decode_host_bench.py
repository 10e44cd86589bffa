"""Host cost of one Flash Decode step, on a CPU: everything a step does in Python, the launches stubbed.

No GPU needed::

    python3 benchmarks/decode_host_bench.py [--steps 2000] [--heads 32/8/128] [--splits 33]

A stand-in Triton driver (``StubDriver``) makes the kernels compile for sm_90 as on an H100/H200 and
turns the CUDA launcher into a recorder, so a step runs every line of host code a GPU step runs (input
checks, buffers, argument lists, Triton's dispatch or the direct launch) except the driver's
``cuLaunchKernel`` itself. Tensors live in host memory, so allocations cost what the CPU allocator
costs, not the CUDA caching allocator. Per stage it prints microseconds per step with the fast launch
path (``bspfuse.runtime.fastlaunch``) and through the JIT's dispatch (``BSPFUSE_FAST_LAUNCH=0``), with
and without a preallocated ``out``, and a step bound once to its tensors (``FlashDecode.bind``). These are
host-side estimates: on the GPU machine, add about 2-5 us per launch for the driver, and compare with
decode_bench.py's per-step host times.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


class StubLauncher:
    """Stands in for Triton's CUDA launcher: records each launch's arguments instead of launching."""

    calls: list = []

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, *args):
        # grid (3), stream, function, packed metadata, launch metadata, enter and exit hooks, every argument
        launch_metadata, enter_hook, exit_hook = args[6:9]
        if enter_hook is not None:
            enter_hook(launch_metadata)
        StubLauncher.calls.append((self.name, args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class StubUtils:
    def load_binary(self, name, kernel, shared, device):
        return None, hash(name) & 0xFFFFFFFF, 64, 0, 1024  # module, function handle, regs, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class StubDriver:
    """A Triton driver for a pretend sm_90 GPU 0 on stream 0: compiles for real, launches nothing."""

    launcher_cls = StubLauncher
    utils = StubUtils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_device_capability(self, device=0):
        return 9, 0


def install_stub_driver() -> None:
    """Make Triton launch onto StubDriver (this process only; kernels must not be interpreted)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the stub driver needs compiled kernels: unset TRITON_INTERPRET")
    from triton.runtime import driver

    driver.set_active(StubDriver())


def time_steps(stage: int, B: int, Hq: int, Hkv: int, D: int, S: int, splits: int, steps: int,
               preallocated: bool, bound: bool = False) -> float:
    """Microseconds of host work per decode step of one FlashDecode: this process's CPU time (other
    processes on the machine do not count), the best of 5 rounds."""
    import torch

    from bspfuse.kernels.flash_decode import FlashDecode
    from bspfuse.runtime import SymmetricHeap

    heap = SymmetricHeap(16 << 20)
    fd = FlashDecode(heap, 1, 0, B, Hq, Hkv, D, torch.bfloat16, stage=stage, num_splits=splits, block_n=64,
                     num_stages=3)
    q = torch.randn(B, Hq, D, dtype=torch.bfloat16)
    k = torch.empty(B, S, Hkv, D, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    lens = torch.full((B,), S, dtype=torch.int32)
    kw = {"out": (torch.empty(B, Hq, D, dtype=torch.bfloat16), torch.empty(B, Hq))} if preallocated else {}
    step = (lambda: fd(q, k, v, kv_lens=lens, **kw)) if preallocated else (lambda: fd(q, k, v, kv_lens=lens))
    if bound:
        step = fd.bind(q, k, v, kv_lens=lens, **kw)
    for _ in range(3):  # compile, then settle
        step()
    rounds = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(steps):
            step()
        rounds.append((time.process_time() - t0) / steps * 1e6)
    StubLauncher.calls.clear()
    return min(rounds)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--heads", default="32/8/128", help="Hq/Hkv/D")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv", type=int, default=8192, help="per-rank KV length")
    p.add_argument("--splits", type=int, default=33)
    args = p.parse_args(argv)
    Hq, Hkv, D = (int(x) for x in args.heads.split("/"))
    install_stub_driver()
    print(f"host us per step, B={args.batch} {Hq}/{Hkv}/{D} S={args.kv} splits={args.splits} "
          f"(CPU, launches stubbed; the JIT column is BSPFUSE_FAST_LAUNCH=0)")
    print(f"{'stage':>5} {'fast':>8} {'fast+out':>9} {'bound':>8} {'JIT':>8} {'JIT+out':>8}")
    for stage in (0, 1, 2, 3):
        row = []
        for fast in ("1", "0"):
            os.environ["BSPFUSE_FAST_LAUNCH"] = fast
            for preallocated in (False, True):
                row.append(time_steps(stage, args.batch, Hq, Hkv, D, args.kv, args.splits, args.steps, preallocated))
            if fast == "1":  # FlashDecode.bind: the step's tensors checked once
                row.append(time_steps(stage, args.batch, Hq, Hkv, D, args.kv, args.splits, args.steps, True, True))
        print(f"{stage:>5} " + " ".join(f"{x:>8.1f}" for x in row))


if __name__ == "__main__":
    main()
