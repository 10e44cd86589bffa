"""Every kernel bspfuse emits compiles for AMD MI300X (gfx942) on a CPU, with no NVIDIA instruction in it.

Triton's HIP backend compiles to AMDGCN and links a code object without a GPU or ROCm. Each kind compiles as
the host would build it for an MI300X (lowering.TARGETS["MI300X"]: plan_kernel's tile and grid for 304
compute units, kernel target "hip", so pointer loads since gfx942 has no TMA): AG+GEMM push, pull,
copy_engine and direct, with several weights and with the swiglu epilogue, rows in segments; GEMM+RS and
GEMM+AR direct, push and pull; the Flash Decode kernels; the device API's check kernels. In a fresh process
without TRITON_INTERPRET (an interpreted @triton.jit cannot be compiled).

Compiled, not run: the GEMM tiles are still Hopper's (tile.choose_config), and their 3-stage pipelines
take 96 KB of LDS in bf16, more than a gfx942 workgroup has (64 KB), so they would not launch until the ROCm
work picks AMD configs (2 stages fit). The Flash Decode kernels fit.
"""
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.backends.amd.compiler", reason="this Triton build has no AMD (HIP) backend")

from bspfuse.runtime.target import device_target, uses_tma  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LDS_BYTES = 65536  # a gfx942 workgroup's

