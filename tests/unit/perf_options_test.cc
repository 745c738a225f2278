// The perf binaries' command line (perf/options.h): nccl-tests' letters keep nccl-tests'
// meanings (tokens for bytes), our own options have long names, nccl-tests letters we do not
// implement and our retired letters are refused with a message, -h exits 0, bad values exit 1.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "../../perf/options.h"

namespace {

using moe_perf::ExtraOption;
using moe_perf::Options;

// Runs parseOptions on {"prog", args...}; captures stdout and stderr.
struct Parsed {
  int rc = 0;
  Options opt;
  std::string out, err;
};

Parsed parse(std::vector<std::string> args, const std::vector<ExtraOption>& extras = {},
             Options defaults = Options()) {
  std::vector<char*> argv;
  std::string prog = "perf";
  argv.push_back(&prog[0]);
  for (std::string& a : args) argv.push_back(&a[0]);
  argv.push_back(nullptr);
  Parsed p;
  p.opt = defaults;
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  p.rc = moe_perf::parseOptions((int)args.size() + 1, argv.data(), "perf", extras, &p.opt);
  p.out = testing::internal::GetCapturedStdout();
  p.err = testing::internal::GetCapturedStderr();
  return p;
}

TEST(PerfOptions, DefaultsGoOnAndSetMaxTokensPerRank) {
  Parsed p = parse({});
  EXPECT_EQ(p.rc, -1);
  EXPECT_EQ(p.opt.maxTokensPerRank, p.opt.maxTokens);
  EXPECT_TRUE(p.opt.output.empty());
}

TEST(PerfOptions, ReadmeCommandLine) {
  Parsed p = parse({"-b", "4096", "-e", "4096", "-H", "7168", "-k", "8", "-E", "256", "-s", "24",
                    "-d", "fp8"});
  ASSERT_EQ(p.rc, -1) << p.err;
  EXPECT_EQ(p.opt.minTokens, 4096);
  EXPECT_EQ(p.opt.maxTokens, 4096);
  EXPECT_EQ(p.opt.hidden, 7168);
  EXPECT_EQ(p.opt.topK, 8);
  EXPECT_EQ(p.opt.numExperts, 256);
  EXPECT_EQ(p.opt.numSms, 24);
  EXPECT_TRUE(p.opt.fp8);
}

TEST(PerfOptions, NcclTestsLettersAndTheirLongForms) {
  Parsed s = parse({"-b", "8", "-e", "64", "-f", "4", "-n", "7", "-w", "3", "-c", "0", "-d", "bf16"});
  Parsed l = parse({"--min-tokens", "8", "--max-tokens=64", "--stepfactor", "4", "--iters", "7",
                    "--warmup_iters", "3", "--check", "0", "--datatype", "bf16"});
  for (const Parsed* p : {&s, &l}) {
    ASSERT_EQ(p->rc, -1) << p->err;
    EXPECT_EQ(p->opt.minTokens, 8);
    EXPECT_EQ(p->opt.maxTokens, 64);
    EXPECT_EQ(p->opt.stepFactor, 4.0);
    EXPECT_EQ(p->opt.iters, 7);
    EXPECT_EQ(p->opt.warmup, 3);
    EXPECT_EQ(p->opt.check, 0);
    EXPECT_FALSE(p->opt.fp8);
  }
  Parsed i = parse({"-b", "1", "-e", "10", "--step-tokens", "4"});
  ASSERT_EQ(i.rc, -1);
  EXPECT_EQ(moe_perf::tokenSweep(i.opt), (std::vector<long>{1, 5, 9}));
}

TEST(PerfOptions, OwnOptionsHaveLongNames) {
  Parsed p = parse({"--sms", "8", "--hidden", "4096", "--topk", "2", "--experts", "8",
                    "--ranks", "4", "--max-tokens-per-rank", "8192", "--routing", "skew",
                    "--seed", "0x1234", "--output", "/tmp/x.json"});
  ASSERT_EQ(p.rc, -1) << p.err;
  EXPECT_EQ(p.opt.numSms, 8);
  EXPECT_EQ(p.opt.hidden, 4096);
  EXPECT_EQ(p.opt.topK, 2);
  EXPECT_EQ(p.opt.numExperts, 8);
  EXPECT_EQ(p.opt.nRanks, 4);
  EXPECT_EQ(p.opt.maxTokensPerRank, 8192);
  EXPECT_EQ(p.opt.routing, moe_perf::Routing::kSkew);
  EXPECT_EQ(p.opt.seed, 0x1234u);
  EXPECT_EQ(p.opt.output, "/tmp/x.json");
}

TEST(PerfOptions, RetiredAndNcclTestsLettersAreRefusedWithAHint) {
  struct Case {
    const char* flag;
    const char* hint;
  } cases[] = {{"-g", "--ranks"},        {"-N", "--ranks"},   {"-m", "--max-tokens-per-rank"},
               {"-r", "--routing"},      {"-S", "--seed"},    {"-G", "--hold-stream"},
               {"-a", "averaged"},       {"-t", "threads"},   {"-z", "blocking"}};
  for (const Case& c : cases) {
    Parsed p = parse({c.flag, "2"});
    EXPECT_EQ(p.rc, 1) << c.flag;
    EXPECT_NE(p.err.find(c.hint), std::string::npos) << c.flag << ": " << p.err;
  }
}

TEST(PerfOptions, BadFlagsAndValuesExitOne) {
  const std::vector<std::vector<std::string>> bad = {
      {"-x", "1"},          {"--bogus", "1"},  {"-b"},               {"--iters"},
      {"-n", "0"},          {"-n", "abc"},     {"-c", "2"},          {"-d", "fp16"},
      {"-f", "1"},          {"-b", "64", "-e", "8"},                 {"--routing", "zipf"},
      {"--seed", "-1"},     {"-k", "9", "-E", "8"},                  {"-H", "100"},
      {"-H", "4104", "-d", "fp8"},             {"--max-tokens-per-rank", "16", "-e", "32"},
      {"--output", "x.txt"}, {"stray"},
  };
  for (const std::vector<std::string>& args : bad) {
    Parsed p = parse(args);
    EXPECT_EQ(p.rc, 1) << args[0];
    EXPECT_FALSE(p.err.empty()) << args[0];
  }
}

TEST(PerfOptions, HelpListsEveryLongOptionAndTheDefaults) {
  Options d;
  d.minTokens = 128;
  d.maxTokens = 128;
  d.numExperts = 288;
  Parsed p = parse({"-n", "3", "-h"}, {}, d);
  EXPECT_EQ(p.rc, 0);
  for (const char* name : {"--min-tokens", "--max-tokens", "--step-tokens", "--stepfactor",
                           "--iters", "--warmup_iters", "--check", "--datatype", "--sms",
                           "--hidden", "--topk", "--experts", "--ranks", "--max-tokens-per-rank",
                           "--routing", "--seed", "--output", "--help"})
    EXPECT_NE(p.out.find(name), std::string::npos) << name;
  EXPECT_NE(p.out.find("experts in total (default 288)"), std::string::npos) << p.out;
  EXPECT_NE(p.out.find("timed iterations per size (default 20)"), std::string::npos)
      << "help shows the defaults, not values parsed before -h";
}

TEST(PerfOptions, ExtraOptionsShortAndLong) {
  int slots = 0;
  std::string scales;
  std::vector<ExtraOption> extras = {
      {"slots", 'l', "1..8", "slots", [&](const char* v) { slots = atoi(v); return slots >= 1; }},
      {"scales", 0, "fp32|ue8m0", "scales", [&](const char* v) { scales = v; return true; }},
  };
  Parsed p = parse({"-l", "3", "--scales", "ue8m0", "-n", "5"}, extras);
  ASSERT_EQ(p.rc, -1) << p.err;
  EXPECT_EQ(slots, 3);
  EXPECT_EQ(scales, "ue8m0");
  EXPECT_EQ(p.opt.iters, 5);
  Parsed bad = parse({"--slots", "0"}, extras);
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.err.find("--slots"), std::string::npos) << bad.err;
  Parsed help = parse({"--help"}, extras);
  EXPECT_EQ(help.rc, 0);
  EXPECT_NE(help.out.find("--scales"), std::string::npos);
  EXPECT_NE(help.out.find("-l, --slots"), std::string::npos) << help.out;
}

