"""What mlsched-load checks before an attach: the run's refusals (`planned`, `model`) and
`mlsched-load --check` (`report`), which adds what only the attach itself would find out
(sched_ext, another scheduler, the kernel's version, the BPF load, TensorFlow) and prints
one line per finding; its exit status is non-zero when a run would fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from typing import Any, NamedTuple

from loader import cli, contract

# The series the VM tests boot (scripts/setup.sh fetches the newest of each); 6.19 is the oldest.
KERNEL_SERIES = ((6, 19), (7, 3))
# Series known not to load: Debian's 7.2.x builds declare six of mlsched's sched_ext kfuncs
# with the hidden aux argument but without the `_impl` twin the verifier looks up, a different
# set in each build (tests/host/test_kfuncs.py).
KERNEL_BROKEN = {(7, 2): "Debian's 7.2 builds lack the BTF the verifier needs for six of "
                         "mlsched's kfuncs (e.g. scx_bpf_create_dsq_impl): the load is refused"}
KERNEL_MIN = KERNEL_SERIES[0]


class Finding(NamedTuple):
    verdict: str  # ok, fail, skip (not asked for), not tried (cannot be tried here)
    text: str
    status: int = 0  # a failing run's exit status: 2 the user's mistake, 1 the machine's


def planned(args: argparse.Namespace, root: bool = True) -> Any:
    """cli.preflight (without the kernel: a model refusal comes first) and whether --table grid
    fits: the DomainPlan, or Refusal; sets args.dims."""
    from loader.table import grid_dims

    plan = cli.preflight(args, root=root, kernel=False)
    if args.table == "grid" and grid_dims(plan.nr_cpus, plan.max_dom_cpus) is None:
        raise cli.Refusal("--table grid: this machine's keys do not fit a dense grid (use auto)")
    args.dims = plan.nr_cpus, plan.max_dom_cpus
    return plan


def checked_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model's checks (ModelError on a refusal): its ModelInfo, and with --inference
    kernel its quantized network for this machine's key grid (else None)."""
    from loader.kernel_mlp import prepare
    from loader.model_check import ModelError, check_model_dir

    info = check_model_dir(args.model)
    # Both run the fast-path weights: never another model's (a stale stamp).
    needs = "--backend numpy" if args.backend == "numpy" else "--inference kernel"
    if not info.fastpath_ok and (args.backend == "numpy" or args.inference == "kernel"):
        raise ModelError(f"{needs}: {info.fastpath_reason}")
    return info, prepare(info.path, *args.dims) if args.inference == "kernel" else None


def model(args: argparse.Namespace) -> Any:
    """checked_model's ModelInfo (Refusal on a refusal; sets args.kernel_mlp), or None with
    --no-model: that run never loads the model, so nothing about it can fail the run."""
    from loader.model_check import ModelError

    args.kernel_mlp = None
    if args.no_model:
        return None
    try:
        info, args.kernel_mlp = checked_model(args)
    except ModelError as e:
        raise cli.Refusal(str(e)) from None
    return info


def scheduler_settings(args: argparse.Namespace, plan: Any) -> dict[str, int | list[int]]:
    """The .rodata settings of a run with these arguments (after a hotplug: the new plan)."""
    from loader.scheduler import settings
    from loader.table import grid_dims

    grid = None if args.table == "hash" else grid_dims(plan.nr_cpus, plan.max_dom_cpus)
    return settings(plan, contract.Fallback[args.fallback.upper()], args.slice_us * 1000,
                    args.resubmit_ms * 1_000_000, args.slice_min_us * 1000,
                    args.starve_ms * 1_000_000, args.batch_size, int(args.max_wait_ms * 1e6),
                    grid, args.kernel_mlp is not None)


def kernel_version(release: str) -> Finding:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return Finding("fail", f"kernel {release}: no version in its release string", 1)
    series = int(m[1]), int(m[2])
    tested = ", ".join(f"{a}.{b}" for a, b in KERNEL_SERIES)
    if series < KERNEL_MIN:
        return Finding("fail", f"kernel {release}: older than {KERNEL_MIN[0]}.{KERNEL_MIN[1]}, "
                               f"the oldest supported (tested series: {tested})", 1)
    if series in KERNEL_BROKEN:
        return Finding("fail", f"kernel {release}: {KERNEL_BROKEN[series]}", 1)
    note = "a tested series" if series in KERNEL_SERIES else f"untested series (tested: {tested})"
    return Finding("ok", f"kernel {release}: supported, {note}")


