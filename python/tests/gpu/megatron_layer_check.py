"""megatron-core 0.19.2's MoELayer on 2 GPUs (EP 2): the 'alltoall' dispatcher against the 'flex'
dispatcher with backend 'deepep' running on nccl-moe (nccl_moe.megatron.patch()). Same seed,
weights and input; forward + backward compared within BF16 tolerance, then both timed.

  torchrun --nproc_per_node=2 python/tests/gpu/megatron_layer_check.py

Needs torch (NCCL; triton for megatron's torch.compile'd helpers, a dependency of torch's Linux
wheels), numpy, packaging and megatron-core 0.19.2. No Transformer Engine, apex or DeepEP: the
layer is built from the local (non-TE) spec. Beyond those, the MoE-layer path of 0.19.2 imports
nothing that torch does not bring already (read from its sources, and checked by importing the
path), so .peers/wheels/ holds one wheel, megatron-core's own:
  megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
  install (offline): pip install --no-deps --no-index .peers/wheels/*.whl
libnccl_moe.so: $NCCL_MOE_LIBRARY if set, else the package's search (nccl_moe/_library.py).

Layer, both runs: 64 experts, top-8, hidden H = 2048, expert FFN 1024 (SwiGLU: fc1 [2048 -> 2048]
= 2 x 1024, fc2 [1024 -> 2048]), no biases, BF16 parameters and activations, router logits and
probabilities in FP32 (moe_router_dtype='fp32': DeepEP's path wants FP32 probs, and alltoall then
computes the same), softmax after top-k, no aux loss, no token dropping, SequentialMLP experts
(grouped GEMM and permute fusion need TE: off). TP = PP = 1, EP = 2: 32 local experts per rank.
Input per rank: hidden states [S = 4096][B = 1][H] BF16 (its own tokens), upstream gradient the
same shape.

Check, per tensor (output, input gradient, every parameter gradient): max |a - b| / max |a| <= 2e-2,
a = alltoall, b = flex (worst over the ranks). Rank 0 prints "PASS <name> ..." / "FAIL <name> ...",
"ALL PASSED" at the end, and "TIME alltoall <ms> flex-nccl_moe <ms>" (forward + backward: per
measurement the mean of MOE_MEGATRON_ITERS (10) steps after 3 warm-up, max over ranks; the median
of MOE_MEGATRON_ROUNDS (1) measurements taken in turn with the other dispatchers); flex is also
timed with Megatron's own steps after the dispatch put back (its multi-hot map and permute:
patch(sync_free_multihot=False, direct_permute=False)), and
every timing prints the host's time per step and per library call. Any failure: non-zero exit on
every rank.
MOE_PROFILE_DIR=<dir>: also one profiled step per dispatcher (operator tables on rank 0, Chrome
traces per rank in <dir>).
"""
import importlib.util
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SEED = 1234
S, B, H = 4096, 1, 2048     # sequence, micro batch, hidden: S * B tokens per rank
E, K, FFN = 64, 8, 1024     # experts, top-k, FFN hidden per expert
EP = 2                      # expert-parallel ranks (= the world)
TOL = 2e-2                  # max |a - b| / max |a|, per tensor
WARMUP = 3
ITERS = int(os.environ.get("MOE_MEGATRON_ITERS", "10"))    # timed steps per measurement
ROUNDS = int(os.environ.get("MOE_MEGATRON_ROUNDS", "1"))   # interleaved measurements per dispatcher


def say(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def guarded(stage, fn, *args):
    """fn(*args); on an exception prints "FAIL <stage> ..." and ends this process at once (the
    other rank may wait in a collective: torchrun then stops it, non-zero)."""
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 (SystemExit / asserts included)
        print(f"FAIL {stage} (rank {dist.get_rank()}): {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def make_config(dispatcher):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=16,  # heads: required, unused here
        ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, num_moe_experts=E, moe_router_topk=K,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=EP, expert_tensor_parallel_size=1, sequence_parallel=False,
        transformer_impl="local", bf16=True, params_dtype=torch.bfloat16,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        moe_router_fusion=False, moe_grouped_gemm=False, moe_permute_fusion=False,
        moe_token_dispatcher_type=dispatcher,
        # flex only: _DeepepManager (token_dispatcher.py) -> fused_dispatch / fused_combine;
        # num_sms None -> set_deepep_num_sms(20), Megatron's default.
        moe_flex_dispatcher_backend="deepep", moe_flex_dispatcher_num_sms=None)


def build(dispatcher):
    """MoELayer from the local spec (models/gpt/moe_module_specs.py: get_moe_module_spec with
    use_te=False -> SequentialMLP of ColumnParallelLinear / RowParallelLinear experts)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(SEED)                # the router's weight is initialised on the CPU
    model_parallel_cuda_manual_seed(SEED)  # experts on the GPU, seed per EP rank (random.py)
    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)
    return spec(config=make_config(dispatcher), layer_number=1).cuda()


def step(layer, x, g):
    """One forward + backward: x [S][B][H] BF16 leaf, g [S][B][H] BF16 upstream gradient."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = layer(x)
    out.backward(g)
    return out


def results(layer, x, g):
    """(output [S][B][H], input gradient [S][B][H], {parameter name: gradient}), copies."""
    out = step(layer, x, g).detach().clone()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for n, p in layer.named_parameters()}
    return out, x.grad.detach().clone(), grads


