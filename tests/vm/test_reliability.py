"""mlsched under stress, faults and bad input (docs/RELIABILITY.md lists what each proves).

Durations here shape the load; they are never asserted on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loader import contract
from loader.scheduler import scx_state
from tests.vm.conftest import (
    MODEL,
    ROOT,
    TEST_MODELS,
    Loader,
    attached,
    read_stats,
    running_loader,
    start_loader,
    stress,
    sums_match,
    wait_for,
)


def watch_attached(proc: subprocess.Popen, poll_s: float = 0.2) -> bool:
    """True if mlsched stayed attached for as long as proc ran."""
    while proc.poll() is None:
        if not attached():
            return False
        time.sleep(poll_s)
    return True


def test_scx_smoke_test_exits_zero() -> None:
    """scx CI's smoke test: an aggressive load, then 45 s of mlsched-load under timeout."""
    load = subprocess.Popen(
        ["stress-ng", "--temp-path", "/tmp", "-t", "31", "--aggressive", "-M", "-c", "2",
         "-f", "2", "--affinity", "1", "--affinity-delay", "1", "--affinity-pin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    res = subprocess.run(
        ["timeout", "--preserve-status", "45", "mlsched-load", "--model", str(MODEL)],
        capture_output=True, text=True, cwd=ROOT,
    )
    print(res.stderr)
    assert load.wait(timeout=120) == 0
    assert res.returncode == 0
    assert "ejected" not in res.stderr
    assert "detached mlsched" in res.stderr
    assert scx_state() == "disabled"


def test_sigkill_under_load_detaches_and_workload_finishes() -> None:
    ld = start_loader(name="loader-kill-under-load")
    try:
        wait_for(attached, 60, "mlsched to attach", ld.proc)
        load = stress(15)
        time.sleep(3)
        ld.proc.send_signal(signal.SIGKILL)
        took = wait_for(lambda: scx_state() == "disabled", 30, "the kernel to detach")
        print(f"state disabled {took * 1000:.0f} ms after SIGKILL under load")
        assert load.wait(timeout=120) == 0
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()
        shutil.rmtree(contract.PIN_DIR, ignore_errors=True)


def test_sysrq_ejection_is_reported_from_the_exit_info() -> None:
    """SysRq-S hands every task back to the kernel's scheduler: the loader reports the reason
    the kernel recorded in scx's exit info (UEI), exits 1 and leaves nothing pinned."""
    ld = start_loader("--no-model", name="loader-sysrq")
    try:
        wait_for(attached, 60, "mlsched to attach", ld.proc)
        Path("/proc/sysrq-trigger").write_text("S")
        assert ld.proc.wait(timeout=60) == 1
        assert "the kernel ejected mlsched: disabled by sysrq-S" in ld.log(), ld.log()
        assert scx_state() == "disabled"
        assert not os.path.exists(contract.PIN_DIR)
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()


def test_stopped_loader_falls_back_then_catches_up() -> None:
    # --table hash: keys are decided as candidates come (with the grid, every key is
    # decided at model-ready and a stopped loader is never asked).
    with running_loader("--table", "hash", name="loader-stopped") as loader:
        stopped_loader_falls_back_then_catches_up(loader)


def stopped_loader_falls_back_then_catches_up(loader: Loader) -> None:
    loader.wait_model_ready()
    loader.proc.send_signal(signal.SIGSTOP)
    try:
        before = read_stats()
        load = stress(30)
        assert watch_attached(load), "mlsched left while the loader was stopped"
        assert load.wait() == 0
        during = read_stats()
    finally:
        loader.proc.send_signal(signal.SIGCONT)
    missed = {k: during[k] - before[k] for k in ("misses", "fallback_migrate", "fallback_keep")}
    print("while stopped:", missed, "decisions written:",
          during["loader_decisions"] - before["loader_decisions"])
    assert missed["misses"] > 0
    fallback = missed["fallback_migrate"] + missed["fallback_keep"]
    assert sums_match(fallback, missed["misses"]), missed
    assert during["loader_decisions"] == before["loader_decisions"]

    load = stress(10)
    assert load.wait() == 0
    time.sleep(0.5)
    after = read_stats()
    print("after SIGCONT: hits +", after["hits"] - during["hits"], "decisions +",
          after["loader_decisions"] - during["loader_decisions"])
    assert after["loader_decisions"] > during["loader_decisions"]
    assert after["hits"] > during["hits"]
    assert attached()


def test_ring_buffer_overflow_counts_drops_and_recovers() -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    # One page of ring, and undecided keys pushed again every millisecond: a flood.
    ld = start_loader("--ringbuf-size", str(page), "--resubmit-ms", "1", "--table", "hash",
                      name="loader-small-ring")
    try:
        wait_for(attached, 60, "mlsched to attach", ld.proc)
        ld.wait_model_ready()
        ld.proc.send_signal(signal.SIGSTOP)  # nobody drains the ring: it fills up
        try:
            before = read_stats()
            load = stress(20)
            assert watch_attached(load)
            assert load.wait() == 0
            during = read_stats()
        finally:
            ld.proc.send_signal(signal.SIGCONT)
        drops = during["rb_drops"] - before["rb_drops"]
        print(f"ring of {page} bytes: {drops} drops, "
              f"{during['submitted'] - before['submitted']} pushed while the loader was stopped")
        assert drops > 0
        load = stress(10)
        assert load.wait() == 0
        time.sleep(0.5)
        after = read_stats()
        assert after["loader_decisions"] > during["loader_decisions"]
        assert after["hits"] > during["hits"]
        assert ld.stop() == 0
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()
        print(ld.log())


@pytest.mark.parametrize("model,kind", [
    ("nan_half", "non-finite"),
    ("raise_half", "InvalidArgumentError"),
])
def test_model_failure_mid_run_skips_batches(model: str, kind: str) -> None:
    path = TEST_MODELS / model
    assert path.is_dir(), f"{path} missing: run `make vm-test` (it builds them on the host)"
    ld = start_loader("--model", str(path), name=f"loader-{model}")
    try:
        wait_for(attached, 60, "mlsched to attach", ld.proc)
        ld.wait_model_ready()  # TensorFlow: about a minute to import under TCG
        load = stress(15)
        assert watch_attached(load)
        assert load.wait() == 0
        time.sleep(0.5)
        s = read_stats()
        print(f"{model}: model_errors={s['loader_model_errors']} "
              f"decisions={s['loader_decisions']} batches={s['loader_batches']}")
        assert s["loader_model_errors"] > 0
        assert ld.proc.poll() is None and attached()
        assert ld.stop() == 0
        errors = [line for line in ld.log().splitlines() if "model error" in line]
        assert len(errors) == 1 and f"({kind})" in errors[0], errors
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()
        print(ld.log())


def test_stale_pins_are_cleaned_at_start() -> None:
    first = start_loader(name="loader-dies-hard")
    wait_for(attached, 60, "mlsched to attach", first.proc)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    wait_for(lambda: scx_state() == "disabled", 30, "the kernel to detach")
    assert os.path.isdir(contract.PIN_DIR), "a SIGKILLed loader cannot unpin"

    second = start_loader(name="loader-after-stale-pins")
    try:
        wait_for(attached, 60, "mlsched to attach again", second.proc)
        assert "stale pins" in second.log()
        assert second.stop() == 0
        assert not os.path.exists(contract.PIN_DIR)
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
        print(second.log())


@pytest.mark.parametrize(
    "case", ["missing", "not_saved_model", "h5_file", "wrong_shape", "corrupt_variables"]
)
def test_bad_model_refused_before_attach(case: str, tmp_path: Path) -> None:
    if case == "missing":
        path = tmp_path / "nope"
    elif case == "not_saved_model":
        (tmp_path / "saved_model.pb").write_bytes(b"junk")
        path = tmp_path
    elif case == "h5_file":
        path = tmp_path / "model.h5"
        path.write_bytes(b"\x89HDF\r\n\x1a\n")
    else:
        path = TEST_MODELS / ("width5" if case == "wrong_shape" else case)
        assert path.is_dir(), f"{path} missing: run `make vm-test`"
    res = subprocess.run(["mlsched-load", "--model", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    if case == "corrupt_variables":  # caught through the manifest
        assert "variables/variables.data-00000-of-00001 changed since" in lines[0], lines[0]
    assert scx_state() == "disabled"
    assert not os.path.exists(contract.PIN_DIR)


def test_non_root_refused() -> None:
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "mlsched-load",
         "--model", str(MODEL)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "mlsched-load: must run as root (attaching a sched_ext scheduler needs CAP_SYS_ADMIN)"]
    assert scx_state() == "disabled"
