"""CPU domains: which CPUs share a dispatch queue (one per LLC, or equal slices)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from loader import contract


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def online_cpus(sysfs: str = "/sys/devices/system/cpu") -> list[int]:
    with open(os.path.join(sysfs, "online")) as f:
        return parse_cpu_list(f.read())


def llc_groups(cpus: list[int], sysfs: str = "/sys/devices/system/cpu") -> list[list[int]]:
    """Group CPUs by the highest-level cache they share."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for cpu in cpus:
        best_level, shared = -1, (cpu,)
        for index in glob.glob(os.path.join(sysfs, f"cpu{cpu}", "cache", "index*")):
            try:
                with open(os.path.join(index, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(index, "shared_cpu_list")) as f:
                    members = tuple(parse_cpu_list(f.read()))
            except OSError:
                continue
            if level > best_level:
                best_level, shared = level, members
        groups.setdefault(shared, []).append(cpu)
    return sorted(groups.values())


def equal_slices(cpus: list[int], n: int) -> list[list[int]]:
    """Split CPUs into n contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(cpus[start : start + size])
        start += size
    return out


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
        table = [0] * self.nr_cpus
        for dom, cpus in enumerate(self.domains):
            for cpu in cpus:
                table[cpu] = dom
        return table


class DomainError(ValueError):
    """The requested domains cannot be built on this machine."""


def plan_domains(requested: int | None, cpus: list[int] | None = None) -> DomainPlan:
    """LLC domains; or `requested` equal slices; one LLC and no request: two slices.

    With a single LLC there is nothing to migrate between, so the default splits the
    machine in two (as in the test VM), which is what makes mlsched's decisions visible.
    """
    cpus = online_cpus() if cpus is None else cpus
    if max(cpus) >= contract.MAX_CPUS:
        raise DomainError(f"CPU {max(cpus)} is beyond the {contract.MAX_CPUS} CPUs supported")
    if requested is not None:
        if requested > len(cpus):
            raise DomainError(f"--domains {requested}: this machine has only {len(cpus)} CPUs")
        if requested > contract.MAX_DOMS:
            raise DomainError(f"--domains {requested}: at most {contract.MAX_DOMS} supported")
        return DomainPlan(equal_slices(cpus, requested), f"{requested} equal slices (--domains)")
    llcs = llc_groups(cpus)
    if len(llcs) > 1 and len(llcs) <= contract.MAX_DOMS:
        return DomainPlan(llcs, f"{len(llcs)} LLC domains")
    n = 2 if len(cpus) >= 2 else 1
    return DomainPlan(equal_slices(cpus, n), f"one LLC: {n} equal slices (set with --domains)")
