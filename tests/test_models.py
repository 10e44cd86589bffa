"""The models people run, as a new user compiles them: Hugging Face Llama under its own tensor-parallel plan,
a Llama decoder layer under torchtitan's TP + SP plan at batch 1 and 4, a training step, dynamic lengths, a
2-D mesh, all-to-all and a world of one. `bspfuse.explain` plans them on a fake process group (nothing is
computed); the simulator runs a training step against the unparallelized model."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import tempfile

import pytest
import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from transformers import LlamaConfig, LlamaForCausalLM  # a test dependency (.ci/run installs it)

import bspfuse
from bspfuse.backend import explain

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_llama_tp", ROOT / "examples" / "hf_llama_tp.py")
hf_llama_tp = sys.modules.setdefault("hf_llama_tp", importlib.util.module_from_spec(_spec))
if not hasattr(hf_llama_tp, "SPLayer"):
    _spec.loader.exec_module(hf_llama_tp)

HIDDEN, SEQ = 64, 16


def _config(layers: int = 1) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attn_implementation="sdpa")


def hf_tp(mesh, layers: int = 2) -> torch.nn.Module:
    return hf_llama_tp.hf_plan(LlamaForCausalLM(_config(layers)).to(torch.bfloat16), mesh)


def titan_sp(mesh, config: LlamaConfig | None = None) -> torch.nn.Module:
    return hf_llama_tp.titan_plan(hf_llama_tp.SPLayer(config or _config(), mesh.size()).to(torch.bfloat16), mesh)


def _rows(batch: int, world: int = 2):
    return lambda mesh: torch.randn(batch, SEQ // world, HIDDEN, dtype=torch.bfloat16)


def _sites(report) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for d in report.decisions:
        out.setdefault(d.pass_name, []).append(d.applied)
    return out


# ------------------------------------------------------------------------------------------ what fuses


def test_hf_llama_under_its_own_tp_plan_fuses_every_all_reduce():
    (forward,) = explain(hf_tp, lambda mesh: torch.randint(0, 128, (2, SEQ)), 2)
    assert _sites(forward) == {"fuse_matmul_allreduce": [True] * 4}, str(forward)
    for module in ("layers.0.self_attn.o_proj", "layers.0.mlp.down_proj", "layers.1.mlp.down_proj"):
        assert f" in model.{module})" in str(forward), str(forward)


@pytest.mark.parametrize("batch", [1, 4])
def test_titan_tp_sp_layer_fuses_every_gather_and_scatter(batch):
    (forward,) = explain(titan_sp, _rows(batch), 2)
    assert _sites(forward) == {"fuse_allgather_matmul": [True, True], "fuse_matmul_reduce_scatter": [True, True]}, \
        str(forward)
    if batch > 1:  # [batch, seq, hidden] gathered on seq: rows of each batch interleave ranks
        assert str(forward).count("the kernel stores them in place") == 2, str(forward)


def test_a_training_step_fuses_forward_and_backward():
    forward, backward = explain(titan_sp, _rows(2), 2, train=True)
    assert forward.graph.endswith("forward") and backward.graph.endswith("backward")
    assert len(forward.fused) == 4 and len(backward.fused) == 4, f"{forward}\n{backward}"
    # the forward returns the gathered activations (saved for the backward): the kernels write them out
    assert "(the graph returns it: saved for the backward)" in str(forward), str(forward)
    # backward: wo's and down's output gradients are gathered before their matmuls; q/k/v's (gate/up's) input
    # gradients are summed before their reduce-scatter, which runs as one GEMM over the K's side by side
    assert "the sum of 3 matmuls" in str(backward) and "the sum of 2 matmuls" in str(backward), str(backward)
    assert "in layer.self_attn.o_proj)" in str(backward), str(backward)


def test_saving_the_gathered_activation_against_gathering_it_again():
    saved, again = (explain(titan_sp, _rows(2), 2, train=True, options={"save_gathered": keep})
                    for keep in (True, False))
    # the two gathered activations [2, 16, 64] bf16 are saved whole, or as this rank's half, gathered again
    gathered = 2 * 2 * SEQ * HIDDEN * 2
    assert saved[0].saved_bytes - again[0].saved_bytes == gathered // 2, (saved[0].saved_bytes, again[0].saved_bytes)
    assert len(again[1].decisions) == len(saved[1].decisions) + 2, str(again[1])  # two more all-gathers
    assert str(again[1]).count("read only as a matmul's B operand (a weight gradient") == 2, str(again[1])


def test_one_dynamic_graph_serves_every_length_up_to_a_bound():
    reports_ = explain(titan_sp, _rows(2), 2, dynamic=True, options={"max_tokens": 4096})
    dynamic = [r for r in reports_ if r.note and "dynamic" in r.note]
    assert dynamic and len(dynamic[-1].fused) == 4, "\n".join(map(str, reports_))
    assert "all_gather_matmul up to 2048 rows of A" in dynamic[-1].note  # 4096 tokens over 2 ranks
    assert "matmul_reduce_scatter up to 4096 rows of A" in dynamic[-1].note


def test_megatron_style_funcol_tp_fuses_its_all_reduce_with_the_bias_after_it():
    class RowParallel(torch.nn.Module):
        def __init__(self, group):
            super().__init__()
            self.up = torch.nn.Linear(HIDDEN, 32, bias=False)
            self.down = torch.nn.Linear(32, HIDDEN, bias=False)
            self.bias = torch.nn.Parameter(torch.zeros(HIDDEN))
            self.group = group

        def forward(self, x):  # [batch, seq, hidden]; the bias once, after the sum over ranks
            partial = self.down(torch.relu(self.up(x)))
            return funcol.all_reduce(partial, "sum", self.group) + self.bias

    (forward,) = explain(lambda mesh: RowParallel(mesh.get_group()).to(torch.bfloat16), _rows(2, world=1), 2)
    assert _sites(forward) == {"fuse_matmul_allreduce": [True]} and "the bias after it is applied in the kernel" in str(forward), str(forward)


def test_two_process_groups_fuse_the_tp_sites_and_name_the_other_groups_collective():
    class TwoGroups(torch.nn.Module):
        def __init__(self, dp_group):
            super().__init__()
            self.up = torch.nn.Linear(HIDDEN, 128, bias=False)
            self.down = torch.nn.Linear(128, HIDDEN, bias=False)
            self.dp = dp_group

        def forward(self, x):  # a data-parallel statistic over the other mesh dimension
            y = self.down(torch.relu(self.up(x)))
            return y * torch.rsqrt(funcol.all_reduce(y.float().pow(2).mean(dim=0), "sum", self.dp) + 1)

    def build(mesh):
        model = TwoGroups(mesh["dp"].get_group()).to(torch.bfloat16)
        return parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})

    kw = dict(mesh_shape=(2, 2), mesh_dim_names=("dp", "tp"))
    inputs = lambda mesh: torch.randn(16, HIDDEN, dtype=torch.bfloat16)  # noqa: E731
    (across,) = explain(build, inputs, 4, options={"ranks_per_host": 2}, **kw)
    assert [d.applied for d in across.decisions] == [True, False], str(across)
    assert "span hosts [0, 1]" in across.decisions[1].reason and "stays on torch.distributed" in str(across)
    (one_host,) = explain(build, inputs, 4, **kw)  # the dp group's input is no matmul: it says so
    assert "it comes from aten.mean.dim" in str(one_host.decisions[1]), str(one_host)


def test_all_to_all_is_named():
    class Dispatch(torch.nn.Module):
        def __init__(self, group):
            super().__init__()
            self.w = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.group = group

        def forward(self, x):
            return funcol.all_to_all_single(self.w(x), None, None, self.group) * 2

    (forward,) = explain(lambda mesh: Dispatch(mesh.get_group()).to(torch.bfloat16),
                         lambda mesh: torch.randn(16, HIDDEN, dtype=torch.bfloat16), 2)
    assert forward.fallback is None and "all-to-all: no pass fuses all-to-all" in str(forward), str(forward)


def test_a_world_of_one_runs_and_says_there_is_nothing_to_fuse():
    (forward,) = explain(titan_sp, _rows(1, world=1), 1)
    assert forward.fallback == "no collectives in this graph", str(forward)
    assert str(forward).startswith("bspfuse, graph 0 forward: left to Inductor: ")
    (eager,) = explain(titan_sp, _rows(1, world=1), 1, options={"inner": "eager"})  # reports name what ran
    assert str(eager).startswith("bspfuse, graph 0 forward: left to PyTorch eager: "), str(eager)
    from bspfuse.passes.fuse_gemm import choose_mode

    assert "a world of one rank" in choose_mode("ag_matmul", 1024, 4096, 4096, 1).reason


def test_public_functions_work_when_called_again():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x, w: x @ w)(torch.randn(8, 16), torch.randn(16, 4))
    for _ in range(2):
        program = bspfuse.capture(gm, world_size=2)
        assert bspfuse.run_passes(program).program.ops and bspfuse.analyze(program)
        assert bspfuse.parse("program p(world = 2) sizes (T = 8) {\n  input x : bf16[T, T] replicated\n"
                             "  return matmul(x, x)\n}").ops
        assert len(bspfuse.explain(titan_sp, _rows(1), 2)) == 1


# ------------------------------------------------------------------------------------------ runs in the simulator


def _train_step(ctx, init_file, batch, mode):
    """One rank: a training step of the TP + SP layer compiled with bspfuse, on the simulator heap; returns the
    loss and every parameter's full gradient, and the same of the unparallelized layer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from bspfuse.backend import reports
    from bspfuse.runtime.torch_ops import use_heap

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=ctx.rank, world_size=ctx.world_size)
    try:
        config, W = _config(), ctx.world_size
        config.num_key_value_heads = 4  # heads split over 4 ranks
        x = torch.randn(batch, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
        target = torch.randn(batch, SEQ, HIDDEN, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(0)
        full = hf_llama_tp.SPLayer(config, 1).to(torch.bfloat16)
        ref_loss = (full(x).float() * target).sum()
        ref_loss.backward()
        torch.manual_seed(0)  # the same weights again; the plan shards them
        model = titan_sp(init_device_mesh("cpu", (W,)), config)
        rows = slice(ctx.rank * SEQ // W, (ctx.rank + 1) * SEQ // W)
        compiled = torch.compile(model, backend="bspfuse", options={"mode": mode, "inner": "eager"})
        with use_heap(dist.group.WORLD.group_name, ctx.heap):
            loss = (compiled(x[:, rows].contiguous()).float() * target[:, rows]).sum()
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = (g.float(), dict(full.named_parameters())[name].grad.float())
        return {"loss": (total.item(), ref_loss.item()), "grads": grads,
                "fused": [len(r.fused) for r in reports()], "report": "\n".join(map(str, reports()))}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_a_training_step_matches_the_unparallelized_layer_in_the_simulator(tmp_path, world):
    from bspfuse.runtime.launch import launch

    results = launch(_train_step, world, backend="sim", heap_bytes=16 << 20,
                     args=(tempfile.mktemp(dir=tmp_path), 2, "push"), timeout_s=900)
    for rank, r in enumerate(results):
        assert r["fused"] == [4, 4], f"rank {rank}: fused sites forward, backward {r['fused']}\n{r['report']}"
        got, want = r["loss"]
        assert abs(got - want) <= 3e-2 * abs(want) + 1e-2, f"rank {rank}: loss {got} against {want}"
        for name, (g, ref) in r["grads"].items():
            err = ((g - ref).norm() / ref.norm().clamp_min(1e-6)).item()
            assert err < 5e-2, f"rank {rank}: {name}'s gradient is off by {err:.3g} (relative)"


def _tp_forward(ctx, init_file):
    """One rank: Hugging Face Llama under its TP plan, compiled with bspfuse, against the unparallelized model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from bspfuse.backend import reports
    from bspfuse.runtime.torch_ops import use_heap

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=ctx.rank, world_size=ctx.world_size)
    try:
        ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        with torch.no_grad():
            ref = LlamaForCausalLM(_config(2)).to(torch.bfloat16).float()(ids).logits
        torch.manual_seed(0)
        compiled = torch.compile(hf_tp(init_device_mesh("cpu", (ctx.world_size,))), backend="bspfuse",
                                 options={"mode": "push", "inner": "eager"})
        with use_heap(dist.group.WORLD.group_name, ctx.heap), torch.no_grad():
            out = compiled(ids).logits.float()
        return {"err": ((out - ref).norm() / ref.norm()).item(), "fused": [len(r.fused) for r in reports()]}
    finally:
        dist.destroy_process_group()


def test_plain_tp_forward_matches_the_unparallelized_model_in_the_simulator(tmp_path):
    from bspfuse.runtime.launch import launch

    for rank, r in enumerate(launch(_tp_forward, 2, backend="sim", heap_bytes=16 << 20,
                                    args=(tempfile.mktemp(dir=tmp_path),), timeout_s=900)):
        assert r["fused"] == [4], f"rank {rank}: fused sites {r['fused']}"
        assert r["err"] < 3e-2, f"rank {rank}: relative error {r['err']:.3g} against the unparallelized model"


def _dynamic_forward(ctx, init_file, seqs):
    """One rank: the TP + SP layer compiled once with dynamic=True, run at several sequence lengths."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from bspfuse.backend import reports
    from bspfuse.runtime.torch_ops import use_heap

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=ctx.rank, world_size=ctx.world_size)
    try:
        config, W = _config(), ctx.world_size
        torch.manual_seed(0)
        full = hf_llama_tp.SPLayer(config, 1).to(torch.bfloat16)
        torch.manual_seed(0)
        compiled = torch.compile(titan_sp(init_device_mesh("cpu", (W,)), config), backend="bspfuse", dynamic=True,
                                 options={"mode": "push", "inner": "eager", "max_tokens": 2 * max(seqs)})
        errors = []
        for seq in seqs:
            x = torch.randn(2, seq, HIDDEN, generator=torch.Generator().manual_seed(seq), dtype=torch.bfloat16)
            rows = slice(ctx.rank * seq // W, (ctx.rank + 1) * seq // W)
            with torch.no_grad():
                ref = full.float()(x.float())[:, rows]
                with use_heap(dist.group.WORLD.group_name, ctx.heap):
                    out = compiled(x[:, rows].contiguous()).float()
            errors.append(((out - ref).norm() / ref.norm()).item())
        return {"errors": errors, "reports": [(len(r.fused), r.note) for r in reports()]}
    finally:
        dist.destroy_process_group()


def test_one_dynamic_graph_runs_every_length_in_the_simulator(tmp_path):
    from bspfuse.runtime.launch import launch

    for rank, r in enumerate(launch(_dynamic_forward, 2, backend="sim", heap_bytes=16 << 20,
                                    args=(tempfile.mktemp(dir=tmp_path), [16, 24, 12]), timeout_s=900)):
        assert len(r["reports"]) == 1 and r["reports"][0][0] == 4, f"rank {rank}: one graph, 4 fused: {r['reports']}"
        assert "dynamic" in r["reports"][0][1], r["reports"][0][1]
        assert all(e < 3e-2 for e in r["errors"]), f"rank {rank}: relative errors per length {r['errors']}"
