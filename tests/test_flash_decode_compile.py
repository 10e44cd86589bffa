"""Every Flash Decode kernel the benchmark launches compiles for sm_90 on a CPU.

The compile runs in a fresh process without TRITON_INTERPRET (an interpreted @triton.jit cannot be
compiled). Integer arguments that are multiples of 16 at run time (strides, pointers) are marked so, as
Triton's launcher would, and the PTX is checked for what the kernels need to stream K/V at bandwidth
(16-byte loads, async copies pipelined into shared memory, tensor-core dots) and for the flag protocol
(release stores and acquire loads at system scope).
"""
import textwrap

COMPILE = textwrap.dedent('''
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bspfuse.codegen.decode import decode_kernels
    from bspfuse.kernels import decode as K
    from bspfuse.kernels.flash_decode import (FUSED_MERGE_REGISTERS, choose_num_splits, decode_tiling, merge_chunk,
                                              merge_h)

    def compile_one(fn, pointers, constexprs, **options):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = pointers[name]
            else:
                sig[name] = "fp32" if name == "qk_scale" else "i32"
            if name in pointers or (name.startswith("stride_") and name != "stride_bt"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                           options=options)
        ops = re.findall(r"\\b(ld\\.global[.\\w]*|ld\\.volatile[.\\w]*|cp\\.async\\.\\w+|atom\\.[.\\w]+|mma\\.\\w+"
                         r"|nanosleep|fence\\.[.\\w]+)",
                         k.asm["ptx"])
        return {"name": fn.__name__, "shared": k.metadata.shared, "ops": sorted(set(ops)),
                "timeline": constexprs.get("TIMELINE", False), "timer_reads": k.asm["ptx"].count("%globaltimer")}

    out = []
    ptr = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "lens_ptr": "*i32", "bt_ptr": "*i32",
           "mid_o": "*fp32", "mid_lse": "*fp32", "gather_o": "*fp32", "gather_lse": "*fp32", "o_ptr": "*fp32",
           "lse_ptr": "*fp32", "out_o": "*bf16", "out_lse": "*fp32", "flags": "*i32", "tile_count": "*i32",
           "ticket": "*i64", "heap_bases": "*i64", "err_ptr": "*i64", "timeline": "*i64"}
    for (Hq, Hkv, page, one_split) in [(96, 12, 0, False), (32, 8, 16, True)]:
        t = decode_tiling(1, Hq, Hkv, 128, device="cuda")
        chunk = merge_chunk(choose_num_splits(t, 1 << 17, 132), t)  # the merge of splits at batch 1, 128K keys
        opts = dict(num_warps=t.num_warps, num_stages=t.num_stages)
        attend = dict(t.constexprs(), BLOCK_N=t.block_n, PAGE=page, HAS_LENS=True, DOT_F32=False)
        out.append(compile_one(decode_kernels(2)["split"], ptr, attend, **opts))
        out.append(compile_one(decode_kernels(2)["merge_ranks"], ptr,
                               dict(t.constexprs(), BLOCK_H=merge_h(t), CHUNK=1 if page else chunk, WAIT=bool(page),
                                    MAX_SPINS=0, SLEEP_NS=256 if page else 0, TARGET="cuda"),
                               num_warps=t.num_warps))
        out.append(compile_one(decode_kernels(2)["put"], ptr, dict(t.constexprs(), WORLD=2, SIGNAL=bool(page)),
                               num_warps=t.num_warps))
        # batch 1 is one wave of split programs: FlashDecode then pipelines 4 deep, tickets KV-head-fastest
        fused_chunk = merge_chunk(choose_num_splits(t, 1 << 17, 132), t, FUSED_MERGE_REGISTERS)  # as FlashDecode's
        out.append(compile_one(decode_kernels(3)["fused"], ptr,
                               dict(attend, WORLD=2, ONE_SPLIT=one_split, SPLIT_CHUNK=fused_chunk, MAX_SPINS=0,
                                    SLEEP_NS=256, TARGET="cuda", TIMELINE=bool(page),
                                    TILE_FASTEST=not one_split, MERGE_H=merge_h(t), RANK_CHUNK=2),
                               **dict(opts, num_stages=4 if not one_split else t.num_stages)))
    print(json.dumps(out))
''')


def test_kernels_compile_for_sm90(run_script):
    kernels = run_script(COMPILE)
    assert len(kernels) == 8
    for k in kernels:
        ops = k["ops"]
        if k["name"] in ("decode_split_kernel", "fused_decode_kernel"):
            assert any(o.startswith("mma") for o in ops), k  # tensor cores for q.k and p.v
            assert "cp.async.commit_group" in ops, k  # K/V loads pipelined through shared memory
            assert any(o.startswith("cp.async.cg") for o in ops), k  # ... as 16-byte copies
        if k["name"] == "fused_decode_kernel":
            assert 2 * k["shared"] <= 232448, k["shared"]  # two programs an SM, even with 4 stages
            # the per-tile flags: one release fence, then relaxed writes to every rank (iris.signal_all)
            assert "fence.acq_rel.sys" in ops and "atom.global.sys.relaxed.exch.b32" in ops, k
            assert "atom.global.sys.release.exch.b32" not in ops, k
            assert any(o.startswith("atom.global.sys.acquire") or o.startswith("ld.global.sys.acquire")
                       for o in ops), k  # the wait's acquire
            assert "nanosleep" in ops and any(o.startswith("ld.volatile.global") for o in ops), k  # its backoff
            assert (k["timer_reads"] > 0) == k["timeline"], k  # the diagnostic timeline only where asked for
        if k["name"] == "put_states_kernel":
            assert any(".v4." in o for o in ops), k  # 16-byte remote stores/loads
