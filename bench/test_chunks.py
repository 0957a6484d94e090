"""Points per chunk on a CPU: the sweep behind ``engine.plan.CPU_CHUNK_BYTES`` and
``FUSED_CPU_CHUNK_BYTES``.

The Titanic job at fixed chunk sizes: plain and hoisted eager, and hoisted compiled (each
chunk size compiles once, in the warm-up round). Too small a chunk pays Python, dispatch
and guard overhead per chunk; too large a one streams every layer through main memory.
"""

from __future__ import annotations

import pytest

from bench.conftest import job_for, record
from bench.jobs import engine_run

VARIANTS = {
    "hoisted": dict(hoist=True),
    "plain": dict(hoist=False),
    "hoisted-compiled": dict(hoist=True, compile=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunk", [1_000, 2_000, 4_000, 8_000, 17_900, 35_800])
def test_chunk_size(benchmark, chunk, variant):
    job = job_for("cpu", "titanic-179")
    record(benchmark, job, "cpu", "chunk-sweep", f"chunk-{chunk}-{variant}")
    benchmark.group = f"cpu chunk sweep {variant}"

    result = benchmark.pedantic(
        lambda: engine_run(job, internal_batch_size=chunk, **VARIANTS[variant]),
        rounds=5, iterations=1, warmup_rounds=1,
    )

    assert result.shape == (4, 179, 5)
