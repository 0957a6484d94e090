"""Fixtures shared by the test files."""

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


@pytest.fixture(scope="session")
def digits_cnn():
    """scikit-learn's digits and the small CNN trained on them for a few seconds (seeded)."""
    from engine.digits import load_digits_data, train_digits_cnn

    data = load_digits_data(seed=0)
    return train_digits_cnn(data, epochs=5, seed=0), data
