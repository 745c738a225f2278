// Test hook of the device sequence numbers: start an EP context as if it had already run a
// given number of operations, so that tests reach the wrap points of the counters (the 32-bit
// LL epoch in the dispatch signal, the 64-bit HT sequences) in a few operations.
#pragma once
#include <nccl.h>

struct ncclMoeComm;

namespace nccl_moe {

// Reads NCCL_MOE_SEQ_START (an unsigned 64-bit number, decimal or 0x hex; unset or 0: nothing
// to do). For n != 0 it sets every sequence of this rank's DeviceState to n (HT dispatchSeq and
// combineSeq, each LL slot's dispatch and combine epochs) and writes into this rank's window the
// signal values that every peer would have left after n operations of each kind. Call it during
// creation, after the window and the state are zeroed and before any peer may signal (the
// creation barrier). Every rank must see the same value; tests give ranks different values on
// purpose to put one rank ahead of the others. Synchronous. A context on several nodes refuses
// n != 0 (ncclInvalidUsage): its GIN signals cannot be preset.
ncclResult_t applySequenceStart(const ncclMoeComm* comm);

}  // namespace nccl_moe
