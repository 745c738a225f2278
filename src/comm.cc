// EP context: creation on a user's ncclComm_t (window, device communicator, device state),
// destruction, and kernel-error reporting.
#include "comm.h"
#include <stdlib.h>
#include <string.h>
#include <atomic>
#include <vector>
#include "create_agreement.h"
#include "error.h"
#include "nccl_compat.h"
#include "sequence_start.h"
#include "version.h"

namespace nccl_moe {

WindowView windowView(const ncclMoeComm* c) {
  WindowView w;
  w.win = c->win;
  // From the node map agreed at creation: single-node contexts get lsaBase 0, lsaSize nRanks.
  w.peers = c->nodes.peerMap(c->rank);
  w.signalsOff = c->layout.signals;
  w.countsOff = c->layout.counts;
  w.state = c->state;
  w.error = c->errorDev + kErrorSticky;
  w.localError = c->errorDev + kErrorLocal;
  w.failedHost = c->failedDev;
  w.timeoutNs = (long long)c->cfg.timeoutMs * 1000000LL;
  return w;
}

HtNetArgs htNetArgs(const ncclMoeComm* c) {
  HtNetArgs n;
  memset(&n, 0, sizeof(n));
  const HtNetRegions& r = c->htNet;
  n.devComm = c->devComm;
  n.maxTokens = c->cfg.maxTokensPerRank;
  n.dispatchChunk = 16;  // every message costs the NIC a fixed overhead: ~1 MiB of records each
  while (n.dispatchChunk < 256 && (size_t)(2 * n.dispatchChunk) * r.record.bytes <= kHtNetMessageBytes)
    n.dispatchChunk *= 2;
  n.recordBytes = (int)r.record.bytes;
  n.recordPos = (int)r.record.pos;
  n.recordExpert = (int)r.record.expert;
  n.recordWeight = (int)r.record.weight;
  n.recordData = (int)r.record.data;
  n.recordScales = (int)r.record.scales;
  n.countsBytes = (int)r.countsBytes;
  n.dispatchStage = c->htNetOff + r.dispatchStage;
  n.dispatchLand = c->htNetOff + r.dispatchLand;
  n.countsStage = c->htNetOff + r.countsStage;
  n.countsLand = c->htNetOff + r.countsLand;
  n.combineStage = c->htNetOff + r.combineStage;
  n.combineLand = c->htNetOff + r.combineLand;
  n.weightStage = c->htNetOff + r.weightStage;
  n.weightLand = c->htNetOff + r.weightLand;
  n.sigData0 = c->gin.htData(0, 0);
  n.sigWeights0 = c->gin.htWeights(0);
  n.sigPartials0 = c->gin.htPartials(0, 0);
  n.sigCounts0 = c->gin.htCounts(0);
  n.sigDispatchDone0 = c->gin.htDispatchDone(0);
  n.sigCombineDone0 = c->gin.htCombineDone(0);
  return n;
}

ncclResult_t checkComm(const ncclMoeComm* c, const char* fn) {
  if (c == nullptr) return setError(ncclInvalidArgument, "%s: moeComm is NULL", fn);
  // The registry first: a destroyed or unknown pointer is never read.
  if (!isLiveObject(c, ObjectKind::Comm) || c->magic != kCommMagic)
    return setError(ncclInvalidArgument,
                    "%s: moeComm = %p is not a live EP context (destroyed, or not made by ncclMoeCommCreate)", fn,
                    (const void*)c);
  return ncclSuccess;
}

ncclResult_t checkHandle(const ncclMoeHandle* h, const char* fn) {
  if (h == nullptr) return setError(ncclInvalidArgument, "%s: handle is NULL", fn);
  if (!isLiveObject(h, ObjectKind::Handle) || h->magic != kHandleMagic)
    return setError(ncclInvalidArgument,
                    "%s: handle = %p is not a live handle (destroyed, or not made by ncclMoeDispatch)", fn,
                    (const void*)h);
  return ncclSuccess;
}

ncclResult_t failPartialLaunch(ncclMoeComm* c, const char* fn, cudaError_t err) {
  c->launchFailed = true;
  return setError(ncclUnhandledCudaError,
                  "%s: a kernel launch failed (%s) after earlier kernels of the call were enqueued; the EP "
                  "context is unusable: destroy it and create a new one",
                  fn, cudaGetErrorString(err));
}

ncclResult_t checkDeviceErrors(const ncclMoeComm* c) {
  if (c->launchFailed)
    return setError(ncclUnhandledCudaError,
                    "rank %d: an earlier call enqueued only part of its kernels; the EP context is unusable: "
                    "destroy it and create a new one", c->rank);
  const volatile DeviceError* e = c->errorHost;
  // Kernels write the payload, fence, then the code (reportError): read them in that order.
  const int code = e->code;
  std::atomic_thread_fence(std::memory_order_acquire);
  switch (code) {
    case kDevOk:
      return ncclSuccess;
    case kDevTimeout:
      return setError(ncclSystemError,
                      "rank %d: timeout: a kernel waited more than timeoutMs = %d ms for rank %d (wait "
                      "kind %d, value %d): a peer did not take part in the same operation",
                      c->rank, c->cfg.timeoutMs, e->b, e->a, e->c);
    case kDevOverflow:
      return setError(ncclInvalidUsage,
                      "rank %d: a dispatch would deliver %d rows to rank %d, above config.outputCapacity = %d; "
                      "no rows were written",
                      c->rank, e->b, e->a, e->c);
    case kDevPeerAhead:
      return setError(ncclInvalidUsage,
                      "rank %d: protocol error: rank %d is %d operation(s) ahead of this rank (wait kind %d): the "
                      "ranks did not call dispatch and combine the same number of times in the same order; "
                      "destroy the EP context and create a new one",
                      c->rank, e->b, e->c, e->a);
    default:
      return setError(ncclInternalError, "rank %d: unknown kernel error %d", c->rank, code);
  }
}

ncclResult_t reportLocalErrors(const ncclMoeComm* c) {
  volatile DeviceError* e = c->errorHost + kErrorLocal;
  const int code = e->code;
  std::atomic_thread_fence(std::memory_order_acquire);
  if (code == kDevOk) return ncclSuccess;
  const int a = e->a, b = e->b, v = e->c;
  e->code = kDevOk;  // reported once; the next bad entry is recorded anew
  std::atomic_thread_fence(std::memory_order_release);
  e->claimed = 0;    // last: a kernel that claims the record now finds the code cleared
  switch (code) {
    case kDevBadExpert:
      return setError(ncclInvalidArgument,
                      "rank %d: topkIdx[%d][%d] = %d is outside [-1, numExperts = %d); the entry was ignored "
                      "(the operation completed on every rank)",
                      c->rank, a, b, v, c->cfg.numExperts);
    case kDevRankFailed:
      return setError(ncclRemoteError,
                      "rank %d: rank %d did not take part within timeoutMs = %d ms (low-latency wait kind %d, "
                      "value %d): it is now in the failed-rank set (ncclMoeGetFailedRanks); later operations "
                      "skip it, the outputs of the operation that found it are undefined",
                      c->rank, b, c->cfg.timeoutMs, a, v);
    case kDevRepeatedExpert:
      return setError(ncclInvalidArgument,
                      "rank %d: topkIdx[%d][%d] = %d names an expert the token already named (the entries of a "
                      "token must be distinct in low-latency mode); the entry was ignored (the operation "
                      "completed on every rank)",
                      c->rank, a, b, v);
    default:
      return setError(ncclInternalError, "rank %d: unknown kernel error %d", c->rank, code);
  }
}

// Frees whatever device and NCCL resources of the context exist (destroy, and a failed create).
static void releaseResources(ncclMoeComm* c) {
  if (c->devCommCreated) ncclDevCommDestroy(c->nccl, &c->devComm);
  if (c->win) ncclCommWindowDeregister(c->nccl, c->win);
  if (c->winBase) ncclMemFree(c->winBase);
  if (c->state) cudaFree(c->state);
  if (c->layoutScratchMem) cudaFree(c->layoutScratchMem);
  if (c->llPosCounters) cudaFree(c->llPosCounters);
  if (c->errorHost) cudaFreeHost(c->errorHost);
  if (c->failedHost) cudaFreeHost(c->failedHost);
  if (c->countsHost) cudaFreeHost(c->countsHost);
}

// All-gathers one vote per rank over comm, on comm's device whatever the current device is (a
// rank whose current device is wrong must still vote: its peers wait for it). Fails only when
// CUDA or NCCL cannot run a 1-KiB all-gather on this rank; its peers then wait in vain, the one
// failure of creation that cannot be made collective.
static ncclResult_t exchangeVotes(ncclMoeComm* c, const CreateVote& mine, std::vector<CreateVote>* all) {
  int saved = -1;
  MOE_CUDA(cudaGetDevice(&saved));
  MOE_CUDA(cudaSetDevice(c->device));
  const size_t bytes = sizeof(CreateVote);
  all->assign(c->nRanks, CreateVote{});
  char* dev = nullptr;
  cudaStream_t stream = nullptr;
  const bool ok = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess &&
                  cudaMalloc(&dev, bytes * (c->nRanks + 1)) == cudaSuccess &&
                  cudaMemcpy(dev, &mine, bytes, cudaMemcpyHostToDevice) == cudaSuccess &&
                  ncclAllGather(dev, dev + bytes, bytes, ncclUint8, c->nccl, stream) == ncclSuccess &&
                  cudaMemcpyAsync(all->data(), dev + bytes, bytes * c->nRanks, cudaMemcpyDeviceToHost,
                                  stream) == cudaSuccess &&
                  cudaStreamSynchronize(stream) == cudaSuccess;
  if (dev) cudaFree(dev);
  if (stream) cudaStreamDestroy(stream);
  cudaSetDevice(saved);
  if (!ok) return setError(ncclSystemError, "ncclMoeCommCreate: rank %d: exchanging creation status failed", c->rank);
  return ncclSuccess;
}

// One collective step of the creation: every rank votes with the result of its local work
// (`local`, message in the last error) and all ranks return the same result (create_agreement.h).
// The first vote (withConfig) also carries this rank's placement and decides the node map
// (decideNodes) from everyone's, so every rank gets the same map or the same error.
static ncclResult_t agree(ncclMoeComm* c, ncclResult_t local, bool withConfig, const char* step) {
  CreateVote mine;
  fillVote(&mine, local, ncclMoeGetLastError(), local == ncclSuccess && withConfig ? &c->cfg : nullptr);
  if (withConfig) {
    const ncclTeam_t lsa = ncclTeamLsa(c->nccl);
    mine.placement = localPlacement(lsa.rank, lsa.nRanks);
  }
  std::vector<CreateVote> all;
  MOE_CHECK(exchangeVotes(c, mine, &all));
  MOE_CHECK(decideCreate(all.data(), c->nRanks, step));
  return withConfig ? decideNodes(all.data(), c->nRanks, &c->nodes) : ncclSuccess;
}

// NCCL_MOE_HT_COMBINE = pull (default, also when unset or empty) | tma: the HT combine kernel of
// this rank (ncclMoeComm::htCombineTma). tma needs sm_90 and the stage ring's shared memory.
static ncclResult_t chooseCombineKernel(ncclMoeComm* c) {
  const char* env = getenv("NCCL_MOE_HT_COMBINE");
  if (env == nullptr || env[0] == '\0' || strcmp(env, "pull") == 0) return ncclSuccess;
  if (strcmp(env, "tma") != 0)
    return setError(ncclInvalidArgument, "NCCL_MOE_HT_COMBINE = \"%s\" must be pull or tma", env);
  int major = 0, optin = 0;
  MOE_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device));
  MOE_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device));
  const int need = kTmaStages * kTmaChunkBytes + 4096;  // the ring, and the kernel's static part
  if (major < 9 || optin < need)
    return setError(ncclInvalidUsage, "NCCL_MOE_HT_COMBINE = tma needs compute capability 9.0 and %d bytes of "
                    "shared memory per block; device %d has %d.x and %d", need, c->device, major, optin);
  c->htCombineTma = true;
  return ncclSuccess;
}

