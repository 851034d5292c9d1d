"""Host-side helpers of the benchmarks' orchestrators (tools/bench/__main__.py, wakeup.py).

The commit measured, and background samplers of how busy the shared host is while a VM runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
from pathlib import Path
from typing import Self

from loader import paths

REPO_ROOT = paths.CHECKOUT


def arg_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An orchestrator's parser, with --out-dir (bench-results/ by default)."""
    ap = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench-results",
                    help="results directory (default: bench-results/)")
    return ap


class Sampler:
    """A daemon thread running _run() between `with` and its end; _run watches self._stop."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class LoadSampler(Sampler):
    """Samples the host's 1-min load average and the VMs running, every few seconds.

    The machine is shared: other VMs running at the same time are the main source of noise,
    so the report says how busy the host was during each phase.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        super().__init__(interval_s)
        self.samples: list[tuple[float, int]] = []

    @staticmethod
    def qemu_count() -> int:
        n = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        n += f.read().startswith("qemu-system")
                except OSError:
                    pass
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((os.getloadavg()[0], self.qemu_count()))
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, float]:
        loads = sorted(s[0] for s in self.samples) or [0.0]
        return {"load1_median": round(loads[len(loads) // 2], 2), "load1_max": round(loads[-1], 2),
                "vms_max": max((s[1] for s in self.samples), default=0),
                "samples": len(self.samples)}
