"""nccl_moe.megatron's fused_dispatch / fused_combine (nccl_moe.torch.autograd's Functions over a
calling-stream Buffer) on the CPU, against a stub of the C library: a one-rank "library" that
delivers every token once, in order (dispatch and combine are identities on the rows), so values
and gradients can be checked exactly. Checked: the outputs' shapes and types, which C calls the
forward and backward make and with what, that no stream / event work happens on the calling-
stream path, that the torch.library custom ops (ops.py, communication-stream Buffer) give the
same values, gradients and calls, and that bad inputs fail before anything is created.
(Skipped without torch; megatron-core is not needed.)"""
import ctypes
import itertools

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

from nccl_moe import _api, _structs, megatron  # noqa: E402
from nccl_moe.torch import Handle, _comm, _context, buffer, ops  # noqa: E402
from nccl_moe.torch import autograd as moe_autograd  # noqa: E402

T, H, E, K, CAP = 16, 32, 8, 4, 64
GROUP = "group"  # any hashable: the group only reaches stubs


class FakeStream:
    """torch.cuda.Stream stand-in: counts the waits made on it."""
    _raw = itertools.count(1000)

    def __init__(self, *args, **kwargs):
        self.cuda_stream = next(FakeStream._raw)
        self.waits = []

    def wait_stream(self, other):
        self.waits.append(("stream", other.cuda_stream))

    def wait_event(self, event):
        self.waits.append(("event", event))


