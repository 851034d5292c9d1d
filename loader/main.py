"""mlsched-load: attach the mlsched sched_ext scheduler and feed it the model's decisions.

Order matters: arguments and the model directory are checked first (without TensorFlow),
then the scheduler is attached, and only then is the model loaded, in the background; until
it is ready the kernel's fallback policy serves every candidate.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from loader import contract, paths
from loader.cli import (
    Refusal,
    Reload,
    Stop,
    number_in,
    parser,
    positive_int,
    preflight,
    ringbuf_size,
    setup_logging,
)
from loader.stats import add_arguments as add_stats_arguments

log = logging.getLogger("mlsched")

DEFAULT_BPF_OBJ, DEFAULT_MODEL = paths.BPF_OBJ, paths.BUNDLED_MODEL
IDLE_POLL_MS = 100  # how often an idle loader checks for signals, ejection and stats

EXAMPLES = """\
examples:
  sudo mlsched-load --model model_dir/model_path            # attach with the bundled model
  sudo mlsched-load --model DIR --domains 2 --fallback heuristic
  sudo mlsched-load --model DIR --backend tf --batch-size 128 -v
  sudo mlsched-load --model DIR --stats 2                   # print the stats every 2 s (JSON)
  mlsched-stats --once                                       # in another shell: the counters

Ctrl-C (SIGINT) or SIGTERM detaches the scheduler and exits 0. SIGHUP checks the model
directory again and switches to it without detaching (the old model's decisions are dropped;
a model that fails its checks is refused and the old one keeps serving). If the kernel ejects the
scheduler, the reason is printed and the exit status is 1.
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser("mlsched-load", "Attach the mlsched sched_ext scheduler and serve its migration "
               "decisions from a TensorFlow SavedModel.", EXAMPLES)
    a = p.add_argument
    a("--model", default=str(DEFAULT_MODEL), metavar="DIR",
      help="SavedModel directory, input [?,10] -> output [?,1] (default: %(default)s)")
    a("--no-model", action="store_true", help="never load the model: the fallback policy "
      "serves every candidate and the ring buffer is still drained (a benchmark baseline)")
    a("--backend", choices=("auto", "tf", "numpy"), default="auto", help="inference backend; "
      "auto uses the verified numpy fast path when the model has one, else TensorFlow")
    a("--inference", choices=("user", "kernel"), default="user", help="user: the loader "
      "decides the candidates the table misses (ring buffer); kernel: the scheduler evaluates "
      "the model's Dense stack in fixed point on a miss, the loader only loads the weights "
      "(refused when it agrees with the model on < 99.9%% of keys) (default: user)")
    a("--table", choices=("auto", "grid", "hash"), default="auto", help="grid: every key of "
      "this machine decided at once into a dense array (auto when it fits); hash: decided on "
      "demand as candidates come (the ring buffer path of large machines) (default: auto)")
    a("--batch-size", type=positive_int, default=64, metavar="N",
      help="candidates per model call (default: 64)")
    a("--max-wait-ms", type=lambda t: number_in(t, 0, 1000, "ms"), default=2.0, metavar="MS",
      help="longest a candidate waits for its batch to fill (default: 2)")
    a("--domains", type=positive_int, metavar="N", help="split the CPUs into N equal domains "
      "(default: one per LLC; two halves when the machine has one LLC)")
    a("--fallback", choices=[f.name.lower() for f in contract.Fallback], default="heuristic",
      help="policy for candidates the model has not decided yet (default: heuristic)")
    a("--slice-us", type=positive_int, default=20000, metavar="US",
      help="time slice in microseconds (default: 20000)")
    a("--slice-min-us", type=positive_int, default=1000, metavar="US", help="shortest slice, "
      "given when a CPU's queue is deep: slice-us / (1 + tasks waiting), at least this "
      "(default: 1000)")
    a("--starve-ms", type=positive_int, default=80, metavar="MS", help="starvation guard: a "
      "task queued longer is stolen by an idle CPU of another domain whatever the decision, "
      "counted as forced (default: 80)")
    a("--ringbuf-size", type=ringbuf_size, default=contract.RINGBUF_DEFAULT_BYTES,
      metavar="BYTES", help="candidate ring buffer size, a power of two (default: %(default)s)")
    a("--bpf-obj", default=str(DEFAULT_BPF_OBJ), metavar="FILE",
      help="compiled scheduler (default: %(default)s; build with `make bpf`)")
    a("--check", action="store_true", help="check the model, the BPF object and the domains "
      "as before an attach, say what would run, and exit (no root needed)")
    a("--pin-dir", default=contract.PIN_DIR, metavar="DIR",
      help="where the stats maps are pinned (default: %(default)s)")
    a("--resubmit-ms", type=positive_int, default=1000, metavar="MS",
      help="push a still undecided candidate key again after MS (default: 1000)")
    add_stats_arguments(p)
    a("-v", "--verbose", action="store_true",
      help="debug logging, including libbpf's and the verifier's output")
    return p