// This rank's checks before the first vote: device, configuration. Where the ranks are (one
// NVLink domain, or several nodes) is decided from every rank's placement by the vote (agree).
static ncclResult_t checkLocally(ncclMoeComm* c, const ncclMoeConfig_t* config) {
  int current = -1, sms = 0, pageable = 0;
  MOE_CUDA(cudaGetDevice(&current));
  if (current != c->device)
    return setError(ncclInvalidUsage, "current CUDA device %d is not comm's device %d", current, c->device);
  MOE_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c->device));
  MOE_CHECK(validateConfig(config, c->nRanks, sms, &c->cfg));
  MOE_CHECK(chooseCombineKernel(c));
  if (c->cfg.mode == ncclMoeLowLatency)
    MOE_CHECK(parseLlOneLaunchLimits(getenv("NCCL_MOE_LL_ONE_LAUNCH"), &c->llOneLaunch));
  MOE_CUDA(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, c->device));
  c->pointers.init(c->device, pageable != 0);
  return ncclSuccess;
}

// This rank's allocations, none of which involves a peer, before the second vote: a rank out of
// memory makes every rank fail instead of leaving its peers in the window registration.
// On several nodes the window also holds each slot's internode regions (net/regions.h).
static ncclResult_t allocateLocally(ncclMoeComm* c) {
  MOE_CHECK(computeWindowLayout(c->cfg, c->nRanks, &c->layout));
  if (c->nodes.nNodes > 1) {
    MOE_CHECK(planGinSignals(c->cfg, c->nodes, &c->gin));
    CheckedBytes m;
    m.off = c->layout.total;
    if (c->cfg.mode == ncclMoeLowLatency) {
      MOE_CHECK(computeLlNetRegions(c->cfg, c->nodes, &c->llNet));
      c->llNetOff = m.take(m.mul((size_t)c->cfg.numBufferSlots, c->llNet.bytes), NCCL_WIN_REQUIRED_ALIGNMENT);
    } else {
      MOE_CHECK(computeHtNetRegions(c->cfg, c->nodes, &c->htNet));
      c->htNetOff = m.take(c->htNet.bytes, NCCL_WIN_REQUIRED_ALIGNMENT);
    }
    if (m.overflow)
      return setError(ncclInvalidArgument, "the EP window with its internode regions exceeds the address space");
    c->layout.total = m.off;
  }
  void* base = nullptr;
  MOE_NCCL(ncclMemAlloc(&base, c->layout.total));
  c->winBase = (char*)base;
  // Zero the whole window (signals of both modes start at 0; ~1 ms for a GiB) before any peer
  // can reach it: registration is collective and comes after the vote.
  MOE_CUDA(cudaMemset(c->winBase, 0, c->layout.total));
  MOE_CUDA(cudaMalloc(&c->state, sizeof(DeviceState)));
  MOE_CUDA(cudaMemset(c->state, 0, sizeof(DeviceState)));
  {
    const int M = c->cfg.maxTokensPerRank, E = c->cfg.numExperts, R = c->nRanks;
    const size_t bytes = LayoutScratch::bytes(M, R, E);
    MOE_CUDA(cudaMalloc(&c->layoutScratchMem, bytes));
    MOE_CUDA(cudaMemset(c->layoutScratchMem, 0, bytes));  // tile flags 0: no epoch yet
    c->layoutScratch = LayoutScratch::carve(c->layoutScratchMem, M, R, E);
  }
  if (c->cfg.mode == ncclMoeLowLatency) {
    const size_t bytes = sizeof(int) * c->cfg.numBufferSlots * c->cfg.numExperts;
    MOE_CUDA(cudaMalloc(&c->llPosCounters, bytes));
    MOE_CUDA(cudaMemset(c->llPosCounters, 0, bytes));
    // The one-launch kernels' shared-memory limit, and their load now rather than inside the
    // first small operation (they run on one node only).
    if (c->nodes.nNodes <= 1 && (c->llOneLaunch.dispatchTokens > 0 || c->llOneLaunch.combineTokens > 0))
      MOE_CUDA(prepareLlOneLaunchKernels(kMaxExperts));
  }
  MOE_CUDA(cudaHostAlloc(&c->errorHost, sizeof(DeviceError) * kErrorRecords, cudaHostAllocMapped));
  memset(c->errorHost, 0, sizeof(DeviceError) * kErrorRecords);
  MOE_CUDA(cudaHostGetDevicePointer((void**)&c->errorDev, c->errorHost, 0));
  MOE_CUDA(cudaHostAlloc(&c->failedHost, sizeof(unsigned int) * kRankMaskWords, cudaHostAllocMapped));
  memset(c->failedHost, 0, sizeof(unsigned int) * kRankMaskWords);
  MOE_CUDA(cudaHostGetDevicePointer((void**)&c->failedDev, c->failedHost, 0));
  if (c->cfg.mode == ncclMoeHighThroughput) {
    const size_t bytes = sizeof(int) * (2 + c->cfg.numExperts / c->nRanks);
    MOE_CUDA(cudaHostAlloc(&c->countsHost, bytes, cudaHostAllocMapped));
    memset(c->countsHost, 0, bytes);
    MOE_CUDA(cudaHostGetDevicePointer((void**)&c->countsDev, c->countsHost, 0));
  }
  MOE_CHECK(applySequenceStart(c));  // test hook; before registration, so before any peer signal
  MOE_CUDA(cudaDeviceSynchronize());
  return ncclSuccess;
}

