"""Count task migrations system-wide: the sched:sched_migrate_task tracepoint, through bcc.

The kernel fires sched_migrate_task from set_task_cpu() whenever a task's CPU changes, whoever
moves it: EEVDF's wakeup placement and load balancer, or a sched_ext scheduler's select_cpu
and its dispatch-time steals. So one counter serves every configuration alike.

Compiling the bcc program needs the running kernel's headers (/lib/modules/<release>/build;
the VM has them through the kernel cache) and costs 7-11 s under TCG: build one
MigrationCounter per boot and read it before and after each run.
"""

from __future__ import annotations

import ctypes
import time

BPF_TEXT = """
BPF_PERCPU_ARRAY(migrations, u64, 1);

TRACEPOINT_PROBE(sched, sched_migrate_task)
{
	int zero = 0;
	u64 *n = migrations.lookup(&zero);

	if (n)
		(*n)++;
	return 0;
}
"""


class MigrationCounter:
    """sched_migrate_task events since the counter was attached, summed over CPUs."""

    def __init__(self) -> None:
        from bcc import BPF

        t0 = time.monotonic()
        self._bpf = BPF(text=BPF_TEXT)
        self.compile_s = time.monotonic() - t0
        self._table = self._bpf["migrations"]

    def read(self) -> int:
        return int(sum(self._table[ctypes.c_int(0)]))

    def close(self) -> None:
        self._bpf.cleanup()
