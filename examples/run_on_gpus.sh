#!/usr/bin/env bash
# Every example through `bspfuse run --backend cuda` on 2 GPUs of one host, checked against the float64
# reference: at the examples' own sizes (the cost model decides: push or direct), forced to fuse with push,
# kept bulk-synchronous (--mode off: the collectives run through the RMA fallback), at sizes where fusing
# pays, with rows that are not 16-byte aligned (the passes decline and say why), and started by torchrun.
# Success: every run ends in PASS and the summary says "all N runs passed".
# Run from the repository root: bash examples/run_on_gpus.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bspfuse() { python3 -m bspfuse.cli "$@"; }
runs=0 failed=()

check() {  # check NAME COMMAND...: run it, show its report, count it as passed when it ends in PASS
    local name=$1; shift
    echo "=== $name: $*"
    local log; log=$("$@" 2>&1); local rc=$?
    echo "$log"
    runs=$((runs + 1))
    [[ $rc == 0 && $(tail -n 1 <<<"$log") == PASS ]] || failed+=("$name (exit $rc)")
}

for example in sp_mlp swiglu_mlp row_parallel_allreduce attn_out_reduce_scatter flash_decode; do
    check "$example" bspfuse run "examples/$example.bsp" --world 2 --backend cuda
done
for example in sp_mlp swiglu_mlp row_parallel_allreduce attn_out_reduce_scatter; do
    check "$example push" bspfuse run "examples/$example.bsp" --world 2 --backend cuda --mode push
done
check "sp_mlp copy_engine" bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --mode copy_engine
# the SwiGLU epilogue (both weights' tiles per program) with the copy engine moving the rows, at a size that fuses
check "swiglu_mlp copy_engine large" bspfuse run examples/swiglu_mlp.bsp --world 2 --backend cuda --mode copy_engine \
    --size T=4096 --size H=4096 --size F=8192
check "sp_mlp off" bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --mode off
check "row_parallel_allreduce off" bspfuse run examples/row_parallel_allreduce.bsp --world 2 --backend cuda --mode off
check "sp_mlp large" bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --size T=4096 --size H=4096 --size F=8192
# the small-M tiles the cost model's shapes get: GEMM+AR at 128 rows (64x128), AG+GEMM at 1024 (64x256)
check "row_parallel_allreduce 128 rows" bspfuse run examples/row_parallel_allreduce.bsp --world 2 --backend cuda \
    --size M=128 --size K=8192 --size N=8192
check "sp_mlp 1024 rows" bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --size T=1024 --size H=8192 --size F=16384
check "row_parallel_allreduce large" bspfuse run examples/row_parallel_allreduce.bsp --world 2 --backend cuda \
    --mode push --size M=2048 --size K=8192 --size N=4096
check "attn_out_reduce_scatter large" bspfuse run examples/attn_out_reduce_scatter.bsp --world 2 --backend cuda --mode push \
    --size T=4096 --size NH=32 --size D=128 --size H=4096
check "flash_decode large" bspfuse run examples/flash_decode.bsp --world 2 --backend cuda \
    --size B=4 --size Hq=32 --size Hkv=8 --size S=65536 --size D=128
# direct at row counts that are not multiples of the tiles: the kernels' TMA stores must clip at each rank's rows
check "sp_mlp direct, ragged rows" bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --mode direct --size T=200
check "row_parallel_allreduce direct, ragged rows" bspfuse run examples/row_parallel_allreduce.bsp --world 2 \
    --backend cuda --mode direct --size M=200 --size N=136
check "sp_mlp unaligned rows" bspfuse run examples/sp_mlp.bsp --world 2 --backend cuda --mode push --size T=250 --size H=100
check "sp_mlp under torchrun" python3 -m torch.distributed.run --nproc_per_node 2 -m bspfuse.cli run examples/sp_mlp.bsp \
    --world 2 --backend cuda --mode push

echo "=== one GPU visible, two ranks asked for (should be a one-line error, exit 2):"
CUDA_VISIBLE_DEVICES=0 python3 -m bspfuse.cli run examples/sp_mlp.bsp --world 2 --backend cuda
echo "exit $?"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (of $runs runs)"
    exit 1
fi
echo "all $runs runs passed"
