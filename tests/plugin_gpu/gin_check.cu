// GIN through the moeloop plugin: ncclDevCommCreate with GIN, then kernels in which every rank
// puts a decoy over a whole chunk and then the chunk over it (in four pieces, the last with
// ncclGin_SignalAdd: puts to the same bytes must land in put order), a value (putValue on NCCL >= 2.29,
// an 8-byte put before: see roundKernel) and a signal-only SignalInc to every other rank, and waits
// for its signals; every byte is checked on the GPU and again on the host. Also a bulk put for the
// bandwidth measurement and a signal-only ping-pong for the GIN signal round-trip time.
#include <dlfcn.h>
#include <nccl.h>
#include <nccl_device.h>
#include <string.h>
#include <vector>

#include "../../plugin/moeloop_stats.h"
#include "nccl_compat.h"
#include "plugin_gpu_test.h"

namespace plugintest {
namespace {

constexpr size_t kChunk = (1u << 20) + 4096 + 24;  // bytes from each rank to each other rank
constexpr size_t kPiece0 = 8, kPiece1 = 4088, kPiece2 = 65536;
constexpr size_t kBulk = 64u << 20;                // bulk put for the bandwidth measurement
constexpr int kDecoyByte = 0xA5;                   // what the decoy put of a round writes
constexpr int kBulkPieces = 16;
constexpr int kBulkIters = 8;                      // timed bulk puts (after one warm-up)
constexpr unsigned long long kTimeoutNs = 60ull * 1000 * 1000 * 1000;
constexpr int kRounds = 3;
constexpr int kPingIters = 200;                    // signal round trips timed per scenario
// GIN signal ids: 0..2 the correctness rounds and the bulk put, 3 ping (A -> B), 4 pong (B -> A).
constexpr int kSignalPing = 3, kSignalPong = 4, kSignals = 5;
enum : int { kStatWrongBytes = 0, kStatTimeouts = 1, kStatWrongValues = 2, kStatOvershoot = 3, kStats = 4 };

struct Layout {
  size_t send, recv, valsSrc, vals, bulk, total;
};

size_t alignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

Layout layoutFor(int n) {
  Layout L;
  size_t off = 0;
  L.send = off;
  off = alignUp(off + (size_t)n * kChunk, 4096);
  L.recv = off;
  off = alignUp(off + (size_t)n * kChunk, 4096);
  L.valsSrc = off;
  off = alignUp(off + (size_t)n * 8, 4096);
  L.vals = off;
  off = alignUp(off + (size_t)n * 8, 4096);
  L.bulk = off;
  off += kBulk;
  L.total = alignUp(off, 1u << 21);
  return L;
}

__host__ __device__ inline uint8_t chunkByte(int src, int dst, size_t i, uint32_t round) {
  return (uint8_t)(src * 29 + dst * 7 + round * 53 + (uint32_t)(i % 241) + (uint32_t)(i >> 10));
}
__host__ __device__ inline uint64_t valueOf(int src, uint32_t round) {
  return ((uint64_t)round << 40) | ((uint64_t)src << 20) | 0xBEEFull;
}

__device__ inline uint64_t globalNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

struct RoundArgs {
  ncclWindow_t win;
  Layout L;
  int rank, nRanks;
  uint32_t round;
  uint64_t expectAdd, expectInc;
  unsigned long long* stats;
};

__global__ void resetSignalsKernel(ncclDevComm dc) {
  ncclGin gin(dc, 0);
  gin.resetSignal(0);
  gin.resetSignal(1);
  gin.resetSignal(2);
  gin.resetSignal(kSignalPing);
  gin.resetSignal(kSignalPong);
}

// Blocks 0..nRanks-1: block p sends to rank p (none to itself). Block nRanks waits and checks.
__global__ void roundKernel(ncclDevComm dc, RoundArgs a) {
  ncclGin gin(dc, 0);
  ncclTeam world = ncclTeamWorld(dc);
  const int p = blockIdx.x;
  if (p < a.nRanks) {
    if (p == a.rank) return;
    size_t dst = a.L.recv + (size_t)a.rank * kChunk, src = a.L.send + (size_t)p * kChunk;
    // The decoy (kDecoyByte everywhere): the pieces below must overwrite every byte of it.
    gin.put(world, p, a.win, dst, a.win, a.L.bulk, kChunk, ncclGin_None{}, ncclGin_None{}, ncclCoopCta());
    gin.put(world, p, a.win, dst, a.win, src, kPiece0, ncclGin_None{}, ncclGin_None{}, ncclCoopCta());
    dst += kPiece0;
    src += kPiece0;
    gin.put(world, p, a.win, dst, a.win, src, kPiece1, ncclGin_None{}, ncclGin_None{}, ncclCoopCta());
    dst += kPiece1;
    src += kPiece1;
    gin.put(world, p, a.win, dst, a.win, src, kPiece2, ncclGin_None{}, ncclGin_None{}, ncclCoopCta());
    dst += kPiece2;
    src += kPiece2;
    // The signal must become visible only after all four pieces have landed.
    gin.put(world, p, a.win, dst, a.win, src, kChunk - kPiece0 - kPiece1 - kPiece2,
            ncclGin_SignalAdd{0, (uint64_t)(a.rank + 1)}, ncclGin_None{}, ncclCoopCta());
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 0)
    gin.putValue(world, p, a.win, a.L.vals + (size_t)a.rank * 8, valueOf(a.rank, a.round),
                 ncclGin_None{}, ncclCoopCta());
#else
    // NCCL 2.28.x's GIN proxy thread crashes on putValue (it indexes its inline buffer with a
    // pointer to a stack copy of the descriptor), whatever the plugin: send the value as an
    // 8-byte put of a word the host wrote into the window instead.
    gin.put(world, p, a.win, a.L.vals + (size_t)a.rank * 8, a.win, a.L.valsSrc + (size_t)p * 8, 8,
            ncclGin_None{}, ncclGin_None{}, ncclCoopCta());
#endif
    gin.signal(world, p, ncclGin_SignalInc{1}, ncclCoopCta());
    gin.flush(ncclCoopCta());
    return;
  }
  __shared__ int timedOut;
  if (threadIdx.x == 0) {
    timedOut = 0;
    uint64_t t0 = globalNs();
    while (gin.readSignal(0) < a.expectAdd || gin.readSignal(1) < a.expectInc) {
      if (globalNs() - t0 > kTimeoutNs) {
        timedOut = 1;
        atomicAdd(&a.stats[kStatTimeouts], 1ull);
        break;
      }
    }
    if (!timedOut && (gin.readSignal(0) != a.expectAdd || gin.readSignal(1) != a.expectInc))
      atomicAdd(&a.stats[kStatOvershoot], 1ull);
  }
  __syncthreads();
  if (timedOut) return;
  const char* base = (const char*)ncclGetLocalPointer(a.win, 0);
  unsigned long long bad = 0;
  for (int s = 0; s < a.nRanks; s++) {
    if (s == a.rank) continue;
    const unsigned int* words = (const unsigned int*)(base + a.L.recv + (size_t)s * kChunk);
    for (size_t w = threadIdx.x; w < kChunk / 4; w += blockDim.x) {
      unsigned int v = __ldcg(words + w);
      for (int k = 0; k < 4; k++)
        if (((v >> (8 * k)) & 0xff) != chunkByte(s, a.rank, w * 4 + k, a.round)) bad++;
    }
    if (threadIdx.x == 0) {
      unsigned long long v = __ldcg((const unsigned long long*)(base + a.L.vals + (size_t)s * 8));
      if (v != valueOf(s, a.round)) atomicAdd(&a.stats[kStatWrongValues], 1ull);
    }
  }
  if (bad) atomicAdd(&a.stats[kStatWrongBytes], bad);
}

__global__ void bulkSendKernel(ncclDevComm dc, ncclWindow_t win, size_t off, int peer) {
  ncclGin gin(dc, 0);
  ncclTeam world = ncclTeamWorld(dc);
  const size_t piece = kBulk / kBulkPieces;
  for (int k = 0; k < kBulkPieces - 1; k++)
    gin.put(world, peer, win, off + k * piece, win, off + k * piece, piece, ncclGin_None{},
            ncclGin_None{}, ncclCoopCta());
  size_t last = (size_t)(kBulkPieces - 1) * piece;
  gin.put(world, peer, win, off + last, win, off + last, kBulk - last, ncclGin_SignalAdd{2, 1},
          ncclGin_None{}, ncclCoopCta());
  gin.flush(ncclCoopCta());
}

__global__ void waitSignalKernel(ncclDevComm dc, int signal, uint64_t least, unsigned long long* stats) {
  ncclGin gin(dc, 0);
  uint64_t t0 = globalNs();
  while (gin.readSignal(signal) < least) {
    if (globalNs() - t0 > kTimeoutNs) {
      atomicAdd(&stats[kStatTimeouts], 1ull);
      return;
    }
  }
}

// One thread. The starter sends a signal-only SignalInc to `peer` and waits for the reply; the
// other side waits and replies. `base`: both signals' values before this launch. *elapsedNs: the
// starter's time for all iterations (the GPU's global timer).
__global__ void signalPingPongKernel(ncclDevComm dc, int peer, bool starter, int iters, uint64_t base,
                                     unsigned long long* stats, unsigned long long* elapsedNs) {
  ncclGin gin(dc, 0);
  ncclTeam world = ncclTeamWorld(dc);
  const int waitOn = starter ? kSignalPong : kSignalPing, sendTo = starter ? kSignalPing : kSignalPong;
  uint64_t t0 = globalNs();
  for (int i = 1; i <= iters; i++) {
    if (starter) gin.signal(world, peer, ncclGin_SignalInc{(ncclGinSignal_t)sendTo}, ncclCoopThread());
    uint64_t tw = globalNs();
    while (gin.readSignal(waitOn) < base + i) {
      if (globalNs() - tw > kTimeoutNs) {
        atomicAdd(&stats[kStatTimeouts], 1ull);
        return;
      }
    }
    if (!starter) gin.signal(world, peer, ncclGin_SignalInc{(ncclGinSignal_t)sendTo}, ncclCoopThread());
  }
  gin.flush(ncclCoopThread());
  *elapsedNs = globalNs() - t0;
}

bool checkStats(unsigned long long* dStats, const char* what) {
  unsigned long long h[kStats];
  PT_CUDA(cudaMemcpy(h, dStats, sizeof(h), cudaMemcpyDeviceToHost));
  PT_CHECK(h[kStatTimeouts] == 0, "%s: a kernel timed out waiting for GIN signals", what);
  PT_CHECK(h[kStatWrongBytes] == 0, "%s: %llu wrong bytes seen on the GPU", what, h[kStatWrongBytes]);
  PT_CHECK(h[kStatWrongValues] == 0, "%s: %llu wrong putValue results", what, h[kStatWrongValues]);
  PT_CHECK(h[kStatOvershoot] == 0, "%s: signals went past their expected values", what);
  PT_CUDA(cudaMemset(dStats, 0, sizeof(h)));
  return h[kStatTimeouts] == 0;
}

bool correctnessRounds(const RankInfo& r, ncclComm_t comm, const ncclDevComm& dc, ncclWindow_t win,
                       char* buf, const Layout& L, cudaStream_t s, unsigned long long* dStats) {
  const int n = r.nRanks;
  std::vector<uint8_t> host((size_t)n * kChunk);
  uint64_t sumOthers = 0;
  for (int q = 0; q < n; q++)
    if (q != r.rank) sumOthers += (uint64_t)(q + 1);
  for (uint32_t round = 1; round <= (uint32_t)kRounds; round++) {
    for (int p = 0; p < n; p++)
      for (size_t i = 0; i < kChunk; i++) host[(size_t)p * kChunk + i] = chunkByte(r.rank, p, i, round);
    PT_CUDA(cudaMemcpy(buf + L.send, host.data(), host.size(), cudaMemcpyHostToDevice));
    std::vector<uint64_t> vals(n, valueOf(r.rank, round));
    PT_CUDA(cudaMemcpy(buf + L.valsSrc, vals.data(), n * 8, cudaMemcpyHostToDevice));
    PT_CUDA(cudaMemset(buf + L.recv, 0, (size_t)n * kChunk));
    PT_CUDA(cudaMemset(buf + L.bulk, kDecoyByte, kChunk));  // the decoy's source
    PT_CUDA(cudaMemset(buf + L.vals, 0, (size_t)n * 8));
    PT_CUDA(cudaDeviceSynchronize());
    if (!barrier(r)) return false;
    RoundArgs a{win, L, r.rank, n, round, round * sumOthers, round * (uint64_t)(n - 1), dStats};
    roundKernel<<<n + 1, 256, 0, s>>>(dc, a);
    PT_CUDA(cudaGetLastError());
    if (!waitStream(s, comm, 120, "GIN round kernel")) return false;
    if (!checkStats(dStats, "GIN round")) return false;
    // Host check of every byte as well.
    PT_CUDA(cudaMemcpy(host.data(), buf + L.recv, host.size(), cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (int q = 0; q < n; q++) {
      if (q == r.rank) continue;
      for (size_t i = 0; i < kChunk; i++)
        if (host[(size_t)q * kChunk + i] != chunkByte(q, r.rank, i, round)) bad++;
    }
    PT_CHECK(bad == 0, "round %u: %zu wrong bytes seen on the host", round, bad);
    if (!barrier(r)) return false;  // nobody rewrites buffers a peer still checks
  }
  moeloopStats_t st;
  if (readPluginStats(&st)) {
    PT_CHECK(st.ginCollComms >= 1 && st.ginPuts > 0 && st.ginSignals > 0,
             "GIN traffic did not go through the plugin (%llu comms, %llu puts, %llu signals)",
             (unsigned long long)st.ginCollComms, (unsigned long long)st.ginPuts,
             (unsigned long long)st.ginSignals);
  }
  if (r.rank == 0 && gFailures == 0)
    printf("[rank 0] GIN: %d rounds of put + SignalAdd / 8-byte value / SignalInc to every other rank: "
           "every byte arrived before its signal\n", kRounds);
  return true;
}

// The plugin's counters of this process for GIN peer `peer`, summed over contexts.
bool peerStats(int peer, moeloopPeerStats_t* out) {
  void* h = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return false;
  moeloopGetPeerStats_t fn = (moeloopGetPeerStats_t)dlsym(h, "moeloopGetPeerStats");
  bool ok = fn != nullptr && fn(peer, -1, out, sizeof(*out)) == sizeof(*out);
  dlclose(h);
  return ok;
}

// What the counters of this process moved with `peer` between two snapshots.
moeloopPeerStats_t delta(const moeloopPeerStats_t& after, const moeloopPeerStats_t& before) {
  moeloopPeerStats_t d;
  d.putsSent = after.putsSent - before.putsSent;
  d.bytesSent = after.bytesSent - before.bytesSent;
  d.bytesCopied = after.bytesCopied - before.bytesCopied;
  d.signalsSent = after.signalsSent - before.signalsSent;
  d.putsRecv = after.putsRecv - before.putsRecv;
  d.bytesRecv = after.bytesRecv - before.bytesRecv;
  d.signalsRecv = after.signalsRecv - before.signalsRecv;
  return d;
}

// Rank 0 puts kBulk bytes (kBulkPieces puts, the last with a signal) kBulkIters + 1 times to the
// first rank of node B; that rank times the arrival of the last kBulkIters. The plugin's
// counters must show exactly those bytes leaving rank 0 for it and arriving there from rank 0.
bool bulkBandwidth(const RankInfo& r, ncclComm_t comm, const ncclDevComm& dc, ncclWindow_t win,
                   const Layout& L, cudaStream_t s, unsigned long long* dStats, int slot) {
  const int a = 0, b = r.gpusPerNode;
  const int iters = kBulkIters;
  moeloopPeerStats_t before{}, after{};
  const int other = r.rank == a ? b : a;
  if ((r.rank == a || r.rank == b) && !peerStats(other, &before)) PT_FAIL("moeloopGetPeerStats is missing");
  for (int phase = 0; phase < 2; phase++) {  // 0: warm-up, 1: measured
    if (!barrier(r)) return false;
    double t0 = nowSec();
    int count = phase == 0 ? 1 : iters;
    uint64_t least = phase == 0 ? 1 : 1 + iters;
    if (r.rank == a) {
      for (int k = 0; k < count; k++) bulkSendKernel<<<1, 32, 0, s>>>(dc, win, L.bulk, b);
      PT_CUDA(cudaGetLastError());
    } else if (r.rank == b) {
      waitSignalKernel<<<1, 1, 0, s>>>(dc, 2, least, dStats);
      PT_CUDA(cudaGetLastError());
    }
    if (r.rank == a || r.rank == b) {
      if (!waitStream(s, comm, 300, "GIN bulk put")) return false;
      if (!checkStats(dStats, "GIN bulk put")) return false;
    }
    if (phase == 1 && r.rank == b) r.shared->ginBwGBps[slot] = (double)kBulk * iters / (nowSec() - t0) * 1e-9;
  }
  if ((r.rank == a || r.rank == b) && peerStats(other, &after)) {
    moeloopPeerStats_t d = delta(after, before);
    const uint64_t bytes = (uint64_t)kBulk * (iters + 1), puts = (uint64_t)kBulkPieces * (iters + 1);
    if (r.rank == a) {
      PT_CHECK(d.bytesSent == bytes && d.putsSent == puts && d.signalsSent == (uint64_t)iters + 1,
               "counters to rank %d: %llu bytes in %llu puts with %llu signals sent, expected %llu in "
               "%llu with %llu", b, (unsigned long long)d.bytesSent, (unsigned long long)d.putsSent,
               (unsigned long long)d.signalsSent, (unsigned long long)bytes, (unsigned long long)puts,
               (unsigned long long)iters + 1);
      r.shared->ginCopiedShare[slot] = d.bytesSent ? (double)d.bytesCopied / (double)d.bytesSent : 0;
    } else {
      PT_CHECK(d.bytesRecv == bytes && d.putsRecv == puts && d.signalsRecv == (uint64_t)iters + 1,
               "counters from rank %d: %llu bytes in %llu puts with %llu signals applied, expected "
               "%llu in %llu with %llu", a, (unsigned long long)d.bytesRecv, (unsigned long long)d.putsRecv,
               (unsigned long long)d.signalsRecv, (unsigned long long)bytes, (unsigned long long)puts,
               (unsigned long long)iters + 1);
    }
  }
  return barrier(r);
}

// Rank 0 and the first rank of node B bounce a signal-only SignalInc kPingIters times (after a
// warm-up of the same length); rank 0 reports the mean round trip.
bool signalRoundTrip(const RankInfo& r, ncclComm_t comm, const ncclDevComm& dc, cudaStream_t s,
                     unsigned long long* dStats, int slot) {
  const int a = 0, b = r.gpusPerNode;
  unsigned long long* dElapsed = (unsigned long long*)(dStats + kStats);
  moeloopPeerStats_t before{}, after{};
  const int other = r.rank == a ? b : a;
  if (r.rank == a || r.rank == b) (void)peerStats(other, &before);
  moeloopStats_t hopsBefore{}, hopsAfter{};
  bool hops = false;
  for (int phase = 0; phase < 2; phase++) {  // 0: warm-up, 1: measured
    if (!barrier(r)) return false;
    if (phase == 1 && r.rank == a) hops = readPluginStats(&hopsBefore);
    if (r.rank == a || r.rank == b) {
      signalPingPongKernel<<<1, 1, 0, s>>>(dc, r.rank == a ? b : a, r.rank == a, kPingIters,
                                           (uint64_t)phase * kPingIters, dStats, dElapsed);
      PT_CUDA(cudaGetLastError());
      if (!waitStream(s, comm, 120, "GIN signal ping-pong")) return false;
      if (!checkStats(dStats, "GIN signal ping-pong")) return false;
      if (phase == 1 && r.rank == a) {
        unsigned long long ns = 0;
        PT_CUDA(cudaMemcpy(&ns, dElapsed, sizeof(ns), cudaMemcpyDeviceToHost));
        r.shared->ginSignalRttUs[slot] = (double)ns / kPingIters * 1e-3;
        hops = hops && readPluginStats(&hopsAfter);
        double* out = r.shared->ginHopUs[slot];
        if (hops) {
          moeloopHopAverages(&hopsBefore, &hopsAfter, out);
        } else {
          for (int i = 0; i < 5; i++) out[i] = -1;
        }
      }
    }
  }
  if ((r.rank == a || r.rank == b) && peerStats(other, &after)) {
    moeloopPeerStats_t d = delta(after, before);
    const uint64_t n = 2 * kPingIters;  // warm-up and measured, each way
    PT_CHECK(d.signalsSent == n && d.signalsRecv == n && d.bytesSent == 0 && d.bytesRecv == 0,
             "ping-pong counters with rank %d: %llu signals sent, %llu applied, %llu / %llu bytes; "
             "expected %llu signals and no bytes", other, (unsigned long long)d.signalsSent,
             (unsigned long long)d.signalsRecv, (unsigned long long)d.bytesSent,
             (unsigned long long)d.bytesRecv, (unsigned long long)n);
  }
  return barrier(r);
}

}  // namespace

bool ginChecks(const RankInfo& r, ncclComm_t comm, bool correctness, int slot) {
  Layout L = layoutFor(r.nRanks);
  void* buf = nullptr;
  PT_NCCL(ncclMemAlloc(&buf, L.total));
  ncclWindow_t win;
  PT_NCCL(ncclCommWindowRegister(comm, buf, L.total, &win, NCCL_WIN_COLL_SYMMETRIC));
  ncclDevCommRequirements reqs = nccl_moe::defaultDevCommRequirements();
  reqs.ginForceEnable = true;
  reqs.ginContextCount = 1;
  reqs.ginSignalCount = kSignals;
  reqs.ginCounterCount = 1;
  ncclDevComm dc;
  ncclResult_t res = ncclDevCommCreate(comm, &reqs, &dc);
  if (res != ncclSuccess) {
    PT_FAIL("ncclDevCommCreate with GIN: %s (%s)", ncclGetErrorString(res), ncclGetLastError(comm));
    return false;
  }
  PT_CHECK(dc.ginContextCount >= 1, "the device communicator has no GIN context");
  if (r.rank == 0 && correctness)
    printf("[rank 0] ncclDevCommCreate with GIN succeeded (%d GIN contexts, %d signals)\n",
           (int)dc.ginContextCount, dc.ginSignalCount);
  cudaStream_t s;
  PT_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  unsigned long long* dStats = nullptr;
  PT_CUDA(cudaMalloc(&dStats, (kStats + 1) * sizeof(unsigned long long)));  // + the ping-pong time
  PT_CUDA(cudaMemset(dStats, 0, kStats * sizeof(unsigned long long)));
  resetSignalsKernel<<<1, 1, 0, s>>>(dc);
  PT_CUDA(cudaGetLastError());
  bool ok = waitStream(s, comm, 60, "signal reset");
  if (ok) ok = barrier(r);
  if (ok && correctness) ok = correctnessRounds(r, comm, dc, win, (char*)buf, L, s, dStats);
  if (ok) ok = bulkBandwidth(r, comm, dc, win, L, s, dStats, slot);
  if (ok) ok = signalRoundTrip(r, comm, dc, s, dStats, slot);
  if (ok) ok = barrier(r);
  if (ok) {
    PT_NCCL(ncclDevCommDestroy(comm, &dc));
    PT_NCCL(ncclCommWindowDeregister(comm, win));
    PT_NCCL(ncclMemFree(buf));
  }
  cudaError_t e = cudaFree(dStats);
  PT_CHECK(e == cudaSuccess, "cudaFree: %s", cudaGetErrorString(e));
  e = cudaStreamDestroy(s);
  PT_CHECK(e == cudaSuccess, "cudaStreamDestroy: %s", cudaGetErrorString(e));
  return ok;
}

}  // namespace plugintest
