"""The decode benchmark's report side (combine ranks, targets, table, JSON, plot) on made-up timings, so the
one GPU run it gets is not spent on a typo. The GPU side is compiled for sm_90 in test_flash_decode_compile."""
import importlib.util
import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "decode_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rank(bench, rank):
    shapes = []
    for B in (1, 8):
        for S in (4096, 131072):
            base = S * B / 1000.0
            steps = {"local": base, "allgather": 30.0, "bsp": base + 45, "bsp_graph": base + 35, "stage1": base + 80,
                     "stage2": base + 25, "stage3": base + 8 + rank, "stage3_graph": base + 6}
            shapes.append({"B": B, "Hq": 96, "Hkv": 12, "D": 128, "S": S, "splits": 16,
                           "steps_us": {k: [v, v + 1, v + 2] for k, v in steps.items()},
                           "host_us": {k: 20.0 + 10 * rank for k in steps},
                           "b2b_us": {k: steps[k] for k in bench.B2B_VARIANTS},
                           "loop_us": {k: steps[k] + 10 + rank for k in bench.LOOP_VARIANTS},
                           "read_us": 2 * B * S * 12 * 128 * 2 / (3.0e12 - 1e11 * rank) * 1e6,
                           "timeline": {"attended": {"median": base, "max": base + 1}, "programs_per_sm_max": 2}
                           if B == 1 else None})
    check = {"B": 1, "Hq": 96, "Hkv": 12, "D": 128, "S": 4096, "ragged": False, "seed": 1,
             "errors": {"stage3": {"rel_err_o": 1e-3, "max_err_lse": 1e-5, "ok": True}}}
    meta = {"device": "H200", "sms": 132, "world_size": 2, "torch": "x", "triton": "y", "hbm_bytes_per_s": 4.2e12,
            "flag_round_trip_us": 2.0 + rank}
    return {"meta": meta, "checks": [check], "shapes": shapes, "skipped": [], "elapsed_s": 100.0}


def test_report(bench, tmp_path, capsys):
    result = bench.combine([_rank(bench, 0), _rank(bench, 1)])
    row = result["rows"][0]
    assert row["us"]["stage3"] == 4.096 + 8 + 2  # median over steps of the slower rank
    # the floor: K+V at the best read rate of any rank and shape, plus the slower flag round trip
    assert row["floor_us"] == pytest.approx(2 * 4096 * 12 * 128 * 2 / 3.0e12 * 1e6 + 3.0)
    assert row["copy_floor_us"] == pytest.approx(2 * 4096 * 12 * 128 * 2 / 4.2e12 * 1e6 + 3.0)
    assert row["host_us"]["stage3"] == 30.0  # the slower rank's host time
    short = result["summary"]["targets"]["stage3_vs_bsp_b1_short"]
    assert short["value"] == pytest.approx(row["us"]["bsp"] / row["us"]["stage3"]) and short["met"]
    loop = result["summary"]["loop"]["stage3_vs_bsp_b1_short"]  # the slower rank's median in both
    assert loop == pytest.approx((4.096 + 45 + 11) / (4.096 + 9 + 11)) and row["loop_us"]["stage3"] == 4.096 + 9 + 11
    assert len(row["timeline_by_rank"]) == 2 and "timeline_by_rank" not in result["rows"][2]  # batch 1 only
    path = tmp_path / "decode.json"
    path.write_text(json.dumps(result))
    bench.main(["--from-json", str(path), "--plot", str(tmp_path / "decode.png")])
    text = capsys.readouterr().out
    assert "stage3_vs_bsp_geomean" in text and "96/12" in text and "targets, decode loop" in text
    assert "stage 3's timeline at batch 1" in text and "attended 5.1" in text
    assert (tmp_path / "decode.png").stat().st_size > 10_000
