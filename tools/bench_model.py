"""Benchmark mlsched's model backends side by side: throughput, latency, load time, memory.

usage: mlsched-bench-model [--model DIR] [--json PATH] [--seconds S] [--batches 1,64,512]
                            [--backends tf,tf-per-decision,numpy] [--grid 32x8] [--cpu N]

Each backend runs in a fresh child process that loads only that backend, exactly as the
loader does (check_model_dir, then open_backend), so its RSS is the backend's own and the
numpy child proves that it never imports TensorFlow:
  tf               TFBackend.predict: the SavedModel signature called by keyword on a batch
  tf-per-decision  the same, one call per decision (a batch of b is b calls of batch 1)
  numpy            NumpyModel.predict: the verified fast path
It records the import time (process start to backend modules imported), the load time
(check_model_dir + open_backend) and the RSS once the backend has run (VmRSS, and the peak
VmHWM so far), before the benchmark builds its own inputs. Then, for batch sizes 1, 64, 512,
decisions/s and the p50/p99 latency of one predict() of a batch; last, the decisions over the
feature grid of a --grid machine, compared with tf's (none may differ). Everything runs
pinned to one CPU (--cpu). Prints a table and writes JSON.

Targets checked: numpy >= 1 M decisions/s at batch 64, numpy >= 100x tf-per-decision at
batch 64, numpy RSS <= 64 MB, no decision differing from tf, no TF in the numpy child.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from loader import paths

BACKENDS = ("tf", "tf-per-decision", "numpy")
DEFAULT_BATCHES = (1, 64, 512)
MIN_CALLS = 5
WARMUP_CALLS = 20
PER_DECISION_ROWS = 2048  # tf-per-decision decides this many grid rows (0.4 ms each)
EVAL_CHUNK = 4096
TARGET_RATE = 1e6  # numpy decisions/s at batch 64
TARGET_SPEEDUP = 100.0  # numpy vs tf-per-decision at batch 64
TARGET_RSS_MB = 64.0
PROGRESS = "bench: "

EXAMPLES = """examples:
  make bench-model                                  # all backends, JSON in bench-results/
  mlsched-bench-model --model /tmp/m --seconds 0.5
  mlsched-bench-model --backends numpy --batches 1,64 --json /tmp/numpy.json
"""


# --- the child: one backend -----------------------------------------------------------------


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _say(text: str) -> None:
    print(PROGRESS + text, file=sys.stderr, flush=True)


def _eval_rows(nr_cpus: int, max_dom_cpus: int) -> np.ndarray:
    """The grid's model inputs in a fixed shuffled order (timing batches take slices)."""
    from loader import schema

    x = schema.unpack_keys(schema.feature_grid(nr_cpus, max_dom_cpus))
    return x[np.random.default_rng(0).permutation(len(x))]


