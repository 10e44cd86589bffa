"""The device table: every figure the analysis (bspfuse/analysis.py) and the fusion cost model
(passes/fuse_gemm.py) compute with, per device, each with where it came from.

A source starts with its kind:
    measured here   this project measured it: what, with which benchmark, in which results file, when
    datasheet       the vendor's published number
    fitted          chosen so the cost model reproduces measured times (it says which)
    assumed         nobody measured it for this device; the text says what it was taken from

A measured figure beats a datasheet or assumed one: replace a figure's value and source together. The
cost model reads the entry that `Options.device` names (default "H200").

Example::

    dev = device("H200")
    dev.matmul_tflops.value   # 750.0
    dev.matmul_tflops.kind    # 'measured here'
    dev.sources()["hbm_gbps"] # {'value': 4140.0, 'source': 'measured here: a 2 GiB device copy ...'}
"""
from __future__ import annotations

from dataclasses import dataclass, fields

SOURCE_KINDS = ("measured here", "datasheet", "fitted", "assumed")


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # "<kind>: <what, where, when>", kind one of SOURCE_KINDS

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]


@dataclass(frozen=True)
class Device:
    name: str
    # the roofline (the analysis and the cost model)
    peak_bf16_tflops: Figure  # dense, no sparsity
    matmul_tflops: Figure  # what a large bf16 GEMM achieves
    hbm_gbps: Figure  # GB/s of HBM traffic (bytes read + bytes written)
    link_gbps: Figure  # GB/s one GPU sends to its peers, per direction
    launch_us: Figure  # cost of one kernel launch
    collective_latency_us: Figure  # the alpha of a collective: its time at zero bytes
    # the fusion cost model's (passes/fuse_gemm.py, choose_mode)
    num_sms: Figure  # SMs (CUs): a fused kernel's programs, comm programs taken from the GEMM's
    program_smem_kb: Figure  # KiB of shared memory one program may take: a kernel asking more does not launch
    sm_push_gbps: Figure  # GB/s one program's stores move to a peer
    nccl_efficiency: Figure  # NCCL's bulk rate over link_gbps
    flag_round_trip_us: Figure  # a flag raised on a peer and the answer seen back
    direct_exposed_gbps: Figure  # GEMM+RS/AR direct: the rate its epilogue's remote stores add time at
    direct_hop_us: Figure  # GEMM+RS/AR direct and push: the tail per dependent hop after the GEMM
    comm_program_gbps: Figure  # GEMM+RS/AR push: GB/s one comm program moves staged tiles (wait, copy, flag)
    copy_engine_fixed_us: Figure  # AG+GEMM copy_engine: the fixed cost per call (stream waits, flag writes)
    min_gain: Figure  # a fused schedule must be estimated this fraction faster than BSP to be chosen
    # a GEMM takes max(flops / rate, operand bytes / stream rate) + a fixed time: cuBLAS's (the unfused
    # program) with matmul_tflops, hbm_gbps and matmul_fixed_us; the fused kernels' GEMM core with its own three.
    # Left out (a device where benchmarks/fit_cost_model.py was not run): no fixed times, the core at cuBLAS's
    # rates, as it ran at the fused benchmark's shapes (0.98-1.05 of cuBLAS's time: BENCHMARKS.md)
    matmul_fixed_us: Figure | None = None
    core_matmul_tflops: Figure | None = None
    core_stream_gbps: Figure | None = None
    core_fixed_us: Figure | None = None

    def __post_init__(self):
        why = "benchmarks/fit_cost_model.py not run on this device"
        unfitted = dict(matmul_fixed_us=Figure(0.0, f"assumed: none; {why}"),
                        core_matmul_tflops=Figure(self.matmul_tflops.value, f"assumed: cuBLAS's rate; {why}"),
                        core_stream_gbps=Figure(self.hbm_gbps.value, f"assumed: the copy rate (hbm_gbps); {why}"),
                        core_fixed_us=Figure(0.0, f"assumed: none; {why}"))
        for name, figure in unfitted.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, figure)

    def sources(self) -> dict[str, dict]:
        """{field: {"value": ..., "source": ...}} for reports."""
        return {f.name: {"value": getattr(self, f.name).value, "source": getattr(self, f.name).source}
                for f in fields(self) if isinstance(getattr(self, f.name), Figure)}


