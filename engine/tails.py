"""The closed form's tail, a chain of activations, differentiated without autograd.

After the closed form (``engine.kinks``) the rest of the model, the tail, runs on one
number per path point on the article's network: its second PReLU and the sigmoid. Through
autograd that is a forward, a graph and a backward of a few element-wise kernels over
35,800 points, and autograd's bookkeeping costs more than the arithmetic. For a tail
that is a chain of element-wise activations with one output, the derivative is the
product of each layer's own, computed here by torch's own backward kernels called in
autograd's order, so the values equal autograd's bit for bit.

Used on eager float32 and float64 runs only: under autocast or ``torch.compile`` the tail
goes through autograd as before. A hooked layer (its hooks may change what it returns or
its gradient), an in-place layer, or anything else in the chain also leaves it to
autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx, nn

from engine.hoist import _ScalarSlopePReLU
from engine.rowwise import torch_as_imported
from engine.step import global_hooks, own_hooks

__all__ = ["activation_chain", "chain_gradient"]

_CHAIN_LAYERS = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity,
                 _ScalarSlopePReLU)


def activation_chain(tail: nn.Module) -> tuple[nn.Module, ...] | None:
    """The tail's layers when it is ``placeholder -> layer -> ... -> layer -> output``,
    each an activation of ``_CHAIN_LAYERS`` (exact type) that is not in place and not
    hooked now, with one input per point; else None."""
    if not isinstance(tail, fx.GraphModule) or global_hooks():
        return None
    layers = []
    previous = None
    for node in tail.graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None
        elif node.op == "call_module":
            layer = tail.get_submodule(str(node.target))
            # The kernel substitution's PReLU runs the model's own layer: check that one.
            own = layer.prelu if isinstance(layer, _ScalarSlopePReLU) else layer
            if type(layer) not in _CHAIN_LAYERS or node.args != (previous,) or node.kwargs \
                    or getattr(own, "inplace", False) or own_hooks(layer) or own_hooks(own) \
                    or (isinstance(own, nn.PReLU) and own.weight.numel() != 1) \
                    or (isinstance(own, nn.LeakyReLU) and _slope(own) is None):
                return None
            layers.append(layer)
        elif node.op == "output":
            if node.args != (previous,):
                return None
        else:
            return None
        previous = node
    # The backward kernels are those of the layers as torch defines them.
    if not torch_as_imported(layer.prelu if isinstance(layer, _ScalarSlopePReLU) else layer
                             for layer in layers):
        return None
    return tuple(layers)


def chain_gradient(layers: tuple[nn.Module, ...]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``points -> (d output / d points, output)`` through ``layers``, for (P, 1) points."""

    def gradient(points: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            seen, value = [], points
            for layer in layers:
                output = layer(value)
                seen.append((value, output))
                value = output
            # Backward from the output, as autograd runs it from a gradient of ones.
            grad = torch.ones_like(value)
            for layer, (layer_input, output) in zip(reversed(layers), reversed(seen)):
                grad = _layer_gradient(layer, layer_input, output, grad)
        return grad, value

    return gradient


def _layer_gradient(layer: nn.Module, layer_input: Tensor, output: Tensor, grad: Tensor
                    ) -> Tensor:
    """The gradient at ``layer``'s input, given ``grad`` at its ``output``: torch's own
    backward kernel for the layer, as autograd calls it."""
    if isinstance(layer, nn.Identity):
        return grad
    if isinstance(layer, nn.Sigmoid):
        return _ATEN.sigmoid_backward(grad, output)
    if isinstance(layer, nn.Tanh):
        return _ATEN.tanh_backward(grad, output)
    if isinstance(layer, nn.ReLU):
        return _ATEN.threshold_backward(grad, output, 0)
    if isinstance(layer, nn.LeakyReLU):
        slope = _slope(layer)
    else:
        # A single slope: PReLU's input gradient is leaky_relu's with that slope (the
        # kernel substitution of engine.hoist relies on the same).
        prelu = layer.prelu if isinstance(layer, _ScalarSlopePReLU) else layer
        slope = float(prelu.weight.detach())
    return _ATEN.leaky_relu_backward(grad, layer_input, slope, False)


_ATEN = torch.ops.aten


def _slope(layer: nn.LeakyReLU) -> float | None:
    """The layer's slope below zero as the float its forward reads (it may be a numpy
    number or a tensor of one value; the backward kernel takes a Python number only), or
    None for a slope that needs a gradient or is no single number."""
    slope = layer.negative_slope
    if isinstance(slope, torch.Tensor) and (slope.requires_grad or slope.numel() != 1):
        return None
    try:
        return float(slope)
    except (TypeError, ValueError, RuntimeError):
        return None
