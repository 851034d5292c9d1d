"""Train mlsched's migration model and export it as a SavedModel with a verified fast path.

usage: model_dir/model_export.py [--output DIR] [--data FILE] [--epochs N] [--seed N]

Without --data it trains on synthetic candidates labeled by the rule below; with --data, on a
dataset in the format mlsched-collect writes (model_dir/README.md, model_dir/dataset.py). Both
go through the same path: rows are packed into the kernel's decision keys and unpacked with
contract.unpack_keys(), so the model learns on exactly the inputs the loader will feed it. The
rows are split 80/20 into training and validation sets; training stops early when the
validation loss has not improved for a few epochs, and the best epoch's weights (a checkpoint)
are the ones exported. It prints the validation accuracy, the confusion matrix, and how often
the model disagrees with the rule, then exports with model.export() (input `features`),
checks the directory as the loader will and writes the verified numpy fast path.

Synthetic candidates come from load patterns. A machine of 2-8 domains of 1-16 CPUs each gets
per-domain runnable task counts (Poisson) from one of four patterns: steady (every domain
alike), imbalanced (one hot domain, the others cold), bursty (each domain on its own,
heavy-tailed) and saturated (every domain over-full). Loads are quantized as select_cpu does
(busy CPUs plus queued tasks, LOAD_FULL_PER_CPU tasks per CPU = full, 0..LOAD_SCALE). A
candidate is what select_cpu builds: a waking task whose domain has no idle CPU, the least
loaded other domain as the destination (when it is less loaded), cpu_idle = idle CPUs of the
destination, cpu_not_idle = busy CPUs of the source. A quarter of the rows are instead drawn
uniformly over the feature grid (any CPU, idle and busy counts, src_load > dst_load) so that
the model is right on keys the patterns rarely produce too.

Labeling rule (synthetic data), with gap = src_dom_load - dst_dom_load (loads 0..1):
    migrate (1) when  cpu_idle >= 1 and gap >= 0.25   (an idle CPU over there, and a clear
                                                       imbalance: worth a cold cache), or
                      gap >= 0.5                       (the source is so much busier that
                                                       queueing there costs more than the
                                                       move, even with no idle CPU there);
    keep (0) otherwise (a small imbalance is not worth losing the cache).
The first clause is the kernel's heuristic fallback (bpf/mlsched.bpf.c); the second adds the
case it misses. The CPU id plays no part.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loader import contract, schema
from loader.backends import open_backend
from loader.fastpath import import_tensorflow
from loader.model_check import ModelError
from model_dir.dataset import COLUMN_NAMES, COLUMNS, Dataset, DatasetError, read_dataset
from model_dir.export_verified import check_replaceable, export_verified

if TYPE_CHECKING:
    import keras

log = logging.getLogger("model_export")

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "model_path"
DEFAULT_EPOCHS = 40
DEFAULT_SAMPLES = 40000
HIDDEN = ((32, "relu"), (16, "relu"))
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
PATIENCE = 5  # epochs without a better validation loss before training stops
VALIDATION_SHARE = 0.2
MIN_ROWS = 50
# Training sees features * FEATURE_SCALE (cpu ids run to hundreds, idle counts to the domain
# size, loads 0..1); the scale is then folded into the first kernel, so the exported model is
# a plain Dense stack on the raw contract features.
FEATURE_SCALE = np.array([1 / 64, 1 / 8, 1 / 8, 4, 4, 1, 1, 1, 1, 1], np.float32)
# The rule's second threshold in load quanta (the first is the heuristic's, 0.25).
GAP_ALONE_Q = contract.LOAD_SCALE // 2
# The grid on which the model is compared with the rule: every key of this machine size.
RULE_GRID = (16, 8)

PATTERNS = ("steady", "imbalanced", "bursty", "saturated")
NR_DOMS = (2, 3, 4, 8)
DOM_CPUS = (1, 2, 4, 8, 16)
UNIFORM_SHARE = 0.25
CHUNK = 256  # synthetic rows drawn per machine and pattern

EXAMPLES = """examples:
  model_dir/model_export.py                        # synthetic data -> model_dir/model_path
  model_dir/model_export.py --output /tmp/m --epochs 20 --seed 3
  model_dir/model_export.py --data candidates.csv --output /tmp/m   # mlsched-collect data
