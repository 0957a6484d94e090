"""Sessions: tests, bench, lint, gpu. Each installs the project into its own venv."""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"

# torch goes in first, pinned, so that the project's "torch>=2.13" resolves to it: the CPU
# build where pip's configuration offers one (CI's machine), else the index's build (on
# Linux that is a CUDA build, which runs the CPU tests too).
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
    """scripts/gpu_check.sh: the tests marked gpu, the CUDA benchmarks and their report in
    results/; skipped when no CUDA device is visible."""
    reason = _no_cuda_device()
    if reason:
        session.skip(f"no CUDA device is visible ({reason}): GPU checks skipped")
    _install(session)
    # A GPU that torch cannot use (a CPU build, an old driver) fails the session.
    session.run("bash", "scripts/gpu_check.sh", "results", env={"PYTHON": "python"},
                external=True)


def _no_cuda_device() -> str:
    """Why no CUDA device is visible, before anything is installed; "" when one may be.

    The same tests as scripts/gpu_check.sh, which runs them again.
    """
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi cannot run: {error}"
    if listed.returncode != 0:
        return "nvidia-smi fails: no driver loaded?"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty, which hides every GPU"
    return ""
