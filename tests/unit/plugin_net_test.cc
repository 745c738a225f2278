// CPU tests of the moeloop plugin's NET transport (plugin/), driven through the ncclNet_v11_t
// table it exports, between two processes (fork) on host memory: many sizes, many requests in
// flight, partial reads and writes, several connections, a peer closing early, truncation,
// stray connections, unix and TCP sockets, and the shaping knobs.
#include <gtest/gtest.h>

#include <errno.h>
#include <functional>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "../../plugin/moeloop_shaping.h"
#include "../../plugin/moeloop_socket.h"
#include "../../plugin/moeloop_transport.h"
#include "../../plugin/nccl_plugin_abi.h"

extern "C" ncclNet_v11_t ncclNetPlugin_v11;

namespace {

ncclNet_v11_t& net() { return ncclNetPlugin_v11; }

// --- captured log -----------------------------------------------------------------------------
std::vector<std::string> gWarnings;
void captureLogger(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                   const char* fmt, ...) {
  (void)flags;
  (void)file;
  (void)line;
  if (level != NCCL_LOG_WARN) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  gWarnings.push_back(buf);
}
bool warned(const char* needle) {
  for (const std::string& w : gWarnings)
    if (w.find(needle) != std::string::npos) return true;
  return false;
}

// --- helpers usable in a forked child (no gtest assertions) -----------------------------------
constexpr double kTimeoutSec = 20.0;

double secondsSince(uint64_t t0) { return (double)(moeloop::nowNs() - t0) * 1e-9; }

uint8_t patternByte(uint32_t msg, size_t i) {
  return (uint8_t)(msg * 131u + (uint32_t)i * 7u + (uint32_t)(i >> 9) * 3u + 1u);
}
void fillPattern(std::vector<uint8_t>& v, uint32_t msg) {
  for (size_t i = 0; i < v.size(); i++) v[i] = patternByte(msg, i);
}
bool checkPattern(const uint8_t* p, size_t n, uint32_t msg) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != patternByte(msg, i)) return false;
  return true;
}

void* connectBlocking(void* ctx, void* handle) {
  void* comm = nullptr;
  uint64_t t0 = moeloop::nowNs();
  while (comm == nullptr) {
    if (net().connect(ctx, 0, handle, &comm, nullptr) != ncclSuccess) return nullptr;
    if (comm == nullptr && secondsSince(t0) > kTimeoutSec) return nullptr;
  }
  return comm;
}

void* acceptBlocking(void* listenComm) {
  void* comm = nullptr;
  uint64_t t0 = moeloop::nowNs();
  while (comm == nullptr) {
    if (net().accept(listenComm, &comm, nullptr) != ncclSuccess) return nullptr;
    if (comm == nullptr && secondsSince(t0) > kTimeoutSec) return nullptr;
  }
  return comm;
}

// Tests `req` until done, an error, or the timeout. Returns the test result (ncclSystemError on
// timeout); *size = bytes moved.
ncclResult_t waitRequest(void* req, int* size) {
  uint64_t t0 = moeloop::nowNs();
  int done = 0;
  for (;;) {
    int sz = -1;
    ncclResult_t res = net().test(req, &done, &sz);
    if (res != ncclSuccess) return res;
    if (done) {
      if (size) *size = sz;
      return ncclSuccess;
    }
    if (secondsSince(t0) > kTimeoutSec) return ncclSystemError;
  }
}

void* isendRetry(void* comm, void* data, size_t size, ncclResult_t* res) {
  void* req = nullptr;
  uint64_t t0 = moeloop::nowNs();
  do {
    *res = net().isend(comm, data, size, 0, nullptr, nullptr, &req);
  } while (*res == ncclSuccess && req == nullptr && secondsSince(t0) < kTimeoutSec);
  return req;
}

void* irecvRetry(void* comm, void* data, size_t size, ncclResult_t* res) {
  void* req = nullptr;
  void* datas[1] = {data};
  size_t sizes[1] = {size};
  int tags[1] = {0};
  void* mh[1] = {nullptr};
  uint64_t t0 = moeloop::nowNs();
  do {
    *res = net().irecv(comm, 1, datas, sizes, tags, mh, nullptr, &req);
  } while (*res == ncclSuccess && req == nullptr && secondsSince(t0) < kTimeoutSec);
  return req;
}

