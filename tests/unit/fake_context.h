// A registered EP context (and handle) with no CUDA resources behind them, for CPU tests of the
// checks every public call makes before its first CUDA call: object lifetime, generations of
// handles and low-latency outputs, sticky errors. Never pass one to a call that gets past those
// checks (it would reach CUDA with null device pointers).
#pragma once
#include <string.h>
#include "comm.h"

struct FakeContext {
  explicit FakeContext(ncclMoeMode_t mode) {
    memset(errors, 0, sizeof(errors));
    c = new ncclMoeComm();
    c->cfg = NCCL_MOE_CONFIG_INITIALIZER;
    c->cfg.mode = mode;
    c->cfg.numExperts = 8;
    c->cfg.hidden = 1024;
    c->cfg.topK = 2;
    c->cfg.maxTokensPerRank = 128;
    c->cfg.outputCapacity = 512;
    c->cfg.numBufferSlots = 2;
    c->nRanks = 4;
    c->errorHost = errors;
    memset(failedWords, 0, sizeof(failedWords));
    c->failedHost = failedWords;
    c->magic = nccl_moe::kCommMagic;
    nccl_moe::registerObject(c, nccl_moe::ObjectKind::Comm);
  }
  ~FakeContext() {
    if (h && !handleRetired) retireHandle();
    if (!commRetired) retire();
  }
  FakeContext(const FakeContext&) = delete;
  FakeContext& operator=(const FakeContext&) = delete;

  // A live handle of this context whose routing belongs to dispatch `dispatch`.
  ncclMoeHandle* addHandle(unsigned long long dispatch) {
    h = new ncclMoeHandle();
    h->comm = c;
    h->haveRouting = true;
    h->numTokens = 4;
    h->dispatch = dispatch;
    h->magic = nccl_moe::kHandleMagic;
    nccl_moe::registerObject(h, nccl_moe::ObjectKind::Handle);
    return h;
  }
  // What ncclMoeCommDestroy / ncclMoeHandleDestroy do to the object itself (no-op if retired).
  void retire() {
    commRetired = true;
    c->magic = nccl_moe::kDeadMagic;
    nccl_moe::retireObject(c, nccl_moe::ObjectKind::Comm, [](void* p) { delete static_cast<ncclMoeComm*>(p); });
  }
  void retireHandle() {
    handleRetired = true;
    h->magic = nccl_moe::kDeadMagic;
    nccl_moe::retireObject(h, nccl_moe::ObjectKind::Handle,
                           [](void* p) { delete static_cast<ncclMoeHandle*>(p); });
  }

  nccl_moe::DeviceError errors[4];  // room for every error record of the context
  unsigned int failedWords[nccl_moe::kRankMaskWords];  // the kernels' failed-rank words
  ncclMoeComm* c = nullptr;
  ncclMoeHandle* h = nullptr;
  bool commRetired = false, handleRetired = false;
};
