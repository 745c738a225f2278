// Per-peer, per-context GIN counters (moeloop_peer_stats.h, moeloopGetPeerStats).
#include "moeloop_peer_stats.h"

#include <atomic>
#include <string.h>
#include "moeloop_stats.h"

namespace moeloop {
namespace {

struct Cell {
  std::atomic<uint64_t> putsSent{0}, bytesSent{0}, bytesCopied{0}, signalsSent{0}, putsRecv{0},
      bytesRecv{0}, signalsRecv{0};
};

Cell gCells[MOELOOP_STATS_MAX_PEERS][MOELOOP_STATS_MAX_CONTEXTS];

Cell* cell(int peer, int context) {
  if (peer < 0 || peer >= MOELOOP_STATS_MAX_PEERS || context < 0 || context >= MOELOOP_STATS_MAX_CONTEXTS)
    return nullptr;
  return &gCells[peer][context];
}

void add(const Cell& c, moeloopPeerStats_t* s) {
  s->putsSent += c.putsSent.load(std::memory_order_relaxed);
  s->bytesSent += c.bytesSent.load(std::memory_order_relaxed);
  s->bytesCopied += c.bytesCopied.load(std::memory_order_relaxed);
  s->signalsSent += c.signalsSent.load(std::memory_order_relaxed);
  s->putsRecv += c.putsRecv.load(std::memory_order_relaxed);
  s->bytesRecv += c.bytesRecv.load(std::memory_order_relaxed);
  s->signalsRecv += c.signalsRecv.load(std::memory_order_relaxed);
}

}  // namespace

void peerStatsOnSend(int peer, int context, uint64_t bytes, bool copied, bool signal) {
  Cell* c = cell(peer, context);
  if (c == nullptr) return;
  c->putsSent.fetch_add(1, std::memory_order_relaxed);
  c->bytesSent.fetch_add(bytes, std::memory_order_relaxed);
  if (copied) c->bytesCopied.fetch_add(bytes, std::memory_order_relaxed);
  if (signal) c->signalsSent.fetch_add(1, std::memory_order_relaxed);
}

void peerStatsOnApply(int peer, int context, uint64_t bytes, bool signal) {
  Cell* c = cell(peer, context);
  if (c == nullptr) return;
  c->putsRecv.fetch_add(1, std::memory_order_relaxed);
  c->bytesRecv.fetch_add(bytes, std::memory_order_relaxed);
  if (signal) c->signalsRecv.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace moeloop

extern "C" __attribute__((visibility("default"))) size_t moeloopGetPeerStats(
    int peer, int context, moeloopPeerStats_t* out, size_t outSize) {
  if (out == nullptr || peer < 0 || peer >= MOELOOP_STATS_MAX_PEERS || context < -1 ||
      context >= MOELOOP_STATS_MAX_CONTEXTS)
    return 0;
  moeloopPeerStats_t s;
  memset(&s, 0, sizeof(s));
  for (int k = 0; k < MOELOOP_STATS_MAX_CONTEXTS; k++)
    if (context < 0 || k == context) moeloop::add(moeloop::gCells[peer][k], &s);
  size_t n = outSize < sizeof(s) ? outSize : sizeof(s);
  memcpy(out, &s, n);
  return n;
}