def fail(msg: str, status: int = 2) -> int:
    print(f"mlsched-load: {msg}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # Everything that can refuse the run does so before anything is attached.
    try:
        plan = preflight(args, root=not args.check, kernel=False)
    except Refusal as e:
        return fail(str(e), e.status)
    # Until the first attach the loader runs as a real-time thread: on a loaded machine the
    # imports and the BPF load would otherwise queue behind every CPU hog (run() drops it).
    realtime(True)
    from loader.model_check import ModelError
    from loader.table import grid_dims

    if args.table == "grid" and grid_dims(plan.nr_cpus, plan.max_dom_cpus) is None:
        return fail("--table grid: this machine's keys do not fit a dense grid (use auto)")
    args.dims = plan.nr_cpus, plan.max_dom_cpus
    try:
        model_info, args.kernel_mlp = checked_model(args)
    except ModelError as e:
        return fail(str(e))
    if args.check:
        backend = "numpy fast path" if model_info.fastpath_ok else model_info.fastpath_reason
        print(f"mlsched-load: ok: model {model_info.path} (digest {model_info.digest[:12]}, "
              f"{backend}); BPF object {args.bpf_obj}; {plan.reason}")
        return 0
    return run(args, model_info, plan)


def checked_model(args: argparse.Namespace) -> tuple[object, object]:
    """The model's checks (ModelError on a refusal): its ModelInfo, and with --inference
    kernel its quantized network for this machine's key grid (else None)."""
    from loader.kernel_mlp import prepare
    from loader.model_check import ModelError, check_model_dir

    info = check_model_dir(args.model)
    if args.backend == "numpy" and not info.fastpath_ok:
        raise ModelError(f"--backend numpy: {info.fastpath_reason}")
    return info, prepare(info.path, *args.dims) if args.inference == "kernel" else None


def realtime(on: bool) -> None:
    """Make the calling thread SCHED_FIFO 1 (on) or SCHED_OTHER again (off); a kernel that
    refuses leaves it as it was: this only shortens the time to attach."""
    try:
        if on:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        log.debug("sched_setscheduler: %s", e)


def since_start_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def attach(args: argparse.Namespace, plan: object) -> object:
    """Load, configure, attach and pin a fresh scheduler object; raises on failure."""
    from loader.scheduler import Scheduler, clean_stale_pins, settings
    from loader.table import grid_dims

    clean_stale_pins(args.pin_dir)
    # After a hotplug the plan changed: the grid follows it (unless --table hash).
    grid = None if args.table == "hash" else grid_dims(plan.nr_cpus, plan.max_dom_cpus)
    config = settings(plan, contract.Fallback[args.fallback.upper()], args.slice_us * 1000,
                      args.resubmit_ms * 1_000_000, args.slice_min_us * 1000,
                      args.starve_ms * 1_000_000, args.batch_size,
                      int(args.max_wait_ms * 1_000_000), grid, args.kernel_mlp is not None)
    sched = Scheduler(args.bpf_obj, config, args.ringbuf_size, args.verbose)
    try:
        if args.kernel_mlp is not None:
            sched.load_kernel_mlp(args.kernel_mlp)
        sched.attach()
        sched.pin(args.pin_dir)
    except BaseException:
        sched.close()
        raise
    return sched


def run(args: argparse.Namespace, model_info: object, plan: object) -> int:
    """Attach, serve, detach; again after a CPU hotplug exit (scx's restart loop)."""
    from loader import libbpf
    from loader.domains import DomainError, plan_domains
    from loader.pipeline import DecisionPipeline
    from loader.scheduler import SchedulerError, scx_state
    from loader.stats import MapSampler, StatsPublisher, serve_stats

    stop = Stop()
    stop.install()
    reload = Reload().install()
    if scx_state() == "unsupported":
        return fail("this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT); see README: VM", 1)
    pipeline = publisher = None
    while True:
        t0 = time.monotonic()
        try:
            sched = attach(args, plan)
        except (libbpf.LibbpfError, SchedulerError, OSError) as e:
            return fail(str(e), 1)
        finally:
            realtime(False)
        if pipeline is not None:
            log.info("re-attached in %.2f s", time.monotonic() - t0)
        log.info("attached %s %.1f s after start: %d CPUs in %s; %s", contract.SCHED_NAME,
                 since_start_s(), sum(map(len, plan.domains)), plan.reason, "model serving"
                 if pipeline and pipeline.model else
                 f"fallback {args.fallback} until the model is ready")
        if pipeline is None:
            pipeline = DecisionPipeline(sched.table, args.batch_size, args.max_wait_ms / 1000)
            publisher = StatsPublisher(sched.loader_stats, sched.latency_hist, pipeline)
            sampler = MapSampler(sched, os.path.abspath(args.model))
            serve_stats(args, sampler.sample)  # until the process exits
            if args.kernel_mlp is not None:
                load_model(args, model_info, pipeline, publisher)  # no TensorFlow: at once
            elif not args.no_model:
                threading.Thread(target=load_model, daemon=True,
                                 args=(args, model_info, pipeline, publisher)).start()
        else:
            pipeline.rebind(sched.table)
            publisher.rebind(sched.loader_stats, sched.latency_hist)
            sampler.rebind(sched)
        status, restart = serve(args, sched, pipeline, publisher, stop, reload)
        if not restart:
            break
        # A CPU came or went: the kernel asked for a re-attach. Plan the domains again for
        # the CPUs online now; the model stays loaded.
        publisher.restarts += 1
        try:
            plan = plan_domains(replan_domains(args.domains))
        except DomainError as e:
            return fail(f"re-planning the domains after CPU hotplug: {e}", 1)
        args.dims = plan.nr_cpus, plan.max_dom_cpus
        log.info("restarting after CPU hotplug (restart %d): CPUs now %s", publisher.restarts,
                 ",".join(str(c) for d in plan.domains for c in d))
        realtime(True)  # the machine runs on the kernel's scheduler until we are back
    if stop.requested:
        log.info("%s: detached mlsched after %d decisions", stop.signame, pipeline.stats.decisions)
    return status


def replan_domains(requested: int | None) -> int | None:
    """--domains for the CPUs online now: never more domains than CPUs."""
    from loader.domains import online_cpus

    if requested is None:
        return None
    n = min(requested, len(online_cpus()))
    if n != requested:
        log.info("only %d CPUs online: %d domains instead of %d", n, n, requested)
    return n


def serve(args: argparse.Namespace, sched: object, pipeline: object, publisher: object,
          stop: Stop, reload: Reload) -> tuple[int, bool]:
    """Feed decisions until a signal or an exit; returns (status, re-attach?)."""
    from loader.bpfmaps import RingBufferReader
    from loader.pipeline import pump

    reader = RingBufferReader(sched.ringbuf_fd, pipeline.on_record)
    status, restart = 0, False
    batch_poll_ms = max(1, int(args.max_wait_ms))
    try:
        while not stop.requested:
            switched = pipeline.take_model()
            if pipeline.precompute_pending:
                t0 = time.monotonic()
                n = pipeline.precompute()
                if n:
                    log.info("decided all %d keys of the grid in %.3f s", n,
                             time.monotonic() - t0)
            if switched is not None:  # ready once its table is written
                publisher.model_ready(switched[0], getattr(switched[1], "digest", ""))
            if reload.take():
                threading.Thread(target=load_model, daemon=True,
                                 args=(args, None, pipeline, publisher, True)).start()
            if args.kernel_mlp is not None and switched is not None:
                # --inference kernel: the weights of the table's generation (a reload has
                # just started a new one) go to its slot; until then the fallback serves.
                args.kernel_mlp = switched[0].q  # what a re-attach after hotplug loads
                sched.load_kernel_mlp(args.kernel_mlp, sched.table.generation)
            pump(reader, pipeline, IDLE_POLL_MS, batch_poll_ms)
            publisher.maybe_publish()
            if publisher.model_failed is not None:
                log.error("%s", publisher.model_failed)
                status = 2
                break
            kind = sched.exit_kind()
            if kind:
                _, text = sched.exit_report()
                if sched.should_restart():
                    log.info("the kernel ended mlsched for a re-attach: %s", text)
                    restart = True
                else:
                    if dump := sched.exit_dump():
                        log.error("the kernel's debug dump:\n%s", dump)
                    log.error("the kernel ejected mlsched: %s", text or f"exit kind {kind}")
                    status = 1
                break
    finally:
        reader.close()
        publisher.publish()
        sched.close()
    return status, restart


def load_model(args: argparse.Namespace, info: object, pipeline: object, publisher: object,
               reload: bool = False) -> None:
    """In a thread: TensorFlow may take a minute to import; the fallback serves meanwhile. On
    a reload (SIGHUP) the model directory is checked again; a model that fails is refused in
    one line and the serving one stays."""
    from loader.backends import open_backend
    from loader.kernel_mlp import KernelBackend
    from loader.model_check import ModelError

    t0 = time.monotonic()
    try:
        q = args.kernel_mlp
        if reload:
            info, q = checked_model(args)
        backend, how = ((KernelBackend(q), "in-kernel fixed point") if q is not None
                        else open_backend(info, args.backend))
    except Exception as e:  # a refusal, or a model that passed the checks but will not load
        why = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
        if reload:
            publisher.reload_failures += 1
            log.error("reload refused, the previous model keeps serving: %s", why)
        else:
            publisher.model_failed = why if isinstance(e, ModelError) else (
                f"model failed to load: {why}")
        return
    publisher.reloads += reload
    pipeline.set_model(backend, info)
    if reload:
        log.info("reload: switching to %s (digest %s), backend %s", args.model,
                 info.digest[:8], how)
    else:
        log.info("model ready in %.1f s (%.1f s after start), backend %s",
                 time.monotonic() - t0, since_start_s(), how)


if __name__ == "__main__":
    sys.exit(main())
