"""python -m engine.attribute --all, end to end on the real data, and its failures."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from engine.attribute import main

EXPECTED_FILES = {
    "interpretation_results.csv",
    "convergence.csv",
    "validation.json",
    "classification_report.txt",
    "model.pt",
    "heatmap_mean-base.png",
    "heatmap_random-base.png",
    "heatmap_zero-base.png",
    "heatmap_one-base.png",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, titanic_csv):
    out = tmp_path_factory.mktemp("run") / "results"
    status = main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "3"])
    return status, out


def test_all_exits_zero_and_writes_every_file(finished_run):
    status, out = finished_run
    assert status == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_interpretation_table_has_one_row_per_passenger_baseline_feature(finished_run):
    _, out = finished_run
    table = pd.read_csv(out / "interpretation_results.csv")

    assert list(table.columns) == ["row", "passenger_id", "base-type", "feature", "value"]
    assert len(table) == 179 * 4 * 5
    assert set(table["base-type"]) == {"mean-base", "random-base", "zero-base", "one-base"}
    assert set(table["feature"]) == {"Pclass", "Sex", "Age", "SibSp", "Fare"}
    # The test rows are the last 179 passengers of Kaggle's file: ids 713..891.
    assert table["passenger_id"].min() == 713 and table["passenger_id"].max() == 891


def test_convergence_table_has_one_delta_per_passenger_and_baseline(finished_run):
    _, out = finished_run
    table = pd.read_csv(out / "convergence.csv")

    assert list(table.columns) == ["row", "passenger_id", "base-type", "delta"]
    assert len(table) == 179 * 4
    assert table["delta"].notna().all()


def test_validation_agrees_with_captum_in_float32(finished_run):
    _, out = finished_run
    validation = json.loads((out / "validation.json").read_text())

    assert validation["max_rel_error"] <= 1e-5
    assert (validation["n_rows"], validation["n_baselines"], validation["n_steps"]) == (179, 4, 50)
    assert validation["method"] == "gausslegendre"
    assert validation["engine_seconds"] > 0 and validation["captum_seconds"] > 0


def test_heatmaps_are_png_files(finished_run):
    _, out = finished_run
    for kind in ("mean", "random", "zero", "one"):
        assert (out / f"heatmap_{kind}-base.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_data_file_is_one_line_exit_two_and_no_files(tmp_path):
    out = tmp_path / "results"
    missing = tmp_path / "nowhere.csv"

    completed = subprocess.run(
        [sys.executable, "-m", "engine.attribute", "--all", "--data", str(missing),
         "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )

    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0]
    assert "Traceback" not in completed.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_all_there_is_nothing_to_do(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r")]) == 2
    assert "--all" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--n-steps", "1", "--method", "riemann_left"], "at least 2"),
        (["--method", "simpson"], "simpson"),
    ],
)
def test_bad_flags_exit_two_before_any_work(tmp_path, capsys, flags, message):
    status = main(["--all", "--out", str(tmp_path / "r"), *flags])

    assert status == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_file_as_out_is_refused(tmp_path, capsys, titanic_csv):
    out = tmp_path / "taken"
    out.write_text("keep me")

    assert main(["--all", "--data", str(titanic_csv), "--out", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"
