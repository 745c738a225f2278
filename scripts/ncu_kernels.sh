#!/usr/bin/env bash
# Nsight Compute on the kernels whose bounds the perf tables leave open, on all local GPUs:
# the LL send kernels (128 tokens, H 7168, top-8, 288 experts, FP8, all SMs) and the HT combine
# (4096 tokens, 24 SMs). Kernel replay: a replayed send re-adds its signals, so the runs use
# -c 0 (no check) and their times are ignored; only the profiled launch's counters matter.
# Expects the build of scripts/gpu_check.sh (run it first in the same call): its newest
# build-nccl<version>/ folder, or BUILD_DIR=<folder>. Output: $OUT/ncu_*.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nccl-moe-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 LD_LIBRARY_PATH=/tmp/nccl-shim/lib:${LD_LIBRARY_PATH:-}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -x "$NCU" ] || { echo "ncu not found"; exit 1; }
NGPU=$(nvidia-smi -L | wc -l)
B=${BUILD_DIR:-$(ls -td build-nccl*/ 2> /dev/null | head -1)}; B=${B%/}; B=${B:-build}
[ -x "$B/perf/ll_perf" ] || { echo "no $B/perf/ll_perf: run scripts/gpu_check.sh build first"; exit 1; }
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats"
KEEP='Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Stall|Warp Cycles Per Issued|Max Bandwidth|Mem Busy|NVLink|==PROF==|Kernel|void'
profile() {  # name, kernel regex, command...
  local name=$1 regex=$2; shift 2
  timeout -k 5 240 "$NCU" --target-processes all --clock-control none --kernel-name "regex:$regex" \
    --launch-skip 4 --launch-count 1 $SECTIONS "$@" > "$OUT/ncu_$name.txt" 2>&1
  echo "=== ncu $name rc=$?"
  grep -E "$KEEP" "$OUT/ncu_$name.txt" | grep -vE "^==PROF== (Connected|Disconnected)" | head -60
}
LL="--ranks $NGPU -b 128 -e 128 -H 7168 -k 8 -E 288 -d fp8 -s 132 -n 6 -w 2 -c 0"
profile ll_combine_send llCombineSendKernel $B/perf/ll_perf $LL
profile ll_dispatch_send llDispatchSendKernel $B/perf/ll_perf $LL
profile ht_combine combineHtIntranodeKernel $B/perf/ht_perf --ranks $NGPU -b 4096 -e 4096 -H 7168 \
  -k 8 -E 256 -s 24 -d bf16 -n 6 -w 2 -c 0
