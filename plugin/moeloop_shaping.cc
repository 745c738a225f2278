// Fake-NIC shaping: token buckets and latency (see moeloop_shaping.h).
#include "moeloop_shaping.h"

#include <math.h>
#include <stdlib.h>
#include <time.h>
#include "moeloop_log.h"

namespace moeloop {
namespace {

struct ConfigState {
  std::atomic<double> bytesPerSec{0};
  std::atomic<uint64_t> latencyNs{0};
};

double envDouble(const char* name) {
  const char* v = getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  double d = strtod(v, &end);
  if (end == v || *end != '\0' || !(d >= 0) || isinf(d)) {
    ML_WARN("ignoring %s=%s: expected a non-negative number", name, v);
    return 0;
  }
  return d;
}

ConfigState& configState() {
  static ConfigState* s = [] {
    ConfigState* st = new ConfigState();
    double gbps = envDouble("NCCL_MOELOOP_GBPS");
    double latUs = envDouble("NCCL_MOELOOP_LATENCY_US");
    st->bytesPerSec.store(gbps * 1e9);
    st->latencyNs.store((uint64_t)(latUs * 1e3));
    if (gbps > 0 || latUs > 0)
      ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_ENV, "shaping each fake NIC: %.3f GB/s, %.1f us latency",
              gbps, latUs);
    return st;
  }();
  return *s;
}

FakeNic gNics[kMaxDevs];

}  // namespace

double burstBytes(double rate) {
  double b = rate * 50e-6;  // 50 us of traffic
  return b < 64 * 1024 ? 64 * 1024 : b;
}

uint64_t nowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

ShapingConfig shapingConfig() {
  ConfigState& s = configState();
  ShapingConfig c;
  c.bytesPerSec = s.bytesPerSec.load(std::memory_order_relaxed);
  c.latencyNs = s.latencyNs.load(std::memory_order_relaxed);
  return c;
}

void setShapingConfig(const ShapingConfig& cfg) {
  ConfigState& s = configState();
  s.bytesPerSec.store(cfg.bytesPerSec);
  s.latencyNs.store(cfg.latencyNs);
  for (FakeNic& n : gNics) {
    n.egress.reset();
    n.ingress.reset();
  }
}

size_t TokenBucket::take(size_t want) { return take(want, kMinGrant, nowNs()); }

size_t TokenBucket::take(size_t want, size_t minGrant, uint64_t now) {
  double rate = configState().bytesPerSec.load(std::memory_order_relaxed);
  if (rate <= 0 || want == 0) return want;
  double burst = burstBytes(rate);
  std::lock_guard<std::mutex> lock(mu_);
  if (tokens_ < 0) {
    tokens_ = burst;
  } else {
    if (now > lastNs_) tokens_ += (double)(now - lastNs_) * rate * 1e-9;
    if (tokens_ > burst) tokens_ = burst;
  }
  if (now > lastNs_) lastNs_ = now;
  double avail = floor(tokens_);
  if (avail < 1) return 0;
  size_t grant = avail < (double)want ? (size_t)avail : want;
  if (grant < want && (double)grant < (double)minGrant && avail < burst) return 0;
  tokens_ -= (double)grant;
  return grant;
}

void TokenBucket::giveBack(size_t n) {
  if (n == 0) return;
  double rate = configState().bytesPerSec.load(std::memory_order_relaxed);
  if (rate <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (tokens_ >= 0) tokens_ += (double)n;
}

void TokenBucket::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  tokens_ = -1;
}

FakeNic* fakeNic(int dev) {
  if (dev < 0 || dev >= kMaxDevs) return nullptr;
  return &gNics[dev];
}

}  // namespace moeloop
