"""mlsched-load and mlsched-stats refuse bad input before anything is attached.

These run on the host, whose kernel has no sched_ext: every case here must be refused before
the loader reaches the attach step, with one line on stderr and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loader import contract

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "model_dir" / "model_path"


def run_loader(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "loader.main", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_refused(res: subprocess.CompletedProcess[str], status: int, pattern: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == status, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert pattern in lines[0]
    assert not os.path.exists(contract.PIN_DIR)


@pytest.fixture(autouse=True)
def no_pins_before() -> None:
    assert not os.path.exists(contract.PIN_DIR), "a loader seems to run on the host"


def test_help_has_examples() -> None:
    res = run_loader("--help")
    assert res.returncode == 0
    assert "examples:" in res.stdout and "--model" in res.stdout


def test_non_root_is_refused() -> None:
    res = run_loader("--model", str(BUNDLED), user=65534)
    assert_refused(res, 2, "must run as root")


def test_missing_model(tmp_path: Path) -> None:
    res = run_loader("--model", str(tmp_path / "nope"))
    assert_refused(res, 2, f"model not found at {tmp_path / 'nope'}")


def test_not_a_saved_model(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"\xff\xff not a protobuf")
    res = run_loader("--model", str(tmp_path))
    assert_refused(res, 2, "invalid SavedModel format")


def test_h5_file_as_model(tmp_path: Path) -> None:
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    res = run_loader("--model", str(h5))
    assert_refused(res, 2, "mlsched-transfer")


def test_wrong_input_shape(width5: Path) -> None:
    res = run_loader("--model", str(width5))
    assert_refused(res, 2, "expected input shape [?, 10], got [?, 5]")


def test_wrong_dtype(int32: Path) -> None:
    res = run_loader("--model", str(int32))
    assert_refused(res, 2, "expected float32 input")


@pytest.mark.parametrize("backend", ["auto", "numpy", "tf"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_variables(tmp_path: Path, backend: str, damage: str) -> None:
    """Caught through the manifest, whatever the backend, before attach."""
    model = tmp_path / "m"
    shutil.copytree(BUNDLED, model)
    data = model / "variables" / "variables.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    if damage == "truncate":
        del content[len(content) // 2 :]
    else:
        content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))
    res = run_loader("--model", str(model), "--backend", backend)
    assert_refused(res, 2, f"corrupt model at {model}: variables/variables.data-00000-of-00001 "
                           "changed since mlsched_manifest.json was written")


def test_model_without_manifest(tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(BUNDLED, model)
    (model / "mlsched_manifest.json").unlink()
    res = run_loader("--model", str(model))
    assert_refused(res, 2, f"{model}: no mlsched_manifest.json, so damaged files cannot be "
                           f"detected before attach (run mlsched-verify {model}")


@pytest.mark.parametrize("args,pattern", [
    (("--batch-size", "0"), "--batch-size: must be a positive integer"),
    (("--domains", "0"), "--domains: must be a positive integer"),
    (("--domains", "100000"), "--domains 100000: this machine has only"),
    (("--fallback", "sometimes"), "argument --fallback: invalid choice"),
    (("--ringbuf-size", "1000"), "--ringbuf-size: must be a power of two"),
])
def test_bad_arguments(args: tuple[str, ...], pattern: str) -> None:
    res = run_loader("--model", str(BUNDLED), *args)
    assert res.returncode == 2
    assert pattern in res.stderr
    assert "Traceback" not in res.stderr


def test_stats_when_nothing_attached() -> None:
    res = subprocess.run([sys.executable, "-m", "tools.stats", "--once"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == ("mlsched-stats: mlsched is not attached (no stats socket at "
                                  "/var/run/scx/root/stats); this kernel has no sched_ext")


@pytest.mark.parametrize("flag", [("--backend", "numpy"), ("--inference", "kernel")])
def test_fast_path_modes_refuse_a_model_without_verified_weights(tmp_path: Path,
                                                                 flag: tuple[str, str]) -> None:
    """Both run the fast-path weights: without a verified stamp they would run no model or
    another model's weights, so the run is refused before attach."""
    from loader.model_check import FASTPATH_FILE, MANIFEST_FILE, file_digests

    model = tmp_path / "model"
    shutil.copytree(BUNDLED, model)
    (model / FASTPATH_FILE).unlink()
    manifest = {"version": 1, "files": file_digests(model)}
    (model / MANIFEST_FILE).write_text(json.dumps(manifest))
    res = run_loader("--check", "--model", str(model))  # tf would serve it
    assert f"mlsched-load: ok: model {model} (digest " in res.stdout
    assert res.returncode == 1  # only for this kernel's lack of sched_ext
    res = run_loader("--check", "--model", str(model), *flag)
    assert res.returncode == 2
    assert f"mlsched-load: fail: {flag[0]} {flag[1]}: no verified fast-path weights" in res.stdout
