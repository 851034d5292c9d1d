"""Wakeup latency under CPU hogs: the kernel's default scheduler (EEVDF) against mlsched.

usage (inside the sched_ext VM, as root; `make bench-wakeup` boots it):
    python -m tools.bench.wakelat --out FILE.json [--md FILE.md] [--rounds R] [--runtime-s S]
        [--hogs N] [--config NAME="LOADER ARGS"]...

Every run is the same mixed load: `stress-ng --cpu N` (N CPU hogs, one fixed method) and, once
the hogs are up, build/bench/wakeprobe (M message threads waking W workers each through a futex;
each woken worker records its wakeup latency and does one fixed request). Configurations:

- eevdf: nothing attached, the kernel's default scheduler;
- mlsched: `python -m loader.main --model model_dir/model_path --domains 2`, started *before*
  the load (Python starts slowly under load in the TCG guest), taken as attached when
  /sys/kernel/sched_ext/state reads `enabled` and root/ops is `mlsched`, then --settle-s for the
  model; stopped with SIGINT after the load;
- one more mlsched configuration per --config NAME="ARGS": the same loader with ARGS appended
  (e.g. --config slice5ms="--slice-us 5000"), so slice policies can be compared in one boot.

Protocol, all in one boot: the request work is calibrated once on the idle guest (wakeprobe
--calibrate, best of 3) and passed to every run as a loop count, so each request is the same
work whatever the load; one untimed warm-up run under eevdf; then R rounds, each running every
configuration once in a seeded random order. Within a run wakeprobe discards its first
--warmup-s seconds. A run counts only if wakeprobe exited 0 with samples, the hogs' metrics were
read and (for mlsched) the scheduler stayed attached the whole run (same enable_seq, loader
alive). Figures per configuration: the median over rounds, with min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader import paths
from tools.bench.sched import STOP_TIMEOUT_S, SchedProcess, read_text, scx_ops, scx_state

REPO_ROOT = paths.CHECKOUT
WAKEPROBE = REPO_ROOT / "build" / "bench" / "wakeprobe"
BUNDLED_MODEL = paths.BUNDLED_MODEL
SCHED_NAME = "mlsched"
ATTACH_TIMEOUT_S = 120
HOG_METHOD = "int64"  # one fixed stress-ng method: a bogo op is the same work in every run
BASELINE = "eevdf"

EXAMPLES = """examples:
  python -m tools.bench.wakelat --out build/vm-out/wakeup/wakelat.json          # defaults
  python -m tools.bench.wakelat --out F.json --rounds 2 --runtime-s 10 --hogs 8
  python -m tools.bench.wakelat --out F.json --config slice5ms="--slice-us 5000" \\
      --config slice1ms="--slice-us 1000"
  python -m tools.bench.wakelat --report F.json --md F.md      # the tables again, no run
"""

_T0 = time.monotonic()


def say(msg: str) -> None:
    t = int(time.monotonic() - _T0)
    print(f"wakelat [{t // 60:02d}:{t % 60:02d}]: {msg}", flush=True)


def kernel_sched() -> dict[str, Any]:
    """What shapes EEVDF's wakeup latency: the preemption model, HZ, the base slice."""
    out: dict[str, Any] = {}
    m = re.search(r"\((\w+)\)", read_text(Path("/sys/kernel/debug/sched/preempt")))
    if m:
        out["preempt"] = m.group(1)  # under "lazy", a fair wakeup preempts at the next tick
    config = read_text(Path(f"/lib/modules/{os.uname().release}/config"))
    m = re.search(r"^CONFIG_HZ=(\d+)$", config, re.M)
    if m:
        out["hz"] = int(m.group(1))
    v = read_text(Path("/sys/kernel/debug/sched/base_slice_ns"))
    if v.isdigit():
        out["eevdf_base_slice_ns"] = int(v)
    return out


# --- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    loader_args: tuple[str, ...] | None  # None: nothing attached (EEVDF)


