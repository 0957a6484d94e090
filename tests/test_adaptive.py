"""Adaptive steps and the quadrature error estimate."""

import copy

import pytest
import torch

from engine import IGResult, integrated_gradients
from engine.baselines import BASELINE_KINDS, make_baselines
from engine.data import load_titanic, prepare_titanic
from engine.digits import digits_baselines
from engine.errors import ArgumentError
from engine.model import train_titanic
from tests.test_core import mlp


@pytest.fixture(scope="module")
def titanic(titanic_csv):
    data = prepare_titanic(load_titanic(titanic_csv), source=titanic_csv)
    net = train_titanic(data, epochs=3, seed=404).net.eval().double()
    kinds = make_baselines(BASELINE_KINDS, data.mean_baseline, seed=404).double()
    rows = data.test_features[:40].double()
    # Per-row layout (B, N, 5), so that any subset of pairs can be recomputed alone.
    return net, rows, kinds.unsqueeze(1).expand(-1, len(rows), -1), None


@pytest.fixture(scope="module")
def digits(digits_cnn):
    net, data = digits_cnn
    net = copy.deepcopy(net).double()
    images = data.test_images[:25].double()
    with torch.no_grad():
        target = net(images).argmax(1)
    return net, images, digits_baselines(images), target


def uniform_delta(net, x, baselines, target, n_steps, kinds, rows):
    """|delta| of uniform n_steps on the given (kind, row) pairs, as a flat tensor."""
    _, delta = integrated_gradients(
        net, x[rows], baselines[kinds, rows].unsqueeze(0),
        target=None if target is None else target[rows], n_steps=n_steps,
        return_convergence_delta=True,
    )
    return delta.abs().flatten()


def assert_no_uniform_rule_as_cheap(net, x, baselines, target, result, tolerance, first):
    """No uniform n_steps with at most the adaptive total of points meets the tolerance.

    A uniform n costs n per pair, so only n <= total / pairs could be as cheap; each such n
    must leave at least one pair above the tolerance. The three worst pairs of the last
    full evaluation are tried first, the whole job only when all three pass.
    """
    n_pairs = result.n_steps.numel()
    kinds, rows = (axis.flatten() for axis in torch.meshgrid(
        torch.arange(result.n_steps.shape[0]), torch.arange(result.n_steps.shape[1]),
        indexing="ij"))
    witnesses = None
    for n_steps in range(first, result.total_points // n_pairs + 1):
        if witnesses is not None:
            few = uniform_delta(net, x, baselines, target, n_steps, kinds[witnesses],
                                rows[witnesses])
            if float(few.max()) > tolerance:
                continue
        deltas = uniform_delta(net, x, baselines, target, n_steps, kinds, rows)
        assert float(deltas.max()) > tolerance, f"uniform n_steps={n_steps} suffices"
        witnesses = deltas.topk(3).indices


@pytest.mark.parametrize(("workload", "first", "tolerance"),
                         [("titanic", 8, 1e-2), ("digits", 4, 1e-2)])
def test_adaptive_steps_beat_every_uniform_rule_that_reaches_the_tolerance(
    request, workload, first, tolerance
):
    net, x, baselines, target = request.getfixturevalue(workload)

    result = integrated_gradients(net, x, baselines, target=target, n_steps=first,
                                  delta_tolerance=tolerance, max_steps=64 * first)

    assert bool(result.converged.all())
    assert float(result.delta.abs().max()) <= tolerance
    # Most pairs stop early; only a few need many steps.
    assert float((result.n_steps == first).float().mean()) >= 0.1
    assert int(result.n_steps.max()) >= 8 * first
    assert_no_uniform_rule_as_cheap(net, x, baselines, target, result, tolerance, first)


def test_adaptive_result_equals_a_plain_call_at_each_pairs_steps():
    torch.manual_seed(30)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1)).double().eval()
    x = torch.randn(12, 3, dtype=torch.float64)
    baselines = torch.randn(2, 3, dtype=torch.float64)

    result = integrated_gradients(model, x, baselines, n_steps=4, delta_tolerance=1e-3,
                                  max_steps=256)

    for kind in range(2):
        for row in range(12):
            steps = int(result.n_steps[kind, row])
            plain = integrated_gradients(model, x[row : row + 1], baselines[kind : kind + 1],
                                         n_steps=steps)
            torch.testing.assert_close(result.attributions[kind, row], plain[0, 0],
                                       rtol=1e-12, atol=1e-14)


def test_total_points_count_every_level():
    torch.manual_seed(31)
    model = mlp(3, 8, 1)
    x = torch.randn(6, 3, dtype=torch.float64)
    calls = []

    def counted(points):
        calls.append(points.shape[0])
        return model(points)

    result = integrated_gradients(counted, x, torch.zeros(1, 3, dtype=torch.float64),
                                  n_steps=2, delta_tolerance=1e-9, max_steps=64,
                                  internal_batch_size=10_000)

    # A given internal_batch_size skips the planner's probe forwards. Every other forward
    # is part of an integral: the row-coupling probe (the six rows, a baseline and a point
    # of a path, then another point and a row, then a baseline and five rows) and the
    # endpoints (each row at x, and the shared baseline once: the probe found the rows
    # independent).
    assert result.total_points == sum(calls) - (8 + 2 + 6) - (6 + 1)
    assert isinstance(result, IGResult)


def test_unreached_tolerance_is_reported_not_hidden(caplog):
    torch.manual_seed(32)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1)).double().eval()
    x = torch.randn(8, 3, dtype=torch.float64)

    result = integrated_gradients(model, x, n_steps=2, delta_tolerance=1e-12, max_steps=8)

    assert not bool(result.converged.all())
    assert int(result.n_steps.max()) == 8
    assert "still have |delta|" in caplog.text


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_error_estimate_tracks_the_true_error_on_a_smooth_model(method):
    torch.manual_seed(33)
    model = mlp(4, 16, 1)
    x = torch.randn(10, 4, dtype=torch.float64)
    baselines = torch.randn(2, 4, dtype=torch.float64)
    exact = integrated_gradients(model, x, baselines, n_steps=256)

    result = integrated_gradients(model, x, baselines, n_steps=4, method=method,
                                  error_estimate=True)

    true_error = (result.attributions - exact).abs().sum(-1)
    # For a convergent rule |A(n) - A(2n)| approaches the error of A(n) as n grows; at
    # n = 4 it is within a factor of two either way.
    ratio = result.error_estimate / true_error
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all())
    assert result.total_points == 2 * 10 * (4 + 8)


def test_error_estimate_leaves_the_attributions_unchanged():
    torch.manual_seed(34)
    model = mlp(4, 8, 2)
    x = torch.randn(5, 4, dtype=torch.float64)

    plain = integrated_gradients(model, x, target=1, n_steps=10)
    result = integrated_gradients(model, x, target=1, n_steps=10, error_estimate=True)

    torch.testing.assert_close(result.attributions, plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delta_tolerance": 0.0}, "delta_tolerance must be > 0"),
        ({"delta_tolerance": "small"}, "delta_tolerance must be a number"),
        ({"delta_tolerance": 1e-3, "max_steps": 4}, "max_steps=4 is below n_steps=8"),
        ({"delta_tolerance": 1e-3, "max_steps": 64.0}, "max_steps must be an integer"),
    ],
)
def test_bad_adaptive_arguments_are_named(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        integrated_gradients(torch.nn.Linear(3, 1), torch.randn(2, 3), n_steps=8, **kwargs)
