"""What a task went through after a migration decision, and which action that makes the better.

Two halves of mlsched-collect that need no sched_ext (so the host tests cover them):

- Samplers read a task's cumulative run-queue delay and run time, in ns:
  TaskstatsSampler over the kernel's genetlink TASKSTATS family (pyroute2), SchedstatSampler
  from /proc/<pid>/schedstat. Both report the same kernel counters (sched_info.run_delay and
  se.sum_exec_runtime); taskstats is the interface meant for it, schedstat the fallback.
- label_rows() applies the labeling rule (tools/collect.md) to the outcomes.

Why TaskstatsSampler sends its own requests: pyroute2's TaskStats.get_pid_stat() runs an
asyncio loop per call: 0.25 ms on the host and 5.4 ms in the TCG guest (measured), which would
cap the collector at a few dozen tasks a second and load the machine it measures. pyroute2
resolves the family, encodes the request (its `tcmd` message) and reads one reference sample
at start; each sample is then that request sent on a plain genetlink socket, its reply read at
the fixed offsets of struct taskstats (5 us on the host), checked against pyroute2's decoding.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from loader import schema

# --- samplers -------------------------------------------------------------------------------


class SamplerError(Exception):
    """A sampler could not be opened or failed; str() is one line."""


class Sampler(Protocol):
    name: str
    detail: str  # one line for the output and the dataset's comments

    def sample(self, pid: int) -> tuple[int, int] | None:
        """(run-queue delay ns, run time ns) of task pid so far; None when it has exited."""
        ...

    def close(self) -> None: ...


class SchedstatSampler:
    """/proc/<pid>/schedstat: 'run_ns run_delay_ns timeslices' (any task id, not only tgids)."""

    name = "schedstat"

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.detail = f"{proc}/<pid>/schedstat (run time, run-queue delay)"
        if self.sample(os.getpid()) is None:
            raise SamplerError(f"cannot read {proc}/{os.getpid()}/schedstat")

    def sample(self, pid: int) -> tuple[int, int] | None:
        try:
            fd = os.open(f"{self.proc}/{pid}/schedstat", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            return None
        try:
            data = os.read(fd, 128)
        except ProcessLookupError:
            return None
        finally:
            os.close(fd)
        fields = data.split()
        if len(fields) < 2:
            return None  # the task went while we read
        return int(fields[1]), int(fields[0])

    def close(self) -> None:
        pass


NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENLMSGHDR_LEN = 4
NLA_HDR = struct.Struct("=HH")  # len, type
NLA_TYPE_MASK = 0x3FFF
TASKSTATS_TYPE_STATS = 3
TASKSTATS_TYPE_AGGR_PID = 4
# Offsets in struct taskstats (linux/taskstats.h; fields are only ever appended).
TS_VERSION = struct.Struct("=H")
TS_CPU_DELAY_TOTAL = 24
TS_CPU_RUN_VIRTUAL_TOTAL = 72
TS_AC_PID = 128
TS_MIN_LEN = TS_AC_PID + 4
U64 = struct.Struct("=Q")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes in data[start:end]: type -> (payload start, payload end)."""
    out: dict[int, tuple[int, int]] = {}
    off = start
    while off + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size:
            break
        out[kind & NLA_TYPE_MASK] = (off + NLA_HDR.size, off + length)
        off += (length + 3) & ~3
    return out


