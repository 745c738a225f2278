// Result rows of the perf binaries: the table lines on stdout, the --output file (CSV or JSON)
// and nccl-tests' closing summary lines. Plain C++ (no CUDA / NCCL / ranks): the CPU unit tests
// (tests/unit/perf_report_test.cc) link it alone. The reductions over ranks that produce a Row
// live in common.cc.
//
// Units: times in microseconds, bandwidths in GB/s (1 GB = 1e9 bytes), tokens per rank.
#pragma once
#include <stdio.h>

#include <string>
#include <utility>
#include <vector>

namespace moe_perf {

// One measured (token count, operation) pair, already reduced over ranks.
struct Row {
  long tokens = 0;
  std::string op;        // operation name, no spaces (e.g. "dispatch", "combine_send")
  double timeUs = 0;     // max over ranks of each rank's time per call (see Timing in common.h)
  double p99Us = -1;     // max over ranks of each rank's 99th percentile per call; < 0: not timed
                         // per call (back-to-back timing)
  bool hasBw = false;    // false: time only
  double algbw = 0;      // GB/s, min over ranks (when hasBw)
  double busbw = 0;      // GB/s, min over ranks (when hasBw)
  bool hasNet = false;   // several nodes and an operation with a network model (else false)
  double rdmabw = 0;     // GB/s, max over ranks of network bytes sent / time (when hasNet)
  double nvlinkbw = 0;   // GB/s, max over ranks of the internode path's NVLink bytes / time
  bool checked = false;  // false: #wrong is N/A
  long long wrong = 0;   // wrong elements summed over ranks (when checked)
};

// The run's parameters, in order: name -> value (e.g. {"hidden", "7168"}). Written into every
// CSV line and once into a JSON file, so that files of different runs and of peers can be mixed.
using Params = std::vector<std::pair<std::string, std::string>>;

// The two header lines of the table on stdout (each starting with "#", ending with '\n').
// `net`: with the rdmabw and nvlbw columns after busbw (runs across nodes).
std::string tableHeader(bool net = false);
// One table line for a row (ending with '\n'): "-" where a value was not measured, N/A for an
// unchecked #wrong; `net` as for tableHeader.
std::string tableLine(const Row& row, bool net = false);

// nccl-tests' closing lines: "# Out of bounds values : N OK|FAILED" and
// "# Avg bus bandwidth    : X" (X = mean busbw over the rows that have one; 0 without any),
// then "#". `wrong` is the sum of the checked rows' #wrong.
std::string summaryLines(const std::vector<Row>& rows);
long long totalWrong(const std::vector<Row>& rows);

// The --output file. CSV (name ends in .csv): one header line, then one line per row, written
// and flushed as each row arrives; columns = the parameters' names, then tokens, op, time_us,
// p99_us, algbw_gbps, busbw_gbps, [rdma_gbps, nvlink_gbps: opened with `net`], wrong (empty where
// not measured / not checked).
// JSON (.json): {"params": {name: "value", ...}, "rows": [{...}, ...]} written by close(): the
// parameters as strings, the rows with the same column names, numbers as numbers, null where
// not measured.
class ResultFile {
 public:
  ResultFile() = default;
  ResultFile(const ResultFile&) = delete;
  ResultFile& operator=(const ResultFile&) = delete;
  ~ResultFile();
  // Opens (truncates) `path`; `net` adds the columns rdma_gbps and nvlink_gbps. False (errno
  // set) when it cannot be opened.
  bool open(const std::string& path, const Params& params, bool net = false);
  // Adds one row. False when writing failed.
  bool add(const Row& row);
  // Writes what is left and closes. False when writing failed. Called by the destructor too.
  bool close();

 private:
  FILE* file_ = nullptr;
  bool json_ = false;
  bool net_ = false;
  bool ok_ = true;
  Params params_;
  std::vector<Row> rows_;  // JSON only: written by close()
};

// Statistics of one rank's per-call times (nearest-rank percentiles; empty input gives 0).
double median(std::vector<double> v);
double percentile(std::vector<double> v, double p);  // p in (0, 100]

}  // namespace moe_perf
