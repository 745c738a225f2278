// The perf binaries' results (perf/report.h): nccl-tests' summary lines, the table line, the
// --output file as CSV and JSON, and the per-call statistics.
#include <gtest/gtest.h>

#include <stdio.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "../../perf/report.h"

namespace {

using moe_perf::Row;

Row bwRow(long tokens, const char* op, double busbw, long long wrong) {
  Row r;
  r.tokens = tokens;
  r.op = op;
  r.timeUs = 12.5;
  r.hasBw = true;
  r.algbw = 2 * busbw;
  r.busbw = busbw;
  r.checked = true;
  r.wrong = wrong;
  return r;
}

std::string readFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string tempPath(const char* ext) {
  return "/tmp/perf_report_test_" + std::to_string(getpid()) + ext;
}

TEST(PerfReport, SummaryLinesAsNcclTests) {
  Row layout;
  layout.op = "layout";
  layout.timeUs = 9;
  std::vector<Row> rows = {layout, bwRow(128, "dispatch", 100, 0), bwRow(128, "combine", 200, 0)};
  EXPECT_EQ(moe_perf::summaryLines(rows),
            "# Out of bounds values : 0 OK\n# Avg bus bandwidth    : 150 \n#\n");
  rows.push_back(bwRow(256, "dispatch", 150, 3));
  EXPECT_EQ(moe_perf::totalWrong(rows), 3);
  EXPECT_EQ(moe_perf::summaryLines(rows),
            "# Out of bounds values : 3 FAILED\n# Avg bus bandwidth    : 150 \n#\n");
  EXPECT_EQ(moe_perf::summaryLines({}), "# Out of bounds values : 0 OK\n# Avg bus bandwidth    : 0 \n#\n");
}

TEST(PerfReport, TableLineMarksWhatWasNotMeasured) {
  Row r;
  r.tokens = 4096;
  r.op = "layout";
  r.timeUs = 9.87;
  const std::string line = moe_perf::tableLine(r);
  EXPECT_NE(line.find("4096"), std::string::npos);
  EXPECT_NE(line.find("9.87"), std::string::npos);
  EXPECT_NE(line.find("N/A"), std::string::npos);
  EXPECT_NE(line.find(" - "), std::string::npos);
  EXPECT_EQ(line.back(), '\n');
  const std::string header = moe_perf::tableHeader();
  EXPECT_EQ(header[0], '#');
  EXPECT_NE(header.find("busbw"), std::string::npos);
}

TEST(PerfReport, CsvHasParamsAndColumnsOnEveryLine) {
  const std::string path = tempPath(".csv");
  {
    moe_perf::ResultFile f;
    ASSERT_TRUE(f.open(path, {{"card", "NVIDIA H200, x"}, {"hidden", "7168"}}));
    Row r = bwRow(128, "dispatch", 100.25, 0);
    r.p99Us = 14;
    EXPECT_TRUE(f.add(r));
    // Rows are on disk as soon as they are added.
    EXPECT_NE(readFile(path).find("dispatch"), std::string::npos);
    Row layout;
    layout.tokens = 128;
    layout.op = "layout";
    layout.timeUs = 9;
    EXPECT_TRUE(f.add(layout));
    EXPECT_TRUE(f.close());
  }
  EXPECT_EQ(readFile(path),
            "card,hidden,tokens,op,time_us,p99_us,algbw_gbps,busbw_gbps,wrong\n"
            "\"NVIDIA H200, x\",7168,128,dispatch,12.500,14.000,200.500,100.250,0\n"
            "\"NVIDIA H200, x\",7168,128,layout,9.000,,,,\n");
  unlink(path.c_str());
}

TEST(PerfReport, JsonHasParamsOnceAndNullsForMissingValues) {
  const std::string path = tempPath(".json");
  {
    moe_perf::ResultFile f;
    ASSERT_TRUE(f.open(path, {{"card", "H\"200"}, {"ranks", "2"}}));
    EXPECT_TRUE(f.add(bwRow(1, "combine", 50, 0)));
    Row unchecked;
    unchecked.tokens = 1;
    unchecked.op = "combine_send";
    unchecked.timeUs = 3;
    unchecked.p99Us = 4;
    EXPECT_TRUE(f.add(unchecked));
  }  // the destructor writes and closes
  EXPECT_EQ(readFile(path),
            "{\n  \"params\": {\"card\": \"H\\\"200\", \"ranks\": \"2\"},\n  \"rows\": [\n"
            "    {\"tokens\": 1, \"op\": \"combine\", \"time_us\": 12.500, \"p99_us\": null, "
            "\"algbw_gbps\": 100.000, \"busbw_gbps\": 50.000, \"wrong\": 0},\n"
            "    {\"tokens\": 1, \"op\": \"combine_send\", \"time_us\": 3.000, \"p99_us\": 4.000, "
            "\"algbw_gbps\": null, \"busbw_gbps\": null, \"wrong\": null}\n  ]\n}\n");
  unlink(path.c_str());
}

TEST(PerfReport, OpenFailsOnAMissingFolder) {
  moe_perf::ResultFile f;
  EXPECT_FALSE(f.open("/nonexistent-folder/x.csv", {}));
  EXPECT_FALSE(f.add(Row()));
}

TEST(PerfReport, MedianAndNearestRankPercentile) {
  EXPECT_EQ(moe_perf::median({3, 1, 2}), 2);
  EXPECT_EQ(moe_perf::median({4, 1, 2, 3}), 2.5);
  EXPECT_EQ(moe_perf::median({}), 0);
  std::vector<double> v;
  for (int i = 1; i <= 100; i++) v.push_back(101 - i);
  EXPECT_EQ(moe_perf::percentile(v, 99), 99);
  EXPECT_EQ(moe_perf::percentile(v, 100), 100);
  EXPECT_EQ(moe_perf::percentile({5, 7}, 99), 7);
}

}  // namespace
