"""The Titanic data: where it is found, what is refused, how it is prepared."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.data import (
    FEATURES,
    TARGET,
    TitanicDataModule,
    check_kaggle_train,
    default_cache_dir,
    load_titanic,
    locate_titanic_csv,
    prepare_titanic,
    read_csv_table,
)
from engine.errors import ArgumentError, DataError

HEADER = "PassengerId,Survived,Pclass,Name,Sex,Age,SibSp,Parch,Ticket,Fare,Cabin,Embarked"
ROWS = (
    '1,0,3,"Braund, Mr. Owen Harris",male,22,1,0,A/5 21171,7.25,,S',
    '2,1,1,"Cumings, Mrs. John Bradley",female,38,1,0,PC 17599,71.2833,C85,C',
    '3,1,3,"Heikkinen, Miss. Laina",female,26,0,0,STON/O2. 3101282,7.925,,S',
)


def write_csv(folder: Path, lines: list[str] | tuple[str, ...], name: str = "t.csv") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def with_field(row: str, column: str, value: str) -> str:
    """Replace one field of a row; the quoted Name holds one comma."""
    fields = row.split(",")
    index = HEADER.split(",").index(column)
    index += index > HEADER.split(",").index("Name")  # the comma inside Name
    fields[index] = value
    return ",".join(fields)


def assert_one_line(err: pytest.ExceptionInfo, *names: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


@pytest.fixture(scope="module")
def frame(titanic_csv: Path) -> pd.DataFrame:
    return load_titanic(titanic_csv)


@pytest.fixture(scope="module")
def data(frame: pd.DataFrame, titanic_csv: Path):
    return prepare_titanic(frame, source=titanic_csv)


# ---------------------------------------------------------------------------
# Preparation of the real file


def test_real_file_is_kaggle_train(frame: pd.DataFrame, titanic_csv: Path) -> None:
    assert len(frame) == 891
    assert int(frame[TARGET].sum()) == 342
    check_kaggle_train(frame, titanic_csv)


def test_real_file_reaches_the_largest_fare_and_age_it_holds(frame: pd.DataFrame) -> None:
    # The plausibility limits must leave Kaggle's own extremes alone.
    assert frame["Fare"].max() == pytest.approx(512.3292)
    assert frame["Age"].max() == 80.0
    assert frame["SibSp"].max() == 8.0


def test_features_are_the_five_article_columns(data) -> None:
    assert data.feature_names == FEATURES == ("Pclass", "Sex", "Age", "SibSp", "Fare")
    assert data.features.shape == (891, 5)
    assert data.features.dtype == torch.float32
    assert data.labels.shape == (891,)
    assert data.labels.dtype == torch.float32


def test_labels_are_survived(data, frame: pd.DataFrame) -> None:
    assert torch.equal(data.labels, torch.tensor(frame[TARGET].to_numpy(), dtype=torch.float32))


def test_every_feature_spans_exactly_zero_to_one(data) -> None:
    assert torch.equal(data.features.min(dim=0).values, torch.zeros(5))
    assert torch.equal(data.features.max(dim=0).values, torch.ones(5))


def test_no_value_is_nan(data) -> None:
    assert not torch.isnan(data.features).any()
    assert not torch.isnan(data.labels).any()


def test_sex_male_is_one_and_female_is_zero(data, frame: pd.DataFrame) -> None:
    sex = data.features[:, FEATURES.index("Sex")]
    assert torch.equal(sex, torch.tensor((frame["Sex"] == "male").to_numpy(), dtype=torch.float32))


def test_missing_age_is_the_normalised_median(data, frame: pd.DataFrame) -> None:
    age = frame["Age"]
    missing = age.isna().to_numpy()
    assert missing.sum() == 177  # Kaggle's file lacks 177 ages
    expected = (age.median() - age.min()) / (age.max() - age.min())
    filled = data.features[torch.tensor(missing), FEATURES.index("Age")]
    # float32 storage of a float64 ratio: half an ulp near 0.35 is about 3e-8.
    torch.testing.assert_close(filled, torch.full_like(filled, expected), rtol=0, atol=1e-7)


def test_split_is_713_train_and_179_test_sharing_one_row(data) -> None:
    assert len(data.train_index) == 713
    assert len(data.test_index) == 179
    assert np.array_equal(data.train_index, np.arange(0, 713))
    assert np.array_equal(data.test_index, np.arange(712, 891))
    assert np.intersect1d(data.train_index, data.test_index).tolist() == [712]


def test_split_properties_select_the_split_rows(data, frame: pd.DataFrame) -> None:
    assert torch.equal(data.train_features, data.features[:713])
    assert torch.equal(data.test_features, data.features[712:])
    assert torch.equal(data.train_labels, data.labels[:713])
    assert torch.equal(data.test_labels, data.labels[712:])
    assert np.array_equal(data.test_passenger_ids, frame["PassengerId"].to_numpy()[712:])


def test_mean_baseline_is_the_column_means(data) -> None:
    assert data.mean_baseline.shape == (5,)
    assert data.mean_baseline.dtype == torch.float32
    torch.testing.assert_close(data.mean_baseline, data.features.double().mean(0).float())


def test_constant_column_becomes_zeros(tmp_path: Path) -> None:
    rows = [with_field(row, "SibSp", "4") for row in ROWS]
    prepared = prepare_titanic(load_titanic(write_csv(tmp_path, [HEADER, *rows])))
    assert torch.equal(prepared.features[:, FEATURES.index("SibSp")], torch.zeros(3))


def test_one_class_file_keeps_its_labels(tmp_path: Path) -> None:
    rows = [with_field(row, "Survived", "1") for row in ROWS]
    prepared = prepare_titanic(load_titanic(write_csv(tmp_path, [HEADER, *rows])))
    assert torch.equal(prepared.labels, torch.ones(3))


def test_training_rows_of_one_class_are_warned_of(tmp_path: Path, caplog) -> None:
    # The split puts rows 0 to 2 of three in training: their labels are 1, 1, 1 and the
    # article's network would learn to say "survived" for everyone.
    rows = [with_field(row, "Survived", "1") for row in ROWS]
    csv = write_csv(tmp_path, [HEADER, *rows])

    with caplog.at_level("WARNING", logger="engine.data"):
        prepare_titanic(load_titanic(csv), source=csv)

    (record,) = caplog.records
    assert str(csv) in record.getMessage()
    assert "every one of the 3 training rows has Survived = 1" in record.getMessage()


def test_training_rows_of_both_classes_are_not_warned_of(data, caplog) -> None:
    with caplog.at_level("WARNING", logger="engine.data"):
        prepare_titanic(load_titanic(data.source), source=data.source)

    assert caplog.records == []


def test_prepare_checks_the_frame_it_is_given() -> None:
    with pytest.raises(DataError) as err:
        prepare_titanic(pd.DataFrame({"PassengerId": [1]}), source=Path("table.csv"))
    assert_one_line(err, "table.csv", "Survived", "Fare")


# ---------------------------------------------------------------------------
# The Lightning data module


def test_train_loader_shuffles_the_same_way_for_the_same_seed(data) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(TitanicDataModule(data, seed=seed).train_dataloader()))[0]

    assert torch.equal(first_batch(404), first_batch(404))
    assert not torch.equal(first_batch(404), first_batch(405))
    assert not torch.equal(first_batch(404), data.train_features[:512])


def test_loaders_cover_their_rows_in_batches_of_512(data) -> None:
    module = TitanicDataModule(data)
    train_sizes = [len(labels) for _, labels in module.train_dataloader()]
    assert train_sizes == [512, 201]
    features, labels = next(iter(module.val_dataloader()))
    assert torch.equal(features, data.test_features)
    assert torch.equal(labels, data.test_labels)
    (predict_features,) = next(iter(module.predict_dataloader()))
    assert torch.equal(predict_features, data.test_features)


def test_bad_batch_size_is_refused(data) -> None:
    with pytest.raises(ArgumentError):
        TitanicDataModule(data, batch_size=0)


# ---------------------------------------------------------------------------
# Finding the file


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so the repository's data/train.csv is out of reach."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def serve(tmp_path: Path):
    """Serve files from a folder on a loopback port; yields a function name -> URL."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = server.server_address[1]

    def publish(name: str, source: Path) -> str:
        shutil.copyfile(source, root / name)
        return f"http://127.0.0.1:{port}/{name}"

    yield publish
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/titanic.csv"


