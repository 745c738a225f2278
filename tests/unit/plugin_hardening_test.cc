// CPU tests of the moeloop plugin's defences (issue 10, item 10): a NET handle from a peer cannot
// make the plugin use memory it names, connections without a hello are capped and dropped after
// a deadline, sends above the maximum message size fail, the signal read-modify-write is atomic
// among the plugin's threads, and GIN copies restore the calling thread's CUDA device (the last
// one needs 2 GPUs and is skipped elsewhere).
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "../../plugin/moeloop_gin.h"
#include "../../plugin/moeloop_log.h"
#include "../../plugin/moeloop_net_props.h"
#include "../../plugin/moeloop_socket.h"
#include "../../plugin/moeloop_transport.h"

extern "C" ncclNet_v11_t ncclNetPlugin_v11;

namespace {

int gWarnings = 0;
void countingLogger(ncclDebugLogLevel level, unsigned long, const char*, int, const char*, ...) {
  if (level == NCCL_LOG_WARN) gWarnings++;
}

class PluginHardening : public ::testing::Test {
 protected:
  void SetUp() override {
    moeloop::setSocketFamilyForTesting(moeloop::kFamilyUnix);
    ASSERT_EQ(ncclNetPlugin_v11.init(&ctx_, 3, nullptr, countingLogger, nullptr), ncclSuccess);
    ASSERT_EQ(ncclNetPlugin_v11.listen(ctx_, 0, handle_, &listenComm_), ncclSuccess);
  }
  void TearDown() override {
    EXPECT_EQ(ncclNetPlugin_v11.closeListen(listenComm_), ncclSuccess);
    EXPECT_EQ(ncclNetPlugin_v11.finalize(ctx_), ncclSuccess);
    moeloop::setHelloDeadlineForTesting(0);
    moeloop::setSocketFamilyForTesting(0);
  }
  moeloop::NetListenComm* listener() { return (moeloop::NetListenComm*)listenComm_; }
  void* ctx_ = nullptr;
  void* listenComm_ = nullptr;
  char handle_[NCCL_NET_HANDLE_MAXSIZE];
};

// Before the fix the handle carried a Connector*: this value was dereferenced and deleted.
TEST_F(PluginHardening, ForgedPendingConnectionInHandleIsRejected) {
  char forged[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(forged, handle_, sizeof(forged));
  ((moeloop::NetHandle*)forged)->pendingId = 0xdeadbeefcafeull;
  void* sendComm = nullptr;
  EXPECT_EQ(ncclNetPlugin_v11.connect(ctx_, 0, forged, &sendComm, nullptr), ncclInvalidArgument);
  EXPECT_EQ(sendComm, nullptr);
}

TEST_F(PluginHardening, HandleOfAnotherConnectionIsRejected) {
  // Start a connection from a copy of the handle, then present its id with another nonce.
  char first[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(first, handle_, sizeof(first));
  void* sendComm = nullptr;
  ASSERT_EQ(ncclNetPlugin_v11.connect(ctx_, 0, first, &sendComm, nullptr), ncclSuccess);
  uint64_t id = ((moeloop::NetHandle*)first)->pendingId;
  if (sendComm != nullptr) {  // connected at once: nothing is pending any more
    EXPECT_EQ(id, 0u);
    EXPECT_EQ(ncclNetPlugin_v11.closeSend(sendComm), ncclSuccess);
    return;
  }
  char other[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(other, first, sizeof(other));
  ((moeloop::NetHandle*)other)->nonce ^= 1;
  EXPECT_EQ(ncclNetPlugin_v11.connect(ctx_, 0, other, &sendComm, nullptr), ncclInvalidArgument);
}

int rawConnect(const moeloop::SocketAddress& addr) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un un;
  memset(&un, 0, sizeof(un));
  un.sun_family = AF_UNIX;
  size_t len = strlen(addr.name);
  memcpy(un.sun_path + 1, addr.name, len);
  socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
  if (connect(fd, (struct sockaddr*)&un, alen) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Before the fix every silent connection stayed in the acceptor for ever.
TEST_F(PluginHardening, SilentConnectionsAreCappedAndExpire) {
  const moeloop::NetHandle* h = (const moeloop::NetHandle*)handle_;
  ASSERT_EQ(h->addr.family, (uint32_t)moeloop::kFamilyUnix);
  std::vector<int> fds;
  void* recvComm = nullptr;
  for (int batch = 0; batch < 10; batch++) {
    for (int i = 0; i < 10; i++) {
      int fd = rawConnect(h->addr);
      ASSERT_GE(fd, 0);
      fds.push_back(fd);
    }
    ASSERT_EQ(ncclNetPlugin_v11.accept(listenComm_, &recvComm, nullptr), ncclSuccess);
    EXPECT_EQ(recvComm, nullptr);
    EXPECT_LE(listener()->acceptor.pendingCount(), moeloop::kMaxPendingHellos);
  }
  EXPECT_EQ(listener()->acceptor.pendingCount(), moeloop::kMaxPendingHellos);
  moeloop::setHelloDeadlineForTesting(0.2);
  usleep(300 * 1000);
  ASSERT_EQ(ncclNetPlugin_v11.accept(listenComm_, &recvComm, nullptr), ncclSuccess);
  EXPECT_EQ(listener()->acceptor.pendingCount(), 0u);
  for (int fd : fds) close(fd);
}

// Before the fix an oversized send was queued (and its size later truncated to int by test()).
TEST_F(PluginHardening, SendAboveTheMaximumIsRejected) {
  void* sendComm = nullptr;
  void* recvComm = nullptr;
  char h[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(h, handle_, sizeof(h));
  for (int i = 0; i < 100000 && (sendComm == nullptr || recvComm == nullptr); i++) {
    if (sendComm == nullptr) {
      ASSERT_EQ(ncclNetPlugin_v11.connect(ctx_, 0, h, &sendComm, nullptr), ncclSuccess);
    }
    if (recvComm == nullptr) {
      ASSERT_EQ(ncclNetPlugin_v11.accept(listenComm_, &recvComm, nullptr), ncclSuccess);
    }
  }
  ASSERT_NE(sendComm, nullptr);
  ASSERT_NE(recvComm, nullptr);
  char byte = 0;
  void* req = nullptr;
  EXPECT_EQ(ncclNetPlugin_v11.isend(sendComm, &byte, moeloop::kMaxMessageBytes + 1, 0, nullptr, nullptr, &req),
            ncclInvalidArgument);
  EXPECT_EQ(req, nullptr);
  EXPECT_EQ(ncclNetPlugin_v11.closeSend(sendComm), ncclSuccess);
  EXPECT_EQ(ncclNetPlugin_v11.closeRecv(recvComm), ncclSuccess);
}

// The signal update reads, adds and writes (two copies on a GPU). Two threads doing it on one
// word with a slow read must lose no increment.
struct SlowWord {
  static ncclResult_t read(void*, const uint64_t* word, uint64_t* value) {
    *value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    usleep(20);
    return ncclSuccess;
  }
  static ncclResult_t write(void*, uint64_t* word, uint64_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
    return ncclSuccess;
  }
};

TEST(PluginSignalUpdate, ConcurrentAddsLoseNothing) {
  uint64_t word = 0;
  moeloop::SignalWordAccess access{SlowWord::read, SlowWord::write, nullptr};
  const int kAdds = 300;
  auto adder = [&] {
    for (int i = 0; i < kAdds; i++) ASSERT_EQ(moeloop::signalAddLocked(access, &word, 1), ncclSuccess);
  };
  std::thread a(adder), b(adder);
  a.join();
  b.join();
  EXPECT_EQ(word, 2u * kAdds);
}

// Signal updates received in one progress pass: consecutive ones of a word become one write of
// their sum, written before an update of another word and at the flush (host-memory words here;
// on a GPU each write is a copy). Every update still counts as a signal.
TEST(PluginSignalUpdate, ConsecutiveUpdatesOfAWordAreWrittenOnce) {
  uint64_t words[2] = {0, 0};
  moeloop::GinCollComm c;
  moeloop::GinRegistration reg;
  reg.base = (char*)words;
  reg.size = sizeof(words);
  reg.type = NCCL_PTR_HOST;
  const uint64_t signalsBefore = moeloop::counters().ginSignals.load();
  ASSERT_EQ(moeloop::ginQueueSignal(&c, &reg, 0, moeloop::kGinOpSignalAdd, 5), ncclSuccess);
  ASSERT_EQ(moeloop::ginQueueSignal(&c, &reg, 0, moeloop::kGinOpSignalInc, 0), ncclSuccess);
  ASSERT_EQ(moeloop::ginQueueSignal(&c, &reg, 0, moeloop::kGinOpSignalAdd, 10), ncclSuccess);
  EXPECT_EQ(words[0], 0u) << "written before the pass ended or another word came";
  ASSERT_EQ(moeloop::ginQueueSignal(&c, &reg, 8, moeloop::kGinOpSignalAdd, 2), ncclSuccess);
  EXPECT_EQ(words[0], 16u);  // 5 + 1 + 10, in one write, before word 1's update
  EXPECT_EQ(words[1], 0u);
  ASSERT_EQ(moeloop::ginQueueSignal(&c, &reg, 0, moeloop::kGinOpSignalInc, 0), ncclSuccess);
  EXPECT_EQ(words[1], 2u);  // word 0 again: word 1's update goes first, order kept
  EXPECT_EQ(words[0], 16u);
  // A directly applied update (a put to the own rank) writes the pending one first.
  ASSERT_EQ(moeloop::ginApplySignal(&c, &reg, 8, moeloop::kGinOpSignalAdd, 1), ncclSuccess);
  EXPECT_EQ(words[0], 17u);
  EXPECT_EQ(words[1], 3u);
  ASSERT_EQ(moeloop::ginFlushSignal(&c), ncclSuccess);  // nothing pending: nothing changes
  EXPECT_EQ(words[0], 17u);
  EXPECT_EQ(moeloop::counters().ginSignals.load() - signalsBefore, 6u);
}

// Needs 2 GPUs: a copy for a comm of device 0 from a thread on device 1 leaves it on device 1.
TEST(PluginGinCuda, CopyRestoresTheCallersDevice) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) GTEST_SKIP() << "needs 2 GPUs";
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  moeloop::GinCuda g;
  g.dev = 0;
  uint64_t src = 42, dst = 0;
  ASSERT_EQ(moeloop::ginCopy(&g, &dst, &src, sizeof(src)), ncclSuccess);
  EXPECT_EQ(dst, 42u);
  int cur = -1;
  ASSERT_EQ(cudaGetDevice(&cur), cudaSuccess);
  EXPECT_EQ(cur, 1);
  moeloop::ginCudaRelease(&g);
  ASSERT_EQ(cudaGetDevice(&cur), cudaSuccess);
  EXPECT_EQ(cur, 1);
}

}  // namespace
