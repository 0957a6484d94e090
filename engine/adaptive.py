"""Adaptive step counts and quadrature error estimates, per (baseline, row) pair.

A uniform ``n_steps`` must be large enough for the hardest pair of the whole job. Most pairs
converge much sooner: their completeness gap |delta| is already below the tolerance. Here
only the pairs above it are recomputed, with twice the steps, until every pair meets the
tolerance or reaches ``max_steps``. Each refinement is an ordinary call of the batched
kernel on a smaller problem: the unfinished pairs laid out as one baseline kind with a
per-row baseline, so the kernel itself needs no notion of "some pairs only".

The error estimate compares each pair's attributions with the same rule at twice the
nodes: for a rule that converges, the difference is close to the error of the coarser
result (Gauss-Legendre nodes do not nest, so the finer pass costs twice the points).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.core import PathProblem, _chunk_points, integrate, output_gap, refuse_overflow
from engine.errors import ArgumentError
from engine.plan import RunOptions
from engine.quadrature import QuadratureRule, max_steps_of, quadrature_rule

__all__ = ["IGResult", "adaptive_integrated_gradients"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IGResult:
    """Attributions with what it took to get them, per (baseline, row) pair.

    Attributes
    ----------
    attributions : Tensor or tuple of Tensor
        (B, N, *F) per input, in the input's dtype.
    delta : Tensor
        (B, N) float64: sum(attributions) - (F(x) - F(baseline)), with the (x - baseline)
        factor applied even when ``multiply_by_inputs`` is False.
    n_steps : Tensor
        (B, N) long: the steps each pair's attributions were computed with.
    total_points : int
        Gradient evaluations spent on the integrals, refinements and estimates included.
    converged : Tensor
        (B, N) bool: |delta| <= delta_tolerance (all True without a tolerance).
    error_estimate : Tensor or None
        (B, N) float64: sum over features of |A(n) - A(2n)|, when asked for.
    """

    attributions: Tensor | tuple[Tensor, ...]
    delta: Tensor
    n_steps: Tensor
    total_points: int
    converged: Tensor
    error_estimate: Tensor | None = None


def adaptive_integrated_gradients(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    rule: QuadratureRule,
    chunk_points: int,
    *,
    is_tuple: bool,
    delta_tolerance: float | None,
    max_steps: int | None,
    error_estimate: bool,
    multiply_by_inputs: bool,
    options: RunOptions | None = None,
) -> IGResult:
    """Refine the pairs whose |delta| exceeds ``delta_tolerance``; see ``IGResult``.

    Called by ``integrated_gradients`` after it has checked the arguments; ``rule`` is the
    first level and ``chunk_points`` bounds every forward/backward.
    """
    tolerance, ceiling = _check_adaptive(delta_tolerance, max_steps, rule, error_estimate)
    n_pairs = problem.n_baselines * problem.n_rows
    device = problem.inputs[0].device
    gap = output_gap(forward_func, problem, chunk_points).flatten()
    grads = [
        torch.zeros((n_pairs, *x.shape[1:]), dtype=torch.float64, device=device)
        for x in problem.inputs
    ]
    steps = torch.zeros(n_pairs, dtype=torch.long, device=device)
    delta = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    pending = torch.arange(n_pairs, device=device)
    n_steps, total_points = rule.n_steps, 0

    while True:
        level = quadrature_rule(rule.method, n_steps)
        sub = pair_problem(problem, pending)
        level_grads = _pair_gradients(forward_func, sub, level, chunk_points, options)
        for grad, level_grad in zip(grads, level_grads):
            grad[pending] = level_grad
        steps[pending] = n_steps
        total_points += len(pending) * n_steps
        delta[pending] = _attribution_sum(level_grads, sub) - gap[pending]
        log.debug("adaptive: %d pairs at %d steps", len(pending), n_steps)

        unfinished = delta[pending].abs() > tolerance
        if n_steps >= ceiling or not bool(unfinished.any()):
            break
        pending = pending[unfinished]
        n_steps = min(2 * n_steps, ceiling)

    converged = delta.abs() <= tolerance
    if not bool(converged.all()):
        log.warning(
            "%d of %d pairs still have |delta| > %g at max_steps=%d",
            int((~converged).sum()), n_pairs, tolerance, ceiling,
        )

    estimate = None
    if error_estimate:
        estimate, extra_points = _error_estimate(
            forward_func, problem, rule.method, steps, grads, chunk_points, multiply_by_inputs,
            options,
        )
        total_points += extra_points

    attributions = _attributions(problem, grads, multiply_by_inputs)
    shape = (problem.n_baselines, problem.n_rows)
    return IGResult(
        attributions=attributions if is_tuple else attributions[0],
        delta=delta.view(shape),
        n_steps=steps.view(shape),
        total_points=total_points,
        converged=converged.view(shape),
        error_estimate=None if estimate is None else estimate.view(shape),
    )


def _check_adaptive(
    delta_tolerance: float | None, max_steps: int | None, rule: QuadratureRule,
    error_estimate: bool,
) -> tuple[float, int]:
    n_steps = rule.n_steps
    if delta_tolerance is None:
        tolerance = float("inf")
    elif isinstance(delta_tolerance, bool) or not isinstance(delta_tolerance, (int, float)):
        raise ArgumentError(f"delta_tolerance must be a number, got {delta_tolerance!r}")
    elif not delta_tolerance > 0:
        raise ArgumentError(f"delta_tolerance must be > 0, got {delta_tolerance}")
    else:
        tolerance = float(delta_tolerance)
    ceiling = 16 * n_steps if max_steps is None else max_steps
    if isinstance(ceiling, bool) or not isinstance(ceiling, numbers.Integral):
        raise ArgumentError(f"max_steps must be an integer, got {max_steps!r}")
    ceiling = int(ceiling)
    if ceiling < n_steps:
        raise ArgumentError(f"max_steps={ceiling} is below n_steps={n_steps}")
    # The error estimate compares the last level with one of twice the nodes.
    most = max_steps_of(rule.method) // (2 if error_estimate else 1)
    if max_steps is None:
        ceiling = max(n_steps, min(ceiling, most))
    if ceiling > most or (error_estimate and n_steps > most):
        name = "n_steps" if max_steps is None else "max_steps"
        raise ArgumentError(
            f"{name}={ceiling} is too large for method {rule.method!r}: it allows at most "
            f"{most:,}" + (" with error_estimate (which doubles the last level)"
                           if error_estimate else "")
        )
    return tolerance, ceiling


def pair_problem(problem: PathProblem, pairs: Tensor) -> PathProblem:
    """The given (baseline, row) pairs as a problem of their own: one kind, one row each.

    Row ``i`` of the result is pair ``pairs[i]`` of ``problem`` (pairs number (baseline,
    row) with the row fastest), with that pair's baseline as its per-row baseline.
    """
    rows = pairs % problem.n_rows
    base_index = problem.baseline_index(pairs)
    inputs = tuple(x[rows] for x in problem.inputs)
    baselines = tuple(base.flatten(0, 1)[base_index].unsqueeze(0) for base in problem.baselines)
    targets = problem.targets
    if isinstance(targets, Tensor):
        targets = targets[rows.to(targets.device)]
    per_row = problem.per_row_args
    if per_row is None:
        per_row = tuple(
            isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == problem.n_rows
            for arg in problem.forward_args
        )
    forward_args = tuple(
        arg[rows.to(arg.device)] if follows else arg
        for arg, follows in zip(problem.forward_args, per_row)
    )
    return PathProblem(
        inputs=inputs,
        baselines=baselines,
        targets=targets,
        forward_args=forward_args,
        target_range=problem.target_range,
        per_row_args=per_row,
    )


def _pair_gradients(
    forward_func: Callable[..., Tensor],
    sub: PathProblem,
    rule: QuadratureRule,
    chunk: int,
    options: RunOptions | None,
) -> tuple[Tensor, ...]:
    """Weighted gradient sums of a pair problem, (M, *F) float64 per input."""
    chunk = min(chunk, _chunk_points(None, sub, rule))
    grads = integrate(forward_func, sub, rule, chunk, options)
    return tuple(grad[0].double() for grad in grads)


def _attribution_sum(grads: tuple[Tensor, ...], sub: PathProblem) -> Tensor:
    """Sum over features of grad * (x - baseline), (M,) float64."""
    return sum(
        (grad * (x.double() - base[0].double())).reshape(len(grad), -1).sum(1)
        for grad, x, base in zip(grads, sub.inputs, sub.baselines)
    )


def _attributions(
    problem: PathProblem, grads: list[Tensor], multiply_by_inputs: bool
) -> tuple[Tensor, ...]:
    shape = (problem.n_baselines, problem.n_rows)
    attributions = []
    for grad, x, base in zip(grads, problem.inputs, problem.baselines):
        grad = grad.view(*shape, *x.shape[1:])
        if multiply_by_inputs:
            grad = grad * (x.unsqueeze(0).double() - base.double())
        attributions.append(grad.to(x.dtype))
    refuse_overflow(tuple(attributions))
    return tuple(attributions)


def _error_estimate(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    method: str,
    steps: Tensor,
    grads: list[Tensor],
    chunk_points: int,
    multiply_by_inputs: bool,
    options: RunOptions | None,
) -> tuple[Tensor, int]:
    """sum over features of |A(n) - A(2n)| per pair, and the points it cost."""
    estimate = torch.zeros(len(steps), dtype=torch.float64, device=steps.device)
    points = 0
    for n_steps in torch.unique(steps).tolist():
        pairs = torch.nonzero(steps == n_steps).flatten()
        sub = pair_problem(problem, pairs)
        finer = _pair_gradients(forward_func, sub, quadrature_rule(method, 2 * n_steps),
                                chunk_points, options)
        points += len(pairs) * 2 * n_steps
        for grad, fine, x, base in zip(grads, finer, sub.inputs, sub.baselines):
            difference = grad[pairs] - fine
            if multiply_by_inputs:
                difference = difference * (x.double() - base[0].double())
            estimate[pairs] += difference.abs().reshape(len(pairs), -1).sum(1)
    return estimate, points
