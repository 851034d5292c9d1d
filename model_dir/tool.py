"""What the model tools' main() functions share: the report on stdout, a refusal on stderr.

model_export.py, transfer.py and tools/trainreport.py print their report through logging and
keep stderr for a refusal: one line, exit status 2, no traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from loader.model_check import ModelError
from model_dir.dataset import DatasetError


def report_on_stdout() -> None:
    """Log INFO lines, bare, to stdout; TensorFlow's own INFO ("Assets written to") not."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def run_or_refuse(work: Callable[[], int], prefix: str = "error") -> int:
    """work()'s exit status; 2 after `prefix: message` on stderr when it refuses its input."""
    try:
        return work()
    except (ModelError, DatasetError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
