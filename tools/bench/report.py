"""Turn a `make bench` results file into markdown tables and PNG plots.

usage: python -m tools.bench.report bench-results/<date>.json [--out-dir DIR]

Medians and spreads (min-max over the repeats) of every outcome figure, ratios of medians to
configuration (a), the pipeline tables, and a summary table checked against the targets of
the benchmark issue. Nothing here measures: it only reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

TARGET_DECISIONS_PER_S = 1_000_000
TARGET_NAIVE_RATIO = 100
TARGET_P50_US = 200
TARGET_P99_US = 2000
TARGET_HIT_RATE = 0.95


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


# --- outcome ----------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def outcome_summary(o: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """workload -> config -> figures (medians, spreads, ratios of medians to (a))."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for w in o["workloads"]:
        out[w["name"]] = {}
        for c in o["configs"]:
            runs = [r for r in o["runs"] if r["workload"] == w["name"]
                    and r["config"] == c["key"] and "error" not in r]
            errors = sum(1 for r in o["runs"] if r["workload"] == w["name"]
                         and r["config"] == c["key"] and "error" in r)
            ml = [r["mlsched"] for r in runs if "mlsched" in r]
            hit = [m["hits"] / (m["hits"] + m["misses"]) for m in ml if m["hits"] + m["misses"]]
            out[w["name"]][c["key"]] = {
                "seconds": _stats([r["seconds"] for r in runs]),
                "migrations": _stats([float(r["migrations"]) for r in runs]),
                "cross_migrations": _stats([float(r["cross_migrations"]) for r in runs
                                            if "cross_migrations" in r]),
                "mlsched_candidates": _stats([float(m["candidates"]) for m in ml]),
                "mlsched_sent": _stats([float(m["migr_model"] + m["migr_fallback"]) for m in ml]),
                "mlsched_steals": _stats([float(m["steal_candidates"]) for m in ml]),
                "loader_cpu_s": _stats([r["loader_cpu_s"] for r in runs if "loader_cpu_s" in r]),
                "hit_rate": _stats(hit),
                "errors": errors,
            }
        base = out[w["name"]].get("a", {})
        for fig in out[w["name"]].values():
            for k in ("seconds", "migrations", "cross_migrations"):
                b, v = base.get(k), fig[k]
                fig[f"{k}_ratio"] = (v["median"] / b["median"]
                                     if v and b and b["median"] else None)
    return out


def _spread(s: dict[str, float] | None, fmt: str) -> str:
    if not s:
        return "–"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}× ({100 * (v - 1):+.0f} %)"


def _median(s: dict[str, float] | None, fmt: str = ",.0f", scale: float = 1.0) -> str:
    return "–" if not s else f"{scale * s['median']:{fmt}}"


def outcome_tables(o: dict[str, Any]) -> list[str]:
    summ = outcome_summary(o)
    names = {c["key"]: c["name"] for c in o["configs"]}
    lines = ["| workload | config | time, s: median (min–max) | time vs (a) | migrations: median "
             "(min–max) | migrations vs (a) | across domains | across vs (a) | mlsched "
             "candidates | hit rate, % | sent by mlsched | steals | loader CPU, s |",
             "|---|---|" + "---:|" * 11]
    for w, per in summ.items():
        for key, f in per.items():
            time_ratio = "1" if key == "a" else _ratio(f["seconds_ratio"])
            mig_ratio = "1" if key == "a" else _ratio(f["migrations_ratio"])
            cross_ratio = "1" if key == "a" else _ratio(f["cross_migrations_ratio"])
            failed = f" ({f['errors']} failed)" if f["errors"] else ""
            lines.append(
                f"| {w} | ({key}) {names[key]}{failed} | {_spread(f['seconds'], '.1f')} | "
                f"{time_ratio} | {_spread(f['migrations'], ',.0f')} | {mig_ratio} | "
                f"{_median(f['cross_migrations'])} | {cross_ratio} | "
                f"{_median(f['mlsched_candidates'])} | {_median(f['hit_rate'], '.1f', 100)} | "
                f"{_median(f['mlsched_sent'])} | {_median(f['mlsched_steals'])} | "
                f"{_median(f['loader_cpu_s'], '.1f')} |")
    lines.append("")
    return lines


# --- summary ----------------------------------------------------------------------------------


