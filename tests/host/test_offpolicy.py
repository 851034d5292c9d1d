"""Off-policy estimation with a known answer, and mlsched-evaluate on it (no TensorFlow unless
a model is evaluated).

The data: a simulated collection run (model_dir/synthetic.py): synthetic candidates decided
by collection mode's logging policy (the heuristic, a fair coin with probability P = 0.3),
each with a cost drawn around a known expected cost of its action. The true mean cost of any
policy on those candidates is then known exactly (expected_cost), and IPS and DR estimates
must land within a few standard errors of it. Seeds and sizes are fixed: every figure below
is deterministic; the bounds (4 standard errors) leave room for a change of seed.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loader import contract, schema
from model_dir import dataset, fallback, offpolicy, synthetic

REPO = Path(__file__).resolve().parents[2]
N = 20000
SEED = 3


@pytest.fixture(scope="module")
def logged() -> dataset.Dataset:
    return synthetic.simulated_logged_dataset(N, SEED)


def _policies(ds: dataset.Dataset) -> dict[str, np.ndarray]:
    n = len(ds)
    return {
        "always-keep": np.zeros(n, bool),
        "always-migrate": np.ones(n, bool),
        "heuristic": ds.heuristic(),
        "optimal": synthetic.optimal_migrate(ds.columns),
        "odd cpus": ds.columns["cpu"] % 2 == 1,  # any deterministic policy
    }


def _truth(ds: dataset.Dataset, migrate: np.ndarray) -> float:
    return float(synthetic.expected_cost(ds.columns, migrate).mean())


@pytest.fixture(scope="module")
def reports(logged: dataset.Dataset) -> dict[str, offpolicy.PolicyReport]:
    cost = offpolicy.row_costs(logged)
    out = offpolicy.evaluate(logged, _policies(logged), cost=cost, block_ns=0, nr_boot=400)
    return {r.name: r for r in out}


def test_the_simulated_run_is_a_collection_run(logged: dataset.Dataset) -> None:
    """Coin flips at the configured rate, fallback rows doing what the fallback does, costs
    recoverable from the outcome columns exactly as row_costs() reads them."""
    explore = logged.sources == contract.Source.EXPLORE
    assert abs(explore.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / N)
    assert np.array_equal(logged.actions[~explore], logged.heuristic()[~explore])
    assert set(np.unique(logged.propensities()).round(4)) == {0.15, 0.85}
    cost = offpolicy.row_costs(logged)
    assert np.all(cost > 0) and np.all(np.isfinite(cost))
    mu = synthetic.expected_cost(logged.columns, logged.actions.astype(bool))
    assert float(np.mean(cost / mu)) == pytest.approx(1.0, abs=0.02)  # noise of mean 1


@pytest.mark.parametrize("estimator", offpolicy.ESTIMATORS)
@pytest.mark.parametrize("policy", ["always-keep", "always-migrate", "heuristic", "optimal",
                                    "odd cpus"])
def test_estimate_lands_on_the_true_value(logged, reports, estimator, policy) -> None:
    est = reports[policy].estimates[estimator]
    truth = _truth(logged, _policies(logged)[policy])
    assert abs(est.mean - truth) < 4 * est.se, (est, truth)
    assert est.lo < est.mean < est.hi and est.se > 0


@pytest.mark.parametrize("estimator", offpolicy.ESTIMATORS)
def test_paired_difference_finds_the_better_policy(logged, reports, estimator) -> None:
    """optimal - heuristic is about -0.05 here: the paired interval must show it."""
    pol = _policies(logged)
    truth = _truth(logged, pol["optimal"]) - _truth(logged, pol["heuristic"])
    diff = reports["optimal"].vs_baseline[estimator]
    assert truth < -0.03
    assert abs(diff.mean - truth) < 4 * diff.se
    assert diff.hi < 0 and diff.excludes_zero()
    assert reports["heuristic"].vs_baseline is None  # the baseline itself


def test_dr_is_tighter_than_ips_here(reports) -> None:
    for policy in ("always-keep", "always-migrate"):
        r = reports[policy].estimates
        assert r["dr"].se < 0.8 * r["ips"].se, policy


def test_a_naive_estimate_misses_by_far(logged, reports) -> None:
    """The test above has power: ignoring the propensities lands many standard errors away."""
    cost = offpolicy.row_costs(logged)
    truth = _truth(logged, np.ones(len(logged), bool))
    se = reports["always-migrate"].estimates["ips"].se
    naive = float(cost[logged.actions == 1].mean())  # mean cost of the rows that migrated
    assert abs(naive - truth) > 8 * se
    unweighted = offpolicy.pseudo_costs(cost, logged.actions, np.ones(len(logged)), "ips")
    assert abs(float(unweighted[:, 1].mean()) - truth) > 8 * se


def test_dr_stays_unbiased_with_a_wrong_direct_model(logged, reports) -> None:
    """With the right propensities, DR does not need a good q (only its variance does)."""
    cost = offpolicy.row_costs(logged)
    wrong_q = np.full((len(logged), 2), 5.0)
    g = offpolicy.pseudo_costs(cost, logged.actions, logged.propensities(), "dr", wrong_q)
    for name, migrate in _policies(logged).items():
        values = offpolicy.contributions(g, migrate)
        se = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - _truth(logged, migrate)) < 4 * se, name
    ips = offpolicy.pseudo_costs(cost, logged.actions, logged.propensities(), "ips")
    dr0 = offpolicy.pseudo_costs(cost, logged.actions, logged.propensities(), "dr",
                                 np.zeros((len(logged), 2)))
    assert np.allclose(ips, dr0)  # DR with q = 0 is IPS


def test_direct_model_shrinks_towards_coarser_buckets() -> None:
    key = dict(cpu_idle=1, cpu_not_idle=1, src_load_q=8, dst_load_q=2)

    def cols(cpus: list[int]) -> dict[str, np.ndarray]:
        return {"cpu": np.array(cpus), **{k: np.full(len(cpus), v) for k, v in key.items()}}

    # Keep rows: 5 on cpu 0 costing 1, 5 on cpu 1 costing 3. No migrate row at all.
    train = cols([0] * 5 + [1] * 5)
    action = np.zeros(10, np.int64)
    cost = np.array([1.0] * 5 + [3.0] * 5)
    q = offpolicy.DirectModel(train, action, cost).predict(cols([0, 1, 7]))
    s = offpolicy.SHRINK
    # Every coarser bucket holds all 10 rows (mean 2); the key level holds 5 of them.
    parent = 2.0
    for _level in (2, 1):  # both buckets hold all ten rows
        parent = (20.0 + s * parent) / (10 + s)
    assert q[0, 0] == pytest.approx((5.0 + s * parent) / (5 + s))
    assert q[1, 0] == pytest.approx((15.0 + s * parent) / (5 + s))
    assert q[2, 0] == pytest.approx(parent)  # an unseen cpu: its parent's estimate
    assert np.allclose(q[:, 1], 2.0)  # never migrated: the mean of all rows


def test_crossfit_never_predicts_a_row_from_itself() -> None:
    """One row per key and no other information: a row's own cost must not leak into its q."""
    n = 50
    cols = {"cpu": np.arange(n), "cpu_idle": np.zeros(n, int), "cpu_not_idle": np.zeros(n, int),
            "src_load_q": np.full(n, 5), "dst_load_q": np.zeros(n, int)}
    cost = np.zeros(n)
    cost[7] = 1000.0
    q = offpolicy.crossfit_direct(cols, np.zeros(n, int), cost, folds=5)
    fit_all = offpolicy.DirectModel(cols, np.zeros(n, int), cost).predict(cols)
    assert fit_all[7, 0] > 150  # fitted on itself, the row would predict itself (183)
    assert q[7, 0] < 30


