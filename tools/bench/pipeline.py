"""Decision-pipeline benchmark: ring buffer -> batch -> model -> decision map, and its stages.

usage: python -m tools.bench.pipeline [--backends numpy,tf,naive] [--rates 1000,10000,...]
                                      [--seconds S] [--json FILE]

Every figure runs the loader's own code on a real BPF ring buffer fed by a real BPF program
(tools/bench/producer.py): the loader's RingBufferReader (bcc), DecisionPipeline (batching,
model call, one bpf_map_update_batch), its backends, and a decision map of the scheduler's
type. Three measurements, each per backend:

- stages: ring read (records/s of RingBufferReader + DecisionPipeline.on_record over a
  pre-filled ring), and decide (DecisionPipeline._decide: unpack, model, threshold, batch map
  update, its bookkeeping) at several batch sizes.
- paced: the producer pushes at an offered rate for S seconds while the loader's main loop
  (poll, due, flush) consumes; achieved decisions/s, losses, and for every decided record the
  latency from its BPF timestamp (bpf_ktime_get_ns) to the moment its batch update returned.
- naive: the seed's path, one TF call and one bpf_map_update_elem per candidate, run in the
  ring buffer callback; the same stages and paced loads.

TensorFlow is imported only for the tf and naive backends (72 s under TCG: in the VM use
numpy only).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loader import contract, paths, schema
from loader.bpfmaps import DecisionMap, RingBufferReader
from loader.main import IDLE_POLL_MS
from loader.pipeline import DecisionPipeline, Predictor, pump
from loader.table import DecisionTable
from tools.bench.producer import DEFAULT_OBJ, ProducerChild, RingProducer

log = logging.getLogger("bench.pipeline")

REPO_ROOT = paths.CHECKOUT
DEFAULT_MODEL = paths.BUNDLED_MODEL
RING_BYTES = 4 << 20  # holds ~75 k records: a pre-filled ring for the read stage
READ_STAGE_RECORDS = 50_000
DECIDE_BATCHES = (1, 16, 64, 256, 1024)
DECIDE_MIN_S = 0.3  # each decide figure runs at least this long
DRAIN_S = 1.0  # after a paced window, keep consuming this long for the tail's latencies
DEFAULT_MAX_WAIT_MS = 2.0  # mlsched-load's default --max-wait-ms
LOW_WAIT_MS = 0.2  # a shorter --max-wait-ms, tried at light loads (numpy only)

EXAMPLES = """examples:
  python -m tools.bench.pipeline --backends numpy --rates 1000,10000,100000 --seconds 2
  python -m tools.bench.pipeline --backends numpy,tf,naive --json /tmp/pipeline.json
"""


class RecordingPipeline(DecisionPipeline):
    """DecisionPipeline that keeps every decided record's event -> map latency (ns)."""

    def __init__(self, table: DecisionTable, batch_size: int, max_wait_s: float) -> None:
        super().__init__(table, batch_size, max_wait_s)
        self.latencies: list[np.ndarray] = []

    def _decide(self, keys: np.ndarray, stamps: np.ndarray | None) -> int:
        n = super()._decide(keys, stamps)
        if n and stamps is not None:
            # The decisions are in the table when _decide returns; BPF timestamps are
            # CLOCK_MONOTONIC, like time.monotonic_ns().
            self.latencies.append(np.int64(time.monotonic_ns()) - stamps.astype(np.int64))
        return n

    def latency_ns(self) -> np.ndarray:
        return np.concatenate(self.latencies) if self.latencies else np.zeros(0, np.int64)


