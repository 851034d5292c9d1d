"""The model tools: the dataset formats, model_export.py (labels, imitation, policy),
transfer.py (with --features and --output-map), and tools/bench_model.py.

Real TensorFlow and Keras, small models in temp dirs; no mocks. The Keras 2 files under
tests/host/data were written by tf_keras (see make_keras2_h5.py there).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from loader import contract, kernel_mlp, schema
from loader.backends import DenseLayer, NumpyModel, TFBackend, open_backend
from loader.model_check import FASTPATH_FILE, ModelError, check_model_dir
from model_dir import dataset, fallback, model_export, synthetic, transfer
from model_dir.architecture import describe_stack
from model_dir.export_verified import made_by
from model_dir.fastpath_verify import MAX_ABS_DIFF
from tests.host.conftest import _copy

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
KERAS2_DENSE = DATA / "keras2_dense.h5"
KERAS2_LAMBDA = DATA / "keras2_lambda.h5"
GRIDS = [(2, 1), (8, 4)]


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    # A script's directory, not the repo, heads sys.path: PYTHONPATH makes it import this
    # checkout's packages even when another one is installed (editable) in the venv.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=env,
    )


def assert_refused(
    res: subprocess.CompletedProcess[str], pattern: str, after_tf: bool = False
) -> str:
    """Exit 2 and one line on stderr. after_tf: refused once TensorFlow was imported, whose C++
    side writes its own start-up lines to stderr first (absl, oneDNN): those are let through."""
    lines = res.stderr.strip().splitlines()
    if after_tf:
        lines = [ln for ln in lines if not ln.startswith(("WARNING: All log messages", "I0000"))]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]
    return lines[0]


# --- models, built once -------------------------------------------------------------------


def _keras3_model(kind: str, seed: int = 3):
    import keras

    keras.utils.set_random_seed(seed)
    if kind == "sequential":  # the Input gets Keras' own name, not `features`
        return keras.Sequential(
            [
                keras.Input(shape=(schema.NR_FEATURES,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
    inputs = keras.Input(shape=(schema.NR_FEATURES,), name="features")
    x = keras.layers.Dense(12, activation="relu")(inputs)
    x = keras.layers.Dense(6, activation="tanh")(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def _probe() -> np.ndarray:
    return schema.unpack_keys(schema.feature_grid(4, 2))


@pytest.fixture(scope="session")
def trained(models) -> Path:
    """model_export on synthetic data, small enough for a test run."""
    path = models / "trained"
    figures = model_export.run(path, None, epochs=20, seed=0, samples=12000)
    assert figures["val_accuracy"] >= 0.9
    return path


@pytest.fixture(scope="session")
def keras3_h5(models, tf) -> tuple[Path, np.ndarray]:
    """A Keras 3 .h5 Dense stack, and its own outputs on _probe()."""
    model = _keras3_model("functional")
    path = models / "keras3.h5"
    model.save(path)
    return path, model.predict(_probe(), verbose=0).ravel()


@pytest.fixture(scope="session")
def keras3_converted(models, keras3_h5) -> Path:
    transfer.transfer(keras3_h5[0], models / "keras3_out")
    return models / "keras3_out"


@pytest.fixture(scope="session")
def keras2_converted(models, tf) -> Path:
    transfer.transfer(KERAS2_DENSE, models / "keras2_out")
    return models / "keras2_out"


# --- the dataset format (no TensorFlow) ---------------------------------------------------


def test_dataset_columns_follow_the_candidate_record():
    """v1 is struct mlsched_candidate without its key, up to `source`, then the label."""
    names = [name for name, _ in contract.Candidate._fields_]
    record = names[1 : names.index("source") + 1]
    assert list(dataset.COLUMN_NAMES) == [*record, "label"]


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_dataset_roundtrip(tmp_path, suffix):
    data = model_export.synthetic_dataset(500, seed=4)
    data.columns["ts_ns"][0] = dataset.U64_MAX
    path = tmp_path / f"d{suffix}"
    dataset.write_dataset(path, data.columns, comments=("written by a test",))
    back = dataset.read_dataset(path)
    for name, dtype, _, _ in dataset.COLUMNS:
        assert back.columns[name].dtype == dtype
        assert np.array_equal(back.columns[name], data.columns[name]), name
    # The model sees what the loader computes from the kernel's key.
    c = back.columns
    keys = [
        schema.pack_key(
            *(int(c[k][i]) for k in ("cpu", "cpu_idle", "cpu_not_idle", "src_load_q", "dst_load_q"))
        )
        for i in range(len(back))
    ]
    x = back.features()
    assert np.array_equal(x, schema.unpack_keys(np.array(keys, np.uint64)))
    assert np.array_equal(x[:, 3], c["src_load_q"] / np.float32(schema.LOAD_SCALE))
    assert np.array_equal(x[:, 1], c["cpu_idle"].astype(np.float32))


ROW = "5,100,3,2,4,0,1,12,3,1,1,1"  # cpu 3, idle 2, busy 4, dom 0 -> 1, loads 12 -> 3


def _csv(row: str) -> str:
    return f"{dataset.HEADER}\n{row}"


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("", "empty file, expected the header ts_ns,pid,"),
        ("ts,pid\n" + ROW, ":1: header is 'ts,pid', expected"),
        (dataset.HEADER, "a header but no rows"),
        (_csv(ROW) + "\n5,100,3", ":3: 3 fields, expected 12"),
        (_csv(ROW[:-1] + "x"), ":2: label is 'x', not an integer"),
        (_csv(ROW.replace("12,3", "17,3")), ":2: src_load_q is 17, expected 0..16"),
        (_csv(ROW[:-1] + "2"), ":2: label is 2, expected 0..1"),
        (_csv(ROW.replace(",1,1,1", ",1,3,1")), ":2: source is 3, expected 0..2"),
        (_csv(ROW.replace("5,100,3,", "5,100,-1,")), ":2: cpu is -1, expected 0..511"),
        (_csv(ROW.replace("12,3", "3,12")), ":2: src_load_q 3 <= dst_load_q 12"),
        (_csv(ROW.replace(",0,1,12", ",1,1,12")), ":2: src_dom and dst_dom are both 1"),
        (f"# comment\n{dataset.HEADER}\n\n{ROW}\n{ROW}0", ":5: label is 10, expected 0..1"),
    ],
    ids=[
        "empty", "header", "no-rows", "short-row", "not-int", "load-range", "label", "source",
        "negative", "src-not-busier", "same-domain", "line-numbers-count-comments",
    ],
)  # fmt: skip
def test_dataset_malformed(tmp_path, text, pattern):
    _assert_refused(tmp_path, text, pattern)


def _assert_refused(tmp_path, text: str, pattern: str) -> None:
    """read_dataset refuses text with a one-line DatasetError that contains pattern."""
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(dataset.DatasetError) as exc:
        dataset.read_dataset(path)
    message = str(exc.value)
    assert "\n" not in message and pattern in message, message


def test_dataset_not_text(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(dataset.DatasetError, match="not a UTF-8 text file"):
        dataset.read_dataset(path)


# --- dataset format v2: the logging policy's propensities and the outcomes ------------------


def test_dataset_v2_extends_v1():
    assert dataset.COLUMN_NAMES_V2[: len(dataset.COLUMN_NAMES)] == dataset.COLUMN_NAMES
    assert dataset.COLUMN_NAMES_V2[len(dataset.COLUMN_NAMES):] == (
        "path", "explore_q", "fallback", "propensity_q", "window_ns", "delay_ns", "run_ns")


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_dataset_v2_roundtrip(tmp_path, suffix):
    data = synthetic.simulated_logged_dataset(600, seed=2)
    path = tmp_path / f"d{suffix}"
    dataset.write_dataset(path, data.columns, comments=("simulated",))
    assert path.name.endswith(suffix)
    back = dataset.read_dataset(path)
    assert back.version == 2
    for name in dataset.COLUMN_NAMES_V2:
        assert np.array_equal(back.columns[name], data.columns[name]), name
    p = back.propensities()
    explore = back.sources == contract.Source.EXPLORE
    chosen = back.heuristic()
    # P/2 + (1 - P) when the fallback chose the action taken, P/2 when not.
    big = 1 - 0.3 / 2
    assert np.allclose(p[back.actions == chosen], big, atol=1e-4)
    assert np.allclose(p[back.actions != chosen], 0.15, atol=1e-4)
    assert (back.actions[~explore] == chosen[~explore]).all()
    # The same rows written as v1 still read, without the v2 columns.
    v1 = tmp_path / "v1.csv"
    dataset.write_dataset(v1, data.columns, version=1)
    old = dataset.read_dataset(v1)
    assert old.version == 1 and set(old.columns) == set(dataset.COLUMN_NAMES)
    with pytest.raises(dataset.DatasetError, match="format v1 has no propensities"):
        old.propensities()


# cpu 3, idle 2, busy 4, dom 0 -> 1, loads 12 -> 3: the heuristic migrates. A coin flip (source
# 2) on a wakeup (path 0) that kept the task at P = 0.5: propensity 0.25 = 32768 / 131072.
ROW2 = "5,100,3,2,4,0,1,12,3,0,2,0,0,32768,2,32768,100000000,2000000,40000000"


def _csv2(row: str) -> str:
    return f"{dataset.HEADER_V2}\n{row}"


@pytest.mark.parametrize(
    "text,pattern",
    [
        (_csv2(ROW2.replace(",32768,1000", ",98304,1000")),
         ":2: propensity_q is 98304, but the logging policy (explore_q 32768, fallback 2, "
         "action 0) gives 32768"),
        (_csv2(ROW2.replace(",0,2,0,", ",0,1,0,").replace(",32768,1000", ",98304,1000")),
         ":2: source is the fallback, but its action 0 is not what fallback heuristic decides "
         "for these features (1)"),
        (_csv2(ROW2.replace(",32768,2,32768,", ",0,2,0,")),
         ":2: propensity_q is 0, expected 1..131072"),
        (_csv2(ROW2.replace(",32768,2,32768,", ",0,2,1,")),
         ":2: a coin-flip row, but explore_q is 0"),
        (_csv2(ROW2.replace(",32768,2,32768,", ",70000,2,32768,")),
         ":2: explore_q is 70000, expected 0..65536"),
        (_csv2(ROW) , ":2: 12 fields, expected 19 (v2)"),
        (f"{dataset.HEADER}\n{ROW2}", ":2: 19 fields, expected 12 (v1)"),
        (_csv2(ROW2.replace(",12,3,0,2,0,0,", ",3,12,0,2,0,0,")),
         ":2: src_load_q 3 <= dst_load_q 12"),
        (_csv2(ROW2.replace(",0,2,0,0,", ",0,2,0,2,")), ":2: path is 2, expected 0..1"),
        (_csv2(ROW2) + "\n" + ROW2.replace(",100000000,", ",0,"),
         ":3: window_ns is 0, expected 1..18446744073709551615"),
    ],
    ids=["propensity", "fallback-action", "zero-propensity", "coin-without-explore",
         "explore-range", "v1-row-v2-header", "v2-row-v1-header", "wakeup-src-not-busier",
         "path", "window"],
)  # fmt: skip
def test_dataset_v2_malformed(tmp_path, text, pattern):
    good = tmp_path / "good.csv"
    good.write_text(_csv2(ROW2))
    assert dataset.read_dataset(good).propensities().tolist() == [0.25]
    _assert_refused(tmp_path, text, pattern)


def test_dataset_v2_steal_rows(tmp_path):
    """A steal (path 1) may find its source no busier than its destination: accepted; the
    heuristic keeps it, so a fallback row keeps and its propensity follows."""
    path = tmp_path / "steal.csv"
    steal = ROW2.replace(",12,3,0,2,0,0,", ",3,12,0,1,0,1,").replace(",32768,2,32768,",
                                                                    ",32768,2,98304,")
    path.write_text(_csv2(steal))
    ds = dataset.read_dataset(path)
    assert ds.columns["path"].tolist() == [1] and ds.propensities().tolist() == [0.75]
    assert ds.heuristic().tolist() == [False]


# --- model_export.py ----------------------------------------------------------------------


def test_synthetic_labels_follow_the_rule():
    data = model_export.synthetic_dataset(4000, seed=1)
    x = data.features()
    gap = x[:, 3] - x[:, 4]
    want = ((x[:, 1] >= 1) & (gap >= 0.25)) | (gap >= 0.5)
    assert np.array_equal(data.labels.astype(bool), want)
    assert 0.3 <= data.labels.mean() <= 0.7  # both decisions, in comparable numbers
    assert (data.columns["src_load_q"] > data.columns["dst_load_q"]).all()


def test_model_export_synthetic(trained):
    info = check_model_dir(trained)
    assert info.input_key == contract.MODEL_INPUT_KEY and info.fastpath_ok
    backend, reason = open_backend(info, "auto")
    assert isinstance(backend, NumpyModel) and reason.startswith("numpy: verified")
    assert describe_stack(NumpyModel.load(trained)) == "10 -> 64 relu -> 64 relu -> 1 sigmoid"
    # It learned the rule, on the grid of a machine it never saw as such.
    x = schema.unpack_keys(schema.feature_grid(8, 4))
    agree = np.mean((backend.predict(x) > 0.5) == model_export.rule_from_features(x))
    assert agree >= 0.9


def test_model_export_prints_its_report(tmp_path, tf, caplog):
    data = tmp_path / "d.csv"
    dataset.write_dataset(data, model_export.synthetic_dataset(1500, seed=5).columns)
    out = tmp_path / "m"
    caplog.set_level(logging.INFO)
    args = ["--data", str(data), "--output", str(out), "--epochs", "2", "--seed", "1"]
    assert model_export.main(args) == 0
    text = caplog.text
    for expected in (
        f"dataset {data}: 1500 candidates",
        "training on 1200 candidates, validating on 300",
        "best epoch",
        "restored from its checkpoint",
        "validation accuracy: ",
        "confusion matrix (rows: label, columns: model):",
        "model vs the rule: differs on ",
        "the dataset's labels vs the rule: differ on 0 of 1500",
        "loader backend (auto): numpy: verified fast-path weights",
    ):
        assert expected in text, expected
    assert check_model_dir(out).fastpath_ok


def _write_csv(path: Path, labels: list[int]) -> Path:
    rows = [ROW[:-1] + str(label) for label in labels]
    path.write_text("\n".join([dataset.HEADER, *rows]) + "\n")
    return path


def test_model_export_refuses_bad_input(tmp_path):
    out = tmp_path / "m"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{dataset.HEADER}\n{ROW}\n{ROW[:-1]}2\n")
    assert_refused(
        run_tool("model_dir/model_export.py", "--data", str(bad), "--output", str(out)),
        f"{bad}:3: label is 2, expected 0..1",
    )
    missing = str(tmp_path / "no.csv")
    assert_refused(
        run_tool("model_dir/model_export.py", "--data", missing, "--output", str(out)),
        "dataset not found at",
    )
    one_label = _write_csv(tmp_path / "one.csv", [0] * 60)
    assert_refused(
        run_tool("model_dir/model_export.py", "--data", str(one_label), "--output", str(out)),
        "every row is labeled keep; training needs both labels",
    )
    few = _write_csv(tmp_path / "few.csv", [0, 1] * 5)
    assert_refused(
        run_tool("model_dir/model_export.py", "--data", str(few), "--output", str(out)),
        "10 rows, need at least 50",
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert_refused(
        run_tool("model_dir/model_export.py", "--output", str(tmp_path / "notes")),
        "notes exists and is not a SavedModel; not replacing it",
    )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert not out.exists()


def test_imitation_reaches_99_percent_on_held_out_keys(tmp_path, tf):
    """The heuristic learned from its own decisions: features, scaling and training are right."""
    out = tmp_path / "imitate"
    figures = model_export.run(out, None, epochs=20, seed=0, samples=12000, objective="imitate")
    assert figures["heldout_agreement"] >= 0.99
    # The same figure, recomputed here from the exported model as the loader runs it.
    keys = np.unique(model_export.synthetic_dataset(12000, 0).keys())
    _, held_out = model_export.split(len(keys), 0)
    x = schema.unpack_keys(keys[held_out])
    backend, _ = open_backend(check_model_dir(out), "auto")
    assert isinstance(backend, NumpyModel)
    assert describe_stack(NumpyModel.load(out)) == "10 -> 64 relu -> 64 relu -> 1 sigmoid"
    agree = np.mean((backend.predict(x) > 0.5) == fallback.heuristic_from_features(x))
    assert agree == pytest.approx(figures["heldout_agreement"]) and agree >= 0.99


def test_policy_objective_beats_the_heuristic_on_simulated_data(tmp_path, tf):
    """Trained on a simulated collection run, the learned policy's true cost is lower than the
    heuristic's on candidates of another run (the cost model is known: synthetic.py)."""
    out = tmp_path / "policy"
    figures = model_export.run(out, None, epochs=20, seed=0, samples=20000, objective="policy",
                               bootstrap=200)
    assert figures["true_cost"] < figures["true_cost_heuristic"] - 0.01
    other = synthetic.simulated_logged_dataset(20000, seed=99)
    backend, _ = open_backend(check_model_dir(out), "auto")
    learned = backend.predict(other.features()) > 0.5
    true_learned = synthetic.expected_cost(other.columns, learned).mean()
    true_heuristic = synthetic.expected_cost(other.columns, other.heuristic()).mean()
    true_best = synthetic.expected_cost(other.columns, synthetic.optimal_migrate(other.columns))
    assert true_best.mean() <= true_learned < true_heuristic - 0.01


