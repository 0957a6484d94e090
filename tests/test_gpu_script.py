"""scripts/gpu_check.sh on a machine without a usable GPU: it says why and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def run(tmp_path: Path, nvidia_smi: str | None, **env: str) -> subprocess.CompletedProcess:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        fake = tools / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    # Only the fake tool and the basics: no real nvidia-smi can be found.
    path = f"{tools}:/usr/bin:/bin"
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "results")], capture_output=True, text=True,
        env={"PATH": path, "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/"),
             **env},
        timeout=120,
    )


def test_no_nvidia_smi_is_a_skip_that_writes_nothing(tmp_path):
    done = run(tmp_path, None)

    assert done.returncode == 0
    assert "GPU checks skipped" in done.stdout and not (tmp_path / "results").exists()


@pytest.mark.parametrize(("tool", "env", "said"), [
    ("exit 9", {}, "nvidia-smi fails"),
    ("exit 0", {"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES is empty"),
])
def test_a_gpu_that_cannot_be_reached_is_a_skip_naming_why(tmp_path, tool, env, said):
    done = run(tmp_path, tool, **env)

    assert done.returncode == 0 and said in done.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch here can use a GPU")
def test_a_gpu_torch_cannot_use_is_an_error(tmp_path):
    done = run(tmp_path, "exit 0")

    assert done.returncode == 1
    assert "nvidia-smi sees a GPU but torch" in done.stderr and "cannot use it" in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("tool", "env", "said"), [
    (None, {}, "nvidia-smi not found"),
    ("exit 9", {}, "nvidia-smi fails"),
    ("exit 0", {"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES is empty"),
    ("exit 0", {}, ""),
    (b"\x7fELF-not-a-program", {}, "nvidia-smi cannot run"),
], ids=["no-tool", "tool-fails", "devices-hidden", "a-device", "tool-cannot-run"])
def test_nox_gpu_skips_before_installing_anything_where_the_script_would(
    tmp_path, monkeypatch, tool, env, said
):
    pytest.importorskip("nox")
    import importlib.util

    spec = importlib.util.spec_from_file_location("noxfile", SCRIPT.parent.parent / "noxfile.py")
    noxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noxfile)
    tools = tmp_path / "bin"
    tools.mkdir()
    if tool is not None:
        fake = tools / "nvidia-smi"
        if isinstance(tool, bytes):
            fake.write_bytes(tool)  # executable, but no program the kernel can run
        else:
            fake.write_text(f"#!/bin/sh\n{tool}\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))  # no real nvidia-smi, on any machine
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    reason = noxfile._no_cuda_device()

    assert (said in reason) if said else reason == ""
