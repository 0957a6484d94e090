"""Hoist a model's leading affine layers out of the path integral.

If the model starts with an affine map A (Linear, Conv, eval-mode BatchNorm, with nothing
non-linear between them), then A(b + a (x - b)) = A(b) + a (A(x) - A(b)): the straight
path in input space is a straight path in A's output space. So the prefix runs once per
row and once per baseline instead of once per path point, the integral is taken over the
rest of the model at h_b + a (h_x - h_b), and the summed gradient g is pulled back through
the prefix once: the input gradient is J_A^T g, and J_A does not depend on the point.
Exact in exact arithmetic; in floating point it differs from the plain path by rounding.

The split is found with ``torch.fx``: follow the input through call_module nodes while each
is affine and feeds only the next. A model that does not trace, whose traced split does
not reproduce its own outputs on a few rows, or whose backward the trace would not
reproduce (see ``model_graph`` and ``same_gradients``), is not hoisted.

The traced rest of the model also gets two kernel substitutions, both with the same values
and gradients bit for bit:

- a PReLU with a single slope runs as ``leaky_relu`` with that slope on a CPU: PReLU's
  CPU backward always computes the slope's gradient too, through a slow reduction that
  costs 20x the whole rest of the backward on the article's network;
- a ``Linear(n, 1)`` takes its input gradient as a broadcast product instead of a matrix
  product with an inner dimension of 1.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from engine.kinks import KinkSplit, split_kink
from engine.passes import MAX_NARROW_COLUMNS, MIN_INNER
from engine.rowwise import row_wise_layers, rows_apart_now
from engine.step import forget, global_hooks, memo, own_hooks
from engine.trace import Guards, trace

__all__ = ["AffineSplit", "ModelGraph", "fast_model", "global_hooks", "hooked", "model_graph",
           "pull_back", "reproduces", "same_gradients", "split_affine_prefix",
           "uses_batch_statistics"]

log = logging.getLogger(__name__)

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
           nn.ConvTranspose2d, nn.ConvTranspose3d)
# Affine only in eval mode: batch statistics and dropout masks depend on the batch.
_AFFINE_IN_EVAL = (nn.modules.batchnorm._BatchNorm, nn.Dropout)
_SHAPE_ONLY = (nn.Identity, nn.Flatten)


@dataclass(frozen=True)
class AffineSplit:
    """``model(x) == suffix(prefix(x))`` with ``prefix`` affine.

    ``modules`` are the prefix's layers; ``layers`` their qualified names. ``kink`` is
    the suffix taken apart at a leading ReLU-like layer and Linear (see engine.kinks),
    when it starts that way.
    """

    prefix: nn.Module
    suffix: nn.Module
    layers: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    kink: KinkSplit | None = None
    guards: Guards = Guards()
    # The layers of a trace that keeps rows apart (see engine.rowwise), else None.
    row_wise: tuple[nn.Module, ...] | None = None

    def run(self, x: Tensor) -> Tensor:
        """``suffix(prefix(x))``, through the kink split when there is one."""
        return self.finish(self.prefix(x))

    def finish(self, hidden: Tensor) -> Tensor:
        """``suffix(hidden)`` for the prefix's outputs, through the kink split when there is
        one (which leaves ``hidden`` as it was)."""
        if self.kink is not None:
            return self.kink.run(hidden)
        return self.suffix(hidden)

    def linear_jacobian(self, like: Tensor) -> Tensor | None:
        """The prefix's (H, F) Jacobian in float64 for (N, F) rows ``like``, when the prefix is
        Linear (and Identity) layers, none hooked, with the rows' dtype and device; else None.

        The product of the weights, read at every call. Only the pull-back uses it: the
        prefix itself runs layer by layer, as the model does, so that a hidden unit the
        model computes as exactly zero (a standardising layer at the mean baseline) is
        zero here too, and a kink after it sees the same side.
        """
        if like.dim() != 2 or not all(type(m) in (nn.Linear, nn.Identity) and not hooked(m)
                                      for m in self.modules):
            return None
        jacobian = None
        for module in self.modules:
            if not isinstance(module, nn.Linear):
                continue
            if module.weight.dtype != like.dtype or module.weight.device != like.device:
                return None
            weight = module.weight.detach().double()
            jacobian = weight if jacobian is None else weight @ jacobian
        if jacobian is None or jacobian.shape[1] != like.shape[1]:
            return None
        return jacobian

    def keeps_rows_apart(self) -> bool:
        """Whether the traced model cannot mix rows as its layers are now (see
        ``engine.rowwise``)."""
        return self.row_wise is not None and rows_apart_now(self.row_wise)

    def is_affine_now(self) -> bool:
        """Whether every prefix layer is affine in its current train/eval mode.

        A forward hook can change what a layer returns, so a hooked layer is not taken to
        be affine; nor is a BatchNorm layer without running statistics.
        """
        return not any(
            (isinstance(module, _AFFINE_IN_EVAL) and module.training) or hooked(module)
            or uses_batch_statistics(module)
            for module in self.modules
        )


def uses_batch_statistics(layer: nn.Module) -> bool:
    """Whether a BatchNorm layer normalises with the batch's statistics in eval mode too.

    Without running statistics (``track_running_stats=False``) it has nothing else to use.
    """
    return isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
        layer.running_mean is None or layer.running_var is None)


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more or other than its class's forward: its own
    hooks of any kind, a ``forward`` replaced on it, or global module hooks."""
    return own_hooks(module) or global_hooks()


