// Error paths on the GPU. Every rank makes the same bad call, so collectives stay aligned, and
// every test uses its own EP context (destroyed at the end), so later tests start clean.
//  - arguments rejected up front leave the context usable;
//  - receiving more rows than outputCapacity, and expert ids outside [-1, E), are reported (by
//    the call itself with NCCL_MOE_DISPATCH_HOST_COUNTS, else by ncclMoeCheckErrors once the
//    stream finished) and leave the row outputs unwritten (still poisoned).
#include <stdio.h>
#include <string.h>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class GpuErrors : public GpuTest {};

// The header names ncclInvalidUsage / ncclSystemError for overflow, bad ids and timeouts; for bad
// expert ids (bad input) any error code is accepted, the value is printed.
bool isReportedError(ncclResult_t r, bool anyCode) {
  return anyCode ? r != ncclSuccess : (r == ncclInvalidUsage || r == ncclSystemError);
}


TEST_F(GpuErrors, RejectedArgumentsLeaveContextUsable) {
  Shape s = capacityShape(64, 0);
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(501));
  Reference ref = makeReference(p);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  const int T = p.tokens(rank());
  ncclMoeDispatchOutput_t out;
  ncclResult_t r = ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr,
                                   s.maxTokens + 1, 0, &ep.handle, &out, stream());
  EXPECT_EQ(r, ncclInvalidArgument) << "numTokens > maxTokensPerRank: " << ncclMoeGetLastError();
  EXPECT_STRNE(ncclMoeGetLastError(), "");
  r = ncclMoeDispatch(ep.comm, in.x.get(), in.scales.as<float>(), in.topkIdx.as<int64_t>(),
                      nullptr, T, 0, &ep.handle, &out, stream());
  EXPECT_EQ(r, ncclInvalidArgument) << "xScales given for BF16: " << ncclMoeGetLastError();
  r = ncclMoeDispatch(ep.comm, in.x.get(), nullptr, nullptr, nullptr, T, 0, &ep.handle, &out,
                      stream());
  EXPECT_NE(r, ncclSuccess) << "topkIdx NULL without a handle";
  EXPECT_TRUE(ep.handle == nullptr) << "a rejected dispatch created a handle";
  bool ok = ep.handle == nullptr;
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "rejected calls");
  // The context still works.
  RunOpts o;
  if (!runAndCheck(ep, in, p, ref, o, "dispatch after rejected calls")) return;
  // Combine with a NULL handle is rejected too; the handle still combines afterwards.
  DevMem combOut((size_t)s.maxTokens * s.hidden * 2);
  r = ncclMoeCombine(ep.comm, nullptr, ep.lastOut.x, nullptr, combOut.get(), stream());
  EXPECT_NE(r, ncclSuccess) << "combine with a NULL handle";
  MOE_AGREE_OR_RETURN(CUDA_OK(cudaStreamSynchronize(stream())), "rejected combine");
  o.reuseRouting = true;
  o.dispatchWeights = false;
  runAndCheck(ep, in, p, ref, o, "cached dispatch after rejected combine");
}

