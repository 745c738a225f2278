// Tests of the configuration rules, the EP window layout and the dispatch argument checks
// (src/config.h). Every rejected value must give ncclInvalidArgument and a last-error message
// that names the field and the value at fault.
#include <ctype.h>
#include <gtest/gtest.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "error_message_match.h"

#include "config.h"
#include "config_fixture.h"
#include "nccl_moe.h"

using namespace nccl_moe;

namespace {

using config_fixture::goodConfig;
using config_fixture::kRanks;
using config_fixture::kSms;

// Validates `c` and expects a rejection whose message names `field` and the value `v`.
void expectRejected(const ncclMoeConfig_t& c, const char* field, long long v, int nRanks = kRanks,
                    int sms = kSms) {
  ncclMoeConfig_t resolved;
  ncclResult_t res = validateConfig(&c, nRanks, sms, &resolved);
  std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(res, ncclInvalidArgument) << field << " = " << v;
  EXPECT_TRUE(containsWord(msg, field)) << "message \"" << msg << "\" lacks " << field;
  EXPECT_TRUE(containsNumber(msg, v)) << "message \"" << msg << "\" lacks value " << v;
}

}  // namespace

// --- validateConfig --------------------------------------------------------------------------

TEST(ConfigValidate, GoodConfigFillsDefaults) {
  ncclMoeConfig_t c = goodConfig(), r;
  memset(&r, 0xab, sizeof(r));
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(r.outputCapacity, kRanks * 4096);
  EXPECT_EQ(r.timeoutMs, kDefaultTimeoutMs);
  EXPECT_EQ(r.numExperts, 64);
  EXPECT_EQ(r.hidden, 7168);
  EXPECT_EQ(r.topK, 8);
  EXPECT_EQ(r.maxTokensPerRank, 4096);
  EXPECT_EQ(r.numSms, 24);
  EXPECT_EQ(r.mode, ncclMoeHighThroughput);
  EXPECT_EQ(r.dispatchDtype, ncclMoeBf16);
  EXPECT_EQ(c.outputCapacity, 0);  // the input is left alone
}

TEST(ConfigValidate, ExplicitValuesKept) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.outputCapacity = 1000;
  c.timeoutMs = 5;
  c.dispatchDtype = ncclMoeFp8E4m3;
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(r.outputCapacity, 1000);
  EXPECT_EQ(r.timeoutMs, 5);
  EXPECT_EQ(r.dispatchDtype, ncclMoeFp8E4m3);
}

TEST(ConfigValidate, BoundaryValuesAccepted) {
  ncclMoeConfig_t r;
  ncclMoeConfig_t c = goodConfig();
  c.numExperts = 4; c.topK = 4; c.hidden = 8; c.maxTokensPerRank = 1; c.numSms = 1;
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  c = goodConfig();
  c.topK = kMaxTopK; c.numSms = kSms;
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  c = goodConfig();
  c.numExperts = 3;  // one rank: any expert count
  c.topK = 2;
  EXPECT_EQ(validateConfig(&c, 1, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
}

TEST(ConfigValidate, NullConfig) {
  ncclMoeConfig_t r;
  EXPECT_EQ(validateConfig(nullptr, kRanks, kSms, &r), ncclInvalidArgument);
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "config")) << ncclMoeGetLastError();
}

TEST(ConfigValidate, SizeAndMagic) {
  ncclMoeConfig_t c = goodConfig();
  c.size = sizeof(ncclMoeConfig_t) - 4;
  expectRejected(c, "size", (long long)sizeof(ncclMoeConfig_t) - 4);
  c = goodConfig();
  c.size = 0;
  expectRejected(c, "size", 0);
  c = goodConfig();
  c.magic = 0x12345678u;
  ncclMoeConfig_t r;
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclInvalidArgument);
  std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsWord(msg, "magic")) << msg;
  EXPECT_TRUE(msg.find("12345678") != std::string::npos || containsNumber(msg, 0x12345678)) << msg;
}

