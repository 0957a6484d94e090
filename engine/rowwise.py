"""Traced graphs that cannot mix the rows of a batch.

The row-coupling probe (``engine.core.check_independent_rows``) runs the model on three
batches to see that no row's output depends on the others. When the engine integrates
through a ``torch.fx`` trace that is checked against the model on every call (see
``engine.core._checked_trace``), the numbers come from the trace, and a trace made only of
operations that treat each row on its own cannot mix rows, whatever its weights. For such
a trace the probe's first batch, which the trace check needs anyway, is enough: the other
two are skipped.

Only a short list qualifies, by exact type or function:

- torch.nn's row-wise layers (Linear, convolutions, element-wise activations, LayerNorm,
  Flatten from dimension 1 on; BatchNorm in eval mode with running statistics, Dropout in
  eval mode), none hooked;
- element-wise functions and arithmetic whose arguments are other nodes of the graph,
  Python numbers, or tensors the model holds with at most one dimension (which broadcast
  along the features, never along the rows).

Anything else (a reduction, indexing, a reshape, a function ``torch.fx`` was told not to
trace into, a tensor made in ``forward`` and baked into the trace with two dimensions or
more, an output that is not one tensor) leaves the full probe in place. So does torch
patched since this module was imported: a layer class's ``forward`` (or the methods it
calls) or a function of ``torch.nn.functional`` replaced, say by one that centres the
batch, makes the short list mean nothing, while the trace, which calls the patched code
too, still reproduces the model.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from engine.step import global_hooks, own_hooks

__all__ = ["row_wise_layers", "rows_apart_now", "torch_as_imported"]

# Layers whose output row i is a function of input row i alone, in any mode.
_ROW_WISE_LAYERS = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Identity, nn.LayerNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink,
})
# Row-wise in eval mode only (checked on every call: the mode may change).
_ROW_WISE_IN_EVAL = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d,
})
_ELEMENTWISE_FUNCTIONS = frozenset({
    torch.sigmoid, torch.tanh, torch.relu, torch.exp, torch.abs, torch.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.clamp,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.softplus, F.softsign, F.hardtanh, F.hardsigmoid, F.hardswish, F.logsigmoid,
    F.tanhshrink, F.sigmoid, F.tanh,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.pos,
})
_ELEMENTWISE_METHODS = frozenset({
    "sigmoid", "tanh", "relu", "exp", "abs", "neg", "add", "sub", "mul", "div", "clamp",
    "clamp_min", "clamp_max",
})
_PLAIN = (int, float, bool, str, type(None))

# What the layers above run, as torch defined it when this module was imported: each
# class's forward and the helper methods those call, torch.nn.functional's functions and
# the element-wise torch functions.
_METHODS = ("forward", "_conv_forward", "_output_padding", "_check_input_dim")
_AS_IMPORTED = {
    kind: tuple((name, getattr(kind, name)) for name in _METHODS if hasattr(kind, name))
    for kind in (*_ROW_WISE_LAYERS, *_ROW_WISE_IN_EVAL, nn.Flatten)
}
_FUNCTIONAL_AS_IMPORTED = tuple(
    (namespace, name, getattr(namespace, name))
    for namespace, names in (
        (F, ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "layer_norm", "batch_norm", "dropout", "dropout1d",
             "dropout2d", "dropout3d", "relu", "relu6", "leaky_relu", "prelu", "elu", "selu",
             "celu", "gelu", "silu", "mish", "softplus", "softsign", "hardtanh",
             "hardsigmoid", "hardswish", "logsigmoid", "tanhshrink", "sigmoid", "tanh")),
        (torch, ("sigmoid", "tanh", "relu", "flatten")),
    )
    for name in names
)


def row_wise_layers(graph_module: fx.GraphModule) -> tuple[nn.Module, ...] | None:
    """The layers ``graph_module`` calls, when every node of its graph keeps rows apart
    as long as those layers are unhooked (and in eval mode where that matters); else None.

    Decided once per trace: the graph and the layers' types do not change while the
    trace is in use. ``rows_apart_now`` checks what may change between calls.
    """
    layers: list[nn.Module] = []
    placeholders = 0
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                return None
        elif node.op == "call_module":
            layer = graph_module.get_submodule(str(node.target))
            if not _row_wise_layer(layer) or not _plain_arguments(node):
                return None
            layers.append(layer)
        elif node.op == "call_function":
            if node.target not in _ELEMENTWISE_FUNCTIONS \
                    or not _plain_arguments(node):
                return None
        elif node.op == "call_method":
            if node.target not in _ELEMENTWISE_METHODS \
                    or not _plain_arguments(node):
                return None
        elif node.op == "get_attr":
            if not _feature_sized(graph_module, str(node.target)):
                return None
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None
        else:
            return None
    return tuple(layers)


def rows_apart_now(layers: tuple[nn.Module, ...]) -> bool:
    """Whether ``row_wise_layers``' layers keep rows apart as they are now: none hooked,
    and those with batch statistics or random masks in eval mode."""
    if global_hooks() or not torch_as_imported(layers):
        return False
    for layer in layers:
        if own_hooks(layer):
            return False
        if type(layer) in _ROW_WISE_IN_EVAL and layer.training:
            return False
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) \
                and (layer.running_mean is None or layer.running_var is None):
            return False
    return True


def _torch_own(function: object) -> bool:
    module = getattr(function, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


# A patch made before this module was imported: by a function from outside torch.
_PATCHED_BEFORE = not all(
    _torch_own(function) for function in (
        *(method for methods in _AS_IMPORTED.values() for _, method in methods),
        *(function for _, _, function in _FUNCTIONAL_AS_IMPORTED),
    )
)


def torch_as_imported(layers: Iterable[nn.Module]) -> bool:
    """Whether the classes of ``layers`` (of the short list) and the torch functions they
    call are still those torch defined: nobody patched them since this module was
    imported, nor before with functions of their own."""
    if _PATCHED_BEFORE:
        return False
    if any(getattr(namespace, name, None) is not function
           for namespace, name, function in _FUNCTIONAL_AS_IMPORTED):
        return False
    for kind in {type(layer) for layer in layers}:
        methods = _AS_IMPORTED.get(kind)
        if methods is not None and any(getattr(kind, name, None) is not method
                                       for name, method in methods):
            return False
    return True


def _row_wise_layer(layer: nn.Module) -> bool:
    kind = type(layer)
    if kind is nn.Flatten:
        # Flattening from dimension 0 merges the rows into one.
        return layer.start_dim >= 1
    return kind in _ROW_WISE_LAYERS or kind in _ROW_WISE_IN_EVAL


def _plain_arguments(node: fx.Node) -> bool:
    """Whether every argument is a node of the graph or a plain Python value."""
    for value in (*node.args, *node.kwargs.values()):
        if isinstance(value, fx.Node):
            continue
        if not isinstance(value, _PLAIN):
            return False
    return True


def _feature_sized(graph_module: fx.GraphModule, target: str) -> bool:
    """Whether the tensor at ``target`` broadcasts along the features only."""
    try:
        value = graph_module.get_parameter(target)
    except AttributeError:
        try:
            value = graph_module.get_buffer(target)
        except AttributeError:
            value = getattr(graph_module, target, None)
    return isinstance(value, torch.Tensor) and value.dim() <= 1
