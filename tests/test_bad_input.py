"""Every user mistake the CLI can meet: one line naming it, status 2, nothing written.

Each test feeds one bad thing to ``python -m engine.attribute --all`` (in-process through
``main`` where that is enough, as a subprocess where the interpreter's own output matters)
and checks the whole contract: the exit status, exactly one line on stderr that names the
problem, no traceback, and no results folder or staging leftovers beside it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from engine.attribute import main
from engine.data import MAX_LINE_BYTES, MAX_SHOWN_CHARS, load_titanic
from engine.errors import ArgumentError, CheckpointError, DataError
from engine.model import CHECKPOINT_FORMAT, TitanicMLP, load_weights, save_weights

HEADER = "PassengerId,Survived,Pclass,Name,Sex,Age,SibSp,Parch,Ticket,Fare,Cabin,Embarked"
ROWS = (
    '1,0,3,"Braund, Mr. Owen Harris",male,22,1,0,A/5 21171,7.25,,S',
    '2,1,1,"Cumings, Mrs. John Bradley",female,38,1,0,PC 17599,71.2833,C85,C',
    '3,1,3,"Heikkinen, Miss. Laina",female,26,0,0,STON/O2. 3101282,7.925,,S',
)


def with_field(row: str, column: str, value: str) -> str:
    """Replace one field of a row; the quoted Name holds one comma."""
    fields = row.split(",")
    index = HEADER.split(",").index(column)
    index += index > HEADER.split(",").index("Name")
    fields[index] = value
    return ",".join(fields)


def csv_text(*rows: str, header: str = HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def assert_refused(status: int, stderr: str, folder: Path, *names: str, code: int = 2) -> None:
    """The CLI's contract for a refused job, checked in full."""
    lines = stderr.strip().splitlines()
    assert status == code, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    assert not (folder / "results").exists()
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]


def run_main(capsys: pytest.CaptureFixture, *flags: str) -> tuple[int, str]:
    status = main(["--all", *flags])
    return status, capsys.readouterr().err


def explain_in_subprocess(
    folder: Path, checkpoint: Path, data: Path
) -> subprocess.CompletedProcess:
    """``--checkpoint`` from a shell: what torch warns while loading reaches stderr here."""
    return subprocess.run(
        [sys.executable, "-m", "engine.attribute", "--data", str(data), "--checkpoint",
         str(checkpoint), "--reference", str(data), "--out", str(folder / "results"),
         "--device", "cpu"],
        capture_output=True, text=True, cwd=folder, timeout=120, env=os.environ.copy(),
    )


def run_subprocess(folder: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.attribute", "--all", *flags],
        capture_output=True, text=True, cwd=folder, timeout=120, env=os.environ.copy(),
    )


# ---------------------------------------------------------------------------
# Data files, each refused before any training


def _folder(tmp: Path) -> Path:
    return tmp