TEST(ConfigValidate, NumExperts) {
  ncclMoeConfig_t c = goodConfig();
  c.numExperts = 0; c.topK = 1;
  expectRejected(c, "numExperts", 0);
  c.numExperts = -8;
  expectRejected(c, "numExperts", -8);
  c = goodConfig();
  c.numExperts = 66;  // not divisible by 4 ranks
  expectRejected(c, "numExperts", 66);
  c.numExperts = 6;
  c.topK = 2;
  expectRejected(c, "numExperts", 6);
}

TEST(ConfigValidate, Hidden) {
  ncclMoeConfig_t c = goodConfig();
  for (int h : {0, -128, 100, 7170}) {
    c.hidden = h;
    expectRejected(c, "hidden", h);
  }
  c = goodConfig();
  c.dispatchDtype = ncclMoeFp8E4m3;
  c.hidden = 136;  // fine for BF16, not for FP8
  expectRejected(c, "hidden", 136);
  c.dispatchDtype = ncclMoeBf16;
  ncclMoeConfig_t r;
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
}

TEST(ConfigValidate, TopK) {
  ncclMoeConfig_t c = goodConfig();
  for (int k : {0, -1, kMaxTopK + 1, 100}) {
    c.topK = k;
    expectRejected(c, "topK", k);
  }
  c.numExperts = 4;  // topK > numExperts
  c.topK = 5;
  expectRejected(c, "topK", 5);
}

TEST(ConfigValidate, MaxTokensPerRank) {
  ncclMoeConfig_t c = goodConfig();
  for (int t : {0, -5}) {
    c.maxTokensPerRank = t;
    expectRejected(c, "maxTokensPerRank", t);
  }
  c.maxTokensPerRank = 1 << 29;  // times 4 ranks: too many rows to index with int
  expectRejected(c, "maxTokensPerRank", 1 << 29);
}

TEST(ConfigValidate, NumSms) {
  ncclMoeConfig_t c = goodConfig();
  for (int s : {0, -1, kSms + 1, 1000}) {
    c.numSms = s;
    expectRejected(c, "numSms", s);
  }
  c.numSms = 100;  // fine on 132 SMs, too many on 78
  expectRejected(c, "numSms", 100, kRanks, 78);
}

TEST(ConfigValidate, OutputCapacityAndTimeout) {
  ncclMoeConfig_t c = goodConfig();
  c.outputCapacity = -1;
  expectRejected(c, "outputCapacity", -1);
  c = goodConfig();
  c.timeoutMs = -10;
  expectRejected(c, "timeoutMs", -10);
}

TEST(ConfigValidate, ModeAndDtypeValues) {
  ncclMoeConfig_t c = goodConfig();
  c.mode = (ncclMoeMode_t)7;
  expectRejected(c, "mode", 7);
  c = goodConfig();
  c.dispatchDtype = (ncclMoeDtype_t)5;
  expectRejected(c, "dispatchDtype", 5);
  c.dispatchDtype = (ncclMoeDtype_t)-1;
  expectRejected(c, "dispatchDtype", -1);
}

TEST(ConfigValidate, LowLatencyOptions) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.mode = ncclMoeLowLatency;
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(r.numBufferSlots, 2);
  c.numBufferSlots = 9;
  expectRejected(c, "numBufferSlots", 9);
  c.numBufferSlots = -1;
  expectRejected(c, "numBufferSlots", -1);
  c.numBufferSlots = 3;
  c.fp8Scales = (ncclMoeScaleFormat_t)3;
  expectRejected(c, "fp8Scales", 3);
  // UE8M0 packs four groups per int32: FP8 and hidden % 512 == 0.
  c.fp8Scales = ncclMoeScaleUe8m0;
  c.dispatchDtype = ncclMoeFp8E4m3;
  c.hidden = 384;
  expectRejected(c, "hidden", 384);
  c.hidden = 7168;
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
}