"""


# --- data -----------------------------------------------------------------------------------


def rule(cpu_idle: np.ndarray, src_load_q: np.ndarray, dst_load_q: np.ndarray) -> np.ndarray:
    """The synthetic labeling rule (module docstring), on quantized loads: 1 migrate, 0 keep."""
    gap = src_load_q.astype(np.int64) - dst_load_q.astype(np.int64)
    migrate = contract.heuristic_migrate(src_load_q, dst_load_q, cpu_idle) | (gap >= GAP_ALONE_Q)
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
        "cpu_idle": np.minimum(idle[rows, dst], contract.KEY_FIELD_MAX),
        "cpu_not_idle": np.minimum(busy[rows, src], contract.KEY_FIELD_MAX),
        "src_load_q": load_q[rows, src],
        "dst_load_q": load_q[rows, dst],
    }


def _uniform_chunk(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows spread over the feature grid, as any machine could produce them."""
    dom_cpus = rng.choice(DOM_CPUS, CHUNK)
    src_q = rng.integers(1, contract.LOAD_SCALE + 1, CHUNK)
    return {
        "cpu": rng.integers(0, contract.MAX_CPUS, CHUNK),
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
    action = contract.heuristic_migrate(cols["src_load_q"], cols["dst_load_q"], cols["cpu_idle"])
    cols.update(
        ts_ns=np.arange(nr_rows, dtype=np.uint64) * 1000,
        pid=rng.integers(1, 1 << 22, nr_rows),
        action=action,
        source=np.full(nr_rows, contract.Source.FALLBACK),
        label=label,
    )
    dtypes = {name: dtype for name, dtype, _, _ in COLUMNS}
    return Dataset({k: np.asarray(cols[k]).astype(dtypes[k]) for k in COLUMN_NAMES}, "synthetic")


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row indices, shuffled with the seed."""
    order = np.random.default_rng(seed + 1).permutation(n)
    nr_val = max(1, int(round(n * VALIDATION_SHARE)))
    return order[nr_val:], order[:nr_val]


# --- the model ------------------------------------------------------------------------------


def build_model() -> keras.Model:
    import keras

    inputs = keras.Input(shape=(contract.NR_FEATURES,), name=contract.MODEL_INPUT_KEY)
    x = inputs
    for i, (units, activation) in enumerate((*HIDDEN, (1, "sigmoid"))):
        x = keras.layers.Dense(units, activation=activation, name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="mlsched_migrate")


def fold_feature_scale(model: keras.Model) -> None:
    """Make a model trained on features * FEATURE_SCALE take the raw features."""
    first = model.get_layer("dense_0")
    kernel, bias = first.get_weights()
    first.set_weights([kernel * FEATURE_SCALE[:, None], bias])


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    epochs: int,
    seed: int,
) -> keras.Model:
    """Fit with early stopping; return the best epoch's weights, taking raw features."""
    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )

    def report(epoch: int, logs: dict[str, float]) -> None:
        log.info(
            "epoch %3d/%d: loss %.4f accuracy %6.2f %% | validation loss %.4f accuracy %6.2f %%",
            epoch + 1,
            epochs,
            logs["loss"],
            100 * logs["accuracy"],
            logs["val_loss"],
            100 * logs["val_accuracy"],
        )

    with tempfile.TemporaryDirectory(prefix="mlsched-train-") as tmp:
        checkpoint = Path(tmp) / "best.weights.h5"
        best = keras.callbacks.ModelCheckpoint(
            str(checkpoint), monitor="val_loss", save_best_only=True, save_weights_only=True
        )
        history = model.fit(
            x_train * FEATURE_SCALE,
            y_train.astype(np.float32),
            validation_data=(x_val * FEATURE_SCALE, y_val.astype(np.float32)),
            epochs=epochs,
            batch_size=BATCH_SIZE,
            shuffle=True,
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE),
                best,
                keras.callbacks.LambdaCallback(on_epoch_end=report),
            ],
        )
        val_loss = history.history["val_loss"]
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
    return model


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


