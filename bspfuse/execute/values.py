"""What the executor knows of a program's values: torch dtypes, tolerances, concrete shapes, and its error."""
from __future__ import annotations

import torch

from bspfuse.ir import Op, Program, Value, concrete

TORCH_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
               "i8": torch.int8, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool, "u8": torch.uint8}
TOLERANCE = {"bf16": 2e-2, "f16": 5e-3, "f32": 1e-4, "f64": 1e-10}


class ExecuteError(Exception):
    """A program this executor cannot run: names the op and why."""


def shape_of(program: Program, v: Value) -> tuple[int, ...]:
    return tuple(concrete(d, program.sizes, program.world_size) for d in v.type.shape)


def where(op: Op) -> str:
    names = ", ".join(f"%{v.name}" for v in op.outputs)
    return f"{names} ({op.origin})" if op.origin else names
