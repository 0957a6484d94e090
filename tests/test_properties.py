"""Property tests: random models, shapes, rules, targets, tuple inputs and baseline forms."""

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine import METHODS, integrated_gradients
from tests.test_core import reference_rule, relative_error

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class TwoInputMLP(nn.Module):
    """(N, F1) and (N, F2) -> (N, C): concatenated, two smooth hidden layers."""

    def __init__(self, f1, f2, hidden, n_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(f1 + f2, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n_out))

    def forward(self, a, b):
        return self.net(torch.cat([a, b], 1))


class SmallCNN(nn.Module):
    """(N, C, H, W) -> (N, K): one convolution, Softplus, a linear read-out."""

    def __init__(self, channels, size, n_out):
        super().__init__()
        self.conv = nn.Conv2d(channels, 3, 3, padding=1)
        self.out = nn.Linear(3 * size * size, n_out)

    def forward(self, x):
        return self.out(nn.functional.softplus(self.conv(x)).flatten(1))


@st.composite
def jobs(draw):
    """A model, its inputs, baselines in one of the accepted forms, a target and a rule."""
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    n_rows, n_kinds = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    n_out = draw(st.integers(1, 3))
    if draw(st.booleans()):
        f1, f2 = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        torch.manual_seed(seed)
        model = TwoInputMLP(f1, f2, draw(st.integers(2, 8)), n_out).double().eval()
        shapes = [(f1,), (f2,)]
    else:
        channels, size = draw(st.integers(1, 2)), draw(st.integers(2, 4))
        torch.manual_seed(seed)
        model = SmallCNN(channels, size, n_out).double().eval()
        shapes = [(channels, size, size)]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    inputs = tuple(randn(n_rows, *shape) for shape in shapes)
    form = draw(st.sampled_from(["scalar", "per-kind", "per-row"]))
    if form == "scalar":
        baselines = tuple(draw(st.floats(-1, 1)) for _ in shapes)
    elif form == "per-kind":
        baselines = tuple(randn(n_kinds, *shape) for shape in shapes)
    else:
        baselines = tuple(randn(n_kinds, n_rows, *shape) for shape in shapes)
    if n_out == 1 and draw(st.booleans()):
        target = None
    elif draw(st.booleans()):
        target = draw(st.integers(0, n_out - 1))
    else:
        target = draw(st.lists(st.integers(0, n_out - 1), min_size=n_rows, max_size=n_rows))
    method = draw(st.sampled_from(METHODS))
    n_steps = draw(st.integers(2, 6))
    if len(inputs) == 1:
        inputs, baselines = inputs[0], baselines[0]
    return model, inputs, baselines, target, method, n_steps


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def per_row_baselines(inputs, baselines):
    """Every accepted form written out as (B, N, *F) per input."""
    laid_out = []
    for x, base in zip(as_tuple(inputs), as_tuple(baselines)):
        if not torch.is_tensor(base):
            base = torch.full((1, *x.shape), float(base), dtype=x.dtype)
        elif base.dim() == x.dim():
            base = base.unsqueeze(1).expand(-1, *x.shape)
        laid_out.append(base)
    return tuple(laid_out)


def row_target(target, row):
    return target[row] if isinstance(target, list) else target


def reference(model, inputs, baselines, target, method, n_steps):
    """One forward and backward per (kind, row, step), float64, from the definition."""
    alphas, weights = reference_rule(method, n_steps)
    xs, bases = as_tuple(inputs), per_row_baselines(inputs, baselines)
    out = [torch.zeros(b.shape, dtype=torch.float64) for b in bases]
    for kind in range(bases[0].shape[0]):
        for row in range(xs[0].shape[0]):
            for alpha, weight in zip(alphas, weights):
                point = tuple((b[kind, row] + alpha * (x[row] - b[kind, row])).unsqueeze(0)
                              .requires_grad_() for x, b in zip(xs, bases))
                value = model(*point)[0]
                t = row_target(target, row)
                value = value.reshape(-1)[0] if t is None else value[t]
                for o, grad in zip(out, torch.autograd.grad(value, point)):
                    o[kind, row] += weight * grad[0]
            for o, x, b in zip(out, xs, bases):
                o[kind, row] *= x[row] - b[kind, row]
    return out


@SETTINGS
@given(jobs())
def test_engine_equals_the_float64_definition(job):
    model, inputs, baselines, target, method, n_steps = job

    actual = as_tuple(integrated_gradients(model, inputs, baselines, target=target,
                                           n_steps=n_steps, method=method))

    for mine, expected in zip(actual, reference(model, inputs, baselines, target, method,
                                                n_steps)):
        # Both float64; only the order of the sums differs.
        scale = float(expected.norm()) + 1e-300
        assert float((mine - expected).norm()) / scale <= 1e-10


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@SETTINGS
@given(job=jobs())
def test_engine_equals_captum_kind_by_kind(job, dtype, tolerance):
    model, inputs, baselines, target, method, n_steps = job
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) for x in as_tuple(inputs))
    bases = tuple(b.to(dtype) for b in per_row_baselines(inputs, baselines))

    actual = as_tuple(integrated_gradients(model, inputs, bases, target=target,
                                           n_steps=n_steps, method=method))

    for kind in range(bases[0].shape[0]):
        expected = as_tuple(CaptumIG(model).attribute(
            inputs, tuple(b[kind] for b in bases), target=target, n_steps=n_steps,
            method=method))
        for mine, theirs in zip(actual, expected):
            # Captum rounds its step weights to float32: 1e-6 in float64, not 1e-15.
            assert relative_error(mine[kind], theirs) <= tolerance or float(
                theirs.abs().max()) < 1e-12


@SETTINGS
@given(job=jobs())
def test_delta_is_attribution_sum_minus_the_output_gap(job):
    model, inputs, baselines, target, method, n_steps = job

    attributions, delta = integrated_gradients(model, inputs, baselines, target=target,
                                               n_steps=n_steps, method=method,
                                               return_convergence_delta=True)

    xs, bases = as_tuple(inputs), per_row_baselines(inputs, baselines)
    total = sum(a.reshape(*a.shape[:2], -1).sum(-1) for a in as_tuple(attributions))
    with torch.no_grad():
        for kind in range(bases[0].shape[0]):
            for row in range(xs[0].shape[0]):
                t = row_target(target, row)
                end = model(*(x[row : row + 1] for x in xs))[0]
                start = model(*(b[kind, row : row + 1] for b in bases))[0]
                gap = (end - start).reshape(-1)[0] if t is None else end[t] - start[t]
                assert abs(float(total[kind, row] - gap - delta[kind, row])) <= 1e-12


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.sampled_from(METHODS),
       st.integers(2, 9), st.integers(0, 2**16))
def test_linear_models_give_the_closed_form(n_rows, n_features, n_kinds, method, n_steps,
                                            seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_features, generator=generator, dtype=torch.float64)

    def model(x):
        return x @ weight + 0.5

    x = torch.randn(n_rows, n_features, generator=generator, dtype=torch.float64)
    baselines = torch.randn(n_kinds, n_features, generator=generator, dtype=torch.float64)

    attributions = integrated_gradients(model, x, baselines, n_steps=n_steps, method=method)

    # IG of w.x + c is w * (x - b) times the sum of the rule's weights, which is 1 except
    # for Captum's trapezoid ((n - 1) / n).
    weight_sum = float(np.sum(reference_rule(method, n_steps)[1]))
    expected = weight_sum * weight * (x.unsqueeze(0) - baselines.unsqueeze(1))
    torch.testing.assert_close(attributions, expected, rtol=1e-12, atol=1e-12)