// Loads the internode kernels of the context's mode now (loadLl*NetKernels, loadHt*NetKernel),
// before this rank's first GIN kernel. Why: under lazy loading (CUDA's default since 12.2) a kernel is loaded
// at its first launch, under the context's lock and after every running kernel of the context
// has finished; other threads' CUDA calls wait for that lock meanwhile. A send waits in
// gin.flush, and a completion for its peers' signals, on NCCL's GIN proxy thread, and a GIN
// plugin whose progress calls CUDA (plugin/: copies, signal updates) then waits for the load,
// which waits for the kernel: the first one-shot operation of a process (the completion is
// launched right behind the send) hung on both ranks of 2 fake nodes. Contract: called while no
// GIN kernel of this rank runs. Kernels the caller loads for the first time while an operation
// is in flight remain a hazard with such a plugin (plugin/README.md).
static ncclResult_t loadNetKernels(ncclMoeMode_t mode) {
  if (mode == ncclMoeLowLatency) {
    MOE_CUDA(loadLlDispatchNetKernels());
    MOE_CUDA(loadLlCombineNetKernels());
  } else {
    MOE_CUDA(loadHtDispatchNetKernel());
    MOE_CUDA(loadHtCombineNetKernel());
    MOE_CUDA(loadLayoutKernel());     // launched behind a running internode kernel: a layout
    MOE_CUDA(loadCopyRowsKernels());  // while a combine waits, a row copy while a dispatch does
  }
  return ncclSuccess;
}

