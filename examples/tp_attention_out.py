"""Row-parallel attention output projection: matmul -> all_reduce -> residual add.

After tensor-parallel attention every rank holds the outputs of its heads/W heads. The output
projection is row-parallel: each rank multiplies its [tokens, heads/W * head_dim] slice by its rows of
W_o, which gives a partial sum of the [tokens, hidden] result; an all_reduce sums it over ranks and
the residual is added. Sizes are a Llama-3-70B layer (64 heads of 128, hidden 8192) on 4096 tokens.

Run it:

    bspfuse analyze examples/tp_attention_out.py:build --world 8
"""
import torch

from bspfuse.capture_fx import trace

BATCH, SEQ, HEADS, HEAD_DIM, HIDDEN = 2, 2048, 64, 128, 8192

c10d = torch.ops._c10d_functional


def attention_out(attn, w_o, residual):
    """attn [batch, seq, heads/W, head_dim]; w_o [heads/W * head_dim, hidden]; residual [batch*seq, hidden]."""
    import torch.distributed as dist

    world, group = dist.get_world_size(), dist.group.WORLD.group_name
    rows = attn.reshape(BATCH * SEQ, -1)  # a view: [tokens, heads/W * head_dim]
    partial = rows @ w_o  # [tokens, hidden], a partial sum over ranks
    full = c10d.wait_tensor(c10d.all_reduce(partial, "sum", group))
    return residual + full


def build(world_size: int = 8) -> torch.fx.GraphModule:
    """The per-rank graph for `world_size` ranks, traced on a fake process group (no GPU, no memory)."""
    if HEADS % world_size:
        raise ValueError(f"world size {world_size} does not divide the {HEADS} heads")
    local_heads = HEADS // world_size

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    inputs = [meta(BATCH, SEQ, local_heads, HEAD_DIM), meta(local_heads * HEAD_DIM, HIDDEN), meta(BATCH * SEQ, HIDDEN)]
    return trace(attention_out, inputs, world_size=world_size)


if __name__ == "__main__":
    from bspfuse.analysis import analyze
    from bspfuse.capture_fx import capture

    program = capture(build(8), name="tp_attention_out")
    print(program)
    print()
    print(analyze(program, "H200").table())
