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

// Token bucket of one direction of one fake NIC: refills at bytesPerSec, holds at most
// burstBytes(bytesPerSec) (50 us of traffic, at least 64 KiB), starts full.
class TokenBucket {
 public:
  // Bytes that may move now, between 0 and `want` (all of `want` when unlimited). Grants smaller
  // than kMinGrant are refused while `want` is larger, so that throttled sockets move in chunks.
  size_t take(size_t want);
  // The same at time `now` (nowNs() clock), refusing grants below min(minGrant, want) unless the
  // bucket is full. The copy transport asks for large grants: each one costs a copy launch.
  size_t take(size_t want, size_t minGrant, uint64_t now);
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

constexpr size_t kMinGrant = 16 * 1024;
double burstBytes(double bytesPerSec);

// Earliest completion time of a message its sender started at `sendNs` (socket transport).
inline uint64_t deliveryDeadline(uint64_t sendNs) { return sendNs + shapingConfig().latencyNs; }
// Copy transport: a message whose data was in place at `readyNs` is delivered (its signal raised)
// no earlier than one latency later. Per message, not per byte: a stream of puts overlaps its
// latencies, so shaping adds the latency once to a round trip and nothing to a stream's rate.
inline uint64_t messageReleaseNs(uint64_t readyNs) { return readyNs + shapingConfig().latencyNs; }

}  // namespace moeloop
