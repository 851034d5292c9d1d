"""The VM half of `make bench`: every scheduler against every workload, interleaved, one boot.

usage (inside the sched_ext VM, as root; tools/bench/__main__.py boots it):
    python -m tools.bench.suite --out FILE.json --trained DIR [--rounds N] [--scale X]

Schedulers (configurations):
  eevdf         nothing attached: the kernel's default scheduler
  scx_simple    the kernel's tools/sched_ext/scx_simple (build/scx/, `make scx-peers`)
  scx_central   the kernel's tools/sched_ext/scx_central
  fallback      mlsched-load --no-model: the fallback policy decides every candidate
  dummy         mlsched-load --model tests/models/dummy (random weights)
  trained       mlsched-load --model model_dir/model_path (the bundled, learned model)
  kernel        mlsched-load --model <trained> --inference kernel --table hash: the scheduler
                evaluates the network itself on every table miss (a hash, filled on demand, so
                the in-kernel path is exercised; with the grid every key is decided at
                model-ready and the kernel never infers)
Every mlsched configuration uses --domains 2 (two domains of two vCPUs).

Workloads (tools/bench/workloads.py):
  wakeup     stress-ng --cpu N hogs + build/bench/wakeprobe: wakeup p50/p99, requests/s
  messaging  perf bench sched messaging: completion time
  kbuild     a subset of a tinyconfig kernel build (tools/bench/kbuild.py): completion time
  mixed      stress-ng: FFT hogs beside pipe ping-pong, fixed work: completion time
  build      (not by default) make -jN of a generated C code base: completion time

Protocol: an untimed warm-up pass of every workload under eevdf, then R rounds; each round runs
the configurations in a seeded random order, and under each (attached once: one loader or peer
per round and configuration) every workload in a seeded random order. Per run:
completion time (or the probe's figures), sched:sched_migrate_task events (tools/bench/migcount),
context switches (/proc/stat ctxt), and for mlsched the counters' deltas (migrations by kind,
ran_cross, kinfer...), the loader's CPU time, and bpf_stats of mlsched_select_cpu (run_time_ns,
run_cnt: kernel.bpf_stats_enabled=1 for the whole boot, so every configuration pays it alike).
Per loader start: start -> attached and start -> model-ready from its log, RSS at the end
(VmRSS, VmHWM) and whether its /proc/<pid>/maps holds an LLVM library. Then the start-up under
the smoke stress (DESIGN.md's scx CI line), a few times.
Results are saved after every run (a VM that dies leaves a whole JSON; --resume goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader import paths
from tools.bench import workloads as wl
from tools.bench.sched import SchedProcess, scx_ops, scx_state
from tools.bench.wakelat import calibrate

REPO_ROOT = paths.CHECKOUT
SCX_BIN = REPO_ROOT / "build" / "scx"
DUMMY = paths.DUMMY_MODEL
ATTACH_TIMEOUT_S = 150
MODEL_TIMEOUT_S = 300
SMOKE_STRESS = ["stress-ng", "--temp-path", "/tmp", "-t", "60", "--aggressive", "-M",
                "-c", "2", "-f", "2", "--affinity", "1", "--affinity-delay", "1",
                "--affinity-pin"]
DEFAULT_CONFIGS = ("eevdf", "scx_simple", "scx_central", "fallback", "dummy", "trained",
                   "kernel")
ATTACHED = re.compile(r"attached \S+ ([0-9.]+) s after start")
MODEL_READY = re.compile(r"model ready in [0-9.]+ s \(([0-9.]+) s after start\)")
LLVM = re.compile(r"libLLVM|libclang")

_T0 = time.monotonic()


def say(msg: str) -> None:
    t = int(time.monotonic() - _T0)
    print(f"bench-vm [{t // 60:02d}:{t % 60:02d}]: {msg}", flush=True)


# --- schedulers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    what: str
    cmd: tuple[str, ...] | None  # None: nothing attached
    ops: str = ""  # /sys/kernel/sched_ext/root/ops once attached
    mlsched: bool = False
    wait_model: bool = False


def configs(trained: Path) -> list[Config]:
    py = (sys.executable, "-m", "loader.main", "--domains", "2")
    return [
        Config("eevdf", "the kernel's default scheduler, nothing attached", None),
        Config("scx_simple", "the kernel's tools/sched_ext/scx_simple (global vtime queue)",
               (str(SCX_BIN / "scx_simple"),), "simple"),
        Config("scx_central", "the kernel's tools/sched_ext/scx_central (one CPU dispatches)",
               (str(SCX_BIN / "scx_central"),), "central"),
        Config("fallback", "mlsched, fallback policy only (--no-model)",
               (*py, "--model", str(DUMMY), "--no-model"), "mlsched", True),
        Config("dummy", "mlsched + the dummy model (tests/models/dummy, random weights)",
               (*py, "--model", str(DUMMY)), "mlsched", True, True),
        Config("trained", f"mlsched + the learned model ({trained.name})",
               (*py, "--model", str(trained)), "mlsched", True, True),
        Config("kernel", "mlsched, the learned model evaluated in the kernel on a miss "
               "(--inference kernel --table hash)",
               (*py, "--model", str(trained), "--inference", "kernel", "--table", "hash"),
               "mlsched", True, True),
    ]


class Pinned:
    """mlsched's counters and loader figures from its pinned maps."""

    @staticmethod
    def paths() -> list[str]:
        from loader import contract

        return [os.path.join(contract.PIN_DIR, m)
                for m in (contract.MAP_COUNTERS, contract.MAP_LOADER_STATS)]

    @classmethod
    def ready(cls) -> bool:
        """Both maps pinned (the loader makes the directory first, then pins one by one)."""
        return all(os.path.exists(p) for p in cls.paths())

    def __init__(self) -> None:
        from loader import contract, libbpf
        from loader.bpfmaps import PerCpuU64Array, U64Array

        self.contract = contract
        self._fds = [libbpf.obj_get(p) for p in self.paths()]
        self.counters = PerCpuU64Array(self._fds[0], contract.NR_COUNTERS)
        self.loader_stats = U64Array(self._fds[1], contract.NR_LOADER_STATS)

    def snapshot(self) -> dict[str, int]:
        c = self.contract
        snap = {k.name.lower(): v for k, v in zip(c.Counter, self.counters.read_all(),
                                                  strict=True)}
        for s, v in zip(c.LoaderStat, self.loader_stats.read_all(), strict=True):
            snap["loader_" + s.name.lower()] = v
        return snap

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


