"""The loader's stats socket on a real sched_ext kernel: scx_stats' protocol from a client
written from its description, mlsched-stats (text, JSON, OpenMetrics) under stress-ng, bad
clients that leave the scheduler attached and deciding, a non-root client refused, and the
one-line answers when nothing (or a departed loader) is there."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from loader import contract
from loader.scheduler import scx_state
from loader.stats import DEFAULT_PATH, MAX_CLIENTS, MAX_LINE
from tests.scx_stats_client import Client
from tests.vm.conftest import (
    ATTACH_WAIT_S,
    LOG_DIR,
    MODEL,
    ROOT,
    Loader,
    attached,
    running_loader,
    start_loader,
    stress,
    wait_for,
)

STRESS_S = 120  # an upper bound: the load is stopped once the samples are taken
TIMEOUT_S = 120  # a broken run fails instead of hanging; not a performance bound


def stats(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tools.stats", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def save(name: str, text: str) -> None:
    """Keep real output for the record (build/vm-out survives the VM)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / name).write_text(text)
    print(f"--- {name} ---\n{text}")


@pytest.fixture
def loader_with_stats() -> Iterator[Loader]:
    with running_loader("--stats", "2", name="loader-stats") as ld:
        yield ld


def test_protocol_and_live_rates_under_stress(loader_with_stats: Loader) -> None:
    ld = loader_with_stats
    ld.wait_model_ready()
    st = os.stat(DEFAULT_PATH)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0

    c = Client(DEFAULT_PATH)
    meta = c.request("stats_meta")
    assert meta["errno"] == 0
    structs = meta["args"]["resp"]
    (top,) = [s for s in structs.values() if s.get("top") == "true"]
    # The watcher runs before the load starts: under TCG a Python start competing with
    # stress-ng takes many seconds. Its first line proves it runs; the two after the one that
    # saw the load begin are one second apart, both under load.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tools.stats", "--json", "--interval", "1"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    load = None
    try:
        assert watcher.stdout.readline(), watcher.stderr.read()  # type: ignore[union-attr]
        load = stress(STRESS_S)
        once = {fmt: subprocess.Popen([sys.executable, "-m", "tools.stats", "--once", *fmt],
                                      cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                for fmt in ((), ("--openmetrics",))}
        lines = [watcher.stdout.readline() for _ in range(3)][1:]  # type: ignore[union-attr]
        raw = c.request("stats", target="top")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=TIMEOUT_S) == 0, watcher.stderr.read()  # type: ignore[union-attr]
        out = {fmt: p.communicate(timeout=TIMEOUT_S) + (p.returncode,)
               for fmt, p in once.items()}
    finally:
        if watcher.poll() is None:
            watcher.kill()
        if load is not None:
            load.terminate()
            load.wait(timeout=TIMEOUT_S)
    c.close()

    # The raw answer: every number typed as stats_meta says.
    assert raw["errno"] == 0
    resp = raw["args"]["resp"]
    save("stats-raw.json", json.dumps(raw) + "\n")
    types = {"u64": int, "float": (int, float), "string": str}
    for name, value in resp.items():
        if name != "domains":
            assert isinstance(value, types[top["fields"][name]["datum"]]), name
    assert resp["ops"] == contract.SCHED_NAME and resp["candidates_total"] > 0

    assert all(lines), f"mlsched-stats --json printed {lines!r}"
    first, second = (json.loads(line) for line in lines)
    save("stats-sample.json", lines[0] + lines[1])
    for key in ("candidates_total", "select_total", "hits_total", "submitted_total"):
        assert second[key] >= first[key] > 0, key
    assert second["select_total"] > first["select_total"]
    assert second["candidates_total"] > first["candidates_total"]
    for s in (first, second):
        assert s["state"] == "enabled" and s["ops"] == contract.SCHED_NAME
        assert s["model"] == str(MODEL)
        assert s["model_ready"] == 1 and s["backend"] in ("numpy", "tf")
        assert s["loader_pid"] == ld.proc.pid
        assert s["select_per_s"] > 0 and s["candidates_per_s"] > 0
        assert s["hits_per_s"] > 0 and s["hit_rate"] > 0
        assert s["table_entries"] > 0 and s["table_capacity"] > 0
        assert s["nr_doms"] == 2 and set(s["domains"]) == {"0", "1"}
    assert second["decisions_total"] >= first["decisions_total"] > 0
    assert second["batches_total"] > 0 and second["batch_latency_max_us"] > 0

    text_out, text_err, text_rc = out[()]
    assert text_rc == 0, text_err
    save("stats-once.txt", text_out)
    assert "model ready" in text_out and "decide     cand" in text_out

    om_out, om_err, om_rc = out[("--openmetrics",)]
    assert om_rc == 0, om_err
    save("stats-once.om", om_out)
    families = {f.name: f for f in text_string_to_metric_families(om_out)}
    assert families["mlsched_candidates"].type == "counter"
    assert families["mlsched_candidates"].samples[0].value > 0
    assert families["mlsched"].samples[0].labels["ops"] == contract.SCHED_NAME
    assert {s.labels["dom"] for s in families["mlsched_dom_load"].samples} == {"0", "1"}

    assert ld.proc.poll() is None and attached()
    assert ld.stop() == 0
    printed = [json.loads(line) for line in ld.log().splitlines() if line.startswith("{")]
    assert printed and printed[-1]["ops"] == contract.SCHED_NAME, "no --stats line"


