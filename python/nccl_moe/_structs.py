"""ctypes mirrors of include/nccl_moe.h's structs and enums, field for field.

tests/test_struct_layout.py compiles a C program against the header and compares every size and
offset with these classes; change both together. HEADER_VERSION is the NCCL_MOE_VERSION_CODE of
the header mirrored here: it goes into ncclMoeConfig_t.version.
"""
import ctypes

HEADER_MAJOR, HEADER_MINOR, HEADER_PATCH = 0, 1, 0
HEADER_VERSION = HEADER_MAJOR * 10000 + HEADER_MINOR * 100 + HEADER_PATCH
CONFIG_MAGIC = 0x6D6F6531  # NCCL_MOE_CONFIG_MAGIC, "moe1"

# ncclMoeMode_t
MODE_HIGH_THROUGHPUT = 0
MODE_LOW_LATENCY = 1
# ncclMoeDtype_t
DTYPE_BF16 = 0
DTYPE_FP8_E4M3 = 1
# ncclMoeScaleFormat_t
SCALE_FP32 = 0
SCALE_FP32_POW2 = 1
SCALE_UE8M0 = 2
# flags
DISPATCH_HOST_COUNTS = 0x1  # NCCL_MOE_DISPATCH_HOST_COUNTS
LL_SEND_ONLY = 0x2          # NCCL_MOE_LL_SEND_ONLY

# ncclResult_t (nccl.h)
RESULT_NAMES = {
    0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError",
    3: "ncclInternalError", 4: "ncclInvalidArgument", 5: "ncclInvalidUsage",
    6: "ncclRemoteError", 7: "ncclInProgress",
}


class ConfigStruct(ctypes.Structure):
    """ncclMoeConfig_t. C enums are int."""
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("mode", ctypes.c_int),
        ("numExperts", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("topK", ctypes.c_int),
        ("maxTokensPerRank", ctypes.c_int),
        ("dispatchDtype", ctypes.c_int),
        ("numSms", ctypes.c_int),
        ("outputCapacity", ctypes.c_int),
        ("timeoutMs", ctypes.c_int),
        ("numBufferSlots", ctypes.c_int),
        ("fp8Scales", ctypes.c_int),
    ]


class DispatchOutputStruct(ctypes.Structure):
    """ncclMoeDispatchOutput_t: device pointers into the EP window (as integers), host counts."""
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("xScales", ctypes.c_void_p),
        ("topkIdx", ctypes.c_void_p),
        ("topkWeights", ctypes.c_void_p),
        ("numRecvTokens", ctypes.c_void_p),
        ("expertCounts", ctypes.c_void_p),
        ("combineInput", ctypes.c_void_p),
        ("hostNumRecvTokens", ctypes.c_int),
        ("hostExpertCounts", ctypes.POINTER(ctypes.c_int)),
    ]


class LowLatencyOutputStruct(ctypes.Structure):
    """ncclMoeLowLatencyOutput_t: device pointers into one buffer slot, slot, T, sequence."""
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("xScales", ctypes.c_void_p),
        ("srcToken", ctypes.c_void_p),
        ("recvCountsPerSource", ctypes.c_void_p),
        ("expertCounts", ctypes.c_void_p),
        ("combineInput", ctypes.c_void_p),
        ("slot", ctypes.c_int),
        ("numTokens", ctypes.c_int),
        ("sequence", ctypes.c_ulonglong),
    ]