LEVELS = {"loader_model_ready", "loader_backend", "loader_start_ns", "loader_loader_pid",
          "loader_batch_ns_max", "loader_table_entries", "loader_model_digest",
          "loader_grid_keys", "loader_grid_decided"}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: (v if k in LEVELS else v - before.get(k, 0)) for k, v in after.items()}


def select_cpu_stats() -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of mlsched's select_cpu program (bpf_stats), or None."""
    try:
        out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                             timeout=30).stdout
        for p in json.loads(out or "[]"):
            if str(p.get("name", "")).startswith("mlsched_select"):
                return int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return None


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ctxt() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    return 0


class Attached(SchedProcess):
    """One scheduler process (mlsched's loader or an scx peer) from start to SIGINT; for
    mlsched, its pinned counters and (wait_model) the wait for model-ready."""

    def __init__(self, cfg: Config, log_path: Path) -> None:
        assert cfg.cmd is not None
        self.cfg = cfg
        self.pinned: Pinned | None = None
        super().__init__(cfg.name, cfg.cmd, cfg.ops, log_path, ATTACH_TIMEOUT_S,
                         Pinned.ready if cfg.mlsched else None)
        self.model_s: float | None = None
        if cfg.mlsched:
            try:
                self.pinned = Pinned()
            except Exception as e:  # loader.libbpf.LibbpfError, OSError: leave no loader behind
                self.stop()
                raise RuntimeError(f"{cfg.name}: its pinned maps: {e}") from e
            if cfg.wait_model:
                pinned = self.pinned
                self.wait(lambda: pinned.snapshot()["loader_model_ready"] == 1,
                          MODEL_TIMEOUT_S, "the model")
                self.model_s = time.monotonic() - self.t0

    def memory(self) -> dict[str, Any]:
        """VmRSS/VmHWM in MB and whether an LLVM library is mapped (whole process)."""
        out: dict[str, Any] = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "VmHWM"):
                        out[k.lower() + "_mb"] = round(int(v.split()[0]) / 1024, 1)
            with open(f"/proc/{self.proc.pid}/maps") as f:
                out["llvm_mapped"] = bool(LLVM.search(f.read()))
        except OSError:
            pass
        return out

    def log_times(self) -> dict[str, float]:
        """start -> attached / model-ready as the loader logs them."""
        text = self.log_path.read_text(errors="replace")
        out = {}
        if m := ATTACHED.search(text):
            out["log_attached_s"] = float(m.group(1))
        if m := MODEL_READY.search(text):
            out["log_model_ready_s"] = float(m.group(1))
        return out

    def stop(self) -> int:
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None
        return super().stop()


# --- one run, the plan --------------------------------------------------------------------------


