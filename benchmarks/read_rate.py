"""The rate at which a kernel reads a decode step's K and V (the floor's rate, used by both decode benchmarks).

A decode step reads K and V once and writes next to nothing, so its floor is K+V bytes over the highest read
rate a plain read kernel reaches on the same GPU in the same run; a device copy's rate is not that: a copy
also writes, and steps ran below a copy-rate floor.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def read_kv_kernel(k_ptr, v_ptr, out_ptr, S, num_splits, stride_kn, stride_kh, Hkv,
                   D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (Hkv, splits): each program sums its split's K and V rows of one KV head (the bytes a split reads)."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(S, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, S)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :]
        m = (offs_n < end)[:, None]
        acc += tl.load(k_ptr + rows, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + rows, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + (split * Hkv + kvh) * D + offs_d, tl.sum(acc, 0))


def read_kv(k, v, splits: int, block_n: int = 64):
    """A launch that reads every row of contiguous K and V [B, S, Hkv, D] once, `splits` programs per KV head."""
    import torch

    B, S, Hkv, D = k.shape
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("read_kv: K and V must be contiguous")
    partial = torch.empty(splits * Hkv * D, dtype=torch.float32, device=k.device)
    rows = B * S  # batch rows follow one another: one long sequence of B*S rows

    def launch():
        read_kv_kernel[(Hkv, splits)](k, v, partial, rows, splits, k.stride(1), k.stride(2), Hkv, D=D,
                                      BLOCK_N=block_n, num_warps=4, num_stages=4)
    return launch


def best_read_rate(device, time_us, S: int = 1 << 18, Hkv: int = 8, D: int = 128) -> float:
    """Bytes/s of the read kernel over K and V of S keys (1 GiB together by default: long enough that launch
    time does not count), the best of a few grids; `time_us(fn)` times one call. A run of short contexts
    alone would otherwise take its floor's rate from reads shorter than a launch."""
    import torch

    k = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    best = max(2 * k.numel() * k.element_size() / (time_us(read_kv(k, v, n)) * 1e-6) for n in (33, 66, 132))
    del k, v
    return best
