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
import os
import socket
import socketserver
import struct
import tempfile
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from contextlib import suppress
from itertools import accumulate
from typing import Any

from loader import contract, schema
from loader.cli import interval_s

C, LS = contract.Counter, contract.LoaderStat
TOP, DOM = "mlsched_stats", "dom_stats"  # the scx_stats structs
DEFAULT_PATH = "/var/run/scx/root/stats"
MAX_CLIENTS, MAX_LINE, SEND_TIMEOUT_S, PUBLISH_INTERVAL_S = 16, 64 << 10, 2, 0.2
log = logging.getLogger("mlsched.stats")
# name: the JSON key, "mlsched_" + name in OpenMetrics; kind: "meta" (JSON only), "label", "gauge"
# or "counter" (name ends in _total); datum: the scx_stats type (u64, float or string)
Field = namedtuple("Field", "name unit kind help datum")

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
_ROWS = [row.split(None, 4) for row in _TABLE.strip().splitlines()]
# The events: (name, "counters" or "loader", its index there: a Counter or a LoaderStat).
COUNTED = tuple((n, "counters", C[n.upper()]) if n.upper() in C.__members__
                else (n, "loader", LS[n.upper()]) for n, _, kind, *_ in _ROWS if kind == "event")


def _fields(struct: str) -> tuple[Field, ...]:
    """The fields of one struct ("": the top one, or "domains"), an event as its two."""
    out: list[Field] = []
    for path, unit, kind, datum, desc in (r for r in _ROWS if r[0].rpartition(".")[0] == struct):
        name, unit = path.rpartition(".")[2], unit.strip("-")  # "-": no unit
        out += ([Field(f"{name}_total", unit, "counter", f"{desc}, since attach", datum),
                 Field(f"{name}_per_s", "1/s", "gauge", f"{desc}, per second", "float")]
                if kind == "event" else [Field(name, unit, kind, desc, datum)])
    return tuple(out)


FIELDS, DOM_FIELDS = _fields(""), _fields("domains")
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


# The maps at one moment, counts since attach: mono_ns (CLOCK_MONOTONIC, like START_NS), wall_s,
# state, ops, model; counters and loader (by Counter, LoaderStat); config (the scheduler's int
# settings: nr_cpus, nr_doms, fallback_policy...); hist [Hist][HIST_BUCKETS]; doms: (nr_cpus,
# load_q, queued) by domain; table_capacity.
Sample = namedtuple("Sample", "mono_ns wall_s state ops model counters loader config hist doms "
                    "table_capacity", defaults=((), 0))


