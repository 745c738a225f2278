// NCCL NET v11 entry points of the moeloop plugin: a thin layer over moeloop_transport that
// speaks NCCL's ABI. One fake NIC per process ("moeloop0"); host memory only (NCCL stages GPU
// data through its host buffers); connect / accept / isend / irecv / test never block.
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include "moeloop_log.h"
#include "moeloop_net_props.h"
#include "moeloop_transport.h"

namespace moeloop {
namespace {

struct NetContext {
  uint32_t magic;
  uint64_t commId;
};
constexpr uint32_t kNetContextMagic = 0x4e434d4c;

// regMr hands out this object: host memory needs no registration.
struct HostMr {
  uint32_t magic;
} gHostMr = {0x484d5231};

ncclResult_t netInit(void** ctx, uint64_t commId, ncclNetCommConfig_v11_t* config,
                     ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction) {
  (void)config;
  (void)profFunction;
  if (ctx == nullptr) return ML_ERROR(ncclInvalidArgument, "init with ctx == NULL");
  setLogger(logFunction);
  *ctx = nullptr;
  NetContext* c = new NetContext{kNetContextMagic, commId};
  counters().netInits.fetch_add(1, std::memory_order_relaxed);
  ShapingConfig s = shapingConfig();
  ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_NET,
          "NET plugin initialised for comm %llx: %d device(s), %s sockets, shaping %.3f GB/s %.1f us",
          (unsigned long long)commId, kMaxDevs, defaultFamily() == kFamilyTcp ? "tcp" : "unix",
          s.bytesPerSec * 1e-9, s.latencyNs * 1e-3);
  *ctx = c;
  return ncclSuccess;
}

ncclResult_t netDevices(int* ndev) {
  if (ndev == nullptr) return ML_ERROR(ncclInvalidArgument, "devices with ndev == NULL");
  *ndev = kMaxDevs;
  return ncclSuccess;
}

ncclResult_t netGetProperties(int dev, ncclNetProperties_v11_t* props) {
  return fillProperties(dev, /*gin=*/false, props);
}

ncclResult_t netListenEntry(void* ctx, int dev, void* handle, void** listenComm) {
  (void)ctx;
  if (handle == nullptr || listenComm == nullptr)
    return ML_ERROR(ncclInvalidArgument, "listen with a NULL argument");
  NetListenComm* l = nullptr;
  ML_CHECK(netListen(dev, handle, &l));
  *listenComm = l;
  return ncclSuccess;
}

ncclResult_t netConnectEntry(void* ctx, int dev, void* handle, void** sendComm,
                             ncclNetDeviceHandle_v11_t** sendDevComm) {
  (void)ctx;
  (void)sendDevComm;  // no device offload: the handle is left untouched
  if (sendComm == nullptr) return ML_ERROR(ncclInvalidArgument, "connect with sendComm == NULL");
  NetComm* c = nullptr;
  ncclResult_t res = netConnect(dev, handle, &c);
  *sendComm = c;
  return res;
}

ncclResult_t netAcceptEntry(void* listenComm, void** recvComm, ncclNetDeviceHandle_v11_t** recvDevComm) {
  (void)recvDevComm;
  if (recvComm == nullptr) return ML_ERROR(ncclInvalidArgument, "accept with recvComm == NULL");
  NetComm* c = nullptr;
  ncclResult_t res = netAccept((NetListenComm*)listenComm, &c);
  *recvComm = c;
  return res;
}

ncclResult_t netRegMr(void* comm, void* data, size_t size, int type, void** mhandle) {
  (void)comm;
  (void)data;
  (void)size;
  if (mhandle == nullptr) return ML_ERROR(ncclInvalidArgument, "regMr with mhandle == NULL");
  *mhandle = nullptr;
  if (type != NCCL_PTR_HOST)
    return ML_ERROR(ncclInvalidUsage, "regMr of memory type %d: moeloop NET moves host memory only", type);
  *mhandle = &gHostMr;
  return ncclSuccess;
}

ncclResult_t netRegMrDmaBuf(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                            void** mhandle) {
  (void)offset;
  (void)fd;
  return netRegMr(comm, data, size, type, mhandle);
}

ncclResult_t netDeregMr(void* comm, void* mhandle) {
  (void)comm;
  if (mhandle != &gHostMr) return ML_ERROR(ncclInvalidArgument, "deregMr of an unknown handle");
  return ncclSuccess;
}

ncclResult_t netIsendEntry(void* sendComm, void* data, size_t size, int tag, void* mhandle,
                           void* phandle, void** request) {
  (void)tag;
  (void)mhandle;
  (void)phandle;
  if (request == nullptr) return ML_ERROR(ncclInvalidArgument, "isend with request == NULL");
  NetRequest* r = nullptr;
  ncclResult_t res = netIsend((NetComm*)sendComm, data, size, &r);
  *request = r;
  return res;
}

ncclResult_t netIrecvEntry(void* recvComm, int n, void** data, size_t* sizes, int* tags,
                           void** mhandles, void** phandles, void** request) {
  (void)tags;
  (void)mhandles;
  (void)phandles;
  if (request == nullptr) return ML_ERROR(ncclInvalidArgument, "irecv with request == NULL");
  *request = nullptr;
  if (n != 1 || data == nullptr || sizes == nullptr)
    return ML_ERROR(ncclInvalidArgument, "irecv of %d grouped receives (maxRecvs is 1)", n);
  NetRequest* r = nullptr;
  ncclResult_t res = netIrecv((NetComm*)recvComm, data[0], sizes[0], &r);
  *request = r;
  return res;
}

ncclResult_t netIflush(void* recvComm, int n, void** data, int* sizes, void** mhandles, void** request) {
  (void)recvComm;
  (void)n;
  (void)data;
  (void)sizes;
  (void)mhandles;
  // Received data is in host memory and complete when test reports it: nothing to flush.
  if (request) *request = nullptr;
  return ncclSuccess;
}

ncclResult_t netTestEntry(void* request, int* done, int* sizes) {
  if (done == nullptr) return ML_ERROR(ncclInvalidArgument, "test with done == NULL");
  size_t size = 0;
  ncclResult_t res = netTest((NetRequest*)request, done, &size);
  // NCCL's v11 test reports int sizes: every message is at most kMaxMessageBytes (enforced on
  // isend and on every received header), which fits.
  static_assert(kMaxMessageBytes <= (size_t)INT_MAX, "message sizes must fit NCCL's int sizes");
  if (res == ncclSuccess && *done && sizes) sizes[0] = (int)size;
  return res;
}

ncclResult_t netCloseSend(void* sendComm) { return netClose((NetComm*)sendComm); }
ncclResult_t netCloseRecv(void* recvComm) { return netClose((NetComm*)recvComm); }
ncclResult_t netCloseListenEntry(void* listenComm) { return netCloseListen((NetListenComm*)listenComm); }

ncclResult_t netGetDeviceMr(void* comm, void* mhandle, void** dptrMhandle) {
  (void)comm;
  (void)mhandle;
  (void)dptrMhandle;
  return ML_ERROR(ncclInternalError, "getDeviceMr: moeloop NET has no device offload");
}

ncclResult_t netIrecvConsumed(void* recvComm, int n, void* request) {
  (void)recvComm;
  (void)n;
  (void)request;
  return ncclSuccess;
}

ncclResult_t netFinalize(void* ctx) {
  NetContext* c = (NetContext*)ctx;
  if (c == nullptr) return ncclSuccess;
  if (c->magic != kNetContextMagic) return ML_ERROR(ncclInvalidArgument, "finalize of an invalid context");
  c->magic = 0;
  delete c;
  return ncclSuccess;
}

ncclResult_t netSetNetAttr(void* ctx, ncclNetAttr_v11_t* netAttr) {
  (void)ctx;
  (void)netAttr;  // traffic hints do not change a loopback transport
  return ncclSuccess;
}

}  // namespace

