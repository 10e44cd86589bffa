"""The device table: every figure says where it came from, and the cost model computes with the table."""
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from bspfuse import devices
from bspfuse.devices import DEVICES, SOURCE_KINDS, Device, Figure
from bspfuse.ir import Builder, local, sharded
from bspfuse.passes import Options, run_passes
from bspfuse.passes.fuse_gemm import DeviceModel, choose_mode

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_every_figure_has_a_source_of_a_known_kind():
    for dev in DEVICES.values():
        for f in fields(Device):
            if f.name == "name":
                continue
            fig = getattr(dev, f.name)
            assert isinstance(fig, Figure), (dev.name, f.name)
            kind, _, what = fig.source.partition(":")
            assert kind in SOURCE_KINDS and len(what.strip()) > 10, (dev.name, f.name, fig.source)


def test_results_files_a_source_names_are_in_the_repository():
    for dev in DEVICES.values():
        for name, fig in dev.sources().items():
            for file in re.findall(r"\b[\w-]+\.json\b", fig["source"]):
                assert (RESULTS / file).is_file(), (dev.name, name, file)


def test_measured_figures_name_where_and_when():
    for dev in DEVICES.values():
        for name, fig in dev.sources().items():
            if fig["source"].startswith("measured here"):
                assert re.search(r"\b20\d\d-\d\d-\d\d\b", fig["source"]), (dev.name, name)
                assert re.search(r"\w+_bench\.py|benchmarks/results/", fig["source"]), (dev.name, name)


def test_nothing_cites_a_file_outside_the_repository():
    outside = "BASELINES" + ".md"  # measurements once kept beside the repository; the table copies them in
    files = [*ROOT.glob("*.md"), *(p for folder in ("bspfuse", "passes", "grammar", "benchmarks", "examples", "tests")
                                   for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".bsp", ".sh"))]
    assert len(files) > 50
    for path in files:
        assert outside not in path.read_text(errors="replace"), path


def test_the_cost_model_reads_the_table():
    h200 = DEVICES["H200"]
    model = DeviceModel.of("H200")
    assert model.name == "H200"
    assert model.matmul_flops == h200.matmul_tflops.value * 1e12
    assert model.hbm_bytes == h200.hbm_gbps.value * 1e9
    assert model.link_bytes == h200.link_gbps.value * 1e9
    assert model.nccl_latency_s == pytest.approx(h200.collective_latency_us.value * 1e-6)
    assert model.min_gain == h200.min_gain.value and model.num_sms == h200.num_sms.value


def test_changing_a_figure_moves_the_estimate(monkeypatch):
    before = choose_mode("matmul_ar", 1024, 8192, 8192, 2).estimates_us
    h200 = DEVICES["H200"]
    monkeypatch.setitem(DEVICES, "H200", replace(h200, collective_latency_us=Figure(132.0, "assumed: a test")))
    after = choose_mode("matmul_ar", 1024, 8192, 8192, 2).estimates_us
    assert after["bsp"] == pytest.approx(before["bsp"] + 100, abs=0.11)  # 100 us more for NCCL's collective
    assert after["direct"] == before["direct"]  # the fused schedule runs no NCCL collective


def _gather_matmul():
    b = Builder("gather_matmul", world_size=2)
    x = b.input("x", "bf16", (4096, 8192), sharded(0))
    w = b.input("w", "bf16", (8192, 14336), local())
    b.output(b.matmul(b.wait(b.all_gather(x, 0, name="ag"), name="xg"), w, name="y"))
    return b.build()


def test_options_device_picks_the_figures():
    on = {name: run_passes(_gather_matmul(), options=Options(device=name)).decisions[0].estimate
          for name in ("H200", "h100")}
    assert on["H200"].device == "H200" and on["h100"].device == "H100"
    assert on["h100"].us == choose_mode("ag_matmul", 8192, 14336, 8192, 2, device="H100").estimates_us
    assert on["h100"].us != on["H200"].us
    assert "cost model on H100" in str(on["h100"])


def test_fused_schedules_take_the_fused_core_s_fitted_gemm_and_bsp_cublas_s():
    from dataclasses import replace as dc_replace

    h100 = DeviceModel.of("H100")
    assert h100.core_flops < h100.matmul_flops and h100.core_fixed_s > h100.matmul_fixed_s  # fitted: the core lags
    as_cublas = dc_replace(h100, core_flops=h100.matmul_flops, core_bytes=h100.hbm_bytes,
                           core_fixed_s=h100.matmul_fixed_s)
    for kind in ("ag_matmul", "matmul_rs", "matmul_ar"):
        fitted = choose_mode(kind, 8192, 8192, 8192, 2, device=h100).estimates_us
        equal = choose_mode(kind, 8192, 8192, 8192, 2, device=as_cublas).estimates_us
        assert fitted["bsp"] == equal["bsp"]
        assert all(fitted[s] > equal[s] for s in fitted if s != "bsp"), kind
    h200 = DeviceModel.of("H200")  # no suite fitted there: the core at cuBLAS's rates, no fixed times
    assert (h200.core_flops, h200.core_bytes, h200.core_fixed_s, h200.matmul_fixed_s) == \
        (h200.matmul_flops, h200.hbm_bytes, 0.0, 0.0)
    assert devices.H200.core_matmul_tflops.kind == "assumed" and devices.H100.core_matmul_tflops.kind == "fitted"


def test_an_unknown_device_is_named():
    with pytest.raises(ValueError, match=r"Options\(device='B200'\): unknown device 'B200' \(known: H100, H200"):
        Options(device="B200")


def test_the_tiles_are_sized_with_the_h200_figures():
    # the comm programs a fused kernel runs follow from the H200's matmul and push rates, whatever device
    # the cost model is asked about (the kernels take the same tiles everywhere)
    from bspfuse.tile import default_comm_programs

    rate, push = devices.H200.matmul_tflops.value * 1e12, devices.H200.sm_push_gbps.value * 1e9
    assert default_comm_programs("ag_matmul", 8192, 4096, 8192, 2) == -(-rate / 4096 / 2 // push) + 1
