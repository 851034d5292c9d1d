"""mlsched-stats on a real sched_ext kernel: live rates under stress-ng, OpenMetrics, the
loader's --stats, and the one-line answers when nothing (or a departed scheduler) is there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from loader import contract
from loader.scheduler import scx_state
from tests.vm.conftest import (
    ATTACH_WAIT_S,
    LOG_DIR,
    MODEL,
    ROOT,
    Loader,
    attached,
    running_loader,
    start_loader,
    stress,
    wait_for,
)

STRESS_S = 120  # an upper bound: the load is stopped once the samples are taken
TIMEOUT_S = 120  # a broken run fails instead of hanging; not a performance bound


def stats(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.stats", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def save(name: str, text: str) -> None:
    """Keep real output for the record (build/vm-out survives the VM)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / name).write_text(text)
    print(f"--- {name} ---\n{text}")


@pytest.fixture
def loader_with_stats() -> Iterator[Loader]:
    with running_loader("--stats", "2", name="loader-stats") as ld:
        yield ld


def test_live_rates_under_stress(loader_with_stats: Loader) -> None:
    ld = loader_with_stats
    ld.wait_model_ready()
    # The watcher runs before the load starts: under TCG a Python start competing with
    # stress-ng takes many seconds. Its first line proves it runs; the two after the one that
    # saw the load begin are one second apart, both under load.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tools.stats", "--json", "--interval", "1"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    load = None
    try:
        assert watcher.stdout.readline(), watcher.stderr.read()  # type: ignore[union-attr]
        load = stress(STRESS_S)
        once = {fmt: subprocess.Popen([sys.executable, "-m", "tools.stats", "--once", *fmt],
                                      cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                for fmt in ((), ("--openmetrics",))}
        lines = [watcher.stdout.readline() for _ in range(3)][1:]  # type: ignore[union-attr]
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=TIMEOUT_S) == 0, watcher.stderr.read()  # type: ignore[union-attr]
        out = {fmt: p.communicate(timeout=TIMEOUT_S) + (p.returncode,)
               for fmt, p in once.items()}
    finally:
        if watcher.poll() is None:
            watcher.kill()
        if load is not None:
            load.terminate()
            load.wait(timeout=TIMEOUT_S)
    text_out, text_err, text_rc = out[()]
    om_out, om_err, om_rc = out[("--openmetrics",)]

    assert all(lines), f"mlsched-stats --json printed {lines!r}"
    first, second = (json.loads(line) for line in lines)
    save("stats-sample.json", lines[0] + lines[1])
    for key in ("candidates_total", "select_total", "hits_total", "submitted_total"):
        assert second[key] >= first[key] > 0, key
    assert second["select_total"] > first["select_total"]
    assert second["candidates_total"] > first["candidates_total"]
    for s in (first, second):
        assert s["state"] == "enabled" and s["ops"] == contract.SCHED_NAME
        assert s["model"] == str(MODEL)
        assert s["model_ready"] == 1 and s["backend"] in ("numpy", "tf")
        assert s["loader_pid"] == ld.proc.pid
        assert s["select_per_s"] > 0 and s["candidates_per_s"] > 0
        assert s["hits_per_s"] > 0 and s["hit_rate"] is not None and s["hit_rate"] > 0
        assert s["table_entries"] > 0 and s["table_capacity"] > 0
        assert s["nr_doms"] == 2 and len(s["domains"]) == 2
    assert second["decisions_total"] >= first["decisions_total"] > 0
    assert second["batches_total"] > 0 and second["batch_latency_max_us"] > 0

    assert text_rc == 0, text_err
    save("stats-once.txt", text_out)
    assert "model ready" in text_out and "decide     cand" in text_out

    assert om_rc == 0, om_err
    save("stats-once.om", om_out)
    families = {f.name: f for f in text_string_to_metric_families(om_out)}
    assert families["mlsched_candidates"].type == "counter"
    assert families["mlsched_candidates"].samples[0].value > 0
    assert families["mlsched_info"].samples[0].labels["ops"] == contract.SCHED_NAME
    assert {s.labels["dom"] for s in families["mlsched_dom_load"].samples} == {"0", "1"}

    assert ld.proc.poll() is None and attached()
    assert ld.stop() == 0
    assert "###### " in ld.log() and "decide     cand" in ld.log(), "no --stats block"


def test_nothing_attached() -> None:
    wait_for(lambda: scx_state() == "disabled", 30, "the previous scheduler to detach")
    res = stats("--once")
    assert res.returncode == 1
    assert res.stderr == (f"mlsched-stats: mlsched is not attached (no pinned maps in "
                          f"{contract.PIN_DIR}); sched_ext is disabled\n")


def test_watcher_reports_the_scheduler_leaving(loader: Loader) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tools.stats", "--interval", "0.5"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().startswith("######")  # type: ignore[union-attr]
        assert loader.stop(signal.SIGINT) == 0
        assert watcher.wait(timeout=TIMEOUT_S) == 1
    finally:
        if watcher.poll() is None:
            watcher.kill()
    err = watcher.stderr.read()  # type: ignore[union-attr]
    print(err)
    assert err.startswith("mlsched-stats: mlsched is not attached: it left (unreg):")
    assert err.count("\n") == 1


def test_pins_left_by_a_killed_loader_give_the_exit_reason() -> None:
    ld = start_loader(name="loader-stats-sigkill")
    try:
        wait_for(attached, ATTACH_WAIT_S, "mlsched to attach", ld.proc)
        ld.proc.send_signal(signal.SIGKILL)
        ld.proc.wait(timeout=TIMEOUT_S)
        wait_for(lambda: scx_state() == "disabled", 30, "the kernel to detach")
        assert os.path.isdir(contract.PIN_DIR)
        res = stats("--once", "--json")
        print(res.stderr)
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.startswith("mlsched-stats: mlsched is not attached: it left (unreg):")
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()
        shutil.rmtree(contract.PIN_DIR, ignore_errors=True)
