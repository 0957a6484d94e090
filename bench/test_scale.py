"""The engine at 100,000 and 1,000,000 rows within the default 1 GiB budget.

Each size runs in a subprocess so that its peak RSS is its own; the JSON records engine
time, time per row (linear scaling means equal time per row) and peak RSS. The smaller
size runs three times and keeps its best time (and its largest peak): one run of a few
seconds on a shared machine can land in a slow moment and fake a departure from
linearity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.conftest import job_for, machine, matmul_peak

REPO = Path(__file__).resolve().parent.parent


ROUNDS = {100_000: 3, 1_000_000: 1}


@pytest.mark.parametrize("rows", list(ROUNDS))
def test_scale(benchmark, rows):
    reports = []

    def child() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--rows", str(rows)],
            cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, check=True,
        )
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(child, rounds=ROUNDS[rows], iterations=1)
    report = {**min(reports, key=lambda r: r["engine_seconds"]),
              "peak_rss_bytes": max(r["peak_rss_bytes"] for r in reports),
              "finite": all(r["finite"] for r in reports)}

    job = job_for("cpu", "titanic-179")
    benchmark.group = "cpu scale"
    benchmark.extra_info.update(
        contender="engine-fp32", device="cpu", size=f"scale-{rows // 1000}k",
        machine=machine("cpu"), rows=rows, baselines=4, points=report["points"],
        flops=job.flops / job.points * report["points"], matmul_peak_gflops=matmul_peak("cpu"),
        engine_seconds=report["engine_seconds"], peak_rss_bytes=report["peak_rss_bytes"],
    )
    assert report["finite"]
    assert report["peak_rss_bytes"] < 2 << 30
