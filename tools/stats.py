"""mlsched-stats: live decision counters of the mlsched scheduler, from its pinned maps.

usage: mlsched-stats [--interval SECS] [--once] [--json | --openmetrics] [--pin-dir DIR]

Reads only the maps the loader pins under /sys/fs/bpf/mlsched (never TensorFlow), so it starts
at once and runs beside a loader in another shell. Every block covers one interval: it samples
the maps, sleeps --interval, samples again and prints the rates between the two. The fields are
declared in tools/statsmodel.py and listed in tools/README.md.

Exit status: 0 after --once or Ctrl-C; 1 when mlsched is not attached (or leaves while
watched: the kernel's exit reason is printed); 2 for bad usage.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys
import time
from typing import Protocol, TextIO

from loader import contract
from loader.cli import interval_s
from loader.scheduler import scx_ops_name, scx_state
from tools.statsmodel import Sample, compute, render_json, render_openmetrics, render_text

EXAMPLES = """\
examples:
  sudo mlsched-stats                      # a block every second until Ctrl-C
  sudo mlsched-stats --once               # one block (two samples 1 s apart), then exit
  sudo mlsched-stats --interval 5 --json  # one JSON object per line every 5 s
  sudo mlsched-stats --once --openmetrics > /var/lib/node_exporter/mlsched.prom
  sudo mlsched-load --stats 2             # the same block, printed by the loader itself

Fields and their units: tools/README.md. Exit status 1 when mlsched is not attached.
"""

# enum scx_exit_kind (kernel/sched/ext_internal.h); kinds from ERROR on are errors.
SCX_EXIT_KINDS = {
    0: "none", 1: "done", 64: "unreg", 65: "unreg_bpf", 66: "unreg_kern", 67: "sysrq",
    1024: "error", 1025: "error_bpf", 1026: "error_stall",
}
SCX_EXIT_ERROR = 1024


class NotAttached(Exception):
    """mlsched is not attached, or left; str() is the one line to print."""


class MapSource(Protocol):
    """The maps a sample reads: the pinned ones (Pinned) or the loader's own (LoaderMaps)."""

    counters: object
    loader_stats: object
    config: object
    dom_stats: object
    exit_info: object
    latency_hist: object
    decisions_fd: int


class Pinned:
    """The loader's pinned maps, opened by path."""

    def __init__(self, pin_dir: str) -> None:
        from loader import libbpf
        from loader.bpfmaps import PerCpuU64Array, StructArray, U64Array

        self.pin_dir = pin_dir
        self._fds: list[int] = []

        def fd(name: str) -> int:
            self._fds.append(libbpf.obj_get(os.path.join(pin_dir, name)))
            return self._fds[-1]

        try:
            self.counters = PerCpuU64Array(fd(contract.MAP_COUNTERS), contract.NR_COUNTERS)
            self.loader_stats = U64Array(fd(contract.MAP_LOADER_STATS),
                                         contract.NR_LOADER_STATS)
            self.config = U64Array(fd(contract.MAP_CONFIG), contract.NR_CONFIG)
            self.dom_stats = StructArray(fd(contract.MAP_DOM_STATS), contract.MAX_DOMS,
                                         contract.DomStat)
            self.exit_info = StructArray(fd(contract.MAP_EXIT_INFO), 1, contract.ExitInfo)
            self.latency_hist = U64Array(fd(contract.MAP_LATENCY_HIST),
                                         contract.NR_HISTS * contract.HIST_BUCKETS)
            self.decisions_fd = fd(contract.MAP_DECISIONS)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class LoaderMaps:
    """The same maps, through the loader's own Scheduler object (for mlsched-load --stats)."""

    def __init__(self, sched: object) -> None:
        from loader.bpfmaps import StructArray

        self.counters = sched.counters  # type: ignore[attr-defined]
        self.loader_stats = sched.loader_stats  # type: ignore[attr-defined]
        self.config = sched.config  # type: ignore[attr-defined]
        self.exit_info = sched.exit_info  # type: ignore[attr-defined]
        self.latency_hist = sched.latency_hist  # type: ignore[attr-defined]
        self.decisions_fd = sched.decisions.fd  # type: ignore[attr-defined]
        self.dom_stats = StructArray(sched.obj.map_fd(contract.MAP_DOM_STATS),  # type: ignore[attr-defined]
                                     contract.MAX_DOMS, contract.DomStat)


def snapshot(p: MapSource) -> dict[str, int]:
    """Cumulative counters by name (Counter names, "loader_" + LoaderStat names), for tests."""
    out: dict[str, int] = {}
    for c, v in zip(contract.Counter, p.counters.read_all(), strict=True):  # type: ignore[attr-defined]
        out[c.name.lower()] = v
    for s, v in zip(contract.LoaderStat, p.loader_stats.read_all(), strict=True):  # type: ignore[attr-defined]
        out["loader_" + s.name.lower()] = v
    return out


