// The moeloop GIN on host memory, driven through the exported ncclGin_v11_t table the way NCCL's
// proxy drives it (collective listen / connect / regMrSym, iput, iputSignal, test, ginProgress),
// between the processes of one scenario. Needs no GPU.
#include <dlfcn.h>
#include <stdarg.h>
#include <string.h>
#include <vector>

#include "../../plugin/nccl_plugin_abi.h"
#include "plugin_gpu_test.h"

namespace plugintest {
namespace {

constexpr size_t kChunk = 3u << 20;  // bytes each rank puts to each rank, per round
constexpr int kRounds = 3;

uint8_t hostPattern(int src, int dst, size_t i, int round) {
  return (uint8_t)(src * 37 + dst * 11 + round * 101 + (int)(i % 251) + (int)(i >> 12));
}

// The plugin's warnings: printed, except where the check provokes them on purpose.
bool gExpectWarnings = false;
int gWarnings = 0;
void testLogger(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                const char* fmt, ...) {
  (void)flags;
  if (level != NCCL_LOG_WARN) return;
  gWarnings++;
  if (gExpectWarnings) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  fprintf(stderr, "[rank %d] plugin WARN %s:%d %s\n", gRank, file, line, buf);
}

}  // namespace

bool hostGinCheck(const RankInfo& r) {
  const int n = r.nRanks, me = r.rank;
  void* lib = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    PT_FAIL("dlopen(libnccl-net-moeloop.so): %s", dlerror());
    return false;
  }
  ncclGin_v11_t* gin = (ncclGin_v11_t*)dlsym(lib, "ncclGinPlugin_v11");
  ncclNet_v11_t* net = (ncclNet_v11_t*)dlsym(lib, "ncclNetPlugin_v11");
  if (gin == nullptr || net == nullptr) {
    PT_FAIL("the plugin does not export ncclGinPlugin_v11 and ncclNetPlugin_v11");
    return false;
  }
  PT_CHECK(strcmp(gin->name, "moeloop") == 0 && strcmp(net->name, "moeloop") == 0, "plugin names");
  void* ctx = nullptr;
  PT_NCCL(gin->init(&ctx, 0x77, testLogger));
  int ndev = 0;
  PT_NCCL(gin->devices(&ndev));
  PT_CHECK(ndev == 1, "GIN devices = %d", ndev);
  ncclNetProperties_v11_t props;
  PT_NCCL(gin->getProperties(0, &props));
  PT_CHECK(props.netDeviceType == NCCL_NET_DEVICE_GIN_PROXY, "GIN device type %d", (int)props.netDeviceType);
  PT_CHECK(props.ptrSupport & NCCL_PTR_CUDA, "GIN must accept CUDA memory");

  // Collective connect: every rank's listen handle goes to everyone.
  void* listenComm = nullptr;
  PT_NCCL(gin->listen(ctx, 0, r.shared->handles[me], &listenComm));
  r.shared->handlesReady.fetch_add(1);
  if (!barrier(r)) return false;
  void* handles[kMaxRanks];
  for (int i = 0; i < n; i++) handles[i] = r.shared->handles[i];
  void* coll = nullptr;
  PT_NCCL(gin->connect(ctx, handles, n, me, listenComm, &coll));
  PT_NCCL(gin->closeListen(listenComm));

  // Collective registrations, same order everywhere: signals, then source and destination.
  std::vector<uint64_t> signals(4, 0);
  std::vector<uint8_t> src((size_t)n * kChunk), dst((size_t)n * kChunk);
  void *sigMh, *sigGh, *srcMh, *srcGh, *dstMh, *dstGh;
  PT_NCCL(gin->regMrSym(coll, signals.data(), signals.size() * 8, NCCL_PTR_HOST, NCCL_NET_MR_FLAG_FORCE_SO, &sigMh, &sigGh));
  PT_NCCL(gin->regMrSym(coll, src.data(), src.size(), NCCL_PTR_HOST, 0, &srcMh, &srcGh));
  PT_NCCL(gin->regMrSym(coll, dst.data(), dst.size(), NCCL_PTR_HOST, 0, &dstMh, &dstGh));
  PT_CHECK(sigMh == sigGh && srcMh == srcGh, "mhandle and ginHandle differ");

