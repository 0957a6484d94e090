"""python -m engine.attribute --all, end to end on the real data, and its failures."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from engine.attribute import all_run_files, main
from engine.baselines import BASELINE_KINDS
from engine.errors import ArgumentError
from tests.test_validate import one_pair_off

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
    "heatmap_baselines.png",
    "heatmap_by_epoch.gif",
    "attribution_by_epoch.csv",
    "passenger_comparison.png",
    "report.html",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, titanic_csv):
    out = tmp_path_factory.mktemp("run") / "results"
    status = main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "3"])
    return status, out


def test_all_exits_zero_and_writes_every_file(finished_run):
    status, out = finished_run
    assert status == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES | {".written"}
    # The names a run checks its input files against before any work.
    assert set(all_run_files(BASELINE_KINDS)) == EXPECTED_FILES


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


def early_cases(tmp_path, titanic_csv):
    """Command lines that end in one line before torch loads, by what they get wrong."""
    from engine.model import TitanicMLP, save_weights

    out = str(tmp_path / "results")
    checkpoint = save_weights(TitanicMLP(), tmp_path / "model.pt")
    missing = str(tmp_path / "nowhere.csv")
    data = str(titanic_csv)
    saved = ["--checkpoint", str(checkpoint), "--reference", data, "--out", out]
    taken = tmp_path / "taken"
    taken.write_text("a file where --out goes")
    return {
        "flag value": ["--all", "--epochs", "0", "--out", out],
        "baselines": ["--all", "--baselines", "mean,mean", "--data", missing, "--out", out],
        "data": ["--all", "--data", missing, "--out", out],
        # The run looks for --data before it checks --out, as the early check does.
        "data before out": ["--all", "--data", missing, "--out", str(taken)],
        "line break": ["--all", "--data", str(tmp_path / "a\nb.csv"), "--out", out],
        "checkpoint": ["--data", missing, "--checkpoint", missing, "--reference", missing,
                       "--out", str(taken)],
        "through a file": ["--data", data, "--checkpoint", f"{data}/model.pt", "--out", out],
        "flag of the other job": ["--data", data, *saved, "--epochs", "3"],
    }


def test_early_errors_are_the_runs_own_messages(tmp_path, titanic_csv, capsys):
    from engine.arguments import early_error

    for case, argv in early_cases(tmp_path, titanic_csv).items():
        message = early_error(argv)
        assert message is not None, case
        # The run itself, after the imports, ends with the same line.
        assert main(argv) == 2, case
        assert capsys.readouterr().err == f"error: {message}\n", case
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "taken"]


def test_early_errors_end_the_command_without_importing_torch(tmp_path, titanic_csv):
    # torch is made unimportable: any of these that reached the imports would fail there.
    script = ("import runpy, sys; sys.modules['torch'] = None; "
              "runpy.run_module('engine.attribute', run_name='__main__', alter_sys=True)")
    cases = early_cases(tmp_path, titanic_csv)
    for case in ("flag value", "data", "data before out", "checkpoint"):
        completed = subprocess.run(
            [sys.executable, "-c", script, *cases[case]], capture_output=True, text=True,
            cwd=tmp_path, timeout=120,
        )
        assert completed.returncode == 2, (case, completed.stderr)
        lines = completed.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, lines)
    helped = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and "--checkpoint PATH" in helped.stdout


def test_what_only_the_run_can_tell_is_left_to_it(tmp_path, titanic_csv):
    from engine.arguments import early_error
    from engine.model import TitanicMLP, save_weights

    data = str(titanic_csv)
    out = str(tmp_path / "results")
    missing = str(tmp_path / "nowhere.csv")
    checkpoint = str(save_weights(TitanicMLP(), tmp_path / "model.pt"))
    assert early_error(["--all", "--data", data, "--out", out]) is None
    # A folder as --data, a file that is not a checkpoint: named by the run, which reads them.
    assert early_error(["--all", "--data", str(tmp_path), "--out", out]) is None
    assert early_error(["--data", data, "--checkpoint", data, "--out", out]) is None
    # What a --checkpoint run reads after the checkpoint may fail first: the checkpoint
    # itself (here a CSV), --out, --reference.
    assert early_error(["--data", missing, "--checkpoint", data, "--out", out]) is None
    assert early_error(["--data", missing, "--checkpoint", checkpoint, "--out", out]) is None
    assert early_error(["--data", data, "--checkpoint", checkpoint, "--reference", missing,
                        "--out", out]) is None
    # --device cuda: the run looks for the GPU before it reads anything.
    assert early_error(["--all", "--data", missing, "--out", out, "--device", "cuda"]) is None
    # --debug shows the run's traceback, so nothing ends early.
    assert early_error(["--all", "--data", missing, "--out", out, "--debug"]) is None


def test_without_all_there_is_nothing_to_do(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r")]) == 2
    assert "--all" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--n-steps", "1", "--method", "riemann_left"], "at least 2"),
        (["--method", "simpson"], "simpson"),
        (["--snapshot-every", "0"], "--snapshot-every must be at least 1"),
        (["--format", "parquet"], "--format does not apply to --all"),
        (["--chunk-rows", "10"], "--chunk-rows does not apply to --all"),
        (["--devices", "2"], "--devices does not apply to --all"),
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


def test_attribution_by_epoch_covers_every_epoch_and_ends_at_the_final_table(finished_run):
    _, out = finished_run
    by_epoch = pd.read_csv(out / "attribution_by_epoch.csv")
    final = pd.read_csv(out / "interpretation_results.csv")

    assert list(by_epoch.columns) == ["epoch", "row", "passenger_id", "base-type", "feature",
                                      "value"]
    assert len(by_epoch) == (3 + 1) * 179 * 4 * 5
    assert sorted(by_epoch["epoch"].unique()) == [0, 1, 2, 3]
    keys = ["row", "base-type", "feature"]
    last = by_epoch[by_epoch["epoch"] == 3].merge(final, on=keys, suffixes=("_epoch", ""))
    assert len(last) == len(final)
    # Same weights, rows, baselines and rule: only float32 summation order may differ.
    assert (last["value_epoch"] - last["value"]).abs().max() <= 1e-6


def test_gif_has_a_frame_for_before_training_and_each_epoch(finished_run):
    from PIL import Image

    _, out = finished_run
    with Image.open(out / "heatmap_by_epoch.gif") as animation:
        assert animation.format == "GIF" and animation.n_frames == 3 + 1


def test_report_embeds_everything_it_shows(finished_run):
    from tests.test_report import references

    _, out = finished_run
    found = references((out / "report.html").read_text())
    assert found.loading_tags == []
    assert len(found.urls) == 7  # side by side, four heatmaps, the GIF, the passenger
    assert all(url.startswith(("data:image/png;base64,", "data:image/gif;base64,"))
               for url in found.urls)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--explain-row", "179"], "--explain-row 179: expected a test row from 0 to 178 "
                                   "(the last 20% of"),
        (["--explain-row", "179"], "holds 179 passengers)"),
        (["--flip", "Name"], "--flip Name: expected one of Pclass, Sex, Age, SibSp, Fare"),
    ],
)
def test_bad_passenger_flags_exit_two_before_training(tmp_path, capsys, titanic_csv, flags,
                                                      message):
    status = main(["--all", "--data", str(titanic_csv), "--out", str(tmp_path / "r"), *flags])

    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "training" not in err
    assert list(tmp_path.iterdir()) == []


def test_compiled_run_with_fewer_snapshots(tmp_path, titanic_csv, capsys):
    from PIL import Image

    out = tmp_path / "results"
    status = main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "5",
                   "--snapshot-every", "2", "--compile", "--n-steps", "8"])

    assert status == 0
    assert "compiled the engine's chunks in" in capsys.readouterr().err
    by_epoch = pd.read_csv(out / "attribution_by_epoch.csv")
    assert sorted(by_epoch["epoch"].unique()) == [0, 2, 4, 5]
    with Image.open(out / "heatmap_by_epoch.gif") as animation:
        assert animation.n_frames == 4
    assert "after epochs 2, 4, 5" in (out / "report.html").read_text()
    validation = json.loads((out / "validation.json").read_text())
    assert validation["max_rel_error"] <= 1e-5


def test_the_command_line_keeps_freed_memory(tmp_path, monkeypatch):
    import engine.attribute

    calls = []
    monkeypatch.setattr(engine.attribute, "keep_freed_memory", lambda: calls.append(1))
    assert main(["--out", str(tmp_path / "r")]) == 2
    assert calls == [1]


def test_the_timed_calls_see_trainings_objects_frozen_too(monkeypatch, tmp_path, titanic_csv):
    # A full collection over the objects training leaves behind cost about 0.1 s and landed
    # in the timed Captum call (200 -> 300 ms).
    import gc

    import engine.model
    import engine.validate

    seen = {}
    train = engine.model.train_titanic

    def trained(*args, **kwargs):
        model = train(*args, **kwargs)
        seen["after training"] = gc.get_freeze_count()
        return model

    def compare(*args, **kwargs):
        seen["at the timed calls"] = gc.get_freeze_count()
        raise ArgumentError("stopped once the timed calls were reached")

    import engine.attribute

    monkeypatch.setattr(engine.model, "train_titanic", trained)
    monkeypatch.setattr(engine.validate, "compare_with_captum", compare)

    status = main(["--all", "--data", str(titanic_csv), "--epochs", "1",
                   "--out", str(tmp_path / "r")])

    assert status == 2
    assert seen["at the timed calls"] > seen["after training"] + 1_000
    assert gc.get_freeze_count() == 0

    # Called on its own, the run unfreezes what it froze too.
    config = engine.attribute.job_config(engine.attribute.parse_args(
        ["--all", "--data", str(titanic_csv), "--epochs", "1", "--out", str(tmp_path / "s")]))
    with pytest.raises(ArgumentError):
        engine.attribute.run_all(config)
    assert gc.get_freeze_count() == 0


def test_a_callers_own_frozen_objects_stay_frozen(tmp_path):
    import gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert main(["--all", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()


def test_the_run_sees_the_imported_libraries_frozen_and_leaves_them_unfrozen(monkeypatch,
                                                                           tmp_path):
    # Full garbage-collector passes over the libraries' objects cost about 0.2 s each and
    # landed inside the timed Captum call; the run freezes them, and main() undoes it.
    import gc

    import engine.attribute

    frozen = []

    def run_all(config):
        frozen.append(gc.get_freeze_count())
        raise ArgumentError("stopped after the freeze was seen")

    monkeypatch.setattr(engine.attribute, "run_all", run_all)
    assert gc.get_freeze_count() == 0

    status = main(["--all", "--out", str(tmp_path / "r")])

    assert status == 2
    assert frozen and frozen[0] > 100_000
    assert gc.get_freeze_count() == 0


def test_the_default_baselines_in_their_order_with_long_names_pass_with_checkpoint():
    from engine.attribute import checkpoint_config, parse_args

    args = parse_args(["--data", "rows.csv", "--checkpoint", "model.pt", "--baselines",
                       "mean-base, random, zero-base, one"])

    assert "baselines" not in args.changed
    checkpoint_config(args)  # no UsageError


def test_the_compile_help_says_a_cpu_runs_the_titanic_job_slower(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit):
        main(["--help"])

    line, = [line for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("--compile")]
    assert "on a CPU the Titanic job's calls are then slower, not faster" in line
    assert "every call is faster" not in line


def test_a_one_row_file_is_counted_in_the_singular(tmp_path, monkeypatch, capsys, titanic_csv):
    import engine.validate
    from engine.errors import ArgumentError

    one_row = tmp_path / "one.csv"
    one_row.write_text("".join(titanic_csv.read_text().splitlines(keepends=True)[:2]))

    def stop(*args, **kwargs):
        raise ArgumentError("stopped once the job was described")

    monkeypatch.setattr(engine.validate, "compare_with_captum", stop)
    status = main(["--all", "--data", str(one_row), "--out", str(tmp_path / "r"),
                   "--epochs", "1", "--explain-row", "0", "--baselines", "zero",
                   "--n-steps", "1"])

    err = capsys.readouterr().err
    assert status == 2
    assert f"data: {one_row} (1 passenger, 1 train, 1 test)" in err
    assert "training 1 epoch on" in err
    assert "explaining 1 row x 1 baseline x 1 step in one batched pass" in err


def test_the_checkpoint_summary_counts_one_row_and_one_step_in_the_singular(capsys):
    from engine.attribute import print_checkpoint_summary

    print_checkpoint_summary({"is_global_zero": True, "n_rows": 1, "n_chunks": 1,
                              "reused": 0, "computed": 1, "seconds": 0.01,
                              "reference": "train.csv", "n_steps": 1, "world_size": 1,
                              "files": []})

    assert "explained 1 row x 4 baselines x 1 step in 1 process(es)" in capsys.readouterr().out


def test_the_checkpoint_summary_shows_a_rate_only_when_chunks_were_computed(capsys):
    from engine.attribute import print_checkpoint_summary

    summary = {"is_global_zero": True, "n_rows": 12, "n_chunks": 3, "reused": 3,
               "computed": 0, "seconds": 0.01, "reference": "train.csv", "n_steps": 50,
               "world_size": 1, "files": []}
    print_checkpoint_summary(summary)
    print_checkpoint_summary({**summary, "reused": 1, "computed": 2, "seconds": 0.5})

    reused, computed = [line for line in capsys.readouterr().out.splitlines()
                        if line.startswith("chunks:")]
    assert reused.endswith("0 computed in 0.01 s")
    assert computed.endswith("2 computed in 0.50 s (16 rows/s)")


def test_the_checkpoint_digest_is_of_the_bytes_loaded_not_of_a_file_swapped_in_after(
    tmp_path, monkeypatch, titanic_csv
):
    import engine.data
    import engine.distributed
    from engine.attribute import checkpoint_config, parse_args, run_checkpoint
    from engine.model import TitanicMLP, save_weights

    torch.manual_seed(0)
    loaded = save_weights(TitanicMLP(), tmp_path / "model.pt")
    loaded_bytes = loaded.read_bytes()
    torch.manual_seed(1)
    other = save_weights(TitanicMLP(), tmp_path / "other.pt")
    other_bytes = other.read_bytes()
    # Once the weights are loaded, the run looks for the reference: swap the file then.
    locate = engine.data.locate_titanic_csv

    def locate_then_swap(*args, **kwargs):
        os.replace(other, loaded)
        return locate(*args, **kwargs)

    seen = {}

    def explain_rows(job, net):
        seen["job"], seen["net"] = job, net
        return {}

    monkeypatch.setattr(engine.data, "locate_titanic_csv", locate_then_swap)
    monkeypatch.setattr(engine.distributed, "explain_rows", explain_rows)
    run_checkpoint(checkpoint_config(parse_args([
        "--data", str(titanic_csv), "--checkpoint", str(loaded),
        "--reference", str(titanic_csv), "--out", str(tmp_path / "results"),
    ])))

    assert loaded.read_bytes() == other_bytes  # the swap happened
    assert seen["job"].checkpoint_sha256 == hashlib.sha256(loaded_bytes).hexdigest()
    torch.manual_seed(0)
    for name, value in TitanicMLP().state_dict().items():
        torch.testing.assert_close(seen["net"].state_dict()[name], value, rtol=0, atol=0)


def run_with_float32_results(monkeypatch, out, titanic_csv, change, float64=None):
    """``--all`` (one epoch, 8 steps) with ``change`` applied to the engine's float32
    attributions; ``float64(result)`` sees (or replaces) each float64 call's result."""
    import engine.attribute

    exact = engine.attribute.integrated_gradients

    def changed(model, inputs, *args, **kwargs):
        result = exact(model, inputs, *args, **kwargs)
        if inputs.dtype == torch.float64:
            return result if float64 is None else float64(result)
        return (change(result[0]), *result[1:]) if isinstance(result, tuple) \
            else change(result)

    monkeypatch.setattr(engine.attribute, "integrated_gradients", changed)
    return main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "1",
                 "--n-steps", "8"])


