"""The kernel's own policies in Python: the fallback, and collection mode's logging policy.

For the layers above (training, evaluation, the dataset reader), on arrays:

- fallback_migrate() is fallback_migrate() of the BPF side: `keep`, `migrate`, or the
  heuristic (heuristic_migrate(), mlsched_heuristic in bpf/mlsched_policy.h, checked
  against the compiled C by tests/host/test_policy.py): migrate when src_load_q >= dst_load_q +
  LOAD_SCALE / 4 and the destination domain has an idle CPU. A pure function of a candidate's
  features, so it can be recomputed from any row or decision key.
- In collection mode decide() flips a coin with probability P = explore / EXPLORE_SCALE
  (`bpf_get_prandom_u32() % EXPLORE_SCALE < explore`), and a second, fair coin then picks the
  action; otherwise the fallback decides. The probability that the logging policy took the
  action it took (its propensity) is therefore P/2 + (1 - P) when the fallback would have
  chosen that action, and P/2 when not. propensity_q() gives it exactly, in units of
  1 / PROPENSITY_SCALE (= 1 / (2 * EXPLORE_SCALE)); the kernel records it in the candidate as
  prob_q16 (mlsched_propensity_q16) in 1/65536 units, rounded down: propensity_q() >> 1.

No TensorFlow, numpy only.
"""

from __future__ import annotations

import numpy as np

from loader import contract, schema

HEURISTIC_GAP_Q = schema.LOAD_SCALE // 4  # the load gap, in quanta, the heuristic needs
PROPENSITY_SCALE = 2 * contract.EXPLORE_SCALE  # propensities are exact in these units


def heuristic_migrate(cpu_idle: np.ndarray, src_load_q: np.ndarray, dst_load_q: np.ndarray
                      ) -> np.ndarray:
    """The kernel's heuristic on quantized features (mlsched_heuristic in
    bpf/mlsched_policy.h): bool array, True = migrate."""
    src = np.asarray(src_load_q, dtype=np.int64)
    dst = np.asarray(dst_load_q, dtype=np.int64)
    return (src >= dst + HEURISTIC_GAP_Q) & (np.asarray(cpu_idle) > 0)


def fallback_migrate(policy: contract.Fallback | int, cpu_idle: np.ndarray,
                     src_load_q: np.ndarray, dst_load_q: np.ndarray) -> np.ndarray:
    """What fallback_migrate() of the BPF side decides for these candidates (True = migrate).

    policy may be an array of contract.Fallback values, one per candidate.
    """
    heur = heuristic_migrate(cpu_idle, src_load_q, dst_load_q)
    policy = np.asarray(policy, dtype=np.int64)
    return np.where(policy == contract.Fallback.HEURISTIC, heur,
                    policy == contract.Fallback.MIGRATE)


def load_quanta(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src_load_q, dst_load_q) back from model inputs (float32 [n, 10], loads q / LOAD_SCALE)."""
    f = schema.fields_of_features(np.asarray(x))
    return f["src_load_q"], f["dst_load_q"]


def heuristic_from_features(x: np.ndarray) -> np.ndarray:
    """The heuristic on model inputs as schema.unpack_keys() makes them: bool [n]."""
    f = schema.fields_of_features(np.asarray(x))
    return heuristic_migrate(f["cpu_idle"], f["src_load_q"], f["dst_load_q"])


def explore_q_for(p: float) -> int:
    """The explore setting for an exploration probability p (what mlsched-collect writes)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"exploration probability must be in [0, 1], not {p}")
    return round(p * contract.EXPLORE_SCALE)


def propensity_q(action: np.ndarray, fallback_action: np.ndarray, explore_q: np.ndarray
                 ) -> np.ndarray:
    """The logging policy's probability of the action taken, in 1/PROPENSITY_SCALE units.

    action: what was done (0 keep, 1 migrate); fallback_action: what the fallback would have
    done for these features; explore_q: the explore setting, P in 1/EXPLORE_SCALE units. int64.
    """
    explore = np.asarray(explore_q, dtype=np.int64)
    same = np.asarray(action, dtype=np.int64) == np.asarray(fallback_action, dtype=np.int64)
    return explore + np.where(same, 2 * (contract.EXPLORE_SCALE - explore), 0)


def kernel_prob_q16(action: np.ndarray, fallback_action: np.ndarray, explore_q: np.ndarray
                    ) -> np.ndarray:
    """What the kernel records as the candidate's prob_q16: propensity_q() >> 1."""
    return propensity_q(action, fallback_action, explore_q) >> 1


def propensity(action: np.ndarray, fallback_action: np.ndarray, explore_q: np.ndarray
               ) -> np.ndarray:
    """propensity_q() as a probability (float64): P/2 + (1 - P) [fallback chose it]."""
    return propensity_q(action, fallback_action, explore_q) / PROPENSITY_SCALE
