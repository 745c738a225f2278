// Last-error reporting and return-code checks used by every host file of the library.
#pragma once
#include <nccl.h>
#include <cuda_runtime.h>

namespace nccl_moe {

// Records a printf-style message as this thread's last error (ncclMoeGetLastError) and
// returns `code`, so that callers write `return setError(ncclInvalidArgument, ...)`.
ncclResult_t setError(ncclResult_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Clears this thread's last error (each public call starts with it).
void clearError();

}  // namespace nccl_moe

// Propagate a failing ncclResult_t (message already recorded).
#define MOE_CHECK(call)                                   \
  do {                                                    \
    ncclResult_t moe_res_ = (call);                       \
    if (moe_res_ != ncclSuccess) return moe_res_;         \
  } while (0)

// Turn a failing CUDA call into ncclUnhandledCudaError with file, line and CUDA's message.
#define MOE_CUDA(call)                                                                     \
  do {                                                                                     \
    cudaError_t moe_err_ = (call);                                                         \
    if (moe_err_ != cudaSuccess)                                                           \
      return ::nccl_moe::setError(ncclUnhandledCudaError, "%s:%d: %s failed: %s", __FILE__, \
                                  __LINE__, #call, cudaGetErrorString(moe_err_));          \
  } while (0)

// Turn a failing NCCL call into its own code with NCCL's message.
#define MOE_NCCL(call)                                                                        \
  do {                                                                                        \
    ncclResult_t moe_res_ = (call);                                                           \
    if (moe_res_ != ncclSuccess)                                                              \
      return ::nccl_moe::setError(moe_res_, "%s:%d: %s failed: %s", __FILE__, __LINE__, #call, \
                                  ncclGetErrorString(moe_res_));                              \
  } while (0)
