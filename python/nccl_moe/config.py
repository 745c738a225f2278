"""The EP context's configuration (ncclMoeConfig_t) in Python terms, and the size query."""
from dataclasses import dataclass

from . import _api, _structs

MODES = {"high_throughput": _structs.MODE_HIGH_THROUGHPUT, "low_latency": _structs.MODE_LOW_LATENCY}
DTYPES = {"bf16": _structs.DTYPE_BF16, "fp8_e4m3": _structs.DTYPE_FP8_E4M3}
SCALE_FORMATS = {"fp32": _structs.SCALE_FP32, "fp32_pow2": _structs.SCALE_FP32_POW2,
                 "ue8m0": _structs.SCALE_UE8M0}


@dataclass(frozen=True)
class Config:
    """ncclMoeConfig_t. Defaults are NCCL_MOE_CONFIG_INITIALIZER's; 0 means "library default".

    num_experts (E, total), hidden (H, elements), top_k (K) and max_tokens_per_rank (tokens one
    rank sends in one dispatch, at most) are required. mode: "high_throughput" | "low_latency";
    dispatch_dtype: "bf16" | "fp8_e4m3"; fp8_scales (LL cast): "fp32" | "fp32_pow2" | "ue8m0";
    num_sms: CTAs per dispatch/combine kernel; output_capacity: rows one rank can receive
    (0 = ranks * max_tokens_per_rank); timeout_ms (0 = 30000); num_buffer_slots (LL, 0 = 2).
    The library validates the values (ncclMoeCommCreate, ncclMoeGetWindowSize) and names the
    field at fault in the NcclMoeError it raises; this class only maps names to codes.
    """
    num_experts: int
    hidden: int
    top_k: int
    max_tokens_per_rank: int
    mode: str = "high_throughput"
    dispatch_dtype: str = "bf16"
    num_sms: int = 24
    output_capacity: int = 0
    timeout_ms: int = 0
    num_buffer_slots: int = 0
    fp8_scales: str = "fp32"

    def to_struct(self) -> _structs.ConfigStruct:
        """The C struct, with size, magic and the mirrored header's version filled in."""
        for name, table in (("mode", MODES), ("dispatch_dtype", DTYPES), ("fp8_scales", SCALE_FORMATS)):
            if getattr(self, name) not in table:
                raise ValueError(f"Config.{name} = {getattr(self, name)!r}: one of {sorted(table)}")
        s = _structs.ConfigStruct()
        s.size = _structs.ctypes.sizeof(_structs.ConfigStruct)
        s.magic = _structs.CONFIG_MAGIC
        s.version = _structs.HEADER_VERSION
        s.mode = MODES[self.mode]
        s.numExperts = self.num_experts
        s.hidden = self.hidden
        s.topK = self.top_k
        s.maxTokensPerRank = self.max_tokens_per_rank
        s.dispatchDtype = DTYPES[self.dispatch_dtype]
        s.numSms = self.num_sms
        s.outputCapacity = self.output_capacity
        s.timeoutMs = self.timeout_ms
        s.numBufferSlots = self.num_buffer_slots
        s.fp8Scales = SCALE_FORMATS[self.fp8_scales]
        return s


def window_size(config: Config, n_ranks: int) -> int:
    """Bytes of EP window each of `n_ranks` ranks allocates for `config` (ncclMoeGetWindowSize).
    Validates the config like ncclMoeCommCreate; needs no GPU."""
    return _api.get_window_size(config.to_struct(), n_ranks)
