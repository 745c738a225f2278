// CPU tests of the moeloop plugin's copy transport pieces: descriptor passing over a unix socket
// (the protocol that carries cuMem allocations' fds, here memfds between two processes), the
// shaping arithmetic (token bucket on a simulated clock, per-message latency), the per-peer
// counters, and the copy-transport protocol between two processes on host memory (announcements
// without descriptors, socket-path payloads, header-only signals with the latency applied by the
// sender).
#include <gtest/gtest.h>

#include <atomic>
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "../../plugin/moeloop_gin.h"
#include "../../plugin/moeloop_gin_tables.h"
#include "../../plugin/moeloop_log.h"
#include "../../plugin/moeloop_peer_stats.h"
#include "../../plugin/moeloop_shaping.h"
#include "../../plugin/moeloop_stats.h"

namespace {

int waitChild(pid_t pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// --- descriptor passing ----------------------------------------------------------------------------

struct Msg {
  uint32_t index;
  uint32_t hasFd;
  char text[24];
};

int memfdWith(const char* text) {
  int fd = memfd_create("moeloop-test", 0);
  if (fd < 0) return -1;
  size_t n = strlen(text) + 1;
  return write(fd, text, n) == (ssize_t)n ? fd : -1;
}

// Reads message `want` (its first byte with descriptors collected) and checks it and its fd.
int readAndCheck(int sock, uint32_t want, std::vector<int>* fds) {
  Msg m;
  size_t got = 0;
  uint64_t t0 = moeloop::nowNs();
  while (got < sizeof(m)) {
    size_t n = 0;
    bool eof = false;
    if (moeloop::ioRead(sock, (char*)&m + got, sizeof(m) - got, nullptr, &n, &eof, fds) != ncclSuccess) return 1;
    if (eof) return 2;
    got += n;
    if ((moeloop::nowNs() - t0) * 1e-9 > 20) return 3;
  }
  if (m.index != want) return 4;
  if (!m.hasFd) return fds->empty() ? 0 : 5;
  if (fds->size() != 1) return 6;
  int fd = fds->front();
  fds->clear();
  char buf[24] = {};
  ssize_t r = pread(fd, buf, sizeof(buf), 0);
  close(fd);
  if (r <= 0 || strcmp(buf, m.text) != 0) return 7;
  return 0;
}

// Three messages, the first and third with a memfd each, written and read 3 bytes at a time: each
// descriptor arrives with its own message and is readable in the other process.
TEST(PluginFdPassing, MemfdsCrossProcessesWithTheirMessages) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  moeloop::setIoLimitForTesting(3);
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    close(sv[0]);
    alarm(30);
    std::vector<int> fds;
    int rc = 0;
    for (uint32_t i = 0; i < 3 && rc == 0; i++) rc = readAndCheck(sv[1], i, &fds) ? 10 + (int)i : 0;
    _exit(rc);
  }
  close(sv[1]);
  for (uint32_t i = 0; i < 3; i++) {
    Msg m = {};
    m.index = i;
    m.hasFd = i != 1;
    snprintf(m.text, sizeof(m.text), "memfd %u", i);
    int fd = m.hasFd ? memfdWith(m.text) : -1;
    ASSERT_TRUE(!m.hasFd || fd >= 0);
    size_t sent = 0;
    while (sent < sizeof(m)) {
      struct iovec iov = {(char*)&m + sent, sizeof(m) - sent};
      size_t n = 0;
      ASSERT_EQ(moeloop::ioWritev(sv[0], &iov, 1, nullptr, &n, sent == 0 ? fd : -1), ncclSuccess);
      sent += n;
    }
    if (fd >= 0) close(fd);  // the receiver holds its own copy
  }
  EXPECT_EQ(waitChild(pid), 0);
  moeloop::setIoLimitForTesting(0);
  close(sv[0]);
}

// --- shaping arithmetic ------------------------------------------------------------------------------

struct ShapingScope {
  explicit ShapingScope(double gbps, double latencyUs) {
    moeloop::ShapingConfig cfg;
    cfg.bytesPerSec = gbps * 1e9;
    cfg.latencyNs = (uint64_t)(latencyUs * 1e3);
    moeloop::setShapingConfig(cfg);
  }
  ~ShapingScope() { moeloop::setShapingConfig(moeloop::ShapingConfig{}); }
};

