"""What one chunk's forward/backward runs on: frozen weights, an optional compiled model.

Freezing the parameters for the duration of a run is not cosmetic: autograd skips weight
gradients it is not asked for, but some kernels (PReLU's backward, for one) compute the
input and weight gradients together unless the weight does not require grad.

``torch.compile`` traces the model once per chunk shape; every chunk is padded to the
planned size so that the model compiles once per run, and the compiled model is kept per
model object so that a second run does not compile again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import ArgumentError
from engine.passes import compile_options

__all__ = ["all_finite", "compiled_copy", "compiled_model", "forget", "frozen_parameters",
           "global_hooks", "keeps_batch_statistics", "layout", "memo", "non_finite_weights",
           "own_hooks", "owns_precision", "pad_rows"]

log = logging.getLogger(__name__)

_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[object, Callable[..., Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def module_of(forward_func: object) -> nn.Module | None:
    """The module behind ``forward_func``: itself, or the owner of a bound method."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


# Dtypes numpy reads in place; on a CPU its isfinite is one pass, where torch's is four
# kernels (about 25 us each call on small tensors).
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no nan or inf: for the checks every call makes."""
    if not tensor.is_floating_point():
        return True
    array = numpy_view(tensor)
    if array is not None:
        return bool(np.isfinite(array).all())
    return bool(torch.isfinite(tensor.detach()).all())


def numpy_view(tensor: Tensor) -> np.ndarray | None:
    """A floating point CPU tensor as a numpy array on the same memory, where numpy reads
    its dtype; else None (other devices and dtypes, subclasses, inside torch.compile)."""
    tensor = tensor.detach()
    if type(tensor) is Tensor and tensor.device.type == "cpu" \
            and tensor.dtype in _NUMPY_FLOATS and not torch.compiler.is_compiling():
        return tensor.resolve_neg().numpy()
    return None


def non_finite_weights(module: nn.Module | None, most: int = 3) -> str:
    """Name the parameters and buffers holding nan or inf; ``""`` when there are none.

    ``"parameter l1.weight: 3 of 640 values"``, up to ``most`` of them, then how many
    more. Reads every weight once: for messages, not for every call.
    """
    if module is None:
        return ""
    named = [("parameter", name, tensor) for name, tensor in module.named_parameters()]
    named += [("buffer", name, tensor) for name, tensor in module.named_buffers()]
    culprits = []
    for kind, name, tensor in named:
        if not tensor.is_floating_point():
            continue
        count = int((~torch.isfinite(tensor.detach())).sum())
        if count:
            culprits.append(f"{kind} {name}: {count:,} of {tensor.numel():,} values")
    more = f" and {len(culprits) - most} more" if len(culprits) > most else ""
    return "; ".join(culprits[:most]) + more


@contextlib.contextmanager
def frozen_parameters(forward_func: object) -> Iterator[None]:
    """Set ``requires_grad=False`` on the model's parameters, and restore them after."""
    module = module_of(forward_func)
    parameters = [p for p in module.parameters() if p.requires_grad] if module else []
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def keeps_batch_statistics(function: Callable[..., object]) -> Callable[..., object]:
    """Run ``function`` and put back the running statistics of training-mode BatchNorms.

    Only with ``allow_coupled_rows=True`` do such layers take part: every forward the
    engine makes (probes, chunks) would otherwise count as a training batch and move
    their running mean and variance.
    """

    @functools.wraps(function)
    def wrapper(forward_func: object, *args: object, **kwargs: object) -> object:
        module = module_of(forward_func) if kwargs.get("allow_coupled_rows") else None
        saved = [] if module is None else [
            (buffer, buffer.detach().clone())
            for layer in module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
            for buffer in layer.buffers(recurse=False)
        ]
        try:
            return function(forward_func, *args, **kwargs)
        finally:
            with torch.no_grad():
                for buffer, kept in saved:
                    buffer.copy_(kept)

    return wrapper


_AUTOCAST_DEVICES = ("cpu", "cuda")
_warned_autocast = False


def owns_precision(function: Callable[..., object]) -> Callable[..., object]:
    """Run ``function`` with the caller's autocast switched off, and not in inference mode.

    The engine's ``precision`` argument decides where half precision is used; a caller's
    ``torch.autocast`` around the call would also round the engine's own sums over the
    steps and, on a CPU, the backward (which runs on the caller's thread), whatever
    ``precision`` says. Inference mode forbids the gradients the engine takes.
    """

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        global _warned_autocast
        if torch.is_inference_mode_enabled():
            raise ArgumentError(
                "called inside torch.inference_mode(), where no gradient can be taken: call "
                "the engine outside it (torch.no_grad() around the call is fine)"
            )
        active = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
        if not active:
            return function(*args, **kwargs)
        if not _warned_autocast:
            _warned_autocast = True
            log.warning("torch.autocast is active around the call: the engine switches it off "
                        "and uses its precision argument instead (precision='bf16' or 'fp16' "
                        "for mixed precision)")
        with contextlib.ExitStack() as stack:
            for device in active:
                stack.enter_context(torch.autocast(device, enabled=False))
            return function(*args, **kwargs)

    return wrapper


_MEMO: weakref.WeakKeyDictionary[nn.Module, dict[object, object]] = weakref.WeakKeyDictionary()