def _empty(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(b"")
    return tmp / "bad.csv"


def _header_only(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text())
    return tmp / "bad.csv"


def _missing_columns(tmp: Path) -> Path:
    header = HEADER.replace(",Age", "").replace(",Fare", "")
    rows = [with_field(with_field(r, "Age", "DROP"), "Fare", "DROP") for r in ROWS]
    rows = [r.replace(",DROP", "") for r in rows]
    (tmp / "bad.csv").write_bytes(csv_text(*rows, header=header))
    return tmp / "bad.csv"


def _text_in_number(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(ROWS[0], with_field(ROWS[1], "Fare", "cheap"), ROWS[2]))
    return tmp / "bad.csv"


def _unknown_sex(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(ROWS[0], ROWS[1], with_field(ROWS[2], "Sex", "M")))
    return tmp / "bad.csv"


def _all_missing(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(*(with_field(r, "SibSp", "") for r in ROWS)))
    return tmp / "bad.csv"


def _infinite(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(ROWS[0], with_field(ROWS[1], "Age", "-inf"), ROWS[2]))
    return tmp / "bad.csv"


def _implausible_fare(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(ROWS[0], ROWS[1], with_field(ROWS[2], "Fare", "1e308")))
    return tmp / "bad.csv"


def _not_utf8(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(*ROWS).replace(b"Laina", b"La\xefna"))
    return tmp / "bad.csv"


def _semicolons(tmp: Path) -> Path:
    (tmp / "bad.csv").write_bytes(csv_text(*ROWS).replace(b",", b";").replace(b"; ", b", "))
    return tmp / "bad.csv"


def _gzipped(tmp: Path) -> Path:
    import gzip

    (tmp / "bad.csv.gz").write_bytes(gzip.compress(csv_text(*ROWS)))
    return tmp / "bad.csv.gz"


def _blank_beside_an_integer_beyond_int64(blank: str):
    """Whole numbers, one past int64, then a fraction: read_csv gives up on the column and
    keeps row 1's blank Age (``blank``) as text."""

    def make(tmp: Path) -> Path:
        fraction = with_field(with_field(ROWS[1], "PassengerId", "4"), "Age", "28.5")
        rows = (with_field(ROWS[0], "Age", blank), ROWS[1],
                with_field(ROWS[2], "Age", "9" * 20), fraction)
        (tmp / "bad.csv").write_bytes(csv_text(*rows))
        return tmp / "bad.csv"

    return make


def _passenger_id(row: int, value: int):
    """Row ``row`` (0-based) of the three gets PassengerId ``value``."""

    def make(tmp: Path) -> Path:
        rows = list(ROWS)
        rows[row] = with_field(rows[row], "PassengerId", str(value))
        (tmp / "bad.csv").write_bytes(csv_text(*rows))
        return tmp / "bad.csv"

    return make


def _open_quote(tmp: Path) -> Path:
    """Row 2's Name opens a quote nothing closes: the rest of the file would be its name."""
    unquoted = ROWS[2].replace('"Heikkinen, Miss. Laina"', "Heikkinen Miss. Laina")
    (tmp / "bad.csv").write_bytes(csv_text(ROWS[0], ROWS[1].replace('Bradley"', "Bradley"),
                                           unquoted))
    return tmp / "bad.csv"


def _huge_line(tmp: Path) -> Path:
    huge = with_field(ROWS[1], "Ticket", "x" * (MAX_LINE_BYTES + 1))
    (tmp / "bad.csv").write_bytes(csv_text(ROWS[0], huge, ROWS[2]))
    return tmp / "bad.csv"


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda tmp: tmp / "absent.csv", ["absent.csv", "no such file"]),
        (_folder, ["directory"]),
        (_empty, ["bad.csv", "empty"]),
        (_header_only, ["bad.csv", "no data rows"]),
        (_missing_columns, ["bad.csv", "Age", "Fare"]),
        (_text_in_number, ["Fare", "row 2", "'cheap'"]),
        (_unknown_sex, ["Sex", "row 3", "'M'"]),
        (_all_missing, ["SibSp", "no values"]),
        (_infinite, ["Age", "row 2", "inf"]),
        (_implausible_fare, ["bad.csv", "Fare", "row 3", "1e+308"]),
        (_not_utf8, ["UTF-8", "line 4"]),
        (_semicolons,
         ["bad.csv: seems to be separated by semicolons, not commas", "comma-separated"]),
        (_gzipped, ["bad.csv.gz", "gzip-compressed", "decompress it first"]),
        (_huge_line, ["line 3", "bytes long"]),
        (_open_quote, ["bad.csv", "starts on line 3 is never closed"]),
        (_blank_beside_an_integer_beyond_int64(""), ["Age", "row 3", "at most 150", "1e+20"]),
        (_passenger_id(1, 2**60), ["PassengerId", "row 2", "below 2**53"]),
        # 2**53 + 1 reads as 2**53 in float64.
        (_passenger_id(2, 2**53 + 1), ["PassengerId", "row 3", "below 2**53"]),
        (_blank_beside_an_integer_beyond_int64("NA"),
         ["Age", "row 3", "at most 150", "1e+20"]),
    ],
    ids=["missing", "directory", "empty", "header-only", "missing-columns", "text-in-number",
         "unknown-sex", "all-missing-column", "inf", "implausible-fare", "not-utf8",
         "semicolons", "gzipped", "huge-line", "open-quote", "integer-beyond-int64",
         "id-beyond-exact", "id-rounding-to-2**53", "na-beside-integer-beyond-int64"],
)
def test_bad_data_file_is_one_line_exit_two_and_no_files(tmp_path, capsys, make, names):
    data = make(tmp_path)

    status, err = run_main(capsys, "--data", str(data), "--out", str(tmp_path / "results"))

    assert_refused(status, err, tmp_path, *names)


@pytest.mark.skipif(not Path("/dev/zero").is_char_device(), reason="needs /dev/zero")
def test_a_device_as_data_is_refused_instead_of_read_forever(tmp_path, capsys):
    status, err = run_main(capsys, "--data", "/dev/zero", "--out", str(tmp_path / "results"))

    assert_refused(status, err, tmp_path, "/dev/zero", "device")


def test_a_named_pipe_as_data_is_refused_instead_of_waited_on(tmp_path, capsys, named_pipe):
    status, err = run_main(capsys, "--data", str(named_pipe), "--out", str(tmp_path / "results"))

    assert_refused(status, err, tmp_path, f"{named_pipe}: is a named pipe, expected a CSV file")


