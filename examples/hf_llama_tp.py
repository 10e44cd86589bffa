"""Hugging Face Llama under tensor (+ sequence) parallelism, for `bspfuse explain`: what the backend fuses.

    bspfuse explain examples/hf_llama_tp.py:tp --world 2            # its own TP plan: all-reduce after o/down
    bspfuse explain examples/hf_llama_tp.py:tp_sp --world 2 --train # torchtitan's TP + SP plan, with backward

A small random config (nothing is downloaded); the fusion decisions depend on the graph, not the weights.
"""
from __future__ import annotations

import fnmatch

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
              num_key_value_heads=8, attn_implementation="sdpa")  # Llama-3-8B's widths
BATCH, SEQ = 4, 2048


def hf_plan(model: LlamaForCausalLM, mesh) -> LlamaForCausalLM:
    """Parallelize `model` by the plan its config ships (base_model_tp_plan: colwise q/k/v/gate/up, rowwise
    o/down), each style as torch's DTensor one."""
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    names = [name for name, _ in model.model.named_modules()]
    plan = {name: styles[style]() for pattern, style in model.config.base_model_tp_plan.items()
            for name in names if fnmatch.fnmatchcase(name, pattern)}
    parallelize_module(model.model, mesh, plan)
    return model


class SPLayer(torch.nn.Module):
    """One decoder layer and its rotary tables; the input is this rank's [batch, seq/W, hidden] rows."""

    def __init__(self, config: LlamaConfig, world: int):
        super().__init__()
        self.rotary = LlamaRotaryEmbedding(config)
        self.layer = LlamaDecoderLayer(config, 0)
        self.world = world

    def forward(self, x):
        seq = x.shape[1] * self.world
        positions = torch.arange(seq, device=x.device)[None].expand(x.shape[0], seq)
        return self.layer(x, position_embeddings=self.rotary(x, positions), position_ids=positions)


def titan_plan(model: SPLayer, mesh) -> SPLayer:
    """torchtitan's TP + SP plan: norms sequence-parallel, attention and MLP inputs gathered on the sequence,
    o_proj and down_proj reduce-scattered back to it."""
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return parallelize_module(model, mesh, {
        "layer.input_layernorm": SequenceParallel(),
        "layer.self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                              desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "layer.self_attn.q_proj": ColwiseParallel(), "layer.self_attn.k_proj": ColwiseParallel(),
        "layer.self_attn.v_proj": ColwiseParallel(), "layer.self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "layer.post_attention_layernorm": SequenceParallel(),
        "layer.mlp": gather, "layer.mlp.gate_proj": ColwiseParallel(), "layer.mlp.up_proj": ColwiseParallel(),
        "layer.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    })


def tp(mesh, layers: int = 2):
    """LlamaForCausalLM under its own TP plan, and a batch of token ids."""
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **CONFIG)).to(torch.bfloat16)
    return hf_plan(model, mesh), torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))


def tp_sp(mesh):
    """One decoder layer under torchtitan's TP + SP plan, and this rank's rows of a batch."""
    model = SPLayer(LlamaConfig(num_hidden_layers=1, **CONFIG), mesh.size()).to(torch.bfloat16)
    return titan_plan(model, mesh), torch.randn(BATCH, SEQ // mesh.size(), CONFIG["hidden_size"], dtype=torch.bfloat16)