class NaiveConsumer:
    """The seed's path: per candidate, one TF call and one bpf_map_update_elem."""

    def __init__(self, model: Predictor, decisions_fd: int) -> None:
        from loader.bpfmaps import bcc

        self._update = bcc.bpf_update_elem
        self.model = model
        self.fd = decisions_fd
        self.records = 0
        self.decisions = 0
        self._lat: list[int] = []
        self._key = ctypes.c_uint64()
        self._val = ctypes.c_uint32()

    def on_record(self, data: bytes) -> None:
        rec = contract.Candidate.from_buffer_copy(data)
        self.records += 1
        x = schema.unpack_keys(np.array([rec.key], dtype=np.uint64))
        prob = float(self.model.predict(x)[0])
        self._key.value = rec.key
        self._val.value = int(prob > contract.MIGRATE_THRESHOLD)
        if self._update(self.fd, ctypes.byref(self._key), ctypes.byref(self._val), 0) == 0:
            self.decisions += 1
            self._lat.append(time.monotonic_ns() - rec.ts_ns)

    def latency_ns(self) -> np.ndarray:
        return np.array(self._lat, dtype=np.int64)


def percentiles_us(lat_ns: np.ndarray) -> dict[str, float | None]:
    if not len(lat_ns):
        return {"p50_us": None, "p99_us": None, "max_us": None}
    p50, p99 = np.percentile(lat_ns, [50, 99])
    return {"p50_us": round(float(p50) / 1e3, 1), "p99_us": round(float(p99) / 1e3, 1),
            "max_us": round(float(lat_ns.max()) / 1e3, 1)}


def realistic_keys(n: int, seed: int = 1) -> np.ndarray:
    """Packed keys in the producer's ranges (distinct, shuffled)."""
    rng = np.random.default_rng(seed)
    seq = rng.permutation(1 << 22)[:n].astype(np.uint64)
    cpu, idle = seq & np.uint64(255), (seq >> np.uint64(8)) & np.uint64(31)
    busy, dst = (seq >> np.uint64(13)) & np.uint64(31), (seq >> np.uint64(18)) & np.uint64(15)
    return schema.pack_keys(cpu, idle, busy, schema.LOAD_SCALE, dst)


