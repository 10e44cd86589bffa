"""The torch.compile backend: what it fuses in a Llama-style TP/SP block and why (fake process group), the
compiled block against the unparallelized one in the simulator, and the errors and fallbacks it owes users."""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import sys
import tempfile

import pytest
import torch

from bspfuse import parse as bspfuse_parse
from bspfuse.backend import BspfuseCompileError, explain, fuse_graph, reports, reset
from bspfuse.capture_fx import capture, fake_process_group, trace
from bspfuse.passes import Options, run_passes
from bspfuse.runtime.launch import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llama_block", ROOT / "examples" / "llama_block.py")
llama = sys.modules.setdefault("llama_block", importlib.util.module_from_spec(_spec))
if not hasattr(llama, "LlamaBlock"):
    _spec.loader.exec_module(llama)

SIZES = dict(hidden=64, heads=4, kv_heads=2, ffn=96, max_seq=32)
TINY = llama.LlamaConfig(**SIZES)
c10d = torch.ops._c10d_functional


def _block(cfg):
    return lambda mesh: llama.parallelize(llama.LlamaBlock(cfg).to(torch.bfloat16), mesh)


def _explain(build, shape, **kw) -> str:
    """explain's reports as text, for one rank's [batch, seq/W, hidden] input."""
    reports_ = explain(build, lambda mesh: torch.empty(shape, dtype=torch.bfloat16), world_size=2, **kw)
    return "\n".join(map(str, reports_))


# ------------------------------------------------------------------------------------------ what it would fuse


def test_explain_finds_the_four_sites_of_a_70b_layer():
    cfg = llama.LlamaConfig(hidden=8192, heads=64, kv_heads=8, ffn=28672, max_seq=8192)
    text = _explain(_block(cfg), (1, 8192 // 2, 8192))
    # the attention input feeds wq, wk and wv, the MLP's feeds w1 and w3: each set shares one kernel
    assert text.count("[fuse_allgather_matmul] fused") == 2 and "4 of 4 sites fused" in text, text
    assert "%mm_1 (mm_1 in attention.wk), %mm_2 (mm_2 in attention.wv) join it: 3 weights share" in text, text
    assert "(mm_5 in feed_forward.w3) joins it: 2 weights share" in text and "also feeds" not in text, text
    assert "* %mm_5 (mm_5 in feed_forward.w3) is computed in the kernel (SwiGLU)" in text, text
    # wo and w2 -> reduce_scatter: both candidates found; whether each fuses is the cost model's call
    assert text.count("[fuse_matmul_reduce_scatter]") == 2 and "cost model on H200" in text
    for module in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2"):  # what the user wrote
        assert f" of {module} " in text, (module, text)


def test_explain_gives_every_sites_decision_with_the_cost_models_estimates():
    text = _explain(_block(TINY), (1, 8, TINY.hidden))
    sites = [line for line in text.splitlines() if line.lstrip().startswith("[fuse_")]
    assert len(sites) == 4 and "4 of 4 sites fused" in text
    for line in sites:
        assert "(cost model on H200: " in line and "estimated bsp " in line, line
    assert sum("of attention.wo runs as one kernel, schedule direct" in line for line in sites) == 1
    off = _explain(_block(TINY), (1, 8, TINY.hidden), options={"mode": "off"})
    assert "0 of 4 sites fused" in off and off.count("not fused") == 4


def test_the_example_explains_a_layer_from_the_command_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["llama_block.py", "--world", "2", "--seq", "64", "--hidden", "256"])
    llama.main()  # --seq is the whole sequence: each rank's input holds 32 rows
    assert "bspfuse, graph 0 forward: " in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the fx rewrite


def _bf16(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16, device="meta")


def _sp_mlp(x, w1, w3, w2):
    # one rank of a sequence-parallel MLP; the gathered rows also feed a narrower matmul and a row sum, ahead
    # of w1's matmul
    group = torch.distributed.group.WORLD.group_name
    xg = c10d.wait_tensor(c10d.all_gather_into_tensor(x, 2, group))
    narrow = xg @ w3
    total = xg.sum(dim=1)
    h = torch.relu(xg @ w1)
    return narrow, total, c10d.wait_tensor(c10d.reduce_scatter_tensor(h @ w2, "sum", 2, group))


def test_rewrite_calls_the_fused_ops_with_the_decided_modes_in_a_valid_order():
    reset()
    with fake_process_group(2):
        gm = trace(_sp_mlp, [_bf16(16, 32), _bf16(32, 64), _bf16(32, 16), _bf16(64, 32)], world_size=2)
        report = fuse_graph(gm, Options(mode="push"), "sp_mlp", heap_limit=1 << 30)
    assert len(report.fused) == 2, str(report)
    calls = {n.target.name(): n for n in gm.graph.nodes if n.op == "call_function"
             and str(n.target).startswith("bspfuse.")}
    assert not [n for n in gm.graph.nodes if "c10d" in str(n.target)], gm.code  # no collective is left
    ag, rs = calls["bspfuse::all_gather_matmul"], calls["bspfuse::matmul_reduce_scatter"]
    # w1's matmul (the widest) with relu in its epilogue; w3's joins the kernel; the row sum keeps the gathered A
    assert ag.args[2:] == (None, ag.args[3], "push", "relu", True)
    assert [list(b.meta["val"].shape) for b in ag.args[1]] == [[32, 64], [32, 16]]
    assert rs.args[4:] == ("push", "")  # the mode the pass decided reaches the kernel
    c, narrow, gathered = sorted(ag.users, key=lambda n: n.args[1])
    assert [list(n.meta["val"].shape) for n in (c, narrow, gathered, rs)] == [[32, 64], [32, 16], [32, 32], [16, 32]]
    assert rs.args[0] is c  # the reduce-scatter's A is the fused all-gather's result, not a recomputed one
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default], gm.code  # every matmul fused
    (total,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.sum.dim_IntList]
    assert total.args[0] is gathered, gm.code
    gm.graph.lint()  # the row sum read the gathered A ahead of the fused call: moved after it


