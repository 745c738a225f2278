// Helpers of the high-throughput internode tests (ht_net_test.cc, ht_net_bytes_test.cc,
// ht_topology_test.cc): routings by the run's real nodes, combine weights other than the
// dispatch's, and a combine of the last dispatch checked against the internode rounding contract
// (referenceCombine: moe_ref::combine on one node, moe_net::htSimulateCombine across nodes).
// Every test here runs on one node and across MOE_FAKE_NODES (testing/ranks.h) alike.
#pragma once
#include <string>
#include <vector>

#include "gpu_env.h"

namespace moe_gpu {

// spec(seed, route) routing by the run's nodes (GenSpec::nodes = nodeCount()).
GenSpec netSpec(uint64_t seed, Route route, int nodesPerToken = 2);

// "<nodes> x <G>", for failure tags.
std::string topologyStr();

// Combine weights for every rank's tokens ([R][T * K]), multiples of 1/16 in [1/16, 1] (exact
// products, as gpu_data.cc's), from `seed`: different from the routing's.
std::vector<std::vector<float>> otherWeights(const Problem& p, uint64_t seed);

// Combines ep's last dispatch of `p` (expert = identity: out.x for BF16, ref.expertOut written
// into out.combineInput for FP8) with `devWeights` (NULL: unweighted; else this rank's [T][K]
// weights on the device, which must be combineWeights[rank()] or, when combineWeights is empty,
// the routing's), output poisoned first, and compares the result with referenceCombine.
// Collective; returns false when an API step failed on some rank. `got` receives the output.
bool combineAndCheck(Ep& ep, const Problem& p, const Reference& ref, const float* devWeights,
                     const std::vector<std::vector<float>>& combineWeights, const std::string& tag,
                     std::vector<uint16_t>* got = nullptr);

}  // namespace moe_gpu
