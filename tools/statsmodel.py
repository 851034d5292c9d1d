"""What mlsched-stats measures: every field, declared once, and its three renderings.

FIELDS below is the one place a field is named and described. compute() turns two raw samples
of the maps (Sample, taken by tools/stats.py or by the loader's --stats) into one interval's
figures; render_text(), render_json() and render_openmetrics() print them; markdown_table()
writes the field table of tools/README.md (tests/host/test_stats.py checks that they agree).

Rates are deltas between the two samples divided by the time between them. Latency
percentiles come from the delta of the loader's log2 histograms: the value reported is the
upper bound of the bucket holding the percentile (bucket b is [2^b, 2^(b+1)) ns), so it never
understates and is at most 2x the true value.

Pure computation: no maps, no BPF, no TensorFlow.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from loader import contract

C = contract.Counter
LS = contract.LoaderStat


@dataclass(frozen=True)
class Field:
    name: str  # JSON key; the OpenMetrics name is "mlsched_" + name
    unit: str
    kind: str  # "meta" (JSON only), "label", "gauge" or "counter" (name ends in _total)
    help: str


# Events counted since attach: each gives NAME_total (counter) and NAME_per_s (gauge).
# (name, map, index, description)
COUNTED: tuple[tuple[str, str, int, str], ...] = (
    ("select", "counters", C.SELECT, "select_cpu calls (task wakeups)"),
    ("local", "counters", C.LOCAL, "wakeups that found an idle CPU in their domain and stayed"),
    ("no_candidate", "counters", C.NO_CANDIDATE, "wakeups that stayed: no less loaded domain"),
    ("candidates", "counters", C.CANDIDATES, "migration candidates built (the model's questions)"),
    ("hits", "counters", C.HITS, "candidates whose key had a decision in the map"),
    ("misses", "counters", C.MISSES, "candidates whose key had no decision yet"),
    ("migrate", "counters", C.MIGRATE, "hits the model said to migrate"),
    ("keep", "counters", C.KEEP, "hits the model said to keep on their domain"),
    ("fallback_migrate", "counters", C.FALLBACK_MIGRATE, "misses the fallback policy migrated"),
    ("fallback_keep", "counters", C.FALLBACK_KEEP, "misses the fallback policy kept"),
    ("submitted", "counters", C.SUBMITTED, "candidates pushed to the ring buffer"),
    ("rb_wakeups", "counters", C.RB_WAKEUPS, "candidates pushed with a wakeup of the loader"),
    ("rb_drops", "counters", C.RB_DROPS, "candidates not pushed: ring buffer full"),
    ("steal_candidates", "counters", C.STEAL_CANDIDATES,
     "candidates built when an idle CPU eyed another domain's queue"),
    ("migr_model", "counters", C.MIGR_MODEL, "cross-domain moves a model decision made"),
    ("migr_fallback", "counters", C.MIGR_FALLBACK,
     "cross-domain moves the fallback policy (or a coin flip) made"),
    ("migr_forced", "counters", C.MIGR_FORCED,
     "steals of a task queued past the starvation guard, whatever the decision"),
    ("migr_domain", "counters", C.MIGR_DOMAIN,
     "moves inside a domain: to an idle sibling on wakeup, or pulled by one"),
    ("ran_cross", "counters", C.RAN_CROSS, "runs on a CPU of another domain than the last run"),
    ("ran_cross_decided", "counters", C.RAN_CROSS_DECIDED,
     "of ran_cross: runs whose move across domains a decision (model or fallback) made"),
    ("ran_domain", "counters", C.RAN_DOMAIN, "runs on another CPU of the same domain"),
    ("preempts", "counters", C.PREEMPTS, "woken tasks that preempted a task a slice ahead"),
    ("restricted", "counters", C.RESTRICTED,
     "wakeups of tasks that may not use every CPU of their domain (kernel's placement)"),
    ("explored", "counters", C.EXPLORED, "candidates decided by a coin flip (collection mode)"),
    ("kinfer", "counters", C.KINFER, "misses the scheduler decided itself (--inference kernel)"),
    ("kinfer_ns", "counters", C.KINFER_NS, "time spent in those in-kernel inferences, ns"),
    ("loader_wakeups", "counters", C.LOADER_WAKEUPS,
     "wakeups of the loader, run ahead of the queue"),
    ("records", "loader", LS.RECORDS, "candidate records the loader read from the ring buffer"),
    ("batches", "loader", LS.BATCHES, "model batches run"),
    ("decisions", "loader", LS.DECISIONS, "decisions written to the decision map"),
    ("model_errors", "loader", LS.MODEL_ERRORS, "batches whose decisions were not written"),
    ("restarts", "loader", LS.RESTARTS, "re-attaches after a CPU hotplug exit"),
    ("reloads", "loader", LS.RELOADS, "models switched in on SIGHUP"),
    ("reload_failures", "loader", LS.RELOAD_FAILURES, "SIGHUPs whose new model was refused"),
)


def _fields() -> tuple[Field, ...]:
    out = [
        Field("time", "s", "meta", "Unix time of the interval's second sample"),
        Field("interval_s", "s", "gauge", "seconds between the two samples the rates come from"),
        Field("state", "", "label", "sched_ext state (/sys/kernel/sched_ext/state)"),
        Field("ops", "", "label", "attached sched_ext scheduler (/sys/kernel/sched_ext/root/ops)"),
        Field("model", "", "label", "model directory the loader serves (its --model)"),
        Field("backend", "", "label", "inference backend: none (model not loaded yet), tf, numpy"),
        Field("fallback", "", "label", "policy for undecided candidates: keep, migrate, heuristic"),
        Field("loader_pid", "pid", "gauge", "pid of mlsched-load"),
        Field("uptime_s", "s", "gauge", "seconds since the loader attached the scheduler"),
        Field("model_ready", "0/1", "gauge", "1 once the model serves decisions, else 0"),
        Field("nr_cpus", "CPUs", "gauge", "CPUs the scheduling domains cover"),
        Field("nr_doms", "domains", "gauge", "scheduling domains"),
    ]
    for name, _, _, desc in COUNTED:
        out.append(Field(f"{name}_total", "events", "counter", f"{desc}, since attach"))
        out.append(Field(f"{name}_per_s", "1/s", "gauge", f"{desc}, per second"))
    out += [
        Field("hit_rate", "0..1", "gauge",
              "hits / candidates over the interval (absent when no candidate)"),
        Field("decided_share", "0..1", "gauge",
              "ran_cross_decided / ran_cross over the interval: the share of runs on another "
              "domain that a decision sent there (absent when none)"),
        Field("kinfer_avg_ns", "ns", "gauge",
              "mean in-kernel inference time over the interval (absent when none)"),
        Field("model_digest", "hex", "label", "first 16 hex digits of the serving model's sha256"),
        Field("grid_keys", "keys", "gauge", "keys of the dense decision grid (0: hash only)"),
        Field("grid_decided", "keys", "gauge", "grid keys holding a decision"),
        Field("table_entries", "keys", "gauge", "decisions in the decision map"),
        Field("table_capacity", "keys", "gauge", "size of the decision map"),
        Field("table_occupancy", "0..1", "gauge", "table_entries / table_capacity"),
        Field("batch_size_avg", "keys", "gauge", "decisions per model batch over the interval"),
        Field("batch_latency_p50_us", "us", "gauge",
              "median model call + map update per batch over the interval (bucket bound)"),
        Field("batch_latency_p99_us", "us", "gauge",
              "99th percentile of batch latency over the interval (bucket bound)"),
        Field("batch_latency_avg_us", "us", "gauge", "mean batch latency over the interval"),
        Field("batch_latency_max_us", "us", "gauge", "slowest batch since attach"),
        Field("event_latency_p50_us", "us", "gauge",
              "median candidate pushed -> decision in the map, over the interval (bucket bound)"),
        Field("event_latency_p99_us", "us", "gauge",
              "99th percentile of event -> decision latency over the interval (bucket bound)"),
        Field("event_latency_avg_us", "us", "gauge",
              "mean event -> decision latency over the interval"),
    ]
    return tuple(out)


FIELDS: tuple[Field, ...] = _fields()

# Per-domain fields: JSON "domains": [{"dom": d, NAME: value, ...}], OpenMetrics
# mlsched_dom_NAME{dom="d"}.
DOM_FIELDS: tuple[Field, ...] = (
    Field("nr_cpus", "CPUs", "gauge", "CPUs in the domain"),
    Field("load", "0..1", "gauge", "domain load: busy CPUs plus queued tasks, per CPU, scaled"),
    Field("queued", "tasks", "gauge", "tasks waiting in the domain's queue"),
)

FIELD_NAMES = tuple(f.name for f in FIELDS)


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
    config: list[int]  # indexed by contract.Config
    hist: list[list[int]]  # [contract.Hist][HIST_BUCKETS]
    doms: list[tuple[int, int, int]] = field(default_factory=list)  # nr_cpus, load_q, queued
    table_entries: int = 0
    table_capacity: int = 0


def bucket_upper_us(b: int) -> float:
    """Upper bound of log2 bucket b ([2^b, 2^(b+1)) ns), in µs."""
    return float(2 ** (b + 1)) / 1000.0


def percentile_us(counts: list[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a log2 histogram, as its bucket's upper bound in µs."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
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


def compute(prev: Sample, cur: Sample) -> dict[str, object]:
    """One interval's figures, keyed by FIELDS names (None where there is nothing to report),
    plus "domains": a list of {"dom": d, <DOM_FIELDS>}."""
    dt = max(cur.mono_ns - prev.mono_ns, 1) / 1e9

    def delta(src: str, index: int) -> int:
        a = getattr(prev, src)[index]
        b = getattr(cur, src)[index]
        return max(b - a, 0)  # the maps only grow; clamp in case a loader restarted

    def ratio(num: float, den: float) -> float | None:
        return num / den if den > 0 else None

    start = cur.loader[LS.START_NS]
    out: dict[str, object] = {
        "time": round(cur.wall_s, 3),
        "interval_s": round(dt, 3),
        "state": cur.state,
        "ops": cur.ops,
        "model": cur.model,
        "backend": _enum_name(contract.Backend, cur.loader[LS.BACKEND]),
        "fallback": _enum_name(contract.Fallback, cur.config[contract.Config.FALLBACK]),
        "loader_pid": cur.loader[LS.LOADER_PID],
        "uptime_s": round(max(cur.mono_ns - start, 0) / 1e9, 1) if start else None,
        "model_ready": cur.loader[LS.MODEL_READY],
        "nr_cpus": cur.config[contract.Config.NR_CPUS],
        "nr_doms": cur.config[contract.Config.NR_DOMS],
    }
    for name, src, index, _ in COUNTED:
        out[f"{name}_total"] = getattr(cur, src)[index]
        out[f"{name}_per_s"] = round(delta(src, index) / dt, 2)

    hits = delta("counters", C.HITS)
    cands = delta("counters", C.CANDIDATES)
    batches = delta("loader", LS.BATCHES)
    decisions = delta("loader", LS.DECISIONS)
    batch_ns = delta("loader", LS.BATCH_NS_SUM)
    ev_ns = delta("loader", LS.EV_LAT_NS_SUM)
    h_batch = [max(b - a, 0) for a, b in zip(prev.hist[contract.Hist.BATCH],
                                              cur.hist[contract.Hist.BATCH], strict=True)]
    h_event = [max(b - a, 0) for a, b in zip(prev.hist[contract.Hist.EVENT],
                                              cur.hist[contract.Hist.EVENT], strict=True)]

    def us(ns: float | None) -> float | None:
        return None if ns is None else round(ns / 1000.0, 3)

    occupancy = ratio(cur.table_entries, cur.table_capacity)
    decided = delta("counters", C.RAN_CROSS_DECIDED)
    kinfer = delta("counters", C.KINFER)
    cross = delta("counters", C.RAN_CROSS)
    out.update({
        "hit_rate": None if not cands else round(hits / cands, 4),
        "decided_share": None if not cross else round(min(decided / cross, 1.0), 4),
        "kinfer_avg_ns": None if not kinfer else round(delta("counters", C.KINFER_NS) / kinfer),
        "model_digest": f"{cur.loader[LS.MODEL_DIGEST]:016x}",
        "grid_keys": cur.loader[LS.GRID_KEYS],
        "grid_decided": cur.loader[LS.GRID_DECIDED],
        "table_entries": cur.table_entries,
        "table_capacity": cur.table_capacity,
        "table_occupancy": None if occupancy is None else round(occupancy, 4),
        "batch_size_avg": None if not batches else round(decisions / batches, 2),
        "batch_latency_p50_us": percentile_us(h_batch, 0.50),
        "batch_latency_p99_us": percentile_us(h_batch, 0.99),
        "batch_latency_avg_us": us(ratio(batch_ns, batches)),
        "batch_latency_max_us": us(cur.loader[LS.BATCH_NS_MAX]) if cur.loader[LS.BATCHES] else None,
        "event_latency_p50_us": percentile_us(h_event, 0.50),
        "event_latency_p99_us": percentile_us(h_event, 0.99),
        "event_latency_avg_us": us(ratio(ev_ns, decisions)),
    })
    out["domains"] = [
        {"dom": d, "nr_cpus": nr, "load": round(q / contract.LOAD_SCALE, 4), "queued": queued}
        for d, (nr, q, queued) in enumerate(cur.doms)
    ]
    return out


# --- renderers ---------------------------------------------------------------------------------


def render_json(stats: dict[str, object]) -> str:
    """One line: the interval as a JSON object with FIELDS' names and "domains"."""
    return json.dumps(stats, separators=(", ", ": "))