TEST(WindowLayout, LowLatencySlots) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.mode = ncclMoeLowLatency;
  c.dispatchDtype = ncclMoeFp8E4m3;
  c.numBufferSlots = 3;
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  WindowLayout w;
  ASSERT_EQ(computeWindowLayout(r, kRanks, &w), ncclSuccess);
  const size_t L = r.numExperts / kRanks, B = (size_t)kRanks * r.maxTokensPerRank, H = r.hidden;
  EXPECT_EQ(w.llSlots % 4096, 0u);
  EXPECT_EQ(w.ll.bytes % 4096, 0u);
  EXPECT_EQ(w.total, w.llSlots + 3 * w.ll.bytes);
  EXPECT_GE(w.ll.recvScales - w.ll.recvX, L * B * H);              // FP8 rows: 1 byte each
  EXPECT_GE(w.ll.srcToken - w.ll.recvScales, L * B * (H / 128) * 4);
  EXPECT_GE(w.ll.tokenRanks - w.ll.route, (size_t)kRanks * r.maxTokensPerRank * r.topK * 8);
  EXPECT_GE(w.ll.recvX - w.ll.tokenRanks, (size_t)r.maxTokensPerRank * 4);
  EXPECT_GE(w.ll.combineRecv - w.ll.srcToken, L * B * 4);
  EXPECT_GE(w.ll.combineInput - w.ll.combineRecv, (size_t)r.maxTokensPerRank * kRanks * H * 2);
  EXPECT_GE(w.ll.bytes - w.ll.combineInput, L * B * H * 2);
  EXPECT_EQ(w.recvX, w.combineIn);  // HT regions are empty in LL mode
}

TEST(ConfigValidate, RankCount) {
  ncclMoeConfig_t c = goodConfig(), r;
  EXPECT_EQ(validateConfig(&c, 0, kSms, &r), ncclInvalidArgument);
  EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), 0)) << ncclMoeGetLastError();
  c.numExperts = 128;
  EXPECT_EQ(validateConfig(&c, kMaxRanks * 2, kSms, &r), ncclInvalidArgument);
  EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), kMaxRanks * 2)) << ncclMoeGetLastError();
}

// --- computeWindowLayout ---------------------------------------------------------------------

