// High-throughput mode on one node and across (fake) nodes (MOE_FAKE_NODES, testing/ranks.h;
// make htnettest): the same public API gives the same dispatch outputs as intranode, bit for bit
// (moe_ref::dispatch, rows by source rank then token), and the combine of the HT internode
// rounding contract (referenceCombine: moe_ref::combine on one node, moe_net::htSimulateCombine
// across nodes: one BF16 rounding per remote node's partial). Routings by the run's real nodes
// (G = R / nodeCount()): random with -1s, node-limited (<= 2 nodes per token, and one node per
// token), all to one remote node, own node only, every token on every node, a node that receives
// nothing, a rank with zero tokens; BF16 and FP8 (scales); host counts; cached dispatch
// (topkIdx = NULL, new x) with combine weights other than the dispatch's; dispatch -> dispatch
// without a combine (also back to back, no host sync); graph replay of dispatch + combine on an
// existing handle with new routing and data. Outputs are poisoned before each checked call
// (runAndCheck poisons the previous dispatch's outputs; the first dispatch of a context reveals
// them). Every test runs on 2 ranks and on 4 where present. The NIC bytes: ht_net_bytes_test.cc;
// bitwise equality across topologies: ht_topology_test.cc.
#include <string.h>
#include <unistd.h>

#include <memory>

#include "ht_net_util.h"

namespace moe_gpu {
namespace {

class HtNet : public GpuTest {};

RunOpts opts(bool weighted, unsigned flags = 0) {
  RunOpts o;
  o.combineWeighted = weighted;
  o.flags = flags;
  return o;
}

Shape shapeOf(int hidden, int experts, ncclMoeDtype_t dtype, int topK = 8) {
  Shape s = htShape(hidden, experts, dtype);
  s.topK = topK;
  return s;
}

// --- routings (each scenario: two dispatch + combine on one context, the second with new
//     routing and data on the reused handle, outputs poisoned) ---------------------------------

TEST_F(HtNet, RandomWithDropsBf16Weighted) {
  GenSpec g = netSpec(1301, Route::Random);
  g.dropProb = 0.25;
  runScenario(shapeOf(7168, 32, ncclMoeBf16), g, opts(true));
}

TEST_F(HtNet, RandomWithDropsFp8Unweighted) {
  GenSpec g = netSpec(1302, Route::Random);
  g.dropProb = 0.25;
  runScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), g, opts(false));
}

TEST_F(HtNet, NodeLimitedTwoNodesBf16) {
  runScenario(shapeOf(2048, 256, ncclMoeBf16), netSpec(1303, Route::NodeLimited, 2), opts(true));
}

TEST_F(HtNet, NodeLimitedOneNodePerTokenFp8) {
  runScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), netSpec(1304, Route::NodeLimited, 1), opts(true));
}

TEST_F(HtNet, AllToOneRemoteNodeBf16) {
  runScenario(shapeOf(7168, 32, ncclMoeBf16), netSpec(1305, Route::RemoteNode), opts(true));
}

TEST_F(HtNet, AllToOneRemoteNodeFp8Unweighted) {
  runScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), netSpec(1306, Route::RemoteNode), opts(false));
}

TEST_F(HtNet, OwnNodeOnlyBf16) {  // the bytes (counts rows only): HtNetBytes.OwnNodeOnly*
  runScenario(shapeOf(2048, 32, ncclMoeBf16), netSpec(1307, Route::OwnNode), opts(true));
}

TEST_F(HtNet, EveryTokenOnEveryNodeFp8) {
  GenSpec g = netSpec(1308, Route::EveryNode);
  g.dropProb = 0.0;
  runScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), g, opts(true));
}

TEST_F(HtNet, EveryTokenOnEveryNodeBf16Unweighted) {
  runScenario(shapeOf(7168, 32, ncclMoeBf16), netSpec(1309, Route::EveryNode), opts(false));
}

TEST_F(HtNet, NodeReceivesNothingBf16) {
  runScenario(shapeOf(2048, 32, ncclMoeBf16), netSpec(1310, Route::AvoidLastNode), opts(true));
}

TEST_F(HtNet, NodeReceivesNothingFp8) {
  runScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), netSpec(1311, Route::AvoidLastNode), opts(false));
}

