"""Attribution over Lightning processes, and runs that survive being killed.

The multi-process runs go through the command line in a subprocess: Lightning's DDP
launcher starts its extra processes by running the same command again.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.attribute import main
from engine.baselines import BASELINE_KINDS, make_baselines
from engine.core import integrated_gradients
from engine.data import FEATURES, load_titanic, prepare_titanic
from engine.distributed import FeatureScaling, read_rows
from engine.errors import DataError
from engine.model import TitanicMLP, save_weights
from tests.stop_signals import default_stop_signals, stop_signals_as_started

N_ROWS = 2000
CHUNK_ROWS = 50
N_STEPS = 32
# float32 forward/backward: the same chunk on 1 or 2 threads may round differently.
ATOL = 1e-6


@pytest.fixture(scope="module")
def rows_csv(tmp_path_factory, titanic_csv):
    """N_ROWS passengers: Kaggle's rows repeated with fresh ids, without Survived."""
    frame = pd.read_csv(titanic_csv)
    repeats = -(-N_ROWS // len(frame))
    rows = pd.concat([frame] * repeats, ignore_index=True).iloc[:N_ROWS].copy()
    rows["PassengerId"] = np.arange(1, N_ROWS + 1)
    path = tmp_path_factory.mktemp("rows") / "passengers.csv"
    rows.drop(columns=["Survived"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(7)
    return save_weights(TitanicMLP(), tmp_path_factory.mktemp("model") / "model.pt")


def flags(rows_csv, checkpoint, titanic_csv, out, *extra):
    return ["--data", str(rows_csv), "--checkpoint", str(checkpoint), "--reference",
            str(titanic_csv), "--out", str(out), "--n-steps", str(N_STEPS),
            "--chunk-rows", str(CHUNK_ROWS), "--device", "cpu", *extra]


def cli(arguments, cwd, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "engine.attribute", *arguments], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_stop_signals, **kwargs,
    )


def finished(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout, stderr


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, rows_csv, checkpoint, titanic_csv):
    """An uninterrupted run in one process: the reference for the other runs."""
    out = tmp_path_factory.mktemp("one") / "results"
    finished(cli(flags(rows_csv, checkpoint, titanic_csv, out, "--devices", "1"), out.parent))
    return out


def test_training_file_is_scaled_exactly_as_for_training(titanic_csv):
    frame = load_titanic(titanic_csv)
    prepared = prepare_titanic(frame, source=titanic_csv)

    scaling = FeatureScaling.from_reference(frame)

    assert torch.equal(scaling.apply(frame), prepared.features)
    assert torch.equal(scaling.mean_baseline(), prepared.mean_baseline)


def test_a_new_file_gets_the_training_files_scaling_not_its_own(titanic_csv):
    frame = load_titanic(titanic_csv)
    scaling = FeatureScaling.from_reference(frame)
    richest = frame.nlargest(1, "Fare")

    # On its own a one-row file would scale every feature to 0; the training range keeps
    # the highest fare at 1 and the blanks filled with the training medians.
    features = scaling.apply(richest)
    assert features[0, FEATURES.index("Fare")] == 1.0


def test_rows_without_survived_are_read(rows_csv):
    frame = read_rows(rows_csv)

    assert len(frame) == N_ROWS and "Survived" not in frame.columns


def test_a_missing_feature_column_is_named(tmp_path, rows_csv):
    bad = tmp_path / "bad.csv"
    pd.read_csv(rows_csv).drop(columns=["Fare"]).to_csv(bad, index=False)

    with pytest.raises(DataError, match=r"bad.csv: missing required column\(s\) Fare;"):
        read_rows(bad)


@pytest.mark.parametrize("damage, message", [
    ("short record", r"row 3 \(line 4\) has \d fields, the header has 11"),
    ("long line", r"line 3 is 2,097,1\d\d bytes long, more than 1,048,576"),
    ("Age twice", r"column Age appears 2 times in the header"),
    ("blank Sex", r"column Sex, row 2 \(line 3\): blank"),
    ("blank Age", r"column Age has no values at all"),
    ("two-line name", r"column Age, row 4 \(line 6\): expected a number, got 'bad'"),
])
def test_the_rows_to_explain_are_read_as_strictly_as_the_training_file(
    tmp_path, titanic_csv, damage, message
):
    frame = pd.read_csv(titanic_csv).drop(columns=["Survived"]).head(5)
    if damage == "short record":
        frame.to_csv(tmp_path / "bad.csv", index=False)
        text = (tmp_path / "bad.csv").read_text().splitlines()
        text[3] = ",".join(text[3].split(",")[:4])
    elif damage == "long line":
        frame.loc[1, "Name"] = "x" * (2 << 20)
        frame.to_csv(tmp_path / "bad.csv", index=False)
        text = (tmp_path / "bad.csv").read_text().splitlines()
    elif damage == "Age twice":
        frame["Age2"] = 99
        frame.rename(columns={"Age2": "Age"}).to_csv(tmp_path / "bad.csv", index=False)
        text = (tmp_path / "bad.csv").read_text().splitlines()
    elif damage == "blank Sex":
        frame.loc[1, "Sex"] = None
        frame.to_csv(tmp_path / "bad.csv", index=False)
        text = (tmp_path / "bad.csv").read_text().splitlines()
    elif damage == "blank Age":
        frame["Age"] = np.nan
        frame.to_csv(tmp_path / "bad.csv", index=False)
        text = (tmp_path / "bad.csv").read_text().splitlines()
    else:
        frame["Age"] = frame["Age"].astype(object)
        frame.loc[1, "Name"] = "Cumings,\nMrs. John Bradley"
        frame.loc[3, "Age"] = "bad"
        frame.to_csv(tmp_path / "bad.csv", index=False)
        text = (tmp_path / "bad.csv").read_text().splitlines()
    (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")

    with pytest.raises(DataError, match=r"^\S*bad.csv: " + message):
        read_rows(tmp_path / "bad.csv")


def test_one_process_matches_the_engine_on_the_whole_table(
    one_process_run, rows_csv, checkpoint, titanic_csv
):
    from engine.model import load_weights

    scaling = FeatureScaling.from_reference(load_titanic(titanic_csv))
    inputs = scaling.apply(read_rows(rows_csv))
    baselines = make_baselines(BASELINE_KINDS, scaling.mean_baseline(), seed=404)
    expected, _ = integrated_gradients(
        load_weights(checkpoint), inputs, baselines, n_steps=N_STEPS,
        return_convergence_delta=True,
    )

    table = pd.read_csv(one_process_run / "interpretation_results.csv")
    assert list(table.columns) == ["row", "passenger_id", "base-type", "feature", "value"]
    values = table["value"].to_numpy().reshape(len(BASELINE_KINDS), N_ROWS, len(FEATURES))
    np.testing.assert_allclose(values, expected.double().numpy(), rtol=0, atol=ATOL)
    assert table["passenger_id"].iloc[: len(FEATURES) * 2].tolist() == [1] * 5 + [2] * 5


def test_two_ddp_processes_give_the_attributions_of_one(
    tmp_path, one_process_run, rows_csv, checkpoint, titanic_csv
):
    out = tmp_path / "results"
    stdout, _ = finished(cli(
        flags(rows_csv, checkpoint, titanic_csv, out, "--devices", "2", "--strategy", "ddp"),
        tmp_path,
    ))

    assert "in 2 process(es)" in stdout
    for name, column in (("interpretation_results", "value"), ("convergence", "delta")):
        one = pd.read_csv(one_process_run / f"{name}.csv")
        two = pd.read_csv(out / f"{name}.csv")
        pd.testing.assert_frame_equal(two.drop(columns=column), one.drop(columns=column))
        np.testing.assert_allclose(two[column], one[column], rtol=0, atol=ATOL)
    assert not (out / ".chunks").exists()


def test_more_processes_than_missing_chunks_still_finish(
    tmp_path, one_process_run, rows_csv, checkpoint, titanic_csv
):
    # One chunk holds every row: the second process has nothing to compute.
    out = tmp_path / "results"
    stdout, _ = finished(cli(
        flags(rows_csv, checkpoint, titanic_csv, out, "--devices", "2", "--strategy", "ddp",
              "--chunk-rows", str(2 * N_ROWS)),
        tmp_path,
    ))

    assert "in 2 process(es)" in stdout
    one = pd.read_csv(one_process_run / "interpretation_results.csv")
    two = pd.read_csv(out / "interpretation_results.csv")
    pd.testing.assert_frame_equal(two.drop(columns="value"), one.drop(columns="value"))
    np.testing.assert_allclose(two["value"], one["value"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM", "SIGHUP"])
def test_a_killed_run_resumes_without_recomputing_and_ends_identical(
    tmp_path, one_process_run, rows_csv, checkpoint, titanic_csv, stop
):
    out = tmp_path / "results"
    arguments = flags(rows_csv, checkpoint, titanic_csv, out, "--debug")
    n_chunks = N_ROWS // CHUNK_ROWS
    store = out / ".chunks"

    # Stop the run as soon as a few chunks are on disk: SIGKILL to the whole process
    # group, or SIGTERM to the process (a scheduler's warning, honoured between chunks).
    process = cli(arguments, tmp_path, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(store.glob("chunk-*.npz"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "no chunk was written in time"
        time.sleep(0.01)
    if stop == "SIGKILL":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(getattr(signal, stop))
    _, stderr = process.communicate(timeout=120)
    finished_before = {p.name for p in store.glob("chunk-*.npz")}

    if stop == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
    elif stop == "SIGHUP":
        # A closed terminal: the run stops at once, keeping its finished chunks and
        # leaving no half-written one behind.
        assert process.returncode == 128 + signal.SIGHUP, stderr
        assert stderr.strip().splitlines()[-1].startswith("interrupted: the chunks that had "
                                                          "finished, if any, are kept")
        assert not [p for p in store.iterdir() if not p.name.startswith(("chunk-", "manifest"))
                    or p.name.endswith(".tmp")]
    else:
        # An interrupted run, as for --all: 128 + SIGTERM and one "interrupted" line.
        assert process.returncode == 128 + signal.SIGTERM
        assert stderr.strip().splitlines()[-1].startswith("interrupted: stopped by SIGTERM")
        assert "run the same command again to resume" in stderr
    assert 3 <= len(finished_before) < n_chunks
    assert not (out / "interpretation_results.csv").exists()

    stdout, stderr = finished(cli(arguments, tmp_path))

    computed = {f"chunk-{int(i):06d}.npz" for i in re.findall(r"chunk (\d+) \(rows", stderr)}
    assert computed.isdisjoint(finished_before)
    assert computed | finished_before == {f"chunk-{i:06d}.npz" for i in range(n_chunks)}
    assert f"{len(finished_before)} reused from an earlier run" in stdout
    for name in ("interpretation_results.csv", "convergence.csv"):
        assert (out / name).read_bytes() == (one_process_run / name).read_bytes()


def test_a_run_that_fails_before_its_first_chunk_leaves_nothing(
    tmp_path, capsys, rows_csv, titanic_csv
):
    # Finite weights whose products overflow float32: every output is nan, so the first
    # chunk fails, after the store was set up and before anything is worth keeping.
    torch.manual_seed(7)
    net = TitanicMLP()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1e20)
    overflowing = save_weights(net, tmp_path / "model" / "overflowing.pt")
    out = tmp_path / "results"

    status = main(flags(rows_csv, overflowing, titanic_csv, out))

    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "non-finite outputs" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_first_chunk_that_cannot_be_written_leaves_nothing(
    tmp_path, capsys, monkeypatch, rows_csv, checkpoint, titanic_csv
):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine.store.np.savez", disk_full)
    out = tmp_path / "results"

    status = main(flags(rows_csv, checkpoint, titanic_csv, out))

    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "No space left" in err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_weights(
    tmp_path, capsys, rows_csv, titanic_csv
):
    torch.manual_seed(7)
    net = TitanicMLP()
    with torch.no_grad():
        net.l1.weight[0, 0] = float("nan")
    diverged = save_weights(net, tmp_path / "model" / "diverged.pt")
    out = tmp_path / "results"

    status = main(flags(rows_csv, diverged, titanic_csv, out))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "diverged.pt" in err and "parameter l1.weight: 1 of 640 values" in err
    assert "row(s)" not in err
    assert not out.exists()


def test_an_implausible_fare_to_explain_is_refused_before_any_work(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    # Scaled by the training file's range, 1e308 was inf in float32: the model's outputs
    # went non-finite and the error blamed the row's path.
    rows = pd.read_csv(rows_csv).iloc[:20]
    rows.loc[4, "Fare"] = 1e308
    bad = tmp_path / "bad.csv"
    rows.to_csv(bad, index=False)

    status = main(flags(bad, checkpoint, titanic_csv, tmp_path / "results"))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "bad.csv: column Fare, row 5 (line 6): expected at most 10,000, got 1e+308" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def _narrow_fare_reference(tmp_path, titanic_csv):
    """The training file with every Fare 0 but one of 1e-300: a range that scales any
    real fare past float32."""
    reference = pd.read_csv(titanic_csv)
    reference["Fare"] = 0.0
    reference.loc[0, "Fare"] = 1e-300
    narrow = tmp_path / "narrow.csv"
    reference.to_csv(narrow, index=False)
    return narrow


def test_a_value_the_reference_range_scales_past_float32_is_refused(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    narrow = _narrow_fare_reference(tmp_path, titanic_csv)
    out = tmp_path / "results"

    arguments = flags(rows_csv, checkpoint, titanic_csv, out)
    arguments[arguments.index("--reference") + 1] = str(narrow)
    status = main(arguments)

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert f"{rows_csv.name}: column Fare, row 1 (line 2): 7.25 scales to inf" in err
    assert "range 0 to 1e-300" in err
    assert not out.exists()


def test_a_value_scaled_past_float32_names_the_lines_of_its_record(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    narrow = _narrow_fare_reference(tmp_path, titanic_csv)
    rows = pd.read_csv(rows_csv).iloc[:5]
    rows.loc[0, "Name"] = "Braund,\nMr. Owen Harris"
    two_line = tmp_path / "two_line.csv"
    rows.to_csv(two_line, index=False)

    status = main(flags(two_line, checkpoint, narrow, tmp_path / "results"))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "two_line.csv: column Fare, row 1 (lines 2-3): 7.25 scales to inf" in err


def test_a_reference_without_spread_in_a_column_the_rows_vary_in_is_refused(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    one = tmp_path / "one.csv"
    one.write_text("\n".join(titanic_csv.read_text().splitlines()[:2]) + "\n")  # Braund
    out = tmp_path / "results"

    status = main(flags(rows_csv, checkpoint, one, out))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"column Pclass, row \d+ \(line \d+\): 1, but every row of the "
                     r"reference has Pclass 3(\.0)?: .*pass the model's training file", err), err
    assert not out.exists()


def test_a_constant_reference_column_the_rows_share_scales_to_zero_as_in_training():
    frame = pd.DataFrame({"PassengerId": [1, 2], "Pclass": [3.0, 3.0], "Sex": ["male", "female"],
                          "Age": [20.0, 30.0], "SibSp": [0.0, 1.0], "Fare": [7.0, 9.0]})
    scaling = FeatureScaling.from_reference(frame)

    from engine.distributed import _check_scaled

    features = scaling.apply(frame)
    _check_scaled(features, frame, scaling, "rows.csv")
    assert features[:, FEATURES.index("Pclass")].tolist() == [0.0, 0.0]


def test_a_changed_config_refuses_the_old_chunks_with_exit_two(
    tmp_path, monkeypatch, capsys, rows_csv, checkpoint, titanic_csv
):
    small = tmp_path / "small.csv"
    pd.read_csv(rows_csv).iloc[:300].to_csv(small, index=False)
    out = tmp_path / "results"
    # Keep the finished chunks as a killed run would have left them.
    monkeypatch.setattr("engine.store.ChunkStore.remove", lambda store: None)
    assert main(flags(small, checkpoint, titanic_csv, out, "--n-steps", "8")) == 0
    written = (out / "convergence.csv").read_bytes()
    capsys.readouterr()

    status = main(flags(small, checkpoint, titanic_csv, out, "--n-steps", "16"))

    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert "another job (n_steps: 8 then, 16 now)" in err and ".chunks" in err
    assert (out / "convergence.csv").read_bytes() == written


def test_parquet_output_holds_the_csv_rows(tmp_path, rows_csv, checkpoint, titanic_csv):
    small = tmp_path / "small.csv"
    pd.read_csv(rows_csv).iloc[:120].to_csv(small, index=False)

    assert main(flags(small, checkpoint, titanic_csv, tmp_path / "csv")) == 0
    assert main(flags(small, checkpoint, titanic_csv, tmp_path / "pq", "--format", "parquet")) == 0

    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [
        ".written", "convergence.parquet", "interpretation_results.parquet",
    ]
    for name in ("interpretation_results", "convergence"):
        table = pd.read_parquet(tmp_path / "pq" / f"{name}.parquet")
        expected = pd.read_csv(tmp_path / "csv" / f"{name}.csv")
        pd.testing.assert_frame_equal(table, expected, check_dtype=False, rtol=0, atol=0)


def test_the_default_baselines_spelled_out_are_not_refused_with_checkpoint():
    from engine.attribute import checkpoint_config, parse_args

    args = parse_args(["--data", "rows.csv", "--checkpoint", "model.pt", "--baselines",
                       "mean-base, random,zero-base ,one"])

    assert "baselines" not in args.changed
    checkpoint_config(args)  # no UsageError


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--all"], "--all and --checkpoint"),
        (["--devices", "0"], "--devices must be at least 1"),
        (["--chunk-rows", "0"], "--chunk-rows must be at least 1"),
        (["--layer-order", "conventional"], "--layer-order does not apply"),
        (["--epochs", "3"], "--epochs does not apply to --checkpoint"),
        (["--baselines", "zero"], "--baselines does not apply to --checkpoint: it explains "
                                  "against all four baselines, in the order mean,random,zero,one"),
        # The default kinds in another order: a --checkpoint run writes its own order.
        (["--baselines", "one,zero,random,mean"], "--baselines does not apply to --checkpoint"),
        (["--explain-row", "2"], "--explain-row does not apply to --checkpoint"),
        (["--compile"], "--compile does not apply to --checkpoint"),
    ],
)
def test_bad_checkpoint_flags_exit_two_before_any_work(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv, extra, message
):
    status = main(flags(rows_csv, checkpoint, titanic_csv, tmp_path / "results", *extra))

    assert status == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under a file", "missing parents"])
def test_an_out_folder_that_cannot_be_made_exits_two_before_any_work(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv, where
):
    # The same checks as --all: the parent must exist and be a folder.
    (tmp_path / "one.csv").write_text("a\n1\n")
    out = tmp_path / ("one.csv/x" if where == "under a file" else "nope/deeper/x")

    status = main(flags(rows_csv, checkpoint, titanic_csv, out))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --out {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv"]


def test_explaining_into_the_folder_of_an_all_run_is_refused_removing_nothing(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    from engine.io import OutputDir

    folder = tmp_path / "results"
    with OutputDir(folder, "all") as outputs:
        outputs.file("model.pt").write_bytes(checkpoint.read_bytes())
        outputs.write_text("report.html", "<html></html>")
        outputs.commit()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    status = main(flags(rows_csv, folder / "model.pt", titanic_csv, folder))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "holds the results of a --all run" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_a_column_with_no_values_to_explain_is_refused_not_filled(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    # Every Age would become the reference's median: attributions of made-up ages.
    rows = pd.read_csv(rows_csv).iloc[:20]
    rows["Age"] = np.nan
    no_age = tmp_path / "no_age.csv"
    rows.to_csv(no_age, index=False)
    out = tmp_path / "results"

    status = main(flags(no_age, checkpoint, titanic_csv, out))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"{no_age}: column Age has no values at all" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--data", "--reference"])
def test_a_named_pipe_to_explain_or_to_scale_by_is_refused(
    tmp_path, capsys, named_pipe, rows_csv, checkpoint, titanic_csv, flag
):
    out = tmp_path / "results"
    arguments = flags(rows_csv, checkpoint, titanic_csv, out)
    arguments[arguments.index(flag) + 1] = str(named_pipe)

    status = main(arguments)

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"{named_pipe}: is a named pipe, expected a CSV file" in err
    assert not out.exists()


def test_a_missing_checkpoint_is_one_line_exit_two(tmp_path, capsys, rows_csv, titanic_csv):
    missing = tmp_path / "nowhere.pt"

    status = main(flags(rows_csv, missing, titanic_csv, tmp_path / "results"))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and str(missing) in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_agrees_with_the_cpu_run(tmp_path, rows_csv, checkpoint, titanic_csv):
    small = tmp_path / "small.csv"
    pd.read_csv(rows_csv).iloc[:120].to_csv(small, index=False)
    arguments = flags(small, checkpoint, titanic_csv, tmp_path / "cpu")

    assert main(arguments) == 0
    arguments[arguments.index("--device") + 1] = "cuda"
    arguments[arguments.index("--out") + 1] = str(tmp_path / "cuda")
    assert main(arguments) == 0

    cpu = pd.read_csv(tmp_path / "cpu" / "interpretation_results.csv")
    cuda = pd.read_csv(tmp_path / "cuda" / "interpretation_results.csv")
    # TF32 is off by default for matmuls; float32 kernels differ in summation order only.
    np.testing.assert_allclose(cuda["value"], cpu["value"], rtol=0, atol=1e-5)


def test_a_strategy_lightning_does_not_know_is_one_line_exit_two(tmp_path, checkpoint,
                                                                 titanic_csv):
    completed = subprocess.run(
        [sys.executable, "-m", "engine.attribute", "--data", str(titanic_csv),
         "--checkpoint", str(checkpoint), "--strategy", "bogus",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )

    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "'bogus'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_reference_is_named_by_its_flag(tmp_path, capsys, monkeypatch, rows_csv,
                                                  checkpoint):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.chdir(tmp_path)  # no data/train.csv here
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    arguments = ["--data", str(rows_csv), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "results")]

    status = main(arguments)

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "pass --reference PATH" in err and "--data" not in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("local_rank", [None, "0", "1"])
def test_a_stopped_ddp_run_says_interrupted_once_per_machine(
    tmp_path, capsys, monkeypatch, rows_csv, checkpoint, titanic_csv, local_rank
):
    from engine.distributed import StoppedBySignal

    def stopped(config):
        raise StoppedBySignal("stopped by SIGTERM; 3 finished chunk(s) are kept")

    monkeypatch.setattr("engine.attribute.run_checkpoint", stopped)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)

    status = main(flags(rows_csv, checkpoint, titanic_csv, tmp_path / "results"))

    err = capsys.readouterr().err
    assert status == 128 + signal.SIGTERM
    if local_rank == "1":
        assert err == ""  # the first process of the machine says it
    else:
        assert err == "interrupted: stopped by SIGTERM; 3 finished chunk(s) are kept\n"


def test_a_second_run_into_an_out_in_use_is_one_line_exit_two(
    tmp_path, capsys, rows_csv, checkpoint, titanic_csv
):
    from tests.test_store import holding

    with holding(tmp_path / ".results.lock"):
        status = main(flags(rows_csv, checkpoint, titanic_csv, tmp_path / "results"))

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "is in use by another run (process 4242 on otherhost" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.lock"]


@pytest.mark.parametrize("chunks", [False, True], ids=["new folder", "chunks being written"])
def test_an_all_run_takes_the_same_lock_and_is_told_the_folder_is_in_use(
    tmp_path, capsys, titanic_csv, chunks
):
    from tests.test_store import holding

    if chunks:  # what a running --checkpoint run has made by now
        (tmp_path / "results" / ".chunks").mkdir(parents=True)
    with holding(tmp_path / ".results.lock"):
        status = main(["--all", "--data", str(titanic_csv), "--out", str(tmp_path / "results"),
                       "--epochs", "1"])

    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "is in use by another run" in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.lock"] + (
        ["results"] if chunks else [])


def _sigterm_to_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_while_the_tables_are_written_stops_at_once_keeping_the_chunks(
    tmp_path, capsys, monkeypatch, rows_csv, checkpoint, titanic_csv
):
    # Every chunk has finished: the stop drops the staged tables, keeps the chunks for a
    # rerun and leaves nothing beside --out (before, nothing handled SIGTERM here and it
    # ended the process without a word, leaving the staging folder and the lock).
    import engine.io

    out = tmp_path / "results"
    real = engine.io.OutputDir.file

    def file_then_sigterm(self, name):
        _sigterm_to_self()
        return real(self, name)

    monkeypatch.setattr(engine.io.OutputDir, "file", file_then_sigterm)
    status = main(flags(rows_csv, checkpoint, titanic_csv, out, "--chunk-rows", "1000"))

    err = capsys.readouterr().err
    assert status == 128 + signal.SIGTERM
    assert err.strip().splitlines() == [
        "interrupted: the chunks that had finished, if any, are kept; run the same command "
        "again to resume"]
    assert sorted(p.name for p in (out / ".chunks").glob("chunk-*.npz")) == [
        "chunk-000000.npz", "chunk-000001.npz"]
    assert sorted(p.name for p in out.iterdir()) == [".chunks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (rows_csv.parent, checkpoint.parent, titanic_csv.parent, out)
        if p.parent == tmp_path)


def test_a_sigterm_during_the_last_chunk_stops_once_it_is_kept(
    tmp_path, capsys, monkeypatch, rows_csv, checkpoint, titanic_csv
):
    # No chunk follows to stop before: the run stops once predict returns.
    import engine.distributed

    out = tmp_path / "results"
    real = engine.distributed.integrated_gradients
    calls = []

    def last_chunk_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _sigterm_to_self()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.distributed, "integrated_gradients", last_chunk_sigterm)
    status = main(flags(rows_csv, checkpoint, titanic_csv, out, "--chunk-rows", "1000"))

    err = capsys.readouterr().err
    assert status == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1].startswith(
        "interrupted: stopped by SIGTERM; 2 finished chunk(s) are kept")
    assert len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == [".chunks"]


def test_a_sigterm_while_the_chunks_are_removed_waits_then_says_the_results_are_complete(
    tmp_path, capsys, monkeypatch, rows_csv, checkpoint, titanic_csv
):
    # The tables are in place: stopping halfway through removing the chunk folder would
    # leave part of it, which a rerun recomputes and an --all run refuses. The stop is
    # acted on once the folder is gone (it was dropped, and the run exited 0).
    from engine.store import ChunkStore

    out = tmp_path / "results"
    real = ChunkStore.remove

    def remove_after_sigterm(self):
        _sigterm_to_self()
        return real(self)

    monkeypatch.setattr(ChunkStore, "remove", remove_after_sigterm)
    status = main(flags(rows_csv, checkpoint, titanic_csv, out, "--chunk-rows", "1000"))

    err = capsys.readouterr().err
    assert status == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == f"interrupted: the results in {out} are complete"
    assert sorted(p.name for p in out.iterdir()) == [
        ".written", "convergence.csv", "interpretation_results.csv"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_while_the_tables_are_moved_into_place_waits_for_the_chunks_to_go(
    tmp_path, capsys, monkeypatch, rows_csv, checkpoint, titanic_csv, sig
):
    # The stop was delivered once the tables were in place, before the chunk folder went:
    # "complete" beside a whole .chunks folder, which an --all run refuses.
    from engine import io

    out = tmp_path / "results"
    real_replace = io.os.replace

    def replace_then_stop(source, target):
        real_replace(source, target)
        if Path(target).parent == out and not (out / ".written").exists():
            signal.raise_signal(sig)

    monkeypatch.setattr(io.os, "replace", replace_then_stop)
    # The signals as an interactive shell starts a command, also under nohup or `&`.
    with stop_signals_as_started():
        status = main(flags(rows_csv, checkpoint, titanic_csv, out, "--chunk-rows", "1000"))

    err = capsys.readouterr().err
    assert status == 128 + sig, err
    assert err.strip().splitlines() == [f"interrupted: the results in {out} are complete"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".written", "convergence.csv", "interpretation_results.csv"]


def test_the_data_digest_is_of_the_bytes_read_not_of_a_file_swapped_in_after(
    tmp_path, monkeypatch, rows_csv, checkpoint, titanic_csv
):
    import hashlib

    import engine.distributed

    data = tmp_path / "rows.csv"
    data.write_bytes(rows_csv.read_bytes())
    read_bytes = data.read_bytes()
    read = engine.distributed.read_csv_table

    def read_then_swap(path, **kwargs):
        table = read(path, **kwargs)
        data.write_bytes(titanic_csv.read_bytes())
        return table

    seen = {}

    class Stop(Exception):
        pass

    def store(path, config, *args, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(engine.distributed, "read_csv_table", read_then_swap)
    monkeypatch.setattr(engine.distributed, "ChunkStore", store)
    with pytest.raises(Stop):
        engine.distributed.explain_rows(
            engine.distributed.AttributionJob(
                data=data, out=tmp_path / "results", n_steps=8, method="gausslegendre",
                seed=404, scaling=FeatureScaling.from_reference(load_titanic(titanic_csv)),
                checkpoint_sha256="0" * 64, accelerator="cpu"),
            TitanicMLP())

    assert data.read_bytes() == titanic_csv.read_bytes()  # the swap happened
    assert seen["config"]["data_sha256"] == hashlib.sha256(read_bytes).hexdigest()