# --- the decision map's size, without walking it key by key ----------------------------------

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libbpf.bpf_obj_get_info_by_fd.restype = ctypes.c_int
_libbpf.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_uint32)]
_libbpf.bpf_map_lookup_batch.restype = ctypes.c_int
_libbpf.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
_BATCH = 4096


def map_info(fd: int) -> tuple[int, int, int]:
    """(key_size, value_size, max_entries) of a map, from struct bpf_map_info."""
    buf = (ctypes.c_uint32 * 64)()  # zeroed; the kernel fills its own struct's size
    size = ctypes.c_uint32(ctypes.sizeof(buf))
    if _libbpf.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"map info: {os.strerror(err)}")
    # type, id, key_size, value_size, max_entries, ...
    return buf[2], buf[3], buf[4]


def count_entries(fd: int, key_size: int, value_size: int) -> int:
    """Entries in a hash map: batched lookups, or a key walk where batches are unsupported."""
    keys = (ctypes.c_uint8 * (_BATCH * key_size))()
    values = (ctypes.c_uint8 * (_BATCH * value_size))()
    in_batch, out_batch = ctypes.c_uint64(), ctypes.c_uint64()
    total, first = 0, True
    while True:
        n = ctypes.c_uint32(_BATCH)
        res = _libbpf.bpf_map_lookup_batch(
            fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
            keys, values, ctypes.byref(n), None)
        err = ctypes.get_errno() if res < 0 else 0
        if res < 0 and err != errno.ENOENT:
            if first:
                from loader.bpfmaps import DecisionMap

                return DecisionMap(fd).count()
            raise OSError(err, f"decision map lookup: {os.strerror(err)}")
        total += n.value
        if res < 0:  # ENOENT: that was the last chunk
            return total
        in_batch.value = out_batch.value
        first = False


# --- samples -----------------------------------------------------------------------------------


def take_sample(src: MapSource, model: str) -> Sample:
    mono_ns = time.monotonic_ns()
    wall_s = time.time()
    config = src.config.read_all()  # type: ignore[attr-defined]
    flat = src.latency_hist.read_all()  # type: ignore[attr-defined]
    nb = contract.HIST_BUCKETS
    nr_doms = min(config[contract.Config.NR_DOMS], contract.MAX_DOMS)
    doms = []
    for d in range(nr_doms):
        ds = src.dom_stats.get(d)  # type: ignore[attr-defined]
        doms.append((ds.nr_cpus, ds.load_q, ds.queued))
    key_size, value_size, capacity = map_info(src.decisions_fd)
    return Sample(
        mono_ns=mono_ns,
        wall_s=wall_s,
        state=scx_state(),
        ops=scx_ops_name(),
        model=model,
        counters=src.counters.read_all(),  # type: ignore[attr-defined]
        loader=src.loader_stats.read_all(),  # type: ignore[attr-defined]
        config=config,
        hist=[flat[h * nb:(h + 1) * nb] for h in range(contract.NR_HISTS)],
        doms=doms,
        # The hash's entries, and the dense grid's decided keys (counted by the loader).
        table_entries=count_entries(src.decisions_fd, key_size, value_size)
        + src.loader_stats.get(contract.LoaderStat.GRID_DECIDED),  # type: ignore[attr-defined]
        table_capacity=capacity,
    )


def loader_model(pid: int) -> str:
    """The model directory mlsched-load (pid) serves, from its command line; "?" if unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return "?"
    return model_from_cmdline(argv, cwd)


def model_from_cmdline(argv: list[str], cwd: str) -> str:
    """--model of a loader's argv, resolved against its cwd (argparse's forms: --model DIR,
    --model=DIR, unique prefixes such as --mod); the loader's default when absent."""
    if not any("loader.main" in a or "mlsched-load" in a for a in argv[:3]):
        return "?"  # the pid is not (or no longer) a loader
    model = None
    for i, a in enumerate(argv[1:], start=1):
        opt, eq, value = a.partition("=")
        if len(opt) >= 4 and "--model".startswith(opt):
            model = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    if model is None:
        from loader.main import DEFAULT_MODEL

        return f"{DEFAULT_MODEL} (default)"
    return os.path.normpath(os.path.join(cwd, model))


def exit_text(info: contract.ExitInfo) -> str:
    reason = info.reason.decode(errors="replace")
    msg = info.msg.decode(errors="replace")
    return reason + (f": {msg}" if msg and msg != reason else "")


