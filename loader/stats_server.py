"""The stats in scx_stats' protocol (sched-ext/scx rust/scx_stats) on a UNIX socket, off the
decision loop's thread: a JSON object a line each way, {"req": "stats", "args": {"target": "top"}}
or {"req": "stats_meta"} in, {"errno": 0, "args": {"resp": ...}} (or an errno and a message) out.
A `stats` answer covers the time since that connection's previous one, or since its connect.

A door into a root process: mode 0600 and root peers only (SO_PEERCRED) unless --stats-group
(0660); a thread a client, at most MAX_CLIENTS (the next get EBUSY); a line over MAX_LINE gets
E2BIG and a hang-up, as does a client that leaves its answers unread for SEND_TIMEOUT_S; the maps
are read at most once every SAMPLE_REUSE_S, whatever the number of clients."""

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
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from loader.cli import interval_s
from loader.stats import Sample, compute, meta

log = logging.getLogger("mlsched.stats")
DEFAULT_PATH = "/var/run/scx/root/stats"
MAX_CLIENTS, MAX_LINE, SEND_TIMEOUT_S, SAMPLE_REUSE_S = 16, 64 << 10, 2, 0.05


def answer(err: int, resp: Any) -> bytes:
    return json.dumps({"errno": err, "args": {"resp": resp}}).encode() + b"\n"


class _Client(socketserver.StreamRequestHandler):
    server: StatsServer

    def handle(self) -> None:
        timeval = struct.pack("ll", SEND_TIMEOUT_S, 0)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        got = self.server.sample()
        self.prev = got if isinstance(got, Sample) else None  # where the next answer starts
        with suppress(OSError):  # the peer left, or stopped reading: its connection ends
            while line := self.rfile.readline(MAX_LINE + 1):
                if not line.endswith(b"\n"):  # a line of megabytes, or the peer left mid-line
                    if len(line) > MAX_LINE:
                        self.wfile.write(answer(errno.E2BIG, f"request over {MAX_LINE} bytes"))
                    return
                self.wfile.write(self.reply(line))

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
        self._lock, self._clients = threading.Lock(), set[socket.socket]()
        self._cached: tuple[float, Sample] | None = None

    def start(self) -> StatsServer:
        """Replace a stale socket (a loader that died left it); bind under a umask that gives
        the final mode, so the socket is never reachable with a looser one."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), 0o755, exist_ok=True)
        with suppress(FileNotFoundError):
            os.unlink(self.path)
        umask = os.umask(0o177 if self._gid is None else 0o117)  # process-wide, for one bind
        try:
            self.server_bind()
            if self._gid is not None:
                os.chown(self.path, 0, self._gid)
            self.server_activate()
        except BaseException:
            self.server_close()
            raise
        finally:
            os.umask(umask)
        threading.Thread(target=self._serve, name="mlsched-stats", daemon=True).start()
        return self

    def _serve(self) -> None:
        with suppress(OSError):  # not real-time, as the loader may be now; nor its clients
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        self.serve_forever()

    def close(self) -> None:
        """Stop, hang up on every client, remove the socket."""
        self.shutdown()
        with self._lock:
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
            with self._lock:
                self._clients.add(request)
            return True
        with suppress(OSError):
            request.send(refusal)
        return False

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def sample(self) -> Sample | str:
        """The maps now (one reading serves all for SAMPLE_REUSE_S), or why they cannot be read."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= SAMPLE_REUSE_S:
                try:
                    self._cached = (now, self._sample_fn())
                except Exception as e:  # the maps went away mid-restart, say
                    return f"cannot read the scheduler's maps: {e}"
            return self._cached[1]


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
    server, stopping = None, threading.Event()
    try:
        server = StatsServer(args.stats_socket, sample, args.stats_group).start()
        atexit.register(server.close)
        log.info("stats at %s (scx_stats protocol; mlsched-stats reads it)", args.stats_socket)
    except OSError as e:
        log.error("stats server not started: %s: %s", args.stats_socket, e.strerror or e)
    if args.stats:
        atexit.register(stopping.set)
        threading.Thread(target=_print_every, args=(args.stats, sample, stopping), daemon=True,
                         name="mlsched-stats-print").start()
    return server


def _print_every(interval: float, sample: Callable[[], Sample], stopping: threading.Event) -> None:
    try:
        prev = sample()
        while not stopping.wait(interval):
            cur = sample()
            print(json.dumps(compute(prev, cur)), flush=True)
            prev = cur
    except Exception as e:  # the maps went away: the scheduler goes on without the printout
        log.warning("--stats: %s", e)
