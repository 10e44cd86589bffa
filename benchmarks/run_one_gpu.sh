#!/usr/bin/env bash
# The one-GPU benchmarks in one call, within TOTAL_S seconds of its start: Flash Decode steps (decode_steps,
# decode_core_bench at 4K and 64K), the decode steps tuned (bspfuse tune --decode), and a shard of the GEMM core
# suite, tuned, that takes the time left.
#   bash benchmarks/run_one_gpu.sh OUTDIR [SHARD I/N] [TOTAL_S]
#   ONLY="suite" bash benchmarks/run_one_gpu.sh OUTDIR 1/4 540      # some of them
# Each script has its own time limit, so one hang cannot take the others' time.
set -u
out=${1:?usage: run_one_gpu.sh OUTDIR [SHARD I/N] [TOTAL_S]}; shard=${2:-0/1}; total=${3:-36000}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $(( total - ($(date +%s) - start) )); }
run() { local name=$1 limit=$2; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
  (( limit > 10 )) || { echo "=== $name: no time left"; return 0; }
  echo "=== $name (limit $limit s)"; local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "exit $? in $(( $(date +%s) - t0 )) s"; grep -v "UserWarning\|entries\[p\]\|^.\[tune\]" "$out/$name.log" | tail -n "${TAIL:-40}"; }
run steps 150 python3 benchmarks/decode_steps.py . "$out/decode_steps.json"
run decode 150 python3 -m torch.distributed.run --nproc_per_node=1 benchmarks/decode_core_bench.py \
  --heads 32/8/128,64/8/128 --lengths 4096 65536 --json "$out/decode_core.json"
run tune 120 python3 -m bspfuse.cli tune --out "$out/tuned_decode.json" \
  --decode 1,32,8,128,4096 --decode 1,64,8,128,4096 --decode 1,32,8,128,65536 --decode 1,64,8,128,65536
tag=${shard/\//of}
# the suite's budget leaves time for the GEMM it is on when the budget ends
run suite 36000 python3 benchmarks/core_suite.py --shard "$shard" --budget-s $(( $(left) - 90 )) \
  --json "$out/core_suite_$tag.json" --table "$out/tuned_$tag.json"
