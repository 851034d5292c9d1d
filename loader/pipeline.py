"""The decision pipeline: candidate records -> batches -> model -> one table write per batch."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from loader import contract, schema
from loader.backends import Predictor
from loader.table import DecisionTable

if TYPE_CHECKING:
    from loader.bpfmaps import RingBufferReader

log = logging.getLogger("mlsched.pipeline")
MAX_WAITING_KEYS = 65536  # past this the kernel pushes a key again later (resubmit)
ACTIVE_S = 0.1  # records came this recently: the ring may hold some it did not wake us for


@dataclass
class PipelineStats:
    """Loader-side figures since attach (published into the loader_stats map)."""

    batches: int = 0
    records: int = 0
    decisions: int = 0
    model_errors: int = 0
    batch_ns_sum: int = 0
    batch_ns_max: int = 0
    ev_lat_ns_sum: int = 0
    table_entries: int = 0
    # log2 latency histograms, rows as contract.Hist (cumulative since attach)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(
        (contract.NR_HISTS, contract.HIST_BUCKETS), np.uint64))


class DecisionPipeline:
    """Collects candidate keys, runs the model on batches, writes the decisions.

    Until a model is set (it loads in the background) keys only accumulate while the kernel's
    fallback serves them. The model thread sets a model; the loop's thread, which alone writes
    the table, takes it at its next turn.
    """

    def __init__(self, table: DecisionTable, batch_size: int, max_wait_s: float) -> None:
        self.table, self.batch_size, self.max_wait_s = table, batch_size, max_wait_s
        self.stats = PipelineStats()
        self.model: Predictor | None = None
        self.precompute_pending = False
        self.last_record_s = 0.0  # monotonic s of the last record
        self._waiting: dict[int, int] = {}  # key -> BPF ns of its first record, in order
        self._oldest_s = 0.0
        self._next: tuple[Predictor, object] | None = None
        self._lock = threading.Lock()
        self._errors_logged: set[str] = set()

    def rebind(self, table: DecisionTable) -> None:
        """A new attach (after a hotplug restart): a new, empty table; the model stays."""
        self.table, self.stats.table_entries = table, 0
        self._waiting.clear()
        self.precompute_pending = self.model is not None

    def set_model(self, model: Predictor, info: object = None) -> None:
        with self._lock:
            self._next = (model, info)

    def take_model(self) -> tuple[Predictor, object] | None:
        """Switch to the model set since the last call; (model, info) when it switched. A reload
        starts a new table generation: the fallback serves until the new model decided."""
        with self._lock:
            pending, self._next = self._next, None
        if pending is not None:
            if self.model is not None:
                self.table.new_generation()
                self._waiting.clear()
            self.model, self.precompute_pending = pending[0], True
        return pending

    def precompute(self, chunk: int = 65536) -> int:
        """Decide every key of the dense grid in one pass (none without a grid, or when the
        kernel decides: --inference kernel)."""
        self.precompute_pending = False
        grid, written = self.table.grid, 0
        if self.model is None or grid is None or self.model.kind == contract.Backend.KERNEL:
            return 0
        for start in range(0, grid.size, chunk):
            keys = schema.grid_keys(*grid.dims, np.arange(start, min(start + chunk, grid.size)))
            written += self._decide(keys, None)
        self._waiting.clear()
        return written

    def on_record(self, data: bytes) -> None:
        rec = contract.Candidate.from_buffer_copy(data)
        self.stats.records += 1
        self.last_record_s = time.monotonic()
        if (rec.key in self._waiting or len(self._waiting) >= MAX_WAITING_KEYS
                or self.model is not None and self.table.is_decided(rec.key)):
            return
        if not self._waiting:
            self._oldest_s = self.last_record_s
        self._waiting[rec.key] = rec.ts_ns

    def filling(self) -> bool:
        """Keys wait and a model is there to decide them."""
        return self.model is not None and bool(self._waiting)

    def full(self) -> bool:
        return len(self._waiting) >= self.batch_size

    def due(self) -> bool:
        """A batch is due when full or when its oldest key waited max_wait_s."""
        return self.filling() and (
            self.full() or time.monotonic() - self._oldest_s >= self.max_wait_s)

    def flush(self) -> int:
        """Decide every waiting key, batch_size at a time; returns decisions written."""
        written = 0
        while self.filling():
            # islice: copying the whole backlog per batch made a deep backlog quadratic.
            items = list(itertools.islice(self._waiting.items(), self.batch_size))
            for key, _ in items:
                del self._waiting[key]
            keys, stamps = np.array(items, dtype=np.uint64).reshape(-1, 2).T
            written += self._decide(keys, stamps)
        self._oldest_s = time.monotonic()
        return written

    def _model_error(self, kind: str, detail: str) -> None:
        self.stats.model_errors += 1
        if kind not in self._errors_logged:
            self._errors_logged.add(kind)
            log.error("model error (%s): %s; this batch's decisions are not written "
                      "(logged once per kind)", kind, detail)

    def _decide(self, keys: np.ndarray, stamps: np.ndarray | None) -> int:
        """Run the model on keys and write the decisions; stamps (BPF ns, CLOCK_MONOTONIC like
        time.monotonic_ns) give the event latency, None for keys nobody asked for yet."""
        assert self.model is not None
        t0 = time.monotonic_ns()
        try:
            prob = np.asarray(self.model.predict(schema.unpack_keys(keys)),
                              dtype=np.float32).reshape(-1)
        except Exception as e:  # any backend failure: keep the scheduler, skip the batch
            self._model_error(type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return 0
        if prob.shape[0] != keys.shape[0]:
            self._model_error("shape", f"{prob.shape[0]} outputs for {keys.shape[0]} inputs")
            return 0
        if not np.all(np.isfinite(prob)):
            self._model_error("non-finite", "NaN or Inf in the model output")
            return 0
        self.table.write(keys, prob > contract.MIGRATE_THRESHOLD)
        done = time.monotonic_ns()
        s, spent = self.stats, done - t0
        s.batches += 1
        s.decisions += len(keys)
        s.batch_ns_sum += spent
        s.batch_ns_max = max(s.batch_ns_max, spent)
        s.hist[contract.Hist.BATCH, contract.hist_bucket(np.array([spent]))[0]] += 1
        if stamps is not None:
            ev_lat = np.int64(done) - stamps.astype(np.int64)
            s.ev_lat_ns_sum += int(np.sum(ev_lat))
            np.add.at(s.hist[contract.Hist.EVENT], contract.hist_bucket(ev_lat), 1)
        s.table_entries = self.table.entries()
        return len(keys)


def pump(ring: RingBufferReader, pipeline: DecisionPipeline, idle_ms: int,
         filling_ms: int) -> None:
    """One turn of the decision loop: wait for records (briefly while a batch fills or records
    flow, since the kernel holds wakeups back until a batch's worth or max-wait; long when idle:
    each wakeup of the loader preempts the workload), then take what the ring holds, up to a
    batch, and decide it at once, so a lone candidate has no floor."""
    active = pipeline.filling() or time.monotonic() - pipeline.last_record_s < ACTIVE_S
    got = ring.poll(filling_ms if active else idle_ms)
    if got <= 0 and active:
        got = ring.consume()  # records the kernel did not wake us for
    if got > 0:
        while not pipeline.full() and ring.consume() > 0:
            pass
        if pipeline.filling():
            pipeline.flush()
    elif pipeline.due():
        pipeline.flush()