# ------------------------------------------------------------------------------------------------ H200
# 2 x H200 SXM joined by 18 NVLinks, NVLink multicast off; torch 2.11, triton 3.6, NCCL 2.28.3.

H200 = Device(
    name="H200",
    peak_bf16_tflops=Figure(989.0, "datasheet: H200 SXM, dense BF16 (1979 with sparsity)"),
    matmul_tflops=Figure(750.0, "measured here: cuBLAS bf16 matmul alone, back to back, on an H200 at the fused "
                                "GEMMs' shapes (gemm_bench.py, benchmarks/results/gemm_h200x2.json and "
                                "gemm_ag_copy_engine_h200x2.json, 2026-11-22): 630-787 TFLOP/s over 21 shapes of "
                                "1024-16384 rows, median 741 (128 rows: 380, bound by reading B); a probe the "
                                "same day timed 1024x8192x8192 alone at 172 us (798), larger shapes 660-700. The "
                                "fitted figures below were fitted with 750"),
    hbm_gbps=Figure(4140.0, "measured here: a 2 GiB device copy, read + write, median of 10, on an H200 "
                            "(decode_bench.py, benchmarks/results/decode_h200x2.json, 2026-11-22: 4.14 TB/s; "
                            "decode_h200x2_b.json and decode_h200x4.json: 4.18); a 512 MiB copy gave 3.81 "
                            "(rma_h200x2.json, local copy_ 1905 GB/s each way); datasheet 4800"),
    link_gbps=Figure(366.0, "measured here: a 512 MiB peer copy through a symmetric buffer on 2xH200, both ranks "
                            "at once, 1.47 ms, median of 30, per direction (2026-11-22); rma_bench.py's copy engine "
                            "copies of 512 MiB ran at 370 (from the peer) and 384 GB/s (into it), Triton remote "
                            "writes from 132 programs at 350 (benchmarks/results/rma_h200x2.json); datasheet 450"),
    launch_us=Figure(3.0, "assumed: typical cost of one CUDA kernel launch (2-5 us); not measured as such here: "
                          "host_bench.py timed the host's side of one call on an H100 machine at 6.2 us (empty "
                          "Triton kernel, FastLaunch) to 22.5 us (cuBLAS 64x64) (benchmarks/results/host_h100.json, "
                          "2026-11-22)"),
    collective_latency_us=Figure(32.0, "measured here: NCCL all_gather of decode's fp32 partials at world size 2 "
                                       "on 2xH200, both ranks launched after a host barrier: 32 us at 48 KiB, 34 "
                                       "at batch 8, 45 at batch 32 (2026-11-22); back to back, NCCL's all_gather, "
                                       "reduce_scatter and all_reduce moving 2-134 MB fit lines with 21-28 us "
                                       "intercepts (benchmarks/results/gemm_h200x2.json, 'collective alone')"),
    num_sms=Figure(132, "datasheet: H200 SXM, 132 SMs (torch reported 132: benchmarks/results/decode_h200x2.json)"),
    program_smem_kb=Figure(227, "datasheet: Hopper (sm_90), 227 KiB of shared memory a thread block (228 an SM)"),
    sm_push_gbps=Figure(20.0, "measured here: Triton remote writes of 512 MiB to the peer on 2xH200 "
                              "(rma_bench.py, benchmarks/results/rma_h200x2.json, 2026-11-22): 217 GB/s from 8 "
                              "programs (27 a program), 304 from 16 (19 a program); 20 a program for the few comm "
                              "programs a fused kernel runs"),
    nccl_efficiency=Figure(0.65, "fitted: the slope of NCCL's time against bytes moved at world size 2 on 2xH200 "
                                 "over link_gbps: single all_gathers moving 8-134 MB to each rank, 236 GB/s with a "
                                 "55 us intercept (84, 197, 361 and 624 us, 2026-11-22); back to back 233 GB/s "
                                 "(all_gather) and 230 (reduce_scatter) (benchmarks/results/gemm_h200x2.json, "
                                 "'collective alone')"),
    flag_round_trip_us=Figure(2.93, "measured here: a flag ping-pong between the two H200s, 10,000 rounds in one "
                                    "kernel (rma_bench.py, benchmarks/results/rma_h200x2.json, 2026-11-22); "
                                    "decode_bench.py measured 2.95 and 2.94 (decode_h200x2.json, _b)"),
    direct_exposed_gbps=Figure(445.0, "fitted: with direct_hop_us, to gemm_bench.py's back-to-back times on 2xH200 "
                                      "(2026-11-22, a run before benchmarks/results/gemm_h200x2.json): GEMM+AR "
                                      "direct 45 and 143 us at 128 and 1024 rows, GEMM+RS direct 123 us at 1024 "
                                      "rows, against our GEMM alone at 30, 95 and 96 us (gemm_h200x2.json, the "
                                      "final code: 49, 142 and 121 us direct)"),
    direct_hop_us=Figure(5.0, "fitted: with direct_exposed_gbps, to the same GEMM+AR/RS direct times: the last "
                              "tiles' partials reach their owner after the GEMM ends, and AR's finished tiles then "
                              "travel back"),
    comm_program_gbps=Figure(9.0, "fitted: to gemm_bench.py's GEMM+RS/AR push times back to back on 2xH200 "
                                  "(2026-11-22): push's comm programs start after the first wave of tiles and "
                                  "move staged tiles at this rate each"),
    copy_engine_fixed_us=Figure(40.0, "fitted: to gemm_bench.py's AG+GEMM copy_engine times back to back on "
                                      "2xH200 (2026-11-22): the matmul alone plus 15-45 us at 1024-16384 rows and N "
                                      "4096-28672; in benchmarks/results/gemm_ag_copy_engine_h200x2.json the excess "
                                      "is at most 44 us up to N = 8192 and 79-99 us at N = 28672"),
    min_gain=Figure(0.03, "measured here: the same fused kernel's back-to-back time moved up to 2.9% between two "
                          "machine starts (gemm_bench.py on 2xH200, 14 shapes, 2026-11-22); the unfused "
                          "fallback is never slower than the baseline"),
)


