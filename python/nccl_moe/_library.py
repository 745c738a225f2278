"""Finding and loading libnccl_moe.so.

Search order (the first that exists is loaded, once per process):
  1. $NCCL_MOE_LIBRARY, a path to the .so (an error if set and missing: no silent fallback);
  2. nccl_moe/lib/libnccl_moe.so, where `make python` copies it (and `pip install ./python`
     then installs it with the package);
  3. <repository>/build/lib/libnccl_moe.so, when the package is used from a source checkout;
  4. "libnccl_moe.so" through the dynamic loader's search path (LD_LIBRARY_PATH, ldconfig).

The library is loaded lazily, at the first call that needs it, so that a framework that loads
its own NCCL (torch) has done so first: libnccl_moe.so then binds to that libnccl.so.2 (same
soname) instead of the one in its rpath, and both share one NCCL.
"""
import ctypes
import os
from pathlib import Path
from typing import List, Optional

ENV_VAR = "NCCL_MOE_LIBRARY"
LIBRARY_NAME = "libnccl_moe.so"

_loaded: Optional[ctypes.CDLL] = None
_loaded_path: Optional[str] = None


class LibraryNotFoundError(OSError):
    """No libnccl_moe.so could be loaded; the message lists every place tried."""


def candidates() -> List[str]:
    """Paths tried, in order (see the module docstring)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [env]
    here = Path(__file__).resolve().parent
    return [str(here / "lib" / LIBRARY_NAME),
            str(here.parents[1] / "build" / "lib" / LIBRARY_NAME),
            LIBRARY_NAME]


def load() -> ctypes.CDLL:
    """The loaded library (loads it on the first call)."""
    global _loaded, _loaded_path
    if _loaded is not None:
        return _loaded
    tried = []
    for path in candidates():
        is_bare_name = os.sep not in path
        if not is_bare_name and not os.path.exists(path):
            tried.append(f"{path} (missing)")
            continue
        try:
            _loaded = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        _loaded_path = path
        return _loaded
    raise LibraryNotFoundError(
        "libnccl_moe.so not found; build it with `make python` (or set "
        f"{ENV_VAR}=/path/to/libnccl_moe.so). Tried: " + "; ".join(tried))


def loaded_path() -> Optional[str]:
    """Path (or bare name) of the loaded library, None before the first load."""
    return _loaded_path
