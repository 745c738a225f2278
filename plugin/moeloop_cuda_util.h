// CUDA helpers shared by the moeloop plugin's CUDA files: error propagation for runtime calls and
// a scope that makes one device current on the calling thread and restores the previous one.
#pragma once
#include <cuda_runtime.h>
#include "moeloop_cumem.h"
#include "moeloop_log.h"

// Returns ncclUnhandledCudaError (logged, counted) from the enclosing function when `call` fails.
#define ML_CUDA(call)                                                                      \
  do {                                                                                     \
    cudaError_t ml_err_ = (call);                                                          \
    if (ml_err_ != cudaSuccess)                                                            \
      return ML_ERROR(ncclUnhandledCudaError, "%s failed: %s", #call,                      \
                      cudaGetErrorString(ml_err_));                                        \
  } while (0)

namespace moeloop {

// Makes `dev` the calling thread's device for the scope's lifetime and then restores the device
// the thread had (NCCL's threads and the user's threads that call into the plugin keep theirs).
// A thread that had no CUDA context keeps `dev`: cudaGetDevice reports device 0 there, and making
// device 0 current again would create a context on that GPU (on NCCL's GIN progress thread of a
// rank of another GPU: half a GiB on a GPU that is another process's, for nothing).
class DeviceScope {
 public:
  explicit DeviceScope(int dev) {
    if (dev < 0) {
      status_ = ML_ERROR(ncclInternalError, "GIN CUDA call before any CUDA registration");
      return;
    }
    if (!threadHasCudaContext() || cudaGetDevice(&saved_) != cudaSuccess) saved_ = -1;
    if (saved_ == dev) return;
    cudaError_t e = cudaSetDevice(dev);
    if (e != cudaSuccess)
      status_ = ML_ERROR(ncclUnhandledCudaError, "cudaSetDevice(%d) failed: %s", dev, cudaGetErrorString(e));
    else
      switched_ = true;
  }
  ~DeviceScope() {
    if (!switched_ || saved_ < 0) return;
    cudaError_t e = cudaSetDevice(saved_);
    if (e != cudaSuccess) ML_WARN("restoring CUDA device %d failed: %s", saved_, cudaGetErrorString(e));
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  ncclResult_t status() const { return status_; }

 private:
  int saved_ = -1;
  bool switched_ = false;
  ncclResult_t status_ = ncclSuccess;
};

}  // namespace moeloop
