"""make bench-wakeup: one VM boot running tools/bench/wakelat.py, results in bench-results/.

usage: python -m tools.bench.wakeup [--cpus N] [--memory SIZE] [--out-dir DIR] [WAKELAT OPTIONS]

Boots the sched_ext VM (scripts/vm-run.sh, 4 vCPUs by default), runs
`python -m tools.bench.wakelat` there (EEVDF against mlsched, interleaved rounds; every option
not listed here goes to it, see `python -m tools.bench.wakelat --help`), then writes
bench-results/wakeup-<date>.json (the guest's results plus the host's commit and load) and
wakeup-<date>.md, and prints the table. Needs root, `make setup bpf` and build/bench/wakeprobe
(`make bench-wakeup` builds both). The machine allows one VM at a time: run it under
`flock /tmp/mlsched-vm.lock` when others share it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Any

from loader import paths
from tools.bench import wakelat
from tools.bench.host import LoadSampler, Sampler, arg_parser, git_commit

REPO_ROOT = paths.CHECKOUT
VM_OUT = REPO_ROOT / "build" / "vm-out" / "wakeup"
SCHED_OBJ = paths.BPF_OBJ

EXAMPLES = """examples:
  make bench-wakeup                                       # 5 rounds, about 5 min
  python -m tools.bench.wakeup --rounds 1 --runtime-s 5  # a smoke run, about 1.5 min
  python -m tools.bench.wakeup --config slice5ms="--slice-us 5000"   # one more configuration
  make bench-wakeup WAKEUP_ARGS='--config slice1ms="--slice-us 1000" --rounds 4'