  uint64_t expectAdd = 0, expectInc = 0;
  for (int round = 1; round <= kRounds; round++) {
    for (int p = 0; p < n; p++)
      for (size_t i = 0; i < kChunk; i++) src[(size_t)p * kChunk + i] = hostPattern(me, p, i, round);
    memset(dst.data(), 0, dst.size());
    if (!barrier(r)) return false;
    // To every rank, the own one included: three pieces, the last one with SignalAdd, then a
    // signal-only put (size 0, no windows) with SignalInc, as ncclGin::signal does.
    std::vector<void*> reqs;
    const size_t pieces[3] = {1, 70000, kChunk - 70001};
    for (int k = 0; k < n; k++) {
      int p = (me + 1 + k) % n;
      size_t off = 0;
      for (int j = 0; j < 3; j++) {
        void* req = nullptr;
        uint64_t s = (uint64_t)p * kChunk + off, d = (uint64_t)me * kChunk + off;
        if (j < 2)
          PT_NCCL(gin->iput(coll, s, srcGh, pieces[j], d, dstGh, (uint32_t)p, &req));
        else
          PT_NCCL(gin->iputSignal(coll, s, srcGh, pieces[j], d, dstGh, (uint32_t)p, 0, sigGh,
                                  (uint64_t)(me + 1), NCCL_NET_SIGNAL_OP_ADD, &req));
        reqs.push_back(req);
        off += pieces[j];
      }
      void* req = nullptr;
      PT_NCCL(gin->iputSignal(coll, 0, nullptr, 0, 0, nullptr, (uint32_t)p, 8, sigGh, 0,
                              NCCL_NET_SIGNAL_OP_INC, &req));
      reqs.push_back(req);
    }
    for (int p = 0; p < n; p++) expectAdd += (uint64_t)(p + 1);
    expectInc += (uint64_t)n;
    // Progress until our puts are sent and everyone's reached us.
    double t0 = nowSec();
    size_t done = 0;
    std::vector<bool> finished(reqs.size(), false);
    for (;;) {
      PT_NCCL(gin->ginProgress(coll));
      for (size_t i = 0; i < reqs.size(); i++) {
        if (finished[i]) continue;
        int d = 0;
        PT_NCCL(gin->test(coll, reqs[i], &d));
        if (d) {
          finished[i] = true;
          done++;
        }
      }
      uint64_t a = __atomic_load_n(&signals[0], __ATOMIC_ACQUIRE);
      uint64_t b = __atomic_load_n(&signals[1], __ATOMIC_ACQUIRE);
      if (done == reqs.size() && a == expectAdd && b == expectInc) break;
      PT_CHECK(a <= expectAdd && b <= expectInc, "signals overshoot: %llu/%llu, %llu/%llu",
               (unsigned long long)a, (unsigned long long)expectAdd, (unsigned long long)b,
               (unsigned long long)expectInc);
      if (nowSec() - t0 > 60) {
        PT_FAIL("round %d: timed out (%zu of %zu requests done, signals %llu/%llu and %llu/%llu)",
                round, done, reqs.size(), (unsigned long long)a, (unsigned long long)expectAdd,
                (unsigned long long)b, (unsigned long long)expectInc);
        return false;
      }
    }
    size_t bad = 0;
    for (int p = 0; p < n; p++)
      for (size_t i = 0; i < kChunk; i++)
        if (dst[(size_t)p * kChunk + i] != hostPattern(p, me, i, round)) bad++;
    PT_CHECK(bad == 0, "round %d: %zu wrong bytes", round, bad);
    // Everyone must be done reading before the next round rewrites the buffers.
    if (!barrier(r)) return false;
  }
  bool hasError = true;
  PT_NCCL(gin->queryLastError(coll, &hasError));
  PT_CHECK(!hasError, "queryLastError reports an error after a clean run");

  PT_CHECK(gWarnings == 0, "the plugin warned %d time(s) during a clean run", gWarnings);
  // Error path, at the end: a put beyond the registration fails and poisons the comm.
  gExpectWarnings = true;
  void* req = nullptr;
  ncclResult_t bad = gin->iput(coll, src.size() - 10, srcGh, 100, 0, dstGh, (uint32_t)me, &req);
  PT_CHECK(bad != ncclSuccess, "an out-of-bounds iput succeeded");
  PT_NCCL(gin->queryLastError(coll, &hasError));
  PT_CHECK(hasError, "queryLastError does not report the failed iput");
  PT_CHECK(gWarnings > 0, "the failed iput was not logged");

  if (!barrier(r)) return false;
  PT_NCCL(gin->deregMrSym(coll, dstMh));
  PT_NCCL(gin->deregMrSym(coll, srcMh));
  PT_NCCL(gin->deregMrSym(coll, sigMh));
  PT_NCCL(gin->closeColl(coll));
  PT_NCCL(gin->finalize(ctx));
  PT_CHECK(dlclose(lib) == 0, "dlclose: %s", dlerror());
  return true;
}

}  // namespace plugintest