def parse_config(text: str) -> tuple[str, tuple[str, ...]]:
    """NAME=ARGS -> (NAME, shlex-split ARGS); ARGS may be empty."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,32}", name):
        raise argparse.ArgumentTypeError(
            f"--config wants NAME=\"LOADER ARGS\" (NAME: letters, digits, _.+-), not {text!r}")
    if name == BASELINE:
        raise argparse.ArgumentTypeError(f"--config: {BASELINE!r} is the built-in baseline")
    try:
        return name, tuple(shlex.split(rest))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--config {name}: {e}") from e


def make_configs(args: argparse.Namespace) -> list[Config]:
    base = ("--model", str(args.model), "--domains", str(args.domains))
    cfgs = [Config(BASELINE, None)]
    if not args.no_default_mlsched:
        cfgs.append(Config("mlsched", base))
    for name, extra in args.config:
        if any(c.name == name for c in cfgs):
            raise SystemExit(f"wakelat: configuration {name!r} given twice")
        cfgs.append(Config(name, base + extra))
    if len(cfgs) < 2:
        raise SystemExit("wakelat: nothing to compare with eevdf (--no-default-mlsched and no "
                         "--config)")
    return cfgs


# --- the pieces of one run ----------------------------------------------------------------------


def start_loader(args: tuple[str, ...], log_path: Path) -> SchedProcess:
    """One mlsched loader (python -m loader.main ARGS), returned once attached."""
    return SchedProcess("the loader", [sys.executable, "-m", "loader.main", *args], SCHED_NAME,
                        log_path, ATTACH_TIMEOUT_S)


class Hogs:
    """stress-ng --cpu N with one fixed method; SIGINT at the end makes it print its metrics."""

    METRIC = re.compile(r"\]\s+cpu\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)")

    def __init__(self, n: int, max_s: float) -> None:
        self.n = n
        self.cmd = ["stress-ng", "--temp-path", "/tmp", "--cpu", str(n), "--cpu-method",
                    HOG_METHOD, "--timeout", f"{int(max_s)}s", "--metrics-brief"]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def stop(self) -> dict[str, float]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        m = self.METRIC.search(out or "")
        if not m:
            tail = " | ".join((out or "").strip().splitlines()[-3:])
            raise RuntimeError(f"no stress-ng metrics (exit {self.proc.returncode}): {tail}")
        ops, real_s = int(m.group(1)), float(m.group(2))
        return {"bogo_ops": ops, "real_s": real_s, "usr_s": float(m.group(3)),
                "sys_s": float(m.group(4)),
                "bogo_ops_per_s": ops / real_s if real_s > 0 else 0.0}


def wakeprobe_cmd(args: argparse.Namespace, loops: int) -> list[str]:
    return [str(args.wakeprobe), "--message-threads", str(args.message_threads),
            "--workers", str(args.workers), "--runtime-s", str(args.runtime_s),
            "--warmup-s", str(args.warmup_s), "--request-loops", str(loops), "--json"]


def calibrate(wakeprobe: Path, tries: int = 3) -> float:
    """The request loop's iterations per µs on the idle guest: the best of a few."""
    best = 0.0
    for _ in range(tries):
        out = subprocess.run([str(wakeprobe), "--calibrate", "--json"], capture_output=True,
                             text=True, check=True, timeout=120).stdout
        best = max(best, float(json.loads(out)["loops_per_us"]))
    return best