COMPILE = textwrap.dedent('''
    import json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bspfuse.codegen.load import load_kernel
    from bspfuse.codegen.triton import generate
    from bspfuse.codegen.decode import decode_kernels
    from bspfuse.kernels import decode as K
    from bspfuse.kernels.flash_decode import choose_num_splits, decode_tiling, merge_chunk, merge_h
    from bspfuse.kernels.gemm import interleave_lag
    from bspfuse.lowering import TARGETS, plan_kernel
    from bspfuse.runtime import checks
    from bspfuse.runtime.target import uses_tma
    from bspfuse.tile import TileConfig

    GFX942 = GPUTarget("hip", "gfx942", 64)
    MI300X = TARGETS["MI300X"]
    # PTX spellings: inline assembly the target layer failed to keep out, or an NVIDIA-only lowering
    PTX = re.compile(r"fence\\.|nanosleep|%globaltimer|%smid|mov\\.u(32|64)|ld\\.global|st\\.global|atom\\.global"
                     r"|red\\.global|cp\\.async|wgmma|mbarrier|bar\\.sync|tensormap|\\.target\\s+sm_")
    AMD = re.compile(r"v_mfma\\w*|s_sleep|s_memrealtime|s_getreg_b32|buffer_wbl2 sc0 sc1|buffer_inv sc0 sc1"
                     r"|global_atomic_\\w+")

    def compile_one(name, fn, signature, constexprs, attrs=None, **options):
        k = triton.compile(ASTSource(fn, dict(signature, **{c: "constexpr" for c in constexprs}), constexprs,
                                     attrs or {}), target=GFX942, options=options)
        asm = k.asm["amdgcn"]
        return {"name": name, "target": re.search(r'amdgcn_target "([^"]+)"', asm).group(1),
                "code_object_bytes": len(k.asm["hsaco"]), "lds": k.metadata.shared,
                "ptx": sorted({m.group(0) for m in PTX.finditer(asm)}),
                "amd": sorted({m.group(0) for m in AMD.finditer(asm)})}

    TY = {"bf16": "bf16", "f32": "fp32"}

    def gemm(name, kind, mode, dtype="bf16", epilogue=(), weights=1, segmented=False, M=4096, N=8192, K=4096,
             config=None):
        """The kernel the host object builds on an MI300X (lowering.plan_kernel), compiled as it launches it."""
        plan = plan_kernel(kind, mode, M, N, K, 2, dtype, epilogue, MI300X, b_layout="nk", weights=weights,
                           config=config)
        tp, cfg, ty = plan.tile_program, plan.config, TY[dtype]
        ks = generate(tp, tma=uses_tma(MI300X.kernel_target))
        fn = load_kernel(ks)
        values = dict(WORLD=2, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, COMM=cfg.comm_programs,
                      LAG=interleave_lag(plan.programs - cfg.comm_programs, 2), NUM_PROGRAMS=plan.programs,
                      CHUNK_K=128, MAX_SPINS=0, TARGET=MI300X.kernel_target, VEC=16, FLAG_BLOCKS=8,
                      SEGMENTED=segmented, SPLIT_K=cfg.split_k)
        sig, attrs = {}, {}
        for i, p in enumerate(fn.arg_names):
            if p in ks.constexprs:
                continue
            if p in ("flag_ptr", "err_ptr", "heap_bases", "ticket_ptr"):
                sig[p] = "*i32" if p == "flag_ptr" else "*i64"
            elif p == "acc_ptr":  # split-K's float32 sums
                sig[p] = "*fp32"
            elif p.endswith(("_ptr", "_desc")):  # no TMA: the host passes the tensors where descriptors were
                sig[p] = "*" + ty
            else:
                sig[p] = "i32"
            if p.endswith("_ptr") or p in ("heap_bases", "M_BOUND", "N", "K") or p.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as Triton's launcher marks multiples of 16
        out = compile_one(name, fn, sig, {c: values[c] for c in ks.constexprs}, attrs,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dict(out, kind=tp.kind, dtype=dtype, descriptors="make_tensor_descriptor" in ks.source)

    def decode(name, fn, constexprs, **options):
        ptr = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "lens_ptr": "*i32", "bt_ptr": "*i32",
               "mid_o": "*fp32", "mid_lse": "*fp32", "gather_o": "*fp32", "gather_lse": "*fp32", "o_ptr": "*fp32",
               "lse_ptr": "*fp32", "out_o": "*bf16", "out_lse": "*fp32", "flags": "*i32", "tile_count": "*i32",
               "ticket": "*i64", "heap_bases": "*i64", "err_ptr": "*i64", "timeline": "*i64"}
        sig, attrs = {}, {}
        for i, p in enumerate(fn.arg_names):
            if p not in constexprs:
                sig[p] = ptr.get(p, "fp32" if p == "qk_scale" else "i32")
            if p in ptr or (p.startswith("stride_") and p != "stride_bt"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return dict(compile_one(name, fn, sig, constexprs, attrs, **options), kind="decode")

    out = [gemm(f"ag {mode}", "ag_matmul", mode, epilogue=("bias",)) for mode in ("push", "pull", "copy_engine")]
    out += [gemm("ag direct", "ag_matmul", "direct"),
            gemm("ag push, 3 weights", "ag_matmul", "push", weights=3, N=8192 + 2 * 1024),
            gemm("ag copy_engine swiglu", "ag_matmul", "copy_engine", epilogue=("swiglu",), weights=2, N=2 * 8192),
            gemm("ag pull, rows in segments", "ag_matmul", "pull", segmented=True)]
    for kind in ("matmul_rs", "matmul_ar"):
        out += [gemm(f"{kind[-2:]} {mode}", kind, mode, epilogue=("relu",) if kind == "matmul_ar" else ())
                for mode in ("direct", "push", "pull")]
    out += [gemm("rs push, rows in segments", "matmul_rs", "push", segmented=True),
            gemm("rs pull f32", "matmul_rs", "pull", dtype="f32", M=512, N=512, K=512),
            gemm("rs direct split-K", "matmul_rs", "direct", M=64, config=TileConfig(64, 64, 64, 1, 4, 3, split_k=4))]

    for (Hq, Hkv, page, one_split) in [(96, 12, 0, False), (32, 8, 16, True)]:
        t = decode_tiling(1, Hq, Hkv, 128, device="cuda")
        chunk = merge_chunk(choose_num_splits(t, 1 << 17, MI300X.num_sms), t)
        opts = dict(num_warps=t.num_warps, num_stages=t.num_stages)
        attend = dict(t.constexprs(), BLOCK_N=t.block_n, PAGE=page, HAS_LENS=True, DOT_F32=False)
        out.append(decode(f"decode_split page={page}", decode_kernels(2)["split"], attend, **opts))
        out.append(decode(f"merge_states wait={bool(page)}", decode_kernels(2)["merge_ranks"],
                          dict(t.constexprs(), BLOCK_H=merge_h(t), CHUNK=1 if page else chunk, WAIT=bool(page),
                               MAX_SPINS=0 if page else 1000, SLEEP_NS=256 if page else 0, TARGET="hip"),
                          num_warps=t.num_warps))
        out.append(decode(f"put_states signal={bool(page)}", decode_kernels(2)["put"],
                          dict(t.constexprs(), WORLD=2, SIGNAL=bool(page)), num_warps=t.num_warps))
        out.append(decode(f"fused_decode timeline={bool(page)}", decode_kernels(3)["fused"],
                          dict(attend, WORLD=2, ONE_SPLIT=one_split, SPLIT_CHUNK=chunk, MAX_SPINS=0, SLEEP_NS=256,
                               TARGET="hip", TIMELINE=bool(page), TILE_FASTEST=not one_split, MERGE_H=merge_h(t),
                               RANK_CHUNK=2),
                          **dict(opts, num_stages=4 if not one_split else t.num_stages)))

    ranks = {"heap_bases": "*i64", "rank": "i32"}
    out.append(dict(compile_one("check p2p", checks._p2p_kernel, {n: "*fp32" for n in [
        "src", "got_load", "got_get", "got_copy", "inbox_store", "inbox_put", "inbox_copy", "got_scalar",
        "inbox_scalar"]} | ranks | {"N": "i32"}, {"BLOCK": 128}), kind="check"))
    out.append(dict(compile_one("check atomics", checks._atomics_kernel, {
        "cnt": "*i32", "ret": "*i32", "blk": "*i32", "f32": "*fp32", "f16": "*fp16", "bf16": "*bf16",
        "i64": "*i64"} | ranks, {"BLOCK": 64, "NBLK": 16}), kind="check"))
    out.append(dict(compile_one("check message", checks._message_kernel, {
        "inbox": "*i32", "data_flag": "*i32", "ack_flag": "*i32", "bad": "*i32", "err": "*i64", "peer": "i32",
        "is_producer": "i32", "base": "i32", "rounds": "i32"} | ranks, {"N": 16, "MAX_SPINS": 1000}), kind="check"))
    print(json.dumps(out))
''')


