"""Traced graphs proven to keep rows apart, and the one-batch probe that relies on them."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import engine.core
from engine import integrated_gradients
from engine.errors import ModelError
from engine.model import TitanicMLP
from engine.rowwise import row_wise_layers, rows_independent_now


class Wrapped(nn.Module):
    """``inner`` after a Linear layer, with ``inner`` any function of the hidden rows."""

    def __init__(self, inner, width: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(3, width)
        self.shift = nn.Parameter(torch.zeros(width))
        self.inner = inner

    def forward(self, x):
        return self.inner(self, self.linear(x))


def layers_of(model: nn.Module):
    return row_wise_layers(fx.symbolic_trace(model))


@pytest.mark.parametrize("layer_order", ["article", "conventional"])
def test_the_article_network_is_proven_row_wise(layer_order):
    net = TitanicMLP(layer_order)

    layers = layers_of(net)

    assert layers is not None and {id(m) for m in layers} == {id(m) for m in net.children()}


@pytest.mark.parametrize("inner", [
    lambda self, h: torch.relu(h) * 2.0 + 1,
    lambda self, h: F.leaky_relu(h, 0.1).sigmoid(),
    lambda self, h: -torch.tanh(h) / 3,
    lambda self, h: h.clamp(min=0) ** 2,
    lambda self, h: torch.flatten(h, start_dim=1).flatten(1),
], ids=["relu-arithmetic", "leaky-method", "tanh-divide", "clamp-power", "flatten-features"])
def test_elementwise_functions_with_numbers_are_row_wise(inner):
    assert layers_of(Wrapped(inner)) is not None


@pytest.mark.parametrize("inner", [
    lambda self, h: h - h.mean(0),
    lambda self, h: h + self.shift,
    lambda self, h: h * torch.tanh(h),
    lambda self, h: h[0:1] + h,
    lambda self, h: h.sum(),
    lambda self, h: torch.flatten(h),
    lambda self, h: h.flatten(),
], ids=["batch-mean", "held-tensor", "two-activations", "indexing", "reduction",
        "flatten-function-rows", "flatten-method-rows"])
def test_graphs_that_may_mix_rows_are_not_proven(inner):
    assert layers_of(Wrapped(inner)) is None


@pytest.mark.parametrize("layer", [nn.Flatten(0), nn.Softmax(dim=0), nn.Softmax(dim=-1)],
                         ids=["flatten-rows", "softmax-rows", "softmax-negative-dim"])
def test_layers_that_may_reach_across_rows_are_not_proven(layer):
    assert layers_of(nn.Sequential(nn.Linear(3, 4), layer)) is None


def test_the_digits_network_is_proven_row_wise():
    from engine.digits import DigitsCNN

    assert layers_of(DigitsCNN()) is not None


def test_a_subclass_of_a_known_layer_is_not_trusted():
    class Centred(nn.Linear):
        def forward(self, x):
            return super().forward(x - x.mean(0))

    assert layers_of(nn.Sequential(nn.Linear(3, 4), Centred(4, 1))) is None


def test_modes_and_hooks_are_checked_at_the_time_of_the_run():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    assert layers_of(model) is None  # BatchNorm in training mode
    layers = layers_of(model.eval())

    assert rows_independent_now(layers)
    model.train()
    assert not rows_independent_now(layers)
    model.eval()
    handle = model[2].register_forward_hook(lambda module, args, output: output)
    assert not rows_independent_now(layers)
    handle.remove()
    model[2].forward = lambda x: x - x.mean(0)
    assert not rows_independent_now(layers)
    assert not rows_independent_now(None)


class CountingMLP(nn.Module):
    """A row-wise MLP that counts how often it runs itself (the trace does not count).

    The count lives outside the model: an attribute that changes on every call would
    make every call probe in full.
    """

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.mix = mix
        self.calls = [0]

    def forward(self, x):
        self.calls[0] += 1
        hidden = self.l2(self.l1(x)).relu()
        if self.mix:
            hidden = hidden - hidden.mean(0)
        return self.out(hidden)


@pytest.mark.parametrize("hooked, runs", [(False, 1), (True, 2)])
def test_a_proven_trace_lets_the_model_run_once_per_call(hooked, runs):
    torch.manual_seed(40)
    net = CountingMLP().double().eval()
    if hooked:
        # A hook may make any layer mix rows: the probe runs both batches.
        net.l2.register_forward_hook(lambda module, args, output: output)
    x = torch.randn(7, 3, dtype=torch.float64)
    integrated_gradients(net, x, 0.0, n_steps=8)  # traces the model
    net.calls[0] = 0

    integrated_gradients(net, x, 0.0, n_steps=8)

    assert net.calls[0] == runs


def test_a_stale_trace_traced_again_with_a_batch_mean_is_probed_in_full():
    torch.manual_seed(42)
    net = CountingMLP().double().eval()
    x = torch.randn(7, 3, dtype=torch.float64)
    integrated_gradients(net, x, 0.0, n_steps=8)  # a row-wise trace, remembered
    net.mix = True  # the new trace still hoists its prefix, but mixes rows after it

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x, 0.0, n_steps=8)


def test_a_run_without_the_proven_trace_probes_in_full(monkeypatch):
    torch.manual_seed(41)
    net = CountingMLP().double().eval()
    x = torch.randn(7, 3, dtype=torch.float64)
    integrated_gradients(net, x, 0.0, n_steps=8)
    net.mix = True  # the remembered trace no longer computes the model
    # As if the trace check had rejected the trace: the model itself runs on every point.
    monkeypatch.setattr(engine.core, "_usable_split", lambda *args: None)

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x, 0.0, n_steps=8)


@pytest.mark.parametrize("first", [False, True], ids=["after-linear", "first-layer"])
def test_batchnorm_without_running_statistics_is_refused_in_eval_mode(first):
    layers = [nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 1)]
    model = nn.Sequential(*([nn.Linear(4, 8)] if not first else []), *layers)
    if first:
        model = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 8),
                              *layers)
    model.eval()

    assert layers_of(model) is None
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


def test_a_layer_changed_in_place_after_a_first_call_is_checked_again():
    torch.manual_seed(44)
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)).eval()
    x = torch.randn(6, 4)
    integrated_gradients(model, x, 0.0, target=0, n_steps=8)
    model[1].dim = 0  # the softmax now runs over the rows

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(model, x, 0.0, target=0, n_steps=8)


def test_a_layer_whose_class_is_swapped_after_a_first_call_is_checked_again():
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


@pytest.mark.parametrize("inner", [
    lambda self, h: torch.mul(h, other=torch.tanh(h)),
    lambda self, h: torch.add(h, other=h, alpha=2),
], ids=["mul-keyword", "add-keyword"])
def test_a_second_activation_passed_by_keyword_is_not_proven(inner):
    assert layers_of(Wrapped(inner)) is None


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool1d(1), nn.AdaptiveAvgPool2d(1)])
def test_adaptive_pools_which_can_pool_across_rows_are_not_proven(pool):
    assert layers_of(nn.Sequential(nn.Linear(3, 4), pool)) is None


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
def test_a_changed_flag_brings_back_the_full_probe(compile):
    torch.manual_seed(46)
    net = OddBatchMixer().eval()
    x = torch.randn(3, 2)
    integrated_gradients(net, x, torch.zeros(1, 2), n_steps=8, compile=compile)
    # The probe's first batch (3 rows and 3 points) is even, so the remembered trace
    # still matches the model there; only the changed attribute gives the change away.
    net.couple = True

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x, torch.zeros(1, 2), n_steps=8, compile=compile)


def test_a_layer_tied_to_the_probe_batch_size_is_not_trusted():
    torch.manual_seed(47)
    rows = 4  # the probe's one batch: 1 row and 3 path points

    class RowsNormalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.norm, self.out = nn.Linear(2, 3), nn.LayerNorm((rows, 3)), nn.Linear(3, 1)

        def forward(self, x):
            return torch.sigmoid(self.out(torch.tanh(self.norm(self.l1(x)))))

    with pytest.raises(ModelError, match="failed on path points"):
        integrated_gradients(RowsNormalised().eval(), torch.randn(1, 2), torch.zeros(1, 2),
                             n_steps=4, internal_batch_size=rows)
