// The token claims of the HT intranode dispatch (src/device/ht/token_claim.h) on the CPU: the
// claim word's arithmetic, the install of a new dispatch's tag against stale words (fixed
// interleavings of two warps), and threads standing in for warps over many launches with
// std::atomic, the kernel's claim loop copied, checking that every token is taken exactly once:
// fresh and zeroed words, launches that stop after their first claim (a failed wait), launches
// that skip the end store, and sequence numbers across the 2^32 wrap of the tag.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "device/ht/token_claim.h"

using namespace nccl_moe;

namespace {

struct Word {
  std::atomic<uint64_t> v{0};
  uint64_t add(uint32_t chunk) { return v.fetch_add(chunk); }
  uint64_t cas(uint64_t expected, uint64_t desired) {
    v.compare_exchange_strong(expected, desired);
    return expected;  // the value found, as atomicCAS returns it
  }
  uint32_t resolve(uint64_t old, uint32_t tag, uint32_t chunk) {
    return resolveClaim(
        old, tag, chunk, [this](uint64_t e, uint64_t d) { return cas(e, d); }, [this, chunk] { return add(chunk); });
  }
};

TEST(TokenClaim, WordFields) {
  const uint64_t w = claimWord(0xdeadbeefu, 12345u);
  EXPECT_EQ(claimTag(w), 0xdeadbeefu);
  EXPECT_EQ(claimNext(w), 12345u);
  EXPECT_EQ(claimWord(7, 0), 7ull << 32);
}

TEST(TokenClaim, ChunkSize) {
  // The measured shape: 4096 tokens, 16 warps per CTA (512 threads), 16 to 48 CTAs.
  EXPECT_EQ(claimChunk(4096, 16 * 16), kDispatchClaimTokens);  // 16 tokens per warp
  EXPECT_EQ(claimChunk(4096, 18 * 16), kDispatchClaimTokens);
  EXPECT_EQ(claimChunk(4096, 32 * 16), kDispatchClaimTokens);  // 8 per warp: 4 claims of 2
  EXPECT_EQ(claimChunk(4096, 48 * 16), 1);                     // 5.3 per warp
  EXPECT_EQ(claimChunk(512, 24 * 16), 1);
  EXPECT_EQ(claimChunk(0, 16), 1);
  EXPECT_EQ(claimChunk(1, 1), 1);
  EXPECT_EQ(claimChunk(8 * kDispatchClaimTokens - 1, 2), 1);
  EXPECT_EQ(claimChunk(8 * kDispatchClaimTokens, 2), kDispatchClaimTokens);
  EXPECT_EQ(claimChunk(2000000000, 132 * 16), kDispatchClaimTokens);  // no overflow
}

// The word already carries this dispatch's tag: the add's old value is the claim.
TEST(TokenClaim, CurrentTagIsTheClaim) {
  Word w;
  w.v = claimWord(9, 14);
  EXPECT_EQ(w.resolve(w.add(2), 9, 2), 14u);
  EXPECT_EQ(w.v.load(), claimWord(9, 16));
}

// A zeroed word (new context, NCCL_MOE_SEQ_START) whose tag happens to equal the dispatch's: next
// is 0, so the claims start at 0 all the same.
TEST(TokenClaim, ZeroedWordMatchingTagStartsAtZero) {
  Word w;
  EXPECT_EQ(w.resolve(w.add(2), 0, 2), 0u);
  EXPECT_EQ(w.resolve(w.add(2), 0, 2), 2u);
}

// Two warps, both adding to a stale word before either resolves: the first to CAS installs the
// counter and takes [0, c); the other's CAS finds the new tag and claims [c, 2c) with an add.
TEST(TokenClaim, TwoStaleAddsThenInstall) {
  Word w;
  w.v = claimWord(5, 37);  // the previous dispatch left 37
  const uint64_t a = w.add(2), b = w.add(2);
  EXPECT_EQ(claimTag(a), 5u);
  EXPECT_EQ(w.resolve(a, 6, 2), 0u);  // A's CAS fails once (B's add), then installs
  EXPECT_EQ(w.v.load(), claimWord(6, 2));
  EXPECT_EQ(w.resolve(b, 6, 2), 2u);
  EXPECT_EQ(w.resolve(w.add(2), 6, 2), 4u);
  EXPECT_EQ(w.v.load(), claimWord(6, 6));
}

// B adds after A installed: B's add already sees the new tag.
TEST(TokenClaim, AddAfterInstallIsPlain) {
  Word w;
  w.v = claimWord(1, 0);
  EXPECT_EQ(w.resolve(w.add(1), 2, 1), 0u);
  const uint64_t b = w.add(1);
  EXPECT_EQ(claimTag(b), 2u);
  EXPECT_EQ(w.resolve(b, 2, 1), 1u);
}

// The second warp resolves first: it installs and takes 0, and the first one gets c.
TEST(TokenClaim, LaterAddMayInstall) {
  Word w;
  w.v = claimWord(41, 100);
  const uint64_t a = w.add(4), b = w.add(4);
  EXPECT_EQ(w.resolve(b, 42, 4), 0u);  // b + 4 is the word: its CAS succeeds at once
  EXPECT_EQ(w.resolve(a, 42, 4), 4u);
  EXPECT_EQ(w.v.load(), claimWord(42, 8));
}

// The tag wraps with the sequence number: seq 2^32 - 1 then 2^32 (tags 0xffffffff, 0).
TEST(TokenClaim, TagWrap) {
  Word w;
  w.v = claimWord(0xfffffffeu, 0);
  EXPECT_EQ(w.resolve(w.add(2), 0xffffffffu, 2), 0u);
  EXPECT_EQ(w.resolve(w.add(2), 0xffffffffu, 2), 2u);
  EXPECT_EQ(w.resolve(w.add(2), 0u, 2), 0u);
  EXPECT_EQ(w.v.load(), claimWord(0, 2));
}

// Threads as warps over many launches; the kernel's loop (dispatch_lsa.cu): the first claim
// before the counts wait, then ranges of `chunk` tokens, the next claim issued at the range's
// last token, no claim after a range that reaches numTokens.
enum class Ending { EndStore, NoEndStore, FirstClaimOnly };

void warpLoop(Word& w, uint32_t tag, int numTokens, int chunk, bool storeTokens, std::vector<std::atomic<int>>& done,
              unsigned seed, const std::atomic<bool>& go) {
  std::minstd_rand rng(seed);
  while (!go.load()) {
  }  // all threads start together: their first claims race on the stale word
  auto maybeYield = [&] {
    if (rng() % 4 == 0) std::this_thread::yield();
  };
  if (numTokens == 0) return;
  const uint64_t firstClaim = w.add(chunk);
  maybeYield();
  if (!storeTokens) return;  // the counts wait failed: the claim is dropped
  int first = (int)w.resolve(firstClaim, tag, chunk);
  while (first < numTokens) {
    const int end = std::min(first + chunk, numTokens);
    const bool more = first + chunk < numTokens;
    uint64_t next = 0;
    for (int t = first; t < end; ++t) {
      if (more && t == end - 1) next = w.add(chunk);
      done[t].fetch_add(1);
      maybeYield();
    }
    first = more ? (int)w.resolve(next, tag, chunk) : numTokens;
  }
}

void runLaunches(uint64_t seq0, int launches, int threads, Ending ending, uint64_t word0) {
  Word w;
  w.v = word0;
  std::mt19937 rng((unsigned)seq0 ^ 0x9e3779b9u);
  for (int l = 0; l < launches; ++l) {
    const uint64_t seq = seq0 + l;
    const int numTokens = l % 7 == 0 ? (int)(rng() % 4) : (int)(rng() % 400);
    const int chunk = claimChunk(numTokens, threads);
    // Every third launch of FirstClaimOnly fails its wait; the others store normally.
    const bool storeTokens = !(ending == Ending::FirstClaimOnly && l % 3 == 1);
    std::vector<std::atomic<int>> done(numTokens);
    for (auto& d : done) d = 0;
    std::vector<std::thread> ts;
    std::atomic<bool> go{false};
    for (int i = 0; i < threads; ++i)
      ts.emplace_back(warpLoop, std::ref(w), (uint32_t)seq, numTokens, chunk, storeTokens, std::ref(done),
                      (unsigned)(seq * 131 + i), std::cref(go));
    go = true;
    for (auto& t : ts) t.join();
    int wrong = 0;
    for (int t = 0; t < numTokens; ++t) wrong += done[t].load() != (storeTokens ? 1 : 0);
    ASSERT_EQ(wrong, 0) << "seq " << seq << ": " << numTokens << " tokens, chunk " << chunk;
    if (storeTokens && numTokens > 0) {
      // The counter stays far below 2^32: one overshooting claim and one stale add per warp.
      EXPECT_LE(claimNext(w.v.load()), (uint32_t)(numTokens + 2 * threads * chunk));
      EXPECT_EQ(claimTag(w.v.load()), (uint32_t)seq);
    }
    if (ending == Ending::EndStore) w.v = claimWord((uint32_t)seq, 0);
  }
}

TEST(TokenClaim, ThreadsOverLaunchesWithEndStore) { runLaunches(1, 300, 6, Ending::EndStore, 0); }

// Without the end store the tag alone keeps launches apart (the word keeps the last count).
TEST(TokenClaim, ThreadsOverLaunchesTagOnly) { runLaunches(1, 300, 6, Ending::NoEndStore, 0); }

// Launches that fail their counts wait after the first claim (stale adds to the word, or adds to
// a counter nobody finishes), then normal launches.
TEST(TokenClaim, ThreadsOverFailedLaunches) { runLaunches(1, 300, 5, Ending::FirstClaimOnly, 0); }

// Sequence numbers across the tag's wrap, starting from a zeroed word (NCCL_MOE_SEQ_START).
TEST(TokenClaim, ThreadsAcrossTagWrap) {
  runLaunches(0xffffffffull - 100, 200, 4, Ending::NoEndStore, 0);
  runLaunches(0xffffffffull - 100, 200, 4, Ending::EndStore, 0);
  runLaunches(0xffffffffffffffffull - 5, 20, 4, Ending::EndStore, 0);  // the 64-bit wrap: seq 0
}

}  // namespace