class Bench:
    """One producer object (ring + decision map) and its pacing child, shared by all runs."""

    def __init__(self, obj: Path, model_dir: Path) -> None:
        self.producer = RingProducer(obj, RING_BYTES)
        # Started before TensorFlow is imported: the child is a plain, small process.
        self.child = ProducerChild.start(self.producer)
        self.model_dir = model_dir
        self._models: dict[str, Predictor] = {}

    def close(self) -> None:
        self.child.close()
        self.producer.close()

    def model(self, backend: str) -> Predictor:
        """numpy: the verified fast path; tf and naive: the SavedModel called by keyword."""
        kind = "tf" if backend == "naive" else backend
        if kind not in self._models:
            from loader.backends import NumpyModel, TFBackend

            t0 = time.monotonic()
            self._models[kind] = (NumpyModel.load(self.model_dir, verified=True) if kind == "numpy"
                                  else TFBackend(self.model_dir))
            log.info("bench: %s backend ready in %.1f s", kind, time.monotonic() - t0)
        return self._models[kind]

    def _empty_ring(self) -> None:
        RingBufferReader(self.producer.ringbuf_fd, lambda _d: None).poll(0)

    def _pipeline(self, backend: str, batch_size: int,
                  max_wait_ms: float = DEFAULT_MAX_WAIT_MS) -> RecordingPipeline:
        table = DecisionTable(DecisionMap(self.producer.decisions_fd), None, None)
        p = RecordingPipeline(table, batch_size, max_wait_ms / 1000)
        p.set_model(self.model(backend))
        p.take_model()
        return p

    # --- stages -------------------------------------------------------------------------------

    def read_stage(self) -> dict[str, Any]:
        """records/s of the loader's ring reader + on_record, over a pre-filled ring."""
        self._empty_ring()
        p = self._pipeline("numpy", 64)
        self.child.run(total=READ_STAGE_RECORDS)
        self.child.wait()
        reader = RingBufferReader(self.producer.ringbuf_fd, p.on_record)
        t0 = time.perf_counter()
        reader.poll(0)
        spent = time.perf_counter() - t0
        reader.close()
        return {"records": p.stats.records, "seconds": round(spent, 4),
                "records_per_s": round(p.stats.records / spent)}

    def decide_stage(self, backend: str, batch_size: int) -> dict[str, Any]:
        """decisions/s of DecisionPipeline._decide (or the naive per-candidate call)."""
        keys = realistic_keys(max(batch_size, 4096))
        stamps = np.full(len(keys), time.monotonic_ns(), np.uint64)
        if backend == "naive":
            naive = NaiveConsumer(self.model(backend), self.producer.decisions_fd)
            recs = [bytes(contract.Candidate(key=int(k), ts_ns=int(stamps[0]))) for k in keys]
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < DECIDE_MIN_S or n < 16:
                naive.on_record(recs[n % len(recs)])
                n += 1
            spent = time.perf_counter() - t0
        else:
            p = self._pipeline(backend, batch_size)
            n, i, t0 = 0, 0, time.perf_counter()
            while time.perf_counter() - t0 < DECIDE_MIN_S or n < 16 * batch_size:
                j = i % (len(keys) // batch_size)
                sl = slice(j * batch_size, (j + 1) * batch_size)
                n += p._decide(keys[sl], stamps[sl])
                i += 1
            spent = time.perf_counter() - t0
        return {"backend": backend, "batch_size": 1 if backend == "naive" else batch_size,
                "decisions": n, "seconds": round(spent, 4),
                "decisions_per_s": round(n / spent)}

    # --- paced end to end ---------------------------------------------------------------------

    def paced(self, backend: str, rate: int, seconds: float, batch_size: int,
              max_wait_ms: float) -> dict[str, Any]:
        """The loader's main loop against an offered load; returns throughput and latency."""
        self._empty_ring()
        pipeline: RecordingPipeline | None = None
        naive: NaiveConsumer | None = None
        on_record: Callable[[bytes], None]
        if backend == "naive":
            naive = NaiveConsumer(self.model(backend), self.producer.decisions_fd)
            on_record = naive.on_record
        else:
            pipeline = self._pipeline(backend, batch_size, max_wait_ms)
            on_record = pipeline.on_record
        reader = RingBufferReader(self.producer.ringbuf_fd, on_record)
        poll_ms = max(1, int(max_wait_ms))  # as loader/main.py's loop

        def decided() -> int:
            return naive.decisions if naive else pipeline.stats.decisions  # type: ignore[union-attr]

        before = self.producer.totals()
        self.child.run(rate_per_s=rate, seconds=seconds)
        t0 = time.monotonic()
        in_window: int | None = None
        window_s = seconds
        while True:
            # loader/main.py's loop turn, or a plain poll for the naive path.
            if pipeline is not None:
                pump(reader, pipeline, IDLE_POLL_MS, poll_ms)
            else:
                reader.poll(poll_ms)
            elapsed = time.monotonic() - t0
            if in_window is None and elapsed >= seconds:
                in_window, window_s = decided(), elapsed
            if elapsed >= seconds + DRAIN_S:
                break
        asked = self.child.wait()
        reader.poll(0)
        if pipeline is not None:
            pipeline.flush()
        reader.close()
        after = self.producer.totals()
        pushed = after.produced - before.produced
        ring_drops = after.dropped - before.dropped
        lat = naive.latency_ns() if naive else pipeline.latency_ns()  # type: ignore[union-attr]
        total = decided()
        assert in_window is not None
        return {
            "backend": backend, "batch_size": 1 if naive else batch_size,
            "max_wait_ms": None if naive else max_wait_ms, "offered_per_s": rate,
            "seconds": seconds,
            "asked": asked, "pushed": pushed, "ring_drops": ring_drops,
            "decided": total, "undecided": pushed - total,
            "decisions_per_s": round(in_window / window_s),
            "window_s": round(window_s, 3),
            **percentiles_us(lat),
        }


def run(backends: list[str], rates: list[int], seconds: float, batch_size: int,
        decide_batches: tuple[int, ...], max_wait_ms: float, naive_rates: list[int],
        obj: Path, model_dir: Path, where: str,
        low_wait_rates: list[int] | None = None,
        tf_rates: list[int] | None = None) -> dict[str, Any]:
    """All three measurements; low_wait_rates are also run at LOW_WAIT_MS (numpy)."""
    bench = Bench(obj, model_dir)
    out: dict[str, Any] = {"where": where, "kernel": platform.release(),
                           "cpus": os.cpu_count(), "model": str(model_dir),
                           "ring_bytes": RING_BYTES, "stages": {"read": None, "decide": []},
                           "paced": []}
    try:
        log.info("bench: [%s] stage: ring read of %d records", where, READ_STAGE_RECORDS)
        out["stages"]["read"] = bench.read_stage()
        log.info("bench: [%s]   %s records/s", where,
                 f"{out['stages']['read']['records_per_s']:,}")
        for backend in backends:
            for bs in ((1,) if backend == "naive" else decide_batches):
                r = bench.decide_stage(backend, bs)
                out["stages"]["decide"].append(r)
                log.info("bench: [%s] stage: decide %-5s batch %4d: %s decisions/s", where,
                         backend, r["batch_size"], f"{r['decisions_per_s']:,}")
        per_backend = {"naive": naive_rates, "tf": tf_rates if tf_rates is not None else rates}
        plan = [(b, r, max_wait_ms) for b in backends for r in per_backend.get(b, rates)]
        if "numpy" in backends:
            plan += [("numpy", r, LOW_WAIT_MS) for r in low_wait_rates or []]
        for backend, rate, wait_ms in plan:
            r = bench.paced(backend, rate, seconds, batch_size, wait_ms)
            out["paced"].append(r)
            log.info("bench: [%s] paced %-5s %9s/s offered%s: %9s decisions/s, p50 %s us, "
                     "p99 %s us, ring drops %d, undecided %d", where, backend, f"{rate:,}",
                     "" if backend == "naive" else f" (max wait {wait_ms:g} ms)",
                     f"{r['decisions_per_s']:,}", r["p50_us"], r["p99_us"],
                     r["ring_drops"], r["undecided"])
    finally:
        bench.close()
    return out


def _int_list(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.pipeline",
        description="Measure mlsched's decision pipeline on a real BPF ring buffer (host or VM).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="numpy,tf,naive",
                    help="comma-separated: numpy, tf, naive (default: %(default)s)")
    ap.add_argument("--rates", type=_int_list, default=[1000, 10_000, 100_000, 300_000, 1_000_000],
                    help="offered loads, records/s (default: 1e3,1e4,1e5,3e5,1e6)")
    ap.add_argument("--tf-rates", type=_int_list, default=[1000, 10_000, 100_000],
                    help="offered loads for the tf backend (default: 1e3,1e4,1e5)")
    ap.add_argument("--naive-rates", type=_int_list, default=[1000, 10_000],
                    help="offered loads for the naive path (default: 1e3,1e4)")
    ap.add_argument("--low-wait-rates", type=_int_list, default=[1000, 10_000],
                    help=f"loads also run at --max-wait-ms {LOW_WAIT_MS:g} (default: 1e3,1e4)")
    ap.add_argument("--seconds", type=float, default=2.0, help="window per load (default: 2)")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="the pipeline's batch size in paced runs (default: 64)")
    ap.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                    help="the pipeline's --max-wait-ms (default: %(default)s, the loader's)")
    ap.add_argument("--where", default="host", help="label for the results (default: host)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model directory")
    ap.add_argument("--obj", type=Path, default=DEFAULT_OBJ, help="producer BPF object")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backends = [b for b in args.backends.split(",") if b]
    bad = set(backends) - {"numpy", "tf", "naive"}
    if bad:
        ap.error(f"unknown backend(s): {', '.join(sorted(bad))}")
    if os.geteuid() != 0:
        print("pipeline: must run as root (BPF)", file=sys.stderr)
        return 2
    out = run(backends, args.rates, args.seconds, args.batch_size, DECIDE_BATCHES,
              args.max_wait_ms, args.naive_rates, args.obj, args.model, args.where,
              args.low_wait_rates, args.tf_rates)
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