// Moves `total` bytes as puts of `putBytes` through a bucket on a simulated clock advancing
// `stepNs` per progress call, asking for grants of at least `minGrant`. Returns the simulated seconds.
double simulateStream(size_t total, size_t putBytes, size_t minGrant, uint64_t stepNs, size_t* launches) {
  moeloop::TokenBucket b;
  const uint64_t t0 = 1000000000ull;
  uint64_t now = t0;
  (void)b.take(1, 1, now);  // start the bucket (full), then drain the burst like a busy NIC would
  (void)b.take((size_t)moeloop::burstBytes(moeloop::shapingConfig().bytesPerSec), 1, now);
  *launches = 0;
  for (size_t moved = 0; moved < total; now += stepNs) {
    for (;;) {  // one progress call: launch while the bucket grants
      size_t left = putBytes - moved % putBytes;
      size_t g = moved < total ? b.take(left < (4u << 20) ? left : (4u << 20), minGrant, now) : 0;
      if (g == 0) break;
      (*launches)++;
      moved += g;
    }
  }
  return (double)(now - t0) * 1e-9;
}

TEST(PluginShaping, TokenBucketHoldsTheRateForLargePuts) {
  ShapingScope s(50, 0);
  size_t launches = 0;
  double sec = simulateStream(512u << 20, 4u << 20, 256u << 10, 1000, &launches);
  double gbps = (512u << 20) / sec * 1e-9;
  EXPECT_NEAR(gbps, 50.0, 50.0 * 0.01);
  // Grants of at least 256 KiB: a launch per >= 256 KiB, not one per microsecond.
  EXPECT_LE(launches, (512u << 20) / (256u << 10) + 1);
}

TEST(PluginShaping, ManySmallPutsAreChargedTheirBytesOnly) {
  ShapingScope s(50, 3);
  size_t launches = 0;
  // 100,000 puts of 64 bytes: 6.4 MB at 50 GB/s is 128 us; no per-message charge in the bucket.
  double sec = simulateStream(100000u * 64, 64, 256u << 10, 100, &launches);
  EXPECT_EQ(launches, 100000u);
  EXPECT_LT(sec, 200e-6);
  EXPECT_GT(sec, 100e-6);
}

TEST(PluginShaping, LatencyIsPerMessageNotPerByte) {
  ShapingScope s(50, 3);
  EXPECT_EQ(moeloop::messageReleaseNs(1000), 1000u + 3000u);
  // A pipeline: message i is ready at i * 100 ns; each is released one latency after it is
  // ready, so 1000 messages take 100 us + 3 us, not 1000 x 3 us.
  uint64_t last = 0;
  for (uint64_t i = 0; i < 1000; i++) last = moeloop::messageReleaseNs(i * 100);
  EXPECT_EQ(last, 999u * 100 + 3000);
  moeloop::setShapingConfig(moeloop::ShapingConfig{});
  EXPECT_EQ(moeloop::messageReleaseNs(1000), 1000u);
}

TEST(PluginShaping, SmallGrantsAreRefusedUntilTheMinimumAccrues) {
  ShapingScope s(50, 0);  // 50 bytes per ns, burst 2.5 MB
  moeloop::TokenBucket b;
  const uint64_t t0 = 5000000000ull;
  EXPECT_EQ(b.take(1u << 30, 256u << 10, t0), (size_t)moeloop::burstBytes(50e9));  // starts full
  EXPECT_EQ(b.take(1u << 30, 256u << 10, t0 + 1000), 0u);    // 50 KB accrued < 256 KiB
  EXPECT_EQ(b.take(1u << 30, 256u << 10, t0 + 6000), 300000u);  // 300 KB accrued
  EXPECT_EQ(b.take(1000, 256u << 10, t0 + 6100), 1000u);     // a small put asks for its size only
  EXPECT_EQ(b.take(1u << 30, 1, t0 + 6000), 4000u);          // the clock never runs backwards
}

// --- counters ------------------------------------------------------------------------------------------