def summary_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows."""
    rows: list[tuple[str, str, str, str]] = []
    host = res.get("host_pipeline")
    vm = (res.get("vm") or {}).get("pipeline")
    for label, p in (("host", host), ("VM", vm and vm.get("synthetic"))):
        if not p:
            continue
        for b in (64, 256, 1024):
            v = decide_rate(p, "numpy", b)
            rows.append((f"{label}: decide stage, numpy, batch {b}", f"{_fmt_int(v)}/s",
                         "≥ 1,000,000/s", _ok(v >= TARGET_DECISIONS_PER_S if v else None)))
        s = sustained(p["paced"], "numpy", 2.0)
        pk = peak(p["paced"], "numpy")
        rows.append((f"{label}: end to end, numpy batch 64, highest load kept up with",
                     f"{_fmt_int(s['decisions_per_s'])}/s" if s else "none",
                     "≥ 1,000,000/s", _ok(bool(s) and s["decisions_per_s"] >= 1e6)))
        if pk and (not s or pk is not s):
            rows.append((f"{label}: end to end, numpy, peak decided/s in any window",
                         f"{_fmt_int(pk['decisions_per_s'])}/s "
                         f"(at {_fmt_int(pk['offered_per_s'])}/s offered)", "", ""))
        naive_stage = decide_rate(p, "naive", 1)
        naive_peak = peak(p["paced"], "naive")
        if naive_stage:
            for b in (64,):
                v = decide_rate(p, "numpy", b)
                t = decide_rate(p, "tf", b)
                if v:
                    rows.append((f"{label}: decide stage numpy b{b} / naive TF",
                                 f"{v / naive_stage:,.0f}×", "≥ 100×",
                                 _ok(v / naive_stage >= TARGET_NAIVE_RATIO)))
                if t:
                    rows.append((f"{label}: decide stage TF b{b} / naive TF",
                                 f"{t / naive_stage:,.0f}×", "", ""))
        if naive_peak and s:
            r = s["decisions_per_s"] / naive_peak["decisions_per_s"]
            rows.append((f"{label}: end to end, numpy kept-up load / naive TF peak",
                         f"{r:,.0f}× ({_fmt_int(s['decisions_per_s'])} vs "
                         f"{_fmt_int(naive_peak['decisions_per_s'])}/s)", "≥ 100×",
                         _ok(r >= TARGET_NAIVE_RATIO)))
        if label == "VM":
            for r in p["paced"]:
                if r["backend"] == "numpy" and r["offered_per_s"] <= 10_000:
                    ok = (r["p50_us"] is not None and r["p50_us"] <= TARGET_P50_US
                          and r["p99_us"] <= TARGET_P99_US)
                    rows.append((f"VM: event→map, synthetic {_fmt_int(r['offered_per_s'])}/s, "
                                 f"max wait {r['max_wait_ms']:g} ms",
                                 f"p50 {_fmt_us(r['p50_us'])}, p99 {_fmt_us(r['p99_us'])}",
                                 "p50 ≤ 200 µs, p99 ≤ 2 ms", _ok(ok)))
    if vm:
        rc = vm.get("real_candidates") or {}
        if rc.get("p50_us") is not None:
            ok = rc["p50_us"] <= TARGET_P50_US and rc["p99_us"] <= TARGET_P99_US
            rows.append(("VM: event→map, mlsched's real candidates (stress-ng)",
                         f"p50 {_fmt_us(rc['p50_us'])}, p99 {_fmt_us(rc['p99_us'])} "
                         f"({rc['decided']:,} decisions)", "p50 ≤ 200 µs, p99 ≤ 2 ms", _ok(ok)))
        st = vm.get("steady") or {}
        if st.get("hit_rate") is not None:
            rows.append((f"VM: decision-table hit rate, {st['warm_s']}–"
                         f"{st['warm_s'] + st['measure_s']} s of steady load",
                         f"{100 * st['hit_rate']:.2f} % of {st['candidates']:,}", "≥ 95 %",
                         _ok(st["hit_rate"] >= TARGET_HIT_RATE)))
    o = (res.get("vm") or {}).get("outcome")
    if o:
        summ = outcome_summary(o)
        for w, per in summ.items():
            a, b = per.get("a"), per.get("b")
            for key in ("b", "c", "d"):
                f = per.get(key)
                if not f or not f["seconds"]:
                    continue
                med = f["migrations"]["median"]
                misses = []
                if a and a["migrations"] and med >= a["migrations"]["median"]:
                    misses.append("migrations ≥ (a)")
                if key != "b" and b and b["migrations"] and med >= b["migrations"]["median"]:
                    misses.append("migrations ≥ (b)")
                if f["seconds_ratio"] is not None and f["seconds_ratio"] > 1.0:
                    misses.append("slower than (a)")
                verdict = "" if key == "b" else (
                    "met" if not misses else "**not met**: " + ", ".join(misses))
                name = next(c["name"] for c in o["configs"] if c["key"] == key)
                rows.append((f"outcome {w}: ({key}) {name} vs (a)",
                             f"time {_ratio(f['seconds_ratio'])}, migrations "
                             f"{_ratio(f['migrations_ratio'])}",
                             "" if key == "b" else "fewer migrations than (a) and (b), "
                             "time ≤ (a)", verdict))
    return rows


def summary_table(res: dict[str, Any]) -> list[str]:
    lines = ["| figure | measured | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(res)]
    return lines + [""]


# --- plots ------------------------------------------------------------------------------------


def plots(res: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    sets = [(lbl, p) for lbl, p in (("host", res.get("host_pipeline")),
                                    ("VM", ((res.get("vm") or {}).get("pipeline") or {})
                                     .get("synthetic"))) if p]
    if sets:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
        colors = {"numpy": "tab:blue", "tf": "tab:orange", "naive": "tab:green"}
        for lbl, p in sets:
            for backend in dict.fromkeys(r["backend"] for r in p["paced"]):
                rows = [r for r in p["paced"] if r["backend"] == backend
                        and r.get("max_wait_ms") in (None, 2.0)]
                if not rows:
                    continue
                x = [r["offered_per_s"] for r in rows]
                style = "-o" if lbl == "host" else "--s"
                color = colors.get(backend, "tab:gray") if lbl == "host" else "tab:purple"
                axes[0].plot(x, [max(r["decisions_per_s"], 1) for r in rows], style,
                             color=color, label=f"{lbl} {backend}")
                axes[1].plot(x, [r["p50_us"] or float("nan") for r in rows], style,
                             color=color, label=f"{lbl} {backend} p50")
                axes[1].plot(x, [r["p99_us"] or float("nan") for r in rows], style,
                             color=color, alpha=0.35, label=f"{lbl} {backend} p99")
        lim = [1e3, 1.2e6]
        axes[0].plot(lim, lim, ":", color="grey", label="decided = offered")
        axes[0].set(xscale="log", yscale="log", xlabel="offered records/s",
                    ylabel="decided/s (in the window)", title="Throughput, batch 64")
        axes[1].set(xscale="log", yscale="log", xlabel="offered records/s",
                    ylabel="BPF timestamp → decision in map, µs", title="Latency, max wait 2 ms")
        axes[1].axhline(TARGET_P50_US, color="grey", ls=":")
        axes[1].axhline(TARGET_P99_US, color="grey", ls="-.")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}-pipeline.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    o = (res.get("vm") or {}).get("outcome")
    if o:
        summ = outcome_summary(o)
        keys = [c["key"] for c in o["configs"] if c["key"] != "a"]
        names = {c["key"]: c["name"] for c in o["configs"]}
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
        width = 0.8 / len(keys)
        panels = (("seconds", axes[0], "Completion time / (a)"),
                  ("migrations", axes[1], "Migrations / (a)"),
                  ("cross_migrations", axes[2], "Migrations across domains / (a)"))
        for i, key in enumerate(keys):
            for fig_key, ax, _ in panels:
                meds, lo, hi = [], [], []
                for w in summ:
                    f, a = summ[w][key][fig_key], summ[w]["a"][fig_key]
                    if f and a and a["median"]:
                        meds.append(f["median"] / a["median"])
                        lo.append(f["median"] / a["median"] - f["min"] / a["median"])
                        hi.append(f["max"] / a["median"] - f["median"] / a["median"])
                    else:
                        meds.append(float("nan"))
                        lo.append(0)
                        hi.append(0)
                xs = [k + (i - (len(keys) - 1) / 2) * width for k in range(len(summ))]
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=f"({key}) {names[key]}")
        for _, ax, title in panels:
            ax.axhline(1.0, color="grey", ls=":")
            ax.set_xticks(range(len(summ)), list(summ))
            ax.set(title=title + "\n(median; bars: min–max)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = out_dir / f"{stem}-outcome.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    st = (((res.get("vm") or {}).get("pipeline") or {}).get("steady") or {}).get("series")
    if st:
        fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
        ax.plot([s["t_s"] for s in st],
                [100 * s["hit_rate"] if s["hit_rate"] is not None else float("nan")
                 for s in st], "-o")
        ax.axhline(100 * TARGET_HIT_RATE, color="grey", ls=":")
        ax.set(xlabel="s of steady load", ylabel="hit rate per second, %",
               title="Decision-table hit rate (VM)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}-hitrate.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


# --- the document -----------------------------------------------------------------------------


def markdown(res: dict[str, Any], pngs: list[Path]) -> str:
    m = res["meta"]
    lines = [f"# mlsched benchmark, {m['date']}", "",
             f"`{m['command']}` on {m['host']} (host kernel {m['host_kernel']}, {m['host_cpus']} "
             f"CPUs), commit {m['commit']}; wall time {m.get('wall_s', 0) / 60:.1f} min.", ""]
    for phase, label in (("host_load_pipeline", "the host pipeline"),
                         ("host_load_vm", "the VM part")):
        h = m.get(phase)
        if h:
            ours = " (ours included)" if phase == "host_load_vm" else ""
            lines += [f"Host load during {label}: 1-min load average median {h['load1_median']}, "
                      f"max {h['load1_max']} (on {m['host_cpus']} CPUs); up to {h['vms_max']} "
                      f"VMs running at once{ours}.", ""]
    vm = res.get("vm") or {}
    if vm:
        lines += [f"VM: kernel {vm.get('kernel')}, {vm.get('cpus')} vCPUs under TCG, "
                  f"2 mlsched domains; bcc counter compiled in {vm.get('bcc_compile_s')} s.", ""]
    lines += ["## Summary", ""] + summary_table(res)
    lines += ["## Decision pipeline", ""]
    if res.get("host_pipeline"):
        lines += pipeline_tables(res["host_pipeline"])
    p = vm.get("pipeline") or {}
    if p.get("synthetic"):
        lines += ["### In the VM, mlsched attached (dummy model, numpy)", ""]
        lines += pipeline_tables(p["synthetic"])
        rc = p.get("real_candidates") or {}
        st = p.get("steady") or {}
        lines += [f"mlsched's own candidates over the loader's life: {rc.get('decided')} "
                  f"decided in {rc.get('batches')} batches, event→map p50 "
                  f"{_fmt_us(rc.get('p50_us'))}, p99 {_fmt_us(rc.get('p99_us'))}, max "
                  f"{_fmt_us(rc.get('max_us'))}. Hit rate {st.get('warm_s')}–"
                  f"{(st.get('warm_s') or 0) + (st.get('measure_s') or 0)} s into stress-ng: "
                  + (f"{100 * st['hit_rate']:.2f} % of {st['candidates']:,} candidates "
                     f"({st['rb_drops']} ring drops)." if st.get("hit_rate") is not None
                     else "no candidates."), ""]
    o = vm.get("outcome")
    if o:
        lines += ["## Scheduling outcome", "",
                  f"{o['repeats']} rounds, configurations in a seeded random order per round "
                  f"(seed {o['seed']}); workload scale {o['scale']}; {len(o['runs'])} runs "
                  f"over {o.get('boots', 1)} VM boot(s)"
                  + (" (a VM that died was booted again and the runs resumed after a new "
                     "warm-up)" if o.get("boots", 1) > 1 else "") + ".", ""]
        lines += [f"- ({c['key']}) {c['name']}: {c['what']}" for c in o["configs"]]
        lines += [f"- {w['name']}: {w['what']} — `{' '.join(w['command'])}`"
                  for w in o["workloads"]]
        lines += [""] + outcome_tables(o)
    for png in pngs:
        lines += [f"![{png.stem}]({png.name})", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, list[Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(res, out_dir, stem)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(res, pngs) + "\n")
    return md, pngs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.report",
                                 description="Markdown tables and PNG plots from a results file.")
    ap.add_argument("results", type=Path, help="bench-results/<date>.json")
    ap.add_argument("--out-dir", type=Path, help="default: next to the results file")
    args = ap.parse_args(argv)
    res = json.loads(args.results.read_text())
    md, pngs = write(res, args.out_dir or args.results.parent, args.results.stem)
    print("\n".join(summary_table(res)))
    print(f"report: {md}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
