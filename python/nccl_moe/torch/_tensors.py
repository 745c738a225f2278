"""Torch tensors over raw device memory (the EP window) and the addresses the C API takes
(tensors' data, the current cudaStream_t: raw_stream(device index), about 0.3 µs where
torch.cuda.current_stream() costs several).

A window view is built through __cuda_array_interface__, so no torch C++ ABI is involved; the
view keeps a reference to its `owner` (the EP context), which therefore outlives it. BF16 and
FP8 have no array-interface type code: they are read as int16 / uint8 and reinterpreted.
"""
from typing import Optional, Sequence

import torch

_CARRIERS = {
    torch.bfloat16: ("<i2", torch.int16),
    torch.float8_e4m3fn: ("|u1", torch.uint8),
    torch.float32: ("<f4", torch.float32),
    torch.int32: ("<i4", torch.int32),
    torch.int64: ("<i8", torch.int64),
}


class _DeviceMemory:
    """A __cuda_array_interface__ (v2, no stream: the caller orders its streams) over `ptr`."""

    def __init__(self, ptr: int, shape: Sequence[int], typestr: str, owner: object):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": tuple(shape),
                                         "typestr": typestr, "version": 2}
        self.owner = owner


def window_view(ptr: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                owner: object) -> torch.Tensor:
    """A contiguous `dtype` tensor of `shape` at device address `ptr` (no copy). Valid as long as
    the memory is (the window's lifetime rules); holds `owner` alive.

    torch.as_tensor over __cuda_array_interface__ costs tens of microseconds, and the window's
    regions never move, so each (ptr, trailing shape, dtype) is built once per owner, with the
    most rows asked so far, in owner._window_views, and later calls take a leading slice of it
    (drop_window_views empties the cache, e.g. before the owner frees the window)."""
    if any(s == 0 for s in shape):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    key = (ptr, tuple(shape[1:]), dtype)
    cache = view_cache(owner)
    full = cache.get(key)
    if full is None or full.shape[0] < shape[0]:
        typestr, carrier = _CARRIERS[dtype]
        full = torch.as_tensor(_DeviceMemory(ptr, shape, typestr, owner), device=device)
        if carrier != dtype:
            full = full.view(dtype)
        cache[key] = full
    return full if full.shape[0] == shape[0] else full[:shape[0]]


def view_cache(owner: object) -> dict:
    """`owner`'s cache of window views (owner._window_views, made at the first use). Callers
    that keep derived views there key them so as not to collide with window_view's
    (ptr, shape[1:], dtype) keys; drop_window_views forgets everything in it."""
    cache = getattr(owner, "_window_views", None)
    if cache is None:
        cache = {}
        setattr(owner, "_window_views", cache)
    return cache


def drop_window_views(owner: object) -> None:
    """Forgets everything in `owner`'s view cache (window_view's views and those derived from
    them, e.g. the LL slot views)."""
    if getattr(owner, "_window_views", None):
        owner._window_views.clear()


try:  # cudaStream_t of the current stream of a device, without building a Stream object
    raw_stream = torch._C._cuda_getCurrentRawStream  # what inductor's generated code calls
except AttributeError:  # a torch built without CUDA
    def raw_stream(device_index: int) -> int:
        return torch.cuda.current_stream(device_index).cuda_stream


def address(t: Optional[torch.Tensor]) -> Optional[int]:
    """Device address of `t`'s first element, None for None."""
    return None if t is None else t.data_ptr()


def require(t: torch.Tensor, name: str, dtype: torch.dtype, shape: Sequence[Optional[int]]) -> None:
    """ValueError unless `t` is a contiguous CUDA tensor of `dtype` whose shape matches `shape`
    (None matches any extent)."""
    ok = (t.is_cuda and t.dtype == dtype and t.is_contiguous() and t.dim() == len(shape)
          and all(s is None or s == d for s, d in zip(shape, t.shape)))
    if not ok:
        want = "x".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected a contiguous CUDA {dtype} tensor [{want}], got "
                         f"{t.dtype} {list(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")