TEST(PluginCounters, PerPeerAndContextCountsAddUp) {
  moeloopPeerStats_t before, ctx, all;
  ASSERT_EQ(moeloopGetPeerStats(5, -1, &before, sizeof(before)), sizeof(before));
  moeloop::peerStatsOnSend(5, 2, 1000, true, false);
  moeloop::peerStatsOnSend(5, 2, 24, false, true);
  moeloop::peerStatsOnSend(5, 3, 0, false, true);
  moeloop::peerStatsOnApply(5, 3, 77, true);
  ASSERT_EQ(moeloopGetPeerStats(5, 2, &ctx, sizeof(ctx)), sizeof(ctx));
  ASSERT_EQ(moeloopGetPeerStats(5, -1, &all, sizeof(all)), sizeof(all));
  EXPECT_GE(ctx.putsSent, 2u);
  EXPECT_EQ(all.putsSent - before.putsSent, 3u);
  EXPECT_EQ(all.bytesSent - before.bytesSent, 1024u);
  EXPECT_EQ(all.bytesCopied - before.bytesCopied, 1000u);
  EXPECT_EQ(all.signalsSent - before.signalsSent, 2u);
  EXPECT_EQ(all.putsRecv - before.putsRecv, 1u);
  EXPECT_EQ(all.bytesRecv - before.bytesRecv, 77u);
  EXPECT_EQ(all.signalsRecv - before.signalsRecv, 1u);
  // Out of range: nothing copied; a short buffer gets the prefix.
  EXPECT_EQ(moeloopGetPeerStats(MOELOOP_STATS_MAX_PEERS, 0, &all, sizeof(all)), 0u);
  EXPECT_EQ(moeloopGetPeerStats(0, MOELOOP_STATS_MAX_CONTEXTS, &all, sizeof(all)), 0u);
  EXPECT_EQ(moeloopGetPeerStats(-1, 0, &all, sizeof(all)), 0u);
  EXPECT_EQ(moeloopGetPeerStats(5, 0, &all, 8), 8u);
  moeloop::peerStatsOnSend(MOELOOP_STATS_MAX_PEERS, 0, 1, false, false);  // ignored, no crash
}

// --- the copy-transport protocol between two processes on host memory ------------------------------

struct Page {
  std::atomic<int> ready;
  std::atomic<int> done[2];
  std::atomic<uint64_t> startNs[2];  // when each rank issued its puts (CLOCK_MONOTONIC)
  char handles[2][NCCL_NET_HANDLE_MAXSIZE];
};

bool waitAtLeast(const std::atomic<int>& v, int least) {
  uint64_t t0 = moeloop::nowNs();
  while (v.load() < least)
    if ((moeloop::nowNs() - t0) * 1e-9 > 30) return false;
  return true;
}

