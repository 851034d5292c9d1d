"""Turn a `make bench` results file into markdown tables and PNG box plots.

usage: python -m tools.bench.report bench-results/<date>.json [--out-dir DIR]

Per workload and scheduler: medians and min-max over the rounds, and for each ratio of medians
to EEVDF a bootstrap 95 % interval (resampling each configuration's runs); a difference is
called real when its interval excludes 1. Then the figures of issues 10, 13 and 14 checked
against their targets, the host pipeline tables, and one PNG of box plots per workload.
Nothing here measures: it only reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from loader import paths
from loader.cli import plot_refusal

BASE = "eevdf"
MLSCHED = ("fallback", "dummy", "trained", "kernel")
BOOTSTRAP = 4000
TARGET_MIGR_RATIO = 0.5  # issue 10: migrations <= 0.5x EEVDF...
TARGET_TIME_RATIO = 1.0  # ...with completion time <= 1.0x
TARGET_DECIDED = 0.95  # issue 10: share of cross-domain moves a decision made
TARGET_RSS_MB = 40.0  # issue 13
TARGET_P50_US, TARGET_P99_US = 100.0, 1000.0  # issue 13, event -> map on the host, 1k-100k/s
TARGET_ATTACH_SMOKE_S = 15.0
TARGET_HIT = 1.0
TARGET_HIT_NS = 30.0  # issue 14: select_cpu on a hit, kernel over user mode


def _fmt_int(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1000:,.1f} ms" if v >= 1000 else f"{v:,.0f} µs"


def _ok(cond: bool | None) -> str:
    return "n/a" if cond is None else ("met" if cond else "**not met**")


# --- pipeline ---------------------------------------------------------------------------------


def sustained(paced: list[dict[str, Any]], backend: str, max_wait_ms: float | None = None
              ) -> dict[str, Any] | None:
    """The highest offered load the backend kept up with: no loss, >= 95 % of the offer."""
    best = None
    for r in paced:
        if r["backend"] != backend:
            continue
        if max_wait_ms is not None and r.get("max_wait_ms") != max_wait_ms:
            continue
        kept_up = (r["ring_drops"] == 0 and r["undecided"] == 0
                   and r["decisions_per_s"] >= 0.95 * r["offered_per_s"])
        if kept_up and (best is None or r["decisions_per_s"] > best["decisions_per_s"]):
            best = r
    return best


def peak(paced: list[dict[str, Any]], backend: str) -> dict[str, Any] | None:
    rows = [r for r in paced if r["backend"] == backend]
    return max(rows, key=lambda r: r["decisions_per_s"]) if rows else None


def decide_rate(p: dict[str, Any], backend: str, batch: int) -> float | None:
    for r in p["stages"]["decide"]:
        if r["backend"] == backend and r["batch_size"] == batch:
            return float(r["decisions_per_s"])
    return None


def pipeline_tables(p: dict[str, Any]) -> list[str]:
    where = p["where"]
    lines = [f"#### Stages ({where}: {p['cpus']} CPUs, kernel {p['kernel']})", "",
             f"Ring read (loader's bcc RingBufferReader + DecisionPipeline.on_record, "
             f"{p['stages']['read']['records']:,} records from a pre-filled ring): "
             f"**{_fmt_int(p['stages']['read']['records_per_s'])} records/s**.", "",
             "| decide stage | " + " | ".join(
                 f"batch {b}" for b in sorted({r['batch_size'] for r in p['stages']['decide']}))
             + " |"]
    batches = sorted({r["batch_size"] for r in p["stages"]["decide"]})
    lines.append("|---|" + "---:|" * len(batches))
    for backend in dict.fromkeys(r["backend"] for r in p["stages"]["decide"]):
        cells = [_fmt_int(decide_rate(p, backend, b)) for b in batches]
        label = "naive (TF per candidate)" if backend == "naive" else backend
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "decisions/s: unpack, model, threshold, batch map update and the pipeline's "
              "bookkeeping (DecisionPipeline._decide); naive: one TF call and one "
              "bpf_map_update_elem per candidate.", "",
              f"#### End to end, paced ({where})", "",
              "| backend | batch | max wait | offered/s | decided/s | p50 | p99 | max "
              "| ring drops | undecided |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["paced"]:
        wait = "–" if r.get("max_wait_ms") is None else f"{r['max_wait_ms']:g} ms"
        lines.append(
            f"| {r['backend']} | {r['batch_size']} | {wait} | {_fmt_int(r['offered_per_s'])} | "
            f"{_fmt_int(r['decisions_per_s'])} | {_fmt_us(r['p50_us'])} | "
            f"{_fmt_us(r['p99_us'])} | {_fmt_us(r['max_us'])} | {_fmt_int(r['ring_drops'])} | "
            f"{_fmt_int(r['undecided'])} |")
    lines.append("")
    return lines


# --- the suite's runs -------------------------------------------------------------------------


def runs(vm: dict[str, Any], wl: str, cfg: str) -> list[dict[str, Any]]:
    return [r for r in vm.get("runs", []) if r["workload"] == wl and r["config"] == cfg
            and "error" not in r]


def failed(vm: dict[str, Any], wl: str, cfg: str) -> int:
    return sum(1 for r in vm.get("runs", []) if r["workload"] == wl and r["config"] == cfg
               and "error" in r)


def decided_share(m: dict[str, int]) -> float | None:
    """(migr_model + migr_fallback) / ran_cross: cross-domain moves a decision made."""
    return (m["migr_model"] + m["migr_fallback"]) / m["ran_cross"] if m["ran_cross"] else None


def value(r: dict[str, Any], fig: str) -> float | None:
    m = r.get("mlsched") or {}
    if fig == "decided_share":
        return decided_share(m) if m else None
    if fig in ("migr_model", "migr_fallback", "migr_forced", "migr_domain", "ran_cross",
               "kinfer", "hits", "misses"):
        return float(m[fig]) if fig in m else None
    if fig == "select_ns":
        s = r.get("select_cpu")
        return s["run_time_ns"] / s["run_cnt"] if s and s["run_cnt"] else None
    v = r.get(fig)
    return None if v is None else float(v)


def values(vm: dict[str, Any], wl: str, cfg: str, fig: str) -> list[float]:
    return [v for r in runs(vm, wl, cfg) if (v := value(r, fig)) is not None]


def stats(vs: list[float]) -> dict[str, float] | None:
    if not vs:
        return None
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def bootstrap_ratio(base: list[float], other: list[float], seed: int = 1
                    ) -> tuple[float, float, float] | None:
    """Ratio of medians other/base and its bootstrap 95 % interval (percentile method)."""
    if not base or not other or statistics.median(base) == 0:
        return None
    if min(len(base), len(other)) < 3:  # too few runs for an interval
        return statistics.median(other) / statistics.median(base), float("nan"), float("nan")
    rng = random.Random(seed)
    ratios = []
    for _ in range(BOOTSTRAP):
        b = statistics.median(rng.choices(base, k=len(base)))
        o = statistics.median(rng.choices(other, k=len(other)))
        if b:
            ratios.append(o / b)
    ratios.sort()
    lo, hi = ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]
    return statistics.median(other) / statistics.median(base), lo, hi


def real(ci: tuple[float, float, float] | None) -> bool | None:
    if ci is None or ci[1] != ci[1]:  # NaN: no interval
        return None
    return ci[1] > 1.0 or ci[2] < 1.0


def _ratio(ci: tuple[float, float, float] | None) -> str:
    if ci is None:
        return "–"
    if ci[1] != ci[1]:
        return f"{ci[0]:.2f} [n < 3]"
    mark = " **real**" if real(ci) else ""
    return f"{ci[0]:.2f} [{ci[1]:.2f}–{ci[2]:.2f}]{mark}"


def _spread(s: dict[str, float] | None, fmt: str) -> str:
    if not s:
        return "–"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def _med(s: dict[str, float] | None, fmt: str = ",.0f", scale: float = 1.0) -> str:
    return "–" if not s else f"{scale * s['median']:{fmt}}"


def cfg_names(vm: dict[str, Any]) -> list[str]:
    return [c["name"] for c in vm.get("configs", [])]


def workload_table(vm: dict[str, Any], w: dict[str, Any]) -> list[str]:
    wl, metric = w["name"], w["metric"]
    label = "requests/s" if metric == "requests_per_s" else "time, s"
    wake = metric == "requests_per_s"
    head = (f"| config | {label}: median (min–max) | vs EEVDF [95 % CI] | "
            + ("wakeup p99, µs | p99 vs EEVDF | " if wake else "")
            + "migrations | vs EEVDF [95 % CI] | context switches | scheduler CPU, s |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    base = {f: values(vm, wl, BASE, f) for f in (metric, "migrations", "wakeup_p99_us")}
    for c in cfg_names(vm):
        m = values(vm, wl, c, metric)
        mig = values(vm, wl, c, "migrations")
        fail = failed(vm, wl, c)
        name = c + (f" ({fail} failed)" if fail else "")
        is_base = c == BASE
        row = (f"| {name} | {_spread(stats(m), ',.1f' if not wake else ',.0f')} | "
               f"{'1' if is_base else _ratio(bootstrap_ratio(base[metric], m))} | ")
        if wake:
            p99 = values(vm, wl, c, "wakeup_p99_us")
            row += (f"{_spread(stats(p99), ',.0f')} | "
                    f"{'1' if is_base else _ratio(bootstrap_ratio(base['wakeup_p99_us'], p99))} | ")
        row += (f"{_spread(stats(mig), ',.0f')} | "
                f"{'1' if is_base else _ratio(bootstrap_ratio(base['migrations'], mig))} | "
                f"{_med(stats(values(vm, wl, c, 'ctxt')))} | "
                f"{_med(stats(values(vm, wl, c, 'sched_cpu_s')), '.1f')} |")
        lines.append(row)
    return lines + [""]


def migration_rows(vm: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10: per workload and mlsched configuration, migrations by kind and the target."""
    rows = []
    for w in vm.get("workloads", []):
        wl, metric = w["name"], w["metric"]
        base_mig = values(vm, wl, BASE, "migrations")
        base_t = values(vm, wl, BASE, metric)
        for c in cfg_names(vm):
            if c not in MLSCHED or not runs(vm, wl, c):
                continue
            mig = bootstrap_ratio(base_mig, values(vm, wl, c, "migrations"))
            t = bootstrap_ratio(base_t, values(vm, wl, c, metric))
            # For the wakeup probe the completion figure is throughput: "time <= 1.0x" reads
            # "requests/s >= 1.0x".
            t_ok = None if t is None else (t[0] >= 1.0 if metric == "requests_per_s"
                                           else t[0] <= TARGET_TIME_RATIO)
            rows.append({
                "workload": wl, "config": c,
                "migrations": stats(values(vm, wl, c, "migrations")),
                **{k: stats(values(vm, wl, c, k)) for k in (
                    "migr_model", "migr_fallback", "migr_forced", "migr_domain", "ran_cross",
                    "decided_share")},
                "time": stats(values(vm, wl, c, metric)), "metric": metric,
                "migr_ratio": mig, "time_ratio": t,
                "met": None if mig is None or t_ok is None
                else (mig[0] <= TARGET_MIGR_RATIO and t_ok)})
    return rows


