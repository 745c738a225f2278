// The GIN / RMA tables the moeloop plugin exports, one per interface version NCCL loads, each a
// thin adapter over the core of moeloop_gin_api.h:
//   ncclGinPlugin_v11  NCCL 2.28.x and 2.29.x (and 2.30.3 / 2.30.4 as a fallback): NCCL's proxy
//                      drives the collComm itself, one context per collComm.
//   ncclGinPlugin_v13  NCCL 2.30.3 / 2.30.4 (GIN v13 proxy backend) and NCCL 2.30.7 (RMA v13,
//                      where no ncclRmaPlugin_v14 is found).
//   ncclRmaPlugin_v14  NCCL 2.30.7: the RMA backend under NCCL's own GIN proxy, which is how 2.30.7
//                      gets GIN from an external proxy-type plugin (it skips proxy-type GIN tables).
// No ncclGinPlugin_v14: that table has no put entry points (GDAKI / GPI types only).
// See nccl_plugin_abi_v13.h for how NCCL 2.30 calls these.
#include <string.h>
#include "moeloop_gin_api.h"
#include "moeloop_gin_tables.h"
#include "moeloop_log.h"
#include "moeloop_net_props.h"

namespace moeloop {

ncclResult_t fillPropertiesV12(int dev, bool gin, ncclNetProperties_v12_t* props) {
  if (props == nullptr) return ML_ERROR(ncclInvalidArgument, "getProperties with props == NULL");
  ncclNetProperties_v11_t p11;
  ML_CHECK(fillProperties(dev, gin, &p11));
  memset(props, 0, sizeof(*props));
  props->name = p11.name;
  props->pciPath = p11.pciPath;
  props->guid = p11.guid;
  props->ptrSupport = p11.ptrSupport;
  props->regIsGlobal = p11.regIsGlobal;
  props->forceFlush = p11.forceFlush;
  props->speed = p11.speed;
  props->port = p11.port;
  props->latency = p11.latency;
  props->maxComms = p11.maxComms;
  props->maxRecvs = p11.maxRecvs;
  props->netDeviceType = p11.netDeviceType;
  props->netDeviceVersion = p11.netDeviceVersion;
  props->vProps.ndevs = p11.vProps.ndevs;
  for (int i = 0; i < p11.vProps.ndevs && i < NCCL_NET_MAX_DEVS_PER_NIC_V12; i++)
    props->vProps.devs[i] = p11.vProps.devs[i];
  props->maxP2pBytes = p11.maxP2pBytes;
  props->maxCollBytes = p11.maxCollBytes;
  props->maxMultiRequestSize = p11.maxMultiRequestSize;
  props->railId = NCCL_NET_ID_UNDEF;
  props->planeId = NCCL_NET_ID_UNDEF;
  return ncclSuccess;
}

namespace {

GinPut makePut(uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff, void* dstMhandle,
               uint32_t rank) {
  GinPut p;
  p.srcOff = srcOff;
  p.srcMhandle = srcMhandle;
  p.size = size;
  p.dstOff = dstOff;
  p.dstMhandle = dstMhandle;
  p.rank = rank;
  return p;
}

GinPut makeSignalPut(uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                     void* dstMhandle, uint32_t rank, uint64_t signalOff, void* signalMhandle,
                     uint64_t signalValue, uint32_t signalOp) {
  GinPut p = makePut(srcOff, srcMhandle, size, dstOff, dstMhandle, rank);
  p.signalOp = signalOp;
  p.signalOff = signalOff;
  p.signalMhandle = signalMhandle;
  p.signalValue = signalValue;
  return p;
}

// --- shared by the versions ---------------------------------------------------------------------

ncclResult_t regMrSymWithGinHandle(void* collComm, void* data, size_t size, int type,
                                   uint64_t mrFlags, void** mhandle, void** ginHandle) {
  // Every put is applied in order: strong ordering (FORCE_SO) holds for all registrations.
  if (ginHandle == nullptr) return ML_ERROR(ncclInvalidArgument, "regMrSym with ginHandle == NULL");
  *ginHandle = nullptr;
  ML_CHECK(ginRegMrSym(collComm, data, size, type, mhandle, mrFlags));
  *ginHandle = *mhandle;  // NCCL hands back the GIN handle to puts: one object serves both
  return ncclSuccess;
}

// The memory is addressable in this process: the dma-buf is not needed (and not advertised).
ncclResult_t regMrSymDmaBufWithGinHandle(void* collComm, void* data, size_t size, int type,
                                         uint64_t offset, int fd, uint64_t mrFlags, void** mhandle,
                                         void** ginHandle) {
  (void)offset;
  (void)fd;
  return regMrSymWithGinHandle(collComm, data, size, type, mrFlags, mhandle, ginHandle);
}

// --- GIN v11 ------------------------------------------------------------------------------------

ncclResult_t v11GetProperties(int dev, ncclNetProperties_v11_t* props) {
  return fillProperties(dev, /*gin=*/true, props);
}

// NCCL's proxy owns the contexts of a v11 proxy-type GIN: createContext is never called.
ncclResult_t v11CreateContext(void* collComm, int nSignals, int nCounters, void** ginCtx,
                              ncclNetDeviceHandle_v11_t** devHandle) {
  (void)collComm;
  (void)nSignals;
  (void)nCounters;
  if (ginCtx) *ginCtx = nullptr;
  if (devHandle) *devHandle = nullptr;
  return ML_ERROR(ncclInvalidUsage, "createContext: moeloop is a GIN_PROXY plugin; NCCL's proxy owns the contexts");
}

ncclResult_t v11DestroyContext(void* ginCtx) {
  if (ginCtx == nullptr) return ncclSuccess;
  return ML_ERROR(ncclInvalidArgument, "destroyContext of a context moeloop never created");
}

ncclResult_t v11Iput(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                     void* dstMhandle, uint32_t rank, void** request) {
  return ginPutOnComm(collComm, makePut(srcOff, srcMhandle, size, dstOff, dstMhandle, rank), request);
}

ncclResult_t v11IputSignal(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size,
                           uint64_t dstOff, void* dstMhandle, uint32_t rank, uint64_t signalOff,
                           void* signalMhandle, uint64_t signalValue, uint32_t signalOp,
                           void** request) {
  return ginPutOnComm(collComm, makeSignalPut(srcOff, srcMhandle, size, dstOff, dstMhandle, rank,
                                              signalOff, signalMhandle, signalValue, signalOp),
                      request);
}

// NCCL 2.28.9 passes the context of createContext; since its proxy owns the contexts, it is the
// collComm (or NULL).
ncclResult_t v11QueryLastError(void* ginCtx, bool* hasError) {
  return ginQueryLastErrorComm(ginCtx, hasError);
}

// --- GIN v13 / RMA v14: contexts created by the plugin ------------------------------------------

ncclResult_t v12GetProperties(int dev, ncclNetProperties_v12_t* props) {
  return fillPropertiesV12(dev, /*gin=*/true, props);
}

ncclResult_t v13CreateContext(void* collComm, ncclGinConfig_v13_t* config, void** ginCtx,
                              ncclNetDeviceHandle_v11_t** devHandle) {
  if (devHandle) *devHandle = nullptr;  // proxy type: NCCL's proxy builds the device side
  if (config == nullptr) return ML_ERROR(ncclInvalidArgument, "createContext with config == NULL");
  return ginCreateContexts(collComm, config->nContexts, ginCtx);
}

ncclResult_t v14CreateContext(void* collComm, ncclRmaConfig_v14_t* config, void** rmaCtx) {
  if (config == nullptr) return ML_ERROR(ncclInvalidArgument, "createContext with config == NULL");
  // rankStride only groups the ranks of a rail; every rank is reachable here, so it changes nothing.
  return ginCreateContexts(collComm, config->nContexts, rmaCtx);
}

ncclResult_t v14RegMrSym(void* collComm, void* data, size_t size, int type, uint64_t mrFlags,
                         void** mhandle) {
  return ginRegMrSym(collComm, data, size, type, mhandle, mrFlags);
}

ncclResult_t v14RegMrSymDmaBuf(void* collComm, void* data, size_t size, int type, uint64_t offset,
                               int fd, uint64_t mrFlags, void** mhandle) {
  (void)offset;
  (void)fd;
  return v14RegMrSym(collComm, data, size, type, mrFlags, mhandle);
}

ncclResult_t ctxIput(void* ctx, int context, uint64_t srcOff, void* srcMhandle, size_t size,
                     uint64_t dstOff, void* dstMhandle, uint32_t rank, void** request) {
  return ginPutOnContext(ctx, context, makePut(srcOff, srcMhandle, size, dstOff, dstMhandle, rank),
                         request);
}

ncclResult_t v13IputSignal(void* ctx, int context, uint64_t srcOff, void* srcMhandle, size_t size,
                           uint64_t dstOff, void* dstMhandle, uint32_t rank, uint64_t signalOff,
                           void* signalMhandle, uint64_t signalValue, uint32_t signalOp,
                           void** request) {
  return ginPutOnContext(ctx, context,
                         makeSignalPut(srcOff, srcMhandle, size, dstOff, dstMhandle, rank,
                                       signalOff, signalMhandle, signalValue, signalOp),
                         request);
}

// Every signal is strong here (see moeloop_gin_api.h), so isStrongSignal needs no handling.
ncclResult_t v14IputSignal(void* ctx, int context, uint64_t srcOff, void* srcMhandle, size_t size,
                           uint64_t dstOff, void* dstMhandle, uint32_t rank, uint64_t signalOff,
                           void* signalMhandle, uint64_t signalValue, uint32_t signalOp,
                           bool isStrongSignal, void** request) {
  (void)isStrongSignal;
  return v13IputSignal(ctx, context, srcOff, srcMhandle, size, dstOff, dstMhandle, rank, signalOff,
                       signalMhandle, signalValue, signalOp, request);
}

}  // namespace
}  // namespace moeloop

