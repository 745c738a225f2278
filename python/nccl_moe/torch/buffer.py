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

Streams of the HT calls (get_dispatch_layout, dispatch, combine):
  - by default every call runs on the Buffer's communication stream; `previous_event` (or else
    the calling stream) orders it, `async_finish=True` returns an EventOverlap instead of making
    the calling stream wait. Outputs are allocated on the communication stream and recorded on
    the calling one (`allocate_on_comm_stream` is accepted for DeepEP compatibility; allocation
    is always there);
  - with Buffer(..., calling_stream=True), a call given neither a previous_event (with an event)
    nor async_finish=True runs on the calling stream itself: no communication stream, no
    wait_stream / record_stream / event / stream switch; outputs are allocated (and copied) on
    the calling stream, which is where the result is ordered; the returned EventOverlap holds no
    event. A call that asks for an event or async_finish still takes the communication stream.
The library needs the HT calls of one context to run on the device in call order: whenever a
call runs on another stream than the previous HT call (calling stream changed, or a switch
between the two kinds above), that stream first waits for the previous one, and the context's
handle releases follow the stream of the latest call.

Lifetimes: HT outputs live in the EP window until the context's next dispatch. With
copy_outputs=True (default) dispatch returns copies, safe to keep across layers (what autograd
needs); with False it returns views into the window (no copy, valid until the next dispatch).
Several operations in flight (two micro-batches): a handle stays combinable after later
dispatches as long as its combine input is not a window view (the library refuses those with
NcclMoeError ncclInvalidUsage: the window holds the latest dispatch's rows); combine copies any
other tensor in.

Validation: every tensor a call takes is checked (dtype, shape, contiguity, and that it lies on
the Buffer's device: the current CUDA device when the Buffer was built) before anything is
enqueued or created, with a ValueError naming it.
"""
import contextlib
import itertools
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import _api, _structs
from ..config import Config
from . import _comm
from ._context import Context
from ._tensors import address, raw_stream, window_view
from .events import EventOverlap, capture
from .handles import Handle
from .low_latency import LowLatencyMixin

_BUFFERS: Dict[int, "Buffer"] = {}
_ids = itertools.count(1)
_NO_EVENT = EventOverlap()           # returned by every calling-stream call: holds no event
_NO_SWITCH = contextlib.nullcontext()  # (stateless, reusable)


def _refuse(t: torch.Tensor, name: str, dtype: torch.dtype, rows: Optional[int], cols: int,
            device: torch.device) -> None:
    raise ValueError(f"{name}: expected a contiguous {dtype} tensor "
                     f"[{'*' if rows is None else rows}x{cols}] on {device}, got {t.dtype} "
                     f"{list(t.shape)} on {t.device}"
                     f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, rows: Optional[int], cols: int,
           device: torch.device) -> None:
    """ValueError unless `t` is a contiguous `dtype` tensor [rows][cols] (rows None: any) on
    `device` (a handful of attribute reads: it runs for every tensor of every call)."""
    shape = t.shape
    if (t.dtype != dtype or len(shape) != 2 or shape[1] != cols
            or (rows is not None and shape[0] != rows) or t.device != device
            or not t.is_contiguous()):
        _refuse(t, name, dtype, rows, cols, device)


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
    copy_outputs: dispatch returns copies (True) or window views (False) unless a call says.
    calling_stream: HT calls that ask for no event run on the calling stream (module docstring).
    Construction is collective (it materialises the group's communicator); the Buffer's device
    is the current CUDA device then.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], hidden: int, num_experts: int,
                 num_topk: int, max_tokens_per_rank: int, *, use_fp8: bool = False,
                 output_capacity: int = 0, timeout_ms: int = 0, num_buffer_slots: int = 2,
                 ll_num_sms: Optional[int] = None, copy_outputs: bool = True,
                 calling_stream: bool = False):
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
        self.calling_stream = calling_stream
        # the device of the window and of every tensor an HT call takes (checked)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._nccl_comm = _comm.nccl_comm_of(self.group)
        self._comm_stream = torch.cuda.Stream()
        self._ht_context: Optional[Context] = None
        self._ll_contexts: Dict[tuple, Context] = {}
        self._ll_masked: set = set()  # ranks masked on this rank (low_latency_update_mask_buffer)
        self._ht_last: Optional[torch.cuda.Stream] = None  # stream of the latest HT call
        self._ht_last_raw: Optional[int] = None             # and its cudaStream_t
        self._views: Dict[tuple, torch.Tensor] = {}         # (address, width, dtype) -> view
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
        self._views.clear()  # no cached view outlives the window
        _BUFFERS.pop(self.buffer_id, None)

    def check_errors(self) -> None:
        """Raises NcclMoeError for an error a kernel found (ncclMoeCheckErrors, no sync)."""
        for ctx in [self._ht_context, *self._ll_contexts.values()]:
            if ctx is not None:
                _api.check_errors(ctx.ptr)

    # --- stream discipline (HT calls) -------------------------------------------------------
    def _streams(self, ctx: Context, previous_event: Optional[EventOverlap], async_finish: bool):
        """(raw, compute): the cudaStream_t this HT call runs on, and the calling stream when
        that is the communication stream (None when the call runs on the calling stream). The
        communication stream waits for previous_event's event, or else for the calling stream;
        either stream first waits for the previous HT call's stream if that was another one."""
        event = None if previous_event is None else previous_event.event
        if self.calling_stream and event is None and not async_finish:
            raw = raw_stream(self._device.index)
            if raw != self._ht_last_raw:
                self._switch(ctx, torch.cuda.current_stream(self._device), raw)
            return raw, None
        compute, comm = torch.cuda.current_stream(), self._comm_stream
        if event is not None:
            comm.wait_event(event)
        else:
            comm.wait_stream(compute)
        raw = comm.cuda_stream
        if raw != self._ht_last_raw:
            self._switch(ctx, comm, raw)
        return raw, compute

    def _switch(self, ctx: Context, stream: torch.cuda.Stream, raw: int) -> None:
        """HT calls move to `stream`: it waits for the previous one (the library's call order),
        and the context's handle releases go there (after every use of any handle)."""
        if self._ht_last is not None:
            stream.wait_stream(self._ht_last)
        self._ht_last, self._ht_last_raw = stream, raw
        ctx.stream = raw

    def _on(self, compute: Optional[torch.cuda.Stream]):
        """The stream context that allocations of a call running on `_streams`' stream need."""
        return _NO_SWITCH if compute is None else torch.cuda.stream(self._comm_stream)

    def _finish(self, compute: Optional[torch.cuda.Stream], inputs: List[Optional[torch.Tensor]],
                outputs: List[Optional[torch.Tensor]], async_finish: bool) -> EventOverlap:
        """Communication stream (compute given): inputs (calling-stream memory) recorded on the
        comm stream, outputs (comm-stream memory) on the calling one, then the event; waits
        unless async_finish. Calling stream (compute None): nothing to do, no event."""
        if compute is None:
            return _NO_EVENT
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

    def _region(self, ctx: Context, ptr: int, rows: int, width: int,
                dtype: torch.dtype) -> torch.Tensor:
        """A window tensor [>= rows][width] at `ptr` (window_view's), with one dict look-up in the
        steady state: the one of the most rows asked so far is kept per region (regions never
        move while the context lives; destroy() forgets them). 0 rows: a fresh empty tensor."""
        key = (ptr, width, dtype)
        full = self._views.get(key)
        if full is None or rows == 0 or full.shape[0] < rows:
            full = window_view(ptr, (rows, width), dtype, ctx.device, ctx)
            if rows:
                self._views[key] = full
        return full

    def _rows(self, ctx: Context, ptr: int, rows: int, width: int, dtype: torch.dtype,
              copy: bool) -> torch.Tensor:
        """Rows [0, rows) of a window region: a copy (one narrow_copy, on the current stream) or
        a view."""
        full = self._region(ctx, ptr, rows, width, dtype)
        if copy:
            return full.narrow_copy(0, 0, rows)
        return full if full.shape[0] == rows else full[:rows]

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
        _check(topk_idx, "topk_idx", torch.int64, None, self.num_topk, self._device)
        ctx = self._ht()
        nodes = _api.comm_node_count(ctx.ptr)
        raw, compute = self._streams(ctx, previous_event, async_finish)
        t, dev = topk_idx.shape[0], ctx.device
        with self._on(compute):
            per_rank = torch.empty(self.group_size, dtype=torch.int32, device=dev)
            per_node = torch.empty(nodes, dtype=torch.int32, device=dev)
            per_expert = torch.empty(self.num_experts, dtype=torch.int32, device=dev)
            in_rank = torch.empty((t, self.group_size), dtype=torch.bool, device=dev)
            _api.get_layout(ctx.ptr, topk_idx.data_ptr(), t, per_rank.data_ptr(),
                            per_expert.data_ptr(), in_rank.data_ptr(), per_node.data_ptr(), None,
                            raw)
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
        None, event). Copies (made on the stream the call ran on) or window views as
        copy_outputs (None: the Buffer's setting).
        """
        if isinstance(x, tuple):
            x, x_scales = x
        else:
            x_scales = None
        fp8, dev, h, k = self.use_fp8, self._device, self.hidden, self.num_topk
        if (x_scales is not None) != fp8:
            raise ValueError("x must be (fp8 x, scales) exactly when the Buffer has use_fp8=True")
        _check(x, "x", torch.float8_e4m3fn if fp8 else torch.bfloat16, None, h, dev)
        num_tokens = x.shape[0]
        if x_scales is not None:
            _check(x_scales, "x scales", torch.float32, num_tokens, h // 128, dev)
        cached = handle is not None
        if cached:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle given) takes no topk_idx / topk_weights")
            if num_tokens != handle.num_tokens:
                raise ValueError(f"x has {num_tokens} tokens, the handle's dispatch had {handle.num_tokens}")
        else:
            if topk_idx is None:
                raise ValueError("dispatch needs topk_idx (or a handle for a cached dispatch)")
            _check(topk_idx, "topk_idx", torch.int64, num_tokens, k, dev)
            if topk_weights is not None:
                _check(topk_weights, "topk_weights", torch.float32, num_tokens, k, dev)
            if num_tokens > self.max_tokens_per_rank:
                raise ValueError(f"{num_tokens} tokens > max_tokens_per_rank = "
                                 f"{self.max_tokens_per_rank} of this Buffer")
        copy = self.copy_outputs if copy_outputs is None else copy_outputs
        ctx = self._ht()
        raw, compute = self._streams(ctx, previous_event, async_finish)
        c_handle = _structs.ctypes.c_void_p(handle.ptr) if cached else ctx.take_handle()
        pooled = c_handle.value
        host_counts = not cached and num_worst_tokens == 0
        out = _structs.DispatchOutputStruct()
        try:
            _api.dispatch(ctx.ptr, x.data_ptr(), address(x_scales), address(topk_idx),
                          address(topk_weights), num_tokens,
                          _structs.DISPATCH_HOST_COUNTS if host_counts else 0, c_handle, out, raw)
        except Exception:
            if not cached and pooled is not None:
                ctx.give_back(pooled)
            raise
        if not cached:
            ctx.adopt(c_handle.value)
        rows = (out.hostNumRecvTokens if host_counts
                else handle.num_recv_tokens if cached else num_worst_tokens)
        with self._on(compute if copy else None):  # copies: on the stream the call ran on
            recv_x = self._rows(ctx, out.x, rows, h, x.dtype, copy)
            recv_scales = (self._rows(ctx, out.xScales, rows, h // 128, torch.float32, copy)
                           if fp8 else None)
            recv_idx = recv_weights = None
            if not cached:
                recv_idx = self._rows(ctx, out.topkIdx, rows, k, torch.int64, copy)
                if topk_weights is not None:
                    recv_weights = self._rows(ctx, out.topkWeights, rows, k, torch.float32, copy)
        event = _NO_EVENT
        if compute is not None:
            event = self._finish(compute, [x, x_scales, topk_idx, topk_weights],
                                 [recv_x, recv_scales, recv_idx, recv_weights] if copy else [],
                                 async_finish)
        if fp8:
            recv_x = (recv_x, recv_scales)
        if cached:
            return recv_x, None, None, None, None, event
        counts = []
        if host_counts:  # one slice of the C array (owned by the handle) -> a list
            counts = out.hostExpertCounts[:ctx.local_experts]
            if expert_alignment != 1:
                counts = [-(-c // expert_alignment) * expert_alignment for c in counts]
        combine_input = self._rows(ctx, out.combineInput, rows, h, torch.bfloat16, False)
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
        rows, dev = handle.num_recv_tokens, self._device
        _check(x, "x", torch.bfloat16, rows, self.hidden, dev)
        if topk_weights is not None:
            _check(topk_weights, "topk_weights", torch.float32, rows, self.num_topk, dev)
        ctx = self._ht()
        if handle.context is not ctx:
            raise ValueError("the handle belongs to another Buffer")
        raw, compute = self._streams(ctx, previous_event, async_finish)
        biases = ()
        with self._on(compute):
            out = torch.empty((handle.num_tokens, self.hidden), dtype=torch.bfloat16, device=ctx.device)
            out_weights = None
            if topk_weights is None:
                _api.combine(ctx.ptr, handle.ptr, x.data_ptr(), None, out.data_ptr(), raw)
            else:
                out_weights = torch.empty((handle.num_tokens, self.num_topk), dtype=torch.float32,
                                          device=ctx.device)
                _api.combine_with_weights(ctx.ptr, handle.ptr, x.data_ptr(), None,
                                          topk_weights.data_ptr(), out_weights.data_ptr(),
                                          out.data_ptr(), raw)
            if bias is not None:
                biases = [b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None]
                for b in biases:
                    out.add_(b)
        if compute is None:
            return out, out_weights, _NO_EVENT
        event = self._finish(compute, [x, topk_weights, *biases], [out, out_weights], async_finish)
        return out, out_weights, event
