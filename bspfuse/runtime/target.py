"""The vendor layer: every GPU instruction the kernels need that Triton has no portable form for.

A kernel takes ``TARGET: tl.constexpr``, one of

    "cuda"   NVIDIA Hopper (sm_90): inline PTX, TMA
    "hip"    AMD MI300X (gfx942): inline AMDGCN, no TMA
    "sim"    the CPU simulator (Triton's interpreter): no inline assembly at all

and passes it to the primitives below, each a small ``@triton.jit`` function with one body per target
(a constexpr branch: a kernel compiles only its own target's body). Everything else the kernels do is
portable Triton: memory order is ``tl.atomic_*`` with ``sem``/``scope`` (Triton lowers "sys" scope to
PTX ``.sys`` and to LLVM's system scope on AMDGPU) and ``tl.load(volatile=True)``, never assembly.

Triton's own target query (``triton.language.target_info.is_hip``) asks the active driver, i.e. the GPU of
this process, not the target being compiled for: it answers wrongly when a CPU-only CI compiles for
gfx942, and the simulator would still need a flag of its own. So the target is a constexpr that the host
sets in one place: ``device_target`` (which target a device is) and ``uses_tma`` (whether its kernels load
through tensor descriptors). Example::

    TARGET = device_target(heap.device)            # "cuda" on an H100, "hip" on an MI300X, "sim" on the CPU
    source = generate(tile_program, tma=uses_tma(TARGET))
    kernel[grid](..., TARGET=TARGET)

The AMD bodies compile for gfx942 in CI (tests/test_compile_gfx942.py) but have not run on an
MI300X yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_TARGETS = ("cuda", "hip", "sim")


def device_target(device) -> str:
    """The TARGET of kernels that run on `device` (a torch.device or its name): "sim" for the CPU, "hip" for a
    GPU under PyTorch's ROCm build (which calls AMD GPUs "cuda" devices too), else "cuda"."""
    device = torch.device(device)
    if device.type == "cpu":
        return "sim"
    return "hip" if torch.version.hip else "cuda"


def uses_tma(target: str) -> bool:
    """Whether kernels for `target` move operand tiles through tensor descriptors (Hopper's TMA). gfx942 has
    no TMA, and Triton's interpreter misreads bf16 through descriptors: both load through pointers
    (``codegen.triton.generate(tp, tma=False)``, host descriptors replaced by the tensors)."""
    if target not in KERNEL_TARGETS:
        raise ValueError(f"unknown kernel target {target!r}: one of {', '.join(KERNEL_TARGETS)}")
    return target == "cuda"


# ---- memory order


@triton.jit
def fence_async_proxy(x, TARGET: tl.constexpr):
    """After an acquire: rows that peers wrote with ordinary stores are read next by the tensor-memory (TMA)
    loads, which are another "proxy" of memory on Hopper; this orders the two. ``x``: any int32 scalar (inline
    assembly takes an operand).

    cuda: PTX ``fence.proxy.async.global``.
    hip:  nothing. gfx942 has no TMA: the kernels read those rows with ordinary loads, which the acquire
          already orders.
    sim:  nothing (one proxy)."""
    if TARGET == "cuda":
        tl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.static_assert((TARGET == "hip") or (TARGET == "sim"), "TARGET must be 'cuda', 'hip' or 'sim'")


@triton.jit
def begin_release(x, TARGET: tl.constexpr):
    """Begin a group of flag writes (``release_flag``) that each release every write the calling CTA made
    before the group, at "sys" scope: a peer that acquires any of the flags sees that data. The caller puts a
    CTA barrier first, so the other threads' writes come before the calling thread's. ``x``: any int32 scalar.

    cuda: one ``fence.acq_rel.sys``; the flags are then relaxed "sys" exchanges (a fence followed by a strong
          write is a release pattern). A release atomic a flag would wait at its own fence for the previous
          flag's round trip to the peer, once per flag (measured: kernels.decode's push_tile).
    hip:  nothing: each flag is a release atomic. The counterpart of cuda's one fence would be AMDGCN
          ``buffer_wbl2 sc0 sc1; s_waitcnt vmcnt(0) lgkmcnt(0)`` once, the sequence LLVM puts before every
          system-scope release on gfx942, then relaxed exchanges: left until it is measured on an MI300X,
          since the release atomics are LLVM's own memory model and cannot be got wrong.
    sim:  nothing: each flag is a release atomic."""
    if TARGET == "cuda":
        tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.static_assert((TARGET == "hip") or (TARGET == "sim"), "TARGET must be 'cuda', 'hip' or 'sim'")


