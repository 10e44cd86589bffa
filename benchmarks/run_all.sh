#!/usr/bin/env bash
# Every benchmark of the 2-GPU machine in one call: the compiled Llama layer, fused GEMMs, Flash Decode,
# RMA microbenchmarks.
#   bash benchmarks/run_all.sh OUTDIR [gemm-args...]
#   ONLY="gemm decode" bash benchmarks/run_all.sh OUTDIR     # some of them
# NVLink multicast stays off (the machine's policy); each script has its own time limit so one hang
# cannot take the others' time.
set -u
out=${1:-benchmarks/results}; shift || true
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
run() { local name=$1 limit=$2; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "=== $name"; timeout "$limit" python3 -m torch.distributed.run --nproc_per_node=2 "$@" > "$out/$name.log" 2>&1
  echo "exit $?"; grep -v "^\[rank\|Warning\|warn" "$out/$name.log" | tail -n "${TAIL:-40}"; }
run block "${BLOCK_LIMIT:-280}" benchmarks/block_bench.py --time-budget-s 220 --json "$out/block_h200x2.json"
run gemm "${GEMM_LIMIT:-300}" benchmarks/gemm_bench.py --json "$out/gemm_h200x2.json" "$@"
run decode "${DECODE_LIMIT:-270}" benchmarks/decode_bench.py --time-budget-s 170 --json "$out/decode_h200x2.json" \
  --plot "$out/decode_h200x2.png"
run rma 90 benchmarks/rma_bench.py --json "$out/rma_h200x2.json"