def test_huge_line_message_stays_short(tmp_path):
    huge = with_field(ROWS[1], "Ticket", "x" * (MAX_LINE_BYTES + 1))
    (tmp_path / "t.csv").write_bytes(csv_text(ROWS[0], huge, ROWS[2]))

    with pytest.raises(DataError) as err:
        load_titanic(tmp_path / "t.csv")

    assert len(str(err.value)) < 300
    assert f"{len(huge):,} bytes" in str(err.value)


def test_long_line_under_the_limit_loads(tmp_path):
    long_ticket = "x" * 100_000
    path = tmp_path / "t.csv"
    path.write_bytes(csv_text(ROWS[0], with_field(ROWS[1], "Ticket", long_ticket), ROWS[2]))

    assert load_titanic(path)["Ticket"].iloc[1] == long_ticket


def test_long_bad_value_is_clipped_in_the_message(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(csv_text(ROWS[0], with_field(ROWS[1], "Age", "y" * 5000), ROWS[2]))

    with pytest.raises(DataError) as err:
        load_titanic(path)

    message = str(err.value)
    assert "Age" in message and "row 2" in message and "5,002 characters" in message
    assert len(message) < 100 + 2 * MAX_SHOWN_CHARS + len(str(path))


def test_column_name_with_a_line_break_keeps_the_message_on_one_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'"Passenger\nId",Survived\n1,0\n')

    with pytest.raises(DataError) as err:
        load_titanic(path)

    assert "\n" not in str(err.value) and "Passenger\\nId" in str(err.value)


def test_true_false_in_a_numeric_column_is_not_a_number(tmp_path):
    rows = [with_field(r, "Age", flag) for r, flag in zip(ROWS, ("True", "False", "True"))]
    (tmp_path / "t.csv").write_bytes(csv_text(*rows))

    with pytest.raises(DataError, match="column Age, row 1 .*expected a number, got True$"):
        load_titanic(tmp_path / "t.csv")


def test_true_false_among_blanks_is_not_taken_for_one_and_zero(tmp_path):
    # Only True, False and blanks: read_csv gives Python booleans that to_numeric takes.
    rows = [with_field(ROWS[0], "Fare", ""), with_field(ROWS[1], "Fare", "False"),
            with_field(ROWS[2], "Fare", "True")]
    (tmp_path / "t.csv").write_bytes(csv_text(*rows))

    with pytest.raises(DataError, match="column Fare, row 2 .*expected a number, got False$"):
        load_titanic(tmp_path / "t.csv")


def test_passenger_id_too_large_to_be_exact_is_refused(tmp_path):
    (tmp_path / "t.csv").write_bytes(
        csv_text(ROWS[0], with_field(ROWS[1], "PassengerId", "1e30"), ROWS[2])
    )

    with pytest.raises(DataError, match="PassengerId, row 2 .*whole number"):
        load_titanic(tmp_path / "t.csv")


# ---------------------------------------------------------------------------
# Command-line arguments


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--n-steps", "0"], ["--n-steps 0", "at least 1"]),
        (["--n-steps", "-5"], ["--n-steps -5"]),
        (["--n-steps", "1", "--method", "riemann_trapezoid"], ["riemann_trapezoid", "at least 2"]),
        (["--n-steps", "100000"], ["--n-steps 100000", "gausslegendre", "at most 2,048"]),
        (["--method", "simpson"], ["unknown --method 'simpson'", "gausslegendre"]),
        (["--baselines", "mean,median"], ["--baselines", "'median'", "mean, random, zero, one"]),
        (["--baselines", ""], ["--baselines", "''"]),
        (["--baselines", "zero,zero"], ["--baselines", "'zero'", "twice"]),
        (["--epochs", "0"], ["--epochs", "at least 1", "0"]),
        (["--epochs", "-3"], ["--epochs", "-3"]),
    ],
    ids=["n-steps-0", "n-steps-negative", "n-steps-1-riemann", "n-steps-too-many", "unknown-method",
         "unknown-baseline", "no-baseline", "baseline-twice", "epochs-0", "epochs-negative"],
)
def test_bad_argument_value_is_one_line_exit_two(tmp_path, capsys, titanic_csv, flags, names):
    status, err = run_main(
        capsys, "--data", str(titanic_csv), "--out", str(tmp_path / "results"), *flags
    )

    assert_refused(status, err, tmp_path, *names)


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--n-steps", "abc"], ["--n-steps", "'abc'"]),
        (["--n-steps", "2.5"], ["--n-steps", "'2.5'"]),
        (["--epochs", "many"], ["--epochs", "'many'"]),
        (["--device", "tpu"], ["--device", "'tpu'"]),
        (["--colour"], ["--colour"]),
    ],
    ids=["n-steps-text", "n-steps-fraction", "epochs-text", "unknown-device", "unknown-flag"],
)
def test_unparsable_flag_is_one_line_without_usage_block(tmp_path, capsys, flags, names):
    with pytest.raises(SystemExit) as stopped:
        main(["--all", "--out", str(tmp_path / "results"), *flags])
    captured = capsys.readouterr()

    assert_refused(stopped.value.code, captured.err, tmp_path, "error:", *names)
    assert captured.out == ""


