"""Exact checks of every RMA operation, runnable on any backend.

``run_rma_checks(ctx)`` runs on every rank inside ``launch`` and returns
``{check name: (passed, detail)}``; the simulator tests and the GPU benchmark share it.
Every expected value is exact (integers, or floats that sum exactly).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import iris
from .errors import RemoteWaitTimeout, new_error_buffer, raise_if_wait_timed_out
from .heap import Epoch

FILL = -7  # what untouched output elements hold


@triton.jit
def _p2p_kernel(src, got_load, got_get, got_copy, inbox_store, inbox_put, inbox_copy,
                got_scalar, inbox_scalar, heap_bases, rank, N, BLOCK: tl.constexpr):
    """Program p pulls from and pushes to peer p with every data-movement function."""
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(got_load + p * N + offs, iris.load(src + offs, rank, p, heap_bases, mask=mask),
             mask=mask)
    iris.get(src + offs, got_get + p * N + offs, rank, p, heap_bases, mask=mask)
    iris.copy(src + offs, got_copy + p * N + offs, p, rank, rank, heap_bases, mask=mask)
    mine = tl.load(src + offs, mask=mask)
    iris.store(inbox_store + rank * N + offs, mine, rank, p, heap_bases, mask=mask)
    iris.put(src + offs, inbox_put + rank * N + offs, rank, p, heap_bases, mask=mask)
    iris.copy(src + offs, inbox_copy + rank * N + offs, rank, p, rank, heap_bases, mask=mask)
    tl.store(got_scalar + p, iris.load(src + 5, rank, p, heap_bases))  # scalar pointers
    iris.store(inbox_scalar + rank, tl.load(src + 7), rank, p, heap_bases)


@triton.jit
def _atomics_kernel(cnt, ret, blk, f32, f16, bf16, i64, heap_bases, rank,
                    BLOCK: tl.constexpr, NBLK: tl.constexpr):
    """Program p applies every atomic to peer p's counters; old values go to local ret[p]."""
    p = tl.program_id(0)
    one = 1
    # cnt[0:9]: atomic_add of 1 under each memory order and scope
    iris.atomic_add(cnt + 0, one, rank, p, heap_bases, sem="relaxed", scope="cta")
    iris.atomic_add(cnt + 1, one, rank, p, heap_bases, sem="relaxed", scope="gpu")
    iris.atomic_add(cnt + 2, one, rank, p, heap_bases, sem="relaxed", scope="sys")
    iris.atomic_add(cnt + 3, one, rank, p, heap_bases, sem="acquire", scope="gpu")
    iris.atomic_add(cnt + 4, one, rank, p, heap_bases, sem="acquire", scope="sys")
    iris.atomic_add(cnt + 5, one, rank, p, heap_bases, sem="release", scope="gpu")
    iris.atomic_add(cnt + 6, one, rank, p, heap_bases, sem="release", scope="sys")
    iris.atomic_add(cnt + 7, one, rank, p, heap_bases, sem="acq_rel", scope="gpu")
    iris.atomic_add(cnt + 8, one, rank, p, heap_bases)
    iris.atomic_sub(cnt + 9, rank + 1, rank, p, heap_bases)
    # cnt[10]: every rank races one CAS 0 -> rank + 1; exactly one wins
    tl.store(ret + p * 8 + 0, iris.atomic_cas(cnt + 10, 0, rank + 1, rank, p, heap_bases))
    iris.atomic_or(cnt + 11, 1 << rank, rank, p, heap_bases)
    iris.atomic_and(cnt + 12, ~(1 << rank), rank, p, heap_bases)
    iris.atomic_xor(cnt + 13, (1 << rank) | 256, rank, p, heap_bases)
    iris.atomic_min(cnt + 14, 100 - rank, rank, p, heap_bases)
    iris.atomic_min(cnt + 14, 5000, rank, p, heap_bases)
    iris.atomic_max(cnt + 15, 7 * rank, rank, p, heap_bases)
    iris.atomic_max(cnt + 15, -50, rank, p, heap_bases)
    # cnt[16 + r]: rank r's own xchg slot, cnt[16 + NBLK + r]: its own CAS slot
    xs = cnt + 16 + rank
    tl.store(ret + p * 8 + 1, iris.atomic_xchg(xs, 10 * (rank + 1), rank, p, heap_bases))
    tl.store(ret + p * 8 + 2, iris.atomic_xchg(xs, 10 * (rank + 1) + 1, rank, p, heap_bases))
    cs = cnt + 16 + NBLK + rank
    tl.store(ret + p * 8 + 3, iris.atomic_cas(cs, 0, 100 + rank, rank, p, heap_bases))
    tl.store(ret + p * 8 + 4, iris.atomic_cas(cs, 0, 999, rank, p, heap_bases))
    # masked block atomics
    offs = tl.arange(0, BLOCK)
    mask = offs < BLOCK - 14
    iris.atomic_add(blk + offs, (rank + 1) * (offs + 1), rank, p, heap_bases, mask=mask)
    iris.atomic_max(blk + BLOCK + offs, rank * BLOCK + offs, rank, p, heap_bases, mask=mask)
    iris.atomic_add(f32 + offs, tl.full((BLOCK,), 0.5, tl.float32), rank, p, heap_bases,
                    mask=mask)
    # other dtypes on one element
    iris.atomic_add(f16, 0.5, rank, p, heap_bases)
    iris.atomic_add(bf16, 0.5, rank, p, heap_bases)
    iris.atomic_add(i64, tl.full((), 1 << 33, tl.int64), rank, p, heap_bases)


