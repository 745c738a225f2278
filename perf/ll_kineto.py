"""LL kernel GPU time by the torch profiler (CUPTI through kineto), the method DeepEP's
tests/test_low_latency.py and NCCL EP's ep_bench ("kernel=") report: per call, the summed
duration of the library's kernels of that call, with no event, launch or host gap inside.
ll_perf times each call with a CUDA event pair instead (launch and the gap from the previous
kernel included, about 3-5 us more at 1 token); run both.

  torchrun --nproc_per_node=2 perf/ll_kineto.py [--tokens 1,128] [--dtypes fp8,bf16]
      [--hidden 7168] [--experts 288] [--topk 8] [--max-tokens 128] [--sms 132] [--iters 200]
      [--align each|once] [--period 30] [--graph N] [--mm-size N] [--flush-mb N]

Per (tokens, dtype) rank 0 prints, for dispatch and combine, the slowest rank's value of: the
median and mean over the timed calls of the kernel time; the median span (first kernel start to
last kernel end of the call, which adds the gap between a two-kernel call's kernels); the median
time from the last rank's start of the call to this rank's end (the span without the wait for a
late peer; host clock, which the ranks of one host share); the median skew of the ranks' starts;
the median host time to enqueue one dispatch + combine step (the same on both rows: where it
exceeds the step's GPU time, back-to-back calls start when the host launches them).
An alignment is a matrix product (--mm-size; it keeps the GPU busy while the host enqueues) and
an all-reduce (the ranks then start together), optionally followed by zeroing --flush-mb MB
(evicts the L2 cache). --align each (default): one alignment before every dispatch + combine
step, so every call starts cold and aligned (the strictest). --align once: DeepEP's bench_kineto
(barrier_comm_profiling): one alignment, then --period steps back to back, the host enqueueing
while the GPU runs. NCCL EP's ep_bench synchronises the stream and takes an MPI barrier between
calls (no product: a late peer's launch is inside its kernel time). Routing is uniform top-k with
10 entries per rank set to -1 as DeepEP's test does (none at 1 token). With --graph N, N steps
are captured in one CUDA graph and the graph is replayed after each alignment, as a decode engine
runs them: calls 2..N of a replay follow each other with no host in between (steady state).
Needs the nccl_moe package (python/) and a GPU per rank.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from nccl_moe.torch import Buffer  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--tokens", type=ints, default=[1, 128], help="tokens per rank, comma list")
    p.add_argument("--dtypes", default="fp8,bf16", help="dispatch dtypes, comma list")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128, help="max tokens per rank (M)")
    p.add_argument("--sms", type=int, default=None, help="LL SMs (default: the library's)")
    p.add_argument("--iters", type=int, default=200, help="timed iterations")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--mm-size", type=int, default=8192,
                   help="N: the N x N BF16 matrix product of each alignment (0: none, all-reduce only)")
    p.add_argument("--flush-mb", type=int, default=0,
                   help="MB zeroed after the product of each alignment (evicts L2; 0: none)")
    p.add_argument("--align", choices=("each", "once"), default="each",
                   help="each: align before every step; once: align, then --period steps back to back")
    p.add_argument("--period", type=int, default=30, help="steps per alignment with --align once")
    p.add_argument("--graph", type=int, default=0,
                   help="N > 0: time N dispatch + combine steps captured in a CUDA graph")
    a = p.parse_args()
    bad = [t for t in a.tokens if not 1 <= t <= a.max_tokens]
    if bad:
        p.error(f"--tokens {bad} outside 1..--max-tokens {a.max_tokens}")
    if a.mm_size < 0 or a.graph < 0 or a.iters < 1 or a.warmup < 0 or a.flush_mb < 0 or a.period < 1:
        p.error("--mm-size, --graph, --warmup, --flush-mb must be >= 0, --iters and --period >= 1")
    if a.graph and a.align == "once":
        p.error("--graph replays after every alignment: use it with --align each")
    for d in a.dtypes.split(","):
        if d not in ("fp8", "bf16"):
            p.error(f"--dtypes: {d!r} is neither fp8 nor bf16")
    return a


def routing(tokens, experts, topk, gen):
    """topk_idx [T][K] int64, distinct experts per token, 10 random entries -1 (none below 100
    entries, so that 1 token sends all top-k); weights FP32."""
    scores = torch.rand(tokens, experts, generator=gen)
    idx = scores.topk(topk, dim=1).indices
    flat = idx.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:min(10, flat.numel() // 100)]] = -1
    w = torch.rand(tokens, topk, generator=gen).masked_fill(idx < 0, 0.0)
    return idx.cuda(), w.cuda()


def kind_of(name):
    """'dispatch' / 'combine' for the library's LL kernels, None for anything else."""
    if "nccl_moe" not in name:
        return None
    if "llDispatch" in name:
        return "dispatch"
    if "llCombine" in name:
        return "combine"
    return None


def trace_start_us(prof):
    """The profile's start on the host clock (us), which every rank of one host shares; kernel
    times in prof.events() are relative to it. None where this torch does not expose it."""
    results = getattr(prof.profiler, "kineto_results", None)
    try:
        return results.trace_start_ns() / 1e3
    except AttributeError:
        return None


