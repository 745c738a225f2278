"""One EP context (ncclMoeComm_t) and its pool of HT handles.

A training step drops one handle per MoE layer, so handles are not freed when their Python
object dies: they return to the context's pool and the next dispatch reuses one (ncclMoeDispatch
recomputes a reused handle's routing). Every call of a Buffer runs on its one communication
stream, so a reuse is stream-ordered after every earlier use. The pool keeps at most MAX_POOLED
handles; one given back beyond that is released in stream order on that stream
(ncclMoeHandleRelease: no synchronisation). The rest are destroyed at `destroy()`, before the
context.
"""
import ctypes
from typing import List, Optional

import torch

from .. import _api
from ..config import Config
from ._tensors import drop_window_views


MAX_POOLED = 8  # idle handles kept for reuse (two micro-batches of a few layers in flight)


class Context:
    """An ncclMoeComm_t created on `nccl_comm` (collective: every rank of the group, same config).

    ptr: the context's address; config: its Config; n_ranks: R; device: its CUDA device;
    local_experts: E / R.
    """

    def __init__(self, nccl_comm: int, config: Config, n_ranks: int, stream: int = 0):
        self.config = config
        self.n_ranks = n_ranks
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.local_experts = config.num_experts // n_ranks
        self.ptr: Optional[int] = _api.comm_create(nccl_comm, config.to_struct())
        self.stream = stream  # cudaStream_t every call on the context runs on (the releases too)
        self._pool: List[int] = []
        self._created: List[int] = []

    @property
    def alive(self) -> bool:
        return self.ptr is not None

    def take_handle(self) -> ctypes.c_void_p:
        """A pooled handle, or a NULL one (the dispatch then creates it: see `adopt`)."""
        return ctypes.c_void_p(self._pool.pop() if self._pool else None)

    def adopt(self, handle: int) -> None:
        """Records a handle the library created, so that destroy() frees it."""
        if handle not in self._created:
            self._created.append(handle)

    def give_back(self, handle: int) -> None:
        """Returns a handle no Python object uses any more to the pool, or releases it (stream
        ordered) when the pool is full. No synchronisation either way."""
        if not self.alive:
            return
        if len(self._pool) < MAX_POOLED:
            self._pool.append(handle)
            return
        self._created.remove(handle)
        _api.handle_release(handle, self.stream)

    def destroy(self) -> None:
        """Collective: destroys every handle (synchronises the device) and then the context."""
        if not self.alive:
            return
        for h in self._created:
            _api.handle_destroy(h)
        self._created.clear()
        self._pool.clear()
        drop_window_views(self)  # no cached view outlives the window
        _api.comm_destroy(self.ptr)
        self.ptr = None
