#!/usr/bin/env bash
# One call on a GPU machine: build against the Python environment's NCCL (2.28.9), run the GPU
# tests at 2 and at all GPUs, run the HT perf sweep, print a short table. Logs go to $OUT if set.
# Usage: scripts/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nccl-moe-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
PYNCCL=$(python3 -c "import nvidia.nccl;print(list(nvidia.nccl.__path__)[0])")
# The wheel ships libnccl.so.2 only: give the linker a libnccl.so next to its headers.
SHIM=/tmp/nccl-shim; mkdir -p $SHIM/lib
ln -sfn "$PYNCCL/include" $SHIM/include
ln -sf "$PYNCCL/lib/libnccl.so.2" $SHIM/lib/libnccl.so
ln -sf "$PYNCCL/lib/libnccl.so.2" $SHIM/lib/libnccl.so.2
export LD_LIBRARY_PATH=$SHIM/lib:${LD_LIBRARY_PATH:-}
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$OUT/gpus.txt"
grep -m1 NCCL_VERSION_CODE $SHIM/include/nccl.h

time make -j16 all NCCL_HOME=$SHIM > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
make test NCCL_HOME=$SHIM > "$OUT/unit.log" 2>&1; echo "unit tests rc=$?"; tail -3 "$OUT/unit.log"

for n in 2 $NGPU; do
  timeout 300 make gputest NGPUS=$n NCCL_HOME=$SHIM > "$OUT/gputest_$n.log" 2>&1
  echo "gputest NGPUS=$n rc=$?"; grep -E "PASSED|FAILED|SKIPPED|tests ran" "$OUT/gputest_$n.log" | tail -5
done
[ "${1:-}" = quick ] && exit 0

P=build/perf/ht_perf
for d in fp8 bf16; do
  for s in 8 16 24; do
    echo "=== ht_perf -d $d -s $s (EP$NGPU, 4096 tokens, H 7168, top-8, 256 experts)"
    timeout 120 $P -g $NGPU -b 4096 -e 4096 -H 7168 -k 8 -E 256 -s $s -d $d -n 20 -w 5 -c 1 2>&1 | tee -a "$OUT/perf.log" | grep -vE "^#\s*$" | tail -14
  done
done
