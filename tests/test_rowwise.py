"""A checked trace made only of row-wise operations spares the probe's later batches.

The row-coupling probe runs the model on three batches. When the engine integrates
through a trace that reproduces the model on the first batch and cannot mix rows by
construction (``engine.rowwise``), the other two are skipped; everything else keeps the
full probe, and a model that changes after its first call is still refused.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import engine.core
from engine import integrated_gradients
from engine.errors import ModelError
from engine.model import TitanicMLP
from engine.rowwise import row_wise_layers, rows_apart_now
from engine.trace import trace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def later_batches(monkeypatch):
    """How many times the probe's batches two and three ran."""
    calls = []
    original = engine.core._probe_later_batches

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.core, "_probe_later_batches", spy)
    return calls


def traced(model: nn.Module) -> fx.GraphModule:
    return trace(model)[0]


class Functional(nn.Module):
    """Row-wise through functions, arithmetic with numbers and a per-feature buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.out = nn.Linear(5, 8), nn.Linear(8, 1)
        self.register_buffer("shift", torch.linspace(-1, 1, 8))

    def forward(self, x):
        hidden = F.leaky_relu(self.l1(x), 0.1) * 2.0 + self.shift
        return torch.sigmoid(self.out(torch.tanh(hidden)).clamp(min=-5.0) - 1)


@pytest.mark.parametrize("order", ["article", "conventional"])
def test_the_titanic_network_keeps_rows_apart(order):
    net = TitanicMLP(layer_order=order).eval()

    layers = row_wise_layers(traced(net))

    assert layers is not None and rows_apart_now(layers)
    assert {type(layer) for layer in layers} == {nn.Linear, nn.PReLU, nn.Sigmoid}


def test_functions_numbers_and_a_per_feature_buffer_keep_rows_apart():
    assert row_wise_layers(traced(Functional().eval())) is not None


class Rest(nn.Module):
    """A Linear layer, then one operation that is not on the short list."""

    def __init__(self, rest) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.rest = rest
        self.register_buffer("table", torch.randn(4, 8))

    def forward(self, x):
        return self.rest(self, self.l1(x))


NOT_ROW_WISE = {
    "batch mean": lambda self, h: h - h.mean(0),
    "neighbour": lambda self, h: h + h.roll(1, 0),
    "indexing": lambda self, h: h[:, :3],
    "reshape": lambda self, h: h.reshape(-1),
    "two-dimensional buffer": lambda self, h: h + self.table[:1],
    "softmax": lambda self, h: torch.softmax(h, 1),
    "functional dropout": lambda self, h: F.dropout(h, 0.5, training=False),
    "tuple output": lambda self, h: (h, h),
    "tensor made in forward": lambda self, h: h + torch.ones(1, 8),
}


@pytest.mark.parametrize("rest", NOT_ROW_WISE.values(), ids=NOT_ROW_WISE.keys())
def test_anything_off_the_list_keeps_the_full_probe(rest):
    assert row_wise_layers(traced(Rest(rest).eval())) is None


def test_flattening_the_rows_together_is_not_row_wise():
    rows_apart = nn.Sequential(nn.Flatten(), nn.Linear(5, 1))
    merged = nn.Sequential(nn.Flatten(0), nn.Linear(5, 1))

    assert row_wise_layers(traced(rows_apart)) is not None
    assert row_wise_layers(traced(merged)) is None


def test_layers_with_batch_statistics_or_masks_count_in_eval_mode_only():
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    layers = row_wise_layers(traced(net))

    assert not rows_apart_now(layers)  # a new module is in training mode
    net.eval()
    assert rows_apart_now(layers)
    net[2].train()
    assert not rows_apart_now(layers)


def test_a_hooked_layer_does_not_count():
    net = TitanicMLP().eval()
    layers = row_wise_layers(traced(net))
    handle = net.r1.register_forward_hook(lambda module, args, output: output)

    assert not rows_apart_now(layers)
    handle.remove()
    assert rows_apart_now(layers)


def test_the_titanic_job_skips_the_later_batches(later_batches):
    torch.manual_seed(0)
    net = TitanicMLP().eval()
    x, baselines = torch.rand(30, 5), torch.rand(4, 5)

    integrated_gradients(net, x, baselines, n_steps=16)
    integrated_gradients(net, x, baselines, n_steps=16)

    assert later_batches == []


@pytest.mark.parametrize("setting", ["hoist=False", "adaptive", "off the list", "hooked",
                                     "two inputs"])
def test_every_other_run_probes_all_three_batches(setting, later_batches):
    torch.manual_seed(0)
    net = TitanicMLP().eval()
    x, baselines = torch.rand(30, 5), torch.rand(4, 5)
    inputs, kwargs = x, {}
    if setting == "hoist=False":
        kwargs["hoist"] = False
    elif setting == "adaptive":
        kwargs["delta_tolerance"] = 1.0
    elif setting == "off the list":
        net = Rest(lambda self, h: h[:, :1]).eval()
    elif setting == "hooked":
        net.r2.register_forward_hook(lambda module, args, output: output)
    else:
        net = TwoInputs().eval()
        inputs, baselines = (x, x), (baselines, baselines)

    integrated_gradients(net, inputs, baselines, n_steps=16, **kwargs)

    assert later_batches == [1]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(10, 1)

    def forward(self, a, b):
        return self.l1(torch.cat([a, b], 1))


COUPLE = False


class GlobalSwitch(nn.Module):
    """Row-wise until a module-level flag, which no guard sees, subtracts the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.out = nn.Linear(5, 8), nn.Linear(8, 1)

    def forward(self, x):
        hidden = self.l1(x)
        if COUPLE:
            hidden = hidden - hidden.mean(0)
        return self.out(torch.relu(hidden))