// A valid dispatch first (the outputs' addresses), then the bad one on poisoned outputs.
// rowsStillDelivered: the failure is reported but the dispatch completes (bad expert ids are
// treated as -1), so the rows are compared with the reference instead of the poison.
void expectDispatchError(const Shape& s, int goodTokens, void (*corrupt)(Problem&, int experts),
                         unsigned flags, const char* what, bool rowsStillDelivered = false) {
  const bool anyCode = corrupt != nullptr;
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  Problem p = makeProblem(s, spec(601, Route::Random, goodTokens));
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  {
    Reference ref = makeReference(p);
    RunOpts o;
    if (!runAndCheck(ep, in, p, ref, o, (std::string(what) + " [valid dispatch]").c_str()))
      return;
  }
  Problem q = makeProblem(s, spec(602));
  if (corrupt) corrupt(q, s.numExperts());
  const ncclMoeDispatchOutput_t prev = ep.lastOut;
  bool ok = in.upload(q) && poisonDispatchOutput(prev, s);
  MOE_AGREE_OR_RETURN(ok, "bad inputs and poison");

  ncclMoeDispatchOutput_t out;
  memset(&out, 0, sizeof(out));
  const bool fp8 = s.dtype != ncclMoeBf16;
  ncclResult_t res = ncclMoeDispatch(ep.comm, in.x.get(), fp8 ? in.scales.as<float>() : nullptr,
                                     in.topkIdx.as<int64_t>(), in.weights.as<float>(),
                                     q.tokens(me), flags, &ep.handle, &out, stream());
  const std::string callMsg = ncclMoeGetLastError();
  ok = CUDA_OK(cudaStreamSynchronize(stream()));
  ncclResult_t chk = ncclMoeCheckErrors(ep.comm);
  const std::string chkMsg = ncclMoeGetLastError();
  if (flags & NCCL_MOE_DISPATCH_HOST_COUNTS) {
    EXPECT_TRUE(isReportedError(res, anyCode)) << what << ": rank " << me << ": dispatch with host counts "
                                      << "returned " << int(res) << " " << callMsg;
  } else {
    EXPECT_TRUE(res == ncclSuccess || isReportedError(res, anyCode))
        << what << ": rank " << me << ": dispatch returned " << int(res) << " " << callMsg;
    EXPECT_TRUE(isReportedError(res, anyCode) || isReportedError(chk, anyCode))
        << what << ": rank " << me << ": error not reported; dispatch " << int(res)
        << ", ncclMoeCheckErrors after sync " << int(chk) << " " << chkMsg;
  }
  if (me == 0) {
    printf("[   INFO   ] %s: dispatch -> %d \"%s\"; check -> %d \"%s\"\n", what, int(res),
           callMsg.c_str(), int(chk), chkMsg.c_str());
    fflush(stdout);
  }
  MOE_AGREE_OR_RETURN(ok, "synchronise after the failed dispatch");
  if (rowsStillDelivered) {
    // Bad expert ids are treated as -1 (header contract): the rows match the reference, which
    // ignores ids outside [0, E) the same way.
    const std::string tag = std::string(what) + ": rows delivered with bad ids treated as -1";
    DispatchChecks checks;
    checks.hostCounts = false;
    agreeMismatches(checkDispatch(prev, q, makeReference(q).recv[me], checks, tag.c_str()), tag.c_str());
    return;
  }
  const size_t cap = s.capacity(), K = s.topK;
  long bad = countUnpoisoned(prev.x, cap * s.rowBytes(), "x");
  if (fp8) bad += countUnpoisoned(prev.xScales, cap * s.scalesPerRow() * sizeof(float), "xScales");
  bad += countUnpoisoned(prev.topkIdx, cap * K * sizeof(int64_t), "topkIdx");
  bad += countUnpoisoned(prev.topkWeights, cap * K * sizeof(float), "topkWeights");
  agreeMismatches(bad, (std::string(what) + ": outputs written by a failed dispatch").c_str());
  // Ep's destructor destroys the handle and the context (which must work after an error).
}

void badExpertIds(Problem& p, int experts) {
  for (moe_ref::Routing& r : p.routing) {
    if (r.numTokens > 0) r.topkIdx[0] = experts;  // one past the last expert
    if (r.numTokens > 1) r.topkIdx[(size_t)r.topK + 1] = -2;
  }
}

// Capacity = R rows: one token per rank always fits, ~64 tokens per rank never do.
TEST_F(GpuErrors, OverflowWithHostCountsFails) {
  expectDispatchError(capacityShape(64, nRanks()), 1, nullptr, NCCL_MOE_DISPATCH_HOST_COUNTS,
                      "overflow, host counts");
}

TEST_F(GpuErrors, OverflowReportedByCheckErrors) {
  expectDispatchError(capacityShape(64, nRanks()), 1, nullptr, 0, "overflow, no host counts");
}

TEST_F(GpuErrors, OverflowFp8WithHostCountsFails) {
  Shape s = capacityShape(64, nRanks());
  s.dtype = ncclMoeFp8E4m3;
  expectDispatchError(s, 1, nullptr, NCCL_MOE_DISPATCH_HOST_COUNTS, "overflow fp8, host counts");
}

TEST_F(GpuErrors, BadExpertIdWithHostCountsFails) {
  expectDispatchError(capacityShape(64, 0), -1, badExpertIds, NCCL_MOE_DISPATCH_HOST_COUNTS,
                      "bad expert id, host counts", true);
}

TEST_F(GpuErrors, BadExpertIdReportedByCheckErrors) {
  expectDispatchError(capacityShape(64, 0), -1, badExpertIds, 0, "bad expert id, no host counts", true);
}

// A context created after the errors above works normally.
TEST_F(GpuErrors, FreshContextAfterErrors) {
  RunOpts o;
  runScenario(capacityShape(64, 0), spec(701), o);
}

}  // namespace
}  // namespace moe_gpu
