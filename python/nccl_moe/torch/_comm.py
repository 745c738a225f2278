"""The process group's own NCCL communicator, and the NCCL version rule.

nccl-moe reuses the ncclComm_t that torch's ProcessGroupNCCL already has (no second
communicator): `group._get_backend(cuda).\\_comm_ptr()` returns its address as an int. torch
creates that communicator lazily, so one small all_reduce on the current device materialises it
first. The library's kernels embed NCCL's device structs: it runs only on the NCCL major.minor it
was built against, which must be the NCCL torch loaded.
"""
import torch
import torch.distributed as dist

from ..version import decode, nccl_versions

# torch releases and the NCCL line their wheels load (README, "NCCL versions").
TORCH_NCCL_PAIRS = "torch 2.11 -> NCCL 2.28, torch 2.12/2.13 -> 2.29, torch 2.14/2.15 -> 2.30"


def check_nccl_version() -> None:
    """Raises RuntimeError when torch's NCCL and the library's build differ in major.minor."""
    torch_nccl = torch.cuda.nccl.version()  # (major, minor, patch)
    built, loaded = nccl_versions()
    built_line = (built // 10000, built // 100 % 100)
    if tuple(torch_nccl[:2]) != built_line:
        raise RuntimeError(
            f"nccl-moe was built against NCCL {decode(built)} but torch {torch.__version__} loaded "
            f"NCCL {'.'.join(map(str, torch_nccl))}: the library runs only on its build's "
            f"major.minor. Rebuild it with `make deps NCCL_VERSION=<torch's> && make python "
            f"NCCL_VERSION=<torch's>` ({TORCH_NCCL_PAIRS}).")
    if (loaded // 10000, loaded // 100 % 100) != tuple(torch_nccl[:2]):
        raise RuntimeError(
            f"libnccl_moe.so runs on NCCL {decode(loaded)}, torch on "
            f"{'.'.join(map(str, torch_nccl))}: import torch before the first nccl_moe call so "
            f"that both bind to one libnccl.so.2")


def nccl_comm_of(group) -> int:
    """Address of `group`'s ncclComm_t on the current CUDA device (materialised here)."""
    group = group if group is not None else dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device())
    probe = torch.zeros(1, device=device)
    dist.all_reduce(probe, group=group)
    torch.cuda.current_stream().synchronize()
    backend = group._get_backend(device)
    if not hasattr(backend, "_comm_ptr"):
        raise RuntimeError(f"process group backend {type(backend).__name__} is not "
                           "ProcessGroupNCCL (nccl-moe needs an NCCL group)")
    ptr = int(backend._comm_ptr())
    if ptr == 0:
        raise RuntimeError("ProcessGroupNCCL returned a NULL communicator after an all_reduce")
    return ptr