def test_explicit_path_wins(workdir: Path, tmp_path: Path, titanic_csv: Path) -> None:
    (workdir / "data").mkdir()
    shutil.copyfile(titanic_csv, workdir / "data" / "train.csv")
    explicit = shutil.copyfile(titanic_csv, tmp_path / "mine.csv")
    assert locate_titanic_csv(explicit, cache_dir=tmp_path / "cache") == explicit


def test_missing_explicit_path_is_an_error_not_a_fallback(
    workdir: Path, tmp_path: Path, titanic_csv: Path
) -> None:
    (workdir / "data").mkdir()
    shutil.copyfile(titanic_csv, workdir / "data" / "train.csv")
    with pytest.raises(DataError) as err:
        locate_titanic_csv(tmp_path / "typo.csv", cache_dir=tmp_path / "cache")
    assert_one_line(err, "typo.csv")


def test_explicit_directory_is_an_error(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        locate_titanic_csv(tmp_path, cache_dir=tmp_path / "cache")
    assert_one_line(err, str(tmp_path), "directory")


def test_explicit_named_pipe_is_an_error(workdir: Path, named_pipe: Path) -> None:
    with pytest.raises(DataError) as err:
        locate_titanic_csv(named_pipe)
    assert_one_line(err, str(named_pipe), "is a named pipe, expected a CSV file")


def test_repository_copy_comes_before_the_cache(
    workdir: Path, tmp_path: Path, titanic_csv: Path
) -> None:
    (workdir / "data").mkdir()
    shutil.copyfile(titanic_csv, workdir / "data" / "train.csv")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(titanic_csv, cache / "titanic.csv")
    assert locate_titanic_csv(cache_dir=cache, url=closed_port_url()) == Path("data/train.csv")


def test_cache_is_used_when_the_repository_has_no_copy(
    workdir: Path, tmp_path: Path, titanic_csv: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(titanic_csv, cache / "titanic.csv")
    assert locate_titanic_csv(cache_dir=cache, url=closed_port_url()) == cache / "titanic.csv"


def test_download_lands_in_the_cache(
    workdir: Path, tmp_path: Path, titanic_csv: Path, serve
) -> None:
    url = serve("titanic.csv", titanic_csv)
    cache = tmp_path / "cache"
    found = locate_titanic_csv(cache_dir=cache, url=url, timeout=10)
    assert found == cache / "titanic.csv"
    assert found.read_bytes() == titanic_csv.read_bytes()
    assert sorted(cache.iterdir()) == [found]


def test_download_with_wrong_row_count_is_rejected_and_not_cached(
    workdir: Path, tmp_path: Path, titanic_csv: Path, serve
) -> None:
    short = tmp_path / "short.csv"
    short.write_text("".join(titanic_csv.read_text().splitlines(keepends=True)[:101]))
    url = serve("titanic.csv", short)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        locate_titanic_csv(cache_dir=cache, url=url, timeout=10)
    assert_one_line(err, url, "100 rows", "891")
    assert list(cache.iterdir()) == []


def test_offline_without_a_copy_says_where_to_put_the_file(workdir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    url = closed_port_url()
    with pytest.raises(DataError) as err:
        locate_titanic_csv(cache_dir=cache, url=url, timeout=5)
    assert_one_line(err, "--data", "data/train.csv", str(cache / "titanic.csv"), url)


def test_cache_dir_prefers_engine_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "engine-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "engine-cache"


def test_cache_dir_falls_back_to_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "engine"


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "engine"


def test_default_cache_comes_from_the_environment(
    workdir: Path, tmp_path: Path, titanic_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "env-cache"
    cache.mkdir()
    shutil.copyfile(titanic_csv, cache / "titanic.csv")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))
    assert locate_titanic_csv(url=closed_port_url()) == cache / "titanic.csv"


# ---------------------------------------------------------------------------
# Files that are refused, each with a one-line message naming the fault


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_titanic(tmp_path / "absent.csv")
    assert_one_line(err, "absent.csv", "no such file")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_titanic(tmp_path)
    assert_one_line(err, str(tmp_path), "directory")


@pytest.mark.parametrize("mode", ["--all", "--checkpoint"])
@pytest.mark.parametrize("through", ["the pipe", "a link to it"])
def test_a_named_pipe_is_refused_before_it_is_opened(
    tmp_path: Path, named_pipe: Path, mode: str, through: str
) -> None:
    # Opening a pipe waits for a writer: the check has to come before any open.
    from engine.distributed import read_rows

    path = named_pipe
    if through == "a link to it":
        path = tmp_path / "link.csv"
        path.symlink_to(named_pipe)
    read = load_titanic if mode == "--all" else read_rows
    with pytest.raises(DataError) as err:
        read(path)
    assert_one_line(err, f"{path}: is a named pipe, expected a CSV file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_titanic(path)
    assert_one_line(err, "empty.csv", "empty")


@pytest.mark.parametrize("contents", [b"\n\n\n", b" \r\n\t\n"], ids=["newlines", "spaces"])
def test_a_file_of_blank_lines_is_named_as_such(tmp_path: Path, contents) -> None:
    path = tmp_path / "blank.csv"
    path.write_bytes(contents)
    with pytest.raises(DataError) as err:
        load_titanic(path)
    assert_one_line(err, f"{path}: file holds only blank lines and spaces, expected a CSV")


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER]))
    assert_one_line(err, "t.csv", "no data rows")


