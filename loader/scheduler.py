"""The attached scheduler: load, configure, attach, pin, and take it all down again."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import stat
import threading
import time

from loader import contract, libbpf
from loader.bpfmaps import (
    DecisionMap,
    PerCpuU64Array,
    StructArray,
    U64Array,
    set_u32_array,
    write_struct,
)
from loader.domains import DomainPlan
from loader.kernel_mlp import QuantizedMlp
from loader.table import DecisionGrid, DecisionTable, GridDims, grid_words

log = logging.getLogger("mlsched.scheduler")

SCX_SYSFS = "/sys/kernel/sched_ext"
SCX_EXIT_ERROR = 1024  # enum scx_exit_kind: kinds from here on are errors
# enum scx_exit_code: the kernel asks the scheduler to re-attach (CPU hotplug); read from the
# kernel's BTF, this is only the value used when the kernel does not name it.
SCX_ECODE_ACT_RESTART_DFL = 1 << 48
DISABLE_WAIT_S = 5.0  # longest wait for a previous scheduler to finish disabling


class SchedulerError(Exception):
    """The scheduler could not be attached; str() is one line."""


def scx_state() -> str:
    """'enabled', 'disabled', ... or 'unsupported' on a kernel without sched_ext."""
    try:
        with open(os.path.join(SCX_SYSFS, "state")) as f:
            return f.read().strip()
    except OSError:
        return "unsupported"


def scx_ops_name() -> str:
    try:
        with open(os.path.join(SCX_SYSFS, "root", "ops")) as f:
            return f.read().strip()
    except OSError:
        return ""


def hotplug_seq() -> int:
    """The kernel's CPU hotplug sequence number: attach fails if it moved since."""
    try:
        with open(os.path.join(SCX_SYSFS, "hotplug_seq")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def enums_path(obj_path: str) -> str:
    """The list of scx enum constants `make bpf` writes beside the object."""
    return os.path.splitext(obj_path)[0] + ".enums"


def read_enum_list(path: str) -> list[tuple[str, str]]:
    """Lines "NAME enum-type" -> [(NAME, type)]."""
    try:
        with open(path) as f:
            return [tuple(line.split()[:2]) for line in f if len(line.split()) >= 2]
    except OSError as e:
        raise SchedulerError(f"cannot read {path} ({e.strerror}): run `make bpf`") from None


@functools.cache
def kernel_enum_values(enum_types: tuple[str, ...]) -> dict[str, int]:
    """Members of these enums in the running kernel's BTF; read once per process (a restart
    after hotplug reuses them: parsing the kernel's BTF takes seconds under TCG)."""
    kbtf = libbpf.Btf.vmlinux()
    try:
        values: dict[str, int] = {}
        for enum_type in enum_types:
            values.update(kbtf.enum_values(enum_type))
        return values
    finally:
        kbtf.close()


def clean_stale_pins(pin_dir: str) -> None:
    """Remove pins a loader that died hard left behind, unless that loader still runs."""
    if not os.path.isdir(pin_dir):
        return
    if scx_state() == "enabled" and scx_ops_name() == contract.SCHED_NAME:
        raise SchedulerError(f"mlsched is already attached (pins in {pin_dir})")
    log.info("removing stale pins in %s left by a previous loader", pin_dir)
    shutil.rmtree(pin_dir)


class Scheduler:
    """Owns the BPF object, its maps and the struct_ops link."""

    def __init__(self, obj_path: str, ringbuf_bytes: int, verbose: bool,
                 grid: GridDims | None = None) -> None:
        """Open and load the object; `grid` sizes the dense decision grid (None: hash only)."""
        libbpf.set_print(verbose)
        enums = read_enum_list(enums_path(obj_path))
        self.obj = libbpf.BpfObject(obj_path)
        self.link: libbpf.StructOpsLink | None = None
        self.pin_dir: str | None = None
        self.restart_code = SCX_ECODE_ACT_RESTART_DFL
        try:
            self.obj.set_max_entries(contract.MAP_CANDIDATES, ringbuf_bytes)
            self.obj.set_max_entries(contract.MAP_DECISION_GRID, grid_words(grid))
            self._set_kernel_constants(enums)
            t0 = time.monotonic()
            self.obj.load()
            log.debug("loaded %s in %.2f s", obj_path, time.monotonic() - t0)
        except libbpf.LibbpfError:
            self.obj.close()
            raise
        fd = self.obj.map_fd
        self.ringbuf_fd = fd(contract.MAP_CANDIDATES)
        self.decisions = DecisionMap(fd(contract.MAP_DECISIONS))
        self.grid_dims = grid
        self.counters = PerCpuU64Array(fd(contract.MAP_COUNTERS), contract.NR_COUNTERS)
        self.loader_stats = U64Array(fd(contract.MAP_LOADER_STATS), contract.NR_LOADER_STATS)
        self.config = U64Array(fd(contract.MAP_CONFIG), contract.NR_CONFIG)
        self.exit_info = StructArray(fd(contract.MAP_EXIT_INFO), 1, contract.ExitInfo)
        self.latency_hist = U64Array(
            fd(contract.MAP_LATENCY_HIST), contract.NR_HISTS * contract.HIST_BUCKETS
        )
        self.table = DecisionTable(
            self.decisions,
            DecisionGrid(fd(contract.MAP_DECISION_GRID), grid) if grid else None,
            self.config,
        )

    def _set_kernel_constants(self, enums: list[tuple[str, str]]) -> None:
        """What scx's SCX_ENUM_INIT and SCX_OPS_OPEN do before load, from the kernel's BTF.

        The scx headers turn each enum constant the program uses into a .rodata variable
        __NAME, filled here with the running kernel's value, so one object serves every
        sched_ext kernel. hotplug_seq makes the attach fail if a CPU came or went since
        the domains were planned.
        """
        t0 = time.monotonic()
        values = kernel_enum_values(tuple(sorted({t for _, t in enums} | {"scx_exit_code"})))
        self.restart_code = values.get("SCX_ECODE_ACT_RESTART", SCX_ECODE_ACT_RESTART_DFL)
        obj_btf = self.obj.btf()
        rodata = obj_btf.datasec_vars(".rodata")
        missing = 0
        for name, _ in enums:
            if "__" + name not in rodata:
                continue  # a constant this program does not use
            if name not in values:
                missing += 1  # this kernel lacks it: scx leaves it 0, so do we
            off, _size = rodata["__" + name]
            self.obj.set_u64(".rodata", off, values.get(name, 0))
        log.debug("set %d scx constants from the kernel's BTF in %.2f s (%d unknown to it)",
                  len(values), time.monotonic() - t0, missing)
        off = obj_btf.member_offset("sched_ext_ops", "hotplug_seq")
        if off >= 0:
            self.obj.set_u64(contract.STRUCT_OPS_MAP, off, hotplug_seq())

    def configure(
        self,
        plan: DomainPlan,
        fallback: contract.Fallback,
        slice_ns: int,
        resubmit_ns: int,
        slice_min_ns: int = 0,
        starve_ns: int = 0,
        reader_tid: int | None = None,
        batch_size: int = 64,
        max_wait_ns: int = 2_000_000,
    ) -> None:
        """Write the configuration ops.init reads; reader_tid is boosted on wakeup; the ring
        wakes the reader once batch_size records or max_wait_ns of the oldest wait."""
        set_u32_array(self.obj.map_fd(contract.MAP_CPU_DOM), plan.cpu_to_dom())
        self.config.set(contract.Config.NR_CPUS, plan.nr_cpus)
        self.config.set(contract.Config.NR_DOMS, len(plan.domains))
        self.config.set(contract.Config.FALLBACK, int(fallback))
        self.config.set(contract.Config.SLICE_NS, slice_ns)
        self.config.set(contract.Config.SLICE_MIN_NS, slice_min_ns)
        self.config.set(contract.Config.STARVE_NS, starve_ns)
        self.config.set(contract.Config.RESUBMIT_NS, resubmit_ns)
        self.config.set(contract.Config.WAKE_BYTES, batch_size * ctypes.sizeof(contract.Candidate))
        self.config.set(contract.Config.MAX_WAIT_NS, max_wait_ns)
        if self.grid_dims is not None:
            self.config.set(contract.Config.GRID_CPUS, self.grid_dims[0])
            self.config.set(contract.Config.GRID_DOM_CPUS, self.grid_dims[1])
        self.loader_stats.set(contract.LoaderStat.GRID_KEYS,
                              contract.grid_size(*self.grid_dims) if self.grid_dims else 0)
        self.config.set(contract.Config.LOADER_TID,
                        threading.get_native_id() if reader_tid is None else reader_tid)

    def load_kernel_mlp(self, q: QuantizedMlp, generation: int = 0) -> None:
        """--inference kernel: the weights into the slot of `generation` (see mlsched.h)."""
        write_struct(self.obj.map_fd(contract.MAP_MLP_WEIGHTS), generation & 1,
                     q.to_struct(generation))
        self.config.set(contract.Config.INFERENCE, 1)

    def attach(self) -> None:
        state = scx_state()
        # After an exit the kernel disables the old scheduler asynchronously: give it time.
        deadline = time.monotonic() + DISABLE_WAIT_S
        while state == "disabling" and time.monotonic() < deadline:
            time.sleep(0.02)
            state = scx_state()
        if state == "unsupported":
            raise SchedulerError("this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT)")
        if state != "disabled":
            raise SchedulerError(
                f"another sched_ext scheduler is {state}: {scx_ops_name() or 'unknown'}"
            )
        try:
            self.link = self.obj.attach_struct_ops(contract.STRUCT_OPS_MAP)
        except libbpf.LibbpfError as e:
            raise SchedulerError(f"{e} (see dmesg)") from None
        self.loader_stats.set(contract.LoaderStat.START_NS, time.monotonic_ns())
        self.loader_stats.set(contract.LoaderStat.LOADER_PID, os.getpid())

    def pin(self, pin_dir: str) -> None:
        """Pin the maps mlsched-stats reads, in a directory only root can enter."""
        os.makedirs(pin_dir, mode=0o700)
        os.chmod(pin_dir, stat.S_IRWXU)  # makedirs' mode is filtered by the umask
        self.pin_dir = pin_dir
        for name in contract.PINNED_MAPS:
            libbpf.obj_pin(self.obj.map_fd(name), os.path.join(pin_dir, name))

    def exit_kind(self) -> int:
        """enum scx_exit_kind recorded by ops.exit; 0 while the scheduler runs."""
        return self.exit_info.get(0).kind

    def exit_report(self) -> tuple[int, str]:
        info = self.exit_info.get(0)
        reason = info.reason.decode(errors="replace")
        msg = info.msg.decode(errors="replace")
        text = reason + (f": {msg}" if msg and msg != reason else "")
        return info.kind, text

    def should_restart(self) -> bool:
        """The kernel ended the scheduler asking for a re-attach (CPU hotplug)."""
        info = self.exit_info.get(0)
        return info.kind != 0 and bool(info.exit_code & self.restart_code)

    def close(self) -> None:
        """Detach, unpin and free; safe to call twice."""
        if self.link:
            self.link.destroy()
            self.link = None
        self.table.close()
        if self.pin_dir and os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            self.pin_dir = None
        self.obj.close()
