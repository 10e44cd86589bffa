"""FastLaunch's call of Triton's CUDA launcher at its C entry point (bspfuse.runtime.fastlaunch._c_entry):
the C function must receive exactly what Triton's own Python wrapper (CudaLauncher.__call__ and
wrap_handle_tensordesc) would hand it, with descriptors expanded the same way, scratch memory passed as an
address and a descriptor's expansion reused only while it describes the same memory.

No GPU: a CudaLauncher is assembled around a recording stand-in for the compiled C function, with the
wrapper built by Triton's own wrap_handle_tensordesc (so a change in that wrapper fails here)."""
import pytest
import torch

driver = pytest.importorskip("triton.backends.nvidia.driver")
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from bspfuse.runtime.fastlaunch import _c_entry, _Plan  # noqa: E402

# kernel(a_desc, x_ptr, n, b_desc, BLOCK: constexpr): two descriptors lowered to pointers (no TMA metadata)
SIGNATURE = {"a_desc": "tensordesc<bf16[16, 32]>", "x_ptr": "*fp32", "n": "i32", "b_desc": "tensordesc<bf16[32, 16]>",
             "BLOCK": "constexpr"}


class Compiled:
    function, packed_metadata = 1234, (4, 1, 0)


class CFunction:
    """Stands in for the compiled C function (a builtin: no Python code object of its own)."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, *args):
        self.calls.append(args)


def launcher(calls, signature=SIGNATURE, scratch_size=0):
    run = driver.CudaLauncher.__new__(driver.CudaLauncher)
    run.launch = driver.wrap_handle_tensordesc(CFunction(calls), signature, None)
    run.num_ctas, run.global_scratch_size, run.global_scratch_align = 1, scratch_size, 128
    run.profile_scratch_size, run.profile_scratch_align = 0, 1
    run.launch_cooperative_grid, run.launch_pdl = False, False
    compiled = Compiled()
    compiled.run = run
    return compiled


def test_c_entry_receives_what_tritons_wrapper_passes():
    a, b, x = torch.randn(64, 32).to(torch.bfloat16), torch.randn(32, 48).to(torch.bfloat16), torch.zeros(8)
    a_desc, b_desc = TensorDescriptor.from_tensor(a, [16, 32]), TensorDescriptor.from_tensor(b, [32, 16])
    through_wrapper, direct = [], []
    args = [a_desc, x, 7, b_desc]
    launcher(through_wrapper).run(2, 1, 1, 99, Compiled.function, Compiled.packed_metadata, None, None, None,
                                  *args, 16)
    plan = _Plan(launcher(direct), 0, ())
    assert plan.entry is not None and plan.descs == (0, 3)
    plan.rebind(args)
    plan.launch((2, 1, 1), 99, (16,))
    as_addresses = lambda call: [v.data_ptr() if hasattr(v, "data_ptr") else v for v in call]
    assert as_addresses(direct[0]) == as_addresses(through_wrapper[0])

    kept_b = plan.desc_args[1]
    a_desc.base = torch.randn(64, 32).to(torch.bfloat16)  # rebased in place, as the GEMM host code does
    launcher(through_wrapper).run(2, 1, 1, 99, Compiled.function, Compiled.packed_metadata, None, None, None,
                                  *args, 16)
    plan.launch((2, 1, 1), 99, (16,))
    assert as_addresses(direct[1]) == as_addresses(through_wrapper[1]) != as_addresses(through_wrapper[0])
    assert plan.desc_args[1] is kept_b  # B described the same memory: its expansion was not made again


def test_scratch_is_asked_for_once_per_stream():
    from triton.runtime import _allocation
    asked = []

    def allocator(size, align, stream):
        asked.append((size, align, stream))
        return torch.empty(size, dtype=torch.int8)

    calls = []
    plan = _Plan(launcher(calls, {"x_ptr": "*fp32"}, scratch_size=64), 0, ())
    assert plan.entry is not None and plan.descs == ()
    plan.rebind([torch.zeros(4)])
    token = _allocation._allocator.set(allocator)
    try:
        for stream in (5, 5, 6):
            plan.launch((3, 1, 1), stream, ())
    finally:
        _allocation._allocator.reset(token)
    assert asked == [(3 * 64, 128, 5), (3 * 64, 128, 6)]
    assert calls[0][7] == calls[1][7] != calls[2][7] and isinstance(calls[0][7], int)


def test_other_launchers_are_called_as_they_are():
    class NotCuda:
        pass
    assert _c_entry(NotCuda()) is None
