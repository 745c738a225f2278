// Thread-local last error of the public API.
#include "error.h"
#include <stdarg.h>
#include <stdio.h>
#include "nccl_moe.h"

namespace nccl_moe {

static thread_local char lastError[1024] = "";

ncclResult_t setError(ncclResult_t code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(lastError, sizeof(lastError), fmt, ap);
  va_end(ap);
  return code;
}

void clearError() { lastError[0] = '\0'; }

}  // namespace nccl_moe

extern "C" const char* ncclMoeGetLastError(void) { return nccl_moe::lastError; }
