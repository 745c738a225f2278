// Issue 10 item 9: config.version, pointer alignment, the messages of kernel-reported errors and
// the sticky state after a partial launch. (Device accessibility of pointers needs a GPU:
// tests/gpu/lifetime_test.cc.)
#include <stdint.h>
#include <string.h>
#include <gtest/gtest.h>

#include <string>

#include "config.h"
#include "error_message_match.h"
#include "config_fixture.h"
#include "fake_context.h"
#include "nccl_moe.h"
#include "pointer_check.h"

using namespace nccl_moe;

namespace {

using config_fixture::goodConfig;

void expectVersionRejected(unsigned version) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.version = version;
  EXPECT_EQ(validateConfig(&c, 4, 132, &r), ncclInvalidArgument) << version;
  const std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsWord(msg, "version") && containsNumber(msg, version)) << msg;
}

alignas(64) char buffer[256];

}  // namespace

TEST(ConfigVersion, UnknownMajorRejected) {
  expectVersionRejected(NCCL_MOE_VERSION_CODE + 10000);  // next major
  expectVersionRejected(0 + 90000);
  expectVersionRejected(12345678);
}

TEST(ConfigVersion, NewerThanLibraryRejected) { expectVersionRejected(NCCL_MOE_VERSION_CODE + 1); }

TEST(ConfigVersion, ThisLibraryAndOlderMinorAccepted) {
  ncclMoeConfig_t c = goodConfig(), r;
  EXPECT_EQ(validateConfig(&c, 4, 132, &r), ncclSuccess) << ncclMoeGetLastError();
  c.version = NCCL_MOE_MAJOR * 10000;  // x.0.0 of this major
  EXPECT_EQ(validateConfig(&c, 4, 132, &r), ncclSuccess) << ncclMoeGetLastError();
}

TEST(PointerAlignment, Rule) {
  EXPECT_EQ(checkAlignment("f", "p", nullptr, 16), ncclSuccess);
  EXPECT_EQ(checkAlignment("f", "p", buffer, 16), ncclSuccess);
  EXPECT_EQ(checkAlignment("f", "p", buffer + 8, 8), ncclSuccess);
  EXPECT_EQ(checkAlignment("f", "p", buffer + 1, 1), ncclSuccess);
  EXPECT_EQ(checkAlignment("f", "topkIdx", buffer + 4, 8), ncclInvalidArgument);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsWord(msg, "topkIdx") && containsWord(msg, "f")) << msg;
  EXPECT_NE(msg.find("8-byte aligned"), std::string::npos) << msg;
}

// topkIdx (int64), xScales and topkWeights (FP32) of a dispatch must be aligned to their type.
TEST(PointerAlignment, DispatchArraysAlignedToTheirType) {
  ncclMoeConfig_t c = goodConfig(), r;
  ASSERT_EQ(validateConfig(&c, 4, 132, &r), ncclSuccess);
  const void* x = buffer;
  const int64_t* idx = (const int64_t*)buffer;
  const float* w = (const float*)(buffer + 64);
  EXPECT_EQ(validateDispatchArgs(r, x, nullptr, idx, w, 8, 0, false, 0), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(validateDispatchArgs(r, x, nullptr, (const int64_t*)(buffer + 4), w, 8, 0, false, 0),
            ncclInvalidArgument);
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "topkIdx")) << ncclMoeGetLastError();
  EXPECT_EQ(validateDispatchArgs(r, x, nullptr, idx, (const float*)(buffer + 2), 8, 0, false, 0),
            ncclInvalidArgument);
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "topkWeights")) << ncclMoeGetLastError();
  ncclMoeConfig_t f8 = r;
  f8.dispatchDtype = ncclMoeFp8E4m3;
  EXPECT_EQ(validateDispatchArgs(f8, x, (const float*)(buffer + 1), idx, w, 8, 0, false, 0), ncclInvalidArgument);
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "xScales")) << ncclMoeGetLastError();
}

// In low-latency mode a token naming one expert twice is reported as such (through the local
// record), not in the words of an HT capacity overflow; once reported, the record is free again
// (reportError claims it before writing).
TEST(KernelErrorMessages, LowLatencyRepeatedExpertNotReportedAsCapacity) {
  FakeContext f(ncclMoeLowLatency);
  for (int round = 0; round < 2; ++round) {
    DeviceError& e = f.errors[kErrorLocal];
    e.claimed = 1;
    e.a = 3;
    e.b = 1;
    e.c = 5;
    e.code = kDevRepeatedExpert;
    EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclInvalidArgument);
    const std::string msg = ncclMoeGetLastError();
    EXPECT_EQ(msg.find("outputCapacity"), std::string::npos) << msg;
    EXPECT_NE(msg.find("already named"), std::string::npos) << msg;
    EXPECT_EQ(e.code, kDevOk);
    EXPECT_EQ(e.claimed, 0) << "the record stays claimed: the next error would be lost";
    EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclSuccess);
  }
}

TEST(KernelErrorMessages, HighThroughputOverflowNamesCapacity) {
  FakeContext f(ncclMoeHighThroughput);
  f.errors[0].a = 1;
  f.errors[0].b = 600;
  f.errors[0].c = 512;
  f.errors[0].code = kDevOverflow;
  EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclInvalidUsage);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsWord(msg, "outputCapacity") && containsNumber(msg, 600)) << msg;
}

// A call that enqueued part of its kernels and failed to launch the rest leaves the host state
// out of step with the device and the peers: every later call fails until the context is
// destroyed.
TEST(PartialLaunch, LaterCallsFailUntilDestroyed) {
  FakeContext f(ncclMoeLowLatency);
  EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclSuccess);
  EXPECT_EQ(failPartialLaunch(f.c, "ncclMoeLowLatencyDispatch", cudaErrorLaunchOutOfResources),
            ncclUnhandledCudaError);
  EXPECT_NE(std::string(ncclMoeGetLastError()).find("destroy"), std::string::npos);
  EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclUnhandledCudaError);
  EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclUnhandledCudaError);  // sticky
  ncclMoeLowLatencyOutput_t out;
  EXPECT_EQ(ncclMoeLowLatencyDispatch(f.c, nullptr, nullptr, nullptr, 0, 0, &out, nullptr), ncclUnhandledCudaError);
}
