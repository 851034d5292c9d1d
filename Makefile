# mlsched — see README.md. Every target that needs packages depends on `setup`.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/mlsched
KERNEL_DIR = $(shell cat $(CACHE)/kernel/current 2>/dev/null)
# The kernel's own scx headers (tools/sched_ext/include), from Debian's linux-source-7.3,
# cached by `make setup`; never copied into the repo.
SCX_SRC = $(shell cat $(CACHE)/linux-source/current 2>/dev/null)
SCX_INC = $(SCX_SRC)/tools/sched_ext/include
# clang-14 emits no btf_type_tag, which the __kptr cpumasks need: clang-19 (bookworm) does.
CLANG ?= clang-19
BPF_CFLAGS := -target bpf -O2 -g -D__TARGET_ARCH_x86 -mcpu=v3 -fms-extensions \
	-Wno-microsoft-anon-tag -Wall -Wno-unused-function
VM_CPUS ?= 2
# The in-kernel inference code alone, run with BPF_PROG_TEST_RUN on the host (tests, bench).
MLP_BENCH := build/bench/mlp_bench.bpf.o

.PHONY: all setup bpf model test host-test vm-test vm-test-topology vm-models demo soak lint clean bench-model train

all: bpf

setup:
	@bash scripts/setup.sh

bpf: bpf/mlsched.bpf.o bpf/mlsched.bpf.enums

# vmlinux.h comes from the sched_ext kernel's BTF, not the host's (which lacks sched_ext).
bpf/vmlinux.h: $(CACHE)/kernel/current
	@echo "bpf: generating vmlinux.h from $(KERNEL_DIR)/vmlinux"
	@bpftool btf dump file $(KERNEL_DIR)/vmlinux format c > $@.tmp && mv $@.tmp $@

bpf/mlsched.bpf.o: bpf/mlsched.bpf.c bpf/mlsched.h bpf/mlsched_policy.h bpf/mlsched_mlp.h bpf/vmlinux.h Makefile
	@test -f $(SCX_INC)/scx/common.bpf.h || { echo "bpf: no scx headers in '$(SCX_INC)': run make setup"; exit 1; }
	@echo "bpf: compiling $@"
	@$(CLANG) $(BPF_CFLAGS) -Ibpf -I$(SCX_INC) -I$(SCX_INC)/bpf-compat -c $< -o $@

# The scx headers replace the kernel's enum constants with .rodata variables the loader fills
# from the running kernel's BTF at load (scx's SCX_ENUM_INIT): this lists "NAME enum-type".
bpf/mlsched.bpf.enums: $(SCX_INC)/scx/enums.autogen.h
	@sed -n 's/.*SCX_ENUM_SET(skel, *\([a-z_0-9]*\), *\([A-Z_0-9]*\)).*/\2 \1/p' $< > $@.tmp
	@test -s $@.tmp && mv $@.tmp $@

model: model_dir/model_path/saved_model.pb

model_dir/model_path/saved_model.pb:
	$(PY) model_dir/create_dummy_model.py --output model_dir/model_path

lint: setup
	$(VENV)/bin/ruff check .

host-test: setup bpf $(MLP_BENCH)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/host

# Models the VM tests use, built on the host where TensorFlow imports in seconds.
vm-models: setup
	@$(PY) -m tests.vm.make_models build/test-models 2>&1 | grep '^make_models'

vm-test: setup bpf vm-models vm-test-topology
	scripts/vm-run.sh --cpus $(VM_CPUS) -- 'python -m pytest -v -s -p no:cacheprovider tests/vm'

# CPU hotplug and cpusets want two domains of two CPUs: a boot of their own.
vm-test-topology: setup bpf
	scripts/vm-run.sh --cpus 4 -- 'python -m pytest -v -s -p no:cacheprovider tests/vm/test_topology.py'

test: host-test vm-test

demo: setup bpf
	scripts/vm-run.sh --cpus $(VM_CPUS) -- 'bash scripts/demo-guest.sh'

# Five minutes of mixed load (issue: reliability); not part of `make test`.
soak: setup bpf
	scripts/vm-run.sh --cpus $(VM_CPUS) -- 'bash scripts/soak-guest.sh'

# The learning loop (tools/collect.md): mlsched-collect in the VM under the benchmark's kinds of
# load (scripts/train-guest.sh), model_export.py --data on the host, then the model checked as the
# loader will run it and compared with the heuristic. About 5 min; not part of `make test`.
TRAIN_CPUS ?= 4
TRAIN_SECONDS ?= 120
TRAIN_DATA := build/vm-out/train/candidates.csv
TRAINED_MODEL ?= model_dir/model_path_trained
train: setup bpf
	rm -f $(TRAIN_DATA)
	scripts/vm-run.sh --cpus $(TRAIN_CPUS) -- 'TRAIN_SECONDS=$(TRAIN_SECONDS) bash scripts/train-guest.sh'
	$(PY) model_dir/model_export.py --data $(TRAIN_DATA) --output $(TRAINED_MODEL)
	$(PY) -m tools.trainreport --model $(TRAINED_MODEL) --data $(TRAIN_DATA)

