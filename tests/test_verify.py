"""The verifier on hand-broken programs: each test breaks one invariant and checks the message names it."""
import pytest

from bspfuse.ir import Builder, Op, TensorType, Value, local, replicated, sharded
from bspfuse.verify import VerifyError, verify


def mlp():
    """x sharded(0) -> all_gather -> wait -> matmul -> relu: a small valid program to break."""
    b = Builder("mlp", world_size=2)
    x = b.input("x", "bf16", (8, 16), sharded(0))
    w = b.input("w", "bf16", (16, 32), local())
    ag = b.all_gather(x, dim=0, name="ag")
    xg = b.wait(ag, name="xg")
    y = b.matmul(xg, w, name="y")
    z = b.pointwise("relu", y, name="z")
    b.output(z)
    return b.build()


def test_the_unbroken_program_verifies():
    p = mlp()
    assert verify(p) is p


def test_use_before_definition():
    p = mlp()
    p.ops[2], p.ops[3] = p.ops[3], p.ops[2]  # relu now reads %y before the matmul defines it
    with pytest.raises(VerifyError, match=r"op 2 \(pointwise\): uses %y before it is defined"):
        verify(p)


def test_cycle():
    p = mlp()
    relu = p.ops[3]
    matmul = p.ops[2]
    matmul.inputs = (p.ops[1].outputs[0], relu.outputs[0])  # y = matmul(xg, z) and z = relu(y)
    with pytest.raises(VerifyError, match=r"op 2 \(matmul\): uses %z before it is defined \(a cycle"):
        verify(p)


def test_double_definition():
    p = mlp()
    p.ops.append(p.ops[3])  # the same relu op (and its result %z) twice
    with pytest.raises(VerifyError, match=r"op 4 \(pointwise\): %z is defined twice"):
        verify(p)


def test_two_values_with_one_name():
    p = mlp()
    p.ops[3].outputs[0].name = "y"
    with pytest.raises(VerifyError, match="two values are named %y"):
        verify(p)


def test_wrong_result_type():
    p = mlp()
    y = p.ops[2].outputs[0]
    # a bf16 matmul of [16, 16] (8 rows x 2 ranks) by [16, 32] claims an f32 result
    y.type = TensorType("f32", y.type.shape, y.type.layout)
    with pytest.raises(VerifyError, match=r"%y is typed f32\[16, 32\] local, the rule gives bf16\[16, 32\] local"):
        verify(p)


def test_pending_value_read_by_a_non_wait_op():
    p = mlp()
    ag, wait, matmul = p.ops[0], p.ops[1], p.ops[2]
    matmul.inputs = (ag.outputs[0], matmul.inputs[1])  # the matmul skips the wait
    p.ops.remove(wait)
    with pytest.raises(VerifyError, match="input 0 of matmul is the pending result of a collective; it needs a wait"):
        verify(p)


def test_output_is_pending():
    p = mlp()
    p.outputs = [p.ops[0].outputs[0]]
    with pytest.raises(VerifyError, match="output %ag is a collective's pending result: it needs a wait"):
        verify(p)


def test_layout_rule_violation():
    p = mlp()
    x = p.inputs[0]
    x.type = x.type.with_(layout=replicated())  # all_gather of a tensor every rank already has in full
    with pytest.raises(VerifyError, match=r"all_gather on dim 0 needs an input sharded on dim 0, got replicated"):
        verify(p)


def test_shape_mismatch():
    p = mlp()
    w = p.inputs[1]
    w.type = w.type.with_(shape=(24, 32))
    with pytest.raises(VerifyError, match=r"matmul contracts a\[\.\.\., 16\] with b\[24, \.\.\.\]"):
        verify(p)


def test_result_not_pointing_at_its_op():
    p = mlp()
    relu = p.ops[3]
    relu.outputs = (Value("z", relu.outputs[0].type, producer=None),)
    p.outputs = [relu.outputs[0]]
    with pytest.raises(VerifyError, match="result %z does not point back at its op"):
        verify(p)


def test_wrong_number_of_results():
    p = mlp()
    relu = p.ops[3]
    extra = Value("z2", relu.outputs[0].type)
    extra.producer = relu
    relu.outputs = relu.outputs + (extra,)
    with pytest.raises(VerifyError, match="has 2 results, its rule gives 1"):
        verify(p)


def test_wait_on_a_value_that_is_not_pending():
    p = mlp()
    b = Op("wait", (p.ops[3].outputs[0],), {})
    b.outputs = (Value("w2", p.ops[3].outputs[0].type, b),)
    p.ops.append(b)
    with pytest.raises(VerifyError, match="wait on a value that is not the result of a collective"):
        verify(p)
