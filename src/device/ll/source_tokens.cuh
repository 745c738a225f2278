// The tokens that the sources of one low-latency slot sent to this rank, numbered source by
// source: flat index f is token t of source s with tokenStart[s] <= f < tokenStart[s + 1] and
// t = f - tokenStart[s]. Used by the dispatch completion (fan-out) and the combine send, which
// share out (token, chunk) items over their warps.
#pragma once

namespace nccl_moe {

// tokenStart: [R + 1] prefix of the sources' token counts (shared memory); f < tokenStart[R].
__device__ __forceinline__ void sourceTokenOf(const int* tokenStart, int f, int* s, int* t) {
  int src = 0;
  while (tokenStart[src + 1] <= f) ++src;
  *s = src;
  *t = f - tokenStart[src];
}

}  // namespace nccl_moe
