// ABI of the GIN v13 and RMA v14 plugin interfaces as NCCL 2.30.x loads them, written for the
// moeloop plugin next to the v11 declarations of nccl_plugin_abi.h. The layouts were checked
// against the debug information of libnccl.so 2.30.7 (ncclGin_v13_t and ncclRma_v14_t: 168 bytes,
// ncclNetProperties_v12_t: 128 bytes) and are pinned by the static_asserts at the end.
//
// How NCCL 2.30.7 uses them (facts from its source, which the adapters rely on):
//  - GIN plugins are looked up as `ncclGinPlugin_v14`, then `ncclGinPlugin_v13`. An external GIN
//    of type NCCL_NET_DEVICE_GIN_PROXY is skipped: NCCL runs its own GIN proxy over an RMA
//    backend instead. A v14 GIN table has no put entry points, so only GDAKI / GPI types use it.
//  - RMA backends are looked up in NCCL_RMA_PLUGIN (default libnccl-rma.so), then in the GIN and
//    NET plugin libraries, as `ncclRmaPlugin_v14`, then `ncclRmaPlugin_v13` or `ncclGinPlugin_v13`
//    (the v13 GIN table doubles as RMA v13). The RMA v13 adapter insists on GIN_PROXY props.
//  - NCCL's GIN proxy over RMA: listen / connect once per GIN connection; createContext(collComm,
//    {nContexts, ...}) once per device communicator; iput / iputSignal(rmaCtx, contextId, ...)
//    from its progress thread; test(collComm, request); rmaProgress / queryLastError /
//    destroyContext(rmaCtx). Its queue depth per (context, peer) is NCCL_NET_MAX_REQUESTS *
//    props.maxRecvs. It advertises strong and VA signals itself. A VA signal arrives as a
//    signal-only iputSignal (size 0, no windows) on the signal window's registration. iget is
//    needed only by device-side gets, iflush only after them (both may be NULL).
//  - 2.30.3 / 2.30.4 load GIN v13, v12, v11 and drive a v13 proxy table the same way (contexts
//    from createContext(collComm, config, &ctx, NULL)).
#pragma once
#include "nccl_plugin_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NCCL_NET_MAX_DEVS_PER_NIC_V12 8
#define NCCL_NET_ID_UNDEF (-1)                    // railId / planeId: not specified
#define NCCL_NET_MR_FLAG_SIGNAL_NEVER_RESET 0x2   // regMrSym hint: the region holds signals

// --- v12 properties (GIN v13 / RMA v14 getProperties) --------------------------------------------
typedef struct {
  int ndevs;
  int devs[NCCL_NET_MAX_DEVS_PER_NIC_V12];
} ncclNetVDeviceProps_v12_t;

// The v11 fields in the same order, a larger vProps, then the rail and plane of the NIC.
typedef struct {
  char* name;
  char* pciPath;
  uint64_t guid;
  int ptrSupport;
  int regIsGlobal;
  int forceFlush;
  int speed;                              // Mbps
  int port;
  float latency;                          // microseconds
  int maxComms;
  int maxRecvs;                           // GIN / RMA: sets the proxy's queue depth (x32)
  ncclNetDeviceType netDeviceType;
  int netDeviceVersion;
  ncclNetVDeviceProps_v12_t vProps;
  size_t maxP2pBytes;
  size_t maxCollBytes;
  int maxMultiRequestSize;
  int16_t railId;                         // NCCL_NET_ID_UNDEF when unknown
  int16_t planeId;                        // NCCL_NET_ID_UNDEF when unknown
} ncclNetProperties_v12_t;

// --- GIN v13 -------------------------------------------------------------------------------------
typedef struct {
  int nSignals;       // signals per context (NCCL's proxy allocates them itself)
  int nCounters;      // counters per context
  int nContexts;      // contexts created by this call, ids 0 .. nContexts-1
  int queueDepth;     // requested descriptor queue depth (0: default)
  int trafficClass;
} ncclGinConfig_v13_t;

// Same order as ncclGin_v11_t up to closeListen; then puts addressed by (context, contextId),
// optional iget / iflush, test by collComm, progress and error query by context.
typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v12_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, void* handles[], int nranks, int rank, void* listenComm,
                          void** collComm);
  ncclResult_t (*createContext)(void* collComm, ncclGinConfig_v13_t* config, void** ginCtx,
                                ncclNetDeviceHandle_v11_t** devHandle);
  ncclResult_t (*regMrSym)(void* collComm, void* data, size_t size, int type, uint64_t mrFlags,
                           void** mhandle, void** ginHandle);
  ncclResult_t (*regMrSymDmaBuf)(void* collComm, void* data, size_t size, int type,
                                 uint64_t offset, int fd, uint64_t mrFlags, void** mhandle,
                                 void** ginHandle);
  ncclResult_t (*deregMrSym)(void* collComm, void* mhandle);
  ncclResult_t (*destroyContext)(void* ginCtx);
  ncclResult_t (*closeColl)(void* collComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*iput)(void* ginCtx, int context, uint64_t srcOff, void* srcMhandle, size_t size,
                       uint64_t dstOff, void* dstMhandle, uint32_t rank, void** request);
  ncclResult_t (*iputSignal)(void* ginCtx, int context, uint64_t srcOff, void* srcMhandle,
                             size_t size, uint64_t dstOff, void* dstMhandle, uint32_t rank,
                             uint64_t signalOff, void* signalMhandle, uint64_t signalValue,
                             uint32_t signalOp, void** request);
  ncclResult_t (*iget)(void* ginCtx, int context, uint64_t remoteOff, void* remoteMhandle,
                       size_t size, uint64_t localOff, void* localMhandle, uint32_t rank,
                       void** request);
  ncclResult_t (*iflush)(void* ginCtx, int context, void* mhandle, uint32_t rank, void** request);
  ncclResult_t (*test)(void* collComm, void* request, int* done);
  ncclResult_t (*ginProgress)(void* ginCtx);
  ncclResult_t (*queryLastError)(void* ginCtx, bool* hasError);
  ncclResult_t (*finalize)(void* ctx);
} ncclGin_v13_t;

