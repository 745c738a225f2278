# moeloop: loopback NET + GIN plugin for NCCL 2.28.9 - 2.30 (included by the top-level Makefile).
#   make plugin       builds $(BUILDDIR)/lib/libnccl-net-moeloop.so and the GPU test binary
#   make plugintest   runs the GPU test: PLUGIN_NGPUS processes (default 4) as 2 fake nodes
# The plugin objects also link into the CPU unit tests (UNIT_EXTRA_OBJS).

PLUGIN_SO := $(BUILDDIR)/lib/libnccl-net-moeloop.so
PLUGIN_CORE_SRCS := plugin/moeloop_log.cc plugin/moeloop_peer_stats.cc plugin/moeloop_shaping.cc \
                    plugin/moeloop_socket.cc plugin/moeloop_transport.cc plugin/moeloop_net.cc
PLUGIN_GIN_SRCS := plugin/moeloop_gin.cc plugin/moeloop_gin_mesh.cc plugin/moeloop_gin_copy.cc \
                   plugin/moeloop_gin_cuda.cc plugin/moeloop_cumem.cc plugin/moeloop_gin_tables.cc
PLUGIN_CORE_OBJS := $(PLUGIN_CORE_SRCS:%.cc=$(OBJ)/%.o)
PLUGIN_GIN_OBJS := $(PLUGIN_GIN_SRCS:%.cc=$(OBJ)/%.o)
PLUGIN_GPU_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard tests/plugin_gpu/*.cc)) \
                   $(patsubst %.cu,$(OBJ)/%.o,$(wildcard tests/plugin_gpu/*.cu))
PLUGIN_GPU_BIN := $(BUILDDIR)/test/plugin_gpu_test
PLUGIN_NGPUS ?= 4

# The CPU unit tests exercise the NET transport and the GIN tables on host memory
# (tests/unit/plugin_*_test.cc); plugin/tests/*.cc are CPU tests kept with the plugin (its switches).
PLUGIN_UNIT_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard plugin/tests/*.cc))
UNIT_EXTRA_OBJS += $(PLUGIN_CORE_OBJS) $(PLUGIN_GIN_OBJS) $(PLUGIN_UNIT_OBJS)

# Plugin objects: only the plugin entry symbols and moeloopGetStats are exported from the .so.
$(OBJ)/plugin/%.o: plugin/%.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -fvisibility=hidden -MMD -MP -c $< -o $@

$(PLUGIN_SO): $(PLUGIN_CORE_OBJS) $(PLUGIN_GIN_OBJS)
	@mkdir -p $(dir $@)
	$(CXX) -shared -o $@ $^ -Wl,-soname,$(notdir $@) -Wl,--no-undefined -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) \
	  -lcudart -lpthread

$(PLUGIN_GPU_BIN): $(PLUGIN_GPU_OBJS)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $^ $(LDLIBS)

plugin: $(PLUGIN_SO) $(PLUGIN_GPU_BIN)

# NCCL finds libnccl-net-moeloop.so through LD_LIBRARY_PATH (NCCL_NET_PLUGIN=moeloop).
plugintest: $(PLUGIN_SO) $(PLUGIN_GPU_BIN)
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 \
	  $(PLUGIN_GPU_BIN) --ngpus=$(PLUGIN_NGPUS)

.PHONY: plugintest
