"""mlsched's stats: every field declared once (_TABLE); an interval from two samples of the maps
(rates: deltas over the time between; a percentile: the upper bound of its log2 bucket, at most
2x; a figure with nothing to measure is left out: scx_stats clients want numbers); MapSampler
reads the maps, StatsPublisher writes the loader's figures there; StatsServer speaks scx_stats
(sched-ext/scx rust/scx_stats) on a UNIX socket: a JSON line each way, requests `stats` (an
interval since that connection's last one) and `stats_meta`. A door into a root process: mode
0600 and root peers only unless --stats-group; a thread a client, at most MAX_CLIENTS; a line over
MAX_LINE, or answers unread for SEND_TIMEOUT_S, end the connection; answers are made one at a time
(the clients hold the GIL no longer than one thread would), off the decision loop's thread."""

from __future__ import annotations

import argparse
import atexit
import errno
import grp
import json
import logging
import math
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from loader import contract, schema
from loader.cli import interval_s

if TYPE_CHECKING:
    from loader.bpfmaps import U64Array
    from loader.pipeline import DecisionPipeline, Predictor

C, LS = contract.Counter, contract.LoaderStat
TOP, DOM = "mlsched_stats", "dom_stats"  # the scx_stats structs
PUBLISH_INTERVAL_S = 0.2
DEFAULT_PATH = "/var/run/scx/root/stats"
MAX_CLIENTS, MAX_LINE, SEND_TIMEOUT_S = 16, 64 << 10, 2
log = logging.getLogger("mlsched.stats")


@dataclass(frozen=True)
class Field:
    name: str  # JSON key; the OpenMetrics name is "mlsched_" + name
    unit: str
    kind: str  # "meta" (JSON only), "label", "gauge" or "counter" (name ends in _total)
    help: str
    datum: str = "float"  # scx_stats type: u64, float or string


# name, unit, kind, scx_stats datum, description. An event, a Counter (the kernel's) or a
# LoaderStat (the loader's) of that name, gives NAME_total (a counter) and NAME_per_s (a gauge);
# domains.NAME is "domains": {"<dom>": {NAME: value}}, OpenMetrics mlsched_dom_NAME{dom=...}.
_TABLE = """
time                 s       meta  float  Unix time of the interval's second sample
interval_s           s       gauge float  seconds between the two samples the rates come from
state                -       label string sched_ext state (/sys/kernel/sched_ext/state)
ops                  -       label string attached sched_ext scheduler (sched_ext/root/ops)
model                -       label string model directory the loader serves (its --model)
backend              -       label string inference backend: none (not loaded yet), tf, numpy
fallback             -       label string policy for undecided candidates: keep, migrate, heuristic
loader_pid           pid     gauge u64    pid of mlsched-load
uptime_s             s       gauge float  seconds since the loader attached the scheduler
model_ready          0/1     gauge u64    1 once the model serves decisions, else 0
nr_cpus              CPUs    gauge u64    CPUs the scheduling domains cover
nr_doms              domains gauge u64    scheduling domains
select               events  event u64    select_cpu calls (task wakeups)
local                events  event u64    wakeups that found an idle CPU in their domain and stayed
no_candidate         events  event u64    wakeups that stayed: no less loaded domain
candidates           events  event u64    migration candidates built (the model's questions)
hits                 events  event u64    candidates whose key had a decision in the map
misses               events  event u64    candidates whose key had no decision yet
migrate              events  event u64    hits the model said to migrate
keep                 events  event u64    hits the model said to keep on their domain
fallback_migrate     events  event u64    misses the fallback policy migrated
fallback_keep        events  event u64    misses the fallback policy kept
submitted            events  event u64    candidates pushed to the ring buffer
rb_wakeups           events  event u64    candidates pushed with a wakeup of the loader
rb_drops             events  event u64    candidates not pushed: ring buffer full
steal_candidates     events  event u64    candidates an idle CPU built from another domain's queue
migr_model           events  event u64    cross-domain moves a model decision made
migr_fallback        events  event u64    cross-domain moves the fallback (or a coin flip) made
migr_forced          events  event u64    steals past the starvation guard, whatever the decision
migr_domain          events  event u64    moves inside a domain (idle sibling on wakeup, or pulled)
ran_cross            events  event u64    runs on a CPU of another domain than the last run
ran_cross_decided    events  event u64    ran_cross whose move a decision (model or fallback) made
ran_domain           events  event u64    runs on another CPU of the same domain
preempts             events  event u64    woken tasks that preempted a task a slice ahead
restricted           events  event u64    wakeups of tasks barred from some CPUs of their domain
explored             events  event u64    candidates decided by a coin flip (collection mode)
kinfer               events  event u64    misses the scheduler decided itself (--inference kernel)
kinfer_ns            events  event u64    time spent in those in-kernel inferences, ns
loader_wakeups       events  event u64    wakeups of the loader, run ahead of the queue
records              events  event u64    candidate records the loader read from the ring buffer
batches              events  event u64    model batches run
decisions            events  event u64    decisions written to the decision map
model_errors         events  event u64    batches whose decisions were not written
restarts             events  event u64    re-attaches after a CPU hotplug exit
reloads              events  event u64    models switched in on SIGHUP
reload_failures      events  event u64    SIGHUPs whose new model was refused
hit_rate             0..1    gauge float  hits / candidates over the interval
decided_share        0..1    gauge float  ran_cross_decided / ran_cross over the interval
kinfer_avg_ns        ns      gauge float  mean in-kernel inference time over the interval
model_digest         hex     label string first 16 hex digits of the serving model's sha256
grid_keys            keys    gauge u64    keys of the dense decision grid (0: hash only)
grid_decided         keys    gauge u64    grid keys holding a decision
table_entries        keys    gauge u64    decisions in the table: the grid's and the hash's
table_capacity       keys    gauge u64    size of the decision map
table_occupancy      0..1    gauge float  table_entries / table_capacity
batch_size_avg       keys    gauge float  decisions per model batch over the interval
batch_latency_p50_us us      gauge float  median model call + map update per batch (bucket bound)
batch_latency_p99_us us      gauge float  99th percentile of batch latency (bucket bound)
batch_latency_avg_us us      gauge float  mean batch latency over the interval
batch_latency_max_us us      gauge float  slowest batch since attach
event_latency_p50_us us      gauge float  median candidate push -> decision in map (bucket bound)
event_latency_p99_us us      gauge float  99th percentile of push -> decision latency (bucket bound)
event_latency_avg_us us      gauge float  mean push -> decision latency over the interval
domains.nr_cpus      CPUs    gauge u64    CPUs in the domain
domains.load         0..1    gauge float  domain load: busy CPUs plus queued tasks, per CPU, scaled
domains.queued       tasks   gauge u64    tasks waiting in the domain's queue
"""
_ROWS = [line.split(None, 4) for line in _TABLE.strip().split("\n")]
# The events: (name, "counters" or "loader", index in that array).
COUNTED = tuple((n, "counters", C[n.upper()]) if n.upper() in C.__members__
                else (n, "loader", LS[n.upper()]) for n, _, kind, *_ in _ROWS if kind == "event")