# ------------------------------------------------------------------------------------------------ H100
# One H100 SXM (H100 80GB HBM3) measured here; no H100 pair: its link and collective figures are assumed.

def _as_on_the_h200(figure: Figure, what: str, why_not: str = "not measured on H100s") -> Figure:
    """The H200 pair's figure, taken for a device it was not measured on; `what` says it with {v}."""
    return Figure(figure.value, f"assumed: as on the H200 pair, where {what.format(v=figure.value)}; {why_not}")


# The figures of a GPU pair's data movement and the fitted ones, as {field: what the H200 figure says}.
_PEER_FIGURES = {
    "sm_push_gbps": "one program's remote writes moved {v:g} GB/s",
    "nccl_efficiency": "NCCL moved {v:g} of the link rate",
    "flag_round_trip_us": "a flag round trip took {v:g} us",
    "direct_exposed_gbps": "the fit gave {v:g} GB/s",
    "direct_hop_us": "the fit gave {v:g} us",
    "comm_program_gbps": "the fit gave {v:g} GB/s",
    "copy_engine_fixed_us": "the fit gave {v:g} us",
    "min_gain": "runs spread by up to {v:.0%}",
}


def _peer_figures_as_on_the_h200(why_not: str = "not measured on H100s") -> dict[str, Figure]:
    return {name: _as_on_the_h200(getattr(H200, name), what, why_not) for name, what in _PEER_FIGURES.items()}


