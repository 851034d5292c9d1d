"""What mlsched measures: every stats field, declared once, and how one interval is computed.

FIELDS is the one place a field is named, typed and described. From it come the scx_stats
metadata the loader serves (meta(), the `stats_meta` request), the interval figures
(compute(), the `stats` request: two raw samples of the maps, Sample, taken by MapSampler),
the text block of `mlsched-load --stats` and `mlsched-stats` (render_text), the OpenMetrics
names and the field table of tools/README.md (tools/stats.py).

Rates are deltas between the two samples divided by the time between them. Latency
percentiles come from the delta of the loader's log2 histograms: the value reported is the
upper bound of the bucket holding the percentile (bucket b is [2^b, 2^(b+1)) ns), so it never
understates and is at most 2x the true value. A figure with nothing to measure this interval
(no candidate, no batch) is left out of the answer, as scx_stats clients expect numbers.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loader import contract

C = contract.Counter
LS = contract.LoaderStat
TOP = "mlsched_stats"  # the scx_stats top-level struct
DOM = "dom_stats"


@dataclass(frozen=True)
class Field:
    name: str  # JSON key; the OpenMetrics name is "mlsched_" + name
    unit: str
    kind: str  # "meta" (JSON only), "label", "gauge" or "counter" (name ends in _total)
    help: str
    datum: str = "float"  # scx_stats type: u64, float or string

    def meta(self) -> dict[str, Any]:
        user = {"_unit": self.unit, "_om_kind": self.kind}
        if self.kind in ("meta", "label"):
            user["_om_skip"] = "true"
        return {"datum": self.datum, "desc": self.help, "user": user}


# Every field: name, unit, kind, scx_stats datum, description. Kinds: meta (JSON only), label
# (a string), gauge, and event: an enum member counted since attach (a Counter of the kernel's
# or a LoaderStat of the loader's, by its lowercased name), which gives NAME_total (a counter)
# and NAME_per_s (a gauge).
_TABLE = """
time                 s       meta  float  Unix time of the interval's second sample
interval_s           s       gauge float  seconds between the two samples the rates come from
state                -       label string sched_ext state (/sys/kernel/sched_ext/state)
ops                  -       label string attached sched_ext scheduler
                                          (/sys/kernel/sched_ext/root/ops)
