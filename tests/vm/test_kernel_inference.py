"""--inference kernel: the scheduler evaluates the model itself on a table miss."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from loader import contract, libbpf, schema
from loader.kernel_mlp import prepare
from loader.table import DecisionGrid
from tests.vm.conftest import MODEL, Loader, running_loader, stress

STRESS_S = 20
FALLBACK = ("fallback_migrate", "fallback_keep")


def in_flight_skew() -> int:
    """How far `misses` may lead `kinfer` between two reads of the per-CPU counters: with real
    parallelism (multi-threaded TCG) each other CPU may be inside one decision at either read,
    its miss counted and its inference not yet."""
    return os.cpu_count() or 1


def delta_under(ld: Loader, load) -> dict[str, int]:
    before = ld.stats()
    assert load.wait(timeout=STRESS_S * 6) == 0
    after = ld.stats()
    return {k: after[k] - before[k] for k in after}


def test_kernel_decides_every_miss_even_with_the_loader_stopped() -> None:
    with running_loader("--inference", "kernel", name="loader-kernel") as ld:
        first = delta_under(ld, stress(STRESS_S))
        print("attached, loader running:", {k: first[k] for k in (
            "candidates", "hits", "misses", "kinfer", "kinfer_ns", *FALLBACK)})
        assert first["candidates"] > 0 and first["kinfer"] > 0
        assert abs(first["kinfer"] - first["misses"]) <= in_flight_skew(), first
        assert all(first[k] == 0 for k in FALLBACK), "a fallback decision after attach"

        os.kill(ld.proc.pid, signal.SIGSTOP)
        try:
            # A different mix, for keys the table has not seen yet.
            stopped = delta_under(ld, stress(STRESS_S, cpus=4))
        finally:
            os.kill(ld.proc.pid, signal.SIGCONT)
        print("loader stopped:", {k: stopped[k] for k in (
            "candidates", "hits", "misses", "kinfer", *FALLBACK)})
        assert stopped["candidates"] > 0
        assert abs(stopped["kinfer"] - stopped["misses"]) <= in_flight_skew(), stopped
        assert all(stopped[k] == 0 for k in FALLBACK), "a fallback decision while stopped"
        if first["kinfer_ns"]:
            print(f"in-kernel inference: {first['kinfer_ns'] / first['kinfer'] / 1000:.1f} us")

        # Every decision the kernel cached equals the Python mirror's.
        nr_cpus, dom_cpus = grid_dims()
        fd = libbpf.obj_get(os.path.join(contract.PIN_DIR, contract.MAP_DECISION_GRID))
        grid = DecisionGrid(fd, (nr_cpus, dom_cpus))
        try:
            codes = grid.codes.copy()
        finally:
            grid.close()
            os.close(fd)
        decided = np.flatnonzero(codes)
        assert len(decided) > 0
        keys = schema.grid_keys(nr_cpus, dom_cpus)[decided]
        want = np.where(prepare(MODEL, nr_cpus, dom_cpus).decide(keys),
                        contract.GridCode.MIGRATE, contract.GridCode.KEEP)
        print(f"{len(decided)} keys decided in the kernel; checked against the Python mirror")
        assert np.array_equal(codes[decided], want)
        assert ld.stop() == 0
    time.sleep(0.1)


def grid_dims() -> tuple[int, int]:
    """The dense grid's bounds: the loader's plan for this machine (default domains)."""
    from loader.domains import plan_domains
    from loader.table import grid_dims as dims_for

    plan = plan_domains(None)
    dims = dims_for(plan.nr_cpus, plan.max_dom_cpus)
    assert dims is not None, "no dense grid on this machine"
    return dims
