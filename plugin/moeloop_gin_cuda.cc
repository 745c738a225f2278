// CUDA side of the moeloop GIN: copies between host and device memory of this process on a
// private non-blocking stream (never the legacy default stream, which would wait for the user's
// kernels that are themselves waiting for our signals), pinned bounce buffers, and the signal
// read-modify-write through the copy engine.
#include <cuda_runtime.h>
#include "moeloop_gin.h"
#include "moeloop_log.h"

namespace moeloop {
namespace {

#define ML_CUDA(call)                                                                      \
  do {                                                                                     \
    cudaError_t ml_err_ = (call);                                                          \
    if (ml_err_ != cudaSuccess)                                                            \
      return ML_ERROR(ncclUnhandledCudaError, "%s failed: %s", #call,                      \
                      cudaGetErrorString(ml_err_));                                        \
  } while (0)

// Makes g->dev the calling thread's device. The threads that reach here are NCCL's GIN progress
// thread and the threads that create or destroy the comm, all of which work on this device.
ncclResult_t selectDevice(const GinCuda* g) {
  if (g->dev < 0) return ML_ERROR(ncclInternalError, "GIN copy before any CUDA registration");
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess || cur != g->dev) ML_CUDA(cudaSetDevice(g->dev));
  return ncclSuccess;
}

}  // namespace

ncclResult_t ginPointerDevice(const void* p, int* dev, bool* isDevice) {
  cudaPointerAttributes attr;
  ML_CUDA(cudaPointerGetAttributes(&attr, p));
  *isDevice = attr.type == cudaMemoryTypeDevice;
  *dev = attr.device;
  return ncclSuccess;
}

ncclResult_t ginCudaEnsure(GinCuda* g) {
  ML_CHECK(selectDevice(g));
  if (g->stream == nullptr) {
    cudaStream_t s;
    ML_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    g->stream = s;
  }
  if (g->scratch == nullptr) {
    void* p = nullptr;
    ML_CUDA(cudaHostAlloc(&p, sizeof(uint64_t), cudaHostAllocPortable));
    g->scratch = (uint64_t*)p;
  }
  return ncclSuccess;
}

void ginCudaRelease(GinCuda* g) {
  if (g->stream == nullptr && g->scratch == nullptr) return;  // CUDA never used: touch nothing
  (void)selectDevice(g);
  if (g->stream) {
    cudaError_t e = cudaStreamDestroy((cudaStream_t)g->stream);
    if (e != cudaSuccess) ML_WARN("cudaStreamDestroy failed: %s", cudaGetErrorString(e));
    g->stream = nullptr;
  }
  if (g->scratch) {
    cudaError_t e = cudaFreeHost(g->scratch);
    if (e != cudaSuccess) ML_WARN("cudaFreeHost failed: %s", cudaGetErrorString(e));
    g->scratch = nullptr;
  }
}

ncclResult_t ginPinnedAlloc(GinCuda* g, size_t bytes, char** p) {
  *p = nullptr;
  ML_CHECK(ginCudaEnsure(g));
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
  ML_CHECK(ginCudaEnsure(g));
  cudaStream_t s = (cudaStream_t)g->stream;
  ML_CUDA(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, s));
  ML_CUDA(cudaStreamSynchronize(s));
  return ncclSuccess;
}

ncclResult_t ginDeviceAdd(GinCuda* g, uint64_t* word, uint64_t add) {
  ML_CHECK(ginCudaEnsure(g));
  cudaStream_t s = (cudaStream_t)g->stream;
  ML_CUDA(cudaMemcpyAsync(g->scratch, word, sizeof(uint64_t), cudaMemcpyDeviceToHost, s));
  ML_CUDA(cudaStreamSynchronize(s));
  *g->scratch += add;
  ML_CUDA(cudaMemcpyAsync(word, g->scratch, sizeof(uint64_t), cudaMemcpyHostToDevice, s));
  ML_CUDA(cudaStreamSynchronize(s));
  return ncclSuccess;
}

}  // namespace moeloop
