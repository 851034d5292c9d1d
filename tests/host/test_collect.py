"""mlsched-collect without sched_ext: the samplers, the follower, the labeling rule, the files,
the CLI's refusals, and training on a dataset captured from a real collection run in the VM.

tests/host/data/collect-vm.csv.gz and collect-vm.outcomes.csv.gz come from one run of
tests/vm/test_collect.py (2 vCPUs, 2 domains, 20 s, explore 0.5, taskstats): the VM test checks
the collection itself; training needs TensorFlow, which imports in seconds here but 72 s in
the TCG guest, so it is checked here on that captured data.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loader import contract, schema
from model_dir import fallback
from model_dir.dataset import COLUMN_NAMES, read_dataset
from tools import collect
from tools.outcomes import (
    LEVEL_IDLE,
    LEVEL_NO_OTHER,
    LEVEL_STALLED,
    MEASURED_COLUMNS,
    SamplerError,
    SchedstatSampler,
    TaskstatsSampler,
    bucket_ids,
    delay_per_run,
    label_rows,
    outcomes_path_for,
    read_outcomes,
)

DATA = Path(__file__).resolve().parent / "data"
VM_DATASET = DATA / "collect-vm.csv.gz"
VM_OUTCOMES = DATA / "collect-vm.outcomes.csv.gz"


# --- samplers -------------------------------------------------------------------------------


@pytest.fixture
def busy_child():
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.2)
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_schedstat_sampler_reads_a_task_and_sees_it_go(busy_child: int) -> None:
    s = SchedstatSampler()
    delay0, run0 = s.sample(busy_child)
    time.sleep(0.1)
    delay1, run1 = s.sample(busy_child)
    assert run1 > run0 and delay1 >= delay0
    assert s.sample(_dead_pid()) is None


def test_taskstats_sampler_matches_schedstat(busy_child: int) -> None:
    try:
        ts = TaskstatsSampler()
    except SamplerError as e:
        pytest.skip(f"no taskstats on this kernel: {e}")
    try:
        ss = SchedstatSampler()
        a = ts.sample(busy_child)
        b = ss.sample(busy_child)
        c = ts.sample(busy_child)
        assert a is not None and b is not None and c is not None
        # The same kernel counters (sched_info.run_delay, se.sum_exec_runtime), read in turn.
        assert a[0] <= b[0] <= c[0] and a[1] <= b[1] <= c[1]
        assert ts.sample(_dead_pid()) is None
        assert "taskstats" in ts.detail
    finally:
        ts.close()


# --- the follower ---------------------------------------------------------------------------


class FakeSampler:
    name = "fake"
    detail = "fake"

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}
        self.gone: set[int] = set()

    def sample(self, pid: int) -> tuple[int, int] | None:
        if pid in self.gone:
            return None
        n = self.calls[pid] = self.calls.get(pid, 0) + 1
        return n * 1000 * pid, n * 500  # delay grows by 1000 * pid, run by 500 per call


def _record(pid: int, action: int = 0, prob_q16: int = 0) -> bytes:
    return bytes(contract.Candidate(pid=pid, ts_ns=time.monotonic_ns(), cpu=1, cpu_idle=1,
                                    src_load_q=8, dst_load_q=2, src_dom=0, dst_dom=1,
                                    action=action, source=contract.Source.EXPLORE,
                                    prob_q16=prob_q16))


def test_follower_samples_twice_and_counts_what_it_skips() -> None:
    fs = FakeSampler()
    f = collect.Follower(fs, window_ns=0, max_per_s=1000)
    f.on_record(_record(7, 1))
    f.on_record(_record(7))  # its window is still open
    f.on_record(_record(os.getpid()))  # the collector itself
    fs.gone.add(9)
    f.on_record(_record(9))  # gone before the first sample
    assert f.pending() == 1
    f.close_due(time.monotonic_ns())
    assert f.pending() == 0
    st = f.stats
    assert (st.records, st.followed, st.completed, st.pid_busy, st.own, st.exited) == (
        4, 1, 1, 1, 1, 1)
    cols = f.columns()
    assert cols["delay_ns"].tolist() == [7000] and cols["run_ns"].tolist() == [500]
    assert cols["action"].tolist() == [1]
    assert cols["source"].tolist() == [contract.Source.EXPLORE]
    f.following = False
    f.on_record(_record(8))
    assert st.late == 1 and f.pending() == 0


def test_follower_rate_limit() -> None:
    f = collect.Follower(FakeSampler(), window_ns=10**12, max_per_s=20)
    for pid in range(100, 200):
        f.on_record(_record(pid))
    assert f.stats.followed == 1  # a burst of max(1, 5 % of a second's worth)
    assert f.stats.rate_limited == 99


def test_follower_drops_a_task_that_exits_in_the_window() -> None:
    fs = FakeSampler()
    f = collect.Follower(fs, window_ns=0, max_per_s=1000)
    f.on_record(_record(5))
    fs.gone.add(5)
    f.close_due(time.monotonic_ns())
    assert f.stats.exited == 1 and f.stats.completed == 0


# --- labeling -------------------------------------------------------------------------------


def _rows(spec: list[tuple[int, int, int, float]]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                            np.ndarray]:
    """(cpu, cpu_idle, action, delay per run) rows with src 8, dst 2 -> cols, delay, run."""
    cols = {
        "cpu": np.array([r[0] for r in spec]),
        "cpu_idle": np.array([r[1] for r in spec]),
        "cpu_not_idle": np.ones(len(spec), np.int64),
        "src_load_q": np.full(len(spec), 8),
        "dst_load_q": np.full(len(spec), 2),
        "action": np.array([r[2] for r in spec]),
    }
    run = np.full(len(spec), 10**6)
    delay = np.array([r[3] * 10**6 for r in spec])
    return cols, delay, run


def test_delay_per_run() -> None:
    m = delay_per_run(np.array([5, 5, 0, 0]), np.array([10, 0, 10, 0]))
    assert m[0] == 0.5 and m[1] == np.inf and m[2] == 0 and np.isnan(m[3])


def test_bucket_level_0_is_the_kernel_key() -> None:
    cols, _, _ = _rows([(3, 1, 0, 0.0)])
    assert int(bucket_ids(cols, 0)[0]) == schema.pack_key(3, 1, 1, 8, 2)


def test_migrating_that_helps_is_labeled_migrate() -> None:
    cols, delay, run = _rows([(0, 1, 1, 0.1)] * 5 + [(0, 1, 0, 1.0)] * 5)
    labels, levels = label_rows(cols, delay, run)
    assert labels.tolist() == [1] * 10  # both sides say the same: migrating was better
    assert levels.tolist() == [0] * 10


def test_migrating_that_hurts_is_labeled_keep() -> None:
    cols, delay, run = _rows([(0, 1, 1, 2.0)] * 5 + [(0, 1, 0, 0.5)] * 5)
    labels, _ = label_rows(cols, delay, run)
    assert labels.tolist() == [0] * 10


def test_ties_go_to_keep() -> None:
    cols, delay, run = _rows([(0, 1, 1, 0.0)] * 5 + [(0, 1, 0, 0.0)] * 5)
    labels, _ = label_rows(cols, delay, run)
    assert labels.tolist() == [0] * 10


def test_a_row_is_compared_with_the_other_action_only() -> None:
    # Keep rows 0.2 .. 1.0 against migrate median 0.5: lower ones keep, higher ones migrate.
    spec = [(0, 1, 1, 0.5)] * 5 + [(0, 1, 0, v) for v in (0.2, 0.4, 0.5, 0.6, 1.0)]
    cols, delay, run = _rows(spec)
    labels, _ = label_rows(cols, delay, run)
    assert labels[5:].tolist() == [0, 0, 0, 1, 1]


def test_coarser_buckets_then_drop() -> None:
    spec = (
        [(0, 1, 1, 0.1)] * 5  # migrate on CPU 0
        + [(1, 1, 0, 1.0)] * 2  # keep on CPU 1: no migrate row on its key -> key without cpu
        + [(0, 2, 0, 1.0)]  # another idle count: only the (idle > 0, gap) bucket has migrates
        + [(0, 0, 1, 1.0)]  # no idle CPU: no keep rows anywhere with idle 0 -> dropped
        + [(0, 1, 0, np.nan)]  # did nothing in the window
    )
    cols, delay, run = _rows(spec)
    run[-1] = 0
    delay[-1] = 0
    labels, levels = label_rows(cols, delay, run, min_other=2)
    assert levels[5:7].tolist() == [1, 1] and labels[5:7].tolist() == [1, 1]
    assert levels[7] == 2 and labels[7] == 1
    assert levels[8] == LEVEL_NO_OTHER and labels[8] == -1
    assert levels[9] == LEVEL_IDLE and labels[9] == -1


def test_idle_rows_count_as_nothing_lost_when_asked() -> None:
    """--idle-rows label: a task that neither ran nor waited has m = 0 and is labeled."""
    spec = [(0, 1, 1, 0.5)] * 5 + [(0, 1, 0, 1.0)] * 5 + [(0, 1, 0, 0.0), (0, 1, 1, 0.0)]
    cols, delay, run = _rows(spec)
    run[-2:] = 0
    labels, levels = label_rows(cols, delay, run)
    assert levels[-2:].tolist() == [LEVEL_IDLE] * 2 and labels[-2:].tolist() == [-1, -1]
    labels, levels = label_rows(cols, delay, run, idle_zero=True)
    assert levels[-2:].tolist() == [0, 0]
    # Kept and slept: keeping lost nothing (0 < the migrate median 0.5): keep. Migrated and
    # slept: migrating lost nothing against the keep median 1.0: migrate.
    assert labels[-2:].tolist() == [0, 1]


def test_relabel_keeps_idle_rows_when_asked(tmp_path: Path) -> None:
    raw = read_outcomes(VM_OUTCOMES)
    idle = int(((raw["delay_ns"] == 0) & (raw["run_ns"] == 0)).sum())
    assert idle > 0
    dropped, kept = tmp_path / "d.csv", tmp_path / "k.csv"
    _relabel_vm(dropped)
    assert collect.main(["--relabel", str(VM_OUTCOMES), "--output", str(kept), "--explore",
                         "0.5", "--idle-rows", "label", "--outcomes",
                         str(tmp_path / "k.outcomes.csv")]) == 0
    ds = read_dataset(kept)
    assert len(ds) > len(read_dataset(dropped))
    assert int(((ds.columns["delay_ns"] == 0) & (ds.columns["run_ns"] == 0)).sum()) > 0
    assert "a task that neither ran nor waited: m = 0" in kept.read_text()


def test_late_rows_are_left_out_when_asked(tmp_path: Path) -> None:
    """--max-late-ms: a row read, or closed, more than that late is not labeled (level -3)."""
    raw = read_outcomes(VM_OUTCOMES)
    most = float(np.percentile(raw["read_lag_ns"], 80)) / 1e6  # ms: a fifth of the rows late
    late = (raw["read_lag_ns"] > most * 1e6) | (raw["window_ns"] > 100e6 + most * 1e6)
    assert 0 < late.sum() < len(late)
    out, outcomes = tmp_path / "l.csv", tmp_path / "l.outcomes.csv"
    assert collect.main(["--relabel", str(VM_OUTCOMES), "--output", str(out), "--explore",
                         "0.5", "--max-late-ms", f"{most}", "--outcomes", str(outcomes)]) == 0
    again = read_outcomes(outcomes)
    assert (again["label_level"][late] == LEVEL_STALLED).all()
    assert (again["label"][late] == -1).all()
    assert not (again["label_level"][~late] == LEVEL_STALLED).any()
    ds = read_dataset(out)
    assert (ds.columns["window_ns"] <= 100e6 + most * 1e6).all()
    assert f"{int(late.sum())} read or closed more than" in out.read_text()


# --- files and CLI --------------------------------------------------------------------------


def test_outcomes_path_for() -> None:
    assert outcomes_path_for(Path("/d/x.csv")) == Path("/d/x.outcomes.csv")
    assert outcomes_path_for(Path("x.csv.gz")) == Path("x.outcomes.csv.gz")
    assert outcomes_path_for(Path("x")) == Path("x.outcomes.csv")


def _relabel_vm(out: Path) -> None:
    """The captured VM run (explore 0.5, fallback heuristic) as a v2 dataset."""
    assert collect.main(["--relabel", str(VM_OUTCOMES), "--output", str(out),
                         "--explore", "0.5"]) == 0


def test_relabel_reproduces_the_vm_dataset(tmp_path: Path) -> None:
    out = tmp_path / "relabeled.csv"
    _relabel_vm(out)
    again, captured = read_dataset(out), read_dataset(VM_DATASET)
    assert again.version == 2 and captured.version == 1
    assert len(again) == len(captured) > 0
    for name in COLUMN_NAMES:
        assert again.columns[name].tolist() == captured.columns[name].tolist()
    raw = read_outcomes(VM_OUTCOMES)
    assert int((raw["label"] >= 0).sum()) == len(captured)
    # The VM's fallback rows did what model_dir/fallback.py says the heuristic does (the reader
    # refuses them otherwise), and every propensity is P/2 or P/2 + 1 - P with P = 0.5.
    fallback_rows = again.sources == contract.Source.FALLBACK
    assert fallback_rows.any() and (again.sources == contract.Source.EXPLORE).any()
    assert set(np.unique(again.propensities()).tolist()) == {0.25, 0.75}
    assert (again.propensities()[fallback_rows] == 0.75).all()
    labeled = raw["label"] >= 0
    for name in ("window_ns", "delay_ns", "run_ns"):
        assert again.columns[name].tolist() == raw[name][labeled].tolist()


def test_relabel_of_a_pre_v2_file_needs_the_exploration(tmp_path: Path) -> None:
    res = _cli("--relabel", str(VM_OUTCOMES), "--output", str(tmp_path / "x.csv"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "predates format v2" in lines[0] and "--explore P" in lines[0]
    assert not (tmp_path / "x.csv").exists()


def test_collected_rows_get_their_propensities(tmp_path: Path) -> None:
    """What a collection run writes: the outcomes file with the logging policy, the dataset v2
    with each row's propensity; relabeling the new outcomes file needs no --explore."""
    raw = read_outcomes(VM_OUTCOMES)
    cols = {name: raw[name] for name in MEASURED_COLUMNS if name in raw}
    n = len(cols["ts_ns"])
    cols["path"] = np.zeros(n, np.int64)
    cols["explore_q"] = np.full(n, 19661)  # --explore 0.3
    cols["fallback"] = np.full(n, int(contract.Fallback.HEURISTIC))
    cols["source"] = np.full(n, int(contract.Source.EXPLORE))  # every row a coin flip here
    heur = fallback.heuristic_migrate(cols["cpu_idle"], cols["src_load_q"], cols["dst_load_q"])
    cols["prob_q16"] = fallback.kernel_prob_q16(cols["action"], heur, 19661)
    out, outcomes = tmp_path / "d.csv.gz", tmp_path / "d.outcomes.csv.gz"
    nr, _ = collect.label_and_write(cols, out, outcomes, 5, ["a test"])
    ds = read_dataset(out)
    assert ds.version == 2 and len(ds) == nr > 0
    heur = ds.heuristic()
    want = np.where(ds.actions == heur, 0.15 + 0.7, 0.15)
    assert np.allclose(ds.propensities(), want, atol=1e-4)
    assert (ds.columns["explore_q"] == 19661).all()
    text = gzip.open(out, "rt").read()
    assert "# mlsched-collect dataset, format v2" in text and "# logging policy: fallback " \
        "heuristic, else with probability P = 0.300003 (explore_q 19661) a fair coin" in text
    again = read_outcomes(outcomes)
    assert again["explore_q"].tolist() == [19661] * n
    relabeled = tmp_path / "r.csv"
    assert collect.main(["--relabel", str(outcomes), "--output", str(relabeled)]) == 0
    assert read_dataset(relabeled).propensities().tolist() == ds.propensities().tolist()
    # An outcomes file written before v2 still reads (and --explore supplies its P).
    assert "explore_q" not in read_outcomes(VM_OUTCOMES)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.collect", *argv], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("argv, text", [
    (["--output", "/nonexistent-dir/x.csv"], "does not exist"),
    (["--output", "/tmp/x.csv", "--explore", "1.5"], "--explore"),
    (["--output", "/tmp/x.csv", "--window-ms", "0"], "--window-ms"),
    (["--output", "/tmp/x.csv", "--relabel", "/nonexistent.csv"], "not found"),
])
def test_user_mistakes_exit_2_with_one_line(argv: list[str], text: str) -> None:
    res = _cli(*argv)
    assert res.returncode == 2
    assert text in res.stderr
    assert "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("mlsched-collect")]) == 1


