// High-throughput dispatch (each scenario also combines, so that every handle is exercised):
// random routing with -1s in BF16 and FP8, skewed routing, ranks without tokens, tiny inputs,
// host counts; many dispatches back to back at SM counts that do not split the grid evenly,
// eagerly and as one CUDA graph replayed (the token claims), also at the claims' edges: the
// chunk-size switch, 1 token on 512 warps, empty and full dispatches alternating, and the
// 32-bit tag at and across its wrap (NCCL_MOE_SEQ_START). Everything is compared
// element-exactly with moe_ref. The layout call: ht_layout_test.cc.
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <functional>
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
//
// tokens(i, r), when given: rank r's token count in dispatch i (<= maxTokens; else the spec's
// per-rank default, the same for every i). seqStart: NCCL_MOE_SEQ_START of the context (0: none).
using TokensOf = std::function<int(int i, int r)>;
void backToBackClaims(const Shape& s, uint64_t seed, int kIters = 6, const TokensOf& tokens = nullptr,
                      unsigned long long seqStart = 0) {
  Ep ep(s);
  {
    char start[32];
    snprintf(start, sizeof(start), "%llu", seqStart);
    ScopedEnv env("NCCL_MOE_SEQ_START", seqStart ? start : nullptr);
    if (!ep.create()) return;
  }
  const int me = rank();
  const bool fp8 = s.dtype != ncclMoeBf16;
  std::vector<Problem> probs;
  std::vector<Reference> refs;
  std::vector<std::unique_ptr<DeviceInputs>> ins;
  std::vector<std::unique_ptr<OutputCopy>> copies;
  bool ok = true;
  for (int i = 0; i < kIters; i++) {
    if (tokens) {
      probs.push_back(makeProblem(s, spec(seed + i, Route::Random, s.maxTokens)));
      std::vector<int> t(nRanks());
      for (int r = 0; r < nRanks(); r++) t[r] = tokens(i, r);
      cutTokens(probs[i], t);
    } else {
      probs.push_back(makeProblem(s, spec(seed + i)));  // same T per rank for every seed
    }
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
      const std::string tag = s.str() + " [" + what + " " + std::to_string(i + 1) + ", T " +
                              std::to_string(probs[i].tokens(me)) + "]";
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

// --- token claims at their edges (b8050cd, token_claim.h; review_s7.md section 5, 10-11) ------
// Each runs backToBackClaims: every dispatch's outputs poisoned in stream order before it and
// compared bitwise with moe_ref (rows, scales, top-k ids and weights, counts), eagerly and in two
// graph replays. A token that no warp stores stays poisoned (0xFF) and fails the comparison; one
// stored twice with another token's data fails it too.

constexpr int kDispatchWarpsPerCta = 16;  // dispatch_lsa.cu: kDispatchThreads (512) / 32
// claimChunk's switch to kDispatchClaimTokens (2) tokens per claim: numTokens >= 4 * 2 * warps.
int claimEdge(int numSms) { return 4 * 2 * numSms * kDispatchWarpsPerCta; }

// 5 SMs (80 warps): 640 tokens claim two at a time, 639 one at a time. Dispatches alternate
// across the edge, and ranks straddle it within one dispatch (odd ranks one below).
TEST_F(HtDispatch, ClaimChunkEdgeBf16Sms5) {
  const int edge = claimEdge(5);
  backToBackClaims(claimShape(2048, 32, edge, ncclMoeBf16, 5), 171, 6, [edge](int i, int r) {
    switch (i) {
      case 0: return edge;
      case 1: return edge - 1;
      case 2: return r % 2 ? edge - 1 : edge;
      case 3: return r % 2 ? edge : edge - 1;
      case 4: return edge;
      default: return edge - 1;
    }
  });
}

// The same at 7 SMs (112 warps: 896 / 895 tokens) in FP8 (the scales travel with the rows).
TEST_F(HtDispatch, ClaimChunkEdgeFp8Sms7) {
  const int edge = claimEdge(7);
  backToBackClaims(claimShape(2048, 256, edge, ncclMoeFp8E4m3, 7), 177, 5,
                   [edge](int i, int r) { return (i + r) % 2 ? edge - 1 : edge; });
}

// 1 token at 32 SMs (512 warps): one claim holds it, the other 511 warps' first claims overshoot
// (chunk 1); some dispatches have no tokens on any rank or on rank 0 only.
TEST_F(HtDispatch, ClaimOneTokenFp8Sms32) {
  backToBackClaims(claimShape(2048, 256, 2, ncclMoeFp8E4m3, 32), 181, 6, [](int i, int r) {
    if (i == 2) return 0;             // every rank empty
    if (i == 4) return r == 0 ? 0 : 1;  // rank 0 empty
    return 1;
  });
}

// Dispatches alternate between no tokens anywhere (no claim at all; the end store still tags the
// word) and 2341 tokens (two per claim at 18 SMs), with dispatches where only rank 0, or every
// rank but rank 0, is empty.
TEST_F(HtDispatch, ClaimAlternatingEmptyAndFullFp8Sms18) {
  const int many = claimEdge(18) + 37;
  backToBackClaims(claimShape(2048, 256, many, ncclMoeFp8E4m3, 18), 191, 8, [many](int i, int r) {
    if (i % 2 == 1) return 0;
    if (i == 4) return r == 0 ? 0 : many;
    if (i == 6) return r == 0 ? many : 0;
    return many - r;
  });
}

// The claim word's tag is the sequence number mod 2^32. NCCL_MOE_SEQ_START = 2^32 - 1: the
// context's first dispatch is sequence 2^32, tag 0, the tag of the word zeroed at creation (a
// fresh counter: next 0). Then 6 eager dispatches and 12 replayed ones with tags 1.. (8 SMs: 128
// warps, 1024 tokens two per claim, 1023 one per claim, and empty dispatches).
TEST_F(HtDispatch, ClaimTagZeroAtSeqStart2Pow32Minus1Bf16Sms8) {
  const int edge = claimEdge(8);
  backToBackClaims(claimShape(2048, 32, edge, ncclMoeBf16, 8), 201, 6,
                   [edge](int i, int r) { return i == 3 ? 0 : (i + r) % 3 == 0 ? edge - 1 : edge; },
                   (1ull << 32) - 1);
}

// NCCL_MOE_SEQ_START = 2^32 - 3: the first dispatches carry tags 2^32 - 2 and 2^32 - 1, the next
// ones 0, 1, ... with the word still tagged 2^32 - 1 (stale by the 32-bit comparison only).
TEST_F(HtDispatch, ClaimTagWrapsSeqStart2Pow32Minus3Fp8Sms8) {
  const int edge = claimEdge(8);
  backToBackClaims(claimShape(2048, 256, edge, ncclMoeFp8E4m3, 8), 211, 6,
                   [edge](int i, int r) { return i == 2 ? (r == 0 ? 0 : 1) : i % 2 ? edge : edge - 1 - r; },
                   (1ull << 32) - 3);
}

}  // namespace
}  // namespace moe_gpu
