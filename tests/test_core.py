"""The batched kernel against an independent float64 loop and against Captum."""

import copy

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

from engine import METHODS, integrated_gradients, quadrature_rule
from engine.errors import ArgumentError, ModelError


def reference_rule(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rules written out from their definitions, independently of engine.quadrature."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (nodes + 1) / 2, weights / 2
    alphas = {
        "riemann_left": [k / n for k in range(n)],
        "riemann_right": [(k + 1) / n for k in range(n)],
        "riemann_middle": [(k + 0.5) / n for k in range(n)],
        "riemann_trapezoid": [k / (n - 1) for k in range(n)],
    }[method]
    weights = [1 / n] * n
    if method == "riemann_trapezoid":
        weights[0] = weights[-1] = 1 / (2 * n)
    return np.array(alphas), np.array(weights)


def reference_ig(model, x, baselines, target, method, n_steps):
    """One forward and one backward per (baseline, row, step), all in float64."""
    alphas, weights = reference_rule(method, n_steps)
    out = torch.zeros(len(baselines), *x.shape, dtype=torch.float64)
    for b, base in enumerate(baselines.double()):
        for n, row in enumerate(x.double()):
            for alpha, weight in zip(alphas, weights):
                point = (base + alpha * (row - base)).unsqueeze(0).requires_grad_()
                value = model(point)[0]
                value = value.reshape(-1)[0] if target is None else value[target]
                (grad,) = torch.autograd.grad(value, point)
                out[b, n] += weight * grad[0]
            out[b, n] *= row - base
    return out


def mlp(n_in: int, hidden: int, n_out: int, dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, n_out),
    ).to(dtype).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("method", METHODS)
def test_quadrature_matches_captum_definitions(method):
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(method)
    rule = quadrature_rule(method, 17)
    # Captum's Riemann alphas come from a float32 linspace: agree to float32 rounding.
    np.testing.assert_allclose(rule.alphas, alphas(17), rtol=0, atol=1e-7)
    np.testing.assert_allclose(rule.weights, step_sizes(17), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_engine_equals_float64_reference_loop(method):
    torch.manual_seed(1)
    model = mlp(4, 16, 3)
    x = torch.randn(5, 4, dtype=torch.float64)
    baselines = torch.randn(3, 4, dtype=torch.float64)

    actual = integrated_gradients(model, x, baselines, target=2, n_steps=7, method=method)
    expected = reference_ig(model, x, baselines, 2, method, 7)

    # Both sides are float64; only summation order differs.
    assert actual.shape == (3, 5, 4)
    assert relative_error(actual, expected) <= 1e-10


def captum_per_baseline(model, x, baselines, **kwargs):
    ig = IntegratedGradients(model)
    return torch.stack([ig.attribute(x, base.unsqueeze(0), **kwargs) for base in baselines])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # Captum rounds its step weights to float32, so float64 agrees to ~1e-7, not 1e-15.
    [(torch.float64, 1e-6), (torch.float32, 1e-5)],
)
def test_engine_equals_captum(method, dtype, tolerance):
    torch.manual_seed(2)
    model = mlp(6, 32, 4, dtype)
    x = torch.randn(20, 6, dtype=dtype)
    baselines = torch.randn(3, 6, dtype=dtype)

    actual = integrated_gradients(model, x, baselines, target=1, n_steps=25, method=method)
    expected = captum_per_baseline(model, x, baselines, target=1, n_steps=25, method=method)

    assert relative_error(actual, expected) <= tolerance


def test_chunking_does_not_change_the_result():
    torch.manual_seed(3)
    model = mlp(5, 8, 1)
    x = torch.randn(9, 5, dtype=torch.float64)
    baselines = torch.randn(2, 5, dtype=torch.float64)

    whole = integrated_gradients(model, x, baselines, n_steps=10)
    # 7 does not divide the 10 steps of a path, 30 does: both accumulation routes run.
    for chunk in (1, 7, 30, 10_000):
        chunked = integrated_gradients(model, x, baselines, n_steps=10, internal_batch_size=chunk)
        assert relative_error(chunked, whole) <= 1e-12


def test_completeness_delta_is_small_and_shrinks_with_steps():
    torch.manual_seed(4)
    model = mlp(5, 16, 1)
    x = torch.randn(10, 5, dtype=torch.float64)
    baselines = torch.randn(2, 5, dtype=torch.float64)

    deltas = []
    for n_steps in (2, 4, 8, 16):
        _, delta = integrated_gradients(
            model, x, baselines, n_steps=n_steps, return_convergence_delta=True
        )
        assert delta.shape == (2, 10)
        deltas.append(float(delta.abs().max()))

    # Gauss-Legendre converges exponentially on a smooth model.
    assert all(later < earlier for earlier, later in zip(deltas, deltas[1:]))
    assert deltas[-1] < 1e-10


