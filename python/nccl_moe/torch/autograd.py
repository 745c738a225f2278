"""HT dispatch / combine as plain torch.autograd.Function objects: the eager path (what
nccl_moe.megatron uses), without the torch.library custom ops of ops.py and their handle tokens.

Same values, calls and backward semantics as ops.py's custom ops (Megatron's FusedDispatch /
FusedCombine):
  - backward of dispatch = combine of the gradient of recv_x (unweighted, as the forward
    combine); when topk_weights needs a gradient, the combine also sums the gradient of
    recv_topk_weights back to topk_weights [T][K] (ncclMoeCombineWithWeights, DeepEP's
    combine(topk_weights=...)). A gradient that did not flow (output unused) counts as zeros,
    as the custom ops' materialised gradients: the call made depends only on which inputs need
    a gradient, the same on every rank (the library needs the same calls in the same order);
  - backward of combine = cached dispatch of the output gradient with the saved handle.

The Handle object itself is an output of dispatch and is kept in the autograd context (no
registry): its C handle returns to the context's pool once Megatron and the graph drop it.
Outputs are copies (copy_outputs=True): recv_x and the weights outlive later dispatches.
The calls run where the Buffer runs them (Buffer(..., calling_stream=True): on the calling
stream; the backward runs on the stream autograd gives it, the forward's).
Not traceable by torch.compile (use nccl_moe.torch.dispatch / combine there).
"""
import array
from typing import List, Optional

import torch
from torch import Tensor

_BF16, _F32 = torch.bfloat16, torch.float32


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _counts_tensor(counts: List[int]) -> Tensor:
    """torch.tensor(counts, dtype=torch.int64) (CPU), the same values, in one torch call instead
    of four: an int64 tensor over an array that it keeps alive (writable; its storage is not
    resizable, which nothing in Megatron asks for)."""
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", counts), dtype=torch.int64)


class Dispatch(torch.autograd.Function):
    """apply(x [T][H] BF16, topk_idx [T][K] int64, topk_weights [T][K] FP32 or None, buffer)
    -> (recv_x [rows][H] BF16, recv_topk_idx [rows][K] int64, recv_topk_weights [rows][K] FP32
    (zeros when no weights were given), tokens_per_expert [L] int64 on the CPU, Handle)."""

    @staticmethod
    def forward(ctx, x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], buffer):
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, copy_outputs=True)
        if recv_w is None:
            recv_w = torch.zeros(recv_idx.shape, dtype=_F32, device=x.device)
        ctx.set_materialize_grads(False)  # no zero tensors for the integer outputs' gradients
        ctx.buffer, ctx.handle = buffer, handle
        return recv_x, recv_idx, recv_w, _counts_tensor(counts), handle

    @staticmethod
    def backward(ctx, grad_x, grad_idx, grad_weights, grad_counts, grad_handle):
        # Exactly one collective call, as the custom op (whose grads are materialised): combine
        # with weights iff topk_weights needs a gradient, a missing gradient counting as zeros
        # (only those two are made here, not zeros for the integer outputs).
        buffer, handle = ctx.buffer, ctx.handle
        if grad_x is None:
            grad_x = torch.zeros((handle.num_recv_tokens, buffer.hidden), dtype=_BF16,
                                 device=grad_weights.device)
        if not ctx.needs_input_grad[2]:
            return buffer.combine(_contiguous(grad_x), handle)[0], None, None, None
        if grad_weights is None:
            grad_weights = torch.zeros((handle.num_recv_tokens, buffer.num_topk), dtype=_F32,
                                       device=grad_x.device)
        elif grad_weights.dtype != _F32:
            grad_weights = grad_weights.float()
        grad_in, grad_w, _ = buffer.combine(_contiguous(grad_x), handle, _contiguous(grad_weights))
        return grad_in, None, grad_w, None


class Combine(torch.autograd.Function):
    """apply(x [rows][H] BF16 in the order the handle's dispatch delivered the rows, handle,
    buffer) -> [T][H] BF16, the unweighted sum per token."""

    @staticmethod
    def forward(ctx, x: Tensor, handle, buffer):
        out, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return out

    @staticmethod
    def backward(ctx, grad_out):
        recv_x = ctx.buffer.dispatch(_contiguous(grad_out), handle=ctx.handle, copy_outputs=True)[0]
        return recv_x, None, None


def dispatch(x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], buffer) -> tuple:
    """Differentiable HT dispatch (Dispatch.apply); the handle is a Handle object."""
    return Dispatch.apply(x, topk_idx, topk_weights, buffer)


def combine(x: Tensor, handle, buffer) -> Tensor:
    """Differentiable HT combine (Combine.apply) of a Handle from `dispatch`."""
    return Combine.apply(x, handle, buffer)