def split_affine_prefix(model: object) -> AffineSplit | None:
    """The model's leading affine layers and the rest, or None when there are none.

    Traces ``model`` with ``torch.fx`` once per model object and layout (see
    ``engine.step.memo``), and again when an attribute its ``forward`` read has changed
    (see ``engine.trace``); a model that is not an ``nn.Module``, does not trace, or has
    no leading affine layer gives None.
    """
    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        return None

    def traced() -> AffineSplit | None:
        try:
            return _split(model)
        except Exception as error:  # noqa: BLE001 - any tracing failure means "do not hoist"
            log.debug("no affine prefix hoisting: %s does not trace (%s)", type(model).__name__,
                      str(error).splitlines()[0] if str(error) else type(error).__name__)
            return None

    return _guarded_memo(model, "affine split", traced,
                         lambda split: split.guards if split is not None else Guards())


def _guarded_memo(model: nn.Module, key: str, compute: Callable[[], object],
                  guards_of: Callable[[Any], Guards]) -> Any:
    """``memo(model, key, compute)``, computed again when its guards no longer hold."""
    value = memo(model, key, compute)
    guards = guards_of(value)
    if guards.hold():
        return value
    log.debug("%s of %s: %s changed since the trace; tracing again", key,
              type(model).__name__, guards.changed())
    forget(model, key)
    return memo(model, key, compute)


def _split(model: nn.Module) -> AffineSplit | None:
    traced, guards = trace(model)
    graph = traced.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        return None

    prefix_nodes: list[fx.Node] = []
    node = placeholders[0]
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            break
        module = model.get_submodule(str(user.target))
        if not isinstance(module, _LINEAR + _AFFINE_IN_EVAL + _SHAPE_ONLY):
            break
        prefix_nodes.append(user)
        node = user
    modules = tuple(model.get_submodule(str(n.target)) for n in prefix_nodes)
    if not any(isinstance(m, _LINEAR + _AFFINE_IN_EVAL) for m in modules):
        return None

    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    env[placeholders[0]] = prefix.node_copy(placeholders[0])
    for prefix_node in prefix_nodes:
        env[prefix_node] = prefix.node_copy(prefix_node, lambda n: env[n])
    prefix.output(env[prefix_nodes[-1]])

    suffix = fx.Graph()
    skipped = {placeholders[0], *prefix_nodes}
    env = {prefix_nodes[-1]: suffix.placeholder("hidden")}
    for rest in graph.nodes:
        if rest not in skipped:
            env[rest] = suffix.node_copy(rest, lambda n: env[n])

    suffix_module = fx.GraphModule(model, suffix)
    hidden = next(n for n in suffix.nodes if n.op == "placeholder")
    if _modified_in_place(suffix_module, hidden):
        _copy_input(suffix_module, hidden)
    kink = split_kink(suffix_module)
    if kink is not None:
        # The tail's input (the Linear's output) is a leaf in the closed form, as the
        # suffix's is: an in-place op on it (nn.ReLU(inplace=True) next) gets a copy too.
        mixed = next(n for n in kink.tail.graph.nodes if n.op == "placeholder")
        if _modified_in_place(kink.tail, mixed):
            _copy_input(kink.tail, mixed)
        _substitute_kernels(kink.tail)
    _substitute_kernels(suffix_module)
    layers = tuple(str(n.target) for n in prefix_nodes)
    log.debug("affine prefix of %s: %s", type(model).__name__, ", ".join(layers))
    return AffineSplit(
        prefix=fx.GraphModule(model, prefix),
        suffix=suffix_module,
        layers=layers,
        modules=modules,
        kink=kink,
        guards=guards,
        row_wise=row_wise_layers(traced),
    )


