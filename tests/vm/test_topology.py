"""CPU hotplug and cpusets while attached: the scheduler restarts, the model still decides.

Run in the 4-CPU boot (`make vm-test-topology`); with fewer CPUs the cpuset case skips.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader.scheduler import scx_state
from loader.stats import DEFAULT_PATH as STATS_SOCKET
from tests.scx_stats_client import Client
from tests.vm.conftest import attached, running_loader, stress, wait_for

CPU_SYSFS = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")
# Upper bounds so that a broken run fails instead of hanging; the times are printed.
RESTART_WAIT_S = 60


def set_online(cpu: int, online: bool) -> None:
    (CPU_SYSFS / f"cpu{cpu}" / "online").write_text("1" if online else "0")


def restarts_logged(ld) -> int:
    return ld.log().count("restarting after CPU hotplug")


def wait_reattached(ld, n: int, what: str) -> float:
    """Seconds from now until the loader logged restart n and mlsched is attached again."""
    t0 = time.monotonic()
    wait_for(lambda: restarts_logged(ld) >= n, RESTART_WAIT_S, f"restart {n}", ld.proc)
    wait_for(attached, RESTART_WAIT_S, f"mlsched attached again after {what}", ld.proc)
    return time.monotonic() - t0


def hotplug(ld, cpu: int, online: bool, n: int) -> None:
    """After 3 s of load, cpu offline (or online): restart n of mlsched in the same process,
    logged, attached again and counted in the loader's stats."""
    time.sleep(3)
    set_online(cpu, online)
    state = "online" if online else "offline"
    took = wait_reattached(ld, n, f"cpu{cpu} went {state}")
    print(f"cpu{cpu} {state}: mlsched enabled again after {took:.2f} s")
    wait_for(lambda: ld.stats()["loader_restarts"] == n, RESTART_WAIT_S, "the restart count",
             ld.proc)


def test_cpu_offline_and_online_restart_in_the_same_process() -> None:
    cpu = max(int(p.name[3:]) for p in CPU_SYSFS.glob("cpu[0-9]*"))
    dmesg_before = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    with running_loader(name="loader-hotplug") as ld:
        ld.wait_model_ready()
        load = stress(60, cpus=2)
        try:
            hotplug(ld, cpu, False, 1)
            # The stats socket outlives the restart and reads the new scheduler's maps.
            stats_client = Client(STATS_SOCKET)
            assert stats_client.request("stats")["args"]["resp"]["restarts_total"] == 1
            stats_client.close()
            hotplug(ld, cpu, True, 2)
        finally:
            set_online(cpu, True)
            load.kill()
            load.wait()
        assert ld.stop() == 0
    assert scx_state() == "disabled"
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout[len(dmesg_before):]
    assert "stall" not in dmesg, dmesg


@contextlib.contextmanager
def cpuset(cpus: str) -> Iterator[Path]:
    """A cgroup-v2 cpuset holding only `cpus`."""
    if not (CGROUP / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP)], check=True)
    (CGROUP / "cgroup.subtree_control").write_text("+cpuset")
    group = CGROUP / "mlsched-test"
    group.mkdir(exist_ok=True)
    (group / "cpuset.cpus").write_text(cpus)
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        time.sleep(0.5)
        group.rmdir()


def test_tasks_in_a_cpuset_are_still_decided_by_the_model() -> None:
    nr = os.cpu_count() or 1
    if nr < 4:
        pytest.skip("needs 4 CPUs (2 domains of 2): the 4-CPU boot runs it")
    with cpuset(f"0-{nr - 2}") as group, running_loader(name="loader-cpuset") as ld:
        ld.wait_model_ready()
        before = ld.stats()
        load = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {group}/cgroup.procs && exec stress-ng --temp-path /tmp "
             f"--cpu {nr} --pipe {nr} --timeout 30s --quiet"])
        assert load.wait(timeout=120) == 0
        after = ld.stats()
        delta = {k: after[k] - before[k] for k in after}
        print("counter deltas in the cpuset:", delta)
        assert delta["candidates"] > 0
        assert delta["hits"] > 0, "the model decided nothing inside the cpuset"
        assert delta["restricted"] < delta["select"], "every wakeup counted as restricted"
