// Internal definitions of the opaque public types and helpers shared by the host files.
#pragma once
#include <nccl.h>
#include <nccl_device.h>
#include "nccl_moe.h"
#include "config.h"
#include "device/kernel_args.h"
#include "object_registry.h"
#include "pointer_check.h"
#include "net/gin_setup.h"
#include "net/regions.h"
#include "net/ht_regions.h"

namespace nccl_moe {
// Magic words of the live objects (object_registry.h says why they are checked after the
// registry lookup); destroy overwrites them with kDeadMagic.
constexpr uint64_t kCommMagic = 0x6e63636c6d6f6543ull;    // "nccl moeC"
constexpr uint64_t kHandleMagic = 0x6e63636c6d6f6548ull;  // "nccl moeH"
constexpr uint64_t kDeadMagic = 0xdeaddeaddeaddeadull;
}  // namespace nccl_moe

// Not thread-safe: one thread at a time per context (nccl_moe.h).
struct ncclMoeComm {
  uint64_t magic = 0;               // kCommMagic while live
  ncclComm_t nccl = nullptr;
  int rank = 0, nRanks = 0, device = 0;
  ncclMoeConfig_t cfg{};            // resolved: defaults filled in
  nccl_moe::WindowLayout layout{};  // byte offsets in the window, equal on every rank
  char* winBase = nullptr;          // this rank's window (ncclMemAlloc), layout.total bytes
  ncclWindow_t win = nullptr;
  ncclDevComm devComm{};
  bool devCommCreated = false;
  nccl_moe::DeviceState* state = nullptr;   // device memory
  void* layoutScratchMem = nullptr;          // device memory carved into layoutScratch
  nccl_moe::LayoutScratch layoutScratch{};
  // [kErrorRecords] (sticky, local; kernel_args.h): host-mapped pinned memory, written by kernels
  nccl_moe::DeviceError* errorHost = nullptr;
  nccl_moe::DeviceError* errorDev = nullptr;   // the same memory, device address
  // Low-latency failed-rank set: [kRankMaskWords] host-mapped words that kernels set on a timeout
  // (DeviceState::failedRanks mirrored), and the ranks the caller marked (ncclMoeMarkRankFailed).
  unsigned int* failedHost = nullptr;
  unsigned int* failedDev = nullptr;           // the same memory, device address
  // High-throughput dispatch with host counts: host-mapped int32 [2 + E/R] that the dispatch
  // kernel fills once the counts are exchanged ([0] = countsSeq of that dispatch, written last;
  // then rows received, rows per local expert), so the host waits for the counts only.
  int* countsHost = nullptr;
  int* countsDev = nullptr;                    // the same memory, device address
  int countsSeq = 0;                           // of the last dispatch with host counts
  nccl_moe::RankSet failedMarked{};
  int liveHandles = 0;
  nccl_moe::AccessiblePointers pointers;  // pointer arguments already found device-accessible
  // Set when a call enqueued part of its kernels and then failed to launch the rest: the peers
  // and the device sequence numbers no longer match this host state. Sticky, like kernel errors.
  bool launchFailed = false;
  // High-throughput mode: dispatches enqueued; a handle may be combined only while its
  // dispatch is the latest (the window holds that dispatch's rows).
  unsigned long long htDispatches = 0;
  // NCCL_MOE_HT_COMBINE=tma at creation: ncclMoeCombine runs the bulk-copy kernel
  // (launchCombineHtTma) instead of the pull kernel. A per-rank choice: only the source reads
  // rows, so it does not change the protocol and ranks need not agree.
  bool htCombineTma = false;
  // Low-latency mode.
  int* llPosCounters = nullptr;       // device [numBufferSlots][E], zero between sends
  // One-shot calls with this rank's T <= the operation's limit run as one kernel on one node
  // (NCCL_MOE_LL_ONE_LAUNCH at creation, config.h: llOneLaunchChosen); 0 = never. A per-rank
  // choice, like htCombineTma.
  nccl_moe::LlOneLaunchLimits llOneLaunch = {0, 0};
  unsigned long long llDispatches = 0;  // dispatches enqueued (slot = count % numBufferSlots)
  bool llDispatchPending[nccl_moe::kMaxBufferSlots] = {};  // send-only dispatch not completed
  bool llCombinePending[nccl_moe::kMaxBufferSlots] = {};
  // Per slot, the sequence number (ncclMoeLowLatencyOutput_t::sequence) and T of the dispatch
  // that owns it; an output struct that does not match is stale, reused or forged.
  unsigned long long llSlotSequence[nccl_moe::kMaxBufferSlots] = {};
  int llSlotTokens[nccl_moe::kMaxBufferSlots] = {};
  // Where the ranks are (net/node_map.h; one node: nNodes 1). On several nodes also the GIN
  // signal plan and the internode regions after the intranode ones: low latency, each slot's
  // (numBufferSlots of llNet.bytes from window offset llNetOff); high throughput, htNet.bytes
  // from htNetOff (net/ht_regions.h, offsets relative to htNetOff).
  nccl_moe::NodeMap nodes{};
  nccl_moe::GinSignalPlan gin{};
  nccl_moe::LlNetSlotRegions llNet{};
  size_t llNetOff = 0;
  nccl_moe::HtNetRegions htNet{};
  size_t htNetOff = 0;
};

struct ncclMoeHandle {
  uint64_t magic = 0;       // kHandleMagic while live
  ncclMoeComm* comm = nullptr;
  unsigned long long dispatch = 0;  // ncclMoeComm::htDispatches of its last dispatch (0: none)
  int numTokens = 0;       // T of the routing held
  bool haveRouting = false;
  void* deviceBlock = nullptr;      // one allocation carved into the routing arrays
  bool streamOrdered = false;       // deviceBlock came from cudaMallocAsync (else cudaMalloc)
  nccl_moe::RoutingView routing{};  // pointers into deviceBlock
  int* hostCounts = nullptr;        // host (new[]) [1 + E/R]: rows received, rows per local expert
};

namespace nccl_moe {

// The view of the window and sync state that every HT kernel takes.
WindowView windowView(const ncclMoeComm* comm);

// The internode part of the HT kernels' arguments (several nodes; device/kernel_args.h).
HtNetArgs htNetArgs(const ncclMoeComm* comm);

// Fails with ncclInvalidArgument (message names `fn`) unless `c` is a live EP context / a live
// handle: NULL, never created and destroyed pointers are rejected without being dereferenced.
ncclResult_t checkComm(const ncclMoeComm* c, const char* fn);
ncclResult_t checkHandle(const ncclMoeHandle* h, const char* fn);

// Fails with the sticky error of the context, if any (no synchronisation): a kernel-recorded
// error, or a partial launch (launchFailed).
ncclResult_t checkDeviceErrors(const ncclMoeComm* comm);

// Fails with the local error of the context (bad input found on this rank by a kernel: the
// entry was dropped, the operation completed on every rank), if any, and clears it: each is
// reported once. No synchronisation.
ncclResult_t reportLocalErrors(const ncclMoeComm* comm);

// Records that `call` of `fn` failed to launch after earlier kernels of the same call were
// enqueued (the context is unusable from then on) and returns ncclUnhandledCudaError.
ncclResult_t failPartialLaunch(ncclMoeComm* c, const char* fn, cudaError_t err);

// The failed-rank set as this host knows it now (marked by the caller, or found by a kernel that
// has already timed out), to pass to the next low-latency kernel. No synchronisation.
RankSet failedRanks(const ncclMoeComm* c);

}  // namespace nccl_moe