@triton.jit
def release_flag(remote, value, TARGET: tl.constexpr):
    """Write ``value`` into the flag at ``remote`` (any rank's), one flag of the group ``begin_release`` began.

    cuda: ``tl.atomic_xchg(sem="relaxed", scope="sys")``: the group's fence made it a release.
    hip:  ``tl.atomic_xchg(sem="release", scope="sys")``, which LLVM lowers on gfx942 to ``buffer_wbl2 sc0 sc1;
          s_waitcnt vmcnt(0)`` (write L2's dirty lines back where a peer reads them, and wait) before a
          system-coherent ``global_atomic_swap ... sc1``.
    sim:  the same release exchange."""
    if TARGET == "cuda":
        tl.atomic_xchg(remote, value, sem="relaxed", scope="sys")
    else:
        tl.static_assert((TARGET == "hip") or (TARGET == "sim"), "TARGET must be 'cuda', 'hip' or 'sim'")
        tl.atomic_xchg(remote, value, sem="release", scope="sys")


# ---- waiting


@triton.constexpr_function
def _s_sleep(ns):
    # s_sleep k idles the wave for about 64 * k clocks, k in 1..127 (an immediate): ~30 ns a unit at the
    # MI300X's 2.1 GHz shader clock
    return f"s_sleep {max(1, min(127, round(ns / 30)))}\n s_mov_b32 $0, 0"


@triton.jit
def sleep(NS: tl.constexpr, TARGET: tl.constexpr):
    """Suspend the calling threads for about ``NS`` nanoseconds, so a waiter polling a flag leaves its SM's
    issue slots to the programs beside it. No memory order.

    cuda: PTX ``nanosleep.u32``.
    hip:  AMDGCN ``s_sleep`` (64 clocks a unit, rounded: ~30 ns at 2.1 GHz, at most ~3.9 us).
    sim:  nothing (the interpreter runs programs one at a time)."""
    if TARGET == "cuda":
        tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, $1;", "=r,r", [tl.cast(NS, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    elif TARGET == "hip":
        tl.inline_asm_elementwise(_s_sleep(NS), "=s", [], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.static_assert(TARGET == "sim", "TARGET must be 'cuda', 'hip' or 'sim'")


# ---- diagnostics (FlashDecode's timeline)


@triton.jit
def global_timer(x, TARGET: tl.constexpr):
    """A clock in nanoseconds that every SM of the GPU shares (int64). ``x``: any int32 scalar.

    cuda: PTX ``%globaltimer``.
    hip:  AMDGCN ``s_memrealtime`` (a constant 100 MHz counter; times 10). Its wait is on lgkmcnt, the counter
          of scalar memory reads (Triton's own tl.extra.hip.memrealtime waits on vmcnt).
    sim:  0."""
    if TARGET == "cuda":
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False,
                                         pack=1)
    elif TARGET == "hip":
        ticks = tl.inline_asm_elementwise("s_memrealtime $0\n s_waitcnt lgkmcnt(0)", "=s", [], dtype=tl.int64,
                                          is_pure=False, pack=1)
        return ticks * 10
    else:
        tl.static_assert(TARGET == "sim", "TARGET must be 'cuda', 'hip' or 'sim'")
        return tl.zeros([], tl.int64)


@triton.jit
def sm_id(x, TARGET: tl.constexpr):
    """The number of the SM (NVIDIA) or compute unit (AMD) the calling program runs on (int32), unique on the
    GPU though not dense. ``x``: any int32 scalar.

    cuda: PTX ``%smid``.
    hip:  the XCD (``HW_REG_XCC_ID``) * 256 + bits 15:8 of ``HW_REG_HW_ID`` (CU_ID 11:8, SH_ID 12, SE_ID 15:13
          on CDNA3): ROCm's ``__smid`` reads CU and SE only, which repeat on each of the MI300X's 8 XCDs.
    sim:  0."""
    if TARGET == "cuda":
        return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)
    elif TARGET == "hip":
        xcd = tl.inline_asm_elementwise("s_getreg_b32 $0, hwreg(HW_REG_XCC_ID, 0, 4)", "=s", [], dtype=tl.int32,
                                        is_pure=False, pack=1)
        cu = tl.inline_asm_elementwise("s_getreg_b32 $0, hwreg(HW_REG_HW_ID, 8, 8)", "=s", [], dtype=tl.int32,
                                       is_pure=False, pack=1)
        return xcd * 256 + cu
    else:
        tl.static_assert(TARGET == "sim", "TARGET must be 'cuda', 'hip' or 'sim'")
        return tl.zeros([], tl.int32)