namespace {
void checkLayout(ncclMoeConfig_t c, int nRanks) {
  ncclMoeConfig_t r;
  ASSERT_EQ(validateConfig(&c, nRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  WindowLayout w;
  ASSERT_EQ(computeWindowLayout(r, nRanks, &w), ncclSuccess);
  const size_t cap = r.outputCapacity, H = r.hidden, K = r.topK;
  // (offset, minimum size, name)
  std::vector<std::pair<size_t, size_t>> regions = {
      {w.signals, sizeof(uint64_t) * kSignalKinds * kMaxRanks},
      {w.counts, sizeof(int32_t) * nRanks * (nRanks + r.numExperts / nRanks)},
      {w.recvX, cap * H * 2},
      {w.recvScales, cap * (H / kFp8GroupSize) * sizeof(float)},
      {w.recvTopkIdx, cap * K * sizeof(int64_t)},
      {w.recvTopkWeights, cap * K * sizeof(float)},
      {w.combineIn, cap * H * 2}};
  size_t needed = 0;
  for (auto& rg : regions) {
    EXPECT_EQ(rg.first % 256, 0u) << "offset " << rg.first;
    EXPECT_LE(rg.first + rg.second, w.total);
    needed += rg.second;
  }
  std::sort(regions.begin(), regions.end());
  for (size_t i = 1; i < regions.size(); ++i)
    EXPECT_LE(regions[i - 1].first + regions[i - 1].second, regions[i].first)
        << "regions at " << regions[i - 1].first << " and " << regions[i].first << " overlap";
  EXPECT_EQ(w.total % 4096, 0u);
  EXPECT_EQ(w.total % NCCL_WIN_REQUIRED_ALIGNMENT, 0u);
  // No more padding than the alignment of each region and of the total.
  EXPECT_LE(w.total, needed + regions.size() * 256 + 4096);
}
}  // namespace

TEST(WindowLayout, RegionsAlignedDisjointAndSized) {
  checkLayout(goodConfig(), kRanks);
  ncclMoeConfig_t c = goodConfig();
  c.dispatchDtype = ncclMoeFp8E4m3;
  c.outputCapacity = 777;  // odd sizes exercise the alignment
  c.topK = 3;
  checkLayout(c, kRanks);
  c = goodConfig();
  c.hidden = 8; c.topK = 1; c.numExperts = 8; c.maxTokensPerRank = 1;
  checkLayout(c, 8);
  c = goodConfig();
  c.hidden = 264; c.topK = 5; c.numExperts = 12; c.maxTokensPerRank = 3;
  checkLayout(c, 3);
}

TEST(WindowLayout, MatchesHeaderEstimate) {
  // The header promises about outputCapacity * (2*H*2 + H/32 + 12*K) bytes.
  ncclMoeConfig_t c = goodConfig(), r;
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess);
  WindowLayout w;
  ASSERT_EQ(computeWindowLayout(r, kRanks, &w), ncclSuccess);
  const double estimate = (double)r.outputCapacity * (4.0 * r.hidden + r.hidden / 32.0 + 12.0 * r.topK);
  EXPECT_GE((double)w.total, estimate);
  EXPECT_LE((double)w.total, estimate * 1.01 + 65536);
}

TEST(WindowLayout, DtypeBytes) {
  EXPECT_EQ(dtypeBytes(ncclMoeBf16), 2u);
  EXPECT_EQ(dtypeBytes(ncclMoeFp8E4m3), 1u);
}

// --- validateDispatchArgs --------------------------------------------------------------------

namespace {
ncclMoeConfig_t resolved(ncclMoeDtype_t dtype) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.dispatchDtype = dtype;
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess);
  return r;
}
const int64_t kIdx[1] = {0};
const float kScales[1] = {1.0f};
alignas(16) const char kX[32] = {};

void expectDispatchRejected(ncclResult_t res, const char* name, long long v, bool checkValue) {
  std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(res, ncclInvalidArgument) << name;
  EXPECT_TRUE(containsWord(msg, name)) << "message \"" << msg << "\" lacks " << name;
  if (checkValue) {
    EXPECT_TRUE(containsNumber(msg, v)) << "message \"" << msg << "\" lacks " << v;
  }
}
}  // namespace

TEST(DispatchArgs, Valid) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16), f8 = resolved(ncclMoeFp8E4m3);
  EXPECT_EQ(validateDispatchArgs(bf, kX, nullptr, kIdx, nullptr, 4096, 0, false, 0), ncclSuccess)
      << ncclMoeGetLastError();
  EXPECT_EQ(validateDispatchArgs(f8, kX, kScales, kIdx, nullptr, 1, NCCL_MOE_DISPATCH_HOST_COUNTS, false, 0),
            ncclSuccess) << ncclMoeGetLastError();
  // Reusing the handle's routing with the same T.
  EXPECT_EQ(validateDispatchArgs(bf, kX, nullptr, nullptr, nullptr, 17, 0, true, 17), ncclSuccess)
      << ncclMoeGetLastError();
  // Zero tokens: nothing to read, NULL buffers allowed.
  EXPECT_EQ(validateDispatchArgs(bf, nullptr, nullptr, kIdx, nullptr, 0, 0, false, 0), ncclSuccess)
      << ncclMoeGetLastError();
  EXPECT_EQ(validateDispatchArgs(f8, nullptr, nullptr, nullptr, nullptr, 0, 0, false, 0), ncclSuccess)
      << ncclMoeGetLastError();
}

TEST(DispatchArgs, NullX) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16);
  expectDispatchRejected(validateDispatchArgs(bf, nullptr, nullptr, kIdx, nullptr, 5, 0, false, 0), "x", 0,
                         false);
}