class TaskstatsSampler:
    """Per-task delay accounting over genetlink TASKSTATS (see the module docstring)."""

    name = "taskstats"

    def __init__(self) -> None:
        try:
            from pyroute2 import TaskStats
            from pyroute2.netlink import NLM_F_REQUEST
            from pyroute2.netlink.taskstats import TASKSTATS_CMD_GET, tcmd
        except ImportError as e:
            raise SamplerError(f"pyroute2 is not installed ({e})") from None
        me = os.getpid()
        ts = TaskStats()
        try:
            ts.bind()
            self.family = int(ts.prid)
            reply = ts.get_pid_stat(me)[0]
            ref = reply.get_attr("TASKSTATS_TYPE_AGGR_PID").get_attr("TASKSTATS_TYPE_STATS")
        except Exception as e:  # pyroute2 raises NetlinkError, OSError, KeyError...
            raise SamplerError(f"taskstats unavailable: {type(e).__name__}: {e}") from None
        finally:
            ts.close()
        msg = tcmd()
        msg["cmd"] = TASKSTATS_CMD_GET
        msg["version"] = 1
        msg["attrs"].append(["TASKSTATS_CMD_ATTR_PID", me])
        msg["header"]["type"] = self.family
        msg["header"]["flags"] = NLM_F_REQUEST
        msg.encode()
        self._request = bytearray(msg.data)
        self._pid_off = len(self._request) - U32.size  # the PID attribute comes last
        if U32.unpack_from(self._request, self._pid_off)[0] != me:
            raise SamplerError("taskstats: unexpected request layout from pyroute2")
        self._seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.settimeout(1.0)
        got = self.sample(me)
        if (
            got is None
            or not 0 <= got[0] - ref["cpu_delay_total"] < 10**10
            or not 0 <= got[1] - ref["cpu_run_virtual_total"] < 10**10
        ):
            self.close()
            raise SamplerError(
                f"taskstats: own reading {got} disagrees with pyroute2's "
                f"({ref['cpu_delay_total']}, {ref['cpu_run_virtual_total']})"
            )
        self.version = int(ref["version"])
        self.detail = (
            f"taskstats (genetlink family {self.family}, struct taskstats v{self.version}: "
            "cpu_delay_total, cpu_run_virtual_total)"
        )

    def sample(self, pid: int) -> tuple[int, int] | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        U32.pack_into(self._request, 8, self._seq)
        U32.pack_into(self._request, self._pid_off, pid)
        try:
            self.sock.send(self._request)
            while True:
                data = self.sock.recv(4096)
                _, kind, _, seq, _ = NLMSGHDR.unpack_from(data, 0)
                if seq == self._seq:
                    break
        except OSError as e:
            raise SamplerError(f"taskstats: {e}") from None
        if kind == NLMSG_ERROR:
            err = -I32.unpack_from(data, NLMSGHDR.size)[0]
            if err == errno.ESRCH:
                return None
            raise SamplerError(f"taskstats of pid {pid}: {os.strerror(err)}")
        top = _attrs(data, NLMSGHDR.size + GENLMSGHDR_LEN, len(data))
        if TASKSTATS_TYPE_AGGR_PID not in top:
            raise SamplerError(f"taskstats of pid {pid}: no TASKSTATS_TYPE_AGGR_PID in reply")
        inner = _attrs(data, *top[TASKSTATS_TYPE_AGGR_PID])
        start, end = inner.get(TASKSTATS_TYPE_STATS, (0, 0))
        if end - start < TS_MIN_LEN:
            raise SamplerError(f"taskstats of pid {pid}: short struct taskstats")
        if U32.unpack_from(data, start + TS_AC_PID)[0] != pid:
            return None  # not the task we asked about (pid reuse in between)
        delay = U64.unpack_from(data, start + TS_CPU_DELAY_TOTAL)[0]
        run = U64.unpack_from(data, start + TS_CPU_RUN_VIRTUAL_TOTAL)[0]
        return delay, run

    def close(self) -> None:
        self.sock.close()


def open_sampler(want: str) -> tuple[Sampler, str]:
    """The sampler for --outcome-source (auto: taskstats, else schedstat) and why."""
    if want in ("auto", "taskstats"):
        try:
            return TaskstatsSampler(), "taskstats works"
        except SamplerError as e:
            if want == "taskstats":
                raise
            reason = str(e)
    else:
        reason = "requested"
    return SchedstatSampler(), f"schedstat: {reason}"


class Sysctl:
    """Set a sysctl for the run and put the old value back (restore() is safe to repeat)."""

    def __init__(self, name: str, root: str = "/proc/sys") -> None:
        self.name = name
        self.path = Path(root, *name.split("."))
        self.saved: str | None = None

    def available(self) -> bool:
        return self.path.exists()

    def set(self, value: str) -> str:
        """Write value; returns the value it had."""
        old = self.path.read_text().strip()
        if old != value:
            self.path.write_text(value)
            self.saved = old
        return old

    def restore(self) -> None:
        if self.saved is not None:
            self.path.write_text(self.saved)
            self.saved = None


# --- labeling -------------------------------------------------------------------------------

