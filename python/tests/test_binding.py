"""Calls through the binding that need no GPU: versions, config validation with the library's
messages, and the argument checks that reject before touching CUDA (tests/unit/api_test.cc)."""
import threading

import pytest

import nccl_moe
from nccl_moe import _api, _structs


def good_config(**kw):
    base = dict(num_experts=8, hidden=1024, top_k=2, max_tokens_per_rank=128, num_sms=4)
    base.update(kw)
    return nccl_moe.Config(**base)


def test_library_version_is_the_mirrored_header():
    assert nccl_moe.library_version() == "0.1.0"
    assert _api.get_version() == nccl_moe.HEADER_VERSION


def test_nccl_versions_same_line():
    built, loaded = nccl_moe.nccl_versions()
    assert built >= 22809 and loaded >= 22809
    assert built // 100 == loaded // 100, (built, loaded)


def test_window_size_of_a_good_config():
    assert nccl_moe.window_size(good_config(), 4) > 0


def test_window_size_grows_with_ll_slots():
    one = nccl_moe.window_size(good_config(mode="low_latency", num_buffer_slots=1), 4)
    three = nccl_moe.window_size(good_config(mode="low_latency", num_buffer_slots=3), 4)
    assert three > one


@pytest.mark.parametrize("field,value,name", [
    ("num_experts", 30, "numExperts"),     # not a multiple of 4 ranks
    ("hidden", 12, "hidden"),              # not a multiple of 8
    ("top_k", 0, "topK"),
    ("max_tokens_per_rank", 0, "maxTokensPerRank"),
    ("num_buffer_slots", 9, "numBufferSlots"),
])
def test_bad_config_names_the_field(field, value, name):
    cfg = good_config(**{field: value})
    if field == "num_buffer_slots":
        cfg = good_config(mode="low_latency", num_buffer_slots=value)
    with pytest.raises(nccl_moe.NcclMoeError) as e:
        nccl_moe.window_size(cfg, 4)
    assert e.value.code == 4 and e.value.code_name == "ncclInvalidArgument"
    assert e.value.function == "ncclMoeGetWindowSize"
    assert name in e.value.message and name in str(e.value)


def test_fp8_hidden_must_be_a_multiple_of_128():
    with pytest.raises(nccl_moe.NcclMoeError, match="hidden"):
        nccl_moe.window_size(good_config(hidden=1000, dispatch_dtype="fp8_e4m3"), 4)


def test_unknown_python_name_rejected_before_the_library():
    with pytest.raises(ValueError, match="dispatch_dtype"):
        good_config(dispatch_dtype="fp16").to_struct()


def test_config_struct_header_fields():
    s = good_config().to_struct()
    assert s.size == _structs.ctypes.sizeof(_structs.ConfigStruct)
    assert s.magic == _structs.CONFIG_MAGIC and s.version == nccl_moe.HEADER_VERSION


def test_wrong_magic_is_rejected():
    s = good_config().to_struct()
    s.magic = 0
    with pytest.raises(nccl_moe.NcclMoeError, match="magic"):
        _api.get_window_size(s, 4)


def test_comm_create_null_comm_rejected():
    with pytest.raises(nccl_moe.NcclMoeError) as e:
        _api.comm_create(0, good_config().to_struct())
    assert e.value.code_name == "ncclInvalidArgument" and "comm" in e.value.message


@pytest.mark.parametrize("fn,args,name", [
    ("comm_destroy", (None,), "moeComm"),
    ("handle_destroy", (None,), "handle"),
    ("check_errors", (None,), "moeComm"),
    ("combine", (None, None, None, None, None, None), "moeComm"),
    ("get_layout", (None, None, 0, None, None, None, None, None, None), "moeComm"),
    ("comm_node_count", (None,), "moeComm"),
])
def test_null_objects_rejected(fn, args, name):
    with pytest.raises(nccl_moe.NcclMoeError) as e:
        getattr(_api, fn)(*args)
    assert e.value.code == 4 and name in e.value.message


def test_null_context_dispatch_allocates_no_handle():
    handle = _structs.ctypes.c_void_p()
    out = _structs.DispatchOutputStruct()
    with pytest.raises(nccl_moe.NcclMoeError, match="moeComm"):
        _api.dispatch(None, None, None, None, None, 0, 0, handle, out, None)
    assert handle.value is None


def test_null_context_low_latency_calls_rejected():
    out = _structs.LowLatencyOutputStruct()
    for call in (lambda: _api.ll_dispatch(None, None, None, None, 0, 0, out, None),
                 lambda: _api.ll_dispatch_complete(None, out, None),
                 lambda: _api.ll_combine(None, out, None, None, 0, None),
                 lambda: _api.ll_combine_complete(None, out, None, None)):
        with pytest.raises(nccl_moe.NcclMoeError, match="moeComm"):
            call()


def test_null_context_failed_rank_calls_rejected():
    with pytest.raises(nccl_moe.NcclMoeError, match="moeComm"):
        _api.mark_rank_failed(None, 1)
    with pytest.raises(nccl_moe.NcclMoeError, match="moeComm"):
        _api.get_failed_ranks(None, 4)


def test_last_error_is_cleared_by_success_and_thread_local():
    with pytest.raises(nccl_moe.NcclMoeError):
        _api.check_errors(None)
    assert _api.last_error() != ""
    _api.get_version()
    assert _api.last_error() == ""
    seen = []
    t = threading.Thread(target=lambda: (pytest.raises(nccl_moe.NcclMoeError, _api.check_errors, None),
                                         seen.append(_api.last_error())))
    t.start()
    t.join()
    assert "moeComm" in seen[0]
    assert _api.last_error() == ""