def test_delta_equals_attribution_sum_minus_output_gap():
    torch.manual_seed(5)
    model = mlp(3, 8, 2)
    x = torch.randn(4, 3, dtype=torch.float64)
    baselines = torch.randn(2, 3, dtype=torch.float64)

    attributions, delta = integrated_gradients(
        model, x, baselines, target=0, n_steps=5, return_convergence_delta=True
    )

    with torch.no_grad():
        gap = model(x)[:, 0].unsqueeze(0) - model(baselines)[:, 0].unsqueeze(1)
    torch.testing.assert_close(delta, attributions.sum(-1) - gap, rtol=0, atol=1e-12)


def test_linear_model_gives_closed_form():
    torch.manual_seed(6)
    model = nn.Linear(4, 1).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    baselines = torch.randn(3, 4, dtype=torch.float64)

    attributions = integrated_gradients(model, x, baselines, n_steps=3)

    # For F(x) = w.x + c, IG(x, b) = w * (x - b) exactly, with weights that sum to 1.
    expected = model.weight[0].detach() * (x.unsqueeze(0) - baselines.unsqueeze(1))
    torch.testing.assert_close(attributions, expected, rtol=1e-12, atol=1e-12)


def test_per_row_baselines_match_shared_ones():
    torch.manual_seed(7)
    model = mlp(3, 8, 1)
    x = torch.randn(5, 3, dtype=torch.float64)
    baselines = torch.randn(2, 3, dtype=torch.float64)

    shared = integrated_gradients(model, x, baselines, n_steps=6)
    per_row = integrated_gradients(model, x, baselines.unsqueeze(1).expand(2, 5, 3), n_steps=6)

    torch.testing.assert_close(per_row, shared, rtol=1e-12, atol=1e-14)


def test_per_row_targets_select_each_rows_output():
    torch.manual_seed(8)
    model = mlp(3, 8, 4)
    x = torch.randn(6, 3, dtype=torch.float64)
    baselines = torch.zeros(1, 3, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1, 1, 2, 0])

    together = integrated_gradients(model, x, baselines, target=targets, n_steps=5)

    for row, target in enumerate(targets.tolist()):
        alone = integrated_gradients(model, x[row : row + 1], baselines, target=target, n_steps=5)
        torch.testing.assert_close(together[:, row], alone[:, 0], rtol=1e-12, atol=1e-14)


