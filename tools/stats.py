"""mlsched-stats: show mlsched's decision counters from its pinned maps.

usage: mlsched-stats [--once] [--interval SECS] [--pin-dir DIR]

Reads only the maps the loader pins under /sys/fs/bpf/mlsched (never TensorFlow), so it
starts at once and can run beside a loader in another shell.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from loader import contract
from loader.scheduler import scx_ops_name, scx_state

EXAMPLES = """\
examples:
  sudo mlsched-stats --once          # one block of counters, then exit
  sudo mlsched-stats --interval 2    # a block every 2 s until Ctrl-C
"""


class Pinned:
    """The loader's pinned maps."""

    def __init__(self, pin_dir: str) -> None:
        from loader import libbpf
        from loader.bpfmaps import PerCpuU64Array, StructArray, U64Array

        def fd(name: str) -> int:
            return libbpf.obj_get(os.path.join(pin_dir, name))

        self.counters = PerCpuU64Array(fd(contract.MAP_COUNTERS), contract.NR_COUNTERS)
        self.loader_stats = U64Array(fd(contract.MAP_LOADER_STATS), contract.NR_LOADER_STATS)
        self.config = U64Array(fd(contract.MAP_CONFIG), contract.NR_CONFIG)
        self.dom_stats = StructArray(fd(contract.MAP_DOM_STATS), contract.MAX_DOMS,
                                     contract.DomStat)
        self.exit_info = StructArray(fd(contract.MAP_EXIT_INFO), 1, contract.ExitInfo)


def snapshot(p: Pinned) -> dict[str, int]:
    out: dict[str, int] = {}
    for c, v in zip(contract.Counter, p.counters.read_all(), strict=True):
        out[c.name.lower()] = v
    for s, v in zip(contract.LoaderStat, p.loader_stats.read_all(), strict=True):
        out["loader_" + s.name.lower()] = v
    return out


def render(p: Pinned, snap: dict[str, int]) -> str:
    backend = contract.Backend(snap["loader_backend"]).name.lower()
    ready = "ready" if snap["loader_model_ready"] else "loading (fallback serves)"
    uptime = (time.monotonic_ns() - snap["loader_start_ns"]) / 1e9 if snap["loader_start_ns"] else 0
    lines = [
        f"mlsched: state {scx_state()}, ops {scx_ops_name() or '-'}, loader pid "
        f"{snap['loader_loader_pid']}, up {uptime:.0f} s, model {ready}, backend {backend}",
        "kernel:  " + "  ".join(f"{c.name.lower()}={snap[c.name.lower()]}"
                                for c in contract.Counter),
        f"loader:  batches={snap['loader_batches']} records={snap['loader_records']} "
        f"decisions={snap['loader_decisions']} model_errors={snap['loader_model_errors']}",
    ]
    nr_doms = p.config.get(contract.Config.NR_DOMS)
    doms = [p.dom_stats.get(d) for d in range(min(nr_doms, contract.MAX_DOMS))]
    lines.append("domains: " + "  ".join(
        f"d{i}: cpus={d.nr_cpus} load={d.load_q / contract.LOAD_SCALE:.2f} queued={d.queued}"
        for i, d in enumerate(doms)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mlsched-stats",
        description="Show mlsched's decision counters from the loader's pinned maps.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--once", action="store_true", help="print one block and exit")
    ap.add_argument("--interval", type=float, default=1.0, metavar="SECS",
                    help="seconds between blocks (default: 1)")
    ap.add_argument("--pin-dir", default=contract.PIN_DIR, metavar="DIR",
                    help="where the loader pins its maps (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.interval <= 0:
        ap.error("--interval must be positive")

    if not os.path.isdir(args.pin_dir):
        print(f"mlsched-stats: mlsched is not attached (no pinned maps in {args.pin_dir})",
              file=sys.stderr)
        return 1
    from loader.libbpf import LibbpfError

    try:
        pinned = Pinned(args.pin_dir)
    except LibbpfError as e:
        print(f"mlsched-stats: {e}", file=sys.stderr)
        return 1
    try:
        while True:
            print(render(pinned, snapshot(pinned)), flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
            print()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
