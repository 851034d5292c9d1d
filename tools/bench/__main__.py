"""make bench: mlsched against EEVDF and the kernel's sched_ext examples, in one VM boot.

usage: python -m tools.bench [--rounds N] [--scale X] [--quick] [--skip-host] [--skip-vm]

Steps (progress on stdout; about 41 min with 5 rounds on this 2-core machine, --quick < 10):
  1. the C code base of the build workload (generated, deterministic) in build/bench/cbase
  2. the decision pipeline on the host: python -m tools.bench.pipeline (numpy backend, event ->
     map at 1 k, 10 k, 100 k and 1 M offered/s)
  3. one VM boot (4 vCPUs, 2 mlsched domains): python -m tools.bench.suite (every scheduler
     under every workload, interleaved rounds; then the loader's start-up under the smoke
     stress); booted again to finish when a VM dies part way
  4. bench-results/<date>.json (every run), <date>.md and <date>-<workload>.png
     (python -m tools.bench.report); --docs also writes docs/BENCHMARKS.md's tables and
     docs/bench/<workload>.png

Needs root, `make setup bpf scx-peers` and build/bench/{wakeprobe,ringbuf_producer.bpf.o}
(`make bench` builds them). On a shared machine run it under `flock /tmp/mlsched-vm.lock`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loader import paths
from tools.bench import report
from tools.bench.host import LoadSampler, arg_parser, git_commit
from tools.bench.suite import DEFAULT_CONFIGS
from tools.bench.workloads import DEFAULT_WORKLOADS, generate_codebase

REPO_ROOT = paths.CHECKOUT
BUILD = REPO_ROOT / "build" / "bench"
CODEBASE = BUILD / "cbase"
CODEBASE_UNITS, CODEBASE_FUNCS = 14, 2  # ~9 s of make -j4 in a TCG guest on a quiet host
TRAINED = paths.BUNDLED_MODEL
VM_OUT = REPO_ROOT / "build" / "vm-out" / "bench"
PRODUCER_OBJ = BUILD / "ringbuf_producer.bpf.o"
NEEDED = (paths.BPF_OBJ, PRODUCER_OBJ, BUILD / "wakeprobe",
          REPO_ROOT / "build" / "scx" / "scx_simple", REPO_ROOT / "build" / "scx" / "scx_central")
VM_BOOTS = 4
WORKLOAD_TOOLS = (("gcc", "gcc"), ("make", "make"), ("perf", "linux-perf"),
                  ("stress-ng", "stress-ng"), ("bpftool", "bpftool"))

EXAMPLES = """examples:
  make bench                                   # 5 rounds, about 41 min
  make bench BENCH_ARGS='--rounds 3'           # shorter, still with intervals
  python -m tools.bench --quick                # 1 round, smaller loads: < 10 min
  python -m tools.bench --skip-host --rounds 2 --configs eevdf,trained
  python -m tools.bench.report bench-results/2026-12-01-2300.json --docs   # redo the docs