def test_a_replayed_graph_keeps_a_gathered_input_with_other_users_unfused():
    # The kernel's copy of the gathered rows sits in the slot the host counted to: a CUDA graph's replay does
    # not count, so with cudagraphs the site stays Inductor's and says why; the reduce-scatter still fuses.
    reset()
    with fake_process_group(2):
        gm = trace(_sp_mlp, [_bf16(16, 32), _bf16(32, 64), _bf16(32, 16), _bf16(64, 32)], world_size=2)
        report = fuse_graph(gm, Options(mode="push", replayable=True), "sp_mlp", heap_limit=1 << 30)
    assert [d.applied for d in report.decisions] == [False, True], str(report)
    assert "more readers" in str(report.decisions[0]) and "CUDA graph's replay" in str(report.decisions[0])


def _two_gathers(x1, x2, w1, w2):  # two layers of the same shapes
    group = torch.distributed.group.WORLD.group_name
    return tuple(c10d.wait_tensor(c10d.all_gather_into_tensor(x, 2, group)) @ w for x, w in ((x1, w1), (x2, w2)))


def test_sites_of_the_same_shapes_share_their_heap_in_the_budget():
    from bspfuse.kernels.gemm import SCRATCH_BYTES, heap_bytes

    # one op's buffers, and the heap's one scratch for descriptors made on the device
    one = heap_bytes("fused_allgather_matmul", 16, 64, 32, 2, torch.bfloat16, "push") + SCRATCH_BYTES
    shapes = [_bf16(16, 32), _bf16(16, 32), _bf16(32, 64), _bf16(32, 64)]
    reset()
    with fake_process_group(2):
        for _ in range(2):  # a recompile of the same shapes needs no more heap either
            report = fuse_graph(trace(_two_gathers, shapes, world_size=2), Options(mode="push"), "g", one)
            assert len(report.fused) == 2, str(report)
        reset()
        with pytest.raises(BspfuseCompileError, match=r"need [0-9.]+ MiB of symmetric heap, more than its"):
            fuse_graph(trace(_two_gathers, shapes, world_size=2), Options(mode="push"), "g", one - 1)


