"""The C functions of include/nccl_moe.h, declared once and called through `call`.

Every wrapper takes and returns plain Python values: pointers and CUDA streams are integers
(a device address, a cudaStream_t), structs are the classes of _structs. A result other than
ncclSuccess raises NcclMoeError with ncclMoeGetLastError()'s text, read on the calling thread
right after the call (the message is thread-local in the library).
"""
import ctypes
from ctypes import POINTER, byref, c_int, c_size_t, c_uint, c_void_p

from . import _library
from ._structs import ConfigStruct, DispatchOutputStruct, LowLatencyOutputStruct
from .errors import NcclMoeError

_P = c_void_p
_PROTOTYPES = {
    "ncclMoeGetVersion": [POINTER(c_int)],
    "ncclMoeGetNcclVersion": [POINTER(c_int), POINTER(c_int)],
    "ncclMoeGetWindowSize": [POINTER(ConfigStruct), c_int, POINTER(c_size_t)],
    "ncclMoeCommCreate": [_P, POINTER(ConfigStruct), POINTER(c_void_p)],
    "ncclMoeCommDestroy": [_P],
    "ncclMoeCommNodeCount": [_P, POINTER(c_int)],
    "ncclMoeGetLayoutNodes": [_P, _P, c_int, _P, _P, _P, _P, _P, _P],
    "ncclMoeDispatch": [_P, _P, _P, _P, _P, c_int, c_uint, POINTER(c_void_p),
                        POINTER(DispatchOutputStruct), _P],
    "ncclMoeCombine": [_P, _P, _P, _P, _P, _P],
    "ncclMoeCombineWithWeights": [_P, _P, _P, _P, _P, _P, _P, _P],
    "ncclMoeHandleDestroy": [_P],
    "ncclMoeHandleRelease": [_P, _P],
    "ncclMoeLowLatencyDispatch": [_P, _P, _P, _P, c_int, c_uint, POINTER(LowLatencyOutputStruct), _P],
    "ncclMoeLowLatencyDispatchComplete": [_P, POINTER(LowLatencyOutputStruct), _P],
    "ncclMoeLowLatencyCombine": [_P, POINTER(LowLatencyOutputStruct), _P, _P, c_uint, _P],
    "ncclMoeLowLatencyCombineComplete": [_P, POINTER(LowLatencyOutputStruct), _P, _P],
    "ncclMoeCheckErrors": [_P],
    "ncclMoeMarkRankFailed": [_P, c_int],
    "ncclMoeGetFailedRanks": [_P, POINTER(c_int), c_int],
}

_lib = None


def lib() -> ctypes.CDLL:
    """The library with every prototype declared (loads it on first use)."""
    global _lib
    if _lib is None:
        loaded = _library.load()
        for name, argtypes in _PROTOTYPES.items():
            fn = getattr(loaded, name)
            fn.argtypes = argtypes
            fn.restype = c_int
        loaded.ncclMoeGetLastError.argtypes = []
        loaded.ncclMoeGetLastError.restype = ctypes.c_char_p
        _lib = loaded
    return _lib


def last_error() -> str:
    """ncclMoeGetLastError() of this thread ("" if the last call succeeded)."""
    return lib().ncclMoeGetLastError().decode("utf-8", "replace")


def call(name: str, *args) -> None:
    """Calls `name` with `args`; raises NcclMoeError unless it returns ncclSuccess."""
    code = getattr(lib(), name)(*args)
    if code != 0:
        raise NcclMoeError(name, code, last_error())


def get_version() -> int:
    v = c_int()
    call("ncclMoeGetVersion", byref(v))
    return v.value


def get_nccl_version() -> tuple:
    built, loaded = c_int(), c_int()
    call("ncclMoeGetNcclVersion", byref(built), byref(loaded))
    return built.value, loaded.value


def get_window_size(config: ConfigStruct, n_ranks: int) -> int:
    size = c_size_t()
    call("ncclMoeGetWindowSize", byref(config), n_ranks, byref(size))
    return size.value