def per_call(prof):
    """Lists of (kernel us, start us, end us) per call, by kind, from the profile's kernel
    events: the library's kernels in start order, a call being the run of consecutive kernels of
    one kind; start / end: its first kernel's start and last kernel's end."""
    kernels = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kind_of(e.name)
            if k:
                kernels.append((e.time_range.start, e.time_range.end, k))
    kernels.sort()
    calls = {"dispatch": [], "combine": []}
    run = None
    for start, end, k in kernels:
        if run and run[0] == k:
            run[1] += end - start
            run[3] = end
        else:
            if run:
                calls[run[0]].append(tuple(run[1:]))
            run = [k, end - start, start, end]
    if run:
        calls[run[0]].append(tuple(run[1:]))
    return calls


def measure(buf, a, tokens, fp8, gen):
    x = torch.randn(tokens, a.hidden, generator=gen).to(torch.bfloat16).cuda()
    idx, w = routing(tokens, a.experts, a.topk, gen)

    def step():
        _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, a.max_tokens, a.experts,
                                                      use_fp8=fp8, topk_weights=w)
        buf.low_latency_combine(handle.combine_input, idx, w, handle)

    # An alignment: a matrix product keeps the GPU busy while the host enqueues what follows,
    # and an all-reduce then starts it on every rank at about the same time: the kernel times
    # are the library's, not the host's launch gaps or a late peer.
    lhs = torch.randn(a.mm_size, a.mm_size, device="cuda", dtype=torch.bfloat16) if a.mm_size else None
    flush = torch.empty(a.flush_mb << 20, device="cuda", dtype=torch.uint8) if a.flush_mb else None
    one = torch.ones(1, device="cuda")

    def align():
        if lhs is not None:
            torch.mm(lhs, lhs)
        if flush is not None:
            flush.zero_()
        dist.all_reduce(one)

    def aligned_step():  # warm-up
        align()
        step()

    for _ in range(a.warmup):
        aligned_step()
    torch.cuda.synchronize()
    dist.barrier()
    # --graph N: N steps captured in one CUDA graph, replayed after each alignment (a decode
    # engine's way): the first call of a replay starts aligned, the others follow back to back.
    steps_per_run, run = 1, step
    if a.align == "once":
        def run():
            for _ in range(a.period):
                step()
        steps_per_run = a.period
    if a.graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(a.graph):
                step()
        steps_per_run, run = a.graph, graph.replay
        align()
        run()
        torch.cuda.synchronize()
        dist.barrier()
    runs = -(-a.iters // steps_per_run)
    host = []  # host seconds to enqueue each run (its steps' library calls and Python)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            align()
            t0 = time.perf_counter()
            run()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    calls = per_call(prof)
    for k, v in calls.items():
        if len(v) != runs * steps_per_run:
            raise RuntimeError(f"rank {dist.get_rank()}: {len(v)} {k} calls in the profile, "
                               f"expected {runs * steps_per_run} (kernel names changed?)")
    # Host-clock start / end of each call on every rank: "from the last start" = this rank's end
    # minus the latest rank's start of the same call (the kernel time without the wait for a
    # late peer), "skew" = latest minus earliest start.
    base = trace_start_us(prof)
    stats = []
    for k in ("dispatch", "combine"):
        kern = [c[0] for c in calls[k]]
        span = [c[2] - c[1] for c in calls[k]]
        after, skew = [float("nan")], [float("nan")]
        if base is not None:
            mine = torch.tensor([[base + c[1], base + c[2]] for c in calls[k]], dtype=torch.float64,
                                device="cuda")
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            starts = torch.stack([e[:, 0] for e in every])
            last = starts.max(dim=0).values
            after = (mine[:, 1] - last).tolist()
            skew = (last - starts.min(dim=0).values).tolist()
        stats += [statistics.median(kern), statistics.fmean(kern), statistics.median(span),
                  statistics.median(after), statistics.median(skew)]
    # Host time per dispatch + combine step: if it exceeds the step's GPU time, back-to-back calls
    # (--align once) find the GPU idle and start when the host launches them.
    stats.append(statistics.median(host) / steps_per_run * 1e6)
    t = torch.tensor(stats, dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main():
    a = parse()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    gen = torch.Generator().manual_seed(4321 + rank)
    if rank == 0:
        print(f"# ll_kineto: {dist.get_world_size()} ranks, {torch.cuda.get_device_name()}, "
              f"H {a.hidden}, {a.experts} experts, top-{a.topk}, M {a.max_tokens}, "
              f"SMs {a.sms or 'default'}, {a.iters} calls, alignment ({a.mm_size}^2 product"
              f"{f', {a.flush_mb} MB flush' if a.flush_mb else ''}, all-reduce) "
              f"{'before each step' if a.align == 'each' else f'then {a.period} steps back to back'}"
              f"{f', CUDA graphs of {a.graph} steps' if a.graph else ''}; us, slowest rank")
        print(f"# {'tokens':>6} {'dtype':>5} {'op':>9} {'kernel med':>10} {'mean':>8} "
              f"{'span med':>9} {'from last start med':>19} {'skew med':>9} {'host/step med':>13}", flush=True)
    for dtype in a.dtypes.split(","):
        buf = Buffer(None, a.hidden, a.experts, a.topk, max_tokens_per_rank=a.max_tokens,
                     use_fp8=dtype == "fp8", ll_num_sms=a.sms, calling_stream=True)
        for tokens in a.tokens:
            s = measure(buf, a, tokens, dtype == "fp8", gen)
            if rank == 0:
                for i, op in enumerate(("dispatch", "combine")):
                    km, ka, sm, am, sk = s[5 * i:5 * i + 5]
                    print(f"  {tokens:>6} {dtype:>5} {op:>9} {km:>10.2f} {ka:>8.2f} {sm:>9.2f} "
                          f"{am:>19.2f} {sk:>9.2f} {s[10]:>13.2f}", flush=True)
        del buf
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
