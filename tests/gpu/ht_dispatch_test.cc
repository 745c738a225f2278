// High-throughput dispatch (each scenario also combines, so that every handle is exercised):
// random routing with -1s in BF16 and FP8, skewed routing, ranks without tokens, tiny inputs,
// host counts; many dispatches back to back at SM counts that do not split the grid evenly,
// eagerly and as one CUDA graph replayed (the token claims). Everything is compared
// element-exactly with moe_ref. The layout call: ht_layout_test.cc.
#include <string.h>
#include <unistd.h>
#include <memory>
#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtDispatch : public GpuTest {};

Shape shape(int hidden, int topK, int experts, int maxTokens, ncclMoeDtype_t dtype) {
  Shape s;
  s.hidden = hidden;
  s.topK = topK;
  s.experts = experts;
  s.maxTokens = maxTokens;
  s.dtype = dtype;
  return s;
}

RunOpts opts(bool weighted) {
  RunOpts o;
  o.combineWeighted = weighted;
  return o;
}

TEST_F(HtDispatch, RandomBf16H7168K8E32Weighted) {
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), spec(101), opts(true));
}

TEST_F(HtDispatch, RandomBf16H2048K8E256Unweighted) {
  runScenario(shape(2048, 8, 256, 512, ncclMoeBf16), spec(102), opts(false));
}

TEST_F(HtDispatch, RandomBf16TopK1) {
  runScenario(shape(2048, 1, 32, 512, ncclMoeBf16), spec(103), opts(true));
}

TEST_F(HtDispatch, RandomBf16NoDispatchWeights) {
  RunOpts o = opts(false);
  o.dispatchWeights = false;
  runScenario(shape(2048, 8, 32, 512, ncclMoeBf16), spec(104), o);
}

TEST_F(HtDispatch, RandomFp8H7168K8E32Weighted) {
  runScenario(shape(7168, 8, 32, 512, ncclMoeFp8E4m3), spec(111), opts(true));
}

TEST_F(HtDispatch, RandomFp8H2048K8E256Unweighted) {
  runScenario(shape(2048, 8, 256, 512, ncclMoeFp8E4m3), spec(112), opts(false));
}

TEST_F(HtDispatch, SkewedOneExpertBf16) {
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), spec(121, Route::OneExpert), opts(true));
}

TEST_F(HtDispatch, SkewedOneExpertFp8) {
  runScenario(shape(2048, 8, 32, 512, ncclMoeFp8E4m3), spec(122, Route::OneExpert), opts(true));
}

TEST_F(HtDispatch, SkewedRankZeroExpertsBf16) {
  runScenario(shape(7168, 8, 256, 512, ncclMoeBf16), spec(123, Route::RankZeroOnly), opts(true));
}

TEST_F(HtDispatch, ZeroTokensOnRank1) {
  GenSpec g = spec(131);
  g.zeroTokenRank = 1;
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), g, opts(true));
}

TEST_F(HtDispatch, ZeroTokensOnRank1Fp8) {
  GenSpec g = spec(132);
  g.zeroTokenRank = 1;
  runScenario(shape(2048, 8, 32, 512, ncclMoeFp8E4m3), g, opts(false));
}

TEST_F(HtDispatch, ZeroTokensEverywhere) {
  GenSpec g = spec(133);
  g.numTokens = 0;
  runScenario(shape(2048, 8, 32, 512, ncclMoeBf16), g, opts(true));
}

TEST_F(HtDispatch, OneTokenPerRank) {
  runScenario(shape(7168, 8, 32, 1, ncclMoeBf16), spec(134), opts(true));
}

TEST_F(HtDispatch, OneTokenPerRankAllDropped) {
  GenSpec g = spec(135);
  g.dropProb = 1.0;  // every entry -1: nothing is sent, combine returns zeros
  runScenario(shape(2048, 8, 32, 1, ncclMoeBf16), g, opts(true));
}

TEST_F(HtDispatch, HostCountsBf16) {
  RunOpts o = opts(true);
  o.flags = NCCL_MOE_DISPATCH_HOST_COUNTS;
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), spec(141), o);
}

TEST_F(HtDispatch, HostCountsFp8Skewed) {
  RunOpts o = opts(false);
  o.flags = NCCL_MOE_DISPATCH_HOST_COUNTS;
  runScenario(shape(2048, 8, 256, 512, ncclMoeFp8E4m3), spec(142, Route::RankZeroOnly), o);
}

