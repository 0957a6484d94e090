"""Property-based fuzzing of the two front doors: the CSV loader and the API's arguments.

Whatever comes in, the outcome is one of two things: an ``EngineError`` subclass (with a
one-line message), or a result of exactly the promised shape and dtype. Any other
exception is a bug that would reach the user as a traceback.

Inputs the fuzzing once found escaping as other exceptions are pinned down as plain
tests at the end, each with the smallest input found.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from engine import integrated_gradients
from engine.data import REQUIRED_COLUMNS, load_titanic, prepare_titanic
from engine.errors import DataError, EngineError
from engine.quadrature import METHODS

FUZZ = settings(
    max_examples=250, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------------------
# The CSV loader

ANY_CELL = st.one_of(
    st.integers(-3, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "male", "female", "nan", "NA", "inf", "-inf", "True", "False",
                     "1e400", "0x10", "1,5", " 3 ", '"', "\n", "1e30", "99999999999999999999"]),
    st.text(max_size=8),
)
VALID_CELL = {
    "PassengerId": st.integers(1, 10**6).map(str),
    "Survived": st.sampled_from(["0", "1"]),
    "Pclass": st.sampled_from(["1", "2", "3", ""]),
    "Sex": st.sampled_from(["male", "female"]),  # a blank Sex is refused
    "Age": st.one_of(st.just(""), st.floats(0, 90).map(repr)),
    "SibSp": st.integers(0, 8).map(str),
    "Fare": st.one_of(st.just(""), st.floats(0, 600).map(repr)),
}


def _csv_bytes(columns: list[str], rows: list[list[str]], encoding: str = "utf-8") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue().encode(encoding, errors="replace")


@st.composite
def random_tables(draw) -> bytes:
    """Any columns (required or not), any cells, in one of several encodings."""
    columns = draw(st.lists(
        st.one_of(st.sampled_from([*REQUIRED_COLUMNS, "Name", "Parch"]), st.text(max_size=5)),
        max_size=9,
    ))
    rows = draw(st.lists(st.lists(ANY_CELL, min_size=len(columns), max_size=len(columns)),
                         max_size=6))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return _csv_bytes(columns, rows, encoding)


@st.composite
def nearly_valid_tables(draw) -> bytes:
    """The required columns in any order, valid cells with about one in 30 spoiled."""
    columns = draw(st.permutations([*REQUIRED_COLUMNS, "Name"]))
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        rows.append([
            draw(ANY_CELL) if draw(st.integers(0, 29)) == 0
            else draw(VALID_CELL.get(column, st.text(max_size=6)))
            for column in columns
        ])
    return _csv_bytes(columns, rows)


@st.composite
def valid_tables(draw) -> tuple[list[str], list[list[str]]]:
    """Well-formed files: blanks only where the article fills them, first row complete."""
    columns = draw(st.permutations([*REQUIRED_COLUMNS, "Name"]))
    full = {**VALID_CELL, "Pclass": st.sampled_from(["1", "2", "3"]),
            "Age": st.floats(0, 90).map(repr), "Fare": st.floats(0, 600).map(repr),
            "Sex": st.sampled_from(["male", "female"])}
    rows = [[draw(full.get(column, st.text(max_size=6))) for column in columns]]
    for _ in range(draw(st.integers(0, 6))):
        rows.append([draw(VALID_CELL.get(column, st.text(max_size=6))) for column in columns])
    # Every passenger has an id of their own.
    ids = draw(st.lists(st.integers(1, 10**6), min_size=len(rows), max_size=len(rows),
                        unique=True))
    for row, passenger in zip(rows, ids):
        row[columns.index("PassengerId")] = str(passenger)
    return list(columns), rows


def _load_or_refuse(folder: Path, raw: bytes) -> None:
    """Load ``raw``; a refusal must be a one-line DataError, a success must be usable."""
    path = folder / "fuzz.csv"
    path.write_bytes(raw)
    try:
        frame = load_titanic(path)
    except DataError as error:
        assert "\n" not in str(error)
        event("refused")
        return
    event("loaded")

    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    for column in ("Pclass", "Age", "SibSp", "Fare"):
        assert frame[column].dtype == np.float64, column
        assert not np.isinf(frame[column]).any(), column
    assert frame["Survived"].dtype == np.int64 and set(frame["Survived"]) <= {0, 1}
    assert frame["PassengerId"].dtype == np.int64
    assert set(frame["Sex"].dropna()) <= {"male", "female"}

    data = prepare_titanic(frame, source=path)
    assert data.features.shape == (len(frame), 5)
    assert bool(torch.isfinite(data.features).all())
    assert 0.0 <= float(data.features.min()) and float(data.features.max()) <= 1.0


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_load_or_raise_data_error(tmp_path, raw):
    _load_or_refuse(tmp_path, raw)


@FUZZ
@given(raw=random_tables())
def test_random_tables_load_or_raise_data_error(tmp_path, raw):
    _load_or_refuse(tmp_path, raw)


@FUZZ
@given(raw=nearly_valid_tables())
def test_nearly_valid_tables_load_with_the_right_columns_or_raise_data_error(tmp_path, raw):
    _load_or_refuse(tmp_path, raw)


@FUZZ
@given(table=valid_tables())
def test_valid_tables_load_with_every_number_as_written(tmp_path, table):
    columns, rows = table
    path = tmp_path / "valid.csv"
    path.write_bytes(_csv_bytes(columns, rows))

    frame = load_titanic(path)

    assert len(frame) == len(rows)
    for column in ("PassengerId", "Survived", "Pclass", "Age", "SibSp", "Fare"):
        written = [row[columns.index(column)] for row in rows]
        expected = [float(cell) if cell else np.nan for cell in written]
        np.testing.assert_array_equal(frame[column].to_numpy(dtype=float), expected)
    assert list(frame["Sex"]) == [row[columns.index("Sex")] for row in rows]


# ---------------------------------------------------------------------------
# The API's argument checks


class AnyShapeModel(nn.Module):
    """Sums tanh over every feature; returns (N, classes), or (N,) when ``flat``."""

    def __init__(self, classes: int, flat: bool) -> None:
        super().__init__()
        self.classes, self.flat = classes, flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.tanh(x.flatten(1) if x.dim() > 1 else x.unsqueeze(1)).sum(1)
        if self.flat:
            return total
        return total.unsqueeze(1) * torch.arange(1, self.classes + 1, dtype=total.dtype)


DTYPES = st.sampled_from(
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
)


@st.composite
def api_calls(draw) -> dict:
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)

    kind = draw(st.sampled_from(["none", "scalar", "shared", "per-row", "any"]))
    if kind == "none":
        baselines = None
    elif kind == "scalar":
        baselines = draw(st.sampled_from([0, 1.5, -2, True]))
    else:
        kinds = draw(st.integers(0, 3))
        base_shape = {
            "shared": (kinds, *shape[1:]),
            "per-row": (kinds, *shape),
            "any": tuple(draw(st.lists(st.integers(0, 3), max_size=4))),
        }[kind]
        baselines = torch.zeros(base_shape, dtype=draw(DTYPES))

    target = draw(st.one_of(
        st.none(), st.integers(-4, 4), st.tuples(st.integers(-3, 3)), st.booleans(),
        st.lists(st.integers(-2, 3), max_size=4),
        st.lists(st.integers(-2, 3), max_size=4).map(torch.tensor),
        st.just(torch.tensor([0.5])),
    ))
    return {
        "model": AnyShapeModel(draw(st.integers(1, 3)), flat=draw(st.booleans())),
        "inputs": inputs,
        "baselines": baselines,
        "target": target,
        "n_steps": draw(st.one_of(st.integers(-1, 5), st.sampled_from([2.0, None, True]),
                                  st.just(np.int64(3)))),
        "method": draw(st.sampled_from([*METHODS, "simpson", ""])),
        "internal_batch_size": draw(st.one_of(st.none(), st.integers(-1, 7))),
        "return_convergence_delta": draw(st.booleans()),
    }


def _n_kinds(baselines: object) -> int:
    return baselines.shape[0] if isinstance(baselines, torch.Tensor) else 1


@FUZZ
@given(call=api_calls())
def test_api_raises_engine_error_or_returns_the_promised_shape(call):
    model, inputs = call.pop("model"), call.pop("inputs")
    baselines = call.pop("baselines")

    try:
        result = integrated_gradients(model, inputs, baselines, **call)
    except EngineError as error:
        assert "\n" not in str(error)
        event(f"refused: {type(error).__name__}")
        return
    event("attributed")

    attributions, delta = result if call["return_convergence_delta"] else (result, None)
    n_kinds = _n_kinds(baselines)
    assert tuple(attributions.shape) == (n_kinds, *inputs.shape)
    assert attributions.dtype == inputs.dtype
    if delta is not None:
        assert tuple(delta.shape) == (n_kinds, inputs.shape[0])


@st.composite
def valid_api_calls(draw) -> dict:
    """Calls the documentation promises to answer: every argument in range."""
    n_rows = draw(st.integers(1, 3))
    features = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    inputs = torch.randn((n_rows, *features), generator=torch.Generator().manual_seed(seed))
    model = AnyShapeModel(draw(st.integers(1, 3)), flat=draw(st.booleans()))

    kinds = draw(st.integers(1, 3))
    # Tensor baselines share the inputs' dtype: a mismatch is refused, not converted.
    baselines = draw(st.sampled_from([
        None, 0.5, torch.rand(kinds, *features).to(dtype),
        torch.rand(kinds, n_rows, *features).to(dtype),
    ]))
    targets = [None] if model.flat or model.classes == 1 else [
        draw(st.integers(0, model.classes - 1)),
        (draw(st.integers(0, model.classes - 1)),),
        draw(st.lists(st.integers(0, model.classes - 1), min_size=n_rows, max_size=n_rows)),
    ]
    return {
        "model": model,
        "inputs": inputs.to(dtype),
        "baselines": baselines,
        "target": draw(st.sampled_from(targets)),
        "n_steps": draw(st.integers(2, 5)),
        "method": draw(st.sampled_from(METHODS)),
        "internal_batch_size": draw(st.one_of(st.none(), st.integers(1, 7))),
        # 1-D inputs with a delta: test_one_dimensional_inputs_get_a_convergence_delta.
        "return_convergence_delta": bool(features) and draw(st.booleans()),
    }


@FUZZ
@given(call=valid_api_calls())
def test_valid_calls_return_exactly_the_promised_shape_and_dtype(call):
    model, inputs = call.pop("model"), call.pop("inputs")
    baselines = call.pop("baselines")

    result = integrated_gradients(model, inputs, baselines, **call)

    attributions, delta = result if call["return_convergence_delta"] else (result, None)
    assert tuple(attributions.shape) == (_n_kinds(baselines), *inputs.shape)
    assert attributions.dtype == inputs.dtype
    assert bool(torch.isfinite(attributions).all())
    if delta is not None:
        assert tuple(delta.shape) == (_n_kinds(baselines), inputs.shape[0])


# ---------------------------------------------------------------------------
# Found by the fuzzing above, now refused with an EngineError


def _two_class_model() -> nn.Module:
    return nn.Linear(3, 2)


@pytest.mark.parametrize("target", [2, (5,), -3], ids=["int", "tuple", "negative"])
def test_target_out_of_range_is_refused(target):
    with pytest.raises(EngineError):
        integrated_gradients(_two_class_model(), torch.randn(2, 3), target=target)


@pytest.mark.parametrize("target", [[0, 2], torch.tensor([0, -3])], ids=["too-big", "negative"])
def test_per_row_target_out_of_range_is_refused(target):
    with pytest.raises(EngineError):
        integrated_gradients(_two_class_model(), torch.randn(2, 3), target=target)


def test_target_on_a_flat_output_is_refused():
    with pytest.raises(EngineError):
        integrated_gradients(lambda x: x.sum(1), torch.randn(2, 3), target=0)


def test_zero_baseline_kinds_are_refused():
    with pytest.raises(EngineError):
        integrated_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.zeros(0, 3))


def test_inputs_without_features_are_refused():
    with pytest.raises(EngineError):
        integrated_gradients(lambda x: x.sum(1, keepdim=True), torch.randn(2, 0))


def test_one_dimensional_inputs_get_a_convergence_delta():
    inputs = torch.randn(4, dtype=torch.float64)

    attributions, delta = integrated_gradients(
        lambda x: 2 * x, inputs, return_convergence_delta=True
    )

    assert attributions.shape == (1, 4) and delta.shape == (1, 4)


def test_negative_per_row_targets_count_from_the_end_like_an_int_target():
    model, inputs = _two_class_model(), torch.randn(2, 3)

    from_end = integrated_gradients(model, inputs, target=torch.tensor([0, -1]))
    explicit = integrated_gradients(model, inputs, target=[0, 1])

    torch.testing.assert_close(from_end, explicit, rtol=0, atol=0)
