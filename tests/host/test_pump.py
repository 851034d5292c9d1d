"""The decision loop's turn (loader.pipeline.pump) on a scripted ring and a real pipeline.

The ring is a stand-in (a real BPF ring needs a producer in the kernel: the bench covers it);
the pipeline, the table's batching and the decisions are the loader's own.
"""

from __future__ import annotations

import numpy as np

from loader import contract, schema
from loader.pipeline import DecisionPipeline, pump


class ScriptedRing:
    """poll()/consume() hand the pipeline the records queued by the test."""

    def __init__(self, pipeline: DecisionPipeline) -> None:
        self.pipeline = pipeline
        self.waiting: list[bytes] = []
        self.polls: list[int] = []  # timeouts asked for
        self.announced = True  # False: records are there but no wakeup came (NO_WAKEUP)

    def push(self, key: int, ts_ns: int = 1) -> None:
        self.waiting.append(bytes(contract.Candidate(key=key, ts_ns=ts_ns)))

    def _take(self) -> int:
        n = len(self.waiting)
        for rec in self.waiting:
            self.pipeline.on_record(rec)
        self.waiting.clear()
        return n

    def poll(self, timeout_ms: int) -> int:
        self.polls.append(timeout_ms)
        return self._take() if self.announced else 0

    def consume(self) -> int:
        return self._take()


class Table:
    """Records what the pipeline writes (the grid and hash are tested in the VM)."""

    grid = None

    def __init__(self) -> None:
        self.written: list[int] = []

    def write(self, keys: np.ndarray, migrate: np.ndarray) -> None:
        self.written += keys.tolist()

    def is_decided(self, key: int) -> bool:
        return key in self.written

    def entries(self) -> int:
        return len(self.written)


class Half:
    name, kind = "half", contract.Backend.NUMPY

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x[:, 0] % 2).astype(np.float32)


def make(batch: int = 64) -> tuple[DecisionPipeline, ScriptedRing, Table]:
    table = Table()
    p = DecisionPipeline(table, batch, max_wait_s=1000.0)  # max-wait never expires here
    p.set_model(Half())
    p.take_model()
    return p, ScriptedRing(p), table


def test_a_lone_candidate_is_decided_in_the_same_turn() -> None:
    p, ring, table = make()
    ring.push(schema.pack_key(3, 1, 1, 8, 2))
    pump(ring, p, idle_ms=100, filling_ms=2)
    assert table.written == [schema.pack_key(3, 1, 1, 8, 2)]
    assert not p.filling()


def test_a_backlog_is_taken_in_batches_without_waiting() -> None:
    p, ring, table = make(batch=4)
    for cpu in range(10):
        ring.push(schema.pack_key(cpu, 1, 1, 8, 2))
    pump(ring, p, idle_ms=100, filling_ms=2)
    assert len(table.written) == 10  # flush() takes the whole backlog, batch by batch
    assert p.stats.batches == 3


def test_records_without_a_wakeup_are_picked_up_while_the_stream_flows() -> None:
    p, ring, table = make()
    ring.push(schema.pack_key(0, 1, 1, 8, 2))
    pump(ring, p, idle_ms=100, filling_ms=2)
    ring.announced = False  # the kernel held the wakeup (fewer than a batch, young)
    ring.push(schema.pack_key(1, 1, 1, 8, 2))
    pump(ring, p, idle_ms=100, filling_ms=2)
    assert ring.polls[-1] == 2, "a flowing stream is polled at max-wait, not idle"
    assert schema.pack_key(1, 1, 1, 8, 2) in table.written


def test_an_idle_loop_sleeps_long() -> None:
    p, ring, _ = make()
    p.last_record_s = 0.0
    pump(ring, p, idle_ms=100, filling_ms=2)
    assert ring.polls == [100]


def test_keys_already_decided_are_not_asked_again() -> None:
    p, ring, table = make()
    key = schema.pack_key(5, 1, 1, 8, 2)
    ring.push(key)
    pump(ring, p, idle_ms=100, filling_ms=2)
    ring.push(key)
    pump(ring, p, idle_ms=100, filling_ms=2)
    assert table.written == [key]