def comm_create(nccl_comm: int, config: ConfigStruct) -> int:
    out = c_void_p()
    call("ncclMoeCommCreate", nccl_comm, byref(config), byref(out))
    return out.value


def comm_destroy(moe_comm: int) -> None:
    call("ncclMoeCommDestroy", moe_comm)


def comm_node_count(moe_comm) -> int:
    """N, the nodes the EP context spans (1 within one NVLink domain): the length of the layout's
    tokens_per_node."""
    n = c_int()
    call("ncclMoeCommNodeCount", moe_comm, byref(n))
    return n.value


def get_layout(moe_comm, topk_idx, num_tokens, tokens_per_rank, tokens_per_expert,
               is_token_in_rank, tokens_per_node, is_token_in_node, stream) -> None:
    """ncclMoeGetLayoutNodes: counts per rank [R], per expert [E], per node [N] (int32) and the
    [T][R] / [T][N] uint8 flags; is_token_in_rank, tokens_per_node and is_token_in_node may be
    None (NULL)."""
    call("ncclMoeGetLayoutNodes", moe_comm, topk_idx, num_tokens, tokens_per_rank,
         tokens_per_expert, is_token_in_rank, tokens_per_node, is_token_in_node, stream)


def dispatch(moe_comm, x, x_scales, topk_idx, topk_weights, num_tokens, flags, handle: c_void_p,
             out: DispatchOutputStruct, stream) -> None:
    """`handle` is a c_void_p, in/out (None creates one); `out` is filled."""
    call("ncclMoeDispatch", moe_comm, x, x_scales, topk_idx, topk_weights, num_tokens, flags,
         byref(handle), byref(out), stream)


def combine(moe_comm, handle, expert_out, topk_weights, out, stream) -> None:
    call("ncclMoeCombine", moe_comm, handle, expert_out, topk_weights, out, stream)


def combine_with_weights(moe_comm, handle, expert_out, topk_weights, recv_topk_weights,
                         out_topk_weights, out, stream) -> None:
    """ncclMoeCombine that also sums per-row top-k values [rows][K] back to [T][K]."""
    call("ncclMoeCombineWithWeights", moe_comm, handle, expert_out, topk_weights,
         recv_topk_weights, out_topk_weights, out, stream)


def handle_destroy(handle) -> None:
    call("ncclMoeHandleDestroy", handle)


def handle_release(handle, stream) -> None:
    """Frees `handle` once `stream` passes this point (no synchronisation)."""
    call("ncclMoeHandleRelease", handle, stream)


def ll_dispatch(moe_comm, x, topk_idx, topk_weights, num_tokens, flags,
                out: LowLatencyOutputStruct, stream) -> None:
    call("ncclMoeLowLatencyDispatch", moe_comm, x, topk_idx, topk_weights, num_tokens, flags,
         byref(out), stream)


def ll_dispatch_complete(moe_comm, out: LowLatencyOutputStruct, stream) -> None:
    call("ncclMoeLowLatencyDispatchComplete", moe_comm, byref(out), stream)


def ll_combine(moe_comm, dispatched: LowLatencyOutputStruct, expert_out, out, flags, stream) -> None:
    call("ncclMoeLowLatencyCombine", moe_comm, byref(dispatched), expert_out, out, flags, stream)


def ll_combine_complete(moe_comm, dispatched: LowLatencyOutputStruct, out, stream) -> None:
    call("ncclMoeLowLatencyCombineComplete", moe_comm, byref(dispatched), out, stream)


def check_errors(moe_comm) -> None:
    call("ncclMoeCheckErrors", moe_comm)


def mark_rank_failed(moe_comm, rank: int) -> None:
    """Puts `rank` into the LL context's failed-rank set (host-only, local to this rank)."""
    call("ncclMoeMarkRankFailed", moe_comm, rank)


def get_failed_ranks(moe_comm, n_ranks: int) -> list:
    """The LL context's failed-rank set as a list of n_ranks 0/1 ints (no synchronisation)."""
    failed = (c_int * n_ranks)()
    call("ncclMoeGetFailedRanks", moe_comm, failed, n_ranks)
    return list(failed)