H100 = Device(
    name="H100",
    peak_bf16_tflops=Figure(989.0, "datasheet: H100 SXM, dense BF16 (1979 with sparsity)"),
    matmul_tflops=Figure(760.0, "fitted: with hbm_gbps and matmul_fixed_us, to cuBLAS's device times over the "
                                "512 GEMMs of core_suite.py on one H100 (benchmarks/fit_cost_model.py, "
                                "cost_model_fit_h100.json from core_suite_h100.json, 2026-12-08): median error 4.4% "
                                "on the 320 rows fitted, 8.5% on the 192 of the two models left out; do_bench of 10 "
                                "shapes of 4096-16384 rows gave 676-765 TFLOP/s, median 707 (core_h100.json)"),
    hbm_gbps=Figure(3010.0, "measured here: a 2 GiB device copy, read + write, on one H100 (decode_core_bench.py, "
                            "benchmarks/results/decode_core_h100.json, 2026-11-22: 3.01 TB/s); datasheet 3350"),
    link_gbps=Figure(366.0, "assumed: the rate measured between the two H200s (see H200), which have the same "
                            "NVLink 4 with 18 links (datasheet 450 per direction for both); no H100 pair measured "
                            "here"),
    launch_us=H200.launch_us,
    collective_latency_us=_as_on_the_h200(H200.collective_latency_us, "a 48 KiB NCCL all_gather took {v:g} us"),
    num_sms=Figure(132, "datasheet: H100 SXM, 132 SMs (torch reported 132: "
                        "benchmarks/results/decode_core_h100.json)"),
    program_smem_kb=Figure(227, "measured here: Triton's hardware limit on an H100, 232448 bytes, when it refused "
                                "a 128x256x64 GEMM tile of 4 stages that asked 262176 (core_suite.py's log, "
                                "benchmarks/results/core_suite_h100/, 2026-12-08); datasheet 227 KiB a thread block"),
    matmul_fixed_us=Figure(2.0, "fitted: with matmul_tflops (same fit); the fitted stream rate, 3008 GB/s, is the "
                                "copy rate (hbm_gbps)"),
    core_matmul_tflops=Figure(666.8, "fitted: with core_stream_gbps and core_fixed_us, to the fused GEMM core's "
                                     "device times, tuned, over the same 512 GEMMs (cost_model_fit_h100.json): "
                                     "median error 7.1% on the rows fitted, 10.8% on those left out"),
    core_stream_gbps=Figure(2892.9, "fitted: with core_matmul_tflops (same fit)"),
    core_fixed_us=Figure(4.4, "fitted: with core_matmul_tflops (same fit)"),
    **_peer_figures_as_on_the_h200(),
)


# ------------------------------------------------------------------------------------------------ MI300X
# Nothing measured: datasheet values, the rest assumed from the H200s.

MI300X = Device(
    name="MI300X",
    peak_bf16_tflops=Figure(1307.4, "datasheet: MI300X, dense BF16"),
    matmul_tflops=Figure(round(1307.4 * H200.matmul_tflops.value / H200.peak_bf16_tflops.value, 1),
                         f"assumed: the H200's measured fraction of peak "
                         f"({H200.matmul_tflops.value / H200.peak_bf16_tflops.value:.2f}) times the MI300X "
                         "datasheet peak; not measured"),
    hbm_gbps=Figure(5300.0, "datasheet: MI300X HBM3 peak; not measured"),
    link_gbps=Figure(448.0, "datasheet: 7 Infinity Fabric links x 64 GB/s per direction; not measured"),
    launch_us=Figure(3.0, "assumed: typical host cost of one HIP kernel launch; not measured"),
    collective_latency_us=_as_on_the_h200(H200.collective_latency_us, "a 48 KiB NCCL all_gather took {v:g} us",
                                          "RCCL and AMD GPUs not measured here"),
    num_sms=Figure(304, "datasheet: MI300X, 304 compute units"),
    program_smem_kb=Figure(64, "datasheet: MI300X (CDNA 3), 64 KiB of LDS a compute unit"),
    **_peer_figures_as_on_the_h200("RCCL and AMD GPUs not measured here"),
)

DEVICES = {d.name: d for d in (H100, H200, MI300X)}


def device(name: str | Device) -> Device:
    """The table's entry called `name` (case-insensitive: 'H100', 'H200', 'MI300X'), or `name` if it is one."""
    if isinstance(name, Device):
        return name
    for key, dev in DEVICES.items():
        if key.lower() == str(name).lower():
            return dev
    raise ValueError(f"unknown device '{name}' (known: {', '.join(DEVICES)})")