def _fields(rows: list[list[str]]) -> tuple[Field, ...]:
    out: list[Field] = []
    for name, unit, kind, datum, desc in rows:
        unit = "" if unit == "-" else unit
        out += ([Field(f"{name}_total", unit, "counter", f"{desc}, since attach", datum),
                 Field(f"{name}_per_s", "1/s", "gauge", f"{desc}, per second")]
                if kind == "event" else [Field(name, unit, kind, desc, datum)])
    return tuple(out)


FIELDS = _fields([row for row in _ROWS if "." not in row[0]])
DOM_FIELDS = _fields([[row[0][8:], *row[1:]] for row in _ROWS if row[0].startswith("domains.")])
FIELD_NAMES = tuple(f.name for f in FIELDS)


def meta() -> dict[str, Any]:
    """The answer to scx_stats' `stats_meta`: the two structs and their fields."""
    def desc(fs: tuple[Field, ...]) -> dict[str, Any]:
        return {f.name: {"datum": f.datum, "desc": f.help, "user": {
            "_unit": f.unit, "_om_kind": f.kind, **({"_om_skip": "true"} if f.kind in (
                "meta", "label") else {})}} for f in fs}

    domains = {"desc": "per-domain figures", "dict": {"key": "u64", "datum": {"struct": DOM}}}
    return {TOP: {"name": TOP, "desc": "mlsched: model-driven migration, one interval",
                  "top": "true", "user": {"_om_prefix": "mlsched_"},
                  "fields": desc(FIELDS) | {"domains": domains}},
            DOM: {"name": DOM, "desc": "one scheduling domain", "fields": desc(DOM_FIELDS),
                  "user": {"_om_prefix": "mlsched_dom_", "_om_label": "dom"}}}