// This rank's part of the multi-node setup before any GIN traffic: the mode's internode kernels
// loaded (loadNetKernels), then its GIN signals of the context's plan zeroed on every GIN
// context (launchGinSignalReset).
static ncclResult_t prepareGin(ncclMoeComm* c) {
  MOE_CHECK(loadNetKernels(c->cfg.mode));
  MOE_CUDA(launchGinSignalReset(c->devComm, c->gin.count(), 0));
  MOE_CUDA(cudaDeviceSynchronize());
  return ncclSuccess;
}

// Proves GIN between this rank and every remote rank before any operation (launchGinHandshake):
// a GIN plugin that is slow to set up a path (e.g. mapping a peer's window on first use) does
// it now, and one that cannot deliver fails creation here, naming how many ranks answered,
// instead of timing out inside the first operation.
static ncclResult_t ginHandshake(ncclMoeComm* c) {
  unsigned long long* host = nullptr;
  MOE_CUDA(cudaHostAlloc(&host, sizeof(*host), cudaHostAllocMapped));
  *host = 0;
  GinHandshakeArgs a;
  memset(&a, 0, sizeof(a));
  a.devComm = c->devComm;
  a.win = c->win;
  a.peers = c->nodes.peerMap(c->rank);
  if (c->cfg.mode == ncclMoeLowLatency) {
    const size_t rec = c->llNet.record.bytes;
    a.stageOff = c->llNetOff + c->llNet.dispatchStage;  // slot 0: rows of M records per remote rank
    a.landOff = c->llNetOff + c->llNet.dispatchLand;
    a.rowBytes = (size_t)c->cfg.maxTokensPerRank * rec;
    a.bytes = rec;
  } else {
    a.stageOff = c->htNetOff + c->htNet.handshakeStage;  // a row per rank
    a.landOff = c->htNetOff + c->htNet.handshakeLand;
    a.rowBytes = kHtHandshakeBytes;
    a.bytes = kHtHandshakeBytes;
  }
  a.signal = c->gin.handshake();
  a.timeoutNs = (long long)c->cfg.timeoutMs * 1000000LL;
  cudaError_t err = cudaHostGetDevicePointer((void**)&a.arrived, host, 0);
  if (err == cudaSuccess) err = launchGinHandshake(a, 0);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  const unsigned long long arrived = *(volatile unsigned long long*)host;
  cudaFreeHost(host);
  MOE_CUDA(err);
  const int want = c->nRanks - c->nodes.gpusPerNode;
  if (arrived != (unsigned long long)want)
    return setError(ncclSystemError, "ncclMoeCommCreate: rank %d: GIN handshake: %llu of the %d remote ranks' puts "
                    "arrived within timeoutMs = %d ms: the NET plugin's GIN does not deliver between these nodes",
                    c->rank, arrived, want, c->cfg.timeoutMs);
  return ncclSuccess;
}