def test_missing_columns_are_all_named(tmp_path: Path) -> None:
    frame = pd.read_csv(write_csv(tmp_path, [HEADER, *ROWS]))
    path = tmp_path / "narrow.csv"
    frame.drop(columns=["Age", "Fare"]).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_titanic(path)
    assert_one_line(err, "narrow.csv", "Age", "Fare")


def test_text_in_age_names_column_row_and_value(tmp_path: Path) -> None:
    rows = [ROWS[0], with_field(ROWS[1], "Age", "thirty-eight"), ROWS[2]]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "Age", "row 2", "line 3", "thirty-eight")


def test_unknown_sex_label_is_named(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[1], with_field(ROWS[2], "Sex", "unknown")]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "Sex", "'unknown'", "row 3")


@pytest.mark.parametrize("mode", ["--all", "--checkpoint"])
def test_spaces_around_a_sex_label_are_read_as_around_a_number(tmp_path: Path, mode: str) -> None:
    from engine.distributed import read_rows

    read = load_titanic if mode == "--all" else read_rows
    spaced = [with_field(ROWS[0], "Sex", " male "), with_field(ROWS[1], "Sex", "female\t"),
              with_field(ROWS[2], "Age", " 26 ")]
    plain = read(write_csv(tmp_path, [HEADER, *ROWS], name="plain.csv"))

    frame = read(write_csv(tmp_path, [HEADER, *spaced]))

    assert list(frame["Sex"]) == ["male", "female", "female"]
    pd.testing.assert_frame_equal(frame, plain)


