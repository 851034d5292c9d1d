"""The model contract: check_model_dir without TF, the manifest, the numpy fast path, backends.

Real TensorFlow, small models built in a session temp dir; no mocks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loader import contract, schema
from loader.backends import DenseLayer, NumpyModel, TFBackend, open_backend
from loader.model_check import (
    FASTPATH_FILE,
    MANIFEST_FILE,
    ModelError,
    check_model_dir,
    file_digests,
    read_meta_graph,
    saved_model_class,
)
from model_dir import create_dummy_model, verify_model
from model_dir.architecture import describe_stack
from model_dir.export_verified import write_manifest
from model_dir.fastpath_verify import MAX_ABS_DIFF, write_fastpath
from tests.host.conftest import _copy

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "model_dir" / "model_path"  # the trained model
DUMMY = REPO / "tests" / "models" / "dummy"  # mlsched-dummy --output tests/models/dummy
GRIDS = [(2, 1), (8, 4)]


def _refused(path: Path, pattern: str) -> str:
    with pytest.raises(ModelError, match=pattern) as exc:
        check_model_dir(path)
    message = str(exc.value)
    assert "\n" not in message  # one line for the user
    return message


# --- check_model_dir failures ---------------------------------------------------------------


def test_missing_dir(tmp_path):
    _refused(tmp_path / "nope", r"^model not found at .*nope \(make one: mlsched-export")


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_keras_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x89HDF\r\n")
    _refused(
        path,
        rf"is a Keras file, not a SavedModel directory \(convert it: mlsched-transfer "
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


# --- saved_model.pb through protobuf and tensorboard's copy of TF's protos ------------------


def _summary(signature_def) -> dict:
    """{name: ({input: (dtype, shape)}, {output: (dtype, shape)})} of a signature_def map.

    The same attribute names in TF's protos and tensorboard's copies of them.
    """
    return {
        name: tuple(
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
        for name, sig in signature_def.items()
    }


def test_saved_model_wrapper_matches_tf(tf):
    """The one message declared here has TF's SavedModel's fields, numbers and types."""
    from tensorflow.core.protobuf import saved_model_pb2

    def fields(descriptor) -> dict:
        return {
            f.name: (f.number, f.type, f.is_repeated, f.message_type and f.message_type.name)
            for f in descriptor.fields
        }

    ours = saved_model_class().DESCRIPTOR
    assert fields(ours) == fields(saved_model_pb2.SavedModel.DESCRIPTOR)
    assert ours.fields_by_name["meta_graphs"].message_type.full_name == "tensorboard.MetaGraphDef"


@pytest.mark.parametrize("model", ["dummy", "width5", "int32", "tanh_stack"])
def test_parse_agrees_with_tf(request, model):
    from tensorflow.core.protobuf import saved_model_pb2

    data = (request.getfixturevalue(model) / "saved_model.pb").read_bytes()
    saved = saved_model_pb2.SavedModel.FromString(data)
    assert len(saved.meta_graphs) == 1
    ours = read_meta_graph(request.getfixturevalue(model))
    assert list(ours.meta_info_def.tags) == list(saved.meta_graphs[0].meta_info_def.tags)
    assert _summary(ours.signature_def) == _summary(saved.meta_graphs[0].signature_def)
    assert "serving_default" in ours.signature_def


def test_bundled_signature():
    meta_graph = read_meta_graph(BUNDLED)
    assert list(meta_graph.meta_info_def.tags) == ["serve"]
    assert _summary(meta_graph.signature_def)["serving_default"] == (
        {"features": (1, (-1, 10))},
        {"output_0": (1, (-1, 1))},
    )


def test_check_does_not_import_tensorflow():
    """A subprocess: the whole check, on a model with and without a fast path, no TF."""
    code = f"""
import sys
from loader.model_check import ModelError, check_model_dir
info = check_model_dir({str(BUNDLED)!r})
assert info.fastpath_ok, info.fastpath_reason
try:
    check_model_dir({str(BUNDLED / "saved_model.pb")!r})
