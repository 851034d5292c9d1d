"""mlsched-collect on a real sched_ext kernel: a short run under load gives a labeled dataset.

Training on such a dataset needs TensorFlow, which takes 72 s to import in the TCG guest, so it
is checked on the host instead (tests/host/test_collect.py trains on
tests/host/data/collect-vm.csv.gz, a dataset captured from this very collection run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from loader import contract
from loader.scheduler import scx_state
from model_dir.dataset import read_dataset
from tests.vm.conftest import LOG_DIR, ROOT, attached, read_stats, wait_for
from tools.outcomes import read_outcomes

COLLECT_S = 20
DELAYACCT = Path("/proc/sys/kernel/task_delayacct")


def uneven_load(seconds: int) -> subprocess.Popen:
    """One more CPU hog than CPUs beside pipe and context-switch pairs: one domain holds more
    hogs than the other, so its wakeups find no idle CPU while the other domain is less
    loaded, and candidates abound. (Hogs pinned with --taskset would make more, but a CPU
    whose local queue always holds a pinned task never serves its domain's queue: mlsched
    ejects itself on a stall, see the report of this issue.)"""
    return subprocess.Popen(
        ["stress-ng", "--temp-path", "/tmp", "--timeout", f"{seconds}s", "--quiet",
         "--cpu", str((os.cpu_count() or 2) + 1), "--pipe", "2", "--switch", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen, load: subprocess.Popen | None, log_path: Path) -> None:
    """After a collection: the collector killed if still running, the load stopped, the log."""
    if proc.poll() is None:
        proc.kill()
    if load is not None:
        load.terminate()  # stress-ng stops its workers on SIGTERM
        load.wait(timeout=30)
    print(f"--- {log_path.name} ---\n{log_path.read_text(errors='replace')}")


def test_short_collection_gives_a_labeled_dataset() -> None:
    out = LOG_DIR / "collect-test.csv"
    outcomes = LOG_DIR / "collect-test.outcomes.csv"
    log_path = LOG_DIR / "collect-test.log"
    for f in (out, outcomes):
        f.unlink(missing_ok=True)
    delayacct_before = DELAYACCT.read_text()
    cmd = [sys.executable, "-m", "tools.collect", "--output", str(out), "--duration",
           str(COLLECT_S), "--explore", "0.5", "--domains", "2"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    load: subprocess.Popen | None = None
    try:
        wait_for(attached, 90, "mlsched-collect to attach", proc)
        load = uneven_load(COLLECT_S + 30)
        time.sleep(COLLECT_S / 2)
        mid = read_stats()  # the pins work during collection: mlsched-stats can follow it
        print("stats mid-collection:", {k: mid[k] for k in
                                        ("candidates", "explored", "submitted", "rb_drops")})
        assert mid["candidates"] > 0
        assert mid["submitted"] > 0
        assert mid["explored"] > 0
        status = proc.wait(timeout=COLLECT_S * 6)
    finally:
        stop(proc, load, log_path)
    assert status == 0
    assert scx_state() == "disabled", "mlsched-collect left the scheduler attached"
    assert not os.path.exists(contract.PIN_DIR), "mlsched-collect left its pins"
    assert DELAYACCT.read_text() == delayacct_before, "kernel.task_delayacct not restored"

    ds = read_dataset(out)  # the documented format, validated
    print(f"dataset: {len(ds)} rows, actions {np.bincount(ds.actions, minlength=2)}, "
          f"labels {np.bincount(ds.labels, minlength=2)}")
    assert len(ds) > 0
    assert set(np.unique(ds.actions)) == {0, 1}, "both actions must be observed"
    assert set(np.unique(ds.labels)) == {0, 1}, "labels of both classes expected"
    comments = [ln for ln in out.read_text().splitlines() if ln.startswith("#")]
    assert any("outcome source: " in ln for ln in comments)
    assert any("label rule: " in ln for ln in comments)

    raw = read_outcomes(outcomes)
    assert len(raw["ts_ns"]) >= len(ds)
    assert set(np.unique(raw["source"])) <= {contract.Source.FALLBACK, contract.Source.EXPLORE}
    assert (raw["window_ns"] > 0).all()
    labeled = raw["label"] >= 0
    assert int(labeled.sum()) == len(ds)


def test_sigterm_ends_collection_cleanly() -> None:
    """SIGTERM mid-run: what was collected is written, the scheduler detached, pins removed,
    the sysctl restored, exit 0 (as mlsched-load does on SIGINT/SIGTERM)."""
    out = LOG_DIR / "collect-sigterm.csv"
    log_path = LOG_DIR / "collect-sigterm.log"
    out.unlink(missing_ok=True)
    delayacct_before = DELAYACCT.read_text()
    cmd = [sys.executable, "-m", "tools.collect", "--output", str(out), "--duration", "600",
           "--explore", "0.5", "--domains", "2"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    load: subprocess.Popen | None = None
    try:
        wait_for(attached, 90, "mlsched-collect to attach", proc)
        load = uneven_load(60)
        time.sleep(8)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        stop(proc, load, log_path)
    assert status == 0
    assert "SIGTERM" in log_path.read_text()
    assert scx_state() == "disabled"
    assert not os.path.exists(contract.PIN_DIR)
    assert DELAYACCT.read_text() == delayacct_before
