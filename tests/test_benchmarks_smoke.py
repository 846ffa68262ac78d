"""The benchmark harness still runs, end to end, at a tiny size (``make bench`` is too
long for CI; this keeps it from rotting). The figures themselves are not checked here:
only that every contender that runs delivers every change and the reports are written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bench_runs_every_case_and_writes_its_reports(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run(
        "benchmarks.bench",
        "--runs=1",
        "--rows=2000",
        "--single-rows=100",
        "--contenders=pg_recvlogical,cdc-bridge",
        "--latency-seconds=2",
        "--latency-variants=no-batches",
        "--big-rows=0",
        f"--out={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.glob("*.json")
    report = json.loads(result.read_text())
    cases = {case["case"]: case for case in report["cases"]}
    assert set(cases) == {"backlog", "single"}
    for name, changes in (("backlog", 2000), ("single", 100)):
        case = cases[name]
        assert case["changes"] == changes
        (run,) = case["runs"]
        for contender in ("pg_recvlogical", "cdc-bridge"):
            outcome = run[contender]
            assert outcome["ok"], outcome["error"]
            assert outcome["delivered"] == changes
            assert case["contenders"][contender]["walsender_cpu_s"] >= 0
        assert run["cdc-bridge"]["nats_cpu_s"] is not None
        assert run["pg_recvlogical"]["nats_cpu_s"] is None
    (latency,) = report["latency_variants"]
    assert latency["variant"] == "no-batches"
    assert latency["stored"]["count"] == latency["changes"] == 4000  # 2,000/s for 2 s
    markdown = result.with_suffix(".md").read_text()
    assert "| cdc-bridge |" in markdown
    assert "nats-server CPU s" in markdown


def test_hotpath_decodes_every_change_of_the_slot() -> None:
    done = _run("benchmarks.hotpath", "--rows=2000", "--tx-size=100", "--repeat=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2,000 changes" in done.stdout
    stages = ("decode", "assemble + convert", "route + serialize", "HPUB frame", "total")
    for stage in (*stages, "whole reader"):
        assert f"  {stage} " in done.stdout