@dataclass
class Sample:
    """The maps at one moment (counts since attach)."""

    mono_ns: int  # CLOCK_MONOTONIC, like the loader's START_NS
    wall_s: float
    state: str
    ops: str
    model: str
    counters: list[int]  # by contract.Counter
    loader: list[int]  # by contract.LoaderStat
    config: dict[str, int]  # the scheduler's settings: nr_cpus, nr_doms, fallback_policy
    hist: list[list[int]]  # [contract.Hist][HIST_BUCKETS]
    doms: list[tuple[int, int, int]] = field(default_factory=list)  # nr_cpus, load_q, queued
    table_capacity: int = 0


def percentile_us(counts: list[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a log2 histogram: its bucket's upper bound, in µs."""
    total, seen = sum(counts), 0
    for b, n in enumerate(counts):
        seen += n
        if total > 0 and seen >= max(1, math.ceil(q * total)):
            return 2.0 ** (b + 1) / 1000
    return None


def compute(prev: Sample, cur: Sample) -> dict[str, Any]:
    """One interval's figures by FIELDS name, plus "domains": {"<dom>": {DOM_FIELDS}}."""
    dt, ls, start = max(cur.mono_ns - prev.mono_ns, 1) / 1e9, cur.loader, cur.loader[LS.START_NS]

    def d(src: str, i: int) -> int:  # a restart resets the counts: never below 0
        return max(getattr(cur, src)[i] - getattr(prev, src)[i], 0)

    def ratio(num: float, den: float, digits: int) -> float | None:
        return round(num / den, digits) if den > 0 else None

    def pct(h: contract.Hist, q: float) -> float | None:
        return percentile_us([max(b - a, 0) for a, b in zip(prev.hist[h], cur.hist[h],
                                                              strict=True)], q)

    def name(enum: Any, v: int) -> str:
        return {m.value: m.name.lower() for m in enum}.get(v, str(v))

    batches, decisions = d("loader", LS.BATCHES), d("loader", LS.DECISIONS)
    cross = d("counters", C.RAN_CROSS)
    out: dict[str, Any] = {
        "time": round(cur.wall_s, 3), "interval_s": round(dt, 3), "state": cur.state,
        "ops": cur.ops, "model": cur.model, "backend": name(contract.Backend, ls[LS.BACKEND]),
        "fallback": name(contract.Fallback, cur.config["fallback_policy"]),
        "uptime_s": round(max(cur.mono_ns - start, 0) / 1e9, 1) if start else None}
    out |= {f.name: ls[LS[f.name.upper()]] for f in FIELDS  # gauges read as they are
            if f.kind == "gauge" and f.name.upper() in LS.__members__}
    out |= {f.name: cur.config[f.name] for f in FIELDS if f.name in cur.config}
    for n, src, i in COUNTED:
        out[f"{n}_total"], out[f"{n}_per_s"] = getattr(cur, src)[i], round(d(src, i) / dt, 2)
    out |= {
        "hit_rate": ratio(d("counters", C.HITS), d("counters", C.CANDIDATES), 4),
        "decided_share": ratio(min(d("counters", C.RAN_CROSS_DECIDED), cross), cross, 4),
        "kinfer_avg_ns": ratio(d("counters", C.KINFER_NS), d("counters", C.KINFER), 0),
        "model_digest": f"{ls[LS.MODEL_DIGEST]:016x}", "table_capacity": cur.table_capacity,
        "table_occupancy": ratio(ls[LS.TABLE_ENTRIES], cur.table_capacity, 4),
        "batch_size_avg": ratio(decisions, batches, 2),
        "batch_latency_p50_us": pct(contract.Hist.BATCH, 0.50),
        "batch_latency_p99_us": pct(contract.Hist.BATCH, 0.99),
        "batch_latency_avg_us": ratio(d("loader", LS.BATCH_NS_SUM) / 1000, batches, 3),
        "batch_latency_max_us": round(ls[LS.BATCH_NS_MAX] / 1000, 3) if ls[LS.BATCHES] else None,
        "event_latency_p50_us": pct(contract.Hist.EVENT, 0.50),
        "event_latency_p99_us": pct(contract.Hist.EVENT, 0.99),
        "event_latency_avg_us": ratio(d("loader", LS.EV_LAT_NS_SUM) / 1000, decisions, 3)}
    return {f.name: out[f.name] for f in FIELDS if out.get(f.name) is not None} | {"domains": {
        str(i): {"nr_cpus": nr, "load": round(q / schema.LOAD_SCALE, 4), "queued": queued}
        for i, (nr, q, queued) in enumerate(cur.doms)}}


class MapSampler:
    """Samples a scheduler's maps through dups of its fds: the server's thread never reads an fd
    the loader closed (and something reused) around a hotplug restart."""

    def __init__(self, sched: Any, model: str) -> None:
        self.model, self._lock = model, threading.Lock()
        self._maps: tuple[Any, ...] = ()
        self.rebind(sched)

    def rebind(self, sched: Any) -> None:
        """Sample this (new) scheduler's maps from now on."""
        from loader import libbpf
        from loader.bpfmaps import PerCpuU64Array, StructArray, U64Array

        c, dup = contract, os.dup
        maps = (PerCpuU64Array(dup(sched.counters.fd), c.NR_COUNTERS),
                U64Array(dup(sched.loader_stats.fd), c.NR_LOADER_STATS),
                U64Array(dup(sched.latency_hist.fd), c.NR_HISTS * c.HIST_BUCKETS),
                StructArray(dup(sched.obj.map_fd(c.MAP_DOM_STATS)), c.MAX_DOMS, c.DomStat))
        with self._lock:
            old, self._maps = self._maps, maps
            self._capacity = libbpf.map_max_entries(sched.table.hash.fd)
            self._config = {k: v for k, v in sched.config.items() if isinstance(v, int)}
        for m in old:
            os.close(m.fd)

    def sample(self) -> Sample:
        from loader.scheduler import scx_ops_name, scx_state

        nb = contract.HIST_BUCKETS
        with self._lock:
            counters, loader, hist_map, dom_map = self._maps
            cfg, flat = self._config, hist_map.read_all()
            doms = map(dom_map.get, range(min(cfg["nr_doms"], contract.MAX_DOMS)))
            return Sample(time.monotonic_ns(), time.time(), scx_state(), scx_ops_name(),
                          self.model, counters.read_all(), loader.read_all(), cfg,
                          [flat[h * nb:(h + 1) * nb] for h in range(contract.NR_HISTS)],
                          [(d.nr_cpus, d.load_q, d.queued) for d in doms], self._capacity)


class StatsPublisher:
    """Writes the loader's figures into loader_stats and latency_hist: the stats read only maps."""

    def __init__(self, loader_stats: U64Array, latency_hist: U64Array,
                 pipeline: DecisionPipeline) -> None:
        self.map, self.hist_map, self.pipeline = loader_stats, latency_hist, pipeline
        self.model_failed: str | None = None  # set by the model thread when loading fails
        self.restarts = self.reloads = self.reload_failures = self.model_digest = 0
        self._backend: Predictor | None = None
        self._last = 0.0

    def rebind(self, loader_stats: U64Array, latency_hist: U64Array) -> None:
        """A new attach's maps: what was published goes there from now on."""
        self.map, self.hist_map = loader_stats, latency_hist
        if self._backend is not None:
            self.model_ready(self._backend)
        self.publish()

    def model_ready(self, backend: Predictor, digest_hex: str = "") -> None:
        """The loop switched to this model (its sha256 in hex; the first 8 bytes are shown)."""
        self._backend = backend
        self.model_digest = int(digest_hex[:16], 16) if digest_hex else self.model_digest
        self.map.set(LS.BACKEND, int(backend.kind))
        self.map.set(LS.MODEL_READY, 1)

    def maybe_publish(self) -> None:
        if (now := time.monotonic()) - self._last >= PUBLISH_INTERVAL_S:
            self._last = now
            self.publish()

    def publish(self) -> None:
        s, grid = self.pipeline.stats, self.pipeline.table.grid
        figures = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "hist"} | {
            n: getattr(self, n) for n in ("restarts", "reloads", "reload_failures", "model_digest")}
        figures["grid_decided"] = grid.decided() if grid is not None else 0
        for name, value in figures.items():
            self.map.set(LS[name.upper()], value)
        self.hist_map.write_all(s.hist.reshape(-1))


def answer(err: int, resp: Any) -> bytes:
    return json.dumps({"errno": err, "args": {"resp": resp}}).encode() + b"\n"


class _Client(socketserver.StreamRequestHandler):
    server: StatsServer

    def handle(self) -> None:
        timeval = struct.pack("ll", SEND_TIMEOUT_S, 0)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        with self.server.lock:
            got = self.server.sample()
            self.prev = got if isinstance(got, Sample) else None  # the next answer's start
        with suppress(OSError):  # the peer left, or stopped reading: its connection ends
            while line := self.rfile.readline(MAX_LINE + 1):
                if not line.endswith(b"\n"):  # a line of megabytes, or the peer left mid-line
                    if len(line) > MAX_LINE:
                        self.wfile.write(answer(errno.E2BIG, f"request over {MAX_LINE} bytes"))
                    return
                with self.server.lock:
                    reply = self.reply(line)
                self.wfile.write(reply)

    def reply(self, line: bytes) -> bytes:
        try:
            req = json.loads(line)
            name, args = req["req"], dict(req.get("args") or {})
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return answer(errno.EINVAL, f'malformed request, want {{"req": ...}}: {e}')
        if name == "stats_meta":
            return answer(0, meta())
        if name != "stats" or args.get("target", "top") != "top":
            return answer(errno.EINVAL, f"unknown request {name!r:.64} {args!r:.64}")
        if isinstance(cur := self.server.sample(), str):
            return answer(errno.EIO, cur)
        resp, self.prev = compute(self.prev or cur, cur), cur
        return answer(0, resp)


class StatsServer(socketserver.ThreadingUnixStreamServer):
    """Serves `stats` and `stats_meta` on a UNIX socket, a thread for each client."""

    daemon_threads, block_on_close, request_queue_size = True, False, 64

    def __init__(self, path: str, sample: Callable[[], Sample], gid: int | None = None) -> None:
        super().__init__(path, _Client, bind_and_activate=False)
        self.path, self._sample_fn, self._gid = path, sample, gid
        self.lock, self._clients = threading.Lock(), set[socket.socket]()

    def start(self) -> StatsServer:
        """Replace a stale socket (a loader that died left it); bind under a umask that gives
        the final mode, so the socket is never reachable with a looser one."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), 0o755, exist_ok=True)
        with suppress(FileNotFoundError):
            os.unlink(self.path)
        umask = os.umask(0o177 if self._gid is None else 0o117)  # process-wide, for one bind
        try:
            self.server_bind()
        finally:
            os.umask(umask)
        if self._gid is not None:
            os.chown(self.path, 0, self._gid)
        self.server_activate()
        threading.Thread(target=self._serve, name="mlsched-stats", daemon=True).start()
        return self

    def _serve(self) -> None:
        with suppress(OSError):  # not real-time, as the loader may be now; nor its clients
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        self.serve_forever(0.1)  # how soon close() is heard

    def close(self) -> None:
        """Stop, hang up on every client, remove the socket."""
        self.shutdown()
        with self.lock:
            for sock in self._clients:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
        with suppress(OSError):
            os.unlink(self.path)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        cred = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # pid, uid, gid
        if struct.unpack("3i", cred)[1] != 0 and self._gid is None:
            refusal = answer(errno.EACCES, "stats are for root (see mlsched-load --stats-group)")
        elif len(self._clients) >= MAX_CLIENTS:  # only this thread adds: never past the limit
            refusal = answer(errno.EBUSY, f"too many stats clients (at most {MAX_CLIENTS})")
        else:
            with self.lock:
                self._clients.add(request)
            return True
        with suppress(OSError):
            request.send(refusal)
        return False

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def sample(self) -> Sample | str:
        """The maps now, or why they cannot be read."""
        try:
            return self._sample_fn()
        except Exception as e:  # the maps went away mid-restart, say
            return f"cannot read the scheduler's maps: {e}"


def _gid(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group {group!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The stats options of mlsched-load and mlsched-collect."""
    p.add_argument("--stats-socket", default=DEFAULT_PATH, metavar="PATH",
                   help="the scx_stats socket (default: %(default)s)")
    p.add_argument("--stats-group", type=_gid, metavar="GROUP",
                   help="let GROUP read the socket (mode 0660; default: root only, 0600)")
    p.add_argument("--stats", type=interval_s, metavar="SECS",
                   help="print the stats every SECS seconds, a JSON line each")


def serve_stats(args: argparse.Namespace, sample: Callable[[], Sample]) -> StatsServer | None:
    """The server and the --stats printer, until exit; no server when the socket cannot be made
    (the scheduler matters more than its stats)."""
    server = None
    try:
        server = StatsServer(args.stats_socket, sample, args.stats_group).start()
        atexit.register(server.close)
        log.info("stats at %s (scx_stats protocol; mlsched-stats reads it)", args.stats_socket)
    except OSError as e:
        log.error("stats server not started: %s: %s", args.stats_socket, e.strerror or e)
    if args.stats:  # like scx_rusty --stats; the sampler's fds outlive any restart
        threading.Thread(target=_print_every, args=(args.stats, sample), daemon=True).start()
    return server


def _print_every(interval: float, sample: Callable[[], Sample]) -> None:
    cur = sample()
    while True:
        time.sleep(interval)
        prev, cur = cur, sample()
        print(json.dumps(compute(prev, cur)), flush=True)
