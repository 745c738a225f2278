// Harness of the low-latency (LL) multi-GPU tests: shapes, deterministic problems, an EP context
// wrapper that poisons each buffer slot before the dispatch that reuses it, the checks of the
// expert-major dispatch output against moe_ref (testing/reference_ll.h) and the combine
// runners. Rules of tests/gpu/gpu_env.h apply: every rank runs the same collective sequence,
// API failures are agreed on with allRanksOk.
//
// Expert outputs used by the combine tests:
//  - identity: the row itself (BF16) or its dequantisation rounded to BF16 (FP8), written at the
//    positions where the dispatch put the rows (computed on the host from the downloaded rows);
//  - block-constant: every row of block (l, s) on rank r holds blockValue(r, l, s, h), so the
//    combine result does not depend on the (unspecified) order inside a block; used where the
//    host cannot look at the rows between dispatch and combine (graphs, operations in flight).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "gpu_env.h"
#include "../../testing/reference_ll.h"

namespace moe_gpu {

struct LlShape {
  int hidden = 2048;
  int topK = 8;
  int experts = 32;  // rounded up to a multiple of the number of ranks
  int maxTokens = 128;
  bool fp8 = false;
  ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32;
  int numSms = 24;
  int slots = 2;
  int timeoutMs = 10000;  // 0 = the library default (30 s)
  int numExperts() const;
  int local() const { return numExperts() / nRanks(); }
  size_t blockRows() const { return (size_t)nRanks() * maxTokens; }  // B = R*M
  size_t slotRows() const { return (size_t)local() * blockRows(); }  // L*B
  int rowBytes() const { return fp8 ? hidden : 2 * hidden; }
  int scaleBytes() const { return fp8 ? moe_ref::llScaleBytesPerRow(hidden, fmt) : 0; }
  std::string str() const;
};
ncclMoeConfig_t makeLlConfig(const LlShape& s);
const char* scaleFormatName(ncclMoeScaleFormat_t f);

// Every rank's inputs (from GenSpec as in gpu_env.h: seed, routing kind, drop probability,
// tokens per rank, a zero-token rank) and what each rank sends.
struct LlProblem {
  LlShape shape;
  std::vector<moe_ref::Routing> routing;  // [R]; weights are multiples of 1/16
  std::vector<std::vector<uint16_t>> x;   // [R][T][H] BF16
  std::vector<moe_ref::LlRows> send;      // [R] rows as cast by the sender
  int tokens(int r) const { return routing[r].numTokens; }
};
// BF16 tokens with per-group magnitudes 2^-4..2^4, plus some all-zero groups and groups below
// the 1e-4 amax floor (to exercise the clamp).
LlProblem makeLlProblem(const LlShape& s, const GenSpec& g);

// Recomputes rank r's sent rows (p.send[r]) from p.x[r], after a test changed its tokens.
void resendRows(LlProblem& p, int r);
// Cuts rank r's tokens to their first tokens[r] (a count above the rank's is left as it is) and
// recomputes what it sends: per-rank token counts that GenSpec cannot express.
void cutLlTokens(LlProblem& p, const std::vector<int>& tokens);

// This rank's input buffers, sized for maxTokens.
struct LlInputs {
  DevMem x, topkIdx, weights;
  bool upload(const LlProblem& p);
};

// What this rank downloaded of one dispatch: for every block (l, s) the rows in device order.
struct LlBlocks {
  std::vector<int> counts, expertCounts;           // [L][R], [L]
  std::vector<std::vector<int>> srcToken;          // [L*R][n]
  std::vector<std::vector<uint8_t>> rows, scales;  // [L*R][n * rowBytes], [L*R][n * scaleBytes]
};

// Bits of FP8 byte `col` of source `src`'s token t that the row comparison looks at (0xff: all;
// 0x7f: all but the sign, for a NaN whose sign the CPU and the GPU produce differently).
using LlByteMask = std::function<uint8_t(int src, int t, int col)>;
// Compares counts (and, unless countsOnly, every block as a set keyed by srcToken: row bytes
// and scale bytes) with the reference. Fills *got (downloaded blocks) when not NULL. Returns
// mismatches on this rank; failures are recorded. mask (FP8 rows only): see LlByteMask.
long checkLlDispatch(const ncclMoeLowLatencyOutput_t& out, const LlProblem& p,
                     const moe_ref::LlReceived& ref, const char* tag, bool countsOnly = false,
                     LlBlocks* got = nullptr, const LlByteMask& mask = nullptr);
// The reference dispatch to this rank.
moe_ref::LlReceived llReference(const LlProblem& p);

// Expert outputs ([L][B][H] BF16 at dst). Identity: poisons dst, then writes the identity
// output of every downloaded row at its position. Block-constant: fills every row. Synchronous.
bool writeIdentityExpert(void* dst, const LlShape& s, const LlBlocks& got);
uint16_t blockValue(int rank, int l, int s, int h);
bool writeBlockConstantExpert(void* dst, const LlShape& s);
// Reference combine of this rank for the identity / block-constant expert (moe_ref::llCombine
// on this shape's experts and ranks); weighted = the dispatch was given the weights.
std::vector<uint16_t> llIdentityCombine(const LlProblem& p, bool weighted);
std::vector<uint16_t> llBlockConstantCombine(const LlProblem& p, bool weighted);

// A second stream of the process (created once), for split operations.
cudaStream_t sideStream();

// LL EP context; destroyed collectively at scope exit.
class LlEp {
 public:
  explicit LlEp(const LlShape& s) : shape(s), known(s.slots), haveSlot(s.slots, false) {}
  ~LlEp();
  LlEp(const LlEp&) = delete;
  LlEp& operator=(const LlEp&) = delete;
  bool create();  // collective; agreed
  bool destroy(); // collective (syncs the device first); not agreed
  // Poisons (0xFF, synchronous) x, xScales, srcToken and the counts of the slot the next
  // dispatch uses, when an earlier dispatch revealed it. Local: agree before dispatching.
  bool poisonNextSlot();
  bool poisonSlot(int slot);
  // Records a dispatch's output: checks slot prediction and that a slot's pointers never move.
  void record(const ncclMoeLowLatencyOutput_t& out, const char* tag);
  LlShape shape;
  ncclMoeComm_t comm = nullptr;
  std::vector<ncclMoeLowLatencyOutput_t> known;
  std::vector<bool> haveSlot;
  int nextSlot = 0;
};

// Dispatch of this rank's tokens (in already uploaded), one-shot or split, with in.weights when
// `weighted` (the combine of this operation then applies them) and NULL weights otherwise.
// Split: send-only on stream(), then after a host delay and other work on sideStream()
// (ordered by events) the completion there, and stream() waits for it. Not synchronised.
bool runLlDispatch(LlEp& ep, LlInputs& in, int numTokens, bool weighted, bool split,
                   ncclMoeLowLatencyOutput_t* out);
// Combine of `d` likewise (split: send-only on stream(), completion on sideStream()); routing
// and weights are those of d's dispatch.
bool runLlCombine(LlEp& ep, const ncclMoeLowLatencyOutput_t& d, const void* expertOut, void* out,
                  bool split);

enum class LlExpertSrc { CombineInput, Separate };
struct LlRunOpts {
  bool split = false;
  bool combine = true;
  bool weighted = true;  // the dispatch gets the weights (its combine applies them)
  LlExpertSrc src = LlExpertSrc::CombineInput;
  std::vector<uint16_t>* combineResult = nullptr;  // this rank's combine output
  LlBlocks* blocks = nullptr;                      // this rank's downloaded dispatch blocks
};

// Poison, dispatch, full check, identity expert, combine, check; collective. Returns false when
// an API step failed on some rank (data mismatches are failures but do not change it).
bool llRunAndCheck(LlEp& ep, LlInputs& in, const LlProblem& p, const LlRunOpts& o,
                   const std::string& tag);

// Fresh context, `rounds` dispatch + combine rounds with new data (seed + round); the combine
// source and weighting alternate: round r uses CombineInput when r % 2 == 0, and its dispatch
// gets the weights when r % 4 < 2 (with o.split / o.combine as given).
void llScenario(const LlShape& s, const GenSpec& g, const LlRunOpts& o, int rounds = 4);


}  // namespace moe_gpu
