// Votes and decision of ncclMoeCommCreate (see create_agreement.h).
#include "create_agreement.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <string>
#include <vector>
#include "error.h"

namespace nccl_moe {

static const char* const kVoteFieldNames[kVoteConfigFields] = {
    "size", "magic", "version", "mode", "numExperts", "hidden", "topK", "maxTokensPerRank",
    "dispatchDtype", "numSms", "outputCapacity", "timeoutMs", "numBufferSlots", "fp8Scales"};

void fillVote(CreateVote* vote, ncclResult_t code, const char* message, const ncclMoeConfig_t* resolved) {
  memset(vote, 0, sizeof(*vote));
  vote->code = code;
  if (code != ncclSuccess) strncpy(vote->message, message ? message : "", kVoteMessageBytes - 1);
  if (resolved == nullptr) return;
  const ncclMoeConfig_t& f = *resolved;
  const int64_t fields[kVoteConfigFields] = {
      (int64_t)f.size, f.magic, f.version, f.mode, f.numExperts, f.hidden, f.topK, f.maxTokensPerRank,
      f.dispatchDtype, f.numSms, f.outputCapacity, f.timeoutMs, f.numBufferSlots, f.fp8Scales};
  vote->hasConfig = 1;
  memcpy(vote->config, fields, sizeof(fields));
}

RankPlacement localPlacement(int lsaRank, int lsaSize) {
  char host[256] = {0};
  const char* id = getenv("NCCL_HOSTID");
  if (id == nullptr || id[0] == '\0') {
    gethostname(host, sizeof(host) - 1);
    id = host;
  }
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const char* p = id; *p; ++p) h = (h ^ (unsigned char)*p) * 1099511628211ull;
  return RankPlacement{h, lsaRank, lsaSize};
}

ncclResult_t decideNodes(const CreateVote* votes, int nRanks, NodeMap* map) {
  std::vector<RankPlacement> ranks(nRanks);
  for (int r = 0; r < nRanks; ++r) ranks[r] = votes[r].placement;
  NodeMap m;
  const ncclResult_t res = buildNodeMap(ranks.data(), nRanks, &m);
  if (res != ncclSuccess) {
    const std::string why = ncclMoeGetLastError();  // setError rewrites that buffer
    return setError(res, "ncclMoeCommCreate: %s", why.c_str());
  }
  *map = m;
  return ncclSuccess;
}

ncclResult_t decideCreate(const CreateVote* votes, int nRanks, const char* step) {
  for (int r = 0; r < nRanks; ++r) {
    if (votes[r].code == ncclSuccess) continue;
    char message[kVoteMessageBytes];  // a peer's bytes: terminate them here
    memcpy(message, votes[r].message, sizeof(message));
    message[sizeof(message) - 1] = '\0';
    return setError((ncclResult_t)votes[r].code, "ncclMoeCommCreate: rank %d: %s (%s)", r, message, step);
  }
  for (int r = 1; r < nRanks; ++r) {
    if (!votes[0].hasConfig || !votes[r].hasConfig) continue;
    for (int i = 0; i < kVoteConfigFields; ++i)
      if (votes[r].config[i] != votes[0].config[i])
        return setError(ncclInvalidArgument,
                        "ncclMoeCommCreate: rank %d passed config.%s = %lld but rank 0 passed %lld; every "
                        "rank must pass the same config",
                        r, kVoteFieldNames[i], (long long)votes[r].config[i], (long long)votes[0].config[i]);
  }
  return ncclSuccess;
}

}  // namespace nccl_moe
