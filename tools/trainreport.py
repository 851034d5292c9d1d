"""Validate a model trained on collected data, as the loader will run it, and compare it with the
kernel's heuristic.

usage: python -m tools.trainreport --model DIR --data FILE [--seed N] [--grid CPUSxDOMCPUS]

The last step of `make train`. The model directory is checked exactly as mlsched-load checks it
(check_model_dir, no TensorFlow) and must have verified fast-path weights; its decisions are
then taken with the loader's numpy backend. Printed: the validation accuracy and confusion
matrix on the validation rows of model_export.py's split (same --seed), the accuracy of the
kernel's heuristic fallback on the same rows (the baseline the model has to beat), and how
often the model disagrees with the heuristic: on the validation rows, on the whole dataset and
on every key of the machine's feature grid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from loader import contract, schema
from loader.cli import parser
from model_dir import fallback
from model_dir.tool import run_or_refuse

log = logging.getLogger("trainreport")

EXAMPLES = """examples:
  python -m tools.trainreport --model model_dir/model_path \\
      --data build/vm-out/train/candidates.csv
  python -m tools.trainreport --model /tmp/m --data data.csv --grid 4x2
"""


def heuristic(x: np.ndarray) -> np.ndarray:
    """The kernel's heuristic fallback (fallback_migrate in bpf/mlsched.bpf.c) on model inputs:
    migrate when src_load_q - dst_load_q >= LOAD_SCALE / 4 and the destination has an idle CPU
    (one definition: model_dir/fallback.py)."""
    return fallback.heuristic_from_features(x).astype(np.uint8)


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """[[keep->keep, keep->migrate], [migrate->keep, migrate->migrate]] (rows: label)."""
    m = np.zeros((2, 2), np.int64)
    np.add.at(m, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return m


def _pct(n: int, total: int) -> str:
    return f"{n} of {total} ({100 * n / max(total, 1):.1f} %)"


def _grid(text: str) -> tuple[int, int]:
    try:
        cpus, dom = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CPUSxDOMCPUS such as 4x2, not {text!r}") from None
    if not 1 <= cpus <= schema.MAX_CPUS or not 1 <= dom <= cpus:
        raise argparse.ArgumentTypeError(f"grid {text}: need 1 <= DOMCPUS <= CPUS <= 512")
    return cpus, dom


def report(model: Path, data: Path, seed: int, grid: tuple[int, int] | None) -> dict[str, float]:
    """Print the report; returns its figures. ModelError / DatasetError for bad inputs."""
    from loader.backends import open_backend
    from loader.model_check import ModelError, check_model_dir
    from model_dir.dataset import read_dataset
    from model_dir.model_export import split

    info = check_model_dir(model)
    if not info.fastpath_ok:
        raise ModelError(f"{model}: no verified fast path ({info.fastpath_reason})")
    backend, why = open_backend(info, "numpy")
    log.info("model %s: valid for the loader; backend %s", model, why)
    ds = read_dataset(data)
    x, y = ds.features(), ds.labels
    decide = backend.predict(x).reshape(-1) > contract.MIGRATE_THRESHOLD
    heur = heuristic(x).astype(bool)
    _, val = split(len(ds), seed)
    m = confusion(y[val], decide[val])
    acc = float(np.trace(m) / max(m.sum(), 1))
    heur_acc = float(np.mean(heur[val] == y[val]))
    log.info("dataset %s: %d rows (labels migrate %d / keep %d), %d validation rows (seed %d)",
             data, len(ds), int(y.sum()), int(len(y) - y.sum()), len(val), seed)
    log.info("validation accuracy: model %.1f %%, heuristic %.1f %%, always keep %.1f %%",
             100 * acc, 100 * heur_acc, 100 * float(np.mean(y[val] == 0)))
    log.info("confusion matrix (rows: label, columns: model):")
    log.info("  %-8s %8s %8s", "", "keep", "migrate")
    for name, row in zip(("keep", "migrate"), m, strict=True):
        log.info("  %-8s %8d %8d", name, row[0], row[1])
    if grid is None:
        cols = ds.columns
        dom = int(max(cols["cpu_idle"].max(), cols["cpu_not_idle"].max(), 1))
        grid = (int(cols["cpu"].max()) + 1, dom)
    gx = schema.unpack_keys(schema.feature_grid(*grid))
    g_model = backend.predict(gx).reshape(-1) > contract.MIGRATE_THRESHOLD
    g_heur = heuristic(gx).astype(bool)
    n_val = int(np.count_nonzero(decide[val] != heur[val]))
    n_all = int(np.count_nonzero(decide != heur))
    n_grid = int(np.count_nonzero(g_model != g_heur))
    log.info("model vs heuristic: differ on %s validation rows, %s dataset rows, %s keys of the "
             "%d-CPU grid (%d CPUs per domain)", _pct(n_val, len(val)), _pct(n_all, len(ds)),
             _pct(n_grid, len(gx)), *grid)
    log.info("migrate rate: model %.1f %% / heuristic %.1f %% of dataset rows; %.1f %% / %.1f %% "
             "of grid keys", 100 * decide.mean(), 100 * heur.mean(), 100 * g_model.mean(),
             100 * g_heur.mean())
    return {"rows": len(ds), "val_rows": len(val), "val_accuracy": acc,
            "heuristic_val_accuracy": heur_acc, "disagree_val": n_val / max(len(val), 1),
            "disagree_rows": n_all / max(len(ds), 1), "disagree_grid": n_grid / len(gx)}


def main(argv: list[str] | None = None) -> int:
    p = parser("trainreport", "Check a trained model as the loader will and compare it with "
               "the kernel's heuristic on a collected dataset.", EXAMPLES)
    p.add_argument("--model", required=True, type=Path, metavar="DIR", help="SavedModel dir")
    p.add_argument("--data", required=True, type=Path, metavar="FILE",
                   help="the dataset it was trained on (format v1 or v2)")
    p.add_argument("--seed", type=int, default=0,
                   help="model_export.py's --seed, which fixes the validation split (default 0)")
    p.add_argument("--grid", type=_grid, default=None, metavar="CPUSxDOMCPUS",
                   help="machine whose feature grid to compare on (default: from the dataset)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def work() -> int:
        report(args.model, args.data, args.seed, args.grid)
        return 0

    return run_or_refuse(work, "trainreport")


if __name__ == "__main__":
    sys.exit(main())
