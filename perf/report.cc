// Result rows, the --output file and the summary lines; see report.h.
#include "report.h"

#include <math.h>

#include <algorithm>

namespace moe_perf {
namespace {

// Column names of the --output file, in order; `net` adds the two network columns.
std::vector<const char*> columns(bool net) {
  std::vector<const char*> c = {"tokens", "op", "time_us", "p99_us", "algbw_gbps", "busbw_gbps"};
  if (net) c.insert(c.end(), {"rdma_gbps", "nvlink_gbps"});
  c.push_back("wrong");
  return c;
}

std::string format(const char* fmt, double v) {
  char buf[64];
  snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

bool endsWith(const std::string& s, const char* tail) {
  const std::string t(tail);
  return s.size() > t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// CSV field: quoted when it holds a comma, a quote or a line break (RFC 4180).
std::string csvField(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string jsonString(const std::string& s) {
  std::string q = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') q += '\\';
    if ((unsigned char)c < 0x20) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\u%04x", c);
      q += buf;
    } else {
      q += c;
    }
  }
  return q + "\"";
}

// The row's values in columns(net) order; "" where not measured.
std::vector<std::string> rowValues(const Row& r, bool net) {
  std::vector<std::string> v = {std::to_string(r.tokens),
                                r.op,
                                format("%.3f", r.timeUs),
                                r.p99Us >= 0 ? format("%.3f", r.p99Us) : "",
                                r.hasBw ? format("%.3f", r.algbw) : "",
                                r.hasBw ? format("%.3f", r.busbw) : ""};
  if (net)
    v.insert(v.end(), {r.hasNet ? format("%.3f", r.rdmabw) : "",
                       r.hasNet ? format("%.3f", r.nvlinkbw) : ""});
  v.push_back(r.checked ? std::to_string(r.wrong) : "");
  return v;
}

}  // namespace

std::string tableHeader(bool net) {
  char buf[320];
  if (!net) {
    snprintf(buf, sizeof(buf), "#%9s  %-18s %10s %10s %10s %10s %8s\n#%9s  %-18s %10s %10s %10s %10s %8s\n",
             "tokens", "op", "time", "p99", "algbw", "busbw", "#wrong", "", "", "(us)", "(us)",
             "(GB/s)", "(GB/s)", "");
  } else {
    snprintf(buf, sizeof(buf),
             "#%9s  %-18s %10s %10s %10s %10s %10s %10s %8s\n#%9s  %-18s %10s %10s %10s %10s %10s %10s %8s\n",
             "tokens", "op", "time", "p99", "algbw", "busbw", "rdmabw", "nvlbw", "#wrong", "", "",
             "(us)", "(us)", "(GB/s)", "(GB/s)", "(GB/s)", "(GB/s)", "");
  }
  return buf;
}

std::string tableLine(const Row& r, bool net) {
  const std::string p99 = r.p99Us >= 0 ? format("%.2f", r.p99Us) : "-";
  const std::string alg = r.hasBw ? format("%.2f", r.algbw) : "-";
  const std::string bus = r.hasBw ? format("%.2f", r.busbw) : "-";
  const std::string wrong = r.checked ? std::to_string(r.wrong) : "N/A";
  const std::string rdma = r.hasNet ? format("%.2f", r.rdmabw) : "-";
  const std::string nvl = r.hasNet ? format("%.2f", r.nvlinkbw) : "-";
  char buf[320];
  if (!net)
    snprintf(buf, sizeof(buf), " %9ld  %-18s %10.2f %10s %10s %10s %8s\n", r.tokens, r.op.c_str(),
             r.timeUs, p99.c_str(), alg.c_str(), bus.c_str(), wrong.c_str());
  else
    snprintf(buf, sizeof(buf), " %9ld  %-18s %10.2f %10s %10s %10s %10s %10s %8s\n", r.tokens,
             r.op.c_str(), r.timeUs, p99.c_str(), alg.c_str(), bus.c_str(), rdma.c_str(),
             nvl.c_str(), wrong.c_str());
  return buf;
}

long long totalWrong(const std::vector<Row>& rows) {
  long long wrong = 0;
  for (const Row& r : rows)
    if (r.checked) wrong += r.wrong;
  return wrong;
}

std::string summaryLines(const std::vector<Row>& rows) {
  double sum = 0;
  int n = 0;
  for (const Row& r : rows)
    if (r.hasBw) sum += r.busbw, n++;
  const long long wrong = totalWrong(rows);
  char buf[256];
  snprintf(buf, sizeof(buf), "# %-20s : %lld %s\n# %-20s : %g \n#\n", "Out of bounds values", wrong,
           wrong ? "FAILED" : "OK", "Avg bus bandwidth", n ? sum / n : 0.0);
  return buf;
}

ResultFile::~ResultFile() { close(); }

bool ResultFile::open(const std::string& path, const Params& params, bool net) {
  close();
  file_ = fopen(path.c_str(), "w");
  if (!file_) return false;
  json_ = endsWith(path, ".json");
  net_ = net;
  ok_ = true;
  params_ = params;
  rows_.clear();
  if (!json_) {
    std::string line;
    for (const auto& p : params_) line += csvField(p.first) + ",";
    const std::vector<const char*> names = columns(net_);
    for (size_t i = 0; i < names.size(); i++) line += std::string(i ? "," : "") + names[i];
    ok_ = fprintf(file_, "%s\n", line.c_str()) > 0 && fflush(file_) == 0;
  }
  return true;
}

bool ResultFile::add(const Row& row) {
  if (!file_) return false;
  if (json_) {
    rows_.push_back(row);
    return ok_;
  }
  std::string line;
  for (const auto& p : params_) line += csvField(p.second) + ",";
  const std::vector<std::string> values = rowValues(row, net_);
  for (size_t i = 0; i < values.size(); i++) line += (i ? "," : "") + csvField(values[i]);
  ok_ = ok_ && fprintf(file_, "%s\n", line.c_str()) > 0 && fflush(file_) == 0;
  return ok_;
}

bool ResultFile::close() {
  if (!file_) return ok_;
  if (json_) {
    std::string text = "{\n  \"params\": {";
    for (size_t i = 0; i < params_.size(); i++)
      text += (i ? ", " : "") + jsonString(params_[i].first) + ": " + jsonString(params_[i].second);
    text += "},\n  \"rows\": [";
    const std::vector<const char*> names = columns(net_);
    for (size_t r = 0; r < rows_.size(); r++) {
      const std::vector<std::string> values = rowValues(rows_[r], net_);
      text += r ? ",\n    {" : "\n    {";
      for (size_t i = 0; i < values.size(); i++) {
        text += std::string(i ? ", " : "") + "\"" + names[i] + "\": ";
        if (i == 1) text += jsonString(values[i]);  // op
        else text += values[i].empty() ? "null" : values[i];
      }
      text += "}";
    }
    text += rows_.empty() ? "]\n}\n" : "\n  ]\n}\n";
    ok_ = ok_ && fputs(text.c_str(), file_) >= 0;
  }
  ok_ = (fclose(file_) == 0) && ok_;
  file_ = nullptr;
  return ok_;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t rank = (size_t)ceil(p / 100.0 * (double)v.size());  // nearest rank, 1-based
  return v[rank > 0 ? rank - 1 : 0];
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace moe_perf
