"""The tuner's search, pruning, cache and "never slower" rule, with a fake timer (CI has no GPU)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from bspfuse import tune
from bspfuse.lowering import TARGETS, plan_kernel
from bspfuse.passes import Options
from bspfuse.passes.fuse_gemm import DeviceModel, _decide

RS = tune.Problem("matmul_rs", 4096, 4096, 2048, world=2)


def fake_timer(unfused_us: float, fused_us=None, fails=()):
    """A timer that says unfused_us for the unfused program and, for a fused candidate, fused_us(config) or a
    value that prefers 128-row tiles with 4 stages; candidates whose label contains one of `fails` raise."""
    seen = []

    def timer(problem, cand):
        seen.append(cand)
        if any(f in cand.label for f in fails):
            raise RuntimeError("out of shared memory")
        if cand.config is None:
            return unfused_us * 1e-6
        c = cand.config
        us = fused_us(c) if fused_us else 100 + abs(c.BM - 128) / 4 + abs(c.num_stages - 4) + c.comm_programs / 8
        return us * 1e-6
    timer.seen = seen
    return timer


def test_the_space_spans_tiles_schedules_and_comm_programs_and_pruning_keeps_the_unfused_program():
    space = tune.space(RS, 132)
    assert {c.schedule for c in space} == {"unfused", "direct", "push", "pull"}
    assert len({(c.config.BM, c.config.BN) for c in space if c.config}) >= 6
    assert len({c.config.comm_programs for c in space if c.config and c.schedule == "push"}) >= 2
    kept = tune.prune(RS, space, DeviceModel.of("H100"), 9)
    assert kept[0].schedule == "unfused" and len(kept) == 10
    assert {c.schedule for c in kept[1:]} == {"direct", "push", "pull"}  # every schedule is measured
    assert len({(c.config.BM, c.config.BN, c.config.BK) for c in kept[1:]}) >= 3


def test_a_world_of_one_tunes_the_gemm_alone_with_no_comm_programs():
    p = tune.Problem("ag_matmul", 512, 4096, 4096)
    assert tune.schedules(p) == ("copy_engine",)
    assert all(c.config.comm_programs == 0 for c in tune.space(p, 132) if c.config)


def test_the_tuner_measures_the_pruned_candidates_and_keeps_the_fastest():
    timer = fake_timer(500.0, fails=("stages=5",))
    ticks = []
    entry = tune.Tuner(timer, "H100", keep=10, progress=lambda done, total, label: ticks.append(done)).tune(RS)
    assert [c.label for c in timer.seen] == [c.label for c in tune.Tuner(timer, "H100", keep=10).candidates(RS)]
    assert ticks == list(range(1, len(timer.seen) + 1))
    fused = {label: us for label, us in entry.times_us.items() if label != tune.UNFUSED and us is not None}
    assert entry.best_us == min(fused.values()) and entry.choice() == entry.best.schedule
    assert all(entry.times_us[c.label] is None for c in timer.seen if "stages=5" in c.label)
    assert entry.fingerprint == tune.kernel_fingerprint(RS, entry.best)


def test_auto_never_keeps_a_fused_schedule_measured_slower_than_the_unfused_program():
    entry = tune.Tuner(fake_timer(50.0), "H100", keep=6).tune(RS)
    assert entry.best is not None and entry.best_us > entry.unfused_us
    assert entry.choice() == tune.UNFUSED


def test_host_bound_calls_are_told_apart_by_their_device_times_and_both_are_kept():
    """Back to back, calls shorter than the host's time per call all take that time: the tuner keeps the
    kernel fastest on the device alone, the unfused comparison stays on back-to-back times, and a saved entry
    keeps both."""
    def timer(problem, cand):
        if cand.config is None:
            return 30e-6, 12e-6
        return 40e-6, (5 + cand.config.BM / 16 + cand.config.num_stages) * 1e-6  # host-bound back to back

    p = tune.Problem("matmul_rs", 8, 4096, 4096)
    entry = tune.Tuner(timer, "H100", keep=8).tune(p)
    device = {label: us for label, us in entry.device_us.items() if label != tune.UNFUSED}
    assert entry.device_us[entry.best.label] == min(device.values()) and entry.best.config.BM == 16
    assert entry.choice() == tune.UNFUSED  # 40 us back to back against 30: an eager program keeps cuBLAS
    again = tune.Entry.from_json(entry.to_json())
    assert again.device_us == entry.device_us and again.times_us == entry.times_us


def _table_with(entry, tmp_path, monkeypatch):
    monkeypatch.setenv("BSPFUSE_CACHE_DIR", str(tmp_path))
    table = tune.TunedTable.load(paths=[tune.cache_path()])
    table.put(entry)
    table.save()
    return tune.table(reload=True)


def test_the_pass_decides_by_measurement_where_an_entry_exists(tmp_path, monkeypatch):
    from bspfuse.ir import Program

    program = Program("p", 2, [], [], [])
    M, N, K = RS.M, RS.N, RS.K * RS.world  # the pass's view: the logical matmul
    estimated, est = _decide(program, Options(device="H100"), "y", "matmul_rs", M, N, K, "bf16")
    assert not est.measured and str(est).startswith("cost model on H100")

    slow = tune.Tuner(fake_timer(50.0), "H100", keep=6).tune(RS)  # every fused schedule slower
    _table_with(slow, tmp_path, monkeypatch)
    choice, est = _decide(program, Options(device="H100"), "y", "matmul_rs", M, N, K, "bf16")
    assert choice.mode == "off" and "measured slower than the unfused program" in choice.reason
    assert est.measured and str(est).startswith("measured on H100: BSP (no fusion); ")
    forced, _ = _decide(program, Options(device="H100", mode="push"), "y", "matmul_rs", M, N, K, "bf16")
    assert forced.mode == "push"  # the user's word stands

    fast = tune.Tuner(fake_timer(5000.0), "H100", keep=6).tune(RS)
    _table_with(fast, tmp_path, monkeypatch)
    choice, est = _decide(program, Options(device="H100"), "y", "matmul_rs", M, N, K, "bf16")
    assert choice.mode == fast.choice() != "off" and "measured the fastest" in choice.reason
    assert est.us["bsp"] == 5000.0
    other, _ = _decide(program, Options(device="H200"), "y", "matmul_rs", M, N, K, "bf16")
    assert "measured" not in other.reason  # entries are per GPU
    tune.table(reload=True)


def test_planning_takes_the_tuned_config_on_that_gpu_only(tmp_path, monkeypatch):
    p = tune.Problem("matmul_rs", 1024, 2048, 1024, world=1)
    best = tune.Tuner(None, "H100", keep=12).candidates(p)[-1].config  # the cost model's 12th: measured fastest
    entry = tune.Tuner(fake_timer(500.0, fused_us=lambda c: 10 if c == best else 50), "H100", keep=12).tune(p)
    assert entry.best.config == best
    _table_with(entry, tmp_path, monkeypatch)
    plan = plan_kernel("matmul_rs", "direct", 1000, 2048, 1024, 1, "bf16", (), TARGETS["H100"], b_layout="nk")
    assert plan.config == best and plan.launch_line.endswith("(tuned)")  # 1000 rows: the 1024 bucket
    assert plan_kernel("matmul_rs", "direct", 1000, 2048, 1024, 1, "bf16", (), TARGETS["H200"]).config != best
    # at world 2 the same GEMM's tile applies, with the heuristic's comm programs
    plan2 = plan_kernel("matmul_rs", "push", 1024, 2048, 1024, 2, "bf16", (), TARGETS["H100"], b_layout="nk")
    assert plan2.tuned == "tile tuned as a world of one" and plan2.config.BM == best.BM and plan2.config.BN == best.BN
    assert plan2.config.comm_programs >= 1  # push moves partials with comm programs: the heuristic's count
    tune.table(reload=True)


def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("BSPFUSE_CACHE_DIR", str(tmp_path))
    entry = tune.Tuner(fake_timer(500.0), "H100", keep=4).tune(RS)
    good = entry.to_json()
    foreign = dict(good, fingerprint="0123456789abcdef")  # measured with other kernels
    wrong_key = dict(good, key="H100|w9|matmul_rs|bf16|m1|n1|k1|nk")
    tune.cache_path().parent.mkdir(parents=True, exist_ok=True)
    tune.cache_path().write_text(json.dumps({"format": 1, "entries": [foreign, wrong_key, {"key": "x"}]}))
    with pytest.warns(UserWarning, match=r"ignoring 3 entries of .*tuned.json") as caught:
        table = tune.TunedTable.load(paths=[tune.cache_path()])
    assert len(caught) == 1 and table.entries == {}
    tune.cache_path().write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the tuning table"):
        assert tune.TunedTable.load(paths=[tune.cache_path()]).entries == {}
    tune.cache_path().write_text(json.dumps({"format": 99, "entries": [good]}))
    with pytest.warns(UserWarning, match="format 99"):
        assert tune.TunedTable.load(paths=[tune.cache_path()]).entries == {}
    tune.cache_path().write_text(json.dumps({"format": 1, "entries": [good]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = tune.TunedTable.load(paths=[tune.cache_path()])
    assert loaded.get("H100", RS).best == entry.best and loaded.get("H200", RS) is None
    assert loaded.get("H100", tune.Problem("matmul_rs", 3000, 4096, 2048, world=2)) is not None  # 4096 bucket


def test_the_shipped_tables_load_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tune.TunedTable.load(paths=tune.shipped_tables())


def test_split_k_is_in_the_space_where_few_tiles_leave_sms_idle():
    def splits(p):
        return {c.config.split_k for c in tune.space(p, 132) if c.config}
    assert splits(tune.Problem("matmul_rs", 32, 8192, 14336)) == {1, 2, 4, 8}  # 32 rows: few tiles, a deep K
    assert splits(tune.Problem("matmul_rs", 8192, 8192, 14336)) == {1}  # tiles for every SM already
    assert splits(tune.Problem("ag_matmul", 8, 4096, 4096)) == {1, 2, 4, 8}  # AG+GEMM too, where it stages rows
    kept = tune.prune(tune.Problem("matmul_rs", 32, 8192, 14336), tune.space(tune.Problem("matmul_rs", 32, 8192,
                                                                                          14336), 132),
                      DeviceModel.of("H100"), 12)
    assert any(c.config and c.config.split_k > 1 for c in kept)


def test_the_measured_set_spans_tile_shapes_and_keeps_one_without_split_k():
    # AG+GEMM 512x2304x3584: the model ranks large tiles split 2 and 4 ways first (measured 2.2x cuBLAS's time)
    for p in (tune.Problem("ag_matmul", 512, 2304, 3584), tune.Problem("matmul_rs", 128, 5120, 2560),
              tune.Problem("matmul_rs", 512, 8192, 8192, world=2)):
        kept = [c for c in tune.Tuner(None, "H100", keep=8).candidates(p) if c.config]
        assert len(kept) == 8 and len(set(kept)) == 8, p
        for schedule in {c.schedule for c in kept}:
            mine = [c for c in kept if c.schedule == schedule]
            assert any(c.config.split_k == 1 for c in mine), (p, schedule)
        shapes = [(c.schedule, c.config.BM, c.config.BN) for c in kept]
        cap = max(1, 8 // len({c.schedule for c in kept}) // 3)
        assert max(shapes.count(t) for t in shapes) <= cap and len(set(shapes)) >= 8 // cap, p


def test_a_candidate_label_reads_back_as_its_config():
    from bspfuse.tile import TileConfig

    for c in tune.space(tune.Problem("matmul_rs", 32, 8192, 14336, world=2), 132)[1:]:
        schedule, _, config = c.label.partition(" ")
        assert (schedule, TileConfig.parse(config)) == (c.schedule, c.config)


def test_no_candidate_needs_more_shared_memory_than_the_device_gives_a_program():
    p, h100 = tune.Problem("matmul_rs", 512, 8192, 8192), DeviceModel.of("H100")
    assert h100.smem_bytes == 232448  # what Triton reported as the H100's limit
    every, fits = tune.space(p, 132), tune.space(p, 132, h100.smem_bytes)
    too_big = [c for c in every if c.config and c.config.BM * c.config.BN == 128 * 256 and c.config.num_stages == 4]
    assert too_big and not any(c in fits for c in too_big)  # 262144 bytes: Triton refused them on an H100
    assert all(tune.search.tile_smem_bytes(c.config.BM, c.config.BN, c.config.BK, c.config.num_stages, "bf16")
               <= h100.smem_bytes for c in fits if c.config)
    assert set(fits) < set(every) and any(c.config and c.config.BM * c.config.BN == 128 * 256 for c in fits)
    assert all(c in fits for c in tune.Tuner(None, "H100").candidates(p))  # the tuner measures only those


def test_gemm_and_decode_problems_tune_in_one_order():
    from bspfuse.tune.measure import GpuTimer, gemm_order

    a, b = tune.Problem("matmul_rs", 512, 4096, 4096), tune.Problem("matmul_rs", 8, 4096, 4096)
    c = tune.Problem("ag_matmul", 32, 4096, 4096)
    d1, d2 = tune.DecodeProblem(1, 32, 8, 128, 4096), tune.DecodeProblem(1, 64, 8, 128, 65536)
    order, bounds = gemm_order([d2, a, c, d1, b])
    assert order.index(b) == order.index(a) - 1  # one GEMM's Ms together, rising
    assert set(order) == {a, b, c, d1, d2} and gemm_order([b, d1, a, c, d2])[0] == order
    assert bounds[GpuTimer.gemm(a)] == 512 and bounds[GpuTimer.gemm(c)] == 32


STEP = tune.DecodeProblem(B=2, Hq=8, Hkv=2, D=64, S=128, world=2)  # examples/flash_decode.bsp's step, per rank


def decode_timer(fastest: str):
    """Stage `fastest` at 10 us, the others at 20 us plus a little per split (so the knobs order too)."""
    def timer(problem, cand):
        return ((10.0 if cand.schedule == fastest else 20.0) + cand.config.splits / 100
                + (0.5 if cand.config.num_stages == 4 else 0)) * 1e-6
    return timer


def test_a_decode_step_measures_every_stage_and_knob_and_stage_0_is_its_unfused_program():
    cands = tune.Tuner(None, "H100").candidates(STEP)
    assert {c.schedule for c in cands} == {"stage0", "stage1", "stage2", "stage3"}
    assert len({c.config.splits for c in cands}) >= 2 and {c.config.num_stages for c in cands} == {3, 4}
    entry = tune.Tuner(decode_timer("stage2"), "H100").tune(STEP)
    assert entry.choice() == "stage2" and entry.best.config.num_stages == 3
    assert entry.best.config.splits == min(c.config.splits for c in cands)
    assert entry.unfused_us == 20.0 + entry.best.config.splits / 100  # stage 0's best
    slow = tune.Tuner(decode_timer("stage0"), "H100").tune(STEP)
    assert slow.best.schedule != "stage0" and slow.choice() == tune.UNFUSED
    assert slow.best_decode_config(3).splits == entry.best.config.splits


def _flash_decode_decision(options):
    from bspfuse.grammar import parse_file
    from bspfuse.passes import run_passes

    log = run_passes(parse_file(str(Path(__file__).resolve().parents[1] / "examples" / "flash_decode.bsp")),
                     options=options)
    (op,) = [op for op in log.program.ops if op.opcode == "flash_decode"]
    (decision,) = [d for d in log.decisions if d.pass_name == "fuse_flash_decode"]
    return op.attrs["stage"], decision


def test_the_decode_pass_takes_the_stage_measured_fastest(tmp_path, monkeypatch):
    stage, decision = _flash_decode_decision(Options(device="H100"))
    assert stage == 3 and decision.estimate is None  # nothing measured: stage 3
    for fastest, want in (("stage1", 1), ("stage0", 0)):
        entry = tune.Tuner(decode_timer(fastest), "H100").tune(STEP)
        table = _table_with(entry, tmp_path, monkeypatch)
        assert table.get("H100", STEP) is not None, "the entry survives the round trip through the cache"
        stage, decision = _flash_decode_decision(Options(device="H100"))
        assert stage == want and "measured the fastest stage on H100" in decision.reason
        assert decision.estimate.measured and str(decision.estimate).startswith(f"measured on H100: stage{want}")
        assert _flash_decode_decision(Options(device="H100", mode="push"))[0] == 3  # a forced stage stands
    tune.table(reload=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: tune would run")
def test_tune_without_a_gpu_says_so_and_exits_2(capsys):
    from bspfuse.cli import main

    assert main(["tune", "--shape", "matmul_rs:64x64x64", "--decode", "1,8,2,64,256"]) == 2
    err = capsys.readouterr().err
    assert "measures the kernels on 1 GPU" in err and "torch sees 0" in err


def test_steps_that_replay_from_a_cuda_graph_are_decided_by_their_graph_times(tmp_path, monkeypatch):
    cands = tune.Tuner(None, "H100").candidates(STEP)
    assert {c.schedule for c in cands if c.config.graph} == {"stage0", "stage3"}  # stages 1, 2 do not replay

    def timer(problem, cand):  # without graphs stage 2 wins; replayed, stage 0 beats stage 3
        if cand.config.graph:
            return {"stage0": 8.0, "stage3": 9.0}[cand.schedule] * 1e-6
        return (10.0 if cand.schedule == "stage2" else 20.0) * 1e-6
    _table_with(tune.Tuner(timer, "H100").tune(STEP), tmp_path, monkeypatch)
    assert _flash_decode_decision(Options(device="H100"))[0] == 2
    stage, decision = _flash_decode_decision(Options(device="H100", replayable=True))
    assert stage == 0 and decision.estimate.us == {"stage0": 8.0, "stage3": 9.0}
    assert "CUDA graphs" in str(decision.estimate)
    tune.table(reload=True)


def test_a_host_object_freed_leaves_the_heap_whole_and_one_that_does_not_fit_leaves_nothing():
    """The tuner builds and frees one object per candidate: every byte an object took (its buffers, flags, error
    record and ticket) comes back, else small leftovers split the free space and large objects stop fitting."""
    from bspfuse.kernels.gemm import FusedAllGatherMatmul, FusedMatmulReduceScatter
    from bspfuse.runtime import SymmetricHeap
    from bspfuse.runtime.errors import HeapExhausted

    heap = SymmetricHeap(4 << 20)  # one rank, host memory: the simulator's device
    whole = (heap.free_bytes, heap.largest_free_block)
    for make in (lambda M: FusedMatmulReduceScatter(heap, M, 64, 32, torch.float32, mode="direct"),
                 lambda M: FusedAllGatherMatmul(heap, M, 64, 32, torch.float32, mode="copy_engine")):
        for _ in range(3):
            op = make(64)
            assert heap.free_bytes < whole[0]
            for buf in op.buffers():
                heap.free(buf)
            assert (heap.free_bytes, heap.largest_free_block) == whole
        with pytest.raises(HeapExhausted):
            make(1 << 16)  # its C or staging does not fit
        assert (heap.free_bytes, heap.largest_free_block) == whole
