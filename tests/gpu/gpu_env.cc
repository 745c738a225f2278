// Global state, checks, cross-rank agreement, device memory, the EP context wrapper and the
// dispatch / combine runner of the multi-GPU tests (see gpu_env.h).
#include "gpu_env.h"

#include <stdio.h>
#include <string.h>
#include <algorithm>
#include <cmath>
#include <sstream>

namespace moe_gpu {

namespace {
int gRank = 0, gRanks = 0;
ncclComm_t gComm = nullptr;
cudaStream_t gStream = nullptr;
std::string gSkipReason;
}  // namespace

void setSkipReason(const std::string& reason) { gSkipReason = reason; }
const std::string& skipReason() { return gSkipReason; }

int rank() { return gRank; }
int nRanks() { return gRanks; }
ncclComm_t comm() { return gComm; }
cudaStream_t stream() { return gStream; }
void setGlobal(int r, int n, ncclComm_t c, cudaStream_t s) {
  gRank = r;
  gRanks = n;
  gComm = c;
  gStream = s;
}

bool checkNccl(ncclResult_t res, const char* expr, const char* file, int line) {
  if (res == ncclSuccess) return true;
  ADD_FAILURE_AT(file, line) << "rank " << gRank << ": " << expr << " returned " << int(res)
                             << " (" << ncclGetErrorString(res)
                             << "): " << ncclMoeGetLastError();
  return false;
}

bool checkCuda(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return true;
  ADD_FAILURE_AT(file, line) << "rank " << gRank << ": " << expr << " failed: "
                             << cudaGetErrorName(err) << " " << cudaGetErrorString(err);
  return false;
}

bool allRanksOk(bool localOk, const char* step) {
  // Bit r set when rank r failed (exact in a double for up to 53 ranks).
  double mask = moe_ranks::sumOverRanks(localOk ? 0.0 : std::ldexp(1.0, std::min(gRank, 52)));
  if (mask == 0.0) return true;
  if (localOk) {
    std::ostringstream who;
    uint64_t m = (uint64_t)mask;
    for (int r = 0; r < 64; r++)
      if (m >> r & 1) who << " " << r;
    ADD_FAILURE() << "rank " << gRank << ": step '" << step << "' failed on rank(s)" << who.str();
  }
  return false;
}

long agreeMismatches(long local, const char* what) {
  long total = (long)moe_ranks::sumOverRanks((double)local);
  if (total != 0 && local == 0)
    ADD_FAILURE() << "rank " << gRank << ": " << what << ": " << total
                  << " mismatches on other ranks";
  return total;
}

DevMem::~DevMem() {
  if (p_) CUDA_OK(cudaFree(p_));
}

bool DevMem::alloc(size_t bytes) {
  if (p_ && bytes_ >= bytes) return true;
  if (p_) CUDA_OK(cudaFree(p_));
  p_ = nullptr;
  bytes_ = 0;
  if (!CUDA_OK(cudaMalloc(&p_, std::max<size_t>(bytes, 1)))) {
    p_ = nullptr;
    return false;
  }
  bytes_ = bytes;
  return true;
}

bool upload(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return true;
  bool ok = CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, gStream));
  return CUDA_OK(cudaStreamSynchronize(gStream)) && ok;
}

bool download(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return true;
  bool ok = CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, gStream));
  return CUDA_OK(cudaStreamSynchronize(gStream)) && ok;
}

bool poison(void* dst, size_t bytes) {
  if (bytes == 0 || dst == nullptr) return true;
  bool ok = CUDA_OK(cudaMemsetAsync(dst, 0xFF, bytes, gStream));
  return CUDA_OK(cudaStreamSynchronize(gStream)) && ok;
}

int Shape::numExperts() const {
  int r = std::max(nRanks(), 1);
  return (experts + r - 1) / r * r;
}

std::string Shape::str() const {
  std::ostringstream s;
  s << "H" << hidden << " K" << topK << " E" << numExperts() << " T" << maxTokens << " "
    << (dtype == ncclMoeBf16 ? "bf16" : "fp8") << " sms" << numSms;
  if (outputCapacity) s << " cap" << outputCapacity;
  return s.str();
}

ncclMoeConfig_t makeConfig(const Shape& s) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.mode = ncclMoeHighThroughput;
  c.numExperts = s.numExperts();
  c.hidden = s.hidden;
  c.topK = s.topK;
  c.maxTokensPerRank = s.maxTokens;
  c.dispatchDtype = s.dtype;
  c.numSms = s.numSms;
  c.outputCapacity = s.outputCapacity;
  c.timeoutMs = s.timeoutMs;
  return c;
}

