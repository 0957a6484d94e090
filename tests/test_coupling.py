"""Models whose rows interact are refused, also when they change after a first call.

The engine sums the outputs of many path points before one backward, which is exact only
when no row's output depends on another row of the batch; a remembered trace of the
model must not hide a change that makes rows interact.
"""

import pytest
import torch
from torch import nn

from engine import integrated_gradients
from engine.errors import ModelError


class SmallMLP(nn.Module):
    """A row-wise MLP, until ``mix`` makes it subtract the batch mean."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.mix = mix

    def forward(self, x):
        hidden = self.l2(self.l1(x)).relu()
        if self.mix:
            hidden = hidden - hidden.mean(0)
        return self.out(hidden)


def test_a_batch_mean_switched_on_after_a_first_call_is_refused():
    torch.manual_seed(42)
    net = SmallMLP().double().eval()
    x = torch.randn(7, 3, dtype=torch.float64)
    integrated_gradients(net, x, 0.0, n_steps=8)  # a row-wise trace, remembered
    net.mix = True  # the new trace still hoists its prefix, but mixes rows after it

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x, 0.0, n_steps=8)


@pytest.mark.parametrize("first", [False, True], ids=["after-linear", "first-layer"])
def test_batchnorm_without_running_statistics_is_refused_in_eval_mode(first):
    front = [nn.BatchNorm1d(4, track_running_stats=False)] if first else []
    model = nn.Sequential(*front, nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False),
                          nn.ReLU(), nn.Linear(8, 1)).eval()

    with pytest.raises(ModelError, match=r"no running statistics.*allow_coupled_rows"):
        integrated_gradients(model, torch.randn(6, 4), 0.0, n_steps=8)


def test_running_statistics_dropped_after_a_first_call_are_seen():
    torch.manual_seed(43)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model.eval()
    x = torch.randn(6, 4)
    integrated_gradients(model, x, 0.0, n_steps=8)
    model[1].running_mean = model[1].running_var = None

    with pytest.raises(ModelError, match="no running statistics"):
        integrated_gradients(model, x, 0.0, n_steps=8)


def test_a_layer_changed_in_place_after_a_first_call_is_refused():
    torch.manual_seed(44)
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)).eval()
    x = torch.randn(6, 4)
    integrated_gradients(model, x, 0.0, target=0, n_steps=8)
    model[1].dim = 0  # the softmax now runs over the rows

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(model, x, 0.0, target=0, n_steps=8)


def test_a_layer_whose_class_is_swapped_after_a_first_call_is_refused():
    class BatchCentred(nn.Tanh):
        def forward(self, x):
            return x - x.mean(0)

    torch.manual_seed(45)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    x = torch.randn(6, 4)
    integrated_gradients(model, x, 0.0, n_steps=8)
    model[1].__class__ = BatchCentred

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(model, x, 0.0, n_steps=8)


class OddBatchMixer(nn.Module):
    """Mixes rows in batches of odd size once ``couple`` is set: invisible on even ones."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.out = nn.Linear(2, 8), nn.Linear(8, 1)
        self.couple = False

    def forward(self, x):
        hidden = self.l1(x)
        if self.couple:
            hidden = hidden - hidden.mean(0, keepdim=True) * (hidden.shape[0] % 2)
        return torch.sigmoid(self.out(torch.tanh(hidden)))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_flag_that_mixes_odd_batches_after_a_first_call_is_refused(compile):
    torch.manual_seed(46)
    net = OddBatchMixer().eval()
    x = torch.randn(3, 2)
    integrated_gradients(net, x, torch.zeros(1, 2), n_steps=8, compile=compile)
    # The remembered trace still matches the model on even batches; the probe's second
    # batch has the other parity.
    net.couple = True

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x, torch.zeros(1, 2), n_steps=8, compile=compile)


def test_a_layer_tied_to_one_batch_size_is_refused():
    torch.manual_seed(47)
    rows = 4  # the size of every chunk

    class RowsNormalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.norm, self.out = nn.Linear(2, 3), nn.LayerNorm((rows, 3)), nn.Linear(3, 1)

        def forward(self, x):
            return torch.sigmoid(self.out(torch.tanh(self.norm(self.l1(x)))))

    with pytest.raises(ModelError, match="failed on a batch of"):
        integrated_gradients(RowsNormalised().eval(), torch.randn(1, 2), torch.zeros(1, 2),
                             n_steps=4, internal_batch_size=rows)