def migration_table(vm: dict[str, Any]) -> list[str]:
    lines = ["| workload | config | migrations (EEVDF: median) | model | fallback | forced | "
             "in-domain | ran cross | decided share | time or req/s | migr. vs EEVDF | "
             "time vs EEVDF | ≤ 0.5× migr., ≤ 1.0× time |",
             "|---|---|" + "---:|" * 10 + "---|"]
    for r in migration_rows(vm):
        base = stats(values(vm, r["workload"], BASE, "migrations"))
        tfmt = ",.0f" if r["metric"] == "requests_per_s" else ".1f"
        lines.append(
            f"| {r['workload']} | {r['config']} | {_med(r['migrations'])} ({_med(base)}) | "
            f"{_med(r['migr_model'])} | {_med(r['migr_fallback'])} | {_med(r['migr_forced'])} | "
            f"{_med(r['migr_domain'])} | {_med(r['ran_cross'])} | "
            f"{_med(r['decided_share'], '.1f', 100)} % | {_med(r['time'], tfmt)} | "
            f"{_ratio(r['migr_ratio'])} | {_ratio(r['time_ratio'])} | {_ok(r['met'])} |")
    return lines + [""]


def wakeup_table(vm: dict[str, Any]) -> list[str]:
    if not any(w["name"] == "wakeup" for w in vm.get("workloads", [])):
        return []
    lines = ["| config | wakeup avg, µs | avg vs EEVDF [95 % CI] | p50, µs | p99, µs | "
             "requests/s | hog bogo ops/s | avg ≤ EEVDF |", "|---|" + "---:|" * 6 + "---|"]
    base = values(vm, "wakeup", BASE, "wakeup_avg_us")
    for c in cfg_names(vm):
        avg = values(vm, "wakeup", c, "wakeup_avg_us")
        ci = bootstrap_ratio(base, avg)
        ok = None if c == BASE or ci is None else ci[0] <= 1.0
        lines.append(
            f"| {c} | {_spread(stats(avg), ',.0f')} | {'1' if c == BASE else _ratio(ci)} | "
            f"{_med(stats(values(vm, 'wakeup', c, 'wakeup_p50_us')))} | "
            f"{_spread(stats(values(vm, 'wakeup', c, 'wakeup_p99_us')), ',.0f')} | "
            f"{_spread(stats(values(vm, 'wakeup', c, 'requests_per_s')), ',.0f')} | "
            f"{_med(stats(values(vm, 'wakeup', c, 'hog_ops_per_s')))} | "
            f"{'' if c == BASE else _ok(ok)} |")
    return lines + [""]


