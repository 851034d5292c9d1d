"""The stats server (loader/stats.py) on the host: the scx_stats protocol, its door, and
clients that misbehave. The samples are synthetic (the real maps are tests/vm/test_stats.py);
the server, its socket and the clients are the real thing; the client is written from the
protocol's description (tests/scx_stats_client.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader import contract
from loader.stats import FIELD_NAMES, MAX_CLIENTS, MAX_LINE, TOP, Sample, StatsServer
from tests.host.test_stats import sample
from tests.scx_stats_client import Client

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
TIMEOUT_S = 30  # a broken server fails the test instead of hanging it; not a speed bound


class Source:
    """Sample n is taken n seconds after the first and has counted 100 * n candidates."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Sample:
        self.calls += 1
        return sample(float(self.calls), {contract.Counter.CANDIDATES: 100 * self.calls}, {})


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's tmp_path is root's alone), so that refusals
    come from the socket's own mode or from the server, not from the path."""
    d = Path(tempfile.mkdtemp(prefix="mlsched-stats-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path) -> Iterator[StatsServer]:
    srv = StatsServer(str(sock_dir / "stats"), Source()).start()
    yield srv
    srv.close()


def test_stats_meta_and_stats(server: StatsServer) -> None:
    c = Client(server.path)
    meta = c.request("stats_meta")
    assert meta["errno"] == 0 and list(meta["args"]) == ["resp"]
    structs = meta["args"]["resp"]
    top = [name for name, s in structs.items() if s.get("top") == "true"]
    assert top == [TOP]
    assert set(structs[TOP]["fields"]) == {*FIELD_NAMES, "domains"}

    first = c.request("stats")
    assert first["errno"] == 0
    resp = first["args"]["resp"]
    assert resp["ops"] == "mlsched" and resp["domains"]["1"]["load"] == 0.25
    # since the sample taken at connect: one second, 100 candidates
    assert resp["interval_s"] == 1.0 and resp["candidates_per_s"] == 100.0
    second = c.send(b'{"req": "stats", "args": {"target": "top"}}')["args"]["resp"]
    assert second["interval_s"] == 1.0 and second["candidates_per_s"] == 100.0
    assert second["candidates_total"] == resp["candidates_total"] + 100
    c.close()


def test_the_socket_is_root_only(server: StatsServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (0, 0)


def as_nobody(path: str, groups: str = "--clear-groups") -> subprocess.CompletedProcess[str]:
    """A client run as nobody; prints the errno name of a failed connect, or the answer."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({path!r})\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno]); sys.exit(0)\n"
        "try:\n"
        "    s.sendall(b'{\"req\": \"stats\"}\\n')\n"
        "except BrokenPipeError:\n"
        "    pass\n"
        "print(s.makefile('rb').readline().decode().strip())\n"
    )
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", groups, sys.executable, "-c",
         code], capture_output=True, text=True, timeout=TIMEOUT_S)


def test_a_non_root_client_is_refused(server: StatsServer) -> None:
    res = as_nobody(server.path)
    assert res.returncode == 0 and res.stdout.strip() == "EACCES", res.stderr
    res = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          sys.executable, "-m", "tools.stats", "--socket", server.path, "--once"],
                         cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 1 and res.stderr == (
        f"mlsched-stats: cannot connect to {server.path}: permission denied (run as root, or as "
        "a member of the loader's --stats-group)\n")
    # Even through a socket someone opened up: the server checks the peer itself.
    os.chmod(server.path, 0o666)
    res = as_nobody(server.path)
    answer = json.loads(res.stdout)
    assert answer["errno"] == errno.EACCES and "root" in answer["args"]["resp"]


def test_a_group_opens_it(sock_dir: Path) -> None:
    srv = StatsServer(str(sock_dir / "stats"), Source(), gid=NOBODY).start()
    try:
        st = os.stat(srv.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
        answer = json.loads(as_nobody(srv.path).stdout)
        assert answer["errno"] == 0 and "candidates_total" in answer["args"]["resp"]
    finally:
        srv.close()


def test_bad_requests_get_errors_and_the_connection_goes_on(server: StatsServer) -> None:
    c = Client(server.path)
    for line, err in [
        (b"{not json", errno.EINVAL),
        (b"[1, 2]", errno.EINVAL),
        (b'{"req": 7}', errno.EINVAL),
        (b'{"req": "stats", "args": [1]}', errno.EINVAL),
        (b'{"req": "shutdown"}', errno.EINVAL),
        (b'{"req": "stats", "args": {"target": "nope"}}', errno.EINVAL),
        (b"\xff\xfe binary", errno.EINVAL),
    ]:
        answer = c.send(line)
        assert answer["errno"] == err and isinstance(answer["args"]["resp"], str), line
    assert c.request("stats")["errno"] == 0
    c.close()


def test_a_huge_line_is_refused_and_the_client_dropped(server: StatsServer) -> None:
    c = Client(server.path)
    try:
        c.sock.sendall(b"x" * (4 * MAX_LINE))  # no newline: a line of megabytes, growing
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped while still sending
    answer = c.read()
    assert answer["errno"] == errno.E2BIG
    assert c.closed_by_server()
    assert Client(server.path).request("stats")["errno"] == 0


def test_a_client_that_never_reads_is_dropped(server: StatsServer) -> None:
    c = Client(server.path)
    burst = b'{"req": "stats"}\n' * 4096
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(1000):  # 70 MB: far more than the server keeps for one client
            c.sock.sendall(burst)
    c.sock.close()
    assert Client(server.path).request("stats")["errno"] == 0


def test_fifty_clients_at_once(server: StatsServer) -> None:
    clients = [Client(server.path) for _ in range(50)]
    answers = [c.request("stats") for c in clients]
    served = [a for a in answers if a["errno"] == 0]
    busy = [a for a in answers if a["errno"] == errno.EBUSY]
    assert len(served) == MAX_CLIENTS and len(busy) == 50 - MAX_CLIENTS
    for c in clients[:MAX_CLIENTS]:  # the ones served go on being served
        assert c.request("stats")["errno"] == 0
    for c in clients:
        c.close()
    # once they left (their threads see the hang-up), there is room again
    deadline = time.monotonic() + TIMEOUT_S
    while (answer := Client(server.path).request("stats"))["errno"] == errno.EBUSY:
        assert time.monotonic() < deadline, "the slots of the clients that left are not freed"
        time.sleep(0.01)
    assert answer["errno"] == 0


def test_silent_clients_do_not_hold_the_others(server: StatsServer) -> None:
    """Clients that connect and never send, or half a line: the next one is answered."""
    silent = [Client(server.path) for _ in range(3)]
    silent[0].sock.sendall(b'{"req": "sta')
    assert Client(server.path).request("stats_meta")["errno"] == 0
    for c in silent:
        c.close()


def test_a_stale_socket_is_replaced_and_close_removes_it(sock_dir: Path) -> None:
    path = sock_dir / "stats"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody serves: a loader that died
    srv = StatsServer(str(path), Source()).start()
    assert Client(str(path)).request("stats")["errno"] == 0
    srv.close()
    assert not path.exists()
    assert os.listdir(sock_dir) == []  # the private bind directory is gone too


def test_the_sample_failing_is_an_error_not_a_crash(sock_dir: Path) -> None:
    def broken() -> Sample:
        raise OSError(errno.EBADF, "Bad file descriptor")

    srv = StatsServer(str(sock_dir / "stats"), broken).start()
    try:
        c = Client(srv.path)
        answer = c.request("stats")
        assert answer["errno"] == errno.EIO and "maps" in answer["args"]["resp"]
        assert c.request("stats_meta")["errno"] == 0
    finally:
        srv.close()


def test_mlsched_stats_reads_the_server(server: StatsServer) -> None:
    """The friendly client against the real server: text, JSON and OpenMetrics."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tools.stats", "--socket", server.path,
                               "--interval", "0.2", "--once", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=TIMEOUT_S)

    text, js, om = run(), run("--json"), run("--openmetrics")
    for res in (text, js, om):
        assert res.returncode == 0, res.stderr
    assert "decide     cand" in text.stdout and "dom1" in text.stdout
    assert json.loads(js.stdout)["ops"] == "mlsched"
    families = {f.name: f for f in text_string_to_metric_families(om.stdout)}
    assert families["mlsched_candidates"].type == "counter"
    assert families["mlsched"].samples[0].labels["ops"] == "mlsched"


def test_mlsched_stats_refuses_another_schedulers_socket(sock_dir: Path) -> None:
    """A socket that speaks scx_stats for someone else (scx_rusty, say) is named as such."""
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(sock_dir / "stats"))
    other.listen(1)

    def answer_once() -> None:
        conn, _ = other.accept()
        conn.makefile("rb").readline()
        conn.sendall(b'{"errno": 0, "args": {"resp": {"ClusterStats": {}}}}\n')
        conn.close()

    import threading

    t = threading.Thread(target=answer_once)
    t.start()
    res = subprocess.run([sys.executable, "-m", "tools.stats", "--socket",
                          str(sock_dir / "stats"), "--once"], cwd=REPO, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    t.join(TIMEOUT_S)
    other.close()
    assert res.returncode == 1
    assert res.stderr.startswith(f"mlsched-stats: {sock_dir / 'stats'} serves another "
                                 "scheduler's stats (structs ClusterStats)")


def test_mlsched_stats_says_when_the_loader_goes(sock_dir: Path) -> None:
    srv = StatsServer(str(sock_dir / "stats"), Source()).start()
    watcher = subprocess.Popen([sys.executable, "-m", "tools.stats", "--socket", srv.path,
                                "--interval", "0.1", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(watcher.stdout.readline())["ops"] == "mlsched"  # type: ignore[union-attr]
        srv.close()
        assert watcher.wait(timeout=TIMEOUT_S) == 1
    finally:
        if watcher.poll() is None:
            watcher.kill()
    err = watcher.stderr.read()  # type: ignore[union-attr]
    assert err == (f"mlsched-stats: mlsched is not attached: the loader closed {srv.path}; "
                   "this kernel has no sched_ext\n")
