"""The kernel half of the pipeline benchmark: a real ring buffer fed by a real BPF program.

RingProducer loads tools/bench/ringbuf_producer.bpf.o (built by `make bench`) with the system
libbpf and runs its BPF_PROG_TYPE_SYSCALL program through BPF_PROG_TEST_RUN: each run pushes
`nr` struct mlsched_candidate records into the "candidates" ring buffer, each stamped with
bpf_ktime_get_ns() as mlsched's select_cpu stamps them. No sched_ext is needed, so this works on
the host kernel as well as in the VM.

The pacing loop runs in a child process (`python -m tools.bench.producer`, given the program's
fd), so the consumer under test has the parent's interpreter to itself:

    child = ProducerChild.start(producer)
    child.run(rate_per_s=100_000, seconds=3)   # returns at once; the child paces the pushes
    ...consume...
    child.wait()                                # records the child pushed
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loader import contract, libbpf, paths

REPO_ROOT = paths.CHECKOUT
DEFAULT_OBJ = REPO_ROOT / "build" / "bench" / "ringbuf_producer.bpf.o"
PROG_NAME = "produce"
MAX_PER_RUN = 1 << 20  # the program clamps nr to this
TICK_S = 0.001  # pacing granularity of the child

_lib = libbpf._lib
_vp = ctypes.c_void_p
_lib.bpf_map_lookup_elem.restype = ctypes.c_int
_lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, _vp, _vp]
_lib.bpf_prog_test_run_opts.restype = ctypes.c_int
_lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, _vp]


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf >= 1.0)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _vp), ("data_out", _vp),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", _vp), ("ctx_out", _vp),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


def prog_test_run(prog_fd: int, ctx: ctypes.Structure) -> int:
    """Run a syscall program once on ctx (the kernel writes it back in place, ctx_out must be
    unset for this program type); returns the program's return value."""
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts))
    opts.ctx_in = ctypes.addressof(ctx)
    opts.ctx_size_in = ctypes.sizeof(ctx)
    libbpf._check(_lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval


class ProduceArgs(ctypes.Structure):
    """struct produce_args in ringbuf_producer.bpf.c."""

    _fields_ = [("nr", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("wake_bytes", ctypes.c_uint64), ("max_wait_ns", ctypes.c_uint64)]


class Totals(ctypes.Structure):
    """struct producer_totals (the program's .bss)."""

    _fields_ = [
        ("produced", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("next_seq", ctypes.c_uint64),
    ]


class ProducerError(Exception):
    """The producer could not be loaded or run; str() is one line."""


class ProgRunner:
    """BPF_PROG_TEST_RUN of the producer program, by fd (usable in the child process too)."""

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd
        self._args = ProduceArgs()
        self._opts = TestRunOpts()
        self._opts.sz = ctypes.sizeof(TestRunOpts)
        self._opts.ctx_in = ctypes.cast(ctypes.byref(self._args), _vp)
        self._opts.ctx_size_in = ctypes.sizeof(ProduceArgs)

    def push(self, nr: int) -> None:
        """Push nr records (clamped to MAX_PER_RUN) into the ring buffer."""
        self._args.nr = min(nr, MAX_PER_RUN)
        if _lib.bpf_prog_test_run_opts(self.prog_fd, ctypes.byref(self._opts)) != 0:
            err = ctypes.get_errno()
            raise ProducerError(f"BPF_PROG_TEST_RUN: {os.strerror(err)} (errno {err})")


class RingProducer:
    """The loaded producer object: its program, ring buffer, decision map and totals."""

    def __init__(self, obj_path: str | Path = DEFAULT_OBJ,
                 ringbuf_bytes: int = contract.RINGBUF_DEFAULT_BYTES) -> None:
        if not Path(obj_path).is_file():
            raise ProducerError(f"{obj_path} not found (built by `make bench`)")
        libbpf.set_print(False)
        self.obj = libbpf.BpfObject(str(obj_path))
        try:
            self.obj.set_max_entries(contract.MAP_CANDIDATES, ringbuf_bytes)
            self.obj.load()
        except libbpf.LibbpfError as e:
            self.obj.close()
            raise ProducerError(str(e)) from None
        try:
            self.prog_fd = self.obj.prog_fd(PROG_NAME)
        except libbpf.LibbpfError as e:
            raise ProducerError(str(e)) from None
        self.ringbuf_fd = self.obj.map_fd(contract.MAP_CANDIDATES)
        self.decisions_fd = self.obj.map_fd(contract.MAP_DECISIONS)
        self._bss_fd = self.obj.map_fd(".bss")
        self.runner = ProgRunner(self.prog_fd)

    def totals(self) -> Totals:
        t = Totals()
        key = ctypes.c_uint32(0)
        if _lib.bpf_map_lookup_elem(self._bss_fd, ctypes.byref(key), ctypes.byref(t)) != 0:
            err = ctypes.get_errno()
            raise ProducerError(f"read .bss: {os.strerror(err)}")
        return t

    def close(self) -> None:
        self.obj.close()


def pace(runner: ProgRunner, rate_per_s: float | None, seconds: float, total: int | None) -> int:
    """Push records at rate_per_s for seconds (None: as fast as possible), or `total` at once.

    Returns the records asked for (pushed or dropped by a full ring).
    """
    if total is not None:
        left = total
        while left > 0:
            n = min(left, MAX_PER_RUN)
            runner.push(n)
            left -= n
        return total
    asked = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if rate_per_s is None:
            n = 4096
        else:
            n = int(rate_per_s * (now - t0)) - asked
            if n <= 0:
                time.sleep(min(TICK_S, deadline - now))
                continue
        runner.push(n)
        asked += n
    return asked


@dataclass
class ProducerChild:
    """A child process that paces pushes on command (one JSON line in, one line out)."""

    proc: subprocess.Popen

    @classmethod
    def start(cls, producer: RingProducer) -> ProducerChild:
        cmd = [sys.executable, "-m", "tools.bench.producer", "--prog-fd", str(producer.prog_fd)]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                pass_fds=[producer.prog_fd], text=True)
        child = cls(proc)
        child._send({"op": "ping"})
        child.wait()
        return child

    def _send(self, msg: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def run(self, rate_per_s: float | None = None, seconds: float = 0.0,
            total: int | None = None) -> None:
        """Start pushing; returns at once. rate None = flood; total = one burst of that many."""
        self._send({"op": "run", "rate": rate_per_s, "seconds": seconds, "total": total})

    def wait(self) -> int:
        """Wait for the running command; returns the records it asked the program to push."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise ProducerError(f"producer child exited ({self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise ProducerError(reply["error"])
        return int(reply.get("asked", 0))

    def close(self) -> None:
        if self.proc.poll() is None:
            self._send({"op": "quit"})
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def child_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.producer",
        description="Pacing child of the pipeline benchmark: reads JSON commands on stdin and "
        "runs the inherited producer program (--prog-fd) through BPF_PROG_TEST_RUN.",
    )
    ap.add_argument("--prog-fd", type=int, required=True, help="fd of the producer program")
    args = ap.parse_args(argv)
    runner = ProgRunner(args.prog_fd)
    for line in sys.stdin:
        msg = json.loads(line)
        reply: dict[str, object] = {}
        if msg["op"] == "quit":
            break
        if msg["op"] == "run":
            try:
                reply["asked"] = pace(runner, msg["rate"], float(msg["seconds"]), msg["total"])
            except ProducerError as e:
                reply["error"] = str(e)
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
