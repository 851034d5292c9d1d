"""The attached scheduler: load, configure, attach, pin, and take it all down again."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import stat
import threading
import time

from loader import contract, libbpf, paths, schema
from loader.bpfmaps import DecisionMap, PerCpuU64Array, U64Array, write_elem
from loader.domains import DomainPlan
from loader.kernel_mlp import QuantizedMlp
from loader.table import DecisionGrid, DecisionTable, GridDims, grid_words

log = logging.getLogger("mlsched.scheduler")

SCX_SYSFS = "/sys/kernel/sched_ext"
# enum scx_exit_code: the kernel asks the scheduler to re-attach (CPU hotplug); read from the
# kernel's BTF, this is only the value used when the kernel does not name it.
SCX_ECODE_ACT_RESTART_DFL = 1 << 48
DISABLE_WAIT_S = 5.0  # longest wait for a previous scheduler to finish disabling


class SchedulerError(Exception):
    """The scheduler could not be attached; str() is one line."""


def _read_scx(name: str, default: str) -> str:
    """A file of /sys/kernel/sched_ext, stripped; default when the kernel has no such file."""
    try:
        with open(os.path.join(SCX_SYSFS, name)) as f:
            return f.read().strip()
    except OSError:
        return default


def scx_state() -> str:
    """'enabled', 'disabled', ... or 'unsupported' on a kernel without sched_ext."""
    return _read_scx("state", "unsupported")


def scx_ops_name() -> str:
    return _read_scx(os.path.join("root", "ops"), "")


def hotplug_seq() -> int:
    """The kernel's CPU hotplug sequence number: attach fails if it moved since."""
    seq = _read_scx("hotplug_seq", "0")
    return int(seq) if seq.isdigit() else 0


def scx_enums(obj_path: str) -> list[tuple[str, str]]:
    """(NAME, enum type) of the scx enum constants `make bpf` lists beside the object."""
    path = os.path.splitext(obj_path)[0] + ".enums"
    try:
        with open(path) as f:
            return [tuple(line.split()[:2]) for line in f if len(line.split()) >= 2]
    except OSError as e:
        raise SchedulerError(f"cannot read {path} ({e.strerror}): {paths.BUILD_HINT}") from None


def clean_stale_pins(pin_dir: str) -> None:
    """Remove pins a loader that died hard left behind, unless that loader still runs."""
    if not os.path.isdir(pin_dir):
        return
    if scx_state() == "enabled" and scx_ops_name() == contract.SCHED_NAME:
        raise SchedulerError(f"mlsched is already attached (pins in {pin_dir})")
    log.info("removing stale pins in %s left by a previous loader", pin_dir)
    shutil.rmtree(pin_dir)


def settings(plan: DomainPlan, fallback: contract.Fallback, slice_ns: int, resubmit_ns: int,
             slice_min_ns: int, starve_ns: int, batch_size: int, max_wait_ns: int,
             grid: GridDims | None, kernel_inference: bool = False,
             explore_q: int | None = None) -> dict[str, int | list[int]]:
    """The .rodata settings (contract.SETTINGS) of one run; the ring wakes the reader once
    batch_size records or max_wait_ns of the oldest wait; this thread is the reader. With
    explore_q, collection mode: the fallback or a coin (P = explore_q / 65536) decides."""
    return {
        "nr_cpus": plan.nr_cpus, "nr_doms": len(plan.domains), "cpu_dom": plan.cpu_to_dom(),
        "fallback_policy": int(fallback), "slice_ns": slice_ns,
        "slice_min_ns": min(slice_min_ns, slice_ns), "starve_ns": starve_ns,
        "resubmit_ns": resubmit_ns, "ring_max_wait_ns": max_wait_ns,
        "ring_wake_bytes": batch_size * ctypes.sizeof(contract.Candidate),
        "grid_cpus": grid[0] if grid else 0, "grid_dom_cpus": grid[1] if grid else 0,
        "kernel_inference": int(kernel_inference), "loader_tid": threading.get_native_id(),
        "collect": int(explore_q is not None), "explore": explore_q or 0,
    }


def write_settings(obj: libbpf.BpfObject, config: dict[str, int | list[int]]) -> None:
    """The .rodata settings into an opened object before load (a list: a u32 array's head)."""
    for name, value in config.items():
        if isinstance(value, list):
            obj.var(".rodata", name, ctypes.c_uint32 * len(value))[:] = value
        else:
            obj.var(".rodata", name).value = value