def test_row_costs_kinds() -> None:
    ms = 1_000_000
    cols = {name: np.zeros(4, np.uint64) for name in dataset.COLUMN_NAMES_V2}
    cols["delay_ns"] = np.array([5 * ms, 5 * ms, 0, 2 * ms], np.uint64)
    cols["run_ns"] = np.array([10 * ms, 0, 0, 2 * ms], np.uint64)
    cols["action"] = np.array([0, 0, 0, 1], np.uint8)
    ds = dataset.Dataset(cols)
    assert offpolicy.row_costs(ds).tolist() == [0.5, 5.0, 0.0, 1.0]  # run floored at 1 ms
    assert offpolicy.row_costs(ds, "wait-share").tolist() == pytest.approx([1 / 3, 1, 0, 0.5])
    assert offpolicy.row_costs(ds, "log-delay-per-run").tolist() == pytest.approx(
        np.log1p([0.5, 5.0, 0.0, 1.0]).tolist())
    assert offpolicy.row_costs(ds, migrate_penalty=0.25).tolist() == [0.5, 5.0, 0.0, 1.25]
    v1 = dataset.Dataset({name: cols[name] for name in dataset.COLUMN_NAMES})
    with pytest.raises(dataset.DatasetError, match="format v1 has no outcomes"):
        offpolicy.row_costs(v1)


