// Issue 14 item 1, the HT calls a training framework needs, against the CPU reference:
//  - ncclMoeCombineWithWeights: rows (weighted / unweighted) and per-row top-k values returned
//    to their token, bitwise equal to moe_ref::combine / moe_ref::combineTopkValues (across fake
//    nodes to the internode contract: referenceCombine, referenceTopkValues), for random
//    and skewed routing, BF16 and FP8 dispatch, values from caller memory or in place;
//  - two operations in flight: dispatch A, dispatch B, combine A (caller memory), combine B give
//    the reference results of each;
//  - ncclMoeHandleRelease returns while the stream is still blocked (no synchronisation), and
//    1000 create + release cycles leave the device memory pool where it was.
#include <unistd.h>

#include <chrono>
#include <string.h>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtTraining : public GpuTest {};

// Per-row values of rank r, [rows][K]: distinct small multiples of 1/8 (sums are exact anyway;
// the comparison is bitwise).
std::vector<float> rowValues(int r, int rows, int K) {
  std::vector<float> v((size_t)rows * K);
  for (int i = 0; i < rows; i++)
    for (int k = 0; k < K; k++) v[(size_t)i * K + k] = (float)((r * 131 + i * 7 + k * 3) % 97) / 8.0f - 6.0f;
  return v;
}

long compareFloats(const std::vector<float>& got, const std::vector<float>& want, const char* tag) {
  long bad = got.size() != want.size() ? 1 : 0;
  for (size_t i = 0; bad == 0 && i < got.size(); i++)
    if (memcmp(&got[i], &want[i], sizeof(float)) != 0)
      for (size_t j = i; j < got.size(); j++) {
        if (memcmp(&got[j], &want[j], sizeof(float)) == 0) continue;
        if (bad++ < 5)
          ADD_FAILURE() << tag << ": rank " << rank() << ": value " << j << " = " << got[j] << ", expected "
                        << want[j];
      }
  return bad;
}

// One dispatch of `p` (with weights, host counts) on `ep`; fills `out`. Collective.
bool dispatch(Ep& ep, DeviceInputs& in, const Problem& p, ncclMoeDispatchOutput_t* out) {
  const float* scales = p.shape.dtype == ncclMoeFp8E4m3 ? in.scales.as<float>() : nullptr;
  const bool ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), scales, in.topkIdx.as<int64_t>(),
                                         in.weights.as<float>(), p.tokens(rank()), NCCL_MOE_DISPATCH_HOST_COUNTS,
                                         &ep.handle, out, stream()));
  return allRanksOk(ok, "ncclMoeDispatch");
}

// The expert output of this rank (identity expert, BF16) in caller memory.
bool expertOutInCallerMemory(const Problem& p, const Reference& ref, DevMem& buf) {
  const std::vector<uint16_t>& host = ref.expertOut[rank()];
  buf.alloc(host.size() * 2);
  return upload(buf.get(), host.data(), host.size() * 2);
}

