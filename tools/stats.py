"""mlsched-stats: live figures of the mlsched scheduler, from its loader's stats socket.

usage: mlsched-stats [--interval SECS] [--once] [--json | --openmetrics] [--socket PATH]

A client of the socket mlsched-load serves in scx_stats' protocol (loader/stats.py), as
scx_rusty's `--monitor` is of its own: it connects, and every --interval asks for `stats`; the
loader answers with the figures of the interval since the previous request. The fields are
declared in loader/stats.py; `--help-stats` lists them (the table in tools/README.md).

Exit status: 0 after --once or Ctrl-C; 1 when mlsched is not attached, or leaves while watched
(one line on stderr says what sched_ext is doing instead); 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import string
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from loader import contract
from loader.cli import interval_s, parser
from loader.stats import DEFAULT_PATH, DOM_FIELDS, FIELDS, TOP

EXAMPLES = """\
examples:
  sudo mlsched-stats                      # a block every second until Ctrl-C
  sudo mlsched-stats --once               # one block (an interval of 1 s), then exit
  sudo mlsched-stats --interval 5 --json  # one JSON object per line every 5 s
  sudo mlsched-stats --once --openmetrics > /var/lib/node_exporter/mlsched.prom
  sudo mlsched-load --stats 2             # the loader itself prints the JSON lines
  echo '{"req":"stats"}' | sudo socat - UNIX-CONNECT:/var/run/scx/root/stats   # the raw protocol

Fields and their units: mlsched-stats --help-stats. Exit status 1 when mlsched is not attached.
"""


class NotAttached(Exception):
    """mlsched is not there to answer, or left; str() is the one line to print."""


class StatsError(Exception):
    """A stats request failed, or the server is not there; str() is one line."""


class StatsClient:
    """One connection to a stats server; request() returns the answer's resp."""

    def __init__(self, path: str = DEFAULT_PATH, timeout_s: float = 30.0) -> None:
        self.path, self.sock = path, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            if isinstance(e, PermissionError):
                raise NotAttached(f"cannot connect to {path}: permission denied (run as root, or "
                                  "as a member of the loader's --stats-group)") from None
            raise StatsError({
                FileNotFoundError: f"no stats socket at {path}",
                ConnectionRefusedError: f"nothing serves {path}: a loader that died left it",
            }.get(type(e), f"cannot connect to {path}: {e.strerror or e}")) from None
        self._file = self.sock.makefile("rb")

    def request(self, req: str, args: dict[str, str] | None = None) -> Any:
        try:
            self.sock.sendall(json.dumps({"req": req, "args": args or {}}).encode() + b"\n")
            reply = self._file.readline(1 << 24)
        except TimeoutError:
            raise StatsError(f"{self.path}: no answer to {req!r}") from None
        except (BrokenPipeError, ConnectionResetError):
            raise StatsError(f"the loader closed {self.path}") from None
        except OSError as e:
            raise StatsError(f"{self.path}: {e.strerror or e}") from None
        if not reply:
            raise StatsError(f"the loader closed {self.path}")
        try:
            msg = json.loads(reply)
            err, resp = msg["errno"], msg["args"]["resp"]
        except (ValueError, KeyError, TypeError):
            raise StatsError(f"{self.path}: not a scx_stats answer: {reply[:80]!r}") from None
        if err:
            raise StatsError(f"{req}: {resp} (errno {err})")
        return resp

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def situation() -> str:
    """What sched_ext is doing, for the line that says mlsched is not there."""
    from loader.scheduler import scx_ops_name, scx_state

    state, ops = scx_state(), scx_ops_name()
    if state == "unsupported":
        return "this kernel has no sched_ext"
    if state == "disabled" or not ops:
        return f"sched_ext is {state}"
    if ops == contract.SCHED_NAME:
        return f"{ops} is {state}"
    return f"another sched_ext scheduler is {state}: {ops}"


def connect(path: str) -> StatsClient:
    """A connection to mlsched's stats; NotAttached when there is none, or another's."""
    try:
        client = StatsClient(path)
    except StatsError as e:
        raise NotAttached(f"mlsched is not attached ({e}); {situation()}") from None
    try:
        structs = client.request("stats_meta")
    except StatsError as e:
        client.close()
        raise NotAttached(f"mlsched is not attached ({e}); {situation()}") from None
    if TOP not in structs:
        client.close()
        raise NotAttached(f"{path} serves another scheduler's stats (structs "
                          f"{', '.join(sorted(structs))[:80]}); {situation()}")
    return client