def test_safe_policy_follows_its_table_and_beats_the_heuristic(tmp_path, tf, caplog):
    """--safe: the heuristic except where the simulated run's evidence is strong; the network
    follows that table exactly, keeps its fast path, and is truly cheaper on another run."""
    out, history = tmp_path / "safe", tmp_path / "h.json"
    caplog.set_level(logging.INFO)
    figures = model_export.run(out, None, epochs=40, seed=0, samples=20000, objective="policy",
                               bootstrap=200, safe=1.96, history=history)
    assert figures["table_agreement"] >= 0.99 and figures["deviations"] >= 1
    assert "the heuristic keeps: deviate" in caplog.text or "the heuristic migrates: deviate" \
        in caplog.text
    assert check_model_dir(out).fastpath_ok
    doc = json.loads(history.read_text())
    assert doc["safe"] == 1.96 and doc["deviations"]
    other = synthetic.simulated_logged_dataset(20000, seed=99)
    backend, _ = open_backend(check_model_dir(out), "auto")
    learned = backend.predict(other.features()) > 0.5
    true_learned = synthetic.expected_cost(other.columns, learned).mean()
    true_heuristic = synthetic.expected_cost(other.columns, other.heuristic()).mean()
    assert true_learned < true_heuristic


def test_safe_is_for_the_policy_objective(tmp_path):
    res = run_tool("model_dir/model_export.py", "--objective", "imitate", "--safe", "2",
                   "--output", str(tmp_path / "m"))
    assert res.returncode == 2 and "--safe is for --objective policy" in res.stderr


