"""Installable: `make install` into a fresh prefix (a virtualenv of its own, `pip install .`),
then the console scripts from `/`, the bundled model found and checked as package data, and
the service unit verified by systemd-analyze.

The tree is copied first (the files git tracks, plus the BPF object `make bpf` built), so the
install sees exactly what a checkout holds and writes nothing into this one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILT = ("bpf/mlsched.bpf.o", "bpf/mlsched.bpf.enums", "bpf/vmlinux.h")  # make bpf's outputs
INSTALL_TIMEOUT_S = 900  # pip resolving tensorboard and numpy: an upper bound, not a target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in [r for r in tracked if r] + list(BUILT):
        if not (REPO / rel).is_file():
            pytest.fail(f"{rel} missing: run `make bpf`")
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)  # mtimes kept: make sees the object up to date
    prefix = root / "prefix"
    res = subprocess.run(
        ["make", "-C", str(src), "install", f"PREFIX={prefix}", f"UNITDIR={root / 'unit'}",
         f"DEFAULTS={root / 'default' / 'mlsched'}"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.rmtree(src)  # nothing may need the source tree any more
    return root


def run(installed: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(installed / "prefix" / "bin" / cmd[0]), *cmd[1:]], cwd="/",
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("cmd", ["mlsched-load", "mlsched-stats", "mlsched-collect",
                                 "mlsched-evaluate"])
def test_console_scripts_from_root(installed: Path, cmd: str) -> None:
    res = run(installed, cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert "examples:" in res.stdout


def test_the_bundled_model_and_object_are_package_data(installed: Path) -> None:
    res = run(installed, "mlsched-load", "--check")
    site = installed / "prefix" / "lib" / "mlsched" / "lib"
    lines = res.stdout.splitlines()
    model = next((line for line in lines if line.startswith("mlsched-load: ok: model ")), "")
    assert model.startswith(f"mlsched-load: ok: model {site}/"), res.stdout + res.stderr
    assert "/site-packages/loader/model (digest" in model and "numpy fast path" in model
    # The object opens and its .enums list is there (a load needs a sched_ext kernel).
    obj = [line for line in lines if "BPF object" in line]
    assert len(obj) == 1 and ": fail: " not in obj[0], res.stdout
    assert "/site-packages/loader/bpf/mlsched.bpf.o " in obj[0]
    help_text = "".join(run(installed, "mlsched-load", "--help").stdout.split())
    assert "site-packages/loader/model" in help_text  # the defaults point at the package


def test_installed_without_tensorflow(installed: Path) -> None:
    py = installed / "prefix" / "lib" / "mlsched" / "bin" / "python"
    res = subprocess.run([str(py), "-c", "import importlib.util as u; "
                          "print(u.find_spec('tensorflow') is None)"],
                         cwd="/", capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "True"


def test_defaults_file_and_unit(installed: Path) -> None:
    defaults = (installed / "default" / "mlsched").read_text()
    assert 'MLSCHED_FLAGS=""' in defaults
    unit = (installed / "unit" / "mlsched.service").read_text()
    assert f"ExecStart={installed / 'prefix' / 'bin'}/mlsched-load $MLSCHED_FLAGS" in unit
    for line in ("ConditionPathIsDirectory=/sys/kernel/sched_ext", "Restart=on-failure",
                 "KillSignal=SIGINT", "EnvironmentFile=-/etc/default/mlsched"):
        assert line in unit.splitlines(), line


def test_systemd_analyze_verifies_the_unit(installed: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    res = subprocess.run([tool, "verify", str(installed / "unit" / "mlsched.service")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mlsched.service" not in res.stderr, res.stderr  # no complaint about the unit