def test_the_epilogue_takes_only_what_the_kernel_computes():
    def gelu_tanh(x, w):
        xg = c10d.wait_tensor(c10d.all_gather_into_tensor(x, 2, torch.distributed.group.WORLD.group_name))
        return torch.nn.functional.gelu(xg @ w, approximate="tanh")

    with fake_process_group(2):
        gm = trace(gelu_tanh, [_bf16(16, 32), _bf16(32, 64)], world_size=2)
    two_biases = bspfuse_parse("""program two_biases(world = 2) sizes (T = 32, H = 32, F = 64) {
      input x : bf16[T/world, H] sharded(0)
      input w : bf16[H, F] replicated
      input b1 : bf16[F] replicated
      input b2 : bf16[F] replicated
      return bias(bias(matmul(all_gather(x, dim=0), w), b1), b2)
    }""")
    # the kernel's gelu is the exact one, and it reads one bias vector: the rest stays a pointwise op
    for program, epilogue, kept in ((capture(gm), [], "gelu"), (two_biases, ["bias"], "bias")):
        fused = run_passes(program, options=Options(mode="push")).program
        mm = next(op for op in fused.ops if op.opcode == "fused_allgather_matmul")
        assert list(mm.attrs["epilogue"]) == epilogue, str(fused)
        assert [op.attrs.get("fn") for op in fused.ops if op.opcode == "pointwise"] == [kept], str(fused)


# ------------------------------------------------------------------------------------------ errors and fallbacks