except ModelError:
    pass
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
assert not loaded, loaded
assert "tensorboard.compat.proto.meta_graph_pb2" in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_import_is_lazy():
    """Importing loader.model_check does not import protobuf: only a check does."""
    code = """
import sys
import loader.model_check
assert not any(m.startswith(("google.protobuf", "tensorboard")) for m in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- the manifest ---------------------------------------------------------------------------


def _flip(file: Path, pos: int) -> None:
    data = bytearray(file.read_bytes())
    data[pos] ^= 0x01
    file.write_bytes(bytes(data))


def _corrupt(path: Path, pattern: str) -> str:
    message = _refused(path, rf"^corrupt model at {re.escape(str(path))}: {pattern}")
    assert message.endswith(
        f"since {MANIFEST_FILE} was written (damaged, or modified after export: re-export the "
        f"model, or run mlsched-verify {path})"
    ), message
    return message


@pytest.mark.parametrize("model", [BUNDLED, DUMMY],
                         ids=lambda p: p.name)  # fmt: skip
def test_bundled_models_have_manifests(model):
    listed = json.loads((model / MANIFEST_FILE).read_text())
    assert listed["version"] == 1
    assert listed["files"] == file_digests(model)
    assert {FASTPATH_FILE, "saved_model.pb", "variables/variables.index"} <= set(listed["files"])
    assert check_model_dir(model).fastpath_ok


def test_every_file_is_covered(tmp_path, dummy):
    """A flipped bit anywhere in any file: refused, naming the file (the pb may fail to parse)."""
    files = sorted(file_digests(dummy))
    assert len(files) == 5 and MANIFEST_FILE not in files
    for i, rel in enumerate(files):
        size = (dummy / rel).stat().st_size
        for pos in sorted({0, size // 2, size - 1}):
            path = _copy(dummy, tmp_path / f"{i}-{pos}")
            _flip(path / rel, pos)
            if rel == "saved_model.pb":
                message = _refused(path, "^")
                assert message.startswith(("invalid SavedModel format", "corrupt model")), message
                if message.startswith("corrupt model"):
                    assert f": {rel} changed since" in message
            else:
                _corrupt(path, f"{re.escape(rel)} changed since")


@pytest.mark.parametrize("keep", [0, 100, -1])
def test_truncated_variables(tmp_path, dummy, keep):
    path = _copy(dummy, tmp_path / "m")
    data = path / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:keep])
    _corrupt(path, r"variables/variables\.data-00000-of-00001 changed since")


def test_corruption_tf_would_find_only_after_attach(tmp_path, tf, dummy):
    """What the manifest catches before attach, TF's restore catches only at load."""
    path = _copy(dummy, tmp_path / "m")
    _flip(path / "variables" / "variables.data-00000-of-00001", 10)
    _corrupt(path, "variables/variables")
    # Without the manifest, the fast path's digest would only send the model to TF...
    info = check_model_dir(path, manifest=False)
    assert info.fastpath_reason.startswith("fast-path weights are stale")
    with pytest.raises(Exception, match="[Cc]hecksum"):  # ...which fails after attach
        tf.saved_model.load(str(path))


@pytest.mark.parametrize(
    "victim", ["fingerprint.pb", FASTPATH_FILE], ids=["fingerprint", "fastpath"]
)
def test_listed_file_missing(tmp_path, dummy, victim):
    path = _copy(dummy, tmp_path / "m")
    (path / victim).unlink()
    _corrupt(path, f"{re.escape(victim)} missing since")


@pytest.mark.parametrize(
    "extra", ["variables/variables.data-00001-of-00002", "assets/vocab.txt", "notes"]
)
def test_unlisted_file(tmp_path, dummy, extra):
    path = _copy(dummy, tmp_path / "m")
    (path / extra).write_bytes(b"x")
    _corrupt(path, f"{re.escape(extra)} not listed since")


def test_several_problems_in_one_line(tmp_path, dummy):
    path = _copy(dummy, tmp_path / "m")
    (path / "fingerprint.pb").unlink()
    (path / "extra").write_bytes(b"")
    _flip(path / "variables" / "variables.index", 3)
    _corrupt(path, "variables/variables.index changed; fingerprint.pb missing; extra not listed")


def test_no_manifest(tmp_path, dummy):
    path = _copy(dummy, tmp_path / "m")
    (path / MANIFEST_FILE).unlink()
    _refused(
        path,
        rf"^{re.escape(str(path))}: no {MANIFEST_FILE}, so damaged files cannot be detected "
        rf"before attach \(run mlsched-verify {re.escape(str(path))}: ",
    )
    assert check_model_dir(path, manifest=False).fastpath_ok  # what the model tools check


