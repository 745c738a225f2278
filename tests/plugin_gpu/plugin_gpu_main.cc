// Launcher of the moeloop plugin GPU test (see plugin_gpu_test.h).
//
//   plugin_gpu_test [--ngpus=N]      N GPUs (default 4, even, >= 2) as 2 fake nodes of N/2
//
// 1. host GIN check: 3 processes drive the plugin's GIN on host memory (no GPU needed);
// 2. without 2 GPUs: prints SKIPPED and exits 0;
// 3. scenario "main" (copy transport): NCCL all-reduce and all-to-all across the fake nodes,
//    ncclDevCommCreate with GIN, kernels putting to every other rank with signals; NCCL and GIN
//    bandwidth and latency measured;
// 4. scenario "shaped": the same measurements with NCCL_MOELOOP_GBPS=0.5 LATENCY_US=500, compared
//    with the settings (PASS / FAIL);
// 5. GIN per transport: the copy transport shaped as a ConnectX-7 (GBPS=50 LATENCY_US=3), the
//    socket transport (correctness rounds too) unshaped and shaped; each GIN measurement checks the
//    plugin's per-peer counters against what it sent. The performance targets are printed
//    as MET / MISSED lines, not failures (machines vary).
// Every child gets NCCL_HOSTID=nodeA|nodeB, NCCL_NET_PLUGIN=moeloop, NCCL_NVLS_ENABLE=0.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <vector>

#include "../../plugin/moeloop_stats.h"
#include "plugin_gpu_test.h"

namespace plugintest {

int gFailures = 0;
int gRank = -1;

double nowSec() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

bool barrier(const RankInfo& r, double timeoutSec) {
  Shared* s = r.shared;
  int gen = s->barrierGeneration.load(std::memory_order_acquire);
  if (s->barrierArrived.fetch_add(1, std::memory_order_acq_rel) == r.nRanks - 1) {
    s->barrierArrived.store(0, std::memory_order_relaxed);
    s->barrierGeneration.fetch_add(1, std::memory_order_release);
    return true;
  }
  double t0 = nowSec();
  while (s->barrierGeneration.load(std::memory_order_acquire) == gen) {
    if (nowSec() - t0 > timeoutSec) {
      PT_FAIL("barrier timed out after %.0f s", timeoutSec);
      return false;
    }
    sched_yield();
  }
  return true;
}

bool readPluginStats(void* out) {
  void* h = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return false;
  moeloopGetStats_t fn = (moeloopGetStats_t)dlsym(h, "moeloopGetStats");
  bool ok = fn != nullptr && fn((moeloopStats_t*)out, sizeof(moeloopStats_t)) == sizeof(moeloopStats_t);
  dlclose(h);  // drops only the reference taken here
  return ok;
}

}  // namespace plugintest

using namespace plugintest;

namespace {

constexpr double kShapedGBps = 0.5;
constexpr double kShapedLatencyUs = 500;
constexpr double kNicGBps = 50, kNicLatencyUs = 3;  // the ConnectX-7 preset

enum class Kind { kHostGin, kMain, kMeasure };
struct Scenario {
  Kind kind;
  int slot;
  const char* transport;      // NCCL_MOELOOP_TRANSPORT
  double gbps, latencyUs;     // 0: unshaped
  bool ncclMeasure;           // NCCL send/recv bandwidth and round trip too
  bool ginCorrectness;        // the GIN correctness rounds before the measurements
};

// Makes libnccl-net-moeloop.so loadable by name: if it is not on the library path, re-executes
// this program once with <dir of this binary>/../lib prepended to LD_LIBRARY_PATH.
bool ensurePluginOnLibraryPath(char** argv) {
  void* h = dlopen("libnccl-net-moeloop.so", RTLD_LAZY | RTLD_LOCAL);
  if (h != nullptr) {
    dlclose(h);
    return true;
  }
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0 || getenv("MOELOOP_TEST_REEXEC") != nullptr) {
    fprintf(stderr, "cannot load libnccl-net-moeloop.so: %s\n"
                    "build it (make plugin) and put its folder on LD_LIBRARY_PATH\n", dlerror());
    return false;
  }
  exe[n] = '\0';
  std::string dir(exe);
  dir = dir.substr(0, dir.rfind('/'));
  std::string lib = dir + "/../lib";
  const char* old = getenv("LD_LIBRARY_PATH");
  std::string path = lib + (old && *old ? ":" + std::string(old) : "");
  setenv("LD_LIBRARY_PATH", path.c_str(), 1);
  setenv("MOELOOP_TEST_REEXEC", "1", 1);
  execv(exe, argv);
  fprintf(stderr, "re-exec of %s failed: %s\n", exe, strerror(errno));
  return false;
}

