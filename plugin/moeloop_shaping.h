// Shaping of the fake NICs (off by default):
//   NCCL_MOELOOP_GBPS=<GB/s>         caps each fake NIC at this many 1e9 bytes/s per direction
//                                    (egress token bucket on sends, ingress bucket on receives)
//   NCCL_MOELOOP_LATENCY_US=<us>     a message completes at the receiver no earlier than this
//                                    long after its sender started it (one-way latency)
// Each process has its own fake NIC per device; NET and GIN traffic share it. The variables are
// read once, at the first plugin init of the process.
#pragma once
#include <atomic>
#include <mutex>
#include <stddef.h>
#include <stdint.h>

namespace moeloop {

uint64_t nowNs();  // CLOCK_MONOTONIC, comparable between processes of one host

struct ShapingConfig {
  double bytesPerSec = 0;  // 0: unlimited
  uint64_t latencyNs = 0;
};

// The process-wide configuration (environment, read once).
ShapingConfig shapingConfig();
// Overrides the configuration (unit tests) and refills every bucket.
void setShapingConfig(const ShapingConfig& cfg);

// Token bucket of one direction of one fake NIC.
class TokenBucket {
 public:
  // Bytes that may move now, between 0 and `want` (all of `want` when unlimited). Grants smaller
  // than a few KiB are refused while `want` is larger, so that throttled sockets move in chunks.
  size_t take(size_t want);
  // Returns tokens taken but not used.
  void giveBack(size_t n);
  void reset();

 private:
  std::mutex mu_;
  double tokens_ = -1;  // < 0: not initialised
  uint64_t lastNs_ = 0;
};

struct FakeNic {
  TokenBucket egress, ingress;
};

constexpr int kMaxDevs = 1;  // fake NICs per process (one per process = one per GPU)
FakeNic* fakeNic(int dev);

// Earliest completion time of a message its sender started at `sendNs`.
inline uint64_t deliveryDeadline(uint64_t sendNs) { return sendNs + shapingConfig().latencyNs; }

}  // namespace moeloop
