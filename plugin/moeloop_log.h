// Logging and counters of the moeloop plugin. Messages go through the logger NCCL hands to init
// (so NCCL_DEBUG / NCCL_DEBUG_SUBSYS apply); before any init, or without NCCL (unit tests),
// warnings go to stderr and NCCL_MOELOOP_DEBUG=INFO also prints INFO lines.
#pragma once
#include <atomic>
#include <stdint.h>
#include "nccl_plugin_abi.h"
#include "moeloop_stats.h"

namespace moeloop {

// Installs `fn` as the logger (NULL keeps the current one). Returns the previous logger.
ncclDebugLogger_t setLogger(ncclDebugLogger_t fn);

void logMessage(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                const char* fmt, ...) __attribute__((format(printf, 5, 6)));

// Process-wide counters (see moeloop_stats.h).
struct Counters {
  std::atomic<uint64_t> netInits{0}, ginInits{0}, netConnections{0}, netMsgsSent{0},
      netBytesSent{0}, netMsgsRecv{0}, netBytesRecv{0}, ginCollComms{0}, ginPuts{0},
      ginSignals{0}, ginBytesSent{0}, ginBytesApplied{0}, errors{0}, ginBytesCopied{0},
      hopSentPuts{0}, hopQueueNs{0}, hopCopyNs{0}, hopReleaseNs{0}, hopRecvPuts{0}, hopWireNs{0},
      hopApplyNs{0}, ginSignalWrites{0}, hopTimedPuts{0}, hopCopyGpuNs{0};
};
Counters& counters();

}  // namespace moeloop

#define ML_WARN(...) \
  ::moeloop::logMessage(NCCL_LOG_WARN, MOELOOP_LOG_NET, __FILE__, __LINE__, __VA_ARGS__)
#define ML_INFO(flags, ...) \
  ::moeloop::logMessage(NCCL_LOG_INFO, (flags), __FILE__, __LINE__, __VA_ARGS__)
#define ML_TRACE(...) \
  ::moeloop::logMessage(NCCL_LOG_TRACE, MOELOOP_LOG_NET, __FILE__, __LINE__, __VA_ARGS__)

// Records an error: counts it, logs a warning and returns `code` (a ncclResult_t).
#define ML_ERROR(code, ...) \
  (::moeloop::counters().errors.fetch_add(1, std::memory_order_relaxed), ML_WARN(__VA_ARGS__), (code))

// Propagates a failing ncclResult_t (the callee has logged it).
#define ML_CHECK(call)                              \
  do {                                              \
    ncclResult_t ml_res_ = (call);                  \
    if (ml_res_ != ncclSuccess) return ml_res_;     \
  } while (0)