def cost_rows(vm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 14: select_cpu's ns per call (bpf_stats) and in-kernel inference cost, pooled."""
    out: dict[str, dict[str, Any]] = {}
    for c in cfg_names(vm):
        if c not in MLSCHED:
            continue
        rs = [r for r in vm.get("runs", []) if r["config"] == c and "error" not in r]
        sel = [r["select_cpu"] for r in rs if r.get("select_cpu")]
        ns = sum(s["run_time_ns"] for s in sel)
        cnt = sum(s["run_cnt"] for s in sel)
        ml = [r["mlsched"] for r in rs if r.get("mlsched")]
        kinfer = sum(m.get("kinfer", 0) for m in ml)
        kinfer_ns = sum(m.get("kinfer_ns", 0) for m in ml)
        hits = sum(m["hits"] for m in ml)
        looked = hits + sum(m["misses"] for m in ml)
        out[c] = {"select_ns": ns / cnt if cnt else None, "select_calls": cnt,
                  "per_workload": {w["name"]: stats(values(vm, w["name"], c, "select_ns"))
                                   for w in vm.get("workloads", [])},
                  "kinfer": kinfer, "kinfer_ns": kinfer_ns / kinfer if kinfer else None,
                  "hit_rate": hits / looked if looked else None, "candidates": looked}
    return out


def cost_table(vm: dict[str, Any]) -> list[str]:
    rows = cost_rows(vm)
    wls = [w["name"] for w in vm.get("workloads", [])]
    lines = ["| config | select_cpu ns/call, all runs | " + " | ".join(
        f"{w}: median (min–max)" for w in wls) + " | calls | hit rate | in-kernel inferences "
        "| ns per inference |", "|---|" + "---:|" * (len(wls) + 5)]
    for c, r in rows.items():
        lines.append(
            f"| {c} | {_fmt_int(r['select_ns'])} | " + " | ".join(
                _spread(r["per_workload"][w], ",.0f") for w in wls)
            + f" | {_fmt_int(r['select_calls'])} | "
            + ("–" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.2f} %")
            + f" | {_fmt_int(r['kinfer'])} | {_fmt_int(r['kinfer_ns'])} |")
    return lines + [""]


def startup_table(vm: dict[str, Any]) -> list[str]:
    lines = ["| config | start → attached, s (loader's log) | start → model ready, s | "
             "VmHWM, MB | VmRSS at the end, MB | LLVM mapped | starts |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for c in cfg_names(vm):
        st = [s for s in vm.get("starts", []) if s["config"] == c and "error" not in s
              and "status" in s]
        if not st or c == BASE:
            continue
        att = stats([s["log_attached_s"] if "log_attached_s" in s else s["attach_s"]
                     for s in st])
        mod = stats([s["log_model_ready_s"] for s in st if "log_model_ready_s" in s])
        hwm = stats([s["vmhwm_mb"] for s in st if "vmhwm_mb" in s])
        rss = stats([s["vmrss_mb"] for s in st if "vmrss_mb" in s])
        llvm = {s.get("llvm_mapped") for s in st} - {None}
        lines.append(f"| {c} | {_spread(att, '.1f')} | {_spread(mod, '.1f')} | "
                     f"{_spread(hwm, '.1f')} | {_spread(rss, '.1f')} | "
                     f"{'yes' if True in llvm else 'no' if llvm else '–'} | {len(st)} |")
    smoke = vm.get("smoke") or []
    for s in smoke:
        if "error" in s:
            lines.append(f"| dummy under the smoke stress | failed: {s['error'][:80]} "
                         "| | | | | 1 |")
        else:
            lines.append(f"| dummy under the smoke stress (try {s['try']}) | "
                         f"{s.get('log_attached_s', s.get('attach_s'))} | "
                         f"{s.get('log_model_ready_s', '–')} | {s.get('vmhwm_mb', '–')} | "
                         f"{s.get('vmrss_mb', '–')} | "
                         f"{'yes' if s.get('llvm_mapped') else 'no'} | 1 |")
    return lines + [""]


# --- targets ----------------------------------------------------------------------------------


def target_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    vm = res.get("vm") or {}
    for r in migration_rows(vm):
        if r["config"] in ("trained", "kernel", "dummy"):
            rows.append((f"issue 10: {r['workload']}, {r['config']}",
                         f"migrations {_ratio(r['migr_ratio'])}, "
                         f"{'req/s' if r['metric'] == 'requests_per_s' else 'time'} "
                         f"{_ratio(r['time_ratio'])}",
                         "migrations ≤ 0.5×, time ≤ 1.0× (req/s ≥ 1.0×)", _ok(r["met"])))
    for r in migration_rows(vm):
        if r["config"] in ("trained", "kernel") and r["decided_share"]:
            ds = r["decided_share"]["median"]
            rows.append((f"issue 10: {r['workload']}, {r['config']}: decided share",
                         f"{100 * ds:.1f} %", "≥ 95 %", _ok(ds >= TARGET_DECIDED)))
    base = values(vm, "wakeup", BASE, "wakeup_avg_us")
    for c in ("trained", "kernel", "dummy"):
        ci = bootstrap_ratio(base, values(vm, "wakeup", c, "wakeup_avg_us"))
        if ci:
            rows.append((f"issue 10: wakeup avg, {c} vs EEVDF", _ratio(ci), "≤ 1.0×",
                         _ok(ci[0] <= 1.0)))
    host = res.get("host_pipeline")
    if host:
        for p in host["paced"]:
            if p["backend"] != "numpy" or p.get("max_wait_ms") not in (None, 2.0):
                continue
            rate = p["offered_per_s"]
            if rate <= 100_000:
                ok = (p["p50_us"] is not None and p["p50_us"] <= TARGET_P50_US
                      and p["p99_us"] <= TARGET_P99_US)
                rows.append((f"issue 13: host event→map at {_fmt_int(rate)}/s",
                             f"p50 {_fmt_us(p['p50_us'])}, p99 {_fmt_us(p['p99_us'])}",
                             "p50 ≤ 100 µs, p99 ≤ 1 ms", _ok(ok)))
            else:
                ok = (p["ring_drops"] == 0 and p["undecided"] == 0
                      and p["decisions_per_s"] >= 0.95 * rate)
                rows.append((f"issue 13: host end to end at {_fmt_int(rate)}/s",
                             f"{_fmt_int(p['decisions_per_s'])} decided/s, "
                             f"{_fmt_int(p['ring_drops'])} ring drops",
                             "kept up with, no drops", _ok(ok)))
    ki = res.get("kinfer")
    if ki:
        n = ki["nets"].get("64-64")
        if n:
            rate = n["numpy_per_s"]["64"] if "64" in n["numpy_per_s"] else n["numpy_per_s"][64]
            rows.append(("issue 13: decide stage, 64-64 network, numpy batch 64, one core (host)",
                         f"{_fmt_int(rate)}/s", "≥ 1,000,000/s", _ok(rate >= 1e6)))
        for name, n in ki["nets"].items():
            k = n["kernel"]
            rows.append((f"issue 14: in-kernel inference on the host (test run), {name} "
                         f"{n['shape']}", f"{k['ns_median']:,.0f} ns (p99 {k['ns_p99']:,.0f}); "
                         f"BPF = mirror on {k['keys']:,} keys: "
                         f"{'yes' if k['agrees_with_mirror'] else 'NO'}", "", ""))
    st = [s for s in vm.get("starts", []) if s["config"] in MLSCHED and "vmhwm_mb" in s]
    if st:
        hwm = max(s["vmhwm_mb"] for s in st if s["config"] != "kernel" or True)
        rows.append(("issue 13: loader RSS (VmHWM, whole process, VM)", f"max {hwm:.1f} MB",
                     "≤ 40 MB", _ok(hwm <= TARGET_RSS_MB)))
        llvm = any(s.get("llvm_mapped") for s in st)
        rows.append(("issue 13: LLVM in the loader's maps", "yes" if llvm else "no", "no",
                     _ok(not llvm)))
    smoke = [s for s in vm.get("smoke") or [] if "error" not in s]
    if smoke:
        worst = max(float(s.get("log_attached_s", s.get("attach_s", 0))) for s in smoke)
        rows.append(("issue 13: start → attached under the smoke stress (VM)",
                     f"max {worst:.1f} s of {len(smoke)}", "≤ 15 s",
                     _ok(worst <= TARGET_ATTACH_SMOKE_S)))
    costs = cost_rows(vm)
    for c in ("dummy", "trained"):
        if c in costs and costs[c]["hit_rate"] is not None:
            h = costs[c]["hit_rate"]
            rows.append((f"issue 13: hit rate from model-ready, {c}, 4-vCPU VM",
                         f"{100 * h:.3f} % of {costs[c]['candidates']:,}", "100 %",
                         _ok(h >= TARGET_HIT)))
    if "trained" in costs and "kernel" in costs:
        u, k = costs["trained"]["select_ns"], costs["kernel"]["select_ns"]
        if u and k:
            # Under TCG a call costs microseconds of emulation and varies by thousands of ns
            # from run to run: a 30 ns difference cannot be resolved here, so no verdict.
            rows.append(("issue 14: select_cpu per call (bpf_stats), kernel (hash) − user "
                         "(grid) mode, all runs pooled",
                         f"{k - u:+,.0f} ns ({k:,.0f} vs {u:,.0f})", "≤ 30 ns on a hit",
                         "n/a (TCG: not resolvable)"))
        if costs["kernel"]["kinfer_ns"]:
            rows.append(("issue 14: in-kernel inference in the VM (KINFER_NS / KINFER)",
                         f"{costs['kernel']['kinfer_ns']:,.0f} ns × "
                         f"{costs['kernel']['kinfer']:,}", "", ""))
    return rows


def target_table(res: dict[str, Any]) -> list[str]:
    lines = ["| figure | measured | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in target_rows(res)]
    return lines + [""]


def summary_table(res: dict[str, Any]) -> list[str]:
    """Headline: per workload, each configuration's main figure and migrations vs EEVDF."""
    vm = res.get("vm") or {}
    cfgs = [c for c in cfg_names(vm) if c != BASE]
    lines = ["| workload (figure) | EEVDF | " + " | ".join(cfgs) + " |",
             "|---|---:|" + "---:|" * len(cfgs)]
    for w in vm.get("workloads", []):
        for fig, label in ((w["metric"], "req/s" if w["metric"] == "requests_per_s"
                            else "time, s"), ("migrations", "migrations")):
            base = values(vm, w["name"], BASE, fig)
            fmt = ".1f" if fig == "seconds" else ",.0f"
            cells = [_ratio(bootstrap_ratio(base, values(vm, w["name"], c, fig)))
                     for c in cfgs]
            lines.append(f"| {w['name']} ({label}) | {_med(stats(base), fmt)} | "
                         + " | ".join(cells) + " |")
        if w["metric"] == "requests_per_s":
            base = values(vm, w["name"], BASE, "wakeup_p99_us")
            cells = [_ratio(bootstrap_ratio(base, values(vm, w["name"], c, "wakeup_p99_us")))
                     for c in cfgs]
            lines.append(f"| {w['name']} (wakeup p99, µs) | {_med(stats(base))} | "
                         + " | ".join(cells) + " |")
    return lines + [""]


# --- plots ------------------------------------------------------------------------------------


def plots(res: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vm = res.get("vm") or {}
    cfgs = cfg_names(vm)
    made = []
    for w in vm.get("workloads", []):
        wl = w["name"]
        figs = ([("requests_per_s", "requests/s"), ("wakeup_p99_us", "wakeup p99, µs"),
                 ("migrations", "migrations")] if w["metric"] == "requests_per_s"
                else [("seconds", "completion time, s"), ("migrations", "migrations")])
        fig, axes = plt.subplots(1, len(figs), figsize=(4.6 * len(figs), 3.8), dpi=80)
        for ax, (f, label) in zip(axes, figs, strict=True):
            data = [values(vm, wl, c, f) or [float("nan")] for c in cfgs]
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(cfgs) + 1), cfgs, rotation=35, ha="right", fontsize=8)
            ax.set(title=f"{wl}: {label}", ylabel=label)
            if f in ("migrations", "wakeup_p99_us") and any(v > 0 for d in data for v in d):
                ax.set_yscale("log")
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = out_dir / f"{stem}-{wl}.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


# --- the document -----------------------------------------------------------------------------


def markdown(res: dict[str, Any], pngs: list[Path]) -> str:
    m = res["meta"]
    vm = res.get("vm") or {}
    lines = [f"# mlsched benchmark, {m['date']}", "",
             f"`{m['command']}` on {m['host']} (host kernel {m['host_kernel']}, "
             f"{m['host_cpus']} CPUs), commit {m['commit']}; wall time "
             f"{m.get('wall_s', 0) / 60:.1f} min.", ""]
    h = m.get("host_load_vm")
    if h:
        lines += [f"Host during the VM part: 1-min load average median {h['load1_median']}, "
                  f"max {h['load1_max']}; up to {h['vms_max']} VMs at once (ours included).",
                  ""]
    if vm:
        lines += [f"VM: kernel {vm.get('kernel')}, {vm.get('cpus')} vCPUs under TCG; "
                  f"{vm.get('rounds')} rounds, scale {vm.get('scale')}, seed {vm.get('seed')}; "
                  f"{len(vm.get('runs', []))} runs "
                  f"({sum('error' in r for r in vm.get('runs', []))} failed) "
                  f"over {vm.get('boots')} boot(s); bcc counter compiled in "
                  f"{vm.get('bcc_compile_s')} s.", ""]
        lines += [f"- {c['name']}: {c['what']}" for c in vm.get("configs", [])]
        lines += [f"- workload {w['name']}: {w['what']}" for w in vm.get("workloads", [])]
        lines += ["", "## Summary: ratio of medians to EEVDF [bootstrap 95 % interval]", "",
                  "**real**: the interval excludes 1.", ""] + summary_table(res)
    lines += ["## Targets", ""] + target_table(res)
    for w in vm.get("workloads", []):
        lines += [f"## {w['name']}", "", f"{w['what']}: `{' '.join(w['command'])}`", ""]
        lines += workload_table(vm, w)
    if vm:
        lines += ["## Migrations by kind (issue 10)", ""] + migration_table(vm)
        lines += ["## Wakeup latency beside CPU hogs (issue 10)", ""] + wakeup_table(vm)
        lines += ["## Cost of select_cpu and of in-kernel inference (issue 14)", ""]
        lines += cost_table(vm)
        lines += ["## Start-up and memory of the loader (issue 13)", ""] + startup_table(vm)
    if res.get("host_pipeline"):
        lines += ["## Decision pipeline on the host (issue 13)", ""]
        if res["meta"].get("host_pipeline_from"):
            lines += [f"(From a separate run, {res['meta']['host_pipeline_from']}.)", ""]
        lines += pipeline_tables(res["host_pipeline"])
    for png in pngs:
        lines += [f"![{png.stem}]({png.name})", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, list[Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(res, out_dir, stem)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(res, pngs) + "\n")
    return md, pngs


DOCS = paths.CHECKOUT / "docs"
METHOD = """# Benchmarks

`make bench` (tools/bench/): mlsched against the kernel's default scheduler (EEVDF) and the
kernel's own sched_ext examples `scx_simple` and `scx_central`, in one VM boot, interleaved
rounds; and the decision pipeline on the host. Everything below is generated by `python -m
tools.bench.report FILE --docs` from one real run (the JSON with every run is in docs/bench/);
the reading is written by hand.

```sh
make setup                 # once (make bench builds bpf, scx-peers and its tools itself)
make bench                 # 5 rounds, ≤ 45 min here; BENCH_ARGS='--rounds 3' or '--quick'
```

## Method

- **One boot, 4 vCPUs under TCG**, mlsched with `--domains 2` (two domains of two vCPUs).
  Configurations: `eevdf` (nothing attached), `scx_simple` and `scx_central` (built from the
  cached linux-source-7.3's tools/sched_ext into build/scx/, `make scx-peers`), mlsched
  `fallback` (`--no-model`), `dummy` (tests/models/dummy), `trained`
  (model_dir/model_path), `kernel` (the trained model, `--inference kernel --table
  hash`: the scheduler evaluates the network on each table miss and caches it).
- **Workloads** (sizes in the run's table below): `wakeup` — build/bench/wakeprobe (2 message
  threads × 2 workers, futex wakeups, 50 µs requests) beside `stress-ng --cpu 4` hogs: wakeup
  avg/p50/p99 and requests/s; `messaging` — `perf bench sched messaging`; `kbuild` — `make -j4`
  of lib/ objects of a tinyconfig build of the 7.3 kernel the VM boots (the full
  linux-source-7.3 tree cached by tools/bench/kbuild.py, `tinyconfig prepare` done on the host,
  its output copied to the guest's /tmp before each run; dentries and inodes dropped before and
  after, untimed); `mixed` — stress-ng FFT hogs beside pipe ping-pong, fixed work.
  (`build`, a generated C code base, is still there with `--workloads`.)
- **Protocol**: an untimed warm-up pass under EEVDF; then R rounds, each running the
  configurations in a seeded random order, and under each (attached once per round: one loader
  or peer) the workloads in a seeded random order. mlsched's loader waits for model-ready
  (the whole grid decided) before the first workload.
- **Per run**: completion time (or requests/s), `sched:sched_migrate_task` events (a bcc counter,
  tools/bench/migcount.py), context switches (`/proc/stat` ctxt), the scheduler process's CPU
  time, and for mlsched the counters' deltas: migrations by kind (`migr_model`,
  `migr_fallback`, `migr_forced`, `migr_domain`), `ran_cross` (tasks that ran in another domain
  than last time), `kinfer`/`kinfer_ns`, and bpf_stats of `mlsched_select_cpu` (`run_time_ns`,
  `run_cnt`; `kernel.bpf_stats_enabled=1` for the whole boot, every configuration alike).
  Decided share = (migr_model + migr_fallback) / ran_cross.
- **Statistics**: medians and min–max over the rounds; for each ratio of medians to EEVDF a
  bootstrap 95 % interval (4,000 resamples of each configuration's runs); **real** marks an
  interval that excludes 1.
- **Start-up**: every loader start's "attached … s after start" and "model ready … (… s after
  start)" lines, VmHWM/VmRSS at the end and whether /proc/<pid>/maps holds an LLVM library;
  then the loader started twice under the scx CI smoke stress (`stress-ng -t 60 --aggressive -M
  -c 2 -f 2 --affinity 1 --affinity-delay 1 --affinity-pin`).
- **The VM's file system**: the guest's root is the host's, through virtiofsd, which by default
  holds one O_PATH descriptor per inode the guest has looked up, under its RLIMIT_NOFILE (20,000
  here, a hard limit this container cannot raise); a kernel build exceeds it ("Too many open
  files in system"). scripts/vm-run.sh starts virtiofsd with `--inode-file-handles=prefer`
  (inodes referenced by file handle, no descriptor each). scx_central needs the kernel's config
  for libbpf's `__kconfig` externs; vm-run.sh puts it at /boot/config-<kver> in the guest
  (without it the skeleton fails to load with -EINVAL).

<!-- reading -->
"""


def write_docs(res: dict[str, Any]) -> Path:
    """docs/BENCHMARKS.md (method + this run's tables) and docs/bench/<workload>.png."""
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(res, out, "bench")
    body = markdown(res, [])
    body = body.replace("# mlsched benchmark,", "## The run:", 1)
    figs = [f"![{p.stem}](bench/{p.name})" for p in pngs]
    md = DOCS / "BENCHMARKS.md"
    old = md.read_text() if md.is_file() else ""
    reading = ""
    if "<!-- reading -->" in old and "<!-- /reading -->" in old:
        reading = old[old.index("<!-- reading -->") + 16:old.index("<!-- /reading -->")]
    text = METHOD.replace("<!-- reading -->", "<!-- reading -->" + reading + "<!-- /reading -->")
    md.write_text(text + "\n" + body + "\n" + "\n\n".join(figs) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.report", description="Markdown tables and PNG box plots "
        "from a make bench results file.",
        epilog="example: python -m tools.bench.report bench-results/2026-12-01-2300.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="bench-results/<date>.json")
    ap.add_argument("--out-dir", type=Path, help="default: next to the results file")
    ap.add_argument("--docs", action="store_true",
                    help="also docs/BENCHMARKS.md (keeping its reading) and docs/bench/*.png")
    ap.add_argument("--host-pipeline", type=Path,
                    help="a tools.bench.pipeline JSON to use instead of the run's (say why)")
    ap.add_argument("--kinfer", type=Path, help="a tools.bench.kinfer JSON (make bench-model)")
    args = ap.parse_args(argv)
    if why := plot_refusal("report: plotting"):
        print(why, file=sys.stderr)
        return 2
    res = json.loads(args.results.read_text())
    if args.host_pipeline:
        res["host_pipeline"] = json.loads(args.host_pipeline.read_text())
        res["meta"]["host_pipeline_from"] = str(args.host_pipeline)
    if args.kinfer:
        res["kinfer"] = json.loads(args.kinfer.read_text())
    md, pngs = write(res, args.out_dir or args.results.parent, args.results.stem)
    if args.docs:
        print(f"report: {write_docs(res)}")
    print("\n".join(summary_table(res) + target_table(res)))
    print(f"report: {md}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
