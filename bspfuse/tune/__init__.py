"""Measured autotuning: the tile, the communication granularity and the schedule of a fused GEMM, chosen by
timing the real kernels, and a table of the results that planning and the passes read.

    problem = Problem("matmul_rs", M=8192, N=4096, K=14336 // 4, world=4)
    entry = Tuner(timer, "H100").tune(problem)       # the pruned space measured; fastest kept
    table = TunedTable.load()                        # the user's cache, then the tables shipped for H100/H200
    table.put(entry); table.save()
    table.get("H100", problem)                       # -> the Entry (its config, schedule, times), or None

One space for everything that decides a fused GEMM's speed: the tile (BM, BN, BK, warps, stages, GROUP_M),
the comm programs (how many SMs move data; world >= 2) and the schedule (push, pull, direct, copy_engine, and
the unfused program: NCCL + cuBLAS, or at world 1 cuBLAS alone). The cost model (`estimate`) ranks the
space and only the best `keep` candidates are measured, so a shape tunes in seconds. Auto never keeps a fused
schedule that measured slower than the unfused program on the same machine (`Entry.choice`).

Entries are keyed by (GPU model, world size, op, dtype, M bucket, N, K, B layout); M buckets are powers of two,
so a tuned table serves every length up to its bucket. Each entry carries a fingerprint of the kernel it
timed (the generated source of its config): an entry whose kernel has changed since, or that is not valid
JSON of this form, is ignored with one warning and never used.

A Flash Decode step tunes the same way (`DecodeProblem`, keyed by heads, head dim, batch and KV-length bucket):
its candidates are the stages (bspfuse.tile_decode; stage 0 the unfused program) with split counts and
pipeline depths around the heuristic's, all measured; the pass takes the measured stage, FlashDecode the
measured knobs.
"""

from bspfuse.tune.search import (KINDS, UNFUSED, Candidate, DecodeConfig, DecodeProblem, Problem, Tuner, decode_space,
                                 estimate, m_bucket, prune, schedules, space)
from bspfuse.tune.table import Entry, TunedTable, cache_path, kernel_fingerprint, lookup, shipped_tables, table

__all__ = ["KINDS", "UNFUSED", "Candidate", "DecodeConfig", "DecodeProblem", "Entry", "Problem", "TunedTable", "Tuner",
           "cache_path", "decode_space", "estimate", "kernel_fingerprint", "lookup", "m_bucket", "prune", "schedules",
           "shipped_tables", "space", "table"]
