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


def test_rank_mask_spans_the_ll_contexts_and_only_grows(monkeypatch):
    """DeepEP's mask methods over nccl-moe's failed-rank sets: a mask reaches every LL context
    (and one created later), a rank one context found failed is masked in the others, and
    unmasking a masked rank is refused (the set only grows)."""
    from nccl_moe.torch import low_latency
    sets = {}  # context pointer -> set of failed ranks, as the library would hold them
    monkeypatch.setattr(low_latency._api, "mark_rank_failed", lambda p, r: sets[p].add(r))
    monkeypatch.setattr(low_latency._api, "get_failed_ranks",
                        lambda p, n: [1 if r in sets[p] else 0 for r in range(n)])

    class Ctx:
        def __init__(self, ptr):
            self.ptr = ptr
            sets[ptr] = set()

    buf = low_latency.LowLatencyMixin.__new__(low_latency.LowLatencyMixin)
    buf.rank, buf.group_size, buf._ll_masked = 0, 4, set()
    buf._ll_contexts = {"a": Ctx(1)}
    buf.low_latency_update_mask_buffer(2, mask=True)
    assert sets[1] == {2}
    sets[1].add(3)                      # a timeout in context 1
    buf._ll_contexts["b"] = Ctx(2)
    status = torch.zeros(4, dtype=torch.int32)
    buf.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0, 1, 1]
    assert sets[2] == {2, 3}            # propagated to the other context
    buf.low_latency_update_mask_buffer(1, mask=False)  # not masked: nothing to do
    with pytest.raises(NotImplementedError, match="only grows"):
        buf.low_latency_update_mask_buffer(3, mask=False)
    with pytest.raises(NotImplementedError, match="only grows"):
        buf.low_latency_clean_mask_buffer()
    with pytest.raises(ValueError, match="itself"):
        buf.low_latency_update_mask_buffer(0, mask=True)
    with pytest.raises(ValueError, match="not a rank"):
        buf.low_latency_update_mask_buffer(4, mask=True)


def test_window_views_built_once_per_region(monkeypatch):
    """window_view builds a region's tensor once (torch.as_tensor is the costly part) and slices
    it for fewer rows; more rows rebuild it; drop_window_views forgets them."""
    from nccl_moe.torch import _tensors
    built = []

    def fake_as_tensor(mem, device=None):
        cai = mem.__cuda_array_interface__
        built.append(cai["shape"])
        return torch.zeros(cai["shape"], dtype=torch.int16)

    monkeypatch.setattr(_tensors.torch, "as_tensor", fake_as_tensor)

    class Owner:
        pass

    owner, dev = Owner(), torch.device("cpu")
    a = _tensors.window_view(4096, (8, 16), torch.bfloat16, dev, owner)
    b = _tensors.window_view(4096, (5, 16), torch.bfloat16, dev, owner)
    assert a.shape == (8, 16) and b.shape == (5, 16) and b.dtype == torch.bfloat16
    assert built == [(8, 16)]
    c = _tensors.window_view(4096, (12, 16), torch.bfloat16, dev, owner)
    assert c.shape == (12, 16) and built == [(8, 16), (12, 16)]
    _tensors.window_view(8192, (5, 16), torch.bfloat16, dev, owner)  # another region
    assert len(built) == 3
    _tensors.drop_window_views(owner)
    _tensors.window_view(4096, (5, 16), torch.bfloat16, dev, owner)
    assert len(built) == 4


def _fake_ll(monkeypatch, built):
    """A LowLatencyMixin over a fake LL context on the CPU: window_view records what it builds,
    the C calls and the stream lookup are stubs."""
    from nccl_moe.torch import low_latency

    def fake_view(ptr, shape, dtype, device, owner):
        built.append((ptr, tuple(shape), dtype))
        return torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(low_latency, "window_view", fake_view)

    class Ctx:
        ptr, local_experts, device = 5, 3, torch.device("cpu", 0)

    buf = low_latency.LowLatencyMixin.__new__(low_latency.LowLatencyMixin)
    buf.group_size, buf.hidden, buf.num_topk, buf.num_experts = 2, 1024, 4, 6
    return low_latency, buf, Ctx()


class _Out:
    def __init__(self, base):
        self.x, self.xScales, self.expertCounts = base, base + 1, base + 2
        self.srcToken, self.recvCountsPerSource, self.combineInput = base + 3, base + 4, base + 5
        self.numTokens = 1


def test_ll_slot_views_built_once_per_slot(monkeypatch):
    """The LL dispatch's six views of a slot are built at its first use and reused after (their
    shapes are the context's); another slot builds its own; drop_window_views forgets them."""
    from nccl_moe.torch import _tensors
    built = []
    _, buf, ctx = _fake_ll(monkeypatch, built)
    recv_x, count, src, per_source, comb = buf._ll_slot_views(ctx, _Out(100), 8, True, False)
    assert [b[1] for b in built] == [(3, 16, 1024), (3, 16, 8), (3,), (3, 16), (3, 2), (3, 16, 1024)]
    assert recv_x[0].dtype == torch.float8_e4m3fn and recv_x[1].dtype == torch.float32
    assert buf._ll_slot_views(ctx, _Out(100), 8, True, False)[4] is comb and len(built) == 6
    buf._ll_slot_views(ctx, _Out(200), 8, True, False)
    assert len(built) == 12
    _tensors.drop_window_views(ctx)
    buf._ll_slot_views(ctx, _Out(100), 8, True, False)
    assert len(built) == 18


def test_ll_slot_views_ue8m0_and_bf16(monkeypatch):
    built = []
    _, buf, ctx = _fake_ll(monkeypatch, built)
    recv_x = buf._ll_slot_views(ctx, _Out(100), 4, True, True)[0]
    assert recv_x[1].shape == (3, 8, 2) and recv_x[1].dtype == torch.int32
    recv_x = buf._ll_slot_views(ctx, _Out(300), 4, False, False)[0]
    assert recv_x.dtype == torch.bfloat16 and recv_x.shape == (3, 8, 1024)


def test_ll_calls_run_on_the_context_devices_current_stream(monkeypatch):
    """Dispatch, combine and their hooks pass the raw current stream of the context's device."""
    built, calls = [], []
    low_latency, buf, ctx = _fake_ll(monkeypatch, built)
    monkeypatch.setattr(low_latency, "require", lambda *a: None)
    monkeypatch.setattr(low_latency, "raw_stream", lambda index: 9000 + index)
    monkeypatch.setattr(buf.__class__, "_ll", lambda self, m, fp8, scales: ctx, raising=False)
    for name in ("ll_dispatch", "ll_dispatch_complete", "ll_combine", "ll_combine_complete"):
        monkeypatch.setattr(low_latency._api, name,
                            lambda *a, name=name: calls.append((name, a[-1])))
    monkeypatch.setattr(low_latency._structs, "LowLatencyOutputStruct", lambda: _Out(100))
    x = torch.zeros(1, 1024, dtype=torch.bfloat16)
    idx = torch.zeros(1, 4, dtype=torch.int64)
    _, _, handle, _, hook = buf.low_latency_dispatch(x, idx, 8, 6, return_recv_hook=True)
    hook()
    _, _, hook = buf.low_latency_combine(handle.combine_input, idx, None, handle,
                                         out=torch.zeros(1, 1024, dtype=torch.bfloat16),
                                         return_recv_hook=True)
    hook()
    assert calls == [("ll_dispatch", 9000), ("ll_dispatch_complete", 9000), ("ll_combine", 9000),
                     ("ll_combine_complete", 9000)]
