"""Compiled chunks of whole paths: path points, forward, backward and the weighted sum in one graph.

With ``compile=`` the chunk loop hands ``torch.compile`` one function per chunk that takes
each pair's input and baseline and returns each pair's weighted gradient sum. Building the
points, the model's forward, its input-gradient backward (``torch.func.grad``) and the sum
over the steps are one graph, so the compiler can fuse them: on a small network the
per-point activations never reach memory, which is where eager chunks spend their time.
Compiling the model alone leaves every one of those steps a separate pass over memory.

The function has a fixed shape per run (the last chunk is padded with copies of its last
pair) so that it compiles once, and the compiled function is shared by later calls on the
same model and shapes. A model that ``torch.func.grad`` cannot differentiate (in-place
updates of its inputs, hooks that need autograd's graph) runs the per-point compiled loop.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from engine.step import compiled_copy, layout, module_of

__all__ = ["compiled_whole_paths", "select_output", "whole_path_sums"]

# Compiled copies of whole_path_sums per model and mode (see compiled_whole_paths).
_COMPILED: weakref.WeakKeyDictionary[Any, dict[object, Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


def whole_path_sums(
    model: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    baselines: tuple[Tensor, ...],
    alphas: Tensor,
    weights: Tensor,
    args: tuple[Any, ...],
    targets: None | tuple[int, ...] | Tensor,
    autocast: torch.dtype | None,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Weighted gradient sums over every step of each pair's path.

    ``inputs[i]`` and ``baselines[i]`` are (P, *F): one row per (baseline, row) pair.
    ``alphas`` and ``weights`` are (S,). ``args`` are the forward arguments, already laid
    out per point. ``targets`` is None, one index tuple for every point, or a (P * S, k)
    index per point. Returns the (P, *F) sums per input, in ``weights``' dtype, and the
    (P, S) target outputs.
    """
    n_pairs, n_steps = inputs[0].shape[0], alphas.shape[0]
    points = []
    for x, base in zip(inputs, baselines):
        alpha = alphas.to(x.dtype).view(1, n_steps, *([1] * (x.dim() - 1)))
        # The same expression and rounding as the eager chunks and Captum.
        path = base.unsqueeze(1) + alpha * (x - base).unsqueeze(1)
        points.append(path.flatten(0, 1))

    def total(*path_points: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(path_points[0].device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            output = model(*path_points, *args)
            selected = select_output(output, targets)
        return selected.sum(), selected.detach()

    argnums = tuple(range(len(points)))
    grads, selected = torch.func.grad(total, argnums=argnums, has_aux=True)(*points)
    sums = tuple(
        (grad.to(weights.dtype).view(n_pairs, n_steps, -1) * weights.view(1, n_steps, 1))
        .sum(1)
        .view(x.shape)
        for grad, x in zip(grads, inputs)
    )
    return sums, selected.view(n_pairs, n_steps)


def select_output(output: Tensor, targets: None | tuple[int, ...] | Tensor) -> Tensor:
    # Shapes were checked by an eager call of PathProblem.select before compiling.
    if targets is None:
        return output.reshape(output.shape[0])
    if isinstance(targets, tuple):
        return output[(slice(None), *targets)].reshape(output.shape[0])
    points = torch.arange(output.shape[0], device=output.device)
    return output[(points, *targets.unbind(1))].reshape(output.shape[0])


def compiled_whole_paths(model: Callable[..., Tensor], mode: str) -> Callable[..., Any]:
    """``whole_path_sums`` compiled with ``mode`` and fixed shapes, one copy per model.

    Dynamo keeps its compiled versions on the function's code object and stops compiling
    new ones (falling back to eager, with a warning) after a few per code object; the
    engine's calls raise that limit (``engine.step.RECOMPILE_LIMIT``). Every model, chunk
    shape and precision is another version, so each model gets a copy of the function
    with a code object of its own.
    """
    module = module_of(model)
    try:
        per_model = _COMPILED.setdefault(module or model, {})
    except TypeError:  # not weak-referenceable: compile a copy for this call only
        per_model = {}
    # torch.compile does not check module hooks again: a change of hooks compiles anew.
    hooks = layout(module) if module is not None else None
    return compiled_copy(whole_path_sums, per_model, mode, hooks)