def test_non_integer_n_steps_from_a_shell_is_one_line(tmp_path):
    completed = run_subprocess(tmp_path, "--n-steps", "abc", "--out", str(tmp_path / "results"))

    assert_refused(completed.returncode, completed.stderr, tmp_path, "--n-steps", "'abc'")
    assert completed.stdout == ""


def test_unwritable_out_is_one_line_exit_two(tmp_path, capsys):
    # /proc refuses new folders even to root, for whom permission bits are no obstacle.
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc for a folder nobody can write to")
    out = Path("/proc/engine-results")

    status, err = run_main(capsys, "--out", str(out))

    assert_refused(status, err, tmp_path, str(out), "not writable")
    assert not out.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permission bits do not stop root")
def test_read_only_parent_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        status, err = run_main(capsys, "--out", str(locked / "results"))
    finally:
        locked.chmod(0o755)

    assert_refused(status, err, locked, "not writable")


def test_existing_file_as_out_is_kept_and_refused(tmp_path, capsys, titanic_csv):
    taken = tmp_path / "results"
    taken.write_text("keep me")

    status, err = run_main(capsys, "--data", str(titanic_csv), "--out", str(taken))

    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "not a directory" in err and str(taken) in err
    assert taken.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_out_inside_a_file_is_refused(tmp_path, capsys, titanic_csv):
    (tmp_path / "notes.txt").write_text("keep me")
    out = tmp_path / "notes.txt" / "results"

    status, err = run_main(capsys, "--data", str(titanic_csv), "--out", str(out))

    assert_refused(status, err, tmp_path, "notes.txt", "is a file")


def test_out_in_a_missing_folder_is_refused(tmp_path, capsys, titanic_csv):
    out = tmp_path / "no" / "such" / "results"

    status, err = run_main(capsys, "--data", str(titanic_csv), "--out", str(out))

    assert_refused(status, err, tmp_path, "does not exist")


def test_out_through_a_missing_folder_and_back_is_refused_before_any_work(tmp_path, capsys,
                                                                          titanic_csv):
    # Resolved, missing/../results is a folder beside missing; made, it is not.
    out = f"{tmp_path}/missing/../results"

    status, err = run_main(capsys, "--data", str(titanic_csv), "--out", out)

    assert_refused(status, err, tmp_path, f"folder {tmp_path}/missing/.. does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_device_cuda_without_a_gpu_is_one_line_exit_two(tmp_path, capsys):
    status, err = run_main(capsys, "--device", "cuda", "--out", str(tmp_path / "results"))

    assert_refused(status, err, tmp_path, "--device cuda", "no CUDA device")


def test_debug_adds_the_traceback_and_keeps_the_status(tmp_path, capsys):
    status, err = run_main(capsys, "--data", str(tmp_path / "absent.csv"), "--debug",
                           "--out", str(tmp_path / "results"))

    assert status == 2
    assert "Traceback" in err and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------------------
# Failures while running: status 1, one line, nothing half-written


def assert_failed_late(status: int, stderr: str, folder: Path, *names: str) -> None:
    """Progress lines may come first; the last line is the error, and nothing was kept."""
    last = stderr.strip().splitlines()[-1]
    assert status == 1, stderr
    assert last.startswith("error: ") and "Traceback" not in stderr
    for name in names:
        assert name in last, f"{name!r} not in {last!r}"
    assert not (folder / "results").exists()
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]


def test_unexpected_error_is_its_first_line_and_type_with_status_one(
    tmp_path, capsys, monkeypatch
):
    def broken(config):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr("engine.attribute.run_all", broken)
    status, err = run_main(capsys, "--out", str(tmp_path / "results"))

    assert_refused(status, err, tmp_path, "RuntimeError: first line", "--debug", code=1)
    assert "second line" not in err


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failure_after_tables_are_staged_leaves_no_files(
    tmp_path, capsys, monkeypatch, titanic_csv
):
    # The pictures come after the tables and the weights: by then those are staged. The
    # picture's own write names no file: the folder is named.
    monkeypatch.setattr("engine.plots.attribution_heatmap", _disk_full)
    status, err = run_main(capsys, "--data", str(titanic_csv), "--out",
                           str(tmp_path / "results"), "--epochs", "1")

    assert_failed_late(status, err, tmp_path,
                       f"could not write {tmp_path / 'results'}: No space left on device")


