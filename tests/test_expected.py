"""Expected gradients against closed forms."""

import pytest
import torch
from torch import nn

from engine import expected_gradients
from engine.errors import ArgumentError, ModelError


class SumOfSquares(nn.Module):
    def forward(self, x):
        return x.pow(2).sum(1)


def test_single_background_row_gives_linear_closed_form_exactly():
    torch.manual_seed(40)
    model = nn.Linear(4, 1).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    background = torch.randn(1, 4, dtype=torch.float64)

    attributions = expected_gradients(model, x, background, n_samples=7)

    # The gradient of a linear model is w everywhere, whatever alpha was drawn.
    expected = model.weight[0].detach() * (x - background)
    torch.testing.assert_close(attributions, expected, rtol=1e-12, atol=1e-12)


def test_linear_model_converges_to_the_background_mean():
    torch.manual_seed(41)
    model = nn.Linear(4, 1).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    background = torch.randn(40, 4, dtype=torch.float64)

    attributions = expected_gradients(model, x, background, n_samples=4000, seed=1)

    weight = model.weight[0].detach()
    expected = weight * (x - background.mean(0))
    # Monte Carlo: the standard error of the drawn mean is std(b) / sqrt(4000); 5 of them.
    bound = 5 * (weight.abs() * background.std(0)) / 4000**0.5
    assert bool(((attributions - expected).abs() <= bound).all())


def test_quadratic_model_matches_its_closed_form():
    torch.manual_seed(42)
    x = torch.randn(4, 3, dtype=torch.float64)
    background = torch.randn(20, 3, dtype=torch.float64)

    attributions = expected_gradients(SumOfSquares(), x, background, n_samples=20000, seed=2)

    # E[(x - b) * 2 (b + a (x - b))] over a ~ U(0, 1) and b is x^2 - E[b^2].
    expected = x.pow(2) - background.pow(2).mean(0)
    # Each draw's term has a standard deviation of a few units here; over 20,000 draws the
    # standard error is about 0.02, so 0.15 is more than six of them.
    torch.testing.assert_close(attributions, expected, rtol=0, atol=0.15)