// Counts GPUs in a short-lived child so that this process never initialises CUDA before fork.
int countGpus() {
  int fds[2];
  if (pipe(fds) != 0) return 0;
  pid_t pid = fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    ssize_t w = write(fds[1], &n, sizeof(n));
    _exit(w == (ssize_t)sizeof(n) ? 0 : 1);
  }
  close(fds[1]);
  int n = 0;
  if (pid < 0 || read(fds[0], &n, sizeof(n)) != (ssize_t)sizeof(n)) n = 0;
  close(fds[0]);
  if (pid > 0) waitpid(pid, nullptr, 0);
  return n;
}

// A crashing rank prints its stack (addresses in the plugin resolve with addr2line -e <.so>).
void crashHandler(int sig, siginfo_t* info, void*) {
  char msg[128];
  int len = snprintf(msg, sizeof(msg), "[rank %d] signal %d at address %p; stack:\n", gRank, sig,
                     info ? info->si_addr : nullptr);
  if (write(2, msg, len) < 0) {}
  void* frames[48];
  int n = backtrace(frames, 48);
  backtrace_symbols_fd(frames, n, 2);
  _exit(128 + sig);
}

int rankMain(Shared* sh, const Scenario& sc, int rank, int nRanks, int gpusPerNode) {
  gRank = rank;
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = crashHandler;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGABRT, &sa, nullptr);
  RankInfo r{sh, rank, nRanks, gpusPerNode};
  if (sc.kind == Kind::kHostGin) return hostGinCheck(r) && gFailures == 0 ? 0 : 1;

  // Environment first: NCCL reads it at initialisation.
  setenv("NCCL_HOSTID", rank / gpusPerNode == 0 ? "nodeA" : "nodeB", 1);
  setenv("NCCL_NET_PLUGIN", "moeloop", 1);
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  if (getenv("NCCL_DEBUG") == nullptr) setenv("NCCL_DEBUG", "WARN", 1);
  setenv("NCCL_MOELOOP_TRANSPORT", sc.transport, 1);
  if (sc.gbps > 0) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%g", sc.gbps);
    setenv("NCCL_MOELOOP_GBPS", buf, 1);
    snprintf(buf, sizeof(buf), "%g", sc.latencyUs);
    setenv("NCCL_MOELOOP_LATENCY_US", buf, 1);
  } else {
    unsetenv("NCCL_MOELOOP_GBPS");
    unsetenv("NCCL_MOELOOP_LATENCY_US");
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
    PT_FAIL("no CUDA device in rank process");
    return 1;
  }
  if (cudaSetDevice(rank % ndev) != cudaSuccess) {
    PT_FAIL("cudaSetDevice(%d) failed", rank % ndev);
    return 1;
  }
  if (rank == 0) {
    if (ncclGetUniqueId(&sh->id) != ncclSuccess) {
      PT_FAIL("ncclGetUniqueId failed");
      sh->idReady.store(-1, std::memory_order_release);
      return 1;
    }
    sh->idReady.store(1, std::memory_order_release);
  } else {
    double t0 = nowSec();
    while (sh->idReady.load(std::memory_order_acquire) == 0) {
      if (nowSec() - t0 > 120) {
        PT_FAIL("timed out waiting for the NCCL unique id");
        return 1;
      }
      usleep(1000);
    }
    if (sh->idReady.load() < 0) return 1;
  }
  ncclComm_t comm = nullptr;
  ncclResult_t res = ncclCommInitRank(&comm, nRanks, sh->id, rank);
  if (res != ncclSuccess) {
    PT_FAIL("ncclCommInitRank: %s (%s)", ncclGetErrorString(res), ncclGetLastError(nullptr));
    return 1;
  }
  moeloopStats_t st;
  if (!readPluginStats(&st)) {
    PT_FAIL("NCCL did not load libnccl-net-moeloop.so (NCCL_NET_PLUGIN=moeloop)");
  } else {
    PT_CHECK(st.netInits >= 1, "the plugin's NET init was never called");
  }
  bool ok = true;
  if (sc.kind == Kind::kMain) ok = ncclCollectiveChecks(r, comm);
  if (ok) ok = ginChecks(r, comm, sc.ginCorrectness, sc.slot);
  if (ok && sc.ncclMeasure) ok = ncclShapingMeasurements(r, comm, sc.slot);
  // The main scenario's collectives involve every rank; otherwise NET traffic (the measurements)
  // runs only between rank 0 and the first rank of node B.
  const bool expectNet = sc.ncclMeasure && (sc.kind == Kind::kMain || rank == 0 || rank == r.gpusPerNode);
  if (readPluginStats(&st)) {
    PT_CHECK(!expectNet || (st.netBytesSent > 0 && st.netBytesRecv > 0),
             "no NET traffic went through the plugin (sent %llu, received %llu bytes)",
             (unsigned long long)st.netBytesSent, (unsigned long long)st.netBytesRecv);
    PT_CHECK(st.errors == 0, "the plugin reported %llu error(s)", (unsigned long long)st.errors);
    if (rank == 0)
      printf("[rank 0] plugin counters: NET %llu msgs / %llu bytes sent, GIN %llu puts, %llu signals "
             "applied, %llu bytes sent\n",
             (unsigned long long)st.netMsgsSent, (unsigned long long)st.netBytesSent,
             (unsigned long long)st.ginPuts, (unsigned long long)st.ginSignals,
             (unsigned long long)st.ginBytesSent);
  }
  barrier(r);
  if (ok) {
    res = ncclCommDestroy(comm);
    PT_CHECK(res == ncclSuccess, "ncclCommDestroy: %s", ncclGetErrorString(res));
  }
  fflush(stdout);
  return gFailures == 0 ? 0 : 1;
}

