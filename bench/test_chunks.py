"""Points per chunk on a CPU: the sweep behind ``engine.plan.CPU_CHUNK_BYTES``.

The Titanic job at fixed chunk sizes, plain and hoisted. Too small a chunk pays Python
and dispatch overhead per chunk; too large a one streams every layer through main memory.
"""

from __future__ import annotations

import pytest

from bench.conftest import job_for, record
from bench.jobs import engine_run


@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "plain"])
@pytest.mark.parametrize("chunk", [1_000, 2_000, 4_000, 8_000, 17_900, 35_800])
def test_chunk_size(benchmark, chunk, hoist):
    job = job_for("cpu", "titanic-179")
    record(benchmark, job, "cpu", "chunk-sweep", f"chunk-{chunk}-{'hoisted' if hoist else 'plain'}")
    benchmark.group = f"cpu chunk sweep {'hoisted' if hoist else 'plain'}"

    result = benchmark.pedantic(
        lambda: engine_run(job, hoist=hoist, internal_batch_size=chunk),
        rounds=5, iterations=1, warmup_rounds=1,
    )

    assert result.shape == (4, 179, 5)
