"""mlsched-collect: run mlsched in collection mode and record what each migration decision led to.

usage: sudo mlsched-collect --output FILE [--duration S] [--explore P] [--window-ms MS]
       mlsched-collect --relabel OUTCOMES --output FILE

The kernel decides every migration candidate itself (the decision map is ignored): with the
fallback policy with probability 1 - P, by a coin flip with probability P, so both actions are
seen in every region of the feature space, and it pushes every candidate with its action to
the ring buffer. The collector follows up to --max-follow candidates a second: it samples the
task's cumulative run-queue delay and run time when it reads the record and again --window-ms
later (taskstats, else /proc/<pid>/schedstat), without blocking the ring reader (a heap of due
samples, checked between polls). At the end it labels the rows by comparing each outcome with
its bucket's median under the other action, and writes the dataset (format v2,
model_dir/dataset.py: with every row's propensity, the probability with which the logging
policy took its action, and its outcome) and an outcomes file with the raw measurements.
tools/collect.md has the rule and the files.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loader import cli, contract, paths
from loader.cli import Stop, number_in, positive_int
from loader.stats import add_arguments as add_stats_arguments
from model_dir import fallback
from tools.outcomes import (
    LEVEL_IDLE,
    LEVEL_NO_OTHER,
    LEVEL_STALLED,
    LEVELS,
    MEASURED_COLUMNS,
    MIN_OTHER,
    OutcomesError,
    Sampler,
    SamplerError,
    Sysctl,
    label_rows,
    open_sampler,
    outcomes_path_for,
    read_outcomes,
    write_outcomes,
)

if TYPE_CHECKING:
    from loader.domains import DomainPlan

log = logging.getLogger("mlsched-collect")

DEFAULT_BPF_OBJ = paths.BPF_OBJ
DEFAULT_DURATION_S = 60.0
DEFAULT_EXPLORE = 0.25
DEFAULT_WINDOW_MS = 100.0
DEFAULT_MAX_FOLLOW = 200  # candidates followed per second
DEFAULT_RINGBUF = 4 << 20  # every candidate is pushed in collection mode: a deeper ring
POLL_MS = 20  # longest ring poll; windows close up to this late (window_ns says by how much)
PROGRESS_S = 5.0
EXIT_CHECK_S = 0.1
DELAYACCT = "kernel.task_delayacct"

EXAMPLES = """\
examples:
  sudo mlsched-collect --output /tmp/candidates.csv             # 60 s, P = 0.25
  sudo mlsched-collect --output data.csv.gz --duration 120 --explore 0.5 --domains 2
  sudo mlsched-collect --output data.csv --outcome-source schedstat --max-follow 500
  mlsched-collect --relabel data.outcomes.csv --output relabeled.csv --min-other 10
  mlsched-collect --relabel old.outcomes.csv --output v2.csv --explore 0.5   # pre-v2 file

