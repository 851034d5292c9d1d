"""The kernel's own example schedulers (the benchmarks' peers) attach and detach cleanly.

`make scx-peers` builds them from the cached kernel source into build/scx/; `make vm-test`
builds them first. Each one is attached for a few seconds, then stopped with SIGINT.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.conftest import LOG_DIR, ROOT

PEER_DIR = ROOT / "build" / "scx"
SCX = Path("/sys/kernel/sched_ext")
ATTACHED_S = 3
# Upper bounds so that a broken run fails instead of hanging.
ATTACH_WAIT_S = 60
EXIT_WAIT_S = 30


def scx_file(name: str) -> str:
    try:
        return (SCX / name).read_text().strip()
    except FileNotFoundError:
        return ""


def wait_until(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc is not None and log is not None and proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} waiting for {what}:\n{log.read_text()}")
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# The binary's name and the ops name it registers (/sys/kernel/sched_ext/root/ops).
@pytest.mark.parametrize(("binary", "ops"), [("scx_simple", "simple"), ("scx_central", "central")])
def test_peer_attaches_and_detaches(binary: str, ops: str) -> None:
    path = PEER_DIR / binary
    if not path.is_file():
        pytest.skip(f"{path.relative_to(ROOT)} is not built: run `make scx-peers`")
    assert scx_file("state") == "disabled", "another scheduler is attached"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"peer-{binary}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: scx_file("state") == "enabled" and scx_file("root/ops") == ops,
                   ATTACH_WAIT_S, f"{binary} to attach", proc, log)
        time.sleep(ATTACHED_S)
        assert proc.poll() is None, f"{binary} exited while attached:\n{log.read_text()}"
        assert scx_file("state") == "enabled" and scx_file("root/ops") == ops, \
            f"{binary} was ejected:\n{log.read_text()}"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=EXIT_WAIT_S)
        print(f"--- {log.name} ---\n{log.read_text()}")
        assert rc == 0
        # The kernel finishes the disable asynchronously (~0.1 s under TCG).
        wait_until(lambda: scx_file("state") == "disabled", EXIT_WAIT_S, "state disabled")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
