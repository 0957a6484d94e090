"""The closed form's tail, differentiated by formula, equals autograd's bit for bit."""

import numpy as np
import pytest
import torch
from torch import fx, nn

import engine.core
from engine import integrated_gradients
from engine.hoist import _ScalarSlopePReLU, split_affine_prefix
from engine.model import TitanicMLP
from engine.plan import RunOptions
from engine.tails import activation_chain, chain_gradient


def prelu(slope: float) -> nn.PReLU:
    layer = nn.PReLU()
    with torch.no_grad():
        layer.weight.fill_(slope)
    return layer.requires_grad_(False)


CHAINS = {
    "prelu-sigmoid": lambda: [prelu(0.3), nn.Sigmoid()],
    "leaky-tanh": lambda: [nn.LeakyReLU(0.2), nn.Tanh()],
    "relu-identity-sigmoid": lambda: [nn.ReLU(), nn.Identity(), nn.Sigmoid()],
    "substituted-prelu-sigmoid": lambda: [_ScalarSlopePReLU(prelu(-0.7)), nn.Sigmoid()],
    "sigmoid-prelu-tanh": lambda: [nn.Sigmoid(), prelu(2.0), nn.Tanh()],
}


def autograd_gradient(layers, points):
    leaf = points.clone().requires_grad_()
    output = leaf
    for layer in layers:
        output = layer(output)
    (grad,) = torch.autograd.grad(output.sum(), leaf)
    return grad, output.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chain", CHAINS.values(), ids=CHAINS.keys())
def test_the_formulas_equal_autograd_bit_for_bit(chain, dtype):
    torch.manual_seed(5)
    layers = tuple(layer.to(dtype) for layer in chain())
    points = torch.randn(4000, 1, dtype=dtype) * 4
    points[::7] = 0.0  # exactly at the kinks, where the slope below zero applies
    points[1::11] = -0.0

    grad, output = chain_gradient(layers)(points)
    expected_grad, expected_output = autograd_gradient(layers, points)

    assert torch.equal(output, expected_output)
    assert torch.equal(grad, expected_grad)


def tail_of(net: nn.Module) -> fx.GraphModule:
    return split_affine_prefix(net).kink.tail


def test_the_titanic_tail_is_a_chain():
    net = TitanicMLP().eval()

    layers = activation_chain(tail_of(net))

    assert layers is not None and isinstance(layers[-1], nn.Sigmoid)


def test_a_hooked_layer_in_the_tail_goes_through_autograd():
    net = TitanicMLP().eval()
    tail = tail_of(net)
    net.sigmoid.register_forward_hook(lambda module, args, output: output * 2)

    assert activation_chain(tail) is None


class Tail(nn.Module):
    def __init__(self, *rest: nn.Module) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)
        self.rest = nn.Sequential(*rest)

    def forward(self, x):
        return self.rest(self.l2(self.act(self.l1(x))))


class FunctionalTail(Tail):
    def forward(self, x):
        return torch.sigmoid(self.l2(self.act(self.l1(x))))


@pytest.mark.parametrize("model", [
    lambda: Tail(nn.ReLU(inplace=True), nn.Sigmoid()),
    lambda: Tail(nn.Softplus()),
    lambda: FunctionalTail(),
], ids=["in place", "another activation", "a function"])
def test_other_tails_go_through_autograd(model):
    assert activation_chain(tail_of(model().eval())) is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_autograd(precision):
    kink = split_affine_prefix(TitanicMLP().eval()).kink
    x = torch.zeros(2, 128)

    assert engine.core._activation_tail(kink, RunOptions(precision=precision), x) is None
    assert engine.core._activation_tail(kink, RunOptions(), x) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_titanic_attributions_are_those_of_the_autograd_tail(dtype, monkeypatch):
    torch.manual_seed(6)
    net = TitanicMLP().to(dtype).eval()
    x, baselines = torch.rand(60, 5, dtype=dtype), torch.rand(4, 5, dtype=dtype)
    baselines[2] = 0.0

    by_formula = integrated_gradients(net, x, baselines, n_steps=50)
    monkeypatch.setattr(engine.core, "_activation_tail", lambda *args: None)
    by_autograd = integrated_gradients(net, x, baselines, n_steps=50)

    assert torch.equal(by_formula, by_autograd)


def test_a_hook_on_the_prelu_behind_the_kernel_substitution_goes_through_autograd():
    net = TitanicMLP().eval()
    tail = tail_of(net)
    assert isinstance(activation_chain(tail)[0], _ScalarSlopePReLU)

    net.r2.register_forward_hook(lambda module, args, output: output * 2)

    assert activation_chain(tail) is None


@pytest.mark.parametrize("slope", [np.float32(0.3), torch.tensor(0.3)], ids=["numpy", "tensor"])
def test_a_leaky_slope_given_as_a_numpy_number_or_a_tensor(slope, monkeypatch):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1), nn.LeakyReLU(slope),
                        nn.Tanh()).eval()
    x = torch.randn(5, 3)
    assert activation_chain(tail_of(net)) is not None

    by_formula = integrated_gradients(net, x, n_steps=16)
    monkeypatch.setattr(engine.core, "_activation_tail", lambda *args: None)
    by_autograd = integrated_gradients(net, x, n_steps=16)

    assert torch.equal(by_formula, by_autograd)


def test_a_patched_activation_class_goes_through_autograd(monkeypatch):
    torch.manual_seed(8)
    net = TitanicMLP().eval()
    x = torch.rand(20, 5)
    monkeypatch.setattr(nn.Sigmoid, "forward", lambda self, h: torch.sigmoid(2 * h))

    assert activation_chain(tail_of(net)) is None
    by_default = integrated_gradients(net, x, torch.zeros(1, 5), n_steps=16)
    monkeypatch.setattr(engine.core, "_activation_tail", lambda *args: None)
    by_autograd = integrated_gradients(net, x, torch.zeros(1, 5), n_steps=16)

    assert torch.equal(by_default, by_autograd)
