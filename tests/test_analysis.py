"""The three-tax analysis, checked against arithmetic done by hand on a toy device with round numbers."""
import json
from dataclasses import replace

import pytest

from bspfuse.analysis import AnalysisError, analyze
from bspfuse.devices import DEVICES, Device, Figure, device
from bspfuse.ir import Builder, local, sharded
from bspfuse.plot import bsp_schedule, overlapped_schedule, plot_timeline

# 100 TFLOP/s = 1e8 flop/us; 1000 GB/s of HBM = 1e6 B/us; 100 GB/s of link = 1e5 B/us (the analysis reads
# these six; the cost model's figures stay the H200's).
TOY = replace(device("H200"), name="toy", peak_bf16_tflops=Figure(200.0, "test"), matmul_tflops=Figure(100.0, "test"),
              hbm_gbps=Figure(1000.0, "test"), link_gbps=Figure(100.0, "test"), launch_us=Figure(5.0, "test"),
              collective_latency_us=Figure(10.0, "test"))


def small(rows="512"):
    """relu -> all_gather -> wait -> matmul -> relu -> reduce_scatter -> wait, world size 2, bf16.

    x [512, 1024] sharded(0) (1 MiB = 1,048,576 B), w [1024, 2048] (4 MiB = 4,194,304 B).
    """
    b = Builder("small", world_size=2)
    x = b.input("x", "bf16", (rows, 1024), sharded(0))
    w = b.input("w", "bf16", (1024, 2048), local())
    xr = b.pointwise("relu", x, name="xr")
    xg = b.wait(b.all_gather(xr, 0, name="ag"), name="xg")
    y = b.matmul(xg, w, name="y")
    z = b.pointwise("relu", y, name="z")
    out = b.wait(b.reduce_scatter(z, 0, name="rs"), name="out")
    b.output(out)
    return b.build()


def test_hand_computed_taxes():
    r = analyze(small(), TOY)
    rows = {row.values: row for row in r.rows}
    MiB = 1_048_576
    # relu(x): reads x (program input, boundary 1 MiB) -> op time 1 MiB / 1e6 B/us; writes xr, read by the
    # all_gather kernel: 1 MiB of locality.
    assert rows["%xr"].op_time_us == pytest.approx(1.048576)
    assert rows["%xr"].data_locality_tax_us == pytest.approx(1.048576)
    # all_gather: S = gathered [1024, 1024] bf16 = 2 MiB; 10 + 2,097,152 * (1/2) / 1e5 = 20.48576 us.
    # locality: reads xr (1 MiB) + writes ag, read by the matmul through the wait (2 MiB) = 3 MiB.
    assert rows["%ag"].op_time_us == pytest.approx(20.48576)
    assert rows["%ag"].data_locality_tax_us == pytest.approx(3.145728)
    # first wait: 5% of the compute since the start (relu, 1.048576 us).
    assert rows["%xg"].bulk_synchronous_tax_us == pytest.approx(0.0524288)
    assert rows["%xg"].launches == 0
    # matmul [1024, 1024] x [1024, 2048]: 2*1024*1024*2048 = 4,294,967,296 flop / 1e8 = 42.94967296 us
    # (more than w's 4 MiB at 1e6 B/us = 4.19 us); locality: reads xg (2 MiB) + writes y (4 MiB) = 6 MiB.
    assert rows["%y"].flops == 4_294_967_296
    assert rows["%y"].op_time_us == pytest.approx(42.94967296)
    assert rows["%y"].data_locality_tax_us == pytest.approx(6.291456)
    # relu(y): everything it touches is between kernels: op time 0; locality 4 MiB read + 4 MiB written.
    assert rows["%z"].op_time_us == 0
    assert rows["%z"].data_locality_tax_us == pytest.approx(8.388608)
    # reduce_scatter: S = its input [1024, 2048] bf16 = 4 MiB: 10 + 4,194,304 / 2 / 1e5 = 30.97152 us;
    # locality: reads z (4 MiB); its result is the program output (boundary).
    assert rows["%rs"].op_time_us == pytest.approx(30.97152)
    assert rows["%rs"].data_locality_tax_us == pytest.approx(4.194304)
    # second wait: 5% of the compute since the first wait (matmul 42.94967296 + relu 0).
    assert rows["%out"].bulk_synchronous_tax_us == pytest.approx(2.147483648)

    t = r.totals()
    assert t["launches"] == 5 and t["launch_tax_us"] == pytest.approx(25.0)  # relu, ag, matmul, relu, rs
    assert t["op_time_us"] == pytest.approx(1.048576 + 20.48576 + 42.94967296 + 0 + 30.97152)  # 95.45552896
    assert t["compute_us"] == pytest.approx(1.048576 + 42.94967296)
    assert t["comm_us"] == pytest.approx(20.48576 + 30.97152)
    assert t["overlap_bound_us"] == pytest.approx(51.45728)  # communication-bound
    assert t["data_locality_tax_us"] == pytest.approx((1 + 3 + 6 + 8 + 4) * MiB / 1e6)  # 23.068672
    assert t["bulk_synchronous_tax_us"] == pytest.approx(0.0524288 + 2.147483648)
    assert t["bsp_time_us"] == pytest.approx(95.45552896 + 25 + 23.068672 + 2.199912448)  # 145.724113408


def test_fixed_skew():
    r = analyze(small(), TOY, skew_us=7.0)
    assert r.totals()["bulk_synchronous_tax_us"] == pytest.approx(14.0)  # two waits x 7 us
    assert "7 us" in r.skew


