"""SIGHUP: the loader switches models without detaching; a bad model is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from loader.scheduler import scx_state
from tests.vm.conftest import TEST_MODELS, Loader, attached, running_loader, stress, wait_for

STRESS_S = 15


def point(link: Path, target: Path) -> None:
    """Swap the model directory the loader was given, atomically."""
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def enables() -> int:
    out = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return out.count('BPF scheduler "mlsched" enabled')


def decided_under_load(ld: Loader) -> dict[str, int]:
    before = ld.stats()
    load = stress(STRESS_S)
    assert load.wait(timeout=STRESS_S * 6) == 0
    after = ld.stats()
    delta = {k: after[k] - before[k] for k in ("migrate", "keep", "hits", "misses")}
    print("decisions under load:", delta)
    return delta


def grid_full(ld: Loader) -> bool:
    s = ld.stats()
    return s["loader_grid_keys"] > 0 and s["loader_grid_decided"] == s["loader_grid_keys"]


def test_sighup_switches_models_and_refuses_a_corrupt_one(tmp_path: Path) -> None:
    link = tmp_path / "model"
    point(link, TEST_MODELS / "always_migrate")
    with running_loader("--model", str(link), name="loader-reload") as ld:
        ld.wait_model_ready()
        wait_for(lambda: grid_full(ld), 60, "the grid to be decided", ld.proc)
        n_enabled = enables()
        first = decided_under_load(ld)
        assert first["migrate"] > 0 and first["keep"] == 0

        point(link, TEST_MODELS / "always_keep")
        ld.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: ld.stats()["loader_reloads"] == 1, 120, "the reload", ld.proc)
        wait_for(lambda: grid_full(ld), 60, "the new grid", ld.proc)
        second = decided_under_load(ld)
        assert second["keep"] > 0 and second["migrate"] == 0

        point(link, TEST_MODELS / "corrupt_variables")
        ld.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in ld.log(), 60, "the refusal", ld.proc)
        time.sleep(0.5)
        refusals = [line for line in ld.log().splitlines() if "reload refused" in line]
        assert len(refusals) == 1, refusals
        assert ld.stats()["loader_reload_failures"] == 1
        third = decided_under_load(ld)
        assert third["keep"] > 0 and third["migrate"] == 0, "the previous model stopped serving"

        assert attached() and scx_state() == "enabled"
        assert enables() == n_enabled, "the scheduler was re-attached during the reloads"
        assert ld.stop() == 0
