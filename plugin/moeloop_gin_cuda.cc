// CUDA side of the moeloop GIN: copies between host and device memory of this process on a
// private non-blocking stream (never the legacy default stream, which would wait for the user's
// kernels that are themselves waiting for our signals), pinned bounce buffers, the copy
// transport's streams and events, and the signal read-modify-write through the copy engine.
// Every entry point restores the calling thread's CUDA device before it returns.
#include <cuda_runtime.h>
#include <mutex>
#include "moeloop_cuda_util.h"
#include "moeloop_gin.h"

namespace moeloop {
namespace {

// Creates the comm's stream; the caller holds a DeviceScope for g->dev.
ncclResult_t ensureStream(GinCuda* g) {
  if (g->stream == nullptr) {
    cudaStream_t s;
    ML_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    g->stream = s;
  }
  return ncclSuccess;
}

// Signal updates of one device: one stream and two pinned words (read, write), process-wide,
// created on first use and kept for the life of the process.
// Shadowed signals (ginDeviceAddShadowed) write from a ring of pinned slots: a slot is reused only
// after the lane has been synchronised once per kRingSlots writes, so it is never rewritten while
// a copy from it may still be pending.
constexpr int kRingSlots = 4096;
struct SignalLane {
  cudaStream_t stream = nullptr;
  uint64_t* words = nullptr;  // [0] the value read, [1] the value written, [2, 2 + kRingSlots) ring
  int ringNext = 0;           // next ring slot (under signalMutex())
};
constexpr int kMaxLanes = 64;
SignalLane gLanes[kMaxLanes];
std::mutex gLaneMutex;

ncclResult_t laneOf(int dev, SignalLane** out) {
  if (dev < 0 || dev >= kMaxLanes) return ML_ERROR(ncclInternalError, "signal update on CUDA device %d", dev);
  std::lock_guard<std::mutex> lock(gLaneMutex);
  SignalLane& l = gLanes[dev];
  if (l.stream == nullptr) {
    cudaStream_t s;
    ML_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    void* p = nullptr;
    cudaError_t e = cudaHostAlloc(&p, (2 + kRingSlots) * sizeof(uint64_t), cudaHostAllocPortable);
    if (e != cudaSuccess) {
      cudaStreamDestroy(s);
      return ML_ERROR(ncclUnhandledCudaError, "cudaHostAlloc of the signal words failed: %s", cudaGetErrorString(e));
    }
    l.words = (uint64_t*)p;
    l.stream = s;
  }
  *out = &l;
  return ncclSuccess;
}

ncclResult_t readWordByCopy(void* env, const uint64_t* word, uint64_t* value) {
  SignalLane* l = (SignalLane*)env;
  ML_CUDA(cudaMemcpyAsync(&l->words[0], word, sizeof(uint64_t), cudaMemcpyDeviceToHost, l->stream));
  ML_CUDA(cudaStreamSynchronize(l->stream));
  *value = l->words[0];
  return ncclSuccess;
}

// Not waited for: the lane's next read is ordered after it on the lane's stream, and words[1] is
// rewritten only after that read has been waited for.
ncclResult_t writeWordByCopy(void* env, uint64_t* word, uint64_t value) {
  SignalLane* l = (SignalLane*)env;
  l->words[1] = value;
  ML_CUDA(cudaMemcpyAsync(word, &l->words[1], sizeof(uint64_t), cudaMemcpyHostToDevice, l->stream));
  return ncclSuccess;
}

std::mutex& signalMutex() {
  static std::mutex mu;
  return mu;
}

}  // namespace

ncclResult_t ginPointerDevice(const void* p, int* dev, bool* isDevice) {
  cudaPointerAttributes attr;
  ML_CUDA(cudaPointerGetAttributes(&attr, p));
  *isDevice = attr.type == cudaMemoryTypeDevice;
  *dev = attr.device;
  return ncclSuccess;
}

ncclResult_t ginPrepareDevice(GinCuda* g) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  ML_CHECK(ensureStream(g));
  SignalLane* lane = nullptr;
  return laneOf(g->dev, &lane);
}

void ginCudaRelease(GinCuda* g) {
  if (g->stream == nullptr) return;  // CUDA never used: touch nothing
  DeviceScope scope(g->dev);
  cudaError_t e = cudaStreamDestroy((cudaStream_t)g->stream);
  if (e != cudaSuccess) ML_WARN("cudaStreamDestroy failed: %s", cudaGetErrorString(e));
  g->stream = nullptr;
}

ncclResult_t ginPinnedAlloc(GinCuda* g, size_t bytes, char** p) {
  *p = nullptr;
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  void* q = nullptr;
  ML_CUDA(cudaHostAlloc(&q, bytes, cudaHostAllocPortable));
  *p = (char*)q;
  return ncclSuccess;
}

void ginPinnedFree(char* p) {
  if (p == nullptr) return;
  cudaError_t e = cudaFreeHost(p);
  if (e != cudaSuccess) ML_WARN("cudaFreeHost failed: %s", cudaGetErrorString(e));
}

ncclResult_t ginCopy(GinCuda* g, void* dst, const void* src, size_t n) {
  if (n == 0) return ncclSuccess;
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  ML_CHECK(ensureStream(g));
  cudaStream_t s = (cudaStream_t)g->stream;
  ML_CUDA(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, s));
  ML_CUDA(cudaStreamSynchronize(s));
  return ncclSuccess;
}