@pytest.mark.parametrize(
    "content,pattern",
    [
        (b"{not json", r"unreadable \(JSONDecodeError; "),
        (b"[1, 2]", r"unreadable \(TypeError; "),
        (b'{"version": 1}', r"unreadable \(KeyError; "),
        (b'{"version": 1, "files": []}', r"unreadable \(TypeError; "),
        (b'{"version": 2, "files": {}}', r"is format v2, not v1 "),
        (b"\xff\xfe", r"unreadable \((JSONDecodeError|UnicodeDecodeError); "),
    ],
    ids=["garbage", "list", "no-files", "files-list", "v2", "binary"],
)
def test_damaged_manifest(tmp_path, dummy, content, pattern):
    path = _copy(dummy, tmp_path / "m")
    (path / MANIFEST_FILE).write_bytes(content)
    _refused(path, rf"^{re.escape(str(path))}: {MANIFEST_FILE} {pattern}")


def test_verify_model_writes_the_manifest(tmp_path, tanh_stack, caplog):
    """A SavedModel made without the tools: refused, until verify_model.py has vouched for it."""
    path = _copy(tanh_stack, tmp_path / "m")
    _refused(path, f"no {MANIFEST_FILE}")
    assert verify_model.main([str(path), "--nr-cpus-probe", "2", "--max-dom-cpus-probe", "1"]) == 0
    assert check_model_dir(path).fastpath_ok
    assert json.loads((path / MANIFEST_FILE).read_text())["files"] == file_digests(path)


def test_verify_model_does_not_bless_damaged_variables(tmp_path, dummy, caplog):
    """verify_model.py rewrites the manifest only for a model TensorFlow loads."""
    path = _copy(dummy, tmp_path / "m")
    _flip(path / "variables" / "variables.data-00000-of-00001", 10)
    assert verify_model.main([str(path), "--nr-cpus-probe", "2", "--max-dom-cpus-probe", "1"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"error: TensorFlow cannot load {path}: "), errors
    _corrupt(path, "variables/variables")  # the old manifest still stands


# --- the fast path --------------------------------------------------------------------------


def test_dummy_model(dummy):
    info = check_model_dir(dummy)
    assert (info.input_key, info.output_key) == ("features", "output_0")
    assert info.fastpath_ok and info.fastpath_reason == ""
    backend, reason = open_backend(info, "auto")
    assert isinstance(backend, NumpyModel) and backend.kind == contract.Backend.NUMPY
    assert reason == f"numpy: verified fast-path weights (digest {info.digest[:8]})"


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}cpus")
def test_fastpath_matches_tf_on_grid(dummy, grid):
    info = check_model_dir(dummy)
    tf_backend, reason = open_backend(info, "tf")
    assert isinstance(tf_backend, TFBackend) and reason == "tf: requested"
    x = schema.unpack_keys(schema.feature_grid(*grid))
    want = tf_backend.predict(x)
    got = NumpyModel.load(dummy).predict(x)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(x),)
    assert np.array_equal(want > contract.MIGRATE_THRESHOLD, got > contract.MIGRATE_THRESHOLD)
    assert np.max(np.abs(want - got)) <= MAX_ABS_DIFF


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}cpus")
def test_dummy_model_uses_both_decisions(dummy, grid):
    p = NumpyModel.load(dummy).predict(schema.unpack_keys(schema.feature_grid(*grid)))
    share = np.mean(p > contract.MIGRATE_THRESHOLD)
    assert 0.2 <= share <= 0.8


@pytest.mark.parametrize("path", ["fixture", "bundled"])
def test_dummy_is_the_contracts_network(dummy, path):
    """10 -> 64 relu -> 64 relu -> 1 sigmoid, fast path verified: the freshly made dummy and
    the one committed in tests/models/dummy (make it again with mlsched-dummy)."""
    model_dir = dummy if path == "fixture" else DUMMY
    info = check_model_dir(model_dir)
    assert info.fastpath_ok, info.fastpath_reason
    model = NumpyModel.load(model_dir)
    assert describe_stack(model) == "10 -> 64 relu -> 64 relu -> 1 sigmoid"
    for grid in GRIDS:
        p = model.predict(schema.unpack_keys(schema.feature_grid(*grid)))
        assert 0.2 <= np.mean(p > contract.MIGRATE_THRESHOLD) <= 0.8, grid


