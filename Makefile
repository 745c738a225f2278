# nccl-moe build. Variables as nccl-tests has them:
#   CUDA_HOME (default /usr/local/cuda), NCCL_HOME (see below), MPI=1 + MPI_HOME for
#   mpirun-launched perf and GPU tests, BUILDDIR (default build), NVCC_GENCODE (default sm_90).
# Targets: all (library, tests, perf, plugin), lib, test (CPU tests), gputest NGPUS=n, nettest, llnettest, htnettest,
#          perf, plugin, deps, python (library into python/nccl_moe/lib), install PREFIX=...,
#          clean (keeps .deps).
#
# NCCL: `make deps` installs NCCL_VERSION (default 2.28.9; 2.29.x and 2.30.x work too) from
# PyPI's nvidia-nccl-cu<CUDA major> wheel into .deps/nccl-<version>. NCCL_HOME defaults to that
# folder when it exists, else to CUDA_HOME (CUDA 13 toolkits may carry NCCL). Naming
# NCCL_VERSION on the command line means that version from .deps, nothing else.

CUDA_HOME ?= /usr/local/cuda
NCCL_VERSION ?= 2.28.9
DEPS_NCCL := $(CURDIR)/.deps/nccl-$(NCCL_VERSION)
ifeq ($(origin NCCL_VERSION),command line)
  NCCL_HOME ?= $(DEPS_NCCL)
else
  NCCL_HOME ?= $(if $(wildcard $(DEPS_NCCL)/include/nccl_device.h),$(DEPS_NCCL),$(CUDA_HOME))
endif
MPI ?= 0
MPI_HOME ?= /usr/lib/x86_64-linux-gnu/openmpi
BUILDDIR ?= build
PREFIX ?= /usr/local
NGPUS ?= 0
NVCC_GENCODE ?= -gencode=arch=compute_90,code=sm_90

NVCC := $(CUDA_HOME)/bin/nvcc
CXX ?= g++
NCCL_LIBDIR := $(firstword $(wildcard $(NCCL_HOME)/lib64/libnccl.so) $(wildcard $(NCCL_HOME)/lib/libnccl.so))
NCCL_LIBDIR := $(if $(NCCL_LIBDIR),$(dir $(NCCL_LIBDIR)),$(NCCL_HOME)/lib)
CUDA_LIBDIR := $(CUDA_HOME)/lib64

# NCCL's headers first: a CUDA 13 toolkit carries an nccl.h of its own. g++ sees NCCL and CUDA
# as system headers (their warnings are not ours); nvcc adds CUDA's include folder itself.
INCLUDES := -Iinclude -Isrc -I.
CXXFLAGS := -std=c++17 -O2 -g -fPIC -Wall -Wextra -Wno-unused-parameter $(INCLUDES) \
            -isystem $(NCCL_HOME)/include -isystem $(CUDA_HOME)/include
NVCCFLAGS := -std=c++17 -O3 -g -lineinfo $(NVCC_GENCODE) -Xcompiler -fPIC,-Wall $(INCLUDES) \
             -I$(NCCL_HOME)/include \
             -Xptxas -warn-spills
LDLIBS := -L$(NCCL_LIBDIR) -Wl,-rpath,$(NCCL_LIBDIR) -lnccl -L$(CUDA_LIBDIR) -lcudart -lpthread -ldl -lrt

ifeq ($(MPI),1)
  CXXFLAGS += -DNCCL_MOE_MPI=1 -I$(MPI_HOME)/include
  MPI_LIBS := -L$(MPI_HOME)/lib -Wl,-rpath,$(MPI_HOME)/lib -lmpi
endif

OBJ := $(BUILDDIR)/obj

# --- library -------------------------------------------------------------------------------
# Kernels sit in src/device/ and its folders by mode (common/, ht/, ll/; one level); the
# internode transport's host side in net/ (its device side is headers, net/device/).
LIB_CC := $(wildcard src/*.cc net/*.cc)
LIB_CU := $(wildcard src/device/*.cu src/device/*/*.cu)
LIB_OBJS := $(LIB_CC:%.cc=$(OBJ)/%.o) $(LIB_CU:%.cu=$(OBJ)/%.o)
LIB_SO := $(BUILDDIR)/lib/libnccl_moe.so
LIB_A := $(BUILDDIR)/lib/libnccl_moe.a

