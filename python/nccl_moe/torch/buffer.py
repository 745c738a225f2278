"""Buffer: DeepEP's Buffer interface (high-throughput part) over nccl-moe EP contexts.

Differences from DeepEP, by design of the C library:
  - sizes come from the shapes given to the constructor, not from byte counts; the EP window of
    each mode is created (collectively) at the first call of that mode;
  - `dispatch` recomputes the layout itself: the layout arguments are accepted and not needed;
  - rows are one per (token, destination rank), ordered by source rank then token, as DeepEP's;
  - `combine` sums rows without weights, as DeepEP's; given `topk_weights` (per-row [rows][K]
    values, the gradient of the received routing weights in a backward) it also sums them back
    to their tokens, [T][K] (ncclMoeCombineWithWeights), as DeepEP's;
  - `config` is accepted and ignored (the SM count is Buffer.num_sms, read at context creation).
Every call runs on the Buffer's communication stream; `previous_event` (or else the calling
stream) orders it, `async_finish=True` returns an EventOverlap instead of making the calling
stream wait. Outputs are allocated on the communication stream and recorded on the calling one
(`allocate_on_comm_stream` is accepted for DeepEP compatibility; allocation is always there).

Lifetimes: HT outputs live in the EP window until the context's next dispatch. With
copy_outputs=True (default) dispatch returns copies, safe to keep across layers (what autograd
needs); with False it returns views into the window (no copy, valid until the next dispatch).
Several operations in flight (two micro-batches): a handle stays combinable after later
dispatches as long as its combine input is not a window view (the library refuses those with
NcclMoeError ncclInvalidUsage: the window holds the latest dispatch's rows); combine copies any
other tensor in.
"""
import itertools
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import _api, _structs
from ..config import Config
from . import _comm
from ._context import Context
from ._tensors import address, require, window_view
from .events import EventOverlap, capture
from .handles import Handle
from .low_latency import LowLatencyMixin

_BUFFERS: Dict[int, "Buffer"] = {}
_ids = itertools.count(1)


def buffer_by_id(buffer_id: int) -> "Buffer":
    """The live Buffer registered under `buffer_id` (what the custom ops carry)."""
    return _BUFFERS[buffer_id]


