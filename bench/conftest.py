"""Fixtures for the benchmarks: the jobs per device and size, and the machine's matmul peak."""

from __future__ import annotations

import platform

import pytest
import torch

from bench.jobs import Job, measure_matmul_peak, titanic_job
from engine.memory import keep_freed_memory

# Every contender runs in this one process with the same malloc settings: freed memory is
# kept for reuse, as the command line does (see engine/memory.py).
KEPT_FREED_MEMORY = keep_freed_memory()

# Rows per size: the Titanic test set itself, and the test set tiled to 20,000 rows.
SIZES = {"titanic-179": None, "tiled-20k": 20_000}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
        ],
    ),
]

_JOBS: dict[tuple[str, str], Job] = {}
_PEAKS: dict[str, float] = {}


def job_for(device: str, size: str) -> Job:
    """One network per device, shared by both sizes so that compiled code is reused."""
    if (device, size) not in _JOBS:
        job = titanic_job(SIZES[size], device)
        first = next((j for (d, _), j in _JOBS.items() if d == device), None)
        if first is not None:
            job = Job(first.net, job.inputs, job.baselines)
        _JOBS[device, size] = job
    return _JOBS[device, size]


def matmul_peak(device: str) -> float:
    """The best matmul rate seen so far in this run: measured again at every benchmark.

    A shared machine's speed drifts; a peak measured once can land in a slow moment and
    flatter every "of peak" figure. The report uses the largest value of the run.
    """
    _PEAKS[device] = max(_PEAKS.get(device, 0.0), measure_matmul_peak(device, repeats=5))
    return _PEAKS[device]


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=list(SIZES))
def size(request) -> str:
    return request.param


def record(benchmark, job: Job, device: str, size: str, contender: str, **extra) -> None:
    """The facts scripts/bench_report.py needs, in pytest-benchmark's extra_info."""
    benchmark.group = f"{device} {size}"
    benchmark.extra_info.update(
        contender=contender, device=device, size=size, machine=machine(device),
        rows=job.inputs.shape[0], baselines=job.baselines.shape[0], points=job.points,
        flops=job.flops, matmul_peak_gflops=matmul_peak(device), torch=torch.__version__,
        kept_freed_memory=KEPT_FREED_MEMORY,
        **extra,
    )
