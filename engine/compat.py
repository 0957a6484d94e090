"""``IntegratedGradients``: Captum's class and call signature, the engine's batched kernel.

Code written for ``captum.attr.IntegratedGradients`` runs unchanged: same constructor,
same ``attribute`` arguments and return types, and it works inside Captum's wrappers such
as ``NoiseTunnel`` (it is a Captum ``GradientAttribution``). The differences:

- Baselines follow Captum: per input, a scalar, a (1, *F) tensor broadcast to every row,
  or a (N, *F) tensor with one baseline per row. There is one baseline per row; for many
  baseline kinds at once call ``engine.integrated_gradients``.
- ``internal_batch_size`` bounds the path points per forward/backward in both. Captum
  rounds it down to whole steps across all rows (at least one step of every row); the
  engine uses it as given.
- The step weights are kept in float64 (Captum rounds them to float32), so results agree
  to about 1e-7 relative, not to the last bit.
- An input the model does not use gets zero attributions; Captum raises autograd's
  error.

As in Captum, integer inputs are explained in floating point (the path points between an
integer row and its baseline are not integers), a row and a baseline of two floating
dtypes are explained in the wider one, ``n_steps`` may be a 0-d integer tensor, and an
``internal_batch_size`` below 1 warns and runs one step of every row per batch.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import GradientAttribution
from torch import Tensor

from engine.core import (
    BaselineArg,
    TargetArg,
    TensorOrTuple,
    float32_results_for_half_inputs,
    integrated_gradients,
)
from engine.errors import ArgumentError

__all__ = ["IntegratedGradients"]


def _unlogged(method: Callable[..., Any]) -> Callable[..., Any]:
    # Captum's wrappers (NoiseTunnel) call ``attribute.__wrapped__`` to bypass the usage
    # logging Captum decorates its own methods with; this gives ours that attribute.
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper


class IntegratedGradients(GradientAttribution):
    """Drop-in replacement for ``captum.attr.IntegratedGradients``.

    Parameters
    ----------
    forward_func : callable
        The model or any function from inputs to outputs.
    multiply_by_inputs : bool
        True: attributions are (x - baseline) times the path-averaged gradient (IG).
        False: the path-averaged gradient alone (Captum's "global" attribution).

    References
    ----------
    Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    """

    def __init__(self, forward_func: Callable[..., Tensor], multiply_by_inputs: bool = True):
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @_unlogged
    def attribute(
        self,
        inputs: TensorOrTuple,
        baselines: BaselineArg = None,
        target: TargetArg = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
    ) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
        """Integrated Gradients of each row against its baseline, Captum's way.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            (N, *F) per input.
        baselines : None, scalar, Tensor or tuple
            Per input: a scalar, (1, *F) shared by all rows, or (N, *F) one per row.
        target, additional_forward_args, n_steps, method
            As in ``captum.attr.IntegratedGradients.attribute``.
        internal_batch_size : int, optional
            Path points per forward/backward.
        return_convergence_delta : bool
            Also return the completeness gap per row.

        Returns
        -------
        attributions : Tensor or tuple of Tensor
            (N, *F) per input, like the inputs.
        delta : Tensor
            (N,), only when ``return_convergence_delta``.
        """
        is_tuple = isinstance(inputs, tuple)
        input_tuple = inputs if is_tuple else (inputs,)
        engine_baselines = _engine_baselines(baselines, input_tuple)
        input_tuple, engine_baselines = _floating(input_tuple, engine_baselines, is_tuple)
        inputs = input_tuple if is_tuple else input_tuple[0]
        internal_batch_size = _captum_batch_size(internal_batch_size, input_tuple)
        if isinstance(n_steps, Tensor) and n_steps.dim() == 0 and _is_integer(n_steps):
            n_steps = int(n_steps)  # Captum takes a 0-d integer tensor too

        # Half-precision inputs get float32 attributions and delta, as from Captum.
        with float32_results_for_half_inputs():
            result = integrated_gradients(
                self.forward_func,
                inputs,
                engine_baselines,
                target=target,
                additional_forward_args=additional_forward_args,
                n_steps=n_steps,
                method=method,
                internal_batch_size=internal_batch_size,
                return_convergence_delta=return_convergence_delta,
                multiply_by_inputs=self._multiply_by_inputs,
            )
        attributions, delta = result if return_convergence_delta else (result, None)
        # The engine returns (B, N, *F) with B = 1 here; Captum returns (N, *F).
        attributions = (
            tuple(a[0] for a in attributions) if is_tuple else attributions[0]
        )
        if delta is None:
            return attributions
        # Captum's delta has the dtype the attributions' sum promotes to.
        dtype = functools.reduce(torch.promote_types,
                                 (a.dtype for a in (attributions if is_tuple else (attributions,))))
        return attributions, delta[0].to(dtype)

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs


def _engine_baselines(baselines: BaselineArg, inputs: tuple[Any, ...]) -> Any:
    """Captum's per-input baselines as one engine baseline kind: (1, *F) or (1, N, *F)."""
    if baselines is None:
        return None
    many = isinstance(baselines, tuple)
    baseline_tuple = baselines if many else (baselines,)
    if len(baseline_tuple) != len(inputs):
        raise ArgumentError(
            f"got {len(baseline_tuple)} baselines for {len(inputs)} inputs: expected one per "
            "input"
        )
    converted = tuple(
        _one_kind(base, x, f"baselines[{i}]" if many else "baselines")
        for i, (base, x) in enumerate(zip(baseline_tuple, inputs))
    )
    return converted if many else converted[0]


def _one_kind(base: Any, x: Any, name: str) -> Any:
    if not isinstance(base, Tensor) or not isinstance(x, Tensor):
        # Scalars (and anything the engine will reject with its own message) pass through.
        return base
    features = tuple(x.shape[1:])
    if tuple(base.shape) == tuple(x.shape):
        return base.unsqueeze(0)
    if base.dim() >= 1 and base.shape[0] == 1:
        try:
            # Captum broadcasts a single example (or any shape with a leading 1) to every row.
            return base.expand(1, *features)
        except RuntimeError:
            pass
    raise ArgumentError(
        f"{name} has shape {tuple(base.shape)}: expected {tuple(x.shape)} (one per row), "
        f"(1, {', '.join(map(str, features))}) or a number"
    )


def _floating(
    inputs: tuple[Any, ...], baselines: Any, many: bool
) -> tuple[tuple[Any, ...], Any]:
    """Inputs and baselines in the dtype Captum's path points get.

    Captum computes ``baseline + alpha * (input - baseline)`` with a Python float alpha:
    an integer row becomes the default floating dtype, or the baseline's when it is a
    floating tensor, and a row and a baseline of two floating dtypes go to the wider one
    (exactly: the narrower converts without rounding). Everything else passes unchanged
    for the engine to check.
    """
    base_tuple = baselines if many else (baselines,)
    if baselines is None:
        base_tuple = (None,) * len(inputs)
    if not any(_is_integer(x) or _other_floating(x, base)
               for x, base in zip(inputs, base_tuple)):
        return inputs, baselines
    new_inputs, new_bases = [], []
    for x, base in zip(inputs, base_tuple):
        if _is_integer(x):
            dtype = base.dtype if isinstance(base, Tensor) and base.is_floating_point() \
                else torch.get_default_dtype()
            x = x.to(dtype)
            if _is_integer(base):
                base = base.to(dtype)
        elif _other_floating(x, base):
            dtype = torch.promote_types(x.dtype, base.dtype)
            x, base = x.to(dtype), base.to(dtype)
        new_inputs.append(x)
        new_bases.append(base)
    if baselines is None:
        return tuple(new_inputs), None
    return tuple(new_inputs), (tuple(new_bases) if many else new_bases[0])


def _other_floating(x: Any, base: Any) -> bool:
    """Whether ``x`` and ``base`` are floating tensors of two different dtypes."""
    return isinstance(x, Tensor) and isinstance(base, Tensor) and x.is_floating_point() \
        and base.is_floating_point() and x.dtype != base.dtype


def _is_integer(value: Any) -> bool:
    return isinstance(value, Tensor) and not value.is_floating_point() \
        and not value.is_complex() and value.dtype != torch.bool


def _captum_batch_size(internal_batch_size: Any, inputs: tuple[Any, ...]) -> Any:
    """Captum's reading of an ``internal_batch_size`` below 1: one step of every row."""
    if isinstance(internal_batch_size, bool) \
            or not isinstance(internal_batch_size, numbers.Integral) or internal_batch_size >= 1:
        return internal_batch_size  # the engine checks the rest
    first = inputs[0] if inputs else None
    rows = first.shape[0] if isinstance(first, Tensor) and first.dim() > 0 else 1
    warnings.warn(
        f"internal_batch_size={internal_batch_size} is below 1: running {max(rows, 1)} path "
        "points (one step of every row) per batch, as Captum does",
        stacklevel=4,  # the caller of attribute, past the wrapper
    )
    return max(rows, 1)