# --- renderings -------------------------------------------------------------------------------


_TEXT = (  # one concern a line, like scx_rusty --monitor; {name:rate|pct|us}, "-" when absent
    "loader     pid {loader_pid}  up {uptime_s} s  {ready} ({backend})  fallback {fallback}",
    "model      {model}  digest {model_digest}  reloads {reloads_total} (refused "
    "{reload_failures_total})  restarts {restarts_total}",
    "decide     cand {candidates_per_s:rate}  hit {hit_rate:pct}  migrate {migrate_per_s:rate}  "
    "keep {keep_per_s:rate}  fallback {fallback_migrate_per_s:rate} migr + "
    "{fallback_keep_per_s:rate} keep",
    "table      written {decisions_per_s:rate} (total {decisions_total})  entries {table_entries}"
    "/{table_capacity} ({table_occupancy:pct})  grid {grid_decided}/{grid_keys}",
    "ring       submitted {submitted_per_s:rate}  read {records_per_s:rate}  wakeups "
    "{rb_wakeups_per_s:rate}  drops {rb_drops_per_s:rate} (total {rb_drops_total})",
    "batch      {batches_per_s:rate}  size {batch_size_avg}  latency p50 {batch_latency_p50_us:us}"
    " p99 {batch_latency_p99_us:us} avg {batch_latency_avg_us:us} max {batch_latency_max_us:us}"
    "  errors {model_errors_total}",
    "event->map latency p50 {event_latency_p50_us:us} p99 {event_latency_p99_us:us} avg "
    "{event_latency_avg_us:us}  in-kernel {kinfer_per_s:rate} avg {kinfer_avg_ns} ns  explored "
    "{explored_per_s:rate}",
    "moves      model {migr_model_per_s:rate}  fallback {migr_fallback_per_s:rate}  forced "
    "{migr_forced_per_s:rate}  in-domain {migr_domain_per_s:rate}  decided {decided_share:pct} "
    "of {ran_cross_per_s:rate} cross-domain runs",
    "wakeups    {select_per_s:rate} (prev CPU idle {local_per_s:rate})  steal cand "
    "{steal_candidates_per_s:rate}  preempts {preempts_per_s:rate}  restricted "
    "{restricted_per_s:rate}",
)


class _TextFormat(string.Formatter):
    def get_value(self, key: Any, args: Any, kwargs: Any) -> Any:
        return kwargs.get(key, "-")

    def format_field(self, v: Any, spec: str) -> str:
        if not isinstance(v, int | float) or not spec:
            return str(v)
        if spec == "rate":
            return f"{v:.1f}/s"
        if spec == "pct":
            return f"{100 * v:.2f}%" if 0 < v < 0.01 else f"{100 * v:.1f}%"
        if spec == "us":
            return f"{v:.1f}us" if v < 10 else f"{v:.0f}us" if v < 10000 else f"{v / 1000:.0f}ms"
        return format(v, spec)


def render_text(r: dict[str, Any]) -> str:
    """The block that fits a terminal, one concern a line."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("time", 0))))
    ready = "model ready" if r.get("model_ready") else "model loading (fallback serves)"
    fmt = _TextFormat()
    return "\n".join([
        fmt.format("###### {}  {ops} {state}  interval {interval_s:.1f} s ######", stamp, **r),
        *(fmt.format(line, **{"ready": ready} | r) for line in _TEXT),
        *(f"dom{i:<7} cpus {d['nr_cpus']}  load {d['load']:.2f}  queued {d['queued']}"
          for i, d in r.get("domains", {}).items())])


def render_json(resp: dict[str, Any]) -> str:
    """One line: the server's answer as it came."""
    return json.dumps(resp, separators=(", ", ": "))


