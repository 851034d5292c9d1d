"""The loader's stats in scx_stats' protocol, on a UNIX socket, off the decision loop's thread.

The protocol is the one sched-ext/scx's schedulers speak (rust/scx_stats), so scx's generic
clients read mlsched too: one JSON object per line each way. Requests are
{"req": "stats", "args": {"target": "top"}} (target may be left out) and {"req": "stats_meta"};
the answer is {"errno": 0, "args": {"resp": ...}}, or a non-zero errno with a message as resp.
As in scx_rusty, each connection measures its own intervals: a `stats` answer covers the time
since that connection's previous `stats` request, or since it connected.

The socket is a door into a root process, so it is bounded and shut by default:
- mode 0600, owned by root, and a peer that is not root is refused (SO_PEERCRED) unless
  --stats-group names a group: then mode 0660 with that group, and the file mode decides;
- one thread, one selectors loop; at most MAX_CLIENTS connections (the next get an EBUSY
  answer and are closed), requests up to MAX_LINE bytes (a longer line: an error, then the
  connection is closed); a client's next request is answered only once its last answer left,
  and a client with MAX_PENDING bytes of requests unanswered (it sends but never reads) is
  closed;
- the maps are sampled at most every SAMPLE_REUSE_S whatever the number of clients.
A failing client costs its own connection, never the scheduler or the other clients.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import grp
import json
import logging
import os
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from loader.cli import interval_s
from loader.stats import Sample, compute, meta, render_text

log = logging.getLogger("mlsched.stats")

DEFAULT_PATH = "/var/run/scx/root/stats"
MAX_CLIENTS = 16
MAX_LINE = 64 << 10
MAX_PENDING = 1 << 20
SAMPLE_REUSE_S = 0.05
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class StatsError(Exception):
    """A stats request failed, or the server is not there; str() is one line."""


class StatsDenied(StatsError):
    """The server is there, but this user may not connect."""


def answer(err: int, resp: Any) -> bytes:
    """One answer line: {"errno": err, "args": {"resp": resp}}."""
    return json.dumps({"errno": err, "args": {"resp": resp}}).encode() + b"\n"


class _Client:
    def __init__(self, sock: socket.socket, prev: Sample | None) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.prev = prev  # the sample the next `stats` answer starts from
        self.closing = False  # close once outbuf is sent
        self.events = selectors.EVENT_READ


class StatsServer:
    """Serves `stats` and `stats_meta` on a UNIX socket from a thread of its own."""

    def __init__(self, path: str, sample: Callable[[], Sample], group: str | None = None) -> None:
        self.path = path
        self._sample_fn = sample
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._sel = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._cached: tuple[float, Sample] | None = None
        self._stop = False
        self._listener: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._wake_r = self._wake_w = -1
        self._thread = threading.Thread(target=self._run, name="mlsched-stats", daemon=True)

    # --- life ---------------------------------------------------------------------------

    def start(self) -> StatsServer:
        """Bind in a private directory, set the mode, then rename into place: the socket is
        never reachable with a looser mode, and a stale one is replaced in one step."""
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".mlsched-", dir=parent)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bound = os.path.join(tmp, "s")
            sock.bind(bound)
            if self._gid is not None:
                os.chown(bound, 0, self._gid)
            os.chmod(bound, 0o600 if self._gid is None else 0o660)
            sock.listen(64)
            os.replace(bound, self.path)
            st = os.stat(self.path)
        except BaseException:
            sock.close()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._ident = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        self._listener = sock
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, close every connection, remove the socket if it is still ours."""
        if self._listener is None:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for c in list(self._clients.values()):
            self._drop(c)
        self._listener.close()
        self._listener = None
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        try:  # a thread made while the loader runs real-time would inherit it: never serve so
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
        while not self._stop:
            for key, events in self._sel.select():
                if self._stop:
                    break
                if key.fileobj is self._listener:
                    self._accept()
                    continue
                if key.fileobj == self._wake_r:
                    os.read(self._wake_r, 64)
                    continue
                c = self._clients.get(key.fd)
                if c is None:
                    continue
                try:
                    self._service(c, bool(events & selectors.EVENT_READ))
                except OSError as e:  # the peer went away, or worse: only it suffers
                    log.debug("stats client dropped: %s", e)
                    self._drop(c)
                except Exception as e:  # a bug must not end the server for the others
                    log.error("stats client dropped: %s: %s", type(e).__name__, e)
                    self._drop(c)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and the like: try again on the next wakeup
            log.warning("stats: accept failed: %s", e)
            time.sleep(0.1)
            return
        sock.setblocking(False)
        try:
            _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        except OSError:
            uid = -1
        refusal = None
        if uid != 0 and self._gid is None:
            refusal = (errno.EACCES, "stats are for root (see mlsched-load --stats-group)")
        elif len(self._clients) >= MAX_CLIENTS:
            refusal = (errno.EBUSY, f"too many stats clients (at most {MAX_CLIENTS})")
        if refusal is not None:
            try:
                sock.send(answer(*refusal))
            except OSError:
                pass
            sock.close()
            return
        c = _Client(sock, self._take_sample(quiet=True))
        self._clients[sock.fileno()] = c
        self._sel.register(sock, c.events)

    def _service(self, c: _Client, readable: bool) -> None:
        """Read what came, answer the complete lines one at a time, each only once the last
        answer left: a client that does not read gets no further answers, and once MAX_PENDING
        bytes of its requests wait unanswered it is dropped."""
        if readable:
            data = c.sock.recv(MAX_LINE)
            if not data:
                self._drop(c)
                return
            c.inbuf += data
        while True:
            if c.outbuf:
                try:
                    del c.outbuf[:c.sock.send(c.outbuf)]
                except BlockingIOError:
                    pass
                if c.outbuf:
                    break
            if c.closing:
                self._drop(c)
                return
            end = c.inbuf.find(b"\n")
            if end < 0:
                if len(c.inbuf) > MAX_LINE:  # a line of megabytes: say so, then hang up
                    c.outbuf += answer(errno.E2BIG, f"request longer than {MAX_LINE} bytes")
                    c.closing = True
                    continue
                break
            line = bytes(c.inbuf[:end])
            del c.inbuf[:end + 1]
            c.outbuf += self._handle(c, line)
        if len(c.inbuf) > MAX_PENDING:  # sends and sends, never reads: let it go
            log.info("stats client dropped: %d bytes of requests unanswered", len(c.inbuf))
            self._drop(c)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.outbuf else 0)
        if events != c.events:
            c.events = events
            self._sel.modify(c.sock, events)

    def _drop(self, c: _Client) -> None:
        if self._clients.pop(c.sock.fileno(), None) is not None:
            self._sel.unregister(c.sock)
        c.sock.close()

    # --- requests -----------------------------------------------------------------------

    def _take_sample(self, quiet: bool = False) -> Sample | None:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= SAMPLE_REUSE_S:
            try:
                self._cached = (now, self._sample_fn())
            except Exception as e:  # the maps went away mid-restart, say
                if not quiet:
                    raise StatsError(f"cannot read the scheduler's maps: {e}") from e
                return None
        return self._cached[1]

    def _handle(self, c: _Client, line: bytes) -> bytes:
        try:
            req = json.loads(line)
        except ValueError as e:
            return answer(errno.EINVAL, f"malformed request (not JSON: {e})")
        if not isinstance(req, dict) or not isinstance(req.get("req"), str):
            return answer(errno.EINVAL, 'malformed request (want {"req": ..., "args": {...}})')
        args = req.get("args") or {}
        if not isinstance(args, dict):
            return answer(errno.EINVAL, "malformed request (args is not an object)")
        if req["req"] == "stats_meta":
            return answer(0, meta())
        if req["req"] != "stats":
            return answer(errno.EINVAL, f"unknown request {req['req'][:64]!r}")
        target = args.get("target", "top")
        if target != "top":
            return answer(errno.EINVAL, f"unknown stat target {str(target)[:64]!r}")
        try:
            cur = self._take_sample()
        except StatsError as e:
            return answer(errno.EIO, str(e))
        assert cur is not None
        resp = compute(c.prev or cur, cur)
        c.prev = cur
        return answer(0, resp)