# --- tests and perf ------------------------------------------------------------------------
COMMON_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard testing/*.cc))
UNIT_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard tests/unit/*.cc))
GPU_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard tests/gpu/*.cc)) \
            $(patsubst %.cu,$(OBJ)/%.o,$(wildcard tests/gpu/*.cu))
PERF_COMMON_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(filter-out %_perf.cc,$(wildcard perf/*.cc))) \
                    $(patsubst %.cu,$(OBJ)/%.o,$(wildcard perf/*.cu))
PERF_BINS := $(patsubst perf/%.cc,$(BUILDDIR)/perf/%,$(wildcard perf/*_perf.cc))
UNIT_BIN := $(BUILDDIR)/test/unit_tests
GPU_BIN := $(BUILDDIR)/test/gpu_tests
# The internode transport layer's GPU test (2 fake nodes through the plugin; target nettest).
NET_GPU_OBJS := $(patsubst %.cu,$(OBJ)/%.o,$(wildcard tests/gpu/net/*.cu))
NET_GPU_BIN := $(BUILDDIR)/test/net_gpu_test

# Extra objects the CPU unit-test binary links (the plugin's host transport adds its own): the
# perf binaries' option parser and result writer, which need no CUDA.
UNIT_EXTRA_OBJS := $(OBJ)/perf/options.o $(OBJ)/perf/report.o

# Stop before compiling anything when NCCL_HOME has no device API (every goal but deps/clean).
ifneq ($(filter-out deps clean,$(if $(MAKECMDGOALS),$(MAKECMDGOALS),all)),)
  ifeq ($(wildcard $(NCCL_HOME)/include/nccl_device.h),)
    $(error NCCL with the device API not found: $(NCCL_HOME)/include/nccl_device.h is missing. \
      Run `make deps` (NCCL $(NCCL_VERSION) from PyPI into .deps/) or pass NCCL_HOME=<NCCL 2.28.9 or later>)
  endif
endif

.PHONY: all lib test gputest llnettest htnettest perf plugin deps python install clean
all: lib $(UNIT_BIN) $(GPU_BIN) perf plugin
lib: $(LIB_SO) $(LIB_A)
perf: $(PERF_BINS)
plugin:

# The loopback NET + GIN plugin has its own rules (targets plugin, plugintest).
-include plugin/plugin.mk

$(OBJ)/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -MMD -MP -c $< -o $@

$(OBJ)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(LIB_SO): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	$(CXX) -shared -o $@ $^ $(LDLIBS)

$(LIB_A): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(UNIT_BIN): $(UNIT_OBJS) $(COMMON_OBJS) $(UNIT_EXTRA_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $(UNIT_OBJS) $(COMMON_OBJS) $(UNIT_EXTRA_OBJS) $(LIB_A) -lgtest_main -lgtest $(LDLIBS) $(MPI_LIBS)

$(GPU_BIN): $(GPU_OBJS) $(COMMON_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $(GPU_OBJS) $(COMMON_OBJS) $(LIB_A) -lgtest $(LDLIBS) $(MPI_LIBS)

$(NET_GPU_BIN): $(NET_GPU_OBJS) $(COMMON_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $(NET_GPU_OBJS) $(COMMON_OBJS) $(LIB_A) $(LDLIBS) $(MPI_LIBS)

$(BUILDDIR)/perf/%: $(OBJ)/perf/%.o $(PERF_COMMON_OBJS) $(COMMON_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $^ $(LDLIBS) $(MPI_LIBS)

# CPU tests: what CI runs.
test: $(UNIT_BIN)
	$(UNIT_BIN)

# Multi-GPU tests, one process per GPU (NGPUS=0: all local GPUs). Skips without GPUs.
gputest: $(GPU_BIN)
	NCCL_NVLS_ENABLE=0 $(GPU_BIN) --ngpus=$(NGPUS)

# net/'s put-with-signal and timed wait across 2 fake nodes x 1 GPU (needs 2 GPUs and the plugin).
nettest: $(NET_GPU_BIN) $(PLUGIN_SO)
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 $(NET_GPU_BIN)

# Low-latency mode across fake nodes (needs 2 GPUs and the plugin): the cross-topology digests on
# 1 node x 2 GPUs, then every LL suite (and the per-node layout) on 2 fake nodes x 1 GPU, the digests again through a plugin
# shaped as a ConnectX-7 (the same bits), then the creation failures there (MOE_FAKE_NODES, testing/ranks.h),
# whose LlTopology cases compare their digests with the first run's (tests/gpu/ll_topology_test.cc).
# With 4 GPUs or more (LLNET_GPUS, counted by nvidia-smi) also 1 x 4, then 2 x 2 and 4 x 1 against it;
# with fewer, a line says they were skipped.
LL_DIGEST_DIR := $(abspath $(BUILDDIR))/lldigest
LLNET_GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
llnettest: $(GPU_BIN) $(PLUGIN_SO)
	rm -rf $(LL_DIGEST_DIR) && mkdir -p $(LL_DIGEST_DIR)
	NCCL_NVLS_ENABLE=0 MOE_LL_DIGEST_DIR=$(LL_DIGEST_DIR) $(GPU_BIN) --ngpus=2 --gtest_filter='LlTopology.*'
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=2 \
	  MOE_LL_DIGEST_DIR=$(LL_DIGEST_DIR) $(GPU_BIN) --ngpus=2 --gtest_filter='Ll*:HtLayout.*'
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=2 \
	  NCCL_MOELOOP_GBPS=50 NCCL_MOELOOP_LATENCY_US=3 \
	  MOE_LL_DIGEST_DIR=$(LL_DIGEST_DIR) $(GPU_BIN) --ngpus=2 --gtest_filter='LlTopology.*'
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=2 \
	  $(GPU_BIN) --ngpus=2 --gtest_filter='GpuCreateFailure.*'
	@if [ "$(LLNET_GPUS)" -ge 4 ]; then \
	  set -e; rm -rf $(LL_DIGEST_DIR)4 && mkdir -p $(LL_DIGEST_DIR)4; \
	  NCCL_NVLS_ENABLE=0 MOE_LL_DIGEST_DIR=$(LL_DIGEST_DIR)4 $(GPU_BIN) --ngpus=4 --gtest_filter='LlTopology.*'; \
	  for n in 2 4; do \
	    LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=$$n \
	      MOE_LL_DIGEST_DIR=$(LL_DIGEST_DIR)4 $(GPU_BIN) --ngpus=4 --gtest_filter='Ll*:HtLayout.*'; \
	  done; \
	else \
	  echo "llnettest: 2 x 2 and 4 x 1 fake nodes skipped: $(LLNET_GPUS) GPU(s) here, they need 4"; \
	fi

# High-throughput mode across fake nodes (needs 2 GPUs and the plugin; tests/gpu/ht_net_test.cc,
# ht_net_bytes_test.cc, ht_topology_test.cc): the HtNet suite and the cross-topology digests
# (HtTopology, MOE_HT_DIGEST_DIR) on 1 node x 2 GPUs, then the HT suites on 2 fake nodes x 1 GPU
# (HtNet, HtNetBytes, HtTopology against the first run's digests, and the intranode HtDispatch,
# HtCombine, HtReliability and HtTraining suites, whose combine references follow the node count), then the
# digests again through a plugin shaped as a ConnectX-7 (the same bits). With 4 GPUs or more
# (HTNET_GPUS, counted by nvidia-smi) also 1 x 4, then 2 x 2 and 4 x 1 against it; with fewer, a
# line says they were skipped.
HT_DIGEST_DIR := $(abspath $(BUILDDIR))/htdigest
HTNET_GPUS ?= $(LLNET_GPUS)
HTNET_FILTER := HtNet*:HtTopology.*:HtDispatch.*:HtCombine*:HtReliability.*:HtTraining.*
htnettest: $(GPU_BIN) $(PLUGIN_SO)
	rm -rf $(HT_DIGEST_DIR) && mkdir -p $(HT_DIGEST_DIR)
	NCCL_NVLS_ENABLE=0 MOE_HT_DIGEST_DIR=$(HT_DIGEST_DIR) $(GPU_BIN) --ngpus=2 --gtest_filter='HtTopology.*:HtNet.*'
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=2 \
	  MOE_HT_DIGEST_DIR=$(HT_DIGEST_DIR) $(GPU_BIN) --ngpus=2 --gtest_filter='$(HTNET_FILTER)'
	LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=2 \
	  NCCL_MOELOOP_GBPS=50 NCCL_MOELOOP_LATENCY_US=3 \
	  MOE_HT_DIGEST_DIR=$(HT_DIGEST_DIR) $(GPU_BIN) --ngpus=2 --gtest_filter='HtTopology.*'
	@if [ "$(HTNET_GPUS)" -ge 4 ]; then \
	  set -e; rm -rf $(HT_DIGEST_DIR)4 && mkdir -p $(HT_DIGEST_DIR)4; \
	  NCCL_NVLS_ENABLE=0 MOE_HT_DIGEST_DIR=$(HT_DIGEST_DIR)4 $(GPU_BIN) --ngpus=4 --gtest_filter='HtTopology.*:HtNet.*'; \
	  for n in 2 4; do \
	    LD_LIBRARY_PATH=$(abspath $(BUILDDIR)/lib):$$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 MOE_FAKE_NODES=$$n \
	      MOE_HT_DIGEST_DIR=$(HT_DIGEST_DIR)4 $(GPU_BIN) --ngpus=4 --gtest_filter='$(HTNET_FILTER)'; \
	  done; \
	else \
	  echo "htnettest: 1 x 4, 2 x 2 and 4 x 1 fake nodes skipped: $(HTNET_GPUS) GPU(s) here, they need 4"; \
	fi

# NCCL headers and libnccl.so.2 from PyPI (no root needed); see scripts/install_nccl.sh.
deps:
	scripts/install_nccl.sh $(NCCL_VERSION) $(DEPS_NCCL) $(NVCC)

# The Python package's copy of the library (then `pip install ./python`; python/README.md).
python: $(LIB_SO)
	@mkdir -p python/nccl_moe/lib
	cp $(LIB_SO) python/nccl_moe/lib/

install: lib
	install -d $(PREFIX)/lib $(PREFIX)/include
	install -m 644 include/nccl_moe.h $(PREFIX)/include/
	install -m 755 $(LIB_SO) $(PREFIX)/lib/
	install -m 644 $(LIB_A) $(PREFIX)/lib/

clean:
	rm -rf $(BUILDDIR)

-include $(shell find $(OBJ) -name '*.d' 2>/dev/null)
