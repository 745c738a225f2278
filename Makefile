# nccl-moe build. Variables as nccl-tests has them:
#   CUDA_HOME (default /usr/local/cuda), NCCL_HOME (default: CUDA_HOME), MPI=1 + MPI_HOME for
#   mpirun-launched perf and GPU tests, BUILDDIR (default build), NVCC_GENCODE (default sm_90).
# Targets: all (library, tests, perf, plugin), lib, test (CPU tests), gputest NGPUS=n,
#          perf, plugin, install PREFIX=..., clean.

CUDA_HOME ?= /usr/local/cuda
NCCL_HOME ?= $(CUDA_HOME)
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

INCLUDES := -Iinclude -Isrc -I$(NCCL_HOME)/include -I$(CUDA_HOME)/include
CXXFLAGS := -std=c++17 -O2 -g -fPIC -Wall -Wextra -Wno-unused-parameter $(INCLUDES)
NVCCFLAGS := -std=c++17 -O3 -g -lineinfo $(NVCC_GENCODE) -Xcompiler -fPIC,-Wall $(INCLUDES) \
             -Xptxas -warn-spills
LDLIBS := -L$(NCCL_LIBDIR) -Wl,-rpath,$(NCCL_LIBDIR) -lnccl -L$(CUDA_LIBDIR) -lcudart -lpthread -ldl -lrt

ifeq ($(MPI),1)
  CXXFLAGS += -DNCCL_MOE_MPI=1 -I$(MPI_HOME)/include
  MPI_LIBS := -L$(MPI_HOME)/lib -Wl,-rpath,$(MPI_HOME)/lib -lmpi
endif

OBJ := $(BUILDDIR)/obj

# --- library -------------------------------------------------------------------------------
LIB_CC := $(wildcard src/*.cc)
LIB_CU := $(wildcard src/device/*.cu)
LIB_OBJS := $(LIB_CC:%.cc=$(OBJ)/%.o) $(LIB_CU:%.cu=$(OBJ)/%.o)
LIB_SO := $(BUILDDIR)/lib/libnccl_moe.so
LIB_A := $(BUILDDIR)/lib/libnccl_moe.a

# --- tests and perf ------------------------------------------------------------------------
COMMON_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard tests/common/*.cc))
UNIT_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard tests/unit/*.cc))
GPU_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(wildcard tests/gpu/*.cc)) \
            $(patsubst %.cu,$(OBJ)/%.o,$(wildcard tests/gpu/*.cu))
PERF_COMMON_OBJS := $(patsubst %.cc,$(OBJ)/%.o,$(filter-out %_perf.cc,$(wildcard perf/*.cc))) \
                    $(patsubst %.cu,$(OBJ)/%.o,$(wildcard perf/*.cu))
PERF_BINS := $(patsubst perf/%.cc,$(BUILDDIR)/perf/%,$(wildcard perf/*_perf.cc))
UNIT_BIN := $(BUILDDIR)/test/unit_tests
GPU_BIN := $(BUILDDIR)/test/gpu_tests

# Extra objects the CPU unit-test binary links (the plugin's host transport adds its own).
UNIT_EXTRA_OBJS :=

.PHONY: all lib test gputest perf plugin install clean
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

$(BUILDDIR)/perf/%: $(OBJ)/perf/%.o $(PERF_COMMON_OBJS) $(COMMON_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $^ $(LDLIBS) $(MPI_LIBS)

# CPU tests: what CI runs.
test: $(UNIT_BIN)
	$(UNIT_BIN)

# Multi-GPU tests, one process per GPU (NGPUS=0: all local GPUs). Skips without GPUs.
gputest: $(GPU_BIN)
	NCCL_NVLS_ENABLE=0 $(GPU_BIN) --ngpus=$(NGPUS)

install: lib
	install -d $(PREFIX)/lib $(PREFIX)/include
	install -m 644 include/nccl_moe.h $(PREFIX)/include/
	install -m 755 $(LIB_SO) $(PREFIX)/lib/
	install -m 644 $(LIB_A) $(PREFIX)/lib/

clean:
	rm -rf $(BUILDDIR)

-include $(shell find $(OBJ) -name '*.d' 2>/dev/null)
