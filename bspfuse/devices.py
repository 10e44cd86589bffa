"""Device profiles for the cost model: every number carries where it came from.

The H200 numbers are the ones measured on this project's 2 x H200 machine (shared BASELINES.md); the
others are datasheet values or stated assumptions, and say so. A measured number beats a datasheet
one: replace a figure's value and source together.

Example::

    dev = device("H200")
    dev.matmul_tflops.value   # 790.0
    dev.matmul_tflops.source  # 'measured here: cuBLAS bf16 ...'
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # "datasheet: ...", "measured here: ..." or "assumed: ..."


@dataclass(frozen=True)
class Device:
    name: str
    peak_bf16_tflops: Figure  # dense, no sparsity
    matmul_tflops: Figure  # what a large bf16 GEMM achieves
    hbm_gbps: Figure  # GB/s of HBM traffic (bytes read + bytes written)
    link_gbps: Figure  # GB/s one GPU sends to its peers, per direction
    launch_us: Figure  # cost of one kernel launch
    collective_latency_us: Figure  # the alpha of a collective: its time at zero bytes

    def sources(self) -> dict[str, dict]:
        """{field: {"value": ..., "source": ...}} for reports."""
        return {f.name: {"value": getattr(self, f.name).value, "source": getattr(self, f.name).source}
                for f in fields(self) if isinstance(getattr(self, f.name), Figure)}


_ASSUMED_LAUNCH = Figure(3.0, "assumed: typical host cost of one CUDA kernel launch (2-5 us); not measured here")

H200 = Device(
    name="H200",
    peak_bf16_tflops=Figure(989.0, "datasheet: H200 SXM, dense BF16 (1979 with sparsity)"),
    matmul_tflops=Figure(790.0, "measured here: cuBLAS bf16 1024x8192x8192 in 172 us (about 798 TFLOP/s), "
                                "larger shapes 660-700 (BASELINES.md)"),
    hbm_gbps=Figure(4200.0, "measured here: HBM copy rate, read + write (BASELINES.md, decode section); "
                            "datasheet 4800"),
    # NCCL's large all_gather / reduce_scatter measured here imply about 236 GB/s and a 55 us intercept at
    # world size 2, so with these two numbers the model is up to 1.6x optimistic for big NCCL collectives.
    link_gbps=Figure(366.0, "measured here: peer copy 512 MiB through a symmetric buffer, 1.47 ms, per direction "
                            "(BASELINES.md)"),
    launch_us=_ASSUMED_LAUNCH,
    collective_latency_us=Figure(32.0, "measured here: NCCL all_gather of 48 KiB at world size 2, 32 us "
                                       "(BASELINES.md)"),
)

H100 = Device(
    name="H100",
    peak_bf16_tflops=Figure(989.0, "datasheet: H100 SXM, dense BF16 (1979 with sparsity)"),
    matmul_tflops=Figure(790.0, "assumed: the rate measured on the H200 (same GH100 compute die); not measured "
                                "on an H100"),
    hbm_gbps=Figure(3350.0, "datasheet: H100 SXM HBM3 peak; not measured"),
    link_gbps=Figure(450.0, "datasheet: NVLink 4, 900 GB/s bidirectional = 450 per direction; not measured"),
    launch_us=_ASSUMED_LAUNCH,
    collective_latency_us=Figure(32.0, "assumed: the NCCL small all_gather measured on the H200s; not measured "
                                       "on H100s"),
)

MI300X = Device(
    name="MI300X",
    peak_bf16_tflops=Figure(1307.4, "datasheet: MI300X, dense BF16"),
    matmul_tflops=Figure(round(1307.4 * 790.0 / 989.0, 1),
                         "assumed: the H200's measured fraction of peak (0.80) times the MI300X datasheet peak; "
                         "not measured"),
    hbm_gbps=Figure(5300.0, "datasheet: MI300X HBM3 peak; not measured"),
    link_gbps=Figure(448.0, "datasheet: 7 Infinity Fabric links x 64 GB/s per direction; not measured"),
    launch_us=Figure(3.0, "assumed: typical host cost of one HIP kernel launch; not measured"),
    collective_latency_us=Figure(32.0, "assumed: the NCCL small all_gather measured on the H200s; RCCL not "
                                       "measured"),
)

DEVICES = {d.name: d for d in (H100, H200, MI300X)}


def device(name: str | Device) -> Device:
    """The profile called `name` (case-insensitive: 'H100', 'H200', 'MI300X'), or `name` if it is one."""
    if isinstance(name, Device):
        return name
    for key, dev in DEVICES.items():
        if key.lower() == str(name).lower():
            return dev
    raise ValueError(f"unknown device '{name}' (known: {', '.join(DEVICES)})")
