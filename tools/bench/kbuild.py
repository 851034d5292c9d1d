"""The kernel-build workload's tree: Debian's linux-source-7.3, whole, and a prepared tinyconfig.

usage: python -m tools.bench.kbuild [--check]

`make bench` compiles lib/ objects of a tinyconfig kernel (tools/bench/workloads.py's kbuild
workload) from the full source tree of the kernel the VM boots. The tree that `make setup`
caches holds only the parts tools/sched_ext needs, so this fetches the whole one once, with the
project's private apt state for trixie (setup.sh's ~/.cache/mlsched/apt-trixie, never the
system's apt config): `apt-get download linux-source-7.3` (~170 MB, seconds), extracted into
~/.cache/mlsched/kbuild-src/<version>/ (1.8 GB, ~20 s) and the deb deleted. Then, on the host
(where it is fast), `make O=build/bench/kb tinyconfig prepare`, and the workload's objects
built once to record kbuild's own command for each (`savedcmd` of lib/.<obj>.o.cmd) into
build/bench/kb/bench.mk; the objects are deleted again. In the guest the workload copies that
output directory to /tmp and runs `make -f bench.mk -jN` there: the kernel's compiler commands
with the kernel's flags, reading the (read-only) source tree — without kbuild's own make
machinery, which under TCG costs some 100 s per invocation before it compiles anything
(measured: 2 objects warm 107 s, cold 123 s; on the host 1 s).

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

from loader import paths

REPO_ROOT = paths.CHECKOUT
CACHE = Path(os.environ.get("MLSCHED_CACHE", Path.home() / ".cache" / "mlsched"))
SRC_ROOT = CACHE / "kbuild-src"
TRIXIE = CACHE / "apt-trixie"
PREPARED = REPO_ROOT / "build" / "bench" / "kb"
SERIES = "7.3"
TOOLS = ("flex", "bison", "bc", "gcc", "make")
MAKEFILE = "bench.mk"
STAMP_VERSION = 2  # bump when what prepare() leaves changes
# Translation units of lib/ that a tinyconfig kernel builds; the workload takes the first N.
KBUILD_OBJS = ("argv_split bcd bsearch clz_ctz cmdline ctype hexdump kasprintf kstrtox "
               "list_sort llist memweight plist rbtree sort timerqueue uuid win_minmax siphash "
               "errseq klist kfifo idr parser").split()

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
    """build/bench/kb: tinyconfig + prepare + bench.mk, redone when the source tree changed."""
    stamp = PREPARED / ".bench-source"
    want = f"{src} v{STAMP_VERSION}\n"
    if stamp.is_file() and stamp.read_text() == want:
        return PREPARED
    shutil.rmtree(PREPARED, ignore_errors=True)
    PREPARED.mkdir(parents=True)
    t0 = time.monotonic()
    objs = [f"lib/{o}.o" for o in KBUILD_OBJS]
    for target in (["tinyconfig"], ["prepare"], objs):
        res = subprocess.run(["make", "-s", "-C", str(src), f"O={PREPARED}", "-j2", *target],
                             capture_output=True, text=True)
        if res.returncode != 0:
            tail = res.stdout.splitlines()[-3:] + res.stderr.splitlines()[-3:]
            raise SystemExit(f"bench-kbuild: make {target[0]} failed: " + " | ".join(tail))
    rules = []
    for o in objs:
        cmd_file = PREPARED / "lib" / f".{Path(o).name}.cmd"
        saved = next((line.split(":=", 1)[1].strip() for line in cmd_file.read_text().splitlines()
                      if line.startswith(f"savedcmd_{o} :=")), None)
        if not saved:
            raise SystemExit(f"bench-kbuild: no savedcmd in {cmd_file}")
        rules.append(f"{o}:\n\t{saved.replace('$', '$$')}\n")
        (PREPARED / o).unlink()
    (PREPARED / MAKEFILE).write_text(
        "# Generated by tools/bench/kbuild.py: kbuild's own commands for lib/ objects of this\n"
        "# tinyconfig tree. make -f bench.mk -jN OBJS='lib/a.o lib/b.o'\n"
        f"OBJS ?= {' '.join(objs)}\nall: $(OBJS)\n.PHONY: all\n" + "".join(rules))
    stamp.write_text(want)
    say(f"{PREPARED.relative_to(REPO_ROOT)}: tinyconfig prepared, {len(objs)} commands in "
        f"{MAKEFILE}, in {time.monotonic() - t0:.0f} s")
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