@triton.jit
def _message_kernel(inbox, data_flag, ack_flag, bad, err, heap_bases, rank, peer, is_producer,
                    base, rounds, N: tl.constexpr, MAX_SPINS: tl.constexpr):
    """The producer (``is_producer`` = 1; an int, as the interpreter rejects bool arguments)
    sends ``rounds`` messages to ``peer`` through one inbox slot.

    Round i uses epoch e = base + i. Producer: wait until the consumer acked e - 1,
    store the payload into the consumer's inbox, signal its data flag with e.
    Consumer: wait for data flag >= e, check the payload, ack with e. No flag is ever reset.
    """
    offs = tl.arange(0, N)
    wrong = 0
    for i in range(rounds):
        e = base + i
        if is_producer != 0:
            iris.wait_until(ack_flag, e - 1, rank, err, MAX_SPINS)
            iris.store(inbox + offs, e * 1000 + rank * 100 + offs, rank, peer, heap_bases)
            iris.signal(data_flag, e, rank, peer, heap_bases)
        else:
            iris.wait_until(data_flag, e, rank, err, MAX_SPINS)
            got = tl.load(inbox + offs)
            wrong += tl.sum((got != e * 1000 + peer * 100 + offs).to(tl.int32), axis=0)
            iris.signal(ack_flag, e, rank, peer, heap_bases)
    tl.store(bad, wrong)


@triton.jit
def _wait_kernel(flag, value, err, rank, MAX_SPINS: tl.constexpr):
    iris.wait_until(flag, value, rank, err, MAX_SPINS)


def _result(ok: bool, detail: str = "") -> tuple[bool, str]:
    return bool(ok), ("ok" if ok else detail)


def _compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    actual = actual.detach().cpu()
    expected = expected.to(actual.dtype)
    if torch.equal(actual, expected):
        return True, "ok"
    bad = (actual != expected).nonzero()
    first = tuple(bad[0].tolist())
    return False, (f"{bad.shape[0]} wrong elements; first at {first}: got "
                   f"{actual[first].item()}, expected {expected[first].item()}")


def check_data_movement(ctx, dtype: torch.dtype, n: int = 100) -> dict:
    """load/get/copy from every peer and store/put/copy to every peer, one dtype."""
    heap, rank, world = ctx.heap, ctx.rank, ctx.world_size
    tag = str(dtype).replace("torch.", "")
    src = heap.empty(n, dtype=dtype, name=f"src_{tag}")
    src.copy_(_row(rank, n, dtype, ctx.device))
    outs = {k: heap.full((world + 1, n), FILL, dtype=dtype, name=f"{k}_{tag}")
            for k in ("load", "get", "copy_pull", "store", "put", "copy_push")}
    got_scalar = heap.full((world,), FILL, dtype=dtype, name=f"got_scalar_{tag}")
    inbox_scalar = heap.full((world,), FILL, dtype=dtype, name=f"inbox_scalar_{tag}")
    heap.barrier()
    _p2p_kernel[(world,)](src, outs["load"], outs["get"], outs["copy_pull"], outs["store"],
                          outs["put"], outs["copy_push"], got_scalar, inbox_scalar,
                          heap.heap_bases, rank, n, BLOCK=triton.next_power_of_2(n))
    heap.barrier()
    rows = torch.stack([_row(q, n, dtype, "cpu") for q in range(world)]
                       + [torch.full((n,), FILL, dtype=dtype)])
    checks = {f"{k}[{tag}]": _compare(t, rows) for k, t in outs.items()}
    checks[f"load_scalar[{tag}]"] = _compare(got_scalar, rows[:world, 5])
    checks[f"store_scalar[{tag}]"] = _compare(inbox_scalar, rows[:world, 7])
    for t in [src, got_scalar, inbox_scalar, *outs.values()]:
        heap.free(t)
    return checks