clean:
	rm -f bpf/*.o bpf/*.enums bpf/vmlinux.h
	rm -rf build

# Model backends side by side on one core (CPU 0): a table, and JSON in bench-results/.
# Then the three networks' numpy rate and in-kernel inference time (tools/bench/kinfer.py).
bench-model: setup $(MLP_BENCH)
	taskset -c 0 $(PY) tools/bench_model.py --cpu 0
	@mkdir -p bench-results
	taskset -c 0 $(PY) -m tools.bench.kinfer --json bench-results/kinfer.json

# The kernel's own example schedulers, peers for the benchmarks and tests/vm/test_peers.py: built
# from the cached source tree (tools/sched_ext, with its own libbpf and bpftool) against the VM
# kernel's BTF. Objects go to build/scx/obj (O=; nothing is written into the cache tree), the
# binaries to build/scx/.
.PHONY: scx-peers
SCX_PEERS := scx_simple scx_central
SCX_OUT := $(CURDIR)/build/scx
scx-peers: setup
	@[ -n "$(SCX_SRC)" ] && [ -d "$(SCX_SRC)/tools/sched_ext" ] || \
		{ echo "scx-peers: no kernel source in $(CACHE)/linux-source: run make setup" >&2; exit 2; }
	@echo "scx-peers: building $(SCX_PEERS) from $(SCX_SRC)/tools/sched_ext"
	@mkdir -p $(SCX_OUT)/obj
	@$(MAKE) -s -C $(SCX_SRC)/tools/sched_ext -j2 O=$(SCX_OUT)/obj CLANG=$(CLANG) \
		LLVM_STRIP=llvm-strip-19 VMLINUX_BTF=$(KERNEL_DIR)/vmlinux $(SCX_PEERS) \
		> $(SCX_OUT)/build.log 2>&1 || \
		{ tail -30 $(SCX_OUT)/build.log >&2; echo "scx-peers: build failed, see $(SCX_OUT)/build.log" >&2; exit 1; }
	@cd $(SCX_OUT)/obj/build/bin && cp -p $(SCX_PEERS) $(SCX_OUT)/
	@echo "scx-peers: $(addprefix build/scx/,$(SCX_PEERS))"

# Benchmarks (docs/BENCHMARKS.md): the decision pipeline on the host and in the VM, and the
# scheduling outcome in the VM; results in bench-results/. 10-15 minutes.
.PHONY: bench
BENCH_PRODUCER := build/bench/ringbuf_producer.bpf.o

$(BENCH_PRODUCER): tools/bench/ringbuf_producer.bpf.c bpf/mlsched.h bpf/mlsched_policy.h bpf/vmlinux.h Makefile
	@mkdir -p $(dir $@)
	@echo "bpf: compiling $@"
	@$(CLANG) $(BPF_CFLAGS) -Ibpf -c $< -o $@

$(MLP_BENCH): tools/bench/mlp_bench.bpf.c bpf/mlsched_mlp.h bpf/mlsched.h bpf/vmlinux.h Makefile
	@mkdir -p $(dir $@)
	@echo "bpf: compiling $@"
	@$(CLANG) $(BPF_CFLAGS) -Ibpf -c $< -o $@

bench: setup bpf scx-peers $(BENCH_PRODUCER) $(MLP_BENCH)
	$(PY) -m tools.bench $(BENCH_ARGS)

# wakeprobe (tools/bench/wakeprobe.c): wakeup latency in the manner of schbench.
WAKEPROBE := build/bench/wakeprobe
WAKEPROBE_CFLAGS := -O2 -g -Wall -Wextra -Wshadow -Wconversion -Werror -pthread

$(WAKEPROBE): tools/bench/wakeprobe.c Makefile
	@mkdir -p $(dir $@)
	@echo "cc: compiling $@"
	@gcc $(WAKEPROBE_CFLAGS) -o $@ $< -lm

bench: $(WAKEPROBE)

# Wakeup latency beside CPU hogs, EEVDF against mlsched, one VM boot (4 vCPUs), about 5 min:
# bench-results/wakeup-<date>.{json,md}. More configurations and options go to the guest, e.g.
#   make bench-wakeup WAKEUP_ARGS='--config slice5ms="--slice-us 5000" --rounds 4'
.PHONY: bench-wakeup
bench-wakeup: setup bpf $(WAKEPROBE)
	$(PY) -m tools.bench.wakeup $(WAKEUP_ARGS)
