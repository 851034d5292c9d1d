"""In-guest fixtures: a running mlsched-load and helpers to read its pinned maps.

These tests need a sched_ext kernel and root: they run inside the VM (`make vm-test`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loader import contract
from loader.scheduler import scx_ops_name, scx_state
from loader.stats import DEFAULT_PATH as STATS_SOCKET

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "model_dir" / "model_path"
TEST_MODELS = ROOT / "build" / "test-models"  # made by tests/vm/make_models.py
# Output that must survive the VM goes to the shared, writable directory.
LOG_DIR = Path(os.environ.get("MLSCHED_VM_OUT", ROOT / "build" / "vm-out"))

# Upper bounds so that a broken run fails instead of hanging; not performance targets.
ATTACH_WAIT_S = 60
# TensorFlow in the guest: 210 s from start to a TF model ready on a fresh machine (2026-12-02).
MODEL_WAIT_S = 480


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if scx_state() == "unsupported" or os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root on a sched_ext kernel: run `make vm-test`")
        for item in items:
            item.add_marker(skip)


def wait_for(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> float:
    """Poll pred() until true; returns the seconds it took; fails after timeout_s."""
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"mlsched-load exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def read_stats() -> dict[str, int]:
    """The kernel's counters and the loader's figures straight from the pinned maps, which
    answer even while the loader is stopped: Counter names, and "loader_" + LoaderStat names."""
    from loader import libbpf
    from loader.bpfmaps import PerCpuU64Array, U64Array

    fds = [libbpf.obj_get(os.path.join(contract.PIN_DIR, name))
           for name in (contract.MAP_COUNTERS, contract.MAP_LOADER_STATS)]
    try:
        counters = PerCpuU64Array(fds[0], contract.NR_COUNTERS).read_all()
        loader = U64Array(fds[1], contract.NR_LOADER_STATS).read_all()
    finally:
        for fd in fds:
            os.close(fd)
    return ({c.name.lower(): v for c, v in zip(contract.Counter, counters, strict=True)}
            | {"loader_" + s.name.lower(): v
               for s, v in zip(contract.LoaderStat, loader, strict=True)})


# The counters are read one key after another while the scheduler keeps counting, so two
# counters bumped by the same event can straddle a read: a sum that must equal another counter
# may be off by the few events that land inside a snapshot (each snapshot, each side).
COUNTER_SKEW = 4


def sums_match(parts: int, whole: int) -> bool:
    """parts == whole up to the events caught between the reads of two snapshots."""
    return abs(parts - whole) <= COUNTER_SKEW


def attached() -> bool:
    """mlsched is the running scheduler and its loader has pinned its maps."""
    return (
        scx_state() == "enabled"
        and scx_ops_name() == contract.SCHED_NAME
        and os.path.isdir(contract.PIN_DIR)
        and len(os.listdir(contract.PIN_DIR)) == len(contract.PINNED_MAPS)
    )


@dataclass
class Loader:
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        return read_stats()

    def wait_model_ready(self) -> None:
        wait_for(lambda: self.stats()["loader_model_ready"] == 1, MODEL_WAIT_S, "the model",
                 self.proc)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)


def start_loader(*extra: str, name: str = "loader") -> Loader:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    cmd = [sys.executable, "-m", "loader.main", "--model", str(MODEL), "--domains", "2", *extra]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return Loader(proc, log_path)


@contextlib.contextmanager
def running_loader(*extra: str, name: str = "loader") -> Iterator[Loader]:
    """A loader attached for the block; stopped (SIGINT) and its log printed after."""
    ld = start_loader(*extra, name=name)
    try:
        wait_for(attached, ATTACH_WAIT_S, "mlsched to attach", ld.proc)
        wait_for(lambda: os.path.exists(STATS_SOCKET), ATTACH_WAIT_S, "the stats socket",
                 ld.proc)
        yield ld
    finally:
        if ld.proc.poll() is None:
            ld.stop()
        print(f"--- {ld.log_path.name} ---\n{ld.log()}")


@pytest.fixture
def loader() -> Iterator[Loader]:
    with running_loader() as ld:
        yield ld


def stress(seconds: int, cpus: int = 2) -> subprocess.Popen:
    """A wakeup-heavy load: CPU hogs plus pipe ping-pong, so wakeups find no idle CPU."""
    return subprocess.Popen(
        ["stress-ng", "--temp-path", "/tmp", "--cpu", str(cpus), "--pipe", str(cpus),
         "--timeout", f"{seconds}s", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