// Every failure up to the collective NCCL calls (window registration, device communicator) is
// decided together by all ranks (agree): they fail at the same step with the same message.
// Failures inside those NCCL calls are NCCL's own (its collectives have the same property).
static ncclResult_t createComm(ncclComm_t nccl, const ncclMoeConfig_t* config, ncclMoeComm* c) {
  c->nccl = nccl;
  // Local, before any vote: a library built for another NCCL line would misread NCCL's device
  // structs, and ncclCommInitRank already made every rank run the same NCCL, so this check
  // fails on every rank or on none. The three queries fail only for an invalid comm, with which
  // no vote can be exchanged.
  MOE_CHECK(checkNcclRuntimeVersion("ncclMoeCommCreate"));
  MOE_NCCL(ncclCommCount(nccl, &c->nRanks));
  MOE_NCCL(ncclCommUserRank(nccl, &c->rank));
  MOE_NCCL(ncclCommCuDevice(nccl, &c->device));
  MOE_CHECK(agree(c, checkLocally(c, config), true, "checking the configuration"));
  MOE_CHECK(agree(c, allocateLocally(c), false, "allocating"));

  MOE_NCCL(ncclCommWindowRegister(nccl, c->winBase, c->layout.total, &c->win, NCCL_WIN_COLL_SYMMETRIC));
  // One node: NCCL's defaults and one LSA barrier, as always; several: GIN as well.
  const ncclDevCommRequirements reqs = ginRequirements(c->nodes, c->gin);
  if (c->nodes.nNodes > 1) {
    const ncclResult_t created = ncclDevCommCreate(nccl, &reqs, &c->devComm);
    if (created != ncclSuccess) return ginUnavailableError(created, c->nodes);
  } else {
    MOE_NCCL(ncclDevCommCreate(nccl, &reqs, &c->devComm));
  }
  c->devCommCreated = true;
  if (c->devComm.lsaSize != c->nodes.gpusPerNode)
    return setError(ncclInvalidUsage, "ncclMoeCommCreate: device communicator sees %d LSA ranks, the node map %d",
                    c->devComm.lsaSize, c->nodes.gpusPerNode);
  if (c->nodes.nNodes > 1 && c->devComm.ginContextCount < 1)
    return ginUnavailableError(ncclInvalidUsage, c->nodes);
  // Before this rank's first GIN kernel: its internode kernels loaded (loadNetKernels
  // says why). The LL kernels wait for exact signal values counted from 0 (epoch * 2^32), but
  // NCCL 2.28 hands a new device communicator the GIN signal ids a destroyed one freed, with the
  // values it left (a second EP context on the same ncclComm_t saw its first wait "ahead" and
  // failed). Clear them, then agree: every rank has cleared its signals before any rank returns
  // from creation and may put (the LSA barrier below does not cross nodes).
  if (c->nodes.nNodes > 1)
    MOE_CHECK(agree(c, prepareGin(c), false, "loading the kernels and clearing the GIN signals"));
  if (c->nodes.nNodes > 1) MOE_CHECK(agree(c, ginHandshake(c), false, "the GIN handshake"));

  // One LSA barrier through the device communicator: every peer is mapped and alive.
  MOE_CUDA(launchLsaBarrier(c->devComm, 0));
  MOE_CUDA(cudaDeviceSynchronize());
  return ncclSuccess;
}

}  // namespace nccl_moe

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeCommCreate(ncclComm_t comm, const ncclMoeConfig_t* config,
                                          ncclMoeComm_t* moeComm) {
  clearError();
  if (comm == nullptr) return setError(ncclInvalidArgument, "ncclMoeCommCreate: comm is NULL");
  if (config == nullptr) return setError(ncclInvalidArgument, "ncclMoeCommCreate: config is NULL");
  if (moeComm == nullptr) return setError(ncclInvalidArgument, "ncclMoeCommCreate: moeComm is NULL");
  *moeComm = nullptr;
  ncclMoeComm* c = new ncclMoeComm();
  ncclResult_t res = createComm(comm, config, c);
  if (res != ncclSuccess) {
    releaseResources(c);
    delete c;
    return res;
  }
  c->magic = kCommMagic;
  registerObject(c, ObjectKind::Comm);
  *moeComm = c;
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t c) {
  clearError();
  MOE_CHECK(checkComm(c, "ncclMoeCommDestroy"));
  if (c->liveHandles != 0)
    return setError(ncclInvalidUsage, "ncclMoeCommDestroy: %d handles still exist; destroy them first",
                    c->liveHandles);
  MOE_CUDA(cudaDeviceSynchronize());
  releaseResources(c);
  c->magic = kDeadMagic;
  retireObject(c, ObjectKind::Comm, [](void* p) { delete static_cast<ncclMoeComm*>(p); });
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeCheckErrors(ncclMoeComm_t c) {
  clearError();
  MOE_CHECK(checkComm(c, "ncclMoeCheckErrors"));
  MOE_CHECK(checkDeviceErrors(c));
  return reportLocalErrors(c);
}
