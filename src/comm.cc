// EP context: creation on a user's ncclComm_t (window, device communicator, device state),
// destruction, and kernel-error reporting.
#include "comm.h"
#include <string.h>
#include <atomic>
#include <vector>
#include "error.h"
#include "nccl_compat.h"
#include "sequence_start.h"
#include "version.h"

namespace nccl_moe {

WindowView windowView(const ncclMoeComm* c) {
  WindowView w;
  w.win = c->win;
  w.rank = c->rank;
  w.nRanks = c->nRanks;
  w.signalsOff = c->layout.signals;
  w.countsOff = c->layout.counts;
  w.state = c->state;
  w.error = c->errorDev + kErrorSticky;
  w.localError = c->errorDev + kErrorLocal;
  w.timeoutNs = (long long)c->cfg.timeoutMs * 1000000LL;
  return w;
}

ncclResult_t checkDeviceErrors(const ncclMoeComm* c) {
  const volatile DeviceError* e = c->errorHost;
  switch (e->code) {
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
      return setError(ncclInternalError, "rank %d: unknown kernel error %d", c->rank, e->code);
  }
}

ncclResult_t reportLocalErrors(const ncclMoeComm* c) {
  volatile DeviceError* e = c->errorHost + kErrorLocal;
  const int code = e->code;
  std::atomic_thread_fence(std::memory_order_acquire);
  if (code == kDevOk) return ncclSuccess;
  const int a = e->a, b = e->b, v = e->c;
  e->code = kDevOk;  // reported once; the next bad entry is recorded anew
  switch (code) {
    case kDevBadExpert:
      return setError(ncclInvalidArgument,
                      "rank %d: topkIdx[%d][%d] = %d is outside [-1, numExperts = %d); the entry was ignored "
                      "(the operation completed on every rank)",
                      c->rank, a, b, v, c->cfg.numExperts);
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

// Frees whatever part of the context exists (used by destroy and by a failed create).
static void releaseComm(ncclMoeComm* c) {
  if (c->devCommCreated) ncclDevCommDestroy(c->nccl, &c->devComm);
  if (c->win) ncclCommWindowDeregister(c->nccl, c->win);
  if (c->winBase) ncclMemFree(c->winBase);
  if (c->state) cudaFree(c->state);
  if (c->layoutScratchMem) cudaFree(c->layoutScratchMem);
  if (c->llPosCounters) cudaFree(c->llPosCounters);
  if (c->errorHost) cudaFreeHost(c->errorHost);
  delete c;
}

// Every rank must pass the same configuration: all-gather the fields (not the struct bytes,
// whose padding is undefined) and compare.
static ncclResult_t checkConfigsEqual(ncclMoeComm* c, cudaStream_t stream) {
  const ncclMoeConfig_t& f = c->cfg;
  const int64_t mine[] = {(int64_t)f.size, f.magic, f.version, f.mode, f.numExperts, f.hidden,
                          f.topK, f.maxTokensPerRank, f.dispatchDtype, f.numSms, f.outputCapacity,
                          f.timeoutMs, f.numBufferSlots, f.fp8Scales};
  const size_t n = sizeof(mine) / sizeof(mine[0]), bytes = sizeof(mine);
  int64_t* dev = nullptr;
  MOE_CUDA(cudaMalloc(&dev, bytes * (c->nRanks + 1)));
  std::vector<int64_t> all(n * c->nRanks);
  ncclResult_t res = ncclSuccess;
  if (cudaMemcpy(dev, mine, bytes, cudaMemcpyHostToDevice) != cudaSuccess ||
      ncclAllGather(dev, dev + n, n, ncclInt64, c->nccl, stream) != ncclSuccess ||
      cudaMemcpyAsync(all.data(), dev + n, bytes * c->nRanks, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
      cudaStreamSynchronize(stream) != cudaSuccess) {
    res = setError(ncclSystemError, "ncclMoeCommCreate: exchanging configurations failed");
  }
  cudaFree(dev);
  MOE_CHECK(res);
  for (int r = 0; r < c->nRanks; ++r)
    for (size_t i = 0; i < n; ++i)
      if (all[r * n + i] != mine[i])
        return setError(ncclInvalidArgument,
                        "ncclMoeCommCreate: rank %d passed a configuration different from rank %d's "
                        "(field %zu: %lld vs %lld); every rank must pass the same config",
                        r, c->rank, i, (long long)all[r * n + i], (long long)mine[i]);
  return ncclSuccess;
}

static ncclResult_t createComm(ncclComm_t nccl, const ncclMoeConfig_t* config, ncclMoeComm* c) {
  c->nccl = nccl;
  // Before any NCCL call that touches device structs: a library built for another NCCL line
  // would misread them (ncclDevComm's layout changes between minor versions).
  MOE_CHECK(checkNcclRuntimeVersion("ncclMoeCommCreate"));
  MOE_NCCL(ncclCommCount(nccl, &c->nRanks));
  MOE_NCCL(ncclCommUserRank(nccl, &c->rank));
  MOE_NCCL(ncclCommCuDevice(nccl, &c->device));
  int current = -1, sms = 0;
  MOE_CUDA(cudaGetDevice(&current));
  if (current != c->device)
    return setError(ncclInvalidUsage, "ncclMoeCommCreate: current CUDA device %d is not comm's device %d",
                    current, c->device);
  MOE_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c->device));
  MOE_CHECK(validateConfig(config, c->nRanks, sms, &c->cfg));
  const ncclTeam_t lsa = ncclTeamLsa(nccl);
  if (lsa.nRanks != c->nRanks)
    return setError(ncclInvalidUsage,
                    "ncclMoeCommCreate: comm spans %d ranks but only %d share this rank's NVLink domain; "
                    "the internode path is not available yet",
                    c->nRanks, lsa.nRanks);

  cudaStream_t stream;
  MOE_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ncclResult_t res = checkConfigsEqual(c, stream);
  cudaStreamDestroy(stream);
  MOE_CHECK(res);

  c->layout = computeWindowLayout(c->cfg, c->nRanks);
  void* base = nullptr;
  MOE_NCCL(ncclMemAlloc(&base, c->layout.total));
  c->winBase = (char*)base;
  // Zero the whole window (signals of both modes start at 0; ~1 ms for a GiB) before any peer
  // can reach it: registration is collective, so no peer signals before every rank is done.
  MOE_CUDA(cudaMemset(c->winBase, 0, c->layout.total));
  MOE_CUDA(cudaDeviceSynchronize());
  MOE_NCCL(ncclCommWindowRegister(nccl, c->winBase, c->layout.total, &c->win, NCCL_WIN_COLL_SYMMETRIC));

  ncclDevCommRequirements reqs = defaultDevCommRequirements();
  reqs.lsaBarrierCount = 1;
  MOE_NCCL(ncclDevCommCreate(nccl, &reqs, &c->devComm));
  c->devCommCreated = true;
  if (c->devComm.lsaSize != c->nRanks)
    return setError(ncclInvalidUsage, "ncclMoeCommCreate: device communicator sees %d LSA ranks of %d",
                    c->devComm.lsaSize, c->nRanks);

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
  }
  MOE_CUDA(cudaHostAlloc(&c->errorHost, sizeof(DeviceError) * kErrorRecords, cudaHostAllocMapped));
  memset(c->errorHost, 0, sizeof(DeviceError) * kErrorRecords);
  MOE_CUDA(cudaHostGetDevicePointer((void**)&c->errorDev, c->errorHost, 0));
  MOE_CHECK(applySequenceStart(c));  // test hook; before the barrier, so before any peer signal

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
    releaseComm(c);
    return res;
  }
  *moeComm = c;
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t c) {
  clearError();
  if (c == nullptr) return setError(ncclInvalidArgument, "ncclMoeCommDestroy: moeComm is NULL");
  if (c->liveHandles != 0)
    return setError(ncclInvalidUsage, "ncclMoeCommDestroy: %d handles still exist; destroy them first",
                    c->liveHandles);
  MOE_CUDA(cudaDeviceSynchronize());
  releaseComm(c);
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeCheckErrors(ncclMoeComm_t c) {
  clearError();
  if (c == nullptr) return setError(ncclInvalidArgument, "ncclMoeCheckErrors: moeComm is NULL");
  MOE_CHECK(checkDeviceErrors(c));
  return reportLocalErrors(c);
}
