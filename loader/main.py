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
from loader.cli import Reload, Stop, number_in, positive_int, ringbuf_size
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


def _max_wait(text: str) -> float:
    return number_in(text, 0, 1000, "ms")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlsched-load",
        description="Attach the mlsched sched_ext scheduler and serve its migration decisions "
        "from a TensorFlow SavedModel.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        metavar="DIR",
        help="SavedModel directory, input [?,10] -> output [?,1] (default: %(default)s)",
    )
    p.add_argument(
        "--no-model",
        action="store_true",
        help="never load the model: the fallback policy serves every candidate and the "
        "ring buffer is still drained (a baseline for benchmarks)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "tf", "numpy"),
        default="auto",
        help="inference backend; auto uses the verified numpy fast path when the "
        "model has one, else TensorFlow (default: auto)",
    )
    p.add_argument(
        "--inference",
        choices=("user", "kernel"),
        default="user",
        help="user: the loader decides candidates the table misses (ring buffer); kernel: the "
        "scheduler evaluates the model's Dense stack in fixed point on a miss, the loader only "
        "loads the weights (refused when it agrees with the model on < 99.9%% of keys) "
        "(default: user)",
    )
    p.add_argument(
        "--table",
        choices=("auto", "grid", "hash"),
        default="auto",
        help="decision table: grid = every key of this machine decided at once into a dense "
        "array (auto when it fits); hash = decided on demand as candidates come (the ring "
        "buffer path, as on large machines) (default: auto)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="candidates per model call (default: 64)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=_max_wait,
        default=2.0,
        metavar="MS",
        help="longest a candidate waits for its batch to fill (default: 2)",
    )
    p.add_argument(
        "--domains",
        type=positive_int,
        default=None,
        metavar="N",
        help="split the CPUs into N equal domains (default: one per LLC; "
        "two halves when the machine has one LLC)",
    )
    p.add_argument(
        "--fallback",
        choices=[f.name.lower() for f in contract.Fallback],
        default="heuristic",
        help="policy for candidates the model has not decided yet (default: heuristic)",
    )
    p.add_argument(
        "--slice-us",
        type=positive_int,
        default=20000,
        metavar="US",
        help="time slice in microseconds (default: 20000)",
    )
    p.add_argument(
        "--slice-min-us",
        type=positive_int,
        default=1000,
        metavar="US",
        help="shortest slice, given when a CPU's queue is deep: the slice is "
        "slice-us / (1 + tasks waiting), at least this (default: 1000)",
    )
    p.add_argument(
        "--starve-ms",
        type=positive_int,
        default=80,
        metavar="MS",
        help="starvation guard: a task queued longer than this is stolen by an idle CPU of "
        "another domain whatever the decision, counted as forced (default: 80)",
    )
    p.add_argument(
        "--ringbuf-size",
        type=ringbuf_size,
        default=contract.RINGBUF_DEFAULT_BYTES,
        metavar="BYTES",
        help="candidate ring buffer size, a power of two "
        f"(default: {contract.RINGBUF_DEFAULT_BYTES})",
    )
    p.add_argument(
        "--bpf-obj",
        default=str(DEFAULT_BPF_OBJ),
        metavar="FILE",
        help="compiled scheduler (default: %(default)s; build with `make bpf`)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the model, the BPF object and the domains as before an attach, say what "
        "would run, and exit (no root needed)",
    )
    p.add_argument(
        "--pin-dir",
        default=contract.PIN_DIR,
        metavar="DIR",
        help="where the stats maps are pinned (default: %(default)s)",
    )
    p.add_argument(
        "--resubmit-ms",
        type=positive_int,
        default=1000,
        metavar="MS",
        help="push a still undecided candidate key again after MS (default: 1000)",
    )
    add_stats_arguments(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, including libbpf's and the verifier's output",
    )
    return p