MIN_OTHER = 5  # observations of the other action a bucket needs for its median to count
LEVELS = ("key", "key without cpu", "cpu_idle>0 and load gap")
LEVEL_NO_OTHER = -1  # no bucket had MIN_OTHER observations of the other action: dropped
LEVEL_IDLE = -2  # the task neither ran nor waited in the window: no outcome, dropped
LEVEL_STALLED = -3  # read or closed too late (mlsched-collect --max-late-ms): not measured


def delay_per_run(delay_ns: np.ndarray, run_ns: np.ndarray) -> np.ndarray:
    """Run-queue delay per ns of run time; inf when it only waited, nan when it did neither."""
    delay = np.asarray(delay_ns, dtype=np.float64)
    run = np.asarray(run_ns, dtype=np.float64)
    ratio = delay / np.where(run > 0, run, 1.0)
    only_waited = np.where(delay > 0, np.inf, np.nan)
    return np.where(run > 0, ratio, only_waited)


def bucket_ids(cols: Mapping[str, np.ndarray], level: int) -> np.ndarray:
    """The bucket of every row at a level of LEVELS, as one integer."""
    if level == 0:
        return schema.pack_columns(cols).astype(np.int64)
    if level == 1:
        return schema.pack_columns({**cols, "cpu": 0}).astype(np.int64)
    f = {k: np.asarray(cols[k], dtype=np.int64) for k in ("cpu_idle", "src_load_q", "dst_load_q")}
    if level == 2:
        return ((f["cpu_idle"] > 0).astype(np.int64) << 8) | (f["src_load_q"] - f["dst_load_q"])
    raise ValueError(f"no bucket level {level}")


def _medians(ids: np.ndarray, values: np.ndarray) -> dict[int, tuple[float, int]]:
    """bucket id -> (median of values, count)."""
    out: dict[int, tuple[float, int]] = {}
    if not len(ids):
        return out
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    uniq, starts = np.unique(ids, return_index=True)
    ends = np.append(starts[1:], len(ids))
    for bucket, lo, hi in zip(uniq.tolist(), starts.tolist(), ends.tolist(), strict=True):
        out[bucket] = (float(np.median(values[lo:hi])), hi - lo)
    return out


