// CPU tests of the moeloop plugin's GIN tables (plugin/moeloop_gin_tables.cc) on host memory:
// what each exported table carries, the v12 properties NCCL 2.30 reads, contexts of GIN v13 /
// RMA v14 driven the way NCCL 2.30.7's GIN proxy drives them (one process, and two processes
// with puts on several contexts), the put size limit, and a put naming a registration the target
// never made (which must fail the target's comm, not stall it).
#include <gtest/gtest.h>

#include <atomic>
#include <errno.h>
#include <functional>
#include <stdarg.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "../../plugin/moeloop_gin.h"
#include "../../plugin/moeloop_gin_tables.h"
#include "../../plugin/moeloop_log.h"
#include "../../plugin/moeloop_net_props.h"

namespace {

int gWarnings = 0;
void countingLogger(ncclDebugLogLevel level, unsigned long, const char*, int, const char*, ...) {
  if (level == NCCL_LOG_WARN) gWarnings++;
}

// --- the exported tables -------------------------------------------------------------------------

TEST(PluginGinTables, EveryTableIsNamedAndComplete) {
  EXPECT_STREQ(ncclGinPlugin_v11.name, "moeloop");
  EXPECT_STREQ(ncclGinPlugin_v13.name, "moeloop");
  EXPECT_STREQ(ncclRmaPlugin_v14.name, "moeloop");
  const ncclGin_v13_t& g = ncclGinPlugin_v13;
  for (const void* f : {(const void*)g.init, (const void*)g.devices, (const void*)g.getProperties,
                        (const void*)g.listen, (const void*)g.connect, (const void*)g.createContext,
                        (const void*)g.regMrSym, (const void*)g.regMrSymDmaBuf,
                        (const void*)g.deregMrSym, (const void*)g.destroyContext,
                        (const void*)g.closeColl, (const void*)g.closeListen, (const void*)g.iput,
                        (const void*)g.iputSignal, (const void*)g.test, (const void*)g.ginProgress,
                        (const void*)g.queryLastError, (const void*)g.finalize}) {
    EXPECT_NE(f, nullptr);
  }
  const ncclRma_v14_t& r = ncclRmaPlugin_v14;
  for (const void* f : {(const void*)r.init, (const void*)r.devices, (const void*)r.getProperties,
                        (const void*)r.listen, (const void*)r.connect, (const void*)r.createContext,
                        (const void*)r.regMrSym, (const void*)r.regMrSymDmaBuf,
                        (const void*)r.deregMrSym, (const void*)r.destroyContext,
                        (const void*)r.closeColl, (const void*)r.closeListen, (const void*)r.iput,
                        (const void*)r.iputSignal, (const void*)r.test, (const void*)r.rmaProgress,
                        (const void*)r.queryLastError, (const void*)r.finalize}) {
    EXPECT_NE(f, nullptr);
  }
  // Device-side gets are not supported: NULL tells NCCL so.
  EXPECT_EQ(g.iget, nullptr);
  EXPECT_EQ(g.iflush, nullptr);
  EXPECT_EQ(r.iget, nullptr);
  EXPECT_EQ(r.iflush, nullptr);
}

TEST(PluginGinTables, LayoutsMatchNccl230) {
  EXPECT_EQ(sizeof(ncclGin_v13_t), 168u);
  EXPECT_EQ(sizeof(ncclRma_v14_t), 168u);
  EXPECT_EQ(sizeof(ncclNetProperties_v12_t), 128u);
  EXPECT_EQ(sizeof(ncclGin_v11_t), 152u);
}

// NCCL 2.30.7's RMA v13 adapter rejects anything but GIN_PROXY; its proxy sizes the descriptor
// queue of each (context, peer) as 32 * maxRecvs and needs a power of two.
TEST(PluginGinTables, V12PropertiesDescribeAProxyNic) {
  ncclNetProperties_v12_t p12;
  ASSERT_EQ(ncclRmaPlugin_v14.getProperties(0, &p12), ncclSuccess);
  ncclNetProperties_v11_t p11;
  ASSERT_EQ(ncclGinPlugin_v11.getProperties(0, &p11), ncclSuccess);
  EXPECT_EQ(p12.netDeviceType, NCCL_NET_DEVICE_GIN_PROXY);
  EXPECT_EQ(p12.ptrSupport, NCCL_PTR_HOST | NCCL_PTR_CUDA);  // no DMA-BUF: plain regMrSym
  int depth = NCCL_NET_MAX_REQUESTS * p12.maxRecvs;
  EXPECT_GT(depth, 0);
  EXPECT_EQ(depth & (depth - 1), 0);
  EXPECT_EQ(p12.railId, NCCL_NET_ID_UNDEF);
  EXPECT_EQ(p12.planeId, NCCL_NET_ID_UNDEF);
  EXPECT_EQ(p12.vProps.ndevs, 1);
  EXPECT_EQ(p12.vProps.devs[0], 0);
  EXPECT_EQ(p12.maxP2pBytes, moeloop::kMaxMessageBytes);
  EXPECT_STREQ(p12.name, p11.name);
  EXPECT_EQ(p12.guid, p11.guid);
  EXPECT_EQ(p12.speed, p11.speed);
  EXPECT_EQ(p12.maxRecvs, p11.maxRecvs);
  EXPECT_EQ(p12.maxComms, p11.maxComms);
  ncclNetProperties_v12_t viaGin13;
  ASSERT_EQ(ncclGinPlugin_v13.getProperties(0, &viaGin13), ncclSuccess);
  EXPECT_EQ(memcmp(&viaGin13, &p12, sizeof(p12)), 0);
  moeloop::setLogger(countingLogger);
  EXPECT_NE(ncclRmaPlugin_v14.getProperties(1, &p12), ncclSuccess);
  EXPECT_NE(ncclRmaPlugin_v14.getProperties(0, nullptr), ncclSuccess);
}

// --- one process: a collComm of one rank ----------------------------------------------------------

struct SoloComm {
  void* ctx = nullptr;
  void* coll = nullptr;
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  bool open() {
    if (ncclRmaPlugin_v14.init(&ctx, 1, countingLogger) != ncclSuccess) return false;
    void* listenComm = nullptr;
    if (ncclRmaPlugin_v14.listen(ctx, 0, handle, &listenComm) != ncclSuccess) return false;
    void* handles[1] = {handle};
    ncclResult_t res = ncclRmaPlugin_v14.connect(ctx, handles, 1, 0, listenComm, &coll);
    return ncclRmaPlugin_v14.closeListen(listenComm) == ncclSuccess && res == ncclSuccess;
  }
  ~SoloComm() {
    if (coll) {
      EXPECT_EQ(ncclRmaPlugin_v14.closeColl(coll), ncclSuccess);
    }
    if (ctx) {
      EXPECT_EQ(ncclRmaPlugin_v14.finalize(ctx), ncclSuccess);
    }
  }
};

int waitDone(void* coll, void* request) {
  int done = 0;
  for (int i = 0; i < 1000000 && !done; i++)
    if (ncclRmaPlugin_v14.test(coll, request, &done) != ncclSuccess) return -1;
  return done;
}

TEST(PluginGinContexts, RmaV14PutsAndSignalsOnEveryContext) {
  SoloComm s;
  ASSERT_TRUE(s.open());
  ncclRmaConfig_v14_t cfg = {3, -1, 1};
  void* rmaCtx = nullptr;
  ASSERT_EQ(ncclRmaPlugin_v14.createContext(s.coll, &cfg, &rmaCtx), ncclSuccess);
  std::vector<uint8_t> src(4096), dst(4096, 0);
  for (size_t i = 0; i < src.size(); i++) src[i] = (uint8_t)(i * 7 + 1);
  std::vector<uint64_t> signals(4, 0);
  void *srcMh, *dstMh, *sigMh;
  ASSERT_EQ(ncclRmaPlugin_v14.regMrSym(s.coll, signals.data(), 32, NCCL_PTR_HOST,
                                       NCCL_NET_MR_FLAG_FORCE_SO | NCCL_NET_MR_FLAG_SIGNAL_NEVER_RESET, &sigMh),
            ncclSuccess);
  ASSERT_EQ(ncclRmaPlugin_v14.regMrSym(s.coll, src.data(), src.size(), NCCL_PTR_HOST, 0, &srcMh), ncclSuccess);
  ASSERT_EQ(ncclRmaPlugin_v14.regMrSym(s.coll, dst.data(), dst.size(), NCCL_PTR_HOST, 0, &dstMh), ncclSuccess);
  for (int c = 0; c < 3; c++) {
    void* req = nullptr;
    ASSERT_EQ(ncclRmaPlugin_v14.iput(rmaCtx, c, c * 1000, srcMh, 1000, c * 1000, dstMh, 0, &req), ncclSuccess);
    EXPECT_EQ(waitDone(s.coll, req), 1);
    ASSERT_EQ(ncclRmaPlugin_v14.iputSignal(rmaCtx, c, 3000, srcMh, 10, 3000, dstMh, 0, 8 * c, sigMh,
                                           5, NCCL_NET_SIGNAL_OP_ADD, c != 1, &req),
              ncclSuccess);
    EXPECT_EQ(waitDone(s.coll, req), 1);
    // A VA signal as NCCL's proxy issues it: signal only, no windows.
    ASSERT_EQ(ncclRmaPlugin_v14.iputSignal(rmaCtx, c, 0, nullptr, 0, 0, nullptr, 0, 24, sigMh, 0,
                                           NCCL_NET_SIGNAL_OP_INC, true, &req),
              ncclSuccess);
    EXPECT_EQ(waitDone(s.coll, req), 1);
    ASSERT_EQ(ncclRmaPlugin_v14.rmaProgress(rmaCtx), ncclSuccess);
  }
  EXPECT_EQ(memcmp(src.data(), dst.data(), 3010), 0);
  EXPECT_EQ(signals[0], 5u);
  EXPECT_EQ(signals[1], 5u);
  EXPECT_EQ(signals[2], 5u);
  EXPECT_EQ(signals[3], 3u);
  bool hasError = true;
  EXPECT_EQ(ncclRmaPlugin_v14.queryLastError(rmaCtx, &hasError), ncclSuccess);
  EXPECT_FALSE(hasError);
  // A context id outside the set fails and the error sticks to the comm.
  void* req = nullptr;
  EXPECT_EQ(ncclRmaPlugin_v14.iput(rmaCtx, 3, 0, srcMh, 8, 0, dstMh, 0, &req), ncclInvalidArgument);
  EXPECT_EQ(ncclRmaPlugin_v14.queryLastError(rmaCtx, &hasError), ncclSuccess);
  EXPECT_TRUE(hasError);
  EXPECT_EQ(ncclRmaPlugin_v14.destroyContext(rmaCtx), ncclSuccess);
  for (void* mh : {dstMh, srcMh, sigMh}) {
    EXPECT_EQ(ncclRmaPlugin_v14.deregMrSym(s.coll, mh), ncclSuccess);
  }
}

TEST(PluginGinContexts, GinV13ContextHasNoDeviceHandleAndSurvivesCloseOrder) {
  SoloComm s;
  ASSERT_TRUE(s.open());
  ncclGinConfig_v13_t cfg = {4, 1, 2, 0, -1};
  void* ginCtx = nullptr;
  ncclNetDeviceHandle_v11_t* dev = (ncclNetDeviceHandle_v11_t*)&cfg;  // must be overwritten
  ASSERT_EQ(ncclGinPlugin_v13.createContext(s.coll, &cfg, &ginCtx, &dev), ncclSuccess);
  EXPECT_EQ(dev, nullptr);
  EXPECT_NE(ginCtx, nullptr);
  std::vector<uint64_t> word(1, 0);
  void *mh, *gh;
  ASSERT_EQ(ncclGinPlugin_v13.regMrSym(s.coll, word.data(), 8, NCCL_PTR_HOST, 0, &mh, &gh), ncclSuccess);
  EXPECT_EQ(mh, gh);
  void* req = nullptr;
  ASSERT_EQ(ncclGinPlugin_v13.iputSignal(ginCtx, 1, 0, nullptr, 0, 0, nullptr, 0, 0, gh, 7,
                                         NCCL_NET_SIGNAL_OP_ADD, &req),
            ncclSuccess);
  int done = 0;
  ASSERT_EQ(ncclGinPlugin_v13.test(s.coll, req, &done), ncclSuccess);
  EXPECT_EQ(done, 1);
  EXPECT_EQ(word[0], 7u);
  // Closing the comm before its context leaves the context destroyable (no use of the comm).
  ASSERT_EQ(ncclGinPlugin_v13.closeColl(s.coll), ncclSuccess);
  s.coll = nullptr;
  EXPECT_EQ(ncclGinPlugin_v13.destroyContext(ginCtx), ncclSuccess);
}

// Hardening: sizes above kMaxMessageBytes are rejected before any byte is touched (the region
// below is a 2 GiB registration of a 4 KiB buffer: a copy would crash).
TEST(PluginGinHardening, PutAboveTheMaximumIsRejected) {
  SoloComm s;
  ASSERT_TRUE(s.open());
  std::vector<uint8_t> small(4096);
  const size_t claimed = 2ull << 30;
  void* mh = nullptr;
  ASSERT_EQ(ncclRmaPlugin_v14.regMrSym(s.coll, small.data(), claimed, NCCL_PTR_HOST, 0, &mh), ncclSuccess);
  ncclRmaConfig_v14_t cfg = {1, -1, 1};
  void* rmaCtx = nullptr;
  ASSERT_EQ(ncclRmaPlugin_v14.createContext(s.coll, &cfg, &rmaCtx), ncclSuccess);
  void* req = nullptr;
  EXPECT_EQ(ncclRmaPlugin_v14.iput(rmaCtx, 0, 0, mh, moeloop::kMaxMessageBytes + 1, 0, mh, 0, &req),
            ncclInvalidArgument);
  EXPECT_EQ(req, nullptr);
  EXPECT_EQ(ncclRmaPlugin_v14.destroyContext(rmaCtx), ncclSuccess);
}

// --- two processes -------------------------------------------------------------------------------

struct SharedPage {
  std::atomic<int> handlesReady;
  std::atomic<int> phase[2];
  char handles[2][NCCL_NET_HANDLE_MAXSIZE];
};

// Runs fn(rank) in a child (rank 1) and here (rank 0); returns the child's exit code, -1 if here
// failed.
int runTwoRanks(SharedPage* sh, const std::function<int(int)>& fn) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(60);
    _exit(fn(1));
  }
  int mine = fn(0);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  (void)sh;
  int child = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return mine != 0 ? -mine : child;
}

