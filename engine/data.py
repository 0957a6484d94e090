"""The Titanic data of the article: find it, check it, prepare it, batch it.

The preparation follows the article step by step so that its numbers can be
reproduced: five features, Sex as 1/0, missing values filled with the column
median, min-max scaling over the whole file, and the article's 80/20 split by
position (which shares one row between train and test).
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import logging
import os
import stat
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from engine.errors import ArgumentError, DataError

__all__ = [
    "FEATURES",
    "TARGET",
    "TITANIC_URL",
    "TitanicData",
    "TitanicDataModule",
    "check_kaggle_train",
    "file_kind",
    "default_cache_dir",
    "load_titanic",
    "locate_titanic_csv",
    "prepare_titanic",
]

logger = logging.getLogger(__name__)

FEATURES = ("Pclass", "Sex", "Age", "SibSp", "Fare")
TARGET = "Survived"
TITANIC_URL = "https://raw.githubusercontent.com/pandas-dev/pandas/main/doc/data/titanic.csv"

REQUIRED_COLUMNS = ("PassengerId", TARGET, *FEATURES)
NUMERIC_COLUMNS = ("PassengerId", TARGET, "Pclass", "Age", "SibSp", "Fare")
SEX_CODES = {"male": 1.0, "female": 0.0}

KAGGLE_COLUMNS = (
    "PassengerId", "Survived", "Pclass", "Name", "Sex", "Age",
    "SibSp", "Parch", "Ticket", "Fare", "Cabin", "Embarked",
)
KAGGLE_ROWS = 891
KAGGLE_SURVIVORS = 342

# Kaggle's file is about 61 kB; anything far larger is not it.
MAX_DOWNLOAD_BYTES = 16 * 2**20

# Kaggle's longest line is under 200 bytes. A line past this is not a table row (a file
# without line breaks, a pasted blob); refusing it early keeps messages and memory small.
MAX_LINE_BYTES = 2**20

# Cells and column names quoted in messages are cut to this many characters.
MAX_SHOWN_CHARS = 60

# PassengerId is read as a float; from 2**53 on whole numbers are no longer exact (2**53 + 1
# reads as 2**53), so ids must stay below it.
MAX_PASSENGER_ID = 2**53
# The cells pandas.read_csv reads as missing by default (its documented na_values).
CSV_BLANKS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})

# Values no passenger could have had, far past Kaggle's largest (Age 80, SibSp 8, Fare
# 512.33): nobody has lived to 150, nobody had 100 siblings and spouses aboard, and the
# dearest ticket sold cost about 870 pounds. Beyond them a value is a typo or a sentinel
# (1e308), and one such value squeezes the rest of its column to zeros when the file is
# min-max scaled, or scales to inf against another file's range.
MAX_VALUES = {"Age": 150.0, "SibSp": 100.0, "Fare": 10_000.0}

# The first bytes of a compressed file, which would otherwise read as bytes that are not
# UTF-8 (gzip's second byte is 0x8b): a saved download or an attachment, still packed.
# An Excel workbook (.xlsx) is a zip file too.
_COMPRESSED_STARTS = ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"))

# Separators a table may use instead of commas, as messages name them. Such a file's
# header reads as one field; its rows as one field too, or two where a name holds a comma.
_OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs"}

# What a path may be instead of a regular file, as messages name it.
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is in words (``"a named pipe"``), or None for a
    regular file: data files and checkpoints are refused as anything else."""
    if stat.S_ISREG(mode):
        return None
    return next((name for is_kind, name in _FILE_KINDS if is_kind(mode)),
                "not a regular file")

CACHE_NAME = "titanic.csv"
REPO_DATA = Path("data/train.csv")


# ---------------------------------------------------------------------------
# Finding the file


