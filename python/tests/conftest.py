"""Shared helpers of the CPU tests: where the repository and its headers are."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def header_include_dirs():
    """-I folders that nccl_moe.h needs: the repository's include/, NCCL's and CUDA's.
    NCCL_HOME / CUDA_HOME as the Makefile takes them; default .deps/nccl-2.28.9, /usr/local/cuda."""
    nccl = os.environ.get("NCCL_HOME", str(REPO / ".deps" / "nccl-2.28.9"))
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return [str(REPO / "include"), os.path.join(nccl, "include"), os.path.join(cuda, "include")]
