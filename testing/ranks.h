// Starting the ranks of a multi-GPU test or perf program, one process per GPU.
// Two launch modes, chosen at run time:
//  - under mpirun (binary built with MPI=1 and OMPI_COMM_WORLD_SIZE/PMI_SIZE set): this process
//    is one rank; the NCCL unique id travels by MPI_Bcast;
//  - otherwise the calling process forks one child per rank (before any CUDA call), the
//    children bootstrap NCCL through a shared anonymous mapping, and the parent waits for them
//    and exits with a non-zero status if any child failed.
#pragma once
#include <nccl.h>

namespace moe_ranks {

struct RankEnv {
  int rank = 0, nRanks = 1, localRank = 0;  // localRank = the CUDA device used
};

// Call first thing in main(), before any CUDA call. nRanks <= 0 means "all local GPUs"
// (counted in a short-lived child so the parent never initialises CUDA). Returns true in a rank
// process; in fork mode the parent never returns (it exits with the children's status).
// Additions to that contract:
//  - no GPU visible (cudaGetDeviceCount fails or gives 0): start() prints a "skipping: no GPU"
//    line and returns true with env->nRanks == 0, in the calling process itself (no children are
//    forked); the caller skips its work and returns finish(0);
//  - returns false (after printing why) when the ranks cannot be started: more ranks asked than
//    GPUs visible in fork mode, fork/mmap/MPI_Init failure; the caller then returns non-zero;
//  - sets NCCL_NVLS_ENABLE=0 in the environment unless it is already set;
//  - fork mode: a child that exits non-zero or dies makes the parent send SIGTERM to the others
//    after a grace period (MOE_RANKS_GRACE_S seconds, default 10), then SIGKILL 5 s later; the
//    parent exits 0 only if every child exited 0. Children get SIGTERM if the parent dies.
bool start(int nRanks, RankEnv* env);

// Sets the device and creates the NCCL communicator over all ranks (collective).
// MOE_FAKE_NODES=n (environment): the ranks act as n nodes of nRanks/n consecutive ranks
// (NCCL_HOSTID=moe-fake-node<i> per rank, NCCL_NET_PLUGIN=moeloop unless set); it takes effect
// at the process's first NCCL call, and fails (ncclInvalidUsage) when n does not divide nRanks.
ncclResult_t initComm(const RankEnv& env, ncclComm_t* comm);

// The node count MOE_FAKE_NODES asks for (1 when unset or invalid; initComm rejects the latter).
int fakeNodes();

// Host-side reductions over ranks through the same channel as the bootstrap (collective).
double maxOverRanks(double v);
double minOverRanks(double v);
double sumOverRanks(double v);
void barrier();

// Ends the rank process (MPI_Finalize in MPI mode). Returns `code` for main to return.
// In MPI mode a non-zero code calls MPI_Abort instead, so the other ranks do not hang in a
// collective; in fork mode the parent does the equivalent (see start()).
int finish(int code);

// --- additions -------------------------------------------------------------------------------
// The environment start() returned (rank 0 of 1 before start()).
const RankEnv& currentEnv();
// True when the ranks were launched by mpirun (MPI mode), false in fork mode.
bool isMpiMode();

}  // namespace moe_ranks