def fail(msg: str, status: int = 2) -> int:
    print(f"mlsched-load: {msg}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if os.geteuid() != 0 and not args.check:
        return fail("must run as root (attaching a sched_ext scheduler needs CAP_SYS_ADMIN)")
    # Until the first attach the loader runs as a real-time thread: on a loaded machine the
    # imports and the BPF load would otherwise queue behind every CPU hog (run() drops it).
    realtime(True)

    # Everything that can refuse the run does so before anything is attached.
    from loader.model_check import ModelError, check_model_dir

    try:
        model_info = check_model_dir(args.model)
    except ModelError as e:
        return fail(str(e))
    if args.backend == "numpy" and not model_info.fastpath_ok:
        return fail(f"--backend numpy: {model_info.fastpath_reason}")
    if not os.path.isfile(args.bpf_obj):
        return fail(f"BPF object not found at {args.bpf_obj} ({paths.BUILD_HINT})")

    from loader.domains import DomainError, plan_domains

    try:
        plan = plan_domains(args.domains)
    except DomainError as e:
        return fail(str(e))
    from loader.table import grid_dims

    args.grid = None if args.table == "hash" else grid_dims(plan.nr_cpus, plan.max_dom_cpus)
    if args.table == "grid" and args.grid is None:
        return fail("--table grid: this machine's keys do not fit a dense grid (use auto)")
    args.kernel_mlp = None
    if args.inference == "kernel":
        from loader.kernel_mlp import prepare

        try:
            args.kernel_mlp = prepare(model_info.path, plan.nr_cpus, plan.max_dom_cpus)
        except ModelError as e:
            return fail(str(e))
    if args.check:
        backend = "numpy fast path" if model_info.fastpath_ok else model_info.fastpath_reason
        print(f"mlsched-load: ok: model {model_info.path} (digest {model_info.digest[:12]}, "
              f"{backend}); BPF object {args.bpf_obj}; {plan.reason}")
        return 0
    return run(args, model_info, plan)


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
    from loader.scheduler import Scheduler, clean_stale_pins
    from loader.table import grid_dims

    clean_stale_pins(args.pin_dir)
    # After a hotplug the plan changed: the grid follows it (unless --table hash).
    grid = None if args.table == "hash" else grid_dims(plan.nr_cpus, plan.max_dom_cpus)
    sched = Scheduler(args.bpf_obj, args.ringbuf_size, args.verbose, grid)
    try:
        sched.configure(plan, contract.Fallback[args.fallback.upper()], args.slice_us * 1000,
                        args.resubmit_ms * 1_000_000, slice_min_ns=args.slice_min_us * 1000,
                        starve_ns=args.starve_ms * 1_000_000, batch_size=args.batch_size,
                        max_wait_ns=int(args.max_wait_ms * 1_000_000))
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
        log.info(
            "attached %s %.1f s after start: %d CPUs in %s; %s",
            contract.SCHED_NAME,
            since_start_s(),
            sum(len(d) for d in plan.domains),
            plan.reason,
            "model serving" if pipeline and pipeline.model else
            f"fallback {args.fallback} until the model is ready",
        )
        if pipeline is None:
            pipeline = DecisionPipeline(sched.table, args.batch_size, args.max_wait_ms / 1000)
            publisher = StatsPublisher(sched.loader_stats, sched.latency_hist, pipeline)
            sampler = MapSampler(sched, os.path.abspath(args.model))
            serve_stats(args, sampler.sample)  # until the process exits
            if args.kernel_mlp is not None:
                from loader.kernel_mlp import KernelBackend

                pipeline.set_model(KernelBackend(args.kernel_mlp), model_info)
            elif not args.no_model:
                threading.Thread(target=load_model, daemon=True,
                                 args=(model_info, args.backend, pipeline, publisher)).start()
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
                threading.Thread(target=reload_model, daemon=True,
                                 args=(args, pipeline, publisher)).start()
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
                    log.error("the kernel ejected mlsched: %s", text or f"exit kind {kind}")
                    status = 1
                break
    finally:
        reader.close()
        publisher.publish()
        sched.close()
    return status, restart


def load_model(model_info: object, want: str, pipeline: object, publisher: object) -> None:
    """Runs in a thread: TensorFlow may take a minute to import; the fallback serves meanwhile."""
    from loader.backends import open_backend
    from loader.model_check import ModelError

    t0 = time.monotonic()
    try:
        backend, reason = open_backend(model_info, want)
    except ModelError as e:
        publisher.model_failed = str(e)
        return
    except Exception as e:  # a model that passed the checks but will not load
        publisher.model_failed = f"model failed to load: {type(e).__name__}: {e}"
        return
    pipeline.set_model(backend, model_info)
    log.info("model ready in %.1f s (%.1f s after start), backend %s", time.monotonic() - t0,
             since_start_s(), reason)


def reload_model(args: argparse.Namespace, pipeline: object, publisher: object) -> None:
    """SIGHUP, in a thread: check the model directory again and hand over a new backend; a
    model that fails is refused in one line and the serving one stays."""
    from loader.backends import open_backend
    from loader.domains import online_cpus
    from loader.kernel_mlp import KernelBackend, prepare
    from loader.model_check import ModelError, check_model_dir

    path, want = args.model, args.backend
    try:
        info = check_model_dir(path)
        if want == "numpy" and not info.fastpath_ok:
            raise ModelError(f"--backend numpy: {info.fastpath_reason}")
        if args.kernel_mlp is not None:
            dims = pipeline.table.grid.dims if pipeline.table.grid else (
                max(online_cpus()) + 1, contract.KEY_FIELD_MAX)
            backend, reason = KernelBackend(prepare(info.path, *dims)), "in-kernel fixed point"
        else:
            backend, reason = open_backend(info, want)
    except ModelError as e:
        publisher.reload_failures += 1
        log.error("reload refused, the previous model keeps serving: %s", e)
        return
    except Exception as e:  # passed the checks but will not load
        publisher.reload_failures += 1
        log.error("reload refused, the previous model keeps serving: %s: %s",
                  type(e).__name__, e)
        return
    publisher.reloads += 1
    pipeline.set_model(backend, info)
    log.info("reload: switching to %s (digest %s), backend %s", path, info.digest[:8], reason)


if __name__ == "__main__":
    sys.exit(main())
