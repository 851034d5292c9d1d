"""Synthetic candidates: labeled by a rule, or logged by the kernel's policy with known costs.

synthetic_dataset() is what model_export.py trains on without --data. A machine of 2-8 domains
of 1-16 CPUs each gets per-domain runnable task counts (Poisson) from one of four patterns:
steady (every domain alike), imbalanced (one hot domain, the others cold), bursty (each domain
on its own, heavy-tailed) and saturated (every domain over-full). Loads are quantized as
select_cpu does (busy CPUs plus queued tasks, LOAD_FULL_PER_CPU tasks per CPU = full,
0..LOAD_SCALE). A candidate is what select_cpu builds: a waking task whose domain has no idle
CPU, the least loaded other domain as the destination (when it is less loaded), cpu_idle =
idle CPUs of the destination, cpu_not_idle = busy CPUs of the source. A quarter of the rows are
instead drawn uniformly over the feature grid (any CPU, idle and busy counts, src_load >
dst_load) so that the model is right on keys the patterns rarely produce too.

Labeling rule, with gap = src_dom_load - dst_dom_load (loads 0..1):
    migrate (1) when  cpu_idle >= 1 and gap >= 0.25   (an idle CPU over there, and a clear
                                                       imbalance: worth a cold cache), or
                      gap >= 0.5                       (the source is so much busier that
                                                       queueing there costs more than the
                                                       move, even with no idle CPU there);
    keep (0) otherwise (a small imbalance is not worth losing the cache).
The first clause is the kernel's heuristic fallback (model_dir/fallback.py); the second adds the
case it misses. The CPU id plays no part.

simulated_logged_dataset() is a collection run with a known answer (format v2): the same
candidates, each decided by collection mode's logging policy (the fallback, or with
probability P a fair coin), with a cost drawn from a known model: the expected run-queue delay
per unit of run time over the window is

    keep:    SIM_BASE + SIM_PER_LOAD * src_dom_load
    migrate: SIM_BASE + SIM_PER_LOAD * dst_dom_load + SIM_COLD
             + SIM_NO_IDLE when the destination has no idle CPU

times a Gamma(2, 1/2) noise of mean 1. Migrating is better when the load gap exceeds
SIM_COLD / SIM_PER_LOAD (0.15: a gap of 3 quanta) with an idle CPU there, or (SIM_COLD +
SIM_NO_IDLE) / SIM_PER_LOAD (0.4: 7 quanta) without: not the heuristic, which a learned
policy can therefore beat, and expected_cost() gives every policy's true value.
"""

from __future__ import annotations

import numpy as np

from loader import contract, schema
from model_dir import fallback
from model_dir.dataset import COLUMN_NAMES, COLUMNS, COLUMNS_V2, Dataset, logging_columns

# The rule's second threshold in load quanta (the first is the heuristic's, 0.25).
GAP_ALONE_Q = schema.LOAD_SCALE // 2

PATTERNS = ("steady", "imbalanced", "bursty", "saturated")
NR_DOMS = (2, 3, 4, 8)
DOM_CPUS = (1, 2, 4, 8, 16)
UNIFORM_SHARE = 0.25
CHUNK = 256  # synthetic rows drawn per machine and pattern

# The simulated cost model (module docstring), in delay per unit of run time.
SIM_BASE = 0.1
SIM_PER_LOAD = 2.0
SIM_COLD = 0.3
SIM_NO_IDLE = 0.5
SIM_NOISE_SHAPE = 2.0  # Gamma shape; scale 1 / shape, so the noise has mean 1
SIM_WINDOW_NS = 100_000_000
SIM_ROW_SPACING_NS = 1_000_000  # candidates 1 ms apart
DEFAULT_SIM_EXPLORE = 0.3


def rule(cpu_idle: np.ndarray, src_load_q: np.ndarray, dst_load_q: np.ndarray) -> np.ndarray:
    """The synthetic labeling rule (module docstring), on quantized loads: 1 migrate, 0 keep."""
    gap = src_load_q.astype(np.int64) - dst_load_q.astype(np.int64)
    migrate = fallback.heuristic_migrate(cpu_idle, src_load_q, dst_load_q) | (gap >= GAP_ALONE_Q)
    return migrate.astype(np.uint8)


