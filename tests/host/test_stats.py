"""mlsched's stats figures from two synthetic samples: rates, percentiles, JSON, OpenMetrics.

The computation (loader/stats.py) and its renderings (tools/stats.py) plus the CLI's refusals;
the server is tests/host/test_stats_server.py, the real maps tests/vm/test_stats.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from loader import contract
from loader.stats import (
    COUNTED,
    DOM_FIELDS,
    FIELD_NAMES,
    FIELDS,
    Sample,
    compute,
    meta,
    percentile_us,
)
from tools.stats import markdown_table, render_json, render_openmetrics, render_text

REPO = Path(__file__).resolve().parents[2]
C = contract.Counter
LS = contract.LoaderStat
NB = contract.HIST_BUCKETS


def sample(t_s: float, counters: dict[C, int], loader: dict[LS, int],
           batch_hist: dict[int, int] | None = None,
           event_hist: dict[int, int] | None = None) -> Sample:
    c = [0] * contract.NR_COUNTERS
    for k, v in counters.items():
        c[k] = v
    ls = [0] * contract.NR_LOADER_STATS
    ls[LS.START_NS] = 1_000_000_000
    ls[LS.LOADER_PID] = 4242
    ls[LS.BACKEND] = contract.Backend.NUMPY
    ls[LS.MODEL_READY] = 1
    ls[LS.TABLE_ENTRIES] = 820
    for k, v in loader.items():
        ls[k] = v
    hist = [[0] * NB for _ in range(contract.NR_HISTS)]
    for b, n in (batch_hist or {}).items():
        hist[contract.Hist.BATCH][b] = n
    for b, n in (event_hist or {}).items():
        hist[contract.Hist.EVENT][b] = n
    config = {"nr_cpus": 2, "nr_doms": 2, "fallback_policy": contract.Fallback.HEURISTIC}
    return Sample(
        mono_ns=int(t_s * 1e9), wall_s=1_700_000_000 + t_s, state="enabled", ops="mlsched",
        model='/m/model "x"', counters=c, loader=ls, config=config, hist=hist,
        doms=[(1, 8, 3), (1, 4, 0)], table_capacity=65536,
    )


@pytest.fixture
def busy() -> dict[str, object]:
    """Two seconds of activity on top of history that must not leak into the rates."""
    prev = sample(
        11.0,
        {C.CANDIDATES: 1000, C.HITS: 900, C.MIGRATE: 300, C.KEEP: 600, C.RB_DROPS: 5,
         C.MIGR_MODEL: 400},
        {LS.BATCHES: 10, LS.DECISIONS: 100, LS.BATCH_NS_SUM: 10 * 50_000,
         LS.EV_LAT_NS_SUM: 100 * 1_000_000, LS.BATCH_NS_MAX: 90_000},
        batch_hist={10: 10}, event_hist={20: 100},
    )
    cur = sample(
        13.0,
        {C.CANDIDATES: 1400, C.HITS: 1200, C.MIGRATE: 400, C.KEEP: 800, C.RB_DROPS: 5,
         C.MIGR_MODEL: 500},
        {LS.BATCHES: 110, LS.DECISIONS: 900, LS.BATCH_NS_SUM: 10 * 50_000 + 100 * 20_000,
         LS.EV_LAT_NS_SUM: 100 * 1_000_000 + 800 * 3_000, LS.BATCH_NS_MAX: 90_000},
        batch_hist={10: 10, 14: 98, 16: 2}, event_hist={20: 100, 11: 400, 12: 399, 25: 1},
    )
    return compute(prev, cur)


def test_rates_are_deltas_over_the_interval(busy: dict[str, object]) -> None:
    assert busy["interval_s"] == 2.0
    assert busy["candidates_per_s"] == 200.0
    assert busy["candidates_total"] == 1400
    assert busy["hits_per_s"] == 150.0
    assert busy["migrate_per_s"] == 50.0
    assert busy["keep_per_s"] == 100.0
    assert busy["rb_drops_per_s"] == 0.0 and busy["rb_drops_total"] == 5
    assert busy["migr_model_per_s"] == 50.0
    assert busy["hit_rate"] == 0.75  # 300 hits of 400 candidates, not 1200 / 1400
    assert busy["batches_per_s"] == 50.0
    assert busy["batch_size_avg"] == 8.0  # 800 decisions in 100 batches
    assert busy["batch_latency_avg_us"] == 20.0
    assert busy["batch_latency_max_us"] == 90.0
    assert busy["event_latency_avg_us"] == 3.0
    assert busy["uptime_s"] == 12.0
    assert busy["table_occupancy"] == round(820 / 65536, 4)
    assert (busy["backend"], busy["fallback"], busy["loader_pid"]) == ("numpy", "heuristic", 4242)
    assert busy["domains"] == {
        "0": {"nr_cpus": 1, "load": 0.5, "queued": 3},
        "1": {"nr_cpus": 1, "load": 0.25, "queued": 0},
    }


def test_percentiles_are_bucket_upper_bounds_of_the_delta(busy: dict[str, object]) -> None:
    # batches this interval: 98 in [2^14, 2^15) ns, 2 in [2^16, 2^17); the old 10 in bucket 10
    # are history
    assert busy["batch_latency_p50_us"] == 2**15 / 1000
    assert busy["batch_latency_p99_us"] == 2**17 / 1000
    # events: 400 in bucket 11, 399 in 12, 1 in 25 -> p50 in 11, p99 in 12
    assert busy["event_latency_p50_us"] == 2**12 / 1000
    assert busy["event_latency_p99_us"] == 2**13 / 1000


def test_percentile_edges() -> None:
    assert percentile_us([0] * NB, 0.5) is None
    one = [0] * NB
    one[0] = 1
    assert percentile_us(one, 0.5) == percentile_us(one, 0.99) == 0.002
    last = [0] * NB
    last[NB - 1] = 3
    assert percentile_us(last, 0.99) == 2**NB / 1000


def test_idle_interval_reports_nothing_rather_than_zero() -> None:
    s = sample(5.0, {C.CANDIDATES: 7}, {LS.BATCHES: 3, LS.DECISIONS: 9})
    idle = compute(s, sample(6.0, {C.CANDIDATES: 7}, {LS.BATCHES: 3, LS.DECISIONS: 9}))
    assert idle["candidates_per_s"] == 0.0
    for name in ("hit_rate", "batch_size_avg", "batch_latency_p50_us", "event_latency_p99_us",
                 "batch_latency_avg_us", "event_latency_avg_us"):
        assert name not in idle, name  # left out: scx_stats clients expect numbers
    families = {f.name: f for f in text_string_to_metric_families(render_openmetrics(idle))}
    assert families["mlsched_hit_rate"].samples == []  # declared, without a sample
    assert "model loading" not in render_text(idle) and "hit -" in render_text(idle)


def test_json_has_every_field_and_only_those(busy: dict[str, object]) -> None:
    text = render_json(busy)
    assert "\n" not in text
    obj = json.loads(text)
    absent = {"decided_share", "kinfer_avg_ns"}  # no cross-domain run, no in-kernel inference
    assert list(obj) == [*(n for n in FIELD_NAMES if n not in absent), "domains"]
    assert not absent & set(busy)  # nothing to measure this interval: no figure
    assert all(set(d) == {f.name for f in DOM_FIELDS} for d in obj["domains"].values())


def test_meta_describes_every_field_in_scx_stats_terms() -> None:
    structs = meta()
    top = next(s for s in structs.values() if s.get("top") == "true")
    assert set(top["fields"]) == {*FIELD_NAMES, "domains"}
    assert top["fields"]["domains"]["dict"] == {"key": "u64", "datum": {"struct": "dom_stats"}}
    assert set(structs["dom_stats"]["fields"]) == {f.name for f in DOM_FIELDS}
    assert structs["dom_stats"]["user"]["_om_label"] == "dom"
    for f in FIELDS:
        field = top["fields"][f.name]
        assert field["datum"] in ("u64", "float", "string") and field["desc"] == f.help
        assert (field["datum"] == "string") == (f.kind == "label")


def test_openmetrics_parses_with_prometheus_client(busy: dict[str, object]) -> None:
    text = render_openmetrics(busy)
    assert text.endswith("# EOF")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for f in FIELDS:
        if f.kind == "counter":
            fam = families["mlsched_" + f.name.removesuffix("_total")]
            assert fam.type == "counter"
            assert fam.samples[0].value == busy[f.name]
        elif f.kind == "gauge":
            assert families["mlsched_" + f.name].type == "gauge"
    assert families["mlsched_candidates_per_s"].samples[0].value == 200.0
    assert families["mlsched"].type == "info"
    info = families["mlsched"].samples[0].labels
    assert info == {"state": "enabled", "ops": "mlsched", "model": '/m/model "x"',
                    "backend": "numpy", "fallback": "heuristic",
                    "model_digest": busy["model_digest"]}
    load = {s.labels["dom"]: s.value for s in families["mlsched_dom_load"].samples}
    assert load == {"0": 0.5, "1": 0.25}
    assert families["mlsched_candidates"].documentation.startswith("migration candidates")


def test_text_block(busy: dict[str, object]) -> None:
    text = render_text(busy)
    assert "model ready (numpy)" in text  # scripts/demo-guest.sh waits for this
    assert "cand 200.0/s  hit 75.0%" in text
    assert "drops 0.0/s (total 5)" in text
    assert "latency p50 33us p99 131us" in text
    assert "dom0" in text and "dom1" in text
    assert max(len(line) for line in text.splitlines()) <= 110


def test_every_kernel_counter_is_reported() -> None:
    reported = {index for _, src, index in COUNTED if src == "counters"}
    assert reported == set(C), "add the new counter to the table of loader/stats.py"


def test_readme_field_table_is_generated_from_the_fields() -> None:
    readme = (REPO / "tools" / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: mlsched-stats --help-stats"
    assert run_stats("--help-stats").stdout.strip() == markdown_table()


def run_stats(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.stats", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_help_has_examples_and_no_tensorflow() -> None:
    res = run_stats("--help")
    assert res.returncode == 0
    assert "examples:" in res.stdout and "--openmetrics" in res.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, tools.stats; print(sorted({'tensorflow', 'libbpf', "
         "'loader.bpfmaps', 'loader.libbpf'} & set(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]"  # a socket client: no TensorFlow, no BPF


@pytest.mark.parametrize("args,pattern", [
    (("--interval", "0"), "--interval: must be in (0, 3600]"),
    (("--json", "--openmetrics"), "not allowed with argument"),
])
def test_bad_arguments(args: tuple[str, ...], pattern: str) -> None:
    res = run_stats(*args)
    assert res.returncode == 2 and pattern in res.stderr and "Traceback" not in res.stderr


def test_json_mode_when_nothing_attached(tmp_path: Path) -> None:
    res = run_stats("--once", "--json", "--socket", str(tmp_path / "none"))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (f"mlsched-stats: mlsched is not attached (no stats socket at "
                          f"{tmp_path / 'none'}); this kernel has no sched_ext\n")


@pytest.mark.parametrize("args,pattern", [
    (("--stats", "-1"), "--stats: must be in (0, 3600] seconds"),
    (("--stats-group", "no-such-group-here"), "--stats-group: no group 'no-such-group-here'"),
])
def test_loader_refuses_bad_stats_options(args: tuple[str, ...], pattern: str) -> None:
    res = subprocess.run([sys.executable, "-m", "loader.main", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and pattern in res.stderr and "Traceback" not in res.stderr
