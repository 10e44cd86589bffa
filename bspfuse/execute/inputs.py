"""Per-rank random inputs that respect each value's layout."""
from __future__ import annotations

import math

import torch

from bspfuse.execute.values import TORCH_DTYPE, ExecuteError, shape_of
from bspfuse.ir import FLOAT_DTYPES, Program


def random_inputs(program: Program, world_size: int | None = None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fresh random inputs, one dict {input name: tensor} per rank.

    Floats are normal, scaled by 1/sqrt(rows) when the input is a matmul's B operand so products stay
    O(1); replicated inputs are equal on every rank; ints are lengths in [1, rows] (never zero)."""
    world = world_size or program.world_size
    if world is None:
        raise ExecuteError(f"program {program.name}: the world size is not known (pass --world)")
    g = torch.Generator().manual_seed(seed)
    users = program.users()
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for v in program.inputs:
        shape, dtype = shape_of(program, v), v.type.dtype
        as_b = any(u.opcode in ("matmul",) and len(u.inputs) > 1 and u.inputs[1] is v for u in users.get(v, []))
        scale = 1.0 / math.sqrt(shape[0]) if as_b and shape else 1.0
        same = v.type.layout.kind == "replicated"
        first = None
        for r in range(world):
            if same and first is not None:
                out[r][v.name] = first.clone()
                continue
            if dtype in FLOAT_DTYPES:
                t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(TORCH_DTYPE[dtype])
            else:
                hi = max(1, shape[-1] if shape else 1)
                t = torch.randint(1, hi + 1, shape, generator=g).to(TORCH_DTYPE[dtype])
            out[r][v.name] = first = t
    return out
