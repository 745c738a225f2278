// Logging and counters of the moeloop plugin.
#include "moeloop_log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace moeloop {
namespace {

std::atomic<ncclDebugLogger_t> gLogger{nullptr};

bool fallbackInfoEnabled() {
  static const bool enabled = [] {
    const char* v = getenv("NCCL_MOELOOP_DEBUG");
    return v != nullptr && (strcasecmp(v, "INFO") == 0 || strcasecmp(v, "TRACE") == 0);
  }();
  return enabled;
}

}  // namespace

ncclDebugLogger_t setLogger(ncclDebugLogger_t fn) {
  if (fn == nullptr) return gLogger.load();
  return gLogger.exchange(fn);
}

void logMessage(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  ncclDebugLogger_t logger = gLogger.load();
  if (logger != nullptr) {
    logger(level, flags, file, line, "NET/moeloop: %s", msg);
    return;
  }
  if (level == NCCL_LOG_WARN || (level == NCCL_LOG_INFO && fallbackInfoEnabled())) {
    const char* base = strrchr(file, '/');
    fprintf(stderr, "moeloop %s %s:%d %s\n", level == NCCL_LOG_WARN ? "WARN" : "INFO",
            base ? base + 1 : file, line, msg);
  }
}

Counters& counters() {
  static Counters c;
  return c;
}

}  // namespace moeloop

extern "C" __attribute__((visibility("default"))) size_t moeloopGetStats(moeloopStats_t* out,
                                                                         size_t outSize) {
  if (out == nullptr) return 0;
  moeloop::Counters& c = moeloop::counters();
  moeloopStats_t s;
  s.netInits = c.netInits.load();
  s.ginInits = c.ginInits.load();
  s.netConnections = c.netConnections.load();
  s.netMsgsSent = c.netMsgsSent.load();
  s.netBytesSent = c.netBytesSent.load();
  s.netMsgsRecv = c.netMsgsRecv.load();
  s.netBytesRecv = c.netBytesRecv.load();
  s.ginCollComms = c.ginCollComms.load();
  s.ginPuts = c.ginPuts.load();
  s.ginSignals = c.ginSignals.load();
  s.ginBytesSent = c.ginBytesSent.load();
  s.ginBytesApplied = c.ginBytesApplied.load();
  s.errors = c.errors.load();
  s.ginBytesCopied = c.ginBytesCopied.load();
  s.hopSentPuts = c.hopSentPuts.load();
  s.hopQueueNs = c.hopQueueNs.load();
  s.hopCopyNs = c.hopCopyNs.load();
  s.hopReleaseNs = c.hopReleaseNs.load();
  s.hopRecvPuts = c.hopRecvPuts.load();
  s.hopWireNs = c.hopWireNs.load();
  s.hopApplyNs = c.hopApplyNs.load();
  s.ginSignalWrites = c.ginSignalWrites.load();
  s.hopTimedPuts = c.hopTimedPuts.load();
  s.hopCopyGpuNs = c.hopCopyGpuNs.load();
  size_t n = outSize < sizeof(s) ? outSize : sizeof(s);
  memcpy(out, &s, n);
  return n;
}