Run a load meanwhile (stress-ng, a build...): candidates only arise when a waking task finds
no idle CPU in its domain. Ctrl-C (SIGINT) or SIGTERM ends the collection early: the rows
collected so far are labeled and written, the scheduler detached, and the exit status is 0.
Besides FILE it writes FILE's .outcomes.csv (the raw measurements; see --outcomes).
"""


# --- arguments ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("mlsched-collect", "Run mlsched in data-collection mode: the fallback policy "
               "decides, or a coin flip with probability P; record each followed candidate's "
               "features, action and outcome (run-queue delay and run time over a window), "
               "label them, write a dataset for model_export.py --data.", EXAMPLES)
    p.add_argument("--output", required=True, type=Path, metavar="FILE",
                   help="dataset to write (CSV, format v2; .csv.gz compresses)")
    p.add_argument("--duration", type=lambda t: number_in(t, 0, 86400, "seconds"),
                   default=DEFAULT_DURATION_S, metavar="S",
                   help=f"seconds to collect (default: {DEFAULT_DURATION_S:g})")
    p.add_argument("--explore", type=lambda t: number_in(t, 0, 1, lo_open=False),
                   default=None, metavar="P",
                   help="probability that a candidate's action is a coin flip instead of the "
                   f"fallback's (default: {DEFAULT_EXPLORE}); with --relabel of an outcomes "
                   "file written before format v2, the P it was collected with")
    p.add_argument("--window-ms", type=lambda t: number_in(t, 0, 10000, "ms"),
                   default=DEFAULT_WINDOW_MS, metavar="MS",
                   help=f"outcome window after a record is read (default: {DEFAULT_WINDOW_MS:g})")
    p.add_argument("--max-follow", type=positive_int, default=DEFAULT_MAX_FOLLOW, metavar="N",
                   help="most candidates followed per second; the others are counted as "
                   f"skipped (default: {DEFAULT_MAX_FOLLOW})")
    p.add_argument("--outcome-source", choices=("auto", "taskstats", "schedstat"),
                   default="auto",
                   help="how outcomes are read: taskstats (genetlink, delay accounting on for "
                   "the run), /proc/<pid>/schedstat, or auto: taskstats when it works "
                   "(default: auto)")
    p.add_argument("--min-other", type=positive_int, default=MIN_OTHER, metavar="N",
                   help="rows of the other action a bucket needs for its median to label "
                   f"with (default: {MIN_OTHER})")
    p.add_argument("--idle-rows", choices=("drop", "label"), default="drop",
                   help="rows whose task neither ran nor waited in its window: drop them "
                   "(default), or count them as m = 0 and label them like the others (what "
                   "off-policy learning wants: whether a task sleeps through its window depends "
                   "on the action)")
    p.add_argument("--max-late-ms", type=lambda t: number_in(t, 0, 10000, "ms"), default=None,
                   metavar="MS",
                   help="leave out rows whose record was read, or whose window closed, more "
                   "than MS late: the collector runs first in the guest, so then the VM itself "
                   "did not run (the host was busy), and the outcome measures the host "
                   "(default: keep them; with --relabel, --window-ms must be the run's)")
    p.add_argument("--outcomes", type=Path, metavar="FILE",
                   help="where the raw outcomes go (default: FILE with .outcomes.csv)")
    p.add_argument("--relabel", type=Path, metavar="OUTCOMES",
                   help="attach nothing: label an outcomes file again and write --output")
    p.add_argument("--domains", type=positive_int, default=None, metavar="N",
                   help="split the CPUs into N equal domains (default: as mlsched-load)")
    p.add_argument("--fallback", choices=[f.name.lower() for f in contract.Fallback],
                   default="heuristic",
                   help="the policy that decides when the coin is not flipped "
                   "(default: heuristic; with --relabel of a pre-v2 outcomes file, the one it "
                   "was collected with)")
    p.add_argument("--slice-us", type=positive_int, default=20000, metavar="US",
                   help="time slice in microseconds (default: 20000)")
    p.add_argument("--ringbuf-size", type=cli.ringbuf_size, default=DEFAULT_RINGBUF,
                   metavar="BYTES", help=f"candidate ring buffer size (default: {DEFAULT_RINGBUF})")
    p.add_argument("--bpf-obj", default=str(DEFAULT_BPF_OBJ), metavar="FILE",
                   help="compiled scheduler (default: %(default)s)")
    p.add_argument("--pin-dir", default=contract.PIN_DIR, metavar="DIR",
                   help="where the maps are pinned (default: %(default)s)")
    add_stats_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def fail(msg: str, status: int = 2) -> int:
    print(f"mlsched-collect: {msg}", file=sys.stderr)
    return status


# --- following candidates -------------------------------------------------------------------


@dataclass
class FollowStats:
    records: int = 0  # records read from the ring
    followed: int = 0  # records whose window started
    completed: int = 0  # windows that completed
    rate_limited: int = 0  # not followed: over --max-follow
    pid_busy: int = 0  # not followed: that task's previous window is still open
    own: int = 0  # not followed: the collector itself
    late: int = 0  # not followed: read after the collection ended
    exited: int = 0  # followed, but the task was gone at either sample
    errors: int = 0  # followed, but a sample failed
    lag_ns: list[int] = field(default_factory=list)  # record's BPF timestamp -> read


class Follower:
    """The ring buffer callback and the heap of windows due to close."""

    def __init__(self, sampler: Sampler, window_ns: int, max_per_s: int) -> None:
        self.sampler = sampler
        self.window_ns = window_ns
        self.rate = max_per_s / 1e9  # tokens per ns
        self.burst = max(1.0, max_per_s * 0.05)
        self.tokens = self.burst
        self.last_ns = time.monotonic_ns()
        self.following = True
        self.me = os.getpid()
        self.busy: set[int] = set()
        self.heap: list[tuple[int, int, contract.Candidate, int, int, int]] = []
        self.rows: list[tuple[int, ...]] = []
        self.stats = FollowStats()
        self._seq = 0

    def on_record(self, data: bytes) -> None:
        st = self.stats
        st.records += 1
        if not self.following:
            st.late += 1
            return
        now = time.monotonic_ns()
        self.tokens = min(self.burst, self.tokens + (now - self.last_ns) * self.rate)
        self.last_ns = now
        if self.tokens < 1:
            st.rate_limited += 1
            return
        rec = contract.Candidate.from_buffer_copy(data)
        pid = rec.pid
        if pid == self.me:
            st.own += 1
            return
        if pid in self.busy:
            st.pid_busy += 1
            return
        self.tokens -= 1
        try:
            first = self.sampler.sample(pid)
        except SamplerError as e:
            st.errors += 1
            log.debug("%s", e)
            return
        if first is None:
            st.exited += 1
            return
        st.followed += 1
        self.busy.add(pid)
        self._seq += 1
        heapq.heappush(self.heap, (now + self.window_ns, self._seq, rec, now, *first))

    def pending(self) -> int:
        return len(self.heap)

    def next_due_ns(self) -> int | None:
        return self.heap[0][0] if self.heap else None

    def close_due(self, now: int) -> None:
        """Take the second sample of every window that is due."""
        st = self.stats
        while self.heap and self.heap[0][0] <= now:
            _, _, rec, t0, delay0, run0 = heapq.heappop(self.heap)
            self.busy.discard(rec.pid)
            try:
                second = self.sampler.sample(rec.pid)
            except SamplerError as e:
                st.errors += 1
                log.debug("%s", e)
                continue
            t1 = time.monotonic_ns()
            if second is None or second[0] < delay0 or second[1] < run0:
                st.exited += 1  # gone, or a new task with a recycled pid
                continue
            st.completed += 1
            lag = max(0, t0 - rec.ts_ns)
            st.lag_ns.append(lag)
            self.rows.append((
                rec.ts_ns, rec.pid, rec.cpu, rec.cpu_idle, rec.cpu_not_idle, rec.src_dom,
                rec.dst_dom, rec.src_load_q, rec.dst_load_q, rec.action, rec.source, lag,
                t1 - t0, second[0] - delay0, second[1] - run0, rec.path, rec.prob_q16,
            ))

    def columns(self) -> dict[str, np.ndarray]:
        names = MEASURED_COLUMNS
        table = np.array(self.rows, dtype=np.int64).reshape(-1, len(names))
        return {name: table[:, i] for i, name in enumerate(names)}


# --- labeling and writing -------------------------------------------------------------------


class PropensityDrift(Exception):
    """The kernel's prob_q16 disagrees with model_dir/fallback.py: one line."""


