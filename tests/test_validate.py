"""The check against Captum, and the float64 run that settles a disagreement."""

import pytest
import torch

import engine.validate
from engine import integrated_gradients
from engine.validate import compare_with_captum, pairs_beyond
from tests.test_core import mlp


@pytest.fixture()
def job():
    torch.manual_seed(3)
    model = mlp(4, 16, 1, dtype=torch.float32).eval()
    x = torch.randn(12, 4)
    baselines = torch.stack([torch.zeros(4), x.mean(0)])
    return model, x, baselines, integrated_gradients(model, x, baselines, n_steps=20)


def one_pair_off(attributions, row=3):
    """The attributions with one (baseline, row) pair moved by half of itself, as a path
    point taking the other slope at a kink moves the pair it lies on."""
    moved = attributions.clone()
    moved[1, row] *= 1.5
    return moved


@pytest.fixture()
def rounded_captum(monkeypatch):
    """Captum's float32 result moved by 1e-3 of itself, as a kink taking the other slope might."""
    original = engine.validate.captum_attributions

    def captum(forward_func, inputs, baselines, **kwargs):
        result = original(forward_func, inputs, baselines, **kwargs)
        return result * (1 + 1e-3) if inputs.dtype == torch.float32 else result

    monkeypatch.setattr(engine.validate, "captum_attributions", captum)


def test_agreement_needs_no_float64_run(job):
    model, x, baselines, attributions = job

    report = compare_with_captum(model, x, baselines, attributions, 0.01, n_steps=20)

    assert report.max_rel_error <= 1e-6
    assert report.engine_vs_float64 is None
    assert report.passed


def test_captums_rounding_is_settled_by_float64(job, rounded_captum):
    model, x, baselines, attributions = job

    report = compare_with_captum(model, x, baselines, attributions, 0.01, n_steps=20)

    assert report.max_rel_error == pytest.approx(1e-3, rel=1e-2)
    assert report.engine_vs_float64 <= 1e-6
    assert report.captum_vs_float64 == pytest.approx(1e-3, rel=1e-2)
    assert report.passed
    assert report.as_dict()["engine_vs_float64"] == report.engine_vs_float64


def test_an_engine_that_is_off_still_fails(job):
    model, x, baselines, attributions = job

    report = compare_with_captum(model, x, baselines, attributions * (1 + 1e-3), 0.01,
                                 n_steps=20)

    assert report.engine_vs_float64 == pytest.approx(1e-3, rel=1e-2)
    assert report.captum_vs_float64 <= 1e-6
    assert not report.passed


def test_the_engines_rounding_is_settled_by_computing_again_in_float64(job):
    model, x, baselines, attributions = job
    calls = []

    def in_float64(model64, inputs64, baselines64):
        calls.append((next(model64.parameters()).dtype, inputs64.dtype, baselines64.dtype))
        return integrated_gradients(model64, inputs64, baselines64, n_steps=20)

    report = compare_with_captum(model, x, baselines, one_pair_off(attributions), 0.01,
                                 n_steps=20, recompute=in_float64)

    assert calls == [(torch.float64,) * 3]
    assert report.engine_vs_float64 > 1e-2
    assert report.pairs_off == 1
    assert report.recomputed
    # Captum rounds its nodes and weights to float32; the engine keeps them in float64.
    assert report.recomputed_vs_float64 <= 1e-7
    assert report.passed
    assert report.as_dict()["recomputed_vs_float64"] == report.recomputed_vs_float64
    # The model the engine ran is left in float32.
    assert next(model.parameters()).dtype == torch.float32


def test_an_engine_that_is_off_in_float64_too_still_fails(job):
    model, x, baselines, attributions = job

    report = compare_with_captum(
        model, x, baselines, one_pair_off(attributions), 0.01, n_steps=20,
        recompute=lambda *args: integrated_gradients(*args, n_steps=20) * (1 + 1e-4),
    )

    assert report.recomputed_vs_float64 == pytest.approx(1e-4, rel=1e-2)
    assert not report.passed


@pytest.mark.parametrize("how", ["two pairs", "1e-4 off", "1e-2 off", "negated", "zero"])
def test_an_engine_off_in_more_pairs_than_a_kink_moves_is_not_computed_again(job, how):
    model, x, baselines, attributions = job
    wrong = {"two pairs": one_pair_off(one_pair_off(attributions), row=7),
             "1e-4 off": attributions * (1 + 1e-4), "1e-2 off": attributions * (1 + 1e-2),
             "negated": -attributions, "zero": torch.zeros_like(attributions)}[how]

    def in_float64(*args):
        raise AssertionError("computed again")

    report = compare_with_captum(model, x, baselines, wrong, 0.01, n_steps=20,
                                 recompute=in_float64)

    assert report.kink_pairs == 1  # 24 pairs
    assert report.pairs_off == (2 if how == "two pairs" else 24)
    assert not report.recomputed
    assert not report.passed


def test_a_row_equal_to_its_baseline_is_not_counted_off_for_rounding():
    expected = torch.ones(1, 3, 4, dtype=torch.float64)
    expected[0, 1] = 0.0  # the row is the baseline: no attributions
    actual = expected.clone()
    actual[0, 1] = 1e-12  # float32 rounding of a zero

    assert pairs_beyond(actual, expected, 1e-5) == 0
    actual[0, 2, 0] += 1e-3
    assert pairs_beyond(actual, expected, 1e-5) == 1


@pytest.mark.parametrize("case", ["agreement", "captums rounding"])
def test_nothing_is_computed_again_unless_the_engine_is_off(job, request, case):
    model, x, baselines, attributions = job
    if case == "captums rounding":
        request.getfixturevalue("rounded_captum")

    def in_float64(*args):
        raise AssertionError("computed again")

    report = compare_with_captum(model, x, baselines, attributions, 0.01, n_steps=20,
                                 recompute=in_float64)

    assert not report.recomputed
    assert report.passed
