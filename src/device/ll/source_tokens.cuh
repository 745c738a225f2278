// The tokens that the sources of one low-latency slot sent to this rank, numbered source by
// source: flat index f is token t of source s with tokenStart[s] <= f < tokenStart[s + 1] and
// t = f - tokenStart[s]. Used by the dispatch completion (fan-out) and the combine send, which
// share out (token, chunk) items over their warps.
#pragma once
#include "device/kernel_args.h"
#include "device/common/vec_io.cuh"

namespace nccl_moe {

// tokenStart: [R + 1] prefix of the sources' token counts (shared memory); f < tokenStart[R].
__device__ __forceinline__ void sourceTokenOf(const int* tokenStart, int f, int* s, int* t) {
  int src = 0;
  while (tokenStart[src + 1] <= f) ++src;
  *s = src;
  *t = f - tokenStart[src];
}

// Lane k's route entry of token t of source s in this rank's slot (route: the slot's [R][M][K]
// entries, M = maxTokens): (row, weight bits); (-1, 0) for lanes k >= K. Written by source s
// during the dispatch: read past L1.
__device__ __forceinline__ int2 loadRouteEntryLl(const LlRouteEntry* route, int s, int t, int M, int K, int lane) {
  if (lane >= K) return make_int2(-1, 0);
  return loadPeerInt2((const int2*)(route + ((size_t)s * M + t) * K + lane));
}

}  // namespace nccl_moe
