// CPU tests of the plugin (plugin/tests/): a rank-0 GIN comm of 2 ranks without NCCL or a GPU.
// Its connection with rank 1 is one end of a non-blocking unix socket pair (the test holds the
// other end) and its one registration is host memory the test owns.
#pragma once
#include <gtest/gtest.h>

#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../moeloop_gin.h"

namespace moeloop_test {

// Sets up `c` (rank 0 of 2) and `reg` (id 0 over `bytes` at `base`, host memory) and connects rank
// 1: as the sender (sendFd, copy peer: the comm puts to rank 1) or as the receiver (recvFd: rank 1's
// headers arrive). Returns the test's end of the socket pair (-1 after a failed assertion).
inline int initFakeGinComm(moeloop::GinCollComm& c, moeloop::GinRegistration& reg, void* base, size_t bytes,
                           bool sender) {
  int sv[2] = {-1, -1};
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  if (sv[0] < 0) return -1;
  EXPECT_EQ(fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK), 0);
  c.magic = moeloop::kGinCollMagic;
  c.rank = 0;
  c.nranks = 2;
  c.peers.resize(2);
  if (sender) {
    c.peers[1].sendFd = sv[0];
    c.peers[1].copy = true;
  } else {
    c.peers[1].recvFd = sv[0];
  }
  reg.magic = moeloop::kGinRegMagic;
  reg.comm = &c;
  reg.id = 0;
  reg.base = (char*)base;
  reg.size = bytes;
  reg.type = NCCL_PTR_HOST;
  reg.live = true;
  c.regs.push_back(&reg);
  return sv[1];
}

}  // namespace moeloop_test
