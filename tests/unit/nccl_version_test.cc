// The NCCL-version rules (nccl_compat.h, version.cc), which need no GPU: which NCCL builds may
// run on which loaded NCCL, what the queries report, and the requirements initializer.
#include <gtest/gtest.h>

#include <string>

#include "nccl_compat.h"
#include "nccl_moe.h"

namespace {

using nccl_moe::kNcclBuildVersion;
using nccl_moe::ncclVersionsCompatible;

TEST(NcclVersion, SameLineDifferentPatchIsCompatible) {
  EXPECT_TRUE(ncclVersionsCompatible(22809, 22809));
  EXPECT_TRUE(ncclVersionsCompatible(23007, 23004));
  EXPECT_TRUE(ncclVersionsCompatible(22907, 22903));
}

TEST(NcclVersion, OtherMinorOrMajorIsNot) {
  EXPECT_FALSE(ncclVersionsCompatible(22809, 23007));  // torch 2.14 loads 2.30 under a 2.28 build
  EXPECT_FALSE(ncclVersionsCompatible(23007, 22809));
  EXPECT_FALSE(ncclVersionsCompatible(22907, 23007));
  EXPECT_FALSE(ncclVersionsCompatible(23007, 33007));
}

TEST(NcclVersion, FormatsCodes) {
  char buf[16];
  EXPECT_EQ(std::string(nccl_moe::formatNcclVersion(23007, buf, sizeof(buf))), "2.30.7");
  EXPECT_EQ(std::string(nccl_moe::formatNcclVersion(22809, buf, sizeof(buf))), "2.28.9");
}

TEST(NcclVersion, QueryReportsBuildAndRuntime) {
  int built = -1, loaded = -1;
  ASSERT_EQ(ncclMoeGetNcclVersion(&built, &loaded), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(built, NCCL_VERSION_CODE);
  int direct = 0;
  ASSERT_EQ(ncclGetVersion(&direct), ncclSuccess);
  EXPECT_EQ(loaded, direct);
  // The test binary links the NCCL it was built with: the pair must pass the run-time rule.
  EXPECT_TRUE(ncclVersionsCompatible(built, loaded)) << built << " vs " << loaded;
  built = -1;
  ASSERT_EQ(ncclMoeGetNcclVersion(&built, nullptr), ncclSuccess);
  EXPECT_EQ(built, kNcclBuildVersion);
  EXPECT_EQ(ncclMoeGetNcclVersion(nullptr, nullptr), ncclInvalidArgument);
  EXPECT_NE(std::string(ncclMoeGetLastError()).find("buildVersion"), std::string::npos);
}

TEST(NcclVersion, RequirementsStartFromNcclDefaults) {
  ncclDevCommRequirements reqs = nccl_moe::defaultDevCommRequirements();
  EXPECT_EQ(reqs.lsaBarrierCount, 0);
  EXPECT_EQ(reqs.resourceRequirementsList, nullptr);
  EXPECT_FALSE(reqs.lsaMultimem);
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  // 2.29+: ncclDevCommCreate checks these three; a zeroed struct fails with invalid usage.
  EXPECT_EQ(reqs.size, sizeof(ncclDevCommRequirements));
  EXPECT_EQ(reqs.magic, (unsigned)NCCL_API_MAGIC);
  EXPECT_EQ((int)reqs.version, NCCL_VERSION_CODE);
#endif
}

}  // namespace
