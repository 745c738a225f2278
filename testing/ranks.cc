// Starting the ranks of a multi-GPU test or perf program: fork mode (one child process per GPU,
// bootstrap through a shared anonymous mapping) or MPI mode (built with NCCL_MOE_MPI=1 and
// launched by mpirun). See ranks.h for the contract.
#include "ranks.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <new>
#include <vector>

#if NCCL_MOE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace moe_ranks {
namespace {

// State shared by the children of one fork-mode launch. Lives in a MAP_SHARED anonymous
// mapping created by the parent before fork(), so every child sees the same bytes.
struct SharedState {
  pthread_barrier_t barrier;        // process-shared, count = nRanks
  std::atomic<int> idGeneration;    // rank 0 stores g after writing the id of initComm call g
  std::atomic<int> idFailedGeneration;  // rank 0 stores g if ncclGetUniqueId failed in call g
  ncclUniqueId id;                  // the id of the latest initComm call
  int nRanks;
  double slots[1];                  // [nRanks], one value per rank for the reductions
};
static_assert(std::atomic<int>::is_always_lock_free, "atomics must work across processes");

enum class Mode { kNone, kFork, kMpi };

Mode gMode = Mode::kNone;
RankEnv gEnv;
SharedState* gShared = nullptr;
size_t gSharedBytes = 0;
int gInitCalls = 0;  // initComm calls made by this process (matches across ranks)

double nowSeconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Counts the visible GPUs in a short-lived child so that this process never initialises CUDA
// (a CUDA context does not survive fork()). Returns 0 when the count fails.
int countGpusInChild() {
  int fds[2];
  if (pipe(fds) != 0) {
    fprintf(stderr, "moe_ranks: pipe() failed: %s\n", strerror(errno));
    return 0;
  }
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "moe_ranks: fork() failed: %s\n", strerror(errno));
    close(fds[0]);
    close(fds[1]);
    return 0;
  }
  if (pid == 0) {
    close(fds[0]);
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      fprintf(stderr, "moe_ranks: cudaGetDeviceCount failed: %s\n", cudaGetErrorString(err));
      count = 0;
    }
    ssize_t written = write(fds[1], &count, sizeof(count));
    _exit(written == (ssize_t)sizeof(count) ? 0 : 1);
  }
  close(fds[1]);
  int count = 0;
  ssize_t got;
  do {
    got = read(fds[0], &count, sizeof(count));
  } while (got < 0 && errno == EINTR);
  if (got != (ssize_t)sizeof(count)) count = 0;
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return count;
}

double graceSeconds() {
  const char* s = getenv("MOE_RANKS_GRACE_S");
  if (s && *s) {
    double v = atof(s);
    if (v >= 0) return v;
  }
  return 10.0;
}

void describeStatus(int status, char* buf, size_t len) {
  if (WIFEXITED(status))
    snprintf(buf, len, "exited with code %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
  else
    snprintf(buf, len, "ended with status 0x%x", status);
}

// Parent side of fork mode: waits for every child; once one fails, gives the others a grace
// period, then SIGTERM, then SIGKILL. Never returns.
[[noreturn]] void superviseChildren(const std::vector<pid_t>& pids) {
  const int n = (int)pids.size();
  std::vector<bool> alive(n, true);
  int remaining = n, exitCode = 0, firstFailedRank = -1;
  double termAt = 0, killAt = 0;
  bool termSent = false, killSent = false;
  while (remaining > 0) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      int rank = -1;
      for (int r = 0; r < n; r++)
        if (pids[r] == pid) rank = r;
      if (rank < 0) continue;  // not one of ours
      alive[rank] = false;
      remaining--;
      bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok) {
        char what[128];
        describeStatus(status, what, sizeof(what));
        if (firstFailedRank < 0) {
          firstFailedRank = rank;
          exitCode = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
          double grace = graceSeconds();
          termAt = nowSeconds() + grace;
          fprintf(stderr, "moe_ranks: rank %d (pid %d) %s; %d other rank(s) get %.0f s to end\n",
                  rank, (int)pid, what, remaining, grace);
        } else {
          fprintf(stderr, "moe_ranks: rank %d (pid %d) %s%s\n", rank, (int)pid, what,
                  termSent ? " (after rank failure)" : "");
        }
      }
      continue;
    }
    if (pid < 0) {
      if (errno == EINTR) continue;
      if (errno == ECHILD) break;
      fprintf(stderr, "moe_ranks: waitpid failed: %s\n", strerror(errno));
      break;
    }
    // No child changed state: escalate if a rank failed a while ago.
    double now = nowSeconds();
    if (firstFailedRank >= 0 && !termSent && now >= termAt) {
      fprintf(stderr, "moe_ranks: rank %d failed; sending SIGTERM to %d remaining rank(s)\n",
              firstFailedRank, remaining);
      for (int r = 0; r < n; r++)
        if (alive[r]) kill(pids[r], SIGTERM);
      termSent = true;
      killAt = now + 5.0;
    } else if (termSent && !killSent && now >= killAt) {
      fprintf(stderr, "moe_ranks: sending SIGKILL to %d remaining rank(s)\n", remaining);
      for (int r = 0; r < n; r++)
        if (alive[r]) kill(pids[r], SIGKILL);
      killSent = true;
    }
    usleep(20 * 1000);
  }
  if (exitCode == 0 && firstFailedRank >= 0) exitCode = 1;
  fflush(stdout);
  fflush(stderr);
  exit(exitCode);
}