def _since_process_start() -> float:
    """Seconds since this process started (interpreter start-up and every import included)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def _loader_modules_rss() -> dict[str, Any]:
    """For scale: RSS once the rest of the loader (bcc's libbcc via loader.bpfmaps) is imported.

    Informational, not the backend's figure: measured after it, in the same process.
    """
    try:
        import loader.main  # noqa: F401
        import loader.scheduler  # noqa: F401
        import loader.stats  # noqa: F401
    except Exception as e:  # bcc missing on this machine, or the like
        return {"rss_with_loader_modules_mb": None, "loader_modules_error": f"{e}"}
    return {
        "rss_with_loader_modules_mb": _proc_status_mb("VmRSS"),
        "rss_anon_with_loader_modules_mb": _proc_status_mb("RssAnon"),
    }


def run_child(args: argparse.Namespace) -> int:
    """Load one backend, time it, decide the grid; write a JSON result and the decisions."""
    name = args.child
    from loader.backends import open_backend  # numpy, and TF only when asked for
    from loader.model_check import check_model_dir

    if name != "numpy":
        from loader.backends import import_tensorflow

        import_tensorflow()
    import_s = _since_process_start()

    t1 = time.perf_counter()
    info = check_model_dir(args.model)
    backend, reason = open_backend(info, "numpy" if name == "numpy" else "tf")
    load_ms = (time.perf_counter() - t1) * 1e3
    _say(f"{name}: imported in {import_s:.2f} s, loaded in {load_ms:.1f} ms ({reason})")

    predict = backend.predict
    if name == "tf-per-decision":

        def predict(x: np.ndarray, one=backend.predict) -> np.ndarray:
            return np.concatenate([one(x[i : i + 1]) for i in range(len(x))])

    # The backend's own memory: loaded and run once, before the benchmark builds its inputs.
    backend.predict(np.zeros((64, 10), np.float32))
    rss_mb, peak_mb = _proc_status_mb("VmRSS"), _proc_status_mb("VmHWM")
    loader_rss: dict[str, Any] = {}
    if name == "numpy":
        loader_rss = _loader_modules_rss()

    x = _eval_rows(*args.grid)
    results: dict[str, Any] = {}
    for batch in args.batches:
        nr_slices = max(1, min(64, len(x) // batch))
        slices = [np.ascontiguousarray(x[i * batch : (i + 1) * batch]) for i in range(nr_slices)]
        warmup = WARMUP_CALLS if name != "tf-per-decision" else 2
        for i in range(warmup):
            predict(slices[i % nr_slices])
        times: list[int] = []
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < args.seconds or len(times) < MIN_CALLS:
            xs = slices[i % nr_slices]
            t = time.perf_counter_ns()
            predict(xs)
            times.append(time.perf_counter_ns() - t)
            i += 1
        ns = np.array(times, dtype=np.float64)
        cell = {
            "calls": len(times),
            "decisions_per_s": batch * len(times) / (ns.sum() / 1e9),
            "p50_us": float(np.percentile(ns, 50)) / 1e3,
            "p99_us": float(np.percentile(ns, 99)) / 1e3,
        }
        results[str(batch)] = cell
        _say(
            f"{name}: batch {batch:4d}: {_rate(cell['decisions_per_s']):>8} decisions/s, "
            f"p50 {cell['p50_us']:.1f} us, p99 {cell['p99_us']:.1f} us ({len(times)} calls)"
        )
    rss_after_bench_mb = _proc_status_mb("VmRSS")

    rows = x[:PER_DECISION_ROWS] if name == "tf-per-decision" else x
    decisions = np.concatenate(
        [predict(rows[i : i + EVAL_CHUNK]) > 0.5 for i in range(0, len(rows), EVAL_CHUNK)]
    )
    np.save(args.decisions_out, decisions)
    tf_imported = "tensorflow" in sys.modules  # loader modules included, for numpy
    result: dict[str, Any] = {
        "backend": name,
        "reason": reason,
        "import_s": import_s,
        "load_ms": load_ms,
        "rss_mb": rss_mb,
        "peak_rss_mb": peak_mb,
        "rss_after_bench_mb": rss_after_bench_mb,
        "tensorflow_imported": tf_imported,
        "batches": results,
        "eval_rows": len(rows),
        **loader_rss,
    }
    if tf_imported:
        import tensorflow as tf

        result["tensorflow_version"] = tf.__version__
    Path(args.result_out).write_text(json.dumps(result))
    return 0


# --- the parent: spawn, compare, report ---------------------------------------------------


def _rate(per_s: float) -> str:
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f} M"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f} k"
    return f"{per_s:.0f}"


def _spawn(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], np.ndarray]:
    result_out, decisions_out = tmp / f"{name}.json", tmp / f"{name}.npy"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--model",
        str(args.model),
        "--seconds",
        str(args.seconds),
        "--batches",
        ",".join(map(str, args.batches)),
        "--grid",
        f"{args.grid[0]}x{args.grid[1]}",
        "--result-out",
        str(result_out),
        "--decisions-out",
        str(decisions_out),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    other: deque[str] = deque(maxlen=20)  # TF's own chatter: shown only when the child fails
    with subprocess.Popen(
        cmd, cwd=paths.CHECKOUT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True
    ) as child:
        assert child.stderr is not None
        for line in child.stderr:
            if line.startswith(PROGRESS):
                print("  " + line[len(PROGRESS) :], end="", file=sys.stderr, flush=True)
            else:
                other.append(line.rstrip())
    if child.returncode != 0 or not result_out.exists():
        last = next((line for line in reversed(other) if line.strip()), "no output")
        raise RuntimeError(f"the {name} child failed (exit {child.returncode}): {last}")
    return json.loads(result_out.read_text()), np.load(decisions_out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def report(summary: dict[str, Any]) -> list[str]:
    """The human-readable table of a summary (also what the JSON holds)."""
    backends: dict[str, Any] = summary["backends"]
    m = summary["machine"]
    lines = [
        f"mlsched model benchmark, {summary['date']}",
        f"machine: {m['cpu_model']}, {m['nr_cpus']} CPUs online, pinned to CPU {m['pinned_cpu']},"
        f" load average {m['loadavg_1min_at_start']:.2f} at start",
        f"software: kernel {m['kernel']}, python {m['python']}, numpy {m['numpy']}, "
        f"tensorflow {m.get('tensorflow', '-')}",
        f"model: {summary['model']['path']} ({summary['model']['layers']}, digest "
        f"{summary['model']['digest'][:8]})",
        "",
    ]
    batches = summary["settings"]["batches"]
    rows = [["backend", "batch", "decisions/s", "p50 us/call", "p99 us/call", "calls"]]
    for name, r in backends.items():
        for b in batches:
            c = r["batches"][str(b)]
            rows.append(
                [
                    name,
                    str(b),
                    _rate(c["decisions_per_s"]),
                    f"{c['p50_us']:.1f}",
                    f"{c['p99_us']:.1f}",
                    str(c["calls"]),
                ]
            )
    lines += _table(rows, right={1, 2, 3, 4, 5})
    lines.append("")
    rows = [["backend", "import s", "load ms", "RSS MB", "peak MB", "imports TF", "differ from tf"]]
    for name, r in backends.items():
        differ = r.get("differ_from_tf")
        rows.append(
            [
                name,
                f"{r['import_s']:.2f}",
                f"{r['load_ms']:.1f}",
                f"{r['rss_mb']:.1f}",
                f"{r['peak_rss_mb']:.1f}",
                "yes" if r["tensorflow_imported"] else "no",
                "-" if differ is None else f"{differ} of {r['eval_rows']}",
            ]
        )
    lines += _table(rows, right={1, 2, 3, 4})
    numpy_r = backends.get("numpy", {})
    if numpy_r.get("rss_with_loader_modules_mb"):
        lines.append(
            "numpy + the rest of the loader's modules (bcc's libbcc): "
            f"{numpy_r['rss_with_loader_modules_mb']:.1f} MB RSS "
            f"({numpy_r['rss_anon_with_loader_modules_mb']:.1f} MB anonymous)"
        )
    lines.append("")
    lines.append("targets:")
    for t in summary["targets"]:
        lines.append(f"  {'ok  ' if t['ok'] else 'MISS'} {t['what']}: {t['value']}")
    return lines


def _targets(backends: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    numpy_r, per_decision = backends.get("numpy"), backends.get("tf-per-decision")
    if numpy_r and "64" in numpy_r["batches"]:
        rate = numpy_r["batches"]["64"]["decisions_per_s"]
        out.append(
            {
                "what": "numpy >= 1 M decisions/s at batch 64 on one core",
                "value": f"{_rate(rate)}/s",
                "ok": rate >= TARGET_RATE,
            }
        )
        if per_decision and "64" in per_decision["batches"]:
            ratio = rate / per_decision["batches"]["64"]["decisions_per_s"]
            out.append(
                {
                    "what": "numpy >= 100x tf-per-decision at batch 64",
                    "value": f"{ratio:.0f}x",
                    "ok": ratio >= TARGET_SPEEDUP,
                }
            )
    if numpy_r:
        out.append(
            {
                "what": "numpy backend RSS <= 64 MB",
                "value": f"{numpy_r['rss_mb']:.1f} MB",
                "ok": numpy_r["rss_mb"] <= TARGET_RSS_MB,
            }
        )
        out.append(
            {
                "what": "numpy child never imports TensorFlow",
                "value": "imported" if numpy_r["tensorflow_imported"] else "not imported",
                "ok": not numpy_r["tensorflow_imported"],
            }
        )
    differ = {
        n: r["differ_from_tf"]
        for n, r in backends.items()
        if n != "tf" and r.get("differ_from_tf") is not None
    }
    if differ:
        out.append(
            {
                "what": "decisions differing from tf",
                "value": ", ".join(f"{n} {d}" for n, d in differ.items()),
                "ok": not any(differ.values()),
            }
        )
    return out


def run_parent(args: argparse.Namespace) -> int:
    from loader.model_check import ModelError, check_model_dir

    try:
        info = check_model_dir(args.model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "numpy" in args.backends and not info.fastpath_ok:
        print(f"error: no numpy backend for {args.model}: {info.fastpath_reason}", file=sys.stderr)
        return 2
    if args.cpu >= 0:
        try:
            os.sched_setaffinity(0, {args.cpu})  # the children inherit it
        except OSError as e:
            print(f"error: cannot pin to CPU {args.cpu} ({e.strerror})", file=sys.stderr)
            return 2
    pinned = sorted(os.sched_getaffinity(0))

    from loader.backends import NumpyModel
    from model_dir.architecture import describe_stack

    layers = describe_stack(NumpyModel.load(info.path)) if info.fastpath_ok else "no fast path"
    summary: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": _cpu_model(),
            "nr_cpus": os.cpu_count(),
            "pinned_cpu": ",".join(map(str, pinned)),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "loadavg_1min_at_start": os.getloadavg()[0],  # other work skews the figures
        },
        "model": {"path": str(args.model), "digest": info.digest, "layers": layers},
        "settings": {
            "seconds_per_cell": args.seconds,
            "batches": list(args.batches),
            "grid": f"{args.grid[0]} CPUs x {args.grid[1]} per domain",
            "per_decision_rows": PER_DECISION_ROWS,
        },
        "backends": {},
    }
    decisions: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="mlsched-bench-") as tmp:
        for i, name in enumerate(args.backends, 1):
            print(f"[{i}/{len(args.backends)}] {name}", file=sys.stderr, flush=True)
            try:
                result, decisions[name] = _spawn(name, args, Path(tmp))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            summary["backends"][name] = result
            if "tensorflow_version" in result:
                summary["machine"]["tensorflow"] = result["tensorflow_version"]
    if "tf" in decisions:
        ref = decisions["tf"]
        for name, got in decisions.items():
            n = len(got)  # tf-per-decision decided the first rows of the same order
            summary["backends"][name]["differ_from_tf"] = int(np.count_nonzero(got != ref[:n]))
    summary["targets"] = _targets(summary["backends"])

    lines = report(summary)
    print("\n".join(lines))
    json_path = args.json
    if json_path is None and paths.BENCH_RESULTS is not None:
        json_path = paths.BENCH_RESULTS / f"model-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {json_path}")
    missed = [t for t in summary["targets"] if not t["ok"]]
    return 1 if args.strict and missed else 0


# --- command line ---------------------------------------------------------------------------


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _backends(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(","))
    unknown = [v for v in values if v not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend {unknown[0]!r} (choose from {', '.join(BACKENDS)})"
        )
    return values


def _grid(text: str) -> tuple[int, int]:
    try:
        cpus, per_dom = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CPUSxPER_DOMAIN like 32x8, got {text!r}"
        ) from None
    if cpus < 1 or per_dom < 1:
        raise argparse.ArgumentTypeError(f"both numbers must be >= 1, got {text!r}")
    return cpus, per_dom


def main(argv: list[str] | None = None) -> int:
    from loader import cli

    parser = cli.parser("mlsched-bench-model", "Benchmark mlsched's model backends (tf, tf one "
                        "call per decision, numpy).", EXAMPLES)
    add = parser.add_argument
    add("--model", metavar="DIR", type=Path, default=paths.BUNDLED_MODEL,
        help="SavedModel directory (default: the bundled %(default)s)")
    add("--json", metavar="PATH", type=Path, help="where to write the JSON (default in a "
        "checkout: bench-results/model-<date>.json; installed: none)")
    add("--seconds", metavar="S", type=lambda t: cli.number_in(t, 0, math.inf), default=1.0,
        help="time per backend and batch size (default 1.0)")
    add("--batches", metavar="B,B,...", type=_batches, default=DEFAULT_BATCHES,
        help="batch sizes (default 1,64,512)")
    add("--backends", metavar="NAME,...", type=_backends, default=BACKENDS,
        help=f"backends (default {','.join(BACKENDS)})")
    add("--grid", metavar="CPUSxN", type=_grid, default=(32, 8),
        help="machine whose feature grid is decided: CPUSxPER_DOMAIN (default 32x8)")
    add("--cpu", metavar="N", type=int, default=0,
        help="CPU to pin everything to; -1 to leave affinity alone (default 0)")
    add("--strict", action="store_true", help="exit 1 when a target is missed")
    add("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    add("--result-out", help=argparse.SUPPRESS)
    add("--decisions-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