// Runs `fn` in a child process; returns a pid to pass to joinChild.
pid_t spawn(const std::function<int()>& fn) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(60);  // a hung child must not hang the test run
    int code = 99;
    try {
      code = fn();
    } catch (...) {
      code = 98;
    }
    _exit(code);
  }
  return pid;
}

// Waits for the child; returns its exit code, or 128 + signal.
int joinChild(pid_t pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Child side of a one-way transfer: connects to `handle` and sends `sizes` messages, all posted
// before any is tested. Returns 0 on success.
int sendAll(void* ctx, void* handle, const std::vector<size_t>& sizes) {
  void* comm = connectBlocking(ctx, handle);
  if (comm == nullptr) return 10;
  std::vector<std::vector<uint8_t>> bufs(sizes.size());
  std::vector<void*> reqs(sizes.size());
  for (size_t m = 0; m < sizes.size(); m++) {
    bufs[m].resize(sizes[m]);
    fillPattern(bufs[m], (uint32_t)m);
    ncclResult_t res;
    reqs[m] = isendRetry(comm, bufs[m].data(), sizes[m], &res);
    if (res != ncclSuccess || reqs[m] == nullptr) return 11;
  }
  // Test in reverse order: completion of a later request implies nothing about earlier tests.
  for (size_t m = sizes.size(); m-- > 0;) {
    int sz = -1;
    if (waitRequest(reqs[m], &sz) != ncclSuccess) return 12;
    if ((size_t)sz != sizes[m]) return 13;
  }
  if (net().closeSend(comm) != ncclSuccess) return 14;
  return 0;
}

class PluginNet : public ::testing::Test {
 protected:
  void SetUp() override {
    gWarnings.clear();
    moeloop::setIoLimitForTesting(0);
    moeloop::setShapingConfig(moeloop::ShapingConfig{});
    ncclNetCommConfig_v11_t cfg = {-1};
    ASSERT_EQ(net().init(&ctx_, 0x1234, &cfg, captureLogger, nullptr), ncclSuccess);
    ASSERT_NE(ctx_, nullptr);
  }
  void TearDown() override {
    EXPECT_EQ(net().finalize(ctx_), ncclSuccess);
    moeloop::setIoLimitForTesting(0);
    moeloop::setShapingConfig(moeloop::ShapingConfig{});
  }
  void listenOn(char* handle, void** listenComm) {
    memset(handle, 0, NCCL_NET_HANDLE_MAXSIZE);
    ASSERT_EQ(net().listen(ctx_, 0, handle, listenComm), ncclSuccess);
    ASSERT_NE(*listenComm, nullptr);
  }
  // Parent side: receives `sizes` messages into buffers of `sizes[m] + slack[m]` bytes, posting
  // up to `window` receives ahead, and checks sizes and contents.
  void receiveAll(void* recvComm, const std::vector<size_t>& sizes, size_t window,
                  const std::vector<size_t>& slack) {
    std::vector<std::vector<uint8_t>> bufs(sizes.size());
    std::vector<void*> reqs(sizes.size(), nullptr);
    size_t posted = 0, completed = 0;
    while (completed < sizes.size()) {
      while (posted < sizes.size() && posted - completed < window) {
        bufs[posted].assign(sizes[posted] + (slack.empty() ? 0 : slack[posted]), 0xEE);
        ncclResult_t res;
        reqs[posted] = irecvRetry(recvComm, bufs[posted].data(), bufs[posted].size(), &res);
        ASSERT_EQ(res, ncclSuccess);
        ASSERT_NE(reqs[posted], nullptr);
        posted++;
      }
      // Test the newest posted request first, then the oldest.
      int sz = -1;
      ASSERT_EQ(waitRequest(reqs[posted - 1], &sz), ncclSuccess) << "message " << posted - 1;
      ASSERT_EQ((size_t)sz, sizes[posted - 1]);
      for (size_t m = completed; m + 1 < posted; m++) {
        ASSERT_EQ(waitRequest(reqs[m], &sz), ncclSuccess) << "message " << m;
        ASSERT_EQ((size_t)sz, sizes[m]);
      }
      for (size_t m = completed; m < posted; m++) {
        ASSERT_TRUE(checkPattern(bufs[m].data(), sizes[m], (uint32_t)m)) << "message " << m;
        for (size_t i = sizes[m]; i < bufs[m].size(); i++)
          ASSERT_EQ(bufs[m][i], 0xEE) << "byte past the message written, message " << m;
      }
      completed = posted;
    }
  }
  // One child sends `sizes`; the parent receives them.
  void transfer(const std::vector<size_t>& sizes, size_t window, const std::vector<size_t>& slack) {
    char handle[NCCL_NET_HANDLE_MAXSIZE];
    void* listenComm = nullptr;
    listenOn(handle, &listenComm);
    void* ctx = ctx_;
    pid_t pid = spawn([&] { return sendAll(ctx, handle, sizes); });
    void* recvComm = acceptBlocking(listenComm);
    ASSERT_NE(recvComm, nullptr);
    receiveAll(recvComm, sizes, window, slack);
    EXPECT_EQ(joinChild(pid), 0);
    EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
    EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
  }
  void* ctx_ = nullptr;
};

TEST_F(PluginNet, AbiTableAndProperties) {
  EXPECT_STREQ(net().name, "moeloop");
  EXPECT_NE(net().isend, nullptr);
  EXPECT_NE(net().irecv, nullptr);
  EXPECT_NE(net().test, nullptr);
  EXPECT_NE(net().setNetAttr, nullptr);
  EXPECT_EQ(net().makeVDevice, nullptr);
  int ndev = 0;
  ASSERT_EQ(net().devices(&ndev), ncclSuccess);
  EXPECT_EQ(ndev, 1);
  ncclNetProperties_v11_t props;
  ASSERT_EQ(net().getProperties(0, &props), ncclSuccess);
  EXPECT_STREQ(props.name, "moeloop0");
  EXPECT_EQ(props.ptrSupport, NCCL_PTR_HOST);
  EXPECT_EQ(props.netDeviceType, NCCL_NET_DEVICE_HOST);
  EXPECT_EQ(props.maxRecvs, 1);
  EXPECT_EQ(props.vProps.ndevs, 1);
  EXPECT_GT(props.maxP2pBytes, 0u);
  EXPECT_GT(props.speed, 0);
  EXPECT_NE(net().getProperties(1, &props), ncclSuccess);
  EXPECT_LE(sizeof(moeloop::NetHandle), (size_t)NCCL_NET_HANDLE_MAXSIZE);
  void* mh = nullptr;
  char buf[64];
  ASSERT_EQ(net().regMr(nullptr, buf, sizeof(buf), NCCL_PTR_HOST, &mh), ncclSuccess);
  EXPECT_EQ(net().deregMr(nullptr, mh), ncclSuccess);
  EXPECT_NE(net().regMr(nullptr, buf, sizeof(buf), NCCL_PTR_CUDA, &mh), ncclSuccess);
}

TEST_F(PluginNet, AcceptWithoutPeerReturnsNull) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  void* comm = (void*)1;
  ASSERT_EQ(net().accept(listenComm, &comm, nullptr), ncclSuccess);
  EXPECT_EQ(comm, nullptr);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST_F(PluginNet, ManySizesExactAndLargerReceives) {
  std::vector<size_t> sizes = {0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 4095, 4096, 4097, 65535,
                               65536, 65537, (1u << 20) + 3, 8u << 20, (24u << 20) + 5, 0, 1};
  std::vector<size_t> slack(sizes.size());
  for (size_t m = 0; m < sizes.size(); m++) slack[m] = (m % 3 == 0) ? 0 : (m % 3 == 1 ? 1 : 4096);
  transfer(sizes, 4, slack);
}

TEST_F(PluginNet, ManyRequestsInFlight) {
  std::vector<size_t> sizes(600);
  uint32_t x = 12345;
  for (size_t& s : sizes) {
    x = x * 1664525u + 1013904223u;
    s = (x >> 8) % (192 * 1024);
    if (x % 7 == 0) s = x % 17;
  }
  transfer(sizes, 64, {});
}

TEST_F(PluginNet, PartialReadsAndWrites) {
  // Every read and write moves at most 3 bytes: headers arrive in pieces.
  moeloop::setIoLimitForTesting(3);
  std::vector<size_t> sizes;
  for (size_t s = 0; s < 80; s++) sizes.push_back(s);
  sizes.push_back(5000);
  transfer(sizes, 8, {});
  moeloop::setIoLimitForTesting(1000);
  transfer({1u << 20, 7, 300000}, 2, {0, 9, 1});
}

TEST_F(PluginNet, TcpSockets) {
  moeloop::setSocketFamilyForTesting(moeloop::kFamilyTcp);
  transfer({0, 1, 4096, 3u << 20, 17}, 3, {});
  moeloop::setSocketFamilyForTesting(0);
}

TEST_F(PluginNet, SeveralConnectionsInterleaved) {
  constexpr int kConns = 4;
  char handles[kConns][NCCL_NET_HANDLE_MAXSIZE];
  void* listens[kConns];
  for (int c = 0; c < kConns; c++) listenOn(handles[c], &listens[c]);
  void* ctx = ctx_;
  pid_t pid = spawn([&] {
    void* comms[kConns];
    for (int c = 0; c < kConns; c++)
      if ((comms[c] = connectBlocking(ctx, handles[c])) == nullptr) return 20;
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<void*> reqs;
    for (int m = 0; m < 40; m++) {
      for (int c = 0; c < kConns; c++) {
        bufs.emplace_back(1000 * (m + 1) + c);
        fillPattern(bufs.back(), (uint32_t)(m * kConns + c));
        ncclResult_t res;
        reqs.push_back(isendRetry(comms[c], bufs.back().data(), bufs.back().size(), &res));
        if (res != ncclSuccess || reqs.back() == nullptr) return 21;
      }
    }
    for (void* r : reqs)
      if (waitRequest(r, nullptr) != ncclSuccess) return 22;
    for (int c = 0; c < kConns; c++) net().closeSend(comms[c]);
    return 0;
  });
  void* comms[kConns];
  for (int c = 0; c < kConns; c++) ASSERT_NE(comms[c] = acceptBlocking(listens[c]), nullptr);
  for (int m = 0; m < 40; m++) {
    for (int c = kConns; c-- > 0;) {
      std::vector<uint8_t> buf(1000 * (m + 1) + c);
      ncclResult_t res;
      void* r = irecvRetry(comms[c], buf.data(), buf.size(), &res);
      ASSERT_EQ(res, ncclSuccess);
      int sz = -1;
      ASSERT_EQ(waitRequest(r, &sz), ncclSuccess);
      ASSERT_EQ((size_t)sz, buf.size());
      ASSERT_TRUE(checkPattern(buf.data(), buf.size(), (uint32_t)(m * kConns + c)));
    }
  }
  EXPECT_EQ(joinChild(pid), 0);
  for (int c = 0; c < kConns; c++) {
    EXPECT_EQ(net().closeRecv(comms[c]), ncclSuccess);
    EXPECT_EQ(net().closeListen(listens[c]), ncclSuccess);
  }
}

TEST_F(PluginNet, SenderClosesEarly) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  void* ctx = ctx_;
  constexpr size_t kBig = 64u << 20;  // far more than the socket buffers hold
  // The child sends one whole message, then as much of a 64 MiB one as the socket buffers take
  // while the parent does not read, then exits without closing: the kernel closes mid-message.
  pid_t pid = spawn([&] {
    void* comm = connectBlocking(ctx, handle);
    if (comm == nullptr) return 30;
    std::vector<uint8_t> small(1000), big(kBig);
    fillPattern(small, 0);
    ncclResult_t res;
    void* r = isendRetry(comm, small.data(), small.size(), &res);
    if (res != ncclSuccess || waitRequest(r, nullptr) != ncclSuccess) return 31;
    r = isendRetry(comm, big.data(), big.size(), &res);
    if (res != ncclSuccess) return 32;
    int done = 0;
    for (int i = 0; i < 200 && !done; i++) {
      if (net().test(r, &done, nullptr) != ncclSuccess) return 33;
      usleep(100);
    }
    _exit(done ? 34 : 0);
  });
  void* recvComm = acceptBlocking(listenComm);
  ASSERT_NE(recvComm, nullptr);
  std::vector<uint8_t> a(1000), b(kBig), c(100);
  ncclResult_t res;
  void* ra = irecvRetry(recvComm, a.data(), a.size(), &res);
  int sz = -1;
  ASSERT_EQ(waitRequest(ra, &sz), ncclSuccess);
  EXPECT_EQ(sz, 1000);
  EXPECT_TRUE(checkPattern(a.data(), a.size(), 0));
  EXPECT_EQ(joinChild(pid), 0);  // nothing more is read until the sender is gone
  void* rb = irecvRetry(recvComm, b.data(), b.size(), &res);
  void* rc = irecvRetry(recvComm, c.data(), c.size(), &res);
  EXPECT_EQ(waitRequest(rb, &sz), ncclRemoteError);
  EXPECT_EQ(waitRequest(rc, &sz), ncclRemoteError);
  EXPECT_TRUE(warned("peer closed the connection"));
  // The comm stays failed.
  void* rd = nullptr;
  void* datas[1] = {c.data()};
  size_t sizes[1] = {c.size()};
  int tags[1] = {0};
  EXPECT_EQ(net().irecv(recvComm, 1, datas, sizes, tags, nullptr, nullptr, &rd), ncclRemoteError);
  EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST_F(PluginNet, SenderClosesCleanlyWhileReceivesPending) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  void* ctx = ctx_;
  pid_t pid = spawn([&] { return sendAll(ctx, handle, {64, 128}); });
  void* recvComm = acceptBlocking(listenComm);
  ASSERT_NE(recvComm, nullptr);
  std::vector<uint8_t> bufs[3] = {std::vector<uint8_t>(64), std::vector<uint8_t>(128),
                                  std::vector<uint8_t>(256)};
  void* reqs[3];
  ncclResult_t res;
  for (int i = 0; i < 3; i++) reqs[i] = irecvRetry(recvComm, bufs[i].data(), bufs[i].size(), &res);
  EXPECT_EQ(waitRequest(reqs[0], nullptr), ncclSuccess);
  EXPECT_EQ(waitRequest(reqs[1], nullptr), ncclSuccess);
  EXPECT_EQ(waitRequest(reqs[2], nullptr), ncclRemoteError);  // no third message ever comes
  EXPECT_EQ(joinChild(pid), 0);
  EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST_F(PluginNet, ReceiverClosesEarly) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  void* ctx = ctx_;
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  // The child keeps sending 4 MiB messages to a receiver that closes: it must get an error,
  // not hang.
  pid_t pid = spawn([&] {
    void* comm = connectBlocking(ctx, handle);
    if (comm == nullptr) return 40;
    char byte;
    if (read(ready[0], &byte, 1) != 1) return 41;  // the parent has closed its end
    std::vector<uint8_t> big(4u << 20, 1);
    for (int i = 0; i < 64; i++) {
      ncclResult_t res;
      void* r = isendRetry(comm, big.data(), big.size(), &res);
      if (res == ncclRemoteError) return 0;
      if (res != ncclSuccess) return 42;
      res = waitRequest(r, nullptr);
      if (res == ncclRemoteError) return 0;
      if (res != ncclSuccess) return 43;
    }
    return 44;  // 256 MiB went into a closed socket
  });
  void* recvComm = acceptBlocking(listenComm);
  ASSERT_NE(recvComm, nullptr);
  EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
  ASSERT_EQ(write(ready[1], "x", 1), 1);
  EXPECT_EQ(joinChild(pid), 0);
  close(ready[0]);
  close(ready[1]);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST_F(PluginNet, MessageLargerThanReceiveIsAnError) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  void* ctx = ctx_;
  pid_t pid = spawn([&] {
    void* comm = connectBlocking(ctx, handle);
    if (comm == nullptr) return 50;
    std::vector<uint8_t> buf(100);
    ncclResult_t res;
    void* r = isendRetry(comm, buf.data(), buf.size(), &res);
    return (res == ncclSuccess && waitRequest(r, nullptr) == ncclSuccess) ? 0 : 51;
  });
  void* recvComm = acceptBlocking(listenComm);
  ASSERT_NE(recvComm, nullptr);
  std::vector<uint8_t> small(99);
  ncclResult_t res;
  void* r = irecvRetry(recvComm, small.data(), small.size(), &res);
  EXPECT_EQ(waitRequest(r, nullptr), ncclInvalidUsage);
  EXPECT_TRUE(warned("does not fit"));
  EXPECT_EQ(joinChild(pid), 0);
  EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST_F(PluginNet, StrayConnectionIsDropped) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  char wrong[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(wrong, handle, sizeof(wrong));
  ((moeloop::NetHandle*)wrong)->nonce ^= 1;
  void* ctx = ctx_;
  pid_t pid = spawn([&] {
    void* stray = connectBlocking(ctx, wrong);
    if (stray == nullptr) return 60;
    return sendAll(ctx, handle, {10, 20});
  });
  void* recvComm = acceptBlocking(listenComm);
  ASSERT_NE(recvComm, nullptr);
  receiveAll(recvComm, {10, 20}, 2, {});
  EXPECT_TRUE(warned("foreign hello"));
  EXPECT_EQ(joinChild(pid), 0);
  EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST_F(PluginNet, ShapingLimitsBandwidth) {
  moeloop::ShapingConfig cfg;
  cfg.bytesPerSec = 200e6;  // 0.2 GB/s
  moeloop::setShapingConfig(cfg);
  ncclNetProperties_v11_t props;
  ASSERT_EQ(net().getProperties(0, &props), ncclSuccess);
  EXPECT_EQ(props.speed, 1600);  // Mbps
  uint64_t t0 = moeloop::nowNs();
  transfer({10u << 20, 10u << 20}, 2, {});
  double sec = secondsSince(t0);
  // 20 MiB at 0.2 GB/s: about 0.105 s (each side's bucket starts with a small burst).
  EXPECT_GT(sec, 0.085);
  EXPECT_LT(sec, 3.0);
}

TEST_F(PluginNet, ShapingAddsLatency) {
  moeloop::ShapingConfig cfg;
  cfg.latencyNs = 40 * 1000 * 1000;  // 40 ms
  moeloop::setShapingConfig(cfg);
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  void* listenComm = nullptr;
  listenOn(handle, &listenComm);
  void* ctx = ctx_;
  pid_t pid = spawn([&] {
    void* comm = connectBlocking(ctx, handle);
    if (comm == nullptr) return 70;
    uint64_t t = moeloop::nowNs();  // the message carries its start time
    ncclResult_t res;
    void* r = isendRetry(comm, &t, sizeof(t), &res);
    return (res == ncclSuccess && waitRequest(r, nullptr) == ncclSuccess) ? 0 : 71;
  });
  void* recvComm = acceptBlocking(listenComm);
  ASSERT_NE(recvComm, nullptr);
  uint64_t sent = 0;
  ncclResult_t res;
  void* r = irecvRetry(recvComm, &sent, sizeof(sent), &res);
  ASSERT_EQ(waitRequest(r, nullptr), ncclSuccess);
  double delay = (double)(moeloop::nowNs() - sent) * 1e-9;
  EXPECT_GE(delay, 0.040);
  EXPECT_LT(delay, 2.0);
  EXPECT_EQ(joinChild(pid), 0);
  EXPECT_EQ(net().closeRecv(recvComm), ncclSuccess);
  EXPECT_EQ(net().closeListen(listenComm), ncclSuccess);
}

TEST(PluginNetTokenBucket, GrantsFollowTheRate) {
  moeloop::ShapingConfig cfg;
  cfg.bytesPerSec = 1e9;
  moeloop::setShapingConfig(cfg);
  moeloop::TokenBucket b;
  size_t first = b.take(1u << 30);
  EXPECT_GT(first, 0u);
  EXPECT_LE(first, 256u * 1024);  // one burst (200 us at 1 GB/s, at least 64 KiB)
  uint64_t t0 = moeloop::nowNs();
  size_t moved = 0;
  while (moved < (50u << 20)) moved += b.take((50u << 20) - moved);
  double sec = (double)(moeloop::nowNs() - t0) * 1e-9;
  EXPECT_GT(sec, 0.045);  // 50 MiB at 1 GB/s = 52 ms
  EXPECT_LT(sec, 1.0);
  moeloop::setShapingConfig(moeloop::ShapingConfig{});
  EXPECT_EQ(b.take(12345), 12345u);  // unlimited
}

}  // namespace