bool startFork(int nRanks, int gpus, RankEnv* env) {
  if (nRanks > gpus) {
    fprintf(stderr, "moe_ranks: %d ranks requested but only %d GPU(s) visible (one rank per GPU)\n",
            nRanks, gpus);
    return false;
  }
  gSharedBytes = sizeof(SharedState) + sizeof(double) * (size_t)nRanks;
  void* mem = mmap(nullptr, gSharedBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    fprintf(stderr, "moe_ranks: mmap of %zu shared bytes failed: %s\n", gSharedBytes,
            strerror(errno));
    return false;
  }
  memset(mem, 0, gSharedBytes);
  SharedState* st = static_cast<SharedState*>(mem);
  new (&st->idGeneration) std::atomic<int>(0);
  new (&st->idFailedGeneration) std::atomic<int>(0);
  st->nRanks = nRanks;
  pthread_barrierattr_t attr;
  int err = pthread_barrierattr_init(&attr);
  if (err == 0) err = pthread_barrierattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  if (err == 0) err = pthread_barrier_init(&st->barrier, &attr, (unsigned)nRanks);
  pthread_barrierattr_destroy(&attr);
  if (err != 0) {
    fprintf(stderr, "moe_ranks: process-shared pthread barrier setup failed: %s\n", strerror(err));
    munmap(mem, gSharedBytes);
    return false;
  }
  gShared = st;

  fflush(stdout);  // so no buffered output is printed once per child
  fflush(stderr);
  const pid_t parent = getpid();
  std::vector<pid_t> pids(nRanks, -1);
  for (int r = 0; r < nRanks; r++) {
    pid_t pid = fork();
    if (pid < 0) {
      fprintf(stderr, "moe_ranks: fork() of rank %d failed: %s; stopping the others\n", r,
              strerror(errno));
      for (int q = 0; q < r; q++) kill(pids[q], SIGTERM);
      for (int q = 0; q < r; q++) waitpid(pids[q], nullptr, 0);
      exit(1);
    }
    if (pid == 0) {
      // Rank process: die with the parent so that nothing is left behind.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(1);  // the parent died before prctl took effect
      gMode = Mode::kFork;
      gEnv.rank = r;
      gEnv.nRanks = nRanks;
      gEnv.localRank = r;
      *env = gEnv;
      return true;
    }
    pids[r] = pid;
  }
  superviseChildren(pids);
}

#if NCCL_MOE_MPI
bool mpiLaunched() { return getenv("OMPI_COMM_WORLD_SIZE") != nullptr || getenv("PMI_SIZE") != nullptr; }

bool mpiCheck(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return true;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fprintf(stderr, "moe_ranks: [rank %d] %s failed: %s\n", gEnv.rank, what, msg);
  return false;
}

// Reads the first of the launcher variables that give the node-local rank; -1 if none.
int envLocalRank() {
  const char* names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                         "SLURM_LOCALID", "PMI_LOCAL_RANK"};
  for (const char* name : names) {
    const char* v = getenv(name);
    if (v && *v) return atoi(v);
  }
  return -1;
}

bool startMpi(int nRanks, RankEnv* env) {
  if (!mpiCheck(MPI_Init(nullptr, nullptr), "MPI_Init")) return false;
  gMode = Mode::kMpi;
  int rank = 0, size = 1;
  if (!mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank") ||
      !mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &size), "MPI_Comm_size"))
    return false;
  gEnv.rank = rank;
  gEnv.nRanks = size;
  if (nRanks > 0 && nRanks != size && rank == 0)
    fprintf(stderr, "moe_ranks: %d ranks requested but mpirun started %d; using %d\n", nRanks,
            size, size);
  int gpus = 0;
  cudaError_t err = cudaGetDeviceCount(&gpus);
  if (err != cudaSuccess) {
    fprintf(stderr, "moe_ranks: [rank %d] cudaGetDeviceCount failed: %s\n", rank,
            cudaGetErrorString(err));
    gpus = 0;
  }
  // Every rank must agree on skipping, or the ones that go on would hang.
  int minGpus = gpus;
  if (!mpiCheck(MPI_Allreduce(&gpus, &minGpus, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD),
                "MPI_Allreduce(gpu count)"))
    return false;
  if (minGpus == 0) {
    if (rank == 0) printf("# moe_ranks: no GPU visible on some rank: skipping: no GPU\n");
    gEnv.nRanks = 0;
    *env = gEnv;
    return true;
  }
  int local = envLocalRank();
  gEnv.localRank = local >= 0 ? local : rank % gpus;
  if (gEnv.localRank >= gpus) {
    fprintf(stderr, "moe_ranks: [rank %d] local rank %d but only %d GPU(s) visible\n", rank,
            gEnv.localRank, gpus);
    return false;
  }
  *env = gEnv;
  return true;
}
#endif

