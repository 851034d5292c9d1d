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

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tools.bench import wakelat
from tools.bench.__main__ import LoadSampler, git_commit

REPO_ROOT = Path(__file__).resolve().parents[2]
VM_OUT = REPO_ROOT / "build" / "vm-out" / "wakeup"
SCHED_OBJ = REPO_ROOT / "bpf" / "mlsched.bpf.o"

EXAMPLES = """examples:
  make bench-wakeup                                       # 5 rounds, about 5 min
  python -m tools.bench.wakeup --rounds 1 --runtime-s 5  # a smoke run, about 1.5 min
  python -m tools.bench.wakeup --config slice5ms="--slice-us 5000"   # one more configuration
  make bench-wakeup WAKEUP_ARGS='--config slice1ms="--slice-us 1000" --rounds 4'
"""


def say(msg: str) -> None:
    print(f"bench-wakeup: {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.wakeup",
        description="Wakeup latency beside CPU hogs, EEVDF against mlsched, in one VM boot; "
        "every option not listed here goes to the guest's `python -m tools.bench.wakelat`.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, default=4, help="vCPUs (default: %(default)s)")
    ap.add_argument("--memory", default="2G", help="VM memory (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench-results",
                    help="results directory (default: bench-results/)")
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
        rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    try:
        res = json.loads(guest_json.read_text())
    except (OSError, ValueError) as e:
        print(f"bench-wakeup: no results from the guest (VM exit {rc}): {e}", file=sys.stderr)
        return rc or 1
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
    print("\n".join(wakelat.table(res)))
    print()
    samples = {n: s["samples_total"] for n, s in res["summary"].items()}
    say(f"done in {(time.monotonic() - t0) / 60:.1f} min (VM exit {rc}"
        + ("" if res.get("complete") else ", INCOMPLETE") + f"): {out_json}, {out_md}; "
        "wakeup samples per configuration: "
        + ", ".join(f"{n} {v:,}" for n, v in samples.items()))
    return rc if rc else (0 if res.get("complete") else 1)


if __name__ == "__main__":
    sys.exit(main())
