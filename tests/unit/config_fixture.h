// The configuration the CPU config tests start from: a DeepSeek-V3-sized HT context on 4 ranks
// of a 132-SM GPU, valid as it is; each test changes one field.
#pragma once
#include "nccl_moe.h"

namespace config_fixture {

constexpr int kRanks = 4;
constexpr int kSms = 132;

inline ncclMoeConfig_t goodConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.numExperts = 64;
  c.hidden = 7168;
  c.topK = 8;
  c.maxTokensPerRank = 4096;
  c.numSms = 24;
  return c;
}

}  // namespace config_fixture