def test_a_row_wise_trace_that_went_stale_still_gets_the_coupling_refused(monkeypatch):
    torch.manual_seed(0)
    net = GlobalSwitch().double().eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    integrated_gradients(net, x, 0.0, n_steps=8)  # a row-wise trace, remembered
    monkeypatch.setattr(sys.modules[__name__], "COUPLE", True)

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x, 0.0, n_steps=8)


class UnusedDraw(nn.Module):
    """Draws a random number at every call that its outputs do not show; the trace, made
    of row-wise layers only, does not draw it at all."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.out = nn.Linear(5, 8), nn.Linear(8, 1)

    def forward(self, x):
        torch.rand(1)
        return self.out(torch.tanh(self.l1(x)))


def test_a_model_that_draws_random_numbers_is_still_refused():
    torch.manual_seed(0)

    with pytest.raises(ModelError, match="draws random numbers"):
        integrated_gradients(UnusedDraw().eval(), torch.randn(6, 5), 0.0, n_steps=8)


CALLS = [0]


class EverySecondCall(nn.Module):
    """Scales its output by a random factor on every second call, counted in a global."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.out = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        CALLS[0] += 1
        output = self.out(torch.relu(self.l1(x)))
        if CALLS[0] % 2 == 0:
            output = output * (1.0 + 0.5 * float(torch.randn(())))
        return output


def test_a_model_drawing_during_the_trace_check_gets_the_full_probe():
    # The probe's first batch lands on a call that draws nothing; the trace check's own
    # call of the model draws.
    torch.manual_seed(0)
    CALLS[0] = 0

    with pytest.raises(ModelError, match="draws random numbers"):
        integrated_gradients(EverySecondCall().eval(), torch.randn(6, 3), n_steps=8)


class NumpyJitter(nn.Module):
    """Adds numpy's noise, which leaves torch's random generator alone."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.out = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.l1(x))) + 0.1 * float(np.random.randn())


def test_noise_hidden_from_the_trace_check_by_one_large_output_is_still_refused():
    # The trace check compares the batch as a whole, to the size of its largest output
    # (about 7e3 here); the probe compares each row to its own.
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.randn(6, 3)
    x[0] = 3e4

    with pytest.raises(ModelError, match="rows interact or the model is random"):
        integrated_gradients(NumpyJitter().eval(), x, n_steps=8)


def centred_linear(original):
    def linear(x, weight, bias=None):
        return original(x - x.mean(0), weight, bias)

    return linear


@pytest.mark.parametrize("patched", ["functional", "class"])
def test_torch_patched_to_mix_rows_gets_the_full_probe(patched, monkeypatch):
    # The trace calls the patched code too, so it reproduces the model on the first batch;
    # only the later batches see the rows interact.
    torch.manual_seed(0)
    net = TitanicMLP().eval()
    if patched == "functional":
        monkeypatch.setattr(F, "linear", centred_linear(F.linear))
    else:
        monkeypatch.setattr(nn.Linear, "forward", lambda self, x: centred_linear(
            F.linear)(x, self.weight, self.bias))

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, torch.rand(40, 5), torch.zeros(1, 5), n_steps=16)


def test_torch_patched_before_the_engine_was_imported_is_seen(tmp_path):
    script = tmp_path / "patched_first.py"
    script.write_text(
        "import torch.nn.functional as F\n"
        "original = F.linear\n"
        "F.linear = lambda x, w, b=None: original(x - x.mean(0), w, b)\n"
        "import engine.rowwise\n"
        "print(engine.rowwise._PATCHED_BEFORE)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