TEST(PerfOptions, ZeroOrOneValues) {
  bool weighted = false;
  std::vector<ExtraOption> extras = {
      {"weighted", 'W', "0|1", "weighted", [&](const char* v) { return moe_perf::parse01(v, &weighted); }},
  };
  ASSERT_EQ(parse({"-W", "1"}, extras).rc, -1);
  EXPECT_TRUE(weighted);
  ASSERT_EQ(parse({"--weighted", "0"}, extras).rc, -1);
  EXPECT_FALSE(weighted);
  for (const char* bad : {"2", "", "01", "yes", "1 "}) {
    weighted = true;
    Parsed p = parse({"--weighted", bad}, extras);
    EXPECT_EQ(p.rc, 1) << "'" << bad << "'";
    EXPECT_NE(p.err.find("--weighted"), std::string::npos) << p.err;
    EXPECT_TRUE(weighted) << "a refused value must leave the option as it was";
  }
}

TEST(PerfOptions, TokenSweepByFactor) {
  Parsed p = parse({"-b", "1", "-e", "256", "-f", "4"});
  ASSERT_EQ(p.rc, -1);
  EXPECT_EQ(moe_perf::tokenSweep(p.opt), (std::vector<long>{1, 4, 16, 64, 256}));
  Parsed q = parse({"-b", "1", "-e", "3", "-f", "1.2"});  // at least +1 per step
  EXPECT_EQ(moe_perf::tokenSweep(q.opt), (std::vector<long>{1, 2, 3}));
}

}  // namespace
