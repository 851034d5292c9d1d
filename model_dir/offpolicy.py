"""Counterfactual estimates from logged candidates: costs, IPS and DR, block bootstrap.

A v2 dataset (model_dir/dataset.py) holds, for every candidate, the action the logging policy
took, the probability p with which it took it, and what followed. From that, for any
deterministic policy pi (a decision per row):

- the cost of a row (row_costs): by default the task's run-queue delay per unit of run time
  over the outcome window (tools/outcomes.py's metric; run time floored at RUN_FLOOR_NS so a
  task that only waited has a finite cost), plus --migrate-penalty when it was moved (the
  price of a cold cache, in the same units);
- a direct model q(x, a) of the expected cost of each action (DirectModel: bucket means over
  the decision key, shrunk towards coarser buckets, cross-fitted so a row's own cost never
  predicts itself);
- per-row pseudo-costs G[i, a] of both actions (pseudo_costs):
    IPS  G[i, a] = 1[a_i = a] c_i / p_i
    DR   G[i, a] = q(x_i, a) + 1[a_i = a] (c_i - q(x_i, a_i)) / p_i
  both unbiased for E[c | x_i, a] when the propensities are right (DR also when q is, and
  with a smaller variance when q is near);
- a policy's estimated mean cost: the mean of G[i, pi(x_i)] over the rows (estimate), with a
  95 % bootstrap interval over blocks of rows (bootstrap): outcome windows of one task overlap
  later decisions, so rows close in time are not independent; resampling whole blocks of
  block_ns keeps that correlation inside a draw. Differences between policies are bootstrapped
  paired (the same draws), which is what "learned - heuristic" needs.

numpy only (the layers above import this without TensorFlow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model_dir.dataset import Dataset

COST_KINDS = ("delay-per-run", "wait-share", "log-delay-per-run")
DEFAULT_COST = "delay-per-run"
RUN_FLOOR_NS = 1_000_000  # 1 ms: a task that ran less counts as having run 1 ms
ESTIMATORS = ("ips", "dr")
DEFAULT_ESTIMATOR = "dr"
SHRINK = 5.0  # a bucket's mean counts as SHRINK rows of its parent bucket's
FOLDS = 5
DEFAULT_BOOTSTRAP = 1000
DEFAULT_BLOCK_NS = 1_000_000_000

# The direct model's buckets, finest first (the labeler's in tools/outcomes.py, plus one).
_KEY_FIELDS = ("cpu", "cpu_idle", "cpu_not_idle", "src_load_q", "dst_load_q")
NR_LEVELS = 3


def row_costs(ds: Dataset, kind: str = DEFAULT_COST, migrate_penalty: float = 0.0) -> np.ndarray:
    """The cost of every row (float64 [n]) from its outcome; lower is better.

    delay-per-run      run-queue delay / max(run time, RUN_FLOOR_NS)
    wait-share         delay / (delay + run time), 0..1 (0 when the task did neither)
    log-delay-per-run  log(1 + delay-per-run): a long tail counts less
    """
    ds.require_v2("outcomes (delay_ns, run_ns)")
    delay = ds.columns["delay_ns"].astype(np.float64)
    run = ds.columns["run_ns"].astype(np.float64)
    if kind == "delay-per-run":
        cost = delay / np.maximum(run, RUN_FLOOR_NS)
    elif kind == "wait-share":
        total = delay + run
        cost = np.where(total > 0, delay / np.maximum(total, 1.0), 0.0)
    elif kind == "log-delay-per-run":
        cost = np.log1p(delay / np.maximum(run, RUN_FLOOR_NS))
    else:
        raise ValueError(f"cost must be one of {', '.join(COST_KINDS)}, not {kind!r}")
    return cost + migrate_penalty * ds.actions.astype(np.float64)


def bucket_ids(columns: Mapping[str, np.ndarray], level: int) -> np.ndarray:
    """Each row's bucket at a level (0: the decision key, 1: without the cpu, 2: idle>0, gap)."""
    f = {k: np.asarray(columns[k], dtype=np.int64) for k in _KEY_FIELDS}
    if level == 0:
        return ((f["cpu"] << 32) | (f["cpu_idle"] << 24) | (f["cpu_not_idle"] << 16)
                | (f["src_load_q"] << 8) | f["dst_load_q"])
    if level == 1:
        return ((f["cpu_idle"] << 24) | (f["cpu_not_idle"] << 16) | (f["src_load_q"] << 8)
                | f["dst_load_q"])
    if level == 2:
        return ((f["cpu_idle"] > 0).astype(np.int64) << 8) | (f["src_load_q"] - f["dst_load_q"])
    raise ValueError(f"no bucket level {level}")