class FakeLib:
    """The stubbed library and CUDA stream calls; `calls` lists the C calls made, in order."""

    def __init__(self, monkeypatch):
        self.calls, self.events, self.switches, self.recorded = [], [], [], []
        self.calling = FakeStream()
        self.rows = {}     # C handle -> T of its dispatch (= rows: one rank, each token once)
        self.host = {}     # C handle -> its host expert counts (a ctypes array, kept alive)
        self.handle_ids = itertools.count(0x100)
        self.window = {name: torch.zeros((CAP, w), dtype=dt) for name, (w, dt) in {
            "x": (H, torch.bfloat16), "topkIdx": (K, torch.int64),
            "topkWeights": (K, torch.float32), "combineInput": (H, torch.bfloat16)}.items()}
        self.by_ptr = {t.data_ptr(): t for t in self.window.values()}
        lib = self
        mp = monkeypatch

        class FakeEvent:
            def __init__(self, *args, **kwargs):
                lib.events.append(self)

            def record(self, stream=None):
                pass

        class FakeStreamContext:
            def __init__(self, stream):
                lib.switches.append(stream)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        mp.setattr(torch.cuda, "Stream", FakeStream)
        mp.setattr(torch.cuda, "Event", FakeEvent)
        mp.setattr(torch.cuda, "stream", FakeStreamContext)
        mp.setattr(torch.cuda, "current_stream", lambda device=None: lib.calling)
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        mp.setattr(torch.Tensor, "record_stream", lambda t, s: lib.recorded.append(s))
        mp.setattr(buffer, "_raw_stream", lambda index: lib.calling.cuda_stream)
        mp.setattr(buffer, "window_view", self.window_view)
        mp.setattr(_comm, "check_nccl_version", lambda: None)
        mp.setattr(_comm, "nccl_comm_of", lambda group: 0x10)
        mp.setattr(buffer.dist, "get_rank", lambda group=None: 0)
        mp.setattr(buffer.dist, "get_world_size", lambda group=None: 1)
        for name, fn in {"comm_create": lambda comm, cfg: 0x20, "comm_destroy": lambda p: None,
                         "handle_destroy": lambda h: None, "handle_release": lambda h, s: None,
                         "dispatch": self.dispatch, "combine": self.combine,
                         "combine_with_weights": self.combine_with_weights}.items():
            mp.setattr(_api, name, fn)
        # On the CPU: contexts live on "cpu" and Buffers check for CPU tensors.
        context_init, buffer_init = _context.Context.__init__, buffer.Buffer.__init__

        def cpu_context(ctx, *args, **kwargs):
            context_init(ctx, *args, **kwargs)
            ctx.device = torch.device("cpu")

        def cpu_buffer(buf, *args, **kwargs):
            buffer_init(buf, *args, **kwargs)
            buf._device = torch.device("cpu")

        mp.setattr(_context.Context, "__init__", cpu_context)
        mp.setattr(buffer.Buffer, "__init__", cpu_buffer)
        mp.setattr(megatron, "_BUFFERS", {})
        mp.setattr(megatron, "_BY_GROUP", {})
        mp.setattr(megatron, "_max_tokens_per_rank", CAP)

    def window_view(self, ptr, shape, dtype, device, owner):
        if shape[0] == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        region = self.by_ptr[ptr]
        assert region.dtype == dtype and region.shape[1:] == tuple(shape[1:])
        return region[:shape[0]]

    @staticmethod
    def _copy(dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    def dispatch(self, comm, x, x_scales, topk_idx, topk_weights, n, flags, handle, out, stream):
        self.calls.append(("dispatch", dict(x=x, topk_idx=topk_idx, topk_weights=topk_weights,
                                            n=n, flags=flags, handle=handle.value, stream=stream)))
        w = self.window
        self._copy(w["x"].data_ptr(), x, n * H * 2)
        if topk_idx is not None:
            self._copy(w["topkIdx"].data_ptr(), topk_idx, n * K * 8)
        if topk_weights is not None:
            self._copy(w["topkWeights"].data_ptr(), topk_weights, n * K * 4)
        if handle.value is None:
            handle.value = next(self.handle_ids)
        if topk_idx is not None:
            self.rows[handle.value] = n
            ids = w["topkIdx"][:n].flatten()
            counts = torch.bincount(ids[ids >= 0], minlength=E).tolist()
            self.host[handle.value] = (ctypes.c_int * E)(*counts)
        for field in ("x", "topkIdx", "topkWeights", "combineInput"):
            setattr(out, field, w[field].data_ptr())
        out.hostNumRecvTokens = n if flags else -1
        if flags:
            counts = self.host[handle.value]
            out.hostExpertCounts = ctypes.cast(counts, ctypes.POINTER(ctypes.c_int))

    def combine(self, comm, handle, expert_out, topk_weights, out, stream):
        self.calls.append(("combine", dict(handle=handle, x=expert_out, stream=stream)))
        self._copy(out, expert_out, self.rows[handle] * H * 2)

    def combine_with_weights(self, comm, handle, expert_out, topk_weights, recv_w, out_w, out,
                             stream):
        self.calls.append(("combine_with_weights", dict(handle=handle, x=expert_out,
                                                        recv_w=recv_w, stream=stream)))
        self._copy(out, expert_out, self.rows[handle] * H * 2)
        self._copy(out_w, recv_w, self.rows[handle] * K * 4)

    def names(self):
        return [name for name, _ in self.calls]


@pytest.fixture
def lib(monkeypatch):
    fake = FakeLib(monkeypatch)
    yield fake
    megatron.destroy()


def inputs(seed=0, probs_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((T, H), generator=g).to(torch.bfloat16).requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[3, 1] = -1  # a dropped entry
    probs = torch.rand((T, K), generator=g).requires_grad_(probs_grad)
    grad_out = torch.randn((T, H), generator=g).to(torch.bfloat16)
    grad_probs = torch.randn((T, K), generator=g)
    return x, idx, probs, grad_out, grad_probs


def test_forward_outputs_and_calls(lib):
    x, idx, probs, _, _ = inputs()
    rx, ridx, rp, tpe, handle = megatron.fused_dispatch(x, idx, probs, E, GROUP)
    assert rx.dtype == torch.bfloat16 and rx.shape == (T, H) and rx.requires_grad
    assert ridx.dtype == torch.int64 and ridx.shape == (T, K) and not ridx.requires_grad
    assert rp.dtype == torch.float32 and rp.shape == (T, K) and rp.requires_grad
    assert tpe.dtype == torch.int64 and tpe.device.type == "cpu" and not tpe.requires_grad
    assert isinstance(handle, Handle) and handle.num_tokens == T and handle.num_recv_tokens == T
    assert torch.equal(rx, x) and torch.equal(ridx, idx) and torch.equal(rp, probs)
    assert tpe.tolist() == torch.bincount(idx[idx >= 0], minlength=E).tolist()
    # copies, not the window: a later dispatch does not change them
    assert rx.data_ptr() != lib.window["x"].data_ptr()
    lib.window["x"].zero_()
    assert torch.equal(rx, x)
    (name, args), = lib.calls
    assert name == "dispatch" and args["flags"] == _structs.DISPATCH_HOST_COUNTS
    assert args["x"] == x.data_ptr() and args["topk_idx"] == idx.data_ptr()
    assert args["topk_weights"] == probs.data_ptr() and args["n"] == T
    assert args["stream"] == lib.calling.cuda_stream

    y = (rx.float() * 2).to(torch.bfloat16)
    out, none = megatron.fused_combine(y, GROUP, handle)
    assert none is None and out.dtype == torch.bfloat16 and out.shape == (T, H)
    assert torch.equal(out, y) and out.requires_grad
    name, args = lib.calls[-1]
    assert name == "combine" and args["handle"] == handle.ptr and args["x"] == y.data_ptr()
    assert args["stream"] == lib.calling.cuda_stream


def test_backward_calls_and_gradients(lib):
    """backward of combine = cached dispatch with the handle; backward of dispatch = combine
    with weights (probs need a gradient); gradients equal the identity library's."""
    x, idx, probs, grad_out, grad_probs = inputs(1)
    rx, _, rp, _, handle = megatron.fused_dispatch(x, idx, probs, E, GROUP)
    out, _ = megatron.fused_combine((rx.float() * 2).to(torch.bfloat16), GROUP, handle)
    ptr = handle.ptr
    del lib.calls[:]
    torch.autograd.backward([out, rp], [grad_out, grad_probs])
    assert lib.names() == ["dispatch", "combine_with_weights"]
    cached, cww = lib.calls[0][1], lib.calls[1][1]
    assert cached["topk_idx"] is None and cached["topk_weights"] is None
    assert cached["handle"] == ptr and cached["flags"] == 0 and cached["n"] == T
    assert cww["handle"] == ptr and cww["stream"] == lib.calling.cuda_stream
    # the same graph without the library (dispatch and combine are identities here)
    x2, probs2 = x.detach().clone().requires_grad_(), probs.detach().clone().requires_grad_()
    out2 = (x2.float() * 2).to(torch.bfloat16)
    torch.autograd.backward([out2, probs2 * 1], [grad_out, grad_probs])
    assert torch.equal(x.grad, x2.grad) and torch.equal(probs.grad, probs2.grad)


def test_calling_stream_path_makes_no_stream_work(lib):
    x, idx, probs, grad_out, grad_probs = inputs(2)
    for _ in range(2):
        rx, _, rp, _, handle = megatron.fused_dispatch(x, idx, probs, E, GROUP)
        out, _ = megatron.fused_combine(rx, GROUP, handle)
        torch.autograd.backward([out, rp], [grad_out, grad_probs])
    assert lib.names() == ["dispatch", "combine", "dispatch", "combine_with_weights"] * 2
    assert lib.events == [] and lib.switches == [] and lib.recorded == []
    buf = megatron._BUFFERS[(GROUP, H, E, K)]
    assert lib.calling.waits == [] and buf.get_comm_stream().waits == []
    assert buf._ht().stream == lib.calling.cuda_stream  # handle releases follow the calls


def test_missing_gradients_count_as_zeros(lib):
    """As the custom ops' materialised gradients: probs needing a gradient -> combine with
    weights even when recv_probs got none; probs not needing one -> plain combine."""
    x, idx, probs, grad_out, _ = inputs(3)
    rx, _, rp, _, handle = megatron.fused_dispatch(x, idx, probs, E, GROUP)
    out, _ = megatron.fused_combine(rx, GROUP, handle)
    out.backward(grad_out)
    assert lib.names()[-1] == "combine_with_weights"
    assert torch.equal(probs.grad, torch.zeros_like(probs)) and torch.equal(x.grad, grad_out)

    rx, _, rp, _, handle = megatron.fused_dispatch(x, idx, probs, E, GROUP)
    rp.backward(torch.ones_like(rp))  # recv_x unused: its gradient is zeros
    assert lib.names()[-1] == "combine_with_weights"
    assert torch.equal(x.grad, grad_out) and torch.equal(probs.grad, torch.ones_like(probs))

    x, idx, probs, grad_out, _ = inputs(4, probs_grad=False)
    rx, _, rp, _, handle = megatron.fused_dispatch(x, idx, probs, E, GROUP)
    megatron.fused_combine(rx, GROUP, handle)[0].backward(grad_out)
    assert lib.names()[-2:] == ["dispatch", "combine"] and torch.equal(x.grad, grad_out)


def test_custom_ops_give_the_same_values_gradients_and_calls(lib):
    """ops.py's custom ops on a communication-stream Buffer (what torch.compile users get) and
    the autograd Functions on a calling-stream Buffer: same outputs, gradients, C calls."""
    results = []
    for path in ("custom ops", "autograd"):
        x, idx, probs, grad_out, grad_probs = inputs(5)
        buf = buffer.Buffer(GROUP, H, E, K, CAP, calling_stream=(path == "autograd"))
        del lib.calls[:]
        if path == "custom ops":
            rx, ridx, rp, tpe, token = ops.dispatch(x, idx, probs, buf)
            out = ops.combine((rx.float() * 3).to(torch.bfloat16), token, buf)
        else:
            rx, ridx, rp, tpe, handle = moe_autograd.dispatch(x, idx, probs, buf)
            out = moe_autograd.combine((rx.float() * 3).to(torch.bfloat16), handle, buf)
        torch.autograd.backward([out, rp], [grad_out, grad_probs])
        calls = [(n, {k: v for k, v in a.items() if k in ("flags", "n")}) for n, a in lib.calls]
        results.append(([rx, ridx, rp, tpe, out, x.grad, probs.grad], calls))
        buf.destroy()
    (ours, our_calls), (theirs, their_calls) = results
    assert our_calls == their_calls
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_event_requests_take_the_communication_stream(lib):
    """A calling-stream Buffer still honours async_finish (communication stream, an event), and
    the next calling-stream call waits for that stream first (the library's call order)."""
    buf = buffer.Buffer(GROUP, H, E, K, CAP, calling_stream=True)
    x, idx, probs, _, _ = inputs(6)
    x = x.detach()
    _, _, _, _, handle, event = buf.dispatch(x, topk_idx=idx, topk_weights=probs.detach(),
                                             async_finish=True)
    comm = buf.get_comm_stream()
    assert len(lib.events) == 1 and event.event is lib.events[0]
    assert lib.calls[-1][1]["stream"] == comm.cuda_stream and buf._ht().stream == comm.cuda_stream
    out, _, event = buf.combine(handle.combine_input, handle)
    assert event.event is None and len(lib.events) == 1
    assert lib.calls[-1][1]["stream"] == lib.calling.cuda_stream
    assert lib.calling.waits == [("stream", comm.cuda_stream)]
    assert buf._ht().stream == lib.calling.cuda_stream
    buf.destroy()


@pytest.mark.parametrize("bad", ["dtype", "shape", "device", "contiguity"])
def test_bad_inputs_fail_before_anything_is_created(lib, bad):
    x, idx, probs, _, _ = inputs(7)
    x = x.detach()
    if bad == "dtype":
        x = x.float()
    elif bad == "shape":
        idx = idx[:, :K - 1].contiguous()
    elif bad == "device":
        x = x.to("meta")
    else:
        probs = probs.detach().t().contiguous().t()
    buf = buffer.Buffer(GROUP, H, E, K, CAP, calling_stream=True)
    with pytest.raises(ValueError, match="expected a contiguous"):
        buf.dispatch(x, topk_idx=idx, topk_weights=probs.detach())
    assert buf._ht_context is None and lib.calls == []
    buf.destroy()
