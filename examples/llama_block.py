"""A Llama-style decoder layer under tensor + sequence parallelism, compiled with the bspfuse backend.

RMSNorm, attention with grouped-query heads and rotary embeddings, and a SwiGLU MLP, written with plain
`torch.nn`, then parallelized with DTensor the way torchtitan does it: the norms run sequence-parallel
(each rank holds tokens/W rows), the attention and MLP inputs are all-gathered, wq/wk/wv and w1/w3 are
column-parallel, wo and w2 row-parallel with a reduce-scatter back to tokens/W rows. Per layer that is
two all_gather -> matmul and two matmul -> reduce_scatter sites: what `torch.compile(backend="bspfuse")`
fuses.

Run it on the CPU (a fake process group: nothing is computed, the capture reports what it would fuse):

    python examples/llama_block.py --world 2 --seq 4096

On GPUs, `benchmarks/block_bench.py` compiles the same layer and times it against eager TP and Inductor.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 8192  # Llama-3-70B
    heads: int = 64
    kv_heads: int = 8
    ffn: int = 28672
    max_seq: int = 8192
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):  # x [batch, seq, heads, head_dim]; cos/sin [seq, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads/W query and kv_heads/W key/value heads
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        cos, sin = self.cos[:seq], self.sin[:seq]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


def parallelize(block: LlamaBlock, mesh) -> LlamaBlock:
    """torchtitan's tensor + sequence parallel plan for one layer; the block's input and output are the
    rank's local [batch, seq/W, hidden] rows."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    plan = {
        "attention_norm": SequenceParallel(),
        "attention": gather,
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": gather,
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    return parallelize_module(block, mesh, plan)


def main() -> None:
    from bspfuse.backend import explain

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096, help="the whole sequence; each rank holds seq/world rows")
    parser.add_argument("--hidden", type=int, default=8192)
    args = parser.parse_args()
    if args.seq % args.world:
        parser.error(f"--seq {args.seq} does not split evenly over --world {args.world} ranks")
    cfg = LlamaConfig(hidden=args.hidden, heads=max(args.hidden // 128, args.world),
                      kv_heads=max(args.hidden // 1024, args.world), ffn=args.hidden * 7 // 2, max_seq=args.seq)
    for report in explain(lambda mesh: parallelize(LlamaBlock(cfg).to(torch.bfloat16), mesh),
                          lambda mesh: torch.randn(1, args.seq // args.world, cfg.hidden, dtype=torch.bfloat16),
                          world_size=args.world):
        print(report)


if __name__ == "__main__":
    main()