def test_dummy_hidden_option(tmp_path, tf):
    create_dummy_model.create(tmp_path / "m", seed=0, hidden=(16, 8))
    assert describe_stack(NumpyModel.load(tmp_path / "m")) == "10 -> 16 relu -> 8 relu -> 1 sigmoid"


def test_dummy_model_is_deterministic(tf):
    a, b = (create_dummy_model.build_model(seed=7) for _ in range(2))
    for model in (a, b):
        create_dummy_model.calibrate(model)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        assert np.array_equal(wa, wb)


def test_plain_stack_gets_verified(tmp_path, tanh_stack):
    path = _copy(tanh_stack, tmp_path / "m")
    info = check_model_dir(path, manifest=False)
    assert info.fastpath_reason.startswith("no verified fast-path weights")
    result = write_fastpath(path, nr_cpus_probe=4, max_dom_cpus_probe=2, nr_random=1000)
    assert result.written, result.message
    assert "relu" not in result.message and "tanh" in result.message
    write_manifest(path)
    assert check_model_dir(path).fastpath_ok


def test_not_dense_stack_refused(tmp_path, not_dense, dummy):
    path = _copy(not_dense, tmp_path / "m")
    # An old fast-path file (of another model) must not survive a refusal.
    shutil.copytree(dummy / "assets", path / "assets", dirs_exist_ok=True)
    result = write_fastpath(path, nr_cpus_probe=2, max_dom_cpus_probe=1, nr_random=100)
    assert not result.written
    assert result.message.startswith("not a plain Dense stack: op ")
    assert not (path / FASTPATH_FILE).exists()

    write_manifest(path)
    info = check_model_dir(path)
    assert not info.fastpath_ok
    backend, reason = open_backend(info, "auto")
    assert isinstance(backend, TFBackend) and backend.kind == contract.Backend.TF
    assert reason.startswith("tf: no verified fast-path weights (run mlsched-verify")
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

    # First line of defence: the manifest no longer matches, the model is refused.
    _corrupt(path, r".*(saved_model\.pb|variables\.data-00000-of-00001).* changed since")
    # Second: a manifest rewritten without re-verifying still leaves the weights unused.
    write_manifest(path)
    info = check_model_dir(path)
    assert not info.fastpath_ok
    assert info.fastpath_reason.startswith("fast-path weights are stale")
    backend, reason = open_backend(info, "auto")
    assert backend.kind == contract.Backend.TF and reason.startswith("tf: fast-path weights are")
    with pytest.raises(ModelError, match="stale"):
        open_backend(info, "numpy")
    with pytest.raises(ModelError, match="stale"):
        NumpyModel.load(path, verified=True)

    # Re-verifying fixes it, with the new weights.
    assert write_fastpath(path, nr_cpus_probe=2, max_dom_cpus_probe=1, nr_random=100).written
    write_manifest(path)
    info = check_model_dir(path)
    assert info.fastpath_ok
    x = schema.unpack_keys(schema.feature_grid(4, 2))
    old = NumpyModel.load(dummy).predict(x)
    new, want = open_backend(info)[0].predict(x), backend.predict(x)
    assert np.max(np.abs(new - want)) <= MAX_ABS_DIFF
    assert np.max(np.abs(new - old)) > 0.01  # it really is another model


def test_damaged_fastpath_file(tmp_path, dummy):
    path = _copy(dummy, tmp_path / "m")
    (path / FASTPATH_FILE).write_bytes(b"PK\x03\x04 garbage")
    _corrupt(path, f"{re.escape(FASTPATH_FILE)} changed since")  # the manifest covers it
    info = check_model_dir(path, manifest=False)  # and without it, only the fast path is lost
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
from loader import schema
info = check_model_dir({str(dummy)!r})
backend, reason = open_backend(info, "auto")
p = backend.predict(schema.unpack_keys(schema.feature_grid(2, 1)))
assert reason.startswith("numpy:"), reason
assert p.shape == (1088,), p.shape
loaded = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_bundled_model():
    """model_dir/model_path, committed with the repository, is valid, verified and trained,
    with its provenance; the dummy says it is untrained."""
    info = check_model_dir(BUNDLED)
    assert info.fastpath_ok, info.fastpath_reason
    assert "make train" in info.provenance and "UNTRAINED" not in info.provenance
    assert check_model_dir(DUMMY).provenance.startswith("UNTRAINED")