def _compile_fake(cfg, seq, options, world=2, grad=False, dynamic=False):
    from torch.distributed.device_mesh import init_device_mesh

    torch._dynamo.reset()
    reset()
    torch.manual_seed(0)
    with fake_process_group(world):
        model = _block(cfg)(init_device_mesh("cpu", (world,)))
        compiled = torch.compile(model, backend="bspfuse", options=dict(options, inner="eager"), dynamic=dynamic)
        x = torch.randn(1, seq // world, cfg.hidden, dtype=torch.bfloat16, requires_grad=grad)
        if grad:
            compiled(x).float().sum().backward()
        else:
            with torch.no_grad():
                compiled(x)
    torch._dynamo.reset()
    return reports()


def test_heap_budget_is_checked_before_anything_runs():
    with pytest.raises(Exception) as e:
        _compile_fake(TINY, 16, {"mode": "push", "heap_bytes": 4096})
    msg = str(e.value)
    assert isinstance(e.value, BspfuseCompileError) or "BspfuseCompileError" in msg
    assert "MiB of symmetric heap, more than its 0.0 MiB" in msg and "heap_bytes" in msg


def test_the_backward_graph_meets_the_same_passes(caplog):
    # the input gradients of wq/wk/wv (and w1/w3) are summed before their reduce-scatter; wo's and w2's
    # output gradients are gathered before their matmuls
    with caplog.at_level(logging.INFO, logger="bspfuse"):
        got = _compile_fake(TINY, 16, {"mode": "off"}, grad=True)  # a fake group cannot run fused kernels
    assert [r.graph.split()[-1] for r in got] == ["forward", "backward"]
    assert [d.reason for d in got[0].decisions] == ["fusion turned off by the user"] * 4
    assert [d.reason for d in got[1].decisions] == ["fusion turned off by the user"] * 4, str(got[1])
    assert "(mm_8 in feed_forward.w2)" in str(got[1]) and "backward: 0 of 4 sites fused" in caplog.text


def test_unknown_option_is_named():
    with pytest.raises(Exception) as e:
        _compile_fake(TINY, 16, {"mod": "push"})
    assert "unknown bspfuse option(s) ['mod']" in str(e.value)
    with pytest.raises(Exception) as e:
        _compile_fake(TINY, 16, {"mode": "pusj"})
    assert "options['mode'] must be one of auto, push, pull, copy_engine, off, got 'pusj'" in str(e.value)


def test_with_cudagraphs_every_site_takes_a_schedule_a_graph_can_replay():
    cfg = llama.LlamaConfig(hidden=8192, heads=64, kv_heads=8, ffn=28672, max_seq=8192)
    shape = (1, 8192 // 2, 8192)
    assert "of attention.wq runs as one kernel, schedule copy_engine" in _explain(_block(cfg), shape)  # auto's pick
    replayed = _explain(_block(cfg), shape, options={"cudagraphs": True})
    assert "4 of 4 sites fused" in replayed and "schedule copy_engine" not in replayed, replayed
    assert "of attention.wq runs as one kernel, schedule push" in replayed, replayed
    forced = _explain(_block(cfg), shape, options={"cudagraphs": True, "mode": "copy_engine"})
    assert forced.count("copy_engine cannot replay from a CUDA graph (the host enqueues the row copies") == 2, forced
    for bad, message in (({"cudagraphs": True, "inner": "eager"}, "options['cudagraphs'] needs inner='inductor'"),
                         ({"cudagraphs": "yes"}, "options['cudagraphs'] must be True or False, got 'yes'")):
        with pytest.raises(BspfuseCompileError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _explain(_block(TINY), (1, 8, TINY.hidden), options=bad)


def test_only_the_all_reduce_op_is_unsafe_for_cuda_graphs():
    # The kernels count their epochs on the device: Inductor may capture AG+GEMM and GEMM+RS in a CUDA graph.
    # GEMM+AR returns the heap slot its host picked: Inductor must run a graph that holds it without one.
    import bspfuse.runtime.torch_ops  # noqa: F401  (defines the ops)

    unsafe = {name: torch.Tag.cudagraph_unsafe in getattr(torch.ops.bspfuse, name).default.tags
              for name in ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")}
    assert unsafe == {"all_gather_matmul": False, "matmul_reduce_scatter": False, "matmul_all_reduce": True}


# ------------------------------------------------------------------------------------------ runs in the simulator


def _run_block(ctx, init_file, sizes, seq_by_rank, mode, inner="eager", rank0_again=None):
    """One rank: the compiled TP/SP block on the simulator heap; returns (compiled output, reference rows).
    rank0_again: a second sequence length rank 0 then runs alone (so it recompiles alone)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from bspfuse.runtime.torch_ops import use_heap

    cfg = llama.LlamaConfig(**sizes)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=ctx.rank, world_size=ctx.world_size)
    try:
        torch.manual_seed(0)
        full = llama.LlamaBlock(cfg).to(torch.bfloat16)
        seq = seq_by_rank[ctx.rank] * ctx.world_size
        x = torch.randn(1, seq, cfg.hidden, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
        with torch.no_grad():
            ref = full.float()(x.float())
        torch.manual_seed(0)  # the same weights again; parallelize shards them
        model = llama.parallelize(llama.LlamaBlock(cfg).to(torch.bfloat16), init_device_mesh("cpu", (ctx.world_size,)))
        rows = slice(ctx.rank * seq // ctx.world_size, (ctx.rank + 1) * seq // ctx.world_size)
        compiled = torch.compile(model, backend="bspfuse", options={"mode": mode, "inner": inner})
        with use_heap(dist.group.WORLD.group_name, ctx.heap), torch.no_grad():
            try:
                out = compiled(x[:, rows].contiguous())
                if rank0_again and ctx.rank == 0:
                    torch._dynamo.config.automatic_dynamic_shapes = False  # a static recompile, like the first
                    os.environ["BSPFUSE_EXCHANGE_TIMEOUT_S"] = "3"
                    compiled(torch.randn(1, rank0_again, cfg.hidden, dtype=torch.bfloat16))
            except Exception as e:  # noqa: BLE001 - the error is the result under test
                return {"error": str(e)}
        return {"out": out.float(), "ref": ref[:, rows], "fused": [len(r.fused) for r in reports()],
                "report": "\n".join(map(str, reports()))}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_compiled_block_matches_the_unparallelized_block_in_the_simulator(tmp_path, inner):
    # every site forced to push (the cost model keeps this tiny block's reduce-scatters BSP); "inductor"
    # compiles the rest of the graph with Inductor's C++ backend around the fused kernels
    init_file = tempfile.mktemp(dir=tmp_path)
    results = launch(_run_block, 2, backend="sim", heap_bytes=8 << 20,
                     args=(init_file, SIZES, [8, 8], "push", inner), timeout_s=600)
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert r["fused"] == [4], f"rank {rank}: fused sites per graph {r['fused']}"
        # the MLP's silu(w1 x) * w3 x is the w1/w3 kernel's epilogue (Inductor decomposes silu first)
        assert "is computed in the kernel (SwiGLU)" in r["report"], r["report"]
        err = ((r["out"] - r["ref"]).norm() / r["ref"].norm()).item()
        assert err < 3e-2, f"rank {rank}: relative error {err:.3g} against the unparallelized block"


def test_shapes_that_differ_between_ranks_are_an_error_before_any_launch(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    results = launch(_run_block, 2, backend="sim", heap_bytes=8 << 20, args=(init_file, SIZES, [8, 16], "push"),
                     timeout_s=600)
    for rank, r in enumerate(results):
        assert "error" in r, f"rank {rank} ran although the ranks' shapes differ"
        assert "compiled different fused sites than rank" in r["error"], r["error"]


def test_a_rank_that_recompiles_alone_gets_an_error_not_a_hang(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    results = launch(_run_block, 2, backend="sim", heap_bytes=8 << 20,
                     args=(init_file, SIZES, [8, 8], "push", "eager", 4), timeout_s=600)
    assert "error" not in results[1], results[1]["error"]
    msg = results[0].get("error", "")
    assert "rank(s) [1] of process group" in msg and "did not reach this compile" in msg, msg


def _heap_use(ctx, cases):
    from bspfuse.lowering import SIM_CONFIG
    from bspfuse.kernels import gemm

    out = []
    for opcode, mode, (M, N, K) in cases:
        before = ctx.heap.used_bytes
        cls = {"fused_allgather_matmul": gemm.FusedAllGatherMatmul, "fused_matmul_reduce_scatter":
               gemm.FusedMatmulReduceScatter, "fused_matmul_allreduce": gemm.FusedMatmulAllReduce}[opcode]
        kw = {"mode": mode} if opcode == "fused_allgather_matmul" else {}
        cls(ctx.heap, M, N, K, torch.bfloat16, config=SIM_CONFIG, **kw)
        out.append(ctx.heap.used_bytes - before)
    return out


def test_heap_budget_formula_covers_what_the_kernels_allocate():
    from bspfuse.kernels.gemm import heap_bytes

    cases = [("fused_allgather_matmul", "push", (24, 40, 32)), ("fused_allgather_matmul", "pull", (17, 48, 16)),
             ("fused_allgather_matmul", "copy_engine", (20, 32, 16)),
             ("fused_matmul_reduce_scatter", "push", (48, 40, 16)), ("fused_matmul_allreduce", "push", (34, 24, 32))]
    used = launch(_heap_use, 2, backend="sim", heap_bytes=8 << 20, args=(cases,), timeout_s=300)[0]
    for (opcode, mode, (M, N, K)), got in zip(cases, used):
        planned = heap_bytes(opcode, M, N, K, 2, torch.bfloat16, mode)
        assert got <= planned <= 2 * got + (1 << 16), f"{opcode} {mode} {M}x{N}x{K}: planned {planned}, used {got}"


def test_backend_is_registered_by_name_and_by_entry_point():
    import tomllib

    import torch._dynamo

    from bspfuse.backend import bspfuse_backend

    assert torch._dynamo.lookup_backend("bspfuse") is bspfuse_backend
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, name = meta["project"]["entry-points"]["torch_dynamo_backends"]["bspfuse"].partition(":")
    assert getattr(importlib.import_module(module), name) is bspfuse_backend  # what `pip install` registers


def test_a_decomposed_silu_is_seen_as_silu_and_decomposed_again_where_no_kernel_takes_it():
    from torch.fx.experimental.proxy_tensor import make_fx

    from bspfuse.backend import _expand_silu, _fold_silu

    def inductors_silu(x, y):  # Inductor's exact-eager form, and the core decomposition's
        return x / (1 + torch.exp(-x)) + y * torch.sigmoid(y)

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    gm = make_fx(inductors_silu, tracing_mode="fake")(x, y)
    _fold_silu(gm.graph)
    silus = list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.silu.default))
    assert len(silus) == 2 and not [n for n in gm.graph.nodes if "exp" in str(n.target) or "sigmoid" in str(n.target)]
    _expand_silu(gm.graph)
    gm.recompile()
    assert not list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.silu.default))
    torch.testing.assert_close(gm(x, y), torch.nn.functional.silu(x) + torch.nn.functional.silu(y))
