"""Versions: of the loaded library, and of the NCCL it was built for and runs on."""
from . import _api


def decode(code: int) -> str:
    """An NCCL_VERSION_CODE-style number as "major.minor.patch" (23007 -> "2.30.7")."""
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def library_version() -> str:
    """NCCL_MOE_VERSION_CODE of the loaded libnccl_moe.so, as "0.1.0"."""
    return decode(_api.get_version())


def nccl_versions() -> tuple:
    """(built, loaded): the NCCL codes the library was compiled against and the NCCL loaded in
    this process (ncclGetVersion), e.g. (22809, 22809). The library runs only when both have the
    same major.minor."""
    return _api.get_nccl_version()
