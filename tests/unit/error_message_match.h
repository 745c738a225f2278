// Matching of last-error messages in the CPU tests: a message must name the argument at fault
// and its value as whole tokens, so that "x" is not found inside "xScales" nor 4 inside 4096.
#pragma once
#include <ctype.h>
#include <string>
#include <gtest/gtest.h>
#include "nccl_moe.h"

// True when `msg` contains `name` as a whole identifier.
inline bool containsWord(const std::string& msg, const std::string& name) {
  auto ident = [](char ch) { return isalnum((unsigned char)ch) || ch == '_'; };
  for (size_t p = msg.find(name); p != std::string::npos; p = msg.find(name, p + 1)) {
    bool before = p > 0 && ident(msg[p - 1]);
    bool after = p + name.size() < msg.size() && ident(msg[p + name.size()]);
    if (!before && !after) return true;
  }
  return false;
}

// True when `msg` contains the decimal `v` as a whole number (not part of a longer one).
inline bool containsNumber(const std::string& msg, long long v) {
  const std::string s = std::to_string(v);
  for (size_t p = msg.find(s); p != std::string::npos; p = msg.find(s, p + 1)) {
    bool digitBefore = p > 0 && (isdigit((unsigned char)msg[p - 1]) || (v >= 0 && msg[p - 1] == '-'));
    bool digitAfter = p + s.size() < msg.size() && isdigit((unsigned char)msg[p + s.size()]);
    if (!digitBefore && !digitAfter) return true;
  }
  return false;
}

// Expects `call` to return `code` with a last error that names `word` as a whole identifier.
#define EXPECT_FAILS(call, code, word)                                                       \
  do {                                                                                       \
    EXPECT_EQ((call), (code)) << #call;                                                      \
    const std::string msg_ = ncclMoeGetLastError();                                          \
    EXPECT_TRUE(containsWord(msg_, word)) << #call << ": \"" << msg_ << "\" lacks " << word; \
  } while (0)
