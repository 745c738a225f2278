// Helpers of the high-throughput internode tests (ht_net_util.h).
#include "ht_net_util.h"

#include "../../testing/rng.h"

namespace moe_gpu {

GenSpec netSpec(uint64_t seed, Route route, int nodesPerToken) {
  GenSpec g = spec(seed, route);
  g.nodes = nodeCount();
  g.nodesPerToken = nodesPerToken;
  return g;
}

std::string topologyStr() { return std::to_string(nodeCount()) + " x " + std::to_string(gpusPerNode()); }

std::vector<std::vector<float>> otherWeights(const Problem& p, uint64_t seed) {
  std::vector<std::vector<float>> w(p.routing.size());
  for (size_t r = 0; r < p.routing.size(); r++) {
    moe_rng::Rng rng(seed * 0x9E3779B97F4A7C15ull + r * 0x100000001B3ull + 7);
    w[r].resize((size_t)p.routing[r].numTokens * p.routing[r].topK);
    for (float& v : w[r]) v = (1 + rng.below(16)) / 16.f;
  }
  return w;
}

bool combineAndCheck(Ep& ep, const Problem& p, const Reference& ref, const float* devWeights,
                     const std::vector<std::vector<float>>& combineWeights, const std::string& tag,
                     std::vector<uint16_t>* got) {
  const Shape& s = p.shape;
  const int me = rank();
  if (!ep.haveOut) {
    ADD_FAILURE() << tag << ": rank " << me << ": no dispatch to combine";
    return allRanksOk(false, (tag + ": combine without dispatch").c_str());
  }
  const ncclMoeDispatchOutput_t& out = ep.lastOut;
  DevMem combOut((size_t)s.maxTokens * s.hidden * 2);
  bool ok = combOut.get() != nullptr && poison(combOut.get(), combOut.bytes());
  const void* expert = out.x;
  if (s.dtype != ncclMoeBf16) {
    expert = out.combineInput;
    if (expert == nullptr) {
      ADD_FAILURE() << tag << ": rank " << me << ": out.combineInput is NULL";
      ok = false;
    } else {
      ok = upload(out.combineInput, ref.expertOut[me].data(), ref.expertOut[me].size() * 2) && ok;
    }
  }
  if (!allRanksOk(ok, (tag + ": combine inputs").c_str())) return false;
  ok = MOE_OK(ncclMoeCombine(ep.comm, ep.handle, expert, devWeights, combOut.get(), stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (!allRanksOk(ok, (tag + ": ncclMoeCombine").c_str())) return false;
  const std::vector<uint16_t> want = referenceCombine(p, ref, devWeights != nullptr, combineWeights);
  agreeMismatches(checkCombine(combOut.get(), want, p.tokens(me), s.hidden, tag.c_str(), got),
                  (tag + ": combine output").c_str());
  return allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), (tag + ": ncclMoeCheckErrors").c_str());
}

}  // namespace moe_gpu
