// The LL FP8 cast of a group holding +-Inf (5ad52f0, fp8_cast.cuh; review_s7.md R3): the group's
// scale is +Inf in the FP32 formats and the byte 0xFF in UE8M0, its inverse 0, so the finite
// values cast to +-0 (the sign of the input) and the Inf to NaN; the group dequantises to NaN and
// never to finite values (before the fix, the power-of-two formats built 2^-128 as -Inf and cast
// the finite values to -+448 with flipped signs). On both ranks, in every round, one token holds
// +Inf in one group and (second round) another token -Inf in another group; both tokens have two
// experts on each of several ranks and are fanned out there.
// Checked against moe_ref (whose cast follows the same rule), bitwise except the NaN byte's sign
// (the CPU's Inf * 0 is a negative NaN, the GPU's a positive one): every other byte of the Inf
// group, every other group and token, every scale (the Inf group's included) and the counts.
// Then independently of the reference: the Inf group's scale bits and that its bytes are +-0
// but for the NaN. The combine of the identity expert is checked bitwise except on channels
// where the reference is NaN, which must be NaN (any payload).
// Forms: one launch (one CTA), two launches one-shot, split; the three scale formats.
#include <math.h>
#include <string.h>

#include <set>
#include <tuple>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlFp8Inf : public GpuTest {};

constexpr uint16_t kBf16PosInf = 0x7f80, kBf16NegInf = 0xff80;

struct InfSpot {
  int rank, token, group, col;  // col: channel within the row
};

// Puts the Inf spots of round `round` into p (every rank: token 1 + Inf in group (r + round) % G,
// channel 5 + 7 r; round 1 also token 2 -Inf in the next group) and gives those tokens two experts
// on each of the first min(R, K / 2) ranks (a fan-out there), then recasts the rows. Returns the
// spots.
std::vector<InfSpot> plantInfs(LlProblem& p, int round) {
  const LlShape& s = p.shape;
  const int R = nRanks(), G = s.hidden / 128, K = s.topK, L = s.local();
  std::vector<InfSpot> spots;
  for (int r = 0; r < R; r++) {
    const int T = p.tokens(r);
    for (int which = 0; which < (round % 2 ? 2 : 1) && 1 + which < T; which++) {
      InfSpot sp;
      sp.rank = r;
      sp.token = 1 + which;
      sp.group = (r + round + which) % G;
      sp.col = sp.group * 128 + (5 + 7 * r + 13 * which) % 128;
      p.x[r][(size_t)sp.token * s.hidden + sp.col] = which ? kBf16NegInf : kBf16PosInf;
      // Experts 2d*L and 2d*L + 1 (two on rank d) for the first ranks d, the rest -1.
      int64_t* row = &p.routing[r].topkIdx[(size_t)sp.token * K];
      for (int k = 0; k < K; k++) row[k] = k / 2 < R && L >= 2 ? (int64_t)(k / 2) * L + k % 2 : -1;
      spots.push_back(sp);
    }
    resendRows(p, r);
  }
  return spots;
}

bool isBf16Nan(uint16_t v) { return (v & 0x7fff) > 0x7f80; }

// Combine output vs the reference: bitwise, but a NaN expected is matched by any NaN.
long checkCombineNanAware(const void* dev, const std::vector<uint16_t>& expected, int T, int H, const std::string& tag) {
  std::vector<uint16_t> got((size_t)T * H);
  if (expected.size() != got.size()) {
    ADD_FAILURE() << tag << ": reference combine has " << expected.size() << " values, expected " << got.size();
    return 1;
  }
  download(got.data(), dev, got.size() * 2);
  long bad = 0, nans = 0;
  for (size_t i = 0; i < got.size(); i++) {
    const bool nan = isBf16Nan(expected[i]);
    nans += nan;
    if (nan ? isBf16Nan(got[i]) : got[i] == expected[i]) continue;
    if (bad++ < 6)
      ADD_FAILURE() << tag << ": rank " << rank() << ": combine (token " << i / H << ", col " << i % H << "): got 0x"
                    << std::hex << got[i] << ", expected 0x" << expected[i] << std::dec
                    << (nan ? " (NaN)" : "");
  }
  if (T > 0 && nans == 0) {
    ADD_FAILURE() << tag << ": rank " << rank() << ": the reference combine has no NaN: no Inf reached this rank's tokens";
    bad++;
  }
  return bad;
}

