// Shared harness of the multi-GPU tests: the per-rank global state (communicator, stream),
// return-code checks, cross-rank agreement, deterministic problem generation, and the
// dispatch / combine runner that compares every output with the CPU reference (moe_ref).
//
// Rules every test follows (each rank runs the whole suite; collectives must line up):
//  - the sequence of collective calls (EP context creation, dispatch, combine, agree*) depends
//    only on data every rank has, never on a rank's own results;
//  - data comparisons use EXPECT_* and count mismatches; API failures are recorded with
//    ADD_FAILURE and then agreed on with allRanksOk(), so that all ranks leave a test together.
#pragma once
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string>
#include <vector>
#include "nccl_moe.h"
#include "../../testing/ranks.h"
#include "../../testing/reference.h"

namespace moe_gpu {

// --- global state (set up once by the environment in main.cc) ------------------------------
int rank();
int nRanks();
ncclComm_t comm();
cudaStream_t stream();
void setGlobal(int rank, int nRanks, ncclComm_t comm, cudaStream_t stream);
// Non-empty when the suite cannot run here (no GPUs, one GPU): every test reports skipped.
void setSkipReason(const std::string& reason);
const std::string& skipReason();

// Base of every test fixture: skips (gtest counts the test as skipped) when setSkipReason said so.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!skipReason().empty()) GTEST_SKIP();
  }
};

// Sets environment variable `name` to `value` (NULL: unsets it) for its scope, then puts back
// what the process had. The library reads its NCCL_MOE_* variables in ncclMoeCommCreate, so a
// context created in the scope keeps the setting.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

// --- return-code checks: add a (non-fatal) failure and return false on error ----------------
bool checkNccl(ncclResult_t res, const char* expr, const char* file, int line);
bool checkCuda(cudaError_t err, const char* expr, const char* file, int line);
#define MOE_OK(call) ::moe_gpu::checkNccl((call), #call, __FILE__, __LINE__)
#define CUDA_OK(call) ::moe_gpu::checkCuda((call), #call, __FILE__, __LINE__)

// Collective: true when `localOk` holds on every rank. A rank that was fine records a failure
// naming the step when another rank was not, so rank 0's output shows every failure.
bool allRanksOk(bool localOk, const char* step);
// Collective: sums `localMismatches` over ranks; adds a failure on a rank whose own count is 0
// while the total is not. Returns the total.
long agreeMismatches(long localMismatches, const char* what);
// Leaves the calling (void) test function on every rank when `ok` failed on any rank.
#define MOE_AGREE_OR_RETURN(ok, step)                          \
  do {                                                         \
    if (!::moe_gpu::allRanksOk((ok), (step))) return;          \
  } while (0)

// --- device memory ---------------------------------------------------------------------------
class DevMem {
 public:
  DevMem() = default;
  explicit DevMem(size_t bytes) { alloc(bytes); }
  ~DevMem();
  DevMem(const DevMem&) = delete;
  DevMem& operator=(const DevMem&) = delete;
  bool alloc(size_t bytes);  // at least 1 byte, so that the pointer is never NULL
  void* get() const { return p_; }
  template <class T> T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }
 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

bool upload(void* dst, const void* src, size_t bytes);    // synchronous
bool download(void* dst, const void* src, size_t bytes);  // synchronous, on stream()
bool poison(void* dst, size_t bytes);                      // 0xFF bytes, synchronous
// Bytes of [dev, dev + bytes) no longer 0xFF; a non-zero count is reported as a failure naming
// `what`.
long countUnpoisoned(const void* dev, size_t bytes, const std::string& what);

// --- shapes and problems ----------------------------------------------------------------------
struct Shape {
  int hidden = 7168;
  int topK = 8;
  int experts = 32;  // rounded up to a multiple of the number of ranks by makeConfig
  int maxTokens = 512;
  ncclMoeDtype_t dtype = ncclMoeBf16;
  int numSms = 24;
  int outputCapacity = 0;  // 0 = R * maxTokens
  int timeoutMs = 10000;
  int numExperts() const;  // experts rounded up to a multiple of nRanks()
  int capacity() const { return outputCapacity > 0 ? outputCapacity : nRanks() * maxTokens; }
  int rowBytes() const { return hidden * (dtype == ncclMoeBf16 ? 2 : 1); }
  int scalesPerRow() const { return dtype == ncclMoeBf16 ? 0 : hidden / 128; }
  std::string str() const;
};
ncclMoeConfig_t makeConfig(const Shape& s);
// The HT shape most GPU tests use: top-8, 512 tokens per rank, the given H, experts and dtype.
inline Shape htShape(int hidden, int experts, ncclMoeDtype_t dtype) {
  Shape s;
  s.hidden = hidden;
  s.topK = 8;
  s.experts = experts;
  s.maxTokens = 512;
  s.dtype = dtype;
  return s;
}
// A BF16 shape (H 2048, top-8 of 32 experts, 5 s timeout) with the given token bound and
// receive capacity, for the overflow and validation tests.
inline Shape capacityShape(int maxTokens, int capacity) {
  Shape s;
  s.hidden = 2048;
  s.topK = 8;
  s.experts = 32;
  s.maxTokens = maxTokens;
  s.outputCapacity = capacity;
  s.timeoutMs = 5000;
  return s;
}
// A small BF16 shape (H 1024, top-4 of 16 experts, 64 tokens, 5 s timeout) for tests of
// lifetimes and failures, where the data size does not matter.
inline Shape smallShape() {
  Shape s;
  s.hidden = 1024;
  s.topK = 4;
  s.experts = 16;
  s.maxTokens = 64;
  s.timeoutMs = 5000;
  return s;
}

