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

.PHONY: all setup bpf model test host-test vm-test vm-models demo soak lint clean

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

clean:
	rm -f bpf/*.o bpf/vmlinux.h
	rm -rf build