"""


_T0 = time.monotonic()


def say(msg: str) -> None:
    t = int(time.monotonic() - _T0)
    print(f"bench [{t // 60:02d}:{t % 60:02d}]: {msg}", flush=True)


def run_streamed(cmd: list[str], what: str) -> int:
    say(f"{what}: {shlex.join(cmd)}")
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("python -m tools.bench", "Benchmark mlsched against EEVDF and the kernel's "
                    "scx_simple and scx_central in one VM boot, and its decision pipeline on "
                    "the host.", EXAMPLES)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    ap.add_argument("--scale", type=float, default=1.0, help="workload size factor (default: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round, half-size workloads, short pipeline windows (< 10 min)")
    ap.add_argument("--configs", default="", help="schedulers, comma-separated (default: "
                    + ",".join(DEFAULT_CONFIGS) + ")")
    ap.add_argument("--workloads", default="", help="comma-separated (default: "
                    + ",".join(DEFAULT_WORKLOADS) + "; also build)")
    ap.add_argument("--trained", type=Path, default=TRAINED,
                    help="the learned model (default: model_dir/model_path)")
    ap.add_argument("--skip-host", action="store_true", help="no host pipeline run")
    ap.add_argument("--skip-vm", action="store_true", help="no VM boot")
    ap.add_argument("--docs", action="store_true",
                    help="also write docs/BENCHMARKS.md's generated part and docs/bench/*.png")
    ap.add_argument("--vm-cpus", type=int, default=4, help="vCPUs (default: 4)")
    ap.add_argument("--vm-memory", default="3G", help="VM memory (default: 3G)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (BPF on the host, the VM)", file=sys.stderr)
        return 2
    for f in NEEDED:
        if not f.is_file():
            print(f"bench: {f.relative_to(REPO_ROOT)} missing: run `make bench`",
                  file=sys.stderr)
            return 2
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in WORKLOAD_TOOLS
               if shutil.which(tool) is None]
    if missing and not args.skip_vm:
        print(f"bench: the workloads need {', '.join(missing)}: apt-get install them",
              file=sys.stderr)
        return 2
    rounds, scale, seconds, smoke = args.rounds, args.scale, 2.0, 2
    if args.quick:
        rounds, scale, seconds, smoke = 1, scale / 2, 1.0, 1

    t0 = time.monotonic()
    stem = time.strftime("%Y-%m-%d-%H%M")
    res: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": "make bench"
        + (" (" + " ".join(argv or sys.argv[1:]) + ")" if (argv or sys.argv[1:]) else ""),
        "host": platform.node(), "host_kernel": platform.release(), "host_cpus": os.cpu_count(),
        "commit": git_commit(), "rounds": rounds, "scale": scale}}
    out_json = args.out_dir / f"{stem}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["meta"]["wall_s"] = round(time.monotonic() - t0, 1)
        out_json.write_text(json.dumps(res, indent=1) + "\n")

    generate_codebase(CODEBASE, CODEBASE_UNITS, CODEBASE_FUNCS)
    say(f"C code base: {CODEBASE.relative_to(REPO_ROOT)} ({CODEBASE_UNITS} units)")
    if "kbuild" in (args.workloads.split(",") if args.workloads else DEFAULT_WORKLOADS):
        from tools.bench import kbuild

        kbuild.ensure()

    if not args.skip_host:
        host_json = BUILD / "host-pipeline.json"
        host_json.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tools.bench.pipeline", "--where", "host",
               "--backends", "numpy", "--rates", "1000,10000,100000,1000000",
               "--low-wait-rates", "", "--seconds", str(seconds), "--json", str(host_json)]
        with LoadSampler() as load:
            rc = run_streamed(cmd, "pipeline on the host")
        res["meta"]["host_load_pipeline"] = load.summary()
        if rc == 0 and host_json.is_file():
            res["host_pipeline"] = json.loads(host_json.read_text())
        else:
            say("pipeline on the host failed; continuing")
        save()

    if not args.skip_vm:
        VM_OUT.mkdir(parents=True, exist_ok=True)
        suite_json = VM_OUT / "suite.json"
        suite_json.unlink(missing_ok=True)
        guest = ["python", "-m", "tools.bench.suite", "--out", str(suite_json),
                 "--trained", str(args.trained),
                 "--codebase", str(CODEBASE), "--rounds", str(rounds), "--scale", str(scale),
                 "--smoke-startups", str(smoke)]
        guest += ["--configs", args.configs] if args.configs else []
        guest += ["--workloads", args.workloads] if args.workloads else []
        with LoadSampler() as load:
            for boot in range(1, VM_BOOTS + 1):
                cmd = guest + (["--resume"] if boot > 1 else [])
                rc = run_streamed([str(REPO_ROOT / "scripts" / "vm-run.sh"), "--cpus",
                                   str(args.vm_cpus), "--memory", args.vm_memory, "--",
                                   shlex.join(cmd)], f"the VM part (boot {boot})")
                try:
                    res["vm"] = json.loads(suite_json.read_text())
                except (OSError, ValueError):
                    res.pop("vm", None)
                if res.get("vm", {}).get("done"):
                    break
                say(f"the VM part stopped early (exit {rc})"
                    + ("; booting again to finish it" if boot < VM_BOOTS else ""))
        res["meta"]["host_load_vm"] = load.summary()
        save()

    save()
    md, pngs = report.write(res, args.out_dir, stem)
    if args.docs:
        report.write_docs(res)
    say(f"done in {(time.monotonic() - t0) / 60:.1f} min: {out_json}, {md}"
        + "".join(f", {p}" for p in pngs))
    print()
    print("\n".join(report.summary_table(res) + report.target_table(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
