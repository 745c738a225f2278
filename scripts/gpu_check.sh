#!/usr/bin/env bash
# One call on a GPU machine: build, run the GPU tests at 2 GPUs and at all GPUs, run the HT and
# LL perf binaries for the issues' benchmarks and the moeloop plugin's GPU test (all GPUs as 2
# fake nodes), and print a short table. Every step has a time limit; full logs go to $OUT (or
# /tmp/nccl-moe-out).
# Usage: scripts/gpu_check.sh [build|tests|perf|shapes|sanitize|plugin|net|htnet|python|all] [extra gtest args...]
# (build: only that; sanitize: compute-sanitizer memcheck over the GPU suite at 2 ranks (mpirun),
# SANITIZE_FILTER narrows it; shapes: HT and LL sweeps over token counts for the model shapes
# of DeepSeek-V3, Qwen3-235B-A22B and Mixtral-8x7B, not part of all; net: the internode tests
# across 2 fake nodes (make nettest, make llnettest), each under NET_TIMEOUT s, with every
# thread's state of a process still running at 80 % of it (a hang leaves its picture); htnet: the
# same for the high-throughput internode tests (make htnettest) under HTNET_TIMEOUT s; python:
# the package's GPU checks under torchrun, and megatron-core's MoE layer when MCORE_WHEEL names
# a megatron-core wheel (unpacked onto PYTHONPATH; MOE_PROFILE_DIR profiles it)). The perf binaries write
# their rows to $OUT/nccl<version>/*.csv (--output); with matplotlib, perf/plot_results.py
# draws them, next to the peers' rows in perf/results/, into $OUT/nccl<version>/plots/.
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
      timeout -k 5 90 $B/perf/ht_perf --ranks $NGPU -b 4096 -e 4096 -H 7168 -k 8 -E 256 -s $s \
        -d $d -n 20 -w 5 -c 1 --output "$OUT/ht_${d}_s$s.csv" > /tmp/perf_one.log 2>&1
      echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/perf.log"
      grep -E "^ +[0-9]|Out of bounds|Avg bus|rror" /tmp/perf_one.log | head -12
    done
  done
fi
if [ "$what" = perf ] || [ "$what" = all ]; then
  # LL: FP8 at 24 SMs and all SMs, BF16 at all SMs, GPU-only times (--hold-stream 1), then FP8
  # at all SMs timed from the host call (--hold-stream 0). BASELINE_DIR (optional): another
  # checkout, built the same way, whose ll_perf runs the same cases right after ours (A/B on one
  # machine); one from before the nccl-tests flags (no --hold-stream) gets its old flags.
  NSM=${ALL_SMS:-132}  # every SM of an H100 / H200 SXM
  for dir in . ${BASELINE_DIR:-}; do
    if [ "$dir" != . ]; then
      (cd "$dir" && make -j32 perf "${MK[@]}" > "$OUT/build_baseline.log" 2>&1) || { tail -20 "$OUT/build_baseline.log"; continue; }
    fi
    LL=$dir/$B/perf/ll_perf
    for case in "fp8 24 1" "fp8 $NSM 1" "bf16 $NSM 1" "fp8 $NSM 0"; do
      read -r dt sms hold <<< "$case"
      if "$LL" -h | grep -q -- --hold-stream; then
        flags=(--ranks $NGPU --hold-stream $hold)
        [ "$dir" = . ] && flags+=(--output "$OUT/ll_${dt}_s${sms}_hold$hold.csv")
      else
        flags=(-g $NGPU -G $hold)
      fi
      echo "=== ${dir/#./this tree} ll_perf EP$NGPU -d $dt -s $sms --hold-stream $hold (128 tokens, H 7168, top-8, 288 experts)"
      timeout -k 5 90 "$LL" "${flags[@]}" -b 128 -e 128 -H 7168 -k 8 -E 288 -d $dt -s $sms \
        -n 100 -w 20 -c 1 > /tmp/perf_one.log 2>&1
      echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/perf.log"
      grep -vE "^# *(rank|Rank|$)" /tmp/perf_one.log | tail -14
    done
  done
  echo "=== ll_perf EP$NGPU -d fp8 -s $NSM, 1 to 256 tokens"
  timeout -k 5 90 $B/perf/ll_perf --ranks $NGPU -b 1 -e 256 -f 4 -H 7168 -k 8 -E 288 -d fp8 -s $NSM \
    -n 50 -w 10 -c 1 --output "$OUT/ll_fp8_s${NSM}_sweep.csv" > /tmp/perf_one.log 2>&1
  echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/perf.log"
  grep -E "^ +[0-9]+ +(dispatch|combine) |Out of bounds|Avg bus" /tmp/perf_one.log