"""


MARK_START = re.compile(r"^wakelat \[\d+:\d+\]: run (\S+) \S+: measuring$")
MARK_END = re.compile(r"^wakelat \[\d+:\d+\]: run (\S+): measured$")


def say(msg: str) -> None:
    print(f"bench-wakeup: {msg}", flush=True)


class HostMonitor(Sampler):
    """Every second: how many CPUs the whole host was busy, and how many the VM used.

    The VM is every process descended from vm-run.sh (vng, virtiofsd, qemu); single-threaded
    TCG can use one host CPU. On a shared host the VM is the noise's victim: a run during which
    it got much less than one CPU, or the rest of the host was busy, is flagged in the report.
    """

    def __init__(self, root_pid: int, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self.root_pid = root_pid
        self.hz = os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float, float]] = []  # (mid time, busy CPUs, VM CPUs)

    @staticmethod
    def _host_busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait

    def _vm_ticks(self) -> dict[int, int]:
        """utime + stime of every live descendant of root_pid."""
        info: dict[int, tuple[int, int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            info[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in info.items():
            children.setdefault(ppid, []).append(pid)
        out, todo = {}, [self.root_pid]
        while todo:
            pid = todo.pop()
            if pid in info:
                out[pid] = info[pid][1]
            todo += children.get(pid, [])
        return out

    def _run(self) -> None:
        t0, busy0, vm0 = time.monotonic(), self._host_busy(), self._vm_ticks()
        while not self._stop.wait(self.interval_s):
            t1, busy1, vm1 = time.monotonic(), self._host_busy(), self._vm_ticks()
            dt = (t1 - t0) * self.hz
            vm = sum(v - vm0.get(pid, 0) for pid, v in vm1.items())
            self.samples.append(((t0 + t1) / 2, (busy1 - busy0) / dt, max(0, vm) / dt))
            t0, busy0, vm0 = t1, busy1, vm1

    def window(self, t0: float, t1: float) -> dict[str, Any] | None:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return None
        vm = [x[2] for x in s]
        other = [max(0.0, x[1] - x[2]) for x in s]
        return {"vm_cpu": round(sum(vm) / len(vm), 2), "vm_cpu_min": round(min(vm), 2),
                "other_cpu": round(sum(other) / len(other), 2), "samples": len(s)}


def run_vm(cmd: list[str]) -> tuple[int, dict[str, dict[str, Any]]]:
    """Runs the VM, passing its output on; returns its status and the host figures per run."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    starts: dict[str, float] = {}
    windows: dict[str, tuple[float, float]] = {}
    with HostMonitor(proc.pid) as mon:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            text = line.rstrip("\r\n")
            if m := MARK_START.match(text):
                starts[m.group(1)] = time.monotonic()
            elif (m := MARK_END.match(text)) and m.group(1) in starts:
                windows[m.group(1)] = (starts[m.group(1)], time.monotonic())
        rc = proc.wait()
    host = {tag: w for tag, (t0, t1) in windows.items() if (w := mon.window(t0, t1))}
    return rc, host


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("python -m tools.bench.wakeup", "Wakeup latency beside CPU hogs, EEVDF "
                    "against mlsched, in one VM boot; every option not listed here goes to the "
                    "guest's `python -m tools.bench.wakelat`.", EXAMPLES)
    ap.add_argument("--cpus", type=int, default=4, help="vCPUs (default: %(default)s)")
    ap.add_argument("--memory", default="2G", help="VM memory (default: %(default)s)")
    args, guest_args = ap.parse_known_args(argv)
    for opt in ("--out", "--md", "--report"):
        if any(a == opt or a.startswith(opt + "=") for a in guest_args):
            ap.error(f"{opt} is chosen here, not passed to the guest")
    # Refuse bad guest options now rather than after a boot.
    wl_ap = wakelat.build_parser()
    wakelat.check_args(wl_ap, wl_ap.parse_args([*guest_args, "--out", "/dev/null"]))
    if os.geteuid() != 0:
        print("bench-wakeup: must run as root (the VM)", file=sys.stderr)
        return 2
    for f, make in ((wakelat.WAKEPROBE, "make build/bench/wakeprobe"), (SCHED_OBJ, "make bpf")):
        if not f.is_file():
            print(f"bench-wakeup: {f.relative_to(REPO_ROOT)} missing: run `{make}`",
                  file=sys.stderr)
            return 2

    t0 = time.monotonic()
    stem = "wakeup-" + time.strftime("%Y-%m-%d-%H%M")
    VM_OUT.mkdir(parents=True, exist_ok=True)
    guest_json = VM_OUT / f"{stem}.json"
    guest_json.unlink(missing_ok=True)
    guest = ["python", "-m", "tools.bench.wakelat", "--out", str(guest_json), *guest_args]
    cmd = [str(REPO_ROOT / "scripts" / "vm-run.sh"), "--cpus", str(args.cpus), "--memory",
           args.memory, "--", shlex.join(guest)]
    say(shlex.join(cmd))
    with LoadSampler() as load:
        rc, host = run_vm(cmd)
    try:
        res = json.loads(guest_json.read_text())
    except (OSError, ValueError) as e:
        print(f"bench-wakeup: no results from the guest (VM exit {rc}): {e}", file=sys.stderr)
        return rc or 1
    for r in res.get("runs", []):
        if (w := host.get(f"{r.get('seq', 0):02d}")) is not None:
            r["host"] = w
    if res.get("warmup") and "warmup" in host:
        res["warmup"]["host"] = host["warmup"]
    res["meta"].update({
        "command": "make bench-wakeup" + (" " + shlex.join(argv if argv is not None
                                                        else sys.argv[1:])
                                          if (argv if argv is not None else sys.argv[1:])
                                          else ""),
        "host": platform.node(), "host_kernel": platform.release(),
        "host_cpus": os.cpu_count(), "commit": git_commit(), "vm_cpus": args.cpus,
        "vm_status": rc, "host_load": load.summary(), "wall_s": round(time.monotonic() - t0, 1),
    })
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json, out_md = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    out_md.write_text(wakelat.markdown(res))
    print()
    print("\n".join(wakelat.table(res) + [""] + wakelat.host_note(res)))
    print()
    samples = {n: s["samples_total"] for n, s in res["summary"].items()}
    say(f"done in {(time.monotonic() - t0) / 60:.1f} min (VM exit {rc}"
        + ("" if res.get("complete") else ", INCOMPLETE") + f"): {out_json}, {out_md}; "
        "wakeup samples per configuration: "
        + ", ".join(f"{n} {v:,}" for n, v in samples.items()))
    return rc if rc else (0 if res.get("complete") else 1)


if __name__ == "__main__":
    sys.exit(main())