// The node routes below see the R ranks as GenSpec::nodes nodes of G = R / nodes consecutive
// ranks (node n: ranks n*G .. n*G+G-1, experts n*G*L .. (n+1)*G*L-1, L = E / R), whatever the
// run's real topology: a test passes nodeCount() to route by the real nodes, a fixed number to
// get the same routing on every topology. Each entry not forced by the route is -1 with
// probability dropProb, as Random.
enum class Route {
  Random,        // K distinct experts per token, each entry -1 with probability dropProb
  OneExpert,     // expert 0 for every token, the other K-1 entries -1
  RankZeroOnly,  // min(K, E/R) distinct experts of rank 0, the rest -1
  NodeLimited,   // per token min(nodesPerToken, nodes) distinct random nodes, then min(K, pool)
                 // distinct experts of those nodes' ranks
  OwnNode,       // experts of the sending rank's own node only
  RemoteNode,    // experts of node (own node + 1) % nodes only (one node: the own node)
  AvoidLastNode, // experts of every rank but those of the last node (one node: but the last
                 // rank), which then receives nothing
  EveryNode      // entry n < min(K, nodes) is an expert of node n (never dropped), the others
                 // distinct random experts: every token goes to every node
};

struct GenSpec {
  uint64_t seed = 1;
  Route route = Route::Random;
  double dropProb = 0.1;
  int numTokens = -1;      // >= 0: every rank sends this many; -1: maxTokens minus a per-rank
                           // amount (different T on every rank, same for every seed)
  int zeroTokenRank = -1;  // this rank (if it exists) sends no tokens
  int nodes = 1;           // node routes: the node count they assume (must divide R; else 1)
  int nodesPerToken = 2;   // NodeLimited: at most this many nodes per token
};

// The nodes the ranks of this run form: MOE_FAKE_NODES (moe_ranks::fakeNodes(), 1 on one node;
// initComm refuses a count that does not divide R), and the ranks per node, R / nodeCount().
int nodeCount();
int gpusPerNode();
// The usual spec: a seed, a routing kind and (default -1: per rank, the same for every seed,
// as a CUDA graph needs) the token count.
GenSpec spec(uint64_t seed, Route route = Route::Random, int numTokens = -1);

// Every rank's inputs, generated on the host from (seed, rank) so that each rank can compute
// the reference for all ranks without communication.
struct Problem {
  Shape shape;
  std::vector<moe_ref::Routing> routing;   // [R]
  std::vector<std::vector<uint8_t>> x;     // [R][T][rowBytes]
  std::vector<std::vector<float>> scales;  // [R][T][H/128], empty for BF16
  int tokens(int r) const { return routing[r].numTokens; }
};
Problem makeProblem(const Shape& s, const GenSpec& g);
// New token data (same routing), from another seed.
void regenerateX(Problem& p, uint64_t seed);
// Cuts rank r's tokens to their first tokens[r] (routing, weights, data and scales; a count
// above the rank's is left as it is): per-rank token counts that GenSpec cannot express.
void cutTokens(Problem& p, const std::vector<int>& tokens);
// Keeps the first min(tokens, numTokens) tokens (at least 0) of a routing: its new token count.
int trimRouting(moe_ref::Routing& rt, int tokens, int topK);

// Reference results of one problem: what every rank receives, and the identity expert's
// BF16 output on every rank (the received rows, dequantised for FP8).
struct Reference {
  std::vector<moe_ref::Received> recv;             // [R]
  std::vector<std::vector<uint16_t>> expertOut;    // [R][rows][H]
};
Reference makeReference(const Problem& p);
// This rank's expected combine output. One node: moe_ref::combine. Across fake nodes
// (nodeCount() > 1) the HT internode rounding contract, moe_net::htSimulateCombine with
// G = gpusPerNode() (one BF16 rounding per remote node's partial). combineWeights ([R][T * K]):
// the topkWeights each rank passes to combine when they are not the routing's (empty: the
// routing's, as the runners pass them).
std::vector<uint16_t> referenceCombine(const Problem& p, const Reference& ref, bool weighted,
                                       const std::vector<std::vector<float>>& combineWeights = {});
