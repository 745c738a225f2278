// Rail arithmetic on the kernels' peer map (host and device; device/kernel_args.h PeerMap).
// A rail is the set of ranks with one local index on every node; GIN traffic of the internode
// kernels goes between rail peers, so that each NIC talks to the NICs of its rail.
#pragma once
#include "device/kernel_args.h"

namespace nccl_moe {

// The rank with this rank's local index on node n.
__host__ __device__ inline int railPeer(const PeerMap& p, int n) {
  return n * p.lsaSize + p.localIndex(p.rank);
}

// Index of world rank r among the ranks of other nodes than this rank's (own node skipped), for
// regions with a row per remote rank (net/regions.h). Contract: r is remote.
__host__ __device__ inline int remoteIndex(const PeerMap& p, int r) {
  return r < p.lsaBase ? r : r - p.lsaSize;
}

// Index of world rank r among the ranks of other nodes than rank `at`'s, i.e. remoteIndex as rank
// `at` computes it: the row of r in `at`'s per-remote-rank regions. Contract: r is not on at's node.
__host__ __device__ inline int remoteIndexAt(const PeerMap& p, int at, int r) {
  const int base = p.node(at) * p.lsaSize;
  return r < base ? r : r - p.lsaSize;
}

// Index of node n among the nodes other than this rank's (per-remote-node regions [N-1][...]); the
// same for every rank of this node. Contract: n is not this rank's node.
__host__ __device__ inline int remoteNodeIndex(const PeerMap& p, int n) {
  return n < p.node(p.rank) ? n : n - 1;
}

// Index of this rank's node among the nodes other than node n: where the ranks of node n keep what
// this rank sends them (the region they read as remoteNodeIndex(their map, this rank's node)).
__host__ __device__ inline int myNodeIndexAt(const PeerMap& p, int n) {
  const int mine = p.node(p.rank);
  return mine < n ? mine : mine - 1;
}

}  // namespace nccl_moe
