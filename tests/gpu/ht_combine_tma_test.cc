// The bulk-copy HT combine (NCCL_MOE_HT_COMBINE=tma, src/device/ht/combine_tma.cu) against the
// pull kernel: the same problem is dispatched and combined once on a context created with
// pull and once with tma; each output must equal the CPU reference (runAndCheck) and the two
// must be bitwise equal. Random and skewed routing, BF16 and FP8 dispatch, weighted and
// unweighted, H 7168 (two chunks per row), H 2056 (not a multiple of 128: one chunk of 257
// vectors) and H 12296 (four uneven chunks); tokens that no rank received come out as zeros.
// An unknown value of the variable makes ncclMoeCommCreate fail on every rank.
#include <stdlib.h>

#include <string>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtCombineTma : public GpuTest {};

// Sets NCCL_MOE_HT_COMBINE for the scope (the library reads it in ncclMoeCommCreate) and
// restores what the environment held before.
class CombineKernelEnv {
 public:
  explicit CombineKernelEnv(const char* value) {
    const char* old = getenv(kName);
    hadOld_ = old != nullptr;
    if (hadOld_) old_ = old;
    setenv(kName, value, 1);
  }
  ~CombineKernelEnv() {
    if (hadOld_)
      setenv(kName, old_.c_str(), 1);
    else
      unsetenv(kName);
  }

 private:
  static constexpr const char* kName = "NCCL_MOE_HT_COMBINE";
  bool hadOld_ = false;
  std::string old_;
};

// One dispatch + combine of the problem (s, g) on a context created with `kernel`, checked
// against the reference; this rank's combine output goes to *got. Collective; false when an
// API step failed on some rank.
bool runWithKernel(const char* kernel, const Shape& s, const GenSpec& g, ExpertSrc src, bool weighted,
                   std::vector<uint16_t>* got) {
  Ep ep(s);
  {
    CombineKernelEnv env(kernel);
    if (!ep.create()) return false;
  }
  Problem p = makeProblem(s, g);
  Reference ref = makeReference(p);
  DeviceInputs in;
  if (!allRanksOk(in.upload(p), "upload inputs")) return false;
  RunOpts o;
  o.src = src;
  o.combineWeighted = weighted;
  o.combineResult = got;
  const std::string tag = s.str() + " [combine " + kernel + (weighted ? ", weighted]" : ", unweighted]");
  return runAndCheck(ep, in, p, ref, o, tag.c_str());
}

void comparePullAndTma(const Shape& s, const GenSpec& g, bool weighted, ExpertSrc src = ExpertSrc::DispatchX) {
  std::vector<uint16_t> pull, tma;
  if (!runWithKernel("pull", s, g, src, weighted, &pull)) return;
  if (!runWithKernel("tma", s, g, src, weighted, &tma)) return;
  long bad = pull.size() != tma.size() ? 1 : 0;
  for (size_t i = 0; bad == 0 && i < pull.size(); i++)
    if (pull[i] != tma[i])
      for (size_t j = i; j < pull.size(); j++) bad += pull[j] != tma[j];
  EXPECT_EQ(bad, 0) << "rank " << rank() << ": " << s.str() << ": tma combine differs from pull in " << bad
                    << " of " << pull.size() << " elements";
  agreeMismatches(bad, "combine tma vs pull");
}

TEST_F(HtCombineTma, RandomBf16WeightedH7168) {
  comparePullAndTma(htShape(7168, 256, ncclMoeBf16), spec(501), true);
}

TEST_F(HtCombineTma, RandomBf16UnweightedH7168) {
  comparePullAndTma(htShape(7168, 32, ncclMoeBf16), spec(502), false);
}

TEST_F(HtCombineTma, RandomBf16WeightedH2056) {
  comparePullAndTma(htShape(2056, 32, ncclMoeBf16), spec(503), true);
}

TEST_F(HtCombineTma, SkewedRankZeroBf16WeightedH2056) {
  comparePullAndTma(htShape(2056, 32, ncclMoeBf16), spec(504, Route::RankZeroOnly), true);
}

TEST_F(HtCombineTma, SkewedOneExpertBf16UnweightedH7168) {
  comparePullAndTma(htShape(7168, 32, ncclMoeBf16), spec(505, Route::OneExpert), false);
}

TEST_F(HtCombineTma, RandomFp8WeightedH7168) {
  comparePullAndTma(htShape(7168, 256, ncclMoeFp8E4m3), spec(506), true);
}

TEST_F(HtCombineTma, SkewedRankZeroFp8UnweightedH7168) {
  comparePullAndTma(htShape(7168, 32, ncclMoeFp8E4m3), spec(507, Route::RankZeroOnly), false);
}

// Rows of 1537 vectors: four chunks of 385, 385, 385 and 382 vectors.
TEST_F(HtCombineTma, ManyChunksBf16WeightedH12296) {
  comparePullAndTma(htShape(12296, 32, ncclMoeBf16), spec(508), true);
}

// Most tokens drop every expert: their rows are zeros, written without any copy.
TEST_F(HtCombineTma, MostlyDroppedBf16WeightedH2056) {
  GenSpec g = spec(509);
  g.dropProb = 0.95;
  comparePullAndTma(htShape(2056, 32, ncclMoeBf16), g, true);
}

// A rank without tokens, and expert outputs in caller memory (copied into the window first).
TEST_F(HtCombineTma, ZeroTokenRankCopyPathBf16H7168) {
  GenSpec g = spec(510);
  g.zeroTokenRank = 0;
  comparePullAndTma(htShape(7168, 32, ncclMoeBf16), g, true, ExpertSrc::Copy);
}

TEST_F(HtCombineTma, UnknownValueRefusedOnEveryRank) {
  const Shape s = smallShape();
  ncclMoeConfig_t cfg = makeConfig(s);
  ncclMoeComm_t c = nullptr;
  ncclResult_t res;
  {
    CombineKernelEnv env("push");
    res = ncclMoeCommCreate(comm(), &cfg, &c);
  }
  EXPECT_EQ(res, ncclInvalidArgument) << "rank " << rank() << ": " << ncclMoeGetLastError();
  EXPECT_EQ(c, nullptr);
  if (c != nullptr) MOE_OK(ncclMoeCommDestroy(c));
  allRanksOk(res == ncclInvalidArgument, "NCCL_MOE_HT_COMBINE=push refused");
}

}  // namespace
}  // namespace moe_gpu