def run_one(work: wl.Workload, cfg: Config, rnd: int, counter: Any, sch: Attached | None
            ) -> dict[str, Any]:
    rec: dict[str, Any] = {"config": cfg.name, "workload": work.name, "round": rnd}
    before = sch.pinned.snapshot() if sch and sch.pinned else None
    sel0 = select_cpu_stats() if cfg.mlsched else None
    cpu0 = cpu_seconds(sch.proc.pid) if sch else 0.0
    m0, x0 = counter.read()
    c0 = ctxt()
    try:
        rec.update(work.run())
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        rec["error"] = str(e)
    rec["ctxt"] = ctxt() - c0
    m1, x1 = counter.read()
    rec["migrations"], rec["cross_migrations"] = m1 - m0, x1 - x0
    if sch is not None:
        if why := sch.left():
            rec["error"] = rec.get("error") or f"{cfg.name} left during the run: {why}"
        else:
            rec["sched_cpu_s"] = round(cpu_seconds(sch.proc.pid) - cpu0, 2)
            if sch.pinned is not None and before is not None:
                rec["mlsched"] = delta(sch.pinned.snapshot(), before)
            sel1 = select_cpu_stats() if cfg.mlsched else None
            if sel0 and sel1:
                rec["select_cpu"] = {"run_time_ns": sel1[0] - sel0[0], "run_cnt": sel1[1] - sel0[1]}
    elif scx_state() != "disabled":
        rec["error"] = rec.get("error") or f"a scheduler attached during the run ({scx_ops()})"
    return rec


