"""The decision pipeline: candidate records -> batches -> model -> one batch map update."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from loader import contract
from loader.backends import Predictor
from loader.bpfmaps import DecisionMap

log = logging.getLogger("mlsched.pipeline")

# Keys waiting for a model are capped: past this the kernel pushes them again later.
MAX_WAITING_KEYS = 65536


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
    hist: np.ndarray = field(
        default_factory=lambda: np.zeros((contract.NR_HISTS, contract.HIST_BUCKETS), np.uint64)
    )


class DecisionPipeline:
    """Collects candidate keys, runs the model on batches, writes decisions in one update.

    Until a model is set (it loads in the background) keys only accumulate; the kernel's
    fallback serves those candidates meanwhile.
    """

    def __init__(self, decisions: DecisionMap, batch_size: int, max_wait_s: float) -> None:
        self.decisions = decisions
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.stats = PipelineStats()
        self._model: Predictor | None = None
        # key -> BPF timestamp (ns, CLOCK_MONOTONIC) of its first record, insertion ordered
        self._waiting: dict[int, int] = {}
        self._oldest_s = 0.0
        self._errors_logged: set[str] = set()
        self._decided: set[int] = set()  # keys written to the decision map

    def rebind(self, decisions: DecisionMap) -> None:
        """A new attach (after a hotplug restart): a new, empty table; the model stays."""
        self.decisions = decisions
        self._waiting.clear()
        self._decided.clear()
        self.stats.table_entries = 0

    def set_model(self, model: Predictor) -> None:
        self._model = model

    @property
    def model(self) -> Predictor | None:
        return self._model

    def on_record(self, data: bytes) -> None:
        rec = contract.Candidate.from_buffer_copy(data)
        self.stats.records += 1
        if rec.key in self._waiting:
            return
        if len(self._waiting) >= MAX_WAITING_KEYS:
            return
        if not self._waiting:
            self._oldest_s = time.monotonic()
        self._waiting[rec.key] = rec.ts_ns

    def filling(self) -> bool:
        """A batch is being filled: keys wait and a model is there to decide them."""
        return self._model is not None and bool(self._waiting)

    def due(self) -> bool:
        """A batch is due when it is full or its oldest key waited max_wait_s."""
        if self._model is None or not self._waiting:
            return False
        return (
            len(self._waiting) >= self.batch_size
            or time.monotonic() - self._oldest_s >= self.max_wait_s
        )

    def flush(self) -> int:
        """Decide every waiting key, batch_size at a time; returns decisions written."""
        written = 0
        while self._model is not None and self._waiting:
            # islice: copying the whole backlog per batch made a deep backlog quadratic.
            items = list(itertools.islice(self._waiting.items(), self.batch_size))
            for k, _ in items:
                del self._waiting[k]
            keys = np.fromiter((k for k, _ in items), dtype=np.uint64, count=len(items))
            stamps = np.fromiter((t for _, t in items), dtype=np.uint64, count=len(items))
            written += self._decide(keys, stamps)
        self._oldest_s = time.monotonic()
        return written

    def _model_error(self, kind: str, detail: str) -> None:
        self.stats.model_errors += 1
        if kind not in self._errors_logged:
            self._errors_logged.add(kind)
            log.error(
                "model error (%s): %s; this batch's decisions are not written "
                "(logged once per kind)",
                kind,
                detail,
            )

    def _decide(self, keys: np.ndarray, stamps: np.ndarray) -> int:
        model = self._model
        assert model is not None
        x = contract.unpack_keys(keys)
        t0 = time.monotonic_ns()
        try:
            prob = np.asarray(model.predict(x), dtype=np.float32).reshape(-1)
        except Exception as e:  # any backend failure: keep the scheduler, skip the batch
            self._model_error(type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return 0
        if prob.shape[0] != keys.shape[0]:
            self._model_error("shape", f"{prob.shape[0]} outputs for {keys.shape[0]} inputs")
            return 0
        if not np.all(np.isfinite(prob)):
            self._model_error("non-finite", "NaN or Inf in the model output")
            return 0
        values = (prob > contract.MIGRATE_THRESHOLD).astype(np.uint32)
        self.decisions.update_batch(keys, values)
        done = time.monotonic_ns()
        spent = done - t0
        s = self.stats
        s.batches += 1
        s.decisions += len(keys)
        s.batch_ns_sum += spent
        s.batch_ns_max = max(s.batch_ns_max, spent)
        s.hist[contract.Hist.BATCH, contract.hist_bucket(np.array([spent]))[0]] += 1
        # BPF timestamps are CLOCK_MONOTONIC, like time.monotonic_ns().
        ev_lat = np.int64(done) - stamps.astype(np.int64)
        s.ev_lat_ns_sum += int(np.sum(ev_lat))
        np.add.at(s.hist[contract.Hist.EVENT], contract.hist_bucket(ev_lat), 1)
        for k in keys.tolist():
            self._decided.add(k)
        s.table_entries = len(self._decided)
        return len(keys)
