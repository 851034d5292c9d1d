# mlsched — see README.md. Every target that needs packages depends on `setup`.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/mlsched
KERNEL_DIR = $(shell cat $(CACHE)/kernel/current 2>/dev/null)
# clang-14 emits no btf_type_tag, which the __kptr cpumasks need: clang-19 (bookworm) does.
CLANG ?= clang-19
BPF_CFLAGS := -target bpf -O2 -g -D__TARGET_ARCH_x86 -mcpu=v3 -fms-extensions \
	-Wno-microsoft-anon-tag -Wall -Wno-unused-function
VM_CPUS ?= 2

.PHONY: all setup bpf model test host-test vm-test vm-models demo soak lint clean bench-model train

all: bpf

setup:
	@bash scripts/setup.sh

bpf: bpf/mlsched.bpf.o

# vmlinux.h comes from the sched_ext kernel's BTF, not the host's (which lacks sched_ext).
bpf/vmlinux.h: $(CACHE)/kernel/current
	@echo "bpf: generating vmlinux.h from $(KERNEL_DIR)/vmlinux"
	@bpftool btf dump file $(KERNEL_DIR)/vmlinux format c > $@.tmp && mv $@.tmp $@

bpf/mlsched.bpf.o: bpf/mlsched.bpf.c bpf/mlsched.h bpf/vmlinux.h Makefile
	@echo "bpf: compiling $@"
	@$(CLANG) $(BPF_CFLAGS) -Ibpf -c $< -o $@

model: model_dir/model_path/saved_model.pb

model_dir/model_path/saved_model.pb:
	$(PY) model_dir/create_dummy_model.py --output model_dir/model_path

lint: setup
	$(VENV)/bin/ruff check .

host-test: setup bpf
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/host

# Models the VM tests use, built on the host where TensorFlow imports in seconds.
vm-models: setup
	@$(PY) -m tests.vm.make_models build/test-models 2>&1 | grep '^make_models'

vm-test: setup bpf vm-models
	scripts/vm-run.sh --cpus $(VM_CPUS) -- 'python -m pytest -v -s -p no:cacheprovider tests/vm'

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
	rm -f bpf/*.o bpf/vmlinux.h
	rm -rf build

# Model backends side by side on one core (CPU 0): a table, and JSON in bench-results/.
bench-model: setup
	taskset -c 0 $(PY) tools/bench_model.py --cpu 0

# Benchmarks (docs/BENCHMARKS.md): the decision pipeline on the host and in the VM, and the
# scheduling outcome in the VM; results in bench-results/. 10-15 minutes.
.PHONY: bench
BENCH_PRODUCER := build/bench/ringbuf_producer.bpf.o

$(BENCH_PRODUCER): tools/bench/ringbuf_producer.bpf.c bpf/mlsched.h bpf/vmlinux.h Makefile
	@mkdir -p $(dir $@)
	@echo "bpf: compiling $@"
	@$(CLANG) $(BPF_CFLAGS) -Ibpf -c $< -o $@

bench: setup bpf $(BENCH_PRODUCER)
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
