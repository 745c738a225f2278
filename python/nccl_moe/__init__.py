"""nccl-moe for Python: a ctypes binding of include/nccl_moe.h.

Importing this package needs neither torch nor a GPU nor the library itself (it is loaded at the
first call, see nccl_moe._library). PyTorch support lives in `nccl_moe.torch` and the Megatron-LM
adapter in `nccl_moe.megatron`; both import torch when they are imported.
"""
from ._library import LibraryNotFoundError
from ._structs import HEADER_VERSION
from .config import Config, window_size
from .errors import NcclMoeError
from .version import library_version, nccl_versions

__version__ = "0.1.0"
__all__ = ["Config", "HEADER_VERSION", "LibraryNotFoundError", "NcclMoeError", "library_version",
           "nccl_versions", "window_size"]