@pytest.mark.parametrize("mode", ["--all", "--checkpoint"])
@pytest.mark.parametrize("cell", ["  ", "NaN ", " NA", " null "])
def test_a_blank_word_with_spaces_is_a_blank_number(tmp_path: Path, mode: str, cell: str) -> None:
    from engine.distributed import read_rows

    read = load_titanic if mode == "--all" else read_rows
    rows = [ROWS[0], ROWS[1], with_field(ROWS[2], "Age", cell)]

    frame = read(write_csv(tmp_path, [HEADER, *rows]))

    assert frame["Age"].isna().tolist() == [False, False, True]


@pytest.mark.parametrize("mode", ["--all", "--checkpoint"])
@pytest.mark.parametrize("cell", ["  ", " NA "])
def test_a_sex_of_spaces_is_blank(tmp_path: Path, mode: str, cell: str) -> None:
    from engine.distributed import read_rows

    read = load_titanic if mode == "--all" else read_rows
    rows = [ROWS[0], ROWS[1], with_field(ROWS[2], "Sex", cell)]
    with pytest.raises(DataError) as err:
        read(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "column Sex, row 3 (line 4): blank")


def test_a_blank_sex_is_named_not_filled(tmp_path: Path) -> None:
    # The median of two men and two women would be 0.5: neither.
    rows = [ROWS[0], ROWS[1], with_field(ROWS[2], "Sex", ""), with_field(ROWS[0], "Sex",
                                                                          "female")]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "column Sex, row 3 (line 4): blank")


