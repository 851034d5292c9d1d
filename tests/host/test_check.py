"""`mlsched-load --check` predicts a run: one line per finding, non-zero when a run would fail.

The real command on this host, whose kernel has no sched_ext: a run would fail here, so every
check says so, whatever else it finds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from loader.check import kernel_version
from tests.host.test_cli import BUNDLED, run_loader

host = pytest.mark.skipif(os.path.exists("/sys/kernel/sched_ext"),
                          reason="a case of a kernel without sched_ext")
NO_SCHED_EXT = ("mlsched-load: fail: sched_ext: this kernel has no sched_ext "
                "(CONFIG_SCHED_CLASS_EXT); see README: VM")
NO_TF = "mlsched-load: fail: TensorFlow is not installed"


def findings(res: subprocess.CompletedProcess[str]) -> list[str]:
    """The report's lines, each one finding with its verdict; nothing else on stdout."""
    lines = res.stdout.splitlines()
    assert "Traceback" not in res.stdout + res.stderr
    verdicts = ("ok", "fail", "skip", "not tried")
    assert all(any(line.startswith(f"mlsched-load: {v}: ") for v in verdicts) for line in lines)
    return lines


@pytest.fixture
def without_tensorflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses in which `tensorflow` cannot be imported (or found), as if not installed."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['tensorflow'] = None\n")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), path])))


@host
def test_check_says_sched_ext_is_missing() -> None:
    res = run_loader("--check", "--model", str(BUNDLED))
    lines = findings(res)
    assert res.returncode == 1, res.stdout + res.stderr
    assert NO_SCHED_EXT in lines
    # What does not depend on the kernel is still checked: the model and the object file.
    assert any(line.startswith(f"mlsched-load: ok: model {BUNDLED} ") for line in lines)
    assert any(line.startswith("mlsched-load: not tried: loading BPF object ") for line in lines)


@host
def test_tf_backend_without_tensorflow(without_tensorflow: None) -> None:
    res = run_loader("--check", "--model", str(BUNDLED), "--backend", "tf")
    lines = findings(res)
    assert res.returncode == 2, res.stdout + res.stderr
    assert sum(line.startswith(NO_TF) for line in lines) == 1, lines
    # The verified numpy fast path needs no TensorFlow: nothing to complain about then.
    res = run_loader("--check", "--model", str(BUNDLED), "--backend", "auto")
    assert res.returncode == 1 and not any("TensorFlow" in line for line in findings(res))


@host
def test_tf_backend_with_tensorflow() -> None:
    """The counterpart of the case above: this venv has TensorFlow, and the check finds it."""
    res = run_loader("--check", "--model", str(BUNDLED), "--backend", "tf")
    assert "mlsched-load: ok: TensorFlow found (the tf backend needs it)" in findings(res)
    assert res.returncode == 1


@host
def test_no_model_does_not_check_the_model(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "saved_model.pb").write_bytes(b"\xff\xff not a protobuf")
    res = run_loader("--check", "--no-model", "--model", str(bad))
    lines = findings(res)
    assert res.returncode == 1, res.stdout + res.stderr  # the kernel's finding only
    assert not any("model" in line and "fail" in line for line in lines), lines
    assert any(line.startswith("mlsched-load: skip: model: --no-model") for line in lines)
    # Without --no-model the same directory is refused (the check is not simply broken).
    res = run_loader("--check", "--model", str(bad))
    assert res.returncode == 2 and "invalid SavedModel format" in res.stdout


@host
@pytest.mark.parametrize("args", [(), ("--no-model", "--model", "/nonexistent"),
                                  ("--model", "/nonexistent"), ("--domains", "100000")])
def test_check_and_run_agree(args: tuple[str, ...]) -> None:
    """The exit status --check predicts is the run's (as root: the run refuses before attach)."""
    check = run_loader("--check", *args)
    run = run_loader(*args)
    assert check.returncode == run.returncode != 0, check.stdout + run.stderr


@pytest.mark.parametrize("release,verdict", [
    ("6.18.44-fc-v1300", "fail"), ("6.12.48+deb13-cloud-amd64", "fail"), ("not-a-version", "fail"),
    ("6.19.14+deb13-cloud-amd64", "ok"), ("7.3.4+deb13-cloud-amd64", "ok"), ("7.10.1", "ok"),
    ("7.2.12+deb13-cloud-amd64", "fail"),
])
def test_kernel_version_against_the_supported_range(release: str, verdict: str) -> None:
    found = kernel_version(release)
    assert found.verdict == verdict and (found.status != 0) == (verdict == "fail")
    assert ("untested series" in found.text) == (release == "7.10.1")