def describe(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    s = f"{r['seconds']:6.1f} s, {r['migrations']:6d} migrations, {r['ctxt']} cs"
    if "wakeup_p99_us" in r:
        s += (f"; wakeup avg {r['wakeup_avg_us']:.0f} p99 {r['wakeup_p99_us']:.0f} us, "
              f"{r['requests_per_s']:.0f} req/s")
    if m := r.get("mlsched"):
        s += (f"; model {m['migr_model']} fallback {m['migr_fallback']} forced "
              f"{m['migr_forced']} domain {m['migr_domain']} ran_cross {m['ran_cross']}")
    return s


def plan(cfgs: list[Config], wls: list[wl.Workload], rounds: int, seed: int
         ) -> list[tuple[int, Config, list[wl.Workload]]]:
    rng = random.Random(seed)
    out = []
    for rnd in range(rounds):
        order = cfgs[:]
        rng.shuffle(order)
        for cfg in order:
            w = wls[:]
            rng.shuffle(w)
            out.append((rnd, cfg, w))
    return out


def smoke_startup(trained: Path, out_dir: Path, times: int) -> list[dict[str, Any]]:
    """start -> attached and -> model-ready of mlsched-load under the scx CI smoke stress."""
    res = []
    # the dummy: the bundled model, as the smoke test runs it
    cfg = next(c for c in configs(trained) if c.name == "dummy")
    for i in range(times):
        stress = subprocess.Popen(SMOKE_STRESS, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(2.0)
        rec: dict[str, Any] = {"try": i}
        try:
            sch = Attached(cfg, out_dir / f"smoke-{i}.log")
            rec.update(attach_s=round(sch.attach_s, 2), model_s=round(sch.model_s or 0, 2))
            time.sleep(1.0)
            rec.update(sch.log_times())
            rec.update(sch.memory())
            snap = sch.pinned.snapshot() if sch.pinned else {}
            rec["status"] = sch.stop()
            rec["grid_keys"] = snap.get("loader_grid_keys")
        except RuntimeError as e:
            rec["error"] = str(e)
        finally:
            stress.send_signal(signal.SIGINT)
            try:
                stress.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stress.kill()
                stress.wait()
        say(f"smoke start-up {i}: {rec}")
        res.append(rec)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python -m tools.bench.suite --out "
                                 "build/vm-out/bench/suite.json --trained "
                                 "model_dir/model_path --rounds 1 --scale 0.5")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--trained", type=Path, required=True, help="the learned model")
    ap.add_argument("--codebase", type=Path, required=True, help="generated C code base")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default: 5)")
    ap.add_argument("--scale", type=float, default=1.0, help="workload size factor")
    ap.add_argument("--seed", type=int, default=1, help="seed of the run order")
    ap.add_argument("--smoke-startups", type=int, default=2,
                    help="loader start-ups under the smoke stress (default: 2)")
    ap.add_argument("--configs", default="", help="comma-separated (default: "
                    + ",".join(DEFAULT_CONFIGS) + ")")
    ap.add_argument("--workloads", default="", help="comma-separated (default: "
                    + ",".join(wl.DEFAULT_WORKLOADS) + "; also build)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or scx_state() == "unsupported":
        say("must run as root on a sched_ext kernel (scripts/vm-run.sh)")
        return 2
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ncpu = os.cpu_count() or 1
    want_c = args.configs.split(",") if args.configs else DEFAULT_CONFIGS
    want_w = args.workloads.split(",") if args.workloads else wl.DEFAULT_WORKLOADS
    cfgs = [c for c in configs(args.trained) if c.name in want_c]
    wls = [w for w in wl.workloads(args.scale, ncpu, args.codebase)
           if w.name in want_w]
    result: dict[str, Any] = {"kernel": os.uname().release, "cpus": ncpu, "runs": [],
                              "starts": [], "warmup": [], "boots": 0}
    if args.resume and args.out.is_file():
        result = json.loads(args.out.read_text())
    result.pop("done", None)
    result["boots"] = int(result.get("boots", 0)) + 1
    result.update(rounds=args.rounds, scale=args.scale, seed=args.seed,
                  configs=[{"name": c.name, "what": c.what,
                            "cmd": list(c.cmd) if c.cmd else None} for c in cfgs],
                  workloads=[{"name": w.name, "what": w.what, "metric": w.metric,
                              "command": w.command()} for w in wls])
    t0 = time.monotonic() - float(result.get("elapsed_s", 0))

    def save() -> None:
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.out)

    for c in cfgs:
        if c.cmd and not Path(c.cmd[0]).exists():
            say(f"{c.name}: {c.cmd[0]} missing (make scx-peers)")
            return 2
    subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=False)
    from loader.domains import plan_domains
    from tools.bench.migcount import MigrationCounter

    counter = MigrationCounter(plan_domains(2).cpu_to_dom())
    result["bcc_compile_s"] = round(counter.compile_s, 1)
    say(f"kernel {result['kernel']}, {ncpu} CPUs; bcc counter in {counter.compile_s:.1f} s")
    wake = next((w for w in wls if isinstance(w, wl.Wakeup)), None)
    if wake is not None:
        lpu = result.get("loops_per_us") or calibrate(wl.WAKEPROBE)
        result["loops_per_us"] = lpu
        wake.loops = max(1, round(lpu * wl.REQUEST_US))
        for w in result["workloads"]:  # the command as run, with the calibrated loop count
            if w["name"] == wake.name:
                w["command"] = wake.command()
    try:
        say("warm-up under eevdf: " + ", ".join(w.name for w in wls))
        for w in wls:
            r = run_one(w, cfgs[0] if cfgs[0].cmd is None else configs(args.trained)[0], -1,
                        counter, None)
            r["boot"] = result["boots"]
            result["warmup"].append(r)
            say(f"warm-up {w.name:9s} {describe(r)}")
        steps = plan(cfgs, wls, args.rounds, args.seed)
        done = {(r["round"], r["config"], r["workload"]) for r in result["runs"]
                if "error" not in r}
        total = len(steps) * len(wls)
        t_start, n_new = time.monotonic(), 0
        for rnd, cfg, order in steps:
            todo = [w for w in order if (rnd, cfg.name, w.name) not in done]
            if not todo:
                continue
            sch: Attached | None = None
            start: dict[str, Any] = {"config": cfg.name, "round": rnd}
            if cfg.cmd is not None:
                try:
                    sch = Attached(cfg, out_dir / f"sched-{rnd}-{cfg.name}.log")
                    start.update(attach_s=round(sch.attach_s, 2),
                                 model_s=None if sch.model_s is None else round(sch.model_s, 2))
                except RuntimeError as e:
                    start["error"] = str(e)
                    say(f"({cfg.name}) round {rnd}: {e}")
            for w in todo:
                if "error" in start:
                    r = {"config": cfg.name, "workload": w.name, "round": rnd,
                         "error": f"start: {start['error']}"}
                else:
                    r = run_one(w, cfg, rnd, counter, sch)
                r["boot"] = result["boots"]
                result["runs"].append(r)
                n_new += 1
                save()
                eta = (time.monotonic() - t_start) / n_new * (total - len(result["runs"]))
                say(f"[{len(result['runs'])}/{total}] r{rnd} {cfg.name:11s} {w.name:9s} "
                    f"{describe(r)} (eta {eta / 60:.0f} min)")
            if sch is not None:
                start.update(sch.log_times())
                start.update(sch.memory())
                start["status"] = sch.stop()
                if start["status"] != 0:
                    say(f"({cfg.name}) exited {start['status']}: {sch.tail()}")
            result["starts"].append(start)
            save()
        if args.smoke_startups and not result.get("smoke"):
            result["smoke"] = smoke_startup(args.trained, out_dir, args.smoke_startups)
        result["done"] = True
    finally:
        save()
        counter.close()
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