def _pct(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f} %)" if total else f"{n}"


def label_and_write(
    cols: dict[str, np.ndarray],
    output: Path,
    outcomes: Path | None,
    min_other: int,
    comments: list[str],
    idle_rows: str = "drop",
    late: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Label, write the dataset (and outcomes unless None); returns (labeled rows, migrate).

    cols holds the measured columns and the run's explore_q and fallback (one per row).
    idle_rows: "drop" or "label" (--idle-rows); late: (the window asked for, the most a row
    may be late), in ns (--max-late-ms), or None.
    """
    from model_dir.dataset import COLUMN_NAMES_V2, logging_columns, write_dataset

    idle_zero = idle_rows == "label"
    stalled = None
    if late is not None:
        window, most = late
        stalled = (cols["read_lag_ns"] > most) | (cols["window_ns"] > window + most)
    labels, levels = label_rows(cols, cols["delay_ns"], cols["run_ns"], min_other, idle_zero,
                                stalled)
    cols["label"], cols["label_level"] = labels.astype(np.int64), levels.astype(np.int64)
    n = len(labels)
    keep_rows = labels >= 0
    nr = int(keep_rows.sum())
    nr_migrate = int((labels == 1).sum())
    by_level = [int((levels == lv).sum()) for lv in range(len(LEVELS))]
    nr_idle = int((levels == LEVEL_IDLE).sum())
    nothing = (cols["delay_ns"] == 0) & (cols["run_ns"] == 0)
    nr_no_other = int((levels == LEVEL_NO_OTHER).sum())
    action = cols["action"]
    agree = int((action[keep_rows] == labels[keep_rows]).sum())
    summary = [
        f"labels: {nr} of {n} rows labeled: migrate {_pct(nr_migrate, nr)}, "
        f"keep {_pct(nr - nr_migrate, nr)}; the action taken was the label's in {_pct(agree, nr)}",
        "bucket levels: " + ", ".join(
            f"{name} {c}" for name, c in zip(LEVELS, by_level, strict=True)),
        f"dropped: {nr_no_other} without {min_other} rows of the other action in any bucket"
        + ("" if idle_zero else f", {nr_idle} whose task neither ran nor waited in the window")
        + ("" if late is None else
           f", {int((levels == LEVEL_STALLED).sum())} read or closed more than "
           f"{late[1] / 1e6:g} ms late (--max-late-ms: the VM itself did not run)")
        + ("" if not idle_zero else
           f"; {int(np.sum(nothing & (levels >= 0)))} rows whose task neither ran nor waited "
           "labeled with m = 0 (--idle-rows label)"),
    ]
    for line in summary:
        log.info("%s", line)
    rule = (
        f"label rule: m = run-queue delay / run time over the window; label 1 (migrate) when "
        f"the migrate side's m < the keep side's, one side the row's own m, the other the "
        f"median m of its bucket under the other action (>= {min_other} rows; bucket: key, "
        "else key without cpu, else (cpu_idle>0, src_load_q-dst_load_q)); ties: 0 (keep); "
        + ("a task that neither ran nor waited: m = 0" if idle_zero else
           "a task that neither ran nor waited: dropped")
    )
    header = [*comments, rule, *summary]
    if outcomes is not None:
        write_outcomes(outcomes, cols, tuple(header))
        log.info("outcomes: %d rows in %s", n, outcomes)
    if nr == 0:
        return 0, 0
    cols.update(logging_columns(cols, cols["explore_q"], cols["fallback"]))
    if "prob_q16" in cols:  # what the kernel itself said, in 1/65536 (rounded down)
        want = cols["propensity_q"] >> 1
        bad = np.flatnonzero(cols["prob_q16"] != want)
        if len(bad):
            i = int(bad[0])
            raise PropensityDrift(
                f"the kernel's propensities disagree with model_dir/fallback.py on {len(bad)} of "
                f"{n} rows (first: prob_q16 {cols['prob_q16'][i]}, expected {want[i]} for "
                f"action {cols['action'][i]}, source {cols['source'][i]}); dataset not "
                f"written, the outcomes are (relabel once the two agree)")
    explore = ", ".join(f"{q / contract.EXPLORE_SCALE:g} (explore_q {q})"
                        for q in np.unique(cols["explore_q"]))
    policy = ", ".join(contract.Fallback(int(f)).name.lower() for f in np.unique(cols["fallback"]))
    logging_line = (
        f"logging policy: fallback {policy}, else with probability P = {explore} a fair coin; "
        "propensity = propensity_q / 131072 = P/2 + (1 - P) when the fallback chose the action"
    )
    write_dataset(output, {c: cols[c][keep_rows] for c in COLUMN_NAMES_V2},
                  tuple(["mlsched-collect dataset, format v2 (model_dir/dataset.py)",
                         logging_line, *header]), version=2)
    log.info("dataset: %d rows in %s", nr, output)
    return nr, nr_migrate


def _late(args: argparse.Namespace) -> tuple[int, int] | None:
    """label_and_write()'s late: from --window-ms and --max-late-ms."""
    most = getattr(args, "max_late_ms", None)
    if most is None:
        return None
    return int(args.window_ms * 1e6), int(most * 1e6)


def relabel(args: argparse.Namespace) -> int:
    try:
        cols = read_outcomes(args.relabel)
    except OutcomesError as e:
        return fail(str(e))
    if not len(cols["ts_ns"]):
        return fail(f"{args.relabel}: no rows")
    if "path" not in cols:  # written before v2: wakeups only, no kernel propensities
        cols["path"] = np.zeros(len(cols["ts_ns"]), np.int64)
    if "explore_q" not in cols:
        if args.explore is None:
            return fail(f"{args.relabel} predates format v2 and does not say how it was collected: "
                        "give --explore P (and --fallback) as it was (its # lines say)")
        n = len(cols["ts_ns"])
        cols["explore_q"] = np.full(n, fallback.explore_q_for(args.explore))
        cols["fallback"] = np.full(n, int(contract.Fallback[args.fallback.upper()]))
    comments = [f"relabeled from {args.relabel}"]
    if "prob_q16" not in cols:
        chosen = fallback.fallback_migrate(cols["fallback"], cols["cpu_idle"], cols["src_load_q"],
                                           cols["dst_load_q"])
        cols["prob_q16"] = fallback.kernel_prob_q16(cols["action"], chosen, cols["explore_q"])
        comments.append("written before v2: prob_q16 computed from --explore and --fallback, "
                        "not recorded by the kernel")
    try:
        nr, _ = label_and_write(cols, args.output, args.outcomes, args.min_other, comments,
                                args.idle_rows, _late(args))
    except PropensityDrift as e:
        return fail(str(e), 1)
    if nr == 0:
        return fail("no row could be labeled (see above)", 1)
    return 0


# --- the collection run ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    out_dir = args.output.resolve().parent
    if not out_dir.is_dir():
        return fail(f"--output: directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        return fail(f"--output: directory {out_dir} is not writable")
    if args.output.is_dir():
        return fail(f"--output: {args.output} is a directory")
    if args.outcomes is None and args.relabel is None:
        args.outcomes = outcomes_path_for(args.output)
    if args.relabel is not None:
        return relabel(args)
    if args.explore is None:
        args.explore = DEFAULT_EXPLORE
    try:
        plan = cli.preflight(args)
    except cli.Refusal as e:
        return fail(str(e), e.status)
    return run(args, plan)


def _open_outcome_source(want: str, delayacct: Sysctl) -> Sampler:
    """The sampler; delay accounting is on while taskstats is the source."""
    if want != "schedstat" and delayacct.available():
        try:
            old = delayacct.set("1")
            log.info("%s = 1 for the run (was %s)", DELAYACCT, old)
        except OSError as e:
            log.warning("cannot set %s (%s); taskstats delays read as they are", DELAYACCT,
                        e.strerror)
    try:
        sampler, why = open_sampler(want)
    except SamplerError:
        delayacct.restore()
        raise
    if sampler.name != "taskstats" and delayacct.saved is not None:
        delayacct.restore()
        log.info("%s restored", DELAYACCT)
    me = os.getpid()
    t0 = time.perf_counter()
    for _ in range(20):
        sampler.sample(me)
    cost_us = (time.perf_counter() - t0) / 20 * 1e6
    log.info("outcome source: %s (%s); %.0f us per sample", sampler.detail, why, cost_us)
    return sampler


def run(args: argparse.Namespace, plan: DomainPlan) -> int:
    # From here on a signal must not leave anything behind: the sysctl, the scheduler, pins.
    stop = Stop()
    stop.install()
    delayacct = Sysctl(DELAYACCT)
    try:
        sampler = _open_outcome_source(args.outcome_source, delayacct)
    except (SamplerError, OSError) as e:
        return fail(f"--outcome-source {args.outcome_source}: {e}", 1)
    try:
        if stop.requested:
            log.info("%s before attaching: nothing collected", stop.signame)
            return 0
        return _collect(args, plan, sampler, delayacct, stop)
    finally:
        sampler.close()
        if delayacct.saved is not None:
            delayacct.restore()
            log.info("%s restored", DELAYACCT)


def _collect(args: argparse.Namespace, plan: DomainPlan, sampler: Sampler,
             delayacct: Sysctl, stop: Stop) -> int:
    from loader.bpfmaps import RingBufferReader
    from loader.libbpf import LibbpfError
    from loader.scheduler import Scheduler, SchedulerError, clean_stale_pins, settings

    explore_q = fallback.explore_q_for(args.explore)
    # mlsched-load's defaults for what collection does not set; no grid: every candidate is
    # pushed with the action the logging policy took.
    config = settings(plan, contract.Fallback[args.fallback.upper()], args.slice_us * 1000,
                      1_000_000_000, slice_min_ns=1_000_000, starve_ns=80_000_000,
                      batch_size=64, max_wait_ns=2_000_000, grid=None, explore_q=explore_q)
    try:
        clean_stale_pins(args.pin_dir)
        sched = Scheduler(args.bpf_obj, config, args.ringbuf_size, args.verbose)
    except (LibbpfError, SchedulerError) as e:
        return fail(str(e), 1)
    try:
        sched.attach()
        sched.pin(args.pin_dir)
    except (LibbpfError, SchedulerError, OSError) as e:
        sched.close()
        return fail(str(e), 1)
    from loader.stats import MapSampler, serve_stats

    serve_stats(args, MapSampler(sched, "(collection mode)").sample)
    nr_cpus = sum(len(d) for d in plan.domains)
    log.info("attached %s in collection mode: %d CPUs in %s; fallback %s, explore P = %g; "
             "collecting for %g s, window %g ms, following up to %d candidates/s",
             contract.SCHED_NAME, nr_cpus, plan.reason, args.fallback, args.explore,
             args.duration, args.window_ms, args.max_follow)

    follower = Follower(sampler, int(args.window_ms * 1e6), args.max_follow)
    reader = RingBufferReader(sched.ringbuf_fd, follower.on_record)
    status = 0
    t_start = time.monotonic()
    t_end = t_start + args.duration
    drain_deadline = None
    next_progress = t_start + PROGRESS_S
    next_check = t_start
    last_records = 0
    counters: list[int] = []
    try:
        while True:
            now = time.monotonic()
            if follower.following and (now >= t_end or stop.requested):
                follower.following = False
                drain_deadline = now + args.window_ms / 1000 * 2 + 1
                why = f"{stop.signame}: ending early" if stop.requested else "time is up"
                log.info("%s; closing the %d open windows", why, follower.pending())
            if not follower.following and (not follower.pending() or now > drain_deadline):
                break
            due = follower.next_due_ns()
            wait_ms = POLL_MS
            if due is not None:  # wake for the next window to close, rounded up to a ms
                left_ns = due - time.monotonic_ns()
                wait_ms = 0 if left_ns <= 0 else min(POLL_MS, -(-left_ns // 1_000_000))
            reader.poll(int(wait_ms))
            follower.close_due(time.monotonic_ns())
            now = time.monotonic()
            if now >= next_check:
                next_check = now + EXIT_CHECK_S
                sched.loader_stats.set(contract.LoaderStat.RECORDS, follower.stats.records)
                kind = sched.exit_kind()
                if kind:
                    _, text = sched.exit_report()
                    log.error("the kernel ejected mlsched: %s", text or f"exit kind {kind}")
                    status = 1
                    break
            if now >= next_progress:
                st = follower.stats
                rate = (st.records - last_records) / (now - next_progress + PROGRESS_S)
                last_records = st.records
                next_progress = now + PROGRESS_S
                log.info("t=%3.0f s: %d records (%.0f/s), followed %d, completed %d, open %d, "
                         "skipped %d (rate limit %d, task busy %d), exited %d",
                         now - t_start, st.records, rate, st.followed, st.completed,
                         follower.pending(), st.rate_limited + st.pid_busy, st.rate_limited,
                         st.pid_busy, st.exited)
        counters = sched.counters.read_all()
    finally:
        reader.close()
        sched.close()
    elapsed = time.monotonic() - t_start
    log.info("detached %s after %.1f s", contract.SCHED_NAME, elapsed)
    if status:
        return fail("the run failed; no dataset written", status)
    status = _finish(args, follower, sampler, counters, elapsed, plan, delayacct)
    if stop.requested:
        log.info("%s: stopped as asked", stop.signame)
        return 0  # an interrupted run is not a failed one, even with nothing to write
    return status


def _finish(args: argparse.Namespace, follower: Follower, sampler: Sampler, counters: list[int],
            elapsed: float, plan: DomainPlan, delayacct: Sysctl) -> int:
    st = follower.stats
    c = contract.Counter
    k = counters or [0] * contract.NR_COUNTERS
    lag = np.array(st.lag_ns or [0], dtype=np.float64) / 1e6
    lines = [
        f"collected {elapsed:.1f} s: {len(plan.domains)} domains of {plan.reason}; fallback "
        f"{args.fallback}, explore P {args.explore:g}, window {args.window_ms:g} ms, "
        f"max follow {args.max_follow}/s",
        f"outcome source: {sampler.detail}; {DELAYACCT} "
        + ("1 for the run" if sampler.name == "taskstats" and delayacct.saved is not None
           else "untouched"),
        f"kernel: {k[c.CANDIDATES]} candidates, {k[c.EXPLORED]} explored, actions migrate "
        f"{k[c.FALLBACK_MIGRATE]} / keep {k[c.FALLBACK_KEEP]}, ring drops {k[c.RB_DROPS]}",
        f"collector: {st.records} records read, {st.followed} followed, {st.completed} "
        f"completed; skipped {st.rate_limited} over the rate limit, {st.pid_busy} with the "
        f"task's window open, {st.own} own, {st.late} after the end; dropped {st.exited} "
        f"exited, {st.errors} sample errors",
        f"read lag (BPF timestamp -> record read): median {np.median(lag):.2f} ms, "
        f"p99 {np.percentile(lag, 99):.2f} ms",
    ]
    for line in lines:
        log.info("%s", line)
    if not st.completed:
        return fail("no followed candidate completed its window (was there a load?); "
                    "nothing written", 1)
    cols = follower.columns()
    n = len(cols["action"])
    cols["explore_q"] = np.full(n, fallback.explore_q_for(args.explore))
    cols["fallback"] = np.full(n, int(contract.Fallback[args.fallback.upper()]))
    nr_migrate_action = int(cols["action"].sum())
    log.info("rows: %d, action migrate %d / keep %d", len(cols["action"]), nr_migrate_action,
             len(cols["action"]) - nr_migrate_action)
    try:
        nr, _ = label_and_write(cols, args.output, args.outcomes, args.min_other, lines,
                                getattr(args, "idle_rows", "drop"), _late(args))
    except PropensityDrift as e:
        return fail(str(e), 1)
    if nr == 0:
        return fail("no row could be labeled (see above); dataset not written", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