def test_a_full_disk_names_the_result_file_it_could_not_write(
    tmp_path, capsys, monkeypatch, titanic_csv
):
    monkeypatch.setattr("pandas.DataFrame.to_csv", _disk_full)
    status, err = run_main(capsys, "--data", str(titanic_csv), "--out",
                           str(tmp_path / "results"), "--epochs", "1")

    table = tmp_path / "results" / "interpretation_results.csv"
    assert_failed_late(status, err, tmp_path,
                       f"could not write {table}: No space left on device")


def test_a_full_disk_under_an_out_with_a_line_break_is_named_whole(
    tmp_path, capsys, monkeypatch, titanic_csv
):
    out = tmp_path / "new\nline" / "results"
    out.parent.mkdir()
    monkeypatch.setattr("pandas.DataFrame.to_csv", _disk_full)
    status, err = run_main(capsys, "--data", str(titanic_csv), "--out", str(out),
                           "--epochs", "1")

    last = err.strip().splitlines()[-1]
    table = str(out / "interpretation_results.csv").replace("\n", "\\n")
    assert status == 1
    assert last == f"error: could not write {table}: No space left on device"
    assert not out.exists()


def test_a_full_disk_while_a_checkpoint_run_writes_its_tables_names_the_table(
    tmp_path, capsys, monkeypatch, titanic_csv
):
    checkpoint = save_weights(TitanicMLP(), tmp_path / "model.pt")
    out = tmp_path / "results"
    monkeypatch.setattr("pandas.DataFrame.to_csv", _disk_full)

    status = main(["--data", str(titanic_csv), "--checkpoint", str(checkpoint),
                   "--reference", str(titanic_csv), "--out", str(out), "--device", "cpu"])

    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1
    assert last == (f"error: could not write {out / 'interpretation_results.csv'}: "
                    "No space left on device")
    assert not (out / "interpretation_results.csv").exists()


def test_engine_disagreeing_with_captum_is_status_one_and_no_files(
    tmp_path, capsys, monkeypatch, titanic_csv
):
    from engine import core

    def doubled(*args, **kwargs):
        result = core.integrated_gradients(*args, **kwargs)
        if not kwargs.get("return_convergence_delta"):
            return 2 * result  # the untimed first call
        attributions, delta = result
        return 2 * attributions, delta

    monkeypatch.setattr("engine.attribute.integrated_gradients", doubled)
    status, err = run_main(capsys, "--data", str(titanic_csv), "--out",
                           str(tmp_path / "results"), "--epochs", "1")

    assert_failed_late(status, err, tmp_path, "Captum", "exceeds 1e-5")


# ---------------------------------------------------------------------------
# A subset of baselines goes all the way to the files


@pytest.fixture(scope="module")
def two_baseline_run(tmp_path_factory, titanic_csv):
    out = tmp_path_factory.mktemp("subset") / "results"
    status = main(["--all", "--data", str(titanic_csv), "--out", str(out), "--epochs", "1",
                   "--baselines", "zero,random"])
    return status, out


def test_baselines_flag_chooses_the_tables_rows_in_its_order(two_baseline_run):
    status, out = two_baseline_run
    table = pd.read_csv(out / "interpretation_results.csv")

    assert status == 0
    assert list(dict.fromkeys(table["base-type"])) == ["zero-base", "random-base"]
    assert len(table) == 179 * 2 * 5
    assert len(pd.read_csv(out / "convergence.csv")) == 179 * 2


def test_baselines_flag_chooses_the_heatmaps(two_baseline_run):
    _, out = two_baseline_run

    assert sorted(p.name for p in out.glob("heatmap_*-base.png")) == [
        "heatmap_random-base.png", "heatmap_zero-base.png"
    ]


def test_baselines_flag_chooses_the_baselines_explained_during_training(two_baseline_run):
    _, out = two_baseline_run
    table = pd.read_csv(out / "attribution_by_epoch.csv")

    assert set(table["base-type"]) == {"zero-base", "random-base"}


# ---------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_of_another_network_is_named(tmp_path):
    other = torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    path = tmp_path / "other.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": other.state_dict()}, path)

    with pytest.raises(CheckpointError) as err:
        load_weights(path)

    message = str(err.value)
    assert "\n" not in message
    assert "other.pt" in message and "l1.weight" in message and "0.weight" in message