bool checkCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  fprintf(stderr, "moe_ranks: [rank %d] %s failed: %s (%s)\n", gEnv.rank, what,
          cudaGetErrorString(err), cudaGetErrorName(err));
  return false;
}

void forkBarrier() {
  int rc = pthread_barrier_wait(&gShared->barrier);
  if (rc != 0 && rc != PTHREAD_BARRIER_SERIAL_THREAD) {
    fprintf(stderr, "moe_ranks: [rank %d] pthread_barrier_wait failed: %s\n", gEnv.rank,
            strerror(rc));
    exit(1);
  }
}

enum class ReduceOp { kMax, kMin, kSum };

double reduce(double v, ReduceOp op) {
  if (gMode == Mode::kNone) return v;
#if NCCL_MOE_MPI
  if (gMode == Mode::kMpi) {
    MPI_Op mop = op == ReduceOp::kMax ? MPI_MAX : op == ReduceOp::kMin ? MPI_MIN : MPI_SUM;
    double result = v;
    if (!mpiCheck(MPI_Allreduce(&v, &result, 1, MPI_DOUBLE, mop, MPI_COMM_WORLD), "MPI_Allreduce"))
      MPI_Abort(MPI_COMM_WORLD, 1);
    return result;
  }
#endif
  // Fork mode: publish, wait for all, combine in rank order (same result on every rank), wait
  // again so that nobody overwrites its slot before all have read it.
  gShared->slots[gEnv.rank] = v;
  forkBarrier();
  double result = gShared->slots[0];
  for (int r = 1; r < gEnv.nRanks; r++) {
    double x = gShared->slots[r];
    if (op == ReduceOp::kMax) result = x > result ? x : result;
    else if (op == ReduceOp::kMin) result = x < result ? x : result;
    else result += x;
  }
  forkBarrier();
  return result;
}

// Fork mode: rank 0 creates the id of initComm call `generation` and publishes it; the others
// wait for it (or for rank 0's failure) in the shared mapping.
bool forkShareId(int generation, ncclUniqueId* id) {
  if (gEnv.rank == 0) {
    ncclResult_t res = ncclGetUniqueId(id);
    if (res != ncclSuccess) {
      fprintf(stderr, "moe_ranks: [rank 0] ncclGetUniqueId failed: %s (%s)\n",
              ncclGetErrorString(res), ncclGetLastError(nullptr));
      gShared->idFailedGeneration.store(generation, std::memory_order_release);
      return false;
    }
    memcpy(&gShared->id, id, sizeof(*id));
    gShared->idGeneration.store(generation, std::memory_order_release);
    return true;
  }
  const double deadline = nowSeconds() + 300.0;
  while (gShared->idGeneration.load(std::memory_order_acquire) < generation) {
    if (gShared->idFailedGeneration.load(std::memory_order_acquire) >= generation) {
      fprintf(stderr, "moe_ranks: [rank %d] rank 0 could not create the NCCL unique id\n",
              gEnv.rank);
      return false;
    }
    if (nowSeconds() > deadline) {
      fprintf(stderr, "moe_ranks: [rank %d] no NCCL unique id from rank 0 after 300 s\n",
              gEnv.rank);
      return false;
    }
    usleep(100);
  }
  memcpy(id, &gShared->id, sizeof(*id));
  return true;
}

}  // namespace

bool start(int nRanks, RankEnv* env) {
  if (gMode != Mode::kNone) {
    fprintf(stderr, "moe_ranks: start() called twice\n");
    return false;
  }
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
#if NCCL_MOE_MPI
  if (mpiLaunched()) return startMpi(nRanks, env);
#endif
  int gpus = countGpusInChild();
  if (gpus <= 0) {
    printf("# moe_ranks: no CUDA device visible: skipping: no GPU\n");
    fflush(stdout);
    gEnv = RankEnv();
    gEnv.nRanks = 0;
    *env = gEnv;
    return true;
  }
  return startFork(nRanks > 0 ? nRanks : gpus, gpus, env);
}

