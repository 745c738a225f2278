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
  uint64_t ginBytesCopied;    // of ginBytesSent, bytes the copy engine moved (copy transport)
  // Where a copy-transport put's time goes inside the plugin, summed in nanoseconds (one host
  // clock, CLOCK_MONOTONIC, shared by the processes). As sender, per put whose header was sent
  // (hopSentPuts): queue = iput -> the issue cursor passes it (copies handed to the engine;
  // waits for earlier puts and for the egress bucket), copy = -> its own copies seen complete
  // (each progress pass polls the oldest pending put of every stream; a put without payload: 0),
  // release = -> header written (the shaping latency, the headers of earlier puts, which leave in
  // put order, and the next progress pass; before the per-stream polling, copy also held the wait
  // for earlier puts). As target, per put applied (hopRecvPuts): wire = header written -> fully
  // read here (the socket and the time until this process's next progress pass), apply = -> its
  // signal's write issued (with NCCL_MOELOOP_COALESCE=1 the write of the pass's sum for that
  // word, at the latest at the end of the pass). Not inside the plugin: the GPU's put -> NCCL's
  // proxy calls iput, and the signal's copy to the GPU -> the kernel sees it.
  uint64_t hopSentPuts, hopQueueNs, hopCopyNs, hopReleaseNs;
  uint64_t hopRecvPuts, hopWireNs, hopApplyNs;
  // Writes of signal words at this rank (as target): ginSignals less the updates summed into
  // another update's write (NCCL_MOELOOP_COALESCE=1). Appended: older readers copy less.
  uint64_t ginSignalWrites;
  // NCCL_MOELOOP_COPY_TIMING=1 only (timing events cost the proxy thread): per copy-path put with
  // a payload (hopTimedPuts), the GPU's time from the start of its first copy to the end of its
  // last (CUDA events), in nanoseconds. hopCopyNs - hopCopyGpuNs = the time its copies waited on
  // their stream (behind other copies, or a wait for an overlapping put) plus the time until a
  // progress pass saw them done. Appended: older readers copy less.
  uint64_t hopTimedPuts, hopCopyGpuNs;
} moeloopStats_t;

// The hops between two snapshots of the counters, in microseconds per put: out[0..2] = queue,
// copy, release per put sent, out[3..4] = wire, apply per put applied; -1 where no put was timed.
static inline void moeloopHopAverages(const moeloopStats_t* before, const moeloopStats_t* after,
                                      double out[5]) {
  const uint64_t sent = after->hopSentPuts - before->hopSentPuts;
  const uint64_t recv = after->hopRecvPuts - before->hopRecvPuts;
  out[0] = sent ? (double)(after->hopQueueNs - before->hopQueueNs) * 1e-3 / (double)sent : -1;
  out[1] = sent ? (double)(after->hopCopyNs - before->hopCopyNs) * 1e-3 / (double)sent : -1;
  out[2] = sent ? (double)(after->hopReleaseNs - before->hopReleaseNs) * 1e-3 / (double)sent : -1;
  out[3] = recv ? (double)(after->hopWireNs - before->hopWireNs) * 1e-3 / (double)recv : -1;
  out[4] = recv ? (double)(after->hopApplyNs - before->hopApplyNs) * 1e-3 / (double)recv : -1;
}

// Copies min(outSize, sizeof(moeloopStats_t)) bytes of the process-wide counters to `out`.
// Returns the number of bytes copied.
size_t moeloopGetStats(moeloopStats_t* out, size_t outSize);
typedef size_t (*moeloopGetStats_t)(moeloopStats_t* out, size_t outSize);

// GIN traffic of this process with one peer, by GIN context: what crossed this fake NIC. `peer` is
// the rank in the GIN comm (summed over this process's GIN comms); puts to the own rank count
// under the own rank. Peers >= MOELOOP_STATS_MAX_PEERS and contexts >= MOELOOP_STATS_MAX_CONTEXTS
// are not counted. Every put counts once, signal-only puts (no payload) included.
#define MOELOOP_STATS_MAX_PEERS 64
#define MOELOOP_STATS_MAX_CONTEXTS 32
typedef struct {
  uint64_t putsSent;     // puts this process issued to the peer (counted when handed to the plugin)
  uint64_t bytesSent;    // their payload bytes
  uint64_t bytesCopied;  // of bytesSent, moved GPU to GPU by the copy engine (the rest: sockets)
  uint64_t signalsSent;  // of putsSent, puts carrying a signal
  uint64_t putsRecv;     // puts from the peer applied at this process (payload in place)
  uint64_t bytesRecv;    // their payload bytes
  uint64_t signalsRecv;  // signals from the peer applied at this process
} moeloopPeerStats_t;

// Copies min(outSize, sizeof(moeloopPeerStats_t)) bytes of the counters of (peer, context) to
// `out`; context -1 sums every context. Returns the bytes copied, 0 for a peer or context out of
// range. Obtain it like moeloopGetStats (dlsym "moeloopGetPeerStats").
size_t moeloopGetPeerStats(int peer, int context, moeloopPeerStats_t* out, size_t outSize);
typedef size_t (*moeloopGetPeerStats_t)(int peer, int context, moeloopPeerStats_t* out, size_t outSize);

#ifdef __cplusplus
}
#endif
