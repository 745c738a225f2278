// The layout kernel through ncclMoeGetLayoutNodes and ncclMoeGetLayout: every output poisoned
// first and compared element-exactly with moe_ref::layout (testing/reference.h) for random
// routing with -1s, skewed routing (one expert; only rank 0's experts), a rank with zero tokens,
// every combination of NULL optional outputs, and layouts between dispatches of one context
// (they share the kernel's scratch). 600 tokens per rank: three tiles, the last one partial.
// One node: the per-node outputs have one column. Across fake nodes (MOE_FAKE_NODES=n,
// testing/ranks.h) the context is a low-latency one (high-throughput contexts are refused across
// nodes until the HT internode path lands) and the per-node outputs have n columns:
//   MOE_FAKE_NODES=2 build/test/gpu_tests --ngpus=2 --gtest_filter='HtLayout.*'
// (with build/lib, which holds the moeloop plugin, on LD_LIBRARY_PATH, as `make llnettest` sets).
#include <string>
#include <vector>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtLayout : public GpuTest {};

// Optional outputs of one call (bits); tokensPerRank and tokensPerExpert are always passed.
constexpr unsigned kInRank = 1, kPerNode = 2, kInNode = 4, kAllOptional = 7;

Shape layoutShape(int topK, int experts) {
  Shape s;
  s.hidden = 1024;
  s.topK = topK;
  s.experts = experts;
  s.maxTokens = 600;
  return s;
}

// The EP context of a layout test: high-throughput on one node, low-latency across nodes (the
// mode that spans nodes today; the layout does not depend on the mode). Collective.
bool createContext(Ep& ep) {
  ncclMoeConfig_t cfg = makeConfig(ep.shape);
  if (moe_ranks::fakeNodes() > 1) cfg.mode = ncclMoeLowLatency;
  const bool ok = MOE_OK(ncclMoeCommCreate(comm(), &cfg, &ep.comm));
  if (!ok) ep.comm = nullptr;
  return allRanksOk(ok, ("ncclMoeCommCreate " + ep.shape.str()).c_str());
}

// The context's node count, which must be what MOE_FAKE_NODES asked for. Collective.
bool nodeCount(const Ep& ep, int* nodes) {
  *nodes = 0;
  bool ok = MOE_OK(ncclMoeCommNodeCount(ep.comm, nodes));
  if (ok && *nodes != moe_ranks::fakeNodes()) {
    ADD_FAILURE() << "rank " << rank() << ": ncclMoeCommNodeCount = " << *nodes << ", MOE_FAKE_NODES asked for "
                  << moe_ranks::fakeNodes();
    ok = false;
  }
  return allRanksOk(ok, "ncclMoeCommNodeCount");
}

// Elements of `got` that differ from `want`; the first few are reported.
template <class T>
long mismatches(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  long bad = 0;
  for (size_t i = 0; i < want.size(); i++) {
    if (got[i] == want[i]) continue;
    if (bad < 4)
      ADD_FAILURE() << "rank " << rank() << " " << what << "[" << i << "] = " << (long long)got[i]
                    << ", expected " << (long long)want[i];
    bad++;
  }
  return bad;
}

// The layout outputs of one rank, sized for maxTokens tokens and `nodes` nodes.
struct LayoutOutputs {
  DevMem perRank, perExpert, inRank, perNode, inNode;
  bool alloc(const Shape& s, int nodes) {
    const size_t M = s.maxTokens, R = nRanks();
    return perRank.alloc(R * sizeof(int)) && perExpert.alloc(s.numExperts() * sizeof(int)) &&
           inRank.alloc(M * R) && perNode.alloc(nodes * sizeof(int)) && inNode.alloc(M * nodes);
  }
};

// How one layout is asked for: the optional outputs passed (the others NULL), and whether
// through ncclMoeGetLayout (then only kInRank may be set) instead of ncclMoeGetLayoutNodes.
struct Call {
  unsigned optional = kAllOptional;
  bool getLayout = false;
  std::string str() const {
    return std::string(getLayout ? "ncclMoeGetLayout" : "ncclMoeGetLayoutNodes") + " optional=" +
           std::to_string(optional);
  }
};

