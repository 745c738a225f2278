#!/usr/bin/env bash
# One call on a GPU machine: build, run the GPU tests at 2 GPUs and at all GPUs, run the HT and
# LL perf binaries for the issues' benchmarks and the moeloop plugin's GPU test (all GPUs as 2
# fake nodes), and print a short table. Every step has a time limit; full logs go to $OUT (or
# /tmp/nccl-moe-out).
# Usage: scripts/gpu_check.sh [build|tests|perf|sanitize|plugin|all] [extra gtest args...]
# (build: only that; sanitize: compute-sanitizer memcheck over the GPU suite at 2 ranks,
# SANITIZE_FILTER narrows it)
# NCCL: by default the Python environment's (torch's nvidia-nccl wheel, 2.28.9 on our machines);
# NCCL_HOME=<dir> uses another install instead (include/ with nccl_device.h, lib/libnccl.so.2),
# e.g. NCCL 2.30.7. The build goes to build-nccl<version>/ so both lines can sit side by side.
# GPUTEST_SIZES="2 4" picks the GPU counts of the tests (default 2 and all), GPUTEST_TIMEOUT (s);
# HT_DTYPES / HT_SMS narrow the HT perf cases (default "fp8 bf16" x "24 16 8").
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/nccl-moe-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
if [ -z "${NCCL_HOME:-}" ]; then
  NCCL_HOME=$(python3 -c "import nvidia.nccl;print(list(nvidia.nccl.__path__)[0])")
fi
[ -e "$NCCL_HOME/include/nccl_device.h" ] && [ -e "$NCCL_HOME/lib/libnccl.so.2" ] || {
  echo "gpu_check: $NCCL_HOME has no include/nccl_device.h or lib/libnccl.so.2" >&2; exit 1; }
# Wheels ship libnccl.so.2 only: give the linker a libnccl.so next to its headers.
NCCL_VER=$(sed -n 's/^#define NCCL_VERSION_CODE *\([0-9]*\).*/\1/p' "$NCCL_HOME/include/nccl.h")
SHIM=/tmp/nccl-shim-$NCCL_VER; mkdir -p $SHIM/lib
ln -sfn "$NCCL_HOME/include" $SHIM/include
ln -sf "$NCCL_HOME/lib/libnccl.so.2" $SHIM/lib/libnccl.so
ln -sf "$NCCL_HOME/lib/libnccl.so.2" $SHIM/lib/libnccl.so.2
export LD_LIBRARY_PATH=$SHIM/lib:${LD_LIBRARY_PATH:-}
B=build-nccl$NCCL_VER
MK=(NCCL_HOME=$SHIM BUILDDIR=$B)
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$OUT/gpus.txt"
echo "NCCL_VERSION_CODE $NCCL_VER ($NCCL_HOME), build folder $B"
OUT=$OUT/nccl$NCCL_VER; mkdir -p "$OUT"

SECONDS=0
make -j32 lib perf $B/test/gpu_tests plugin "${MK[@]}" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: ${SECONDS}s"
summary=()
if [ "$what" = perf ] || [ "$what" = all ]; then
  for d in ${HT_DTYPES:-fp8 bf16}; do
    for s in ${HT_SMS:-24 16 8}; do
      echo "=== ht_perf EP$NGPU -d $d -s $s (4096 tokens, H 7168, top-8, 256 experts)"
      timeout -k 5 90 $B/perf/ht_perf -g $NGPU -b 4096 -e 4096 -H 7168 -k 8 -E 256 -s $s -d $d \
        -n 20 -w 5 -c 1 > /tmp/perf_one.log 2>&1
      echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/perf.log"
      grep -E "^ *[0-9]|layout|dispatch|combine|rror" /tmp/perf_one.log | grep -v "^# *rank" | head -12
    done
  done
