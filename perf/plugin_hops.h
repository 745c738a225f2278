// Where the loopback NET plugin's puts spent their time during one perf operation (several fake
// nodes through plugin/): the plugin's hop counters (plugin/moeloop_stats.h) read before and
// after, per put. Without the plugin loaded in this process there is nothing to read.
#pragma once
#include <string>

#include "../plugin/moeloop_stats.h"

namespace moe_perf {

// This process's plugin counters; false when the plugin is not loaded here.
bool readPluginStats(moeloopStats_t* out);
// One comment line for the table, "" when no copy-transport put was timed in between:
// "#   plugin hops (rank 0): N puts sent, per put queue q copy c release r us; M applied, per
// put wire w apply a us".
std::string pluginHopLine(const moeloopStats_t& before, const moeloopStats_t& after);

}  // namespace moe_perf