def test_json_names_the_three_taxes():
    report = analyze(small(), "H200")
    j = report.to_json()
    for key in ("launch_tax_us", "bulk_synchronous_tax_us", "data_locality_tax_us", "bsp_time_us",
                "overlap_bound_us"):
        assert key in j["totals"]
    assert j["device"]["matmul_tflops"]["source"].startswith("measured here")
    assert [op["opcode"] for op in j["ops"]] == ["pointwise", "all_gather", "wait", "matmul", "pointwise",
                                                 "reduce_scatter", "wait"]
    assert all(op["measured_us"] is None for op in j["ops"]) and j["totals"]["measured_us"] is None
    json.dumps(j)  # plain data all the way down


def test_measured_times_are_carried():
    report = analyze(small(), TOY)
    report.rows[3].measured_us = 40.0
    assert report.to_json()["ops"][3]["measured_us"] == 40.0
    assert report.totals()["measured_us"] == 40.0


def test_h200_all_gather_uses_the_measured_numbers():
    # all_gather of [1024, 1024] bf16 at world 2 on the H200 profile: 32 + 2,097,152 * 1/2 / 366e3 B/us
    r = analyze(small(), "h200")
    ag = r.rows[1]
    assert ag.op_time_us == pytest.approx(32 + 2_097_152 / 2 / 366e3)
    # matmul: 4,294,967,296 flop at 750 TFLOP/s = 7.5e8 flop/us
    assert r.rows[3].op_time_us == pytest.approx(4_294_967_296 / 7.5e8)


def test_table_is_readable():
    text = analyze(small(), TOY).table()
    assert "small on toy, world size 2" in text
    assert "%y" in text and "matmul" in text and "BSP time" in text and "overlap bound" in text
    assert "145.7" in text  # the BSP time computed above


def test_symbolic_dims_need_sizes():
    p = small(rows="M")
    with pytest.raises(AnalysisError, match=r"no size for symbolic dim M; pass sizes=\{'M': \.\.\.\}"):
        analyze(p, TOY)
    assert analyze(p, TOY, sizes={"M": 512}).totals()["bsp_time_us"] == pytest.approx(145.724113408)
    p.sizes["M"] = 512
    assert analyze(p, TOY).totals()["bsp_time_us"] == pytest.approx(145.724113408)


def test_unknown_device():
    with pytest.raises(AnalysisError, match="unknown device 'B200' \\(known: H100, H200, MI300X\\)"):
        analyze(small(), "B200")


def test_every_device_number_says_where_it_came_from():
    for dev in DEVICES.values():
        for name, fig in dev.sources().items():
            assert fig["source"].split(":")[0] in ("datasheet", "measured here", "fitted", "assumed"), (dev.name, name)
    h200 = device("H200")
    assert (h200.matmul_tflops.value, h200.hbm_gbps.value, h200.link_gbps.value,
            h200.collective_latency_us.value) == (750.0, 4140.0, 366.0, 32.0)
    assert not any(f["source"].startswith("measured") for f in device("MI300X").sources().values())


def test_schedules_and_plot(tmp_path):
    report = analyze(small(), TOY)
    t = report.totals()
    bsp = bsp_schedule(report)
    assert max(b.start + b.length for b in bsp) == pytest.approx(t["bsp_time_us"])
    assert max(b.start + b.length for b in overlapped_schedule(report)) == pytest.approx(t["overlap_bound_us"])
    path = tmp_path / "timeline.png"
    assert plot_timeline(report, str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_captured_sp_mlp_example():
    from pathlib import Path

    from bspfuse.targets import load_program

    p = load_program(str(Path(__file__).resolve().parent.parent / "examples" / "sp_mlp.py") + ":build", 8)
    t = analyze(p, "H200").totals()
    # two matmuls of 2 * 8192 * 3584 * 8192 flop each at 7.5e8 flop/us
    assert t["compute_us"] == pytest.approx(2 * 2 * 8192 * 3584 * 8192 / 7.5e8 + 0.0)
    assert t["bsp_time_us"] > t["overlap_bound_us"] > 0


def test_fused_gemm_overlaps_its_collective():
    from bspfuse.ir import TensorType

    # fused all_gather + matmul, world 2: A shard [512, 1024], B [1024, 2048] -> C [1024, 2048]
    b = Builder("fused", world_size=2)
    a = b.input("a", "bf16", (512, 1024), sharded(0))
    w = b.input("w", "bf16", (1024, 2048), local())
    (c,) = b.op("fused_allgather_matmul", [a, w], {"result_types": [TensorType("bf16", (1024, 2048), local())]})
    b.output(c)
    row = analyze(b.build(), TOY).rows[0]
    assert row.flops == 2 * 1024 * 1024 * 2048  # all 1024 gathered rows
    assert row.comm_us == pytest.approx(10 + 2_097_152 / 2 / 1e5)  # all_gather of [1024, 1024] bf16
    assert row.op_time_us == pytest.approx(42.94967296)  # max(matmul, all_gather): the matmul hides it
    assert row.launches == 1


def test_a_world_of_one_moves_nothing():
    b = Builder("one", world_size=1)
    x = b.input("x", "bf16", (512, 1024), sharded(0))
    w = b.input("w", "bf16", (1024, 2048), local())
    b.output(b.matmul(b.wait(b.all_gather(x, 0, name="ag"), name="xg"), w, name="y"))
    r = analyze(b.build(), TOY)
    assert r.rows[0].op_time_us == 0 and r.rows[2].op_time_us > 0, r.table()
