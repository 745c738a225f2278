// GPU test of the internode transport layer (net/) through the moeloop plugin: 2 fake nodes x 1
// GPU (NCCL_HOSTID=node0 / node1, NCCL_NET_PLUGIN=moeloop), one process per GPU (testing/ranks.h).
//   1. node map: placements all-gathered, buildNodeMap gives 2 nodes x 1, the rail peer is the
//      other rank;
//   2. ncclDevCommCreate with ginRequirements (ginUnavailableError says why when it fails);
//   3. three rounds: each rank stages M records for its rail peer and puts them with a count
//      signal (putWithSignal), then waits for the peer's (waitGinSignal, exact target round * M);
//      the landed bytes are checked on the host;
//   4. timeout: rank 1 waits for a signal rank 0 never adds; the wait gives up after 100 ms with
//      kDevTimeout (kWaitGinSignal, peer 0) in the error record, and the kernel ends (no hang).
// Run: make nettest (sets LD_LIBRARY_PATH to the build's lib folder); prints ALL PASSED.
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vector>

#include <nccl.h>
#include <nccl_device.h>
#include "../../../testing/ranks.h"
#include "net/device/gin.cuh"
#include "net/device/rail.h"
#include "net/gin_setup.h"
#include "net/node_map.h"
#include "net/regions.h"

using namespace nccl_moe;

namespace {

int gRank = 0, gFailures = 0;
#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "[rank %d] FAIL %s:%d: ", gRank, __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
      gFailures++;                                                         \
      return false;                                                        \
    }                                                                      \
  } while (0)
