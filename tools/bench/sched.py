"""A sched_ext scheduler process in the benchmarks' guest: sysfs state, start to SIGINT.

One definition for tools/bench/suite.py (mlsched and the kernel's scx peers) and
tools/bench/wakelat.py (mlsched): the scheduler counts as attached when
/sys/kernel/sched_ext/state reads `enabled` and root/ops names it, and as still attached while
its process lives, the state and ops hold and enable_seq has not moved since the attach.
Reads sysfs only, independent of the loader's internals.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from loader import paths

REPO_ROOT = paths.CHECKOUT
SCX = Path("/sys/kernel/sched_ext")
STOP_TIMEOUT_S = 60


def read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def scx_state() -> str:
    return read_text(SCX / "state") or "unsupported"


def scx_ops() -> str:
    return read_text(SCX / "root" / "ops")


def scx_enable_seq() -> int | None:
    v = read_text(SCX / "enable_seq")
    return int(v) if v.isdigit() else None


class SchedProcess:
    """One scheduler process, its output in log_path, from attach (sysfs says so) to SIGINT.

    ready: an extra condition of the attach (e.g. mlsched's pinned maps are there).
    """

    def __init__(self, name: str, cmd: Sequence[str], ops: str, log_path: Path,
                 attach_timeout_s: float, ready: Callable[[], bool] | None = None) -> None:
        if scx_state() != "disabled":
            raise RuntimeError(f"sched_ext is {scx_state()} ({scx_ops()}) before {name}")
        self.name, self.ops, self.log_path = name, ops, log_path
        # enable_seq goes up by one per attach, a little after state reads enabled: count from
        # the value before the start, so a detach and re-attach in between shows too.
        seq0 = scx_enable_seq()
        self.enable_seq = None if seq0 is None else seq0 + 1
        self.cmd = list(cmd)
        self.t0 = time.monotonic()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.wait(lambda: scx_state() == "enabled" and scx_ops() == ops
                  and (ready is None or ready()), attach_timeout_s, "the attach")
        self.attach_s = time.monotonic() - self.t0

    def wait(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Polls pred until true; RuntimeError (the process stopped) if it exits or times out."""
        t0 = time.monotonic()
        while not pred():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} waiting for "
                                   f"{what}: {self.tail()}")
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(f"{self.name}: no {what} after {timeout_s} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 3) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])

    def left(self) -> str:
        """Why the scheduler is no longer attached; "" while it is."""
        if self.proc.poll() is not None:
            return f"{self.name} exited {self.proc.returncode}: {self.tail()}"
        if scx_state() != "enabled" or scx_ops() != self.ops:
            return f"sched_ext {scx_state()} ({scx_ops() or 'no ops'}): {self.tail()}"
        seq = scx_enable_seq()
        if seq != self.enable_seq:
            return f"enable_seq {seq}, expected {self.enable_seq}: attached again"
        return ""

    def stop(self) -> int:
        """SIGINT (SIGKILL after STOP_TIMEOUT_S); waits for the detach; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            status = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        t0 = time.monotonic()
        while scx_state() not in ("disabled", "unsupported") and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        return status
