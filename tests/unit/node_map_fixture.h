// Node maps for the CPU tests of the internode layer: nNodes x G ranks in node order (host key
// n + 1, LSA rank r % G of an LSA team of G), as buildNodeMap sees them.
#pragma once
#include <vector>

#include <gtest/gtest.h>

#include "net/node_map.h"

namespace node_map_fixture {

inline std::vector<nccl_moe::RankPlacement> placement(int nNodes, int G) {
  std::vector<nccl_moe::RankPlacement> p;
  for (int r = 0; r < nNodes * G; ++r) p.push_back(nccl_moe::RankPlacement{(uint64_t)(r / G + 1), r % G, G});
  return p;
}

// The map of such a placement; a failure to build it fails the calling test.
inline nccl_moe::NodeMap mapOf(int nNodes, int G) {
  nccl_moe::NodeMap m;
  const std::vector<nccl_moe::RankPlacement> p = placement(nNodes, G);
  EXPECT_EQ(nccl_moe::buildNodeMap(p.data(), (int)p.size(), &m), ncclSuccess) << ncclMoeGetLastError();
  return m;
}

}  // namespace node_map_fixture
