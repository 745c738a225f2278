// Node map validation (see node_map.h).
#include "net/node_map.h"
#include <unordered_map>
#include "error.h"

namespace nccl_moe {

ncclResult_t buildNodeMap(const RankPlacement* ranks, int nRanks, NodeMap* map) {
  const ncclResult_t bad = ncclInvalidUsage;
  if (nRanks < 1 || nRanks > kMaxRanks)
    return setError(bad, "the communicator has %d ranks; the internode path supports 1..%d", nRanks, kMaxRanks);
  // Each host's ranks must form one run of consecutive ranks.
  std::unordered_map<uint64_t, int> firstRankOfHost;
  for (int r = 0; r < nRanks; ++r) {
    if (r > 0 && ranks[r].hostKey == ranks[r - 1].hostKey) continue;
    const auto seen = firstRankOfHost.find(ranks[r].hostKey);
    if (seen != firstRankOfHost.end())
      return setError(bad,
                      "ranks are not node-contiguous: rank %d runs on the node of rank %d, but rank %d between "
                      "them does not; the ranks of each node must be consecutive (ranks n*G..n*G+G-1 on node "
                      "n): order the ranks by node when creating the communicator",
                      r, seen->second, r - 1);
    firstRankOfHost.emplace(ranks[r].hostKey, r);
  }
  // Every run as long as the first.
  int runLength = 1;
  while (runLength < nRanks && ranks[runLength].hostKey == ranks[0].hostKey) ++runLength;
  for (int start = runLength; start < nRanks;) {
    int end = start + 1;
    while (end < nRanks && ranks[end].hostKey == ranks[start].hostKey) ++end;
    if (end - start != runLength)
      return setError(bad,
                      "nodes have different numbers of ranks: ranks 0..%d share the first node (%d ranks), "
                      "ranks %d..%d share another (%d ranks); every node must run the same number of ranks",
                      runLength - 1, runLength, start, end - 1, end - start);
    start = end;
  }
  const int G = runLength;
  for (int r = 0; r < nRanks; ++r) {
    if (ranks[r].lsaSize != G || ranks[r].lsaRank != r % G)
      return setError(bad,
                      "rank %d is rank %d of an NVLink (LSA) domain of %d ranks, but its node has %d ranks "
                      "(%d..%d): the GPUs of each node must form one NVLink domain",
                      r, ranks[r].lsaRank, ranks[r].lsaSize, G, r / G * G, r / G * G + G - 1);
  }
  map->nRanks = nRanks;
  map->gpusPerNode = G;
  map->nNodes = nRanks / G;
  return ncclSuccess;
}

}  // namespace nccl_moe