ncclResult_t fillProperties(int dev, bool gin, ncclNetProperties_v11_t* props) {
  static char name[] = "moeloop0";
  if (props == nullptr) return ML_ERROR(ncclInvalidArgument, "getProperties with props == NULL");
  if (dev < 0 || dev >= kMaxDevs) return ML_ERROR(ncclInvalidArgument, "getProperties of unknown device %d", dev);
  memset(props, 0, sizeof(*props));
  ShapingConfig s = shapingConfig();
  props->name = name;
  props->pciPath = nullptr;  // virtual NIC, attached to the CPU in NCCL's topology
  props->guid = 0x6d6f656c6f6f7000ull + (uint64_t)dev;
  props->ptrSupport = gin ? (NCCL_PTR_HOST | NCCL_PTR_CUDA) : NCCL_PTR_HOST;
  props->regIsGlobal = 0;
  props->forceFlush = 0;
  double mbps = s.bytesPerSec > 0 ? s.bytesPerSec * 8e-6 : 100000.0;
  props->speed = mbps < 1 ? 1 : (mbps > 2e9 ? 2000000000 : (int)mbps);
  props->port = 1;
  props->latency = (float)(s.latencyNs * 1e-3);
  props->maxComms = 65536;
  // GIN: NCCL sizes its per-rank descriptor queue as NCCL_NET_MAX_REQUESTS * maxRecvs.
  props->maxRecvs = gin ? kGinMaxRecvs : 1;
  props->netDeviceType = gin ? NCCL_NET_DEVICE_GIN_PROXY : NCCL_NET_DEVICE_HOST;
  props->netDeviceVersion = NCCL_NET_DEVICE_INVALID_VERSION;
  props->vProps.ndevs = 1;
  props->vProps.devs[0] = dev;
  props->maxP2pBytes = kMaxMessageBytes;
  props->maxCollBytes = kMaxMessageBytes;
  props->maxMultiRequestSize = 1;
  return ncclSuccess;
}

}  // namespace moeloop

// The symbol NCCL looks up with dlsym.
extern "C" {
__attribute__((visibility("default"))) ncclNet_v11_t ncclNetPlugin_v11 = {
    "moeloop",
    moeloop::netInit,
    moeloop::netDevices,
    moeloop::netGetProperties,
    moeloop::netListenEntry,
    moeloop::netConnectEntry,
    moeloop::netAcceptEntry,
    moeloop::netRegMr,
    moeloop::netRegMrDmaBuf,
    moeloop::netDeregMr,
    moeloop::netIsendEntry,
    moeloop::netIrecvEntry,
    moeloop::netIflush,
    moeloop::netTestEntry,
    moeloop::netCloseSend,
    moeloop::netCloseRecv,
    moeloop::netCloseListenEntry,
    moeloop::netGetDeviceMr,
    moeloop::netIrecvConsumed,
    nullptr,  // makeVDevice: no NIC fusion, NCCL uses the physical device
    moeloop::netFinalize,
    moeloop::netSetNetAttr,
};
}  // extern "C"