# Methods that return a view of their tensor: an in-place op on the view writes the tensor.
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "flatten", "unflatten", "squeeze",
                           "unsqueeze", "transpose", "permute", "expand", "expand_as",
                           "narrow", "select", "t", "contiguous", "__getitem__",
                           "swapaxes", "swapdims", "movedim", "moveaxis", "as_strided",
                           "diagonal", "unfold", "split", "chunk", "unbind"})
_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul,
                                 operator.itruediv, operator.ipow, operator.setitem})
# Functions and attributes that give a view of their first argument.
_VIEW_FUNCTIONS = frozenset({torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
                             torch.moveaxis, torch.flatten, torch.unflatten, torch.narrow,
                             torch.select, torch.as_strided, torch.reshape, torch.squeeze,
                             torch.unsqueeze, torch.permute, torch.t, torch.diagonal,
                             torch.split, torch.chunk, torch.unbind})
_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real"})


def _modified_in_place(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a user of ``node``, or of a view of it, writes it in place.

    In the model the prefix's output is an intermediate tensor, which an in-place
    activation (``nn.ReLU(inplace=True)``, ``x.relu_()``) may overwrite. In the suffix it is
    the path points, a leaf that requires grad, which autograd refuses to modify in place.
    """
    for user in node.users:
        if user.op == "call_module":
            module = graph_module.get_submodule(str(user.target))
            if getattr(module, "inplace", False) is True:
                return True
            if isinstance(module, _SHAPE_ONLY) and _modified_in_place(graph_module, user):
                return True
        elif user.op == "call_method":
            name = str(user.target)
            if user.args and user.args[0] is node:
                if name.endswith("_") and not name.startswith("_"):
                    return True
                # Called by name: h.__iadd__(1), h.__setitem__(i, v).
                if name == "__setitem__" or (name.startswith("__i") and name.endswith("__")):
                    return True
                if name in _VIEW_METHODS and _modified_in_place(graph_module, user):
                    return True
        elif user.op == "call_function":
            target = user.target
            first = bool(user.args) and user.args[0] is node
            if target in _IN_PLACE_OPERATORS and first:
                return True
            if target is operator.getitem and _modified_in_place(graph_module, user):
                return True
            if first and (target in _VIEW_FUNCTIONS or (
                    target is getattr and len(user.args) > 1
                    and user.args[1] in _VIEW_ATTRIBUTES)) \
                    and _modified_in_place(graph_module, user):
                return True
            name = getattr(target, "__name__", "")
            if name.endswith("_") and not name.startswith("_"):
                return True
            if _inplace_argument(target, user):
                return True
    return False


def _inplace_argument(function: object, node: fx.Node) -> bool:
    """Whether a call such as ``F.relu(x, inplace=True)`` asks for in-place work."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(function).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _copy_input(graph_module: fx.GraphModule, placeholder: fx.Node) -> None:
    """Give the suffix a copy of its input to write on."""
    graph = graph_module.graph
    with graph.inserting_after(placeholder):
        copy = graph.call_method("clone", (placeholder,))
    placeholder.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    graph_module.recompile()
    log.debug("the model writes its affine prefix's output in place: the suffix copies it")


class _ScalarSlopePReLU(nn.Module):
    """A single-slope PReLU that runs as leaky_relu on a CPU (same values and gradients)."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        self.prelu = prelu

    def forward(self, x: Tensor) -> Tensor:
        weight = self.prelu.weight
        if x.device.type != "cpu" or weight.requires_grad or torch.compiler.is_compiling():
            return self.prelu(x)
        return nn.functional.leaky_relu(x, float(weight))


class _RowDot(torch.autograd.Function):
    """``linear(x, weight, bias)`` for one output, with the input gradient as a broadcast.

    Autograd's Linear backward takes ``grad @ weight``, a matrix product with an inner
    dimension of 1 that BLAS runs several times slower than the elementwise product it
    equals (each entry is one multiplication, so the two agree bit for bit).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - autograd's signature
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        (weight,) = ctx.saved_tensors
        # Under autocast the forward multiplied by the weight cast to the gradient's dtype;
        # so does autograd's product in the backward. Each entry is one rounded product,
        # so a bfloat16 multiply equals it, where a float32 weight would promote the
        # product to a slow mixed-dtype one and a cast back.
        return grad * weight.to(grad.dtype), None, None


class _SingleOutputLinear(nn.Module):
    """A ``Linear(n, 1)`` whose input gradient is a broadcast product (see ``_RowDot``).

    Under ``torch.compile`` it is written as a product and a sum over features, which the
    compiler fuses with the layers around it instead of calling a matrix product.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if torch.compiler.is_compiling():
            product = (x * weight[0]).sum(-1, keepdim=True)
            return product if bias is None else product + bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return self.linear(x)
        return _RowDot.apply(x, weight, bias)


class _ColumnMajorBackward(_RowDot):
    """``linear(x, weight, bias)`` whose input gradient multiplies by a column-major weight.

    The forward is the layer's own call, bit for bit. The input gradient ``grad @ weight``
    has as many columns as the layer has inputs; with few of them the CPU's BLAS runs it
    about 3x slower on the row-major weight than on a column-major copy (see
    ``engine.passes``, which does the same for compiled chunks). The copy is a few
    hundred numbers, made per backward so that it always holds the current weight; the
    gradient equals autograd's to rounding (the BLAS sums in another order). The forward
    and what it saves are ``_RowDot``'s.
    """

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        (weight,) = ctx.saved_tensors
        return grad @ weight.t().contiguous().t(), None, None


def _split_half_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                       dtype: torch.dtype) -> Tensor:
    """``linear(x, weight, bias)`` in half precision with ``x`` and ``weight`` split in two.

    Autocast rounds the path points and the weight to 8 bits (bf16) or 11 (fp16) before a
    layer multiplies them. Each float32 number v is instead written as hi + lo (see
    ``_split_half``) and the product as x_hi W_hi + x_lo W_hi + x_hi W_lo: one
    half-precision product with three times the inner dimension, which the CPU and GPU
    kernels sum in float32 and round once at the end, as autocast's product is. What is
    left out (x_lo W_lo, and the rounding of the lo parts) is about 2^-16 of the product
    in bf16, far below the rounding of the result. The input gradient is
    ``grad @ W_hi + grad @ W_lo``, added in float32 (see ``_SplitHalfProduct``).

    Where a point is beyond the half dtype's range (fp16 above 65504) x_hi is inf, and
    that point's x_lo and last x_hi block are zeroed: its product overflows as autocast's
    does instead of giving nan (inf - inf), and the other points keep the split. Eager
    only: compiled chunks keep autocast's product (see ``_NarrowInputLinear``).
    """
    if x.numel() == 0:  # an empty sub-batch (rows routed elsewhere)
        return nn.functional.linear(x, weight, bias)
    return _SplitHalfProduct.apply(x, weight, bias, dtype)


class _SplitHalfProduct(torch.autograd.Function):
    """``_split_half_linear``, with its input gradient summed in float32: autograd through
    the product would add grad @ W_hi and grad @ W_lo in the half dtype, rounding the
    gradient twice."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        truncated = _truncated(x, dtype)
        x_hi, x_lo, x_last = truncated.to(dtype), (x - truncated).to(dtype), None
        if not bool(x.abs().amax() <= torch.finfo(dtype).max):
            finite = torch.isfinite(x_hi)
            x_lo, x_last = x_lo.masked_fill(~finite, 0), x_hi.masked_fill(~finite, 0)
        # Concatenating contiguous half-precision blocks was twice as fast as writing
        # float32 blocks into one half-precision matrix (a 5-wide inner dimension).
        left = torch.cat([x_hi, x_lo, x_hi if x_last is None else x_last], dim=1)
        return nn.functional.linear(left, _split_weight(weight, dtype), _half_bias(bias, dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - autograd's signature
        ctx.save_for_backward(inputs[1])
        ctx.input_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        (weight,) = ctx.saved_tensors
        w_hi, w_lo = _split_half(weight, grad.dtype)
        # grad @ W_hi + grad @ W_lo, added in float32.
        x_grad = (grad @ w_hi).to(ctx.input_dtype)
        return x_grad.add_(grad @ w_lo), None, None, None


def _split_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[W_hi, W_hi, W_lo] side by side, for the blocks [x_hi, x_lo, x_hi]."""
    w_hi, w_lo = _split_half(weight, dtype)
    # Where W_hi overflowed, the middle block must add nothing (x_lo may be 0: 0 * inf).
    w_mid = torch.where(torch.isfinite(w_hi), w_hi, 0.0)
    return torch.cat([w_hi, w_mid, w_lo], dim=-1)


def _half_bias(bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Rounded as autocast rounds it: splitting it too changed the error on the article's
    # network by less than 1%.
    return None if bias is None else bias.detach().to(dtype)


# Bits of a float32 that the half dtype keeps: sign, 8 exponent bits and 7 (bf16) or 10
# (fp16) mantissa bits. Clearing the rest truncates v to the half dtype's precision.
_KEPT_BITS = {torch.bfloat16: -(1 << 16), torch.float16: -(1 << 13)}


def _truncated(v: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``v`` with the bits ``dtype`` has no room for cleared.

    Exact in ``dtype`` for its normal numbers, so ``v - truncated`` is the rest of ``v``
    without relying on a float32 -> half -> float32 round trip (which compiled graphs may
    skip). Below fp16's smallest normal number (6.1e-5) the cast to fp16 rounds the
    truncated value again, and hi + lo misses ``v`` by at most 2^-25: no more than
    autocast's own rounding there.
    """
    return (v.detach().view(torch.int32) & _KEPT_BITS[dtype]).view(v.dtype)


def _split_half(v: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """float32 ``v`` (no gradient) as ``hi + lo`` in ``dtype``.

    ``hi`` is ``v`` with the bits ``dtype`` has no room for cleared (see ``_truncated``),
    and ``lo = v - hi`` is exact in float32 before its own rounding (for normal numbers of
    ``dtype``). Where ``hi`` is not finite in ``dtype`` (inf or nan in ``v``, or beyond
    fp16's range), ``lo`` is 0.
    """
    truncated = _truncated(v, dtype)
    hi = truncated.to(dtype)
    lo = torch.where(torch.isfinite(hi), v.detach() - truncated, 0.0).to(dtype)
    return hi, lo


class _NarrowInputLinear(nn.Module):
    """A ``Linear`` with few inputs whose products keep its inputs' precision.

    On a CPU in float32 or float64 its input gradient is taken by ``_ColumnMajorBackward``
    (under ``torch.compile``, ``engine.passes`` does that). Under bf16 or fp16 autocast,
    eagerly, with float32 rows of features (in practice a model's first layer, which gets
    the path points: later layers get half-precision activations) and frozen weights, it
    runs as ``_split_half_linear``; its output is still rounded to the half dtype.

    As a model's first layer it reads the path points and returns the input gradient.
    Rounding the points and its weight to bf16 made a fifth of the bf16 error on the
    article's network (1.01e-2 against float32, 8.0e-3 with the split); the split's
    products have three times (forward) and twice (backward) the columns, and cost eager
    bf16 about a tenth of its time there. Compiled chunks keep autocast's product:
    Inductor's fused code already rounds less (9.2e-3 there), and the split cost compiled
    bf16 20%-35% for 7.7e-3.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            if dtype in _KEPT_BITS and x.dim() == 2 and x.dtype == torch.float32 \
                    and not torch.compiler.is_compiling() \
                    and weight.dtype == torch.float32 and not weight.requires_grad \
                    and (bias is None or not bias.requires_grad):
                return _split_half_linear(x, weight, bias, dtype)
            return self.linear(x)
        # Rows of features only: on more dimensions linear() returns a view, which a
        # model may not change in place when an autograd Function returned it.
        if (x.dim() != 2 or device_type != "cpu" or x.dtype not in (torch.float32, torch.float64)
                or weight.dtype != x.dtype or weight.requires_grad
                or (bias is not None and bias.requires_grad) or torch.compiler.is_compiling()):
            return self.linear(x)
        return _ColumnMajorBackward.apply(x, weight, bias)


def _substitute(module: nn.Module) -> nn.Module | None:
    # A substitute skips the module's own call, and with it the module's hooks.
    if own_hooks(module):
        return None
    if isinstance(module, nn.PReLU) and module.weight.numel() == 1:
        return _ScalarSlopePReLU(module)
    if type(module) is nn.Linear and module.out_features == 1:
        return _SingleOutputLinear(module)
    if type(module) is nn.Linear and _narrow_input(module):
        return _NarrowInputLinear(module)
    return None


def _narrow_input(linear: nn.Linear) -> bool:
    # The shapes engine.passes rewrites: 2-15 output columns of the input gradient, an
    # inner dimension (the layer's outputs) of at least 32.
    return (2 <= linear.in_features <= MAX_NARROW_COLUMNS and linear.out_features >= MIN_INNER
            and linear.weight.dim() == 2)


def _substitute_kernels(graph_module: fx.GraphModule) -> None:
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        replacement = _substitute(graph_module.get_submodule(str(node.target)))
        if replacement is not None:
            name = f"fast_{str(node.target).replace('.', '_')}"
            graph_module.add_submodule(name, replacement)
            node.target = name
    graph_module.recompile()


def fast_model(model: object) -> nn.Module | None:
    """The model traced with ``torch.fx`` and its slow kernels substituted, or None.

    None when the model does not trace or has nothing to substitute.
    """
    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        return None

    def traced() -> tuple[nn.Module, Guards] | None:
        if not any(_substitute(m) is not None for m in model.modules()):
            return None
        try:
            fast, guards = trace(model)
            _substitute_kernels(fast)
        except Exception as error:  # noqa: BLE001 - any tracing failure: run the model as is
            log.debug("no kernel substitution: %s does not trace (%s)",
                      type(model).__name__, str(error).splitlines()[0] if str(error)
                      else type(error).__name__)
            return None
        return fast, guards

    found = _guarded_memo(model, "kernel substitution", traced,
                          lambda found: found[1] if found is not None else Guards())
    return None if found is None else found[0]


def reproduces(candidate: Callable[[Tensor], Tensor], expected: Tensor, points: Tensor) -> bool:
    """Whether ``candidate(points)`` equals ``expected``, the model's outputs there, to rounding.

    Guards against models whose traced graph is not what they run (forward hooks, state
    read at call time, Python branches taken differently from the trace).
    """
    with torch.no_grad():
        try:
            split_output = candidate(points)
        except Exception as error:  # noqa: BLE001 - a split that fails to run is not used
            log.debug("affine split does not run: %s", error)
            return False
    return _close(split_output, expected)


def same_gradients(model: Callable[[Tensor], Tensor], candidate: Callable[[Tensor], Tensor],
                   points: Tensor) -> bool:
    """Whether ``candidate`` has ``model``'s input gradient at ``points``, to rounding.

    A trace records the forward only: ``torch.fx`` inlines a custom autograd Function's
    forward and drops its backward, calls a container's layers without the container's
    backward hooks, and does not see a block run with gradients off. Equal outputs do
    not show any of these; the gradients do. The gradient taken is that of the outputs
    weighted by +-1 to 2. Each input feature is compared on its own scale, so a feature
    with small gradients (a raw amount in dollars beside 0/1 flags) is not hidden by a
    large one. A model whose output has no gradient does not pass: it then runs as it
    is, and the engine refuses it.
    """
    expected, actual = (_weighted_gradient(function, points) for function in (model, candidate))
    if expected is None or actual is None:
        return False
    expected, actual = (g.reshape(g.shape[0], -1) for g in (expected, actual))
    if not _close(actual, expected):
        return False
    # Per feature: each column against its own largest gradient (floored far below the
    # overall largest, so that rounding noise on a column of zeros passes).
    finite = torch.isfinite(expected).all() and torch.isfinite(actual).all()
    if not bool(finite) or expected.numel() == 0:
        return True
    tolerance = _tolerance(expected.dtype)
    overall = expected.abs().max()
    scale = expected.abs().amax(dim=0).clamp_min(float(overall) * 1e-9)
    return bool(((expected - actual).abs().amax(dim=0) <= tolerance * scale).all())


def _weighted_gradient(function: Callable[[Tensor], Tensor], points: Tensor) -> Tensor | None:
    leaf = points.detach().clone().requires_grad_()
    try:
        with torch.enable_grad():
            output = function(leaf)
            if not isinstance(output, Tensor) or not output.is_floating_point():
                return None
            if not output.requires_grad:
                # A model without a gradient runs as it is, so the engine refuses it.
                return None
            # Magnitudes 1 to 2 with alternating signs: no output's part cancels
            # another's, and negative upstream gradients are exercised too.
            count = output.numel()
            weights = torch.linspace(1.0, 2.0, count, dtype=output.dtype, device=output.device)
            weights[1::2] *= -1
            (grad,) = torch.autograd.grad((output * weights.view_as(output)).sum(), leaf,
                                          allow_unused=True)
    except Exception as error:  # noqa: BLE001 - not checked, so not used
        log.debug("gradient check failed to run: %s", error)
        return None
    return torch.zeros_like(leaf) if grad is None else grad


# Autograd nodes model_graph visits before it gives up and reports the graph as custom.
_MAX_GRAPH_NODES = 100_000


@dataclass(frozen=True)
class ModelGraph:
    """What a trace cannot show about the model's backward, as the model runs now.

    ``custom`` names a node whose backward is Python code, or is None. ``signature`` is
    the graph's shape: each node's type and the nodes it feeds back into, in a fixed
    order, and the tensor hooks registered while it ran; None when the model failed or
    its output has no gradient.
    """

    signature: tuple[object, ...] | None
    custom: str | None = None


class _HookSpy(TorchFunctionMode):
    """Counts ``Tensor.register_hook`` calls (a hook on an intermediate tensor changes the
    backward and leaves no trace in the graph's nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is Tensor.register_hook:
            self.hooks += 1
        return func(*args, **(kwargs or {}))


def model_graph(model: Callable[[Tensor], Tensor], points: Tensor) -> ModelGraph:
    """The model's autograd graph at ``points``, as ``ModelGraph`` describes it.

    A trace keeps a custom autograd Function's forward and drops its backward
    (straight-through estimators, gradient reversal, the nodes full backward hooks add);
    it also bakes in the Python state of the call it was made on, so a flag that later
    switches on a ``detach``, a block without gradients or a tensor hook changes the
    backward without changing any output. The first shows as ``custom``, the others as a
    ``signature`` unlike the one the trace was checked with. Weights do not enter it.
    """
    leaf = points.detach().clone().requires_grad_()
    spy = _HookSpy()
    try:
        with torch.enable_grad(), spy:
            output = model(leaf)
    except Exception as error:  # noqa: BLE001 - not checked, so not used
        return ModelGraph(None, f"the model failed with a gradient ({type(error).__name__})")
    if not isinstance(output, Tensor) or output.grad_fn is None:
        return ModelGraph(None)
    # Each node gets a number when first met; the signature lists, node by node, its type
    # and the numbers of the nodes it feeds back into (-1 for an input without a gradient).
    # Python wrappers of graph nodes stay the same object while referenced, so ``ids``
    # (which holds them) numbers each node of a graph with shared branches once.
    ids: dict[object, int] = {output.grad_fn: 0}
    signature: list[object] = [spy.hooks]
    queue = [output.grad_fn]
    for node in queue:
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return ModelGraph(None, type(node).__name__)
        edges = []
        for next_node, _ in node.next_functions:
            if next_node is None:
                edges.append(-1)
                continue
            if next_node not in ids:
                if len(ids) >= _MAX_GRAPH_NODES:
                    return ModelGraph(None, f"a graph of more than {_MAX_GRAPH_NODES} nodes")
                ids[next_node] = len(ids)
                queue.append(next_node)
            edges.append(ids[next_node])
        signature.append((type(node).__name__, tuple(edges)))
    return ModelGraph(tuple(signature))


def _tolerance(dtype: torch.dtype) -> float:
    # A thousand ulps covers batched kernels' rounding in float32 and float64; in half
    # precision that would be most of the output, so those get 5%.
    return min(1e3 * torch.finfo(dtype).eps, 0.05)


def _close(actual: object, expected: object) -> bool:
    """``actual`` equals ``expected`` to rounding; infs and nans must match exactly."""
    if not isinstance(expected, Tensor) or not isinstance(actual, Tensor):
        return False
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return False
    tolerance = _tolerance(expected.dtype) if expected.is_floating_point() else 0
    expected, actual = expected.detach(), actual.detach()
    if expected.numel() == 0:
        return True
    scale = expected.abs().max().clamp_min(1.0)
    if bool(((expected - actual).abs().max() <= tolerance * scale).item()):
        return True
    # Where the model gives inf or nan, the trace must give the same.
    finite = torch.isfinite(expected)
    same = (expected == actual) | (expected.isnan() & actual.isnan())
    scale = torch.where(finite, expected.abs(), 0.0).max().clamp_min(1.0)
    gap = torch.where(finite, (expected - actual).abs(),
                      torch.where(same, 0.0, float("inf")))
    return bool((gap.max() <= tolerance * scale).item())


# Largest prefix Jacobian (hidden x input features) that pull_back builds explicitly.
_JACOBIAN_ENTRIES = 1 << 20


def pull_back(split: AffineSplit, hidden_grad: Tensor, like: Tensor) -> Tensor:
    """J_A^T g for each row of ``hidden_grad``: (P, *H) -> (P, *F), F the features of ``like``.

    The prefix is affine, so its vector-Jacobian product is the same at every point; it is
    taken at zero, in the dtype of ``like`` (the inputs, hence the prefix's weights). When
    there are more rows than hidden units and the Jacobian is small, the Jacobian is built
    once and the rows are multiplied by it: on the article's network that replaces a
    (P x 128) by (128 x 128) product with a (P x 128) by (128 x 5) one. A prefix of
    Linear layers on rows of features has the product of their weights as its Jacobian
    (``AffineSplit.linear_jacobian``), in float64: float64 sums are pulled back without
    a float32 copy. Others get it from one backward of the hidden unit vectors. Returns
    the dtype of ``like``, or float64 for float64 sums through a product of weights.
    """
    n_hidden = hidden_grad[0].numel()
    n_features = like[0].numel()
    rows = hidden_grad.shape[0]
    if rows > n_hidden and n_hidden * n_features <= _JACOBIAN_ENTRIES:
        weights = split.linear_jacobian(like)
        if weights is not None:
            dtype = torch.float64 if hidden_grad.dtype == torch.float64 else like.dtype
            product = hidden_grad.reshape(rows, n_hidden).to(dtype) @ weights.to(dtype)
            return product.view(rows, *like.shape[1:])
        units = torch.zeros((n_hidden, n_hidden), dtype=like.dtype, device=like.device)
        units.fill_diagonal_(1)
        jacobian = _vector_jacobian(split, units.view(n_hidden, *hidden_grad.shape[1:]), like)
        # Held transposed, (F, H): a product with few output columns is several times
        # faster with its right factor transposed (F.linear's layout).
        transposed = jacobian.view(n_hidden, -1).t().contiguous()
        product = nn.functional.linear(hidden_grad.reshape(rows, n_hidden).to(like.dtype),
                                       transposed)
        return product.view(rows, *like.shape[1:])
    return _vector_jacobian(split, hidden_grad, like)


def _vector_jacobian(split: AffineSplit, hidden_grad: Tensor, like: Tensor) -> Tensor:
    anchor = torch.zeros(
        (hidden_grad.shape[0], *like.shape[1:]), dtype=like.dtype, device=like.device,
        requires_grad=True,
    )
    with torch.enable_grad():
        hidden = split.prefix(anchor)
        (grad,) = torch.autograd.grad(hidden, anchor, grad_outputs=hidden_grad.to(hidden.dtype))
    return grad
