#include "plugin_hops.h"

#include <dlfcn.h>
#include <stdio.h>

namespace moe_perf {

bool readPluginStats(moeloopStats_t* out) {
  void* h = dlopen("libnccl-net-moeloop.so", RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return false;
  moeloopGetStats_t fn = (moeloopGetStats_t)dlsym(h, "moeloopGetStats");
  const bool ok = fn != nullptr && fn(out, sizeof(*out)) == sizeof(*out);
  dlclose(h);  // drops only the reference taken here
  return ok;
}

std::string pluginHopLine(const moeloopStats_t& before, const moeloopStats_t& after) {
  const unsigned long long sent = after.hopSentPuts - before.hopSentPuts;
  const unsigned long long recv = after.hopRecvPuts - before.hopRecvPuts;
  if (sent == 0 && recv == 0) return "";
  double h[5];
  moeloopHopAverages(&before, &after, h);
  char line[320];
  snprintf(line, sizeof(line),
           "#   plugin hops (rank 0): %llu puts sent, per put queue %.1f copy %.1f release %.1f us; "
           "%llu applied, per put wire %.1f apply %.1f us\n",
           sent, h[0], h[1], h[2], recv, h[3], h[4]);
  std::string out = line;
  const unsigned long long timed = after.hopTimedPuts - before.hopTimedPuts;
  if (timed > 0) {  // NCCL_MOELOOP_COPY_TIMING=1
    snprintf(line, sizeof(line), "#   plugin copies on the GPU (rank 0): %llu puts timed, %.1f us per put\n", timed,
             (double)(after.hopCopyGpuNs - before.hopCopyGpuNs) * 1e-3 / (double)timed);
    out += line;
  }
  return out;
}

}  // namespace moe_perf