def test_checkpoint_for_another_input_width_names_the_tensor(tmp_path):
    net = TitanicMLP()
    state_dict = net.state_dict()
    state_dict["l1.weight"] = torch.zeros(128, 9)
    path = tmp_path / "wide.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, path)

    with pytest.raises(CheckpointError, match=r"l1\.weight has shape \(128, 9\), expected"):
        load_weights(path)


@pytest.mark.parametrize("baselines", ["one,zero,random,mean", "random-base,mean,zero,one",
                                       "mean"])
def test_baselines_other_than_the_default_order_are_refused_with_checkpoint(
    tmp_path, capsys, titanic_csv, baselines
):
    # A --checkpoint run always writes mean, random, zero, one: another order or another
    # set would be ignored without a word.
    checkpoint = save_weights(TitanicMLP(), tmp_path / "model.pt")

    status = main(["--data", str(titanic_csv), "--checkpoint", str(checkpoint),
                   "--baselines", baselines, "--out", str(tmp_path / "results")])

    assert_refused(status, capsys.readouterr().err, tmp_path,
                   "--baselines does not apply to --checkpoint")


def test_a_named_pipe_as_checkpoint_is_refused_instead_of_waited_on(tmp_path, titanic_csv):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "model.pt").symlink_to(tmp_path / "pipe")

    completed = explain_in_subprocess(tmp_path, tmp_path / "model.pt", titanic_csv)

    assert_refused(completed.returncode, completed.stderr, tmp_path, "model.pt", "named pipe")


def test_sparse_weights_are_one_line_exit_two(tmp_path, titanic_csv):
    # Loading CSR tensors makes torch warn that their support is in beta, on stderr too.
    state_dict = TitanicMLP().state_dict()
    state_dict["l2.weight"] = state_dict["l2.weight"].to_sparse_csr()
    path = tmp_path / "sparse.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, path)

    completed = explain_in_subprocess(tmp_path, path, titanic_csv)

    assert_refused(completed.returncode, completed.stderr, tmp_path, "sparse.pt",
                   "l2.weight is sparse_csr", "dense (strided)")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize(
    ("convert", "dtype"),
    [(lambda value: value.to(torch.complex64), "complex64"),
     (lambda value: torch.quantize_per_tensor(value, 0.01, 0, torch.qint8), "qint8")],
    ids=["complex", "quantized"],
)
def test_weights_that_are_not_real_floating_point_are_one_line_exit_two(
    tmp_path, titanic_csv, convert, dtype
):
    # Complex weights were cast to real with only torch's warning; loading quantized
    # ones makes torch warn that they are deprecated.
    state_dict = TitanicMLP().state_dict()
    state_dict["l1.weight"] = convert(state_dict["l1.weight"])
    path = tmp_path / "typed.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, path)

    completed = explain_in_subprocess(tmp_path, path, titanic_csv)

    assert_refused(completed.returncode, completed.stderr, tmp_path, "typed.pt",
                   f"l1.weight is {dtype}", "real floating point")


def test_float64_weights_too_small_for_float32_are_a_warning_not_a_refusal(tmp_path,
                                                                            titanic_csv):
    state_dict = {name: value.double() for name, value in TitanicMLP().state_dict().items()}
    state_dict["l2.bias"][7] = 1e-300  # float32 holds nothing below about 1.4e-45
    path = tmp_path / "tiny.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, path)

    completed = explain_in_subprocess(tmp_path, path, titanic_csv)

    assert completed.returncode == 0, completed.stderr
    (warning,) = completed.stderr.strip().splitlines()
    assert warning.startswith("WARNING engine.model: ") and "tiny.pt" in warning
    assert "loaded as 0: l2.bias: 1 of 128 values" in warning
    assert (tmp_path / "results" / "interpretation_results.csv").is_file()


