"""mlsched-load with every decision's latency recorded: the VM half of the pipeline benchmark.

usage: python -m tools.bench.probe_loader --out FILE -- [mlsched-load options]

Runs loader.main exactly as `mlsched-load` does, with one difference: its DecisionPipeline is
tools.bench.pipeline.RecordingPipeline, which notes for every decided candidate the time from
the BPF timestamp select_cpu gave it to the return of the batch map update that stored its
decision. On exit (SIGINT, as for mlsched-load) it writes those latencies' percentiles to FILE
as JSON and exits with the loader's status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import loader.pipeline
from loader.table import DecisionTable
from tools.bench.pipeline import RecordingPipeline, percentiles_us

_instances: list[RecordingPipeline] = []


class LoaderRecordingPipeline(RecordingPipeline):
    """Built by loader.main.run() in place of DecisionPipeline."""

    def __init__(self, table: DecisionTable, batch_size: int, max_wait_s: float) -> None:
        super().__init__(table, batch_size, max_wait_s)
        _instances.append(self)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.probe_loader",
        description="Run mlsched-load and record each decision's event -> map latency.",
    )
    ap.add_argument("--out", type=Path, required=True, help="JSON file written on exit")
    ap.add_argument("loader_args", nargs=argparse.REMAINDER,
                    help="mlsched-load options, after --")
    args = ap.parse_args(argv)
    rest = args.loader_args[1:] if args.loader_args[:1] == ["--"] else args.loader_args

    loader.pipeline.DecisionPipeline = LoaderRecordingPipeline  # type: ignore[misc]
    from loader import main as loader_main

    status = loader_main.main(rest)
    lat = (np.concatenate([p.latency_ns() for p in _instances]) if _instances
           else np.zeros(0, np.int64))
    stats = _instances[0].stats if _instances else None
    out = {
        "status": status,
        "decided": int(len(lat)),
        "batches": stats.batches if stats else 0,
        "records": stats.records if stats else 0,
        **percentiles_us(lat),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