@pytest.mark.parametrize("variant", ["CR line ends", "a line of spaces", "a line with a tab"])
def test_files_pandas_reads_are_read_in_both_modes(tmp_path: Path, variant: str) -> None:
    from engine.distributed import read_rows

    text = "\n".join([HEADER, *ROWS]) + "\n"
    raw = {"CR line ends": text.replace("\n", "\r"), "a line of spaces": text + "   \n",
           "a line with a tab": text + "\t\n"}[variant]
    path = tmp_path / "t.csv"
    path.write_bytes(raw.encode())

    assert list(load_titanic(path)["PassengerId"]) == [1, 2, 3]
    assert list(read_rows(path)["PassengerId"]) == [1, 2, 3]


def test_a_column_named_twice_in_the_header_is_refused(tmp_path: Path) -> None:
    header = HEADER + ",Age"
    rows = [row + ",99" for row in ROWS]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [header, *rows]))
    assert_one_line(err, "t.csv",
                    "column Age appears 2 times in the header (columns 6, 13): keep one")


def test_infinite_fare_is_named(tmp_path: Path) -> None:
    rows = [with_field(ROWS[0], "Fare", "inf"), ROWS[1], ROWS[2]]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "Fare", "row 1", "inf")


# Old Mac line ends (CR alone): pandas and the csv module read them as line breaks too.
@pytest.mark.parametrize("name, ending, expected", [
    ("latin.csv", "\n", ("latin.csv", "UTF-8", "line 3")),
    ("cr.csv", "\r", ("cr.csv: line 3 is not UTF-8",)),
], ids=["lf", "cr"])
def test_non_utf8_bytes_name_the_line_whatever_ends_the_lines(
    tmp_path: Path, name: str, ending: str, expected: tuple[str, ...]
) -> None:
    path = tmp_path / name
    text = ending.join([HEADER, ROWS[0], ROWS[1].replace("Cumings", "Cumiñgs")]) + ending
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_titanic(path)
    assert_one_line(err, *expected)


@pytest.mark.parametrize("separator, name", [(";", "semicolons"), ("\t", "tabs")],
                         ids=["semicolons", "tabs"])
@pytest.mark.parametrize("title", [False, True], ids=["header", "title-above"])
def test_a_file_separated_by_semicolons_or_tabs_says_so(
    tmp_path: Path, separator: str, name: str, title: bool
) -> None:
    # As a spreadsheet saves it: the quoted names keep their commas, so each row reads as
    # two fields against a header of one, which alone says nothing about the cause.
    lines = [line.replace(",", separator).replace(f"{separator} ", ", ")
             for line in [HEADER, *ROWS]]
    lines = [f"Titanic passengers{separator} exported 2024", *lines] if title else lines
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, lines))
    assert_one_line(err, f"t.csv: seems to be separated by {name}, not commas:",
                    "expected a comma-separated file")


