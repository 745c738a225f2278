// Live-object registry and quarantine (see object_registry.h).
#include "object_registry.h"
#include <deque>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace nccl_moe {

namespace {
struct Registry {
  std::mutex mutex;
  std::unordered_map<const void*, ObjectKind> live;
  std::deque<std::pair<void*, void (*)(void*)>> quarantine[2];  // per ObjectKind, oldest first
};
// Never destroyed: objects may be checked from static destructors of the user's program.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}
}  // namespace

void registerObject(const void* p, ObjectKind kind) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.live[p] = kind;
}

bool isLiveObject(const void* p, ObjectKind kind) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.live.find(p);
  return it != r.live.end() && it->second == kind;
}

void retireObject(void* p, ObjectKind kind, void (*release)(void*)) {
  std::pair<void*, void (*)(void*)> expired{nullptr, nullptr};
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.live.find(p);
    if (it == r.live.end() || it->second != kind) return;
    r.live.erase(it);
    auto& q = r.quarantine[(int)kind];
    q.emplace_back(p, release);
    if ((int)q.size() > kQuarantine) {
      expired = q.front();
      q.pop_front();
    }
  }
  if (expired.first) expired.second(expired.first);
}

}  // namespace nccl_moe