// ncclMoeCombineWithWeights of `handle` and the checks of both outputs. inPlaceValues: the
// values are the dispatch's own out.topkWeights (then the sum returns each token's weights).
void combineWithWeightsAndCheck(Ep& ep, ncclMoeHandle_t handle, const ncclMoeDispatchOutput_t& out,
                                const Problem& p, const Reference& ref, bool weighted, bool inPlaceValues,
                                const DeviceInputs& in, const std::string& tag) {
  const Shape& s = p.shape;
  const int me = rank(), R = nRanks(), K = s.topK, T = p.tokens(me);
  std::vector<std::vector<float>> values(R);
  for (int r = 0; r < R; r++)
    values[r] = inPlaceValues ? ref.recv[r].topkWeights : rowValues(r, ref.recv[r].numRows, K);
  DevMem rows, vals((size_t)std::max(1, ref.recv[me].numRows) * K * 4), outX((size_t)std::max(1, T) * s.hidden * 2),
      outVals((size_t)std::max(1, T) * K * 4);
  bool ok = expertOutInCallerMemory(p, ref, rows);
  ok = ok && (inPlaceValues || upload(vals.get(), values[me].data(), values[me].size() * 4));
  ok = ok && poison(outX.get(), outX.bytes()) && poison(outVals.get(), outVals.bytes());
  MOE_AGREE_OR_RETURN(ok, "prepare combine inputs");
  const float* recvValues = inPlaceValues ? out.topkWeights : vals.as<float>();
  ok = MOE_OK(ncclMoeCombineWithWeights(ep.comm, handle, rows.get(), weighted ? in.weights.as<float>() : nullptr,
                                        recvValues, outVals.as<float>(), outX.get(), stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "ncclMoeCombineWithWeights");
  agreeMismatches(checkCombine(outX.get(), referenceCombine(p, ref, weighted), T, s.hidden, tag.c_str()),
                  (tag + ": combined rows").c_str());
  std::vector<float> got((size_t)T * K);
  download(got.data(), outVals.get(), got.size() * 4);
  const std::vector<float> want = referenceTopkValues(p, values);
  agreeMismatches(compareFloats(got, want, tag.c_str()), (tag + ": top-k values").c_str());
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

void withWeightsScenario(const Shape& s, const GenSpec& g, bool weighted, bool inPlaceValues) {
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, g);
  Reference ref = makeReference(p);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  ncclMoeDispatchOutput_t out;
  if (!dispatch(ep, in, p, &out)) return;
  combineWithWeightsAndCheck(ep, ep.handle, out, p, ref, weighted, inPlaceValues, in, s.str());
}

TEST_F(HtTraining, WithWeightsBf16RandomWeighted) {
  withWeightsScenario(htShape(7168, 32, ncclMoeBf16), spec(301), true, false);
}

TEST_F(HtTraining, WithWeightsBf16RandomUnweighted) {
  withWeightsScenario(htShape(2048, 256, ncclMoeBf16), spec(302), false, false);
}

TEST_F(HtTraining, WithWeightsBf16Skewed) {
  withWeightsScenario(htShape(2048, 32, ncclMoeBf16), spec(303, Route::RankZeroOnly), false, false);
}

TEST_F(HtTraining, WithWeightsFp8Weighted) {
  withWeightsScenario(htShape(2048, 32, ncclMoeFp8E4m3), spec(304), true, false);
}

// The dispatch's own weights, in place: each token gets its weights back (0 for -1 entries).
TEST_F(HtTraining, WithWeightsInPlaceRoundTrip) {
  withWeightsScenario(htShape(2048, 64, ncclMoeBf16), spec(305), true, true);
}

// dispatch A, dispatch B, combine A (caller memory, with top-k values), combine B: both as the
// reference says (i.e. as if run one after the other).
void twoInFlight(const Shape& s, uint64_t seed) {
  Ep ep(s);
  if (!ep.create()) return;
  Problem pa = makeProblem(s, spec(seed)), pb = makeProblem(s, spec(seed + 1, Route::RankZeroOnly));
  Reference ra = makeReference(pa), rb = makeReference(pb);
  DeviceInputs ina, inb;
  MOE_AGREE_OR_RETURN(ina.upload(pa) && inb.upload(pb), "upload inputs");
  ncclMoeDispatchOutput_t outA, outB;
  if (!dispatch(ep, ina, pa, &outA)) return;
  ncclMoeHandle_t handleA = ep.handle;
  ep.handle = nullptr;  // B gets its own handle
  if (!dispatch(ep, inb, pb, &outB)) {
    MOE_OK(ncclMoeHandleDestroy(handleA));
    return;
  }
  DispatchChecks dc;
  dc.hostCounts = true;
  agreeMismatches(checkDispatch(outB, pb, rb.recv[rank()], dc, "dispatch B"), "dispatch B output");
  combineWithWeightsAndCheck(ep, handleA, outA, pa, ra, true, false, ina, s.str() + " [combine A after dispatch B]");
  DevMem rowsB, outX((size_t)std::max(1, pb.tokens(rank())) * s.hidden * 2);
  bool ok = expertOutInCallerMemory(pb, rb, rowsB);
  ok = ok && MOE_OK(ncclMoeCombine(ep.comm, ep.handle, rowsB.get(), inb.weights.as<float>(), outX.get(), stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  ok = MOE_OK(ncclMoeHandleDestroy(handleA)) && ok;
  MOE_AGREE_OR_RETURN(ok, "combine B");
  agreeMismatches(checkCombine(outX.get(), referenceCombine(pb, rb, true), pb.tokens(rank()), s.hidden,
                               "combine B"),
                  "combine B rows");
}

TEST_F(HtTraining, TwoMicroBatchesInFlightBf16) { twoInFlight(htShape(7168, 32, ncclMoeBf16), 311); }

TEST_F(HtTraining, TwoMicroBatchesInFlightFp8) { twoInFlight(htShape(2048, 64, ncclMoeFp8E4m3), 313); }

// A host function that sleeps `ms` blocks the stream like a long kernel.
void CUDART_CB sleepOnStream(void* ms) { usleep(1000 * *(int*)ms); }

TEST_F(HtTraining, ReleaseDoesNotWaitForTheStream) {
  const Shape s = smallShape();
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(321));
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  ncclMoeDispatchOutput_t out;
  if (!dispatch(ep, in, p, &out)) return;
  static int blockMs = 500;
  bool ok = CUDA_OK(cudaLaunchHostFunc(stream(), sleepOnStream, &blockMs));
  const auto t0 = std::chrono::steady_clock::now();
  ok = ok && MOE_OK(ncclMoeHandleRelease(ep.handle, stream()));
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const cudaError_t busy = cudaStreamQuery(stream());
  ep.handle = nullptr;
  EXPECT_LT(ms, 100.0) << "ncclMoeHandleRelease took " << ms << " ms with the stream blocked for " << blockMs
                       << " ms";
  EXPECT_EQ(busy, cudaErrorNotReady) << "the stream had drained when the release returned";
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "release behind a blocked stream");
}

TEST_F(HtTraining, ThousandReleasesLeakNothing) {
  const Shape s = smallShape();
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(322));
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  int dev = 0;
  cudaMemPool_t pool;
  size_t before = 0, after = 0;
  bool ok = CUDA_OK(cudaGetDevice(&dev)) && CUDA_OK(cudaDeviceGetMemPool(&pool, dev)) &&
            CUDA_OK(cudaStreamSynchronize(stream())) &&
            CUDA_OK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &before));
  MOE_AGREE_OR_RETURN(ok, "memory pool");
  ncclMoeDispatchOutput_t out;
  for (int i = 0; i < 1000 && ok; i++) {
    ncclMoeHandle_t h = nullptr;
    ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr, p.tokens(rank()),
                                0, &h, &out, stream()));
    ok = ok && MOE_OK(ncclMoeHandleRelease(h, stream()));
  }
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  ok = ok && CUDA_OK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &after));
  MOE_AGREE_OR_RETURN(ok, "1000 dispatch + release");
  EXPECT_EQ(after, before) << "pool memory in use grew by " << (long long)(after - before) << " bytes";
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

}  // namespace
}  // namespace moe_gpu
