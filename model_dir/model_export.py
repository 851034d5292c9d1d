"""Train mlsched's migration model and export it as a SavedModel with a verified fast path.

usage: mlsched-export [--objective label|imitate|policy] [--data FILE] --output DIR
                                 [--hidden 64,64] [--epochs N] [--seed N] [--history FILE]

The network is the contract's 10 -> 64 relu -> 64 relu -> 1 sigmoid (--hidden changes the
hidden widths). Every objective goes through the same path: rows are packed into the kernel's
decision keys and unpacked with schema.unpack_keys(), so the model learns on exactly the
inputs the loader will feed it; training stops early when the validation loss has not improved
for a few epochs, and the best epoch's weights (a checkpoint) are the ones exported with
model.export() (input `features`), checked as the loader checks them, and given the verified
numpy fast path. --history FILE writes every epoch's figures as JSON (mlsched-evaluate --plot
draws them).

Objectives:
  label    (default) learn each row's `label`: from --data (format v1 or v2), else from
           synthetic candidates labeled by the rule in model_dir/synthetic.py. Rows are split
           80/20; it prints the validation accuracy, the confusion matrix and how often the
           model disagrees with the rule.
  imitate  learn the kernel's heuristic fallback itself (model_dir/fallback.py) on decision keys:
           the keys of --data, else of synthetic candidates. The distinct keys are split 80/20,
           so the figure it prints, the agreement with the heuristic on held-out keys, is on
           keys the model never saw. It checks features, scaling and training before outcomes
           are involved; the target is >= 99 %.
  policy   learn a policy, not a label, from a v2 dataset (--data; without it, a simulated
           collection run with a known cost model, model_dir/synthetic.py): every row's cost
           (--cost, default the run-queue delay per unit of run time over the outcome window,
           plus --migrate-penalty for a move) is turned into per-row estimates of the cost of
           keeping and of migrating with inverse-propensity (--estimator ips) or doubly-robust
           (dr, default) weighting (model_dir/offpolicy.py); the network is trained to migrate
           where migrating is estimated cheaper: a weighted classification with label
           "migrate cheaper" and weight |cost difference|, whose optimum migrates exactly where
           the estimated mean cost of migrating is lower. It prints the estimated mean cost of
           the learned policy, the heuristic, always-keep and always-migrate on the validation
           rows (and their true costs on simulated data). Judge it on another collection run
           with mlsched-evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loader import cli, contract, schema
from loader.backends import import_tensorflow
from loader.model_check import ModelError
from model_dir import fallback, offpolicy
from model_dir.architecture import DEFAULT_HIDDEN, describe, parse_hidden
from model_dir.dataset import Dataset, DatasetError, read_dataset
from model_dir.export_verified import (
    check_replaceable,
    export_verified,
    made_by,
    report_export,
)
from model_dir.fastpath_verify import MAX_ABS_DIFF
from model_dir.synthetic import (
    DEFAULT_SIM_EXPLORE,
    expected_cost,
    optimal_migrate,
    rule,
    rule_from_features,
    simulated_logged_dataset,
    synthetic_dataset,
)
from model_dir.tool import report_on_stdout, run_or_refuse

if TYPE_CHECKING:
    import keras

__all__ = ["rule", "rule_from_features", "run", "split", "synthetic_dataset", "train"]

log = logging.getLogger("model_export")

DEFAULT_EPOCHS = 40
DEFAULT_SAMPLES = 40000
OBJECTIVES = ("label", "imitate", "policy")
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
PATIENCE = 5  # epochs without a better validation loss before training stops
VALIDATION_SHARE = 0.2
MIN_ROWS = 50
IMITATION_TARGET = 0.99
# Training sees features * FEATURE_SCALE (cpu ids run to hundreds, idle counts to the domain
# size, loads 0..1); the scale is then folded into the first kernel, so the exported model is
# a plain Dense stack on the raw contract features.
FEATURE_SCALE = np.array([1 / 64, 1 / 8, 1 / 8, 4, 4, 1, 1, 1, 1, 1], np.float32)
# The grid on which the model is compared with the rule: every key of this machine size.
RULE_GRID = (16, 8)
VM_GRID = (2, 1)

EXAMPLES = """examples:
  mlsched-export --output /tmp/m          # synthetic data
  mlsched-export --output /tmp/m --epochs 20 --seed 3 --hidden 32,16
  mlsched-export --data candidates.csv --output /tmp/m   # mlsched-collect labels
  mlsched-export --objective imitate --output /tmp/imitate
  mlsched-export --objective policy --output /tmp/sim    # simulated, known costs
  mlsched-export --objective policy --data train.csv --estimator dr \\
      --history /tmp/history.json --output /tmp/learned
  mlsched-evaluate --data heldout.csv --model /tmp/learned --history /tmp/history.json \\
      --plot /tmp/eval.png                         # judge it on another collection run