def memo(forward_func: object, key: object, compute: Callable[[], object]) -> object:
    """``compute()``, remembered per module while the module's layout is unchanged.

    For facts about a model that cost work to learn and do not depend on its weights (a
    traced graph, activation bytes per point). Plain Python state of the model (a
    temperature attribute, a flag read in ``forward``) is invisible to the key: facts
    that decide correctness are checked on every call instead (see
    ``engine.core._usable_split``). The memo is keyed by ``key`` and
    by which submodules the model has, whether each is in training mode and how many
    forward hooks each has, so swapping a layer, adding a hook or calling ``.train()``
    measures again. Plain functions are never memoised.
    """
    module = forward_func if isinstance(forward_func, nn.Module) else None
    if module is None:
        return compute()
    table = _MEMO.setdefault(module, {})
    full_key = (key, layout(module))
    if full_key not in table:
        value = compute()
        if len(table) > 64:
            table.clear()
        table[full_key] = value
    return table[full_key]


def layout(module: nn.Module) -> tuple[object, ...]:
    """Which submodules ``module`` has, their train/eval modes and what runs around them.

    Each submodule's class, hooks of every kind (by handle, so removing one and adding
    another changes it), a ``forward`` replaced on an instance, which tensor objects its
    parameters and buffers are, and the global module hooks. A trace holds the tensors a
    module reads itself (a threshold buffer, ``self.scale``): a buffer or parameter
    replaced by another tensor (assigned, ``load_state_dict(assign=True)``, a buffer
    after ``.double()``) calls for a new trace. Changes in place are read live.
    """
    hooks = nn.modules.module
    return (
        tuple(
            (id(m), type(m), m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
             tuple(m._backward_hooks), tuple(m._backward_pre_hooks), "forward" in vars(m),
             tuple(map(id, m._parameters.values())), tuple(map(id, m._buffers.values())))
            for m in module.modules()
        ),
        tuple(hooks._global_forward_hooks), tuple(hooks._global_forward_pre_hooks),
        tuple(hooks._global_backward_hooks), tuple(hooks._global_backward_pre_hooks),
    )


def own_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more or other than its class's forward.

    Forward and backward hooks, a ``forward`` replaced on the instance, and a class that
    overrides how a module is called (its own ``__call__``) can change what the layer
    returns or what gradient flows through it; a trace runs the forward alone.
    """
    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or module._backward_hooks or module._backward_pre_hooks
    ) or "forward" in vars(module) or _own_call(type(module))


def _own_call(klass: type) -> bool:
    return any(getattr(klass, name, None) is not getattr(nn.Module, name)
               for name in ("__call__", "_call_impl", "_wrapped_call_impl"))


def global_hooks() -> bool:
    """Whether hooks registered for every module are in place."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def forget(forward_func: object, key: object) -> None:
    """Drop what ``memo`` remembers under ``key`` for this module, whatever its layout."""
    module = forward_func if isinstance(forward_func, nn.Module) else None
    table = _MEMO.get(module) if module is not None else None
    if table:
        for full_key in [k for k in table if k[0] == key]:
            del table[full_key]


# Shapes one compiled function may take before Dynamo gives up and runs it eagerly (its
# own default is eight): the planner's chunk shapes (five, plus two per doubling of the
# size of one-chunk jobs, see engine.plan.padded_size) for a few dtypes and precisions.
RECOMPILE_LIMIT = 64


def _with_room(compiled: Callable[..., object]) -> Callable[..., object]:
    """``compiled``, called with Dynamo's recompile limit raised to RECOMPILE_LIMIT.

    Dynamo reads the limit when a call needs a new shape, so raising it for the call
    alone leaves the caller's own compiled functions under their usual limit.
    """
    from torch._dynamo import config

    def call(*args: object, **kwargs: object) -> object:
        limit = config.recompile_limit
        if limit >= RECOMPILE_LIMIT:
            return compiled(*args, **kwargs)
        config.recompile_limit = RECOMPILE_LIMIT
        try:
            return compiled(*args, **kwargs)
        finally:
            config.recompile_limit = limit

    return call


def compiled_model(forward_func: Callable[..., Tensor], mode: str) -> Callable[..., Tensor]:
    """``torch.compile(forward_func, mode=mode)`` with fixed shapes, cached per module."""
    module = forward_func if isinstance(forward_func, nn.Module) else None
    # torch.compile does not check module hooks again: a change of hooks compiles anew.
    key = (mode, layout(module)) if module is not None else mode
    if module is not None and key in _COMPILED.get(module, {}):
        return _COMPILED[module][key]
    compiled = _with_room(
        torch.compile(forward_func, options=compile_options(mode), dynamic=False)
    )
    if module is not None:
        _COMPILED.setdefault(module, {})[key] = compiled
    log.debug("compiling %s with mode %s", type(forward_func).__name__, mode)
    return compiled


def compiled_copy(function: Callable[..., object], cache: dict[object, Callable[..., object]],
                  mode: str, key: object) -> Callable[..., object]:
    """``torch.compile`` of a copy of ``function``, kept in ``cache[(mode, key)]``.

    Dynamo keeps its compiled versions on a function's code object and stops compiling
    new ones (falling back to eager, with a warning) after a few per code object; a copy
    per model gives each model a code object of its own.
    """
    if (mode, key) not in cache:
        copy = types.FunctionType(function.__code__.replace(), function.__globals__,
                                  function.__name__, function.__defaults__,
                                  function.__closure__)
        cache[mode, key] = _with_room(
            torch.compile(copy, options=compile_options(mode), dynamic=False)
        )
    return cache[mode, key]


def pad_rows(tensors: tuple[Tensor, ...], size: int) -> tuple[Tensor, ...]:
    """Repeat the last row of each tensor until it has ``size`` rows."""
    return tuple(
        torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])]) if t.shape[0] < size else t
        for t in tensors
    )