def test_policy_objective_cli_ips_and_history(tmp_path, tf, caplog):
    out, history = tmp_path / "m", tmp_path / "h.json"
    caplog.set_level(logging.INFO)
    args = ["--objective", "policy", "--estimator", "ips", "--samples", "3000", "--epochs", "2",
            "--hidden", "16,8", "--migrate-penalty", "0.1", "--output", str(out),
            "--history", str(history)]
    assert model_export.main(args) == 0
    for text in ("simulated collection run: 3000 candidates", "network: 10 -> 16 relu -> 8 relu",
                 "cost delay-per-run + 0.1 per migration", "IPS pseudo-costs",
                 "learned - heuristic (IPS): "):
        assert text in caplog.text, text
    doc = json.loads(history.read_text())
    assert doc["objective"] == "policy" and doc["estimator"] == "ips"
    assert len(doc["epochs"]) == 2 and "val_cost_ips" in doc["epochs"][0]
    assert describe_stack(NumpyModel.load(out)) == "10 -> 16 relu -> 8 relu -> 1 sigmoid"


def test_an_indifferent_model_gets_its_fast_path(tmp_path, tf, caplog):
    """A model whose logit is ~0 on many probe rows: float32 rounding would decide them, and
    numpy and TF would disagree; the export moves the boundary clear of every probe row."""
    model = model_export.build_model((4, 4))
    k0, b0 = model.get_layer("dense_0").get_weights()
    k0[:] = 0
    k0[0, 0] = 1.0  # unit 0 = relu(cpu)
    model.get_layer("dense_0").set_weights([k0, b0 * 0])
    k1, b1 = model.get_layer("dense_1").get_weights()
    model.get_layer("dense_1").set_weights([np.eye(4, dtype=k1.dtype), b1 * 0])
    k2, b2 = model.get_layer("dense_2").get_weights()
    k2[:] = 0
    k2[0, 0] = 1e-9  # logit = 1e-9 cpu - 3e-9: zero at cpu 3, within rounding everywhere
    model.get_layer("dense_2").set_weights([k2, b2 * 0 - 3e-9])
    caplog.set_level(logging.INFO)
    decide = model_export._export(model, tmp_path / "m", {
        "hidden": (4, 4), "provenance": made_by("test", "an indifferent model")})
    assert "output bias moved by" in caplog.text
    assert "fast path verified" in caplog.text
    assert check_model_dir(tmp_path / "m").fastpath_ok
    x = schema.unpack_keys(schema.feature_grid(8, 4))
    assert decide(x).all()  # the boundary went below every probe row's logit