def test_a_title_line_with_a_semicolon_above_a_comma_table_is_not_called_semicolons(
    tmp_path: Path,
) -> None:
    # The title is a one-field "header" holding a semicolon, but the real header below it
    # holds none: the rows disagree, so the file is named for its field counts.
    lines = ["Titanic passengers; exported 2024", HEADER, *ROWS]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, lines))
    assert "separated by" not in str(err.value)
    assert_one_line(err, "t.csv", "has 12 fields, the header has 1")


def test_a_one_column_file_with_a_semicolon_in_a_name_is_not_called_semicolons(
    tmp_path: Path,
) -> None:
    lines = ["Name", '"Braund; Mr. Owen Harris"', "Heikkinen, Miss. Laina"]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, lines))
    assert "separated by" not in str(err.value)
    assert_one_line(err, "t.csv")


@pytest.mark.parametrize("start, kind", [(b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip")],
                         ids=["gzip", "zip"])
def test_a_compressed_file_says_to_decompress_it(tmp_path: Path, start: bytes,
                                                kind: str) -> None:
    # Its bytes would otherwise be named as not UTF-8 (gzip's second byte is 0x8b).
    import gzip
    import zipfile

    text = ("\n".join([HEADER, *ROWS]) + "\n").encode()
    path = tmp_path / ("t.csv.gz" if kind == "gzip" else "t.zip")
    if kind == "gzip":
        path.write_bytes(gzip.compress(text))
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as packed:
            packed.writestr("t.csv", text)
    assert path.read_bytes().startswith(start)
    with pytest.raises(DataError) as err:
        load_titanic(path)
    assert_one_line(err, f"{path}: is {kind}-compressed", "decompress it first")


def test_survived_other_than_zero_or_one(tmp_path: Path) -> None:
    rows = [ROWS[0], with_field(ROWS[1], "Survived", "2"), ROWS[2]]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "Survived", "row 2", "2")


def test_a_repeated_passenger_id_names_both_rows(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[1], with_field(ROWS[2], "PassengerId", "1")]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "PassengerId", "row 3", "id 1", "row 1")


@pytest.mark.parametrize("column, value, expected", [
    ("Pclass", "-3", "1, 2 or 3"), ("Pclass", "4", "1, 2 or 3"), ("Pclass", "1.5", "1, 2 or 3"),
    ("Age", "-1", ">= 0"), ("SibSp", "-2", ">= 0"), ("Fare", "-7.25", ">= 0"),
    ("SibSp", "0.5", "whole number"),
])
def test_values_outside_a_columns_range_are_named(
    tmp_path: Path, column: str, value: str, expected: str
) -> None:
    rows = [ROWS[0], with_field(ROWS[1], column, value), ROWS[2]]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", column, "row 2", value, expected)


@pytest.mark.parametrize("column, value, shown, limit", [
    ("Age", "1e308", "1e+308", "150"), ("Age", "151", "151", "150"),
    ("Fare", "1e308", "1e+308", "10,000"), ("Fare", "10000.01", "10000.01", "10,000"),
    ("SibSp", "1e300", "1e+300", "100"),
])
def test_values_no_passenger_could_have_are_named(
    tmp_path: Path, column: str, value: str, shown: str, limit: str
) -> None:
    # 1e308 once scaled the rest of its column to zeros, and a new file's 1e308 to inf.
    rows = [ROWS[0], with_field(ROWS[1], column, value), ROWS[2]]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", f"column {column}", "row 2", "line 3", f"at most {limit}",
                    f"got {shown}")
    assert len(str(err.value)) < 200


def test_values_at_the_limits_load(tmp_path: Path) -> None:
    rows = [ROWS[0], with_field(with_field(ROWS[1], "Age", "150"), "Fare", "10000"),
            with_field(ROWS[2], "SibSp", "100")]
    frame = load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert bool(torch.isfinite(prepare_titanic(frame).features).all())