// The last rank (on the last node) sends nothing; rank 0 (first node) too, in the second test.
TEST_F(HtNet, RankWithZeroTokensBf16) {
  GenSpec g = netSpec(1312, Route::Random);
  g.zeroTokenRank = nRanks() - 1;
  runScenario(shapeOf(7168, 32, ncclMoeBf16), g, opts(true));
}

TEST_F(HtNet, RankWithZeroTokensFp8NodeLimited) {
  GenSpec g = netSpec(1313, Route::NodeLimited, 2);
  g.zeroTokenRank = 0;
  runScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), g, opts(true));
}

TEST_F(HtNet, OneTokenPerRankEveryNode) {
  Shape s = shapeOf(2048, 32, ncclMoeBf16);
  s.maxTokens = 1;
  runScenario(s, netSpec(1314, Route::EveryNode), opts(true));
}

TEST_F(HtNet, TopK1RemoteNode) {
  runScenario(shapeOf(2048, 32, ncclMoeBf16, 1), netSpec(1315, Route::RemoteNode), opts(true));
}

TEST_F(HtNet, HostCountsBf16NodeLimited) {
  runScenario(shapeOf(2048, 64, ncclMoeBf16), netSpec(1316, Route::NodeLimited, 2),
              opts(true, NCCL_MOE_DISPATCH_HOST_COUNTS));
}

TEST_F(HtNet, HostCountsFp8Random) {
  runScenario(shapeOf(7168, 32, ncclMoeFp8E4m3), netSpec(1317, Route::Random),
              opts(false, NCCL_MOE_DISPATCH_HOST_COUNTS));
}

// --- combine weights, cached dispatch ---------------------------------------------------------

// Which ranks pass their combine weights in one pass of combineWeightPasses (the others: NULL).
enum class WeightedRanks { All, None, Even, Odd };

// Dispatch of routing g with its own weights, then combines of that dispatch, one per pass, with
// other weights (otherWeights(seed + 1): the source's [T][K] given to ncclMoeCombine are the ones
// that count) on the ranks the pass names, unweighted on the others; each checked.
void combineWeightPasses(const GenSpec& g, uint64_t seed, const std::string& what,
                         std::initializer_list<std::pair<WeightedRanks, const char*>> passes) {
  const Shape s = shapeOf(2048, 64, ncclMoeBf16);
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  Problem p = makeProblem(s, g);
  Reference ref = makeReference(p);
  DeviceInputs in;
  DevMem cw((size_t)s.maxTokens * s.topK * sizeof(float));
  const std::vector<std::vector<float>> w = otherWeights(p, seed + 1);
  MOE_AGREE_OR_RETURN(in.upload(p) && upload(cw.get(), w[me].data(), w[me].size() * sizeof(float)), "upload inputs");
  const std::string tag = s.str() + " " + topologyStr() + " [" + what + "]";
  RunOpts o = opts(true);
  o.combine = false;
  if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
  for (const auto& [ranks, suffix] : passes) {
    const bool weighted = ranks == WeightedRanks::All || (ranks == WeightedRanks::Even && me % 2 == 0) ||
                          (ranks == WeightedRanks::Odd && me % 2 == 1);
    if (!combineAndCheck(ep, p, ref, weighted ? cw.as<float>() : nullptr, w, tag + suffix)) return;
  }
}

// Combine with other weights than the dispatch's, then unweighted on the same dispatch.
TEST_F(HtNet, CombineWeightsOtherThanDispatchs) {
  combineWeightPasses(netSpec(1320, Route::NodeLimited, 2), 1320, "combine weights other than the dispatch's",
                      {{WeightedRanks::All, ""}, {WeightedRanks::None, " [again, unweighted]"}});
}

// Even ranks combine with weights, odd ranks without, then swapped: each source's weights decide
// its own tokens. Across nodes an unweighted rank sums its first chunk of a weighted source's
// records with weight 1 before the weights land, and must sum it again.
TEST_F(HtNet, WeightedAndUnweightedRanksInOneCombine) {
  combineWeightPasses(netSpec(1325, Route::Random), 1325, "weighted on even ranks, unweighted on odd",
                      {{WeightedRanks::Even, ""}, {WeightedRanks::Odd, " [swapped]"}});
}