def test_policy_objective_refuses_v1_data(tmp_path):
    data = tmp_path / "v1.csv"
    dataset.write_dataset(data, model_export.synthetic_dataset(200, seed=1).columns)
    res = run_tool("model_dir/model_export.py", "--objective", "policy", "--data", str(data),
                   "--output", str(tmp_path / "m"))
    assert_refused(res, "format v1 has no propensities and outcomes")
    res = run_tool("model_dir/model_export.py", "--hidden", "64,x")
    assert res.returncode == 2 and "--hidden" in res.stderr and "Traceback" not in res.stderr


# --- transfer.py --------------------------------------------------------------------------


def _assert_same_model(path: Path, want: np.ndarray) -> None:
    got = TFBackend(path).predict(_probe())
    assert np.max(np.abs(got - want)) <= 1e-6


def test_transfer_keras3_h5(keras3_h5, keras3_converted):
    info = check_model_dir(keras3_converted)
    assert info.input_key == "features" and info.fastpath_ok
    assert isinstance(open_backend(info, "auto")[0], NumpyModel)
    _assert_same_model(keras3_converted, keras3_h5[1])


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_transfer_renames_the_input(tmp_path, tf, suffix):
    """A Sequential model's Input is not called `features`: the export's key still is."""
    model = _keras3_model("sequential")
    assert model.inputs[0].name != "features"
    src = tmp_path / f"seq{suffix}"
    model.save(src)
    assert transfer.main(["--input", str(src), "--output", str(tmp_path / "m")]) == 0
    info = check_model_dir(tmp_path / "m")
    assert info.input_key == "features" and info.fastpath_ok
    _assert_same_model(tmp_path / "m", model.predict(_probe(), verbose=0).ravel())


