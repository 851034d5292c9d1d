"""wakeprobe (tools/bench/wakeprobe.c) built and run on the host; wakelat's tables from JSON.

No timing thresholds: only that the probe takes samples and reports them consistently.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tools.bench import wakelat

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


@pytest.fixture(scope="module")
def wakeprobe() -> Path:
    subprocess.run(["make", "-s", "build/bench/wakeprobe"], cwd=REPO_ROOT, check=True)
    assert wakelat.WAKEPROBE.is_file()
    return wakelat.WAKEPROBE


def run(probe: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(probe), *args], capture_output=True, text=True, timeout=timeout)


def check_stats(s: dict[str, float]) -> None:
    assert s["samples"] > 0
    assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["p99_9"] <= s["max"]
    assert s["min"] <= s["avg"] <= s["max"]


def test_json_run_takes_samples(wakeprobe: Path) -> None:
    r = run(wakeprobe, "--message-threads", "2", "--workers", "3", "--runtime-s", "1",
            "--warmup-s", "0.2", "--request-us", "20", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["message_threads"] == 2 and res["workers"] == 3
    assert res["interrupted"] is False
    assert res["measured_s"] > 0 and res["request_loops"] >= 1 and res["loops_per_us"] > 0
    # One wakeup sample per measured request, counted on both sides of the futex.
    assert res["samples"] == res["requests"] == res["wakeup_us"]["samples"] > 0
    assert res["request_latency_us"]["samples"] == res["requests"]
    assert 0 <= res["not_asleep"] <= res["samples"]
    assert res["requests_per_s"] == pytest.approx(res["requests"] / res["measured_s"], rel=0.01)
    check_stats(res["wakeup_us"])
    check_stats(res["request_latency_us"])


def test_fixed_loops_and_text_output(wakeprobe: Path) -> None:
    r = run(wakeprobe, "-m", "1", "-w", "1", "-r", "1", "--warmup-s", "0",
            "--request-loops", "5000")
    assert r.returncode == 0, r.stderr
    assert "request 5000 loops" in r.stdout
    assert "wakeup, us:" in r.stdout and "samples)" in r.stdout and "requests/s:" in r.stdout


def test_calibrate(wakeprobe: Path) -> None:
    r = run(wakeprobe, "--calibrate", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loops_per_us"] > 0


@pytest.mark.parametrize("args", [["--message-threads", "0"], ["--workers", "x"],
                                  ["--runtime-s", "-1"], ["--bogus"], ["extra"]])
def test_bad_usage(wakeprobe: Path, args: list[str]) -> None:
    r = run(wakeprobe, *args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines()[0].startswith(("wakeprobe: ", str(wakeprobe) + ": "))


def test_sigint_reports_partial_results(wakeprobe: Path) -> None:
    proc = subprocess.Popen([str(wakeprobe), "-r", "60", "--warmup-s", "0.1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    res = json.loads(out)
    assert res["interrupted"] is True
    assert res["measured_s"] < 60


# --- wakelat's parsing and reports, from a synthetic results file ------------------------------


def test_parse_config() -> None:
    assert wakelat.parse_config('s5="--slice-us 5000"') == ("s5", ('--slice-us 5000',))
    assert wakelat.parse_config("s5=--slice-us 5000") == ("s5", ("--slice-us", "5000"))
    assert wakelat.parse_config("plain=") == ("plain", ())
    for bad in ("noequals", "eevdf=--x", "bad name=--x", "q='unterminated"):
        with pytest.raises(argparse.ArgumentTypeError):
            wakelat.parse_config(bad)


def _run(config: str, rnd: int, seq: int, avg: float, p99: float) -> dict[str, Any]:
    stats = {"samples": 1000, "avg": avg, "min": 1.0, "p50": avg / 2, "p90": avg * 2,
             "p99": p99, "p99_9": p99 * 2, "max": p99 * 3}
    return {"config": config, "round": rnd, "seq": seq, "wall_s": 30.0,
            "probe": {"wakeup_us": stats, "requests_per_s": 1000.0 + seq, "samples": 1000,
                      "not_asleep": 0},
            "hogs": {"bogo_ops_per_s": 300.0 + seq},
            "host": {"vm_cpu": 0.5 if seq == 3 else 0.98, "other_cpu": 0.4, "samples": 20}}


def test_summary_table_markdown(tmp_path: Path) -> None:
    runs = [_run("eevdf", 0, 1, 100, 1000), _run("mlsched", 0, 2, 200, 4000),
            _run("eevdf", 1, 3, 120, 1400), _run("mlsched", 1, 4, 260, 5000),
            {"config": "mlsched", "round": 2, "seq": 5, "wall_s": 3.0, "error": "loader: x"}]
    res: dict[str, Any] = {
        "meta": {"date": "d", "kernel": "k", "cpus": 4, "guest_wall_s": 60.0},
        "params": {"rounds": 3, "runtime_s": 20, "warmup_s": 3, "hogs": 4, "hog_lead_s": 2,
                   "message_threads": 2, "workers": 2, "request_us": 100,
                   "loops_per_us": 1000.0, "request_loops": 100000, "seed": 1},
        "configs": [{"name": "eevdf", "loader_args": None},
                    {"name": "mlsched", "loader_args": ["--domains", "2"]}],
        "runs": runs, "complete": True}
    summ = wakelat.summarize(res)
    assert summ["eevdf"]["runs"] == 2 and summ["mlsched"]["runs"] == 2
    assert summ["mlsched"]["errors"] == 1
    assert summ["eevdf"]["wakeup_avg_us"] == {"median": 110, "min": 100, "max": 120}
    assert summ["mlsched"]["wakeup_p99_us"]["median"] == 4500
    assert summ["eevdf"]["samples_total"] == 2000
    text = "\n".join(wakelat.table(res))
    assert "| mlsched | 2 (1 failed) |" in text
    assert "mlsched / eevdf (medians): wakeup avg 2.09×" in text
    md = wakelat.markdown(res)
    assert "error: loader: x" in md and "## Runs" in md
    assert "**Contended** (VM < 0.9 CPU): #3 (eevdf, 0.50)" in md
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    assert wakelat.main(["--report", str(f), "--md", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text() == md