fi
if [ "$what" = perf ] || [ "$what" = all ]; then
  # LL: FP8 at 24 SMs and all SMs, BF16 at all SMs, GPU-only times (-G 1), then FP8 at all SMs
  # timed from the host call (-G 0). BASELINE_DIR (optional): another checkout, built the same
  # way, whose ll_perf runs the same cases right after ours (A/B on one machine).
  NSM=${ALL_SMS:-132}  # every SM of an H100 / H200 SXM
  for dir in . ${BASELINE_DIR:-}; do
    if [ "$dir" != . ]; then
      (cd "$dir" && make -j32 perf "${MK[@]}" > "$OUT/build_baseline.log" 2>&1) || { tail -20 "$OUT/build_baseline.log"; continue; }
    fi
    for case in "fp8 24 1" "fp8 $NSM 1" "bf16 $NSM 1" "fp8 $NSM 0"; do
      read -r dt sms hold <<< "$case"
      echo "=== ${dir/#./this tree} ll_perf EP$NGPU -d $dt -s $sms -G $hold (128 tokens, H 7168, top-8, 288 experts)"
      timeout -k 5 90 $dir/$B/perf/ll_perf -g $NGPU -b 128 -e 128 -H 7168 -k 8 -E 288 -d $dt -s $sms -G $hold \
        -n 100 -w 20 -c 1 > /tmp/perf_one.log 2>&1
      echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/perf.log"
      grep -vE "^# *(rank|Rank|$)" /tmp/perf_one.log | tail -14
    done
  done
  echo "=== ll_perf EP$NGPU -d fp8 -s $NSM, 1 to 256 tokens"
  timeout -k 5 90 $B/perf/ll_perf -g $NGPU -b 1 -e 256 -f 4 -H 7168 -k 8 -E 288 -d fp8 -s $NSM \
    -n 50 -w 10 -c 1 > /tmp/perf_one.log 2>&1
  echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/perf.log"
  grep -A7 -E "^# (dispatch|combine) one-shot" /tmp/perf_one.log
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  for n in ${GPUTEST_SIZES:-$(printf '%s\n' 2 "$NGPU" | sort -un)}; do
    SECONDS=0
    timeout -k 5 ${GPUTEST_TIMEOUT:-240} $B/test/gpu_tests --ngpus=$n "$@" > "$OUT/gputest_$n.log" 2>&1
    rc=$?
    summary+=("gputest NGPUS=$n rc=$rc (${SECONDS}s): $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/gputest_$n.log" | head -2 | tr '\n' ' ')")
    grep -E "Failure|FAILED|rank [0-9]+:|mismatch" "$OUT/gputest_$n.log" | head -30
  done
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  # memcheck over the GPU suite at 2 ranks (every forked rank: --target-processes all). NCCL's
  # init probes kernels that do not exist for sm_90, so API errors are not reported. Tests that
  # wait for a timeout or soak are left out by default (memcheck slows kernels ~10-100x).
  SECONDS=0
  timeout -k 5 ${SANITIZE_TIMEOUT:-420} compute-sanitizer --tool memcheck --report-api-errors no \
    --target-processes all --error-exitcode 97 \
    $B/test/gpu_tests --ngpus=2 --gtest_filter="${SANITIZE_FILTER:--*Timeout*:*Soak*:*Fault*}" \
    > "$OUT/sanitize_2.log" 2>&1
  rc=$?
  summary+=("memcheck gputest NGPUS=2 rc=$rc (${SECONDS}s): $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_2.log" | sort | uniq -c | tr '\n' ' ') $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/sanitize_2.log" | head -2 | tr '\n' ' ')")
  grep -E "Invalid|ERROR SUMMARY: [1-9]|FAILED" "$OUT/sanitize_2.log" | head -20
fi
if [ "$what" = plugin ] || [ "$what" = all ]; then
  SECONDS=0
  timeout -k 5 ${PLUGIN_TIMEOUT:-240} make plugintest PLUGIN_NGPUS=$NGPU "${MK[@]}" > "$OUT/plugintest.log" 2>&1
  rc=$?
  grep -E "^(==|PASSED|FAILED|SKIPPED|NOTE|ALL|SOME|   )" "$OUT/plugintest.log" | tail -14
  summary+=("plugintest PLUGIN_NGPUS=$NGPU rc=$rc (${SECONDS}s)")
fi
printf '%s\n' "${summary[@]}"