// This rank's expected per-row top-k values of ncclMoeCombineWithWeights (values[r]: rank r's
// [rows][K]). One node: moe_ref::combineTopkValues; across fake nodes the FP32 sum grouped by
// node (moe_net::htSimulateCombineTopkValues).
std::vector<float> referenceTopkValues(const Problem& p, const std::vector<std::vector<float>>& values);

// This rank's inputs in device memory, sized for maxTokens (same buffers reused by uploads).
struct DeviceInputs {
  DevMem x, scales, topkIdx, weights;
  bool upload(const Problem& p);  // allocates on first use
};

// --- comparisons (this rank; return the number of mismatches, print the first few) ----------
struct DispatchChecks {
  bool topkIdx = true;
  bool weights = true;     // only when the dispatch was given weights
  bool hostCounts = false; // the dispatch used NCCL_MOE_DISPATCH_HOST_COUNTS
};
long checkDispatch(const ncclMoeDispatchOutput_t& out, const Problem& p,
                   const moe_ref::Received& ref, const DispatchChecks& what, const char* tag);
long checkCombine(const void* devOut, const std::vector<uint16_t>& expected, int numTokens,
                  int hidden, const char* tag, std::vector<uint16_t>* got = nullptr);
// Poisons (0xFF) the output regions a dispatch writes: capacity rows of x and scales, and
// unless `rowsOnly`, topkIdx, weights and the counts. A cached dispatch (topkIdx = NULL) gets
// rowsOnly: whether it rewrites the routing outputs is left open by the header, and with the
// same routing their old contents are what it would write.
bool poisonDispatchOutput(const ncclMoeDispatchOutput_t& out, const Shape& s,
                          bool rowsOnly = false);

// A captured CUDA graph and its executable, destroyed at scope exit.
struct OwnedGraph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~OwnedGraph() {
    if (exec) CUDA_OK(cudaGraphExecDestroy(exec));
    if (graph) CUDA_OK(cudaGraphDestroy(graph));
  }
};

// --- EP context owning its handle; destroyed (collectively) at scope exit -------------------
class Ep {
 public:
  explicit Ep(const Shape& s) : shape(s) {}
  ~Ep();
  Ep(const Ep&) = delete;
  Ep& operator=(const Ep&) = delete;
  bool create();          // collective; agreed over ranks
  void destroyHandle();   // local
  Shape shape;
  ncclMoeComm_t comm = nullptr;
  ncclMoeHandle_t handle = nullptr;
  ncclMoeDispatchOutput_t lastOut{};  // outputs of the last successful dispatch
  bool haveOut = false;
};

// One replay of g, whose capture holds a dispatch on ep's handle (outputs `out`) and, when
// combOut is not NULL, its combine into combOut: uploads q's inputs (and, with expertStaging, this
// rank's expert output of q there: the source of a captured copy), poisons the outputs, launches,
// then checks the dispatch output and the combine output (weighted or not) against q's reference
// and the context's error records. Collective; false once a step failed on some rank.
bool replayGraphAndCheck(Ep& ep, const OwnedGraph& g, DeviceInputs& in, const ncclMoeDispatchOutput_t& out,
                         const Problem& q, void* expertStaging, DevMem* combOut, bool weighted,
                         const std::string& tag);

// Where combine reads the expert output from.
enum class ExpertSrc {
  DispatchX,     // out.x itself (zero-copy; BF16 only)
  CombineInput,  // written into out.combineInput (zero-copy)
  Copy           // a separate cudaMalloc'ed buffer (the library copies it)
};

struct RunOpts {
  unsigned flags = 0;
  bool reuseRouting = false;     // topkIdx = NULL: the handle's routing
  bool dispatchWeights = true;   // pass topkWeights to dispatch
  bool combine = true;
  bool combineWeighted = true;
  ExpertSrc src = ExpertSrc::DispatchX;  // FP8 dispatch falls back to CombineInput
  std::vector<uint16_t>* combineResult = nullptr;  // receives this rank's combine output
};

// One dispatch (+ combine) of `p` on `ep` with the inputs in `in` (already uploaded), every
// output poisoned first and compared with the reference. Collective. Returns false when an API
// step failed on some rank (all ranks return false together); data mismatches are test failures
// but do not change the return value.
bool runAndCheck(Ep& ep, DeviceInputs& in, const Problem& p, const Reference& ref,
                 const RunOpts& o, const char* tag);

// Generates, uploads and runs a whole scenario: dispatch + combine twice on one context (the
// second time on new routing and data, reusing the handle, with outputs poisoned).
void runScenario(const Shape& s, const GenSpec& g, const RunOpts& o);

}  // namespace moe_gpu
