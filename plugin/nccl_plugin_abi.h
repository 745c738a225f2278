// ABI of the NCCL NET (v11) and GIN (v11) plugin interfaces as NCCL 2.28.9 loads them, written
// for the moeloop plugin. Declared here from NCCL's published plugin interface; the layouts were
// checked against the debug information of libnccl.so 2.28.9 (ncclNet_v11_t: 176 bytes,
// ncclGin_v11_t: 152 bytes, ncclNetProperties_v11_t: 112 bytes) and are pinned by the
// static_asserts at the end. Only nccl.h (ncclResult_t) is taken from NCCL.
//
// NCCL resolves `ncclNetPlugin_v11` and `ncclGinPlugin_v11` with dlsym from
// libnccl-net-<name>.so when NCCL_NET_PLUGIN=<name>.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <nccl.h>

#ifdef __cplusplus
extern "C" {
#endif

// --- logging (NCCL passes its logger to init) ------------------------------------------------
typedef enum {
  NCCL_LOG_NONE = 0,
  NCCL_LOG_VERSION = 1,
  NCCL_LOG_WARN = 2,
  NCCL_LOG_INFO = 3,
  NCCL_LOG_ABORT = 4,
  NCCL_LOG_TRACE = 5
} ncclDebugLogLevel;

// Subsystem bits of the `flags` argument (the ones this plugin uses).
#define MOELOOP_LOG_INIT 0x1UL
#define MOELOOP_LOG_NET 0x10UL
#define MOELOOP_LOG_ENV 0x80UL

typedef void (*ncclDebugLogger_t)(ncclDebugLogLevel level, unsigned long flags, const char* file,
                                  int line, const char* fmt, ...);
typedef ncclResult_t (*ncclProfilerCallback_t)(void** eHandle, int type, void* pHandle,
                                               int64_t pluginId, void* extData);

// --- constants --------------------------------------------------------------------------------
#define NCCL_NET_HANDLE_MAXSIZE 128
#define NCCL_PTR_HOST 0x1
#define NCCL_PTR_CUDA 0x2
#define NCCL_PTR_DMABUF 0x4
#define NCCL_NET_MAX_DEVS_PER_NIC 4
#define NCCL_NET_MAX_REQUESTS 32          // NCCL's per-comm request window for NET
#define NCCL_NET_MR_FLAG_FORCE_SO 0x1     // regMrSym flag: strong ordering requested
#define NCCL_NET_SIGNAL_OP_INC 0x1        // iputSignal: signal += 1
#define NCCL_NET_SIGNAL_OP_ADD 0x2        // iputSignal: signal += signalValue

// --- device offload handle (same layout as NCCL's nccl_device/net_device.h; the include guard
// is shared so that both headers may appear in one translation unit) -------------------------
#ifndef NCCL_NET_DEVICE_H_
#define NCCL_NET_DEVICE_H_
#define NCCL_NET_DEVICE_INVALID_VERSION 0x0
typedef enum {
  NCCL_NET_DEVICE_HOST = 0,
  NCCL_NET_DEVICE_UNPACK = 1,
  NCCL_NET_DEVICE_GIN_PROXY = 2,
  NCCL_NET_DEVICE_GIN_GDAKI = 3,
} ncclNetDeviceType;

typedef struct {
  ncclNetDeviceType netDeviceType;
  int netDeviceVersion;
  void* handle;
  size_t size;
  int needsProxyProgress;
} ncclNetDeviceHandle_v7_t;
typedef ncclNetDeviceHandle_v7_t ncclNetDeviceHandle_v8_t;
typedef ncclNetDeviceHandle_v8_t ncclNetDeviceHandle_v9_t;
typedef ncclNetDeviceHandle_v9_t ncclNetDeviceHandle_v10_t;
typedef ncclNetDeviceHandle_v10_t ncclNetDeviceHandle_v11_t;
typedef ncclNetDeviceHandle_v11_t ncclNetDeviceHandle_t;
#endif

// --- v11 property and configuration structs ---------------------------------------------------
typedef struct {
  int ndevs;                              // physical devices merged into this (virtual) device
  int devs[NCCL_NET_MAX_DEVS_PER_NIC];
} ncclNetVDeviceProps_v11_t;

typedef struct {
  int trafficClass;                       // -1: undefined
} ncclNetCommConfig_v11_t;

typedef struct {
  char* name;                             // device name, for logs
  char* pciPath;                          // sysfs PCI path, or NULL (virtual device: CPU-attached)
  uint64_t guid;                          // unique id of the NIC
  int ptrSupport;                         // NCCL_PTR_HOST | NCCL_PTR_CUDA | NCCL_PTR_DMABUF
  int regIsGlobal;                        // 1: a registration is valid for every comm
  int forceFlush;                         // 1: NCCL must flush receives into GPU memory
  int speed;                              // port speed in Mbps
  int port;                               // port number
  float latency;                          // network latency in microseconds
  int maxComms;                           // most comms the device supports
  int maxRecvs;                           // most receives grouped in one irecv
  ncclNetDeviceType netDeviceType;        // offload type (HOST for NET, GIN_* for GIN)
  int netDeviceVersion;                   // offload version
  ncclNetVDeviceProps_v11_t vProps;       // physical devices behind this one
  size_t maxP2pBytes;                     // largest point-to-point transfer
  size_t maxCollBytes;                    // largest collective transfer
  int maxMultiRequestSize;                // most requests in one multi-request
} ncclNetProperties_v11_t;

typedef struct {
  int32_t maxConcurrentPeers;
  int32_t minConcurrentPeers;
  int32_t maxFlowsPerPeer;
  int32_t minFlowsPerPeer;
} ncclNetCommAttr_v11_t;

typedef struct {
  ncclNetCommAttr_v11_t sendCommAttr;
  ncclNetCommAttr_v11_t recvCommAttr;
  uint32_t op;
  uint32_t algo;
  uint32_t proto;
} ncclNetAttr_v11_t;

// --- NET v11 function table ---------------------------------------------------------------------
// connect/accept must not block: they return a NULL comm until the connection is established
// and are called again. isend/irecv may return a NULL request ("try again later"). test reports
// completion and, if sizes != NULL, the bytes transferred per request.
typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclNetCommConfig_v11_t* config,
                       ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v11_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, int dev, void* handle, void** sendComm,
                          ncclNetDeviceHandle_v11_t** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, ncclNetDeviceHandle_v11_t** recvDevComm);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset,
                              int fd, void** mhandle);
  ncclResult_t (*deregMr)(void* comm, void* mhandle);
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle,
                        void* phandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags,
                        void** mhandles, void** phandles, void** request);
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles,
                         void** request);
  ncclResult_t (*test)(void* request, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* sendComm);
  ncclResult_t (*closeRecv)(void* recvComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_v11_t* props);  // may be NULL
  ncclResult_t (*finalize)(void* ctx);
  ncclResult_t (*setNetAttr)(void* ctx, ncclNetAttr_v11_t* netAttr);
} ncclNet_v11_t;

