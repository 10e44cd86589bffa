"""Sequence-parallel MLP: all_gather -> matmul -> gelu -> matmul -> reduce_scatter.

The feed-forward block of a Llama-3-70B-sized layer under sequence + tensor parallelism: every rank holds
tokens/W rows of the activations, gathers all 8192 tokens, multiplies by its column slice of the
up-projection (ffn/W columns), applies gelu, multiplies by its row slice of the down-projection (a
partial sum) and reduce-scatters the result back to tokens/W rows. Every step is its own kernel, with a
wait at each collective: the three taxes in their plainest form.

Run it:

    bspfuse analyze examples/sp_mlp.py:build --world 8
"""
import torch

from bspfuse.capture_fx import trace

TOKENS, HIDDEN, FFN = 8192, 8192, 28672  # Llama-3-70B: hidden 8192, ffn 28672

c10d = torch.ops._c10d_functional


def sp_mlp(x, w_up, w_down):
    """x [tokens/W, hidden] sharded on tokens; w_up [hidden, ffn/W]; w_down [ffn/W, hidden]."""
    import torch.distributed as dist

    world, group = dist.get_world_size(), dist.group.WORLD.group_name
    x_full = c10d.wait_tensor(c10d.all_gather_into_tensor(x, world, group))  # [tokens, hidden]
    h = torch.nn.functional.gelu(x_full @ w_up)  # [tokens, ffn/W]
    partial = h @ w_down  # [tokens, hidden], a partial sum over ranks
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(partial, "sum", world, group))  # [tokens/W, hidden]


def build(world_size: int = 8) -> torch.fx.GraphModule:
    """The per-rank graph for `world_size` ranks, traced on a fake process group (no GPU, no memory)."""
    if TOKENS % world_size or FFN % world_size:
        raise ValueError(f"world size {world_size} does not divide tokens {TOKENS} and ffn {FFN}")

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    inputs = [meta(TOKENS // world_size, HIDDEN), meta(HIDDEN, FFN // world_size), meta(FFN // world_size, HIDDEN)]
    return trace(sp_mlp, inputs, world_size=world_size)


if __name__ == "__main__":
    from bspfuse.analysis import analyze
    from bspfuse.capture_fx import capture

    program = capture(build(8), name="sp_mlp")
    print(program)
    print()
    print(analyze(program, "H200").table())
