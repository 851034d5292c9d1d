"""model_dir/fallback.py: the kernel's fallback and collection mode's logging policy in Python.

The propensities are checked by hand on the formula and against a simulation of the kernel's
own draws; tests/host/test_policy.py checks them and the heuristic against the compiled C of
bpf/mlsched_policy.h (the kernel's prob_q16 must be propensity_q >> 1). No TensorFlow.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from loader import contract, schema
from model_dir import fallback

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "mlsched.bpf.c"
P30 = fallback.explore_q_for(0.3)  # 19661, as mlsched-collect --explore 0.3 configures it


def test_the_kernels_draws_and_heuristic() -> None:
    """decide() in collection mode draws as simulated below."""
    src = re.sub(r"\s+", " ", BPF_SOURCE.read_text())
    assert "(bpf_get_prandom_u32() % MLSCHED_EXPLORE_SCALE) < explore" in src
    assert "migrate = bpf_get_prandom_u32() & 1;" in src
    assert "c->prob_q16 = mlsched_propensity_q16(explore, fb, migrate);" in src
    assert contract.EXPLORE_SCALE == 0x10000


def test_kernel_prob_q16_is_the_exact_propensity_rounded_down() -> None:
    for explore in (0, 1, 6554, P30, 32768, 65535, 65536):
        for fb in (0, 1):
            for action in (0, 1):
                q = int(fallback.propensity_q(action, fb, explore))
                assert int(fallback.kernel_prob_q16(action, fb, explore)) == q >> 1
                # P/2 + (1 - P) when the fallback chose the action, else P/2, P = explore/65536
                p = explore / 65536
                want = p / 2 + (1 - p) * (fb == action)
                assert abs(q / fallback.PROPENSITY_SCALE - want) < 1e-12


def test_heuristic_on_quantized_features() -> None:
    idle = np.array([0, 1, 1, 1, 3, 0])
    src = np.array([16, 8, 8, 7, 16, 4])
    dst = np.array([0, 4, 5, 3, 12, 0])
    assert fallback.heuristic_migrate(idle, src, dst).tolist() == [
        False, True, False, True, True, False]
    for policy, want in ((contract.Fallback.KEEP, [False] * 6),
                         (contract.Fallback.MIGRATE, [True] * 6)):
        assert fallback.fallback_migrate(policy, idle, src, dst).tolist() == want
    # Per row, and from model inputs as the loader unpacks keys.
    per_row = np.array([contract.Fallback.KEEP, contract.Fallback.MIGRATE] + [2] * 4)
    assert fallback.fallback_migrate(per_row, idle, src, dst).tolist() == [
        False, True, False, True, True, False]
    keys = np.array([schema.pack_key(3, int(i), 1, int(s), int(d))
                     for i, s, d in zip(idle, src, dst, strict=True)], np.uint64)
    x = schema.unpack_keys(keys)
    assert np.array_equal(fallback.heuristic_from_features(x),
                          fallback.heuristic_migrate(idle, src, dst))


@pytest.mark.parametrize("p, same, other", [
    (0.3, 0.85, 0.15), (0.5, 0.75, 0.25), (0.0, 1.0, 0.0), (1.0, 0.5, 0.5), (0.25, 0.875, 0.125),
])
def test_propensity_by_hand(p: float, same: float, other: float) -> None:
    """P/2 + (1 - P) for the fallback's action, P/2 for the other; exact in 1/131072 units."""
    q = fallback.explore_q_for(p)
    exact = q / contract.EXPLORE_SCALE  # the P the kernel really uses
    got_same = fallback.propensity(1, 1, q)
    got_other = fallback.propensity(0, 1, q)
    assert got_same == pytest.approx(exact / 2 + 1 - exact, abs=1e-12)
    assert got_other == pytest.approx(exact / 2, abs=1e-12)
    assert got_same == pytest.approx(same, abs=1e-4) and got_other == pytest.approx(other, abs=1e-4)
    # The two actions' probabilities add up to 1, exactly.
    assert (fallback.propensity_q(1, 1, q) + fallback.propensity_q(0, 1, q)
            == fallback.PROPENSITY_SCALE)


def test_explore_q_matches_the_collector() -> None:
    assert fallback.explore_q_for(0.3) == round(0.3 * 65536) == 19661
    assert fallback.explore_q_for(1.0) == 65536 and fallback.explore_q_for(0.0) == 0
    with pytest.raises(ValueError):
        fallback.explore_q_for(1.5)


def test_propensity_matches_a_simulation_of_the_kernels_draws() -> None:
    """Draw as select_cpu does, count how often each action comes out: the formula's numbers."""
    rng = np.random.default_rng(20261201)
    n = 400_000
    chosen = rng.integers(0, 2, n)  # what the fallback would do for each candidate
    coin = (rng.integers(0, 1 << 32, n, dtype=np.uint64) % np.uint64(65536)) < P30
    action = np.where(coin, rng.integers(0, 1 << 32, n, dtype=np.uint64) & np.uint64(1), chosen)
    for a in (0, 1):
        rows = chosen == a
        freq_same = float(np.mean(action[rows] == a))
        want = float(fallback.propensity(a, a, P30))
        se = np.sqrt(want * (1 - want) / rows.sum())
        assert abs(freq_same - want) < 4 * se, (a, freq_same, want)
    # Per row: the propensity of what was done, averaged, is E[p(a|x)] = sum_a p(a|x)^2.
    p = fallback.propensity(action, chosen, P30)
    assert float(p.mean()) == pytest.approx(0.85**2 + 0.15**2, abs=4 * p.std() / np.sqrt(n))