def test_transfer_keras2_h5(keras2_converted):
    """A file written by Keras 2 (tf_keras 2.21), converted by Keras 3."""
    with h5py.File(KERAS2_DENSE, "r") as f:
        assert f.attrs["keras_version"].startswith("2.")
        x, want = np.asarray(f.attrs["probe_x"]), np.asarray(f.attrs["probe_y"]).ravel()
    info = check_model_dir(keras2_converted)
    assert info.input_key == "features" and info.fastpath_ok  # it was `dense_input`
    want_stack = "10 -> 8 relu -> 4 tanh -> 1 sigmoid"
    assert describe_stack(NumpyModel.load(keras2_converted)) == want_stack
    for backend in (TFBackend(keras2_converted), NumpyModel.load(keras2_converted, verified=True)):
        assert np.max(np.abs(backend.predict(x) - want)) <= 1e-6  # tf_keras' own outputs


def _lambda_model(marker: Path, monkeypatch: pytest.MonkeyPatch):
    """A model whose Lambda creates marker whenever its code runs (building it included)."""
    import keras

    monkeypatch.setenv("MLSCHED_TEST_MARKER", str(marker))
    inputs = keras.Input(shape=(schema.NR_FEATURES,), name="features")
    # Loaded back, the lambda runs with Keras' globals: it reaches nothing of ours.
    x = keras.layers.Lambda(
        lambda t: (open(__import__("os").environ["MLSCHED_TEST_MARKER"], "w").close(), t)[1]
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    marker.unlink()
    return model


def _custom_layer_model():
    import keras

    @keras.saving.register_keras_serializable(package="mlsched_test")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name="features")
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(Twice()(inputs)))