// --- RMA v14 -------------------------------------------------------------------------------------
typedef struct {
  int nContexts;      // contexts created by this call, ids 0 .. nContexts-1
  int trafficClass;
  int rankStride;     // rail connections: stride between the ranks of one rail (1: every rank)
} ncclRmaConfig_v14_t;

// GIN v13 without the GIN handles and the device handle; iputSignal says whether the signal must
// be strong (ordered after every earlier put of the context to that rank).
typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v12_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, void* handles[], int nranks, int rank, void* listenComm,
                          void** collComm);
  ncclResult_t (*createContext)(void* collComm, ncclRmaConfig_v14_t* config, void** rmaCtx);
  ncclResult_t (*regMrSym)(void* collComm, void* data, size_t size, int type, uint64_t mrFlags,
                           void** mhandle);
  ncclResult_t (*regMrSymDmaBuf)(void* collComm, void* data, size_t size, int type,
                                 uint64_t offset, int fd, uint64_t mrFlags, void** mhandle);
  ncclResult_t (*deregMrSym)(void* collComm, void* mhandle);
  ncclResult_t (*destroyContext)(void* rmaCtx);
  ncclResult_t (*closeColl)(void* collComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*iput)(void* rmaCtx, int context, uint64_t srcOff, void* srcMhandle, size_t size,
                       uint64_t dstOff, void* dstMhandle, uint32_t rank, void** request);
  ncclResult_t (*iputSignal)(void* rmaCtx, int context, uint64_t srcOff, void* srcMhandle,
                             size_t size, uint64_t dstOff, void* dstMhandle, uint32_t rank,
                             uint64_t signalOff, void* signalMhandle, uint64_t signalValue,
                             uint32_t signalOp, bool isStrongSignal, void** request);
  ncclResult_t (*iget)(void* rmaCtx, int context, uint64_t remoteOff, void* remoteMhandle,
                       size_t size, uint64_t localOff, void* localMhandle, uint32_t rank,
                       void** request);
  ncclResult_t (*iflush)(void* rmaCtx, int context, void* mhandle, uint32_t rank, void** request);
  ncclResult_t (*test)(void* collComm, void* request, int* done);
  ncclResult_t (*rmaProgress)(void* rmaCtx);
  ncclResult_t (*queryLastError)(void* rmaCtx, bool* hasError);
  ncclResult_t (*finalize)(void* ctx);
} ncclRma_v14_t;

#ifdef __cplusplus
}  // extern "C"

// Layout pins (x86-64 LP64), from libnccl.so 2.30.7's debug information.
static_assert(offsetof(ncclNetProperties_v12_t, vProps) == 64, "props12.vProps");
static_assert(offsetof(ncclNetProperties_v12_t, maxP2pBytes) == 104, "props12.maxP2pBytes");
static_assert(offsetof(ncclNetProperties_v12_t, maxMultiRequestSize) == 120, "props12.maxMulti");
static_assert(offsetof(ncclNetProperties_v12_t, railId) == 124, "props12.railId");
static_assert(sizeof(ncclNetProperties_v12_t) == 128, "ncclNetProperties_v12_t layout");
static_assert(sizeof(ncclGinConfig_v13_t) == 20, "ncclGinConfig_v13_t layout");
static_assert(sizeof(ncclRmaConfig_v14_t) == 12, "ncclRmaConfig_v14_t layout");
static_assert(offsetof(ncclGin_v13_t, createContext) == 48, "gin13.createContext");
static_assert(offsetof(ncclGin_v13_t, iput) == 104, "gin13.iput");
static_assert(offsetof(ncclGin_v13_t, test) == 136, "gin13.test");
static_assert(offsetof(ncclGin_v13_t, queryLastError) == 152, "gin13.queryLastError");
static_assert(sizeof(ncclGin_v13_t) == 168, "ncclGin_v13_t layout");
static_assert(offsetof(ncclRma_v14_t, createContext) == 48, "rma14.createContext");
static_assert(offsetof(ncclRma_v14_t, iputSignal) == 112, "rma14.iputSignal");
static_assert(offsetof(ncclRma_v14_t, test) == 136, "rma14.test");
static_assert(offsetof(ncclRma_v14_t, rmaProgress) == 144, "rma14.rmaProgress");
static_assert(sizeof(ncclRma_v14_t) == 168, "ncclRma_v14_t layout");
#endif
