"""The torch side without a GPU: the module imports, registers its custom ops, and refuses a
topk-weights reduction with the name of the missing C API (skipped without torch)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")


def test_custom_ops_registered():
    import nccl_moe.torch  # noqa: F401
    for name in ("dispatch", "combine", "cached_dispatch"):
        assert hasattr(torch.ops.nccl_moe, name)


def test_missing_c_api_is_named():
    from nccl_moe.torch import MISSING_GRAD_TOPK_WEIGHTS
    assert "ncclMoeCombine" in MISSING_GRAD_TOPK_WEIGHTS and "[T][K]" in MISSING_GRAD_TOPK_WEIGHTS


def test_version_pairs_named_in_the_mismatch_error(monkeypatch):
    from nccl_moe.torch import _comm
    monkeypatch.setattr(_comm, "nccl_versions", lambda: (23007, 23007))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 28, 9))
    with pytest.raises(RuntimeError, match="2.30.7.*2.28.9.*torch 2.11 -> NCCL 2.28"):
        _comm.check_nccl_version()
