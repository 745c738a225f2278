// CUDA graphs: a handle created by one eager dispatch; then dispatch (with topkIdx, no host
// counts) and combine captured on a non-default stream and replayed several times, each time
// after new routing and data were written into the same input buffers.
#include <string.h>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class Graph : public GpuTest {};

void graphScenario(const Shape& s, uint64_t seed, bool withCombine, bool weighted) {
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  const bool fp8 = s.dtype != ncclMoeBf16;
  Problem p = makeProblem(s, spec(seed));
  const int T = p.tokens(me);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  RunOpts eager;
  eager.combine = withCombine;
  eager.combineWeighted = weighted;
  {
    Reference ref = makeReference(p);
    std::string tag = s.str() + " [eager dispatch creating the handle]";
    if (!runAndCheck(ep, in, p, ref, eager, tag.c_str())) return;
  }

  DevMem combOut((size_t)s.maxTokens * s.hidden * 2);
  OwnedGraph g;
  ncclMoeDispatchOutput_t out;
  memset(&out, 0, sizeof(out));
  bool ok = combOut.get() != nullptr;
  ok = ok && CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  if (ok) {
    bool captured = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), fp8 ? in.scales.as<float>() : nullptr,
                                           in.topkIdx.as<int64_t>(), in.weights.as<float>(), T,
                                           0, &ep.handle, &out, stream()));
    // Zero-copy combine from out.x (BF16); for FP8 only the dispatch is captured.
    if (captured && withCombine)
      captured = MOE_OK(ncclMoeCombine(ep.comm, ep.handle, out.x,
                                       weighted ? in.weights.as<float>() : nullptr, combOut.get(),
                                       stream()));
    ok = CUDA_OK(cudaStreamEndCapture(stream(), &g.graph)) && captured;
  }
  if (ok) ok = CUDA_OK(cudaGraphInstantiate(&g.exec, g.graph, 0));
  MOE_AGREE_OR_RETURN(ok, "graph capture");
  ep.lastOut = out;
  ep.haveOut = true;

  for (int replay = 0; replay < 3; replay++) {
    const std::string tag = s.str() + " [graph replay " + std::to_string(replay + 1) + "]";
    const Problem q = makeProblem(s, spec(seed + 1 + replay));
    if (!replayGraphAndCheck(ep, g, in, out, q, nullptr, withCombine ? &combOut : nullptr, weighted, tag)) return;
  }

  // Eager use of the same handle after the replays.
  Problem q = makeProblem(s, spec(seed + 100));
  Reference ref = makeReference(q);
  MOE_AGREE_OR_RETURN(in.upload(q), "upload inputs");
  runAndCheck(ep, in, q, ref, eager, (s.str() + " [eager dispatch after replays]").c_str());
}

TEST_F(Graph, DispatchCombineBf16Weighted) {
  graphScenario(htShape(7168, 32, ncclMoeBf16), 401, true, true);
}

TEST_F(Graph, DispatchCombineBf16Unweighted) {
  graphScenario(htShape(2048, 256, ncclMoeBf16), 402, true, false);
}

TEST_F(Graph, DispatchOnlyFp8) { graphScenario(htShape(7168, 32, ncclMoeFp8E4m3), 403, false, false); }

// NCCL_MOE_DISPATCH_HOST_COUNTS waits on the host for the kernel's counts: inside a capture it is
// refused before anything is enqueued (the capture stays valid and empty), and the context then
// works eagerly with host counts.
TEST_F(Graph, HostCountsInsideCaptureAreRefused) {
  const Shape s = htShape(2048, 32, ncclMoeBf16);
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(404));
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  ncclMoeDispatchOutput_t out;
  memset(&out, 0, sizeof(out));
  ncclMoeHandle_t handle = nullptr;
  OwnedGraph g;
  bool ok = CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  ncclResult_t res = ncclSuccess;
  if (ok) {
    res = ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), in.weights.as<float>(),
                          p.tokens(rank()), NCCL_MOE_DISPATCH_HOST_COUNTS, &handle, &out, stream());
    ok = CUDA_OK(cudaStreamEndCapture(stream(), &g.graph));
  }
  const std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(res, ncclInvalidUsage) << msg;
  EXPECT_NE(msg.find("NCCL_MOE_DISPATCH_HOST_COUNTS"), std::string::npos) << msg;
  EXPECT_EQ(handle, nullptr) << "a refused call must not create a handle";
  size_t nodes = 1;
  if (ok) ok = CUDA_OK(cudaGraphGetNodes(g.graph, nullptr, &nodes));
  EXPECT_EQ(nodes, 0u) << "the refused call enqueued work into the capture";
  MOE_AGREE_OR_RETURN(ok && res == ncclInvalidUsage, "refused capture");
  RunOpts eager;
  eager.flags = NCCL_MOE_DISPATCH_HOST_COUNTS;
  Reference ref = makeReference(p);
  runAndCheck(ep, in, p, ref, eager, (s.str() + " [eager host counts after the refused capture]").c_str());
}

}  // namespace
}  // namespace moe_gpu