@pytest.mark.parametrize("keep", [0, 100, 0.5], ids=["empty", "100-bytes", "half"])
def test_cut_checkpoint_is_one_line_checkpoint_error(tmp_path, keep):
    whole = save_weights(TitanicMLP(), tmp_path / "whole.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: int(keep * len(whole)) if isinstance(keep, float) else keep])

    with pytest.raises(CheckpointError) as err:
        load_weights(cut)

    assert "\n" not in str(err.value) and "cut.pt" in str(err.value)


@pytest.mark.parametrize(("contents", "said"), [
    (b"", "is empty"),
    (b"PassengerId,Survived,Pclass\n1,0,3\n", "is a text file (it begins 'PassengerId,Surv"),
    (b"\n\n  \n", "is a text file of blank lines"),
    ("format: engine-titanic-mlp \u00e9t\u00e9\n".encode(),
     "is a text file (it begins 'format: engine"),
    (b"\xef\xbb\xbfPassengerId,Survived\n1,0\n", "is a text file (it begins 'PassengerId,"),
    (b"hello\x0cworld\n", "is a text file (it begins 'hello"),
    (("x" + "\u00e9" * 3000).encode(), "is a text file (it begins 'x\u00e9\u00e9"),
    ("PassengerId,Name\n1,\u00e9\n".encode("utf-16"), "is a text file (it begins "
                                                     "'PassengerId,Name"),
    ("Name\n\u201cJos\u00e9\u201d\n".encode("cp1252"), "is a text file (it begins 'Name"),
    (b"PassengerId,Survived\r\n1,0\r\n\x1a", "is a text file (it begins 'PassengerId,"),
    (("\U0001f6a2" * 3000).encode("utf-16"), "is a text file (it begins '\U0001f6a2"),
], ids=["empty", "csv", "blank-lines", "utf-8-text", "byte-order-mark", "form-feed",
        "character-cut-at-4-kib", "utf-16", "windows-1252", "dos-end-of-file",
        "utf-16-cut-at-4-kib"])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, contents, said):
    # torch's own reader fails on these with a bare EOFError or KeyError: 101.
    path = tmp_path / "model.pt"
    path.write_bytes(contents)

    with pytest.raises(CheckpointError) as err:
        load_weights(path)

    message = str(err.value)
    assert message.startswith(f"{path}: {said}"), message
    assert message.endswith("expected a checkpoint written by engine.model.save_weights "
                            "or torch.save")


def test_a_legacy_checkpoint_in_pickle_protocol_0_is_not_called_text(tmp_path):
    # Its bytes are printable; torch refuses it under weights_only loading, and says why.
    path = tmp_path / "legacy.pt"
    torch.save(TitanicMLP().state_dict(), path, _use_new_zipfile_serialization=False,
               pickle_protocol=0)

    with pytest.raises(CheckpointError) as err:
        load_weights(path)

    assert "text file" not in str(err.value)
    assert "neither a torch zip archive nor a tensor-only pickle" in str(err.value)


def test_the_cli_names_a_text_file_given_as_checkpoint(tmp_path, titanic_csv):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world, not a checkpoint\n")

    completed = explain_in_subprocess(tmp_path, notes, titanic_csv)

    assert completed.returncode != 0
    assert completed.stderr == (f"error: {notes}: is a text file (it begins 'hello world, not "
                                "a checkpoint'), expected a checkpoint written by "
                                "engine.model.save_weights or torch.save\n")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--n-steps", "1000000000"], ["--n-steps", "100,000"]),
        (["--seed", "-5"], ["--seed", "-5"]),
        (["--seed", str(2**64)], ["--seed"]),
        (["--out="], ["--out ''", "current"]),
        (["--out", "./"], ["--out './'", "current"]),
        (["--out", "CWD"], ["current"]),
        (["--out", ".."], ["--out '..'", "above"]),
        (["--out", "/"], ["--out '/'", "above"]),
    ],
    ids=["huge-n-steps", "negative-seed", "huge-seed", "empty-out", "dot-out", "cwd-out",
         "parent-out", "root-out"],
)
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, capsys, monkeypatch, flags,
                                                       names):
    monkeypatch.chdir(tmp_path)
    flags = [str(tmp_path) if flag == "CWD" else flag for flag in flags]

    status, err = run_main(capsys, *flags)

    assert_refused(status, err, tmp_path, *names)


def test_a_long_out_name_is_used_and_a_too_long_one_refused_in_one_line(tmp_path, capsys,
                                                                        titanic_csv):
    from engine.io import OutputDir

    # 250 bytes is a valid name, and the staging folder beside it must fit too.
    with OutputDir(tmp_path / ("r" * 250)) as outputs:
        outputs.write_text("a.txt", "done")
        outputs.commit()
    assert (tmp_path / ("r" * 250) / "a.txt").read_text() == "done"

    status, err = run_main(capsys, "--data", str(titanic_csv), "--out", str(tmp_path / ("r" * 300)))

    assert_refused(status, err, tmp_path, "File name too long")


def test_a_row_with_missing_fields_is_refused_naming_its_line(tmp_path, capsys, titanic_csv):
    lines = titanic_csv.read_text().splitlines(keepends=True)
    lines[5] = "5,0,3\n"
    short = tmp_path / "short_row.csv"
    short.write_text("".join(lines))

    status, err = run_main(capsys, "--data", str(short), "--out", str(tmp_path / "results"))

    assert_refused(status, err, tmp_path, "short_row.csv", "line 6", "3 fields")


# ---------------------------------------------------------------------------
# Input files the results would replace