def _om_value(v: object) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(int(v))  # type: ignore[call-overload]


def _om_label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _om_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render_openmetrics(stats: dict[str, object]) -> str:
    """The interval as OpenMetrics 1.0 text, ending in # EOF.

    Labels (state, ops, model, backend, fallback) go into the gauge mlsched_info (value 1);
    counters are the totals since attach; fields with no value this interval have no sample.
    """
    lines: list[str] = []
    labels = [f for f in FIELDS if f.kind == "label"]
    lines.append("# HELP mlsched_info " + _om_help(
        "always 1; labels: " + "; ".join(f"{f.name}: {f.help}" for f in labels)))
    lines.append("# TYPE mlsched_info gauge")
    lines.append("mlsched_info{" + ",".join(
        f'{f.name}="{_om_label(stats[f.name])}"' for f in labels) + "} 1")
    for f in FIELDS:
        if f.kind not in ("gauge", "counter"):
            continue
        family = "mlsched_" + (f.name[: -len("_total")] if f.kind == "counter" else f.name)
        unit = f" [{f.unit}]" if f.unit else ""
        lines.append(f"# HELP {family} {_om_help(f.help + unit)}")
        lines.append(f"# TYPE {family} {f.kind}")
        v = stats.get(f.name)
        if v is not None:
            sample = family + ("_total" if f.kind == "counter" else "")
            lines.append(f"{sample} {_om_value(v)}")
    doms = stats.get("domains") or []
    for f in DOM_FIELDS:
        family = f"mlsched_dom_{f.name}"
        lines.append(f"# HELP {family} {_om_help(f.help)} [{f.unit}]")
        lines.append(f"# TYPE {family} gauge")
        for d in doms:  # type: ignore[attr-defined]
            lines.append(f'{family}{{dom="{d["dom"]}"}} {_om_value(d[f.name])}')
    lines.append("# EOF")
    return "\n".join(lines)


