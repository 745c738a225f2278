"""nccl-moe for PyTorch: a DeepEP-style Buffer, events, custom ops and autograd functions.

Importing this module imports torch (and registers the nccl_moe:: custom ops); everything else
of nccl_moe works without torch.
"""
from .buffer import Buffer
from .events import EventOverlap, capture
from .handles import Handle, LowLatencyHandle
from .ops import combine, dispatch

__all__ = ["Buffer", "EventOverlap", "Handle", "LowLatencyHandle",
           "capture", "combine", "dispatch"]