def percentile_us(counts: list[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a log2 histogram: its bucket's upper bound, in µs."""
    need = max(1, q * sum(counts))  # seen >= need is seen >= ceil(need): seen counts
    return next((2.0 ** (b + 1) / 1000 for b, seen in enumerate(accumulate(counts))
                 if seen >= need), None)


def compute(prev: Sample, cur: Sample) -> dict[str, Any]:
    """One interval's figures by FIELDS name, plus "domains": {"<dom>": {DOM_FIELDS}}."""
    dt, ls, start = max(cur.mono_ns - prev.mono_ns, 1) / 1e9, cur.loader, cur.loader[LS.START_NS]

    def d(k: C | LS) -> int:  # over the interval; a restart resets the counts: never below 0
        src = "counters" if isinstance(k, C) else "loader"
        return max(getattr(cur, src)[k] - getattr(prev, src)[k], 0)

    def ratio(num: float, den: float, digits: int) -> float | None:
        return round(num / den, digits) if den > 0 else None

    # Figures named as a LoaderStat, a setting or a field of the sample go as they are; then
    # the others, the events and the percentiles.
    out = {n: ls[LS[n.upper()]] for n in FIELD_NAMES if n.upper() in LS.__members__}
    out |= cur.config | cur._asdict() | {
        "time": round(cur.wall_s, 3), "interval_s": round(dt, 3),
        "backend": contract.Backend(ls[LS.BACKEND]).name.lower(),
        "fallback": contract.Fallback(cur.config["fallback_policy"]).name.lower(),
        "uptime_s": round(max(cur.mono_ns - start, 0) / 1e9, 1) if start else None,
        "hit_rate": ratio(d(C.HITS), d(C.CANDIDATES), 4),
        "decided_share": ratio(min(d(C.RAN_CROSS_DECIDED), d(C.RAN_CROSS)), d(C.RAN_CROSS), 4),
        "kinfer_avg_ns": ratio(d(C.KINFER_NS), d(C.KINFER), 0),
        "model_digest": f"{ls[LS.MODEL_DIGEST]:016x}",
        "table_occupancy": ratio(ls[LS.TABLE_ENTRIES], cur.table_capacity, 4),
        "batch_size_avg": ratio(d(LS.DECISIONS), d(LS.BATCHES), 2),
        "batch_latency_avg_us": ratio(d(LS.BATCH_NS_SUM) / 1000, d(LS.BATCHES), 3),
        "batch_latency_max_us": round(ls[LS.BATCH_NS_MAX] / 1000, 3) if ls[LS.BATCHES] else None,
        "event_latency_avg_us": ratio(d(LS.EV_LAT_NS_SUM) / 1000, d(LS.DECISIONS), 3)}
    for n, src, i in COUNTED:
        out[f"{n}_total"], out[f"{n}_per_s"] = getattr(cur, src)[i], round(d(i) / dt, 2)
    for h in contract.Hist:
        delta = [max(b - a, 0) for a, b in zip(prev.hist[h], cur.hist[h], strict=True)]
        for q in (50, 99):
            out[f"{h.name.lower()}_latency_p{q}_us"] = percentile_us(delta, q / 100)
    return {n: out[n] for n in FIELD_NAMES if out.get(n) is not None} | {"domains": {
        str(i): {"nr_cpus": nr, "load": round(q / schema.LOAD_SCALE, 4), "queued": queued}
        for i, (nr, q, queued) in enumerate(cur.doms)}}


class MapSampler:
    """Samples a scheduler's maps through dups of its fds: the server's thread never reads an fd
    the loader closed (and something reused) around a hotplug restart."""

    def __init__(self, sched: Any, model: str) -> None:
        self.model, self._lock, self._maps = model, threading.Lock(), ()
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
        with self._lock:  # a sample under way ends before the old fds are closed
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
    """Writes the loader's figures into loader_stats and latency_hist: the stats read only maps.
    The loop counts restarts, reloads and reload_failures; the model thread sets model_failed."""

    def __init__(self, loader_stats: Any, latency_hist: Any, pipeline: Any) -> None:
        self.pipeline, self.model_failed, self._backend = pipeline, None, None
        self.restarts = self.reloads = self.reload_failures = self.model_digest = self._last = 0
        self.rebind(loader_stats, latency_hist)

    def rebind(self, loader_stats: Any, latency_hist: Any) -> None:
        """A new attach's maps (U64Array): what was published goes there from now on."""
        self.map, self.hist_map = loader_stats, latency_hist
        self.publish()

    def model_ready(self, backend: Any, digest_hex: str = "") -> None:
        """The loop switched to this model (its sha256 in hex; the first 8 bytes are shown)."""
        self._backend = backend
        self.model_digest = int(digest_hex[:16], 16) if digest_hex else self.model_digest
        self.publish()

    def maybe_publish(self) -> None:
        if (now := time.monotonic()) - self._last >= PUBLISH_INTERVAL_S:
            self._last = now
            self.publish()

    def publish(self) -> None:
        """Every LoaderStat named by a figure here or in the pipeline's stats (the scheduler
        writes its own, start_ns say, once), and the latency histograms."""
        b, grid, stats = self._backend, self.pipeline.table.grid, self.pipeline.stats
        figures = vars(stats) | vars(self) | {
            "model_ready": int(b is not None), "backend": int(b.kind) if b is not None else 0,
            "grid_decided": grid.decided() if grid is not None else 0}
        ours = [k for k in LS if k.name.lower() in figures]
        self.map.write_at(ours, (figures[k.name.lower()] for k in ours))
        self.hist_map.write_all(stats.hist.reshape(-1))


def answer(err: int, resp: Any) -> bytes:
    return json.dumps({"errno": err, "args": {"resp": resp}}).encode() + b"\n"


class _Client(socketserver.StreamRequestHandler):
    server: StatsServer

    def handle(self) -> None:
        """A JSON line each way until the peer leaves, sends a line over MAX_LINE or reads no
        answer for SEND_TIMEOUT_S; each `stats` since the one before, the first since connect."""
        timeval = struct.pack("ll", SEND_TIMEOUT_S, 0)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        prev = None
        with self.server.lock, suppress(Exception):
            prev = self.server.sample()
        with suppress(OSError):
            while (line := self.rfile.readline(MAX_LINE + 1)).endswith(b"\n"):
                with self.server.lock:
                    reply, prev = self.server.reply(line, prev)
                self.wfile.write(reply)
            if len(line) > MAX_LINE:  # not a peer that left mid-line: a line of megabytes
                self.wfile.write(answer(errno.E2BIG, f"request over {MAX_LINE} bytes"))


class StatsServer(socketserver.ThreadingUnixStreamServer):
    """Serves `stats` and `stats_meta` on a UNIX socket, a thread for each client."""

    daemon_threads, block_on_close, request_queue_size = True, False, 64

    def __init__(self, path: str, sample: Callable[[], Sample], gid: int | None = None) -> None:
        super().__init__(path, _Client, bind_and_activate=False)
        self.path, self.sample, self._gid = path, sample, gid
        self.lock, self._clients = threading.Lock(), set[socket.socket]()

    def start(self) -> StatsServer:
        """Bind in a private (0700) directory, give the socket its mode there, then rename it
        over the path (a stale socket a dead loader left too): never reachable looser."""
        os.makedirs(parent := os.path.dirname(os.path.abspath(self.path)), 0o755, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent) as private:
            bound = os.path.join(private, "stats")
            self.socket.bind(bound)
            os.chown(bound, -1, -1 if self._gid is None else self._gid)
            os.chmod(bound, 0o600 if self._gid is None else 0o660)
            self.server_activate()
            os.rename(bound, self.path)
        threading.Thread(target=self._serve, name="mlsched-stats", daemon=True).start()
        return self

    def _serve(self) -> None:
        with suppress(OSError):  # not real-time, as the loader may be now; nor its clients
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        self.serve_forever(0.1)  # how soon close() is heard

    def close(self) -> None:
        """Stop, hang up on every client, remove the socket."""
        self.shutdown()
        with self.lock:  # a connected UNIX socket's shutdown does not fail
            for sock in self._clients:
                sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
        with suppress(OSError):
            os.unlink(self.path)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        cred = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # pid, uid, gid
        stranger = struct.unpack("3i", cred)[1] != 0 and self._gid is None
        with self.lock:
            if not stranger and len(self._clients) < MAX_CLIENTS:
                self._clients.add(request)
                return True
        with suppress(OSError):  # the peer may have left
            request.send(answer(*(
                (errno.EACCES, "stats are for root (see mlsched-load --stats-group)") if stranger
                else (errno.EBUSY, f"too many stats clients (at most {MAX_CLIENTS})"))))
        return False

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def reply(self, line: bytes, prev: Sample | None) -> tuple[bytes, Sample | None]:
        """The answer to a request, and the sample the connection's next interval starts at."""
        try:
            req = json.loads(line)
            name, args = req["req"], dict(req.get("args") or {})
        except (ValueError, TypeError, KeyError) as e:
            return answer(errno.EINVAL, f'malformed request, want {{"req": ...}}: {e}'), prev
        if name == "stats_meta":
            return answer(0, meta()), prev
        if name != "stats" or args.get("target", "top") != "top":
            return answer(errno.EINVAL, f"unknown request {name!r:.64} {args!r:.64}"), prev
        try:
            cur = self.sample()
        except Exception as e:  # the maps went away mid-restart, say
            return answer(errno.EIO, f"cannot read the scheduler's maps: {e}"), prev
        return answer(0, compute(prev or cur, cur)), cur


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


def serve_stats(args: argparse.Namespace, sample: Callable[[], Sample]) -> Printer | None:
    """The server and the --stats printer (returned, to be stopped before the detach), until
    exit; no server when the socket cannot be made (the scheduler matters more than its stats)."""
    try:
        atexit.register(StatsServer(args.stats_socket, sample, args.stats_group).start().close)
        log.info("stats at %s (scx_stats protocol; mlsched-stats reads it)", args.stats_socket)
    except OSError as e:
        log.error("stats server not started: %s: %s", args.stats_socket, e.strerror or e)
    if not args.stats:
        return None
    printer = Printer(args.stats, sample)  # like scx_rusty --stats; the sampler's fds outlive
    printer.start()  # any restart
    return printer


class Printer(threading.Thread):
    """--stats: a JSON line of compute() every interval, until stop()."""

    def __init__(self, interval: float, sample: Callable[[], Sample]) -> None:
        super().__init__(name="mlsched-stats-print", daemon=True)
        self.interval, self.sample = interval, sample
        self._lock, self._stopped = threading.Lock(), False

    def run(self) -> None:
        cur = self.sample()
        while True:
            time.sleep(self.interval)
            with self._lock:  # stop() waits for a line under way: none comes after it
                if self._stopped:
                    return
                prev, cur = cur, self.sample()
                print(json.dumps(compute(prev, cur)), flush=True)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
