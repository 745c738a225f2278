"""Buffer's low-latency methods (DeepEP's low_latency_* names) over LL EP contexts.

They run on the calling stream (as DeepEP's LL kernels do). One LL context (window) exists per
(num_max_dispatch_tokens_per_rank, use_fp8, scale format) used, created collectively at its first
dispatch. Outputs are views into the context's buffer slots, valid until the dispatch
`num_buffer_slots` dispatches later (DeepEP's rule with 2 buffers).

Differences from DeepEP:
  - rows of local expert l from source rank s are x[l][s*M : s*M + recv_counts_per_source[l][s]]
    (M = num_max_dispatch_tokens_per_rank), not packed at the front; recv_count[l] is their sum;
  - FP8 scales are row-major [L][R*M][H/128] (UE8M0: [L][R*M][H/512] int32), not column-major;
  - the combine's weights travel with the dispatch: pass topk_weights= to low_latency_dispatch;
    low_latency_combine then applies them (its own topk_idx / topk_weights are not used);
  - use_logfmt and the *_wait_recv_cost_stats tensors are not supported;
  - the rank mask (low_latency_update_mask_buffer / query / clean) only grows: a masked rank
    cannot be unmasked (nccl_moe.h, "Low-latency fault tolerance"), so mask=False on a masked
    rank and clean with a non-empty mask raise NotImplementedError (create a new Buffer on every
    rank instead). A rank that times out is masked by the library itself.
"""
from typing import Optional

import torch

from .. import _api, _structs
from ..config import Config
from ._tensors import address, raw_stream, require, view_cache, window_view
from .events import EventOverlap
from .handles import LowLatencyHandle


def _event(async_finish: bool, tensors) -> EventOverlap:
    if not async_finish:
        return EventOverlap()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())
    return EventOverlap(event, [t for t in tensors if t is not None])