def _custom_activation_model():
    import keras

    def cube(x):
        return x * x * x

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name="features")
    return keras.Model(inputs, keras.layers.Dense(1, activation=cube)(inputs))


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("lambda.h5", "a Lambda layer"),
        ("lambda.keras", "a Lambda layer"),
        ("keras2-lambda.h5", "a Lambda layer 'doubled'"),
        ("custom-layer.h5", "a custom object mlsched_test>Twice"),
        ("custom-activation.keras", "a Python function 'cube'"),
    ],
)
def test_transfer_refuses_code(tmp_path, tf, monkeypatch, kind, pattern):
    marker = tmp_path / "code-ran"
    src = tmp_path / kind
    if kind.startswith("keras2"):
        shutil.copy(KERAS2_LAMBDA, src)
    elif kind.startswith("lambda"):
        _lambda_model(marker, monkeypatch).save(src)
    elif kind.startswith("custom-layer"):
        _custom_layer_model().save(src)
    else:
        _custom_activation_model().save(src)
    out = tmp_path / "m"
    with pytest.raises(ModelError) as exc:
        transfer.transfer(src, out)
    message = str(exc.value)
    assert "\n" not in message
    assert f"{src}: refused: it holds {pattern}" in message
    assert "which would run code from the model file" in message
    assert not out.exists() and not marker.exists()


def test_keras_safe_mode_refuses_lambda_too(tmp_path, tf, monkeypatch):
    """Without our scan, Keras' safe mode alone refuses it; unsafe, its code really runs."""
    import keras

    marker = tmp_path / "code-ran"
    src = tmp_path / "lambda.h5"
    _lambda_model(marker, monkeypatch).save(src)
    with pytest.raises(ModelError, match=r"Keras refused it in safe mode: .*Lambda"):
        transfer.load_safely(src)
    assert not marker.exists()
    keras.models.load_model(src, compile=False, safe_mode=False)  # our own file: harmless
    assert marker.exists()


def test_transfer_refusals_cli(tmp_path):
    """Refused before TensorFlow is imported: one line, exit 2, nothing written."""
    out = tmp_path / "m"
    text = tmp_path / "text.h5"
    text.write_text("not HDF5")
    weights = tmp_path / "weights.h5"
    with h5py.File(weights, "w") as f:
        f.create_dataset("dense/kernel", data=np.zeros((10, 1), np.float32))
    bad_zip = tmp_path / "m.keras"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("model.weights.h5", b"")
    cases = [
        (tmp_path / "nope.h5", "input not found at"),
        (text, "text.h5: not an HDF5 file"),
        (weights, "holds no model config (a weights-only file?)"),
        (bad_zip, "not a .keras archive with a config.json"),
        (tmp_path / "saved_model.pb", "expected a Keras file (.h5, .hdf5, .keras)"),
        (KERAS2_LAMBDA, "refused: it holds a Lambda layer 'doubled'"),
    ]
    (tmp_path / "saved_model.pb").write_bytes(b"x")
    for src, pattern in cases:
        res = run_tool("model_dir/transfer.py", "--input", str(src), "--output", str(out))
        assert_refused(res, pattern)
    assert not out.exists()


def _contract_breaker(kind: str):
    import keras

    dtype = "int32" if kind == "int32" else "float32"
    width = 5 if kind == "width5" else schema.NR_FEATURES
    inputs = keras.Input(shape=(width,), name="features", dtype=dtype)
    x = keras.layers.Dense(4, activation="relu")(inputs)
    if kind == "two-outputs":
        outs = [keras.layers.Dense(1, activation="sigmoid")(x), keras.layers.Dense(1)(x)]
        return keras.Model(inputs, outs)
    units = 2 if kind == "output2" else 1
    return keras.Model(inputs, keras.layers.Dense(units, activation="sigmoid")(x))


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("width5", "its input is [?, 5], the contract's is [?, 10]: say which contract feature "
         "each of its 5 inputs is with --features NAME,..."),
        ("int32", "expected float32 input, got int32"),
        ("output2", "expected output shape [?, 1], got [?, 2]"),
        ("two-outputs", "expected 1 input and 1 output, got 1 and 2"),
    ],
)
def test_transfer_contract_failures(tmp_path, tf, kind, pattern):
    """check_model_dir's refusal reaches the user, about DIR, and nothing is left behind."""
    src = tmp_path / "bad.h5"
    _contract_breaker(kind).save(src)
    out = tmp_path / "out" / "m"
    with pytest.raises(ModelError) as exc:
        transfer.transfer(src, out)
    assert str(exc.value).startswith(f"{src if kind == 'width5' else out}: {pattern}")
    scratch = tmp_path / "out"  # width5 is refused before any export: not even created
    assert not scratch.exists() or list(scratch.iterdir()) == []  # no model, no scratch dir


def test_transfer_replaces_only_a_model(tmp_path, keras3_h5, dummy):
    out = _copy(dummy, tmp_path / "m")
    old = check_model_dir(out).digest
    assert transfer.main(["--input", str(keras3_h5[0]), "--output", str(out)]) == 0
    info = check_model_dir(out)
    assert info.digest != old and info.fastpath_ok
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_non_dense_model_falls_back_to_tf(tmp_path, tf):
    """A model with a swish layer converts, gets no fast path, and `auto` picks TF."""
    import keras

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name="features")
    x = keras.layers.Dense(8, activation="swish")(inputs)
    src = tmp_path / "swish.h5"
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)).save(src)
    out = tmp_path / "m"
    info, result = transfer.transfer(src, out)
    assert not result.written and result.message.startswith("not a plain Dense stack: op ")
    assert not (out / FASTPATH_FILE).exists() and not info.fastpath_ok
    backend, reason = open_backend(check_model_dir(out), "auto")
    assert isinstance(backend, TFBackend) and reason.startswith("tf: no verified fast-path")
    assert transfer.main(["--input", str(src), "--output", str(out), "--strict"]) == 1


