"""Expected gradients: IG averaged over baselines drawn from a background set.

For input x, background rows b and a model F with target t,

    EG(x) = E_{b, a ~ U(0, 1)} [ (x - b) * dF_t/dx (b + a (x - b)) ]

estimated with ``n_samples`` draws of (b, a) per row: one path point per draw, so the
whole estimate is one batched forward/backward over N * n_samples points, cut into
chunks of whole rows that fit the memory budget (or of ``internal_batch_size`` points).
Draws come from a seeded generator on the CPU, so a seed gives the same baselines and
alphas on every device.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from engine.core import (
    _NO_GRADIENT,
    TargetArg,
    TensorOrTuple,
    _forward,
    _halved,
    _planned_chunk_points,
    _refuse_non_finite,
    _refuse_non_finite_gradients,
    _refuse_unreadable,
    check_independent_rows,
    check_model_device,
    make_problem,
    out_of_memory_named,
    refuse_non_finite_ends,
    refuse_overflow,
    refuse_overflowing_differences,
    shown_rows,
    weights_blamed,
)
from engine.errors import ArgumentError, ModelError
from engine.plan import run_options
from engine.step import all_finite, keeps_batch_statistics, owns_precision

__all__ = ["expected_gradients"]

log = logging.getLogger(__name__)


@out_of_memory_named
@owns_precision
@keeps_batch_statistics
def expected_gradients(
    forward_func: Callable[..., Tensor],
    inputs: TensorOrTuple,
    background: TensorOrTuple,
    *,
    n_samples: int = 50,
    target: TargetArg = None,
    additional_forward_args: Any = None,
    seed: int = 0,
    internal_batch_size: int | None = None,
    memory_budget: int | None = None,
    return_convergence_delta: bool = False,
    allow_coupled_rows: bool = False,
) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
    """Expected gradients of every row, baselines drawn from ``background``.

    Parameters
    ----------
    forward_func : callable
        The model; rows must not interact.
    inputs : Tensor or tuple of Tensor
        (N, *F) floating point.
    background : Tensor or tuple of Tensor
        (K, *F) per input: the rows baselines are drawn from, uniformly.
    n_samples : int
        Draws of (baseline, alpha) per row.
    target, additional_forward_args
        As in ``integrated_gradients``.
    seed : int
        Seeds the draws.
    internal_batch_size : int, optional
        Path points per forward/backward; None: whole rows' draws per chunk, as many as
        ``memory_budget`` allows.
    memory_budget : int, optional
        Bytes the chunks may use for activations when ``internal_batch_size`` is None, as
        in ``integrated_gradients`` (default half the free memory on CUDA, 1 GiB on a
        CPU). On CUDA an out-of-memory error halves the chunk and retries.
    return_convergence_delta : bool
        Also return sum(attributions) - (F(x) - mean over draws of F(b)) per row: it
        shrinks as n_samples grows, like 1 / sqrt(n_samples).
    allow_coupled_rows : bool
        Run even when rows interact (a warning is logged).

    Returns
    -------
    attributions : Tensor or tuple of Tensor
        (N, *F) per input.
    delta : Tensor
        (N,) float64, only when ``return_convergence_delta``.

    References
    ----------
    Erion, Janizek, Sturmfels, Lundberg and Lee, "Improving performance of deep learning
    models with axiomatic attribution priors and expected gradients", Nature Machine
    Intelligence 2021.
    """
    is_tuple = isinstance(inputs, tuple)
    problem = make_problem(inputs, None, target, additional_forward_args)
    background = _check_background(background, problem.inputs, is_tuple)
    refuse_overflowing_differences(problem.inputs, tuple(b.unsqueeze(1) for b in background),
                                   is_tuple, name="background")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
            or n_samples < 1:
        raise ArgumentError(f"n_samples must be a positive integer, got {n_samples!r}")
    n_samples = int(n_samples)  # numpy integers too
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < 2**63:
        raise ArgumentError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    device = problem.inputs[0].device
    tensors = check_model_device(forward_func, device)
    check_independent_rows(forward_func, problem, allow_coupled_rows, tensors)

    # Points are numbered (row, sample), sample fastest.
    n_rows, total = problem.n_rows, problem.n_rows * n_samples
    generator = torch.Generator().manual_seed(int(seed))
    drawn = torch.randint(background[0].shape[0], (total,), generator=generator).to(device)
    alphas = torch.rand(total, generator=generator, dtype=torch.float64).to(device)
    options = run_options(memory_budget)
    if internal_batch_size is None:
        # The planner's paths are a row's draws here: a chunk holds whole rows. It reads
        # the rule's step count only.
        chunk = _planned_chunk_points(forward_func, problem,
                                      SimpleNamespace(n_steps=n_samples), options)
    else:
        chunk = internal_batch_size
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ArgumentError(f"internal_batch_size must be a positive integer, got {chunk!r}")
    chunk = int(chunk)

    sums = [torch.zeros(x.shape, dtype=torch.float64, device=device) for x in problem.inputs]
    baseline_out = torch.zeros(n_rows, dtype=torch.float64, device=device)
    log.debug("expected gradients: %d rows x %d samples in chunks of %d", n_rows, n_samples,
              chunk)
    start = 0
    while start < total:
        point = torch.arange(start, min(start + chunk, total), device=device)
        rows = point // n_samples
        try:
            grads, scaled, base_values = _chunk(
                forward_func, problem, background, rows, drawn[point], alphas[point],
                return_convergence_delta,
            )
        except torch.OutOfMemoryError:
            chunk = _halved(chunk, n_samples, device)
            continue
        start += point.shape[0]
        for grad_sum, grad, factor in zip(sums, grads, scaled):
            grad_sum.index_add_(0, rows, grad.double() * factor)
        if base_values is not None:
            # Each sample's F(b) on its own: their sum can overflow where none of them does.
            if not all_finite(base_values):
                at_samples = torch.zeros(1, n_rows, dtype=torch.float64, device=device)
                at_samples[0, rows[~torch.isfinite(base_values)]] = float("nan")
                refuse_non_finite_ends(None, at_samples, "a background sample")
            baseline_out.index_add_(0, rows, base_values)

    # The outputs were finite: nan or inf here is the gradient itself (sqrt at 0, ...).
    _refuse_non_finite_gradients(tuple(s.unsqueeze(0) for s in sums))
    attributions = tuple((s / n_samples).to(x.dtype) for s, x in zip(sums, problem.inputs))
    refuse_overflow(tuple(values.unsqueeze(0) for values in attributions), name="background")
    result = attributions if is_tuple else attributions[0]
    if not return_convergence_delta:
        return result

    with torch.no_grad():
        # F(x) in chunks of rows, as the gradients went.
        input_out = torch.empty(n_rows, dtype=torch.float64, device=device)
        per_chunk = max(1, chunk // n_samples)
        for first in range(0, n_rows, per_chunk):
            rows = torch.arange(first, min(first + per_chunk, n_rows), device=device)
            output = _forward(forward_func, tuple(x[rows] for x in problem.inputs),
                              problem.args_for(rows))
            input_out[rows] = problem.select(output, rows).double()
    refuse_non_finite_ends(input_out.unsqueeze(0), None)
    attribution_sum = sum(s.reshape(n_rows, -1).sum(1) for s in sums) / n_samples
    return result, attribution_sum - (input_out - baseline_out / n_samples)


def _chunk(
    forward_func: Callable[..., Tensor],
    problem: Any,
    background: tuple[Tensor, ...],
    rows: Tensor,
    drawn: Tensor,
    alphas: Tensor,
    with_baseline_outputs: bool,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor | None]:
    """Gradients at one chunk of points, their (x - b) factors and, if asked, F(b)."""
    args = problem.args_for(rows)
    points, factors = [], []
    for x, back in zip(problem.inputs, background):
        x_rows, base = x[rows], back[drawn]
        alpha = alphas.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        points.append((base + alpha * (x_rows - base)).requires_grad_())
        factors.append((x_rows - base).double())

    with torch.enable_grad():
        output = _forward(forward_func, tuple(points), args)
        selected = problem.select(output, rows)
        with weights_blamed(forward_func):
            _refuse_non_finite(selected, rows)
        if not selected.requires_grad:
            raise ModelError(_NO_GRADIENT)
        grads = torch.autograd.grad(selected.sum(), points, allow_unused=True,
                                    materialize_grads=True)

    base_values = None
    if with_baseline_outputs:
        with torch.no_grad():
            bases = tuple(back[drawn] for back in background)
            base_values = problem.select(_forward(forward_func, bases, args), rows).double()
    return grads, tuple(factors), base_values


def _check_background(
    background: TensorOrTuple, inputs: tuple[Tensor, ...], is_tuple: bool
) -> tuple[Tensor, ...]:
    given = background if isinstance(background, tuple) else (background,)
    if len(given) != len(inputs):
        raise ArgumentError(
            f"got {len(given)} background tensors for {len(inputs)} inputs: expected one per "
            "input"
        )
    checked = []
    for i, (back, x) in enumerate(zip(given, inputs)):
        name = f"background[{i}]" if is_tuple else "background"
        if not isinstance(back, Tensor):
            raise ArgumentError(f"{name} must be a Tensor, got {type(back).__name__}")
        _refuse_unreadable(back, name)
        if back.dtype == torch.bool or back.is_complex():
            raise ArgumentError(f"{name} has dtype {back.dtype}: expected {x.dtype} like the "
                                "inputs")
        if back.dim() != x.dim() or tuple(back.shape[1:]) != tuple(x.shape[1:]):
            raise ArgumentError(
                f"{name} has shape {tuple(back.shape)}: expected (K, "
                f"{', '.join(map(str, x.shape[1:]))}) like the inputs' rows"
            )
        if back.shape[0] == 0:
            raise ArgumentError(f"{name} has no rows: expected at least one background row")
        if back.is_floating_point() and back.dtype != x.dtype:
            raise ArgumentError(
                f"{name} has dtype {back.dtype} but the inputs have {x.dtype}: convert it "
                f"with .to({x.dtype})"
            )
        back = back.detach().to(device=x.device, dtype=x.dtype)
        finite = torch.isfinite(back.reshape(back.shape[0], -1)).all(1)
        if not bool(finite.all()):
            shown = shown_rows((~finite).nonzero()[:, 0].tolist())
            raise ArgumentError(f"{name} holds nan or inf in row(s) {shown}: background rows "
                                "must be finite")
        checked.append(back)
    if len({back.shape[0] for back in checked}) > 1:
        raise ArgumentError("every background tensor needs the same number of rows")
    return tuple(checked)
