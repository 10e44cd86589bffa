"""Every device function, the check kernels and the benchmark kernels compile for sm_90 on the CPU.

The PTX must show what the docstrings promise: atomics are ``atom`` with the requested
order and scope (``sys`` by default), flags are released and acquired at ``sys`` scope,
and translated pointers with a ``hint`` still give 16-byte vector accesses.
"""
import importlib.util
import re
from pathlib import Path

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from bspfuse.runtime import checks, iris

SM90 = GPUTarget("cuda", 90, 32)
REPO = Path(__file__).resolve().parents[2]


def ptx_of(kernel, signature: dict, constexprs: dict | None = None) -> str:
    assert isinstance(kernel, triton.runtime.JITFunction), "run without TRITON_INTERPRET"
    constexprs = constexprs or {}
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=SM90).asm["ptx"]


def atoms(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if "atom." in line]


RANKS = {"bases": "*i64", "rank": "i32", "peer": "i32"}


@triton.jit
def k_translate(x, bases, rank, peer):
    tl.store(iris.translate(x, rank, peer, bases), 1.0)


@triton.jit
def k_load(x, out, bases, rank, peer, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out + offs, iris.load(x + offs, rank, peer, bases, mask=offs < N - 3, other=0.0))
    tl.store(out, iris.load(x, rank, peer, bases))  # scalar


@triton.jit
def k_store(x, out, bases, rank, peer, N: tl.constexpr):
    offs = tl.arange(0, N)
    iris.store(out + offs, tl.load(x + offs), rank, peer, bases, mask=offs < N - 3)
    iris.store(out, 2.0, rank, peer, bases)


@triton.jit
def k_get_put_copy(x, out, bases, rank, peer, N: tl.constexpr):
    offs = tl.arange(0, N)
    iris.get(x + offs, out + offs, rank, peer, bases, hint=16)
    iris.put(x + offs, out + offs, rank, peer, bases, hint=16)
    iris.copy(x + offs, out + offs, peer, rank, rank, bases, hint=16)
    iris.copy(x + offs, out + offs, rank, peer, rank, bases, mask=offs < N - 1)