fi
if [ "$what" = shapes ]; then
  # Model shapes (name H E K): HT FP8 and BF16 at 24 SMs over 128..4096 tokens per rank, LL FP8
  # at all SMs over 1..256; one CSV per (shape, binary, dtype). A shape whose experts do not
  # split over the GPUs is skipped.
  NSM=${ALL_SMS:-132}
  for shape in "deepseek-v3 7168 256 8" "qwen3-235b-a22b 4096 128 8" "mixtral-8x7b 4096 8 2"; do
    read -r name H E K <<< "$shape"
    if [ $((E % NGPU)) -ne 0 ]; then echo "=== shapes $name: $E experts over $NGPU GPUs: skipped"; continue; fi
    for d in fp8 bf16; do
      echo "=== shapes $name ht_perf EP$NGPU -H $H -E $E -k $K -d $d -s 24"
      timeout -k 5 180 $B/perf/ht_perf --ranks $NGPU -b 128 -e 4096 -H $H -k $K -E $E -s 24 -d $d \
        -n 20 -w 5 -c 1 --output "$OUT/shapes_${name}_ht_$d.csv" > /tmp/perf_one.log 2>&1
      echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/shapes.log"
      grep -E "Out of bounds|Avg bus|rror" /tmp/perf_one.log
    done
    echo "=== shapes $name ll_perf EP$NGPU -H $H -E $E -k $K -d fp8 -s $NSM"
    timeout -k 5 180 $B/perf/ll_perf --ranks $NGPU -b 1 -e 256 -f 4 -H $H -k $K -E $E -s $NSM \
      -d fp8 -n 50 -w 10 -c 1 --output "$OUT/shapes_${name}_ll_fp8.csv" > /tmp/perf_one.log 2>&1
    echo "rc=$?"; cat /tmp/perf_one.log >> "$OUT/shapes.log"
    grep -E "Out of bounds|Avg bus|rror" /tmp/perf_one.log
  done
