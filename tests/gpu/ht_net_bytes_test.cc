// Issue 13: across (fake) nodes, the bytes each NIC carries in high-throughput operations are
// exactly what the design puts on it (testing/ht_net_model.h, htNetTraffic's per-peer bytes):
// in a dispatch, to the rail peer (same local index) on each remote node B, one record per own
// token with an expert on B plus one counts row; in a combine, one BF16 partial per record that
// landed here back to its source, plus, when combine is given weights, G FP32 weights per record
// sent. Nothing goes through GIN to ranks of the own node or to other local indices. Read from
// the moeloop plugin's per-peer counters (plugin/moeloop_stats.h) before and after one dispatch
// and after its combine, for several routings, each twice on one context (the second time with
// new routing on the reused handle); every output is also checked (runAndCheck,
// combineAndCheck). Runs on several nodes through plugin/ (make htnettest); skipped with a
// message on one node or with another NET plugin.
#include <dlfcn.h>

#include <string>
#include <vector>

#include "ht_net_util.h"
#include "plugin_bytes.h"
#include "../../testing/ht_net_model.h"

namespace moe_gpu {
namespace {

class HtNetBytes : public GpuTest {};


// Per peer, after - before against `want`; returns the mismatches (each reported).
long comparePerPeer(const std::vector<double>& before, const std::vector<double>& after,
                    const std::vector<double>& want, const std::string& what) {
  long bad = 0;
  const int me = rank(), G = gpusPerNode();
  for (int r = 0; r < nRanks(); r++) {
    const double got = after[r] - before[r];
    if (got == want[r]) continue;
    ADD_FAILURE() << what << ": rank " << me << " sent " << got << " GIN bytes to rank " << r << " ("
                  << (r / G == me / G ? "own node" : r % G == me % G ? "its rail peer" : "not its rail peer")
                  << "), the design says " << want[r];
    bad++;
  }
  return bad;
}

// Routing kinds, dtype, combine weights; each round `route`, the second round `route2`.
void bytesScenario(const Shape& s, uint64_t seed, Route route, Route route2, bool weighted, int zeroTokenRank = -1) {
  if (nodeCount() <= 1) GTEST_SKIP() << "one node (MOE_FAKE_NODES unset): no rank is behind a NIC";
  void* plugin = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_NOLOAD);
  moeloopGetPeerStats_t peerStats = plugin ? (moeloopGetPeerStats_t)dlsym(plugin, "moeloopGetPeerStats") : nullptr;
  if (peerStats == nullptr) GTEST_SKIP() << "the moeloop plugin is not loaded: no counters to read";
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  moe_net::HtNetShape ns;
  ns.nRanks = nRanks();
  ns.gpusPerNode = gpusPerNode();
  ns.numExperts = s.numExperts();
  ns.hidden = s.hidden;
  ns.topK = s.topK;
  ns.fp8 = s.dtype != ncclMoeBf16;
  DeviceInputs in;
  for (int round = 0; round < 2; round++) {
    GenSpec g = netSpec(seed + 1000003ull * round, round ? route2 : route);
    g.zeroTokenRank = zeroTokenRank;
    Problem p = makeProblem(s, g);
    Reference ref = makeReference(p);
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    const std::string tag = s.str() + " " + topologyStr() + " NIC bytes [round " + std::to_string(round + 1) + "]";
    const moe_net::HtNetTraffic t = moe_net::htNetTraffic(ns, p.routing, me);
    const std::vector<double> before = bytesSent(peerStats);
    RunOpts o;
    o.combine = false;
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
    const std::vector<double> mid = bytesSent(peerStats);
    if (!combineAndCheck(ep, p, ref, weighted ? in.weights.as<float>() : nullptr, {}, tag)) return;
    const std::vector<double> after = bytesSent(peerStats);
    long bad = comparePerPeer(before, mid, t.dispatchOutTo, tag + " dispatch (" + std::to_string(t.recordsOut) +
                                                               " records of " + std::to_string(moe_net::htRecordBytes(ns)) +
                                                               " bytes, counts rows of " +
                                                               std::to_string(moe_net::htCountsRowBytes(ns)) + ")");
    bad += comparePerPeer(mid, after, t.combineOutTo, tag + (weighted ? " weighted" : " unweighted") + " combine (" +
                                                          std::to_string(t.recordsIn) + " partials back)");
    agreeMismatches(bad, (tag + ": plugin counters").c_str());
  }
}

TEST_F(HtNetBytes, RandomBf16Weighted) {
  bytesScenario(htShape(7168, 32, ncclMoeBf16), 1601, Route::Random, Route::NodeLimited, true);
}

TEST_F(HtNetBytes, RandomFp8Unweighted) {
  bytesScenario(htShape(2048, 64, ncclMoeFp8E4m3), 1602, Route::Random, Route::EveryNode, false);
}

// Own node only: a dispatch sends one counts row to each remote rail peer and nothing else; the
// combine sends nothing at all (weighted or not: no record crossed).
TEST_F(HtNetBytes, OwnNodeOnlyCountsRowsOnlyWeighted) {
  bytesScenario(htShape(2048, 32, ncclMoeBf16), 1603, Route::OwnNode, Route::OwnNode, true);
}

TEST_F(HtNetBytes, OwnNodeOnlyCountsRowsOnlyFp8) {
  bytesScenario(htShape(2048, 64, ncclMoeFp8E4m3), 1604, Route::OwnNode, Route::OwnNode, false);
}

TEST_F(HtNetBytes, AllToOneRemoteNodeWeighted) {
  bytesScenario(htShape(2048, 32, ncclMoeBf16), 1605, Route::RemoteNode, Route::AvoidLastNode, true);
}

TEST_F(HtNetBytes, ZeroTokenRankEveryNode) {
  bytesScenario(htShape(2048, 32, ncclMoeBf16), 1606, Route::EveryNode, Route::Random, true, 1);
}

}  // namespace
}  // namespace moe_gpu
