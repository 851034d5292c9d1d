"""tools/bench/report.py on a synthetic results file: statistics and tables, no timing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tools.bench import report


def _run(cfg: str, wl: str, rnd: int, seconds: float, migrations: int,
         ml: dict[str, int] | None = None) -> dict:
    r = {"config": cfg, "workload": wl, "round": rnd, "seconds": seconds,
         "migrations": migrations, "cross_migrations": migrations // 3, "ctxt": 1000,
         "sched_cpu_s": 0.1}
    if wl == "wakeup":
        r.update(requests_per_s=1000.0 / seconds, wakeup_avg_us=100.0 * seconds,
                 wakeup_p50_us=50.0, wakeup_p99_us=900.0 * seconds, hog_ops_per_s=10.0)
    if ml is not None:
        r["mlsched"] = {"hits": 100, "misses": 0, "kinfer": 2, "kinfer_ns": 8000, **ml}
        r["select_cpu"] = {"run_time_ns": 5000, "run_cnt": 50}
    return r


def _result() -> dict:
    runs = []
    ml = {"migr_model": 9, "migr_fallback": 1, "migr_forced": 0, "migr_domain": 5,
          "ran_cross": 10}
    for rnd in range(5):
        for wl in ("build", "wakeup"):
            runs.append(_run("eevdf", wl, rnd, 10.0 + rnd * 0.1, 400))
            runs.append(_run("trained", wl, rnd, 9.0 + rnd * 0.1, 100, ml))
            runs.append(_run("kernel", wl, rnd, 10.05 + rnd * 0.1, 390, ml))
    vm = {"kernel": "k", "cpus": 4, "rounds": 5, "scale": 1.0, "seed": 1, "boots": 1,
          "configs": [{"name": c, "what": c} for c in ("eevdf", "trained", "kernel")],
          "workloads": [{"name": "build", "what": "b", "metric": "seconds", "command": ["make"]},
                        {"name": "wakeup", "what": "w", "metric": "requests_per_s",
                         "command": ["wakeprobe"]}],
          "runs": runs, "starts": [{"config": "trained", "round": 0, "status": 0,
                                    "attach_s": 5.0, "log_attached_s": 4.0,
                                    "log_model_ready_s": 6.0, "vmhwm_mb": 30.0,
                                    "vmrss_mb": 29.0, "llvm_mapped": False}]}
    return {"meta": {"date": "d", "command": "c", "host": "h", "host_kernel": "k",
                     "host_cpus": 2, "commit": "x", "wall_s": 60}, "vm": vm}


def test_bootstrap_interval_holds_the_ratio_and_tells_real_from_noise() -> None:
    base = [10.0, 10.1, 10.2, 10.3, 10.4]
    faster = [9.0, 9.1, 9.2, 9.3, 9.4]
    same = [10.05, 10.15, 10.25, 10.35, 10.0]
    r = report.bootstrap_ratio(base, faster)
    assert r is not None and r[1] <= r[0] <= r[2]
    assert report.real(r) is True
    assert report.real(report.bootstrap_ratio(base, same)) is False
    few = report.bootstrap_ratio(base[:2], faster[:2])
    assert few is not None and report.real(few) is None  # n < 3: no interval


def test_decided_share_and_targets() -> None:
    assert report.decided_share({"migr_model": 9, "migr_fallback": 1, "ran_cross": 10}) == 1.0
    assert report.decided_share({"migr_model": 0, "migr_fallback": 0, "ran_cross": 0}) is None
    rows = {(r["workload"], r["config"]): r for r in report.migration_rows(_result()["vm"])}
    assert rows[("build", "trained")]["met"] is True  # 0.25x migrations, 0.9x time
    assert rows[("build", "kernel")]["met"] is False  # 0.98x migrations
    assert rows[("wakeup", "trained")]["met"] is True  # req/s up, migrations down


def test_markdown_and_plots(tmp_path: Path) -> None:
    res = _result()
    md, pngs = report.write(res, tmp_path, "run")
    text = md.read_text()
    assert "## Targets" in text and "**real**" in text
    assert {p.name for p in pngs} == {"run-build.png", "run-wakeup.png"}


def test_without_matplotlib_one_line_before_reading(tmp_path: Path, monkeypatch, capsys) -> None:
    """matplotlib is the [plot] extra: the report says so instead of failing half-written."""
    results = tmp_path / "run.json"
    results.write_text(json.dumps(_result()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it imports
    assert report.main([str(results)]) == 2
    out, err = capsys.readouterr()
    assert err == "report: plotting needs matplotlib: pip install 'mlsched[plot]'\n" and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
