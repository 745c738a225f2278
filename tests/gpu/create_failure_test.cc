// Issue 10 item 6 on GPUs: a creation that fails on one rank fails on every rank, promptly and
// with one message (no rank is left waiting in a collective), and the communicator still
// creates a good EP context afterwards. Across fake nodes: high-throughput mode is refused.
#include <stdint.h>
#include <stdio.h>

#include <string>

#include "gpu_env.h"
#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class GpuCreateFailure : public GpuTest {};

// 32-bit FNV-1a of the message, exact in a double: equal min and max over ranks = same text.
double messageHash(const std::string& m) {
  uint32_t h = 2166136261u;
  for (unsigned char ch : m) h = (h ^ ch) * 16777619u;
  return (double)h;
}

// Creates with `cfg` on this rank (each rank may pass a different one) and expects every rank
// to fail with `code` and the same message, which contains `needle`.
void expectCollectiveFailure(ncclMoeConfig_t cfg, ncclResult_t code, const std::string& needle, const char* what) {
  ncclMoeComm_t c = nullptr;
  const ncclResult_t res = ncclMoeCommCreate(comm(), &cfg, &c);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(res, code) << what << ": rank " << rank() << ": " << msg;
  EXPECT_EQ(c, nullptr);
  EXPECT_NE(msg.find(needle), std::string::npos) << what << ": \"" << msg << "\" lacks \"" << needle << "\"";
  const double h = messageHash(msg);
  EXPECT_EQ(moe_ranks::minOverRanks(h), moe_ranks::maxOverRanks(h))
      << what << ": ranks failed with different messages; this rank's: " << msg;
  if (rank() == 0) printf("[   INFO   ] %s: %d \"%s\"\n", what, (int)res, msg.c_str());
  if (c) ncclMoeCommDestroy(c);  // collective: reached by every rank only if every rank succeeded
}

TEST_F(GpuCreateFailure, BadConfigOnOneRankFailsOnEveryRankWithOneMessage) {
  ncclMoeConfig_t cfg = makeConfig(smallShape());
  const int bad = nRanks() - 1;
  if (rank() == bad) cfg.hidden = 12;
  expectCollectiveFailure(cfg, ncclInvalidArgument, "rank " + std::to_string(bad) + ": config.hidden = 12",
                          "bad hidden on the last rank");
}

TEST_F(GpuCreateFailure, UnknownVersionOnOneRankFailsOnEveryRank) {
  ncclMoeConfig_t cfg = makeConfig(smallShape());
  if (rank() == 0) cfg.version = NCCL_MOE_VERSION_CODE + 10000;
  expectCollectiveFailure(cfg, ncclInvalidArgument, "rank 0: config.version", "unknown version on rank 0");
}

TEST_F(GpuCreateFailure, DifferentConfigsFailOnEveryRankWithOneMessage) {
  ncclMoeConfig_t cfg = makeConfig(smallShape());
  const int odd = nRanks() - 1;
  if (rank() == odd) cfg.numSms -= 1;
  expectCollectiveFailure(cfg, ncclInvalidArgument, "rank " + std::to_string(odd) + " passed config.numSms",
                          "numSms differs on the last rank");
}

// The last rank calls with another CUDA device current; it still takes part in the vote (on
// comm's device) and every rank fails. Needs a second visible device.
TEST_F(GpuCreateFailure, WrongDeviceOnOneRankFailsOnEveryRank) {
  int devices = 0, mine = 0;
  bool ok = CUDA_OK(cudaGetDeviceCount(&devices)) && CUDA_OK(cudaGetDevice(&mine));
  MOE_AGREE_OR_RETURN(ok, "device count");
  if (moe_ranks::minOverRanks(devices) < 2) GTEST_SKIP() << "needs two visible devices per rank";
  ncclMoeConfig_t cfg = makeConfig(smallShape());
  const int odd = nRanks() - 1;
  if (rank() == odd) ok = CUDA_OK(cudaSetDevice((mine + 1) % devices));
  MOE_AGREE_OR_RETURN(ok, "set another device");
  expectCollectiveFailure(cfg, ncclInvalidUsage, "rank " + std::to_string(odd) + ": current CUDA device",
                          "wrong current device on the last rank");
  int now = -1;
  ok = CUDA_OK(cudaGetDevice(&now));
  EXPECT_EQ(now, rank() == odd ? (mine + 1) % devices : mine) << "create changed the current device";
  ok = CUDA_OK(cudaSetDevice(mine)) && ok;
  allRanksOk(ok, "restore device");
}

// After the failures above the communicator is intact: a valid context works end to end.
TEST_F(GpuCreateFailure, ContextWorksAfterFailedCreates) {
  ncclMoeConfig_t cfg = makeConfig(smallShape());
  cfg.hidden = 12;
  ncclMoeComm_t c = nullptr;
  EXPECT_NE(ncclMoeCommCreate(comm(), &cfg, &c), ncclSuccess);  // every rank fails together
  if (moe_ranks::fakeNodes() > 1) {  // high-throughput mode is refused across nodes
    llScenario(LlShape(), spec(901), LlRunOpts(), 1);
    return;
  }
  RunOpts o;
  runScenario(smallShape(), spec(901), o);
}

// Across nodes (MOE_FAKE_NODES) a high-throughput context is created on every rank (its GIN
// handshake included) and destroyed, and the communicator then still creates a working
// low-latency context.
TEST_F(GpuCreateFailure, HighThroughputAcrossNodesCreates) {
  if (moe_ranks::fakeNodes() < 2) GTEST_SKIP() << "needs ranks on several nodes (MOE_FAKE_NODES, make llnettest)";
  ncclMoeConfig_t cfg = makeConfig(smallShape());
  ncclMoeComm_t moe = nullptr;
  ASSERT_EQ(ncclMoeCommCreate(comm(), &cfg, &moe), ncclSuccess) << ncclMoeGetLastError();
  int nodes = 0;
  EXPECT_EQ(ncclMoeCommNodeCount(moe, &nodes), ncclSuccess);
  EXPECT_EQ(nodes, moe_ranks::fakeNodes());
  EXPECT_EQ(ncclMoeCommDestroy(moe), ncclSuccess) << ncclMoeGetLastError();
  llScenario(LlShape(), spec(1733), LlRunOpts(), 1);
}

}  // namespace
}  // namespace moe_gpu