bool DeviceInputs::upload(const Problem& p) {
  const Shape& s = p.shape;
  const moe_ref::Routing& r = p.routing[rank()];
  const size_t T = r.numTokens, maxT = s.maxTokens, K = s.topK;
  bool ok = x.alloc(maxT * s.rowBytes()) && topkIdx.alloc(maxT * K * sizeof(int64_t)) &&
            weights.alloc(maxT * K * sizeof(float)) &&
            scales.alloc(maxT * std::max(s.scalesPerRow(), 1) * sizeof(float));
  if (!ok) return false;
  ok = moe_gpu::upload(x.get(), p.x[rank()].data(), T * s.rowBytes());
  ok = moe_gpu::upload(topkIdx.get(), r.topkIdx.data(), T * K * sizeof(int64_t)) && ok;
  ok = moe_gpu::upload(weights.get(), r.topkWeights.data(), T * K * sizeof(float)) && ok;
  if (s.scalesPerRow())
    ok = moe_gpu::upload(scales.get(), p.scales[rank()].data(),
                         T * s.scalesPerRow() * sizeof(float)) && ok;
  return ok;
}

bool poisonDispatchOutput(const ncclMoeDispatchOutput_t& out, const Shape& s, bool rowsOnly) {
  const size_t cap = s.capacity(), K = s.topK;
  bool ok = poison(out.x, cap * s.rowBytes());
  if (s.scalesPerRow()) ok = poison(out.xScales, cap * s.scalesPerRow() * sizeof(float)) && ok;
  if (rowsOnly) return ok;
  ok = poison(out.topkIdx, cap * K * sizeof(int64_t)) && ok;
  ok = poison(out.topkWeights, cap * K * sizeof(float)) && ok;
  ok = poison(out.numRecvTokens, sizeof(int)) && ok;
  ok = poison(out.expertCounts, s.numExperts() / nRanks() * sizeof(int)) && ok;
  return ok;
}

Ep::~Ep() {
  destroyHandle();
  if (comm) {
    CUDA_OK(cudaStreamSynchronize(stream()));
    MOE_OK(ncclMoeCommDestroy(comm));
    comm = nullptr;
  }
}

bool Ep::create() {
  ncclMoeConfig_t cfg = makeConfig(shape);
  bool ok = MOE_OK(ncclMoeCommCreate(moe_gpu::comm(), &cfg, &comm));
  if (!ok) comm = nullptr;
  std::string step = "ncclMoeCommCreate " + shape.str();
  return allRanksOk(ok, step.c_str());
}

void Ep::destroyHandle() {
  if (handle) {
    CUDA_OK(cudaStreamSynchronize(stream()));
    MOE_OK(ncclMoeHandleDestroy(handle));
  }
  handle = nullptr;
  haveOut = false;
}

namespace {
// Fills the expert output of this rank for combine and returns the pointer combine reads.
const void* prepareExpertOut(ExpertSrc src, const ncclMoeDispatchOutput_t& out, const Problem& p,
                             const Reference& ref, DevMem& copyBuf, bool* ok) {
  const Shape& s = p.shape;
  if (s.dtype != ncclMoeBf16 && src == ExpertSrc::DispatchX) src = ExpertSrc::CombineInput;
  if (src == ExpertSrc::DispatchX) return out.x;
  const std::vector<uint16_t>& host = ref.expertOut[rank()];
  void* dst = out.combineInput;
  if (src == ExpertSrc::Copy) {
    *ok = copyBuf.alloc((size_t)s.capacity() * s.hidden * 2) && *ok;
    dst = copyBuf.get();
  }
  if (dst == nullptr) {
    ADD_FAILURE() << "rank " << rank() << ": no buffer for the expert output ("
                  << (src == ExpertSrc::Copy ? "cudaMalloc failed" : "out.combineInput is NULL")
                  << ")";
    *ok = false;
    return nullptr;
  }
  *ok = upload(dst, host.data(), host.size() * sizeof(uint16_t)) && *ok;
  return dst;
}
}  // namespace