def default_cache_dir() -> Path:
    """Return the folder where a downloaded copy of the data is kept.

    Returns
    -------
    Path
        ``$ENGINE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/engine``, else
        ``~/.cache/engine``. The folder is not created.
    """
    explicit = os.environ.get("ENGINE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "engine"
    return Path.home() / ".cache" / "engine"


def locate_titanic_csv(
    path: str | Path | None = None,
    *,
    repo_data: Path = REPO_DATA,
    cache_dir: Path | None = None,
    url: str = TITANIC_URL,
    timeout: float = 30,
    flag: str = "--data",
) -> Path:
    """Find Kaggle's Titanic ``train.csv``, downloading it once if needed.

    The search stops at the first hit: ``path`` when given, then
    ``repo_data``, then ``cache_dir/titanic.csv``, then a download of ``url``
    into the cache. A download is checked (rows, columns, survivors) before it
    replaces anything, so the cache never holds a partial or foreign file.

    Parameters
    ----------
    path
        A file named by the user. When given it must exist: the search never
        falls through to other places, so a typo is not silently ignored.
    repo_data
        The copy kept in the repository, relative to the working directory.
    cache_dir
        Where downloads live; :func:`default_cache_dir` when None.
    url
        Where to download the file from.
    timeout
        Seconds to wait for the server.
    flag
        The command-line flag that names the file, for the message when none is found.

    Returns
    -------
    Path
        The file to read with :func:`load_titanic`.

    Raises
    ------
    DataError
        If ``path`` is missing or not a regular file (a folder, a named pipe, a
        device), or if no copy exists and the download fails or does not look
        like Kaggle's file.
    """
    if path is not None:
        explicit = Path(path)
        _check_regular_file(explicit, str(explicit))
        return explicit

    repo_data = Path(repo_data)
    if repo_data.is_file():
        return repo_data

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cached = cache_dir / CACHE_NAME
    if cached.is_file():
        return cached

    return _download(url, cached, timeout=timeout, repo_data=repo_data, flag=flag)


def _download(url: str, target: Path, *, timeout: float, repo_data: Path, flag: str) -> Path:
    """Fetch ``url`` into ``target`` atomically, or explain where to put the file."""
    logger.info("downloading the Titanic data from %s to %s", url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(
            f"no Titanic data: pass {flag} PATH, or put Kaggle's train.csv at {repo_data}"
            f" or {target} (download from {url} failed: {_one_line(reason)})"
        ) from err
    if len(payload) > MAX_DOWNLOAD_BYTES:
        raise DataError(
            f"{url}: not Kaggle's train.csv: larger than {MAX_DOWNLOAD_BYTES} bytes"
            " (the real file is about 61 kB)"
        )

    # A temporary file in the same folder makes os.replace atomic: readers see
    # either no cache or a checked one, never half a download.
    handle, temporary = tempfile.mkstemp(prefix=".titanic-", suffix=".part", dir=target.parent)
    temporary = Path(temporary)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        frame = _load(temporary, label=url)
        check_kaggle_train(frame, url)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.info("saved %d bytes of Titanic data to %s", len(payload), target)
    return target


# ---------------------------------------------------------------------------
# Reading and checking


def load_titanic(path: str | Path) -> pd.DataFrame:
    """Read a Titanic CSV and check that the article can use it.

    Parameters
    ----------
    path
        A CSV with at least the columns PassengerId, Survived, Pclass, Sex,
        Age, SibSp and Fare, in UTF-8.

    Returns
    -------
    pandas.DataFrame
        The file as read, with the numeric required columns as numbers.

    Raises
    ------
    DataError
        With a one-line message naming the file and, where it applies, the
        column, row and value at fault.
    """
    path = Path(path)
    return _load(path, label=str(path))


def _load(path: Path, *, label: str) -> pd.DataFrame:
    """Read and check ``path``; messages name ``label`` (a path or a URL)."""
    frame, lines = read_csv_table(path, label=label)
    return _checked(frame, label, lines=lines)


@dataclass(frozen=True, eq=False)
class RowLines:
    """The lines of a CSV file each data row was read from, 1-based.

    A record takes more than one line when a quoted field holds a line break, and
    pandas skips blank lines, so row ``i`` is on line ``i + 2`` only in the plainest
    file. Messages name these lines.

    Attributes
    ----------
    first, last
        ``(rows,)`` int64, the first and the last line of each row's record.
    """

    first: np.ndarray
    last: np.ndarray


def read_csv_table(path: Path, *, label: str) -> tuple[pd.DataFrame, RowLines | None]:
    """Read a CSV table as pandas does, refusing what pandas would take silently.

    Anything but a regular file (a device, a named pipe), a gzip or zip file, a line over
    ``MAX_LINE_BYTES``, bytes that are not UTF-8, a file separated by semicolons or tabs
    rather than commas, a record with more or fewer fields than the header (pandas fills
    missing ones with NaN, and takes one extra field in every record for an index), a
    quoted field left open to the end of the file and a column the rows use named twice
    in the header (pandas reads the second as ``Age.1``) are a ``DataError`` naming
    ``label`` (a path or a URL) and the line.

    Returns
    -------
    tuple
        The table, and the lines of the file its rows are on (None in the unlikely
        case that pandas and the csv module split the file into different rows). The
        table's ``attrs["sha256"]`` is the digest of the bytes read: hashing the file by
        name afterwards could hash another one, put in its place meanwhile.
    """
    _check_regular_file(path, label)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{label}: cannot read ({_one_line(err.strerror or err)})") from err
    if not raw.strip():
        what = "file is empty" if not raw else "file holds only blank lines and spaces"
        raise DataError(f"{label}: {what}, expected a CSV with a header and rows")

    _check_not_compressed(raw, label)
    _check_line_lengths(raw, label)
    text = _decode(raw, label)
    # Before pandas: its own complaint about a long record counts records, not lines.
    lines = _check_records(text, label)
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"{label}: not a readable CSV ({_one_line(err)})") from err
    frame.attrs["sha256"] = hashlib.sha256(raw).hexdigest()
    if len(lines.first) != len(frame):
        # A quoting corner the two readers take differently: a wrong line is worse than none.
        logger.debug("%s: %d rows, %d records: lines not named", label, len(frame),
                     len(lines.first))
        return frame, None
    return frame, lines


def _check_regular_file(path: Path, label: str) -> None:
    """Refuse anything but a regular file (links followed) before it is opened.

    Opening a named pipe waits for a writer, so the run would hang; a device such as
    /dev/zero would be read until memory runs out.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{label}: no such file") from None
    except OSError as err:
        raise DataError(f"{label}: cannot read ({_one_line(err.strerror or err)})") from err
    kind = file_kind(mode)
    if kind is not None:
        raise DataError(f"{label}: is {kind}, expected a CSV file")


def _check_records(text: str, label: str) -> RowLines:
    """Find the lines of each data row, refusing a quote left open to the end of the file,
    a file separated by semicolons or tabs, a column named twice in the header and a
    record whose field count is not the header's.

    A record with fewer fields would be filled with NaN by pandas, and the median fill
    would then invent a passenger. A record with more fields pandas refuses naming a
    "line" that counts records, not lines; more fields in every record it takes for an
    index, shifting every column by one.
    """
    # newline="": the csv module reads \r, \n and \r\n line ends itself, as pandas does.
    # The lines, kept, show which records are blank lines that pandas skips.
    physical = io.StringIO(text, newline="").readlines()
    records = csv.reader(physical)
    header, first, last, widths, first_row = None, [], [], [], []
    end = 0
    try:
        for record in records:
            start, end = end + 1, records.line_num
            # Only spaces and tabs on one line: a blank line to pandas, not a row.
            if start == end and not physical[start - 1].strip(" \t\r\n"):
                continue
            if header is None:
                header = record
                continue
            if not first:
                first_row = record
            first.append(start)
            last.append(end)
            widths.append(len(record))
        if end:
            _check_quotes_closed(physical[start - 1:], start, label)
    except csv.Error as err:
        if "field larger than field limit" in str(err):
            limit, opened = csv.field_size_limit(), end + 1
            if records.line_num > opened:
                # A quoted field this long over several lines is almost always a quote
                # that is never closed.
                raise DataError(
                    f"{label}: a quoted field in the record that starts on line {opened} "
                    f"runs past {limit:,} characters, over lines {opened}-{records.line_num}:"
                    " a quote left open?"
                ) from err
            raise DataError(
                f"{label}: line {opened} has a field longer than {limit:,} characters"
            ) from err
        raise DataError(f"{label}: not a readable CSV ({_one_line(err)})") from err

    header = header or []
    _check_separator(header, first_row, label)
    _check_header(header, label)
    lines = RowLines(np.array(first, dtype=np.int64), np.array(last, dtype=np.int64))
    wrong = np.flatnonzero(np.array(widths, dtype=np.int64) != len(header))
    if len(wrong):
        row = int(wrong[0])
        raise DataError(
            f"{label}: {_where(row, lines)} has {widths[row]} fields,"
            f" the header has {len(header)}"
        )
    return lines


def _check_quotes_closed(tail: list[str], start: int, label: str) -> None:
    """Refuse a file that ends inside a quoted field, naming the line its quote opens.

    ``tail`` holds the lines of the last record, which begins on line ``start``. The csv
    module reads an open field to the end of the file without a word, leaving a record
    that looks merely short (or right); pandas refuses it, counting records, not lines.
    A line added after the file tells them apart: an open field takes it in, a closed
    record leaves it a record of its own.
    """
    probe = "end"
    records = list(csv.reader([*tail, probe]))
    if len(records) > 1:
        return
    # The open field holds everything from its quote to the end of the file, every line
    # break included (an escaped quote "" holds none): count back from the last line.
    field = records[0][-1].removesuffix(probe)
    line = start + _line_breaks("".join(tail)) - _line_breaks(field)
    raise DataError(
        f"{label}: the quoted field that starts on line {line} is never closed"
        " (no closing quote before the end of the file)"
    )


def _line_breaks(text: str) -> int:
    """How many lines ``text`` ends (CR LF, CR or LF each end one, as the csv module reads)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _check_separator(header: list[str], first_row: list[str], label: str) -> None:
    """Refuse a file separated by semicolons or tabs, which a one-field header gives away:
    its rows would otherwise be named for their field counts, with no word on why.

    The first row must hold the separator too (when there is one): a title line above a
    comma table, or a one-column file of names, can hold a semicolon by chance.
    """
    if len(header) != 1:
        return
    lines = [header[0], ",".join(first_row)] if first_row else [header[0]]
    for separator, name in _OTHER_SEPARATORS.items():
        if all(separator in line for line in lines):
            raise DataError(
                f"{label}: seems to be separated by {name}, not commas: expected a"
                " comma-separated file"
            )


def _check_header(header: list[str], label: str) -> None:
    """Refuse a column the job uses named twice: pandas would read the second as Age.1."""
    for name in ("PassengerId", TARGET, *FEATURES):
        places = [i + 1 for i, column in enumerate(header) if column == name]
        if len(places) > 1:
            raise DataError(
                f"{label}: column {name} appears {len(places)} times in the header (columns"
                f" {', '.join(map(str, places))}): keep one"
            )


def _check_not_compressed(raw: bytes, label: str) -> None:
    """Refuse a gzip or zip file by its first bytes, before they are read as text."""
    for start, kind in _COMPRESSED_STARTS:
        if raw.startswith(start):
            raise DataError(
                f"{label}: is {kind}-compressed, expected a plain CSV file: decompress it"
                " first"
            )


def _check_line_lengths(raw: bytes, label: str) -> None:
    """Refuse a line longer than ``MAX_LINE_BYTES``, naming it and its length."""
    data = np.frombuffer(raw, dtype=np.uint8)
    breaks = np.flatnonzero((data == ord("\n")) | (data == ord("\r")))
    starts = np.concatenate(([0], breaks + 1))
    lengths = np.concatenate((breaks, [len(raw)])) - starts
    longest = int(lengths.argmax())
    if lengths[longest] > MAX_LINE_BYTES:
        line = _line_at(raw, int(starts[longest]))
        raise DataError(
            f"{label}: line {line} is {int(lengths[longest]):,} bytes long, more than"
            f" {MAX_LINE_BYTES:,}: expected a CSV table with one passenger per line"
        )


def _line_at(raw: bytes, offset: int) -> int:
    """The 1-based line of byte ``offset``, counting line ends as the csv module does.

    \r\n, \r and \n each end a line, so old Mac files are not one long line.
    """
    before = raw[:offset]
    return before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1


def _decode(raw: bytes, label: str) -> str:
    """Decode UTF-8 (a BOM is allowed), naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = _line_at(raw, err.start)
        bad = raw[err.start:err.end]
        raise DataError(
            f"{label}: line {line} is not UTF-8 (byte {bad!r} at offset {err.start});"
            " save the file as UTF-8"
        ) from err


def _checked(
    frame: pd.DataFrame, label: str, *, lines: RowLines | None = None
) -> pd.DataFrame:
    """Return a copy of ``frame`` with numeric columns as numbers, or raise DataError.

    ``lines`` (from :func:`read_csv_table`) lets messages name the file's lines.
    """
    if len(frame.columns) and len(frame) == 0:
        raise DataError(f"{label}: has a header but no data rows")
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        raise DataError(
            f"{label}: missing required column(s) {', '.join(missing)};"
            f" found {_listed(frame.columns)}"
        )

    frame = numeric_columns(frame, NUMERIC_COLUMNS, label, lines=lines)
    frame["Sex"] = _checked_sex(frame["Sex"], label, lines=lines)
    _check_target(frame[TARGET], label, lines=lines)
    _check_ids(frame["PassengerId"], label, lines=lines)
    check_feature_ranges(frame, label, lines=lines)
    frame[TARGET] = frame[TARGET].astype("int64")
    frame["PassengerId"] = frame["PassengerId"].astype("int64")
    return frame


def numeric_columns(
    frame: pd.DataFrame, columns: tuple[str, ...], label: str, *,
    lines: RowLines | None = None,
) -> pd.DataFrame:
    """A copy of ``frame`` with ``columns`` as float64, refusing a column with no values.

    A blank is filled with its column's median later; a column without a single value
    has no median of its own, and filling it from another file would invent every value.
    """
    frame = frame.copy()
    for column in columns:
        frame[column] = _numeric(frame[column], column, label, lines=lines)
        if frame[column].isna().all():
            raise DataError(f"{label}: column {column} has no values at all")
    return frame


def _is_blank(value: object) -> bool:
    """A cell of text that read_csv would have counted as blank but for spaces around it."""
    return isinstance(value, str) and value.strip() in CSV_BLANKS


def _numeric(
    values: pd.Series, column: str, label: str, *, lines: RowLines | None = None
) -> pd.Series:
    """Convert a column to float, naming the first text or infinite value."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        # read_csv reads True/False as booleans, which to_numeric would take as 1/0.
        booleans = values.map(lambda value: isinstance(value, (bool, np.bool_)))
        if booleans.any():
            row = int(np.flatnonzero(booleans.to_numpy(dtype=bool))[0])
            raise DataError(
                f"{label}: column {column}, {_where(row, lines)}: expected a number,"
                f" got {bool(values.iloc[row])}"
            )
        # A column read as text (an integer too large for int64 makes read_csv give up on
        # the column, or one cell has spaces around it) keeps the cells read_csv counts as
        # blanks ("", "NA", ...) as text: they are blanks all the same, spaces or not.
        blank = values.map(_is_blank)
        values = values.where(~blank.to_numpy(dtype=bool))
    numbers = pd.to_numeric(values, errors="coerce")
    text = numbers.isna() & values.notna()
    if text.any():
        row = int(np.flatnonzero(text.to_numpy())[0])
        raise DataError(
            f"{label}: column {column}, {_where(row, lines)}: expected a number,"
            f" got {_shown(values.iloc[row])}"
        )
    numbers = numbers.astype("float64")
    infinite = np.isinf(numbers.to_numpy())
    if infinite.any():
        row = int(np.flatnonzero(infinite)[0])
        raise DataError(
            f"{label}: column {column}, {_where(row, lines)}: expected a finite number,"
            f" got {_shown(values.iloc[row])}"
        )
    return numbers


def _checked_sex(values: pd.Series, label: str, *, lines: RowLines | None = None) -> pd.Series:
    """The labels without spaces around them (allowed, as around numbers); only male and
    female may appear, in every row.

    A blank would be filled with the median code like the other columns, which is 0.5
    (neither) when a file has as many men as women.
    """
    values = values.map(lambda value: None if _is_blank(value)
                        else value.strip() if isinstance(value, str) else value)
    blank = values.isna().to_numpy()
    if len(blank) and blank.all():
        raise DataError(f"{label}: column Sex has no values at all")
    if blank.any():
        row = int(np.flatnonzero(blank)[0])
        raise DataError(
            f"{label}: column Sex, {_where(row, lines)}: blank, expected 'male' or 'female'"
            f" ({int(blank.sum()):,} blank row(s))"
        )
    present = values.dropna()
    unknown = sorted(set(map(str, present)) - set(SEX_CODES))
    if unknown:
        row = int(np.flatnonzero(values.map(lambda v: str(v) in unknown).to_numpy())[0])
        raise DataError(
            f"{label}: column Sex, {_where(row, lines)}: unknown label {_shown(values.iloc[row])},"
            f" expected 'male' or 'female' (unknown labels: {_listed(unknown, quote=True)})"
        )
    return values


def _check_target(values: pd.Series, label: str, *, lines: RowLines | None = None) -> None:
    """Survived is the label: every row needs a 0 or a 1."""
    wrong = ~values.isin((0.0, 1.0))
    if wrong.any():
        row = int(np.flatnonzero(wrong.to_numpy())[0])
        raise DataError(
            f"{label}: column {TARGET}, {_where(row, lines)}: expected 0 or 1,"
            f" got {_shown(values.iloc[row])}"
        )


def _check_ids(values: pd.Series, label: str, *, lines: RowLines | None = None) -> None:
    """PassengerId names rows in every table downstream: whole numbers, none blank, unique."""
    too_large = (values.abs() >= MAX_PASSENGER_ID).to_numpy()
    wrong = (values.isna() | (values != np.floor(values))).to_numpy() | too_large
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        expected = "a whole number below 2**53 (larger ids are not exact as numbers)" \
            if too_large[row] else "a whole number"
        raise DataError(
            f"{label}: column PassengerId, {_where(row, lines)}: expected {expected},"
            f" got {_shown(values.iloc[row])}"
        )
    repeated = values.duplicated().to_numpy()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        first = int(np.flatnonzero((values == values.iloc[row]).to_numpy())[0])
        raise DataError(
            f"{label}: column PassengerId, {_where(row, lines)}: id {int(values.iloc[row])} is"
            f" also on {_where(first, lines)}; every passenger needs an id of their own"
        )


def check_feature_ranges(
    frame: pd.DataFrame, label: str, *, lines: RowLines | None = None
) -> None:
    """Pclass is 1, 2 or 3; Age, SibSp and Fare are from 0 to ``MAX_VALUES``; SibSp counts
    people.

    Blanks are filled later.
    """
    wrong_class = frame["Pclass"].notna() & ~frame["Pclass"].isin((1.0, 2.0, 3.0))
    if wrong_class.any():
        row = int(np.flatnonzero(wrong_class.to_numpy())[0])
        raise DataError(
            f"{label}: column Pclass, {_where(row, lines)}: expected 1, 2 or 3,"
            f" got {_shown(frame['Pclass'].iloc[row])}"
        )
    for column in ("Age", "SibSp", "Fare"):
        negative = (frame[column] < 0).to_numpy()
        if negative.any():
            row = int(np.flatnonzero(negative)[0])
            raise DataError(
                f"{label}: column {column}, {_where(row, lines)}: expected a number >= 0,"
                f" got {_shown(frame[column].iloc[row])}"
            )
        implausible = (frame[column] > MAX_VALUES[column]).to_numpy()
        if implausible.any():
            row = int(np.flatnonzero(implausible)[0])
            raise DataError(
                f"{label}: column {column}, {_where(row, lines)}: expected at most"
                f" {MAX_VALUES[column]:,.0f}, got {_shown(frame[column].iloc[row])}"
            )
    fractional = (frame["SibSp"] % 1 != 0).to_numpy() & frame["SibSp"].notna().to_numpy()
    if fractional.any():
        row = int(np.flatnonzero(fractional)[0])
        raise DataError(
            f"{label}: column SibSp, {_where(row, lines)}: expected a whole number of siblings and"
            f" spouses, got {_shown(frame['SibSp'].iloc[row])}"
        )


def _where(row: int, lines: RowLines | None = None) -> str:
    """Name a 0-based row as a 1-based data row and the lines of the file it is on.

    A record over several lines names them all ("lines 3-4"): its bad value is on one
    of them. Without ``lines`` (a table not read from a file, or one that pandas and the
    csv module split into rows differently) only the row is named.
    """
    if lines is None:
        return f"row {row + 1}"
    first, last = int(lines.first[row]), int(lines.last[row])
    on = f"line {first}" if first == last else f"lines {first}-{last}"
    return f"row {row + 1} ({on})"


def _shown(value: object) -> str:
    """Write a cell the way it would read in the file: 2 not 2.0, a blank not nan."""
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "a blank"
        # 1e308 is a whole number too: written out, it would take 309 digits.
        if float(value).is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(float(value))
    return _clipped(repr(value))


def _clipped(text: str) -> str:
    """``text`` cut to ``MAX_SHOWN_CHARS`` characters, saying how long it was."""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS]}... ({len(text):,} characters)"