def check_atomics(ctx) -> dict:
    heap, rank, W = ctx.heap, ctx.rank, ctx.world_size
    nblk, block = 16, 64
    assert W <= nblk
    init = torch.zeros(16 + 2 * nblk, dtype=torch.int32)
    init[9], init[12], init[14], init[15] = 1000, -1, 1000, -5
    cnt = heap.as_symmetric(init.to(ctx.device), name="counters")
    ret = heap.full((W, 8), FILL, dtype=torch.int32, name="atomic_returns")
    blk = heap.zeros(2 * block, dtype=torch.int32, name="block_counters")
    f32 = heap.zeros(block, dtype=torch.float32, name="f32_counters")
    f16 = heap.zeros(1, dtype=torch.float16, name="f16_counter")
    bf16 = heap.zeros(1, dtype=torch.bfloat16, name="bf16_counter")
    i64 = heap.zeros(1, dtype=torch.int64, name="i64_counter")
    heap.barrier()
    _atomics_kernel[(W,)](cnt, ret, blk, f32, f16, bf16, i64, heap.heap_bases, rank,
                          BLOCK=block, NBLK=nblk)
    heap.barrier()
    c = cnt.cpu()
    full = (1 << W) - 1
    out = {}
    sems = ["relaxed/cta", "relaxed/gpu", "relaxed/sys", "acquire/gpu", "acquire/sys",
            "release/gpu", "release/sys", "acq_rel/gpu", "acq_rel/sys(default)"]
    for i, name in enumerate(sems):
        out[f"atomic_add[{name}]"] = _compare(c[i], torch.tensor(W))
    out["atomic_sub"] = _compare(c[9], torch.tensor(1000 - W * (W + 1) // 2))
    out["atomic_or"] = _compare(c[11], torch.tensor(full))
    out["atomic_and"] = _compare(c[12], torch.tensor(~full))
    out["atomic_xor"] = _compare(c[13], torch.tensor(full | (256 if W % 2 else 0)))
    out["atomic_min"] = _compare(c[14], torch.tensor(100 - (W - 1)))
    out["atomic_max"] = _compare(c[15], torch.tensor(7 * (W - 1)))
    out["atomic_xchg"] = _compare(c[16:16 + W], 10 * torch.arange(1, W + 1) + 1)
    out["atomic_cas"] = _compare(c[16 + nblk:16 + nblk + W], 100 + torch.arange(W))
    r = ret.cpu()
    out["atomic_xchg returns"] = _compare(r[:, 1:3],
                                          torch.tensor([[0, 10 * (rank + 1)]]).expand(W, 2))
    out["atomic_cas returns"] = _compare(r[:, 3:5], torch.tensor([[0, 100 + rank]]).expand(W, 2))
    # the CAS race: on every rank exactly one rank won, and the word holds the winner's value
    winner = int(c[10]) - 1
    olds = [int(heap.peer_tensor(ret, q)[rank, 0].item()) for q in range(W)]
    expected_olds = [0 if q == winner else winner + 1 for q in range(W)]
    out["atomic_cas race"] = _result(0 <= winner < W and olds == expected_olds,
                                     f"word {int(c[10])}, old values seen by ranks {olds}")
    j = torch.arange(block)
    masked = j < block - 14
    out["atomic_add block+mask"] = _compare(
        blk[:block], torch.where(masked, (j + 1) * (W * (W + 1) // 2), 0))
    out["atomic_max block+mask"] = _compare(blk[block:],
                                            torch.where(masked, (W - 1) * block + j, 0))
    out["atomic_add f32 block"] = _compare(f32, torch.where(masked, 0.5 * W, 0.0))
    out["atomic_add f16"] = _compare(f16, torch.tensor([0.5 * W]))
    out["atomic_add bf16"] = _compare(bf16, torch.tensor([0.5 * W]))
    out["atomic_add i64"] = _compare(i64, torch.tensor([W << 33]))
    heap.barrier()  # peers read our ret above
    for t in (cnt, ret, blk, f32, f16, bf16, i64):
        heap.free(t)
    return out


def check_message_passing(ctx, rounds: int, max_spins: int, epoch: Epoch) -> dict:
    """Even rank r sends to rank r + 1 with epoch flags, in two launches, with no flag reset."""
    heap, rank, W = ctx.heap, ctx.rank, ctx.world_size
    n = 16
    inbox = heap.zeros(n, dtype=torch.int32, name="mp_inbox")
    data_flag = heap.zeros(1, dtype=torch.int32, name="mp_data_flag")
    ack_flag = heap.zeros(1, dtype=torch.int32, name="mp_ack_flag")
    bad = heap.full((1,), -1, dtype=torch.int32, name="mp_bad")
    err = new_error_buffer(ctx.device)
    is_producer = rank % 2 == 0
    peer = rank + 1 if is_producer else rank - 1
    heap.barrier()
    out = {}
    for label, count in (("first launch", rounds), ("second launch", max(rounds // 100, 3))):
        base = epoch.next(count)
        if peer < W:  # with an odd world size the last rank sits out
            _message_kernel[(1,)](inbox, data_flag, ack_flag, bad, err, heap.heap_bases, rank,
                                  peer, int(is_producer), base, count, N=n, MAX_SPINS=max_spins)
        heap.barrier()  # the last ack may still be on its way
        name = f"message passing {count} rounds ({label})"
        try:
            raise_if_wait_timed_out(err, heap)
            flags = [int(data_flag.item()), int(ack_flag.item())]
            want = [0, epoch.value] if is_producer else [epoch.value, 0]
            ok = peer >= W or (int(bad.item()) in (0, -1) and flags == want)
            out[name] = _result(ok, f"{int(bad.item())} wrong payload elements; flags "
                                    f"(data, ack) = {flags}, expected {want}")
        except RemoteWaitTimeout as e:
            out[name] = (False, str(e))
        heap.barrier()  # everyone read its flags before the next launch signals again
    consumed = not is_producer and peer < W  # the same names on every rank
    out["message passing payloads"] = _result(not consumed or int(bad.item()) == 0,
                                              f"{int(bad.item())} wrong payload elements")
    for t in (inbox, data_flag, ack_flag, bad):
        heap.free(t)
    return out


def check_wait_timeout(ctx, max_spins: int = 50) -> dict:
    """Rank 0 waits for a signal nobody sends; the bounded wait must name the flag."""
    heap, rank = ctx.heap, ctx.rank
    never = heap.zeros(4, dtype=torch.int32, name="never_set")
    err = new_error_buffer(ctx.device)
    heap.barrier()
    out = {}
    if rank == 0:
        _wait_kernel[(1,)](never[1:], 5, err, rank, MAX_SPINS=max_spins)
        try:
            raise_if_wait_timed_out(err, heap)
            out["wait_until timeout"] = (False, "no RemoteWaitTimeout raised")
        except RemoteWaitTimeout as e:
            msg = str(e)
            want = ["rank 0", "never_set[1]", ">= 5", "last saw 0", f"{max_spins} spins"]
            missing = [w for w in want if w not in msg]
            out["wait_until timeout"] = _result(not missing, f"message lacks {missing}: {msg}")
        out["error buffer reset"] = _compare(err, torch.zeros(err.numel(), dtype=torch.int64))
    heap.barrier()
    heap.free(never)
    return out


def run_rma_checks(ctx, rounds: int = 1000, max_spins: int | None = None,
                   dtypes=(torch.float32, torch.bfloat16, torch.int64)) -> dict:
    """Every check on this rank: ``{name: (passed, detail)}``."""
    if max_spins is None:
        max_spins = 100_000 if ctx.backend == "sim" else 50_000_000
    checks = {}
    for dtype in dtypes:
        checks.update(check_data_movement(ctx, dtype))
    checks.update(check_atomics(ctx))
    checks.update(check_message_passing(ctx, rounds, max_spins, Epoch()))
    checks.update(check_wait_timeout(ctx))
    if ctx.heap.used_bytes != 0:
        checks["heap empty after checks"] = (False, f"{ctx.heap.used_bytes} bytes still used")
    return checks


def _row(rank: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    return (rank * 1000 + torch.arange(n, device=device)).to(dtype)