// A copy of one dispatch's outputs, taken in stream order right behind it, and the output struct
// that points at the copy (for checkDispatch; no host counts).
struct OutputCopy {
  DevMem x, scales, topkIdx, weights, numRecv, counts;
  bool alloc(const Shape& s) {
    const size_t cap = s.capacity(), K = s.topK;
    return x.alloc(cap * s.rowBytes()) && scales.alloc(cap * s.scalesPerRow() * sizeof(float)) &&
           topkIdx.alloc(cap * K * sizeof(int64_t)) && weights.alloc(cap * K * sizeof(float)) &&
           numRecv.alloc(sizeof(int)) && counts.alloc(s.numExperts() / nRanks() * sizeof(int));
  }
  bool poisonAll() {
    bool ok = true;
    for (DevMem* m : {&x, &scales, &topkIdx, &weights, &numRecv, &counts}) ok = poison(m->get(), m->bytes()) && ok;
    return ok;
  }
  // Enqueues (no synchronisation) the copy of `out` into this.
  bool enqueue(const ncclMoeDispatchOutput_t& out, const Shape& s) {
    const size_t cap = s.capacity(), K = s.topK;
    bool ok = CUDA_OK(cudaMemcpyAsync(x.get(), out.x, cap * s.rowBytes(), cudaMemcpyDeviceToDevice, stream()));
    if (s.scalesPerRow())
      ok = CUDA_OK(cudaMemcpyAsync(scales.get(), out.xScales, cap * s.scalesPerRow() * sizeof(float),
                                   cudaMemcpyDeviceToDevice, stream())) && ok;
    ok = CUDA_OK(cudaMemcpyAsync(topkIdx.get(), out.topkIdx, cap * K * sizeof(int64_t), cudaMemcpyDeviceToDevice,
                                 stream())) && ok;
    ok = CUDA_OK(cudaMemcpyAsync(weights.get(), out.topkWeights, cap * K * sizeof(float), cudaMemcpyDeviceToDevice,
                                 stream())) && ok;
    ok = CUDA_OK(cudaMemcpyAsync(numRecv.get(), out.numRecvTokens, sizeof(int), cudaMemcpyDeviceToDevice,
                                 stream())) && ok;
    return CUDA_OK(cudaMemcpyAsync(counts.get(), out.expertCounts, counts.bytes(), cudaMemcpyDeviceToDevice,
                                   stream())) && ok;
  }
  ncclMoeDispatchOutput_t view(const Shape& s) const {
    ncclMoeDispatchOutput_t v;
    memset(&v, 0, sizeof(v));
    v.x = x.get();
    v.xScales = s.scalesPerRow() ? scales.as<float>() : nullptr;
    v.topkIdx = topkIdx.as<int64_t>();
    v.topkWeights = weights.as<float>();
    v.numRecvTokens = numRecv.as<int>();
    v.expertCounts = counts.as<int>();
    v.hostNumRecvTokens = -1;
    return v;
  }
};

// Enqueues, in stream order with nothing synchronised, the poison of every output of `out`
// (each dispatch must write all of them again), then it must be followed by the dispatch.
bool enqueuePoison(const ncclMoeDispatchOutput_t& out, const Shape& s) {
  const size_t cap = s.capacity(), K = s.topK;
  bool ok = CUDA_OK(cudaMemsetAsync(out.x, 0xFF, cap * s.rowBytes(), stream()));
  if (s.scalesPerRow())
    ok = CUDA_OK(cudaMemsetAsync(out.xScales, 0xFF, cap * s.scalesPerRow() * sizeof(float), stream())) && ok;
  ok = CUDA_OK(cudaMemsetAsync(out.topkIdx, 0xFF, cap * K * sizeof(int64_t), stream())) && ok;
  ok = CUDA_OK(cudaMemsetAsync(out.topkWeights, 0xFF, cap * K * sizeof(float), stream())) && ok;
  ok = CUDA_OK(cudaMemsetAsync(out.numRecvTokens, 0xFF, sizeof(int), stream())) && ok;
  return CUDA_OK(cudaMemsetAsync(out.expertCounts, 0xFF, s.numExperts() / nRanks() * sizeof(int), stream())) && ok;
}

