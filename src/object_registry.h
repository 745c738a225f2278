// Registry of the live library objects (EP contexts and handles). Every public call looks a
// caller's pointer up here before it reads the object, so that a destroyed, never-created or
// wrong-kind pointer gives ncclInvalidArgument instead of undefined behaviour.
//
// Why a registry and not only a magic word (NCCL's communicator check): reading a destroyed
// object's magic is itself a use-after-free. The registry answers "is this address a live
// object of this kind" from its own memory, without touching the caller's pointer; the objects
// still carry a magic word, checked after the lookup (a stray write over the object is caught).
// A destroyed object's memory is not freed at once: it stays allocated, its magic cleared, in a
// FIFO of the last kQuarantine destroyed objects, so the allocator cannot hand the same address
// to a new object right away. A stale pointer to any of the last kQuarantine destroyed objects
// is therefore always reported as destroyed; an older one is still never dereferenced, but if a
// new object of the same kind now lives at that address the two cannot be told apart (true of
// any C handle API). Memory kept: kQuarantine small host structs per kind.
// Thread-safe (one mutex, a hash lookup: tens of nanoseconds per call).
#pragma once

namespace nccl_moe {

enum class ObjectKind { Comm = 0, Handle = 1 };
constexpr int kQuarantine = 64;

// Records `p` as a live object of `kind`.
void registerObject(const void* p, ObjectKind kind);

// True when `p` is a live object of `kind`.
bool isLiveObject(const void* p, ObjectKind kind);

// Unregisters `p` and keeps its memory in quarantine; `release(p)` frees it once kQuarantine
// later objects of the same kind have been retired. No effect unless `p` is live.
void retireObject(void* p, ObjectKind kind, void (*release)(void*));

}  // namespace nccl_moe
