"""Count task migrations system-wide: the sched:sched_migrate_task tracepoint, through bcc.

The kernel fires sched_migrate_task from set_task_cpu() whenever a task's CPU changes, whoever
moves it: EEVDF's wakeup placement and load balancer, or a sched_ext scheduler's select_cpu
and its dispatch-time steals. So one counter serves every configuration alike. Each event is
also classed by the domains mlsched would use (the loader's plan, e.g. two equal slices):
moves between domains are the ones mlsched's model decides on; moves within a domain are not.

Compiling the bcc program needs the running kernel's headers (/lib/modules/<release>/build;
the VM has them through the kernel cache) and costs 7-11 s under TCG: build one
MigrationCounter per boot and read it before and after each run.
"""

from __future__ import annotations

import ctypes
import time

BPF_TEXT = """
BPF_PERCPU_ARRAY(migrations, u64, 2);	/* 0: all, 1: between domains */
BPF_ARRAY(cpu_dom, u32, 512);		/* CPU -> domain, set by user space */

TRACEPOINT_PROBE(sched, sched_migrate_task)
{
	int all = 0, cross = 1;
	u32 orig = args->orig_cpu, dest = args->dest_cpu;
	u32 *od = cpu_dom.lookup(&orig), *dd = cpu_dom.lookup(&dest);
	u64 *n = migrations.lookup(&all);

	if (n)
		(*n)++;
	if (od && dd && *od != *dd) {
		n = migrations.lookup(&cross);
		if (n)
			(*n)++;
	}
	return 0;
}
"""


class MigrationCounter:
    """sched_migrate_task events since the counter was attached, summed over CPUs."""

    def __init__(self, cpu_to_dom: list[int]) -> None:
        from bcc import BPF

        t0 = time.monotonic()
        # The 7.3 headers trip a harmless clang warning on every compile; keep the log clean.
        self._bpf = BPF(text=BPF_TEXT, cflags=["-Wno-ignored-attributes"])
        self.compile_s = time.monotonic() - t0
        doms = self._bpf["cpu_dom"]
        for cpu, dom in enumerate(cpu_to_dom):
            doms[ctypes.c_int(cpu)] = ctypes.c_uint32(dom)
        self._table = self._bpf["migrations"]

    def read(self) -> tuple[int, int]:
        """(all migrations, migrations between domains) so far."""
        return (int(sum(self._table[ctypes.c_int(0)])),
                int(sum(self._table[ctypes.c_int(1)])))

    def close(self) -> None:
        self._bpf.cleanup()
