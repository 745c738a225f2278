"""The torch side without a GPU: the module imports, registers its custom ops, and the handle pool
releases what it does not keep (skipped without torch)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")


def test_custom_ops_registered():
    import nccl_moe.torch  # noqa: F401
    for name in ("dispatch", "combine", "cached_dispatch"):
        assert hasattr(torch.ops.nccl_moe, name)


def test_combine_with_weights_op_registered():
    import nccl_moe.torch  # noqa: F401
    assert hasattr(torch.ops.nccl_moe, "combine_with_weights")


def test_full_pool_releases_in_stream_order(monkeypatch):
    """A handle given back to a full pool is released on the context's stream, not destroyed."""
    from nccl_moe.torch import _context
    calls = []
    monkeypatch.setattr(_context._api, "handle_release", lambda h, s: calls.append(("release", h, s)))
    monkeypatch.setattr(_context._api, "handle_destroy", lambda h: calls.append(("destroy", h)))
    ctx = _context.Context.__new__(_context.Context)
    ctx.ptr, ctx.stream, ctx._pool, ctx._created = 1, 77, [], []
    handles = list(range(100, 100 + _context.MAX_POOLED + 2))
    for h in handles:
        ctx.adopt(h)
    for h in handles:
        ctx.give_back(h)
    assert ctx._pool == handles[:_context.MAX_POOLED]
    assert calls == [("release", h, 77) for h in handles[_context.MAX_POOLED:]]
    assert ctx._created == handles[:_context.MAX_POOLED]


def test_version_pairs_named_in_the_mismatch_error(monkeypatch):
    from nccl_moe.torch import _comm
    monkeypatch.setattr(_comm, "nccl_versions", lambda: (23007, 23007))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 28, 9))
    with pytest.raises(RuntimeError, match="2.30.7.*2.28.9.*torch 2.11 -> NCCL 2.28"):
        _comm.check_nccl_version()