@dataclass(frozen=True)
class _Sums:
    ids: np.ndarray  # sorted bucket ids
    sums: np.ndarray
    counts: np.ndarray

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.ids):
            return np.zeros(len(ids)), np.zeros(len(ids))
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        hit = self.ids[pos] == ids
        return np.where(hit, self.sums[pos], 0.0), np.where(hit, self.counts[pos], 0.0)


class DirectModel:
    """q(x, a): the mean cost of action a in x's bucket, shrunk towards the coarser buckets.

    Level by level from the action's overall mean (the mean of all rows when the action was
    never taken) down to the decision key: q = (bucket sum + SHRINK * parent q) / (bucket
    count + SHRINK). A key seen often gets its own mean; an unseen one its parent's.
    """

    def __init__(self, columns: Mapping[str, np.ndarray], action: np.ndarray,
                 cost: np.ndarray) -> None:
        action = np.asarray(action, dtype=np.int64)
        cost = np.asarray(cost, dtype=np.float64)
        overall = float(cost.mean()) if len(cost) else 0.0
        self.base: list[float] = []
        self.levels: list[list[_Sums]] = []
        for a in (0, 1):
            rows = action == a
            self.base.append(float(cost[rows].mean()) if rows.any() else overall)
            per_level = []
            for level in range(NR_LEVELS):
                ids = bucket_ids({k: np.asarray(columns[k])[rows] for k in _KEY_FIELDS}, level)
                uniq, inv = np.unique(ids, return_inverse=True)
                per_level.append(_Sums(uniq, np.bincount(inv, weights=cost[rows],
                                                         minlength=len(uniq)),
                                       np.bincount(inv, minlength=len(uniq)).astype(float)))
            self.levels.append(per_level)

    def predict(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """float64 [n, 2]: the expected cost of keeping (column 0) and migrating (1)."""
        n = len(np.asarray(columns["cpu"]))
        ids = [bucket_ids(columns, level) for level in range(NR_LEVELS)]
        out = np.empty((n, 2))
        for a in (0, 1):
            q = np.full(n, self.base[a])
            for level in reversed(range(NR_LEVELS)):
                s, c = self.levels[a][level].lookup(ids[level])
                q = (s + SHRINK * q) / (c + SHRINK)
            out[:, a] = q
        return out


def _take(columns: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(columns[k])[index] for k in _KEY_FIELDS}


def crossfit_direct(columns: Mapping[str, np.ndarray], action: np.ndarray, cost: np.ndarray,
                    folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """q(x_i, a) for every row, [n, 2], each row's from a model fitted without its fold."""
    n = len(cost)
    folds = max(1, min(folds, n))
    fold = np.random.default_rng([seed, 7]).permutation(n) % folds
    q = np.empty((n, 2))
    for f in range(folds):
        out = fold == f
        fit = ~out if folds > 1 else out
        model = DirectModel(_take(columns, fit), np.asarray(action)[fit], np.asarray(cost)[fit])
        q[out] = model.predict(_take(columns, out))
    return q


def pseudo_costs(cost: np.ndarray, action: np.ndarray, prop: np.ndarray, estimator: str,
                 q: np.ndarray | None = None) -> np.ndarray:
    """[n, 2] per-row estimates of the cost of keeping and of migrating (module docstring)."""
    n = len(cost)
    action = np.asarray(action, dtype=np.int64)
    taken = np.zeros((n, 2))
    taken[np.arange(n), action] = 1.0
    if estimator == "ips":
        return taken * (np.asarray(cost) / np.asarray(prop))[:, None]
    if estimator == "dr":
        if q is None:
            raise ValueError("the DR estimator needs the direct model's q")
        residual = (np.asarray(cost) - q[np.arange(n), action]) / np.asarray(prop)
        return q + taken * residual[:, None]
    raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")


def contributions(g: np.ndarray, migrate: np.ndarray) -> np.ndarray:
    """Each row's term of a policy's mean cost: G[i, pi(x_i)]."""
    return g[np.arange(len(g)), np.asarray(migrate, dtype=np.int64)]


def block_ids(ts_ns: np.ndarray, block_ns: int) -> np.ndarray:
    """The bootstrap block of every row: its time bucket, or the row itself when block_ns = 0."""
    if block_ns <= 0:
        return np.arange(len(ts_ns))
    return (np.asarray(ts_ns, dtype=np.uint64) // np.uint64(block_ns)).astype(np.int64)


def bootstrap(values: np.ndarray, blocks: np.ndarray, nr: int = DEFAULT_BOOTSTRAP,
              seed: int = 0) -> np.ndarray:
    """[nr, m] means of values ([m, n]) over block-bootstrap resamples of the n rows."""
    values = np.atleast_2d(values)
    _, inv = np.unique(blocks, return_inverse=True)
    k = int(inv.max()) + 1 if len(inv) else 0
    sums = np.stack([np.bincount(inv, weights=v, minlength=k) for v in values])  # [m, k]
    counts = np.bincount(inv, minlength=k).astype(np.float64)
    rng = np.random.default_rng([seed, 11])
    out = np.empty((nr, len(values)))
    for b in range(nr):
        w = np.bincount(rng.integers(0, k, k), minlength=k).astype(np.float64)
        out[b] = (sums @ w) / (counts @ w)
    return out


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float  # 95 % bootstrap interval
    hi: float
    se: float  # bootstrap standard deviation

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


@dataclass(frozen=True)
class PolicyReport:
    name: str
    migrate_share: float  # of the rows' decisions
    matched: int  # rows whose logged action is the policy's
    ess: float  # effective sample size of the IPS weights of the matched rows
    estimates: dict[str, Estimate]  # by estimator
    vs_baseline: dict[str, Estimate] | None  # policy - baseline, paired, by estimator


def _estimate(mean: float, draws: np.ndarray) -> Estimate:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Estimate(mean, float(lo), float(hi), float(np.std(draws, ddof=1)))


def evaluate(ds: Dataset, policies: Mapping[str, np.ndarray], *, cost: np.ndarray,
             baseline: str | None = "heuristic", estimators: Sequence[str] = ESTIMATORS,
             nr_boot: int = DEFAULT_BOOTSTRAP, block_ns: int = DEFAULT_BLOCK_NS,
             seed: int = 0) -> list[PolicyReport]:
    """The estimated mean cost of every policy (name -> bool [n] decisions) on ds."""
    action = ds.actions.astype(np.int64)
    prop = ds.propensities()
    q = crossfit_direct(ds.columns, action, cost, seed=seed)
    g = {e: pseudo_costs(cost, action, prop, e, q) for e in estimators}
    names = list(policies)
    blocks = block_ids(ds.columns["ts_ns"], block_ns)
    rows: dict[str, list[np.ndarray]] = {e: [] for e in estimators}
    for name in names:
        for e in estimators:
            rows[e].append(contributions(g[e], policies[name]))
    if baseline is not None and baseline not in policies:
        raise ValueError(f"baseline {baseline!r} is not among the policies")
    base_index = names.index(baseline) if baseline is not None else None
    draws: dict[str, np.ndarray] = {}
    for e in estimators:
        values = np.stack(rows[e])
        if base_index is not None:
            values = np.concatenate([values, values - values[base_index]])
        draws[e] = bootstrap(values, blocks, nr_boot, seed)
    out = []
    m = len(names)
    for j, name in enumerate(names):
        migrate = np.asarray(policies[name], bool)
        match = migrate.astype(np.int64) == action
        w = 1.0 / prop[match]
        ess = float(w.sum() ** 2 / (w * w).sum()) if match.any() else 0.0
        est = {e: _estimate(float(rows[e][j].mean()), draws[e][:, j]) for e in estimators}
        diff = None
        if base_index is not None and j != base_index:
            diff = {e: _estimate(float((rows[e][j] - rows[e][base_index]).mean()),
                                 draws[e][:, m + j]) for e in estimators}
        out.append(PolicyReport(name, float(migrate.mean()), int(match.sum()), ess, est, diff))
    return out


# --- safe policy improvement: deviate from the heuristic only where the evidence is strong --

SAFE_LEVELS = (2, 1)  # the heuristic's own inputs (cpu_idle > 0, load gap), then the key w/o cpu
SAFE_MIN_ROWS = 20  # a bucket with fewer rows is never tested


@dataclass(frozen=True)
class BucketEffect:
    """The estimated mean of cost(migrate) - cost(keep) over a bucket's rows."""

    level: int  # bucket_ids() level
    bucket: int  # bucket_ids() value
    rows: int
    mean: float
    se: float  # block bootstrap
    heuristic: bool  # what the heuristic decides there (one decision per bucket)

    def decision(self, z: float) -> bool | None:
        """migrate (True) or keep (False) when the mean clears z standard errors, else None."""
        if self.se > 0 and abs(self.mean) > z * self.se:
            return self.mean < 0
        return None


def _bucket_heuristic(columns: Mapping[str, np.ndarray], rows: np.ndarray) -> bool:
    from model_dir import fallback

    i = int(np.flatnonzero(rows)[0])  # buckets of levels 1 and 2 fix the heuristic's inputs
    return bool(fallback.heuristic_migrate(np.asarray(columns["cpu_idle"])[i:i + 1],
                                           np.asarray(columns["src_load_q"])[i:i + 1],
                                           np.asarray(columns["dst_load_q"])[i:i + 1])[0])


def bucket_effects(columns: Mapping[str, np.ndarray], delta: np.ndarray, *,
                   levels: Sequence[int] = SAFE_LEVELS, min_rows: int = SAFE_MIN_ROWS,
                   nr_boot: int = DEFAULT_BOOTSTRAP, block_ns: int = DEFAULT_BLOCK_NS,
                   seed: int = 0) -> list[BucketEffect]:
    """Every bucket's mean of delta (a row's pseudo-cost of migrating minus keeping) with its
    block-bootstrap standard error (the same blocks as bootstrap(): rows close in time are
    not independent), for the buckets of `levels` with at least min_rows rows."""
    if any(level not in (1, 2) for level in levels):
        raise ValueError("safe buckets are levels 1 and 2, where the heuristic is constant")
    delta = np.asarray(delta, dtype=np.float64)
    found: list[tuple[int, int, np.ndarray]] = []
    for level in levels:
        ids = bucket_ids(columns, level)
        uniq, counts = np.unique(ids, return_counts=True)
        found += [(level, int(b), ids == b) for b, c in zip(uniq, counts, strict=True)
                  if c >= min_rows]
    if not found:
        return []
    values = np.stack([np.where(m, delta, 0.0) for *_, m in found]
                      + [m.astype(np.float64) for *_, m in found])
    draws = bootstrap(values, block_ids(columns["ts_ns"], block_ns), nr_boot, seed)
    k = len(found)
    ratio = draws[:, :k] / np.maximum(draws[:, k:], 1e-12)
    return [BucketEffect(level, bucket, int(m.sum()), float(delta[m].mean()),
                         float(np.std(ratio[:, j], ddof=1)), _bucket_heuristic(columns, m))
            for j, (level, bucket, m) in enumerate(found)]


def safe_deviations(effects: Sequence[BucketEffect], z: float) -> dict[tuple[int, int], bool]:
    """(level, bucket) -> decision for every bucket whose mean clears z standard errors.

    Those that agree with the heuristic are kept too: safe_decide() applies them coarse
    first, so a conclusive finer bucket overrides its coarser one, and an inconclusive one
    follows it.
    """
    return {(e.level, e.bucket): d for e in effects if (d := e.decision(z)) is not None}


def safe_decide(columns: Mapping[str, np.ndarray], deviations: Mapping[tuple[int, int], bool]
                ) -> np.ndarray:
    """The heuristic, overridden by the deviations, coarse buckets first: bool [n]."""
    from model_dir import fallback

    out = fallback.heuristic_migrate(np.asarray(columns["cpu_idle"]),
                                     np.asarray(columns["src_load_q"]),
                                     np.asarray(columns["dst_load_q"])).astype(bool)
    for level in sorted({lv for lv, _ in deviations}, reverse=True):
        ids = bucket_ids(columns, level)
        for (lv, bucket), migrate in deviations.items():
            if lv == level:
                out[ids == bucket] = migrate
    return out


def key_columns(keys: np.ndarray) -> dict[str, np.ndarray]:
    """The integer key fields of packed decision keys (what bucket_ids() reads)."""
    from loader import schema

    return {name: v.astype(np.int64) for name, v in schema.key_fields(keys).items()}


def describe_bucket(level: int, bucket: int) -> str:
    """A bucket id in words."""
    if level == 2:
        return f"cpu_idle {'> 0' if bucket >> 8 else '0'}, load gap {bucket & 0xff}"
    if level == 1:
        return (f"cpu_idle {(bucket >> 24) & 0xff}, cpu_not_idle {(bucket >> 16) & 0xff}, "
                f"src_load_q {(bucket >> 8) & 0xff}, dst_load_q {bucket & 0xff}")
    return f"key {bucket:#x}"
