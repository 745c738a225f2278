"""GPU check of nccl_moe.torch on every rank of a torchrun job (2 or more GPUs, one NVLink
domain), each result against a pure-torch reference built from all_to_all_single / all_gather:

  torchrun --nproc_per_node=2 python/tests/gpu/ep_check.py

Prints one "PASS <name>" line per check on rank 0 and "ALL PASSED" at the end; exits non-zero on
the first failure (with the rank and the check).
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import nccl_moe  # noqa: E402
from nccl_moe.torch import Buffer, combine, dispatch  # noqa: E402

H, E, K, T = 512, 16, 4, 96   # hidden, experts, top-k, tokens per rank
LL_M = 128                    # LL max tokens per rank


def routing(rank, num_tokens, gen):
    """topk_idx [T][K] int64 with distinct experts per token and some -1, weights [T][K] FP32."""
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)])
    idx[torch.rand(num_tokens, K, generator=gen) < 0.1] = -1
    weights = torch.rand(num_tokens, K, generator=gen).masked_fill(idx < 0, 0.0)
    return idx.cuda(), weights.cuda()


def reference_dispatch(x, idx, weights, group_size):
    """What every rank receives, by all_to_all_single: rows by source rank then token."""
    local = E // group_size
    rank_of = torch.where(idx >= 0, idx // local, -1)
    sends, counts = [], []
    for r in range(group_size):
        mask = (rank_of == r).any(dim=1)
        ridx = torch.where(rank_of[mask] == r, idx[mask] - r * local, -1)
        rw = torch.where(rank_of[mask] == r, weights[mask], 0.0)
        sends.append((x[mask], ridx, rw))
        counts.append(int(mask.sum()))
    send_counts = torch.tensor(counts, device="cuda")
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    rc = recv_counts.tolist()
    out = []
    for part, width, dtype in ((0, H, x.dtype), (1, K, torch.int64), (2, K, torch.float32)):
        send = torch.cat([s[part] for s in sends]).contiguous()
        recv = torch.empty((sum(rc), width), dtype=dtype, device="cuda")
        dist.all_to_all_single(recv, send, rc, counts)
        out.append(recv)
    return out, rank_of


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {name} failed {detail}")
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"PASS {name}", flush=True)


def check_layout(buf, idx, rank_of, size):
    """get_dispatch_layout against torch: one node, so num_tokens_per_rdma_rank has one entry,
    the tokens that go anywhere."""
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    ref_in_rank = torch.stack([(rank_of == r).any(dim=1) for r in range(size)], dim=1)
    check("ht layout is_token_in_rank", torch.equal(in_rank, ref_in_rank))
    check("ht layout num_tokens_per_rank", torch.equal(per_rank, ref_in_rank.sum(0).int()))
    ref_expert = torch.bincount(idx[idx >= 0], minlength=E).int()
    check("ht layout num_tokens_per_expert", torch.equal(per_expert, ref_expert))
    ref_node = ref_in_rank.any(dim=1).sum().reshape(1).int()
    check("ht layout num_tokens_per_rdma_rank", torch.equal(per_node, ref_node),
          f"{per_node} vs {ref_node}")


def check_ht(buf, rank, size, gen):
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    idx, w = routing(rank, T, gen)
    (ref_x, ref_idx, ref_w), rank_of = reference_dispatch(x, idx, w, size)
    check_layout(buf, idx, rank_of, size)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w)
    check("ht dispatch rows", torch.equal(recv_x, ref_x), f"{recv_x.shape} vs {ref_x.shape}")
    check("ht dispatch topk_idx", torch.equal(recv_idx, ref_idx))
    check("ht dispatch topk_weights", torch.equal(recv_w, ref_w))
    local = E // size
    ref_counts = [int((ref_idx == l).sum()) for l in range(local)]
    check("ht tokens per expert", counts == ref_counts, f"{counts} vs {ref_counts}")
    # Combine: rank r's experts scale by (r + 1); the source sums in rank order in FP32.
    y = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
    out, _, _ = buf.combine(y, handle)
    scale = sum(((rank_of == r).any(dim=1).float() * (r + 1)) for r in range(size))
    ref = torch.zeros(T, H, dtype=torch.float32, device="cuda")
    for r in range(size):
        got = (rank_of == r).any(dim=1, keepdim=True)
        ref += torch.where(got, (x.float() * (r + 1)).to(torch.bfloat16).float(), 0.0)
    check("ht combine", torch.equal(out, ref.to(torch.bfloat16)))
    # Zero-copy combine: expert outputs written into handle.combine_input.
    _, _, _, _, handle2, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w)
    handle2.combine_input.copy_(y)
    out2, _, _ = buf.combine(handle2.combine_input, handle2)
    check("ht zero-copy combine", torch.equal(out2, out))
    # Cached dispatch: same routing, other data.
    x3 = (x.float() * 2).to(torch.bfloat16)
    cached_x, *_ = buf.dispatch(x3, handle=handle2)
    check("ht cached dispatch", torch.equal(cached_x, (ref_x.float() * 2).to(torch.bfloat16)))
    # Overlap: async_finish returns an event the caller waits on.
    _, _, _, _, h4, ev = buf.dispatch(x, topk_idx=idx, topk_weights=w, async_finish=True)
    ev.current_stream_wait()
    out4, _, ev = buf.combine(h4.combine_input.copy_(y), h4, async_finish=True)
    ev.current_stream_wait()
    check("ht async_finish events", torch.equal(out4, out))
    return scale


def check_autograd(buf, rank, size, gen):
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda().requires_grad_()
    idx, w = routing(rank, T, gen)
    recv_x, recv_idx, recv_w, counts, handle = dispatch(x, idx, w, buf)
    (ref_x, ref_idx, ref_w), rank_of = reference_dispatch(x.detach(), idx, w, size)
    check("autograd dispatch forward", torch.equal(recv_x, ref_x) and torch.equal(recv_w, ref_w))
    check("autograd tokens_per_expert", counts.device.type == "cpu" and int(counts.sum()) == int((ref_idx >= 0).sum()))
    out = combine(recv_x * (rank + 1), handle, buf)
    g = torch.randn(T, H, generator=gen).cuda()
    (out.float() * g).sum().backward()
    # d out[t] / d x[t] = sum over ranks r that received t of (r + 1) (one BF16 rounding per
    # rank's gradient row in the cached dispatch / combine, so compare with BF16 tolerance).
    scale = sum(((rank_of == r).any(dim=1).float() * (r + 1)) for r in range(size))
    ref_grad = (g.to(torch.bfloat16).float() * scale[:, None])
    ok = torch.allclose(x.grad.float(), ref_grad, rtol=2e-2, atol=2e-2)
    check("autograd backward (combine of grads, cached dispatch)", ok,
          f"max err {(x.grad.float() - ref_grad).abs().max().item()}")
    # Weights that require grad (Megatron's FusedDispatch backward): the gradient of recv_w
    # returns to w through ncclMoeCombineWithWeights. Only local entries of rw are used, so
    # d loss / d w[t][k] = sum_h g[t][h] * x[t][h] for every valid k (BF16 tolerance).
    w2 = w.clone().requires_grad_()
    rx, ridx, rw, _, h = dispatch(x.detach(), idx, w2, buf)
    scale_rows = (rw * (ridx >= 0)).sum(dim=1, keepdim=True)
    out = combine((rx.float() * scale_rows).to(torch.bfloat16), h, buf)
    (out.float() * g).sum().backward()
    per_token = (g.to(torch.bfloat16).float() * x.detach().float()).sum(dim=1, keepdim=True)
    ref_w = per_token * (idx >= 0).float()
    tol = 5e-2 * max(1.0, ref_w.abs().max().item())
    ok = w2.grad is not None and torch.allclose(w2.grad, ref_w, rtol=5e-2, atol=tol)
    check("autograd grad of topk_weights (ncclMoeCombineWithWeights)", ok,
          "no gradient" if w2.grad is None else f"max err {(w2.grad - ref_w).abs().max().item()}")
    # Exact: the per-row values summed back equal DeepEP's rule, through the Buffer directly.
    rx, ridx, rw, _, hb, _ = buf.dispatch(x.detach(), topk_idx=idx, topk_weights=w)
    _, back, _ = buf.combine(rx, hb, topk_weights=rw)
    check("combine(topk_weights=recv weights) returns the weights", torch.equal(back, w * (idx >= 0)))


def check_compile(buf, rank, gen):
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    idx, w = routing(rank, T, gen)

    def layer(x, idx, w):
        recv_x, _, _, _, handle = dispatch(x, idx, w, buf)
        return combine(recv_x * 2, handle, buf)

    eager = layer(x, idx, w)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x, idx, w)
    check("torch.compile fullgraph dispatch+combine", torch.equal(eager, compiled))


def check_ll(buf, rank, size, gen, hook):
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    idx, w = routing(rank, T, gen)
    recv_x, recv_count, handle, _, recv_hook = buf.low_latency_dispatch(
        x, idx, LL_M, E, use_fp8=False, return_recv_hook=hook, topk_weights=w)
    if hook:
        recv_hook()
    all_x = torch.empty(size * T, H, dtype=x.dtype, device="cuda")
    all_idx = torch.empty(size * T, K, dtype=idx.dtype, device="cuda")
    dist.all_gather_into_tensor(all_x, x)
    dist.all_gather_into_tensor(all_idx, idx)
    local = E // size
    counts_ps = handle.recv_counts_per_source.cpu()
    ok = True
    for l in range(local):
        for s in range(size):
            n = int(counts_ps[l, s])
            rows = slice(s * LL_M, s * LL_M + n)
            src = handle.src_token[l, rows].long()
            want = (all_idx[s * T:(s + 1) * T] == rank * local + l).any(dim=1).nonzero().flatten()
            ok &= torch.equal(src.sort().values, want)
            ok &= torch.equal(recv_x[l, rows], all_x[s * T + src])
    ok &= torch.equal(recv_count.cpu(), counts_ps.sum(dim=1).to(torch.int32))
    check(f"ll dispatch rows{' (hook)' if hook else ''}", bool(ok))
    # Identity experts written into the combine buffer: out[t] = sum_k w[t][k] * x[t].
    buf.get_next_low_latency_combine_buffer(handle).copy_(recv_x)
    out, _, combine_hook = buf.low_latency_combine(
        handle.combine_input, idx, w, handle, return_recv_hook=hook)
    if hook:
        combine_hook()
    ref = x.float() * w.sum(dim=1, keepdim=True)
    ok = torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2)
    check(f"ll combine{' (hook)' if hook else ''}", ok, f"max err {(out.float() - ref).abs().max().item()}")


def main():
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    size = dist.get_world_size()
    gen = torch.Generator().manual_seed(1234 + rank)
    if rank == 0:
        built, loaded = nccl_moe.nccl_versions()
        print(f"# torch {torch.__version__}, torch NCCL {torch.cuda.nccl.version()}, "
              f"nccl-moe built for {built}, loaded {loaded}, ranks {size}", flush=True)
    buf = Buffer(None, H, E, K, max_tokens_per_rank=T)
    check_ht(buf, rank, size, gen)
    check_autograd(buf, rank, size, gen)
    check_compile(buf, rank, gen)
    check_ll(buf, rank, size, gen, hook=False)
    check_ll(buf, rank, size, gen, hook=True)
    torch.cuda.synchronize()
    buf.check_errors()
    buf.destroy()
    dist.barrier()
    if rank == 0:
        print("ALL PASSED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