model                -       label string model directory the loader serves (its --model)
backend              -       label string inference backend: none (model not loaded yet), tf, numpy
fallback             -       label string policy for undecided candidates: keep, migrate, heuristic
loader_pid           pid     gauge u64    pid of mlsched-load
uptime_s             s       gauge float  seconds since the loader attached the scheduler
model_ready          0/1     gauge u64    1 once the model serves decisions, else 0
nr_cpus              CPUs    gauge u64    CPUs the scheduling domains cover
nr_doms              domains gauge u64    scheduling domains
select               events  event u64    select_cpu calls (task wakeups)
local                events  event u64    wakeups that found an idle CPU in their domain and stayed
no_candidate         events  event u64    wakeups that stayed: no less loaded domain
candidates           events  event u64    migration candidates built (the model's questions)
hits                 events  event u64    candidates whose key had a decision in the map
misses               events  event u64    candidates whose key had no decision yet
migrate              events  event u64    hits the model said to migrate
keep                 events  event u64    hits the model said to keep on their domain
fallback_migrate     events  event u64    misses the fallback policy migrated
fallback_keep        events  event u64    misses the fallback policy kept
submitted            events  event u64    candidates pushed to the ring buffer
rb_wakeups           events  event u64    candidates pushed with a wakeup of the loader
rb_drops             events  event u64    candidates not pushed: ring buffer full
steal_candidates     events  event u64    candidates built when an idle CPU eyed another domain's
                                          queue
migr_model           events  event u64    cross-domain moves a model decision made
migr_fallback        events  event u64    cross-domain moves the fallback policy (or a coin flip)
                                          made
migr_forced          events  event u64    steals of a task queued past the starvation guard,
                                          whatever the decision
migr_domain          events  event u64    moves inside a domain: to an idle sibling on wakeup, or
                                          pulled by one
ran_cross            events  event u64    runs on a CPU of another domain than the last run
ran_cross_decided    events  event u64    of ran_cross: runs whose move across domains a decision
                                          (model or fallback) made
ran_domain           events  event u64    runs on another CPU of the same domain
preempts             events  event u64    woken tasks that preempted a task a slice ahead
restricted           events  event u64    wakeups of tasks that may not use every CPU of their
                                          domain (kernel's placement)
explored             events  event u64    candidates decided by a coin flip (collection mode)
kinfer               events  event u64    misses the scheduler decided itself (--inference kernel)
kinfer_ns            events  event u64    time spent in those in-kernel inferences, ns
loader_wakeups       events  event u64    wakeups of the loader, run ahead of the queue
records              events  event u64    candidate records the loader read from the ring buffer
batches              events  event u64    model batches run
decisions            events  event u64    decisions written to the decision map
model_errors         events  event u64    batches whose decisions were not written
restarts             events  event u64    re-attaches after a CPU hotplug exit
reloads              events  event u64    models switched in on SIGHUP
reload_failures      events  event u64    SIGHUPs whose new model was refused
hit_rate             0..1    gauge float  hits / candidates over the interval (absent when no
                                          candidate)
decided_share        0..1    gauge float  ran_cross_decided / ran_cross over the interval: the share
                                          of runs on another domain that a decision sent there
                                          (absent when none)
kinfer_avg_ns        ns      gauge float  mean in-kernel inference time over the interval (absent
                                          when none)
model_digest         hex     label string first 16 hex digits of the serving model's sha256
grid_keys            keys    gauge u64    keys of the dense decision grid (0: hash only)
grid_decided         keys    gauge u64    grid keys holding a decision
table_entries        keys    gauge u64    decisions in the table: the grid's and the hash's
table_capacity       keys    gauge u64    size of the decision map
table_occupancy      0..1    gauge float  table_entries / table_capacity
batch_size_avg       keys    gauge float  decisions per model batch over the interval
batch_latency_p50_us us      gauge float  median model call + map update per batch over the interval
                                          (bucket bound)
batch_latency_p99_us us      gauge float  99th percentile of batch latency over the interval (bucket
                                          bound)
batch_latency_avg_us us      gauge float  mean batch latency over the interval
batch_latency_max_us us      gauge float  slowest batch since attach
event_latency_p50_us us      gauge float  median candidate pushed -> decision in the map, over the
                                          interval (bucket bound)
event_latency_p99_us us      gauge float  99th percentile of event -> decision latency over the
                                          interval (bucket bound)
event_latency_avg_us us      gauge float  mean event -> decision latency over the interval
"""
# Per-domain fields: "domains": {"<dom>": {NAME: value, ...}}; OpenMetrics mlsched_dom_NAME{dom=}.
_DOM_TABLE = """
nr_cpus              CPUs    gauge u64    CPUs in the domain
load                 0..1    gauge float  domain load: busy CPUs plus queued tasks, per CPU, scaled
queued               tasks   gauge u64    tasks waiting in the domain's queue
"""


def _rows(table: str) -> list[tuple[str, str, str, str, str]]:
    """The table's rows; an indented line continues the description above it."""
    rows: list[list[str]] = []
    for line in table.strip("\n").splitlines():
        if line.startswith(" "):
            rows[-1][4] += " " + line.strip()
        else:
            rows.append(line.split(None, 4))
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


# The events: (name, "counters" or "loader", index in that array, description).
COUNTED: tuple[tuple[str, str, int, str], ...] = tuple(
    (name, "counters", C[name.upper()], desc) if name.upper() in C.__members__
    else (name, "loader", LS[name.upper()], desc)
    for name, _, kind, _, desc in _rows(_TABLE) if kind == "event"
)


def _fields(table: str) -> tuple[Field, ...]:
    out = []
    for name, unit, kind, datum, desc in _rows(table):
        unit = "" if unit == "-" else unit
        if kind == "event":
            out.append(Field(f"{name}_total", unit, "counter", f"{desc}, since attach", datum))
            out.append(Field(f"{name}_per_s", "1/s", "gauge", f"{desc}, per second"))
        else:
            out.append(Field(name, unit, kind, desc, datum))
    return tuple(out)


FIELDS = _fields(_TABLE)
DOM_FIELDS = _fields(_DOM_TABLE)
FIELD_NAMES = tuple(f.name for f in FIELDS)


def meta() -> dict[str, Any]:
    """The answer to scx_stats' `stats_meta`: the two structs and their fields."""
    top_fields = {f.name: f.meta() for f in FIELDS}
    top_fields["domains"] = {"desc": "per-domain figures, by domain id",
                             "dict": {"key": "u64", "datum": {"struct": DOM}}}
    return {
        TOP: {"name": TOP, "desc": "mlsched: model-driven migration, one interval", "top": "true",
              "user": {"_om_prefix": "mlsched_"}, "fields": top_fields},
        DOM: {"name": DOM, "desc": "one scheduling domain",
              "user": {"_om_prefix": "mlsched_dom_", "_om_label": "dom"},
              "fields": {f.name: f.meta() for f in DOM_FIELDS}},
    }


@dataclass
class Sample:
    """The raw contents of the maps at one moment (cumulative counts since attach)."""

    mono_ns: int  # CLOCK_MONOTONIC, like the loader's START_NS
    wall_s: float
    state: str
    ops: str
    model: str
    counters: list[int]  # indexed by contract.Counter
    loader: list[int]  # indexed by contract.LoaderStat
    config: dict[str, int]  # the scheduler's settings (nr_cpus, nr_doms, fallback_policy)
    hist: list[list[int]]  # [contract.Hist][HIST_BUCKETS]
    doms: list[tuple[int, int, int]] = field(default_factory=list)  # nr_cpus, load_q, queued
    table_capacity: int = 0


def bucket_upper_us(b: int) -> float:
    """Upper bound of log2 bucket b ([2^b, 2^(b+1)) ns), in µs."""
    return float(2 ** (b + 1)) / 1000.0


def percentile_us(counts: list[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a log2 histogram, as its bucket's upper bound in µs."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for b, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return bucket_upper_us(b)
    return bucket_upper_us(len(counts) - 1)


def _enum_name(enum: type, value: int) -> str:
    try:
        return enum(value).name.lower()
    except ValueError:
        return str(value)


def compute(prev: Sample, cur: Sample) -> dict[str, Any]:
    """One interval's figures, keyed by FIELDS names, figures with no value left out, plus
    "domains": {"<dom>": {<DOM_FIELDS>}}."""
    dt = max(cur.mono_ns - prev.mono_ns, 1) / 1e9

    def delta(src: str, index: int) -> int:
        return max(getattr(cur, src)[index] - getattr(prev, src)[index], 0)  # a restart resets

    def ratio(num: float, den: float, digits: int) -> float | None:
        return round(num / den, digits) if den > 0 else None

    def hist_delta(h: contract.Hist) -> list[int]:
        return [max(b - a, 0) for a, b in zip(prev.hist[h], cur.hist[h], strict=True)]

    start, ls = cur.loader[LS.START_NS], cur.loader
    out: dict[str, Any] = {
        "time": round(cur.wall_s, 3), "interval_s": round(dt, 3), "state": cur.state,
        "ops": cur.ops, "model": cur.model,
        "backend": _enum_name(contract.Backend, ls[LS.BACKEND]),
        "fallback": _enum_name(contract.Fallback, cur.config["fallback_policy"]),
        "loader_pid": ls[LS.LOADER_PID],
        "uptime_s": round(max(cur.mono_ns - start, 0) / 1e9, 1) if start else None,
        "model_ready": ls[LS.MODEL_READY],
        "nr_cpus": cur.config["nr_cpus"],
        "nr_doms": cur.config["nr_doms"],
    }
    for name, src, index, _ in COUNTED:
        out[f"{name}_total"] = getattr(cur, src)[index]
        out[f"{name}_per_s"] = round(delta(src, index) / dt, 2)
    batches, decisions = delta("loader", LS.BATCHES), delta("loader", LS.DECISIONS)
    h_batch, h_event = hist_delta(contract.Hist.BATCH), hist_delta(contract.Hist.EVENT)
    decided = delta("counters", C.RAN_CROSS_DECIDED)
    cross = delta("counters", C.RAN_CROSS)
    out.update({
        "hit_rate": ratio(delta("counters", C.HITS), delta("counters", C.CANDIDATES), 4),
        "decided_share": None if not cross else round(min(decided / cross, 1.0), 4),
        "kinfer_avg_ns": ratio(delta("counters", C.KINFER_NS), delta("counters", C.KINFER), 0),
        "model_digest": f"{ls[LS.MODEL_DIGEST]:016x}",
        "grid_keys": ls[LS.GRID_KEYS],
        "grid_decided": ls[LS.GRID_DECIDED],
        "table_entries": ls[LS.TABLE_ENTRIES],
        "table_capacity": cur.table_capacity,
        "table_occupancy": ratio(ls[LS.TABLE_ENTRIES], cur.table_capacity, 4),
        "batch_size_avg": ratio(decisions, batches, 2),
        "batch_latency_p50_us": percentile_us(h_batch, 0.50),
        "batch_latency_p99_us": percentile_us(h_batch, 0.99),
        "batch_latency_avg_us": ratio(delta("loader", LS.BATCH_NS_SUM) / 1000, batches, 3),
        "batch_latency_max_us": round(ls[LS.BATCH_NS_MAX] / 1000, 3) if ls[LS.BATCHES] else None,
        "event_latency_p50_us": percentile_us(h_event, 0.50),
        "event_latency_p99_us": percentile_us(h_event, 0.99),
        "event_latency_avg_us": ratio(delta("loader", LS.EV_LAT_NS_SUM) / 1000, decisions, 3),
    })
    out = {k: v for k, v in out.items() if v is not None}
    out["domains"] = {
        str(d): {"nr_cpus": nr, "load": round(q / contract.LOAD_SCALE, 4), "queued": queued}
        for d, (nr, q, queued) in enumerate(cur.doms)
    }
    return out


# --- the text block ---------------------------------------------------------------------------


def _rate(v: object) -> str:
    return f"{v:.1f}/s" if isinstance(v, int | float) else "-"


def _us(v: object) -> str:
    if not isinstance(v, int | float):
        return "-"
    if v < 10:
        return f"{v:.1f}us"
    return f"{v:.0f}us" if v < 10000 else f"{v / 1000:.0f}ms"


def _pct(v: object) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{100 * v:.2f}%" if 0 < v < 0.01 else f"{100 * v:.1f}%"


def render_text(r: dict[str, Any]) -> str:
    """A block that fits a terminal, one concern per line (like scx_rusty --monitor)."""
    s: dict[str, Any] = {name: "-" for name in FIELD_NAMES} | r
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("time", 0))))
    ready = "model ready" if r.get("model_ready") else "model loading (fallback serves)"
    lines = [
        f"###### {stamp}  {r.get('ops') or '-'} {s['state']}  "
        f"interval {r.get('interval_s', 0):.1f} s ######",
        f"loader     pid {s['loader_pid']}  up {s['uptime_s']} s  {ready} ({s['backend']})  "
        f"fallback {s['fallback']}",
        f"model      {s['model']}  digest {s['model_digest']}"
        + (f"  in-kernel {_rate(s['kinfer_per_s'])} avg {s['kinfer_avg_ns']} ns"
           if r.get("kinfer_total") else "")
        + (f"  reloads {s['reloads_total']} (refused {s['reload_failures_total']})"
           if r.get("reloads_total") or r.get("reload_failures_total") else ""),
        f"decide     cand {_rate(s['candidates_per_s'])}  hit {_pct(s['hit_rate'])}  "
        f"migrate {_rate(s['migrate_per_s'])}  keep {_rate(s['keep_per_s'])}  "
        f"fallback {_rate(s['fallback_migrate_per_s'])} migr + "
        f"{_rate(s['fallback_keep_per_s'])} keep"
        + (f"  explored {_rate(s['explored_per_s'])}" if r.get("explored_total") else ""),
        f"table      written {_rate(s['decisions_per_s'])} (total {s['decisions_total']})  "
        f"entries {s['table_entries']}/{s['table_capacity']} ({_pct(s['table_occupancy'])})"
        + (f"  grid {s['grid_decided']}/{s['grid_keys']}" if r.get("grid_keys") else ""),
        f"ring       submitted {_rate(s['submitted_per_s'])}  read {_rate(s['records_per_s'])}  "
        f"wakeups {_rate(s['rb_wakeups_per_s'])}  "
        f"drops {_rate(s['rb_drops_per_s'])} (total {s['rb_drops_total']})",
        f"batch      {_rate(s['batches_per_s'])}  size {s['batch_size_avg']}  latency p50 "
        f"{_us(s['batch_latency_p50_us'])} p99 {_us(s['batch_latency_p99_us'])} "
        f"avg {_us(s['batch_latency_avg_us'])} max {_us(s['batch_latency_max_us'])}  "
        f"errors {s['model_errors_total']}",
        f"event->map latency p50 {_us(s['event_latency_p50_us'])} "
        f"p99 {_us(s['event_latency_p99_us'])} avg {_us(s['event_latency_avg_us'])}",
        f"moves      model {_rate(s['migr_model_per_s'])}  fallback "
        f"{_rate(s['migr_fallback_per_s'])}  forced {_rate(s['migr_forced_per_s'])}  "
        f"in-domain {_rate(s['migr_domain_per_s'])}  decided {_pct(s['decided_share'])} of "
        f"{_rate(s['ran_cross_per_s'])} cross-domain runs",
        f"wakeups    {_rate(s['select_per_s'])} (prev CPU idle {_rate(s['local_per_s'])})  "
        f"steal cand {_rate(s['steal_candidates_per_s'])}  preempts {_rate(s['preempts_per_s'])}  "
        f"restricted {_rate(s['restricted_per_s'])}  restarts {s['restarts_total']}",
    ]
    for d, dom in (r.get("domains") or {}).items():
        lines.append(f"dom{d:<7} cpus {dom['nr_cpus']}  load {dom['load']:.2f}  "
                     f"queued {dom['queued']}")
    return "\n".join(lines)


# --- sampling the maps ------------------------------------------------------------------------


class MapSampler:
    """Takes Samples of a scheduler's maps through fds of its own (dups of the scheduler's), so
    the stats server can read them on its thread while the loader closes and re-opens the
    scheduler around a hotplug restart: a closed fd number is never read, whatever reuses it."""

    def __init__(self, sched: Any, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self.rebind(sched)

    def rebind(self, sched: Any) -> None:
        """Sample the maps of this (new) scheduler from now on."""
        from loader import libbpf
        from loader.bpfmaps import PerCpuU64Array, StructArray, U64Array

        fds: list[int] = []

        def dup(fd: int) -> int:
            fds.append(os.dup(fd))
            return fds[-1]

        maps = (
            PerCpuU64Array(dup(sched.counters.fd), contract.NR_COUNTERS),
            U64Array(dup(sched.loader_stats.fd), contract.NR_LOADER_STATS),
            StructArray(dup(sched.obj.map_fd(contract.MAP_DOM_STATS)), contract.MAX_DOMS,
                        contract.DomStat),
            U64Array(dup(sched.latency_hist.fd), contract.NR_HISTS * contract.HIST_BUCKETS),
        )
        capacity = libbpf.map_max_entries(sched.table.hash.fd)
        config = {k: v for k, v in sched.config.items() if isinstance(v, int)}
        with self._lock:
            old, self._fds = self._fds, fds
            self._maps, self._capacity, self._config = maps, capacity, config
        for fd in old:
            os.close(fd)

    def sample(self) -> Sample:
        from loader.scheduler import scx_ops_name, scx_state

        with self._lock:
            counters, loader, dom_stats, hist_map = self._maps
            config_now = self._config
            flat = hist_map.read_all()
            nb = contract.HIST_BUCKETS
            doms = [dom_stats.get(d) for d in range(min(config_now["nr_doms"],
                                                         contract.MAX_DOMS))]
            return Sample(
                mono_ns=time.monotonic_ns(), wall_s=time.time(), state=scx_state(),
                ops=scx_ops_name(), model=self.model, counters=counters.read_all(),
                loader=loader.read_all(), config=config_now,
                hist=[flat[h * nb:(h + 1) * nb] for h in range(contract.NR_HISTS)],
                doms=[(d.nr_cpus, d.load_q, d.queued) for d in doms],
                table_capacity=self._capacity,
            )

    def close(self) -> None:
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