@triton.jit
def k_atomics_default(x, f, bases, rank, peer, N: tl.constexpr):
    offs = tl.arange(0, N)
    m = offs < N - 1
    iris.atomic_add(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_sub(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_xchg(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_and(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_or(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_xor(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_min(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_max(x + offs, 1, rank, peer, bases, mask=m)
    iris.atomic_cas(x, 0, 1, rank, peer, bases)
    iris.atomic_add(f + offs, 0.5, rank, peer, bases, mask=m)


@triton.jit
def k_atomic_sem_scope(x, bases, rank, peer, SEM: tl.constexpr, SCOPE: tl.constexpr):
    iris.atomic_add(x, 1, rank, peer, bases, sem=SEM, scope=SCOPE)
    iris.atomic_cas(x, 0, 1, rank, peer, bases, sem=SEM, scope=SCOPE)


@triton.jit
def k_flags(flag, err, bases, rank, peer, epoch, MAX_SPINS: tl.constexpr):
    iris.signal(flag, epoch, rank, peer, bases)
    seen = iris.wait_until(flag, epoch, rank, err, MAX_SPINS)
    tl.store(flag + 1, seen)


@triton.jit
def k_flags_release_mode(flag, bases, rank, peer, epoch):
    iris.signal(flag, epoch, rank, peer, bases)
    iris.wait_until(flag, epoch, rank, None, 0)  # no error buffer needed


def test_translate_load_store_get_put_copy():
    ptx_of(k_translate, {"x": "*fp32", **RANKS})
    for kernel in (k_load, k_store, k_get_put_copy):
        ptx = ptx_of(kernel, {"x": "*fp32", "out": "*fp32", **RANKS}, {"N": 256})
        assert "ld.global" in ptx and "st.global" in ptx
    # with a hint, translated pointers keep 16-byte vector loads and stores
    ptx = ptx_of(k_get_put_copy, {"x": "*bf16", "out": "*bf16", **RANKS}, {"N": 1024})
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx


def test_atomics_default_to_acq_rel_at_sys_scope():
    ptx = ptx_of(k_atomics_default, {"x": "*i32", "f": "*fp32", **RANKS}, {"N": 128})
    ops = " ".join(atoms(ptx))
    for op in ["add.u32", "exch.b32", "and.b32", "or.b32", "xor.b32", "min.s32", "max.s32",
               "cas.b32", "add.f32"]:
        assert re.search(rf"atom\.global\.(sys\.acq_rel|acq_rel\.sys)\.{re.escape(op)}", ops), op
    assert all(".sys" in line for line in atoms(ptx))


@pytest.mark.parametrize("sem,scope", [("relaxed", "gpu"), ("acquire", "sys"),
                                       ("release", "cta"), ("acq_rel", "gpu")])
def test_atomics_take_sem_and_scope(sem, scope):
    ptx = ptx_of(k_atomic_sem_scope, {"x": "*i64", **RANKS}, {"SEM": sem, "SCOPE": scope})
    lines = atoms(ptx)
    assert len(lines) == 2
    assert all(f".{sem}" in line and f".{scope}" in line for line in lines), lines


def test_signal_releases_and_wait_acquires_at_sys_scope():
    for spins in (0, 1000):
        ptx = ptx_of(k_flags, {"flag": "*i32", "err": "*i64", **RANKS, "epoch": "i32"},
                     {"MAX_SPINS": spins})
        assert re.search(r"atom\.global\.sys\.release\.exch", ptx)
        assert re.search(r"(ld|atom)\.global\.sys\.acquire", ptx)  # the spin reads
        assert "bar.sync" in ptx  # the CTA barrier that orders the signalled data
    ptx_of(k_flags_release_mode, {"flag": "*i32", **RANKS, "epoch": "i32"})


def test_check_kernels_compile():
    ptx_of(checks._p2p_kernel, {n: "*fp32" for n in ["src", "got_load", "got_get", "got_copy",
                                                      "inbox_store", "inbox_put", "inbox_copy",
                                                      "got_scalar", "inbox_scalar"]}
           | {"heap_bases": "*i64", "rank": "i32", "N": "i32"}, {"BLOCK": 128})
    ptx = ptx_of(checks._atomics_kernel,
                 {"cnt": "*i32", "ret": "*i32", "blk": "*i32", "f32": "*fp32", "f16": "*fp16",
                  "bf16": "*bf16", "i64": "*i64", "heap_bases": "*i64", "rank": "i32"},
                 {"BLOCK": 64, "NBLK": 16})
    assert "add.noftz.f16" in ptx and "add.noftz.bf16" in ptx
    ptx_of(checks._message_kernel, {"inbox": "*i32", "data_flag": "*i32", "ack_flag": "*i32",
                                    "bad": "*i32", "err": "*i64", "heap_bases": "*i64",
                                    "rank": "i32", "peer": "i32", "is_producer": "i32",
                                    "base": "i32", "rounds": "i32"},
           {"N": 16, "MAX_SPINS": 1000})


def test_benchmark_kernels_compile_with_16_byte_remote_accesses():
    spec = importlib.util.spec_from_file_location("rma_bench", REPO / "benchmarks" / "rma_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sig = {"src": "*i32", "dst": "*i32", "heap_bases": "*i64", "rank": "i32", "peer": "i32",
           "n_elems": "i32"}
    read = ptx_of(bench.remote_read_kernel, sig, {"BLOCK": bench.BLOCK})
    assert "ld.global.v4.b32" in read
    write = ptx_of(bench.remote_write_kernel, sig, {"BLOCK": bench.BLOCK})
    assert "st.global.v4.b32" in write
    pp = ptx_of(bench.ping_pong_kernel, {"flag": "*i32", "heap_bases": "*i64", "rank": "i32",
                                         "peer": "i32", "base": "i32", "rounds": "i32",
                                         "err": "*i64"}, {"MAX_SPINS": 1000})
    assert re.search(r"atom\.global\.sys\.release\.exch", pp)
