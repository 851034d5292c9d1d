"""The model contract: check_model_dir without TF, the verified numpy fast path, backends.

Real TensorFlow, small models built in a session temp dir; no mocks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loader import contract
from loader.backends import NumpyBackend, TFBackend, open_backend
from loader.fastpath import MAX_ABS_DIFF, DenseLayer, NumpyModel, write_fastpath
from loader.model_check import (
    FASTPATH_FILE,
    ModelError,
    check_model_dir,
    parse_signatures,
)
from model_dir import create_dummy_model
from tests.host.conftest import _copy

REPO = Path(__file__).resolve().parents[2]
GRIDS = [(2, 1), (8, 4)]


def _refused(path: Path, pattern: str) -> str:
    with pytest.raises(ModelError, match=pattern) as exc:
        check_model_dir(path)
    message = str(exc.value)
    assert "\n" not in message  # one line for the user
    return message


# --- check_model_dir failures ---------------------------------------------------------------


def test_missing_dir(tmp_path):
    _refused(tmp_path / "nope", r"^model not found at .*nope \(run model_dir/create_dummy_model")


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_keras_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x89HDF\r\n")
    _refused(
        path,
        rf"is a Keras file, not a SavedModel directory \(convert it: model_dir/transfer.py "
        rf"--input .*model\{suffix} --output DIR\)",
    )


def test_dir_holding_a_keras_file(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n")
    _refused(tmp_path, r"model.h5 is a Keras file, not a SavedModel directory \(convert it: ")


@pytest.mark.parametrize(
    "content",
    [None, b"", b"not a protobuf at all \xff\xff\xff", b"\x12\xff\x7f\x00", b"\x12\x05\x2a\x03"],
    ids=["no-pb", "empty", "text", "truncated-length", "truncated-signature"],
)
def test_not_a_saved_model(tmp_path, content):
    if content is not None:
        (tmp_path / "saved_model.pb").write_bytes(content)
    _refused(tmp_path, r"^invalid SavedModel format at ")


def test_truncated_real_saved_model(tmp_path, dummy):
    path = tmp_path / "m"
    path.mkdir()
    data = (dummy / "saved_model.pb").read_bytes()
    (path / "saved_model.pb").write_bytes(data[: len(data) // 2])
    _refused(path, r"^invalid SavedModel format at ")


def test_not_a_directory(tmp_path):
    (tmp_path / "model.pb").write_bytes(b"x")
    _refused(tmp_path / "model.pb", r"^invalid SavedModel format at .*not a directory")


def test_wrong_input_shape(width5):
    _refused(width5, r"expected input shape \[\?, 10\], got \[\?, 5\] \(pad with zeros\)")


def test_int32_input(int32):
    _refused(int32, r"expected float32 input, got int32")


@pytest.mark.parametrize("victim", ["variables.index", "variables.data-00000-of-00001"])
def test_missing_variables(tmp_path, dummy, victim):
    path = _copy(dummy, tmp_path / "m")
    (path / "variables" / victim).unlink()
    _refused(path, rf"^missing variables at {re.escape(str(path))}/variables ")


# --- the protobuf decoder -------------------------------------------------------------------


def _tf_signatures(path: Path) -> dict:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    assert len(saved.meta_graphs) == 1
    result = {}
    for name, sig in saved.meta_graphs[0].signature_def.items():
        result[name] = tuple(
            {
                key: (
                    info.dtype,
                    None
                    if info.tensor_shape.unknown_rank
                    else tuple(d.size for d in info.tensor_shape.dim),
                )
                for key, info in tensors.items()
            }
            for tensors in (sig.inputs, sig.outputs)
        )
    return result


@pytest.mark.parametrize("model", ["dummy", "width5", "int32", "tanh_stack"])
def test_decoder_agrees_with_tf(request, model):
    path = request.getfixturevalue(model)
    ours = {
        name: tuple(
            {key: (spec.dtype, spec.shape) for key, spec in tensors.items()}
            for tensors in (sig.inputs, sig.outputs)
        )
        for name, sig in parse_signatures((path / "saved_model.pb").read_bytes()).items()
    }
    assert ours == _tf_signatures(path)
    assert "serving_default" in ours


# --- the fast path --------------------------------------------------------------------------


def test_dummy_model(dummy):
    info = check_model_dir(dummy)
    assert (info.input_key, info.output_key) == ("features", "output_0")
    assert info.fastpath_ok and info.fastpath_reason == ""
    backend, reason = open_backend(info, "auto")
    assert isinstance(backend, NumpyBackend) and backend.kind == contract.Backend.NUMPY
    assert reason == f"numpy: verified fast-path weights (digest {info.digest[:8]})"


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}cpus")
def test_fastpath_matches_tf_on_grid(dummy, grid):
    info = check_model_dir(dummy)
    tf_backend, reason = open_backend(info, "tf")
    assert isinstance(tf_backend, TFBackend) and reason == "tf: requested"
    x = contract.unpack_keys(contract.feature_grid(*grid))
    want = tf_backend.predict(x)
    got = NumpyModel.load(dummy).predict(x)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(x),)
    assert np.array_equal(want > contract.MIGRATE_THRESHOLD, got > contract.MIGRATE_THRESHOLD)
    assert np.max(np.abs(want - got)) <= MAX_ABS_DIFF


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}cpus")
def test_dummy_model_uses_both_decisions(dummy, grid):
    p = NumpyModel.load(dummy).predict(contract.unpack_keys(contract.feature_grid(*grid)))
    share = np.mean(p > contract.MIGRATE_THRESHOLD)
    assert 0.2 <= share <= 0.8


@pytest.mark.parametrize("path", ["fixture", "bundled"])
def test_dummy_is_the_contracts_network(dummy, path):
    """10 -> 64 relu -> 64 relu -> 1 sigmoid, fast path verified: the freshly made dummy and
    the one shipped in model_dir/model_path (make it again with create_dummy_model.py)."""
    model_dir = dummy if path == "fixture" else REPO / "model_dir" / "model_path"
    info = check_model_dir(model_dir)
    assert info.fastpath_ok, info.fastpath_reason
    model = NumpyModel.load(model_dir)
    assert model.describe() == "10 -> 64 relu -> 64 relu -> 1 sigmoid"
    for grid in GRIDS:
        p = model.predict(contract.unpack_keys(contract.feature_grid(*grid)))
        assert 0.2 <= np.mean(p > contract.MIGRATE_THRESHOLD) <= 0.8, grid


def test_dummy_hidden_option(tmp_path, tf):
    create_dummy_model.create(tmp_path / "m", seed=0, hidden=(16, 8))
    assert NumpyModel.load(tmp_path / "m").describe() == "10 -> 16 relu -> 8 relu -> 1 sigmoid"


def test_dummy_model_is_deterministic(tf):
    a, b = (create_dummy_model.build_model(seed=7) for _ in range(2))
    for model in (a, b):
        create_dummy_model.calibrate(model)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        assert np.array_equal(wa, wb)


def test_plain_stack_gets_verified(tmp_path, tanh_stack):
    path = _copy(tanh_stack, tmp_path / "m")
    assert check_model_dir(path).fastpath_reason.startswith("no verified fast-path weights")
    result = write_fastpath(path, nr_cpus_probe=4, max_dom_cpus_probe=2, nr_random=1000)
    assert result.written, result.message
    assert "relu" not in result.message and "tanh" in result.message
    assert check_model_dir(path).fastpath_ok


def test_not_dense_stack_refused(tmp_path, not_dense, dummy):
    path = _copy(not_dense, tmp_path / "m")
    # An old fast-path file (of another model) must not survive a refusal.
    shutil.copytree(dummy / "assets", path / "assets", dirs_exist_ok=True)
    result = write_fastpath(path, nr_cpus_probe=2, max_dom_cpus_probe=1, nr_random=100)
    assert not result.written
    assert result.message.startswith("not a plain Dense stack: op ")
    assert not (path / FASTPATH_FILE).exists()

    info = check_model_dir(path)
    assert not info.fastpath_ok
    backend, reason = open_backend(info, "auto")
    assert isinstance(backend, TFBackend) and backend.kind == contract.Backend.TF
    assert reason.startswith("tf: no verified fast-path weights (run model_dir/verify_model.py")
    with pytest.raises(ModelError, match="cannot use the numpy backend"):
        open_backend(info, "numpy")


@pytest.mark.parametrize("change", ["variables", "re-export"])
def test_stale_fastpath(tmp_path, dummy, tf, change):
    """The model changed after verification: its numpy weights must not be used."""
    path = _copy(dummy, tmp_path / "m")
    if change == "variables":
        # New values in the same checkpoint layout; saved_model.pb untouched. (Copying the
        # variables/ of another export would not load: each export numbers them differently.)
        loaded = tf.saved_model.load(str(path))
        for v in loaded.variables:
            v.assign(v * 1.5)
        tf.train.Checkpoint(loaded).write(str(path / "variables" / "variables"))
    else:
        # Re-exported over the directory without re-verifying; assets/ keeps the old file.
        shutil.rmtree(path / "variables")
        (path / "saved_model.pb").unlink()
        create_dummy_model.build_model(seed=1).export(str(path), verbose=False)
    assert (path / FASTPATH_FILE).exists()

    info = check_model_dir(path)
    assert not info.fastpath_ok
    assert info.fastpath_reason.startswith("fast-path weights are stale")
    backend, reason = open_backend(info, "auto")
    assert backend.kind == contract.Backend.TF and reason.startswith("tf: fast-path weights are")
    with pytest.raises(ModelError, match="stale"):
        open_backend(info, "numpy")
    with pytest.raises(ModelError, match="stale"):
        NumpyBackend(path)

    # Re-verifying fixes it, with the new weights.
    assert write_fastpath(path, nr_cpus_probe=2, max_dom_cpus_probe=1, nr_random=100).written
    info = check_model_dir(path)
    assert info.fastpath_ok
    x = contract.unpack_keys(contract.feature_grid(4, 2))
    old = NumpyModel.load(dummy).predict(x)
    new, want = open_backend(info)[0].predict(x), backend.predict(x)
    assert np.max(np.abs(new - want)) <= MAX_ABS_DIFF
    assert np.max(np.abs(new - old)) > 0.01  # it really is another model


def test_damaged_fastpath_file(tmp_path, dummy):
    path = _copy(dummy, tmp_path / "m")
    (path / FASTPATH_FILE).write_bytes(b"PK\x03\x04 garbage")
    info = check_model_dir(path)
    assert not info.fastpath_ok and "unreadable" in info.fastpath_reason
    assert open_backend(info)[0].kind == contract.Backend.TF


def test_sigmoid_is_stable():
    layer = DenseLayer(np.ones((10, 1), np.float32), np.zeros(1, np.float32), "sigmoid")
    x = np.zeros((3, 10), np.float32)
    x[:, 0] = [-1000.0, 0.0, 1000.0]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is right
        p = NumpyModel([layer]).predict(x)
    assert p.dtype == np.float32
    assert p.tolist() == [0.0, 0.5, 1.0]


def test_loader_path_does_not_import_tensorflow(dummy):
    """What the loader does before and after attach, on the fast path: no TF, no Keras."""
    code = f"""
import sys
from loader.model_check import check_model_dir
from loader.backends import open_backend
from loader import contract
info = check_model_dir({str(dummy)!r})
backend, reason = open_backend(info, "auto")
p = backend.predict(contract.unpack_keys(contract.feature_grid(2, 1)))
assert reason.startswith("numpy:"), reason
assert p.shape == (1088,), p.shape
loaded = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_bundled_model():
    """model_dir/model_path, committed with the repository, is valid and verified."""
    info = check_model_dir(REPO / "model_dir" / "model_path")
    assert info.fastpath_ok, info.fastpath_reason