#define CUDA(call) CHECK((call) == cudaSuccess, "%s failed", #call)
#define NCCL(call)                                                                            \
  do {                                                                                        \
    ncclResult_t r_ = (call);                                                                 \
    CHECK(r_ == ncclSuccess, "%s: %s (%s)", #call, ncclGetErrorString(r_), ncclMoeGetLastError()); \
  } while (0)

constexpr int kRounds = 3;

struct PutWaitArgs {
  ncclDevComm dc;
  ncclWindow_t win;
  WindowView w;        // error record and timeout of the waits
  int peer;            // world rank
  int send;            // 0: only wait
  size_t srcOff, dstOff, bytes;
  int sendSignal, waitSignal;
  uint64_t count, target;
  int* waitOk;         // device
};

__global__ void putAndWaitKernel(PutWaitArgs a) {
  if (a.send) {
    ncclGin out(a.dc, ginContextOf(a.dc, a.peer));
    putWithSignal(out, a.win, a.peer, a.dstOff, a.srcOff, a.bytes, (ncclGinSignal_t)a.sendSignal, a.count,
                  ncclCoopCta());
    out.flush(ncclCoopCta());
  }
  if (threadIdx.x == 0) {
    ncclGin in(a.dc, ginContextOf(a.dc, a.w.peers.rank));
    *a.waitOk = waitGinSignal(a.w, in, (ncclGinSignal_t)a.waitSignal, a.target, a.peer) ? 1 : 0;
  }
}

uint8_t pattern(int round, int src, size_t i) { return (uint8_t)(round * 41 + src * 13 + i % 251 + (i >> 9)); }

uint64_t hashString(const char* s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; ++s) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

double nowSec() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Waits for `s` up to `limitSec`; false when it did not finish (a hang).
bool finishes(cudaStream_t s, double limitSec) {
  const double t0 = nowSec();
  while (cudaStreamQuery(s) == cudaErrorNotReady)
    if (nowSec() - t0 > limitSec) return false;
  return cudaStreamQuery(s) == cudaSuccess;
}

bool run(const moe_ranks::RankEnv& env, ncclComm_t comm) {
  // 1. Node map from every rank's placement.
  const ncclTeam_t lsa = ncclTeamLsa(comm);
  const RankPlacement mine{hashString(getenv("NCCL_HOSTID")), lsa.rank, lsa.nRanks};
  std::vector<RankPlacement> all(env.nRanks);
  cudaStream_t s;
  CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  RankPlacement* dev = nullptr;
  CUDA(cudaMalloc(&dev, sizeof(RankPlacement) * (env.nRanks + 1)));
  CUDA(cudaMemcpy(dev, &mine, sizeof(mine), cudaMemcpyHostToDevice));
  NCCL(ncclAllGather(dev, dev + 1, sizeof(mine), ncclUint8, comm, s));
  CUDA(cudaMemcpyAsync(all.data(), dev + 1, sizeof(mine) * env.nRanks, cudaMemcpyDeviceToHost, s));
  CUDA(cudaStreamSynchronize(s));
  CUDA(cudaFree(dev));
  NodeMap nodes;
  NCCL(buildNodeMap(all.data(), env.nRanks, &nodes));
  CHECK(nodes.nNodes == 2 && nodes.gpusPerNode == 1, "node map %d x %d, expected 2 x 1", nodes.nNodes,
        nodes.gpusPerNode);
  const PeerMap peers = nodes.peerMap(env.rank);
  const int peer = railPeer(peers, 1 - nodes.node(env.rank));
  CHECK(peer == 1 - env.rank, "rail peer %d", peer);

  // 2. Window (the regions of one LL slot) and the device communicator with GIN.
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.mode = ncclMoeLowLatency;
  cfg.numExperts = 8;
  cfg.hidden = 1024;
  cfg.topK = 4;
  cfg.maxTokensPerRank = 8;
  cfg.numSms = 1;
  cfg.numBufferSlots = 2;
  cfg.timeoutMs = 100;
  LlNetSlotRegions regions;
  NCCL(computeLlNetRegions(cfg, nodes, &regions));
  GinSignalPlan plan;
  NCCL(planGinSignals(cfg, nodes, &plan));
  char* base = nullptr;
  NCCL(ncclMemAlloc((void**)&base, regions.bytes));
  CUDA(cudaMemset(base, 0, regions.bytes));
  ncclWindow_t win;
  NCCL(ncclCommWindowRegister(comm, base, regions.bytes, &win, NCCL_WIN_COLL_SYMMETRIC));
  const ncclDevCommRequirements reqs = ginRequirements(nodes, plan);
  ncclDevComm dc;
  const ncclResult_t created = ncclDevCommCreate(comm, &reqs, &dc);
  if (created != ncclSuccess) ginUnavailableError(created, nodes);
  NCCL(created);
  CHECK(dc.ginContextCount >= 1, "no GIN context");
  DeviceError* errHost = nullptr;
  DeviceError* errDev = nullptr;
  CUDA(cudaHostAlloc(&errHost, sizeof(DeviceError), cudaHostAllocMapped));
  memset(errHost, 0, sizeof(DeviceError));
  CUDA(cudaHostGetDevicePointer((void**)&errDev, errHost, 0));
  int* okDev = nullptr;
  CUDA(cudaMalloc(&okDev, sizeof(int)));

  PutWaitArgs a;
  memset(&a, 0, sizeof(a));
  a.dc = dc;
  a.win = win;
  a.w.win = win;
  a.w.peers = peers;
  a.w.error = errDev;
  a.w.localError = errDev;
  a.w.timeoutNs = 30LL * 1000 * 1000 * 1000;
  a.peer = peer;
  a.send = 1;
  const size_t rows = (size_t)cfg.maxTokensPerRank * regions.record.bytes;  // one batch: M records
  a.srcOff = regions.dispatchStage + remoteIndex(peers, peer) * rows;
  a.dstOff = regions.dispatchLand + remoteIndex(nodes.peerMap(peer), env.rank) * rows;
  a.bytes = rows;
  a.sendSignal = plan.dispatch(0, env.rank);
  a.waitSignal = plan.dispatch(0, peer);
  a.count = cfg.maxTokensPerRank;
  a.waitOk = okDev;

  // 3. Rounds of put-with-signal and exact waits; the landed records checked on the host.
  std::vector<uint8_t> host(rows);
  for (int round = 1; round <= kRounds; ++round) {
    for (size_t i = 0; i < rows; ++i) host[i] = pattern(round, env.rank, i);
    CUDA(cudaMemcpy(base + a.srcOff, host.data(), rows, cudaMemcpyHostToDevice));
    moe_ranks::barrier();  // the peer checked the previous round's landing rows
    a.target = (uint64_t)round * a.count;
    putAndWaitKernel<<<1, 128, 0, s>>>(a);
    CUDA(cudaGetLastError());
    CHECK(finishes(s, 60), "round %d: the kernel did not finish in 60 s", round);
    int ok = 0;
    CUDA(cudaMemcpy(&ok, okDev, sizeof(ok), cudaMemcpyDeviceToHost));
    CHECK(ok == 1 && errHost->code == kDevOk, "round %d: wait failed (error %d, kind %d, peer %d, value %d)",
          round, errHost->code, errHost->a, errHost->b, errHost->c);
    const size_t land = regions.dispatchLand + remoteIndex(peers, peer) * rows;
    CUDA(cudaMemcpy(host.data(), base + land, rows, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < rows; ++i) bad += host[i] != pattern(round, peer, i);
    CHECK(bad == 0, "round %d: %zu of %zu landed bytes wrong", round, bad, rows);
    moe_ranks::barrier();
  }
  if (env.rank == 0) printf("PASSED: %d rounds of putWithSignal + waitGinSignal between 2 fake nodes (%zu bytes each)\n",
                            kRounds, rows);

  // 4. A peer that never puts: rank 1 times out after 100 ms, recorded, no hang.
  if (env.rank == 1) {
    a.send = 0;
    a.waitSignal = plan.dispatch(1, peer);  // slot 1: nobody adds to it
    a.target = 1;
    a.w.timeoutNs = (long long)cfg.timeoutMs * 1000 * 1000;
    const double t0 = nowSec();
    putAndWaitKernel<<<1, 128, 0, s>>>(a);
    CUDA(cudaGetLastError());
    CHECK(finishes(s, 10), "timeout: the waiting kernel did not end within 10 s");
    const double took = nowSec() - t0;
    int ok = 1;
    CUDA(cudaMemcpy(&ok, okDev, sizeof(ok), cudaMemcpyDeviceToHost));
    CHECK(ok == 0, "timeout: the wait succeeded");
    CHECK(errHost->code == kDevTimeout && errHost->a == kWaitGinSignal && errHost->b == peer && errHost->fatal == 1,
          "timeout: error record %d (kind %d, peer %d, fatal %d), expected %d (%d, %d, 1)", errHost->code,
          errHost->a, errHost->b, errHost->fatal, kDevTimeout, kWaitGinSignal, peer);
    printf("PASSED: a GIN signal that never arrives gives kDevTimeout (kind %d, peer %d) after %.0f ms\n",
           errHost->a, errHost->b, took * 1e3);
  }
  moe_ranks::barrier();
  NCCL(ncclDevCommDestroy(comm, &dc));
  NCCL(ncclCommWindowDeregister(comm, win));
  NCCL(ncclMemFree(base));
  CUDA(cudaFree(okDev));
  CUDA(cudaFreeHost(errHost));
  CUDA(cudaStreamDestroy(s));
  return true;
}

}  // namespace

int main() {
  moe_ranks::RankEnv env;
  if (!moe_ranks::start(2, &env)) return 1;  // one process per GPU, before any CUDA call
  if (env.nRanks < 2) {
    printf("SKIPPED: the net GPU test needs 2 GPUs\n");
    return moe_ranks::finish(0);
  }
  gRank = env.rank;
  // Before the first NCCL call: each rank is a node of its own, through the loopback plugin.
  char node[32];
  snprintf(node, sizeof(node), "node%d", env.rank);
  setenv("NCCL_HOSTID", node, 1);
  setenv("NCCL_NET_PLUGIN", "moeloop", 0);
  void* plugin = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_LOCAL);
  if (plugin == nullptr) {
    fprintf(stderr, "[rank %d] FAIL: cannot load libnccl-net-moeloop.so (make plugin; run with make nettest or "
                    "LD_LIBRARY_PATH=<build>/lib)\n", env.rank);
    return moe_ranks::finish(1);
  }
  dlclose(plugin);
  ncclComm_t comm = nullptr;
  if (moe_ranks::initComm(env, &comm) != ncclSuccess) {
    fprintf(stderr, "[rank %d] FAIL: ncclCommInitRank\n", env.rank);
    return moe_ranks::finish(1);
  }
  const bool ok = run(env, comm) && gFailures == 0;
  ncclCommDestroy(comm);
  if (env.rank == 0 && ok) printf("ALL PASSED\n");
  fflush(stdout);
  return moe_ranks::finish(ok ? 0 : 1);
}