// Forks nRanks children running `sc`; returns true if all exit 0. A failing or hung child gets
// the others killed so that nothing waits forever.
bool runScenario(Shared* sh, const Scenario& sc, int nRanks, int gpusPerNode, double timeoutSec) {
  // Reset what the ranks synchronise on; the measurements of earlier scenarios stay.
  sh->barrierArrived.store(0);
  sh->barrierGeneration.store(0);
  sh->idReady.store(0);
  sh->handlesReady.store(0);
  std::vector<pid_t> pids(nRanks, -1);
  fflush(stdout);
  fflush(stderr);
  for (int r = 0; r < nRanks; r++) {
    pid_t pid = fork();
    if (pid == 0) {
      int code = rankMain(sh, sc, r, nRanks, gpusPerNode);
      fflush(stdout);
      fflush(stderr);
      _exit(code);
    }
    if (pid < 0) {
      fprintf(stderr, "fork failed: %s\n", strerror(errno));
      for (pid_t p : pids)
        if (p > 0) kill(p, SIGKILL);
      for (pid_t p : pids)
        if (p > 0) waitpid(p, nullptr, 0);
      return false;
    }
    pids[r] = pid;
  }
  bool ok = true;
  int running = nRanks;
  double t0 = nowSec(), failedAt = -1;
  while (running > 0) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < nRanks; r++) {
        if (pids[r] != pid) continue;
        pids[r] = -1;
        running--;
        bool good = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!good) {
          if (WIFSIGNALED(status))
            fprintf(stderr, "rank %d died with signal %d\n", r, WTERMSIG(status));
          else
            fprintf(stderr, "rank %d exited with status %d\n", r, WEXITSTATUS(status));
          ok = false;
          if (failedAt < 0) failedAt = nowSec();
        }
      }
      continue;
    }
    double now = nowSec();
    if ((failedAt >= 0 && now - failedAt > 20) || now - t0 > timeoutSec) {
      fprintf(stderr, "%s: killing %d remaining rank(s)\n",
              failedAt >= 0 ? "a rank failed" : "scenario timed out", running);
      for (pid_t p : pids)
        if (p > 0) kill(p, SIGKILL);
      ok = false;
      failedAt = now;  // keep reaping
      t0 = now + 1e9;
    }
    usleep(20000);
  }
  return ok;
}

