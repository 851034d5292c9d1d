"""Command-line pieces shared by mlsched-load, mlsched-collect and mlsched-stats."""

from __future__ import annotations

import argparse
import os
import signal


def parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the examples epilog, printed as written."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=examples,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def number_in(text: str, lo: float, hi: float, unit: str = "", lo_open: bool = True) -> float:
    """A float in (lo, hi] (or [lo, hi]), as argparse's one-line error otherwise."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        bracket = "(" if lo_open else "["
        suffix = f" {unit}" if unit else ""
        raise argparse.ArgumentTypeError(f"must be in {bracket}{lo:g}, {hi:g}]{suffix}, got {v:g}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def ringbuf_size(text: str) -> int:
    """A BPF ring buffer size: a power of two of at least one page."""
    v = positive_int(text)
    page = os.sysconf("SC_PAGE_SIZE")
    if v < page or v & (v - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two >= {page} bytes, got {v}")
    return v


def interval_s(text: str) -> float:
    return number_in(text, 0, 3600, "seconds")


class Stop:
    """Set by SIGINT/SIGTERM; a main loop checks it between polls."""

    def __init__(self) -> None:
        self.requested = False
        self.signame = ""

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = True
        self.signame = signal.Signals(signum).name

    def install(self) -> Stop:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)
        return self


class Reload:
    """Set by SIGHUP: the loader checks its model directory again at its next turn."""

    def __init__(self) -> None:
        self._requested = False

    def __call__(self, _signum: int, _frame: object) -> None:
        self._requested = True

    def install(self) -> Reload:
        signal.signal(signal.SIGHUP, self)
        return self

    def take(self) -> bool:
        """True once per SIGHUP received."""
        requested, self._requested = self._requested, False
        return requested
