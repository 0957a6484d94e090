"""Points per chunk on a CPU: the sweep behind ``engine.plan.CPU_CHUNK_BYTES`` and
``FUSED_CPU_CHUNK_BYTES``; and the product layouts behind ``engine.passes``.

The Titanic job at fixed chunk sizes: plain and hoisted eager, and hoisted compiled (each
chunk size compiles once, in the warm-up round). Too small a chunk pays Python, dispatch
and guard overhead per chunk; too large a one streams every layer through main memory.
"""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("columns", [1, 2, 5, 8, 16, 32])
@pytest.mark.parametrize("inner", [8, 128])
def test_narrow_product_layout(benchmark, inner, columns, layout):
    """(4000, K) @ (K, n) with the right factor in either order: where the pass pays."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(4_000, inner, generator=generator)
    right = torch.randn(inner, columns, generator=generator)
    if layout == "column-major":
        right = right.t().contiguous().t()
    benchmark.group = f"cpu narrow product K={inner} n={columns}"

    result = benchmark.pedantic(lambda: left @ right, rounds=50, iterations=1, warmup_rounds=3)

    assert result.shape == (4_000, columns)
