"""Check a SavedModel against the model contract, verify its fast path, write its manifest.

usage: mlsched-verify DIR [--nr-cpus-probe N] [--max-dom-cpus-probe M] [--strict]

Run it after anything else that writes a model (a training script, model.export(DIR)): it
checks DIR as the loader will (loader/model_check.py), loads it with TensorFlow, and for a
plain Dense stack compares numpy with TensorFlow over the whole feature grid of an N-CPU
machine plus random inputs and writes DIR/assets/mlsched_fastpath.npz, which lets the loader
run the model without importing TensorFlow. Last it writes DIR/mlsched_manifest.json, the
sha256 of every file, without which the loader refuses the model. Exit status: 0 the model is
usable, 1 no fast path and --strict, 2 model refused.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loader import cli
from loader.backends import open_backend
from loader.model_check import ModelError, check_model_dir
from model_dir.export_verified import write_manifest
from model_dir.fastpath_verify import grid_decisions, write_fastpath

log = logging.getLogger("verify_model")

EXAMPLES = """examples:
  mlsched-verify model_dir/model_path
  mlsched-transfer --input old.h5 --output /tmp/m && mlsched-verify /tmp/m
"""


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("mlsched-verify", "Check a model for mlsched and write its verified "
                        "fast-path weights.", EXAMPLES)
    parser.add_argument("model_dir", type=Path, help="SavedModel directory")
    parser.add_argument("--nr-cpus-probe", type=int, default=32,
                        help="CPUs of the probed grid (default 32)")
    parser.add_argument("--max-dom-cpus-probe", type=int, default=8,
                        help="CPUs per domain (default 8)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when no fast path could be verified")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        info = check_model_dir(args.model_dir, manifest=False)  # (re)written below
        log.info(
            "contract ok: input %r [?, 10] float32, output %r [?, 1]",
            info.input_key,
            info.output_key,
        )
        result = write_fastpath(info.path, args.nr_cpus_probe, args.max_dom_cpus_probe)
        log.info("%s", result.message)
        log.info("manifest written: %s", write_manifest(info.path))
        info = check_model_dir(info.path)  # what the loader will see now
        backend, reason = open_backend(info, "auto")
    except ModelError as e:
        log.error("error: %s", e)
        return 2
    log.info("loader backend (auto): %s", reason)
    for grid in ((2, 1), (args.nr_cpus_probe, args.max_dom_cpus_probe)):
        migrate, keep = grid_decisions(backend.predict, *grid)
        log.info(
            "decisions over the %d-CPU grid (%d per domain): %d migrate / %d keep",
            grid[0],
            grid[1],
            migrate,
            keep,
        )
    return 1 if args.strict and not result.written else 0


if __name__ == "__main__":
    sys.exit(main())
