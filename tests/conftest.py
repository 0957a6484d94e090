"""Fixtures shared by the test files."""

import os
import threading
from pathlib import Path

import pytest

from engine.data import locate_titanic_csv
from engine.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def titanic_csv(repo_root: Path) -> Path:
    """Kaggle's Titanic train.csv: data/train.csv, else what the package finds or downloads."""
    in_repo = repo_root / "data" / "train.csv"
    if in_repo.is_file():
        return in_repo
    # A fresh machine: the package's own search (user cache, then the public download).
    try:
        return locate_titanic_csv()
    except DataError as error:
        pytest.fail(f"Kaggle's Titanic train.csv is needed for the tests: {error}")


@pytest.fixture
def named_pipe(tmp_path: Path):
    """A named pipe (FIFO), ``pipe.csv``, that cannot hang the test that reads it.

    Opening a pipe to read waits for a writer. While the test runs, a thread keeps trying
    to open the other end without waiting, which succeeds only once a reader is waiting;
    it closes it at once, so a reader sees an empty file instead of blocking forever.
    """
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    finished = threading.Event()

    def release_readers() -> None:
        while not finished.wait(0.05):
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # ENXIO: nobody is reading

    thread = threading.Thread(target=release_readers, daemon=True)
    thread.start()
    yield pipe
    finished.set()
    thread.join()


@pytest.fixture(scope="session")
def digits_cnn():
    """scikit-learn's digits and the small CNN trained on them for a few seconds (seeded)."""
    from engine.digits import load_digits_data, train_digits_cnn

    data = load_digits_data(seed=0)
    return train_digits_cnn(data, epochs=5, seed=0), data
