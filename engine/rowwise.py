"""Traced graphs that keep every row of a batch to itself, whatever the weights.

The engine sums the outputs of many path points before one backward, which is exact only
when no row's output depends on another row. For a model it runs as it is, that takes a
probe: two batches, compared (see ``engine.core``). A traced graph is different: when each
of its nodes is a layer or a function that acts on every row alone (a Linear layer, an
activation, a product with a number), the whole graph does, and a run that computes with
that graph needs only the check that the graph still computes the model.

The lists are short on purpose. Anything not on them (a reduction, an indexing, a tensor
held by the model, a product of two activations whose shapes broadcast across rows, a
custom layer) makes the graph unproven, and the probe runs as before.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from engine.step import global_hooks, own_hooks

__all__ = ["row_wise_layers", "rows_independent_now", "uses_batch_statistics"]

# Layers that map each row (a sample with any trailing shape) on its own.
_ROW_WISE = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Identity, nn.LayerNorm, nn.GroupNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink,
})
# Not listed: adaptive pools, which take an input without a batch dimension, and so pool
# across the rows, whatever the number of rows.

# Row-wise in eval mode only: batch statistics and dropout masks.
_ROW_WISE_IN_EVAL = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
})
# Layers whose ``dim`` attribute must point past the batch dimension.
_ALONG_DIM = frozenset({nn.Softmax, nn.LogSoftmax})

_ELEMENTWISE_FUNCTIONS = frozenset({
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.neg, torch.abs, torch.square,
    torch.clamp, torch.clip,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.softplus,
    F.hardtanh, F.hardsigmoid, F.hardswish, F.logsigmoid, F.sigmoid, F.tanh,
})
_ELEMENTWISE_METHODS = frozenset({
    "relu", "sigmoid", "tanh", "exp", "neg", "abs", "square", "add", "sub", "mul", "div",
    "pow", "clamp", "clip", "float", "double",
})
# Arithmetic between an activation and plain numbers.
_ARITHMETIC = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos,
    operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.pow,
})


def row_wise_layers(traced: fx.GraphModule) -> tuple[nn.Module, ...] | None:
    """The layers ``traced`` calls when every node of its graph acts on each row alone.

    None when any node is not known to: the caller then has to probe the model. Layers on
    the list only in eval mode, and layers that may gain hooks, are returned so that the
    caller can check them at the time of each run (``rows_independent_now``).
    """
    layers = []
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None
        elif node.op == "call_module":
            layer = traced.get_submodule(str(node.target))
            if not _row_wise_layer(layer) or _nodes_in(node.args[1:], node.kwargs):
                return None
            layers.append(layer)
        elif node.op == "call_function":
            if node.target is torch.flatten:
                if not _keeps_rows_flattened(node):
                    return None
            elif not _row_wise_call(node.target, node.args, node.kwargs):
                return None
        elif node.op == "call_method":
            if str(node.target) == "flatten":
                if not _keeps_rows_flattened(node):
                    return None
            elif str(node.target) not in _ELEMENTWISE_METHODS or not _numbers_besides_first(
                    node.args, node.kwargs):
                return None
        else:
            # get_attr: a tensor the model holds, which may be laid out along the rows.
            return None
    return tuple(layers)


def rows_independent_now(layers: tuple[nn.Module, ...] | None) -> bool:
    """Whether ``row_wise_layers``' answer still holds for the layers as they are now.

    A layer can change after the trace without a change the remembered trace notices: its
    mode, its hooks, an attribute such as ``dim``, its running statistics, even its class.
    """
    if layers is None or global_hooks():
        return False
    return all(_row_wise_layer(layer) and not own_hooks(layer) for layer in layers)


def uses_batch_statistics(layer: nn.Module) -> bool:
    """Whether a BatchNorm layer normalises with the batch's statistics in eval mode too.

    Without running statistics (``track_running_stats=False``) it has nothing else to use.
    """
    return isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
        layer.running_mean is None or layer.running_var is None)


def _row_wise_layer(layer: nn.Module) -> bool:
    # Exact types: a subclass (or a parametrised layer) may compute anything.
    kind = type(layer)
    if kind in _ROW_WISE:
        return True
    if kind in _ROW_WISE_IN_EVAL:
        return not layer.training and not uses_batch_statistics(layer)
    if kind is nn.Flatten:
        return layer.start_dim >= 1
    if kind in _ALONG_DIM:
        return isinstance(layer.dim, int) and layer.dim >= 1
    return False


def _keeps_rows_flattened(node: fx.Node) -> bool:
    """``x.flatten(start_dim)`` or ``torch.flatten(x, start_dim)`` with start_dim >= 1."""
    if not node.args:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return (isinstance(node.args[0], fx.Node) and type(start) is int and start >= 1
            and _numbers_besides_first(node.args, node.kwargs))


def _row_wise_call(function: object, args: tuple, kwargs: dict) -> bool:
    if function in _ELEMENTWISE_FUNCTIONS:
        return bool(args) and isinstance(args[0], fx.Node) and _numbers_besides_first(
            args, kwargs)
    if function in _ARITHMETIC:
        # One activation and numbers: two activations may broadcast one row against others.
        values = [*args, *kwargs.values()]
        nodes = [value for value in values if isinstance(value, fx.Node)]
        others = [value for value in values if not isinstance(value, fx.Node)]
        return len(nodes) == 1 and all(_plain(value) for value in others)
    return False


def _numbers_besides_first(args: tuple | list, kwargs: dict) -> bool:
    return all(_plain(value) for value in [*args[1:], *kwargs.values()])


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _nodes_in(args: Iterable[object], kwargs: dict) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg((tuple(args), kwargs), found.append)
    return bool(found)