class Buffer(LowLatencyMixin):
    """EP communication over `group` (a ProcessGroupNCCL, all ranks in one NVLink domain).

    hidden (H), num_experts (E), num_topk (K): the shapes every call uses. max_tokens_per_rank:
    most tokens any rank sends in one HT dispatch (all ranks pass the same value).
    use_fp8: HT dispatch takes (x FP8 e4m3 [T][H], scales FP32 [T][H/128]) instead of BF16.
    output_capacity, timeout_ms: ncclMoeConfig_t's (0 = library default).
    num_buffer_slots: low-latency operations in flight (ncclMoeConfig_t.numBufferSlots).
    ll_num_sms: CTAs of the LL kernels (None: every SM of the device).
    Construction is collective (it materialises the group's communicator).
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], hidden: int, num_experts: int,
                 num_topk: int, max_tokens_per_rank: int, *, use_fp8: bool = False,
                 output_capacity: int = 0, timeout_ms: int = 0, num_buffer_slots: int = 2,
                 ll_num_sms: Optional[int] = None, copy_outputs: bool = True):
        _comm.check_nccl_version()
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.hidden, self.num_experts, self.num_topk = hidden, num_experts, num_topk
        self.max_tokens_per_rank = max_tokens_per_rank
        self.use_fp8 = use_fp8
        self.output_capacity, self.timeout_ms = output_capacity, timeout_ms
        self.num_buffer_slots = num_buffer_slots
        self.ll_num_sms = ll_num_sms
        self.copy_outputs = copy_outputs
        self._nccl_comm = _comm.nccl_comm_of(self.group)
        self._comm_stream = torch.cuda.Stream()
        self._ht_context: Optional[Context] = None
        self._ll_contexts: Dict[tuple, Context] = {}
        self._ll_masked: set = set()  # ranks masked on this rank (low_latency_update_mask_buffer)
        self.buffer_id = next(_ids)
        _BUFFERS[self.buffer_id] = self

    # --- DeepEP's static helpers -----------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """CTAs of the HT kernels of contexts created from now on (ncclMoeConfig_t.numSms)."""
        if new_num_sms < 1:
            raise ValueError(f"num_sms = {new_num_sms} must be >= 1")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return capture()

    def get_comm_stream(self) -> torch.cuda.Stream:
        return self._comm_stream

    # --- contexts --------------------------------------------------------------------------
    def _create_context(self, config: Config) -> Context:
        return Context(self._nccl_comm, config, self.group_size, self._comm_stream.cuda_stream)

    def _ht(self) -> Context:
        if self._ht_context is None:
            self._ht_context = self._create_context(Config(
                num_experts=self.num_experts, hidden=self.hidden, top_k=self.num_topk,
                max_tokens_per_rank=self.max_tokens_per_rank,
                dispatch_dtype="fp8_e4m3" if self.use_fp8 else "bf16", num_sms=Buffer.num_sms,
                output_capacity=self.output_capacity, timeout_ms=self.timeout_ms))
        return self._ht_context

    def destroy(self) -> None:
        """Collective: frees every EP context (and its window). Call it on every rank before
        destroying the process group; afterwards the Buffer cannot be used."""
        for ctx in [self._ht_context, *self._ll_contexts.values()]:
            if ctx is not None:
                ctx.destroy()
        self._ht_context = None
        self._ll_contexts.clear()
        _BUFFERS.pop(self.buffer_id, None)

    def check_errors(self) -> None:
        """Raises NcclMoeError for an error a kernel found (ncclMoeCheckErrors, no sync)."""
        for ctx in [self._ht_context, *self._ll_contexts.values()]:
            if ctx is not None:
                _api.check_errors(ctx.ptr)

    # --- stream discipline -----------------------------------------------------------------
    def _begin(self, previous_event: Optional[EventOverlap]) -> torch.cuda.Stream:
        comm = self._comm_stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(torch.cuda.current_stream())
        return comm

    def _finish(self, compute: torch.cuda.Stream, inputs: List[Optional[torch.Tensor]],
                outputs: List[Optional[torch.Tensor]], async_finish: bool) -> EventOverlap:
        """Inputs (calling-stream memory) recorded on the comm stream, outputs (comm-stream
        memory) on the calling one, then the event; waits unless async_finish."""
        comm = self._comm_stream
        for t in inputs:
            if t is not None:
                t.record_stream(comm)
        for t in outputs:
            if t is not None:
                t.record_stream(compute)
        event = torch.cuda.Event()
        event.record(comm)
        if async_finish:
            return EventOverlap(event, [t for t in inputs + outputs if t is not None])
        compute.wait_event(event)
        return EventOverlap(event)

    # --- high-throughput -------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Routing statistics of topk_idx [T][K] int64 (-1 = none), ncclMoeGetLayoutNodes, in
        one kernel.

        Returns (num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [N] int32,
        num_tokens_per_expert [E] int32, is_token_in_rank [T][R] bool, event), as DeepEP. N is
        the number of nodes of the group (1 within one NVLink domain); num_tokens_per_rdma_rank[n]
        counts the tokens with an expert on any rank of node n, once per token. dispatch() does
        not need them."""
        if num_experts != self.num_experts:
            raise ValueError(f"num_experts = {num_experts}, the Buffer was made for {self.num_experts}")
        require(topk_idx, "topk_idx", torch.int64, [None, self.num_topk])
        ctx, compute = self._ht(), torch.cuda.current_stream()
        nodes = _api.comm_node_count(ctx.ptr)
        comm = self._begin(previous_event)
        t = topk_idx.shape[0]
        with torch.cuda.stream(comm):
            per_rank = torch.empty(self.group_size, dtype=torch.int32, device=ctx.device)
            per_node = torch.empty(nodes, dtype=torch.int32, device=ctx.device)
            per_expert = torch.empty(self.num_experts, dtype=torch.int32, device=ctx.device)
            in_rank = torch.empty((t, self.group_size), dtype=torch.bool, device=ctx.device)
            _api.get_layout(ctx.ptr, topk_idx.data_ptr(), t, per_rank.data_ptr(),
                            per_expert.data_ptr(), in_rank.data_ptr(), per_node.data_ptr(), None,
                            comm.cuda_stream)
        event = self._finish(compute, [topk_idx], [per_rank, per_node, per_expert, in_rank],
                             async_finish)
        return per_rank, per_node, per_expert, in_rank, event

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[Handle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config=None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, copy_outputs: Optional[bool] = None):
        """Sends each token to every rank that owns one of its experts (ncclMoeDispatch).

        x: [T][H] BF16, or (x [T][H] FP8 e4m3, scales [T][H/128] FP32) when use_fp8.
        topk_idx [T][K] int64 and topk_weights [T][K] FP32 (optional) for a fresh dispatch;
        handle (with topk_idx/topk_weights None) for a cached dispatch (the backward pass: same
        routing, other data, no host synchronisation).
        num_worst_tokens > 0: no host synchronisation; outputs have num_worst_tokens rows (at most
        the window's capacity), of which the first *numRecvTokens are valid, and the count list
        is empty.

        Returns (recv_x [rows][H] (a tuple with recv_scales [rows][H/128] for FP8),
        recv_topk_idx [rows][K] int64 (local expert id or -1), recv_topk_weights [rows][K] FP32
        or None, num_recv_tokens_per_expert_list (rows per local expert, each rounded up to
        expert_alignment), handle, event); the cached form returns (recv_x, None, None, None,
        None, event). Copies or window views as copy_outputs (None: the Buffer's setting).
        """
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        if (x_scales is not None) != self.use_fp8:
            raise ValueError("x must be (fp8 x, scales) exactly when the Buffer has use_fp8=True")
        require(x, "x", torch.float8_e4m3fn if self.use_fp8 else torch.bfloat16, [None, self.hidden])
        num_tokens = x.shape[0]
        if x_scales is not None:
            require(x_scales, "x scales", torch.float32, [num_tokens, self.hidden // 128])
        cached = handle is not None
        if cached:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle given) takes no topk_idx / topk_weights")
            if num_tokens != handle.num_tokens:
                raise ValueError(f"x has {num_tokens} tokens, the handle's dispatch had {handle.num_tokens}")
        else:
            if topk_idx is None:
                raise ValueError("dispatch needs topk_idx (or a handle for a cached dispatch)")
            require(topk_idx, "topk_idx", torch.int64, [num_tokens, self.num_topk])
            if topk_weights is not None:
                require(topk_weights, "topk_weights", torch.float32, [num_tokens, self.num_topk])
            if num_tokens > self.max_tokens_per_rank:
                raise ValueError(f"{num_tokens} tokens > max_tokens_per_rank = "
                                 f"{self.max_tokens_per_rank} of this Buffer")
        copy = self.copy_outputs if copy_outputs is None else copy_outputs
        ctx, compute = self._ht(), torch.cuda.current_stream()
        comm = self._begin(previous_event)
        c_handle = _structs.ctypes.c_void_p(handle.ptr) if cached else ctx.take_handle()
        pooled = c_handle.value
        host_counts = not cached and num_worst_tokens == 0
        out = _structs.DispatchOutputStruct()
        try:
            _api.dispatch(ctx.ptr, x.data_ptr(), address(x_scales), address(topk_idx),
                          address(topk_weights), num_tokens,
                          _structs.DISPATCH_HOST_COUNTS if host_counts else 0, c_handle, out,
                          comm.cuda_stream)
        except Exception:
            if not cached and pooled is not None:
                ctx.give_back(pooled)
            raise
        if not cached:
            ctx.adopt(c_handle.value)
        rows = (out.hostNumRecvTokens if host_counts
                else handle.num_recv_tokens if cached else num_worst_tokens)
        h, k, dev = self.hidden, self.num_topk, ctx.device
        views = [window_view(out.x, (rows, h), x.dtype, dev, ctx)]
        if self.use_fp8:
            views.append(window_view(out.xScales, (rows, h // 128), torch.float32, dev, ctx))
        if not cached:
            views.append(window_view(out.topkIdx, (rows, k), torch.int64, dev, ctx))
            if topk_weights is not None:
                views.append(window_view(out.topkWeights, (rows, k), torch.float32, dev, ctx))
        if copy:
            with torch.cuda.stream(comm):
                views = [v.clone() for v in views]
        event = self._finish(compute, [x, x_scales, topk_idx, topk_weights],
                             views if copy else [], async_finish)
        recv_x = (views[0], views[1]) if self.use_fp8 else views[0]
        if cached:
            return recv_x, None, None, None, None, event
        rest = views[2 if self.use_fp8 else 1:]
        recv_idx = rest[0]
        recv_weights = rest[1] if topk_weights is not None else None
        counts = ([-(-out.hostExpertCounts[i] // expert_alignment) * expert_alignment
                   for i in range(ctx.local_experts)] if host_counts else [])
        combine_input = window_view(out.combineInput, (rows, h), torch.bfloat16, dev, ctx)
        new_handle = Handle(ctx, c_handle.value, num_tokens, rows, combine_input, self.buffer_id)
        return recv_x, recv_idx, recv_weights, counts, new_handle, event

    def combine(self, x: torch.Tensor, handle: Handle, topk_weights: Optional[torch.Tensor] = None,
                bias=None, config=None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns each rank's rows to their source and sums them per token, without weights
        (ncclMoeCombine; FP32 accumulation in rank order, bitwise deterministic).

        x: [rows][H] BF16, rows as the handle's dispatch delivered them (handle.combine_input
        or a BF16 recv_x view is read in place, any other tensor is copied into the window).
        topk_weights: None, or per-row values [rows][K] FP32 (DeepEP's combine input: in a
        backward, the gradient of recv_topk_weights); they are summed back to their tokens in
        rank order (ncclMoeCombineWithWeights).
        bias: None, a [T][H] BF16 tensor or a pair of them, added to the result.
        Returns (combined_x [T][H] BF16, combined_topk_weights [T][K] FP32 or None, event).
        A handle older than the context's latest dispatch needs x outside the window.
        """
        require(x, "x", torch.bfloat16, [handle.num_recv_tokens, self.hidden])
        if topk_weights is not None:
            require(topk_weights, "topk_weights", torch.float32, [handle.num_recv_tokens, self.num_topk])
        ctx, compute = self._ht(), torch.cuda.current_stream()
        if handle.context is not ctx:
            raise ValueError("the handle belongs to another Buffer")
        comm = self._begin(previous_event)
        with torch.cuda.stream(comm):
            out = torch.empty((handle.num_tokens, self.hidden), dtype=torch.bfloat16, device=ctx.device)
            out_weights = None
            if topk_weights is None:
                _api.combine(ctx.ptr, handle.ptr, x.data_ptr(), None, out.data_ptr(), comm.cuda_stream)
            else:
                out_weights = torch.empty((handle.num_tokens, self.num_topk), dtype=torch.float32,
                                          device=ctx.device)
                _api.combine_with_weights(ctx.ptr, handle.ptr, x.data_ptr(), None,
                                          topk_weights.data_ptr(), out_weights.data_ptr(),
                                          out.data_ptr(), comm.cuda_stream)
            biases = [b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None]
            for b in biases:
                out.add_(b)
        event = self._finish(compute, [x, topk_weights, *biases], [out, out_weights], async_finish)
        return out, out_weights, event