# --- transfer.py: models from elsewhere (--features, --output-map) ----------------------------

LINEAR4_FEATURES = "cpu_idle,cpu_not_idle,src_dom_load,dst_dom_load"


@pytest.fixture(scope="session")
def linear4_h5(models, tf) -> Path:
    """The research lineage's shape: [?, 4] -> Dense 10 relu -> Dense 1 linear, a 0/1 regression
    of the heuristic's decisions (so that its outputs straddle 0.5)."""
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input(shape=(4,)),
        keras.layers.Dense(10, activation="relu", name="hidden"),
        keras.layers.Dense(1, name="regression"),
    ])
    x = schema.unpack_keys(schema.feature_grid(4, 2))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x[:, 1:5], fallback.heuristic_from_features(x).astype(np.float32), epochs=5,
              batch_size=128, verbose=0)
    path = models / "linear4.h5"
    model.save(path)
    return path


def _linear4_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """The .h5 model's own linear outputs on contract inputs, columns picked by hand."""
    import keras

    model = keras.models.load_model(path, compile=False)
    return model.predict(x[:, [1, 2, 3, 4]], verbose=0).ravel()


def test_transfer_maps_a_4_input_linear_model(tmp_path, linear4_h5, caplog):
    out = tmp_path / "m"
    caplog.set_level(logging.INFO)
    args = ["--input", str(linear4_h5), "--output", str(out), "--features", LINEAR4_FEATURES,
            "--output-map", "threshold"]
    assert transfer.main(args) == 0
    for text in ("inputs: its 4 inputs get the contract features 0 <- cpu_idle, 1 <- "
                 "cpu_not_idle, 2 <- src_dom_load, 3 <- dst_dom_load",
                 "unused: cpu, reserved0, reserved1, reserved2, reserved3, reserved4",
                 "output: layer 'regression' is linear; appended sigmoid(16 (y - 0.5)), > 0.5 "
                 "exactly when y > 0.5",
                 "inputs: folded into its first layer 'hidden': kernel [4, 10] -> [10, 10]",
                 "fast path verified: 10 -> 10 relu -> 1 linear -> 1 sigmoid"):
        assert text in caplog.text, text
    info = check_model_dir(out)  # what mlsched-load checks before attaching
    assert info.input_key == "features" and info.fastpath_ok
    backend, reason = open_backend(info, "auto")
    assert isinstance(backend, NumpyModel), reason  # a Dense stack: the fast path runs it
    for grid in GRIDS + [(32, 8)]:
        x = schema.unpack_keys(schema.feature_grid(*grid))
        want_tf = TFBackend(out).predict(x)
        got = backend.predict(x)
        assert np.max(np.abs(want_tf - got)) <= MAX_ABS_DIFF
        assert np.array_equal(want_tf > 0.5, got > 0.5)
        # And the decisions are the original model's: migrate exactly when y > 0.5.
        assert np.array_equal(got > 0.5, _linear4_outputs(linear4_h5, x) > 0.5)
    decided = backend.predict(schema.unpack_keys(schema.feature_grid(4, 2))) > 0.5
    assert 0 < decided.mean() < 1  # both decisions: the test can tell a wrong mapping
    # Three Dense layers of <= 64 units: --inference kernel can run it too.
    q = kernel_mlp.QuantizedMlp(NumpyModel.load(out))
    keys = schema.feature_grid(8, 4)
    assert kernel_mlp.agreement(q, NumpyModel.load(out), keys) >= kernel_mlp.MIN_AGREEMENT


def test_transfer_selection_layer_for_a_functional_model(tmp_path, tf):
    """Not a Sequential: the selection is a layer of its own in front, same decisions."""
    import keras

    keras.utils.set_random_seed(6)
    inputs = keras.Input(shape=(2,), name="loads")
    out = keras.layers.Dense(1, name="logit")(keras.layers.Dense(4, activation="relu")(inputs))
    src = tmp_path / "f.keras"
    keras.Model(inputs, out).save(src)
    dst = tmp_path / "m"
    transfer.transfer(src, dst, ("src_dom_load", "dst_dom_load"), "sigmoid")
    assert describe_stack(NumpyModel.load(dst)) == (
        "10 -> 2 linear -> 4 relu -> 1 linear -> 1 sigmoid")
    x = schema.unpack_keys(schema.feature_grid(4, 2))
    model = keras.models.load_model(src, compile=False)
    y = model.predict(x[:, 3:5], verbose=0).ravel()
    got = NumpyModel.load(dst, verified=True).predict(x)
    assert np.max(np.abs(got - 1 / (1 + np.exp(-y)))) <= 1e-5


