// The version-neutral core of the moeloop GIN (moeloop_gin.cc). The tables NCCL loads
// (moeloop_gin_tables.cc: GIN v11, GIN v13, RMA v14) are thin adapters over these functions.
//
// Objects: a collComm (connect: one full mesh of sockets among the ranks) owns registrations and
// requests; a context set (createContext of GIN v13 / RMA v14) names `nContexts` contexts of one
// collComm, addressed by id 0 .. nContexts-1. GIN v11 has no context sets: its collComm is its
// one context (id 0). Every context of a collComm shares the collComm's ordered stream to each
// rank, so GIN's rule (a signal is visible only after the payloads of earlier puts of the same
// context to the same rank) holds, across contexts too. Every signal is therefore strong.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "nccl_plugin_abi.h"

namespace moeloop {

// One put as NCCL describes it. size == 0 with NULL handles: signal only.
struct GinPut {
  uint64_t srcOff = 0;
  void* srcMhandle = nullptr;
  size_t size = 0;                // bytes, at most kMaxMessageBytes
  uint64_t dstOff = 0;
  void* dstMhandle = nullptr;
  uint32_t rank = 0;              // target rank in the collComm
  uint32_t signalOp = 0;          // 0 (none), NCCL_NET_SIGNAL_OP_INC or NCCL_NET_SIGNAL_OP_ADD
  uint64_t signalOff = 0;         // bytes into the signal registration, 8-byte aligned
  void* signalMhandle = nullptr;
  uint64_t signalValue = 0;       // the addend of NCCL_NET_SIGNAL_OP_ADD
};

ncclResult_t ginInit(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction);
ncclResult_t ginDevices(int* ndev);
ncclResult_t ginListen(void* ctx, int dev, void* handle, void** listenComm);
ncclResult_t ginCloseListen(void* listenComm);
// Collective over nranks ranks; blocks until the mesh is up (NCCL_MOELOOP_CONNECT_TIMEOUT_S).
ncclResult_t ginConnect(void* ctx, void* handles[], int nranks, int rank, void* listenComm,
                        void** collComm);
ncclResult_t ginCloseColl(void* collComm);
// Collective and in the same order on every rank. The handle serves as mhandle and GIN handle.
// mrFlags: NCCL_NET_MR_FLAG_* of the caller; NCCL_NET_MR_FLAG_SIGNAL_NEVER_RESET on device memory
// makes signals to the registration cheap writes (see GinRegistration::sigShadow).
ncclResult_t ginRegMrSym(void* collComm, void* data, size_t size, int type, void** mhandle,
                         uint64_t mrFlags = 0);
ncclResult_t ginDeregMrSym(void* collComm, void* mhandle);
ncclResult_t ginFinalize(void* ctx);

// Context sets (GIN v13, RMA v14).
ncclResult_t ginCreateContexts(void* collComm, int nContexts, void** contextSet);
ncclResult_t ginDestroyContexts(void* contextSet);

// Puts: on a collComm's only context (GIN v11) or on context `context` of a context set.
ncclResult_t ginPutOnComm(void* collComm, const GinPut& put, void** request);
ncclResult_t ginPutOnContext(void* contextSet, int context, const GinPut& put, void** request);
// *done = 1 once the source of the put may be reused (the request is then released).
ncclResult_t ginTest(void* collComm, void* request, int* done);
ncclResult_t ginProgressComm(void* collComm);
ncclResult_t ginProgressContexts(void* contextSet);
// Errors are sticky per collComm: *hasError once any call on it failed.
ncclResult_t ginQueryLastErrorComm(void* collComm, bool* hasError);
ncclResult_t ginQueryLastErrorContexts(void* contextSet, bool* hasError);

}  // namespace moeloop
