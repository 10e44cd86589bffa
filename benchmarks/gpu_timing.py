"""How long GPU work takes (CUDA events around calls issued back to back) and at which SM clock and board
power it ran (nvidia-smi sampled in the background).

An H200 or H100 running GEMMs back to back reaches its 700 W limit and lowers its clock (nvidia-smi's
clock event reason "SW power cap"), so a kernel's time depends on how much power it and its neighbours
draw, and on how long the GPU idled before: the figures a benchmark reports come with the clock they ran at.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import torch


class ClockSampler:
    """`with ClockSampler() as s: ...` then s.mean_mhz, s.low_mhz, s.mean_w (None where nvidia-smi or a GPU is
    missing, e.g. on the CPU). Samples the current device every 10 ms, by its CUDA index, which is nvidia-smi's
    where CUDA_VISIBLE_DEVICES does not renumber the GPUs (under torchrun on this machine: each rank's own)."""

    def __enter__(self):
        self.proc = None
        self.mean_mhz = self.low_mhz = self.mean_w = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self.proc = subprocess.Popen(["nvidia-smi", "-i", str(torch.cuda.current_device()),
                                          "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                          "-lms", "10"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return
        self.proc.terminate()
        samples = []
        for line in self.proc.communicate()[0].splitlines()[1:]:  # the first sample predates the block
            try:
                mhz, watts = (float(x) for x in line.split(","))
            except ValueError:
                continue
            samples.append((mhz, watts))
        if samples:
            self.mean_mhz = round(sum(m for m, _ in samples) / len(samples))
            self.low_mhz = round(min(m for m, _ in samples))
            self.mean_w = round(sum(w for _, w in samples) / len(samples))

    def __str__(self) -> str:
        return f"{self.mean_mhz} MHz (low {self.low_mhz}), {self.mean_w} W" if self.mean_mhz else "clock not sampled"


def ms_per_call(fn, calls: int) -> float:
    """Device time per call of `calls` calls issued back to back between two CUDA events (this GPU only)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(calls):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / calls