def test_a_blank_class_is_still_filled(tmp_path: Path) -> None:
    rows = [ROWS[0], with_field(ROWS[1], "Pclass", ""), ROWS[2]]
    assert load_titanic(write_csv(tmp_path, [HEADER, *rows]))["Pclass"].isna().sum() == 1


def test_column_with_no_values_at_all(tmp_path: Path) -> None:
    rows = [with_field(row, "Age", "") for row in ROWS]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv", "Age", "no values")


# ---------------------------------------------------------------------------
# Lines named in messages: the file's own, whatever a record spans

# A quoted line break: the record is on lines 3 and 4, and every row after it is on
# line row + 2.
TWO_LINE_ROW = '2,1,1,"Cumings,\nMrs. John Bradley",female,38,1,0,PC 17599,71.2833,C85,C'


def rows_after_a_two_line_name() -> list[str]:
    """Six rows whose row 2 spans two lines, so row 6 is on line 8."""
    more = [with_field(ROWS[2], "PassengerId", str(id_)) for id_ in (4, 5, 6)]
    return [ROWS[0], TWO_LINE_ROW, ROWS[2], *more]


@pytest.mark.parametrize("column, value, complaint", [
    ("Age", "bad", "expected a number, got 'bad'"),
    ("Fare", "inf", "expected a finite number"),
    ("Age", "151", "expected at most 150"),
    ("Pclass", "4", "expected 1, 2 or 3"),
    ("SibSp", "0.5", "expected a whole number"),
    ("Survived", "2", "expected 0 or 1"),
    ("Sex", "unknown", "unknown label 'unknown'"),
    ("Sex", "", "blank"),
    ("PassengerId", "1", "id 1 is also on row 1 (line 2)"),
])
def test_a_row_after_a_two_line_record_is_named_by_its_line_in_the_file(
    tmp_path: Path, column: str, value: str, complaint: str
) -> None:
    rows = rows_after_a_two_line_name()
    rows[5] = with_field(rows[5], column, value)
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, f"t.csv: column {column}, row 6 (line 8): {complaint}")


def test_a_bad_value_in_a_two_line_record_names_both_lines(tmp_path: Path) -> None:
    rows = rows_after_a_two_line_name()
    rows[1] = with_field(rows[1], "Age", "bad")
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv: column Age, row 2 (lines 3-4): expected a number, got 'bad'")


@pytest.mark.parametrize("fault, message", [
    ("short", "row 6 (line 8) has 3 fields, the header has 12"),
    ("long", "row 6 (line 8) has 13 fields, the header has 12"),
    ("short over two lines", "row 6 (lines 8-9) has 4 fields, the header has 12"),
])
def test_a_record_with_the_wrong_field_count_is_named_by_its_lines(
    tmp_path: Path, fault: str, message: str
) -> None:
    rows = rows_after_a_two_line_name()
    rows[5] = {"short": "6,0,3", "long": rows[5] + ",extra",
               "short over two lines": '6,0,3,"Two,\nLines"'}[fault]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, f"t.csv: {message}")


@pytest.mark.parametrize("fault, message", [
    ("Age", "column Age, row 3 (line 6): expected a number, got 'bad'"),
    ("short", "row 3 (line 6) has 3 fields, the header has 12"),
])
def test_blank_lines_pandas_skips_count_as_lines_not_rows(
    tmp_path: Path, fault: str, message: str
) -> None:
    last = with_field(ROWS[2], "Age", "bad") if fault == "Age" else "3,1,3"
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, ROWS[0], ROWS[1], "", "   ", last]))
    assert_one_line(err, f"t.csv: {message}")


def test_blank_lines_before_the_header_do_not_hide_a_short_record(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, ["", HEADER, ROWS[0], "2,1,1", ROWS[2]]))
    assert_one_line(err, "t.csv: row 2 (line 4) has 3 fields, the header has 12")