def run_once(cfg: Config, args: argparse.Namespace, loops: int, out_dir: Path,
             tag: str) -> dict[str, Any]:
    """Loader (if any), hogs, wakeprobe; returns the run's record (with "error" if invalid)."""
    rec: dict[str, Any] = {"config": cfg.name}
    ld: SchedProcess | None = None
    hogs: Hogs | None = None
    t0 = time.monotonic()
    try:
        if cfg.loader_args is None:
            if scx_state() != "disabled":
                raise RuntimeError(f"sched_ext is {scx_state()} ({scx_ops()}) under eevdf")
        else:
            ld = start_loader(cfg.loader_args, out_dir / f"loader-{tag}-{cfg.name}.log")
            rec["attach_s"] = round(ld.attach_s, 2)
            time.sleep(args.settle_s)
            if why := ld.left():
                raise RuntimeError(f"mlsched left before the load: {why}")
        probe_s = args.warmup_s + args.runtime_s
        hogs = Hogs(args.hogs, args.hog_lead_s + probe_s + 120)
        time.sleep(args.hog_lead_s)
        if hogs.proc.poll() is not None:
            raise RuntimeError(f"stress-ng exited {hogs.proc.returncode} at start")
        # Markers for the host (tools/bench/wakeup.py), which times them as they arrive and
        # measures how much CPU the VM got, and the rest of the host used, in between.
        say(f"run {tag} {cfg.name}: measuring")
        res = subprocess.run(wakeprobe_cmd(args, loops), capture_output=True, text=True,
                             timeout=probe_s + 120)
        say(f"run {tag}: measured")
        if res.returncode != 0:
            raise RuntimeError(f"wakeprobe exited {res.returncode}: {res.stderr.strip()}")
        rec["probe"] = json.loads(res.stdout)
        if ld is not None and (why := ld.left()):
            raise RuntimeError(f"mlsched left during the load: {why}")
        rec["hogs"] = hogs.stop()
        hogs = None
        if rec["probe"]["samples"] == 0:
            raise RuntimeError("wakeprobe took no samples")
        if cfg.loader_args is None and scx_state() != "disabled":
            raise RuntimeError(f"a scheduler attached during the eevdf run ({scx_ops()})")
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        rec["error"] = str(e)
    finally:
        if hogs is not None:
            try:
                hogs.stop()
            except RuntimeError:
                pass
        if ld is not None:
            rec["loader_status"] = ld.stop()
            if rec["loader_status"] != 0 and "error" not in rec:
                rec["error"] = f"loader exited {rec['loader_status']}: {ld.tail()}"
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    return rec


