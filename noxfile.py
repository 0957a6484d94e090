"""Sessions: tests, bench, lint, gpu. Each installs the project into its own venv."""

from __future__ import annotations

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
    session.run(
        "pytest", "bench/", "--benchmark-only", "--benchmark-json=results/bench.json",
        *session.posargs,
    )


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
    session.run("pytest", "-m", "gpu", "-q", "tests/", *session.posargs)
