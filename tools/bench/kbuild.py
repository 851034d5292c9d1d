"""The kernel-build workload's tree: Debian's linux-source-7.3, whole, and a prepared tinyconfig.

usage: python -m tools.bench.kbuild [--check]

`make bench` builds a subset of a tinyconfig kernel (tools/bench/suite.py's kbuild workload)
from the full source tree of the kernel the VM boots. The tree that `make setup` caches holds
only the parts tools/sched_ext needs, so this fetches the whole one once, with the project's
private apt state for trixie (setup.sh's ~/.cache/mlsched/apt-trixie, never the system's apt
config): `apt-get download linux-source-7.3` (~170 MB, seconds), extracted into
~/.cache/mlsched/kbuild-src/<version>/ (1.8 GB, ~20 s) and the deb deleted. Then, on the host
(where it is fast), `make O=build/bench/kb tinyconfig prepare`: the guest copies that output
directory to /tmp before each run and builds the objects the workload names into it (the
source tree is read-only in the guest, as kbuild allows with O=).

Needs flex, bison and bc on the host (Debian packages of the same names).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MLSCHED_CACHE", Path.home() / ".cache" / "mlsched"))
SRC_ROOT = CACHE / "kbuild-src"
TRIXIE = CACHE / "apt-trixie"
PREPARED = REPO_ROOT / "build" / "bench" / "kb"
SERIES = "7.3"
TOOLS = ("flex", "bison", "bc", "gcc", "make")

EXAMPLES = """examples:
  python -m tools.bench.kbuild            # fetch (once) and prepare build/bench/kb
  python -m tools.bench.kbuild --check    # say what is there, change nothing
"""


def say(msg: str) -> None:
    print(f"bench-kbuild: {msg}", flush=True)


def source_tree() -> Path | None:
    """The cached full tree (its top Makefile and lib/ present), or None."""
    for d in sorted(SRC_ROOT.glob(f"{SERIES}.*"), reverse=True):
        if (d / "Makefile").is_file() and (d / "lib" / "Makefile").is_file():
            return d
    return None


def fetch() -> Path:
    apt = ["apt-get", "-q", "-o", f"Dir::Etc::sourcelist={TRIXIE}/sources.list",
           "-o", "Dir::Etc::sourceparts=-", "-o", f"Dir::State::Lists={TRIXIE}/lists",
           "-o", f"Dir::Cache={TRIXIE}/cache", "-o", "Debug::NoLocking=1",
           "-o", "APT::Sandbox::User=root"]
    if not (TRIXIE / "sources.list").is_file():
        raise SystemExit(f"bench-kbuild: no private apt state in {TRIXIE}: run make setup")
    debs = SRC_ROOT / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    pkg = f"linux-source-{SERIES}"
    t0 = time.monotonic()
    subprocess.run([*apt, "download", pkg], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    deb = next(debs.glob(f"{pkg}_*.deb"))
    version = deb.name.split("_")[1].split("-")[0]  # 7.3.4-1~bpo13+1 -> 7.3.4
    say(f"downloaded {deb.name} in {time.monotonic() - t0:.1f} s; extracting")
    dest = SRC_ROOT / version
    tmp = SRC_ROOT / f"{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    subprocess.run(f"dpkg-deb --fsys-tarfile {deb} | tar -xO ./usr/src/{pkg}.tar.xz | "
                   f"tar -xJ -C {tmp} --strip-components=1", shell=True, check=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shutil.rmtree(debs)
    say(f"extracted into {dest} in {time.monotonic() - t0:.0f} s")
    return dest


def prepare(src: Path) -> Path:
    """build/bench/kb: tinyconfig + prepare, redone when the source tree changed."""
    stamp = PREPARED / ".bench-source"
    if stamp.is_file() and stamp.read_text().strip() == str(src):
        return PREPARED
    shutil.rmtree(PREPARED, ignore_errors=True)
    PREPARED.mkdir(parents=True)
    t0 = time.monotonic()
    for target in ("tinyconfig", "prepare"):
        res = subprocess.run(["make", "-s", "-C", str(src), f"O={PREPARED}", "-j2", target],
                             capture_output=True, text=True)
        if res.returncode != 0:
            tail = res.stdout.splitlines()[-3:] + res.stderr.splitlines()[-3:]
            raise SystemExit(f"bench-kbuild: make {target} failed: " + " | ".join(tail))
    stamp.write_text(f"{src}\n")
    say(f"{PREPARED.relative_to(REPO_ROOT)}: tinyconfig prepared in "
        f"{time.monotonic() - t0:.0f} s")
    return PREPARED


def ensure() -> tuple[Path, Path]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench-kbuild: needs {', '.join(missing)} (apt-get install them)")
    src = source_tree() or fetch()
    return src, prepare(src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.kbuild", description=__doc__,
                                 epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report only")
    args = ap.parse_args(argv)
    if args.check:
        src = source_tree()
        say(f"source: {src or 'not cached'}; prepared: "
            f"{PREPARED if (PREPARED / '.bench-source').is_file() else 'no'}")
        return 0 if src else 1
    src, out = ensure()
    say(f"source {src}, prepared {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
