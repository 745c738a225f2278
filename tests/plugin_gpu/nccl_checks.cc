// NCCL collectives across the fake nodes (they go through the moeloop NET plugin), and the
// bandwidth / latency measurements the shaping scenario compares.
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <vector>

#include "plugin_gpu_test.h"

namespace plugintest {

bool waitStream(cudaStream_t s, ncclComm_t comm, double timeoutSec, const char* what) {
  double t0 = nowSec();
  for (;;) {
    cudaError_t e = cudaStreamQuery(s);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) {
      PT_FAIL("%s: %s", what, cudaGetErrorString(e));
      return false;
    }
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm, &async) != ncclSuccess ||
        (async != ncclSuccess && async != ncclInProgress)) {
      PT_FAIL("%s: NCCL asynchronous error %s (%s)", what, ncclGetErrorString(async),
              ncclGetLastError(comm));
      return false;
    }
    if (nowSec() - t0 > timeoutSec) {
      PT_FAIL("%s: timed out after %.0f s", what, timeoutSec);
      return false;
    }
  }
}

namespace {

struct DeviceBuffer {
  void* p = nullptr;
  ~DeviceBuffer() {
    if (p == nullptr) return;
    cudaError_t e = cudaFree(p);
    PT_CHECK(e == cudaSuccess, "cudaFree: %s", cudaGetErrorString(e));
  }
};

bool allReduceFloat(const RankInfo& r, ncclComm_t comm, cudaStream_t s, size_t count) {
  const int n = r.nRanks;
  std::vector<float> host(count), out(count);
  for (size_t i = 0; i < count; i++) host[i] = (float)((r.rank + 1) * (int)(i % 13 + 1));
  DeviceBuffer in, res;
  PT_CUDA(cudaMalloc(&in.p, count * sizeof(float)));
  PT_CUDA(cudaMalloc(&res.p, count * sizeof(float)));
  PT_CUDA(cudaMemcpy(in.p, host.data(), count * sizeof(float), cudaMemcpyHostToDevice));
  PT_CUDA(cudaMemset(res.p, 0xff, count * sizeof(float)));
  PT_NCCL(ncclAllReduce(in.p, res.p, count, ncclFloat, ncclSum, comm, s));
  if (!waitStream(s, comm, 120, "all-reduce")) return false;
  PT_CUDA(cudaMemcpy(out.data(), res.p, count * sizeof(float), cudaMemcpyDeviceToHost));
  size_t bad = 0, first = 0;
  const int tri = n * (n + 1) / 2;
  for (size_t i = 0; i < count; i++) {
    if (out[i] != (float)(tri * (int)(i % 13 + 1))) {
      if (bad++ == 0) first = i;
    }
  }
  PT_CHECK(bad == 0, "all-reduce float sum of %zu elements: %zu wrong, first at %zu (%g, expected %g)",
           count, bad, first, bad ? out[first] : 0.0, (double)(tri * (int)(first % 13 + 1)));
  return true;
}

bool allReduceIntMax(const RankInfo& r, ncclComm_t comm, cudaStream_t s, size_t count) {
  std::vector<int32_t> host(count), out(count);
  for (size_t i = 0; i < count; i++) host[i] = r.rank * 1000 + (int32_t)(i % 977) - (r.rank % 2) * 5000;
  DeviceBuffer buf;
  PT_CUDA(cudaMalloc(&buf.p, count * sizeof(int32_t)));
  PT_CUDA(cudaMemcpy(buf.p, host.data(), count * sizeof(int32_t), cudaMemcpyHostToDevice));
  PT_NCCL(ncclAllReduce(buf.p, buf.p, count, ncclInt32, ncclMax, comm, s));  // in place
  if (!waitStream(s, comm, 120, "all-reduce max")) return false;
  PT_CUDA(cudaMemcpy(out.data(), buf.p, count * sizeof(int32_t), cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < count; i++) {
    int32_t expect = INT32_MIN;
    for (int q = 0; q < r.nRanks; q++) {
      int32_t v = q * 1000 + (int32_t)(i % 977) - (q % 2) * 5000;
      if (v > expect) expect = v;
    }
    if (out[i] != expect) bad++;
  }
  PT_CHECK(bad == 0, "all-reduce int32 max of %zu elements: %zu wrong", count, bad);
  return true;
}

uint32_t a2aValue(int src, int dst, size_t i) {
  return ((uint32_t)src << 26) ^ ((uint32_t)dst << 20) ^ (uint32_t)(i * 2654435761u >> 12);
}

bool allToAll(const RankInfo& r, ncclComm_t comm, cudaStream_t s, size_t count) {
  const int n = r.nRanks;
  std::vector<uint32_t> host((size_t)n * count), out((size_t)n * count);
  for (int p = 0; p < n; p++)
    for (size_t i = 0; i < count; i++) host[(size_t)p * count + i] = a2aValue(r.rank, p, i);
  DeviceBuffer send, recv;
  size_t bytes = (size_t)n * count * sizeof(uint32_t);
  PT_CUDA(cudaMalloc(&send.p, bytes));
  PT_CUDA(cudaMalloc(&recv.p, bytes));
  PT_CUDA(cudaMemcpy(send.p, host.data(), bytes, cudaMemcpyHostToDevice));
  PT_CUDA(cudaMemset(recv.p, 0, bytes));
  PT_NCCL(ncclGroupStart());
  for (int p = 0; p < n; p++) {
    PT_NCCL(ncclSend((uint32_t*)send.p + (size_t)p * count, count, ncclUint32, p, comm, s));
    PT_NCCL(ncclRecv((uint32_t*)recv.p + (size_t)p * count, count, ncclUint32, p, comm, s));
  }
  PT_NCCL(ncclGroupEnd());
  if (!waitStream(s, comm, 120, "all-to-all")) return false;
  PT_CUDA(cudaMemcpy(out.data(), recv.p, bytes, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (int p = 0; p < n; p++)
    for (size_t i = 0; i < count; i++)
      if (out[(size_t)p * count + i] != a2aValue(p, r.rank, i)) bad++;
  PT_CHECK(bad == 0, "all-to-all of %zu elements per peer: %zu wrong", count, bad);
  return true;
}

}  // namespace

bool ncclCollectiveChecks(const RankInfo& r, ncclComm_t comm) {
  cudaStream_t s;
  PT_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  bool ok = true;
  for (size_t count : {(size_t)1, (size_t)1001, (size_t)262147, (size_t)8 << 20})
    if (ok) ok = allReduceFloat(r, comm, s, count);
  if (ok) ok = allReduceIntMax(r, comm, s, 100003);
  for (size_t count : {(size_t)1, (size_t)4099, (size_t)1 << 18})
    if (ok) ok = allToAll(r, comm, s, count);
  if (r.rank == 0 && ok && gFailures == 0)
    printf("[rank 0] all-reduce (float sum, int32 max) and all-to-all results are correct\n");
  cudaError_t e = cudaStreamDestroy(s);
  PT_CHECK(e == cudaSuccess, "cudaStreamDestroy: %s", cudaGetErrorString(e));
  return ok;
}

bool ncclShapingMeasurements(const RankInfo& r, ncclComm_t comm, int slot) {
  // One rank per fake node: rank 0 (nodeA) and the first rank of nodeB.
  const int a = 0, b = r.gpusPerNode;
  const bool active = r.rank == a || r.rank == b;
  const size_t bytes = 128u << 20;
  const int iters = 3, rttIters = 20;
  cudaStream_t s = nullptr;
  DeviceBuffer buf;
  if (active) {
    PT_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    PT_CUDA(cudaMalloc(&buf.p, bytes));
    PT_CUDA(cudaMemset(buf.p, 1, bytes));
    // Warm-up: connects the pair.
    if (r.rank == a) PT_NCCL(ncclSend(buf.p, bytes, ncclChar, b, comm, s));
    else PT_NCCL(ncclRecv(buf.p, bytes, ncclChar, a, comm, s));
    if (!waitStream(s, comm, 300, "bandwidth warm-up")) return false;
  }
  // `n` round trips of 8 bytes (enqueued only): a sends then receives, b receives then sends.
  auto pingPong = [&](int n) {
    for (int it = 0; it < n; it++) {
      if (r.rank == a) {
        PT_NCCL(ncclSend(buf.p, 8, ncclChar, b, comm, s));
        PT_NCCL(ncclRecv(buf.p, 8, ncclChar, b, comm, s));
      } else {
        PT_NCCL(ncclRecv(buf.p, 8, ncclChar, a, comm, s));
        PT_NCCL(ncclSend(buf.p, 8, ncclChar, a, comm, s));
      }
    }
    return true;
  };
  if (!barrier(r)) return false;
  double t0 = nowSec();
  if (active) {
    for (int it = 0; it < iters; it++) {
      if (r.rank == a) PT_NCCL(ncclSend(buf.p, bytes, ncclChar, b, comm, s));
      else PT_NCCL(ncclRecv(buf.p, bytes, ncclChar, a, comm, s));
    }
    if (!waitStream(s, comm, 300, "bandwidth")) return false;
    if (r.rank == b) r.shared->netBwGBps[slot] = (double)bytes * iters / (nowSec() - t0) * 1e-9;
    if (!pingPong(5)) return false;
    if (!waitStream(s, comm, 60, "ping-pong warm-up")) return false;
  }
  if (!barrier(r)) return false;
  if (active) {
    double t1 = nowSec();
    if (!pingPong(rttIters)) return false;
    if (!waitStream(s, comm, 60, "ping-pong")) return false;
    if (r.rank == a) r.shared->rttUs[slot] = (nowSec() - t1) / rttIters * 1e6;
    PT_CUDA(cudaStreamDestroy(s));
  }
  return barrier(r);
}

}  // namespace plugintest
