"""Same seed, same machine: two separate CLI runs write identical results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

TABLES = ("interpretation_results.csv", "convergence.csv", "classification_report.txt",
          "attribution_by_epoch.csv")
TIMINGS = ("engine_seconds", "captum_seconds", "speedup")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, titanic_csv):
    """Two fresh interpreters, same flags and seed, each writing its own folder."""
    folders = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name) / "results"
        completed = subprocess.run(
            [sys.executable, "-m", "engine.attribute", "--all", "--data", str(titanic_csv),
             "--out", str(out), "--epochs", "2", "--seed", "7"],
            capture_output=True, text=True, timeout=300, env=os.environ.copy(),
        )
        assert completed.returncode == 0, completed.stderr
        folders.append(out)
    return folders


@pytest.mark.parametrize("name", TABLES)
def test_tables_are_byte_identical(two_runs, name):
    first, second = two_runs

    assert (first / name).read_bytes() == (second / name).read_bytes()


def test_weights_are_equal(two_runs):
    first, second = (torch.load(out / "model.pt", weights_only=True) for out in two_runs)

    assert first["layer_order"] == second["layer_order"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name


def test_validation_report_is_equal_apart_from_timings(two_runs):
    first, second = (json.loads((out / "validation.json").read_text()) for out in two_runs)

    for report in (first, second):
        for key in TIMINGS:
            report.pop(key)
    assert first == second
    assert first["seed"] == 7


def test_pictures_have_identical_pixels(two_runs):
    first, second = two_runs
    names = sorted(p.name for p in first.iterdir() if p.suffix in (".png", ".gif"))

    assert names == sorted(p.name for p in second.iterdir() if p.suffix in (".png", ".gif"))
    assert "heatmap_mean-base.png" in names
    for name in names:
        pixels = [np.asarray(Image.open(out / name)) for out in two_runs]
        assert np.array_equal(*pixels), name


def test_another_seed_gives_other_weights(two_runs, tmp_path, titanic_csv):
    # The comparisons above could pass trivially if the seed did nothing.
    from engine.attribute import main

    out = tmp_path / "results"
    assert main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "2",
                 "--seed", "8"]) == 0

    seeded_7 = torch.load(two_runs[0] / "model.pt", weights_only=True)["state_dict"]
    seeded_8 = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(seeded_7["l1.weight"], seeded_8["l1.weight"])
    assert (out / "interpretation_results.csv").read_bytes() != (
        two_runs[0] / "interpretation_results.csv"
    ).read_bytes()
