// The random generator of the test and perf data (splitmix64): small, fast, and the same numbers
// for a given seed on every rank and host, so that every rank can rebuild any rank's inputs.
#pragma once
#include <stdint.h>

namespace moe_rng {

struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n >= 1 (multiply-shift on the high 32 bits).
  int below(int n) { return (int)(((next() >> 32) * (uint64_t)n) >> 32); }
  // Uniform in [0, 1), 53 bits.
  double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }
};

}  // namespace moe_rng
