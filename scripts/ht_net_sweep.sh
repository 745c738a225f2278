#!/usr/bin/env bash
# ht_perf across 2 fake nodes (issue 13 item 6; README: Bandwidth definitions): 4096 tokens per
# rank, H 7168, top-8, 256 experts, for the plugin shaped as a ConnectX-7 (NCCL_MOELOOP_GBPS=50
# NCCL_MOELOOP_LATENCY_US=3) and unshaped x random and group routing x BF16 and FP8 x 12, 8, 4
# and 24 SMs, the target cases (CX-7, <= 12 SMs) first. One --output CSV per run; one line per
# run with the dispatch and combine times (us) and rdmabw (GB/s, the busiest NIC's bytes sent /
# its time; the target is >= 45 with CX-7 at <= 12 SMs), the full tables in htperf_net.log.
# Builds first through scripts/gpu_check.sh build (same NCCL, build folder and $OUT).
# Usage: scripts/ht_net_sweep.sh
# Environment: SWEEP_RANKS (default 2: 2 nodes x 1 GPU; 4: 2 x 2), GROUP_NODES (--group-nodes,
# default 1: on 2 nodes, 2 would draw from both, i.e. random), SWEEP_BUDGET (s, default 270:
# runs left once it is spent are listed as skipped), OUT and NCCL_HOME as for gpu_check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nccl-moe-out}
mkdir -p "$OUT"
scripts/gpu_check.sh build > "$OUT/ht_net_sweep_build.log" 2>&1 ||
  { tail -20 "$OUT/ht_net_sweep_build.log"; exit 1; }
# gpu_check.sh says "NCCL_VERSION_CODE <ver> (<dir>), build folder <B>" and links NCCL in its shim.
read -r VER B < <(sed -n 's/^NCCL_VERSION_CODE \([0-9]*\) .*build folder \(.*\)$/\1 \2/p' \
  "$OUT/ht_net_sweep_build.log")
[ -x "${B:-}/perf/ht_perf" ] || { echo "ht_net_sweep: no ht_perf after the build" >&2; exit 1; }
OUT=$OUT/nccl$VER/htnet; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/$B/lib:/tmp/nccl-shim-$VER/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=2
R=${SWEEP_RANKS:-2}
SECONDS=0
echo "ht_perf, 2 fake nodes x $((R / 2)) GPUs ($B): case, rc, dispatch / combine time and rdmabw, #wrong"
for shaping in cx7 none; do
  for routing in random group; do
    for d in bf16 fp8; do
      for s in 12 8 4 24; do
        name=2x$((R / 2))_${shaping}_${routing}_${d}_s$s
        if [ $SECONDS -ge "${SWEEP_BUDGET:-270}" ]; then echo "$name skipped (budget spent)"; continue; fi
        shape=(); [ $shaping = cx7 ] && shape=(NCCL_MOELOOP_GBPS=50 NCCL_MOELOOP_LATENCY_US=3)
        env ${shape[@]+"${shape[@]}"} timeout -k 5 60 $B/perf/ht_perf --ranks $R -b 4096 -e 4096 -H 7168 -k 8 \
          -E 256 -s $s -d $d --routing $routing --group-nodes "${GROUP_NODES:-1}" -n 10 -w 3 -c 1 \
          --output "$OUT/$name.csv" > "$OUT/one.log" 2>&1
        rc=$?
        { echo "=== $name rc=$rc"; cat "$OUT/one.log"; } >> "$OUT/htperf_net.log"
        # Table columns across nodes: tokens op time p99 algbw busbw rdmabw nvlbw #wrong.
        awk -v n="$name" -v rc=$rc '
          $2 == "dispatch" || $2 == "combine" { s = s sprintf(" | %s %.0f us, rdma %s GB/s", $2, $3, $7); w += $9 }
          END { printf "%-24s rc=%d%s | #wrong %d\n", n, rc, s, w }' "$OUT/one.log"
        [ $rc -ne 0 ] && grep -iE "error|failed" "$OUT/one.log" | head -3
      done
    done
  done
done
rm -f "$OUT/one.log"
echo "ht_net_sweep: ${SECONDS}s; CSVs and htperf_net.log in $OUT"