bool within(double v, double lo, double hi) { return v >= lo && v <= hi; }

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  int requested = 4;
  for (int i = 1; i < argc; i++) {
    if (strncmp(argv[i], "--ngpus=", 8) == 0) {
      requested = atoi(argv[i] + 8);
    } else {
      fprintf(stderr, "usage: %s [--ngpus=N]   (N even, >= 2; default 4)\n", argv[0]);
      return 2;
    }
  }
  if (requested <= 0) requested = 4;
  if (!ensurePluginOnLibraryPath(argv)) return 1;

  Shared* sh = (Shared*)mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (sh == MAP_FAILED) {
    fprintf(stderr, "mmap failed: %s\n", strerror(errno));
    return 1;
  }
  bool allOk = true;
  printf("== moeloop plugin test: GIN protocol on host memory (3 processes, no GPU)\n");
  bool hostOk = runScenario(sh, Scenario{Kind::kHostGin, 0, "copy", 0, 0, false, false}, 3, 3, 120);
  printf("%s: host-memory GIN check\n", hostOk ? "PASSED" : "FAILED");
  allOk &= hostOk;

  int gpus = countGpus();
  if (gpus < 2) {
    printf("SKIPPED: the plugin GPU test needs at least 2 GPUs (found %d)\n", gpus);
    return allOk ? 0 : 1;
  }
  int n = requested;
  if (n > gpus) n = gpus;
  if (n % 2) n--;
  if (n > kMaxRanks) n = kMaxRanks;
  if (n != requested)
    printf("NOTE: %d GPU(s) requested, %d present: running %d ranks as 2 nodes x %d\n", requested,
           gpus, n, n / 2);
  int perNode = n / 2;

  printf("== scenario main: %d ranks as 2 fake nodes x %d GPUs (NCCL_NET_PLUGIN=moeloop, copy transport)\n",
         n, perNode);
  bool mainOk = runScenario(sh, Scenario{Kind::kMain, kSlotMain, "copy", 0, 0, true, true}, n, perNode, 540);
  double bw0 = sh->netBwGBps[kSlotMain], rtt0 = sh->rttUs[kSlotMain], gbw0 = sh->ginBwGBps[kSlotMain];
  double grtt0 = sh->ginSignalRttUs[kSlotMain];
  printf("%s: NCCL all-reduce / all-to-all across fake nodes, GIN puts with SignalAdd to every rank\n",
         mainOk ? "PASSED" : "FAILED");
  printf("   unshaped: NCCL send/recv %.2f GB/s, round trip %.0f us, GIN put %.2f GB/s, "
         "GIN signal round trip %.1f us\n", bw0, rtt0, gbw0, grtt0);
  allOk &= mainOk;

  printf("== scenario shaped: NCCL_MOELOOP_GBPS=%g NCCL_MOELOOP_LATENCY_US=%g\n", kShapedGBps,
         kShapedLatencyUs);
  bool shapedOk = runScenario(sh, Scenario{Kind::kMeasure, kSlotShaped, "copy", kShapedGBps, kShapedLatencyUs,
                                           true, false}, n, perNode, 540);
  double bw1 = sh->netBwGBps[kSlotShaped], rtt1 = sh->rttUs[kSlotShaped], gbw1 = sh->ginBwGBps[kSlotShaped];
  double grtt1 = sh->ginSignalRttUs[kSlotShaped];
  printf("   shaped:   NCCL send/recv %.2f GB/s, round trip %.0f us, GIN put %.2f GB/s, "
         "GIN signal round trip %.1f us\n", bw1, rtt1, gbw1, grtt1);
  if (shapedOk) {
    // Bandwidth as set (within 25 %), below the unshaped one, and the latency shows in round trips.
    bool bwOk = within(bw1, 0.75 * kShapedGBps, 1.15 * kShapedGBps) && bw1 < bw0;
    bool ginOk = within(gbw1, 0.70 * kShapedGBps, 1.15 * kShapedGBps) && gbw1 < gbw0;
    bool latOk = rtt1 >= 2 * kShapedLatencyUs * 0.95 && rtt1 > rtt0 + kShapedLatencyUs;
    bool ginLatOk = grtt1 >= 2 * kShapedLatencyUs * 0.95 && grtt1 > grtt0 + kShapedLatencyUs;
    if (!bwOk) printf("FAILED: shaped NCCL bandwidth %.3f GB/s is not %.2f GB/s +-25%%\n", bw1, kShapedGBps);
    if (!ginOk) printf("FAILED: shaped GIN bandwidth %.3f GB/s is not %.2f GB/s -30%%/+15%%\n", gbw1, kShapedGBps);
    if (!latOk) printf("FAILED: shaped round trip %.0f us does not show 2 x %.0f us of latency\n", rtt1, kShapedLatencyUs);
    if (!ginLatOk)
      printf("FAILED: shaped GIN signal round trip %.1f us does not show 2 x %.0f us of latency\n", grtt1,
             kShapedLatencyUs);
    shapedOk = bwOk && ginOk && latOk && ginLatOk;
  }
  printf("%s: shaping changes the measured bandwidth and latency as set\n", shapedOk ? "PASSED" : "FAILED");
  allOk &= shapedOk;

  printf("== GIN per transport: unshaped and NCCL_MOELOOP_GBPS=%g NCCL_MOELOOP_LATENCY_US=%g (ConnectX-7 preset)\n",
         kNicGBps, kNicLatencyUs);
  bool nicOk = runScenario(sh, Scenario{Kind::kMeasure, kSlotCopyNic, "copy", kNicGBps, kNicLatencyUs, false, false},
                           n, perNode, 540);
  bool sockOk = runScenario(sh, Scenario{Kind::kMeasure, kSlotSocket, "socket", 0, 0, false, true}, n, perNode, 540);
  bool sockNicOk = runScenario(sh, Scenario{Kind::kMeasure, kSlotSocketNic, "socket", kNicGBps, kNicLatencyUs,
                                            false, false}, n, perNode, 540);
  const struct { const char* what; int slot; } rows[] = {{"copy,   unshaped", kSlotMain},
                                                         {"copy,   GBPS=50 LATENCY_US=3", kSlotCopyNic},
                                                         {"socket, unshaped", kSlotSocket},
                                                         {"socket, GBPS=50 LATENCY_US=3", kSlotSocketNic}};
  for (const auto& row : rows)
    printf("   %-30s GIN put stream (64 MiB in 4 MiB puts) %7.2f GB/s, 8-byte signal round trip %7.1f us, "
           "%3.0f %% of the bytes by copy engine\n", row.what, sh->ginBwGBps[row.slot],
           sh->ginSignalRttUs[row.slot], 100 * sh->ginCopiedShare[row.slot]);
  // Half a round trip is one put each way; the plugin's hops of it are timed, the rest is
  // NCCL's proxy picking the put up (GPU -> iput) and the signal's copy reaching the kernel.
  for (const auto& row : rows) {
    const double* h = sh->ginHopUs[row.slot];
    if (sh->ginSignalRttUs[row.slot] <= 0 || h[0] < 0 || h[3] < 0) continue;
    const double inside = h[0] + h[1] + h[2] + h[3] + h[4];
    printf("   %-30s one way %5.1f us = plugin %5.1f (queue %.1f, copy %.1f, release %.1f, wire %.1f, "
           "apply %.1f) + outside the plugin %5.1f (GPU put -> iput, signal copy -> kernel)\n", row.what,
           sh->ginSignalRttUs[row.slot] / 2, inside, h[0], h[1], h[2], h[3], h[4],
           sh->ginSignalRttUs[row.slot] / 2 - inside);
  }
  printf("%s: GIN through the copy transport shaped as a NIC (counters match what was sent)\n", nicOk ? "PASSED" : "FAILED");
  printf("%s: GIN through the socket transport, correctness rounds and measurements (counters match)\n",
         sockOk && sockNicOk ? "PASSED" : "FAILED");
  allOk &= nicOk && sockOk && sockNicOk;
  if (mainOk) {
    bool copied = sh->ginCopiedShare[kSlotMain] > 0.999;
    printf("%s: the copy transport moved the GIN put stream (%.0f %% of its bytes by copy engine)\n",
           copied ? "PASSED" : "FAILED", 100 * sh->ginCopiedShare[kSlotMain]);
    allOk &= copied;
  }
  // The targets: reported, not enforced.
  double cbw = sh->ginBwGBps[kSlotMain], crtt = sh->ginSignalRttUs[kSlotMain];
  double nbw = sh->ginBwGBps[kSlotCopyNic], nrtt = sh->ginSignalRttUs[kSlotCopyNic];
  printf("%s: copy transport put stream %.1f GB/s (target >= 100 GB/s)\n", cbw >= 100 ? "MET" : "MISSED", cbw);
  printf("%s: copy transport signal round trip %.1f us (target <= 20 us)\n", crtt <= 20 ? "MET" : "MISSED", crtt);
  printf("%s: shaped put stream %.2f GB/s (target %g GB/s +-5 %%)\n",
         within(nbw, 0.95 * kNicGBps, 1.05 * kNicGBps) ? "MET" : "MISSED", nbw, kNicGBps);
  printf("%s: shaped signal round trip %.1f us = unshaped %.1f + %.1f us (target + %g +-2 us)\n",
         within(nrtt - crtt, 2 * kNicLatencyUs - 2, 2 * kNicLatencyUs + 2) ? "MET" : "MISSED", nrtt, crtt,
         nrtt - crtt, 2 * kNicLatencyUs);
  printf("%s\n", allOk ? "ALL PASSED" : "SOME CHECKS FAILED");
  munmap(sh, sizeof(Shared));
  return allOk ? 0 : 1;
}