def test_same_seed_same_draws_other_seed_other_draws():
    torch.manual_seed(43)
    x, background = torch.randn(3, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    first = expected_gradients(SumOfSquares(), x, background, n_samples=8, seed=5)
    again = expected_gradients(SumOfSquares(), x, background, n_samples=8, seed=5)
    other = expected_gradients(SumOfSquares(), x, background, n_samples=8, seed=6)

    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_chunking_gives_the_same_estimate():
    torch.manual_seed(44)
    x, background = torch.randn(5, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)

    whole = expected_gradients(SumOfSquares(), x, background, n_samples=11)
    chunked = expected_gradients(SumOfSquares(), x, background, n_samples=11,
                                 internal_batch_size=7)

    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_delta_is_completeness_against_the_drawn_baselines():
    torch.manual_seed(45)
    model = nn.Linear(3, 1).double()
    x, background = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    _, delta = expected_gradients(model, x, background, n_samples=30,
                                  return_convergence_delta=True)

    # Linear: sum(w (x - mean b)) equals F(x) - mean F(b) for the very baselines drawn.
    assert delta.shape == (4,)
    assert float(delta.abs().max()) <= 1e-12


def test_tuple_inputs_and_per_row_targets():
    torch.manual_seed(46)
    linear = nn.Linear(5, 3).double()

    def model(a, b):
        return linear(torch.cat([a, b], 1))

    x = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    background = (torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    target = torch.tensor([0, 2, 1, 0])

    first, second = expected_gradients(model, x, background, target=target, n_samples=3)

    weight = linear.weight.detach()[target]
    torch.testing.assert_close(first, weight[:, :2] * x[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, weight[:, 2:] * x[1], rtol=1e-12, atol=1e-12)


def test_background_with_other_features_is_refused():
    with pytest.raises(ArgumentError, match=r"background has shape \(5, 4\): expected \(K, 3\)"):
        expected_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.randn(5, 4))


def test_zero_samples_are_refused():
    with pytest.raises(ArgumentError, match="n_samples must be a positive integer"):
        expected_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.randn(5, 3), n_samples=0)


def test_non_finite_weights_are_named_instead_of_the_rows():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")

    with pytest.raises(ModelError, match=r"weights hold nan or inf \(parameter weight: 1 of 3"):
        expected_gradients(model, torch.rand(2, 3), torch.rand(5, 3), n_samples=4)


def test_non_finite_background_rows_are_named():
    background = torch.rand(5, 3)
    background[2, 1] = float("inf")

    with pytest.raises(ArgumentError, match=r"background holds nan or inf in row\(s\) 2"):
        expected_gradients(nn.Linear(3, 1), torch.rand(2, 3), background)


def test_a_non_finite_gradient_with_finite_outputs_names_the_row():
    def root(points):
        return torch.sqrt(points).sum(1)

    x = torch.rand(3, 2) + 0.1
    x[1] = 0.0  # with a zero background every point of row 1 is 0, where sqrt' is inf

    with pytest.raises(ModelError, match=r"gradient is nan or inf on the path of row\(s\) 1"):
        expected_gradients(root, x, torch.zeros(2, 2), n_samples=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_cpu_draws():
    torch.manual_seed(47)
    x, background = torch.randn(3, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    on_cpu = expected_gradients(SumOfSquares(), x, background, n_samples=9, seed=3)
    on_gpu = expected_gradients(SumOfSquares(), x.cuda(), background.cuda(), n_samples=9, seed=3)

    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-12, atol=1e-14)


def test_chunks_follow_the_memory_budget_and_give_the_same_estimate(monkeypatch):
    from engine import expected as module

    torch.manual_seed(44)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 1)).double().eval()
    x, background = torch.randn(30, 4, dtype=torch.float64), torch.randn(9, 4,
                                                                           dtype=torch.float64)
    sizes = []
    original = module._chunk

    def counted(forward_func, problem, background, rows, *args):
        sizes.append(rows.shape[0])
        return original(forward_func, problem, background, rows, *args)

    monkeypatch.setattr(module, "_chunk", counted)
    whole, whole_delta = expected_gradients(model, x, background, n_samples=20, seed=3,
                                            return_convergence_delta=True)
    assert sizes == [600]  # 30 rows x 20 draws fit the default budget
    sizes.clear()

    small, small_delta = expected_gradients(model, x, background, n_samples=20, seed=3,
                                            memory_budget=200_000,
                                            return_convergence_delta=True)

    # Whole rows' draws per chunk, within the budget.
    assert len(sizes) > 1 and all(size % 20 == 0 for size in sizes) and sum(sizes) == 600
    torch.testing.assert_close(small, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(small_delta, whole_delta, rtol=1e-12, atol=1e-12)


def test_out_of_memory_halves_the_chunk_and_retries(caplog):
    import logging

    class RunsOutOfMemory(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

        def forward(self, x):
            if x.shape[0] > 50:
                raise torch.OutOfMemoryError(f"{x.shape[0]} points do not fit")
            return self.net(x)

    torch.manual_seed(45)
    model = RunsOutOfMemory().eval()
    x, background = torch.randn(10, 3, dtype=torch.float64), torch.randn(5, 3,
                                                                          dtype=torch.float64)
    expected = expected_gradients(model.net, x, background, n_samples=20, seed=4,
                                  internal_batch_size=40)

    with caplog.at_level(logging.WARNING, logger="engine.core"):
        actual = expected_gradients(model, x, background, n_samples=20, seed=4,
                                    internal_batch_size=200)

    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    assert "200 -> 100" in caplog.text and "100 -> 40" in caplog.text


@pytest.mark.parametrize("seed", [None, 1.5, -1, 2**70, True, "7"])
def test_a_bad_seed_is_an_argument_error(seed):
    model = nn.Linear(3, 1).double()
    x, background = torch.rand(2, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)

    with pytest.raises(ArgumentError, match=r"^seed must be an integer from 0 to 2\*\*63 - 1"):
        expected_gradients(model, x, background, n_samples=3, seed=seed)


def test_a_numpy_seed_draws_as_the_same_python_one():
    import numpy as np

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, background = torch.rand(2, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)

    torch.testing.assert_close(expected_gradients(model, x, background, seed=np.int64(9)),
                               expected_gradients(model, x, background, seed=9),
                               rtol=0, atol=0)


def test_one_sample_numpy_sizes_and_a_chunked_delta():
    import numpy as np

    torch.manual_seed(46)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    x, background = torch.randn(7, 3, dtype=torch.float64), torch.randn(4, 3,
                                                                         dtype=torch.float64)
    batches = []

    def counted(points):
        batches.append(points.shape[0])
        return model(points)

    one = expected_gradients(model, x, background, n_samples=1, seed=2)
    assert one.shape == x.shape

    same = expected_gradients(model, x, background, n_samples=np.int64(5),
                              internal_batch_size=np.int64(10), seed=3)
    torch.testing.assert_close(same, expected_gradients(model, x, background, n_samples=5,
                                                        internal_batch_size=10, seed=3),
                               rtol=0, atol=0)

    _, delta = expected_gradients(counted, x, background, n_samples=5, internal_batch_size=10,
                                  seed=3, return_convergence_delta=True)
    _, whole = expected_gradients(model, x, background, n_samples=5, seed=3,
                                  return_convergence_delta=True)
    # F(x) goes in chunks of two rows (10 points of 5 draws), not all seven at once; the
    # row-coupling probe's three calls come first.
    assert max(batches) <= 10 and 7 not in batches[3:]
    torch.testing.assert_close(delta, whole, rtol=1e-12, atol=1e-12)


def test_a_model_without_an_input_gradient_is_a_model_error():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 2)

        def forward(self, x):
            return self.layer(x).detach()

    with pytest.raises(ModelError, match="does not depend on its inputs through autograd"):
        expected_gradients(Detached().eval(), torch.randn(4, 5), torch.randn(3, 5), target=0)
