"""The model contract's network shape, and the --hidden option that may change it.

The contract (docs: model_dir/README.md) specifies 10 -> 64 relu -> 64 relu -> 1 sigmoid, a
plain Dense stack the loader runs in numpy (loader/backends.py). create_dummy_model.py and
model_export.py build it by default; `--hidden 32,16` (any list of widths) builds another
Dense stack of relu layers, still ending in one sigmoid unit.
"""

from __future__ import annotations

import argparse

from loader import schema
from loader.backends import NumpyModel

DEFAULT_HIDDEN: tuple[int, ...] = (64, 64)
MAX_WIDTH = 4096
MAX_LAYERS = 8


def parse_hidden(text: str) -> tuple[int, ...]:
    """argparse type of --hidden: comma-separated widths, e.g. 64,64 (relu layers)."""
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 64,64, not {text!r}") from None
    if not 1 <= len(widths) <= MAX_LAYERS:
        raise argparse.ArgumentTypeError(f"1 to {MAX_LAYERS} hidden layers, not {len(widths)}")
    if any(not 1 <= w <= MAX_WIDTH for w in widths):
        raise argparse.ArgumentTypeError(f"layer widths must be 1..{MAX_WIDTH}, not {text!r}")
    return widths


def describe(hidden: tuple[int, ...]) -> str:
    """'10 -> 64 relu -> 64 relu -> 1 sigmoid', as describe_stack() prints a model."""
    return " -> ".join([str(schema.NR_FEATURES), *(f"{w} relu" for w in hidden), "1 sigmoid"])


def describe_stack(model: NumpyModel) -> str:
    """A Dense stack in numpy, as describe() names a network shape."""
    return " -> ".join([str(model.nr_inputs),
                        *(f"{la.kernel.shape[1]} {la.activation}" for la in model.layers)])