def test_block_bootstrap_keeps_correlated_rows_together() -> None:
    """Rows of one block share a common shock: resampling rows alone understates the spread."""
    rng = np.random.default_rng(5)
    k, per = 60, 100
    shock = np.repeat(rng.normal(0, 1, k), per)
    values = shock + rng.normal(0, 0.1, k * per)
    ts = np.arange(k * per, dtype=np.uint64) * np.uint64(10_000_000)  # 100 rows a second
    block_means = values.reshape(k, per).mean(axis=1)
    want = block_means.std(ddof=1) / np.sqrt(k)
    by_block = offpolicy.bootstrap(values, offpolicy.block_ids(ts, 10**9), 800)[:, 0]
    by_row = offpolicy.bootstrap(values, offpolicy.block_ids(ts, 0), 800)[:, 0]
    assert by_block.std() == pytest.approx(want, rel=0.2)
    assert by_row.std() < 0.3 * want


# --- safe policy improvement ------------------------------------------------------------------


def _bucketed(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows in three (cpu_idle, load) cells; the migrate - keep difference known per cell."""
    rng = np.random.default_rng(seed)
    n = 3000
    cell = rng.integers(0, 3, n)
    cols = {
        "ts_ns": np.sort(rng.integers(0, 60 * 10**9, n)),
        "cpu": rng.integers(0, 4, n),
        "cpu_idle": np.array([1, 1, 0])[cell],
        "cpu_not_idle": np.full(n, 2),
        "src_load_q": np.array([6, 10, 10])[cell],
        "dst_load_q": np.array([4, 4, 4])[cell],
    }
    # Cell 0 (idle, gap 2: the heuristic keeps): migrating is much cheaper; cell 1 (idle, gap
    # 6: it migrates): no difference; cell 2 (no idle CPU, gap 6: it keeps): noise only.
    delta = np.array([-3.0, 0.0, 0.0])[cell] + rng.normal(0, 5, n)
    return cols, delta


def test_safe_deviates_only_where_the_evidence_is_strong() -> None:
    cols, delta = _bucketed()
    effects = offpolicy.bucket_effects(cols, delta, nr_boot=300)
    by = {(e.level, e.bucket): e for e in effects}
    strong = by[(1, int(offpolicy.bucket_ids(cols, 1)[cols["src_load_q"] == 6][0]))]
    assert strong.mean == pytest.approx(-3.0, abs=0.5) and not strong.heuristic
    assert 0.1 < strong.se < 0.4  # ~ 5 / sqrt(1000), the rows independent here
    deviations = offpolicy.safe_deviations(effects, 1.96)
    assert deviations[(strong.level, strong.bucket)] is True
    decided = offpolicy.safe_decide(cols, deviations)
    heur = fallback.heuristic_migrate(cols["cpu_idle"], cols["src_load_q"], cols["dst_load_q"])
    changed = decided != heur
    assert changed.any() and (cols["src_load_q"][changed] == 6).all()
    # Too few rows: nothing tested, the heuristic stands.
    assert offpolicy.bucket_effects(cols, delta, min_rows=10**6) == []
    assert (offpolicy.safe_decide(cols, {}) == heur).all()


def test_safe_finer_buckets_override_coarser_ones() -> None:
    cols, _ = _bucketed()
    coarse = int(offpolicy.bucket_ids(cols, 2)[cols["src_load_q"] == 6][0])
    fine = int(offpolicy.bucket_ids(cols, 1)[cols["src_load_q"] == 6][0])
    decided = offpolicy.safe_decide(cols, {(2, coarse): True, (1, fine): False})
    assert not decided[cols["src_load_q"] == 6].any()
    keys = schema.pack_keys(cols["cpu"], cols["cpu_idle"], cols["cpu_not_idle"],
                              cols["src_load_q"], cols["dst_load_q"])
    back = offpolicy.key_columns(keys)
    for name in ("cpu", "cpu_idle", "cpu_not_idle", "src_load_q", "dst_load_q"):
        assert back[name].tolist() == cols[name].tolist()
    assert offpolicy.describe_bucket(1, fine) == ("cpu_idle 1, cpu_not_idle 2, src_load_q 6, "
                                                  "dst_load_q 4")
    assert offpolicy.describe_bucket(2, coarse) == "cpu_idle > 0, load gap 2"


# --- mlsched-evaluate -----------------------------------------------------------------------


def _evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """Another simulated run (another seed): the held-out data of an evaluation."""
    ds = synthetic.simulated_logged_dataset(8000, seed=11)
    path = tmp_path_factory.mktemp("eval") / "heldout.csv.gz"
    dataset.write_dataset(path, ds.columns, ("a simulated collection run",))
    return path


def test_evaluate_prints_json_and_plots(tmp_path: Path, heldout: Path) -> None:
    out, png, md = tmp_path / "e.json", tmp_path / "e.png", tmp_path / "e.md"
    res = _evaluate("--data", str(heldout), "--no-dummy", "--bootstrap", "300", "--block-s", "0",
                    "--json", str(out), "--plot", str(png), "--markdown", str(md))
    assert res.returncode == 0, res.stderr
    table = md.read_text().splitlines()
    assert "| policy | migrate | matched | ESS | IPS mean [95 %] | DR mean [95 %] |" in table
    # policies (the baselines and the bundled model, --model's default), differences
    assert sum(line.startswith("| `") for line in table) == 4 + 3
    assert any(line.startswith("| `always-keep` |") and "interval" in line for line in table)
    assert "signal and noise: " in res.stdout and "DR se, rows to exclude 0" in md.read_text()
    for text in ("always-keep", "always-migrate", "heuristic", "IPS mean [95 % interval]",
                 "DR mean [95 % interval]", "difference with the heuristic",
                 "8000 single rows", "explore P 0.300003"):
        assert text in res.stdout, text
    doc = json.loads(out.read_text())
    by_name = {p["name"]: p for p in doc["policies"]}
    # Rows for the interval to clear 0: n (1.96 se / |mean|)^2, from the same figures.
    d = by_name["always-keep"]["vs_baseline"]["dr"]
    assert doc["rows_needed"]["always-keep"]["dr"] == pytest.approx(
        8000 * (1.96 * d["se"] / abs(d["mean"])) ** 2)
    assert set(doc["rows_needed"]) <= {"always-keep", "always-migrate", "model_dir/model_path"}
    assert {"always-keep", "always-migrate"} <= set(doc["rows_needed"])
    ds = dataset.read_dataset(heldout)
    for name, migrate in (("heuristic", ds.heuristic()),
                          ("always-migrate", np.ones(len(ds), bool))):
        for e in ("ips", "dr"):
            est = by_name[name]["estimates"][e]
            assert abs(est["mean"] - _truth(ds, migrate)) < 4 * est["se"], (name, e)
    assert _png_size(png)[0] == 780  # one panel: the policies


def test_evaluate_models_and_learning_curve(tmp_path: Path, heldout: Path, dummy: Path) -> None:
    history = tmp_path / "h.json"
    history.write_text(json.dumps({"objective": "policy", "best_epoch": 2, "epochs": [
        {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "val_cost_dr": 1.1 - e / 100,
         "val_cost_dr_heuristic": 1.1} for e in (1, 2, 3)]}))
    png = tmp_path / "e.png"
    res = _evaluate("--data", str(heldout), "--dummy", str(dummy), "--model", str(dummy),
                    "--bootstrap", "100", "--history", str(history), "--plot", str(png))
    assert res.returncode == 0, res.stderr
    assert f"model dummy ({dummy}): numpy: verified fast-path weights" in res.stdout
    assert res.stdout.count(f"dummy ({dummy})") == 4  # backend line, table, diff, signal+noise
    assert "blocks of 1 s" in res.stdout
    assert _png_size(png)[0] == 1560  # two panels: the learning curve too


@pytest.mark.parametrize("make, args, text", [
    ("v1", [], "format v1 has no propensities"),
    ("v2", ["--model", "/nonexistent/model"], "/nonexistent/model"),
    ("v2", ["--estimators", "ips,xx"], "--estimators: choose from ips, dr"),
    ("v2", ["--plot", "x.pdf"], "--plot: expected a .png file name"),
    ("none", [], "dataset not found at"),
])
def test_evaluate_refuses_with_one_line(tmp_path: Path, make: str, args: list[str],
                                        text: str) -> None:
    path = tmp_path / "d.csv"
    ds = synthetic.simulated_logged_dataset(200, seed=1)
    if make != "none":
        dataset.write_dataset(path, ds.columns, version=1 if make == "v1" else 2)
    res = _evaluate("--data", str(path), "--no-dummy", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in res.stderr, res.stderr