"""


# --- data -----------------------------------------------------------------------------------


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row indices, shuffled with the seed."""
    order = np.random.default_rng(seed + 1).permutation(n)
    nr_val = max(1, int(round(n * VALIDATION_SHARE)))
    return order[nr_val:], order[:nr_val]


# --- the model ------------------------------------------------------------------------------


def build_model(hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> keras.Model:
    import keras

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name=contract.MODEL_INPUT_KEY)
    x = inputs
    layers = [*((w, "relu") for w in hidden), (1, "sigmoid")]
    for i, (units, activation) in enumerate(layers):
        x = keras.layers.Dense(units, activation=activation, name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="mlsched_migrate")


def fold_feature_scale(model: keras.Model) -> None:
    """Make a model trained on features * FEATURE_SCALE take the raw features."""
    first = model.get_layer("dense_0")
    kernel, bias = first.get_weights()
    first.set_weights([kernel * FEATURE_SCALE[:, None], bias])


EpochFigures = Callable[[Callable[[np.ndarray], np.ndarray]], dict[str, float]]


def _StopWhenExact() -> keras.callbacks.Callback:  # noqa: N802 (a class, built lazily)
    import keras

    class StopWhenExact(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if logs and logs.get("val_accuracy", 0.0) >= 1.0:
                self.model.stop_training = True

    return StopWhenExact()


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    epochs: int,
    seed: int,
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    w_train: np.ndarray | None = None,
    w_val: np.ndarray | None = None,
    epoch_figures: EpochFigures | None = None,
    stop_when_exact: bool = False,
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Fit with early stopping; the best epoch's weights, taking raw features, and the history.

    w_train/w_val weight the rows' losses; epoch_figures(predict) adds figures to each
    epoch's record (predict takes raw features, returns probabilities). stop_when_exact: also
    stop after the first epoch that classifies every validation row right (a table to learn:
    training on makes the network no better, only sharper, and a sharp network's float32
    rounding on inputs far outside the table's breaks the fast path's agreement with TF).
    """
    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model(hidden)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    history: list[dict[str, float]] = []

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x * FEATURE_SCALE, training=False)).reshape(-1)

    def report(epoch: int, logs: dict[str, float]) -> None:
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        if epoch_figures is not None:
            record.update(epoch_figures(predict))
        history.append(record)
        extra = "".join(
            f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and k not in
            ("val_loss", "val_accuracy")
        )
        log.info(
            "epoch %3d/%d: loss %.4f accuracy %6.2f %% | validation loss %.4f accuracy "
            "%6.2f %%%s",
            epoch + 1,
            epochs,
            logs["loss"],
            100 * logs["accuracy"],
            logs["val_loss"],
            100 * logs["val_accuracy"],
            extra,
        )

    val: tuple[np.ndarray, ...] = (x_val * FEATURE_SCALE, y_val.astype(np.float32))
    if w_val is not None:
        val = (*val, w_val.astype(np.float32))
    with tempfile.TemporaryDirectory(prefix="mlsched-train-") as tmp:
        checkpoint = Path(tmp) / "best.weights.h5"
        best = keras.callbacks.ModelCheckpoint(
            str(checkpoint), monitor="val_loss", save_best_only=True, save_weights_only=True
        )
        fitted = model.fit(
            x_train * FEATURE_SCALE,
            y_train.astype(np.float32),
            sample_weight=None if w_train is None else w_train.astype(np.float32),
            validation_data=val,
            epochs=epochs,
            batch_size=BATCH_SIZE,
            shuffle=True,
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE),
                best,
                keras.callbacks.LambdaCallback(on_epoch_end=report),
                *([_StopWhenExact()] if stop_when_exact else []),
            ],
        )
        val_loss = fitted.history["val_loss"]
        best_epoch = int(np.argmin(val_loss))
        stopped = len(val_loss) < epochs
        log.info(
            "%s after epoch %d; best epoch %d (validation loss %.4f), restored from its checkpoint",
            "early stop" if stopped else "done",
            len(val_loss),
            best_epoch + 1,
            val_loss[best_epoch],
        )
        model.load_weights(str(checkpoint))
    fold_feature_scale(model)
    return model, history


# --- reports --------------------------------------------------------------------------------


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """[[keep->keep, keep->migrate], [migrate->keep, migrate->migrate]] counts (row: label)."""
    m = np.zeros((2, 2), np.int64)
    np.add.at(m, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return m


def report_validation(labels: np.ndarray, predicted: np.ndarray) -> float:
    m = confusion(labels, predicted)
    accuracy = float(np.trace(m) / max(m.sum(), 1))
    log.info("validation accuracy: %.2f %% of %d candidates", 100 * accuracy, m.sum())
    log.info("confusion matrix (rows: label, columns: model):")
    log.info("  %-10s %8s %8s", "", "keep", "migrate")
    for name, row in zip(("keep", "migrate"), m, strict=True):
        log.info("  %-10s %8d %8d", name, row[0], row[1])
    return accuracy


def _agreement_by_source(dataset: Dataset) -> str:
    """How often the recorded action was the labeled one, per source (model, fallback...)."""
    parts = []
    for source in contract.Source:
        rows = dataset.sources == source
        n = int(np.count_nonzero(rows))
        if n:
            agree = float(np.mean(dataset.actions[rows] == dataset.labels[rows]))
            parts.append(f"{source.name.lower()} {100 * agree:.2f} % of {n}")
    return ", ".join(parts)


def _pct(n: int, total: int) -> str:
    return f"{n} of {total} ({100 * n / max(total, 1):.2f} %)"


# The output's distance from the threshold, in logits, below which float32 rounding (TF's
# or numpy's) may decide: the fast path is only written when the two agree on every probe
# row. Tried in turn, each while the fast path still does not verify.
THRESHOLD_MARGINS = (2e-6, 1e-5, 5e-5)
THRESHOLD_SHIFT_MAX = 1e-2  # the most the output bias is moved (logit; 0.0025 in probability)


def clear_threshold(model: keras.Model, hidden: tuple[int, ...], margin: float
                    ) -> tuple[float, int]:
    """Move the output bias so that no fast-path probe row sits on the decision threshold.

    A policy learned from weak signals is indifferent (output near 0.5) on much of the input
    space, and among the fast path's probe rows (loader/backends.py: a 32-CPU grid and random
    inputs) one within float32 rounding of the threshold makes TF and numpy decide
    differently, so the fast path is refused. The boundary is moved, by at most
    THRESHOLD_SHIFT_MAX in logit, to the nearest point at least `margin` from every probe
    row's logit: decisions change only on inputs the model is indifferent about. Returns
    (the boundary's new logit, probe rows whose decision changed); (0, 0) when nothing moved.
    """
    from model_dir.fastpath_verify import probe_inputs

    x = probe_inputs(32, 8, 32768, 0)  # write_fastpath()'s probe rows
    layers = [model.get_layer(f"dense_{i}") for i in range(len(hidden) + 1)]
    h = x.astype(np.float64)
    for i, layer in enumerate(layers):
        kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
        h = h @ kernel + bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    logits = h.ravel()
    if not np.any(np.abs(logits) < margin):
        return 0.0, 0
    # Feasible boundaries b: no logit within margin of b. Between sorted neighbours z[j] and
    # z[j+1] they are [z[j] + margin, z[j+1] - margin]; also below the least, above the most.
    z = np.sort(logits)
    lo = np.concatenate([[-np.inf], z + margin])
    hi = np.concatenate([z - margin, [np.inf]])
    ok = lo <= hi
    b = np.clip(0.0, lo[ok], hi[ok])  # each gap's feasible point nearest 0
    best = float(b[np.argmin(np.abs(b))])
    if abs(best) > THRESHOLD_SHIFT_MAX:
        return 0.0, 0
    last = layers[-1]
    kernel, bias = last.get_weights()
    last.set_weights([kernel, (bias - best).astype(bias.dtype)])
    return best, int(np.count_nonzero((logits > 0) != (logits > best)))


def _export(model: keras.Model, output: Path, opts: dict[str, Any]
            ) -> Callable[[np.ndarray], np.ndarray]:
    """Export and verify; the decisions the loader will take with it (bool [n])."""
    hidden = opts["hidden"]
    for attempt, margin in enumerate(THRESHOLD_MARGINS):
        shift, changed = clear_threshold(model, hidden, margin)
        if shift:
            log.info("output bias moved by %.3g (logit) so that no fast-path probe row is "
                     "within %g of the threshold: %d of the probe rows change decision", -shift,
                     margin, changed)
        info, result = export_verified(model, output, opts["provenance"])
        if result.written or attempt == len(THRESHOLD_MARGINS) - 1:
            break
        if not (result.max_abs_diff is not None and result.max_abs_diff <= MAX_ABS_DIFF):
            break  # numpy and TF differ by more than rounding: moving the boundary cannot help
        log.info("%s; moving the boundary further", result.message)
    backend = report_export(info, result, require_fastpath=True)

    def decide(x: np.ndarray) -> np.ndarray:
        return backend.predict(x) > contract.MIGRATE_THRESHOLD

    return decide


def _write_history(path: Path | None, history: list[dict[str, float]], **about: Any) -> None:
    if path is None:
        return
    best = min(history, key=lambda r: r["val_loss"]) if history else None
    doc = {**about, "best_epoch": best["epoch"] if best else None, "epochs": history}
    try:
        path.write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as e:
        raise ModelError(f"--history: cannot write {path} ({e.strerror})") from None
    log.info("training history: %d epochs in %s", len(history), path)


def _check_rows(dataset: Dataset) -> None:
    if len(dataset) < MIN_ROWS:
        raise DatasetError(f"{dataset.source}: {len(dataset)} rows, need at least {MIN_ROWS}")


# --- objectives -----------------------------------------------------------------------------


def _run_label(dataset: Dataset, output: Path, opts: dict[str, Any]) -> dict[str, float]:
    nr_migrate = int(np.count_nonzero(dataset.labels))
    if nr_migrate in (0, len(dataset)):
        only = "migrate" if nr_migrate else "keep"
        raise DatasetError(
            f"{dataset.source}: every row is labeled {only}; training needs both labels"
        )
    log.info("labels: %d migrate / %d keep", nr_migrate, len(dataset) - nr_migrate)
    log.info("the scheduler's own action agreed with the label: %s", _agreement_by_source(dataset))

    x, y = dataset.features(), dataset.labels
    train_idx, val_idx = split(len(dataset), opts["seed"])
    log.info("training on %d candidates, validating on %d", len(train_idx), len(val_idx))
    model, history = train(x[train_idx], y[train_idx], x[val_idx], y[val_idx], opts["epochs"],
                           opts["seed"], opts["hidden"])
    decide = _export(model, output, opts)
    _write_history(opts["history"], history, objective="label", hidden=list(opts["hidden"]))

    predicted_val = decide(x[val_idx]).astype(np.uint8)
    accuracy = report_validation(y[val_idx], predicted_val)
    rule_val = rule_from_features(x[val_idx])
    grid = schema.unpack_keys(schema.feature_grid(*RULE_GRID))
    predicted_grid = decide(grid)
    nr_val_diff = int(np.count_nonzero(predicted_val != rule_val))
    nr_grid_diff = int(np.count_nonzero(predicted_grid != rule_from_features(grid)))
    log.info(
        "model vs the rule: differs on %s validation candidates and on %s keys of the "
        "%d-CPU grid (%d per domain)",
        _pct(nr_val_diff, len(val_idx)),
        _pct(nr_grid_diff, len(grid)),
        *RULE_GRID,
    )
    if opts["data"] is not None:
        log.info(
            "the dataset's labels vs the rule: differ on %s rows",
            _pct(int(np.count_nonzero(rule_from_features(x) != y)), len(y)),
        )
    return {"val_accuracy": accuracy, "rule_disagree_grid": nr_grid_diff / len(grid)}


def _run_imitate(dataset: Dataset, output: Path, opts: dict[str, Any]) -> dict[str, float]:
    keys = np.unique(dataset.keys())
    if len(keys) < 2:
        raise DatasetError(f"{dataset.source}: {len(keys)} distinct key, need 2 to hold one out")
    x = schema.unpack_keys(keys)
    y = fallback.heuristic_from_features(x).astype(np.uint8)
    nr_migrate = int(y.sum())
    if nr_migrate in (0, len(y)):
        only = "migrate" if nr_migrate else "keep"
        raise DatasetError(
            f"{dataset.source}: the heuristic decides {only} on every one of its {len(y)} "
            "keys; nothing to imitate"
        )
    train_idx, val_idx = split(len(keys), opts["seed"])
    log.info(
        "imitating the heuristic fallback on %d distinct keys (%d migrate / %d keep): training "
        "on %d, holding out %d",
        len(keys), nr_migrate, len(keys) - nr_migrate, len(train_idx), len(val_idx),
    )
    model, history = train(x[train_idx], y[train_idx], x[val_idx], y[val_idx], opts["epochs"],
                           opts["seed"], opts["hidden"])
    decide = _export(model, output, opts)
    _write_history(opts["history"], history, objective="imitate", hidden=list(opts["hidden"]))

    held = decide(x[val_idx]) == y[val_idx].astype(bool)
    agreement = float(held.mean())
    log.info(
        "agreement with the heuristic on held-out keys: %s; target >= %.0f %%: %s",
        _pct(int(held.sum()), len(val_idx)),
        100 * IMITATION_TARGET,
        "met" if agreement >= IMITATION_TARGET else "MISSED",
    )
    figures = {"heldout_agreement": agreement, "keys": float(len(keys))}
    for grid in (VM_GRID, RULE_GRID):
        gx = schema.unpack_keys(schema.feature_grid(*grid))
        same = decide(gx) == fallback.heuristic_from_features(gx)
        log.info(
            "agreement on every key of the %d-CPU grid (%d per domain): %s",
            *grid,
            _pct(int(same.sum()), len(gx)),
        )
        figures[f"grid_agreement_{grid[0]}x{grid[1]}"] = float(same.mean())
    return figures


def _policy_targets(
    cost: np.ndarray, dataset: Dataset, q: np.ndarray, estimator: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-costs [n, 2], label (migrate estimated cheaper) and weight |difference|."""
    g = offpolicy.pseudo_costs(cost, dataset.actions, dataset.propensities(), estimator, q)
    delta = g[:, 1] - g[:, 0]
    return g, (delta < 0).astype(np.uint8), np.abs(delta)


def _run_policy(dataset: Dataset, output: Path, opts: dict[str, Any]) -> dict[str, float]:
    dataset.require_v2("propensities and outcomes, which --objective policy learns from")
    estimator, cost_kind = opts["estimator"], opts["cost"]
    cost = offpolicy.row_costs(dataset, cost_kind, opts["migrate_penalty"])
    explore = dataset.columns["explore_q"] / contract.EXPLORE_SCALE
    log.info(
        "logging policy: explore P %s, sources %s; cost %s%s: mean %.4f, median %.4f",
        ", ".join(f"{p:g}" for p in np.unique(explore)),
        ", ".join(f"{s.name.lower()} {int(np.sum(dataset.sources == s))}" for s in
                  contract.Source if np.any(dataset.sources == s)),
        cost_kind,
        f" + {opts['migrate_penalty']:g} per migration" if opts["migrate_penalty"] else "",
        float(cost.mean()),
        float(np.median(cost)),
    )
    if opts.get("safe") is not None:
        return _run_safe_policy(dataset, output, opts, cost)
    train_idx, val_idx = split(len(dataset), opts["seed"])
    tr, va = dataset.subset(train_idx), dataset.subset(val_idx)
    # The direct model: cross-fitted on the training rows; fitted on all of them for the
    # validation rows, whose own costs it never sees.
    q_train = offpolicy.crossfit_direct(tr.columns, tr.actions, cost[train_idx], seed=opts["seed"])
    q_val = offpolicy.DirectModel(tr.columns, tr.actions, cost[train_idx]).predict(va.columns)
    g_train, y_train, w_train = _policy_targets(cost[train_idx], tr, q_train, estimator)
    g_val, y_val, w_val = _policy_targets(cost[val_idx], va, q_val, estimator)
    scale = float(w_train.mean())
    if not scale > 0:
        raise DatasetError(f"{dataset.source}: every row's estimated cost difference is 0")
    log.info(
        "%s pseudo-costs: migrating estimated cheaper on %s training rows; training on %d rows, "
        "validating on %d",
        estimator.upper(), _pct(int(y_train.sum()), len(y_train)), len(train_idx), len(val_idx),
    )
    x_train, x_val = tr.features(), va.features()
    heur_val = va.heuristic()
    heur_cost = float(offpolicy.contributions(g_val, heur_val).mean())

    def epoch_figures(predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        learned = predict(x_val) > contract.MIGRATE_THRESHOLD
        return {
            f"val_cost_{estimator}": float(offpolicy.contributions(g_val, learned).mean()),
            f"val_cost_{estimator}_heuristic": heur_cost,
            "val_migrate_share": float(learned.mean()),
        }

    model, history = train(x_train, y_train, x_val, y_val, opts["epochs"], opts["seed"],
                           opts["hidden"], w_train / scale, w_val / scale, epoch_figures)
    decide = _export(model, output, opts)
    _write_history(opts["history"], history, objective="policy", hidden=list(opts["hidden"]),
                   estimator=estimator, cost=cost_kind, migrate_penalty=opts["migrate_penalty"],
                   data=dataset.source)

    n_val = len(va)
    learned = decide(x_val)
    policies = {
        "always-keep": np.zeros(n_val, bool),
        "always-migrate": np.ones(n_val, bool),
        "heuristic": heur_val,
        "learned": learned,
    }
    simulated = opts["data"] is None
    if simulated:
        policies["optimal (simulation)"] = optimal_migrate(va.columns)
    # Simulated rows are independent; collected ones are resampled in blocks of a second.
    block_ns = 0 if simulated else offpolicy.DEFAULT_BLOCK_NS
    reports = offpolicy.evaluate(va, policies, cost=cost[val_idx], nr_boot=opts["bootstrap"],
                                 block_ns=block_ns, seed=opts["seed"])
    log.info("estimated mean cost on the %d validation rows (95 %% bootstrap intervals):", n_val)
    for r in reports:
        est = "  ".join(
            f"{e.upper()} {v.mean:.4f} [{v.lo:.4f}, {v.hi:.4f}]" for e, v in r.estimates.items()
        )
        true = ""
        if simulated:
            true = f"  true {float(expected_cost(va.columns, policies[r.name]).mean()):.4f}"
        log.info("  %-22s migrate %5.1f %%  %s%s", r.name, 100 * r.migrate_share, est, true)
    mine = next(r for r in reports if r.name == "learned")
    assert mine.vs_baseline is not None
    diff = mine.vs_baseline[estimator]
    log.info(
        "learned - heuristic (%s): %.4f [%.4f, %.4f]: %s",
        estimator.upper(), diff.mean, diff.lo, diff.hi,
        ("lower, the interval excludes 0" if diff.hi < 0 else
         "higher, the interval excludes 0" if diff.lo > 0 else "the interval includes 0"),
    )
    grid = schema.unpack_keys(schema.feature_grid(*RULE_GRID))
    g_learned = decide(grid)
    log.info(
        "on every key of the %d-CPU grid (%d per domain): migrates on %.1f %% (heuristic "
        "%.1f %%), differs from the heuristic on %s",
        *RULE_GRID, 100 * g_learned.mean(), 100 * fallback.heuristic_from_features(grid).mean(),
        _pct(int(np.count_nonzero(g_learned != fallback.heuristic_from_features(grid))),
             len(grid)),
    )
    figures = {
        f"val_cost_{estimator}": mine.estimates[estimator].mean,
        f"val_cost_{estimator}_heuristic": next(
            r for r in reports if r.name == "heuristic").estimates[estimator].mean,
        f"val_diff_{estimator}": diff.mean,
        f"val_diff_{estimator}_lo": diff.lo,
        f"val_diff_{estimator}_hi": diff.hi,
    }
    if simulated:
        figures["true_cost"] = float(expected_cost(va.columns, learned).mean())
        figures["true_cost_heuristic"] = float(expected_cost(va.columns, heur_val).mean())
        figures["true_cost_optimal"] = float(
            expected_cost(va.columns, optimal_migrate(va.columns)).mean())
        src_q, dst_q = fallback.load_quanta(grid)
        best = optimal_migrate({"cpu_idle": grid[:, 1], "src_load_q": src_q, "dst_load_q": dst_q})
        figures["grid_agreement_optimal"] = float(np.mean(g_learned == best))
    return figures


SAFE_GRID = (8, 4)  # the keys --safe's network also learns the table on, beyond the data's


def _run_safe_policy(dataset: Dataset, output: Path, opts: dict[str, Any],
                     cost: np.ndarray) -> dict[str, float]:
    """--safe Z: the heuristic, except on the buckets where the run's evidence is strong.

    Every row's DR (or IPS) pseudo-costs, cross-fitted over the whole run; per bucket of
    offpolicy.SAFE_LEVELS (the heuristic's inputs, then the key without the CPU) with enough
    rows, the mean of migrate - keep and its block-bootstrap standard error; where the mean
    clears Z of them, that bucket's decision is the cheaper action, elsewhere the heuristic's
    (finer buckets override coarser ones). The network learns that table on the data's keys
    and every key of a SAFE_GRID machine, a classification it learns exactly like imitation.
    """
    estimator, z = opts["estimator"], float(opts["safe"])
    action = dataset.actions.astype(np.int64)
    q = offpolicy.crossfit_direct(dataset.columns, action, cost, seed=opts["seed"])
    g = offpolicy.pseudo_costs(cost, action, dataset.propensities(), estimator, q)
    effects = offpolicy.bucket_effects(dataset.columns, g[:, 1] - g[:, 0],
                                       nr_boot=opts["bootstrap"], seed=opts["seed"])
    deviations = offpolicy.safe_deviations(effects, z)
    log.info(
        "%s pseudo-costs on all %d rows; %d buckets of >= %d rows tested (levels: %s); the "
        "mean of migrate - keep clears %g standard errors on %d:",
        estimator.upper(), len(dataset), len(effects), offpolicy.SAFE_MIN_ROWS,
        ", ".join({2: "cpu_idle>0 and load gap", 1: "key without cpu"}[lv]
                  for lv in offpolicy.SAFE_LEVELS), z, len(deviations),
    )
    for e in effects:
        d = e.decision(z)
        if d is None:
            continue
        verdict = ("migrate" if d else "keep") + (
            " (the heuristic's too)" if d == e.heuristic else
            f" (the heuristic {'migrates' if e.heuristic else 'keeps'}: deviate)")
        log.info("  %-62s %5d rows  %+9.4f se %.4f  -> %s",
                 offpolicy.describe_bucket(e.level, e.bucket), e.rows, e.mean, e.se, verdict)
    # The examples, each labeled by the table: every key of a small machine's grid; as many
    # random keys of machines up to schema.MAX_CPUS CPUs (where the heuristic's rule holds
    # too, and the fast path's probe rows go: a network left to extrapolate there is sharp and
    # wild, and float32 rounding then parts numpy from TF); the data's rows, repeated so that
    # its keys weigh as much again.
    grid = schema.feature_grid(*SAFE_GRID)
    rng = np.random.default_rng([opts["seed"], 5])
    wide = schema.pack_keys(rng.integers(0, schema.MAX_CPUS, len(grid)),
                              *rng.integers(0, 65, (2, len(grid))),
                              *np.sort(rng.integers(0, schema.LOAD_SCALE + 1, (2, len(grid))),
                                       axis=0)[::-1])
    keys = dataset.keys()
    reps = max(1, len(grid) // max(len(keys), 1))
    all_keys = np.concatenate([grid, wide, np.tile(keys, reps)])
    y = offpolicy.safe_decide(offpolicy.key_columns(all_keys), deviations).astype(np.uint8)
    x = schema.unpack_keys(all_keys)
    train_idx, val_idx = split(len(all_keys), opts["seed"])
    rows_table = offpolicy.safe_decide(dataset.columns, deviations)
    x_rows = dataset.features()
    heur = dataset.heuristic()
    log.info("the table deviates from the heuristic on %s of the run's rows; training on %d "
             "examples (%d keys of the %d-CPU grid, as many random ones, the run's %d rows x "
             "%d), validating on %d",
             _pct(int(np.count_nonzero(rows_table != heur)), len(heur)), len(train_idx),
             len(grid), SAFE_GRID[0], len(keys), reps, len(val_idx))

    def epoch_figures(predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        learned = predict(x_rows) > contract.MIGRATE_THRESHOLD
        return {
            f"val_cost_{estimator}": float(offpolicy.contributions(g, learned).mean()),
            f"val_cost_{estimator}_heuristic": float(offpolicy.contributions(g, heur).mean()),
            "val_table_agreement": float(np.mean(learned == rows_table)),
        }

    model, history = train(x[train_idx], y[train_idx], x[val_idx], y[val_idx], opts["epochs"],
                           opts["seed"], opts["hidden"], epoch_figures=epoch_figures,
                           stop_when_exact=True)
    decide = _export(model, output, opts)
    _write_history(opts["history"], history, objective="policy", hidden=list(opts["hidden"]),
                   estimator=estimator, cost=opts["cost"], migrate_penalty=opts["migrate_penalty"],
                   data=dataset.source, safe=z,
                   deviations=[{"level": lv, "bucket": b, "what": offpolicy.describe_bucket(lv, b),
                                "migrate": m} for (lv, b), m in deviations.items()])
    learned = decide(x_rows)
    agree_rows = float(np.mean(learned == rows_table))
    gx = all_keys[val_idx]
    agree_val = float(np.mean(decide(schema.unpack_keys(gx)) == y[val_idx].astype(bool)))
    log.info("the exported model follows the table on %.2f %% of the run's rows and %.2f %% of "
             "the held-back examples", 100 * agree_rows, 100 * agree_val)
    block_ns = offpolicy.DEFAULT_BLOCK_NS if opts["data"] is not None else 0
    reports = offpolicy.evaluate(dataset, {"heuristic": heur, "learned": learned}, cost=cost,
                                 nr_boot=opts["bootstrap"], block_ns=block_ns, seed=opts["seed"])
    mine = next(r for r in reports if r.name == "learned")
    assert mine.vs_baseline is not None
    diff = mine.vs_baseline[estimator]
    log.info("in-sample (the table was chosen on these rows, so this is optimistic): learned - "
             "heuristic (%s) %.4f [%.4f, %.4f]; judge it on another run with mlsched-evaluate",
             estimator.upper(), diff.mean, diff.lo, diff.hi)
    figures = {
        "deviations": float(len([1 for e in effects if e.decision(z) not in (None, e.heuristic)])),
        "table_agreement": agree_rows,
        f"insample_diff_{estimator}": diff.mean,
    }
    if opts["data"] is None:
        figures["true_cost"] = float(expected_cost(dataset.columns, learned).mean())
        figures["true_cost_heuristic"] = float(expected_cost(dataset.columns, heur).mean())
    return figures


def run(
    output: Path,
    data: Path | None,
    epochs: int,
    seed: int,
    samples: int = DEFAULT_SAMPLES,
    *,
    objective: str = "label",
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    estimator: str = offpolicy.DEFAULT_ESTIMATOR,
    cost: str = offpolicy.DEFAULT_COST,
    migrate_penalty: float = 0.0,
    history: Path | None = None,
    bootstrap: int = offpolicy.DEFAULT_BOOTSTRAP,
    safe: float | None = None,
) -> dict[str, float]:
    """Train, export and verify; returns the objective's figures. ModelError/DatasetError.

    label: val_accuracy; imitate: heldout_agreement; policy: val_cost_<estimator> and the
    heuristic's, their difference with its interval (and true costs on simulated data).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    check_replaceable(output)  # before minutes of work, not after
    if data is not None:
        dataset = read_dataset(data)
        log.info("dataset %s: %d candidates (format v%d)", data, len(dataset), dataset.version)
    elif objective == "policy":
        dataset = simulated_logged_dataset(samples, seed)
        log.info(
            "simulated collection run: %d candidates logged by the heuristic with explore P %g, "
            "costs from the known model in model_dir/synthetic.py", samples, DEFAULT_SIM_EXPLORE,
        )
    else:
        dataset = synthetic_dataset(samples, seed)
        log.info("synthetic data: %d candidates from load patterns, labeled by the rule", samples)
    _check_rows(dataset)
    log.info("network: %s; objective %s", describe(hidden), objective)
    opts = {"epochs": epochs, "seed": seed, "hidden": hidden, "history": history, "data": data,
            "estimator": estimator, "cost": cost, "migrate_penalty": migrate_penalty,
            "bootstrap": bootstrap, "safe": safe}
    source = f"{data} ({len(dataset)} rows)" if data is not None else (
        f"{len(dataset)} simulated rows" if objective == "policy" else
        f"{len(dataset)} synthetic rows")
    safe_text = f", --safe {safe:g}" if safe is not None else ""
    opts["provenance"] = made_by(
        "mlsched-export", f"objective {objective}{safe_text}, trained on {source}, seed {seed}",
        objective=objective, data=str(data) if data is not None else None, rows=len(dataset))
    runner = {"label": _run_label, "imitate": _run_imitate, "policy": _run_policy}[objective]
    return runner(dataset, output, opts)


def _non_negative(text: str) -> float:
    return cli.number_in(text, 0, math.inf, lo_open=False)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("mlsched-export", "Train mlsched's migration model and export it as a "
                        "verified SavedModel.", EXAMPLES)
    add = parser.add_argument
    # No default: model_dir/model_path is the bundled model, replaced only on purpose.
    add("--output", type=Path, required=True, metavar="DIR",
        help="SavedModel directory to (re)create")
    add("--data", type=Path, metavar="FILE",
        help="dataset file (CSV, format v1 or v2 in model_dir/README.md)")
    add("--objective", choices=OBJECTIVES, default="label",
        help="what to learn: the rows' labels, the heuristic fallback's decisions, or a "
        "policy from logged costs (default label; see the module docstring)")
    add("--hidden", type=parse_hidden, default=DEFAULT_HIDDEN, metavar="W,W,...",
        help="hidden relu layer widths (default 64,64, the contract's)")
    add("--epochs", type=cli.positive_int, default=DEFAULT_EPOCHS, metavar="N",
        help="most epochs (default 40)")
    add("--seed", type=int, default=0, metavar="N", help="data, split and weight seed (default 0)")
    add("--samples", type=cli.positive_int, default=DEFAULT_SAMPLES, metavar="N",
        help=f"synthetic or simulated candidates without --data (default {DEFAULT_SAMPLES})")
    add("--estimator", choices=offpolicy.ESTIMATORS, default=offpolicy.DEFAULT_ESTIMATOR,
        help="policy: inverse-propensity or doubly-robust cost estimates (default dr)")
    add("--cost", choices=offpolicy.COST_KINDS, default=offpolicy.DEFAULT_COST,
        help="policy: a row's cost from its outcome (default delay-per-run)")
    add("--migrate-penalty", type=_non_negative, default=0.0, metavar="C",
        help="policy: added to the cost of a migration, e.g. for the cold cache (default 0)")
    add("--history", type=Path, metavar="FILE",
        help="write every epoch's losses and figures as JSON (for mlsched-evaluate --plot)")
    add("--safe", type=_non_negative, default=None, metavar="Z",
        help="policy: keep the heuristic's decision except on the buckets (its own inputs, "
        "then the key without the CPU) where the estimated mean cost difference clears Z "
        "block-bootstrap standard errors (e.g. 1.96); default: learn from every row")
    args = parser.parse_args(argv)
    if args.safe is not None and args.objective != "policy":
        parser.error("--safe is for --objective policy")
    report_on_stdout()

    def work() -> int:
        run(**vars(args))  # every option is one of run()'s parameters, by name
        return 0

    return run_or_refuse(work)


if __name__ == "__main__":
    sys.exit(main())
