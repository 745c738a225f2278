"""Shared helpers of the tests: the checkout's package first on sys.path (the tests test this
tree, installed or not, from any working directory), where the repository and its headers are."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))


def header_include_dirs():
    """-I folders that nccl_moe.h needs: the repository's include/, NCCL's and CUDA's.
    NCCL_HOME / CUDA_HOME as the Makefile takes them; default .deps/nccl-2.28.9, /usr/local/cuda."""
    nccl = os.environ.get("NCCL_HOME", str(REPO / ".deps" / "nccl-2.28.9"))
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return [str(REPO / "include"), os.path.join(nccl, "include"), os.path.join(cuda, "include")]
