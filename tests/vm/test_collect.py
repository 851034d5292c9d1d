"""mlsched-collect on a real sched_ext kernel: a short run under load gives a labeled dataset.

Training on such a dataset needs TensorFlow, which takes 72 s to import in the TCG guest, so it
is checked on the host instead (tests/host/test_collect.py trains on
tests/host/data/collect-vm.csv.gz, a dataset captured from this very collection run).
"""

from __future__ import annotations

import os
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


def imbalanced_load(seconds: int) -> list[subprocess.Popen]:
    """A CPU hog pinned to CPU 0 beside unpinned pipe and context-switch pairs: wakeups on
    CPU 0's domain find it busy while the other domain is less loaded, so candidates abound."""
    common = ["stress-ng", "--temp-path", "/tmp", "--timeout", f"{seconds}s", "--quiet"]
    return [
        subprocess.Popen([*common, "--cpu", "1", "--taskset", "0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([*common, "--pipe", "2", "--switch", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]


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
    load: list[subprocess.Popen] = []
    try:
        wait_for(attached, 90, "mlsched-collect to attach", proc)
        load = imbalanced_load(COLLECT_S + 30)
        time.sleep(COLLECT_S / 2)
        mid = read_stats()  # the pins work during collection: mlsched-stats can follow it
        print("stats mid-collection:", {k: mid[k] for k in
                                        ("candidates", "explored", "submitted", "rb_drops")})
        assert mid["candidates"] > 0
        assert mid["submitted"] > 0
        assert mid["explored"] > 0
        status = proc.wait(timeout=COLLECT_S * 6)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in load:
            p.kill()
            p.wait()
        print(f"--- {log_path.name} ---\n{log_path.read_text(errors='replace')}")
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