// A dispatch with routing, then twice topkIdx = NULL with new x (the device topkIdx buffer then
// holds invalid ids, so reading it would show) and no dispatch weights; the combines take weights
// other than the routing's (first) or none (second).
void cachedScenario(const Shape& s, const GenSpec& g) {
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  Problem p = makeProblem(s, g);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  {
    Reference ref = makeReference(p);
    const std::string tag = s.str() + " " + topologyStr() + " [dispatch with routing]";
    if (!runAndCheck(ep, in, p, ref, opts(true), tag.c_str())) return;
  }
  const size_t idxCount = (size_t)p.tokens(me) * s.topK;
  const std::vector<int64_t> invalid(idxCount, (int64_t)s.numExperts() + 5);
  DevMem cw((size_t)s.maxTokens * s.topK * sizeof(float));
  for (int round = 0; round < 2; round++) {
    regenerateX(p, g.seed + 17 + round);
    Reference ref = makeReference(p);
    const std::vector<std::vector<float>> w = otherWeights(p, g.seed + 31 + round);
    bool ok = in.upload(p);
    ok = ok && upload(in.topkIdx.get(), invalid.data(), idxCount * sizeof(int64_t));
    ok = ok && upload(cw.get(), w[me].data(), w[me].size() * sizeof(float));
    MOE_AGREE_OR_RETURN(ok, "upload new data");
    RunOpts o = opts(false);
    o.reuseRouting = true;
    o.dispatchWeights = false;
    o.combine = false;
    const std::string tag = s.str() + " " + topologyStr() + " [cached dispatch " + std::to_string(round + 1) +
                            ", topkIdx NULL, new x]";
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
    if (!combineAndCheck(ep, p, ref, round == 0 ? cw.as<float>() : nullptr, round == 0 ? w : std::vector<std::vector<float>>(),
                         tag))
      return;
  }
}

TEST_F(HtNet, CachedDispatchBf16) { cachedScenario(shapeOf(7168, 32, ncclMoeBf16), netSpec(1330, Route::Random)); }

TEST_F(HtNet, CachedDispatchFp8NodeLimited) {
  cachedScenario(shapeOf(2048, 64, ncclMoeFp8E4m3), netSpec(1331, Route::NodeLimited, 2));
}

TEST_F(HtNet, CachedDispatchEveryNode) {
  cachedScenario(shapeOf(2048, 32, ncclMoeBf16), netSpec(1332, Route::EveryNode));
}

// --- dispatch -> dispatch without combine -----------------------------------------------------