def sched_ext() -> list[Finding]:
    """sched_ext's state, and whether a scheduler holds it (the attach would be refused)."""
    from loader.scheduler import scx_ops_name, scx_state

    state = scx_state()
    if state == "unsupported":
        return [Finding("fail", "sched_ext: this kernel has no sched_ext "
                                "(CONFIG_SCHED_CLASS_EXT); see README: VM", 1)]
    found = Finding("ok", f"sched_ext: present, state {state}")
    if state == "disabled":
        return [found, Finding("ok", "no sched_ext scheduler attached")]
    name = scx_ops_name() or "unknown"
    what = ("mlsched is already attached" if name == contract.SCHED_NAME
            else f"another sched_ext scheduler is {state}: {name}")
    return [found, Finding("fail", what, 1)]


def backend(args: argparse.Namespace, info: Any) -> str:
    """What serves the checked model in a run: --inference kernel, or open_backend's pick."""
    from loader.backends import choose_backend

    if args.kernel_mlp is not None:
        return "in-kernel fixed point"
    kind, why = choose_backend(info, args.backend)
    if kind == "numpy":
        return "numpy fast path"
    return "tf" if args.backend == "tf" else f"tf: {why}"


def tensorflow() -> Finding:
    """TensorFlow importable (found, not imported: that takes seconds, a minute under TCG)."""
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a broken parent package, or a None in sys.modules
        found = False
    if found:
        return Finding("ok", "TensorFlow found (the tf backend needs it)")
    return Finding("fail", "TensorFlow is not installed, the tf backend needs it: pip install "
                           "'mlsched[tf]', or run a model with verified fast-path weights", 2)


def bpf_load(args: argparse.Namespace, plan: Any, state: str) -> Finding:
    """The object with this run's settings loaded into the kernel, not attached; loading needs
    root and a kernel with sched_ext (its struct_ops type), else it is only opened."""
    from loader import libbpf
    from loader.scheduler import Scheduler, SchedulerError, scx_enums

    obj = args.bpf_obj
    libbpf.set_print(args.verbose)
    try:
        scx_enums(obj)  # the run reads them beside the object
        if state == "unsupported" or os.geteuid() != 0:
            libbpf.BpfObject(obj).close()
            why = "a kernel with sched_ext" if state == "unsupported" else "root"
            return Finding("not tried", f"loading BPF object {obj} (it opens; a load needs {why})")
        Scheduler(obj, scheduler_settings(args, plan), args.ringbuf_size, args.verbose).close()
    except (libbpf.LibbpfError, SchedulerError, OSError) as e:
        return Finding("fail", f"BPF object: {e}", 1)
    return Finding("ok", f"BPF object {obj}: loads against this kernel's BTF (not attached)")


def findings(args: argparse.Namespace) -> list[Finding]:
    from loader.scheduler import scx_state

    out = [kernel_version(os.uname().release), *sched_ext()]
    try:  # the run's own refusals, in its order: the checks after one depend on it
        plan = planned(args, root=False)
        out.append(Finding("ok", f"domains: {plan.reason}"))
        info = model(args)
    except cli.Refusal as e:
        return [*out, Finding("fail", str(e), e.status)]
    if info is None:
        out.append(Finding("skip", "model: --no-model, the fallback policy serves every "
                                   "candidate"))
    else:
        how = backend(args, info)
        out.append(Finding("ok", f"model {info.path} (digest {info.digest[:12]}, {how}): "
                                 f"{info.provenance}"))
        if how.startswith("tf"):
            out.append(tensorflow())
    return [*out, bpf_load(args, plan, scx_state())]


def report(args: argparse.Namespace) -> int:
    """mlsched-load --check: print the findings; the exit status of a run that would fail
    (2 for the user's mistakes, else 1), 0 when every finding says it would work."""
    found = findings(args)
    for f in found:
        print(f"mlsched-load: {f.verdict}: {f.text}")
    return max(f.status for f in found)