TEST(DispatchArgs, MisalignedX) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16);
  expectDispatchRejected(validateDispatchArgs(bf, kX + 8, nullptr, kIdx, nullptr, 5, 0, false, 0), "x", 0,
                         false);
  EXPECT_NE(std::string(ncclMoeGetLastError()).find("aligned"), std::string::npos) << ncclMoeGetLastError();
}

TEST(DispatchArgs, ScalesMustMatchDtype) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16), f8 = resolved(ncclMoeFp8E4m3);
  expectDispatchRejected(validateDispatchArgs(f8, kX, nullptr, kIdx, nullptr, 5, 0, false, 0), "xScales",
                         0, false);
  expectDispatchRejected(validateDispatchArgs(bf, kX, kScales, kIdx, nullptr, 5, 0, false, 0), "xScales",
                         0, false);
}

TEST(DispatchArgs, NumTokensRange) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16);
  expectDispatchRejected(validateDispatchArgs(bf, kX, nullptr, kIdx, nullptr, -1, 0, false, 0),
                         "numTokens", -1, true);
  expectDispatchRejected(validateDispatchArgs(bf, kX, nullptr, kIdx, nullptr, 4097, 0, false, 0),
                         "numTokens", 4097, true);
}

TEST(DispatchArgs, RoutingReuse) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16);
  expectDispatchRejected(validateDispatchArgs(bf, kX, nullptr, nullptr, nullptr, 5, 0, false, 0),
                         "topkIdx", 0, false);
  expectDispatchRejected(validateDispatchArgs(bf, kX, nullptr, nullptr, nullptr, 5, 0, true, 6),
                         "numTokens", 5, true);
  EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), 6)) << ncclMoeGetLastError();
  // A new routing may change T freely.
  EXPECT_EQ(validateDispatchArgs(bf, kX, nullptr, kIdx, nullptr, 5, 0, true, 6), ncclSuccess)
      << ncclMoeGetLastError();
}

TEST(DispatchArgs, UnknownFlags) {
  ncclMoeConfig_t bf = resolved(ncclMoeBf16);
  expectDispatchRejected(validateDispatchArgs(bf, kX, nullptr, kIdx, nullptr, 5, 0x80, false, 0), "flags",
                         0, false);
}

// The layout kernel's scratch: the carved arrays lie inside bytes(), do not overlap, and hold
// ceil(maxTokens / tile) tiles of flags, per-rank-and-node (2R: N <= R) and per-expert counts.
TEST(WindowLayout, LayoutScratchCarving) {
  const int cases[][3] = {{1, 2, 8}, {256, 4, 256}, {257, 4, 256}, {4096, 8, 288}, {5000, 32, 64}};
  for (const auto& cs : cases) {
    const int M = cs[0], R = cs[1], E = cs[2];
    const size_t tiles = (size_t)(M + kLayoutTileTokens - 1) / kLayoutTileTokens;
    const size_t bytes = LayoutScratch::bytes(M, R, E);
    std::vector<unsigned long long> mem(bytes / 8 + 1);
    char* base = (char*)mem.data();
    const LayoutScratch s = LayoutScratch::carve(base, M, R, E);
    const char* flagsEnd = (const char*)(s.tileFlags + tiles);
    const char* tokensEnd = (const char*)(s.tileTokens + tiles * 2 * R);
    const char* expertsEnd = (const char*)(s.tileExperts + tiles * E);
    EXPECT_EQ((const char*)s.tileFlags, base);
    EXPECT_LE(flagsEnd, (const char*)s.tileTokens) << M << " " << R << " " << E;
    EXPECT_LE(tokensEnd, (const char*)s.tileExperts) << M << " " << R << " " << E;
    EXPECT_EQ(expertsEnd, base + bytes) << M << " " << R << " " << E;  // bytes() is exact
  }
}