def test_a_float32_result_off_at_a_kink_is_computed_again_in_float64(
    tmp_path, titanic_csv, monkeypatch, capsys
):
    # A path point within rounding of a kink can take the other slope in the engine's
    # float32 run (seen once on a valid file: 8e-5 from float64 Captum). Moving one
    # (baseline, row) pair of every float32 result by half of itself stands in for it.
    float64_results = []

    def seen(result):
        float64_results.append(result)
        return result

    out = tmp_path / "results"
    status = run_with_float32_results(monkeypatch, out, titanic_csv, one_pair_off, seen)

    assert status == 0
    printed = capsys.readouterr()
    assert "computed again in float64" in printed.err
    assert "attributions written: computed again in float64" in printed.out
    validation = json.loads((out / "validation.json").read_text())
    assert validation["engine_vs_float64"] > 1e-3 and validation["pairs_off"] == 1
    # Captum rounds its nodes and weights to float32; the engine keeps them in float64.
    assert validation["recomputed_vs_float64"] <= 1e-7
    (attributions, delta), = float64_results
    table = pd.read_csv(out / "interpretation_results.csv")
    assert np.allclose(table["value"].to_numpy(),
                       attributions.float().double().numpy().ravel(), rtol=0, atol=1e-7)
    deltas = pd.read_csv(out / "convergence.csv")
    assert np.allclose(deltas["delta"].to_numpy(), delta.numpy().ravel(), rtol=0, atol=1e-9)
    assert "computed again in float64" in (out / "report.html").read_text()