bool runAndCheck(Ep& ep, DeviceInputs& in, const Problem& p, const Reference& ref,
                 const RunOpts& o, const char* tag) {
  const Shape& s = p.shape;
  const int me = rank(), T = p.tokens(me);
  const bool fp8 = s.dtype != ncclMoeBf16;
  std::string step = std::string(tag) + ": ";

  // Poison last dispatch's outputs (the window rows this dispatch writes again) and agree,
  // which also keeps peers from writing into this rank's window before the poison landed.
  bool ok = true;
  if (ep.haveOut) ok = poisonDispatchOutput(ep.lastOut, s, o.reuseRouting);
  if (!allRanksOk(ok, (step + "poison").c_str())) return false;

  ncclMoeDispatchOutput_t out;
  memset(&out, 0, sizeof(out));
  ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), fp8 ? in.scales.as<float>() : nullptr,
                              o.reuseRouting ? nullptr : in.topkIdx.as<int64_t>(),
                              o.dispatchWeights ? in.weights.as<float>() : nullptr, T, o.flags,
                              &ep.handle, &out, stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (!allRanksOk(ok, (step + "ncclMoeDispatch").c_str())) return false;
  ep.lastOut = out;
  ep.haveOut = true;

  DispatchChecks dc;
  dc.weights = o.dispatchWeights;
  dc.hostCounts = (o.flags & NCCL_MOE_DISPATCH_HOST_COUNTS) != 0;
  long bad = checkDispatch(out, p, ref.recv[me], dc, tag);
  agreeMismatches(bad, (step + "dispatch output").c_str());

  if (o.combine) {
    DevMem copyBuf, combOut((size_t)s.maxTokens * s.hidden * 2);
    ok = combOut.get() != nullptr;
    const void* expertOut = prepareExpertOut(o.src, out, p, ref, copyBuf, &ok);
    ok = poison(combOut.get(), combOut.bytes()) && ok;
    if (ok)
      ok = MOE_OK(ncclMoeCombine(ep.comm, ep.handle, expertOut,
                                 o.combineWeighted ? in.weights.as<float>() : nullptr,
                                 combOut.get(), stream()));
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    if (!allRanksOk(ok, (step + "ncclMoeCombine").c_str())) return false;
    std::vector<uint16_t> expected = referenceCombine(p, ref, o.combineWeighted);
    bad = checkCombine(combOut.get(), expected, T, s.hidden, tag, o.combineResult);
    agreeMismatches(bad, (step + "combine output").c_str());
  }
  ok = MOE_OK(ncclMoeCheckErrors(ep.comm));
  return allRanksOk(ok, (step + "ncclMoeCheckErrors").c_str());
}

bool replayGraphAndCheck(Ep& ep, const OwnedGraph& g, DeviceInputs& in, const ncclMoeDispatchOutput_t& out,
                         const Problem& q, void* expertStaging, DevMem* combOut, bool weighted,
                         const std::string& tag) {
  const Shape& s = q.shape;
  const int me = rank();
  const Reference ref = makeReference(q);
  bool ok = in.upload(q);
  if (expertStaging != nullptr)
    ok = upload(expertStaging, ref.expertOut[me].data(), ref.expertOut[me].size() * 2) && ok;
  ok = poisonDispatchOutput(out, s) && ok;
  if (combOut != nullptr) ok = poison(combOut->get(), combOut->bytes()) && ok;
  if (!allRanksOk(ok, (tag + ": inputs and poison").c_str())) return false;
  ok = CUDA_OK(cudaGraphLaunch(g.exec, stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (!allRanksOk(ok, (tag + ": cudaGraphLaunch").c_str())) return false;
  DispatchChecks dc;
  agreeMismatches(checkDispatch(out, q, ref.recv[me], dc, tag.c_str()), (tag + ": dispatch output").c_str());
  if (combOut != nullptr)
    agreeMismatches(checkCombine(combOut->get(), referenceCombine(q, ref, weighted), q.tokens(me), s.hidden,
                                 tag.c_str()),
                    (tag + ": combine output").c_str());
  return allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), (tag + ": check errors").c_str());
}

void runScenario(const Shape& s, const GenSpec& g, const RunOpts& o) {
  Ep ep(s);
  if (!ep.create()) return;
  DeviceInputs in;
  for (int round = 0; round < 2; round++) {
    GenSpec gr = g;
    gr.seed = g.seed + 1000003ull * round;
    Problem p = makeProblem(s, gr);
    Reference ref = makeReference(p);
    if (!allRanksOk(in.upload(p), "upload inputs")) return;
    std::string tag = s.str() + (round ? " [2nd dispatch, new routing, handle reused]"
                                       : " [1st dispatch, new handle]");
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
  }
}

}  // namespace moe_gpu