def label_rows(
    cols: Mapping[str, np.ndarray],
    delay_ns: np.ndarray,
    run_ns: np.ndarray,
    min_other: int = MIN_OTHER,
    idle_zero: bool = False,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 migrate, 0 keep, -1 dropped) and the bucket level each came from.

    The rule (tools/collect.md): a row's outcome is m = run-queue delay / run time of
    the task over the window. Its counterpart is the median m of the rows of the same bucket
    that took the other action. The label is migrate when the migrate side's m (the row's own
    if it migrated, else the median) is strictly lower than the keep side's; keep otherwise,
    so that ties (often both zero) go to keeping the task where its cache is. The bucket is
    the decision key; when that has fewer than min_other rows of the other action, the key
    without the CPU; then (cpu_idle > 0, src_load_q - dst_load_q), the heuristic's own inputs;
    else the row is dropped (level -1). Rows whose task did nothing in the window: level -2,
    unless idle_zero: then their m is 0 (the task lost nothing) and they are labeled like the
    others (mlsched-collect --idle-rows label: whether a task sleeps through its window
    depends on the action, so dropping those rows biases a policy's estimated cost).
    Rows where exclude is True are neither labeled nor part of any median: level -3.
    """
    action = np.asarray(cols["action"], dtype=np.int64)
    metric = delay_per_run(delay_ns, run_ns)
    if idle_zero:
        metric = np.where(np.isnan(metric), 0.0, metric)
    n = len(action)
    labels = np.full(n, -1, np.int8)
    level_of = np.full(n, LEVEL_NO_OTHER, np.int8)
    active = ~np.isnan(metric)
    level_of[~active] = LEVEL_IDLE
    if exclude is not None:
        active &= ~np.asarray(exclude, bool)
        level_of[np.asarray(exclude, bool)] = LEVEL_STALLED
    todo = active.copy()
    for level in range(len(LEVELS)):
        if not todo.any():
            break
        ids = bucket_ids(cols, level)
        med = [_medians(ids[active & (action == a)], metric[active & (action == a)])
               for a in (0, 1)]
        for i in np.flatnonzero(todo).tolist():
            a = int(action[i])
            other = med[1 - a].get(int(ids[i]))
            if other is None or other[1] < min_other:
                continue
            own = float(metric[i])
            migrate_m, keep_m = (own, other[0]) if a == 1 else (other[0], own)
            labels[i] = 1 if migrate_m < keep_m else 0
            level_of[i] = level
            todo[i] = False
    return labels, level_of


# --- the outcomes file ------------------------------------------------------------------------

# Every followed candidate whose window completed, labeled or not: the raw material of the
# labels, so that they can be recomputed (mlsched-collect --relabel) without a new run. The first
# eleven columns are the dataset's (model_dir/README.md), then the measurements, in ns, the
# labels, and the logging policy of the run (the explore and fallback_policy settings), from which
# the dataset's propensities follow. Files written before the logging policy was recorded
# have the first seventeen columns only (OUTCOME_COLUMNS_V1).
OUTCOME_COLUMNS_V1 = (
    "ts_ns", "pid", "cpu", "cpu_idle", "cpu_not_idle", "src_dom", "dst_dom", "src_load_q",
    "dst_load_q", "action", "source", "read_lag_ns", "window_ns", "delay_ns", "run_ns",
    "label", "label_level",
)
# Since v2 also the record's path (wakeup or steal) and the kernel's own prob_q16.
OUTCOME_COLUMNS = (*OUTCOME_COLUMNS_V1, "path", "prob_q16", "explore_q", "fallback")
OUTCOME_HEADER = ",".join(OUTCOME_COLUMNS)
OUTCOME_HEADER_V1 = ",".join(OUTCOME_COLUMNS_V1)
MEASURED_COLUMNS = (*OUTCOME_COLUMNS_V1[:-2], "path", "prob_q16")  # a followed record's row


class OutcomesError(ValueError):
    """A malformed outcomes file; str() is one line."""


def outcomes_path_for(dataset: Path) -> Path:
    """candidates.csv -> candidates.outcomes.csv (.csv.gz -> .outcomes.csv.gz)."""
    name = dataset.name
    for ext in (".csv.gz", ".csv"):
        if name.endswith(ext):
            return dataset.with_name(name[: -len(ext)] + ".outcomes" + ext)
    return dataset.with_name(name + ".outcomes.csv")


def write_outcomes(path: Path, cols: Mapping[str, np.ndarray], comments: tuple[str, ...]) -> None:
    from model_dir.dataset import _open_text

    table = np.stack([np.asarray(cols[c]).astype(np.int64) for c in OUTCOME_COLUMNS], 1)
    with _open_text(path, "w") as f:
        for line in comments:
            f.write(f"# {line}\n")
        f.write(OUTCOME_HEADER + "\n")
        np.savetxt(f, table, fmt="%d", delimiter=",")


def read_outcomes(path: Path) -> dict[str, np.ndarray]:
    """The columns of an outcomes file; path, prob_q16, explore_q and fallback only when the
    file has them (written since dataset v2)."""
    from model_dir.dataset import _open_text

    if not path.is_file():
        raise OutcomesError(f"outcomes file not found at {path}")
    try:
        with _open_text(path, "r") as f:
            lines = [ln for ln in f.read().splitlines() if ln and not ln.startswith("#")]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise OutcomesError(f"{path}: cannot read it ({e})") from None
    header = lines[0].replace(" ", "") if lines else ""
    names = {OUTCOME_HEADER: OUTCOME_COLUMNS, OUTCOME_HEADER_V1: OUTCOME_COLUMNS_V1}.get(header)
    if names is None:
        raise OutcomesError(f"{path}: not an outcomes file (expected the header {OUTCOME_HEADER})")
    try:
        table = np.array([[int(v) for v in ln.split(",")] for ln in lines[1:]], dtype=np.int64)
    except ValueError:
        raise OutcomesError(f"{path}: a field is not an integer") from None
    table = table.reshape(-1, len(names)) if table.size == 0 else table
    if table.ndim != 2 or table.shape[1] != len(names):
        raise OutcomesError(f"{path}: expected rows of {len(names)} fields")
    return {c: table[:, i] for i, c in enumerate(names)}

