// GPU test of the moeloop plugin: one process per GPU, the GPUs split into 2 fake nodes
// (NCCL_HOSTID=nodeA / nodeB) whose traffic goes through libnccl-net-moeloop.so.
//   plugin_gpu_main.cc   launcher: re-exec with LD_LIBRARY_PATH, GPU count, scenarios, children
//   host_gin_check.cc    the GIN protocol on host memory through the plugin table (no GPU)
//   nccl_checks.cc       NCCL all-reduce / all-to-all across the fake nodes, bandwidth, latency
//   gin_check.cu         ncclDevCommCreate with GIN, kernels doing ncclGin puts with signals
#pragma once
#include <atomic>
#include <cuda_runtime.h>
#include <nccl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

namespace plugintest {

constexpr int kMaxRanks = 16;
// Measurement slots, one per scenario that measures (see plugin_gpu_main.cc).
enum : int { kSlotMain = 0, kSlotShaped = 1, kSlotCopyNic = 2, kSlotSocket = 3, kSlotSocketNic = 4, kSlots = 5 };

// Lives in a shared anonymous mapping created before the children are forked.
struct Shared {
  std::atomic<int> barrierArrived;
  std::atomic<int> barrierGeneration;
  std::atomic<int> idReady;
  ncclUniqueId id;
  char handles[kMaxRanks][128];   // host GIN check: listen handles
  std::atomic<int> handlesReady;
  // Per slot: NCCL send/recv bandwidth (rank 0 -> first rank of node B), NCCL ping-pong round
  // trip, GIN put stream bandwidth, GIN signal-only ping-pong round trip, and the share of the
  // GIN stream's bytes the copy engine moved (plugin counters of rank 0).
  double netBwGBps[kSlots];
  double rttUs[kSlots];
  double ginBwGBps[kSlots];
  double ginSignalRttUs[kSlots];
  double ginCopiedShare[kSlots];
  // Where rank 0's measured ping-pong time went inside the plugin (moeloopStats_t hops), in us
  // per put: as sender (queue, copy, release), as target (wire, apply); -1 when not measured.
  double ginHopUs[kSlots][5];
};

struct RankInfo {
  Shared* shared;
  int rank, nRanks, gpusPerNode;
};

// Waits until all nRanks processes arrive. Returns false after timeoutSec.
bool barrier(const RankInfo& r, double timeoutSec = 300);

// Per-process failure count and reporting.
extern int gFailures;
#define PT_FAIL(...)                                                         \
  do {                                                                       \
    fprintf(stderr, "[rank %d] FAIL %s:%d: ", plugintest::gRank, __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__);                                            \
    fprintf(stderr, "\n");                                                   \
    plugintest::gFailures++;                                                 \
  } while (0)
#define PT_CHECK(cond, ...)          \
  do {                               \
    if (!(cond)) PT_FAIL(__VA_ARGS__); \
  } while (0)
#define PT_NCCL(call)                                                                    \
  do {                                                                                   \
    ncclResult_t pt_res_ = (call);                                                       \
    if (pt_res_ != ncclSuccess) {                                                        \
      PT_FAIL("%s: %s (%s)", #call, ncclGetErrorString(pt_res_), ncclGetLastError(nullptr)); \
      return false;                                                                      \
    }                                                                                    \
  } while (0)
#define PT_CUDA(call)                                                   \
  do {                                                                  \
    cudaError_t pt_err_ = (call);                                       \
    if (pt_err_ != cudaSuccess) {                                       \
      PT_FAIL("%s: %s", #call, cudaGetErrorString(pt_err_));            \
      return false;                                                     \
    }                                                                   \
  } while (0)
extern int gRank;

double nowSec();

// The plugin's counters, through dlopen(RTLD_NOLOAD): proves NCCL loaded it.
bool readPluginStats(void* out /* moeloopStats_t* */);

// Waits for `s` while watching the communicator for asynchronous errors.
bool waitStream(cudaStream_t s, ncclComm_t comm, double timeoutSec, const char* what);

// Checks; each returns false on a fatal error (failures are also counted in gFailures).
bool hostGinCheck(const RankInfo& r);                 // no CUDA
bool ncclCollectiveChecks(const RankInfo& r, ncclComm_t comm);
bool ncclShapingMeasurements(const RankInfo& r, ncclComm_t comm, int slot);
bool ginChecks(const RankInfo& r, ncclComm_t comm, bool correctness, int slot);

}  // namespace plugintest