def test_every_kernel_kind_compiles_for_gfx942_without_nvidia_instructions(run_script):
    kernels = {k["name"]: k for k in run_script(COMPILE)}
    assert len(kernels) == 27, sorted(kernels)
    for name, k in kernels.items():
        assert k["target"] == "amdgcn-amd-amdhsa--gfx942" and k["code_object_bytes"] > 0, k
        assert k["ptx"] == [], k
    gemms = [k for k in kernels.values() if k["kind"] != "decode" and k["kind"] != "check"]
    assert sorted({k["kind"] for k in gemms}) == ["ag_matmul", "matmul_ar", "matmul_rs"]
    for k in gemms:
        assert not k["descriptors"], k  # pointer loads: no TMA on gfx942
        if k["dtype"] == "bf16":
            assert any(o.startswith("v_mfma") for o in k["amd"]), k  # matrix cores for the tile's dot
    for k in kernels.values():
        if k["kind"] == "decode":
            assert k["lds"] <= LDS_BYTES, k  # these would launch on an MI300X as they are
    # the waits acquire and the flags release at system scope: LLVM's gfx942 lowering of "sys" atomics
    for name in ("ag push", "rs pull", "ar push", "fused_decode timeline=True", "check message"):
        assert {"buffer_inv sc0 sc1", "buffer_wbl2 sc0 sc1", "global_atomic_swap"} <= set(kernels[name]["amd"]), name
    # the target layer's AMD bodies: a waiting merge sleeps (s_sleep), the timeline reads the clock and the CU
    assert "s_sleep" in kernels["merge_states wait=True"]["amd"]
    assert {"s_sleep", "s_memrealtime", "s_getreg_b32"} <= set(kernels["fused_decode timeline=True"]["amd"])
    assert "s_memrealtime" not in kernels["fused_decode timeline=False"]["amd"]


def test_inline_assembly_lives_only_in_the_target_layer():
    sources = [p for d in ("bspfuse", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    with_asm = [str(p.relative_to(ROOT)) for p in sources if "inline_asm" in p.read_text()]
    assert with_asm == ["bspfuse/runtime/target.py"], with_asm


def test_a_device_names_its_target_and_only_cuda_uses_tma(monkeypatch):
    assert device_target("cpu") == "sim"
    monkeypatch.setattr(torch.version, "hip", None)
    assert device_target("cuda:1") == "cuda"
    monkeypatch.setattr(torch.version, "hip", "6.4.0")  # PyTorch's ROCm build: AMD GPUs are "cuda" devices
    assert device_target("cuda") == "hip"
    assert [uses_tma(t) for t in ("cuda", "hip", "sim")] == [True, False, False]
    with pytest.raises(ValueError, match="unknown kernel target 'rocm'"):
        uses_tma("rocm")