def run(
    output: Path, data: Path | None, epochs: int, seed: int, samples: int = DEFAULT_SAMPLES
) -> float:
    """Train, export and verify; returns the validation accuracy. ModelError/DatasetError."""
    check_replaceable(output)  # before minutes of work, not after
    if data is None:
        dataset = synthetic_dataset(samples, seed)
        log.info("synthetic data: %d candidates from load patterns, labeled by the rule", samples)
    else:
        dataset = read_dataset(data)
        log.info("dataset %s: %d candidates", data, len(dataset))
    if len(dataset) < MIN_ROWS:
        raise DatasetError(f"{dataset.source}: {len(dataset)} rows, need at least {MIN_ROWS}")
    nr_migrate = int(np.count_nonzero(dataset.labels))
    if nr_migrate in (0, len(dataset)):
        only = "migrate" if nr_migrate else "keep"
        raise DatasetError(
            f"{dataset.source}: every row is labeled {only}; training needs both labels"
        )
    log.info("labels: %d migrate / %d keep", nr_migrate, len(dataset) - nr_migrate)
    log.info("the scheduler's own action agreed with the label: %s", _agreement_by_source(dataset))

    x, y = dataset.features(), dataset.labels
    train_idx, val_idx = split(len(dataset), seed)
    log.info("training on %d candidates, validating on %d", len(train_idx), len(val_idx))
    model = train(x[train_idx], y[train_idx], x[val_idx], y[val_idx], epochs, seed)

    info, result = export_verified(model, output)
    log.info("exported SavedModel to %s (input %r)", output, info.input_key)
    log.info("%s", result.message)
    if not result.written:
        raise ModelError(f"{output}: the fast path did not verify: {result.message}")

    backend, reason = open_backend(info, "auto")
    log.info("loader backend (auto): %s", reason)
    decide = backend.predict  # what the loader will run
    predicted_val = (decide(x[val_idx]) > contract.MIGRATE_THRESHOLD).astype(np.uint8)
    accuracy = report_validation(y[val_idx], predicted_val)

    rule_val = rule_from_features(x[val_idx])
    grid = contract.unpack_keys(contract.feature_grid(*RULE_GRID))
    predicted_grid = decide(grid) > contract.MIGRATE_THRESHOLD
    log.info(
        "model vs the rule: differs on %s validation candidates and on %s keys of the "
        "%d-CPU grid (%d per domain)",
        _pct(int(np.count_nonzero(predicted_val != rule_val)), len(val_idx)),
        _pct(int(np.count_nonzero(predicted_grid != rule_from_features(grid))), len(grid)),
        *RULE_GRID,
    )
    if data is not None:
        log.info(
            "the dataset's labels vs the rule: differ on %s rows",
            _pct(int(np.count_nonzero(rule_from_features(x) != y)), len(y)),
        )
    return accuracy


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train mlsched's migration model and export it as a verified SavedModel.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="SavedModel directory to (re)create (default model_dir/model_path)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="dataset file (CSV, format in model_dir/README.md)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help="most epochs (default 40)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="data, split and weight seed (default 0)"
    )
    parser.add_argument(
        "--samples",
        type=_positive,
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=f"synthetic candidates without --data (default {DEFAULT_SAMPLES})",
    )
    args = parser.parse_args(argv)
    # The report on stdout; stderr holds nothing but a refusal, one line.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # "Assets written to: <tmp>"
    try:
        run(args.output, args.data, args.epochs, args.seed, args.samples)
    except (ModelError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
