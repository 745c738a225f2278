"""torch.library custom ops over Buffer's HT calls, with autograd: what torch.compile sees as
single graph nodes, and what `dispatch` / `combine` below (Megatron's FusedDispatch /
FusedCombine semantics) are built from.

A handle crosses the op boundary as a "handle token": a CPU int64 tensor [T + 1] whose element 0
is the handle's key in a registry and whose shape carries T for the fake kernels. The registry
entry (and so the C handle, back to its pool) is dropped when the token tensor is freed. Ops
return copies (never window views): graph outputs must own their memory. The calls run
synchronously with the calling stream.

Autograd (Megatron's FusedDispatch / FusedCombine): backward of dispatch = combine of the
gradient of recv_x (unweighted, as the forward combine), which also sums the gradient of
recv_topk_weights back to topk_weights [T][K] when that is wanted (ncclMoeCombineWithWeights,
DeepEP's combine(topk_weights=...)); backward of combine = cached dispatch of the output
gradient.
"""
import itertools
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .buffer import buffer_by_id
from .handles import Handle

_HANDLES: Dict[int, Handle] = {}
_keys = itertools.count(1)


def _token_of(handle: Handle) -> Tensor:
    key = next(_keys)
    token = torch.empty(handle.num_tokens + 1, dtype=torch.int64)
    token[0] = key
    _HANDLES[key] = handle
    weakref.finalize(token, _HANDLES.pop, key, None)
    return token


def handle_of(token: Tensor) -> Handle:
    """The Handle a handle token stands for."""
    return _HANDLES[int(token[0])]


@torch.library.custom_op("nccl_moe::dispatch", mutates_args=())
def _dispatch_op(x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor],
                 buffer_id: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    buf = buffer_by_id(buffer_id)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, copy_outputs=True)
    if recv_w is None:
        recv_w = torch.zeros(recv_idx.shape, dtype=torch.float32, device=x.device)
    return recv_x, recv_idx, recv_w, torch.tensor(counts, dtype=torch.int64), _token_of(handle)


@_dispatch_op.register_fake
def _(x, topk_idx, topk_weights, buffer_id):
    rows = torch.library.get_ctx().new_dynamic_size()
    buf = buffer_by_id(buffer_id)
    k = topk_idx.shape[1]
    return (x.new_empty((rows, x.shape[1])), topk_idx.new_empty((rows, k)),
            x.new_empty((rows, k), dtype=torch.float32),
            torch.empty(buf.num_experts // buf.group_size, dtype=torch.int64),
            torch.empty(x.shape[0] + 1, dtype=torch.int64))


@torch.library.custom_op("nccl_moe::combine", mutates_args=())
def _combine_op(x: Tensor, handle: Tensor, buffer_id: int) -> Tensor:
    out, _, _ = buffer_by_id(buffer_id).combine(x, handle_of(handle))
    return out


@_combine_op.register_fake
def _(x, handle, buffer_id):
    return x.new_empty((handle.shape[0] - 1, x.shape[1]))


@torch.library.custom_op("nccl_moe::combine_with_weights", mutates_args=())
def _combine_with_weights_op(x: Tensor, topk_weights: Tensor, handle: Tensor,
                             buffer_id: int) -> Tuple[Tensor, Tensor]:
    out, out_weights, _ = buffer_by_id(buffer_id).combine(x, handle_of(handle), topk_weights)
    return out, out_weights


@_combine_with_weights_op.register_fake
def _(x, topk_weights, handle, buffer_id):
    t = handle.shape[0] - 1
    return x.new_empty((t, x.shape[1])), topk_weights.new_empty((t, topk_weights.shape[1]))


@torch.library.custom_op("nccl_moe::cached_dispatch", mutates_args=())
def _cached_dispatch_op(x: Tensor, handle: Tensor, num_rows: int, buffer_id: int) -> Tensor:
    recv_x, *_ = buffer_by_id(buffer_id).dispatch(x, handle=handle_of(handle), copy_outputs=True)
    return recv_x


@_cached_dispatch_op.register_fake
def _(x, handle, num_rows, buffer_id):
    return x.new_empty((num_rows, x.shape[1]))


def _dispatch_setup(ctx, inputs, output):
    ctx.buffer_id = inputs[3]
    ctx.hidden = inputs[0].shape[1]
    ctx.save_for_backward(output[4])


def _dispatch_backward(ctx, grad_x, grad_idx, grad_weights, grad_counts, grad_handle):
    (handle,) = ctx.saved_tensors
    if ctx.needs_input_grad[2] and grad_weights is not None:
        if grad_x is None:
            grad_x = grad_weights.new_zeros((grad_weights.shape[0], ctx.hidden), dtype=torch.bfloat16)
        grad_in, grad_w = torch.ops.nccl_moe.combine_with_weights(
            grad_x.contiguous(), grad_weights.float().contiguous(), handle, ctx.buffer_id)
        return grad_in, None, grad_w, None
    grad_in = None
    if grad_x is not None:
        grad_in = torch.ops.nccl_moe.combine(grad_x.contiguous(), handle, ctx.buffer_id)
    return grad_in, None, None, None


def _combine_setup(ctx, inputs, output):
    x, handle, buffer_id = inputs
    ctx.buffer_id = buffer_id
    ctx.num_rows = x.shape[0]
    ctx.save_for_backward(handle)


def _combine_backward(ctx, grad_out):
    (handle,) = ctx.saved_tensors
    grad_x = torch.ops.nccl_moe.cached_dispatch(grad_out.contiguous(), handle, ctx.num_rows,
                                                ctx.buffer_id)
    return grad_x, None, None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def dispatch(x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], buffer) -> tuple:
    """Differentiable HT dispatch (Megatron's FusedDispatch): x [T][H] BF16, topk_idx [T][K]
    int64, topk_weights [T][K] FP32 or None, buffer: a nccl_moe.torch.Buffer.

    Returns (recv_x [rows][H] BF16, recv_topk_idx [rows][K] int64 (local ids, -1 elsewhere),
    recv_topk_weights [rows][K] FP32 (zeros when no weights were given), tokens_per_expert [L]
    int64 on the CPU, handle token)."""
    return torch.ops.nccl_moe.dispatch(x, topk_idx, topk_weights, buffer.buffer_id)


def combine(x: Tensor, handle: Tensor, buffer) -> Tensor:
    """Differentiable HT combine (Megatron's FusedCombine): x [rows][H] BF16 in the order the
    handle's dispatch (on `buffer`) delivered the rows. Returns [T][H] BF16, the unweighted sum
    per token. (The buffer is passed rather than read from the token: reading a tensor's value
    would break the torch.compile graph.)"""
    return torch.ops.nccl_moe.combine(x, handle, buffer.buffer_id)
