"""Create the dummy model: a seeded, untrained Dense stack that honours the model contract.

usage: mlsched-dummy --output DIR [--seed N] [--hidden 64,64]

The model is the contract's 10 -> 64 relu -> 64 relu -> 1 sigmoid (--hidden changes the hidden
widths) on a keras.Input named `features`, exported by export_verified.py as the other model
tools export: a checked SavedModel with verified fast-path weights (loader/backends.py), so the
loader runs it without TensorFlow, and its manifest. Its weights are random, but
shaped so that it exercises both decisions: the first layer is scaled per feature and the
output layer calibrated so that over the test VM's grid (2 CPUs, 1 per domain) and over an
8-CPU grid (4 per domain) both "migrate" and "keep" come out in comparable numbers. It is a
stand-in for a trained model, not a policy.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loader import cli, contract, schema
from loader.backends import DenseLayer, NumpyModel, import_tensorflow
from loader.model_check import ModelError, ModelInfo
from model_dir.architecture import DEFAULT_HIDDEN, describe, parse_hidden
from model_dir.export_verified import export_verified, made_by, report_export
from model_dir.fastpath_verify import grid_decisions

if TYPE_CHECKING:
    import keras

log = logging.getLogger("create_dummy_model")

# The grids the balance is tuned for: (nr_cpus, max_dom_cpus).
VM_GRID = (2, 1)
WIDE_GRID = (8, 4)
# First-layer row scales. The raw features span very different ranges (cpu id up to hundreds,
# idle counts up to the domain size, loads 0..1); without this the cpu id alone decides and
# the class balance changes with the machine size.
FEATURE_SCALE = np.array([1 / 16, 1 / 8, 1 / 8, 4, 4, 1, 1, 1, 1, 1], np.float32)
OUTPUT_LOGIT_STD = 2.0  # spread of the final logit over the VM grid: decisive probabilities
MIN_CLASS_SHARE = 0.2  # either decision on either grid, or the seed is refused

EXAMPLES = """examples:
  mlsched-dummy --output tests/models/dummy     # the tests' dummy
  mlsched-dummy --output /tmp/m --seed 3
  mlsched-dummy --output /tmp/small --hidden 16,8
"""


def build_model(seed: int, hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> keras.Model:
    """The random Dense stack, deterministic for a seed (every initializer is seeded)."""
    import_tensorflow()
    import keras

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name=contract.MODEL_INPUT_KEY)
    x = inputs
    layers = [*((w, "relu") for w in hidden), (1, "sigmoid")]
    for i, (units, activation) in enumerate(layers):
        x = keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 100 + i),
            bias_initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=seed * 100 + 50 + i),
            name=f"dense_{i}",
        )(x)
    return keras.Model(inputs, x, name="mlsched_dummy")


def _dense_layers(model: keras.Model) -> list[keras.layers.Dense]:
    """dense_0, dense_1, ...: the layers build_model() made, in order."""
    return [layer for layer in model.layers if layer.name.startswith("dense_")]


def _logits(model: keras.Model) -> NumpyModel:
    """The model in numpy, stopping before the final sigmoid."""
    dense = _dense_layers(model)
    acts = ["relu"] * (len(dense) - 1) + ["linear"]
    return NumpyModel(
        [DenseLayer(*d.get_weights(), act) for d, act in zip(dense, acts, strict=True)]
    )


def calibrate(model: keras.Model) -> None:
    """Scale the input rows, then move and stretch the output so both grids are balanced.

    The threshold is put halfway between two neighbouring logits of the grids, so no grid
    point sits near 0.5 where float rounding could flip it.
    """
    dense = _dense_layers(model)
    first, last = dense[0], dense[-1]
    kernel, bias = first.get_weights()
    first.set_weights([kernel * FEATURE_SCALE[:, None], bias])

    z_vm, z_wide = (
        np.sort(_logits(model).predict(schema.unpack_keys(schema.feature_grid(*grid))))
        for grid in (VM_GRID, WIDE_GRID)
    )
    z = np.unique(np.concatenate([z_vm, z_wide]))
    cuts, margins = (z[1:] + z[:-1]) / 2, (z[1:] - z[:-1]) / 2
    share_vm = 1 - np.searchsorted(z_vm, cuts) / len(z_vm)
    share_wide = 1 - np.searchsorted(z_wide, cuts) / len(z_wide)
    imbalance = np.maximum(np.abs(share_vm - 0.5), np.abs(share_wide - 0.5))
    # Among the near-best balanced cuts, the one farthest from any grid point.
    near_best = np.flatnonzero(imbalance <= imbalance.min() + 0.02)
    cut = cuts[near_best[np.argmax(margins[near_best])]]

    stretch = OUTPUT_LOGIT_STD / max(float(z_vm.std()), 1e-6)
    kernel, bias = last.get_weights()
    last.set_weights([kernel * stretch, (bias - cut) * stretch])


def create(output: Path, seed: int = 0, hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> ModelInfo:
    """Build, calibrate and export the dummy model, verify its fast path, and check it."""
    log.info("building a %s Dense stack, seed %d", describe(hidden), seed)
    model = build_model(seed, hidden)
    calibrate(model)
    info, result = export_verified(model, output, made_by(
        "mlsched-dummy", f"the dummy: a seeded random {describe(hidden)}, seed {seed}",
        trained=False, seed=seed))
    backend = report_export(info, result, require_fastpath=True,
                            hint=f"try another --seed than {seed}")
    for name, (nr_cpus, per_dom) in (("VM", VM_GRID), ("wide", WIDE_GRID)):
        migrate, keep = grid_decisions(backend.predict, nr_cpus, per_dom)
        log.info("decisions over the %d-CPU grid (%d per domain, %s): %d migrate / %d keep",
                 nr_cpus, per_dom, name, migrate, keep)
        if min(migrate, keep) < MIN_CLASS_SHARE * (migrate + keep):
            raise ModelError(f"seed {seed} gives a lopsided model on that grid; try another --seed")
    log.info("model ok: input %r, output %r, digest %s", info.input_key, info.output_key,
             info.digest[:8])
    return info


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("mlsched-dummy", "Create mlsched's dummy model (a seeded random "
                        "Dense stack) as a SavedModel.", EXAMPLES)
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="SavedModel directory to (re)create")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--hidden", type=parse_hidden, default=DEFAULT_HIDDEN, metavar="W,W,...",
                        help="hidden relu layer widths (default 64,64, the contract's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        create(args.output, args.seed, args.hidden)
    except ModelError as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
