// Peer windows by world rank (the device side of PeerMap, device/kernel_args.h). Kernels name
// peers by their rank in the EP communicator; these helpers turn that into an NVLink pointer
// when the peer is on this rank's node. Remote peers have no pointer: they are reached by GIN
// puts (net/device/), and kernels keep NULL in their per-CTA peer tables for them.
#pragma once
#include <stddef.h>
#include <nccl_device.h>
#include "device/kernel_args.h"

namespace nccl_moe {

// Byte `off` of world rank r's window. Contract: r is an LSA peer (w.peers.lsaIndex(r) !=
// kPeerRemote); no check, so that per-signal paths cost one subtraction more than a raw LSA index.
__device__ __forceinline__ char* lsaPointer(const WindowView& w, int r, size_t off) {
  return (char*)ncclGetLsaPointer(w.win, off, r - w.peers.lsaBase);
}

// Byte `off` of world rank r's window when r is an LSA peer, NULL when it is remote. For the
// peer tables kernels fill once per CTA (one thread per rank) before their loops.
__device__ __forceinline__ char* peerWindow(const WindowView& w, int r, size_t off) {
  const int i = w.peers.lsaIndex(r);
  return i == kPeerRemote ? nullptr : (char*)ncclGetLsaPointer(w.win, off, i);
}

}  // namespace nccl_moe