// The dispatch's warps claim tokens from a counter in the device state (token_claim.h), tagged
// with the dispatch's sequence number and never reset by the host. kIters dispatches (new
// routing and data each, one handle) enqueued back to back with no host synchronisation, the
// ranks skewed by host sleeps, at an SM count that does not split the grid evenly over the
// GPCs; each one's outputs are poisoned in stream order before it and copied aside behind it,
// and every copy is compared with its reference. Then the same kIters dispatches captured in
// one CUDA graph (poison, dispatch, copy each) and replayed twice: every replay takes new
// sequence numbers from the device state. A peer writes a rank's outputs only after that rank's
// dispatch published its counts, so the poison before it and the copy behind the previous one
// are never overwritten early.
void backToBackClaims(const Shape& s, uint64_t seed) {
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank(), kIters = 6;
  const bool fp8 = s.dtype != ncclMoeBf16;
  std::vector<Problem> probs;
  std::vector<Reference> refs;
  std::vector<std::unique_ptr<DeviceInputs>> ins;
  std::vector<std::unique_ptr<OutputCopy>> copies;
  bool ok = true;
  for (int i = 0; i < kIters; i++) {
    probs.push_back(makeProblem(s, spec(seed + i)));  // same T per rank for every seed
    refs.push_back(makeReference(probs[i]));
    ins.emplace_back(new DeviceInputs);
    ok = ins[i]->upload(probs[i]) && ok;
    copies.emplace_back(new OutputCopy);
    ok = copies[i]->alloc(s) && ok;
  }
  MOE_AGREE_OR_RETURN(ok, "upload inputs");
  RunOpts first;
  first.combine = false;
  // One checked dispatch creates the handle (and the output pointers to poison).
  if (!runAndCheck(ep, *ins[0], probs[0], refs[0], first, (s.str() + " [first dispatch]").c_str())) return;
  const ncclMoeDispatchOutput_t out = ep.lastOut;

  auto enqueueAll = [&](bool skew) {
    bool good = true;
    for (int i = 0; i < kIters && good; i++) {
      if (skew) usleep(1000 * ((me + i) % nRanks()));
      ncclMoeDispatchOutput_t o;
      memset(&o, 0, sizeof(o));
      good = enqueuePoison(out, s);
      good = good && MOE_OK(ncclMoeDispatch(ep.comm, ins[i]->x.get(), fp8 ? ins[i]->scales.as<float>() : nullptr,
                                            ins[i]->topkIdx.as<int64_t>(), ins[i]->weights.as<float>(),
                                            probs[i].tokens(me), 0, &ep.handle, &o, stream()));
      good = good && o.x == out.x && copies[i]->enqueue(o, s);
    }
    return good;
  };
  auto checkAll = [&](const std::string& what) {
    for (int i = 0; i < kIters; i++) {
      const std::string tag = s.str() + " [" + what + " " + std::to_string(i + 1) + "]";
      agreeMismatches(checkDispatch(copies[i]->view(s), probs[i], refs[i].recv[me], DispatchChecks(), tag.c_str()),
                      (tag + ": dispatch output").c_str());
    }
    return allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), (what + ": ncclMoeCheckErrors").c_str());
  };

  for (int i = 0; i < kIters; i++) ok = copies[i]->poisonAll() && ok;
  MOE_AGREE_OR_RETURN(ok, "poison copies");
  ok = enqueueAll(true);
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "back-to-back dispatches");
  if (!checkAll("back-to-back")) return;

  OwnedGraph g;
  ok = CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  if (ok) {
    const bool captured = enqueueAll(false);
    ok = CUDA_OK(cudaStreamEndCapture(stream(), &g.graph)) && captured;
  }
  if (ok) ok = CUDA_OK(cudaGraphInstantiate(&g.exec, g.graph, 0));
  MOE_AGREE_OR_RETURN(ok, "graph capture");
  for (int replay = 0; replay < 2; replay++) {
    for (int i = 0; i < kIters; i++) ok = copies[i]->poisonAll() && ok;
    MOE_AGREE_OR_RETURN(ok, "poison copies");
    ok = CUDA_OK(cudaGraphLaunch(g.exec, stream()));
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, "cudaGraphLaunch");
    if (!checkAll("graph replay " + std::to_string(replay + 1) + ", dispatch")) return;
  }
}

Shape claimShape(int hidden, int experts, int maxTokens, ncclMoeDtype_t dtype, int numSms) {
  Shape s = shape(hidden, 8, experts, maxTokens, dtype);
  s.numSms = numSms;
  return s;
}

// 18 SMs, 4096 tokens: two tokens per claim (kDispatchClaimTokens).
TEST_F(HtDispatch, BackToBackClaimsFp8Sms18) {
  backToBackClaims(claimShape(2048, 256, 4096, ncclMoeFp8E4m3, 18), 151);
}

// 24 SMs, 512 tokens: one token per claim.
TEST_F(HtDispatch, BackToBackClaimsBf16Sms24) {
  backToBackClaims(claimShape(7168, 32, 512, ncclMoeBf16, 24), 161);
}

}  // namespace
}  // namespace moe_gpu