// --- GIN v11 function table ---------------------------------------------------------------------
// For a GIN of type NCCL_NET_DEVICE_GIN_PROXY, NCCL's proxy thread reads the GPU's descriptors and
// calls iput/iputSignal/test/ginProgress; createContext is not used. connect is collective over
// nranks ranks and receives every rank's listen handle. regMrSym is collective: every rank
// registers the corresponding buffer in the same order. The handles iput receives are the
// `ginHandle` values regMrSym returned. Signals become visible only after the payload of the put
// and of earlier puts on the same collComm to the same rank.
typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v11_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, void* handles[], int nranks, int rank, void* listenComm,
                          void** collComm);
  ncclResult_t (*createContext)(void* collComm, int nSignals, int nCounters, void** ginCtx,
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
  ncclResult_t (*iput)(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size,
                       uint64_t dstOff, void* dstMhandle, uint32_t rank, void** request);
  ncclResult_t (*iputSignal)(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size,
                             uint64_t dstOff, void* dstMhandle, uint32_t rank, uint64_t signalOff,
                             void* signalMhandle, uint64_t signalValue, uint32_t signalOp,
                             void** request);
  ncclResult_t (*test)(void* collComm, void* request, int* done);
  ncclResult_t (*ginProgress)(void* collComm);
  ncclResult_t (*queryLastError)(void* ginCtx, bool* hasError);
  ncclResult_t (*finalize)(void* ctx);
} ncclGin_v11_t;

#ifdef __cplusplus
}  // extern "C"

// Layout pins (x86-64 LP64), from libnccl.so 2.28.9's debug information.
static_assert(sizeof(ncclNetDeviceHandle_v11_t) == 32, "ncclNetDeviceHandle_v11_t layout");
static_assert(offsetof(ncclNetProperties_v11_t, guid) == 16, "props.guid");
static_assert(offsetof(ncclNetProperties_v11_t, latency) == 44, "props.latency");
static_assert(offsetof(ncclNetProperties_v11_t, netDeviceType) == 56, "props.netDeviceType");
static_assert(offsetof(ncclNetProperties_v11_t, vProps) == 64, "props.vProps");
static_assert(offsetof(ncclNetProperties_v11_t, maxP2pBytes) == 88, "props.maxP2pBytes");
static_assert(offsetof(ncclNetProperties_v11_t, maxMultiRequestSize) == 104, "props.maxMulti");
static_assert(sizeof(ncclNetProperties_v11_t) == 112, "ncclNetProperties_v11_t layout");
static_assert(sizeof(ncclNetAttr_v11_t) == 44, "ncclNetAttr_v11_t layout");
static_assert(offsetof(ncclNet_v11_t, isend) == 80, "net.isend");
static_assert(offsetof(ncclNet_v11_t, test) == 104, "net.test");
static_assert(offsetof(ncclNet_v11_t, makeVDevice) == 152, "net.makeVDevice");
static_assert(sizeof(ncclNet_v11_t) == 176, "ncclNet_v11_t layout");
static_assert(offsetof(ncclGin_v11_t, regMrSym) == 56, "gin.regMrSym");
static_assert(offsetof(ncclGin_v11_t, iput) == 104, "gin.iput");
static_assert(offsetof(ncclGin_v11_t, test) == 120, "gin.test");
static_assert(offsetof(ncclGin_v11_t, queryLastError) == 136, "gin.queryLastError");
static_assert(sizeof(ncclGin_v11_t) == 152, "ncclGin_v11_t layout");
#endif
