"""The scheduler's arithmetic as compiled C (bpf/mlsched_policy.h via policy_harness.c).

The same header is included by bpf/mlsched.bpf.c, so these are the functions the kernel runs;
the Python mirrors in loader/schema.py and contract.py are checked against them.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loader import contract, schema
from model_dir import fallback

REPO = Path(__file__).resolve().parents[2]
MS = 1_000_000
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed (make setup installs it)")
    exe = tmp_path_factory.mktemp("policy") / "policy_harness"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-I", str(REPO / "bpf"), "-o", str(exe),
                    str(REPO / "tests" / "host" / "policy_harness.c")], check=True)

    def call(lines: list[str]) -> list[int]:
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                             text=True, check=True).stdout.split()
        assert len(out) == len(lines)
        return [int(v) for v in out]

    return call


def test_vtime_charge_does_not_wrap_when_the_kernel_refilled_the_slice(harness) -> None:
    """--slice-us 5000: the kernel refills a kept task's slice to its 20 ms default, so
    (our slice - slice left) would be 5 ms - 20 ms, wrapping to ~2^64. The charge comes from
    the run time instead: 1 ms run = 1 ms charged at nice 0, whatever the slices."""
    started, now = 10_000 * MS, 10_001 * MS
    ran, = harness([f"ran {now} {started}"])
    assert ran == 1 * MS
    charged = harness([f"charge {ran} 100", f"charge {ran} 200", f"charge {ran} 1"])
    assert charged == [1 * MS, MS // 2, 100 * MS]
    # A start stamp from the future (clock read on another CPU) or none at all: no charge.
    assert harness([f"ran {started} {now}", f"ran {now} 0"]) == [0, 0]


def test_vtime_clamp_bounds_credit_and_lag_even_across_wrap(harness) -> None:
    now, slice_ns = 1_000 * MS, 5 * MS
    lo, hi = now - slice_ns, now + contract.VTIME_MAX_LAG_SLICES * slice_ns
    cases = {
        now: now,                        # on the clock: unchanged
        now - 100 * MS: lo,              # a long sleeper banks one slice of credit at most
        now + 100 * MS: hi,              # a low-weight task waits at most MAX_LAG slices
        (now - 6 * MS) & U64: lo,
        now + (1 << 40): hi,             # far ahead
        U64 - 5: lo,                     # a wrapped (negative) vtime is behind, not ahead
    }
    got = harness([f"clamp {v} {now} {slice_ns}" for v in cases])
    assert got == list(cases.values())
    assert all(lo <= g <= hi for g in got)


def test_slice_shrinks_with_the_queue_to_the_minimum(harness) -> None:
    got = harness([f"slice {20 * MS} {MS} {n}" for n in (0, 1, 3, 19, 1000)])
    assert got == [20 * MS, 10 * MS, 5 * MS, MS, MS]


def test_load_quantization(harness) -> None:
    got = harness([f"load {r} {n}" for r, n in ((0, 2), (1, 1), (4, 1), (8, 2), (100, 2),
                                                (3, 0))])
    per = schema.LOAD_SCALE // schema.LOAD_FULL_PER_CPU
    assert got == [0, per, schema.LOAD_SCALE, schema.LOAD_SCALE, schema.LOAD_SCALE,
                   schema.LOAD_SCALE]
    grid = list(itertools.product(range(0, 70), range(0, 9)))
    got = harness([f"load {r} {n}" for r, n in grid])
    runnable, nr_cpus = (np.array(col) for col in zip(*grid, strict=True))
    assert got == schema.load_q(runnable, nr_cpus).tolist()  # the Python mirror


def test_heuristic_matches_python_on_the_whole_grid(harness) -> None:
    grid = list(itertools.product(range(schema.LOAD_SCALE + 1), range(schema.LOAD_SCALE + 1),
                                  range(3)))
    got = np.array(harness([f"heuristic {s} {d} {i}" for s, d, i in grid]), dtype=bool)
    src, dst, idle = (np.array(col) for col in zip(*grid, strict=True))
    assert np.array_equal(got, fallback.heuristic_migrate(idle, src, dst))
    # A steal may see a source no busier than its destination: never a migrate (no wrap).
    assert not got[src <= dst].any()


def test_key_packing_matches_python(harness) -> None:
    rng = np.random.default_rng(7)
    rows = [(int(rng.integers(0, schema.MAX_CPUS)), int(rng.integers(0, 400)),
             int(rng.integers(0, 400)), int(rng.integers(0, schema.LOAD_SCALE + 1)),
             int(rng.integers(0, schema.LOAD_SCALE + 1))) for _ in range(300)]
    got = harness(["key " + " ".join(map(str, r)) for r in rows])
    assert got == [schema.pack_key(*r) for r in rows]


def test_propensity_matches_python(harness) -> None:
    rows = list(itertools.product((0, 6554, 32768, 65536), (0, 1), (0, 1)))
    got = np.array(harness([f"prop {e} {f} {a}" for e, f, a in rows]))
    for (e, f, a), g in zip(rows, got, strict=True):
        assert g == int(fallback.kernel_prob_q16(a, f, e))  # the exact propensity, rounded down
        assert g / contract.EXPLORE_SCALE == pytest.approx(float(fallback.propensity(a, f, e)),
                                                         abs=1 / contract.EXPLORE_SCALE)
    # Over both actions the probabilities sum to one.
    for e in (0, 6554, 32768, 65536):
        for f in (0, 1):
            assert sum(harness([f"prop {e} {f} 0", f"prop {e} {f} 1"])) == contract.EXPLORE_SCALE


def test_grid_index_matches_python_and_enumerates_every_key(harness) -> None:
    """The dense grid: the kernel's index of each key equals its place in grid_keys()."""
    for nr_cpus, dom_cpus in ((2, 1), (4, 2), (3, 2)):
        keys = schema.grid_keys(nr_cpus, dom_cpus)
        size, = harness([f"gridsize {nr_cpus} {dom_cpus}"])
        assert size == len(keys) == schema.grid_size(nr_cpus, dom_cpus)
        x = schema.unpack_keys(keys)
        fields = np.column_stack([x[:, 0], x[:, 1], x[:, 2], x[:, 3] * schema.LOAD_SCALE,
                                  x[:, 4] * schema.LOAD_SCALE]).round().astype(int)
        sample = fields[:: max(1, len(fields) // 400)]
        got = harness([f"grid {nr_cpus} {dom_cpus} " + " ".join(map(str, f)) for f in sample])
        want = schema.grid_indices(schema.pack_keys(*sample.T), nr_cpus, dom_cpus).tolist()
        assert got == want
        assert got == [int(np.flatnonzero((fields == f).all(axis=1))[0]) for f in sample]
    # Outside the bounds: not in the grid.
    assert harness(["grid 2 1 2 0 0 0 0", "grid 2 1 0 2 0 0 0", "grid 2 1 0 0 0 17 0"]) == [-1] * 3
    outside = schema.pack_keys([2, 0, 0], [0, 2, 0], [0, 0, 0], [0, 0, 17], [0, 0, 0])
    assert schema.grid_indices(outside, 2, 1).tolist() == [-1] * 3
