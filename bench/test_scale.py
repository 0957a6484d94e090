"""The engine at 100,000 and 1,000,000 rows within the default 1 GiB budget.

Each size runs in a subprocess so that its peak RSS is its own; the JSON records engine
time, time per row (linear scaling means equal time per row) and peak RSS.
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


@pytest.mark.parametrize("rows", [100_000, 1_000_000])
def test_scale(benchmark, rows):
    def child() -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--rows", str(rows)],
            cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    report = benchmark.pedantic(child, rounds=1, iterations=1)

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
