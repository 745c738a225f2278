// CUDA side of the moeloop GIN: copies between host and device memory of this process on a
// private non-blocking stream (never the legacy default stream, which would wait for the user's
// kernels that are themselves waiting for our signals), pinned bounce buffers, and the signal
// read-modify-write through the copy engine. Every entry point restores the calling thread's
// CUDA device before it returns.
#include <cuda_runtime.h>
#include <mutex>
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

// Makes g->dev the calling thread's device for its lifetime and then restores the device the
// thread had (NCCL's threads and the user's threads that call into the plugin keep theirs).
class DeviceScope {
 public:
  explicit DeviceScope(const GinCuda* g) {
    if (g->dev < 0) {
      status_ = ML_ERROR(ncclInternalError, "GIN copy before any CUDA registration");
      return;
    }
    if (cudaGetDevice(&saved_) != cudaSuccess) saved_ = -1;
    if (saved_ == g->dev) return;
    cudaError_t e = cudaSetDevice(g->dev);
    if (e != cudaSuccess)
      status_ = ML_ERROR(ncclUnhandledCudaError, "cudaSetDevice(%d) failed: %s", g->dev, cudaGetErrorString(e));
    else
      switched_ = true;
  }
  ~DeviceScope() {
    if (!switched_ || saved_ < 0) return;
    cudaError_t e = cudaSetDevice(saved_);
    if (e != cudaSuccess) ML_WARN("restoring CUDA device %d failed: %s", saved_, cudaGetErrorString(e));
  }
  ncclResult_t status() const { return status_; }

 private:
  int saved_ = -1;
  bool switched_ = false;
  ncclResult_t status_ = ncclSuccess;
};

// Creates the stream and the scratch word; the caller holds a DeviceScope for g->dev.
ncclResult_t ensureResources(GinCuda* g) {
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

struct CopyEnv {
  cudaStream_t stream;
  uint64_t* scratch;  // pinned
};

ncclResult_t readWordByCopy(void* env, const uint64_t* word, uint64_t* value) {
  CopyEnv* e = (CopyEnv*)env;
  ML_CUDA(cudaMemcpyAsync(e->scratch, word, sizeof(uint64_t), cudaMemcpyDeviceToHost, e->stream));
  ML_CUDA(cudaStreamSynchronize(e->stream));
  *value = *e->scratch;
  return ncclSuccess;
}

ncclResult_t writeWordByCopy(void* env, uint64_t* word, uint64_t value) {
  CopyEnv* e = (CopyEnv*)env;
  *e->scratch = value;
  ML_CUDA(cudaMemcpyAsync(word, e->scratch, sizeof(uint64_t), cudaMemcpyHostToDevice, e->stream));
  ML_CUDA(cudaStreamSynchronize(e->stream));
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

void ginCudaRelease(GinCuda* g) {
  if (g->stream == nullptr && g->scratch == nullptr) return;  // CUDA never used: touch nothing
  DeviceScope scope(g);
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
  DeviceScope scope(g);
  ML_CHECK(scope.status());
  ML_CHECK(ensureResources(g));
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
  DeviceScope scope(g);
  ML_CHECK(scope.status());
  ML_CHECK(ensureResources(g));
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

ncclResult_t ginDeviceAdd(GinCuda* g, uint64_t* word, uint64_t add) {
  DeviceScope scope(g);
  ML_CHECK(scope.status());
  ML_CHECK(ensureResources(g));
  CopyEnv env{(cudaStream_t)g->stream, g->scratch};
  return signalAddLocked(SignalWordAccess{readWordByCopy, writeWordByCopy, &env}, word, add);
}

}  // namespace moeloop