// Both ranks offer the copy transport (forced: no GPU here). Each registers a signal word and two
// host buffers (announced without descriptors), puts a buffer to the other (socket path) with a
// SignalAdd on context 1 and then a signal-only SignalInc on context 0 (header-only, copy path,
// its 2 ms latency applied by the sender). Checks payload, signals, the latency and the counters,
// the hop timing included: one copy-path put each way, whose release hop holds the latency.
int copyProtocol(Page* pg, int me) {
  moeloop::setCopyTransportForTesting(1);
  moeloop::ShapingConfig cfg;
  cfg.latencyNs = 2000000;
  moeloop::setShapingConfig(cfg);
  const ncclRma_v14_t& rma = ncclRmaPlugin_v14;
  void* ctx = nullptr;
  if (rma.init(&ctx, 3, nullptr) != ncclSuccess) return 40;
  void* listenComm = nullptr;
  if (rma.listen(ctx, 0, pg->handles[me], &listenComm) != ncclSuccess) return 41;
  pg->ready.fetch_add(1);
  if (!waitAtLeast(pg->ready, 2)) return 42;
  void* handles[2] = {pg->handles[0], pg->handles[1]};
  void* coll = nullptr;
  if (rma.connect(ctx, handles, 2, me, listenComm, &coll) != ncclSuccess) return 43;
  rma.closeListen(listenComm);
  ncclRmaConfig_v14_t rc = {2, -1, 1};
  void* rmaCtx = nullptr;
  if (rma.createContext(coll, &rc, &rmaCtx) != ncclSuccess) return 44;
  const size_t n = 200000;
  std::vector<uint64_t> signals(2, 0);
  std::vector<uint8_t> src(n), dst(n, 0);
  for (size_t i = 0; i < n; i++) src[i] = (uint8_t)(i * 7 + me * 3);
  void *sigMh, *srcMh, *dstMh;
  if (rma.regMrSym(coll, signals.data(), 16, NCCL_PTR_HOST, 0, &sigMh) ||
      rma.regMrSym(coll, src.data(), n, NCCL_PTR_HOST, 0, &srcMh) ||
      rma.regMrSym(coll, dst.data(), n, NCCL_PTR_HOST, 0, &dstMh))
    return 45;
  const int peer = 1 - me;
  moeloopPeerStats_t before, after;
  moeloopGetPeerStats(peer, -1, &before, sizeof(before));
  moeloopStats_t hopsBefore, hopsAfter;
  if (moeloopGetStats(&hopsBefore, sizeof(hopsBefore)) != sizeof(hopsBefore)) return 63;
  void *r1 = nullptr, *r2 = nullptr;
  uint64_t t0 = moeloop::nowNs();
  pg->startNs[me].store(t0);
  if (rma.iputSignal(rmaCtx, 1, 0, srcMh, n, 0, dstMh, peer, 0, sigMh, 5, NCCL_NET_SIGNAL_OP_ADD, true, &r1) ||
      rma.iputSignal(rmaCtx, 0, 0, nullptr, 0, 0, nullptr, peer, 8, sigMh, 0, NCCL_NET_SIGNAL_OP_INC, true, &r2))
    return 46;
  int d1 = 0, d2 = 0;
  uint64_t incSeenNs = 0;
  while (!(d1 && d2 && incSeenNs)) {
    if (rma.rmaProgress(rmaCtx) != ncclSuccess) return 47;
    if (!d1 && rma.test(coll, r1, &d1) != ncclSuccess) return 48;
    if (!d2 && rma.test(coll, r2, &d2) != ncclSuccess) return 49;
    if (!incSeenNs && __atomic_load_n(&signals[1], __ATOMIC_ACQUIRE) == 1) {
      incSeenNs = moeloop::nowNs();
      if (__atomic_load_n(&signals[0], __ATOMIC_ACQUIRE) != 5) return 50;  // in order
      for (size_t i = 0; i < n; i++)
        if (dst[i] != (uint8_t)(i * 7 + peer * 3)) return 51;
    }
    if ((moeloop::nowNs() - t0) * 1e-9 > 20) return 52;
  }
  // Both messages carry the latency: the socket one at the target, the header-only one at the
  // sender; in order, so the peer's signal-only put lands at least one latency after the peer
  // issued its puts.
  if (incSeenNs - pg->startNs[peer].load() < 2000000) return 53;
  pg->done[me].store(1);
  if (!waitAtLeast(pg->done[peer], 1)) return 54;
  moeloopGetPeerStats(peer, -1, &after, sizeof(after));
  if (after.putsSent - before.putsSent != 2 || after.bytesSent - before.bytesSent != n) return 55;
  if (after.bytesCopied != before.bytesCopied) return 56;  // host memory: socket path
  if (after.signalsSent - before.signalsSent != 2 || after.signalsRecv - before.signalsRecv != 2) return 57;
  if (after.putsRecv - before.putsRecv != 2 || after.bytesRecv - before.bytesRecv != n) return 58;
  moeloopGetStats(&hopsAfter, sizeof(hopsAfter));
  // The socket-path put is not timed; the header-only one is, as sender and (the peer's) as target.
  if (hopsAfter.hopSentPuts - hopsBefore.hopSentPuts != 1 || hopsAfter.hopRecvPuts - hopsBefore.hopRecvPuts != 1)
    return 64;
  const uint64_t release = hopsAfter.hopReleaseNs - hopsBefore.hopReleaseNs;
  const uint64_t queue = hopsAfter.hopQueueNs - hopsBefore.hopQueueNs;
  const uint64_t wire = hopsAfter.hopWireNs - hopsBefore.hopWireNs;
  // Released one latency after it was ready; issued behind the 200 kB socket put; on the wire and
  // applied within a second (the same host clock on both sides).
  if (release < 2000000 || release > 1000000000ull || queue > 1000000000ull || wire > 1000000000ull) return 65;
  moeloopPeerStats_t c1;
  moeloopGetPeerStats(peer, 1, &c1, sizeof(c1));
  if (c1.bytesSent < n || c1.bytesRecv < n) return 59;
  bool hasError = true;
  rma.queryLastError(rmaCtx, &hasError);
  if (hasError) return 60;
  if (rma.deregMrSym(coll, dstMh) || rma.deregMrSym(coll, srcMh) || rma.deregMrSym(coll, sigMh)) return 61;
  rma.destroyContext(rmaCtx);
  if (rma.closeColl(coll) != ncclSuccess) return 62;
  rma.finalize(ctx);
  moeloop::setShapingConfig(moeloop::ShapingConfig{});
  moeloop::setCopyTransportForTesting(-1);
  return 0;
}

TEST(PluginCopyTransport, HostMemoryProtocolBetweenTwoProcesses) {
  Page* pg = (Page*)mmap(nullptr, sizeof(Page), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(pg, MAP_FAILED);
  memset((void*)pg, 0, sizeof(Page));
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(60);
    _exit(copyProtocol(pg, 1));
  }
  int mine = copyProtocol(pg, 0);
  EXPECT_EQ(mine, 0);
  EXPECT_EQ(waitChild(pid), 0);
  munmap(pg, sizeof(Page));
}

}  // namespace
