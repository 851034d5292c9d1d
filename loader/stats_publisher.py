"""Publishes the loader's figures into the loader_stats map, so mlsched-stats reads only maps."""

from __future__ import annotations

import time

from loader import contract
from loader.bpfmaps import U64Array
from loader.pipeline import DecisionPipeline, Predictor

LS = contract.LoaderStat
PUBLISH_INTERVAL_S = 0.2


class StatsPublisher:
    def __init__(
        self, loader_stats: U64Array, latency_hist: U64Array, pipeline: DecisionPipeline
    ) -> None:
        self.map = loader_stats
        self.hist_map = latency_hist
        self.pipeline = pipeline
        self.model_failed: str | None = None  # set by the model thread when loading fails
        self.restarts = 0
        self.reloads = 0
        self.reload_failures = 0
        self.digest = 0  # first 8 bytes of the serving model's sha256
        self._backend: Predictor | None = None
        self._last = 0.0

    def rebind(self, loader_stats: U64Array, latency_hist: U64Array) -> None:
        """The maps of a new attach: what was published goes there from now on."""
        self.map, self.hist_map = loader_stats, latency_hist
        if self._backend is not None:
            self.model_ready(self._backend)
        self.publish()

    def model_ready(self, backend: Predictor, digest_hex: str = "") -> None:
        """The loop switched to this model (digest: its sha256 in hex)."""
        self._backend = backend
        if digest_hex:
            self.digest = int(digest_hex[:16], 16)
        self.map.set(LS.BACKEND, int(backend.kind))
        self.map.set(LS.MODEL_READY, 1)

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if now - self._last >= PUBLISH_INTERVAL_S:
            self._last = now
            self.publish()

    def publish(self) -> None:
        s = self.pipeline.stats
        for index, value in (
            (LS.BATCHES, s.batches),
            (LS.RECORDS, s.records),
            (LS.DECISIONS, s.decisions),
            (LS.MODEL_ERRORS, s.model_errors),
            (LS.BATCH_NS_SUM, s.batch_ns_sum),
            (LS.BATCH_NS_MAX, s.batch_ns_max),
            (LS.EV_LAT_NS_SUM, s.ev_lat_ns_sum),
            (LS.TABLE_ENTRIES, s.table_entries),
            (LS.RESTARTS, self.restarts),
            (LS.RELOADS, self.reloads),
            (LS.RELOAD_FAILURES, self.reload_failures),
            (LS.MODEL_DIGEST, self.digest),
            (LS.GRID_DECIDED, self.pipeline.table.grid.decided()
             if self.pipeline.table.grid is not None else 0),
        ):
            self.map.set(index, value)
        self.hist_map.write_all(s.hist.reshape(-1))