# --- the client ---------------------------------------------------------------------------


class StatsClient:
    """One connection to a stats server; request() returns the answer's resp."""

    def __init__(self, path: str = DEFAULT_PATH, timeout_s: float = 30.0) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise StatsError(f"no stats socket at {path}") from None
        except ConnectionRefusedError:
            sock.close()
            raise StatsError(f"nothing serves {path}: a loader that died left it") from None
        except PermissionError:
            sock.close()
            raise StatsDenied(f"cannot connect to {path}: permission denied (run as root, or "
                              "as a member of the loader's --stats-group)") from None
        except OSError as e:
            sock.close()
            raise StatsError(f"cannot connect to {path}: {e.strerror or e}") from None
        self.sock = sock
        self._file = sock.makefile("rb")

    def request(self, req: str, args: dict[str, str] | None = None) -> Any:
        line = json.dumps({"req": req, "args": args or {}}).encode() + b"\n"
        try:
            self.sock.sendall(line)
            reply = self._file.readline(MAX_PENDING)
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


# --- in the loader ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The loaders' stats options (mlsched-load, mlsched-collect)."""
    p.add_argument("--stats-socket", default=DEFAULT_PATH, metavar="PATH",
                   help="UNIX socket serving the stats in scx_stats' protocol "
                   "(default: %(default)s)")
    p.add_argument("--stats-group", default=None, metavar="GROUP",
                   help="let members of GROUP read the stats socket (mode 0660); default: root "
                   "only (mode 0600)")
    p.add_argument("--stats", type=interval_s, default=None, metavar="SECS",
                   help="print the stats block to stdout every SECS seconds (a client of the "
                   "socket, like scx_rusty --stats)")


def serve_stats(args: argparse.Namespace, sample: Callable[[], Sample]) -> StatsServer | None:
    """Start the server (and the --stats printer), both stopped at exit; None when the socket
    cannot be made: the scheduler matters more than its stats."""
    try:
        server = StatsServer(args.stats_socket, sample, args.stats_group).start()
    except OSError as e:
        log.error("stats server not started: %s: %s", args.stats_socket, e.strerror or e)
        return None
    log.info("stats at %s (scx_stats protocol; mlsched-stats reads it)", args.stats_socket)
    stopping = threading.Event()
    if args.stats:
        threading.Thread(target=_monitor, args=(args.stats_socket, args.stats, stopping),
                         daemon=True, name="mlsched-stats-print").start()
    atexit.register(lambda: (stopping.set(), server.close()))
    return server


def _monitor(path: str, interval: float, stopping: threading.Event) -> None:
    """mlsched-load --stats: a client of the loader's own socket, printing every interval."""
    try:
        client = StatsClient(path)
        while not stopping.wait(interval):
            print(render_text(client.request("stats")) + "\n", file=sys.stdout, flush=True)
    except StatsError as e:
        if not stopping.is_set():
            log.warning("--stats: %s", e)
