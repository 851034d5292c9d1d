"""Command-line pieces shared by mlsched-load, mlsched-collect, mlsched-stats and the tools."""

import argparse
import importlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any, Self

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


def plot_refusal(what: str) -> str | None:
    """Why `what` (a flag, a tool) cannot draw, else None: matplotlib is the optional [plot]
    extra, asked for before the work so that a long run does not end in an ImportError."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as e:
        if e.name == "matplotlib":
            return f"{what} needs matplotlib: pip install 'mlsched[plot]'"
        return f"{what}: matplotlib does not import ({e})"
    return None


def _arg(kind: Callable[[str], Any], text: str, ok: Callable[[Any], bool], want: str) -> Any:
    """text as kind when ok(it), else argparse's one-line error: must be {want}, got {text}."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
    return v


def number_in(text: str, lo: float, hi: float, unit: str = "", lo_open: bool = True) -> float:
    """A float in (lo, hi], or in [lo, hi] when not lo_open."""
    return _arg(float, text, lambda v: lo < v <= hi or v == lo and not lo_open,
                f"in {'(' if lo_open else '['}{lo:g}, {hi:g}] {unit}".rstrip())


def positive_int(text: str) -> int:
    return _arg(int, text, lambda v: v > 0, "a positive integer")


def ringbuf_size(text: str) -> int:
    """A BPF ring buffer size: a power of two of at least one page."""
    p = os.sysconf("SC_PAGE_SIZE")
    return _arg(int, text, lambda v: v >= p and not v & (v - 1), f"a power of two >= {p} bytes")


def interval_s(text: str) -> float:
    return number_in(text, 0, 3600, "seconds")


class SignalFlag:
    """Set by one of its signals (requested, and the signal's name) once installed."""

    requested, signame, signals = False, "", ()

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested, self.signame = True, signal.Signals(signum).name

    def install(self) -> Self:
        for signum in self.signals:
            signal.signal(signum, self)
        return self


class Stop(SignalFlag):
    """SIGINT/SIGTERM: a main loop checks it between polls."""

    signals = (signal.SIGINT, signal.SIGTERM)


class Reload(SignalFlag):
    """SIGHUP: the loader checks its model directory again at its next turn."""

    signals = (signal.SIGHUP,)

    def take(self) -> bool:
        """True once per SIGHUP received."""
        requested, self.requested = self.requested, False
        return requested