def time_ms(layer, x, g):
    """Mean milliseconds of one forward + backward on each rank (list over ranks)."""
    for _ in range(WARMUP):
        step(layer, x, g)
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _C_CALLS.clear()
    start.record()
    host0 = time.perf_counter()
    for _ in range(ITERS):
        step(layer, x, g)
    host_ms = (time.perf_counter() - host0) * 1e3 / ITERS
    end.record()
    torch.cuda.synchronize()
    # Where the host's time goes: a step that returns long before its GPU work ends is GPU bound;
    # one whose host time equals the GPU time is bound by the host (launches, syncs, Python).
    calls = ", ".join(f"{n} {t * 1e3 / ITERS:.3f} ms x{c // ITERS}" for n, (t, c) in sorted(_C_CALLS.items()))
    print(f"# rank {dist.get_rank()}: host {host_ms:.3f} ms per step issuing; library calls per step: "
          f"{calls or 'none'}", flush=True)
    synced = []
    for _ in range(3):  # one step alone: nothing of the previous one still queued
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(layer, x, g)
        torch.cuda.synchronize()
        synced.append((time.perf_counter() - t0) * 1e3)
    print(f"# rank {dist.get_rank()}: one step alone (synchronised before and after) {min(synced):.3f} ms", flush=True)
    mine = torch.tensor([start.elapsed_time(end) / ITERS], device="cuda")
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [float(t) for t in every]


def profile(tag, layer, x, g):
    """With MOE_PROFILE_DIR set: one forward + backward under torch.profiler (CPU and CUDA);
    rank 0 prints the top operators by self CPU time and by CUDA time, and every rank writes a
    Chrome trace <dir>/<tag>_rank<r>.json (where the extra milliseconds of one dispatcher go)."""
    out_dir = os.environ.get("MOE_PROFILE_DIR")
    if not out_dir:
        return
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(layer, x, g)
        torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"{tag}_rank{dist.get_rank()}.json"))
    table = prof.key_averages()
    say(f"# profile {tag}: by self CPU time\n" + table.table(sort_by="self_cpu_time_total", row_limit=12))
    say(f"# profile {tag}: by CUDA time\n" + table.table(sort_by="cuda_time_total", row_limit=12))


def rel_err(a, b):
    """max |a - b| / max |a| in FP32 (inf when the shapes differ or a value is NaN)."""
    if a.shape != b.shape:
        return torch.tensor(float("inf"), device="cuda")
    a, b = a.float(), b.float()
    err = (a - b).abs().max() / a.abs().max().clamp_min(1e-30)
    return torch.nan_to_num(err, nan=float("inf"))


_C_CALLS = {}  # library entry point -> [host seconds, calls] since time_ms cleared it


def time_library_calls():
    """Wraps nccl_moe._api.call (every C entry point) to add its host time to _C_CALLS."""
    from nccl_moe import _api

    inner = _api.call

    def timed(name, *args):
        t0 = time.perf_counter()
        try:
            return inner(name, *args)
        finally:
            acc = _C_CALLS.setdefault(name, [0.0, 0])
            acc[0] += time.perf_counter() - t0
            acc[1] += 1

    _api.call = timed


def flex_preflight():
    """Loads libnccl_moe.so, checks its NCCL against torch's, patches megatron-core; returns the
    header line. Raises what makes the flex run impossible."""
    import nccl_moe
    import nccl_moe.megatron as nm
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher
    from nccl_moe.torch._comm import check_nccl_version

    built, loaded = nccl_moe.nccl_versions()
    check_nccl_version()
    time_library_calls()
    nm.patch(max_tokens_per_rank=S * B)
    for module in (fused_a2a, token_dispatcher):
        if module.fused_dispatch is not nm.fused_dispatch:
            raise RuntimeError(f"patch() did not rebind {module.__name__}.fused_dispatch")
    return (f"# nccl-moe {nccl_moe.library_version()} from {nccl_moe._library.loaded_path()}, "
            f"built for NCCL {built}, running on {loaded}")