@pytest.mark.skipif(os.path.exists("/sys/kernel/sched_ext") or os.geteuid() != 0,
                    reason="needs root on a kernel without sched_ext")
def test_no_sched_ext_exits_1_and_touches_nothing(tmp_path: Path) -> None:
    sysctl = Path("/proc/sys/kernel/task_delayacct")
    before = sysctl.read_text() if sysctl.exists() else None
    res = _cli("--output", str(tmp_path / "x.csv"), "--duration", "1")
    assert res.returncode == 1
    assert "no sched_ext" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.csv").exists()
    if before is not None:
        assert sysctl.read_text() == before


# --- training on real collected data --------------------------------------------------------


def test_training_on_the_vm_dataset_gives_a_valid_model(tmp_path: Path, tf) -> None:
    from loader.model_check import check_model_dir
    from model_dir import model_export
    from tools import trainreport

    out = tmp_path / "trained"
    accuracy = model_export.run(out, VM_DATASET, epochs=8, seed=0)["val_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    info = check_model_dir(out)  # what mlsched-load checks before attaching
    assert info.fastpath_ok, info.fastpath_reason
    figures = trainreport.report(out, VM_DATASET, seed=0, grid=None)
    assert figures["val_accuracy"] == pytest.approx(accuracy)
    assert 0.0 <= figures["disagree_grid"] <= 1.0
    assert trainreport.main(["--model", str(tmp_path / "missing"), "--data",
                             str(VM_DATASET)]) == 2


def test_policy_learning_and_evaluation_on_the_vm_dataset(tmp_path: Path, tf) -> None:
    """Real collected rows (v2, relabeled from the VM run) through --objective policy and
    mlsched-evaluate: a model the loader accepts, and an evaluation table naming it."""
    from loader.model_check import check_model_dir
    from model_dir import model_export

    data = tmp_path / "vm.csv"
    _relabel_vm(data)
    out = tmp_path / "learned"
    figures = model_export.run(out, data, epochs=3, seed=0, objective="policy", bootstrap=100)
    assert figures["val_diff_dr_lo"] <= figures["val_diff_dr"] <= figures["val_diff_dr_hi"]
    assert check_model_dir(out).fastpath_ok
    res = subprocess.run([sys.executable, "-m", "tools.evaluate", "--data", str(data), "--model",
                          str(out), "--bootstrap", "100"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert f"{out}: numpy: verified" in res.stdout
    assert "365 candidates" in res.stdout and "21 blocks of 1 s" in res.stdout


def test_a_collection_run_ends_in_a_v2_dataset(tmp_path: Path) -> None:
    """The collector's last step on followed records: the run's P and fallback in every row,
    the propensities from them, the outcomes file relabelable on its own."""
    import argparse
    import types

    def run(tag: str, wrong: int = -1) -> tuple[int, argparse.Namespace]:
        follower = collect.Follower(FakeSampler(), window_ns=0, max_per_s=10**6)
        for pid in range(100, 110):  # coin flips: 5 migrated, 5 kept; the heuristic migrates
            prob = 8192 + 49152 if pid % 2 else 8192  # what the kernel records at P = 0.25
            follower.on_record(_record(pid, pid % 2, prob + (pid == wrong)))
        follower.close_due(time.monotonic_ns())
        args = argparse.Namespace(
            fallback="heuristic", explore=0.25, window_ms=0.0, max_follow=10, min_other=2,
            output=tmp_path / f"{tag}.csv", outcomes=tmp_path / f"{tag}.outcomes.csv")
        plan = types.SimpleNamespace(domains=[[0], [1]], reason="a test")
        delayacct = types.SimpleNamespace(saved=None)
        return collect._finish(args, follower, FakeSampler(), [], 1.0, plan, delayacct), args

    # The kernel's prob_q16 off by one on one row: the outcomes are kept, the dataset refused.
    status, args = run("drift", wrong=103)
    assert status == 1 and args.outcomes.exists() and not args.output.exists()
    status, args = run("c")
    assert status == 0
    ds = read_dataset(args.output)
    assert ds.version == 2 and len(ds) == 10
    assert (ds.columns["explore_q"] == 16384).all()
    assert (ds.columns["fallback"] == contract.Fallback.HEURISTIC).all()
    # P = 0.25: migrating (the heuristic's choice) 0.125 + 0.75, keeping 0.125.
    assert ds.propensities().tolist() == [0.875 if a else 0.125 for a in ds.actions]
    raw = read_outcomes(args.outcomes)
    assert raw["explore_q"].tolist() == [16384] * 10 and raw["path"].tolist() == [0] * 10
    assert sorted(set(raw["prob_q16"].tolist())) == [8192, 57344]
