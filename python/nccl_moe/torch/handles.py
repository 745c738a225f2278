"""What a dispatch returns for its combine: HT handles and LL handles."""
from typing import Optional

import torch

from .._structs import LowLatencyOutputStruct
from ._context import Context


class Handle:
    """Routing of one high-throughput dispatch, for its combine and its cached dispatch.

    num_tokens: T of the dispatch (rows the combine returns); num_recv_tokens: rows this rank
    received (known on the host: the dispatch asked for host counts, or num_worst_tokens);
    combine_input: [num_recv_tokens][H] BF16 view of the window's combine buffer — expert outputs
    written there are combined without a copy (valid until the context's next dispatch).
    Dropping the object returns the C handle to its context's pool (no device synchronisation).
    """

    def __init__(self, context: Context, ptr: int, num_tokens: int, num_recv_tokens: int,
                 combine_input: torch.Tensor, buffer_id: int):
        self.context = context
        self.ptr = ptr
        self.num_tokens = num_tokens
        self.num_recv_tokens = num_recv_tokens
        self.combine_input = combine_input
        self.buffer_id = buffer_id

    def __del__(self):
        self.context.give_back(self.ptr)


class LowLatencyHandle:
    """One low-latency operation: the C output struct its combine needs, and its views.

    Views (valid until the dispatch `num_buffer_slots` dispatches later on the same context, as
    the library's slots rule): src_token [L][R*M] int32 (row's token on its source rank),
    recv_counts_per_source [L][R] int32 (rows of local expert l from source s lie at
    x[l][s*M : s*M + count]), combine_input [L][R*M][H] BF16 (the slot's combine buffer).
    has_weights: the dispatch carried top-k weights, which its combine applies.
    """

    def __init__(self, context: Context, out: LowLatencyOutputStruct, num_max_tokens: int,
                 has_weights: bool, src_token: torch.Tensor,
                 recv_counts_per_source: torch.Tensor, combine_input: torch.Tensor):
        self.context = context
        self.out = out
        self.num_tokens = out.numTokens
        self.num_max_tokens = num_max_tokens
        self.has_weights = has_weights
        self.src_token = src_token
        self.recv_counts_per_source = recv_counts_per_source
        self.combine_input = combine_input
        self.combine_out: Optional[torch.Tensor] = None