bool waitFor(const std::atomic<int>& v, int least) {
  uint64_t t0 = moeloop::nowNs();
  while (v.load() < least)
    if ((moeloop::nowNs() - t0) * 1e-9 > 30) return false;
  return true;
}

// Connects rank `me` of 2 through RMA v14. Returns the collComm or NULL.
void* connectPair(SharedPage* sh, int me, void** ctx) {
  if (ncclRmaPlugin_v14.init(ctx, 2, countingLogger) != ncclSuccess) return nullptr;
  void* listenComm = nullptr;
  if (ncclRmaPlugin_v14.listen(*ctx, 0, sh->handles[me], &listenComm) != ncclSuccess) return nullptr;
  sh->handlesReady.fetch_add(1);
  if (!waitFor(sh->handlesReady, 2)) return nullptr;
  void* handles[2] = {sh->handles[0], sh->handles[1]};
  void* coll = nullptr;
  if (ncclRmaPlugin_v14.connect(*ctx, handles, 2, me, listenComm, &coll) != ncclSuccess) return nullptr;
  if (ncclRmaPlugin_v14.closeListen(listenComm) != ncclSuccess) return nullptr;
  return coll;
}

SharedPage* newSharedPage() {
  void* p = mmap(nullptr, sizeof(SharedPage), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  memset(p, 0, sizeof(SharedPage));
  return (SharedPage*)p;
}

// Each rank puts 4 pieces on 4 contexts to the other, the last with a signal on context 3: the
// signal must not become visible before the earlier contexts' payloads (all contexts of a comm
// share one ordered stream per peer).
int orderedAcrossContexts(SharedPage* sh, int me) {
  void* ctx = nullptr;
  void* coll = connectPair(sh, me, &ctx);
  if (coll == nullptr) return 10;
  ncclRmaConfig_v14_t cfg = {4, -1, 1};
  void* rmaCtx = nullptr;
  if (ncclRmaPlugin_v14.createContext(coll, &cfg, &rmaCtx) != ncclSuccess) return 11;
  const size_t piece = 300000;
  std::vector<uint8_t> src(4 * piece), dst(4 * piece, 0);
  for (size_t i = 0; i < src.size(); i++) src[i] = (uint8_t)(i * 13 + me * 5 + (i >> 11));
  std::vector<uint64_t> signal(1, 0);
  void *sigMh, *srcMh, *dstMh;
  if (ncclRmaPlugin_v14.regMrSym(coll, signal.data(), 8, NCCL_PTR_HOST, NCCL_NET_MR_FLAG_FORCE_SO, &sigMh) ||
      ncclRmaPlugin_v14.regMrSym(coll, src.data(), src.size(), NCCL_PTR_HOST, 0, &srcMh) ||
      ncclRmaPlugin_v14.regMrSym(coll, dst.data(), dst.size(), NCCL_PTR_HOST, 0, &dstMh))
    return 12;
  int peer = 1 - me;
  std::vector<void*> reqs;
  for (int c = 0; c < 4; c++) {
    void* req = nullptr;
    ncclResult_t res = c < 3 ? ncclRmaPlugin_v14.iput(rmaCtx, c, c * piece, srcMh, piece, c * piece, dstMh, peer, &req)
                             : ncclRmaPlugin_v14.iputSignal(rmaCtx, c, c * piece, srcMh, piece, c * piece, dstMh,
                                                            peer, 0, sigMh, 1, NCCL_NET_SIGNAL_OP_INC, true, &req);
    if (res != ncclSuccess) return 13;
    reqs.push_back(req);
  }
  std::vector<bool> done(reqs.size(), false);
  uint64_t t0 = moeloop::nowNs();
  for (;;) {
    if (ncclRmaPlugin_v14.rmaProgress(rmaCtx) != ncclSuccess) return 14;
    size_t n = 0;
    for (size_t i = 0; i < reqs.size(); i++) {
      int d = 0;
      if (!done[i] && ncclRmaPlugin_v14.test(coll, reqs[i], &d) != ncclSuccess) return 15;
      if (d) done[i] = true;
      n += done[i];
    }
    if (__atomic_load_n(&signal[0], __ATOMIC_ACQUIRE) == 1) {
      for (size_t i = 0; i < dst.size(); i++)
        if (dst[i] != (uint8_t)(i * 13 + peer * 5 + (i >> 11))) return 16;
      if (n == reqs.size()) break;
    }
    if ((moeloop::nowNs() - t0) * 1e-9 > 30) return 17;
  }
  sh->phase[me].store(1);
  if (!waitFor(sh->phase[peer], 1)) return 18;  // the peer may still read from our socket
  if (ncclRmaPlugin_v14.destroyContext(rmaCtx) != ncclSuccess) return 19;
  if (ncclRmaPlugin_v14.closeColl(coll) != ncclSuccess) return 20;
  return ncclRmaPlugin_v14.finalize(ctx) == ncclSuccess ? 0 : 21;
}

TEST(PluginGinContexts, TwoRanksSignalFollowsEarlierContextsPayloads) {
  SharedPage* sh = newSharedPage();
  ASSERT_NE(sh, nullptr);
  EXPECT_EQ(runTwoRanks(sh, [&](int me) { return orderedAcrossContexts(sh, me); }), 0);
  munmap(sh, sizeof(SharedPage));
}

// Hardening: rank 0 puts into its registration 1; rank 1 made only registration 0. Rank 1's comm
// must fail with an error within the registration wait (1 s here), not wait forever.
int unknownRegistration(SharedPage* sh, int me) {
  moeloop::setRegistrationWaitForTesting(1.0);
  void* ctx = nullptr;
  void* coll = connectPair(sh, me, &ctx);
  if (coll == nullptr) return 30;
  ncclRmaConfig_v14_t cfg = {1, -1, 1};
  void* rmaCtx = nullptr;
  if (ncclRmaPlugin_v14.createContext(coll, &cfg, &rmaCtx) != ncclSuccess) return 31;
  std::vector<uint8_t> a(64), b(64);
  void *mhA, *mhB = nullptr;
  if (ncclRmaPlugin_v14.regMrSym(coll, a.data(), a.size(), NCCL_PTR_HOST, 0, &mhA) != ncclSuccess) return 32;
  if (me == 0 && ncclRmaPlugin_v14.regMrSym(coll, b.data(), b.size(), NCCL_PTR_HOST, 0, &mhB) != ncclSuccess)
    return 33;
  int rc = 0;
  if (me == 0) {
    void* req = nullptr;
    if (ncclRmaPlugin_v14.iput(rmaCtx, 0, 0, mhA, 64, 0, mhB, 1, &req) != ncclSuccess) return 34;
    if (waitDone(coll, req) != 1) return 35;
    if (!waitFor(sh->phase[1], 1)) return 36;
  } else {
    uint64_t t0 = moeloop::nowNs();
    ncclResult_t res = ncclSuccess;
    while (res == ncclSuccess && (moeloop::nowNs() - t0) * 1e-9 < 10) res = ncclRmaPlugin_v14.rmaProgress(rmaCtx);
    bool hasError = false;
    (void)ncclRmaPlugin_v14.queryLastError(rmaCtx, &hasError);
    if (res != ncclRemoteError || !hasError) rc = 37;
    sh->phase[1].store(1);
  }
  ncclRmaPlugin_v14.destroyContext(rmaCtx);
  ncclRmaPlugin_v14.closeColl(coll);
  ncclRmaPlugin_v14.finalize(ctx);
  moeloop::setRegistrationWaitForTesting(0);
  return rc;
}

TEST(PluginGinHardening, PutToAnUnknownRegistrationFailsTheTarget) {
  SharedPage* sh = newSharedPage();
  ASSERT_NE(sh, nullptr);
  EXPECT_EQ(runTwoRanks(sh, [&](int me) { return unknownRegistration(sh, me); }), 0);
  munmap(sh, sizeof(SharedPage));
}

}  // namespace