// One layout of this rank's routing (p.routing[rank()], uploaded in `in`), its outputs poisoned
// first, every output passed compared with the reference. Collective: false on every rank when
// the call failed on some rank; mismatches are agreed on and recorded as failures.
bool runLayout(Ep& ep, const Problem& p, const DeviceInputs& in, int nodes, LayoutOutputs& o,
               const Call& call) {
  const int R = nRanks(), E = p.shape.numExperts(), T = p.tokens(rank());
  const moe_ref::Layout ref = moe_ref::layout(p.routing[rank()], E, R, nodes);
  bool ok = poison(o.perRank.get(), R * sizeof(int)) && poison(o.perExpert.get(), E * sizeof(int)) &&
            poison(o.inRank.get(), (size_t)T * R) && poison(o.perNode.get(), nodes * sizeof(int)) &&
            poison(o.inNode.get(), (size_t)T * nodes);
  uint8_t* inRank = call.optional & kInRank ? o.inRank.as<uint8_t>() : nullptr;
  int* perNode = call.optional & kPerNode ? o.perNode.as<int>() : nullptr;
  uint8_t* inNode = call.optional & kInNode ? o.inNode.as<uint8_t>() : nullptr;
  const int64_t* idx = in.topkIdx.as<int64_t>();
  if (call.getLayout)
    ok = ok && MOE_OK(ncclMoeGetLayout(ep.comm, idx, T, o.perRank.as<int>(), o.perExpert.as<int>(), inRank,
                                       stream()));
  else
    ok = ok && MOE_OK(ncclMoeGetLayoutNodes(ep.comm, idx, T, o.perRank.as<int>(), o.perExpert.as<int>(), inRank,
                                            perNode, inNode, stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (!allRanksOk(ok, call.str().c_str())) return false;
  std::vector<int> gotRank(R), gotExpert(E), gotNode(nodes);
  std::vector<uint8_t> gotInRank((size_t)T * R), gotInNode((size_t)T * nodes);
  ok = download(gotRank.data(), o.perRank.get(), gotRank.size() * sizeof(int)) &&
       download(gotExpert.data(), o.perExpert.get(), gotExpert.size() * sizeof(int)) &&
       download(gotInRank.data(), o.inRank.get(), gotInRank.size()) &&
       download(gotNode.data(), o.perNode.get(), gotNode.size() * sizeof(int)) &&
       download(gotInNode.data(), o.inNode.get(), gotInNode.size());
  if (!allRanksOk(ok, "download the layout")) return false;
  const std::string tag = call.str() + " ";
  long bad = mismatches(gotRank, ref.tokensPerRank, tag + "tokensPerRank") +
             mismatches(gotExpert, ref.tokensPerExpert, tag + "tokensPerExpert");
  if (inRank) bad += mismatches(gotInRank, ref.isTokenInRank, tag + "isTokenInRank");
  if (perNode) bad += mismatches(gotNode, ref.tokensPerNode, tag + "tokensPerNode");
  if (inNode) bad += mismatches(gotInNode, ref.isTokenInNode, tag + "isTokenInNode");
  agreeMismatches(bad, call.str().c_str());
  return allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

// A context, one problem, and a layout with every output (plus the given extra calls).
void layoutScenario(const Shape& s, const GenSpec& g, const std::vector<Call>& calls = {Call()}) {
  Ep ep(s);
  int nodes = 0;
  if (!createContext(ep) || !nodeCount(ep, &nodes)) return;
  const Problem p = makeProblem(s, g);
  DeviceInputs in;
  LayoutOutputs o;
  MOE_AGREE_OR_RETURN(in.upload(p) && o.alloc(s, nodes), "upload inputs");
  for (const Call& call : calls)
    if (!runLayout(ep, p, in, nodes, o, call)) return;
}

GenSpec withDrops(uint64_t seed, double dropProb) {
  GenSpec g = spec(seed);
  g.dropProb = dropProb;
  return g;
}

TEST_F(HtLayout, RandomWithDropsK8E64) { layoutScenario(layoutShape(8, 64), withDrops(201, 0.1)); }

TEST_F(HtLayout, RandomManyDropsK8E256) { layoutScenario(layoutShape(8, 256), withDrops(202, 0.6)); }

TEST_F(HtLayout, RandomTopK1) { layoutScenario(layoutShape(1, 64), withDrops(203, 0.2)); }

TEST_F(HtLayout, SkewedOneExpert) { layoutScenario(layoutShape(8, 64), spec(211, Route::OneExpert)); }

// Only rank 0's experts: on several nodes every node but node 0 receives nothing.
TEST_F(HtLayout, SkewedRankZeroOnly) { layoutScenario(layoutShape(8, 64), spec(212, Route::RankZeroOnly)); }

TEST_F(HtLayout, ZeroTokensOnRank1) {
  GenSpec g = withDrops(221, 0.1);
  g.zeroTokenRank = 1;
  layoutScenario(layoutShape(8, 64), g);
}

TEST_F(HtLayout, AllDropped) { layoutScenario(layoutShape(8, 64), withDrops(222, 1.0)); }

// Every combination of NULL optional outputs of ncclMoeGetLayoutNodes, then ncclMoeGetLayout
// with and without isTokenInRank: the outputs passed are right whatever is left out.
TEST_F(HtLayout, NullOptionalOutputs) {
  std::vector<Call> calls;
  for (unsigned optional = 0; optional <= kAllOptional; optional++) calls.push_back(Call{optional, false});
  calls.push_back(Call{kInRank, true});
  calls.push_back(Call{0, true});
  layoutScenario(layoutShape(8, 64), withDrops(231, 0.1), calls);
}

// Layouts and dispatches share the kernel's scratch and its epoch: layout, dispatch + combine,
// then both again on new routing, every output checked. High-throughput only (one node).
TEST_F(HtLayout, BetweenDispatches) {
  if (moe_ranks::fakeNodes() > 1) GTEST_SKIP() << "no high-throughput context across nodes yet";
  const Shape s = layoutShape(8, 64);
  Ep ep(s);
  int nodes = 0;
  if (!createContext(ep) || !nodeCount(ep, &nodes)) return;
  DeviceInputs in;
  LayoutOutputs o;
  MOE_AGREE_OR_RETURN(o.alloc(s, nodes), "allocate the layout outputs");
  for (uint64_t seed : {241, 242}) {
    const Problem p = makeProblem(s, withDrops(seed, 0.1));
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    if (!runLayout(ep, p, in, nodes, o, Call())) return;
    RunOpts run;
    if (!runAndCheck(ep, in, p, makeReference(p), run, "dispatch after a layout")) return;
    if (!runLayout(ep, p, in, nodes, o, Call())) return;
  }
}

}  // namespace
}  // namespace moe_gpu
