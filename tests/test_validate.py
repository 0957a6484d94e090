"""The check against Captum, and the float64 run that settles a disagreement."""

import pytest
import torch

import engine.validate
from engine import integrated_gradients
from engine.validate import compare_with_captum
from tests.test_core import mlp


@pytest.fixture()
def job():
    torch.manual_seed(3)
    model = mlp(4, 16, 1, dtype=torch.float32).eval()
    x = torch.randn(12, 4)
    baselines = torch.stack([torch.zeros(4), x.mean(0)])
    return model, x, baselines, integrated_gradients(model, x, baselines, n_steps=20)


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