// Two dispatches with new routing and data and no combine (host-synchronised, each checked), then
// two more enqueued back to back without host synchronisation, the ranks skewed by a few ms of
// host sleep: the second must not be corrupted by the first (landing rows reused before every
// forwarder finished, late stores of the first). Its outputs and a combine after it are checked.
void dispatchTwice(const Shape& s, uint64_t seed) {
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  const bool fp8 = s.dtype != ncclMoeBf16;
  DeviceInputs in;
  for (int round = 0; round < 2; round++) {
    Problem p = makeProblem(s, netSpec(seed + round, round ? Route::NodeLimited : Route::Random));
    Reference ref = makeReference(p);
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    RunOpts o = opts(true);
    o.combine = false;
    const std::string tag = s.str() + " " + topologyStr() + " [dispatch " + std::to_string(round + 1) + ", no combine]";
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
  }
  Problem a = makeProblem(s, netSpec(seed + 10, Route::EveryNode));
  Problem b = makeProblem(s, netSpec(seed + 11, Route::RemoteNode));
  DeviceInputs inA, inB;
  bool ok = inA.upload(a) && inB.upload(b) && poisonDispatchOutput(ep.lastOut, s);
  MOE_AGREE_OR_RETURN(ok, "upload inputs, poison");
  ncclMoeDispatchOutput_t out;
  memset(&out, 0, sizeof(out));
  usleep(3000 * (me % 3));
  ok = MOE_OK(ncclMoeDispatch(ep.comm, inA.x.get(), fp8 ? inA.scales.as<float>() : nullptr, inA.topkIdx.as<int64_t>(),
                              inA.weights.as<float>(), a.tokens(me), 0, &ep.handle, &out, stream()));
  usleep(2000 * ((me + 1) % 2));
  ok = ok && MOE_OK(ncclMoeDispatch(ep.comm, inB.x.get(), fp8 ? inB.scales.as<float>() : nullptr,
                                    inB.topkIdx.as<int64_t>(), inB.weights.as<float>(), b.tokens(me), 0, &ep.handle,
                                    &out, stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "back-to-back dispatches");
  ep.lastOut = out;
  ep.haveOut = true;
  const std::string tag = s.str() + " " + topologyStr() + " [second of two back-to-back dispatches]";
  Reference ref = makeReference(b);
  DispatchChecks dc;
  agreeMismatches(checkDispatch(out, b, ref.recv[me], dc, tag.c_str()), (tag + ": dispatch output").c_str());
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
  combineAndCheck(ep, b, ref, inB.weights.as<float>(), {}, tag + " [combine]");
}

TEST_F(HtNet, DispatchTwiceWithoutCombineBf16) { dispatchTwice(shapeOf(7168, 32, ncclMoeBf16), 1340); }

TEST_F(HtNet, DispatchTwiceWithoutCombineFp8) { dispatchTwice(shapeOf(2048, 64, ncclMoeFp8E4m3), 1350); }

// --- graphs ---------------------------------------------------------------------------------------

// A handle from one eager dispatch + combine; then dispatch (with topkIdx, no host counts) and
// combine captured on it (FP8: with a captured device copy of the expert output into
// out.combineInput between them, from a buffer the host fills before each replay), replayed
// `replays` times with new routing (random, node-limited, all to a remote node in turn; the same
// token counts) and data, outputs poisoned before each replay, every replay checked; then an
// eager dispatch + combine on the same handle.
void graphReplay(const Shape& s, uint64_t seed, bool weighted, int replays) {
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  const bool fp8 = s.dtype != ncclMoeBf16;
  Problem p = makeProblem(s, netSpec(seed, Route::Random));
  const int T = p.tokens(me);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  RunOpts eager = opts(weighted);
  {
    Reference ref = makeReference(p);
    const std::string tag = s.str() + " " + topologyStr() + " [eager dispatch creating the handle]";
    if (!runAndCheck(ep, in, p, ref, eager, tag.c_str())) return;
  }
  const size_t expertBytes = (size_t)s.capacity() * s.hidden * 2;
  DevMem combOut((size_t)s.maxTokens * s.hidden * 2), staging(expertBytes);
  OwnedGraph g;
  ncclMoeDispatchOutput_t out;
  memset(&out, 0, sizeof(out));
  bool ok = combOut.get() != nullptr && staging.get() != nullptr;
  ok = ok && CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  if (ok) {
    bool captured = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), fp8 ? in.scales.as<float>() : nullptr,
                                           in.topkIdx.as<int64_t>(), in.weights.as<float>(), T, 0, &ep.handle, &out,
                                           stream()));
    const void* expert = out.x;
    if (captured && fp8) {
      expert = out.combineInput;
      captured = out.combineInput != nullptr &&
                 CUDA_OK(cudaMemcpyAsync(out.combineInput, staging.get(), expertBytes, cudaMemcpyDeviceToDevice, stream()));
    }
    if (captured)
      captured = MOE_OK(ncclMoeCombine(ep.comm, ep.handle, expert, weighted ? in.weights.as<float>() : nullptr,
                                       combOut.get(), stream()));
    ok = CUDA_OK(cudaStreamEndCapture(stream(), &g.graph)) && captured;
  }
  if (ok) ok = CUDA_OK(cudaGraphInstantiate(&g.exec, g.graph, 0));
  MOE_AGREE_OR_RETURN(ok, "graph capture");
  ep.lastOut = out;
  ep.haveOut = true;
  const Route routes[] = {Route::Random, Route::NodeLimited, Route::RemoteNode};
  for (int replay = 0; replay < replays; replay++) {
    const std::string tag = s.str() + " " + topologyStr() + " [graph replay " + std::to_string(replay + 1) + "]";
    const Problem q = makeProblem(s, netSpec(seed + 1 + replay, routes[replay % 3]));
    if (!replayGraphAndCheck(ep, g, in, out, q, fp8 ? staging.get() : nullptr, &combOut, weighted, tag)) return;
  }
  Problem q = makeProblem(s, netSpec(seed + 1000, Route::EveryNode));
  Reference ref = makeReference(q);
  MOE_AGREE_OR_RETURN(in.upload(q), "upload inputs");
  runAndCheck(ep, in, q, ref, eager, (s.str() + " " + topologyStr() + " [eager dispatch after replays]").c_str());
}

TEST_F(HtNet, GraphReplayBf16Weighted) { graphReplay(shapeOf(2048, 32, ncclMoeBf16), 1400, true, 24); }

TEST_F(HtNet, GraphReplayFp8Unweighted) { graphReplay(shapeOf(2048, 64, ncclMoeFp8E4m3), 1500, false, 20); }

}  // namespace
}  // namespace moe_gpu
