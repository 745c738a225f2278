"""Megatron-LM adapter: `patch()` makes megatron-core's flex dispatcher with
`--moe-flex-dispatcher-backend deepep` run on nccl-moe, in an unmodified megatron-core 0.19.x.

Megatron's _DeepepManager calls three names that megatron/core/transformer/moe/token_dispatcher.py
imports from fused_a2a.py: fused_dispatch, fused_combine and set_deepep_num_sms (it refuses to
start when fused_dispatch is None, i.e. DeepEP is absent). patch() rebinds those names in both
modules to the functions below, which keep Megatron's signatures and return shapes, and replaces
_DeepepManager's step after dispatch: get_permuted_hidden_states_by_experts (multi-hot map, then
an argsort permute) by permute_by_experts (one stable argsort of the received top-k ids) and
get_restored_hidden_states_by_experts by restore_by_experts — same order, values and gradients
in fewer operations, no host synchronisation — and, where Megatron's own permute still runs
(fused permute or routing-map padding configured), _indices_to_multihot by indices_to_multihot
(no host synchronisation).

fused_dispatch / fused_combine are torch.autograd.Function pairs (nccl_moe.torch.autograd, as
Megatron's FusedDispatch / FusedCombine; not the torch.library custom ops, whose dispatcher and
handle tokens cost host time): backward of dispatch = combine of the gradients of recv_x and,
when token_probs needs one, of recv_probs (ncclMoeCombineWithWeights); backward of combine =
cached dispatch with the saved handle. The handle Megatron holds is the Handle object.

Streams: the Buffers are built with calling_stream=True, so each call (forward and backward)
runs on the calling stream, in order with Megatron's kernels before and after it: no
communication stream, stream wait or event. async_finish / allocate_on_comm_stream are accepted
and ignored (Megatron makes its stream wait for the event at once anyway). dispatch returns
after the stream has reached it (tokens_per_expert is a CPU tensor: the host waits for the
counts, Megatron's contract); combine and the cached dispatch return at once. recv_x and
recv_probs are copies (made on the calling stream), so they outlive later dispatches.

One Buffer per (group, hidden, experts, top-k), created at the first dispatch; its
max_tokens_per_rank is the largest token count over the group at that moment (an all_reduce),
unless patch(max_tokens_per_rank=...) fixes it. A later dispatch with more tokens fails with
ValueError; destroy() (collective) frees the Buffers before the process groups go. The SM
count is --moe-flex-dispatcher-num-sms (Megatron's default 20).
"""
from typing import Dict, Optional

_BUFFERS: Dict[tuple, object] = {}     # (group, hidden, experts, top-k) -> Buffer
_BY_GROUP: Dict[tuple, object] = {}    # (group, hidden) -> that Buffer, for fused_combine
_max_tokens_per_rank: Optional[int] = None
_megatron_multihot = None              # Megatron's _DeepepManager._indices_to_multihot, once patched
_megatron_permute = None               # Megatron's get_permuted_hidden_states_by_experts, once patched
_megatron_restore = None               # Megatron's get_restored_hidden_states_by_experts, once patched
_Dispatch = _Combine = None            # nccl_moe.torch.autograd's Functions, imported by _buffer


