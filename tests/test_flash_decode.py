"""Flash Decode, every stage, in the multi-rank simulator, against a float64 reference over the full KV.

The KV cache is split along the sequence across ranks; each rank's shard has its own per-batch length
(some 0: an empty shard) and is either contiguous or paged (a shuffled block table). Every call draws
fresh random inputs from a fresh seed (printed on failure); several decode steps run back to back on one
FlashDecode object, so the epoch flags and device-side counters must work with no reset between steps.
The interpreter is slow: shapes are tiny and one spawned world per world size runs every check.
"""
import os
import tempfile

import pytest
import torch

from bspfuse.runtime import RemoteWaitTimeout, launch
from test_flash_decode_pass import _fuse, bsp_decode_program

TOL_O = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
TOL_LSE = 1e-4
STEPS = 3


def _case(seed, world, B, Hq, Hkv, D, S, dtype, page=0, empty=(), splits=None):
    """Inputs of one configuration: per-rank KV shards, and per step q and per-rank lengths.

    empty: (step, rank, batch) entries whose shard is empty at that step. splits: of the KV length inside a
    rank (None: the heuristic, 1 at these lengths); short lengths leave some splits empty."""
    g = torch.Generator().manual_seed(seed)
    shards = []
    for _ in range(world):
        if page:
            blocks = -(-S // page)
            n_blocks = B * blocks + 3  # spare blocks the table never names
            k = torch.randn(n_blocks, page, Hkv, D, generator=g).to(dtype)
            v = torch.randn(n_blocks, page, Hkv, D, generator=g).to(dtype)
            table = torch.randperm(n_blocks, generator=g)[:B * blocks].view(B, blocks).to(torch.int32)
        else:
            k = torch.randn(B, S, Hkv, D, generator=g).to(dtype)
            v = torch.randn(B, S, Hkv, D, generator=g).to(dtype)
            table = None
        shards.append((k, v, table))
    steps = []
    for step in range(STEPS):
        q = torch.randn(B, Hq, D, generator=g).to(dtype)
        lens = torch.randint(1, S + 1, (world, B), generator=g, dtype=torch.int32)
        for s, r, b in empty:
            if s == step:
                lens[r, b] = 0
        steps.append((q, lens))
    return dict(seed=seed, B=B, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, page=page, shards=shards, steps=steps,
                splits=splits)


def _logical_kv(k, v, table):
    """[B, S, Hkv, D] keys and values of a shard, in sequence order."""
    if table is None:
        return k, v
    t = table.long()
    return k[t].flatten(1, 2), v[t].flatten(1, 2)


def _reference(case, step, scale=None):
    """float64 (O, LSE) from the full, unsharded KV: every rank's valid keys concatenated."""
    from bspfuse.kernels.flash_decode import reference_decode

    q, lens = case["steps"][step]
    B, Hkv, D = case["B"], case["Hkv"], case["D"]
    total = lens.sum(0)
    keys = torch.zeros(B, int(total.max()), Hkv, D, dtype=torch.float64)
    vals = torch.zeros_like(keys)
    for b in range(B):
        parts = [_logical_kv(k, v, t) for k, v, t in case["shards"]]
        keys[b, :total[b]] = torch.cat([kk[b, :lens[r, b]].double() for r, (kk, _) in enumerate(parts)])
        vals[b, :total[b]] = torch.cat([vv[b, :lens[r, b]].double() for r, (_, vv) in enumerate(parts)])
    return reference_decode(q, keys, vals, kv_lens=total, scale=scale)


def _assert_close(out, lse, ref, case, what):
    ro, rl = ref
    dtype = case["dtype"]
    msg = f"{what} ({dtype}, page={case['page']}, seed={case['seed']})"
    assert out.dtype == dtype and lse.dtype == torch.float32, msg
    assert torch.isfinite(out).all(), f"{msg}: non-finite output"
    err_o = (out.double() - ro).abs().max().item()
    assert err_o <= TOL_O[dtype], f"{msg}: max |O - ref| = {err_o:.3g}"
    empty = torch.isinf(rl)
    assert torch.equal(torch.isinf(lse), empty), f"{msg}: LSE is -inf at {torch.isinf(lse).nonzero().tolist()}"
    err_l = (lse.double() - rl)[~empty].abs().max().item() if (~empty).any() else 0.0
    assert err_l <= TOL_LSE, f"{msg}: max |LSE - ref| = {err_l:.3g}"


# ------------------------------------------------------------------------------------------------ rank side


def _run_stages(ctx, cases, stages, init_file):
    """On every rank: each stage over each case for STEPS steps on one FlashDecode; outputs by key."""
    import torch.distributed as dist

    from bspfuse.kernels.flash_decode import FlashDecode

    # stage 0's all-gather goes through gloo here (NCCL on GPUs)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=ctx.rank, world_size=ctx.world_size)
    results = {}
    try:
        for ci, case in enumerate(cases):
            k, v, table = case["shards"][ctx.rank]
            for stage in stages:
                fd = FlashDecode(ctx.heap, ctx.world_size, ctx.rank, case["B"], case["Hq"], case["Hkv"], case["D"],
                                 case["dtype"], stage=stage, block_n=16, num_splits=case["splits"],
                                 max_spins=100_000)
                for step, (q, lens) in enumerate(case["steps"]):
                    results[ci, stage, step] = fd(q, k, v, kv_lens=lens[ctx.rank], block_table=table)
                results[ci, stage, "launches"] = fd.launches()
                fd.close()
    finally:
        dist.destroy_process_group()
    return results


def _local_ops(ctx, case):
    """decode_partial on this rank's shard, and merge_states of the per-rank states (one GPU's ops)."""
    from bspfuse.kernels.flash_decode import decode_partial, merge_states

    q, lens = case["steps"][0]
    states = [decode_partial(q, k, v, kv_lens=lens[r], block_table=t, block_n=16, num_splits=3)
              for r, (k, v, t) in enumerate(case["shards"])]
    o = torch.stack([s[0].float() for s in states])
    lse = torch.stack([s[1] for s in states])
    lse[:, 0] = float("-inf")  # batch entry 0 empty everywhere: merges to (0, -inf), never NaN
    o[:, 0] = float("nan")  # whatever an empty state's O holds is ignored
    return states, merge_states(o, lse, out_dtype=case["dtype"])


def _timeout(ctx):
    """Rank 1 never runs the step: rank 0's bounded wait must name the flag, not hang."""
    from bspfuse.kernels.flash_decode import FlashDecode

    fd = FlashDecode(ctx.heap, ctx.world_size, ctx.rank, 1, 4, 1, 16, torch.float16, stage=3, block_n=16,
                     max_spins=50)
    if ctx.rank != 0:
        return None
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    q, k, v = torch.randn(1, 4, 16, generator=g).half(), *torch.randn(2, 1, 20, 1, 16, generator=g).half()
    try:
        fd(q, k, v)
    except RemoteWaitTimeout as e:
        return str(e)
    return "no timeout"


def _from_op(ctx, op, case):
    """The flash_decode op that fuse_flash_decode made of the BSP program, run by FlashDecode.from_op."""
    from bspfuse.kernels.flash_decode import FlashDecode

    fd = FlashDecode.from_op(op, ctx.heap, block_n=16, max_spins=100_000)
    k, v, table = case["shards"][ctx.rank]
    q, lens = case["steps"][0]
    return fd(q, k, v, kv_lens=lens[ctx.rank], block_table=table)


def _world(ctx, cases, stages, init_file, local_case=None, timeout=False, op=None):
    out = {"stages": _run_stages(ctx, cases, stages, init_file)}
    if op is not None:
        out["op"] = _from_op(ctx, op, cases[0])
    if local_case is not None and ctx.rank == 0:
        out["local"] = _local_ops(ctx, local_case)
    if timeout:
        out["timeout"] = _timeout(ctx)
    return out


# ------------------------------------------------------------------------------------------------ tests


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def _check_world(results, cases, stages, world):
    for ci, case in enumerate(cases):
        for step in range(STEPS):
            ref = _reference(case, step)
            for stage in stages:
                for r in range(world):
                    out, lse = results[r]["stages"][ci, stage, step]
                    where = f"world {world}, case {ci}, stage {stage}, step {step}, rank {r}"
                    _assert_close(out, lse, ref, case, where)
    launches = results[0]["stages"][0, 3, "launches"]
    assert launches == ["fused_decode_kernel"], launches


def test_flash_decode_world2(tmp_path):
    # GQA (4 query heads per KV head), contiguous, fp16, 3 splits; paged bf16 with 2 query heads per KV head, 2
    # splits; fp32, one split, a head dim that is not a power of two. Empty shards at several steps and ranks.
    cases = [
        _case(_seed(), 2, B=2, Hq=8, Hkv=2, D=32, S=48, dtype=torch.float16, empty=[(0, 1, 0), (1, 0, 1)], splits=3),
        _case(_seed(), 2, B=2, Hq=4, Hkv=2, D=16, S=40, dtype=torch.bfloat16, page=8, empty=[(0, 0, 1), (2, 1, 0)],
              splits=2),
        _case(_seed(), 2, B=1, Hq=2, Hkv=1, D=24, S=33, dtype=torch.float32, empty=[(1, 1, 0)]),
    ]
    stages = (0, 1, 2, 3)
    # the compiled program: the BSP decode step of case 0's shapes through fuse_flash_decode
    fused, _ = _fuse(bsp_decode_program(B=2, Hq=8, Hkv=2, D=32, S=48, dtype="f16", scale=0.3))
    (op,) = fused.find("flash_decode")
    init_file = tempfile.mktemp(dir=tmp_path)
    results = launch(_world, 2, backend="sim", heap_bytes=1 << 20, args=(cases, stages, init_file),
                     kwargs={"local_case": cases[1], "timeout": True, "op": op}, timeout_s=240)
    _check_world(results, cases, stages, 2)
    for r in range(2):
        _assert_close(*results[r]["op"], _reference(cases[0], 0, scale=0.3), cases[0], f"flash_decode op, rank {r}")

    # the one-GPU ops: each rank's state against the reference over its own shard, and their merge
    case = cases[1]
    q, lens = case["steps"][0]
    states, (merged, merged_lse) = results[0]["local"]
    for r, (k, v, t) in enumerate(case["shards"]):
        from bspfuse.kernels.flash_decode import reference_decode

        kk, vv = _logical_kv(k, v, t)
        _assert_close(*states[r], reference_decode(q, kk, vv, kv_lens=lens[r]), case, f"decode_partial rank {r}")
    ref_o, ref_l = _reference(case, 0)
    ref_o[0], ref_l[0] = 0.0, float("-inf")
    _assert_close(merged, merged_lse, (ref_o, ref_l), case, "merge_states")

    message = results[0]["timeout"]
    assert "flash_decode.flags[1, " in message and "rank 0" in message, message


def test_flash_decode_world4(tmp_path):
    # 4 ranks, paged fp16 with GQA: one rank's shard empty for a batch entry at one step, lengths all different
    cases = [_case(_seed(), 4, B=2, Hq=8, Hkv=2, D=16, S=24, dtype=torch.float16, page=8,
                   empty=[(0, 2, 1), (1, 3, 0), (1, 0, 0)], splits=2)]
    stages = (0, 1, 2, 3)
    init_file = tempfile.mktemp(dir=tmp_path)
    results = launch(_world, 4, backend="sim", heap_bytes=1 << 20, args=(cases, stages, init_file), timeout_s=240)
    _check_world(results, cases, stages, 4)


def _cache_reuse(ctx):
    """One FlashDecode over steps that reuse the KV cache objects (checked once), change them in place, pass
    lengths in another dtype, and swap in another cache: each step against the reference."""
    from bspfuse.kernels.flash_decode import FlashDecode, reference_decode

    g = torch.Generator().manual_seed(_seed())
    B, Hq, Hkv, D, S = 2, 4, 2, 16, 24
    fd = FlashDecode(ctx.heap, 1, 0, B, Hq, Hkv, D, torch.float32, stage=3, block_n=16, num_splits=2,
                     max_spins=100_000)
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    errors = []
    for step in range(4):
        q = torch.randn(B, Hq, D, generator=g)
        lens = torch.randint(1, S + 1, (B,), generator=g, dtype=torch.int32)
        if step == 1:
            lens = lens.long()  # not what the kernel reads: converted, so the checks run again
        if step == 2:
            k.mul_(-1)  # the cache written in place: same tensors, new values
        if step == 3:
            k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
        out, lse = fd(q, k, v, kv_lens=lens)
        ref_o, ref_lse = reference_decode(q, k, v, kv_lens=lens)
        errors.append(max((out.double() - ref_o).abs().max().item(), (lse.double() - ref_lse).abs().max().item()))
    fd.close()
    return errors


def test_steps_that_reuse_the_kv_cache_are_checked_once_and_follow_its_changes():
    errors = launch(_cache_reuse, 1, backend="sim", heap_bytes=1 << 20, timeout_s=300)[0]
    assert len(errors) == 4 and max(errors) < TOL_O[torch.float32], errors


def test_the_timeline_diagnostic_says_it_needs_stage_3_on_a_gpu():
    from bspfuse.kernels.flash_decode import FlashDecode
    from bspfuse.runtime import SymmetricHeap

    heap = SymmetricHeap(1 << 20)  # one rank, host memory: the simulator's device
    with pytest.raises(ValueError, match="timeline=True needs stage 3 on a GPU"):
        FlashDecode(heap, 1, 0, 1, 4, 2, 16, torch.float32, stage=3, timeline=True)


def _bound_steps(ctx):
    """Steps of FlashDecode.bind (stage 1, and stage 3's one-launch path), then calls given the same tensors,
    with new values written into them before each: every step against the reference; a q that bind would have
    to copy is refused, and so is a wrong out after repeated calls."""
    from bspfuse.kernels.flash_decode import FlashDecode, reference_decode

    g = torch.Generator().manual_seed(_seed())
    B, Hq, Hkv, D, S = 2, 4, 2, 16, 24
    errors, refused = [], []
    for stage in (1, 3):
        fd = FlashDecode(ctx.heap, 1, 0, B, Hq, Hkv, D, torch.float32, stage=stage, block_n=16, num_splits=2)
        q, lens = torch.empty(B, Hq, D), torch.empty(B, dtype=torch.int32)
        k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
        out = (torch.empty(B, Hq, D), torch.empty(B, Hq))
        step = fd.bind(q, k, v, kv_lens=lens, out=out)
        # bound steps, then calls given the very same tensors (which repeat the last call's prepared launch)
        for i, call in enumerate([step] * 3 + [lambda: fd(q, k, v, kv_lens=lens, out=out)] * 3):
            q.copy_(torch.randn(B, Hq, D, generator=g))
            lens.copy_(torch.randint(0 if i % 3 == 1 else 1, S + 1, (B,), generator=g))
            if i % 3 == 2:
                k.mul_(-1)
            o, lse = call()
            assert o is out[0] and lse is out[1]
            ref_o, ref_lse = reference_decode(q, k, v, kv_lens=lens)
            finite = torch.isfinite(ref_lse)
            lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0  # all empty
            errors.append(max((o.double() - ref_o).abs().max().item(), lse_err))
            assert torch.equal(torch.isfinite(lse), finite)
        try:
            fd.bind(torch.randn(B, D, Hq).transpose(1, 2), k, v, kv_lens=lens, out=out)
        except ValueError as e:
            refused.append(str(e))
        try:  # another out after repeated calls: checked, not repeated
            fd(q, k, v, kv_lens=lens, out=(torch.empty(B, Hq, D + 1), out[1]))
        except ValueError as e:
            refused.append(str(e))
        fd.close()
    return errors, refused


def test_a_bound_step_and_a_repeated_call_read_the_values_written_into_their_tensors():
    errors, refused = launch(_bound_steps, 1, backend="sim", heap_bytes=1 << 20, timeout_s=300)[0]
    assert len(errors) == 12 and max(errors) < TOL_O[torch.float32], errors
    assert len(refused) == 4 and all("FlashDecode.bind: q would be copied" in r for r in refused[::2]), refused
    assert all("out o must be a contiguous" in r for r in refused[1::2]), refused
