"""The split count of decode attention: how it is chosen, and that any count gives the same result.

choose_num_splits is pure arithmetic (checked here on the H200's 132 SMs); the results run in the
simulator (Triton's interpreter): decode_partial over random odd lengths and split counts, with more
splits than a short entry has blocks (empty splits) and an empty entry, against the float64 reference;
FastLaunch in the interpreter (it falls back to the JIT's launch, same output); and FlashDecode at
world 2 with odd split counts, unequal per-rank lengths and empty shards.
"""
import tempfile

import torch

from bspfuse.kernels.flash_decode import (MAX_SPLITS, MIN_SPLIT_BLOCKS, choose_num_splits, decode_tiling,
                                          merge_chunk)
from bspfuse.runtime import launch
from test_flash_decode import _case, _check_world, _seed, _world

H200_SMS = 132


def test_split_choice_bounds():
    for Hq, Hkv, D in ((96, 12, 128), (32, 8, 128), (8, 8, 64), (64, 1, 256)):
        for B in (1, 3, 8, 32):
            for S in (100, 4096, 5000, 65536, 262144):
                t = decode_tiling(B, Hq, Hkv, D, device="cuda")
                s = choose_num_splits(t, S, H200_SMS)
                blocks = -(-S // t.block_n)
                assert 1 <= s <= MAX_SPLITS, (Hq, Hkv, B, S, s)
                assert s == 1 or blocks // s >= MIN_SPLIT_BLOCKS, (Hq, Hkv, B, S, s)  # no split too short


def test_split_choice_fills_every_sm_at_batch_1():
    # 8 tiles (batch 1, 8 KV heads) over 128K keys: every SM gets the same number of programs, at least 2
    # (about 3 per SM gave 50 splits, 400 programs: a 4th program on 4 SMs, a quarter more time)
    t = decode_tiling(1, 32, 8, 128, device="cuda")
    s = choose_num_splits(t, 1 << 17, H200_SMS)
    programs = t.num_tiles * s
    assert programs % H200_SMS == 0 and programs // H200_SMS >= 2, s
    # long enough per rank and batch 32: the tiles alone keep every SM busy, no split needs merging
    assert choose_num_splits(decode_tiling(32, 96, 12, 128, device="cuda"), 4096, H200_SMS) == 1
    # short context: splits stay long enough to be worth a program
    assert choose_num_splits(t, 4096, H200_SMS) == 4096 // (MIN_SPLIT_BLOCKS * t.block_n)


def test_merge_chunk_fits_registers():
    small = decode_tiling(1, 32, 8, 128, device="cuda")  # 16 heads (padded) x 128: 4 states at once
    assert [merge_chunk(n, small) for n in (1, 2, 3, 33)] == [1, 2, 4, 16]
    assert merge_chunk(33, decode_tiling(1, 64, 1, 512, device="cuda")) == 1


# ------------------------------------------------------------------------------------------------ simulator


def _one_gpu(ctx, seed):
    """decode_partial over odd lengths and split counts; FastLaunch against a plain launch."""
    from bspfuse.codegen.decode import decode_kernels
    from bspfuse.kernels import decode as K
    from bspfuse.kernels.flash_decode import decode_partial, reference_decode
    from bspfuse.runtime.fastlaunch import FastLaunch

    g = torch.Generator().manual_seed(seed)
    results = []
    for splits in (1, 2, 3, 5, 7, 9):
        B, Hq, Hkv, D, S = 3, 4, 2, 24, 45
        q = torch.randn(B, Hq, D, generator=g).half()
        k, v = torch.randn(2, B, S, Hkv, D, generator=g).half()
        lens = torch.randint(1, S + 1, (B,), generator=g, dtype=torch.int32) | 1  # odd lengths
        lens[splits % B] = 0  # an empty entry
        out, lse = decode_partial(q, k, v, kv_lens=lens, num_splits=splits, block_n=16)
        ref_o, ref_l = reference_decode(q, k, v, kv_lens=lens)
        results.append((splits, lens.tolist(), (out.double() - ref_o).abs().max().item(),
                        torch.equal(torch.isinf(lse), torch.isinf(ref_l)),
                        (lse.double() - ref_l)[torch.isfinite(ref_l)].abs().max().item()))
    t = decode_tiling(2, 4, 2, 16)
    o, lse = torch.randn(5, 2, 4, 16, generator=g), torch.randn(5, 2, 4, generator=g)
    outs = [(torch.empty(2, 4, 16), torch.empty(2, 4)) for _ in range(3)]
    meta = dict(t.constexprs(), CHUNK=merge_chunk(5, t), WAIT=False, MAX_SPINS=0, SLEEP_NS=0, TARGET="sim",
                num_warps=t.num_warps)
    fast = FastLaunch(decode_kernels(2)["merge_ranks"], (t.num_tiles,), **meta)
    for out_o, out_lse in outs[:2]:
        fast(o, lse, out_o, out_lse, 5, 2 * 4 * 16, 2 * 4, 4, 2, out_lse, 0, 0, out_lse)
    out_o, out_lse = outs[2]
    decode_kernels(2)["merge_ranks"][(t.num_tiles,)](o, lse, out_o, out_lse, 5, 2 * 4 * 16, 2 * 4, 4, 2, out_lse, 0, 0, out_lse,
                                          **meta)
    return results, fast.direct, outs


def test_any_split_count_matches_the_reference():
    seed = _seed()
    results, direct, outs = launch(_one_gpu, 1, backend="sim", args=(seed,), timeout_s=120)[0]
    for splits, lens, err_o, same_empty, err_lse in results:
        where = f"{splits} splits, lengths {lens}, seed {seed}"
        assert err_o <= 2e-3 and same_empty and err_lse <= 1e-4, (where, err_o, err_lse)
    assert not direct  # the interpreter has no compiled kernel: FastLaunch launches through it
    (o1, l1), (o2, l2), (ref_o, ref_l) = outs
    assert torch.equal(o1, ref_o) and torch.equal(o2, ref_o) and torch.equal(l1, ref_l) and torch.equal(l2, ref_l)


def test_odd_split_counts_world2(tmp_path):
    # 5 and 7 splits of 37 keys (3 blocks of 16): empty splits, and merges whose last chunk of states is partial
    cases = [_case(_seed(), 2, B=2, Hq=4, Hkv=1, D=24, S=37, dtype=torch.float16, empty=[(0, 1, 0), (2, 0, 1)],
                   splits=5),
             _case(_seed(), 2, B=1, Hq=2, Hkv=2, D=16, S=21, dtype=torch.bfloat16, page=8, empty=[(1, 0, 0)],
                   splits=7)]
    stages = (0, 3)
    init_file = tempfile.mktemp(dir=tmp_path)
    results = launch(_world, 2, backend="sim", heap_bytes=1 << 20, args=(cases, stages, init_file), timeout_s=240)
    _check_world(results, cases, stages, 2)