// The symbols NCCL looks up with dlsym. iget / iflush are NULL: device-side gets are not supported
// (NCCL reports "does not support GET" if a kernel issues one); a flush is needed only after gets.
extern "C" {
__attribute__((visibility("default"))) ncclGin_v11_t ncclGinPlugin_v11 = {
    "moeloop",
    moeloop::ginInit,
    moeloop::ginDevices,
    moeloop::v11GetProperties,
    moeloop::ginListen,
    moeloop::ginConnect,
    moeloop::v11CreateContext,
    moeloop::regMrSymWithGinHandle,
    moeloop::regMrSymDmaBufWithGinHandle,
    moeloop::ginDeregMrSym,
    moeloop::v11DestroyContext,
    moeloop::ginCloseColl,
    moeloop::ginCloseListen,
    moeloop::v11Iput,
    moeloop::v11IputSignal,
    moeloop::ginTest,
    moeloop::ginProgressComm,
    moeloop::v11QueryLastError,
    moeloop::ginFinalize,
};

__attribute__((visibility("default"))) ncclGin_v13_t ncclGinPlugin_v13 = {
    "moeloop",
    moeloop::ginInit,
    moeloop::ginDevices,
    moeloop::v12GetProperties,
    moeloop::ginListen,
    moeloop::ginConnect,
    moeloop::v13CreateContext,
    moeloop::regMrSymWithGinHandle,
    moeloop::regMrSymDmaBufWithGinHandle,
    moeloop::ginDeregMrSym,
    moeloop::ginDestroyContexts,
    moeloop::ginCloseColl,
    moeloop::ginCloseListen,
    moeloop::ctxIput,
    moeloop::v13IputSignal,
    nullptr,  // iget
    nullptr,  // iflush
    moeloop::ginTest,
    moeloop::ginProgressContexts,
    moeloop::ginQueryLastErrorContexts,
    moeloop::ginFinalize,
};

__attribute__((visibility("default"))) ncclRma_v14_t ncclRmaPlugin_v14 = {
    "moeloop",
    moeloop::ginInit,
    moeloop::ginDevices,
    moeloop::v12GetProperties,
    moeloop::ginListen,
    moeloop::ginConnect,
    moeloop::v14CreateContext,
    moeloop::v14RegMrSym,
    moeloop::v14RegMrSymDmaBuf,
    moeloop::ginDeregMrSym,
    moeloop::ginDestroyContexts,
    moeloop::ginCloseColl,
    moeloop::ginCloseListen,
    moeloop::ctxIput,
    moeloop::v14IputSignal,
    nullptr,  // iget
    nullptr,  // iflush
    moeloop::ginTest,
    moeloop::ginProgressContexts,
    moeloop::ginQueryLastErrorContexts,
    moeloop::ginFinalize,
};
}  // extern "C"
