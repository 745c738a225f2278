// Nodes and rails of an EP communicator (host side of the internode transport).
//
// A node is a set of ranks in one NVLink (LSA) domain. NCCL forms LSA teams from runs of
// consecutive ranks on one host, so the internode kernels require node-contiguous ranks
// (ranks n*G .. n*G+G-1 on node n) and the same G on every node; the device side of this map
// is PeerMap (device/kernel_args.h), arithmetic on (rank, G), with the rail and remote-row
// arithmetic in net/device/rail.h (host and device).
#pragma once
#include <stdint.h>
#include <nccl.h>
#include "device/kernel_args.h"

namespace nccl_moe {

// What each rank reports about itself at creation (all-gathered): which host (physical node)
// it runs on, and NCCL's LSA team as this rank sees it (ncclTeamLsa).
struct RankPlacement {
  uint64_t hostKey;  // equal for the ranks of one node (e.g. a hash of NCCL_HOSTID / host name)
  int lsaRank;       // this rank's index in its LSA team
  int lsaSize;       // ranks in its LSA team
};

struct NodeMap {
  int nRanks = 0;       // world ranks
  int gpusPerNode = 0;  // G: ranks per node, equal on every node
  int nNodes = 0;       // nRanks / G

  int node(int r) const { return r / gpusPerNode; }
  int localIndex(int r) const { return r % gpusPerNode; }
  int remoteRanks() const { return nRanks - gpusPerNode; }  // ranks on other nodes than one's own
  // The kernels' view of the map from rank `r`.
  PeerMap peerMap(int r) const { return PeerMap{r, nRanks, node(r) * gpusPerNode, gpusPerNode}; }
};

// Builds the node map from every rank's placement ([nRanks], rank order) and checks what the
// internode kernels need, in this order: 1..kMaxRanks ranks; node-contiguous ranks (the ranks of
// one host form one run); the same number of ranks on every node; every node one NVLink domain
// (its ranks are LSA ranks 0..G-1 of an LSA team of G). On a violation: ncclInvalidUsage and a
// last-error message naming the ranks at fault and what to change.
ncclResult_t buildNodeMap(const RankPlacement* ranks, int nRanks, NodeMap* map);

}  // namespace nccl_moe