ncclResult_t signalAddLocked(const SignalWordAccess& access, uint64_t* word, uint64_t add) {
  std::lock_guard<std::mutex> lock(signalMutex());
  uint64_t v = 0;
  ML_CHECK(access.read(access.env, word, &v));
  return access.write(access.env, word, v + add);
}

ncclResult_t ginDeviceAddShadowed(GinCuda* g, uint64_t* word, uint64_t* shadow, uint64_t add) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  SignalLane* lane = nullptr;
  ML_CHECK(laneOf(g->dev, &lane));
  std::lock_guard<std::mutex> lock(signalMutex());
  if (lane->ringNext == kRingSlots) {  // every slot may still be read by a pending copy
    ML_CUDA(cudaStreamSynchronize(lane->stream));
    lane->ringNext = 0;
  }
  uint64_t* slot = &lane->words[2 + lane->ringNext++];
  *shadow += add;
  *slot = *shadow;
  // Ordered after every earlier update of this device (same lane); the payload this signal
  // follows is already in place (synchronous copy, or the sender's copy event completed).
  ML_CUDA(cudaMemcpyAsync(word, slot, sizeof(uint64_t), cudaMemcpyHostToDevice, lane->stream));
  return ncclSuccess;
}

ncclResult_t ginSignalLaneSync(GinCuda* g) {
  if (g->dev < 0) return ncclSuccess;
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  SignalLane* lane = nullptr;
  ML_CHECK(laneOf(g->dev, &lane));
  ML_CUDA(cudaStreamSynchronize(lane->stream));
  return ncclSuccess;
}

ncclResult_t ginDeviceAdd(GinCuda* g, uint64_t* word, uint64_t add) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  SignalLane* lane = nullptr;
  ML_CHECK(laneOf(g->dev, &lane));
  return signalAddLocked(SignalWordAccess{readWordByCopy, writeWordByCopy, lane}, word, add);
}

// --- copy transport ----------------------------------------------------------------------------

ncclResult_t ginStreamCreate(GinCuda* g, void** stream) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  cudaStream_t s;
  ML_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  *stream = s;
  return ncclSuccess;
}

void ginStreamDestroy(GinCuda* g, void* stream) {
  if (stream == nullptr) return;
  DeviceScope scope(g->dev);
  cudaError_t e = cudaStreamSynchronize((cudaStream_t)stream);
  if (e != cudaSuccess) ML_WARN("copy transport: waiting for the copies failed: %s", cudaGetErrorString(e));
  e = cudaStreamDestroy((cudaStream_t)stream);
  if (e != cudaSuccess) ML_WARN("cudaStreamDestroy failed: %s", cudaGetErrorString(e));
}

ncclResult_t ginStreamSync(GinCuda* g, void* stream) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  ML_CUDA(cudaStreamSynchronize((cudaStream_t)stream));
  return ncclSuccess;
}

ncclResult_t ginCopyAsync(GinCuda* g, void* stream, void* dst, const void* src, size_t n) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  ML_CUDA(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, (cudaStream_t)stream));
  return ncclSuccess;
}

ncclResult_t ginStreamWaitEvent(GinCuda* g, void* stream, void* event) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  ML_CUDA(cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)event, 0));
  return ncclSuccess;
}

ncclResult_t ginEventRecord(GinCuda* g, void** event, void* stream) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  if (*event == nullptr) {
    cudaEvent_t e;
    ML_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    *event = e;
  }
  ML_CUDA(cudaEventRecord((cudaEvent_t)*event, (cudaStream_t)stream));
  return ncclSuccess;
}

ncclResult_t ginTimingEventRecord(GinCuda* g, void** event, void* stream) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  if (*event == nullptr) {
    cudaEvent_t e;
    ML_CUDA(cudaEventCreate(&e));
    *event = e;
  }
  ML_CUDA(cudaEventRecord((cudaEvent_t)*event, (cudaStream_t)stream));
  return ncclSuccess;
}

ncclResult_t ginTimingEventElapsed(GinCuda* g, void* start, void* end, uint64_t* ns) {
  DeviceScope scope(g->dev);
  ML_CHECK(scope.status());
  float ms = 0;
  ML_CUDA(cudaEventElapsedTime(&ms, (cudaEvent_t)start, (cudaEvent_t)end));
  *ns = (uint64_t)((double)ms * 1e6);
  return ncclSuccess;
}

ncclResult_t ginEventDone(void* event, bool* done) {
  cudaError_t e = cudaEventQuery((cudaEvent_t)event);
  *done = e == cudaSuccess;
  if (e == cudaSuccess || e == cudaErrorNotReady) return ncclSuccess;
  return ML_ERROR(ncclUnhandledCudaError, "copy transport: a copy failed: %s", cudaGetErrorString(e));
}

void ginEventDestroy(GinCuda* g, void* event) {
  if (event == nullptr) return;
  DeviceScope scope(g->dev);
  cudaError_t e = cudaEventDestroy((cudaEvent_t)event);
  if (e != cudaSuccess) ML_WARN("cudaEventDestroy failed: %s", cudaGetErrorString(e));
}

}  // namespace moeloop