def test_threshold_map_is_exact_at_the_threshold(tf):
    """sigmoid(16 (y - 0.5)) > 0.5 for the smallest float32 above 0.5, not for 0.5 itself."""
    import keras

    kernel, bias = transfer.output_map_weights("threshold")
    layer = keras.layers.Dense(1, activation="sigmoid")
    y = np.array([[0.5], [np.nextafter(np.float32(0.5), np.float32(1))],
                  [np.nextafter(np.float32(0.5), np.float32(0))], [0.9], [-3.0], [7.0]],
                 np.float32)
    layer(y)
    layer.set_weights([kernel, bias])
    got_tf = np.asarray(layer(y)).ravel()
    got_np = NumpyModel([DenseLayer(kernel, bias, "sigmoid")]).predict(y)
    want = (y > 0.5).ravel()
    assert np.array_equal(got_tf > 0.5, want) and np.array_equal(got_np > 0.5, want)


def test_transfer_sigmoid_map(tmp_path, linear4_h5):
    out = tmp_path / "m"
    transfer.transfer(linear4_h5, out, tuple(LINEAR4_FEATURES.split(",")), "sigmoid")
    x = schema.unpack_keys(schema.feature_grid(4, 2))
    got = NumpyModel.load(out, verified=True).predict(x)
    y = _linear4_outputs(linear4_h5, x)
    assert np.max(np.abs(got - 1 / (1 + np.exp(-y)))) <= 1e-5  # sigmoid(y): y is a logit


@pytest.mark.parametrize(
    "args,pattern",
    [
        ([], "its input is [?, 4], the contract's is [?, 10]: say which contract feature each "
         "of its 4 inputs is with --features NAME,..."),
        (["--features", "cpu_idle,cpu_not_idle,src_dom_load"],
         "--features names 3 inputs, but the model's input is [?, 4]"),
        (["--features", LINEAR4_FEATURES],
         "its output layer 'regression' is linear, not a sigmoid: say how its output y maps to "
         "migrate with --output-map threshold"),
    ],
    ids=["no-features", "wrong-count", "no-output-map"],
)
def test_transfer_mapping_refusals(tmp_path, linear4_h5, args, pattern):
    out = tmp_path / "m"
    res = run_tool("model_dir/transfer.py", "--input", str(linear4_h5), "--output", str(out),
                   *args)
    assert_refused(res, f"{linear4_h5}: {pattern}", after_tf=True)
    assert not out.exists()


def test_transfer_features_argument_errors(tmp_path, keras3_h5):
    for value, text in (("cpu_idle,bogus", "unknown feature 'bogus'; the contract's are cpu,"),
                        ("cpu_idle,cpu_idle", "cpu_idle named twice")):
        res = run_tool("model_dir/transfer.py", "--input", "x.h5", "--output",
                       str(tmp_path / "m"), "--features", value)
        assert res.returncode == 2 and text in res.stderr and "Traceback" not in res.stderr
    # A sigmoid model: --output-map sigmoid would squash twice; threshold changes nothing.
    with pytest.raises(ModelError, match="already a sigmoid; --output-map sigmoid would squash"):
        transfer.transfer(keras3_h5[0], tmp_path / "m", None, "sigmoid")
    transfer.transfer(keras3_h5[0], tmp_path / "m", None, "threshold")
    _assert_same_model(tmp_path / "m", keras3_h5[1])


# --- TF and numpy agree on every key of the grid --------------------------------------------


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}cpus")
@pytest.mark.parametrize("model", ["trained", "keras3_converted", "keras2_converted"])
def test_backends_agree_on_grid(request, model, grid):
    path = request.getfixturevalue(model)
    info = check_model_dir(path)
    x = schema.unpack_keys(schema.feature_grid(*grid))
    want = open_backend(info, "tf")[0].predict(x)
    got = open_backend(info, "numpy")[0].predict(x)
    assert np.array_equal(want > contract.MIGRATE_THRESHOLD, got > contract.MIGRATE_THRESHOLD)
    assert np.max(np.abs(want - got)) <= MAX_ABS_DIFF


# --- command lines and the benchmark ------------------------------------------------------


@pytest.mark.parametrize(
    "script", ["model_dir/model_export.py", "model_dir/transfer.py", "tools/bench_model.py",
               "model_dir/create_dummy_model.py", "tools/evaluate.py"]
)
def test_help_has_examples(script):
    res = run_tool(script, "--help")
    assert res.returncode == 0 and "examples:" in res.stdout


def test_bench_runs(tmp_path, dummy):
    """A tiny run of the numpy backend: the table, the JSON, and no TensorFlow in the child."""
    out = tmp_path / "bench.json"
    res = run_tool(
        "tools/bench_model.py", "--model", str(dummy), "--backends", "numpy", "--batches",
        "1,8", "--seconds", "0.02", "--grid", "2x1", "--cpu", "-1", "--json", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "decisions/s" in res.stdout and "numpy backend RSS <= 64 MB" in res.stdout
    summary = json.loads(out.read_text())
    numpy_result = summary["backends"]["numpy"]
    assert set(numpy_result["batches"]) == {"1", "8"}
    assert numpy_result["tensorflow_imported"] is False
    assert numpy_result["rss_mb"] > 0 and numpy_result["load_ms"] > 0
    res = run_tool("tools/bench_model.py", "--batches", "0")
    assert res.returncode == 2 and "batch sizes must be >= 1" in res.stderr
