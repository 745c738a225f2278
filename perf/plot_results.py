#!/usr/bin/env python3
"""Draws the perf binaries' results (ht_perf / ll_perf --output FILE.csv|.json) as PNG files.

    python3 perf/plot_results.py [--outdir DIR] [--metric algbw|busbw|nvlink|rdma|time] FILE...

Every FILE holds rows in the --output format: the run's parameters (impl, card, ranks, hidden,
topk, experts, sms, dtype, ...) and the columns tokens, op, time_us, p99_us, algbw_gbps,
busbw_gbps, wrong (across nodes also rdma_gbps, nvlink_gbps). Peers' numbers (NCCL EP, DeepEP) are CSV rows in the same format with their
own `impl`; missing columns are allowed. For each operation it writes
    <metric>_vs_tokens_<op>.png  one line per series (impl, dtype, sms, shape, ranks, nodes,
                                 routing, NIC shaping, card)
    <metric>_vs_sms_<op>.png     one line per series (the same without sms, with tokens)
where a series has at least one point; peers (impl other than nccl-moe) are dashed. The legend names only what differs between the series
of a figure; the title names what they share. Where one series has several rows at the same x
(repeated runs), the last one is drawn. Needs matplotlib only.
"""
import argparse
import csv
import json
import os
import sys

METRICS = {"algbw": ("algbw_gbps", "algbw (GB/s)"),
           "busbw": ("busbw_gbps", "busbw (GB/s)"),
           "time": ("time_us", "time per call (µs)"),
           "rdma": ("rdma_gbps", "RDMA GB/s, busiest NIC (across nodes)"),
           "nvlink": ("nvlink_gbps", "NVLink GB/s of the internode path, busiest rank")}
# Parameters that tell series apart, in legend order.
SERIES_KEYS = ["impl", "dtype", "sms", "tokens", "hidden", "topk", "experts", "ranks", "nodes",
               "routing", "group_nodes", "moeloop_gbps", "card", "nccl", "timing"]


def read_rows(path):
    """Rows of one file as dicts of strings (JSON: the params merged into every row)."""
    if path.endswith(".json"):
        with open(path) as f:
            doc = json.load(f)
        params = {k: str(v) for k, v in doc.get("params", {}).items()}
        return [dict(params, **{k: "" if v is None else str(v) for k, v in row.items()})
                for row in doc.get("rows", [])]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def draw(rows, x_key, metric, outdir, plt):
    """One PNG per op: `metric` against `x_key`; returns the files written."""
    column, ylabel = METRICS[metric]
    keys = [k for k in SERIES_KEYS if k != x_key]
    written = []
    for op in sorted({r.get("op", "") for r in rows}):
        series = {}
        for r in rows:
            x, y = number(r.get(x_key)), number(r.get(column))
            if r.get("op") != op or x is None or y is None:
                continue
            series.setdefault(tuple(r.get(k, "") for k in keys), {})[x] = y
        if not series:
            continue
        varying = [i for i, k in enumerate(keys) if len({s[i] for s in series}) > 1]
        shared = [f"{k} {v}" for i, (k, v) in enumerate(zip(keys, next(iter(series))))
                  if i not in varying and v]
        fig, ax = plt.subplots(figsize=(11, 5.5))
        colors = plt.get_cmap("tab20").colors
        order = sorted(series, key=lambda k: [(0, number(v), "") if number(v) is not None
                                                  else (1, 0, v) for v in k])
        for n, key in enumerate(order):
            points = series[key]
            xs = sorted(points)
            label = ", ".join(f"{keys[i]} {key[i]}" for i in varying if key[i]) or key[0]
            ours = key[0] in ("", "nccl-moe")  # keys[0] is impl: peers are dashed
            ax.plot(xs, [points[x] for x in xs], marker="o" if ours else "s",
                    linestyle="-" if ours else "--", color=colors[n % len(colors)], label=label)
        if x_key == "tokens":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank" if x_key == "tokens" else "SMs (CTAs per kernel)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{op}: {ylabel} vs {x_key}\n" + ", ".join(shared), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        fig.tight_layout()
        path = os.path.join(outdir, f"{metric}_vs_{x_key}_{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="CSV / JSON files from --output, and peers' CSVs")
    ap.add_argument("--outdir", default=".", help="folder for the PNG files (default .)")
    ap.add_argument("--metric", choices=sorted(METRICS), default="algbw",
                    help="y axis (default algbw)")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for path in args.files for row in read_rows(path)]
    os.makedirs(args.outdir, exist_ok=True)
    written = draw(rows, "tokens", args.metric, args.outdir, plt)
    written += draw(rows, "sms", args.metric, args.outdir, plt)
    for path in written:
        print(path)
    if not written:
        print("plot_results: no rows with tokens / sms and " + METRICS[args.metric][0],
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
