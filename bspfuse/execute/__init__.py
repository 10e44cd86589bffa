"""Run a Program: the unfused reference on the CPU, and the (fused) program per rank in `launch`.

    values      torch dtypes and tolerances of the IR's dtypes, concrete shapes, ExecuteError
    inputs      random_inputs(program, world, seed): per-rank inputs that respect the layouts
    reference   reference(program, inputs_by_rank): float64, all ranks at once, the meaning of the BSP program
    rank        run_fused(ctx, program, inputs): one rank inside launch(...), fused ops through the kernels
    memory      memory_needs(program, world, ...): the bytes a check needs at its peak, against what is available
    harness     choose_backend(backend, world), check(program, world, ...): all of the above, with relative
                errors against the reference
    emit        compile_module(program): the fused program as a standalone Python module (`bspfuse compile`)

Collectives the passes did not fuse run through a small RMA fallback on the symmetric heap (copy in,
barrier, read every peer's copy, barrier); each is recorded in `Execution.fallbacks`, never as fusion.

Example::

    result = check(parse_file("examples/sp_mlp.bsp"), world_size=2)
    print(result.report()); assert result.ok
"""
from bspfuse.execute.harness import CheckResult, check, choose_backend, rel_error
from bspfuse.execute.emit import compile_module
from bspfuse.execute.inputs import random_inputs
from bspfuse.execute.memory import NotEnoughMemory, check_memory, heap_bytes_for, memory_needs
from bspfuse.execute.rank import Execution, gemm_tiles, make_fused_gemm, rma_collective, run_fused
from bspfuse.execute.reference import merge_states_math, reference
from bspfuse.execute.values import TOLERANCE, TORCH_DTYPE, ExecuteError

__all__ = ["CheckResult", "Execution", "ExecuteError", "NotEnoughMemory", "TOLERANCE", "TORCH_DTYPE", "check",
           "check_memory", "choose_backend", "compile_module", "gemm_tiles", "heap_bytes_for", "make_fused_gemm",
           "memory_needs", "merge_states_math", "random_inputs", "reference", "rel_error", "rma_collective",
           "run_fused"]