class LowLatencyMixin:
    """The low-latency half of Buffer (uses its group, shapes and _create_context)."""

    def _ll(self, max_tokens: int, use_fp8: bool, scales: str):
        key = (max_tokens, use_fp8, scales)
        if key not in self._ll_contexts:
            sms = self.ll_num_sms or torch.cuda.get_device_properties(
                torch.cuda.current_device()).multi_processor_count
            self._ll_contexts[key] = self._create_context(Config(
                mode="low_latency", num_experts=self.num_experts, hidden=self.hidden,
                top_k=self.num_topk, max_tokens_per_rank=max_tokens,
                dispatch_dtype="fp8_e4m3" if use_fp8 else "bf16", fp8_scales=scales,
                num_sms=sms, timeout_ms=self.timeout_ms, num_buffer_slots=self.num_buffer_slots))
            for r in sorted(self._ll_masked):  # the Buffer's mask holds for every LL context
                _api.mark_rank_failed(self._ll_contexts[key].ptr, r)
        return self._ll_contexts[key]

    def _ll_slot_views(self, ctx, out, m: int, use_fp8: bool, use_ue8m0: bool):
        """(recv_x (with its scales for FP8), recv_count, src_token, recv_counts_per_source,
        combine_input): views of the buffer slot the dispatch `out` filled (m: the context's
        max tokens per rank). Their shapes are the context's, not the call's, and a context's
        slots never move, so they are built once per slot, in the context's window-view cache
        (key: the slot's x address; drop_window_views forgets them with the rest): six lookups
        fewer per call."""
        cache = view_cache(ctx)
        views = cache.get(("ll slot", out.x))
        if views is None:
            l, r, h, dev = ctx.local_experts, self.group_size, self.hidden, ctx.device
            b = r * m
            x_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
            recv_x = window_view(out.x, (l, b, h), x_dtype, dev, ctx)
            if use_fp8:
                scale_shape, scale_dtype = (((l, b, h // 512), torch.int32) if use_ue8m0
                                            else ((l, b, h // 128), torch.float32))
                recv_x = (recv_x, window_view(out.xScales, scale_shape, scale_dtype, dev, ctx))
            views = cache[("ll slot", out.x)] = (
                recv_x, window_view(out.expertCounts, (l,), torch.int32, dev, ctx),
                window_view(out.srcToken, (l, b), torch.int32, dev, ctx),
                window_view(out.recvCountsPerSource, (l, r), torch.int32, dev, ctx),
                window_view(out.combineInput, (l, b, h), torch.bfloat16, dev, ctx))
        return views

    # --- the rank mask (DeepEP's low_latency_*_mask_buffer) ----------------------------------
    def _ll_mask(self) -> list:
        """The Buffer's mask: ranks masked by the caller, or found failed (timed out) by any of
        its LL contexts; a rank found by one context is masked in the others too."""
        found = {key: _api.get_failed_ranks(ctx.ptr, self.group_size)
                 for key, ctx in self._ll_contexts.items()}
        mask = [1 if r in self._ll_masked else 0 for r in range(self.group_size)]
        for f in found.values():
            mask = [a | b for a, b in zip(mask, f)]
        self._ll_masked.update(r for r, m in enumerate(mask) if m)
        for key, ctx in self._ll_contexts.items():
            for r, m in enumerate(mask):
                if m and not found[key][r]:
                    _api.mark_rank_failed(ctx.ptr, r)
        return mask

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks rank_to_mask (mask=True): later LL operations on this rank neither send to nor
        wait for it; tokens routed only to it combine to zeros. Local to this rank."""
        if not 0 <= rank_to_mask < self.group_size:
            raise ValueError(f"rank_to_mask = {rank_to_mask} is not a rank of the group "
                             f"(0..{self.group_size - 1})")
        if rank_to_mask == self.rank:
            raise ValueError(f"rank_to_mask = {rank_to_mask} is this rank; it cannot mask itself")
        if not mask:
            if self._ll_mask()[rank_to_mask]:
                raise NotImplementedError(
                    f"rank {rank_to_mask} is masked and nccl-moe's mask only grows: create a new "
                    "Buffer on every rank to communicate with it again")
            return
        self._ll_masked.add(rank_to_mask)
        for ctx in self._ll_contexts.values():
            _api.mark_rank_failed(ctx.ptr, rank_to_mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes the mask into mask_status ([group size] integer tensor, any device): 1 for a
        masked rank (by the caller or after a timeout), 0 otherwise. No synchronisation with the
        device beyond the copy into mask_status."""
        if mask_status.numel() != self.group_size:
            raise ValueError(f"mask_status has {mask_status.numel()} elements, the group "
                             f"{self.group_size} ranks")
        mask_status.copy_(torch.tensor(self._ll_mask(), dtype=mask_status.dtype))

    def low_latency_clean_mask_buffer(self) -> None:
        """Nothing to do while no rank is masked; otherwise NotImplementedError (the mask only
        grows: create a new Buffer on every rank)."""
        if any(self._ll_mask()):
            raise NotImplementedError("nccl-moe's rank mask only grows: create a new Buffer on "
                                      "every rank to clear it")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False,
                             topk_weights: Optional[torch.Tensor] = None):
        """Decode-sized dispatch (ncclMoeLowLatencyDispatch) of x [T][H] BF16 with topk_idx
        [T][K] int64 (and topk_weights [T][K] FP32 for a weighted combine).

        use_fp8: cast to FP8 e4m3 in the sending warp; round_scale: power-of-two scales;
        use_ue8m0 (with round_scale): scales as UE8M0 bytes. return_recv_hook: the call only
        sends; hook() (on any later stream) receives. cumulative_local_expert_recv_stats [L]
        int32 gets recv_count added once the data has arrived.
        Returns (recv_x [L][R*M][H] (a tuple with the scales for FP8), recv_count [L] int32,
        handle, event, hook or None).
        """
        if dispatch_wait_recv_cost_stats is not None:
            raise NotImplementedError("dispatch_wait_recv_cost_stats is not supported by nccl-moe")
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0 needs round_scale=True")
        if num_experts != self.num_experts:
            raise ValueError(f"num_experts = {num_experts}, the Buffer was made for {self.num_experts}")
        m = num_max_dispatch_tokens_per_rank
        require(x, "x", torch.bfloat16, [None, self.hidden])
        t = x.shape[0]
        require(topk_idx, "topk_idx", torch.int64, [t, self.num_topk])
        if topk_weights is not None:
            require(topk_weights, "topk_weights", torch.float32, [t, self.num_topk])
        scales = "ue8m0" if use_ue8m0 else "fp32_pow2" if round_scale else "fp32"
        ctx = self._ll(m, use_fp8, scales)
        dev = ctx.device
        out = _structs.LowLatencyOutputStruct()
        _api.ll_dispatch(ctx.ptr, x.data_ptr(), topk_idx.data_ptr(), address(topk_weights), t,
                         _structs.LL_SEND_ONLY if return_recv_hook else 0, out, raw_stream(dev.index))
        recv_x, recv_count, src_token, per_source, combine_input = self._ll_slot_views(
            ctx, out, m, use_fp8, use_ue8m0)
        handle = LowLatencyHandle(ctx, out, m, topk_weights is not None, src_token, per_source,
                                  combine_input)

        def receive():
            _api.ll_dispatch_complete(ctx.ptr, out, raw_stream(dev.index))
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)

        if not return_recv_hook:
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)
        event = _event(async_finish, [x, topk_idx, topk_weights])
        return recv_x, recv_count, handle, event, receive if return_recv_hook else None

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: Optional[torch.Tensor], handle: LowLatencyHandle,
                            use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """Returns expert outputs x [L][R*M][H] BF16 (rows at recv_x's positions; the tensor
        from get_next_low_latency_combine_buffer is read in place) to their source ranks and
        sums them per token with the dispatch's weights (ncclMoeLowLatencyCombine).

        out: [T][H] BF16 to write into (allocated when None). zero_copy is implied by passing
        the combine buffer. return_recv_hook: send only; hook() receives and sums.
        Returns (combined_x [T][H] BF16, event, hook or None).
        """
        if use_logfmt:
            raise NotImplementedError("use_logfmt is not supported by nccl-moe (BF16 combine only)")
        if combine_wait_recv_cost_stats is not None:
            raise NotImplementedError("combine_wait_recv_cost_stats is not supported by nccl-moe")
        if topk_weights is not None and not handle.has_weights:
            raise ValueError("nccl-moe applies the LL combine's weights at dispatch: pass "
                             "topk_weights= to low_latency_dispatch (this one had none)")
        ctx = handle.context
        l, b = ctx.local_experts, self.group_size * handle.num_max_tokens
        require(x, "x", torch.bfloat16, [l, b, self.hidden])
        if out is None:
            out = torch.empty((handle.num_tokens, self.hidden), dtype=torch.bfloat16, device=ctx.device)
        require(out, "out", torch.bfloat16, [handle.num_tokens, self.hidden])
        dev = ctx.device
        _api.ll_combine(ctx.ptr, handle.out, x.data_ptr(), out.data_ptr(),
                        _structs.LL_SEND_ONLY if return_recv_hook else 0, raw_stream(dev.index))

        def receive():
            _api.ll_combine_complete(ctx.ptr, handle.out, out.data_ptr(), raw_stream(dev.index))

        event = _event(async_finish, [x, out])
        return out, event, receive if return_recv_hook else None

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """[L][R*M][H] BF16 view of the operation's combine buffer in the window: expert outputs
        written here are combined without a copy."""
        return handle.combine_input
