// Counters of the moeloop plugin, readable by a program that loaded it (tests use them to prove
// that NCCL's traffic went through the plugin). Obtain `moeloopGetStats` with
// dlsym(dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_NOLOAD), "moeloopGetStats").
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  uint64_t netInits;          // ncclNet init calls
  uint64_t ginInits;          // ncclGin init calls
  uint64_t netConnections;    // NET send + receive comms established
  uint64_t netMsgsSent;       // NET messages fully sent
  uint64_t netBytesSent;      // NET payload bytes sent
  uint64_t netMsgsRecv;       // NET messages fully received
  uint64_t netBytesRecv;      // NET payload bytes received
  uint64_t ginCollComms;      // GIN collective comms connected
  uint64_t ginPuts;           // iput + iputSignal calls
  uint64_t ginSignals;        // signals applied at this rank (as target)
  uint64_t ginBytesSent;      // GIN payload bytes sent to other ranks
  uint64_t ginBytesApplied;   // GIN payload bytes written into this rank's memory
  uint64_t errors;            // errors reported by the plugin
} moeloopStats_t;

// Copies min(outSize, sizeof(moeloopStats_t)) bytes of the process-wide counters to `out`.
// Returns the number of bytes copied.
size_t moeloopGetStats(moeloopStats_t* out, size_t outSize);
typedef size_t (*moeloopGetStats_t)(moeloopStats_t* out, size_t outSize);

#ifdef __cplusplus
}
#endif