def test_rows_the_two_readers_split_differently_are_named_without_lines(tmp_path: Path) -> None:
    # pandas drops the record "," after a lone CR; the csv module keeps it. Lines counted
    # by the one would misname the rows of the other, so none are claimed.
    path = tmp_path / "t.csv"
    path.write_bytes(b"x,y\n1,2\n\r,\n3,4\n")
    frame, lines = read_csv_table(path, label="t.csv")
    assert frame["x"].tolist() == [1, 3]
    assert lines is None


# A quote left open runs to the end of the file: the csv module takes the rest as one
# field, pandas refuses the file counting records. Either way the line of the quote is
# the one to look at. (A quote in a later row would close it.)
UNQUOTED_ROW = "3,1,3,Heikkinen Miss. Laina,female,26,0,0,STON/O2. 3101282,7.925,,S"
OPEN_QUOTES = {
    # Every field there: only pandas noticed, naming "row 3" for line 4.
    "in the last field": [ROWS[0], ROWS[1], ROWS[2][:-1] + '"S'],
    # The rest of the file in Name leaves row 2 short: it read as a wrong field count.
    "with rows after it": [ROWS[0], '2,1,1,"Cumings, Mrs. John Bradley', UNQUOTED_ROW],
    "on the second line of a record": [ROWS[0], TWO_LINE_ROW[:-1] + '"C', UNQUOTED_ROW],
}


@pytest.mark.parametrize("rows, line", [
    (OPEN_QUOTES["in the last field"], 4),
    (OPEN_QUOTES["with rows after it"], 3),
    (OPEN_QUOTES["on the second line of a record"], 4),
], ids=list(OPEN_QUOTES))
def test_a_quote_left_open_to_the_end_names_the_line_it_opens_on(
    tmp_path: Path, rows: list[str], line: int
) -> None:
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, f"t.csv: the quoted field that starts on line {line} is never closed")


@pytest.mark.parametrize("ending", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_a_quote_left_open_is_named_by_its_line_whatever_ends_the_lines(
    tmp_path: Path, ending: str
) -> None:
    path = tmp_path / "t.csv"
    text = ending.join([HEADER, *OPEN_QUOTES["with rows after it"], UNQUOTED_ROW]) + ending
    path.write_bytes(text.encode())
    with pytest.raises(DataError) as err:
        load_titanic(path)
    assert_one_line(err, "t.csv: the quoted field that starts on line 3 is never closed")


def test_a_quote_left_open_early_in_a_long_file_is_named_by_its_line(tmp_path: Path) -> None:
    # Past the csv module's field limit (131,072 characters) it stops before the end.
    rows = [ROWS[0], '2,1,1,"Cumings, Mrs. John Bradley', *[UNQUOTED_ROW] * 3000]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv: a quoted field in the record that starts on line 3 runs "
                         "past 131,072 characters", "a quote left open?")


def test_a_field_too_long_on_one_line_is_named_by_its_line(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[1].replace("C85", "C" * 140_000)]
    with pytest.raises(DataError) as err:
        load_titanic(write_csv(tmp_path, [HEADER, *rows]))
    assert_one_line(err, "t.csv: line 3 has a field longer than 131,072 characters")


def test_download_checks_reject_a_foreign_table(tmp_path: Path) -> None:
    frame = load_titanic(write_csv(tmp_path, [HEADER, *ROWS]))
    with pytest.raises(DataError) as err:
        check_kaggle_train(frame.drop(columns=["Cabin"]), "somewhere.csv")
    assert_one_line(err, "somewhere.csv", "Cabin")


def test_oversized_download_is_rejected_and_not_cached(
    workdir: Path, tmp_path: Path, titanic_csv: Path, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.data.MAX_DOWNLOAD_BYTES", 1000)
    url = serve("titanic.csv", titanic_csv)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        locate_titanic_csv(cache_dir=cache, url=url, timeout=10)
    assert_one_line(err, url, "1000 bytes")
    assert not (cache / "titanic.csv").exists()