def main():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on these hosts
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    if dist.get_world_size() != EP:
        print(f"FAIL world size: needs {EP} ranks, got {dist.get_world_size()}", flush=True)
        sys.exit(1)
    warnings.filterwarnings("ignore", module="megatron")  # "TE / apex not installed" notices
    if importlib.util.find_spec("triton") is None:
        # (importlib: an `import torch._dynamo` here would make `torch` local to main())
        importlib.import_module("torch._dynamo").config.disable = True  # jit_fuser is torch.compile
        say("# triton is missing: torch.compile disabled (megatron's jit_fuser runs eagerly)")

    from megatron.core import package_info, parallel_state
    guarded("parallel_state", lambda: parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=EP, create_gloo_process_groups=False))
    say(f"# torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, megatron-core "
        f"{package_info.__version__}, {torch.cuda.get_device_name()}; tokens per rank {S * B}, "
        f"H {H}, experts {E}, top-{K}, FFN {FFN}, EP {EP}")

    gen = torch.Generator(device="cuda").manual_seed(SEED + 1 + rank)  # each rank its own tokens
    x0 = torch.randn(S, B, H, generator=gen, device="cuda").to(torch.bfloat16)
    g = torch.randn(S, B, H, generator=gen, device="cuda").to(torch.bfloat16)

    # (a) alltoall.
    layer_a = guarded("build alltoall", build, "alltoall")
    xa = x0.clone().requires_grad_()
    res_a = guarded("run alltoall", results, layer_a, xa, g)
    guarded("profile alltoall", profile, "alltoall", layer_a, xa, g)

    # (b) flex + deepep backend on nccl-moe.
    say(guarded("flex-nccl_moe setup", flex_preflight))
    layer_b = guarded("build flex-nccl_moe", build, "flex")
    names = [n for n, _ in layer_a.named_parameters()]
    errs = [("identical initial weights", max(
        (rel_err(pa.detach(), pb.detach()) for pa, pb in
         zip(layer_a.parameters(), layer_b.parameters())), key=float))]
    same_names = names == [n for n, _ in layer_b.named_parameters()]
    errs.append(("same parameter names", torch.tensor(0.0 if same_names else float("inf"),
                                                      device="cuda")))
    with torch.no_grad():  # same weights whatever the check above says
        for pa, pb in zip(layer_a.parameters(), layer_b.parameters()):
            pb.copy_(pa)
    xb = x0.clone().requires_grad_()
    res_b = guarded("run flex-nccl_moe", results, layer_b, xb, g)
    guarded("profile flex-nccl_moe", profile, "flex_nccl_moe", layer_b, xb, g)

    # Timing, ROUNDS times in turn (a machine's state drifts within a lease): alltoall, flex on
    # nccl-moe, and the same flex layer with Megatron's own multi-hot map (six host
    # synchronisations) and permute as an A/B. Each value: the slowest rank's mean ms per step.
    import nccl_moe.megatron as nm
    ms_a, ms_b, ms_c = [], [], []
    for _ in range(ROUNDS):
        ms_a.append(max(guarded("time alltoall", time_ms, layer_a, xa, g)))
        ms_b.append(max(guarded("time flex-nccl_moe", time_ms, layer_b, xb, g)))
        nm.patch(max_tokens_per_rank=S * B, sync_free_multihot=False, direct_permute=False)
        ms_c.append(max(guarded("time flex-nccl_moe, Megatron's permute", time_ms, layer_b, xb, g)))
        nm.patch(max_tokens_per_rank=S * B)

    # Compare: output, input gradient, every parameter gradient (router and 32 local experts).
    errs += [("output", rel_err(res_a[0], res_b[0])), ("input grad", rel_err(res_a[1], res_b[1]))]
    errs += [(f"grad {n}", rel_err(res_a[2][n], res_b[2].get(n, torch.empty(0, device="cuda"))))
             for n in names]
    worst = torch.stack([e.reshape(()) for _, e in errs])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    failed = 0
    for (name, _), err in zip(errs, worst.tolist()):
        limit = 0.0 if name in ("identical initial weights", "same parameter names") else TOL
        ok = err <= limit
        failed += not ok
        say(f"{'PASS' if ok else 'FAIL'} {name} (worst rel err {err:.3e}, limit {limit:g})")

    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    say(f"# ms per forward+backward (slowest rank), {ROUNDS} round(s) of {ITERS} steps: alltoall "
        f"{[round(t, 3) for t in ms_a]}, flex-nccl_moe {[round(t, 3) for t in ms_b]}, with Megatron's "
        f"multihot and permute {[round(t, 3) for t in ms_c]}")
    say(f"TIME alltoall {med(ms_a):.3f} flex-nccl_moe {med(ms_b):.3f} (medians)")

    torch.cuda.synchronize()
    nm.destroy()
    parallel_state.destroy_model_parallel()
    dist.barrier()
    if failed == 0:
        say("ALL PASSED")
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