def test_a_float32_result_that_is_wrong_fails_and_is_not_computed_again(
    tmp_path, titanic_csv, monkeypatch, capsys
):
    def not_again(result):
        pytest.fail("computed again in float64")

    out = tmp_path / "results"
    status = run_with_float32_results(monkeypatch, out, titanic_csv, torch.neg, not_again)

    err = capsys.readouterr().err
    assert status == 1
    assert "engine and Captum disagree" in err and "engine 2.00e+00" in err
    assert "716 of 716 row-baseline pairs off, more than the 7 a kink's rounding explains" \
        in err
    assert not out.exists()


def test_a_failed_float64_recomputation_says_what_failed(tmp_path, titanic_csv, monkeypatch,
                                                        capsys):
    def failing(result):
        raise RuntimeError("out of memory")

    out = tmp_path / "results"
    status = run_with_float32_results(monkeypatch, out, titanic_csv, one_pair_off, failing)

    err = capsys.readouterr().err
    assert status == 1
    assert "error: computing the attributions again in float64" in err
    assert "RuntimeError: out of memory" in err
    assert not out.exists()


@pytest.mark.parametrize("seconds,median", [((0.4228, 0.2541), "338.5"),
                                            ((0.3, 0.1, 0.2), "200.0")])
def test_summary_gives_the_median_snapshot_time(capsys, seconds, median):
    from types import SimpleNamespace

    from engine.attribute import print_summary
    from engine.callbacks import EpochCost

    validation = SimpleNamespace(max_rel_error=1e-7, recomputed=False, engine_seconds=0.002,
                                 captum_seconds=0.3, speedup=150.0)
    print_summary({
        "validation": validation, "classification_report": "", "accuracy": 0.8,
        "top_features": {}, "max_abs_delta": 1e-3, "out": "results",
        "epoch_costs": [EpochCost(i, s, None if i == 0 else 0.01)
                        for i, s in enumerate(seconds)],
    })

    assert f"{len(seconds)} snapshots, median {median} ms each" in capsys.readouterr().out


