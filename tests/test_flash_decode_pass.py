"""fuse_flash_decode: golden text of the BSP decode program before and after, the stage choice, and the
reasons a merge_states is left alone. (The fused op's numbers are checked in test_flash_decode.py.)"""
import importlib.util
import pathlib
import sys

import pytest

from bspfuse.ir import Builder


def _import_passes():
    # Until packaging maps the top-level passes/ to bspfuse.passes (pyproject's package-dir), alias it here.
    try:
        import bspfuse.passes  # noqa: F401
    except ModuleNotFoundError:
        root = pathlib.Path(__file__).resolve().parents[1] / "passes"
        spec = importlib.util.spec_from_file_location("bspfuse.passes", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bspfuse.passes"] = module
        spec.loader.exec_module(module)


_import_passes()
from bspfuse.passes import Options, run_passes  # noqa: E402
from bspfuse.passes.fuse_decode import fuse_flash_decode  # noqa: E402


def bsp_decode_program(B=1, Hq=32, Hkv=8, D=128, S=4096, dtype="bf16", world=2, page=0, gather_dim=0,
                       stage_hint=None, scale=0.125):
    """The BSP decode step: decode_partial, reshape + all_gather + wait of O and LSE, merge_states."""
    b = Builder("decode", world_size=world)
    q = b.input("q", dtype, (B, Hq, D), "replicated")
    attrs = {"scale": scale, "kv_lens": True}
    if page:
        k = b.input("k", dtype, (B * S // page, page, Hkv, D), "local")
        v = b.input("v", dtype, (B * S // page, page, Hkv, D), "local")
        extra = [b.input("block_table", "i32", (B, S // page), "local")]
        attrs["paged"] = True
    else:
        k = b.input("k", dtype, (B, S, Hkv, D), "sharded(1)")
        v = b.input("v", dtype, (B, S, Hkv, D), "sharded(1)")
        extra = []
    if stage_hint is not None:
        attrs["stage"] = stage_hint
    lens = b.input("kv_lens", "i32", (B,), "local")
    o, lse = b.op("decode_partial", [q, k, v, *extra, lens], attrs, names=["o", "lse"], origin="decode.bsp:4:5")
    o1 = b.reshape(o, [1, B, Hq, D] if gather_dim == 0 else [B, 1, Hq, D], name="o1")
    l1 = b.reshape(lse, [1, B, Hq], name="l1")
    og = b.wait(b.all_gather(o1, gather_dim, name="og_start"), name="og")
    lg = b.wait(b.all_gather(l1, 0, name="lg_start"), name="lg")
    out, out_lse = b.op("merge_states", [og, lg], {}, names=["out", "out_lse"], origin="decode.bsp:7:3")
    b.output(out, out_lse)
    return b.build()


BEFORE = """\
program decode(world=2) {
  input %q: bf16[1, 32, 128] replicated
  input %k: bf16[1, 4096, 8, 128] sharded(1)
  input %v: bf16[1, 4096, 8, 128] sharded(1)
  input %kv_lens: i32[1] local
  %o, %lse = decode_partial(%q, %k, %v, %kv_lens) {kv_lens=True, scale=0.125} : bf16[1, 32, 128] local, f32[1, 32] local
  %o1 = reshape(%o) {shape=[1, 1, 32, 128]} : bf16[1, 1, 32, 128] local
  %l1 = reshape(%lse) {shape=[1, 1, 32]} : f32[1, 1, 32] local
  %og_start = all_gather(%o1) {dim=0} : bf16[2, 1, 32, 128] replicated pending
  %og = wait(%og_start) : bf16[2, 1, 32, 128] replicated
  %lg_start = all_gather(%l1) {dim=0} : f32[2, 1, 32] replicated pending
  %lg = wait(%lg_start) : f32[2, 1, 32] replicated
  %out, %out_lse = merge_states(%og, %lg) : bf16[1, 32, 128] replicated, f32[1, 32] replicated
  output %out, %out_lse
}"""

AFTER = """\
program decode(world=2) {
  input %q: bf16[1, 32, 128] replicated
  input %k: bf16[1, 4096, 8, 128] sharded(1)
  input %v: bf16[1, 4096, 8, 128] sharded(1)
  input %kv_lens: i32[1] local
  %out, %out_lse = flash_decode(%q, %k, %v, %kv_lens) {kv_lens=True, scale=0.125, stage=3} : bf16[1, 32, 128] replicated, f32[1, 32] replicated
  output %out, %out_lse
}"""


def _fuse(program, **options):
    log = run_passes(program, [fuse_flash_decode], Options(**options))
    return log.program, log.decisions


def test_golden_before_after():
    program = bsp_decode_program()
    assert str(program) == BEFORE
    fused, decisions = _fuse(program)
    assert str(fused) == AFTER
    assert str(program) == BEFORE  # the pass rewrote a copy
    (d,) = decisions
    assert d.applied and d.reason.startswith("stage 3") and "(decode.bsp:7:3)" in d.site
    assert fused.ops[0].origin == "decode.bsp:7:3"


def test_paged_keeps_operands_and_attrs():
    fused, (d,) = _fuse(bsp_decode_program(page=16))
    (op,) = fused.ops
    assert d.applied
    assert [v.name for v in op.inputs] == ["q", "k", "v", "block_table", "kv_lens"]
    assert op.attrs["paged"] is True and op.attrs["kv_lens"] is True and op.attrs["scale"] == 0.125
    assert [str(t) for t in op.attrs["result_types"]] == ["bf16[1, 32, 128] replicated", "f32[1, 32] replicated"]


@pytest.mark.parametrize("options, hint, stage", [
    ({}, None, 3),
    ({"mode": "push"}, None, 3),
    ({"mode": "bsp"}, None, 0),
    ({"mode": "stage1"}, None, 1),
    ({}, 2, 2),  # a hint on decode_partial
    ({"mode": "stage0", "modes": {"out": "stage2"}}, None, 2),  # the per-site option wins
    ({"modes": {"out": "stage1"}}, 0, 1),  # ... over the hint too
])
def test_stage_choice(options, hint, stage):
    fused, (d,) = _fuse(bsp_decode_program(stage_hint=hint), **options)
    (op,) = fused.ops
    assert op.attrs["stage"] == stage and d.applied and d.reason.startswith(f"stage {stage}")


@pytest.mark.parametrize("program, options, reason", [
    (dict(gather_dim=1), {}, "merge_states merges over dim 0 but %og_start gathers dim 1"),
    (dict(dtype="f64"), {}, "q %q is f64; the kernels take f16, bf16, f32"),
    ({}, {"mode": "off"}, "disabled by the options (mode off)"),
    ({}, {"mode": "pull"}, "mode 'pull' has no Flash Decode form"),
])
def test_not_applied_says_why(program, options, reason):
    original = bsp_decode_program(**program)
    fused, (d,) = _fuse(original, **options)
    assert not d.applied and d.reason.startswith(reason), d.reason
    assert str(fused) == str(original)
    assert str(d).startswith("[fuse_flash_decode] not fused: the split-KV attention, gather and merge of decode.bsp:7:3: ")
    assert str(d).endswith("[%out = merge_states(%og, %lg) (decode.bsp:7:3)]")


def test_intermediate_read_elsewhere_is_not_fused():
    program = bsp_decode_program()
    og = next(v for v in program.values() if v.name == "og")
    program.outputs.append(og)  # the gathered partials are also a program output
    fused, (d,) = _fuse(program)
    assert not d.applied and d.reason == "%og is a program output: fusing would drop it"
    assert fused.find("merge_states")
