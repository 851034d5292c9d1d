"""The whole path on a real sched_ext kernel: attach, candidates, model, decisions, detach."""

from __future__ import annotations

import os
import signal
import stat
import time

from loader import contract
from loader.scheduler import scx_ops_name, scx_state
from tests.vm.conftest import Loader, attached, start_loader, stress, sums_match, wait_for

STRESS_S = 30


def test_attach_enables_mlsched(loader: Loader) -> None:
    assert scx_state() == "enabled"
    assert scx_ops_name() == "mlsched"
    mode = os.stat(contract.PIN_DIR).st_mode
    assert stat.S_IMODE(mode) == 0o700
    assert sorted(os.listdir(contract.PIN_DIR)) == sorted(contract.PINNED_MAPS)
    # bcc's map and ring calls come from libbcc_bpf: nothing of LLVM or clang is mapped.
    maps = open(f"/proc/{loader.proc.pid}/maps").read()
    assert "libbcc_bpf.so" in maps
    assert "libLLVM" not in maps and "libclang" not in maps and "libbcc.so" not in maps


def test_decisions_flow_under_stress(loader: Loader) -> None:
    loader.wait_model_ready()
    before = loader.stats()
    load = stress(STRESS_S)
    assert load.wait(timeout=STRESS_S * 4) == 0
    time.sleep(0.5)  # let the last batch be published
    after = loader.stats()
    delta = {k: after[k] - before[k] for k in after}
    print("counter deltas over the stress run:", delta)
    assert loader.proc.poll() is None, "the loader died under load"
    assert attached(), "mlsched was ejected under load"
    assert delta["candidates"] > 0
    # The whole grid of this machine's keys was decided when the model came.
    assert after["loader_grid_keys"] > 0
    assert after["loader_grid_decided"] == after["loader_grid_keys"]
    assert after["loader_decisions"] >= after["loader_grid_keys"]
    assert delta["hits"] > 0
    assert sums_match(delta["migrate"] + delta["keep"], delta["hits"]), delta
    assert after["loader_model_errors"] == 0


def test_sigint_detaches_and_unpins(loader: Loader) -> None:
    assert loader.stop(signal.SIGINT) == 0
    assert scx_state() == "disabled"
    assert not os.path.exists(contract.PIN_DIR)


def test_sigkill_detaches() -> None:
    ld = start_loader(name="loader-sigkill")
    try:
        wait_for(attached, 60, "mlsched to attach", ld.proc)
        ld.proc.send_signal(signal.SIGKILL)
        took = wait_for(lambda: scx_state() == "disabled", 30, "the kernel to detach")
        print(f"state disabled {took * 1000:.0f} ms after SIGKILL")
        assert ld.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if ld.proc.poll() is None:
            ld.proc.kill()
        # A SIGKILLed loader leaves its pins; the next start cleans them (reliability tests).
        if os.path.isdir(contract.PIN_DIR):
            import shutil

            shutil.rmtree(contract.PIN_DIR)