def _buffer(group, hidden: int, num_experts: int, num_topk: int, num_tokens: int):
    """The Buffer of (group, hidden, experts, top-k), created (collectively) when missing.
    (Every fused_combine follows a fused_dispatch, which comes here first: the Functions are
    imported here, once, not per call.)"""
    global _Dispatch, _Combine
    import torch
    import torch.distributed as dist
    from .torch import Buffer
    from .torch.autograd import Combine, Dispatch

    _Dispatch, _Combine = Dispatch, Combine

    key = (group, hidden, num_experts, num_topk)
    if key not in _BUFFERS:
        max_tokens = _max_tokens_per_rank
        if max_tokens is None:
            t = torch.tensor([num_tokens], dtype=torch.int64, device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            max_tokens = int(t.item())
        _BUFFERS[key] = Buffer(group, hidden, num_experts, num_topk, max_tokens,
                               calling_stream=True)
        if (group, hidden) in _BY_GROUP:
            raise NotImplementedError("nccl_moe.megatron: one expert configuration per (group, "
                                      "hidden) (fused_combine finds the Buffer by them)")
        _BY_GROUP[(group, hidden)] = _BUFFERS[key]
    return _BUFFERS[key]


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False):
    """Megatron's fused_dispatch: x [T][H] BF16, token_indices [T][K] int64 (-1 = dropped),
    token_probs [T][K] FP32. Returns (recv_x, recv_indices, recv_probs, tokens_per_expert (CPU
    int64), handle (a nccl_moe.torch.Handle)). async_finish / allocate_on_comm_stream: ignored."""
    buf = _BUFFERS.get((group, x.shape[1], num_experts, token_indices.shape[1]))
    if buf is None:
        buf = _buffer(group, x.shape[1], num_experts, token_indices.shape[1], x.shape[0])
    return _Dispatch.apply(x if x.is_contiguous() else x.contiguous(), token_indices,
                           token_probs, buf)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Megatron's fused_combine: x [rows][H] BF16 and the handle of its fused_dispatch. Returns
    (combined [T][H], None). async_finish / allocate_on_comm_stream: ignored."""
    buf = _BY_GROUP[(group, x.shape[1])]
    return _Combine.apply(x if x.is_contiguous() else x.contiguous(), handle, buf), None


def indices_to_multihot(manager, indices, probs):
    """_DeepepManager._indices_to_multihot without a host synchronisation, for patch().

    indices [rows][K] int64: local expert ids (0..L-1, L = manager.num_local_experts) or -1 =
    none, no id twice in a row (a token's top-k experts are distinct); probs [rows][K] FP32.
    Returns (routing_map [rows][L] bool, probs [rows][L] FP32): the values and gradients of
    Megatron's version. Megatron's selects with boolean masks and repeat_interleave, which cost
    six device-to-host synchronisations per forward + backward (each drains the GPU queue while
    the host waits); here every -1 goes to a spare column L that is dropped."""
    import torch

    rows, local = indices.shape[0], manager.num_local_experts
    valid = indices != -1
    cols = torch.where(valid, indices, local)
    routing = torch.zeros((rows, local + 1), dtype=torch.bool, device=indices.device)
    routing.scatter_(1, cols, valid)
    kept = torch.where(valid, probs.float(), 0.0)
    dense = torch.zeros((rows, local + 1), dtype=torch.float, device=indices.device)
    dense = dense.scatter(1, cols, kept)
    return routing[:, :local].contiguous(), dense[:, :local].contiguous()


def _megatrons_permute_configured(manager) -> bool:
    """Megatron's fused permute or routing-map padding: its own permute and restore then run."""
    return bool(manager.permute_fusion or manager.config.moe_router_padding_for_quantization)


def permute_by_experts(manager, hidden_states):
    """_DeepepManager.get_permuted_hidden_states_by_experts in fewer operations, for patch().

    hidden_states [rows][H] as fused_dispatch delivered them; manager.dispatched_indices [rows][K]
    int64 (local expert ids, -1 = none, distinct per row), dispatched_probs [rows][K] FP32,
    tokens_per_expert [L] int64 on the CPU. Returns (rows grouped by local expert, each expert's
    rows in received order [n][H], their probabilities [n]) with n = sum(tokens_per_expert): the
    order, values and gradients of Megatron's multi-hot map + argsort permute, from one stable
    argsort over the [rows][K] ids instead (no multi-hot map, a K-wide sort instead of an L-wide
    one). Sets what Megatron's restore reads (here: restore_by_experts). With Megatron's fused
    permute or routing-map padding configured, Megatron's own method runs instead."""
    import torch

    if _megatrons_permute_configured(manager):
        return _megatron_permute(manager, hidden_states)
    indices, probs = manager.dispatched_indices, manager.dispatched_probs
    rows, topk = indices.shape
    keys = torch.where(indices >= 0, indices, manager.num_local_experts).view(-1)  # -1 sorts last
    order = torch.argsort(keys, stable=True)[:int(manager.tokens_per_expert.sum())]
    token = torch.div(order, topk, rounding_mode="floor")
    manager.hidden_shape_before_permute = hidden_states.shape
    manager.reversed_mapping_for_combine = token
    manager.pad_offsets = None
    permuted_probs = probs.reshape(-1).index_select(0, order)
    if manager.router_dtype == "fp64":
        permuted_probs = permuted_probs.to(torch.float64)
    return hidden_states.index_select(0, token), permuted_probs


def restore_by_experts(manager, hidden_states):
    """_DeepepManager.get_restored_hidden_states_by_experts after permute_by_experts: Megatron's
    unpermute (sum of each row's expert outputs back into its place, no probabilities) over the
    row of every permuted entry; Megatron's own method after its own permute."""
    if _megatrons_permute_configured(manager):
        return _megatron_restore(manager, hidden_states)
    from megatron.core.transformer.moe.moe_utils import unpermute

    return unpermute(hidden_states, manager.reversed_mapping_for_combine,
                     restore_shape=manager.hidden_shape_before_permute)


def set_deepep_num_sms(num_sms: int) -> None:
    """Megatron's set_deepep_num_sms: CTAs per HT kernel for Buffers created afterwards."""
    from .torch import Buffer

    Buffer.set_num_sms(num_sms)


def destroy() -> None:
    """Collective: destroys every Buffer that fused_dispatch created (call it on every rank before
    destroying the process groups); a later dispatch creates new ones."""
    for buf in _BUFFERS.values():
        buf.destroy()
    _BUFFERS.clear()
    _BY_GROUP.clear()


def patch(max_tokens_per_rank: Optional[int] = None, sync_free_multihot: bool = True,
          direct_permute: bool = True) -> None:
    """Rebinds megatron-core's DeepEP entry points to nccl-moe (idempotent). Call it before the
    model is built. max_tokens_per_rank: fixes the Buffers' token bound (default: measured).
    sync_free_multihot: _DeepepManager._indices_to_multihot becomes indices_to_multihot (True) or
    stays / becomes Megatron's own again (False). direct_permute: the manager's
    get_permuted / get_restored_hidden_states_by_experts become permute_by_experts /
    restore_by_experts (True; no multi-hot map at all) or Megatron's own (False). Both False:
    Megatron's path unchanged after fused_dispatch (for A/B timing)."""
    global _max_tokens_per_rank, _megatron_multihot, _megatron_permute, _megatron_restore
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher

    _max_tokens_per_rank = max_tokens_per_rank
    for module in (fused_a2a, token_dispatcher):
        module.fused_dispatch = fused_dispatch
        module.fused_combine = fused_combine
        module.set_deepep_num_sms = set_deepep_num_sms
    fused_a2a.HAVE_DEEP_EP = True
    manager = token_dispatcher._DeepepManager
    if _megatron_multihot is None:
        _megatron_multihot = manager._indices_to_multihot
        _megatron_permute = manager.get_permuted_hidden_states_by_experts
        _megatron_restore = manager.get_restored_hidden_states_by_experts
    manager._indices_to_multihot = indices_to_multihot if sync_free_multihot else _megatron_multihot
    manager.get_permuted_hidden_states_by_experts = permute_by_experts if direct_permute else _megatron_permute
    manager.get_restored_hidden_states_by_experts = restore_by_experts if direct_permute else _megatron_restore