def check_live(src: MapSource, pin_dir: str) -> None:
    """Raise NotAttached when mlsched left (with the kernel's reason) or the pins are stale."""
    info = src.exit_info.get(0)  # type: ignore[attr-defined]
    if info.kind:
        kind = SCX_EXIT_KINDS.get(info.kind, str(info.kind))
        text = exit_text(info) or "no reason recorded"
        if info.kind >= SCX_EXIT_ERROR:
            raise NotAttached(f"mlsched left with an error ({kind}, exit code "
                              f"{info.exit_code}): {text}")
        raise NotAttached(f"mlsched is not attached: it left ({kind}): {text}")
    state, ops = scx_state(), scx_ops_name()
    if state != "enabled" or ops != contract.SCHED_NAME:
        pid = src.loader_stats.get(contract.LoaderStat.LOADER_PID)  # type: ignore[attr-defined]
        now = f"sched_ext {state}" + (f" with {ops}" if ops and state != "disabled" else "")
        raise NotAttached(f"mlsched is not attached: stale pins in {pin_dir} from loader pid "
                          f"{pid} ({now})")


def not_attached_message(pin_dir: str) -> str:
    base = f"mlsched is not attached (no pinned maps in {pin_dir})"
    state, ops = scx_state(), scx_ops_name()
    if state == "unsupported":
        return base
    if state == "disabled" or not ops:
        return f"{base}; sched_ext is {state}"
    if ops == contract.SCHED_NAME:
        return (f"mlsched is attached but its maps are not pinned in {pin_dir} "
                "(was the loader started with another --pin-dir?)")
    return f"{base}; another sched_ext scheduler is {state}: {ops}"


def open_pinned(pin_dir: str) -> Pinned:
    try:
        os.stat(pin_dir)
    except FileNotFoundError:
        raise NotAttached(not_attached_message(pin_dir)) from None
    except PermissionError:
        raise NotAttached(f"cannot read {pin_dir}: permission denied (run as root)") from None
    return Pinned(pin_dir)


# --- printing ----------------------------------------------------------------------------------

RENDERERS = {"text": render_text, "json": render_json, "openmetrics": render_openmetrics}


class StatsPrinter:
    """Prints a block every interval_s from the loader's main loop (mlsched-load --stats)."""

    def __init__(self, src: MapSource, model: str, interval_s: float,
                 out: TextIO | None = None) -> None:
        self.src = src
        self.model = model
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self.prev = take_sample(src, model)
        self.next_s = time.monotonic() + interval_s

    def maybe_print(self) -> None:
        now = time.monotonic()
        if now < self.next_s:
            return
        self.next_s = max(self.next_s + self.interval_s, now + self.interval_s / 2)
        cur = take_sample(self.src, self.model)
        print(render_text(compute(self.prev, cur)) + "\n", file=self.out, flush=True)
        self.prev = cur


def watch(pinned: Pinned, interval_s: float, once: bool, fmt: str) -> int:
    render = RENDERERS[fmt]
    check_live(pinned, pinned.pin_dir)
    pid = pinned.loader_stats.get(contract.LoaderStat.LOADER_PID)
    model = loader_model(pid)
    prev = take_sample(pinned, model)
    next_s = time.monotonic() + interval_s
    while True:
        time.sleep(max(next_s - time.monotonic(), 0))
        next_s += interval_s
        check_live(pinned, pinned.pin_dir)
        cur = take_sample(pinned, model)
        text = render(compute(prev, cur))
        print(text + ("\n" if fmt == "text" and not once else ""), flush=True)
        if once:
            return 0
        prev = cur


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mlsched-stats",
        description="Show mlsched's live decision counters and rates from the loader's "
        "pinned maps.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--interval", type=interval_s, default=1.0, metavar="SECS",
                    help="seconds each block's rates cover (default: 1)")
    ap.add_argument("--once", action="store_true",
                    help="print one block (two samples --interval apart) and exit")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json",
                     help="one JSON object per interval, one per line")
    fmt.add_argument("--openmetrics", dest="fmt", action="store_const", const="openmetrics",
                     help="OpenMetrics text per interval (for Prometheus or a textfile "
                     "collector)")
    ap.add_argument("--pin-dir", default=contract.PIN_DIR, metavar="DIR",
                    help="where the loader pins its maps (default: %(default)s)")
    ap.set_defaults(fmt="text")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loader.bpfmaps import MapError
    from loader.libbpf import LibbpfError

    pinned = None
    try:
        pinned = open_pinned(args.pin_dir)
        return watch(pinned, args.interval, args.once, args.fmt)
    except NotAttached as e:
        print(f"mlsched-stats: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # e.g. | head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (LibbpfError, MapError, OSError) as e:
        print(f"mlsched-stats: {e}", file=sys.stderr)
        return 1
    finally:
        if pinned is not None:
            pinned.close()


if __name__ == "__main__":
    sys.exit(main())