def bad_clients() -> dict[str, object]:
    """Every kind of bad client, some at once; what each got."""
    got: dict[str, object] = {}
    c = Client(DEFAULT_PATH)
    got["malformed"] = c.send(b"{this is not json")["errno"]
    got["unknown"] = c.request("reboot")["errno"]
    got["still answers"] = c.request("stats")["errno"]
    c.close()

    huge = Client(DEFAULT_PATH)
    try:
        huge.sock.sendall(b"x" * (16 * MAX_LINE))  # a line of a megabyte, no newline
    except (BrokenPipeError, ConnectionResetError):
        pass
    got["huge"] = json.loads(huge.f.readline())["errno"]
    huge.close()

    def never_reads() -> None:
        deaf = Client(DEFAULT_PATH)
        try:
            for _ in range(2000):
                deaf.sock.sendall(b'{"req": "stats"}\n' * 4096)
            got["never reads"] = "still connected"
        except (BrokenPipeError, ConnectionResetError):
            got["never reads"] = "dropped"
        deaf.sock.close()

    deaf = threading.Thread(target=never_reads)
    deaf.start()
    crowd = [Client(DEFAULT_PATH) for _ in range(50)]
    answers = [cl.request("stats")["errno"] for cl in crowd]
    for cl in crowd:
        cl.close()
    deaf.join(TIMEOUT_S)
    got["crowd served"] = answers.count(0)
    got["crowd busy"] = answers.count(errno.EBUSY)
    return got


@pytest.fixture
def ring_loader() -> Iterator[Loader]:
    """Decisions written as candidates come (the hash table, the ring path): with the dense
    grid every key is decided at model-ready and no decision is written afterwards."""
    with running_loader("--table", "hash", name="loader-stats-abuse") as ld:
        yield ld


def test_bad_clients_leave_it_attached_and_deciding(ring_loader: Loader) -> None:
    loader = ring_loader
    loader.wait_model_ready()
    before = loader.stats()
    load = stress(STRESS_S)
    try:
        got = bad_clients()
        # A decision written after the abuse began, into a table that started near empty.
        wait_for(lambda: loader.stats()["loader_decisions"] > before["loader_decisions"],
                 TIMEOUT_S, "a decision written during the abuse", loader.proc)
        after_client = Client(DEFAULT_PATH)
        answer = after_client.request("stats")
        after_client.close()
    finally:
        load.terminate()
        load.wait(timeout=TIMEOUT_S)
    print(got)
    assert got["malformed"] == errno.EINVAL and got["unknown"] == errno.EINVAL
    assert got["still answers"] == 0
    assert got["huge"] == errno.E2BIG
    assert got["never reads"] == "dropped"
    assert got["crowd served"] + got["crowd busy"] == 50
    assert got["crowd served"] <= MAX_CLIENTS and got["crowd busy"] >= 50 - MAX_CLIENTS
    assert answer["errno"] == 0 and answer["args"]["resp"]["hits_total"] > 0
    assert loader.stats()["hits"] > before["hits"]
    assert loader.proc.poll() is None and attached()
    assert loader.stop() == 0
    assert "Traceback" not in loader.log()


def test_a_non_root_client_is_refused(loader: Loader) -> None:
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
            f"try:\n    s.connect({DEFAULT_PATH!r})\n"
            "except PermissionError:\n    sys.exit(13)\n")
    raw = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert raw.returncode == 13, raw.stderr
    res = stats("--once", user=65534)
    assert res.returncode == 1 and res.stdout == ""
    assert "permission denied" in res.stderr and res.stderr.count("\n") == 1
    assert loader.proc.poll() is None and stats("--once").returncode == 0


def test_nothing_attached() -> None:
    wait_for(lambda: scx_state() == "disabled", 30, "the previous scheduler to detach")
    res = stats("--once")
    assert res.returncode == 1
    assert res.stderr == (f"mlsched-stats: mlsched is not attached (no stats socket at "
                          f"{DEFAULT_PATH}); sched_ext is disabled\n")


def test_watcher_reports_the_scheduler_leaving(loader: Loader) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tools.stats", "--interval", "0.5"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().startswith("######")  # type: ignore[union-attr]
        assert loader.stop(signal.SIGINT) == 0
        assert watcher.wait(timeout=TIMEOUT_S) == 1
    finally:
        if watcher.poll() is None:
            watcher.kill()
    err = watcher.stderr.read()  # type: ignore[union-attr]
    print(err)
    assert err.startswith(f"mlsched-stats: mlsched is not attached: the loader closed "
                          f"{DEFAULT_PATH}; sched_ext is dis")  # disabling, or disabled
    assert err.count("\n") == 1
    assert not os.path.exists(DEFAULT_PATH), "the loader left its socket behind"


def test_a_killed_loaders_socket_is_named_and_replaced() -> None:
    ld = start_loader(name="loader-stats-sigkill")
    try:
        wait_for(attached, ATTACH_WAIT_S, "mlsched to attach", ld.proc)
        wait_for(lambda: os.path.exists(DEFAULT_PATH), ATTACH_WAIT_S, "the stats socket")
        ld.proc.send_signal(signal.SIGKILL)
        ld.proc.wait(timeout=TIMEOUT_S)
        wait_for(lambda: scx_state() == "disabled", 30, "the kernel to detach")
        assert os.path.exists(DEFAULT_PATH)  # nobody removed it
        res = stats("--once", "--json")
        print(res.stderr)
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr == (f"mlsched-stats: mlsched is not attached (nothing serves "
                              f"{DEFAULT_PATH}: a loader that died left it); sched_ext is "
                              "disabled\n")
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()
    with running_loader(name="loader-after-dead-socket") as again:
        wait_for(lambda: stats("--once").returncode == 0, ATTACH_WAIT_S, "a new socket",
                 again.proc)
