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
from typing import Any

from loader import check, cli, contract, paths
from loader.stats import add_arguments as add_stats_arguments

log = logging.getLogger("mlsched")
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
# Integer options: flag, default, metavar, help ("(default: ...)" is added).
TUNABLES = (
    ("--batch-size", 64, "N", "candidates per model call"),
    ("--slice-us", 20000, "US", "time slice in microseconds"),
    ("--slice-min-us", 1000, "US", "shortest slice, given when a CPU's queue is deep: "
     "slice-us / (1 + tasks waiting), at least this"),
    ("--starve-ms", 80, "MS", "starvation guard: a task queued longer is stolen by an idle CPU "
     "of another domain whatever the decision, counted as forced"),
    ("--resubmit-ms", 1000, "MS", "push a still undecided candidate key again after MS"),
)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("mlsched-load", "Attach the mlsched sched_ext scheduler and serve its "
                   "migration decisions from a TensorFlow SavedModel.", EXAMPLES)
    a = p.add_argument
    a("--model", default=str(paths.BUNDLED_MODEL), metavar="DIR",
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
    for flag, default, metavar, text in TUNABLES:
        a(flag, type=cli.positive_int, default=default, metavar=metavar,
          help=f"{text} (default: {default})")
    a("--max-wait-ms", type=lambda t: cli.number_in(t, 0, 1000, "ms"), default=2.0,
      metavar="MS", help="longest a candidate waits for its batch to fill (default: 2)")
    a("--domains", type=cli.positive_int, metavar="N", help="split the CPUs into N equal "
      "domains (default: one per LLC; two halves when the machine has one LLC)")
    a("--fallback", choices=[f.name.lower() for f in contract.Fallback], default="heuristic",
      help="policy for candidates the model has not decided yet (default: heuristic)")
    a("--ringbuf-size", type=cli.ringbuf_size, default=contract.RINGBUF_DEFAULT_BYTES,
      metavar="BYTES", help="candidate ring buffer size, a power of two (default: %(default)s)")
    a("--bpf-obj", default=str(paths.BPF_OBJ), metavar="FILE",
      help="compiled scheduler (default: %(default)s; build with `make bpf`)")
    a("--check", action="store_true", help="say, one line each, whether a run would work: "
      "the kernel's version, sched_ext and a scheduler already attached, the domains, the "
      "model (not with --no-model) and TensorFlow when the tf backend serves it, the BPF "
      "object loaded but not attached (tried as root on a sched_ext kernel); exit 0 when "
      "nothing would fail the run, else its exit status")
    a("--pin-dir", default=contract.PIN_DIR, metavar="DIR",
      help="where the stats maps are pinned (default: %(default)s)")
    add_stats_arguments(p)
    a("-v", "--verbose", action="store_true",
      help="debug logging, including libbpf's and the verifier's output")
    return p


def fail(msg: str, status: int = 2) -> int:
    print(f"mlsched-load: {msg}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.check:
        return check.report(args)
    try:  # everything that can refuse the run does so before anything is attached
        plan = check.planned(args)
        # Until the first attach the loader runs real-time: on a loaded machine the imports and
        # the BPF load would otherwise queue behind every CPU hog (Loader.run drops it).
        realtime(True)
        info = check.model(args)
    except cli.Refusal as e:
        return fail(str(e), e.status)
    if info is not None:  # which weights will decide, and where they came from
        log.info("model %s (digest %s): %s", info.path, info.digest[:12], info.provenance)
    return Loader(args, plan).run(info)


def realtime(on: bool) -> None:
    """This thread SCHED_FIFO 1 (on) or SCHED_OTHER again; a refusal only slows the attach."""
    policy, prio = (os.SCHED_FIFO, 1) if on else (os.SCHED_OTHER, 0)
    try:
        os.sched_setscheduler(0, policy, os.sched_param(prio))
    except OSError as e:
        log.debug("sched_setscheduler: %s", e)


def since_start_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class Loader:
    """One mlsched-load run: attach, serve, detach; again after a CPU hotplug exit (scx's
    restart loop). The model loads in a thread; the loop's thread alone writes the table."""

    def __init__(self, args: argparse.Namespace, plan: Any) -> None:
        self.args, self.plan = args, plan
        self.stop, self.reload = cli.Stop().install(), cli.Reload().install()
        self.pipeline: Any = None
        self.publisher: Any = None
        self.sampler: Any = None
        self.printer: Any = None  # --stats

    def attach(self) -> Any:
        """Load, configure, attach and pin a fresh scheduler object; raises on failure."""
        from loader.scheduler import Scheduler, clean_stale_pins

        a = self.args
        clean_stale_pins(a.pin_dir)
        # After a hotplug the plan changed: the grid follows it (unless --table hash).
        config = check.scheduler_settings(a, self.plan)
        sched = Scheduler(a.bpf_obj, config, a.ringbuf_size, a.verbose)
        try:
            if a.kernel_mlp is not None:
                sched.load_kernel_mlp(a.kernel_mlp)
            sched.attach()
            sched.pin(a.pin_dir)
        except BaseException:
            sched.close()
            raise
        return sched

    def run(self, info: Any) -> int:
        from loader import libbpf
        from loader.domains import DomainError, plan_domains
        from loader.pipeline import DecisionPipeline
        from loader.scheduler import SchedulerError, scx_state
        from loader.stats import MapSampler, StatsPublisher, serve_stats

        a = self.args
        if scx_state() == "unsupported":
            return fail("this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT); see README: VM", 1)
        while True:
            t0 = time.monotonic()
            try:
                sched = self.attach()
            except (libbpf.LibbpfError, SchedulerError, OSError) as e:
                return fail(str(e), 1)
            finally:
                realtime(False)
            if self.pipeline is None:
                self.pipeline = DecisionPipeline(sched.table, a.batch_size, a.max_wait_ms / 1000)
                self.publisher = StatsPublisher(sched.loader_stats, sched.latency_hist,
                                                self.pipeline)
                self.sampler = MapSampler(sched, os.path.abspath(a.model))
                self.printer = serve_stats(a, self.sampler.sample)  # until the process exits
            else:
                log.info("re-attached in %.2f s", time.monotonic() - t0)
                self.pipeline.rebind(sched.table)
                self.publisher.rebind(sched.loader_stats, sched.latency_hist)
                self.sampler.rebind(sched)
            log.info("attached %s %.1f s after start: %d CPUs in %s; %s", contract.SCHED_NAME,
                     since_start_s(), sum(map(len, self.plan.domains)), self.plan.reason,
                     "model serving" if self.pipeline.model else
                     f"fallback {a.fallback} until the model is ready")
            if info is not None and a.kernel_mlp is not None:
                self.load_model(info)  # no TensorFlow: at once
            elif info is not None and not a.no_model:
                threading.Thread(target=self.load_model, args=(info,), daemon=True).start()
            info = None  # loaded once; a re-attach keeps the model
            status, restart = self.serve(sched)
            if not restart:
                break
            # A CPU came or went: plan the domains again for the CPUs online now.
            self.publisher.restarts += 1
            try:
                self.plan = plan_domains(replan_domains(a.domains))
            except DomainError as e:
                return fail(f"re-planning the domains after CPU hotplug: {e}", 1)
            a.dims = self.plan.nr_cpus, self.plan.max_dom_cpus
            log.info("restarting after CPU hotplug (restart %d): CPUs now %s",
                     self.publisher.restarts,
                     ",".join(str(c) for d in self.plan.domains for c in d))
            realtime(True)  # the machine runs on the kernel's scheduler until we are back
        if self.stop.requested:
            log.info("%s: detached mlsched after %d decisions", self.stop.signame,
                     self.pipeline.stats.decisions)
        return status

    def serve(self, sched: Any) -> tuple[int, bool]:
        """Feed decisions until a signal or an exit; returns (status, re-attach?)."""
        from loader.bpfmaps import RingBufferReader
        from loader.pipeline import pump

        a, pipeline, publisher = self.args, self.pipeline, self.publisher
        reader = RingBufferReader(sched.ringbuf_fd, pipeline.on_record)
        status, restart, batch_poll_ms = 0, False, max(1, int(a.max_wait_ms))
        try:
            while not self.stop.requested:
                switched = pipeline.take_model()
                if pipeline.precompute_pending:
                    t0 = time.monotonic()
                    if n := pipeline.precompute():
                        log.info("decided all %d keys of the grid in %.3f s", n,
                                 time.monotonic() - t0)
                if switched is not None:  # ready once its table is written
                    publisher.model_ready(switched[0], getattr(switched[1], "digest", ""))
                    if a.kernel_mlp is not None:
                        # The weights of the table's generation (a reload has just started a
                        # new one) go to its slot; the fallback serves until then. A re-attach
                        # after hotplug loads them from args.
                        a.kernel_mlp = switched[0].q
                        sched.load_kernel_mlp(a.kernel_mlp, sched.table.generation)
                if self.reload.take():
                    threading.Thread(target=self.load_model, args=(None, True),
                                     daemon=True).start()
                pump(reader, pipeline, IDLE_POLL_MS, batch_poll_ms)
                publisher.maybe_publish()
                if publisher.model_failed is not None:
                    log.error("%s", publisher.model_failed)
                    status = 2
                    break
                if kind := sched.exit_kind():
                    _, text = sched.exit_report()
                    restart = sched.should_restart()
                    if restart:
                        log.info("the kernel ended mlsched for a re-attach: %s", text)
                    else:
                        if dump := sched.exit_dump():
                            log.error("the kernel's debug dump:\n%s", dump)
                        log.error("the kernel ejected mlsched: %s", text or f"exit kind {kind}")
                        status = 1
                    break
        finally:
            reader.close()
            publisher.publish()
            if not restart and self.printer is not None:
                self.printer.stop()  # its last line is of the attached scheduler
            sched.close()
        return status, restart

    def load_model(self, info: Any, reload: bool = False) -> None:
        """TensorFlow may take a minute to import: a thread, while the fallback serves. A
        reload (SIGHUP) checks the directory again; a refused model leaves the old serving."""
        from loader.backends import open_backend
        from loader.kernel_mlp import KernelBackend
        from loader.model_check import ModelError

        t0, publisher = time.monotonic(), self.publisher
        try:
            q = self.args.kernel_mlp
            if reload:
                info, q = check.checked_model(self.args)
            backend, how = ((KernelBackend(q), "in-kernel fixed point") if q is not None
                            else open_backend(info, self.args.backend))
        except Exception as e:  # a refusal, or a model that passed the checks but will not load
            why = str(e) if isinstance(e, ModelError) else f"model failed to load: {e!r}"
            if not reload:
                publisher.model_failed = why
                return
            publisher.reload_failures += 1
            log.error("reload refused, the previous model keeps serving: %s", why)
            return
        publisher.reloads += reload
        self.pipeline.set_model(backend, info)
        if reload:
            log.info("reload: switching to %s (digest %s), backend %s: %s", self.args.model,
                     info.digest[:8], how, info.provenance)
        else:
            log.info("model ready in %.1f s (%.1f s after start), backend %s",
                     time.monotonic() - t0, since_start_s(), how)


def replan_domains(requested: int | None) -> int | None:
    """--domains for the CPUs online now: never more domains than CPUs."""
    from loader.domains import online_cpus

    if requested is not None and (n := min(requested, len(online_cpus()))) != requested:
        log.info("only %d CPUs online: %d domains instead of %d", n, n, requested)
        return n
    return requested


if __name__ == "__main__":
    sys.exit(main())
