#!/usr/bin/env bash
# The one-GPU benchmarks in one call: Flash Decode steps (decode_steps, decode_core_bench at 4K and 64K) and a
# shard of the GEMM core suite, tuned, that ends within BUDGET_S seconds of its start.
#   bash benchmarks/run_one_gpu.sh OUTDIR [SHARD I/N] [BUDGET_S]
#   ONLY="suite" bash benchmarks/run_one_gpu.sh OUTDIR 1/4 400      # some of them
# Each script has its own time limit, so one hang cannot take the others' time.
set -u
out=${1:?usage: run_one_gpu.sh OUTDIR [SHARD I/N] [BUDGET_S]}; shard=${2:-0/1}; budget=${3:-0}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
run() { local name=$1 limit=$2; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "=== $name"; timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "exit $?"; grep -v "UserWarning\|entries\[p\]\|^.\[tune\]" "$out/$name.log" | tail -n "${TAIL:-40}"; }
run steps 150 python3 benchmarks/decode_steps.py . "$out/decode_steps.json"
run decode 150 python3 -m torch.distributed.run --nproc_per_node=1 benchmarks/decode_core_bench.py \
  --heads 32/8/128,64/8/128 --lengths 4096 65536 --json "$out/decode_core.json"
tag=${shard/\//of}
run suite $(( budget > 0 ? budget + 120 : 36000 )) python3 benchmarks/core_suite.py --shard "$shard" \
  --budget-s "$budget" --json "$out/core_suite_$tag.json" --table "$out/tuned_$tag.json"