def test_summary_shows_a_line_break_in_the_results_folder_escaped(capsys):
    from types import SimpleNamespace

    from engine.attribute import print_summary

    validation = SimpleNamespace(max_rel_error=1e-7, recomputed=False, engine_seconds=0.002,
                                 captum_seconds=0.3, speedup=150.0)
    print_summary({
        "validation": validation, "classification_report": "", "accuracy": 0.8,
        "top_features": {}, "max_abs_delta": 1e-3, "out": "odd\nname",
    })

    assert capsys.readouterr().out.splitlines()[-1] == "results in odd\\nname/ (open report.html)"


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes: Linux")
def test_paths_with_bytes_that_are_not_utf8_run_and_show_escaped(tmp_path, titanic_csv):
    data = tmp_path / os.fsdecode(b"train\xff.csv")
    data.write_bytes(titanic_csv.read_bytes())
    out = tmp_path / os.fsdecode(b"results\xfe")

    status = main(["--all", "--data", str(data), "--out", str(out), "--epochs", "1",
                   "--n-steps", "4"])

    assert status == 0
    assert "train\\xff.csv" in (out / "report.html").read_text()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_folder_named_as_a_result_file_is_refused_before_training(tmp_path, titanic_csv,
                                                                     monkeypatch, capsys):
    import engine.model

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing the folder")

    monkeypatch.setattr(engine.model, "train_titanic", no_training)
    out = tmp_path / "results"
    (out / "report.html").mkdir(parents=True)

    status = main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "1"])

    assert status == 2
    assert "report.html is a folder where a result file goes" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]
