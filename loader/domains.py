"""CPU domains: which CPUs share a dispatch queue (one per LLC, or equal slices)."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from itertools import pairwise
from operator import itemgetter
from pathlib import Path

from loader import contract, schema

SYSFS_CPU = Path("/sys/devices/system/cpu")


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    ranges = (part.partition("-") for part in text.strip().split(",") if part)
    return [cpu for lo, _, hi in ranges for cpu in range(int(lo), int(hi or lo) + 1)]


def online_cpus() -> list[int]:
    return parse_cpu_list((SYSFS_CPU / "online").read_text())


def llc_groups(cpus: list[int]) -> list[list[int]]:
    """Group CPUs by the highest-level cache they share."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for cpu in cpus:
        caches = [(-1, (cpu,))]  # (level, the CPUs sharing it); no cache info: a group of one
        for index in (SYSFS_CPU / f"cpu{cpu}" / "cache").glob("index*"):
            with suppress(OSError):
                members = tuple(parse_cpu_list((index / "shared_cpu_list").read_text()))
                caches.append((int((index / "level").read_text()), members))
        groups.setdefault(max(caches, key=itemgetter(0))[1], []).append(cpu)
    return sorted(groups.values())


def equal_slices(cpus: list[int], n: int) -> list[list[int]]:
    """Split CPUs into n contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(len(cpus), n)
    starts = [i * base + min(i, extra) for i in range(n + 1)]
    return [cpus[start:stop] for start, stop in pairwise(starts)]


@dataclass
class DomainPlan:
    domains: list[list[int]]  # CPUs of each domain
    reason: str  # how they were chosen, for the log

    @property
    def nr_cpus(self) -> int:
        """Size of the CPU id space the plan covers (highest CPU id + 1)."""
        return max(max(d) for d in self.domains) + 1

    @property
    def max_dom_cpus(self) -> int:
        return max(len(d) for d in self.domains)

    def cpu_to_dom(self) -> list[int]:
        """Each CPU id's domain (0 for an id no domain holds)."""
        dom_of = {cpu: dom for dom, cpus in enumerate(self.domains) for cpu in cpus}
        return [dom_of.get(cpu, 0) for cpu in range(self.nr_cpus)]


class DomainError(ValueError):
    """The requested domains cannot be built on this machine."""


def plan_domains(requested: int | None, cpus: list[int] | None = None) -> DomainPlan:
    """LLC domains; or `requested` equal slices; one LLC and no request: two slices.

    With a single LLC there is nothing to migrate between, so the default splits the
    machine in two (as in the test VM), which is what makes mlsched's decisions visible.
    """
    cpus = online_cpus() if cpus is None else cpus
    if max(cpus) >= schema.MAX_CPUS:
        raise DomainError(f"CPU {max(cpus)} is beyond the {schema.MAX_CPUS} CPUs supported")
    if requested is not None:
        if requested > len(cpus):
            raise DomainError(f"--domains {requested}: this machine has only {len(cpus)} CPUs")
        if requested > contract.MAX_DOMS:
            raise DomainError(f"--domains {requested}: at most {contract.MAX_DOMS} supported")
        return DomainPlan(equal_slices(cpus, requested), f"{requested} equal slices (--domains)")
    llcs = llc_groups(cpus)
    if 1 < len(llcs) <= contract.MAX_DOMS:
        return DomainPlan(llcs, f"{len(llcs)} LLC domains")
    n = min(len(cpus), 2)
    return DomainPlan(equal_slices(cpus, n), f"one LLC: {n} equal slices (set with --domains)")