def render_openmetrics(resp: dict[str, Any]) -> str:
    """The interval as OpenMetrics text (prometheus_client's), ending in # EOF.

    Counters are mlsched_NAME (samples NAME_total, totals since attach), gauges mlsched_NAME,
    labels the info metric mlsched_info, domains gauges mlsched_dom_NAME{dom="d"}; a figure
    the answer leaves out has no sample.
    """
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.openmetrics.exposition import generate_latest
    from prometheus_client.registry import Collector, CollectorRegistry

    class Families(Collector):
        def collect(self) -> Iterator[Metric]:
            labels = [f for f in FIELDS if f.kind == "label"]
            yield InfoMetricFamily(
                "mlsched", "; ".join(f"{f.name}: {f.help}" for f in labels),
                value={f.name: str(resp.get(f.name, "")) for f in labels})
            for f in FIELDS:
                if f.kind == "counter":
                    fam: Metric = CounterMetricFamily("mlsched_" + f.name.removesuffix("_total"),
                                                      f"{f.help} [{f.unit}]")
                elif f.kind == "gauge":
                    fam = GaugeMetricFamily("mlsched_" + f.name, f"{f.help} [{f.unit}]")
                else:
                    continue
                if f.name in resp:
                    fam.add_sample(fam.name + ("_total" if f.kind == "counter" else ""), {},
                                   resp[f.name])
                yield fam
            for f in DOM_FIELDS:
                dom = GaugeMetricFamily(f"mlsched_dom_{f.name}", f"{f.help} [{f.unit}]",
                                        labels=["dom"])
                for d, values in (resp.get("domains") or {}).items():
                    dom.add_metric([d], values[f.name])
                yield dom

    registry = CollectorRegistry(auto_describe=True)
    registry.register(Families())
    return generate_latest(registry).decode().rstrip("\n")


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "text": render_text, "json": render_json, "openmetrics": render_openmetrics}


def markdown_table() -> str:
    """The field table of tools/README.md (an event's _total and _per_s share a row)."""
    rows = ["| field | unit | OpenMetrics | description |", "| --- | --- | --- | --- |"]
    totals = {f.name: f for f in FIELDS if f.kind == "counter"}
    for f in FIELDS:
        if f.name in totals:
            base = f.name.removesuffix("_total")
            rows.append(f"| `{f.name}`, `{base}_per_s` | events, 1/s | counter, gauge "
                        f"| {f.help.removesuffix(', since attach')} |")
        elif f.name.endswith("_per_s") and f.name.removesuffix("_per_s") + "_total" in totals:
            continue
        else:
            om = {"meta": "(JSON only)", "label": "label of `mlsched_info`"}.get(f.kind, f.kind)
            rows.append(f"| `{f.name}` | {f.unit} | {om} | {f.help} |")
    for f in DOM_FIELDS:
        rows.append(f"| `domains.<dom>.{f.name}` | {f.unit} | `mlsched_dom_{f.name}{{dom=…}}` "
                    f"| {f.help} |")
    return "\n".join(rows)


# --- the CLI ----------------------------------------------------------------------------------


def watch(client: StatsClient, interval: float, once: bool, fmt: str) -> int:
    """Every interval: ask, print. The first answer covers the time since connecting."""
    render = RENDERERS[fmt]
    next_s = time.monotonic() + interval
    while True:
        time.sleep(max(next_s - time.monotonic(), 0))
        next_s += interval
        try:
            resp = client.request("stats")
        except StatsError as e:
            raise NotAttached(f"mlsched is not attached: {e}; {situation()}") from None
        print(render(resp) + ("\n" if fmt == "text" and not once else ""), flush=True)
        if once:
            return 0


def build_parser() -> argparse.ArgumentParser:
    ap = parser("mlsched-stats", "Show mlsched's live decision figures, from the loader's stats "
                "socket (scx_stats protocol).", EXAMPLES)
    ap.add_argument("--interval", type=interval_s, default=1.0, metavar="SECS",
                    help="seconds each block's rates cover (default: 1)")
    ap.add_argument("--once", action="store_true",
                    help="print one block (one --interval) and exit")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json",
                     help="one JSON object per interval, one per line: the server's answer")
    fmt.add_argument("--openmetrics", dest="fmt", action="store_const", const="openmetrics",
                     help="OpenMetrics text per interval (for Prometheus or a textfile "
                     "collector)")
    ap.add_argument("--socket", default=DEFAULT_PATH, metavar="PATH",
                    help="the loader's stats socket (its --stats-socket; default: %(default)s)")
    ap.add_argument("--help-stats", action="store_true",
                    help="list the fields, their units and meaning, and exit")
    ap.set_defaults(fmt="text")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_stats:
        print(markdown_table())
        return 0
    client = None
    try:
        client = connect(args.socket)
        return watch(client, args.interval, args.once, args.fmt)
    except NotAttached as e:
        print(f"mlsched-stats: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # e.g. | head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
