"""The VM half of `make bench`: pipeline with mlsched attached, then the scheduling outcome.

usage (inside the sched_ext VM, as root; tools/bench/__main__.py boots it):
    python -m tools.bench.guest --out FILE --codebase DIR --trained DIR [--repeats N]

1. Migration counter: a bcc program on sched:sched_migrate_task, compiled once.
2. Pipeline, mlsched attached: mlsched-load (tools/bench/probe_loader.py, which records every
   decision's event -> map latency) serves the dummy model; meanwhile the synthetic ring
   buffer benchmark (tools/bench/pipeline.py, numpy backend) runs, then a steady stress-ng load
   whose first 10 s warm the decision table; the hit rate is read over the next 10 s.
3. Outcome: the workloads (tools/bench/workloads.py) under (a) the kernel's default scheduler,
   (b) mlsched with its fallback heuristic only (--no-model), (c) mlsched + the dummy model,
   (d) mlsched + the model model_export.py trained. One untimed warm-up pass under (a), then
   `repeats` rounds; each round takes the workloads in a seeded random order and runs each
   under the four configurations in a seeded random order. Every mlsched run has a loader of
   its own (attached before, detached after: each starts with an empty decision table). For
   every run: completion time, the workload's own figures, sched_migrate_task events, and
   for mlsched its counters and the loader's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader import contract
from loader.scheduler import scx_ops_name, scx_state
from tools.bench.migcount import MigrationCounter
from tools.bench.workloads import Workload, workloads

REPO_ROOT = Path(__file__).resolve().parents[2]
DUMMY_MODEL = REPO_ROOT / "model_dir" / "model_path"
ATTACH_TIMEOUT_S = 120
MODEL_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
RUN_TIMEOUT_S = 600
STEADY_WARM_S = 10  # the hit rate is read after this much steady load...
STEADY_MEASURE_S = 10  # ...over this window


_T0 = time.monotonic()


def say(msg: str) -> None:
    t = int(time.monotonic() - _T0)
    print(f"bench-vm [{t // 60:02d}:{t % 60:02d}]: {msg}", flush=True)


@dataclass(frozen=True)
class SchedConfig:
    key: str  # a, b, c, d
    name: str
    what: str
    loader_args: tuple[str, ...] | None  # None: nothing attached
    wait_model: bool


def configs(trained: Path) -> list[SchedConfig]:
    common = ("--domains", "2")
    return [
        SchedConfig("a", "default", "the kernel's default scheduler (EEVDF), nothing attached",
                    None, False),
        SchedConfig("b", "fallback", "mlsched, fallback heuristic only (--no-model)",
                    ("--model", str(DUMMY_MODEL), "--no-model", *common), False),
        SchedConfig("c", "dummy", "mlsched + the dummy model (model_dir/model_path)",
                    ("--model", str(DUMMY_MODEL), *common), True),
        SchedConfig("d", "trained", f"mlsched + the model_export.py model ({trained.name})",
                    ("--model", str(trained), *common), True),
    ]


class Pinned:
    """mlsched's counters and loader figures, from the maps the loader pins."""

    def __init__(self, pin_dir: str = contract.PIN_DIR) -> None:
        from loader import libbpf
        from loader.bpfmaps import PerCpuU64Array, U64Array

        self._fds = [libbpf.obj_get(os.path.join(pin_dir, m))
                     for m in (contract.MAP_COUNTERS, contract.MAP_LOADER_STATS)]
        self.counters = PerCpuU64Array(self._fds[0], contract.NR_COUNTERS)
        self.loader_stats = U64Array(self._fds[1], contract.NR_LOADER_STATS)

    def snapshot(self) -> dict[str, int]:
        snap = {c.name.lower(): v for c, v in zip(contract.Counter, self.counters.read_all(),
                                                  strict=True)}
        for s, v in zip(contract.LoaderStat, self.loader_stats.read_all(), strict=True):
            snap["loader_" + s.name.lower()] = v
        return snap

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Counter differences; loader figures that are levels (not counts) are kept as is."""
    levels = {"loader_model_ready", "loader_backend", "loader_start_ns", "loader_loader_pid",
              "loader_batch_ns_max", "loader_table_entries"}
    return {k: (v if k in levels else v - before.get(k, 0)) for k, v in after.items()}


class LoaderRun:
    """One mlsched-load process (or the probe loader) from attach to detach."""

    def __init__(self, cmd: list[str], log_path: Path, wait_model: bool) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        if scx_state() != "disabled":
            raise RuntimeError(f"sched_ext is {scx_state()} before start ({scx_ops_name()})")
        t0 = time.monotonic()
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out,
                                         stderr=subprocess.STDOUT)
        self._wait(lambda: scx_state() == "enabled" and scx_ops_name() == contract.SCHED_NAME
                   and os.path.isdir(contract.PIN_DIR), ATTACH_TIMEOUT_S, "attach")
        self.attach_s = time.monotonic() - t0
        self.pinned = Pinned()
        self.model_s = 0.0
        if wait_model:
            self._wait(lambda: self.pinned.snapshot()["loader_model_ready"] == 1,
                       MODEL_TIMEOUT_S, "the model")
            self.model_s = time.monotonic() - t0 - self.attach_s

    def _wait(self, pred: Any, timeout_s: float, what: str) -> None:
        t0 = time.monotonic()
        while not pred():
            if self.proc.poll() is not None:
                raise RuntimeError(f"loader exited {self.proc.returncode} waiting for {what}: "
                                   f"{self.tail()}")
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(f"no {what} after {timeout_s} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    def alive(self) -> bool:
        return self.proc.poll() is None and scx_state() == "enabled"

    def stop(self) -> int:
        if getattr(self, "pinned", None) is not None:
            self.pinned.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            status = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        t0 = time.monotonic()
        while scx_state() not in ("disabled", "unsupported") and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        return status


def loader_cmd(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "loader.main", *args]


# --- 2. pipeline with mlsched attached ---------------------------------------------------------


def pipeline_phase(out_dir: Path, rates: list[int], low_wait_rates: list[int],
                   seconds: float) -> dict[str, Any]:
    from tools.bench import pipeline

    probe_json = out_dir / "probe-loader.json"
    cmd = [sys.executable, "-m", "tools.bench.probe_loader", "--out", str(probe_json), "--",
           "--model", str(DUMMY_MODEL), "--domains", "2"]
    say("pipeline: starting mlsched-load (probe) with the dummy model")
    ld = LoaderRun(cmd, out_dir / "probe-loader.log", wait_model=True)
    say(f"pipeline: attached in {ld.attach_s:.1f} s, model ready {ld.model_s:.1f} s later")
    result: dict[str, Any] = {"attach_s": round(ld.attach_s, 2), "model_s": round(ld.model_s, 2)}
    try:
        result["synthetic"] = pipeline.run(
            ["numpy"], rates, seconds, 64, pipeline.DECIDE_BATCHES, pipeline.DEFAULT_MAX_WAIT_MS,
            [], pipeline.DEFAULT_OBJ, DUMMY_MODEL, "vm", low_wait_rates=low_wait_rates)
        result["steady"] = steady_hit_rate(ld)
    finally:
        status = ld.stop()
    result["loader_status"] = status
    try:
        result["real_candidates"] = json.loads(probe_json.read_text())
    except (OSError, ValueError) as e:
        result["real_candidates"] = {"error": str(e)}
    rc = result["real_candidates"]
    say(f"pipeline: real candidates: {rc.get('decided')} decided, event->map p50 "
        f"{rc.get('p50_us')} us, p99 {rc.get('p99_us')} us (loader exit {status})")
    return result


def steady_hit_rate(ld: LoaderRun) -> dict[str, Any]:
    """Hit rate of the decision table under stress-ng, per second and after STEADY_WARM_S."""
    total_s = STEADY_WARM_S + STEADY_MEASURE_S
    ncpu = os.cpu_count() or 1
    say(f"pipeline: steady load (stress-ng --cpu {ncpu} --pipe 2) for {total_s} s")
    load = subprocess.Popen(["stress-ng", "--temp-path", "/tmp", "--cpu", str(ncpu), "--pipe",
                             "2", "--timeout", f"{total_s + 2}s", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    series: list[dict[str, float]] = []
    t0 = time.monotonic()
    first = ld.pinned.snapshot()
    prev, at_warm = first, None
    try:
        while time.monotonic() - t0 < total_s:
            time.sleep(1.0)
            snap = ld.pinned.snapshot()
            d = delta(snap, prev)
            looked = d["hits"] + d["misses"]
            series.append({"t_s": round(time.monotonic() - t0, 2), "candidates": looked,
                           "hit_rate": round(d["hits"] / looked, 4) if looked else None,
                           "table_entries": snap["loader_table_entries"]})
            if at_warm is None and time.monotonic() - t0 >= STEADY_WARM_S:
                at_warm = snap
            prev = snap
    finally:
        load.terminate()
        load.wait()
    end = ld.pinned.snapshot()
    w = delta(end, at_warm or first)
    looked = w["hits"] + w["misses"]
    rate = w["hits"] / looked if looked else None
    say(f"pipeline: hit rate {STEADY_WARM_S}-{total_s} s: "
        f"{'n/a' if rate is None else f'{100 * rate:.2f} %'} of {looked} candidates")
    return {"warm_s": STEADY_WARM_S, "measure_s": STEADY_MEASURE_S, "hit_rate": rate,
            "candidates": looked, "hits": w["hits"], "misses": w["misses"],
            "rb_drops": w["rb_drops"], "series": series}


# --- 3. outcome --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(wl: Workload, cfg: SchedConfig, rep: int, counter: MigrationCounter,
            ld: LoaderRun | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"config": cfg.key, "workload": wl.name, "rep": rep}
    before = ld.pinned.snapshot() if ld else None
    cpu0 = cpu_seconds(ld.proc.pid) if ld else 0.0
    m0, x0 = counter.read()
    try:
        rec.update(wl.run(RUN_TIMEOUT_S))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        rec["error"] = str(e)
    m1, x1 = counter.read()
    rec["migrations"], rec["cross_migrations"] = m1 - m0, x1 - x0
    if ld is not None and before is not None:
        if not ld.alive():
            rec["error"] = rec.get("error") or f"mlsched left during the run: {ld.tail()}"
        else:
            rec["mlsched"] = delta(ld.pinned.snapshot(), before)
            rec["loader_cpu_s"] = round(cpu_seconds(ld.proc.pid) - cpu0, 2)
    return rec


def describe(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    text = (f"{r['seconds']:6.1f} s, {r['migrations']:6d} migrations "
            f"({r['cross_migrations']} across domains)")
    if "mlsched" in r:
        m = r["mlsched"]
        looked = m["hits"] + m["misses"]
        text += (f"; mlsched: {m['candidates']} candidates, hit "
                 f"{100 * m['hits'] / looked if looked else 0:.0f} %, "
                 f"{m['migr_model'] + m['migr_fallback']} decided moves, "
                 f"loader CPU {r['loader_cpu_s']:.1f} s")
    return text


def outcome_plan(wls: list[Workload], cfgs: list[SchedConfig], repeats: int,
                 seed: int) -> list[tuple[int, Workload, SchedConfig]]:
    """(round, workload, configuration) in run order: the same for the same seed."""
    rng = random.Random(seed)
    plan = []
    for rep in range(repeats):
        wl_order = wls[:]
        rng.shuffle(wl_order)
        for wl in wl_order:
            order = cfgs[:]
            rng.shuffle(order)
            plan += [(rep, wl, cfg) for cfg in order]
    return plan


def outcome_phase(out_dir: Path, codebase: Path, trained: Path, repeats: int, scale: float,
                  seed: int, counter: MigrationCounter, only: set[str],
                  previous: dict[str, Any] | None, save: Any) -> dict[str, Any]:
    """Every (round, workload, configuration), configurations interleaved in a seeded order.

    Each mlsched run gets a loader of its own, started before the run and stopped after it,
    so every run starts from the same state (an empty decision table). The results are saved
    after every run; with `previous` (the partial results of a VM that died) the runs already
    done are kept and the plan goes on from there, after a new warm-up pass.
    """
    ncpu = os.cpu_count() or 1
    wls = [w for w in workloads(codebase, ncpu, scale) if not only or w.name in only]
    cfgs = configs(trained)
    plan = outcome_plan(wls, cfgs, repeats, seed)
    out: dict[str, Any] = {
        "configs": [{"key": c.key, "name": c.name, "what": c.what,
                     "loader_args": list(c.loader_args) if c.loader_args else None}
                    for c in cfgs],
        "workloads": [{"name": w.name, "what": w.what, "command": w.command()} for w in wls],
        "repeats": repeats, "scale": scale, "seed": seed, "warmup": [], "runs": [],
        "loaders": [], "boots": 1, "complete": False,
    }
    if previous:
        out["runs"] = list(previous.get("runs", []))
        out["loaders"] = list(previous.get("loaders", []))
        out["warmup"] = list(previous.get("warmup", []))
        out["boots"] = int(previous.get("boots", 1)) + 1
        say(f"outcome: resuming after {len(out['runs'])} of {len(plan)} runs (boot "
            f"{out['boots']})")
    say("outcome: warm-up pass under (a), not counted: " + ", ".join(w.name for w in wls))
    for wl in wls:
        r = run_one(wl, cfgs[0], -1, counter, None)
        r["boot"] = out["boots"]
        out["warmup"].append(r)
        say(f"outcome: warm-up {wl.name:9s} {describe(r)}")
    t_start = time.monotonic()
    first = len(out["runs"])
    for n, (rep, wl, cfg) in enumerate(plan[first:], start=first + 1):
        if n == first + 1 or plan[n - 2][1] is not wl:
            say(f"outcome: round {rep + 1}/{repeats}, {wl.name}: "
                + " ".join(f"({c.key})" for r_, w_, c in plan if r_ == rep and w_ is wl))
        ld = None
        r: dict[str, Any] = {"config": cfg.key, "workload": wl.name, "rep": rep}
        if cfg.loader_args is not None:
            try:
                ld = LoaderRun(loader_cmd(cfg.loader_args),
                               out_dir / f"loader-{rep}-{wl.name}-{cfg.key}-boot{out['boots']}.log",
                               cfg.wait_model)
            except RuntimeError as e:
                r["error"] = f"loader: {e}"
        if "error" not in r:
            r = run_one(wl, cfg, rep, counter, ld)
        r["seq"], r["boot"] = n, out["boots"]
        if ld is not None:
            status = ld.stop()
            out["loaders"].append({"config": cfg.key, "workload": wl.name, "rep": rep,
                                   "status": status, "attach_s": round(ld.attach_s, 2),
                                   "model_s": round(ld.model_s, 2)})
            if status != 0:
                r["loader_status"] = status
                say(f"outcome: ({cfg.key}) loader exited {status}: {ld.tail()}")
        out["runs"].append(r)
        save(out)
        done = n - first
        eta = (time.monotonic() - t_start) / done * (len(plan) - n)
        say(f"outcome: [{n}/{len(plan)}] ({cfg.key}) {cfg.name:8s} {wl.name:9s} "
            f"{describe(r)}  (eta {eta / 60:.0f} min)")
    out["complete"] = True
    save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.guest",
                                 description="The in-VM part of `make bench`.")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--codebase", type=Path, required=True, help="generated C code base")
    ap.add_argument("--trained", type=Path, required=True, help="model_export.py's model")
    ap.add_argument("--repeats", type=int, default=3, help="outcome rounds (default: 3)")
    ap.add_argument("--scale", type=float, default=1.0, help="workload size factor")
    ap.add_argument("--seed", type=int, default=1, help="seed of the run order")
    ap.add_argument("--rates", default="1000,3000,10000",
                    help="pipeline offered loads, records/s (default: %(default)s)")
    ap.add_argument("--low-wait-rates", default="1000",
                    help="loads also run at --max-wait-ms 0.2 (default: %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results already in --out and run only what is missing")
    ap.add_argument("--seconds", type=float, default=2.0, help="pipeline window per load")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-outcome", action="store_true")
    ap.add_argument("--workloads", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="bench-vm: %(message)s", stream=sys.stdout)
    if os.geteuid() != 0 or scx_state() == "unsupported":
        say("must run as root on a sched_ext kernel (scripts/vm-run.sh)")
        return 2
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count()}
    if args.resume and args.out.is_file():
        result = json.loads(args.out.read_text())
    result.pop("done", None)
    t0 = time.monotonic() - result.get("elapsed_s", 0)
    say(f"kernel {result['kernel']}, {result['cpus']} CPUs; compiling the bcc migration "
        "counter (sched:sched_migrate_task)")
    from loader.domains import plan_domains

    cpu_to_dom = plan_domains(2).cpu_to_dom()  # as mlsched-load --domains 2
    result["cpu_to_dom"] = cpu_to_dom
    # Kernel messages go to the shared directory as they come: if the VM dies, they remain.
    boot = int((result.get("outcome") or {}).get("boots", 0)) + 1
    dmesg_out = open(out_dir / f"dmesg-boot{boot}.log", "w")  # noqa: SIM115 (lives with us)
    dmesg = subprocess.Popen(["dmesg", "--follow", "--time-format", "iso"], stdout=dmesg_out,
                             stderr=subprocess.STDOUT)
    counter = MigrationCounter(cpu_to_dom)
    result["bcc_compile_s"] = round(counter.compile_s, 1)
    say(f"bcc counter ready in {counter.compile_s:.1f} s")

    def save() -> None:
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        tmp = args.out.with_suffix(".tmp")  # then rename: a VM that dies leaves a whole file
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.out)

    def save_outcome(outcome: dict[str, Any]) -> None:
        result["outcome"] = outcome
        save()

    try:
        if not args.skip_pipeline and "pipeline" not in result:
            result["pipeline"] = pipeline_phase(
                out_dir, [int(x) for x in args.rates.split(",") if x],
                [int(x) for x in args.low_wait_rates.split(",") if x], args.seconds)
            save()
        if not args.skip_outcome:
            only = {w for w in args.workloads.split(",") if w}
            previous = result.get("outcome") if args.resume else None
            outcome_phase(out_dir, args.codebase, args.trained, args.repeats, args.scale,
                          args.seed, counter, only, previous, save_outcome)
        result["done"] = True
    finally:
        save()
        counter.close()
        dmesg.terminate()
        dmesg.wait()
        dmesg_out.close()
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