class Scheduler:
    """Owns the BPF object (and through it the struct_ops link) and its maps."""

    def __init__(self, obj_path: str, config: dict[str, int | list[int]], ringbuf_bytes: int,
                 verbose: bool) -> None:
        """Open, set the .rodata settings (see settings()) and load the object."""
        libbpf.set_print(verbose)
        enums = scx_enums(obj_path)
        self.obj = libbpf.BpfObject(obj_path)
        self.pin_dir: str | None = None
        self.config = config
        grid = (config["grid_cpus"], config["grid_dom_cpus"]) if config["grid_cpus"] else None
        try:
            self.obj.set_max_entries(contract.MAP_CANDIDATES, ringbuf_bytes)
            self.obj.set_max_entries(contract.MAP_DECISION_GRID, grid_words(grid))
            self._set_kernel_constants(enums)
            # scx's UEI_SET_SIZE: room for the kernel's debug dump at exit.
            self.obj.set_value_size(contract.UEI_DUMP_SECTION, contract.UEI_DUMP_LEN)
            write_settings(self.obj, config | {contract.UEI_DUMP_LEN_VAR: contract.UEI_DUMP_LEN})
            t0 = time.monotonic()
            self.obj.load()
            log.debug("loaded %s in %.2f s", obj_path, time.monotonic() - t0)
            self.uei = self.obj.var(".data", contract.UEI_VAR, contract.UserExitInfo)
            self.uei_dump = self.obj.var(contract.UEI_DUMP_SECTION, contract.UEI_DUMP_VAR,
                                         ctypes.c_char * contract.UEI_DUMP_LEN)
            model_gen = self.obj.var(".bss", contract.MODEL_GEN_VAR)
        except libbpf.LibbpfError:
            self.obj.close()
            raise
        fd = self.obj.map_fd
        self.ringbuf_fd = fd(contract.MAP_CANDIDATES)
        self.counters = PerCpuU64Array(fd(contract.MAP_COUNTERS), contract.NR_COUNTERS)
        self.loader_stats = U64Array(fd(contract.MAP_LOADER_STATS), contract.NR_LOADER_STATS)
        self.loader_stats.set(contract.LoaderStat.GRID_KEYS,
                              schema.grid_size(*grid) if grid else 0)
        self.latency_hist = U64Array(fd(contract.MAP_LATENCY_HIST),
                                     contract.NR_HISTS * contract.HIST_BUCKETS)
        grid_map = DecisionGrid(fd(contract.MAP_DECISION_GRID), grid) if grid else None
        self.table = DecisionTable(DecisionMap(fd(contract.MAP_DECISIONS)), grid_map, model_gen)

    def _set_kernel_constants(self, enums: list[tuple[str, str]]) -> None:
        """scx's SCX_ENUM_INIT and SCX_OPS_OPEN: each enum constant the program uses (.rodata
        __NAME) gets the running kernel's value, so one object serves every sched_ext kernel;
        hotplug_seq makes the attach fail if a CPU came or went since the domains were planned."""
        t0 = time.monotonic()
        values = libbpf.kernel_enum_values(tuple(sorted({t for _, t in enums} | {"scx_exit_code"})))
        self.restart_code = values.get("SCX_ECODE_ACT_RESTART", SCX_ECODE_ACT_RESTART_DFL)
        used = [name for name, _ in enums if "__" + name in self.obj.vars(".rodata")]
        for name in used:  # a constant this kernel lacks stays 0, as scx leaves it
            self.obj.var(".rodata", "__" + name, ctypes.c_uint64).value = values.get(name, 0)
        log.debug("set %d scx constants from the kernel's BTF in %.2f s (%d unknown to it)",
                  len(values), time.monotonic() - t0, sum(name not in values for name in used))
        off = self.obj.btf().member_offset("sched_ext_ops", "hotplug_seq")
        if off >= 0:
            self.obj.view(contract.STRUCT_OPS_MAP, off, ctypes.c_uint64).value = hotplug_seq()

    def load_kernel_mlp(self, q: QuantizedMlp, generation: int = 0) -> None:
        """--inference kernel: the weights into the slot of `generation` (see mlsched.h)."""
        write_elem(self.obj.map_fd(contract.MAP_MLP_WEIGHTS), generation & 1,
                   q.to_struct(generation))

    def attach(self) -> None:
        # After an exit the kernel disables the old scheduler asynchronously: give it time.
        deadline = time.monotonic() + DISABLE_WAIT_S
        while (state := scx_state()) == "disabling" and time.monotonic() < deadline:
            time.sleep(0.02)
        if state == "unsupported":
            raise SchedulerError("this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT)")
        if state != "disabled":
            raise SchedulerError(f"another sched_ext scheduler is {state}: "
                                 f"{scx_ops_name() or 'unknown'}")
        try:
            self.obj.attach_struct_ops(contract.STRUCT_OPS_MAP)
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
        """enum scx_exit_kind recorded by ops.exit (UEI); 0 while the scheduler runs."""
        return self.uei.kind

    def exit_report(self) -> tuple[int, str]:
        reason = self.uei.reason.decode(errors="replace")
        msg = self.uei.msg.decode(errors="replace")
        text = reason + (f": {msg}" if msg and msg != reason else "")
        if self.uei.exit_cpu >= 0:
            text += f" on CPU {self.uei.exit_cpu}"
        return self.uei.kind, text

    def exit_dump(self) -> str:
        """The kernel's debug dump at an error exit (tasks, queues), as scx prints it."""
        return self.uei_dump.value.decode(errors="replace")

    def should_restart(self) -> bool:
        """The kernel ended the scheduler asking for a re-attach (CPU hotplug)."""
        return self.uei.kind != 0 and bool(self.uei.exit_code & self.restart_code)

    def close(self) -> None:
        """Detach, unpin and free; safe to call twice."""
        self.obj.detach()
        self.table.close()
        if self.pin_dir and os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            self.pin_dir = None
        self.uei = self.uei_dump = None  # views into memory the object frees
        self.obj.close()