def _listed(names: object, *, quote: bool = False, most: int = 12) -> str:
    """Up to ``most`` names, each on one line and clipped, then how many more there were."""
    names = [str(name) for name in names]
    shown = [_clipped(repr(name) if quote else repr(name)[1:-1]) for name in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def _one_line(reason: object) -> str:
    """Keep the first line of a library's message so ours stays on one line."""
    lines = str(reason).strip().splitlines()
    return lines[0].strip() if lines else type(reason).__name__


def check_kaggle_train(frame: pd.DataFrame, path: str | Path) -> None:
    """Check that ``frame`` is Kaggle's ``train.csv``, as a download must be.

    Parameters
    ----------
    frame
        The table as read by :func:`load_titanic`.
    path
        The file or URL it came from, named in the message.

    Raises
    ------
    DataError
        If the columns are not Kaggle's twelve, the table does not have 891
        rows, or it does not list 342 survivors.
    """
    missing = [name for name in KAGGLE_COLUMNS if name not in frame.columns]
    extra = [str(name) for name in frame.columns if name not in KAGGLE_COLUMNS]
    if missing or extra:
        raise DataError(
            f"{path}: not Kaggle's train.csv: missing column(s) {', '.join(missing) or 'none'},"
            f" unexpected column(s) {', '.join(extra) or 'none'}"
        )
    if len(frame) != KAGGLE_ROWS:
        raise DataError(
            f"{path}: not Kaggle's train.csv: {len(frame)} rows, expected {KAGGLE_ROWS}"
        )
    survivors = int((pd.to_numeric(frame[TARGET], errors="coerce") == 1).sum())
    if survivors != KAGGLE_SURVIVORS:
        raise DataError(
            f"{path}: not Kaggle's train.csv: {survivors} survivors, expected {KAGGLE_SURVIVORS}"
        )


# ---------------------------------------------------------------------------
# Preparation


@dataclass(frozen=True, eq=False)
class TitanicData:
    """The prepared table: normalised features, labels and the article's split.

    Attributes
    ----------
    features
        ``(N, 5)`` float32, every column min-max scaled to [0, 1].
    labels
        ``(N,)`` float32, 1.0 for a survivor.
    passenger_ids
        ``(N,)`` int64, Kaggle's PassengerId of each row.
    train_index, test_index
        Positions of the training and test rows (they share one row).
    mean_baseline
        ``(5,)`` float32, the mean of each normalised feature over all rows.
    feature_names
        The names of the feature columns, in order.
    source
        The file the table came from.
    """

    features: torch.Tensor
    labels: torch.Tensor
    passenger_ids: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray
    mean_baseline: torch.Tensor
    feature_names: tuple[str, ...]
    source: Path

    @property
    def train_features(self) -> torch.Tensor:
        """``(len(train_index), 5)`` features of the training rows."""
        return self.features[torch.from_numpy(self.train_index)]

    @property
    def test_features(self) -> torch.Tensor:
        """``(len(test_index), 5)`` features of the test rows."""
        return self.features[torch.from_numpy(self.test_index)]

    @property
    def train_labels(self) -> torch.Tensor:
        """``(len(train_index),)`` labels of the training rows."""
        return self.labels[torch.from_numpy(self.train_index)]

    @property
    def test_labels(self) -> torch.Tensor:
        """``(len(test_index),)`` labels of the test rows."""
        return self.labels[torch.from_numpy(self.test_index)]

    @property
    def test_passenger_ids(self) -> np.ndarray:
        """PassengerId of each test row."""
        return self.passenger_ids[self.test_index]


def prepare_titanic(frame: pd.DataFrame, source: Path = REPO_DATA) -> TitanicData:
    """Prepare a Titanic table exactly as the article did.

    Parameters
    ----------
    frame
        A table with the columns of :func:`load_titanic` (it is checked again).
    source
        The file the table came from, kept for reports and error messages.

    Returns
    -------
    TitanicData
        Features, labels, ids, the split and the mean baseline.

    Raises
    ------
    DataError
        If the table misses columns or holds values the article cannot use.
    """
    source = Path(source)
    frame = _checked(frame, str(source))

    table = frame[[TARGET, *FEATURES]].copy()
    table["Sex"] = table["Sex"].map(SEX_CODES)
    table = table.astype("float64")
    table = table.fillna(table.median())

    # Min-max over the whole file, as the article did (test rows included).
    # A constant column has no range: it becomes zeros instead of 0/0 = NaN.
    low, high = table.min(), table.max()
    span = (high - low).replace(0.0, 1.0)
    scaled = (table - low) / span

    features = torch.tensor(scaled[list(FEATURES)].to_numpy(), dtype=torch.float32)
    # The labels come from the raw 0/1 column: scaling is the identity when both
    # classes occur, and a one-class file must not turn its 1s into 0s.
    labels = torch.tensor(frame[TARGET].to_numpy(), dtype=torch.float32)

    # The article's split: rows 0..int(0.8 n) inclusive for training (label
    # slicing is inclusive) and rows int(0.8 n).. for testing, so the row at
    # int(0.8 n) is in both. Kept on purpose to reproduce its numbers.
    n = len(scaled)
    cut = int(0.8 * n)
    train_index = np.arange(0, min(cut + 1, n))
    test_index = np.arange(cut, n)
    _warn_of_one_class(labels[train_index], source)

    return TitanicData(
        features=features,
        labels=labels,
        passenger_ids=frame["PassengerId"].to_numpy().astype(np.int64),
        train_index=train_index,
        test_index=test_index,
        mean_baseline=features.mean(dim=0),
        feature_names=FEATURES,
        source=source,
    )


def _warn_of_one_class(train_labels: torch.Tensor, source: Path) -> None:
    """Training still runs on one class, but the network can only learn to predict it."""
    classes = train_labels.unique()
    if len(classes) == 1:
        logger.warning(
            "%s: every one of the %d training rows has %s = %d, so the network learns to "
            "predict that for everyone and the attributions say little about survival",
            source, len(train_labels), TARGET, int(classes[0]),
        )


# ---------------------------------------------------------------------------
# Batching


class TitanicDataModule(pl.LightningDataModule):
    """Batches of the prepared table for Lightning.

    Parameters
    ----------
    data
        The prepared table.
    batch_size
        Rows per batch; the article used 512.
    seed
        Seeds the shuffling of the training rows, so a run can be repeated.
    """

    def __init__(self, data: TitanicData, batch_size: int = 512, seed: int = 404) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        """Shuffled training rows, the same order for the same seed."""
        generator = torch.Generator().manual_seed(self.seed)
        dataset = TensorDataset(self.data.train_features, self.data.train_labels)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=True, generator=generator, num_workers=0
        )

    def val_dataloader(self) -> DataLoader:
        """The test rows with labels, in file order."""
        return self._test_rows()

    def test_dataloader(self) -> DataLoader:
        """The test rows with labels, in file order."""
        return self._test_rows()

    def predict_dataloader(self) -> DataLoader:
        """The test rows without labels, in file order."""
        dataset = TensorDataset(self.data.test_features)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def _test_rows(self) -> DataLoader:
        dataset = TensorDataset(self.data.test_features, self.data.test_labels)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)