fi
if [ "$what" = perf ] || [ "$what" = shapes ] || [ "$what" = all ]; then
  if python3 -c "import matplotlib" 2> /dev/null; then
    (shopt -s nullglob
     ht=("$OUT"/ht_*.csv "$OUT"/shapes_*_ht_*.csv); ll=("$OUT"/ll_*.csv "$OUT"/shapes_*_ll_*.csv)
     [ ${#ht[@]} -gt 0 ] && python3 perf/plot_results.py --outdir "$OUT/plots/ht" "${ht[@]}" perf/results/*_ht_*.csv
     [ ${#ll[@]} -gt 0 ] && python3 perf/plot_results.py --outdir "$OUT/plots/ll" --metric time "${ll[@]}") \
      > "$OUT/plots.log" 2>&1
    echo "plots: $OUT/plots ($(grep -c png "$OUT/plots.log") PNG files)"
  else
    echo "plots: skipped (no matplotlib; python3 -m pip install matplotlib)"
  fi
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  for n in ${GPUTEST_SIZES:-$(printf '%s\n' 2 "$NGPU" | sort -un)}; do
    SECONDS=0
    timeout -k 5 ${GPUTEST_TIMEOUT:-240} $B/test/gpu_tests --ngpus=$n "$@" > "$OUT/gputest_$n.log" 2>&1
    rc=$?
    summary+=("gputest NGPUS=$n rc=$rc (${SECONDS}s): $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/gputest_$n.log" | head -2 | tr '\n' ' ')")
    grep -E "Failure|FAILED|rank [0-9]+:|mismatch" "$OUT/gputest_$n.log" | grep -v "^\[   INFO" | head -30
  done
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  # memcheck over the GPU suite at 2 ranks: the mpirun build, one compute-sanitizer per rank, so
  # each rank's kernels are checked and each prints its own ERROR SUMMARY (a forked rank would
  # leave without one). NCCL's init probes kernels that do not exist for sm_90, so API errors are
  # not reported. Tests that wait for a timeout, soak or kill a rank are left out by default
  # (memcheck slows kernels ~10-100x).
  SECONDS=0
  make -j32 MPI=1 BUILDDIR=$B-mpi $B-mpi/test/gpu_tests NCCL_HOME=$SHIM > "$OUT/build_mpi.log" 2>&1 ||
    { tail -20 "$OUT/build_mpi.log"; exit 1; }
  timeout -k 5 ${SANITIZE_TIMEOUT:-420} mpirun --allow-run-as-root -np 2 -x LD_LIBRARY_PATH \
    -x NCCL_NVLS_ENABLE compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 97 \
    $B-mpi/test/gpu_tests --gtest_filter="${SANITIZE_FILTER:--*Timeout*:*Soak*:*Fault*}" \
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
if [ "$what" = net ] || [ "$what" = htnet ]; then
  # One process tree per target; a watcher prints the threads (name, state, wchan, CPUs, gdb stack) of every
  # gpu_tests / net_gpu_test process left at 80 % of the limit, then the limit ends it.
  # net: nettest, llnettest (NET_TIMEOUT each); htnet: htnettest (HTNET_TIMEOUT, default 480 s).
  targets="nettest llnettest"; [ "$what" = htnet ] && targets=htnettest
  for target in $targets; do
    SECONDS=0
    limit=${NET_TIMEOUT:-150}
    [ "$target" = htnettest ] && limit=${HTNET_TIMEOUT:-480}
    ( sleep $((limit * 4 / 5))
      for pid in $(pgrep -f "(gpu_tests|net_gpu_test)"); do
        echo "--- still running at $((limit * 4 / 5)) s: pid $pid allowed CPUs $(grep Cpus_allowed_list /proc/$pid/status | cut -f2)"
        for t in /proc/$pid/task/*; do
          printf "%s|%s|%s\n" "$(cat $t/comm)" "$(awk '{print $3}' $t/stat)" "$(cat $t/wchan)"
        done | sort | uniq -c
        # Where each thread is, when gdb is there (frames of our code and NCCL's name the wait).
        command -v gdb > /dev/null && timeout 30 gdb -p $pid -batch -ex "thread apply all bt 14" 2> /dev/null |
          grep -E "^(Thread|#)" | cut -c1-200 | head -120
      done ) > "$OUT/${target}_threads.log" 2>&1 &
    watcher=$!
    # Line-buffered (stdbuf reaches the test processes): a process the limit kills keeps its
    # output; block-buffered gtest output to a file is lost with it.
    timeout -k 5 $limit stdbuf -oL -eL make $target "${MK[@]}" > "$OUT/$target.log" 2>&1
    rc=$?
    kill $watcher 2> /dev/null; wait $watcher 2> /dev/null
    summary+=("$target rc=$rc (${SECONDS}s): $(grep -cE '^\[       OK' "$OUT/$target.log") OK, $(grep -cE '^\[  FAILED  \]' "$OUT/$target.log") FAILED lines")
    grep -E "Failure|FAILED|rank [0-9]+:|PASSED|ALL" "$OUT/$target.log" | head -20
    [ -s "$OUT/${target}_threads.log" ] && head -40 "$OUT/${target}_threads.log"
  done
fi
if [ "$what" = python ]; then
  SECONDS=0
  NCCL_MOE_LIBRARY=$PWD/$B/lib/libnccl_moe.so timeout -k 5 240 torchrun --nproc_per_node=2 \
    python/tests/gpu/ep_check.py > "$OUT/ep_check.log" 2>&1
  summary+=("python ep_check rc=$? (${SECONDS}s): $(grep -c '^PASS' "$OUT/ep_check.log") PASS, $(grep -c '^FAIL' "$OUT/ep_check.log") FAIL")
  if [ -n "${MCORE_WHEEL:-}" ]; then
    SECONDS=0
    rm -rf /tmp/mcore_site && mkdir -p /tmp/mcore_site && (cd /tmp/mcore_site && python3 -m zipfile -e "$MCORE_WHEEL" .)
    PYTHONPATH=/tmp/mcore_site NCCL_MOE_LIBRARY=$PWD/$B/lib/libnccl_moe.so timeout -k 5 300 \
      torchrun --nproc_per_node=2 python/tests/gpu/megatron_layer_check.py > "$OUT/megatron.log" 2>&1
    summary+=("megatron layer rc=$? (${SECONDS}s): $(grep -E '^TIME|ALL PASSED' "$OUT/megatron.log" | tr '\n' ' ')")
    grep -E "^FAIL" "$OUT/megatron.log" | head
  fi
fi
printf '%s\n' "${summary[@]}"
