"""The engine on the article's own model and data, against Captum and a float64 loop."""

import copy

import pytest

from engine import integrated_gradients
from engine.baselines import BASELINE_KINDS, make_baselines
from engine.data import load_titanic, prepare_titanic
from engine.model import train_titanic
from engine.validate import captum_attributions
from tests.test_core import reference_ig, relative_error


@pytest.fixture(scope="module")
def trained(titanic_csv):
    data = prepare_titanic(load_titanic(titanic_csv), source=titanic_csv)
    net = train_titanic(data, epochs=3, seed=404).net.eval()
    baselines = make_baselines(BASELINE_KINDS, data.mean_baseline, seed=404)
    return net, data.test_features, baselines


@pytest.mark.parametrize("layer_order", ["article", "conventional"])
def test_article_model_float32_equals_captum(trained, layer_order):
    net, x, baselines = trained
    net = copy.deepcopy(net)
    net.layer_order = layer_order

    actual = integrated_gradients(net, x, baselines, n_steps=50)
    expected = captum_attributions(net, x, baselines, target=None, n_steps=50,
                                   method="gausslegendre")

    assert actual.shape == (4, 179, 5)
    assert relative_error(actual, expected) <= 1e-5


def test_article_model_float64_equals_captum_to_its_weight_rounding(trained):
    net, x, baselines = trained
    net64, x64, baselines64 = copy.deepcopy(net).double(), x.double(), baselines.double()

    actual = integrated_gradients(net64, x64, baselines64, n_steps=50)
    expected = captum_attributions(net64, x64, baselines64, target=None, n_steps=50,
                                   method="gausslegendre")

    assert relative_error(actual, expected) <= 1e-6


def test_article_model_float64_equals_reference_loop(trained):
    net, x, baselines = trained
    net64 = copy.deepcopy(net).double()
    rows = x[:6].double()

    actual = integrated_gradients(net64, rows, baselines.double(), n_steps=8,
                                  method="riemann_trapezoid")
    expected = reference_ig(net64, rows, baselines.double(), None, "riemann_trapezoid", 8)

    assert relative_error(actual, expected) <= 1e-10


def test_article_model_completeness_gap_shrinks_with_steps(trained):
    net, x, baselines = trained
    net64, rows = copy.deepcopy(net).double(), x[:40].double()

    gaps = []
    for n_steps in (100, 1600):
        _, delta = integrated_gradients(net64, rows, baselines.double(), n_steps=n_steps,
                                        method="riemann_middle", return_convergence_delta=True)
        gaps.append(float(delta.abs().max()))

    # PReLU makes the gradient jump along the path, so every rule converges only as 1/n:
    # 16x the steps must shrink the worst gap by well over 8x.
    assert gaps[1] < gaps[0] / 8
    assert gaps[1] < 1e-3