def describe(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    w, p = r["probe"]["wakeup_us"], r["probe"]
    return (f"wakeup avg {w['avg']:.0f} us, p50 {w['p50']:.0f}, p99 {w['p99']:.0f}, max "
            f"{w['max']:.0f} ({w['samples']} samples); {p['requests_per_s']:.0f} requests/s; "
            f"hogs {r['hogs']['bogo_ops_per_s']:.0f} bogo ops/s")


# --- summary and tables -------------------------------------------------------------------------

FIGURES: tuple[tuple[str, str], ...] = (
    ("wakeup_avg_us", "wakeup avg, µs"), ("wakeup_p50_us", "p50, µs"),
    ("wakeup_p99_us", "p99, µs"), ("requests_per_s", "requests/s"),
    ("hog_ops_per_s", "hog bogo ops/s"), ("samples", "samples/run"))


def figures(r: dict[str, Any]) -> dict[str, float]:
    w = r["probe"]["wakeup_us"]
    return {"wakeup_avg_us": w["avg"], "wakeup_p50_us": w["p50"], "wakeup_p90_us": w["p90"],
            "wakeup_p99_us": w["p99"], "wakeup_max_us": w["max"],
            "requests_per_s": r["probe"]["requests_per_s"],
            "hog_ops_per_s": r["hogs"]["bogo_ops_per_s"], "samples": w["samples"]}


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in res["configs"]:
        runs = [r for r in res["runs"] if r["config"] == cfg["name"] and "error" not in r]
        figs = [figures(r) for r in runs]
        s: dict[str, Any] = {"runs": len(runs),
                             "errors": sum(1 for r in res["runs"]
                                           if r["config"] == cfg["name"] and "error" in r)}
        for key in figs[0] if figs else ():
            vals = [f[key] for f in figs]
            s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        s["samples_total"] = int(sum(f["samples"] for f in figs))
        out[cfg["name"]] = s
    return out


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def _cell(s: dict[str, float] | None) -> str:
    if not s:
        return "–"
    return f"{_num(s['median'])} ({_num(s['min'])}–{_num(s['max'])})"


def table(res: dict[str, Any]) -> list[str]:
    summ = res.get("summary") or summarize(res)
    head = ["config", "runs"] + [label for _, label in FIGURES]
    rows = [head, ["---", "---:"] + ["---:"] * len(FIGURES)]
    base = summ.get(BASELINE, {})
    for name, s in summ.items():
        rows.append([name, str(s["runs"]) + (f" ({s['errors']} failed)" if s["errors"] else "")]
                    + [_cell(s.get(k)) for k, _ in FIGURES])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    ratios = []
    for name, s in summ.items():
        if name == BASELINE or not s.get("wakeup_avg_us") or not base.get("wakeup_avg_us"):
            continue
        parts = [f"{label.split(',')[0]} {s[k]['median'] / base[k]['median']:.2f}×"
                 for k, label in FIGURES[:5] if base[k]["median"]]
        ratios.append(f"- {name} / {BASELINE} (medians): " + ", ".join(parts))
    return lines + ([""] + ratios if ratios else [])


CONTENDED_VM_CPU = 0.9  # single-threaded TCG uses one host CPU: a VM given less waited


def host_note(res: dict[str, Any]) -> list[str]:
    """What the host monitor (tools/bench/wakeup.py) saw during the measured windows."""
    runs = [r for r in res["runs"] if "host" in r]
    if not runs:
        return []
    vm = [r["host"]["vm_cpu"] for r in runs]
    other = [r["host"]["other_cpu"] for r in runs]
    bad = [f"#{r['seq']} ({r['config']}, {r['host']['vm_cpu']:.2f})" for r in runs
           if r["host"]["vm_cpu"] < CONTENDED_VM_CPU]
    return [f"Host during the measured windows: the VM used {min(vm):.2f}–{max(vm):.2f} CPUs "
            f"(single-threaded TCG: at most 1), the rest of the host {min(other):.2f}–"
            f"{max(other):.2f}. "
            + (f"**Contended** (VM < {CONTENDED_VM_CPU} CPU): {', '.join(bad)}; treat "
               "those runs with care." if bad else "No run was contended.")]


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    p = res["params"]
    lines = [
        f"# Wakeup latency under CPU hogs — {m.get('date', '?')}", "",
        f"Guest: kernel {m.get('kernel')}, {m.get('cpus')} CPUs (TCG)"
        + "".join(f", {k} {v}" for k, v in (m.get("sched") or {}).items()) + ". "
        + (f"Host: {m['host']} ({m.get('host_cpus')} CPUs), commit {m.get('commit')}, "
           f"load average median {m['host_load']['load1_median']} "
           f"(max {m['host_load']['load1_max']}). " if "host_load" in m else "")
        + (f"Wall time {m['wall_s'] / 60:.1f} min, " if "wall_s" in m else "")
        + f"in the guest {m.get('guest_wall_s', 0) / 60:.1f} min.",
        "",
        f"Load per run: `stress-ng --cpu {p['hogs']} --cpu-method {HOG_METHOD}` and, "
        f"{p['hog_lead_s']} s later, `wakeprobe -m {p['message_threads']} -w {p['workers']}` "
        f"({p['message_threads'] * (p['workers'] + 1)} threads), requests of "
        f"{p['request_loops']:,} loops (= {p['request_us']} µs on the idle guest, "
        f"{p['loops_per_us']:.1f} loops/µs), {p['warmup_s']} s warm-up then "
        f"{p['runtime_s']} s measured. Rounds: {p['rounds']}, configurations in a seeded random "
        f"order (seed {p['seed']}), after one untimed warm-up run under {BASELINE}. Medians "
        "over rounds (min–max); latencies are wakeprobe's exact percentiles per run.", "",
        "Configurations:", "",
    ]
    for c in res["configs"]:
        what = ("nothing attached (the kernel's default scheduler)" if c["loader_args"] is None
                else "`python -m loader.main " + shlex.join(c["loader_args"]) + "`")
        lines.append(f"- {c['name']}: {what}")
    note = host_note(res)
    lines += ["", *table(res), *([""] + note if note else []), "", "## Runs", "",
              "| # | round | config | wakeup avg | p50 | p90 | p99 | max | samples | "
              "not asleep | requests/s | hog ops/s | attach s | VM CPU | host other CPU |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        h = r.get("host") or {}
        hcols = f"{h.get('vm_cpu', '–')} | {h.get('other_cpu', '–')} |"
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['round'] + 1} | {r['config']} | error: "
                         f"{r['error'][:120]} |  |  |  |  |  |  |  |  |  | {hcols}")
            continue
        f = figures(r)
        lines.append(
            f"| {r['seq']} | {r['round'] + 1} | {r['config']} | {f['wakeup_avg_us']:,.1f} | "
            f"{f['wakeup_p50_us']:,.1f} | {f['wakeup_p90_us']:,.1f} | {f['wakeup_p99_us']:,.1f} | "
            f"{f['wakeup_max_us']:,.0f} | {f['samples']:,} | {r['probe']['not_asleep']:,} | "
            f"{f['requests_per_s']:,.0f} | {f['hog_ops_per_s']:,.0f} | "
            f"{r.get('attach_s', '–')} | {hcols}")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.wakelat",
        description="Wakeup latency (wakeprobe) beside CPU hogs (stress-ng) under EEVDF and "
        "mlsched, interleaved in one boot. Runs in the sched_ext VM as root.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON results (written after every run)")
    ap.add_argument("--md", type=Path, help="also write the markdown report here")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="print (and --md: write) the tables of an existing results file; "
                    "runs nothing")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    ap.add_argument("--runtime-s", type=float, default=15,
                    help="wakeprobe's measured window per run (default: %(default)s)")
    ap.add_argument("--warmup-s", type=float, default=3,
                    help="wakeprobe's uncounted warm-up per run (default: %(default)s)")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 1,
                    help="stress-ng CPU hogs (default: one per CPU, %(default)s)")
    ap.add_argument("--hog-lead-s", type=float, default=2,
                    help="hogs run this long before wakeprobe starts (default: %(default)s)")
    ap.add_argument("--message-threads", type=int, default=2,
                    help="wakeprobe message threads (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2,
                    help="wakeprobe workers per message thread (default: %(default)s)")
    ap.add_argument("--request-us", type=float, default=100,
                    help="work per request, µs on the idle guest (default: %(default)s)")
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL,
                    help="mlsched's model (default: model_dir/model_path)")
    ap.add_argument("--domains", type=int, default=2, help="mlsched --domains (default: 2)")
    ap.add_argument("--config", type=parse_config, action="append", default=[],
                    metavar='NAME="ARGS"',
                    help="one more mlsched configuration: the loader with ARGS appended "
                    "(repeatable)")
    ap.add_argument("--no-default-mlsched", action="store_true",
                    help="no plain `mlsched` configuration (only eevdf and the --config ones)")
    ap.add_argument("--settle-s", type=float, default=3,
                    help="wait after attach, before the load, for the model (default: "
                    "%(default)s)")
    ap.add_argument("--warmup-run-s", type=float, default=8,
                    help="untimed warm-up run under eevdf, measured seconds; 0: none "
                    "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the run order")
    ap.add_argument("--wakeprobe", type=Path, default=WAKEPROBE,
                    help="wakeprobe binary (default: build/bench/wakeprobe; make it with "
                    "`make build/bench/wakeprobe`)")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.report is None and args.out is None:
        ap.error("--out is required (or --report FILE to print an existing one)")
    for name in ("rounds", "hogs", "message_threads", "workers", "domains"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("runtime_s", "request_us"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("warmup_s", "hog_lead_s", "settle_s", "warmup_run_s"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must not be negative")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.report is not None:
        res = json.loads(args.report.read_text())
        if args.md:
            args.md.write_text(markdown(res))
        print("\n".join(table(res)))
        return 0
    cfgs = make_configs(args)
    if os.geteuid() != 0 or scx_state() == "unsupported":
        say("must run as root on a sched_ext kernel (scripts/vm-run.sh)")
        return 2
    if not os.access(args.wakeprobe, os.X_OK):
        say(f"{args.wakeprobe} missing: run `make build/bench/wakeprobe` on the host")
        return 2
    if shutil.which("stress-ng") is None:
        say("stress-ng missing (Debian package stress-ng)")
        return 2
    if scx_state() != "disabled":
        say(f"sched_ext is {scx_state()} ({scx_ops()}) at start; detach it first")
        return 2
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)

    say(f"kernel {os.uname().release}, {os.cpu_count()} CPUs; calibrating the request loop")
    lpu = calibrate(args.wakeprobe)
    loops = max(1, round(args.request_us * lpu))
    say(f"{lpu:.1f} loops/us on the idle guest: a request is {loops} loops "
        f"({args.request_us:g} us)")
    res: dict[str, Any] = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "kernel": os.uname().release,
                 "cpus": os.cpu_count(), "sched": kernel_sched()},
        "params": {"rounds": args.rounds, "runtime_s": args.runtime_s,
                   "warmup_s": args.warmup_s, "hogs": args.hogs, "hog_method": HOG_METHOD,
                   "hog_lead_s": args.hog_lead_s, "message_threads": args.message_threads,
                   "workers": args.workers, "request_us": args.request_us,
                   "loops_per_us": lpu, "request_loops": loops, "settle_s": args.settle_s,
                   "seed": args.seed, "wakeprobe": wakeprobe_cmd(args, loops)},
        "configs": [{"name": c.name, "loader_args": list(c.loader_args)
                     if c.loader_args is not None else None} for c in cfgs],
        "warmup": None, "runs": [], "complete": False,
    }

    def save() -> None:
        res["meta"]["guest_wall_s"] = round(time.monotonic() - _T0, 1)
        res["summary"] = summarize(res)
        tmp = args.out.with_suffix(".tmp")  # then rename: a VM that dies leaves a whole file
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        os.replace(tmp, args.out)

    if args.warmup_run_s > 0:
        warm = argparse.Namespace(**{**vars(args), "runtime_s": args.warmup_run_s,
                                     "warmup_s": 1.0})
        say(f"warm-up run under {BASELINE} ({args.warmup_run_s:g} s, not counted)")
        res["warmup"] = run_once(cfgs[0], warm, loops, out_dir, "warmup")
        say(f"warm-up: {describe(res['warmup'])}")
    rng = random.Random(args.seed)
    plan = [(rnd, cfg) for rnd in range(args.rounds)
            for cfg in rng.sample(cfgs, len(cfgs))]
    t_start = time.monotonic()
    for seq, (rnd, cfg) in enumerate(plan, start=1):
        r = run_once(cfg, args, loops, out_dir, f"{seq:02d}")
        r["round"], r["seq"] = rnd, seq
        res["runs"].append(r)
        save()
        eta = (time.monotonic() - t_start) / seq * (len(plan) - seq)
        say(f"[{seq}/{len(plan)}] round {rnd + 1} {cfg.name:10s} {describe(r)} "
            f"({r['wall_s']:.0f} s; eta {eta / 60:.1f} min)")
    res["complete"] = True
    save()
    if args.md:
        args.md.write_text(markdown(res))
    print()
    print("\n".join(table(res)))
    failed = sum(1 for r in res["runs"] if "error" in r)
    say(f"done in {time.monotonic() - _T0:.0f} s: {args.out}"
        + (f"; {failed} runs failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