class CentredHidden(nn.Module):
    """Centres its hidden layer on the batch mean (or normalises it with the batch's
    statistics through the functional batch_norm, which no layer name shows)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.inner, self.out = nn.Linear(5, 16), nn.Linear(16, 1)

    def forward(self, x):
        hidden = self.inner(x)
        if self.functional:
            hidden = nn.functional.batch_norm(hidden, None, None, training=True)
        else:
            hidden = hidden - hidden.mean(0, keepdim=True)
        return self.out(torch.tanh(hidden))


@pytest.mark.parametrize("functional", [False, True], ids=["mean", "batch_norm"])
@pytest.mark.parametrize("n_rows", [64, 1024, 4096])
def test_batch_statistics_are_refused_however_many_rows(functional, n_rows):
    # Among a few thousand rows one point more or less moves a batch mean by less than
    # the probe's rounding tolerance; the probe must still see the rows interact.
    torch.manual_seed(0)
    model = CentredHidden(functional).eval()

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(model, torch.randn(n_rows, 5), torch.zeros(1, 5), n_steps=8)


def test_a_float32_network_returning_float64_is_not_refused():
    # The probe compares rows at the rounding of the float32 arithmetic, not of float64.
    net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 1)).eval()

    refused = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x = torch.randn(3 + seed, 5)
        try:
            integrated_gradients(lambda v: net(v).double(), x, 0.0, n_steps=8)
        except ModelError:
            refused += 1
    assert refused == 0


class Partial(nn.Module):
    """Feature 0 passes through; the others are centred on the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.cat([x[:, :1], torch.tanh(x[:, 1:] - x[:, 1:].mean(0))], 1))


def test_one_row_with_a_huge_output_does_not_hide_the_others_interacting():
    torch.manual_seed(100)
    x = torch.randn(100, 4)
    x[99, 0] = 1e4  # this row's output is about 1e4, the others' about 1

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(Partial().eval(), x, 0.0, n_steps=8)


class OneBatch(nn.Module):
    """Rows meet through the batch's mean, its maximum, or a neighbour."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        if self.kind == "mean":
            x = x - x.mean(0)
        elif self.kind == "max":
            x = x / x.abs().amax(0).clamp_min(1e-6)
        else:
            x = x + 0.5 * x.roll(1, 0)
        return self.net(x)


@pytest.mark.parametrize("kind", ["mean", "max", "neighbour"])
def test_a_single_row_against_one_baseline_is_probed_too(kind):
    # The row with its baseline, and the row with a point of their path: a midpoint would
    # have given both batches the same mean, extremes and neighbour.
    torch.manual_seed(0)
    x, base = torch.randn(1, 5), torch.randn(1, 1, 5)

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(OneBatch(kind).eval(), x, base, n_steps=8)


class FunctionalDropout(nn.Module):
    """Monte Carlo dropout: random in eval mode too, where no layer's name shows it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.inner, self.out = nn.Linear(5, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(nn.functional.dropout(torch.tanh(self.inner(x)), self.p, training=True))


@pytest.mark.parametrize("n_rows", [1, 2, 10])
def test_a_model_that_draws_random_numbers_is_refused_even_when_no_output_moved(n_rows):
    # p = 1e-9 drops nothing in practice: only the draw itself shows.
    torch.manual_seed(5)
    state = torch.get_rng_state()

    with pytest.raises(ModelError, match="draws random numbers"):
        integrated_gradients(FunctionalDropout(1e-9).eval(), torch.randn(n_rows, 5), 0.0,
                             n_steps=8)
    assert not torch.equal(state, torch.get_rng_state())  # the model did draw


def test_allow_coupled_rows_runs_a_model_that_draws_random_numbers(caplog):
    attributions = integrated_gradients(FunctionalDropout(1e-9).eval(), torch.randn(3, 5), 0.0,
                                        n_steps=8, allow_coupled_rows=True)

    assert attributions.shape == (1, 3, 5)
    assert "draws random numbers" in caplog.text


def test_a_float32_network_behind_a_float64_function_is_not_refused():
    # A plain function hides its weights: float32 is assumed inside at least.
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()

    for n_rows in (1, 2, 3, 20, 100):
        x = torch.randn(n_rows, 5, dtype=torch.float64)
        integrated_gradients(lambda v: net(v.float()).double(), x, 0.0, n_steps=8)


def test_an_uninitialised_lazy_layer_runs_as_in_captum():
    from captum.attr import IntegratedGradients

    torch.manual_seed(8)
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 1))
    x = torch.randn(4, 3)

    ours = integrated_gradients(model, x, 0.0, n_steps=8, method="riemann_trapezoid")[0]
    theirs = IntegratedGradients(model).attribute(x, n_steps=8, method="riemann_trapezoid")

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


class SeededNoise(nn.Module):
    """Noise from a generator it seeds itself on every call: the same on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(5, 1)

    def forward(self, x):
        torch.manual_seed(11)
        return self.out(x) + 1e-3 * torch.rand(())


class ProjectedOnce(nn.Module):
    """Draws a fixed random projection at its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = None
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        if self.projection is None:
            self.projection = torch.randn(5, 3)
        return self.out(x @ self.projection)


@pytest.mark.parametrize("model", [SeededNoise, ProjectedOnce])
def test_a_model_that_draws_the_same_numbers_on_every_call_is_not_random(model):
    net = model().eval()
    x = torch.randn(4, 5)

    first = integrated_gradients(net, x, 0.0, n_steps=8)
    again = integrated_gradients(net, x, 0.0, n_steps=8)

    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_non_finite_error_is_exported_beside_model_error():
    import engine

    assert issubclass(engine.NonFiniteError, engine.ModelError)
    assert issubclass(engine.NonFiniteOutputError, engine.NonFiniteError)
    assert engine.NonFiniteOutputError.__module__ == "engine.errors"