def _rate(v: object) -> str:
    return f"{v:.1f}/s" if isinstance(v, int | float) else "-"


def _us(v: object) -> str:
    if not isinstance(v, int | float):
        return "-"
    if v < 10:
        return f"{v:.1f}us"
    if v < 10000:
        return f"{v:.0f}us"
    return f"{v / 1000:.0f}ms"


def _pct(v: object) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{100 * v:.2f}%" if 0 < v < 0.01 else f"{100 * v:.1f}%"


def render_text(s: dict[str, object]) -> str:
    """A block that fits a terminal, one concern per line (like scx_rusty --monitor)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(s["time"])))  # type: ignore[arg-type]
    ready = "model ready" if s["model_ready"] else "model loading (fallback serves)"
    uptime = s["uptime_s"]
    lines = [
        f"###### {stamp}  {s['ops'] or '-'} {s['state']}  interval {s['interval_s']:.1f} s ######",
        f"loader     pid {s['loader_pid']}  up {uptime if uptime is not None else '-'} s  "
        f"{ready} ({s['backend']})  fallback {s['fallback']}",
        f"model      {s['model']}  digest {s['model_digest']}"
        + (f"  in-kernel {_rate(s['kinfer_per_s'])} avg {s['kinfer_avg_ns']} ns"
           if s["kinfer_total"] else "")
        + (f"  reloads {s['reloads_total']} (refused {s['reload_failures_total']})"
           if s["reloads_total"] or s["reload_failures_total"] else ""),
        f"decide     cand {_rate(s['candidates_per_s'])}  hit {_pct(s['hit_rate'])}  "
        f"migrate {_rate(s['migrate_per_s'])}  keep {_rate(s['keep_per_s'])}  "
        f"fallback {_rate(s['fallback_migrate_per_s'])} migr + "
        f"{_rate(s['fallback_keep_per_s'])} keep"
        + (f"  explored {_rate(s['explored_per_s'])}" if s["explored_total"] else ""),
        f"table      written {_rate(s['decisions_per_s'])} (total {s['decisions_total']})  "
        f"entries {s['table_entries']}/{s['table_capacity']} ({_pct(s['table_occupancy'])})"
        + (f"  grid {s['grid_decided']}/{s['grid_keys']}" if s["grid_keys"] else ""),
        f"ring       submitted {_rate(s['submitted_per_s'])}  read {_rate(s['records_per_s'])}  "
        f"wakeups {_rate(s['rb_wakeups_per_s'])}  "
        f"drops {_rate(s['rb_drops_per_s'])} (total {s['rb_drops_total']})",
        f"batch      {_rate(s['batches_per_s'])}  size "
        f"{s['batch_size_avg'] if s['batch_size_avg'] is not None else '-'}  "
        f"latency p50 {_us(s['batch_latency_p50_us'])} p99 {_us(s['batch_latency_p99_us'])} "
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
    for d in s.get("domains") or []:  # type: ignore[attr-defined]
        lines.append(f"dom{d['dom']:<7} cpus {d['nr_cpus']}  load {d['load']:.2f}  "
                     f"queued {d['queued']}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The field table of tools/README.md (an event's _total and _per_s share a row)."""
    rows = ["| field | unit | OpenMetrics | description |", "| --- | --- | --- | --- |"]
    counted = {f"{name}_total": desc for name, _, _, desc in COUNTED}
    for f in FIELDS:
        if f.name in counted:
            base = f.name[: -len("_total")]
            rows.append(f"| `{f.name}`, `{base}_per_s` | events, 1/s | counter, gauge "
                        f"| {counted[f.name]} |")
            continue
        if f.name.endswith("_per_s") and f"{f.name[: -len('_per_s')]}_total" in counted:
            continue
        if f.kind == "meta":
            om = "(JSON only)"
        elif f.kind == "label":
            om = "label of `mlsched_info`"
        else:
            om = f.kind
        rows.append(f"| `{f.name}` | {f.unit} | {om} | {f.help} |")
    for f in DOM_FIELDS:
        rows.append(f"| `domains[].{f.name}` | {f.unit} | `mlsched_dom_{f.name}{{dom=…}}` "
                    f"| {f.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
