"""Command-line pieces shared by mlsched-load, mlsched-collect and mlsched-stats."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from loader import paths
from loader.domains import DomainError, DomainPlan, plan_domains


def parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the examples epilog, printed as written."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=examples,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class Refusal(Exception):
    """A one-line refusal before anything is attached; status 2 for the user's mistakes, 1 for
    what the machine lacks."""

    def __init__(self, msg: str, status: int = 2) -> None:
        super().__init__(msg)
        self.status = status


def preflight(args: argparse.Namespace, root: bool = True, kernel: bool = True) -> DomainPlan:
    """What a tool that attaches checks before anything is attached (root, a sched_ext kernel:
    when asked; argparse checked --stats-group): the domain plan, or Refusal."""
    from loader.scheduler import scx_state

    if root and os.geteuid() != 0:
        raise Refusal("must run as root (attaching a sched_ext scheduler needs CAP_SYS_ADMIN)")
    if not os.path.isfile(args.bpf_obj):
        raise Refusal(f"BPF object not found at {args.bpf_obj} ({paths.BUILD_HINT})")
    try:
        plan = plan_domains(args.domains)
    except DomainError as e:
        raise Refusal(str(e)) from None
    if kernel and scx_state() == "unsupported":
        raise Refusal("this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT); see README: VM", 1)
    return plan


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