def rule_from_features(x: np.ndarray) -> np.ndarray:
    """The rule on model inputs (float32 [n, 10] as unpack_keys makes them)."""
    f = schema.fields_of_features(x)
    return rule(f["cpu_idle"], f["src_load_q"], f["dst_load_q"])


def _runnable(pattern: str, rng: np.random.Generator, nr_doms: int, dom_cpus: int) -> np.ndarray:
    """Runnable tasks per domain, [CHUNK, nr_doms], for one load pattern."""
    shape = (CHUNK, nr_doms)
    if pattern == "steady":
        per_cpu = np.broadcast_to(rng.uniform(0.25, 3.0, (CHUNK, 1)), shape)
    elif pattern == "imbalanced":
        per_cpu = rng.uniform(0.0, 0.75, shape)
        hot = rng.integers(0, nr_doms, CHUNK)
        per_cpu[np.arange(CHUNK), hot] = rng.uniform(1.0, 5.0, CHUNK)
    elif pattern == "bursty":
        per_cpu = rng.exponential(1.5, shape)
    else:  # saturated
        per_cpu = rng.uniform(2.0, 6.0, shape)
    return rng.poisson(per_cpu * dom_cpus)


def _pattern_chunk(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Candidates of one machine under one load pattern, as select_cpu would build them."""
    nr_doms = int(rng.choice(NR_DOMS))
    dom_cpus = int(rng.choice(DOM_CPUS))
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    runnable = _runnable(pattern, rng, nr_doms, dom_cpus)
    busy = np.minimum(runnable, dom_cpus)
    idle = dom_cpus - busy
    load_q = schema.load_q(runnable, dom_cpus)
    rows = np.arange(CHUNK)
    src = rng.integers(0, nr_doms, CHUNK)  # the waking task's domain
    others = load_q.astype(np.float64)
    others[rows, src] = np.inf
    dst = np.argmin(others, axis=1)  # the first least loaded other domain, as the kernel picks
    # A candidate: no idle CPU at home, and a less loaded domain elsewhere.
    keep = (idle[rows, src] == 0) & (load_q[rows, dst] < load_q[rows, src])
    src, dst, rows = src[keep], dst[keep], rows[keep]
    n = len(rows)
    return {
        "cpu": src * dom_cpus + rng.integers(0, dom_cpus, n),
        "src_dom": src,
        "dst_dom": dst,
        "cpu_idle": np.minimum(idle[rows, dst], schema.KEY_FIELD_MAX),
        "cpu_not_idle": np.minimum(busy[rows, src], schema.KEY_FIELD_MAX),
        "src_load_q": load_q[rows, src],
        "dst_load_q": load_q[rows, dst],
    }


def _uniform_chunk(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows spread over the feature grid, as any machine could produce them."""
    dom_cpus = rng.choice(DOM_CPUS, CHUNK)
    src_q = rng.integers(1, schema.LOAD_SCALE + 1, CHUNK)
    return {
        "cpu": rng.integers(0, schema.MAX_CPUS, CHUNK),
        "src_dom": np.zeros(CHUNK, np.int64),
        "dst_dom": np.ones(CHUNK, np.int64),
        "cpu_idle": rng.integers(0, dom_cpus + 1),
        "cpu_not_idle": rng.integers(0, dom_cpus + 1),
        "src_load_q": src_q,
        "dst_load_q": rng.integers(0, src_q),
    }


def synthetic_dataset(nr_rows: int, seed: int) -> Dataset:
    """nr_rows synthetic candidates in the dataset format, labeled by rule()."""
    rng = np.random.default_rng(seed)
    chunks: list[dict[str, np.ndarray]] = []
    nr_uniform = int(nr_rows * UNIFORM_SHARE)
    have = 0
    while have < nr_rows - nr_uniform:
        chunk = _pattern_chunk(rng)
        chunks.append(chunk)
        have += len(chunk["cpu"])
    for _ in range(-(-nr_uniform // CHUNK)):
        chunks.append(_uniform_chunk(rng))
    cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = rng.permutation(len(cols["cpu"]))[:nr_rows]
    cols = {k: v[order] for k, v in cols.items()}
    label = rule(cols["cpu_idle"], cols["src_load_q"], cols["dst_load_q"])
    # `action`: what the kernel's heuristic fallback would have done (the first clause).
    action = fallback.heuristic_migrate(
        cols["cpu_idle"], cols["src_load_q"], cols["dst_load_q"]).astype(np.uint8)
    cols.update(
        ts_ns=np.arange(nr_rows, dtype=np.uint64) * 1000,
        pid=rng.integers(1, 1 << 22, nr_rows),
        action=action,
        source=np.full(nr_rows, contract.Source.FALLBACK),
        label=label,
    )
    dtypes = {name: dtype for name, dtype, _, _ in COLUMNS}
    return Dataset({k: np.asarray(cols[k]).astype(dtypes[k]) for k in COLUMN_NAMES}, "synthetic")


# --- a logged collection run with known costs -------------------------------------------------


def expected_cost(columns: dict[str, np.ndarray], migrate: np.ndarray) -> np.ndarray:
    """The simulated expected delay per run time of each row under an action (bool [n])."""
    src = np.asarray(columns["src_load_q"], np.float64) / schema.LOAD_SCALE
    dst = np.asarray(columns["dst_load_q"], np.float64) / schema.LOAD_SCALE
    keep_cost = SIM_BASE + SIM_PER_LOAD * src
    move_cost = (SIM_BASE + SIM_PER_LOAD * dst + SIM_COLD
                 + SIM_NO_IDLE * (np.asarray(columns["cpu_idle"]) == 0))
    return np.where(np.asarray(migrate, bool), move_cost, keep_cost)


def optimal_migrate(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The best action of each row under the simulated cost model: bool [n]."""
    ones = np.ones(len(columns["cpu_idle"]), bool)
    return expected_cost(columns, ones) < expected_cost(columns, ~ones)


def simulated_logged_dataset(nr_rows: int, seed: int, explore: float = DEFAULT_SIM_EXPLORE,
                             policy: contract.Fallback = contract.Fallback.HEURISTIC) -> Dataset:
    """nr_rows candidates logged by collection mode with exploration P, in format v2."""
    base = synthetic_dataset(nr_rows, seed)
    cols = dict(base.columns)
    rng = np.random.default_rng([seed, 2])
    explore_q = fallback.explore_q_for(explore)
    # The kernel's draws: (prandom & 0xffff) < explore, then one fair bit for the action.
    coin = rng.integers(0, contract.EXPLORE_SCALE, nr_rows) < explore_q
    chosen = fallback.fallback_migrate(policy, cols["cpu_idle"], cols["src_load_q"],
                                       cols["dst_load_q"])
    action = np.where(coin, rng.integers(0, 2, nr_rows).astype(bool), chosen)
    cols["action"] = action.astype(np.uint8)
    cols["source"] = np.where(coin, contract.Source.EXPLORE, contract.Source.FALLBACK)
    cols["label"] = optimal_migrate(cols).astype(np.uint8)
    cols["path"] = np.full(nr_rows, contract.Path.WAKEUP)
    cols.update(logging_columns(cols, explore_q, policy))
    noise = rng.gamma(SIM_NOISE_SHAPE, 1 / SIM_NOISE_SHAPE, nr_rows)
    cost = expected_cost(cols, action) * noise
    run = np.rint(SIM_WINDOW_NS / (1 + cost)).astype(np.int64)  # delay / run = cost
    cols["window_ns"] = np.full(nr_rows, SIM_WINDOW_NS)
    cols["run_ns"] = run
    cols["delay_ns"] = SIM_WINDOW_NS - run
    cols["ts_ns"] = np.arange(nr_rows, dtype=np.uint64) * SIM_ROW_SPACING_NS
    dtypes = {name: dtype for name, dtype, _, _ in COLUMNS_V2}
    return Dataset({k: np.asarray(v).astype(dtypes[k]) for k, v in cols.items()},
                   f"simulated (explore P {explore:g}, seed {seed})")