def test_training_mode_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()

    with pytest.raises(ModelError, match=r"\.eval\(\)"):
        integrated_gradients(model, torch.randn(4, 3), torch.zeros(1, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_steps": 0}, "n_steps=0"),
        ({"n_steps": 2.5}, "integer"),
        ({"method": "simpson"}, "unknown method 'simpson'"),
        ({"method": "riemann_left", "n_steps": 1}, "at least 2"),
        ({"internal_batch_size": 0}, "internal_batch_size"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        integrated_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.zeros(1, 3), **kwargs)


def test_baseline_with_wrong_feature_count_is_refused():
    with pytest.raises(ArgumentError, match=r"baselines has shape \(1, 4\)"):
        integrated_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.zeros(1, 4))


def test_integer_inputs_are_refused():
    with pytest.raises(ArgumentError, match="floating point"):
        integrated_gradients(nn.Linear(3, 1), torch.ones(2, 3, dtype=torch.long))


def test_multi_output_model_without_target_is_refused():
    with pytest.raises(ArgumentError, match="pass target="):
        integrated_gradients(nn.Linear(3, 2), torch.randn(2, 3), torch.zeros(1, 3))


@pytest.mark.parametrize("hoist", [True, "affine", False])
def test_many_steps_sum_without_float32_drift(hoist):
    # 20,000 float32 gradients summed in float32 drifted about 1e-4 from the float64
    # result; summed in float64 they stay at float32 rounding.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()
    x = torch.rand(4, 5) * 2 - 1
    kwargs = dict(n_steps=20_000, method="riemann_middle")

    got = integrated_gradients(net, x, 0.0, hoist=hoist, **kwargs)
    reference = integrated_gradients(copy.deepcopy(net).double(), x.double(), 0.0,
                                     hoist=False, **kwargs)

    assert got.dtype == torch.float32
    assert float((got.double() - reference).abs().max() / reference.abs().max()) <= 1e-6


@pytest.mark.parametrize("target", [None, 2, (1, 0), "per row", "per row tuple"])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_the_shared_baselines_output_gap_equals_one_forward_per_pair(target, chunk):
    import dataclasses

    from engine.core import make_problem, output_gap

    torch.manual_seed(3)
    n_rows = 7
    if target in ("per row tuple", (1, 0)):
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3)))
    else:
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3 if target else 1))
    net = net.double()
    if target == "per row":
        target = torch.randint(0, 3, (n_rows,))
    elif target == "per row tuple":
        target = torch.stack([torch.randint(0, 2, (n_rows,)), torch.randint(0, 3, (n_rows,))], 1)
    x, baselines = torch.rand(n_rows, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    problem = make_problem(x, baselines, target, None)

    per_pair = output_gap(net, problem, chunk)
    shared = output_gap(net, dataclasses.replace(problem, targets_checked=True), chunk)

    assert shared.shape == (3, n_rows)
    torch.testing.assert_close(shared, per_pair, rtol=1e-14, atol=1e-14)


def test_the_delta_of_a_model_that_squeezes_its_output_with_one_baseline():
    # The baselines go through the model beside rows, never as a batch of their own: a
    # batch of the single baseline would squeeze to a 0-d output.
    class Squeezed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def forward(self, x):
            return self.layer(x).squeeze()

    torch.manual_seed(4)
    model, x = Squeezed().double().eval(), torch.rand(5, 4, dtype=torch.float64)

    _, delta = integrated_gradients(model, x, torch.zeros(1, 4, dtype=torch.float64),
                                    return_convergence_delta=True)

    assert delta.shape == (1, 5) and float(delta.abs().max()) < 1e-12


@pytest.mark.parametrize("hoist", [True, False])
def test_a_model_that_squeezes_its_output_in_chunks_of_one_point(hoist):
    # 3 rows x 5 steps in chunks of 7 points leave a last chunk of one point, where a
    # model returning ``layer(x).squeeze()`` gives a scalar; so does a one-row job.
    class Squeezed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x).squeeze()

    torch.manual_seed(6)
    model, x = Squeezed().double().eval(), torch.rand(3, 3, dtype=torch.float64)
    base = torch.zeros(1, 3, dtype=torch.float64)
    options = dict(n_steps=5, hoist=hoist, return_convergence_delta=True)

    ones, delta = integrated_gradients(model, x, base, internal_batch_size=7, **options)
    whole, _ = integrated_gradients(model, x, base, internal_batch_size=15, **options)
    single, single_delta = integrated_gradients(model, x[:1], base, **options)

    torch.testing.assert_close(ones, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(single, whole[:, :1], rtol=1e-12, atol=1e-14)
    gap = model(x) - model(base)
    torch.testing.assert_close(delta[0], ones.sum(-1)[0] - gap.detach(), rtol=1e-12, atol=1e-12)
    assert single_delta.shape == (1, 1)


def test_the_shared_output_gap_keeps_every_batch_within_the_chunk():
    import dataclasses

    from engine.core import make_problem, output_gap

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    batches = []

    def counted(points):
        batches.append(points.shape[0])
        return net(points)

    x, kinds = torch.rand(3, 4, dtype=torch.float64), torch.rand(10, 4, dtype=torch.float64)
    problem = dataclasses.replace(make_problem(x, kinds, None, None), targets_checked=True)

    gap = output_gap(counted, problem, 4)

    assert batches == [4, 4, 4, 1] and gap.shape == (10, 3)
    expected = net(x).squeeze(1).unsqueeze(0) - net(kinds)
    torch.testing.assert_close(gap, expected.detach(), rtol=1e-14, atol=1e-14)


def test_an_output_without_a_row_per_point_names_the_batch_of_points():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 1)

        def forward(self, x):
            return self.layer(x).mean(0)  # one number per batch

    with pytest.raises(ModelError, match=r"^the model returned shape \(1,\) for a batch of "
                                         r"\d+ path points: expected one output row per "):
        integrated_gradients(Pooled().eval(), torch.rand(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_delta_is_float64_and_the_attributions_keep_the_inputs_dtype(dtype):
    torch.manual_seed(0)
    model = mlp(4, 8, 1, dtype=dtype).eval()
    x = torch.randn(3, 4, dtype=dtype)

    attributions, delta = integrated_gradients(model, x, torch.zeros(1, 4, dtype=dtype),
                                               n_steps=8, return_convergence_delta=True)

    assert delta.dtype == torch.float64
    assert attributions.dtype == dtype


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 100.0), (torch.float32, 5e35)],
                         ids=["float16", "float32"])
@pytest.mark.parametrize("hoist", [True, "affine"])
def test_hoisted_difference_that_overflows_falls_back_to_the_plain_path(dtype, scale, hoist):
    # The prefix maps the row and its baseline to hidden values of opposite signs beyond
    # half the dtype's range, so h_x - h_b overflows; every point the model sees is finite.
    first = nn.Linear(2, 2, bias=False)
    last = nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[400.0, 0.0], [0.0, 1.0]]))
        last.weight.fill_(0.01)
    model = nn.Sequential(first, nn.ReLU(), last).to(dtype).eval()
    x = torch.tensor([[scale, 1.0]], dtype=dtype)
    base = torch.tensor([[-scale, 0.5]], dtype=dtype)

    got = integrated_gradients(model, x, base.unsqueeze(0), n_steps=8, hoist=hoist)

    expected = IntegratedGradients(model).attribute(x, base, n_steps=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0].to(expected.dtype), expected)
