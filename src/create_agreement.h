// The collective decision of ncclMoeCommCreate. A rank that fails a local check must not return
// on its own: its peers would wait forever in the next collective. So every rank runs its local
// checks, then all ranks exchange a vote (status, message, resolved config) and every rank
// derives the same result from the same votes: the error of the lowest failing rank, with that
// rank's message, or a configuration mismatch, or success. Pure host code (CPU-tested); the
// exchange itself is in comm.cc.
#pragma once
#include <stdint.h>
#include "nccl_moe.h"
#include "net/node_map.h"

namespace nccl_moe {

constexpr int kVoteConfigFields = 14;
constexpr int kVoteMessageBytes = 464;

// One rank's vote; plain bytes, exchanged with ncclAllGather as ncclUint8.
struct CreateVote {
  int32_t code;                       // ncclResult_t of this rank's local step
  int32_t hasConfig;                  // 1 when `config` holds the resolved config
  RankPlacement placement;            // where this rank runs (first vote; zero otherwise)
  int64_t config[kVoteConfigFields];  // fields of the resolved config, in kVoteFieldNames order
  char message[kVoteMessageBytes];    // this rank's error message (NUL-terminated), "" on success
};
static_assert(sizeof(CreateVote) % 8 == 0, "votes are exchanged as whole 8-byte words");

// Fills `vote` from a local result: `message` is the last error (ignored on success) and
// `resolved` the validated config, or NULL when the local checks did not get that far.
void fillVote(CreateVote* vote, ncclResult_t code, const char* message, const ncclMoeConfig_t* resolved);

// This rank's placement for the first vote: hostKey hashes NCCL_HOSTID when set (as NCCL does,
// so fake nodes on one host count as nodes) or the host name; lsaRank / lsaSize from ncclTeamLsa.
RankPlacement localPlacement(int lsaRank, int lsaSize);

// The node map of the communicator from the first vote's placements (all nRanks votes succeeded
// and carry configs), the same on every rank: buildNodeMap's checks. On error (recorded as the
// last error): buildNodeMap's ncclInvalidUsage.
ncclResult_t decideNodes(const CreateVote* votes, int nRanks, NodeMap* map);

// The result every rank returns, from all nRanks votes (rank order), for the step `step` of the
// creation ("checking the configuration", "allocating"):
//  - the lowest rank r whose code is not ncclSuccess: its code, with the message
//    "ncclMoeCommCreate: rank r: <its message>";
//  - else, when the votes carry configs and rank r differs from rank 0 (lowest such r, first
//    such field): ncclInvalidArgument, "ncclMoeCommCreate: rank r passed config.<field> = v but
//    rank 0 passed w; every rank must pass the same config";
//  - else ncclSuccess.
// The message is recorded as this thread's last error; it is the same on every rank.
ncclResult_t decideCreate(const CreateVote* votes, int nRanks, const char* step);

}  // namespace nccl_moe