// The Inf group of every received row of an Inf token, from the downloaded blocks, against the
// rule itself (not the reference): scale +Inf / 0xFF, bytes +-0 but the NaN (& 0x7f == 0x7f).
long checkInfGroups(const LlBlocks& b, const LlShape& s, const std::vector<InfSpot>& spots, const std::string& tag) {
  const int R = nRanks(), L = s.local(), H = s.hidden;
  long bad = 0, seen = 0;
  for (const InfSpot& sp : spots)
    for (int l = 0; l < L; l++) {
      const size_t blk = (size_t)l * R + sp.rank;
      if (blk >= b.srcToken.size()) continue;
      const std::vector<int>& tok = b.srcToken[blk];
      for (size_t j = 0; j < tok.size(); j++) {
        if (tok[j] != sp.token) continue;
        seen++;
        const uint8_t* row = &b.rows[blk][j * H];
        const uint8_t* sc = &b.scales[blk][j * s.scaleBytes()];
        bool scaleOk;
        uint32_t scaleBits = 0;
        if (s.fmt == ncclMoeScaleUe8m0) {
          scaleBits = sc[sp.group];  // group g: byte g % 4 of int32 g / 4 (little-endian)
          scaleOk = scaleBits == 0xff;
        } else {
          memcpy(&scaleBits, sc + (size_t)sp.group * 4, 4);
          scaleOk = scaleBits == 0x7f800000u;
        }
        if (!scaleOk && bad++ < 6)
          ADD_FAILURE() << tag << ": rank " << rank() << ": local expert " << l << ", source " << sp.rank
                        << ", token " << sp.token << ": Inf group " << sp.group << " has scale bits 0x" << std::hex
                        << scaleBits << std::dec;
        for (int c = sp.group * 128; c < sp.group * 128 + 128; c++) {
          const uint8_t want = c == sp.col ? 0x7f : 0x00;
          if ((row[c] & 0x7f) != want && bad++ < 6)
            ADD_FAILURE() << tag << ": rank " << rank() << ": local expert " << l << ", source " << sp.rank
                          << ", token " << sp.token << ", col " << c << " (Inf group): byte 0x" << std::hex
                          << (int)row[c] << ", expected " << (c == sp.col ? "NaN (0x7f/0xff)" : "+-0 (0x00/0x80)")
                          << std::dec;
        }
      }
    }
  // plantInfs gives each Inf token two experts on each of the first min(R, K / 2) ranks.
  const long want = rank() < s.topK / 2 ? 2 * (long)spots.size() : 0;
  if (L >= 2 && seen != want) {
    ADD_FAILURE() << tag << ": rank " << rank() << ": " << seen << " received rows of Inf tokens, expected " << want;
    bad++;
  }
  return bad;
}

void infScenario(ncclMoeScaleFormat_t fmt, const char* limit, bool split, uint64_t seed) {
  LlShape s;
  s.fp8 = true;
  s.fmt = fmt;
  s.maxTokens = 8;  // R * 8 rows of one chunk: one CTA for the one-launch form
  LlEp ep(s);
  {
    ScopedEnv env("NCCL_MOE_LL_ONE_LAUNCH", limit);
    if (!ep.create()) return;
  }
  const int me = rank(), H = s.hidden;
  LlInputs in;
  for (int round = 0; round < 3; round++) {
    LlProblem p = makeLlProblem(s, spec(seed + round));
    const std::vector<InfSpot> spots = plantInfs(p, round);
    std::set<std::tuple<int, int, int>> nanBytes;  // (source, token, col)
    for (const InfSpot& sp : spots) nanBytes.insert(std::make_tuple(sp.rank, sp.token, sp.col));
    const std::string tag = s.str() + (split ? " split" : " one-shot") + " limit " + (limit ? limit : "default") +
                            " [round " + std::to_string(round + 1) + ", " + std::to_string(spots.size()) +
                            " Inf tokens]";
    bool ok = in.upload(p) && ep.poisonNextSlot();
    MOE_AGREE_OR_RETURN(ok, (tag + ": inputs and poison").c_str());
    ncclMoeLowLatencyOutput_t out;
    const bool weighted = round != 1;
    ok = runLlDispatch(ep, in, p.tokens(me), weighted, split, &out);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": LL dispatch").c_str());
    ep.record(out, tag.c_str());
    LlBlocks blocks;
    const LlByteMask mask = [&nanBytes](int src, int t, int col) -> uint8_t {
      return nanBytes.count(std::make_tuple(src, t, col)) ? 0x7f : 0xff;
    };
    agreeMismatches(checkLlDispatch(out, p, llReference(p), tag.c_str(), false, &blocks, mask),
                    (tag + ": dispatch output").c_str());
    agreeMismatches(checkInfGroups(blocks, s, spots, tag), (tag + ": Inf groups").c_str());

    DevMem combOut((size_t)s.maxTokens * H * 2);
    ok = combOut.get() && writeIdentityExpert(out.combineInput, s, blocks) && poison(combOut.get(), combOut.bytes());
    MOE_AGREE_OR_RETURN(ok, (tag + ": expert output").c_str());
    ok = runLlCombine(ep, out, out.combineInput, combOut.get(), split);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": LL combine").c_str());
    agreeMismatches(checkCombineNanAware(combOut.get(), llIdentityCombine(p, weighted), p.tokens(me), H, tag),
                    (tag + ": combine output").c_str());
    MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), (tag + ": ncclMoeCheckErrors").c_str());
  }
}

constexpr const char* kOneLaunch = "1000000";
constexpr const char* kTwoLaunches = "0";

TEST_F(LlFp8Inf, Fp32OneLaunch) { infScenario(ncclMoeScaleFp32, kOneLaunch, false, 2201); }
TEST_F(LlFp8Inf, Fp32TwoLaunches) { infScenario(ncclMoeScaleFp32, kTwoLaunches, false, 2202); }
TEST_F(LlFp8Inf, Pow2OneLaunch) { infScenario(ncclMoeScaleFp32Pow2, kOneLaunch, false, 2203); }
TEST_F(LlFp8Inf, Pow2TwoLaunches) { infScenario(ncclMoeScaleFp32Pow2, kTwoLaunches, false, 2204); }
TEST_F(LlFp8Inf, Ue8m0OneLaunch) { infScenario(ncclMoeScaleUe8m0, kOneLaunch, false, 2205); }
TEST_F(LlFp8Inf, Ue8m0TwoLaunches) { infScenario(ncclMoeScaleUe8m0, kTwoLaunches, false, 2206); }
TEST_F(LlFp8Inf, Ue8m0Split) { infScenario(ncclMoeScaleUe8m0, nullptr, true, 2207); }
TEST_F(LlFp8Inf, Fp32Split) { infScenario(ncclMoeScaleFp32, nullptr, true, 2208); }

}  // namespace
}  // namespace moe_gpu
