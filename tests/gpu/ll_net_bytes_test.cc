// Issue 12 item 5: across (fake) nodes, the bytes each NIC carried in low-latency operations are
// exactly what the design puts on it (testing/ll_net_model.h: one record per (token, remote
// rank), one counts row per remote rank, one BF16 partial per record back), read from the
// moeloop plugin's per-peer counters around each exact dispatch + combine; nothing goes through
// GIN to ranks of the own node. Runs on several nodes through plugin/ (make llnettest); skipped
// on one node or with another NET plugin.
#include <dlfcn.h>
#include <nccl_device.h>

#include <string>
#include <vector>

#include "ll_test_util.h"
#include "plugin_bytes.h"
#include "../../testing/ll_net_model.h"

namespace moe_gpu {
namespace {

class LlNetBytes : public GpuTest {};


void countersScenario(const LlShape& s, uint64_t seed, bool split) {
  const int G = ncclTeamLsa(comm()).nRanks, me = rank();
  if (G <= 0 || G >= nRanks()) GTEST_SKIP() << "one node: no rank is behind a NIC";
  void* plugin = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_NOLOAD);
  moeloopGetPeerStats_t peerStats =
      plugin ? (moeloopGetPeerStats_t)dlsym(plugin, "moeloopGetPeerStats") : nullptr;
  if (peerStats == nullptr) GTEST_SKIP() << "the moeloop plugin is not loaded: no counters to read";
  LlEp ep(s);
  if (!ep.create()) return;
  LlInputs in;
  moe_net::LlNetShape ns;
  ns.nRanks = nRanks();
  ns.gpusPerNode = G;
  ns.numExperts = s.numExperts();
  ns.hidden = s.hidden;
  ns.topK = s.topK;
  ns.fp8 = s.fp8;
  ns.scaleBytes = s.scaleBytes();
  for (int round = 0; round < 3; round++) {
    LlProblem p = makeLlProblem(s, spec(seed + 1000003ull * round, round == 2 ? Route::RankZeroOnly : Route::Random));
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    const std::vector<double> before = bytesSent(peerStats);
    LlRunOpts o;
    o.split = split;
    const std::string tag = s.str() + " NIC bytes [round " + std::to_string(round + 1) + "]";
    if (!llRunAndCheck(ep, in, p, o, tag)) return;
    const std::vector<double> after = bytesSent(peerStats);
    const moe_net::LlNetTraffic t = moe_net::llNetTraffic(ns, p.routing, me);
    double remote = 0;
    long bad = 0;
    for (int r = 0; r < nRanks(); r++) {
      const double d = after[r] - before[r];
      if (r / G == me / G) {
        if (d != 0) {
          ADD_FAILURE() << tag << ": rank " << me << " sent " << d << " GIN bytes to rank " << r << " of its own node";
          bad++;
        }
      } else {
        remote += d;
      }
    }
    const double want = t.dispatchOut + t.combineOut;
    if (remote != want) {
      ADD_FAILURE() << tag << ": rank " << me << "'s NIC sent " << remote << " bytes, the design says " << want
                    << " (dispatch " << t.dispatchOut << ", combine " << t.combineOut << ")";
      bad++;
    }
    agreeMismatches(bad, (tag + ": plugin counters").c_str());
  }
}

TEST_F(LlNetBytes, Bf16OneShot) { countersScenario(LlShape(), 1701, false); }

TEST_F(LlNetBytes, Fp8Ue8m0Split) {
  LlShape s;
  s.fp8 = true;
  s.fmt = ncclMoeScaleUe8m0;
  countersScenario(s, 1702, true);
}

}  // namespace
}  // namespace moe_gpu