// MOE_FAKE_NODES=n: the ranks form n nodes of nRanks / n consecutive ranks each, as NCCL sees
// them: NCCL_HOSTID=moe-fake-node<i> per rank, and NCCL_NET_PLUGIN=moeloop (plugin/) unless
// set. Must act before this process's first NCCL call (NCCL reads the host id once); false
// (after printing why) when n does not divide the ranks.
static bool applyFakeNodes(const RankEnv& env) {
  const char* v = getenv("MOE_FAKE_NODES");
  if (v == nullptr || v[0] == '\0') return true;
  const int nodes = atoi(v);
  if (nodes < 1 || env.nRanks % nodes != 0) {
    fprintf(stderr, "moe_ranks: MOE_FAKE_NODES=%s must divide the %d ranks\n", v, env.nRanks);
    return false;
  }
  char host[64];
  snprintf(host, sizeof(host), "moe-fake-node%d", env.rank / (env.nRanks / nodes));
  setenv("NCCL_HOSTID", host, 1);
  if (nodes > 1) setenv("NCCL_NET_PLUGIN", "moeloop", 0);
  return true;
}

int fakeNodes() {
  const char* v = getenv("MOE_FAKE_NODES");
  const int nodes = v ? atoi(v) : 1;
  return nodes > 1 ? nodes : 1;
}

ncclResult_t initComm(const RankEnv& env, ncclComm_t* comm) {
  *comm = nullptr;
  if (gMode == Mode::kNone || env.nRanks <= 0) {
    fprintf(stderr, "moe_ranks: initComm() without ranks (start() not called, or no GPU)\n");
    return ncclInvalidUsage;
  }
  char what[64];
  snprintf(what, sizeof(what), "cudaSetDevice(%d)", env.localRank);
  if (!checkCuda(cudaSetDevice(env.localRank), what)) return ncclUnhandledCudaError;

  if (!applyFakeNodes(env)) return ncclInvalidUsage;

  const int generation = ++gInitCalls;
  ncclUniqueId id;
  memset(&id, 0, sizeof(id));
  if (gMode == Mode::kFork) {
    if (!forkShareId(generation, &id)) return ncclSystemError;
  }
#if NCCL_MOE_MPI
  if (gMode == Mode::kMpi) {
    // Rank 0's status travels with the id so that a failure there stops every rank.
    struct {
      int ok;
      ncclUniqueId id;
    } msg;
    memset(&msg, 0, sizeof(msg));
    if (env.rank == 0) {
      ncclResult_t res = ncclGetUniqueId(&msg.id);
      msg.ok = res == ncclSuccess;
      if (!msg.ok)
        fprintf(stderr, "moe_ranks: [rank 0] ncclGetUniqueId failed: %s (%s)\n",
                ncclGetErrorString(res), ncclGetLastError(nullptr));
    }
    if (!mpiCheck(MPI_Bcast(&msg, sizeof(msg), MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast(unique id)"))
      return ncclSystemError;
    if (!msg.ok) return ncclSystemError;
    id = msg.id;
  }
#endif
  ncclResult_t res = ncclCommInitRank(comm, env.nRanks, id, env.rank);
  if (res != ncclSuccess) {
    fprintf(stderr, "moe_ranks: [rank %d] ncclCommInitRank(nRanks=%d, rank=%d, device=%d) failed: "
            "%s (%s)\n", env.rank, env.nRanks, env.rank, env.localRank, ncclGetErrorString(res),
            ncclGetLastError(nullptr));
    *comm = nullptr;
  }
  return res;
}

double maxOverRanks(double v) { return reduce(v, ReduceOp::kMax); }
double minOverRanks(double v) { return reduce(v, ReduceOp::kMin); }
double sumOverRanks(double v) { return reduce(v, ReduceOp::kSum); }

void barrier() {
  if (gMode == Mode::kFork) {
    forkBarrier();
  }
#if NCCL_MOE_MPI
  else if (gMode == Mode::kMpi) {
    if (!mpiCheck(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier")) MPI_Abort(MPI_COMM_WORLD, 1);
  }
#endif
}

int finish(int code) {
  fflush(stdout);
  fflush(stderr);
#if NCCL_MOE_MPI
  if (gMode == Mode::kMpi) {
    if (code != 0) {
      fprintf(stderr, "moe_ranks: [rank %d] failing with code %d: aborting all ranks\n", gEnv.rank,
              code);
      fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, code);
    }
    MPI_Finalize();
  }
#endif
  return code;
}

const RankEnv& currentEnv() { return gEnv; }

bool isMpiMode() { return gMode == Mode::kMpi; }

}  // namespace moe_ranks
