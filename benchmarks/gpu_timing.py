"""How long GPU work takes (CUDA events around calls issued back to back) and at which SM clock and board
power it ran (nvidia-smi sampled in the background).

An H200 or H100 running GEMMs back to back reaches its 700 W limit and lowers its clock (nvidia-smi's
clock event reason "SW power cap"), so a kernel's time depends on how much power it and its neighbours
draw, and on how long the GPU idled before: the figures a benchmark reports come with the clock they ran at.
"""
from __future__ import annotations

import ctypes
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


def _nvml_energy_mj():
    """A function returning this GPU's energy counter in mJ (NVML's total energy since the driver loaded, read
    through libnvidia-ml's C API), or None where NVML or the counter is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    handle, counter = ctypes.c_void_p(), ctypes.c_ulonglong()
    if nvml.nvmlInit_v2() or nvml.nvmlDeviceGetHandleByIndex_v2(torch.cuda.current_device(), ctypes.byref(handle)):
        return None

    def read():
        return counter.value if nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(counter)) == 0 else None
    return read if read() is not None else None


def energy_per_call(fn, seconds: float = 1.0, calls: int | None = None) -> dict | None:
    """Joules per call and mean board power of calls issued back to back for about `seconds` (or `calls`
    calls), from NVML's energy counter read before and after (it advances in steps: on the H200s one second's
    readings spread by about +-5%). Under the H200's power limit a kernel's time follows from the energy it
    needs: this says whether a faster variant also spends less energy. None without NVML."""
    read = _nvml_energy_mj()
    if read is None:
        return None
    if calls is None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        calls = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))
    torch.cuda.synchronize()
    e0, t0 = read(), time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    e1, t1 = read(), time.perf_counter()
    return dict(j_per_call=round((e1 - e0) / 1e3 / calls, 4), mean_w=round((e1 - e0) / 1e3 / (t1 - t0), 1),
                calls=calls, s=round(t1 - t0, 3))


def ms_per_call(fn, calls: int) -> float:
    """Device time per call of `calls` calls issued back to back between two CUDA events (this GPU only)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(calls):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / calls
