"""In-kernel inference: the fixed-point network, in Python and as the BPF code the scheduler runs.

tools/bench/mlp_bench.bpf.c wraps bpf/mlsched_mlp.h's mlp_decide() in a syscall program, so
BPF_PROG_TEST_RUN evaluates the scheduler's own inference code on this host's kernel.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from loader import contract, kernel_mlp, libbpf, schema
from loader.backends import NumpyModel
from loader.bpfmaps import write_elem
from tools.bench.producer import prog_test_run

REPO = Path(__file__).resolve().parents[2]
MLP_OBJ = REPO / "build" / "bench" / "mlp_bench.bpf.o"
MODELS = [REPO / "model_dir" / "model_path", REPO / "tests" / "models" / "dummy"]
GRIDS = [(2, 1), (4, 2), (8, 4)]  # the 2- and 4-vCPU VMs, an 8-CPU machine in two domains


class RunArgs(ctypes.Structure):
    """struct mlp_run_args of tools/bench/mlp_bench.bpf.c."""

    _fields_ = [("key", ctypes.c_uint64), ("slot", ctypes.c_uint32), ("gen", ctypes.c_uint32),
                ("reps", ctypes.c_uint32), ("result", ctypes.c_int32), ("ns", ctypes.c_uint64)]


@pytest.mark.parametrize("model_dir", MODELS, ids=lambda p: p.name)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}cpus")
def test_quantized_network_agrees_with_the_float_model(model_dir: Path, grid) -> None:
    model = NumpyModel.load(model_dir)
    keys = schema.grid_keys(*grid)
    share = kernel_mlp.agreement(kernel_mlp.QuantizedMlp(model), model, keys)
    print(f"{model_dir.name} on the {grid[0]}-CPU grid ({len(keys)} keys): {share:.5%} agree")
    assert share >= kernel_mlp.MIN_AGREEMENT


def test_quantize_refuses_what_the_kernel_cannot_run() -> None:
    from loader.backends import DenseLayer
    from loader.model_check import ModelError

    z = np.zeros
    tanh = NumpyModel([DenseLayer(z((10, 4)), z(4), "tanh"),
                       DenseLayer(z((4, 1)), z(1), "sigmoid")])
    with pytest.raises(ModelError, match="hidden activation 'tanh'"):
        kernel_mlp.QuantizedMlp(tanh)
    wide = NumpyModel([DenseLayer(z((10, 65)), z(65), "relu"),
                       DenseLayer(z((65, 1)), z(1), "linear")])
    with pytest.raises(ModelError, match="at most 64 units"):
        kernel_mlp.QuantizedMlp(wide)


@pytest.fixture(scope="module")
def mlp_prog():
    if os.geteuid() != 0:
        pytest.skip("BPF_PROG_TEST_RUN needs root")
    if not MLP_OBJ.exists():
        pytest.fail(f"{MLP_OBJ} missing: run `make {MLP_OBJ.relative_to(REPO)}`")
    obj = libbpf.BpfObject(str(MLP_OBJ))
    obj.load()
    yield obj
    obj.close()


@pytest.mark.parametrize("model_dir", MODELS, ids=lambda p: p.name)
def test_bpf_code_decides_as_the_python_mirror(mlp_prog, model_dir: Path) -> None:
    q = kernel_mlp.QuantizedMlp(NumpyModel.load(model_dir))
    write_elem(mlp_prog.map_fd(contract.MAP_MLP_WEIGHTS), 1, q.to_struct(generation=7))
    fd = mlp_prog.prog_fd("mlp_run")
    keys = schema.grid_keys(4, 2)
    rng = np.random.default_rng(3)
    sample = np.concatenate([keys[:50], rng.choice(keys, 400, replace=False)])
    want = q.decide(sample)
    got, ns = [], []
    for key in sample.tolist():
        args = RunArgs(key=key, slot=1, gen=7, reps=1)
        prog_test_run(fd, args)
        got.append(args.result)
        ns.append(args.ns)
    assert got == want.astype(int).tolist()
    assert set(got) == {0, 1}, "a network that decides one way only checks nothing"
    print(f"{model_dir.name}: BPF inference median {np.median(ns) / 1000:.1f} us per key")
    # A slot of another generation does not serve.
    args = RunArgs(key=int(sample[0]), slot=1, gen=8, reps=1)
    prog_test_run(fd, args)
    assert args.result == -1