@pytest.mark.parametrize("how", ["same-path", "symlink"])
def test_data_named_like_a_result_in_out_is_refused_and_kept(tmp_path, capsys, titanic_csv,
                                                              how):
    out = tmp_path / "earlier"
    out.mkdir()
    inside = out / "interpretation_results.csv"
    inside.write_bytes(titanic_csv.read_bytes())
    data = inside
    if how == "symlink":
        data = tmp_path / "link.csv"
        data.symlink_to(inside)

    status, err = run_main(capsys, "--data", str(data), "--out", str(out), "--epochs", "1")

    assert_refused(status, err, tmp_path, f"--data {data}", "would replace or remove")
    assert inside.read_bytes() == titanic_csv.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["interpretation_results.csv"]


def test_a_checkpoint_runs_input_named_like_its_table_is_refused_and_kept(
    tmp_path, capsys, titanic_csv
):
    checkpoint = save_weights(TitanicMLP(), tmp_path / "model.pt")
    out = tmp_path / "results"
    out.mkdir()
    reference = out / "convergence.csv"
    reference.write_bytes(titanic_csv.read_bytes())

    status = main(["--data", str(titanic_csv), "--checkpoint", str(checkpoint),
                   "--reference", str(reference), "--out", str(out)])

    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--reference {reference}" in err
    assert reference.read_bytes() == titanic_csv.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["convergence.csv"]


def test_a_reference_with_a_quote_left_open_is_one_line_exit_two(tmp_path, capsys,
                                                                  titanic_csv):
    checkpoint = save_weights(TitanicMLP(), tmp_path / "model.pt")
    reference = _open_quote(tmp_path)

    status = main(["--data", str(titanic_csv), "--checkpoint", str(checkpoint),
                   "--reference", str(reference), "--out", str(tmp_path / "results")])

    assert_refused(status, capsys.readouterr().err, tmp_path,
                   f"{reference}: the quoted field that starts on line 3 is never closed")


def test_a_file_an_earlier_run_wrote_and_this_one_would_remove_is_protected(tmp_path):
    from engine.io import OutputDir, refuse_overwriting_inputs

    out = tmp_path / "results"
    with OutputDir(out) as outputs:
        outputs.write_text("heatmap_old-base.csv", "earlier")
        outputs.commit()
    kept = out / "heatmap_old-base.csv"

    with pytest.raises(ArgumentError, match="would replace or remove"):
        refuse_overwriting_inputs(out, ["report.html"], {"--data": kept})
    refuse_overwriting_inputs(out, ["report.html"], {"--data": tmp_path / "elsewhere.csv"})
    # The same check guards the last step of every run, whatever it wrote.
    with OutputDir(out) as outputs:
        outputs.inputs["--data"] = kept
        outputs.write_text("report.html", "new")
        with pytest.raises(ArgumentError, match="would replace or remove"):
            outputs.commit()
    assert kept.read_text() == "earlier"
    # A --checkpoint run removes its chunk folder once the tables are written.
    (out / ".chunks").mkdir()
    (out / ".chunks" / "d.csv").write_text("data")
    with pytest.raises(ArgumentError, match="would replace or remove"):
        refuse_overwriting_inputs(out, ["report.html"], {"--data": out / ".chunks" / "d.csv"})


@pytest.mark.parametrize("mode", ["--all", "--checkpoint"])
def test_out_as_a_broken_symlink_is_refused_before_any_work(tmp_path, capsys, titanic_csv,
                                                            monkeypatch, mode):
    import engine.attribute

    out = tmp_path / "results"
    out.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(engine.attribute, "integrated_gradients",
                        lambda *args, **kwargs: pytest.fail("work started"))
    flags = ["--data", str(titanic_csv), "--out", str(out)]
    if mode == "--checkpoint":
        checkpoint = save_weights(TitanicMLP(), tmp_path / "model.pt")
        flags += ["--checkpoint", str(checkpoint), "--reference", str(titanic_csv)]
    else:
        flags = ["--all", *flags]

    status = main(flags)

    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {out} is a broken symbolic link (to {tmp_path / 'elsewhere'})" in err
    assert "Traceback" not in err
    assert out.is_symlink() and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("flag", ["--data", "--out"])
def test_a_line_break_in_a_path_is_shown_escaped_not_cut(tmp_path, capsys, titanic_csv, flag):
    odd = tmp_path / "no\nsuch" / "x.csv"
    flags = {"--data": str(titanic_csv), "--out": str(tmp_path / "results"), flag: str(odd)}

    status, err = run_main(capsys, *[item for pair in flags.items() for item in pair])

    assert status == 2 and len(err.strip().splitlines()) == 1, err
    escaped = str(odd).replace("\n", "\\n")
    assert escaped in err
    reason = "no such file" if flag == "--data" else "does not exist"
    assert reason in err
