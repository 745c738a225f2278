// Internal definitions of the opaque public types and helpers shared by the host files.
#pragma once
#include <nccl.h>
#include <nccl_device.h>
#include "nccl_moe.h"
#include "config.h"
#include "device/kernel_args.h"

struct ncclMoeComm {
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
  int liveHandles = 0;
  // Low-latency mode.
  int* llPosCounters = nullptr;       // device [numBufferSlots][E], zero between sends
  unsigned long long llDispatches = 0;  // dispatches enqueued (slot = count % numBufferSlots)
  bool llDispatchPending[nccl_moe::kMaxBufferSlots] = {};  // send-only dispatch not completed
  bool llCombinePending[nccl_moe::kMaxBufferSlots] = {};
};

struct ncclMoeHandle {
  ncclMoeComm* comm = nullptr;
  int numTokens = 0;       // T of the routing held
  bool haveRouting = false;
  void* deviceBlock = nullptr;      // one allocation carved into the routing arrays
  nccl_moe::RoutingView routing{};  // pointers into deviceBlock
  int* hostCounts = nullptr;        // pinned [1 + E/R]: rows received, rows per local expert
};

namespace nccl_moe {

// The view of the window and sync state that every HT kernel takes.
WindowView windowView(const ncclMoeComm* comm);

// Fails with the kernel-recorded error of the context, if any (sticky; no synchronisation).
ncclResult_t checkDeviceErrors(const ncclMoeComm* comm);

// Fails with the local error of the context (bad input found on this rank by a kernel: the
// entry was dropped, the operation completed on every rank), if any, and clears it: each is
// reported once. No synchronisation.
ncclResult_t reportLocalErrors(const ncclMoeComm* comm);

}  // namespace nccl_moe
