"""Sessions: tests, bench, lint, gpu. Each installs the project into its own venv."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"

# The CPU wheel of torch must go in before the project, or pip picks a CUDA build.
TORCH = "torch==2.13.0"


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite."""
    _install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks, with pytest-benchmark's JSON saved for scripts/bench_report.py."""
    _install(session)
    os.makedirs("results", exist_ok=True)
    session.run(
        "pytest", "bench/", "-m", "not gpu", "--benchmark-only",
        "--benchmark-json=results/bench.json", *session.posargs,
    )
    session.run("python", "scripts/bench_report.py", "results/bench.json")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff>=0.17")
    session.run("ruff", "check", ".")


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests marked gpu and the CUDA benchmarks; skipped when no CUDA device is visible."""
    if shutil.which("nvidia-smi") is None:
        session.skip("no CUDA device is visible (nvidia-smi not found): GPU checks skipped")
    # A plain "torch" from the index is a CUDA build on Linux.
    session.install("torch>=2.13")
    session.install("-e", ".[dev]")
    visible = session.run(
        "python", "-c", "import torch; print(torch.cuda.is_available())", silent=True
    )
    if "True" not in str(visible):
        session.skip("torch sees no CUDA device: GPU checks skipped")
    session.run("pytest", "-m", "gpu", "-q", "-ra", "tests/", *session.posargs)
    # The CUDA benchmarks: article loop, Captum, eager, compiled, bf16, graph replay.
    os.makedirs("results", exist_ok=True)
    session.run(
        "pytest", "bench/test_titanic.py", "-m", "gpu", "--benchmark-only",
        "--benchmark-json=results/bench_gpu.json",
    )
    session.run("python", "scripts/bench_report.py", "results/bench_gpu.json")
