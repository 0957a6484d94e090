"""The batched kernel: every (baseline, row, step) path point in one forward/backward.

Integrated Gradients for input x, baseline b, model F and target t is

    IG(x, b) = (x - b) * sum_k w_k * dF_t/dx (b + a_k (x - b))

with (a_k, w_k) from a quadrature rule. Each (baseline, row, step) triple is an
independent path point. They are numbered in the order (baseline, row, step), step
fastest, cut into chunks of consecutive points, and each chunk goes through one forward
and one backward. The backward is taken of the *sum* of the target outputs: for a model
whose rows do not interact, d(sum_j F(p_j))/dp_i = dF(p_i)/dp_i, so one backward gives
every point's gradient at once (Captum asks for one gradient output per point instead).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import math
import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Union

import numpy as np
import torch
from torch import Tensor, fx, nn

from engine import kink_loops
from engine.errors import ArgumentError, ModelError, NonFiniteError, NonFiniteOutputError
from engine.fused import compiled_whole_paths
from engine.hoist import (
    AffineSplit,
    fast_model,
    global_hooks,
    hooked,
    model_graph,
    pull_back,
    reproduces,
    same_gradients,
    split_affine_prefix,
    uses_batch_statistics,
)
from engine.kinks import KinkSplit, compiled_kinked, integrate_kinked, rule_nodes
from engine.plan import (
    BACKWARD_FACTOR,
    FUSED_CPU_CHUNK_BYTES,
    RunOptions,
    balanced_chunk,
    choose_chunk_points,
    default_memory_budget,
    matmul_context,
    padded_size,
    precision_context,
    run_options,
    saved_bytes,
)
from engine.progress import Progress
from engine.quadrature import QuadratureRule, quadrature_rule
from engine.step import (
    all_finite,
    compiled_model,
    forget,
    frozen_parameters,
    keeps_batch_statistics,
    memo,
    module_of,
    non_finite_weights,
    numpy_view,
    own_hooks,
    owns_precision,
    pad_rows,
)
from engine.tails import activation_chain, chain_gradient

__all__ = ["integrated_gradients"]

log = logging.getLogger(__name__)

# Points in the larger of the two planning probes.
PROBE_POINTS = 64
# Outputs of the Linear layer after the activation up to which the closed form is used.
# Its work per (row, baseline) pair grows with hidden units x outputs, in float64 and
# without a matrix product; the affine-hoisted path runs every step through BLAS. With
# 128 hidden units (engine.kinks' docstring): 3x faster with 1 output, 1.5x with 4,
# even at 8, 1.8x slower at 16 (eager, 179 and 2,000 rows x 4 baselines).
MAX_CLOSED_FORM_OUTPUTS = 8
# Rows a remembered trace is checked on when the row-coupling probe left no sample
# (several inputs, extra arguments, allowed coupling, adaptive refinement).
HOIST_CHECK_ROWS = 4
# Probe points a trace's gradient is compared on, once per trace: what it alone has to
# catch (a forward that switches gradients off for part of its work) shows at any point,
# and two autograd passes over every probe point would ignore the memory budget.
GRADIENT_CHECK_POINTS = 64

TensorOrTuple = Union[Tensor, tuple[Tensor, ...]]
BaselineArg = Union[None, int, float, Tensor, tuple[Union[int, float, Tensor], ...]]
TargetArg = Union[None, int, tuple[int, ...], Sequence[Any], Tensor]


@dataclass(frozen=True)
class PathProblem:
    """Inputs, baselines, targets and extra arguments, checked and laid out for the kernel.

    ``inputs[i]`` is (N, *F_i). ``baselines[i]`` is (B, N, *F_i) when every row has its
    own baseline, or (B, 1, *F_i) when each baseline kind is shared by all rows.
    ``targets`` is None, or a tuple index applied to every row's output, or a (N, k) long
    tensor with one index tuple of length k per row. ``target_range`` holds, per index
    position, the smallest and largest target asked for, so that a target the output does
    not have is named without a device sync. ``per_row_args`` marks which
    ``forward_args`` follow their row (None: every tensor whose first dimension is N).
    ``targets_checked`` spares compiled paths their own eager check of the targets.
    """

    inputs: tuple[Tensor, ...]
    baselines: tuple[Tensor, ...]
    targets: None | tuple[int, ...] | Tensor
    forward_args: tuple[Any, ...]
    target_range: tuple[tuple[int, int], ...] = ()
    per_row_args: tuple[bool, ...] | None = None
    # True once the targets were selected from the model's own output without error.
    targets_checked: bool = False

    @property
    def n_rows(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def n_baselines(self) -> int:
        return self.baselines[0].shape[0]

    def baseline_index(self, pair: Tensor) -> Tensor:
        """Index into the flattened (B * N or B * 1) baselines for each (baseline, row) pair."""
        if self.baselines[0].shape[1] == self.n_rows:
            return pair
        return pair // self.n_rows

    def path_points(self, pair: Tensor, alphas: Tensor) -> tuple[Tensor, ...]:
        """Points b + a (x - b) for each (pair, alpha); pair indexes (baseline, row)."""
        rows = pair % self.n_rows
        base_index = self.baseline_index(pair)
        points = []
        for x, base in zip(self.inputs, self.baselines):
            x_rows = x[rows]
            base_rows = base.flatten(0, 1)[base_index]
            alpha = alphas.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            # Same expression and rounding as Captum: baseline + alpha * (input - baseline).
            points.append(base_rows + alpha * (x_rows - base_rows))
        return tuple(points)

    def args_for(self, rows: Tensor) -> tuple[Any, ...]:
        """Extra forward arguments for points on ``rows``: per-row tensors are gathered."""
        per_row = self.per_row_args
        if per_row is None:
            per_row = tuple(_is_per_row(arg, self.n_rows) for arg in self.forward_args)
        return tuple(
            arg[rows.to(arg.device)] if follows else arg
            for arg, follows in zip(self.forward_args, per_row)
        )

    def select(self, output: Tensor, rows: Tensor) -> Tensor:
        """The target output of each point, shape (P,)."""
        if self.targets is None:
            if output.dim() > 1 and output[0].numel() != 1:
                raise ArgumentError(
                    f"the model returns {tuple(output.shape[1:])} outputs per row; "
                    "pass target= to choose one"
                )
            return output.reshape(output.shape[0])
        self._check_target_range(output)
        if isinstance(self.targets, tuple):
            selected = output[(slice(None), *self.targets)]
        else:
            index = self.targets[rows.to(self.targets.device)].to(output.device)
            points = torch.arange(output.shape[0], device=output.device)
            selected = output[(points, *index.unbind(1))]
        if selected.dim() > 1 and selected[0].numel() != 1:
            raise ArgumentError(
                f"target selects {tuple(selected.shape[1:])} outputs per row from model "
                f"output {tuple(output.shape[1:])}: expected one (give one index per dimension)"
            )
        return selected.reshape(output.shape[0])

    def _check_target_range(self, output: Tensor) -> None:
        per_row_shape = tuple(output.shape[1:])
        if len(self.target_range) > len(per_row_shape):
            raise ArgumentError(
                f"target has {len(self.target_range)} indices but the model's output per row "
                f"has shape {per_row_shape}"
            )
        for dim, ((low, high), size) in enumerate(zip(self.target_range, per_row_shape)):
            if low < -size or high >= size:
                bad = high if high >= size else low
                where = "" if len(per_row_shape) == 1 else f" along output dimension {dim + 1}"
                raise ArgumentError(
                    f"target {bad} is out of range: the model returns {size} outputs per row"
                    f"{where} (valid targets are 0..{size - 1})"
                )


def _is_per_row(arg: Any, n_rows: int) -> bool:
    return isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == n_rows


def out_of_memory_named(function: Callable[..., Any]) -> Callable[..., Any]:
    """An out-of-memory error the chunk loops did not handle becomes one ModelError.

    The chunk loops halve and retry; what reaches here ran outside them: the row-coupling
    probe (up to PROBE_ROWS rows in one batch), the planner's probe forwards, the checks
    of a remembered trace.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except torch.OutOfMemoryError as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise ModelError(
                f"out of memory outside the chunks, in the engine's checks of the model "
                f"(up to {PROBE_ROWS} rows in one batch): {first_line}"
            ) from error

    return wrapper


@out_of_memory_named
@owns_precision
@keeps_batch_statistics
def integrated_gradients(
    forward_func: Callable[..., Tensor],
    inputs: TensorOrTuple,
    baselines: BaselineArg = None,
    *,
    target: TargetArg = None,
    additional_forward_args: Any = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    multiply_by_inputs: bool = True,
    allow_coupled_rows: bool = False,
    delta_tolerance: float | None = None,
    max_steps: int | None = None,
    error_estimate: bool = False,
    memory_budget: int | None = None,
    compile: bool | str = False,
    precision: str = "fp32",
    hoist: bool = True,
    progress: bool | None = None,
) -> Any:
    """Integrated Gradients of every row against every baseline in one batched pass.

    Parameters
    ----------
    forward_func : callable
        The model, ``forward_func(*inputs, *additional_forward_args)`` -> (N,), (N, 1) or
        (N, C). Rows must not interact (call ``.eval()`` on models with BatchNorm).
    inputs : Tensor or tuple of Tensor
        (N, *F) floating point; the device of the first input is where the work runs.
    baselines : None, scalar, Tensor or tuple
        One entry per input. (B, *F): B baseline kinds shared by all rows; (B, N, *F): a
        baseline per kind and row; a scalar: one kind filled with it; None: zeros. Tensors
        must have the input's dtype (integer tensors are converted).
    target : None, int, tuple, list or Tensor
        Which output to explain: None for a single output per row, an index (int or
        tuple) for every row, or one index per row (a list or (N,) tensor of ints, or a
        list of tuples / (N, k) tensor for outputs with several dimensions).
    additional_forward_args : any
        Extra positional arguments; tensors whose first dimension is N follow their row.
    n_steps : int
        Nodes of the quadrature rule (the first level when ``delta_tolerance`` is given).
    method : str
        ``gausslegendre``, ``riemann_left``, ``riemann_right``, ``riemann_middle`` or
        ``riemann_trapezoid``, defined as in Captum.
    internal_batch_size : int, optional
        Path points per forward/backward; None plans chunks from ``memory_budget``.
    return_convergence_delta : bool
        Also return sum(attributions) - (F(x) - F(baseline)) per (baseline, row).
    multiply_by_inputs : bool
        False returns the path-averaged gradients without the (x - baseline) factor
        (Captum's "global" attribution).
    allow_coupled_rows : bool
        Run even when the model's rows interact (BatchNorm in training mode); the result
        is then not IG of each row, and a warning is logged.
    delta_tolerance : float, optional
        Adaptive steps: pairs whose |delta| exceeds this are recomputed with twice the
        steps, up to ``max_steps``. Returns an ``IGResult``.
    max_steps : int, optional
        Largest step count adaptive refinement may use (default 16 * n_steps).
    error_estimate : bool
        Also estimate each pair's quadrature error by comparing with twice the nodes.
        Returns an ``IGResult``.
    memory_budget : int, optional
        Bytes the chunks may use for activations when ``internal_batch_size`` is None;
        default half the free memory on CUDA, 1 GiB on a CPU. Peak memory follows the
        budget, not the number of rows.
    compile : bool or str
        ``torch.compile`` each chunk of whole paths as one graph: path points, forward,
        input-gradient backward and the weighted step sum (True, or a torch.compile mode
        such as ``"reduce-overhead"`` for CUDA graph replay). Chunks are padded to one
        shape so it compiles once per model and shape; later calls reuse it. A job of
        one chunk is padded to a bucket size (see ``engine.plan.padded_size``), so jobs
        of other sizes mostly reuse a shape too.
    precision : str
        ``"fp32"``; ``"bf16"`` or ``"fp16"`` run forward and backward under autocast
        (gradients are still summed in float32); ``"tf32"`` allows TensorFloat-32 matmuls
        on CUDA.
    hoist : bool or "affine"
        Evaluate the model's leading affine layers (Linear, Conv, eval BatchNorm) once per
        row and baseline instead of once per path point; when they are followed by a ReLU,
        LeakyReLU or PReLU and a Linear layer with at most 8 outputs, integrate through
        that pair in closed form too (see ``engine.kinks``). ``"affine"`` hoists the
        affine layers only. Exact up to rounding; models that do not trace with
        ``torch.fx`` run the plain path.
    progress : bool, optional
        Progress bar for runs longer than a few seconds; None: only on a terminal.

    Returns
    -------
    attributions : Tensor or tuple of Tensor
        (B, N, *F) per input, in the input's dtype.
    delta : Tensor
        (B, N) float64, only when ``return_convergence_delta``.
    IGResult
        Instead of the above when ``delta_tolerance`` or ``error_estimate`` is given:
        attributions, delta, steps per pair, total path points and the error estimate.

    References
    ----------
    Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    """
    if not callable(forward_func):
        raise ArgumentError(
            f"forward_func must be a model or function to call, got {type(forward_func).__name__}"
        )
    is_tuple = isinstance(inputs, tuple)
    if internal_batch_size is not None:
        internal_batch_size = _checked_batch_size(internal_batch_size)
    problem = make_problem(inputs, baselines, target, additional_forward_args)
    rule = quadrature_rule(method, n_steps)
    options = dataclasses.replace(
        run_options(memory_budget, compile, precision, hoist, progress),
        internal_batch_size=internal_batch_size,
    )
    _check_precision_dtype(options, problem)
    tensors = check_model_device(forward_func, problem.inputs[0].device)
    adaptive = delta_tolerance is not None or error_estimate or max_steps is not None
    # The probe's later batches are left to integrate(), which skips them for a checked
    # trace that cannot mix rows; adaptive steps run them here.
    sample = check_independent_rows(forward_func, problem, allow_coupled_rows, tensors,
                                    defer=not adaptive)
    if sample is not None:
        problem = dataclasses.replace(problem, targets_checked=True)
    # None: planned where a chunk size is needed (a hoisted run plans its own).
    chunk_points = None
    if internal_batch_size is not None:
        chunk_points = _chunk_points(internal_batch_size, problem, rule, options=options)

    def planned() -> int:
        return chunk_points or _chunk_points(None, problem, rule, forward_func, options)

    if adaptive:
        from engine.adaptive import adaptive_integrated_gradients

        chunk_points = planned()
        return adaptive_integrated_gradients(
            forward_func, problem, rule, chunk_points, is_tuple=is_tuple,
            delta_tolerance=delta_tolerance, max_steps=max_steps,
            error_estimate=error_estimate, multiply_by_inputs=multiply_by_inputs,
            options=options,
        )

    total_grads = integrate(forward_func, problem, rule, chunk_points, options, sample)
    attributions = tuple(
        (grad * (x.unsqueeze(0) - base) if multiply_by_inputs else grad).to(_result_dtype(x))
        for grad, x, base in zip(total_grads, problem.inputs, problem.baselines)
    )
    refuse_overflow(attributions)
    result = attributions if is_tuple else attributions[0]
    if not return_convergence_delta:
        return result

    delta = convergence_delta(forward_func, problem, attributions, planned())
    return result, delta


# Set by the Captum-compatible class: half-precision inputs get float32 attributions, as
# Captum's (its float32 step sizes promote them), rather than the inputs' dtype.
_FLOAT32_FOR_HALF = contextvars.ContextVar("float32_for_half", default=False)


@contextlib.contextmanager
def float32_results_for_half_inputs() -> Iterator[None]:
    """Within the block, attributions of float16 and bfloat16 inputs are float32."""
    token = _FLOAT32_FOR_HALF.set(True)
    try:
        yield
    finally:
        _FLOAT32_FOR_HALF.reset(token)


def _result_dtype(x: Tensor) -> torch.dtype:
    if _FLOAT32_FOR_HALF.get() and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _check_precision_dtype(options: RunOptions, problem: PathProblem) -> None:
    """Refuse bf16/fp16 for inputs autocast would leave as they are (float64)."""
    if options.autocast_dtype is None:
        return
    for x in problem.inputs:
        if x.dtype == torch.float64:
            raise ArgumentError(
                f"precision={options.precision!r} runs float32 work in half precision, but "
                "the inputs are float64, which autocast leaves in float64: pass float32 "
                "inputs (and model), or precision='fp32'"
            )


def _chunk_points(
    internal_batch_size: int | None,
    problem: PathProblem,
    rule: QuadratureRule,
    forward_func: Callable[..., Tensor] | None = None,
    options: RunOptions | None = None,
) -> int:
    """Points per chunk: ``internal_batch_size`` if given, else planned from the budget."""
    total = problem.n_baselines * problem.n_rows * rule.n_steps
    if internal_batch_size is None:
        if forward_func is None:
            return total
        return _planned_chunk_points(forward_func, problem, rule, options or RunOptions())
    most = _checked_batch_size(internal_batch_size)
    if options is None or options.compile_mode is None or most < total:
        return min(most, total)
    # One compiled chunk: a bucket of whole paths within the given size, so that jobs of
    # other sizes reuse its shape.
    n_steps = rule.n_steps
    return padded_size(total // n_steps, most // n_steps) * n_steps


def _checked_batch_size(internal_batch_size: Any) -> int:
    if isinstance(internal_batch_size, bool) \
            or not isinstance(internal_batch_size, numbers.Integral):
        raise ArgumentError(f"internal_batch_size must be an integer, got {internal_batch_size!r}")
    if internal_batch_size < 1:
        raise ArgumentError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
    return int(internal_batch_size)  # numpy integers too


def _planned_chunk_points(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    rule: QuadratureRule,
    options: RunOptions,
    hoisted: bool = False,
) -> int:
    """Chunk size from the memory budget and the activation bytes measured on two probes.

    ``hoisted``: ``forward_func`` is the rest of a model after its affine prefix; compiled
    chunks of it may be larger (see ``choose_chunk_points``).
    """
    device = problem.inputs[0].device
    total = problem.n_baselines * problem.n_rows * rule.n_steps
    budget = options.memory_budget or default_memory_budget(device)
    alphas = torch.full((PROBE_POINTS,), 0.5, dtype=torch.float64, device=device)
    pair = torch.arange(PROBE_POINTS, device=device) % (problem.n_baselines * problem.n_rows)

    def probe(count: int) -> int:
        def run() -> None:
            rows = pair[:count] % problem.n_rows
            points = tuple(
                p.requires_grad_() for p in problem.path_points(pair[:count], alphas[:count])
            )
            with precision_context(options, device):
                _forward(forward_func, points, problem.args_for(rows))

        with torch.enable_grad():
            return saved_bytes(run)

    def measure() -> float:
        return (probe(PROBE_POINTS) - probe(PROBE_POINTS // 2)) / (PROBE_POINTS // 2)

    if problem.forward_args:
        activation = measure()
    else:
        key = ("activation", _input_layout(problem), options.precision)
        activation = float(memo(forward_func, key, measure))
    point_bytes = sum(x[0].numel() * x.element_size() for x in problem.inputs)
    # Points, their gradients and the weighted copy live next to the activations.
    per_point = max(activation, 0.0) + 3 * point_bytes
    chunk = choose_chunk_points(per_point, budget, total, rule.n_steps, device,
                                fused=hoisted and options.compile_mode is not None,
                                padded=options.compile_mode is not None)
    log.debug(
        "plan: %.0f bytes per point, budget %d bytes on %s -> %d points per chunk",
        per_point, budget, device, chunk,
    )
    return chunk


def integrate(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    rule: QuadratureRule,
    chunk_points: int | None,
    options: RunOptions | None = None,
    sample: ModelSample | None = None,
) -> tuple[Tensor, ...]:
    """Sum of w_k * gradient over the path, per input: (B, N, *F) in the accumulation dtype.

    ``chunk_points`` None plans the chunks from the memory budget. Parameters are frozen
    (``requires_grad=False``) while it runs, so the backward computes input gradients
    only; they are restored afterwards. ``sample``, the model's outputs from the
    row-coupling probe, saves a forward when checking a traced model.
    """
    options = options or RunOptions()
    try:
        with frozen_parameters(forward_func), weights_blamed(forward_func):
            sums = _integrated_sums(forward_func, problem, rule, chunk_points, options, sample)
    except NonFiniteOutputError as error:
        if options.precision != "fp16":
            raise
        raise NonFiniteOutputError(
            f"{error} (precision='fp16' overflows beyond 65,504 in magnitude, in the model's "
            "activations too: precision='bf16' or 'fp32' may avoid it)"
        ) from error
    _refuse_non_finite_gradients(sums)
    return sums


def _integrated_sums(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    rule: QuadratureRule,
    chunk_points: int | None,
    options: RunOptions,
    sample: ModelSample | None,
) -> tuple[Tensor, ...]:
    if options.compile_mode:
        _check_gradient(forward_func, problem)
    split, sample_hidden, sample_outputs = _usable_split(forward_func, problem, options,
                                                         sample)
    if sample is not None and sample.later is not None \
            and not (split is not None and split.keeps_rows_apart()
                     and sample.later.spared_by(sample_outputs)):
        sample.later.run()
    if split is not None:
        try:
            hoisted = _integrate_hoisted(split, problem, rule, chunk_points, options,
                                         _sample_prefix(problem, sample, sample_hidden))
        except NonFiniteOutputError:
            # The hoisted path takes h_x - h_b in the prefix's output dtype, which can
            # overflow where every point the model sees is finite (hidden values of
            # opposite signs beyond half the dtype's range). Unhoisted, the model's own
            # non-finite outputs, if any, are found again and named.
            log.info("non-finite values on the hoisted path: running without hoisting")
        except (ModelError, RuntimeError) as error:
            if not _wrote_leaf_in_place(error):
                raise
            # hoist.py copies the prefix's (and the closed form's Linear's) output for the
            # in-place writes it can see in the traced graph; anything else lands here,
            # raised by a model call or by the tail's memory measurement, and runs
            # unhoisted.
            log.info("the model writes a hoisted layer's output in place: running it "
                     "without hoisting")
        else:
            if all_finite(hoisted):
                return (hoisted,)
            log.info("non-finite gradient sums on the hoisted path: running without hoisting")
    if sample is not None and sample.later is not None:
        # The model runs its own layers: the probe's verdict is needed after all.
        sample.later.run()
    if chunk_points is None:
        chunk_points = _planned_chunk_points(forward_func, problem, rule, options)
    return _integrate_points(_fast(forward_func, problem, sample), problem, rule,
                             chunk_points, options)


def shown_rows(rows: list[int]) -> str:
    """Row numbers for a message: the first ten, then "..."."""
    return ", ".join(str(r) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")


def refuse_overflow(attributions: tuple[Tensor, ...], name: str = "baselines") -> None:
    """Refuse attributions (B, N, *F) beyond their dtype's range, naming the rows.

    The inputs, baselines, their differences and the gradient sums were finite (checked
    before), so nan or inf here is an attribution too large for the dtype it is returned
    in (above 65,504 for float16 inputs). A ``NonFiniteError``, as the model's own
    non-finite values are: the attribution callback keeps training through it.
    """
    if all(all_finite(values) for values in attributions):
        return
    rows: set[int] = set()
    dtypes = []
    for values in attributions:
        finite = torch.isfinite(values.reshape(*values.shape[:2], -1)).all(2)
        if not bool(finite.all()):
            rows.update((~finite).nonzero()[:, 1].tolist())
            dtypes.append(values.dtype)
    ranges = " and ".join(f"{_dtype_name(dtype)} (largest value {_shown_largest(dtype)})"
                          for dtype in dict.fromkeys(dtypes))
    raise NonFiniteError(
        f"the attributions of row(s) {shown_rows(sorted(rows))} overflow {ranges}: "
        f"{_remedy(min(dtypes, key=lambda d: torch.finfo(d).max), name)}"
    )


def _refuse_non_finite_gradients(sums: tuple[Tensor, ...]) -> None:
    """Refuse sums (B, N, *F) that hold nan or inf, naming the rows.

    The outputs were finite (``_refuse_non_finite``), so the gradient itself overflowed
    or is undefined somewhere on those paths: sqrt or log at 0 on the path, or a product
    of a huge weight and a huge upstream gradient (in fp16 sooner).
    """
    if all(all_finite(grad) for grad in sums):
        return
    bad = None
    for grad in sums:
        finite = torch.isfinite(grad.reshape(*grad.shape[:2], -1)).all(2)
        if not bool(finite.all()):
            bad = ~finite if bad is None else bad | ~finite
    if bad is None:
        return
    shown = shown_rows(torch.unique(bad.nonzero()[:, 1]).tolist())
    raise NonFiniteError(
        f"the model's gradient is nan or inf on the path of row(s) {shown}, where its "
        "outputs are finite: a function with an infinite slope at a point the path reaches "
        "(sqrt or log at 0; at the path's ends only under a Riemann rule that evaluates "
        "them), or a gradient that overflows (a large weight under fp16): check those rows, "
        "their baselines and the precision"
    )


_NO_GRADIENT = (
    "the model's output does not depend on its inputs through autograd (a constant, a "
    "detached tensor or a comparison): there is no gradient to integrate"
)


def _check_gradient(forward_func: Callable[..., Tensor], problem: PathProblem) -> None:
    """Refuse an output that does not depend on the inputs, once per model layout.

    Compiled chunks differentiate with ``torch.func.grad``, which returns zeros for such
    an output where eager autograd refuses it (see ``chunk_step``). Run with the
    parameters frozen, so only the inputs can give the output a gradient.
    """

    def check() -> bool:
        # Row 0 and its first baseline: two points, which training-mode BatchNorm (with
        # allow_coupled_rows) needs.
        pair = torch.zeros(2, dtype=torch.long, device=problem.inputs[0].device)
        alphas = torch.tensor([1.0, 0.0], dtype=torch.float64, device=pair.device)
        with torch.enable_grad():
            points = tuple(p.detach().requires_grad_()
                           for p in problem.path_points(pair, alphas))
            output = _forward(forward_func, points, problem.args_for(pair))
        if not problem.select(output, pair).requires_grad:
            raise ModelError(_NO_GRADIENT)
        return True

    memo(forward_func, ("output has a gradient", _input_layout(problem)), check)


def _wrote_leaf_in_place(error: BaseException) -> bool:
    while error is not None:
        if "leaf Variable that requires grad is being used in an in-place" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fast(
    forward_func: Callable[..., Tensor], problem: PathProblem, sample: ModelSample | None
) -> Callable[..., Tensor]:
    """The model with slow kernels substituted (see engine.hoist), when that is exact here."""
    # Global hooks would see the substitutes as modules of their own.
    if len(problem.inputs) != 1 or problem.forward_args or global_hooks() \
            or _model_hooked(forward_func):
        return forward_func
    fast = _checked_trace(forward_func, problem, sample, fast_model, "kernel substitution",
                          lambda traced: traced)
    return forward_func if fast is None else fast


def _model_hooked(forward_func: Callable[..., Tensor]) -> bool:
    """Whether the model, or a layer a trace runs through rather than calls, has hooks or
    a replaced forward, which a trace of the classes' forwards leaves out.

    ``torch.fx`` calls torch.nn's layers (except containers) as modules, with their
    hooks; it inlines the forward of the model, of containers and of the user's own
    modules, and their hooks are lost.
    """
    if not isinstance(forward_func, nn.Module):
        return False
    hooked_modules = [(name, module) for name, module in forward_func.named_modules()
                      if own_hooks(module)]
    if not hooked_modules:
        return False
    tracer = fx.Tracer()
    return any(not name or not tracer.is_leaf_module(module, name)
               for name, module in hooked_modules)


# Per remembered trace: whether it has the model's input gradient, and the signature of
# the model's autograd graph (see engine.hoist.model_graph) it was checked with.
_CHECKED_GRADIENTS: weakref.WeakKeyDictionary[Any, tuple[bool, tuple[object, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _checked_trace(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    sample: ModelSample | None,
    trace: Callable[[Any], Any],
    memo_key: str,
    runner: Callable[[Any], Callable[[Tensor], Tensor]],
) -> Any:
    """``trace(forward_func)`` if what it traced still computes the model, else None.

    Traces are remembered per model layout, but a trace also bakes in Python state the
    layout does not show (an attribute read in ``forward``, a branch taken). So every call
    checks the remembered trace against the model: its outputs on the probe's ``sample``
    when there is one, else on the first rows, and the shape of the model's autograd
    graph (``engine.hoist.model_graph``) against the one the trace's gradient was checked
    with. A trace that fails either is traced again once, and dropped if the new trace
    fails too; a model whose backward runs custom code gets no trace.
    """
    for attempt in range(2):
        traced = trace(forward_func)
        if traced is None:
            return None
        if sample is None:
            points = problem.inputs[0][:HOIST_CHECK_ROWS]
            try:
                with torch.no_grad():
                    sample = ModelSample(points, forward_func(points), points.shape[0])
            except Exception as error:  # noqa: BLE001 - the plain path reports it
                log.debug("%s not used: the model fails on its first rows (%s)", memo_key,
                          error)
                return None
        # The sample, then the rows past it and every baseline the sample left out (a
        # value read in forward may matter for one of them alone).
        base = problem.baselines[0]
        shared_seen = base.shape[1] == 1 and sample.kinds >= base.shape[0]
        if reproduces(runner(traced), sample.outputs, sample.points) \
                and _rows_reproduce(forward_func, runner(traced), problem.inputs[0],
                                    sample.rows) \
                and (shared_seen or _rows_reproduce(forward_func, runner(traced),
                                                    base.flatten(0, 1), 0)):
            # Every call: the model's autograd graph on two points. A node running custom
            # backward code (a custom autograd Function) keeps any trace out; a graph
            # unlike the one the trace's gradient was checked with (Python state switched
            # on a detach, a block without gradients or a tensor hook, none of which
            # changes an output) calls for a new trace and a new check.
            graph = model_graph(forward_func, sample.points[:2])
            if graph.custom is not None:
                log.debug("%s not used: the model's backward runs custom code (%s)",
                          memo_key, graph.custom)
                return None
            if graph.signature is None:
                log.debug("%s not used: the model has no input gradient", memo_key)
                return None
            checked = _CHECKED_GRADIENTS.get(traced)
            if checked is None:
                points = sample.points[:GRADIENT_CHECK_POINTS]
                checked = (same_gradients(forward_func, runner(traced), points),
                           graph.signature)
                _CHECKED_GRADIENTS[traced] = checked
            verdict, signature = checked
            if signature == graph.signature:
                if verdict:
                    return traced
                log.debug("%s not used: the trace's gradient differs from the model's",
                          memo_key)
                return None
            if attempt == 0:
                log.debug("%s: the model's backward changed since it was traced: tracing it "
                          "again", memo_key)
                forget(forward_func, memo_key)
                continue
            return None
        if attempt == 0:
            log.debug("%s no longer reproduces the model: tracing it again", memo_key)
            forget(forward_func, memo_key)
    log.debug("%s not used: the trace does not reproduce the model", memo_key)
    return None


# Rows per comparison of the rows past the sample, and at most this many input numbers.
CHECK_BLOCK_ROWS = 16_384
CHECK_BLOCK_ELEMENTS = 1 << 20


def _rows_reproduce(
    forward_func: Callable[..., Tensor],
    candidate: Callable[[Tensor], Tensor],
    inputs: Tensor,
    first: int,
) -> bool:
    """Whether ``candidate`` gives the model's outputs on the rows from ``first`` on.

    The sample covers the first rows only; a value read in ``forward`` that matters for
    a later row alone (a clamp that only that row reaches) would otherwise go unseen. In
    blocks, without gradients: on the Titanic network at 20k rows about one full forward
    pass of the model and one of the trace per call.
    """
    n_rows = inputs.shape[0]
    if first >= n_rows:
        return True
    row_size = max(1, inputs[0].numel())
    block = max(1, min(CHECK_BLOCK_ROWS, CHECK_BLOCK_ELEMENTS // row_size))
    for start in range(first, n_rows, block):
        rows = inputs[start : start + block]
        try:
            with torch.no_grad():
                expected = forward_func(rows)
        except Exception as error:  # noqa: BLE001 - the plain path reports it
            log.debug("the model fails on rows %d and on (%s)", start, error)
            return False
        if not reproduces(candidate, expected, rows):
            log.debug("the trace differs from the model on rows %d to %d", start,
                      start + rows.shape[0] - 1)
            return False
    return True


def _integrate_points(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    rule: QuadratureRule,
    chunk_points: int,
    options: RunOptions,
    progress: Progress | None = None,
) -> tuple[Tensor, ...]:
    device = problem.inputs[0].device
    n_pairs = problem.n_baselines * problem.n_rows
    n_steps = rule.n_steps
    total = n_pairs * n_steps
    sums = [
        torch.zeros((n_pairs, *x.shape[1:]), dtype=_accumulate_dtype(x, n_steps),
                    device=device)
        for x in problem.inputs
    ]
    alphas = torch.tensor(rule.alphas, dtype=torch.float64, device=device)
    weights = [torch.tensor(rule.weights, device=device).to(s.dtype) for s in sums]
    log.debug(
        "integrate: %d pairs x %d steps = %d points in chunks of %d (%s, %s)",
        n_pairs, n_steps, total, chunk_points, options.precision,
        "compiled" if options.compile_mode else "eager",
    )
    if options.compile_mode and chunk_points >= n_steps and _fusable(sums):
        done = _integrate_fused(forward_func, problem, sums, alphas, weights[0], chunk_points,
                                options, progress)
        if done:
            return _as_pair_grid(problem, sums)
    step_fn = chunk_step(forward_func, problem, options, chunk_points)

    with Progress.or_nested(progress, total, options) as bar:
        start = 0
        while start < total:
            stop = min(start + chunk_points, total)
            try:
                _integrate_chunk(step_fn, problem, sums, weights, alphas, start, stop, n_steps)
            except torch.OutOfMemoryError:
                chunk_points = _halved(chunk_points, n_steps, device)
                step_fn = chunk_step(forward_func, problem, options, chunk_points)
                continue
            bar.update(stop - start)
            start = stop

    return _as_pair_grid(problem, sums)


def _as_pair_grid(problem: PathProblem, sums: list[Tensor]) -> tuple[Tensor, ...]:
    return tuple(
        grad_sum.view(problem.n_baselines, problem.n_rows, *grad_sum.shape[1:])
        for grad_sum in sums
    )


def _fusable(sums: list[Tensor]) -> bool:
    # One weight tensor serves every input: their sums must share a dtype.
    return len({s.dtype for s in sums}) == 1


def _integrate_fused(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    sums: list[Tensor],
    alphas: Tensor,
    weights: Tensor,
    chunk_points: int,
    options: RunOptions,
    progress: Progress | None,
) -> bool:
    """Whole-path chunks through one compiled graph each (see engine.fused); adds into ``sums``.

    Returns False, having added nothing, when the first chunk does not compile; the caller
    then runs the per-point loop.
    """
    device = alphas.device
    n_steps = alphas.shape[0]
    n_pairs = problem.n_baselines * problem.n_rows
    if not problem.targets_checked:
        _check_selection(forward_func, problem)
    pairs_per_chunk = max(1, chunk_points // n_steps)
    fused = compiled_whole_paths(forward_func, options.compile_mode)
    compiled_once = False

    with Progress.or_nested(progress, n_pairs * n_steps, options) as bar:
        first = 0
        while first < n_pairs:
            count = min(pairs_per_chunk, n_pairs - first)
            pairs = torch.arange(first, first + count, device=device)
            if count < pairs_per_chunk:
                # One shape for every chunk: pad with copies of the last pair.
                pairs = torch.cat([pairs, pairs[-1:].expand(pairs_per_chunk - count)])
            rows = pairs % problem.n_rows
            point_rows = rows.repeat_interleave(n_steps)
            base_index = problem.baseline_index(pairs)
            targets = problem.targets
            if isinstance(targets, Tensor):
                targets = targets[point_rows.to(targets.device)].to(device)
            try:
                # no_grad outside: torch.func.grad still differentiates inside, but
                # nothing links the sums to weights that require grad.
                with matmul_context(options, device), torch.no_grad():
                    grads, selected = fused(
                        forward_func,
                        tuple(x[rows] for x in problem.inputs),
                        tuple(base.flatten(0, 1)[base_index] for base in problem.baselines),
                        alphas, weights, problem.args_for(point_rows), targets,
                        options.autocast_dtype,
                    )
            except torch.OutOfMemoryError:
                pairs_per_chunk = _halved_pairs(pairs_per_chunk, n_steps, device)
                continue
            except (ArgumentError, ModelError):
                raise
            except Exception as error:  # noqa: BLE001 - the per-point loop still works
                if compiled_once:
                    raise
                log.info("whole-path compile failed (%s); compiling the model alone",
                         str(error).strip().splitlines()[0] if str(error).strip() else
                         type(error).__name__)
                return False
            compiled_once = True
            _refuse_non_finite(selected[:count].reshape(-1), point_rows[: count * n_steps])
            for grad_sum, grad in zip(sums, grads):
                grad_sum[first : first + count] += grad[:count]
            bar.update(count * n_steps)
            first += count
    return True


def _check_selection(forward_func: Callable[..., Tensor], problem: PathProblem) -> None:
    """Run ``problem.select`` eagerly, so that target errors read as usual.

    On row 0 and its baseline: training-mode BatchNorm (allowed by allow_coupled_rows)
    needs more than one point.
    """
    device = problem.inputs[0].device
    pair = torch.zeros(2, dtype=torch.long, device=device)
    alphas = torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)

    with torch.no_grad():
        output = _forward(forward_func, problem.path_points(pair, alphas),
                          problem.args_for(pair % problem.n_rows))
    problem.select(output, pair % problem.n_rows)


def _halved(chunk_points: int, n_steps: int, device: torch.device) -> int:
    if chunk_points <= 1:
        raise ModelError(f"out of memory on {device} with a single path point per chunk")
    smaller = max(1, chunk_points // 2)
    if smaller >= n_steps:
        smaller -= smaller % n_steps
    log.warning("out of memory on %s: %d -> %d points per chunk", device, chunk_points, smaller)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return smaller


def _halved_pairs(pairs: int, n_steps: int, device: torch.device) -> int:
    """Half as many whole paths per chunk, at least one; none to halve is a ModelError."""
    if pairs <= 1:
        raise ModelError(
            f"out of memory on {device} with a single path ({n_steps} points) per chunk"
        )
    return max(1, _halved(pairs * n_steps, n_steps, device) // n_steps)


def _integrate_chunk(
    step_fn: Callable[..., tuple[Tensor, ...]],
    problem: PathProblem,
    sums: list[Tensor],
    weights: list[Tensor],
    alphas: Tensor,
    start: int,
    stop: int,
    n_steps: int,
) -> None:
    if start % n_steps == 0 and stop % n_steps == 0:
        # Whole paths: points built by broadcasting, gradients folded over the step axis.
        pairs = torch.arange(start // n_steps, stop // n_steps, device=alphas.device)
        points = _whole_path_points(problem, pairs, alphas)
        rows = (pairs % problem.n_rows).repeat_interleave(n_steps)
        grads = _chunk_gradients(step_fn, problem, points, rows)
        for grad, grad_sum, weight in zip(grads, sums, weights):
            _accumulate(grad_sum, grad.to(grad_sum.dtype), weight, pairs, None, n_steps)
        return

    point = torch.arange(start, stop, device=alphas.device)
    pair, step = point // n_steps, point % n_steps
    points = problem.path_points(pair, alphas[step])
    grads = _chunk_gradients(step_fn, problem, points, pair % problem.n_rows)
    for grad, grad_sum, weight in zip(grads, sums, weights):
        _accumulate(grad_sum, grad.to(grad_sum.dtype), weight, pair, step, n_steps)


def _whole_path_points(problem: PathProblem, pairs: Tensor, alphas: Tensor) -> tuple[Tensor, ...]:
    """Every step of each pair's path: (pairs * steps, *F), step fastest."""
    rows = pairs % problem.n_rows
    base_index = problem.baseline_index(pairs)
    points = []
    for x, base in zip(problem.inputs, problem.baselines):
        x_rows = x[rows].unsqueeze(1)
        base_rows = base.flatten(0, 1)[base_index].unsqueeze(1)
        alpha = alphas.to(x.dtype).view(1, -1, *([1] * (x.dim() - 1)))
        # (pairs, steps, *F); the same expression and rounding as the per-point path.
        path = base_rows + alpha * (x_rows - base_rows)
        points.append(path.flatten(0, 1))
    return tuple(points)


# Steps per path up to which float32 gradients are summed in float32.
FLOAT32_SUM_STEPS = 64


def _accumulate_dtype(x: Tensor, n_steps: int = 0) -> torch.dtype:
    """Half-precision gradients are summed in float32, float64 ones in float64; float32
    ones in float32 for up to FLOAT32_SUM_STEPS steps and in float64 beyond.

    A float32 sum of many steps drifts: at 100,000 steps it was 1e-4 off a float64
    reference where Captum's was 1e-7. With few steps the float64 copy of every chunk's
    gradients would cost the affine-hoisted path, whose per-point gradients are whole
    hidden layers, more than its own arithmetic.
    """
    if x.dtype == torch.float64 or (x.dtype == torch.float32 and n_steps > FLOAT32_SUM_STEPS):
        return torch.float64
    return torch.float32


def chunk_step(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    options: RunOptions,
    chunk_points: int,
) -> Callable[[tuple[Tensor, ...], Tensor], tuple[tuple[Tensor, ...], Tensor]]:
    """One chunk's forward and backward: (points, rows) -> (gradients, target outputs)."""
    device = problem.inputs[0].device
    mode = options.compile_mode
    model = compiled_model(forward_func, mode) if mode else forward_func

    def step(points: tuple[Tensor, ...], rows: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        count = rows.shape[0]
        if mode and count < chunk_points:
            # One shape for every chunk: the compiled model is traced once.
            *points, rows = pad_rows((*points, rows), chunk_points)
        with torch.enable_grad():
            points = tuple(p.detach().requires_grad_() for p in points)
            with precision_context(options, device):
                output = _forward(model, points, problem.args_for(rows))
                selected = problem.select(output, rows)
            if not selected.requires_grad:
                raise ModelError(_NO_GRADIENT)
            # An input the outputs do not depend on has zero attributions (as compiled
            # chunks, whose torch.func.grad gives zeros, have too). The backward's
            # matmuls take the forward's TensorFloat-32 setting; autocast has already
            # chosen their dtypes.
            with matmul_context(options, device):
                grads = torch.autograd.grad(selected.sum(), points, allow_unused=True,
                                            materialize_grads=True)
        return tuple(g[:count] for g in grads), selected[:count].detach()

    return step


def _chunk_gradients(
    step_fn: Callable[..., tuple[Tensor, ...]],
    problem: PathProblem,
    points: tuple[Tensor, ...],
    rows: Tensor,
) -> tuple[Tensor, ...]:
    """Gradient of each point's target output at that point, one backward for the chunk."""
    grads, selected = step_fn(points, rows)
    _refuse_non_finite(selected, rows)
    return grads


def _accumulate(
    grad_sum: Tensor,
    grad: Tensor,
    weight: Tensor,
    pair: Tensor,
    step: Tensor | None,
    n_steps: int,
) -> None:
    """Add w_k * gradient into each pair's sum; ``step`` None means whole paths in order."""
    if step is None:
        # (pairs, steps, features) -> (pairs, features)
        paths = grad.reshape(len(pair), n_steps, -1)
        # A vector-matrix product per pair; einsum would copy the paths to a bmm layout.
        folded = torch.matmul(weight, paths)
        first = int(pair[0])
        grad_sum[first : first + len(pair)] += folded.view(-1, *grad_sum.shape[1:])
        return
    weighted = grad * weight[step].view(-1, *([1] * (grad.dim() - 1)))
    grad_sum.index_add_(0, pair, weighted)


def _usable_split(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    options: RunOptions,
    sample: ModelSample | None,
) -> tuple[AffineSplit | None, Tensor | None, Tensor | None]:
    """The model's affine prefix, when hoisting is on and exact for this problem, and its
    prefix's and its own outputs on the probe's ``sample`` points, as the check of the
    split computed them."""
    if not options.hoist or len(problem.inputs) != 1 or problem.forward_args \
            or _model_hooked(forward_func):
        return None, None, None
    # The prefix outputs and outputs at the sample, per trace checked: only the trace
    # returned is known to compute the model.
    seen: dict[int, tuple[AffineSplit, Tensor, Tensor]] = {}

    def runner(traced: AffineSplit) -> Callable[[Tensor], Tensor]:
        def run(points: Tensor) -> Tensor:
            hidden = traced.prefix(points)
            if sample is None or points is not sample.points:
                return traced.finish(hidden)
            # A suffix may write its input in place where the trace does not show it;
            # the kink split never does (KinkSplit.run).
            kept = hidden if traced.kink is not None else hidden.clone()
            output = traced.finish(hidden)
            seen[id(traced)] = (traced, kept, output)
            return output

        return run

    split = _checked_trace(forward_func, problem, sample, split_affine_prefix, "affine split",
                           runner)
    if split is None or not split.is_affine_now():
        return None, None, None
    known = seen.get(id(split))
    if known is None or known[0] is not split:
        return split, None, None
    return split, known[1], known[2]


def _sample_prefix(problem: PathProblem, sample: ModelSample | None,
                   hidden: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The prefix outputs of the rows (N, *H) and of the shared baselines (B, *H) that the
    sample's ``hidden`` holds, each None where it does not hold them all.

    The sample begins with the first rows and then row 0's first baselines (see
    ``_probe_pairs``), the baselines themselves.
    """
    if sample is None or hidden is None or sample.rows != problem.n_rows:
        return None, None
    rows = hidden[: sample.rows]
    base = problem.baselines[0]
    if base.shape[1] != 1 or sample.kinds != problem.n_baselines:
        return rows, None
    return rows, hidden[sample.rows : sample.rows + sample.kinds]


def _integrate_hoisted(
    split: AffineSplit,
    problem: PathProblem,
    rule: QuadratureRule,
    chunk_points: int | None,
    options: RunOptions,
    known: tuple[Tensor | None, Tensor | None] = (None, None),
) -> Tensor:
    """The integral over the model after its affine prefix, pulled back: (B, N, *F).

    Rows go in blocks so that the prefix outputs and the hidden-space sums stay within the
    memory budget however many rows there are. ``known`` holds the prefix outputs of the
    rows and of the shared baselines where the check of the split computed them already
    (see ``_sample_prefix``).
    """
    x, base = problem.inputs[0], problem.baselines[0]
    n_baselines, n_rows = problem.n_baselines, problem.n_rows
    result = torch.empty((n_baselines, n_rows, *x.shape[1:]), dtype=_accumulate_dtype(x),
                         device=x.device)
    per_row_base = base.shape[1] == n_rows
    all_hidden_x, known_base = known
    with torch.no_grad():
        # Shared baselines go through the prefix once: (B, 1, *F) -> (B, 1, *H). A few
        # rows go with them, in the same call.
        shared = base[:, 0]
        if known_base is not None:
            shared = known_base
        elif all_hidden_x is None and not per_row_base and n_rows <= _PREFIX_WITH_BASELINES:
            hidden = split.prefix(torch.cat([shared, x]))
            shared, all_hidden_x = hidden[:n_baselines], hidden[n_baselines:]
        else:
            shared = split.prefix(shared)
        hidden_base = shared.unsqueeze(1)
    block = _hoisted_block_rows(problem, hidden_base, options)
    total = n_baselines * n_rows * rule.n_steps

    with Progress.or_nested(None, total, options) as bar:
        for first in range(0, n_rows, block):
            rows = slice(first, min(first + block, n_rows))
            with torch.no_grad():
                hidden_x = all_hidden_x if block >= n_rows and all_hidden_x is not None \
                    else split.prefix(x[rows])
                if per_row_base:
                    # (B, rows, *F) -> (B, rows, *H), one block at a time.
                    hidden_base = split.prefix(base[:, rows].flatten(0, 1)).unflatten(
                        0, (n_baselines, hidden_x.shape[0])
                    )
            sub = dataclasses.replace(
                problem,
                inputs=(hidden_x,),
                baselines=(hidden_base,),
                targets=_rows_of(problem.targets, rows),
                forward_args=(),
            )
            kink = _usable_kink(split, hidden_x, options)
            if kink is not None:
                hidden_sum = _integrate_kinked(kink, sub, rule, options, bar)
            else:
                sub_chunk = chunk_points
                if options.internal_batch_size is None:
                    sub_chunk = _planned_chunk_points(split.suffix, sub, rule, options,
                                                      hoisted=True)
                (hidden_sum,) = _integrate_points(split.suffix, sub, rule, sub_chunk, options,
                                                  bar)
            pulled = pull_back(split, hidden_sum.flatten(0, 1), x)
            result[:, rows] = pulled.view(n_baselines, -1, *x.shape[1:]).to(result.dtype)
    return result


# Jobs with at most this many rows (and shared baselines) run the prefix on the rows and
# the baselines in one call.
_PREFIX_WITH_BASELINES = 256


def _usable_kink(split: AffineSplit, hidden_x: Tensor, options: RunOptions) -> KinkSplit | None:
    """The split's kink (see engine.kinks), when it applies to these hidden rows."""
    kink = split.kink
    if options.hoist is not True or kink is None or hidden_x.dim() != 2:
        return None
    # The closed form skips the two layers' forward calls, and with them any hooks.
    if hooked(kink.linear) or (kink.activation is not None and hooked(kink.activation)):
        return None
    slopes = kink.negative_slopes(hidden_x).numel()
    if kink.linear.in_features != hidden_x.shape[1] or slopes not in (1, hidden_x.shape[1]):
        return None
    if kink.linear.out_features > MAX_CLOSED_FORM_OUTPUTS:
        log.debug("closed form not used: its Linear layer has %d outputs (more than %d)",
                  kink.linear.out_features, MAX_CLOSED_FORM_OUTPUTS)
        return None
    return kink


def _integrate_kinked(
    kink: KinkSplit,
    problem: PathProblem,
    rule: QuadratureRule,
    options: RunOptions,
    bar: Progress,
) -> Tensor:
    """The hidden-space sums of ``problem`` (one block of hoisted rows): (B, N, H1).

    Pairs go through ``integrate_kinked`` in blocks sized from the memory budget. The tail
    runs as one chunk per block at the requested precision. With ``compile=``, on a CPU
    with numba the tail is compiled (padded to one shape); elsewhere each block runs as
    one compiled graph. A first failure to compile sends the run back to eager.
    """
    x, base = problem.inputs[0], problem.baselines[0]
    device = x.device
    n_pairs, n_steps = problem.n_baselines * problem.n_rows, rule.n_steps
    accumulate = _accumulate_dtype(x)
    nodes = rule_nodes(rule.method, rule.n_steps, x.dtype, device)
    per_block = _kinked_block_pairs(kink, problem, rule, options)
    fused = None
    # On a CPU the numba loops beat a compiled graph of the whole closed form; chunk_step
    # then compiles the tail alone.
    loops = kink_loops.applies(x, base)
    if loops:
        # The loops sum in float64, and pull_back takes float64 sums as they are.
        accumulate = torch.float64
    if options.compile_mode and not loops:
        if not problem.targets_checked:
            _check_tail_selection(kink, problem)
        fused = compiled_kinked(kink, options.compile_mode)
    step_options = options
    chain = _activation_tail(kink, options, x)
    step_fn = None if fused or chain else chunk_step(kink.tail, problem, options,
                                                     per_block * n_steps)
    sums = torch.empty((n_pairs, x.shape[1]), dtype=accumulate, device=device)
    log.debug("integrate through kinks: %d pairs x %d steps in blocks of %d pairs (%s, %s)",
              n_pairs, n_steps, per_block, "numba loops" if loops else "tensors",
              "compiled" if options.compile_mode else "eager")
    compiled_once = False
    first = 0
    while first < n_pairs:
        count = min(per_block, n_pairs - first)
        pairs = torch.arange(first, first + count, device=device)
        if fused is not None and count < per_block:
            # One shape for every block: pad with copies of the last pair.
            pairs = torch.cat([pairs, pairs[-1:].expand(per_block - count)])
        rows = pairs % problem.n_rows
        # Each point's row: for per-row targets, and to name rows with non-finite outputs
        # (made then). Without per-row targets the tail's step reads only their number.
        point_rows = None
        if fused is None:
            point_rows = rows.repeat_interleave(n_steps) if isinstance(problem.targets, Tensor) \
                else rows.new_zeros(()).expand(count * n_steps)
        if count == n_pairs and fused is None:
            # Every pair at once: rows against baselines by broadcasting, no gathers. A
            # compiled block gathers its pairs, padded like any other block, so that
            # jobs of other sizes share its shape.
            hidden_x, hidden_base = x, base
        else:
            hidden_x, hidden_base = x[rows], base.flatten(0, 1)[problem.baseline_index(pairs)]
        try:
            if fused is not None:
                targets = problem.targets
                if isinstance(targets, Tensor):
                    point_rows = rows.repeat_interleave(n_steps)
                    targets = targets[point_rows.to(targets.device)].to(device)
                with matmul_context(options, device), torch.no_grad():
                    block, selected, finite = fused(kink, hidden_x, hidden_base, nodes,
                                                    targets, options.autocast_dtype)
            else:
                tail_gradient = _chain_tail_gradient(chain, problem, point_rows) if chain \
                    else _tail_gradient(step_fn, point_rows)
                block, selected = integrate_kinked(kink, hidden_x, hidden_base, nodes,
                                                   tail_gradient, accumulate)
                finite = None
        except torch.OutOfMemoryError:
            per_block = _halved_pairs(per_block, n_steps, device)
            step_fn = None if fused else chunk_step(kink.tail, problem, step_options,
                                                    per_block * n_steps)
            continue
        except ArgumentError:
            raise
        except Exception as error:  # noqa: BLE001 - the eager blocks still work
            # A compiled tail's failure reaches here as the ModelError of any model call;
            # a model that fails eagerly too fails again below, with its own message.
            if step_options.compile_mode is None or compiled_once \
                    or (isinstance(error, ModelError) and fused is not None):
                raise
            log.info("compiling the kinked integral failed (%s); running it eagerly",
                     (str(error).strip().splitlines() or [type(error).__name__])[0])
            fused = None
            step_options = dataclasses.replace(options, compile=False)
            step_fn = chunk_step(kink.tail, problem, step_options, per_block * n_steps)
            continue
        compiled_once = True
        if finite is None or not bool(finite):
            if not all_finite(selected[: count * n_steps]):
                point_rows = rows.repeat_interleave(n_steps)
                _refuse_non_finite(selected[: count * n_steps], point_rows[: count * n_steps])
        bar.update(count * n_steps)
        if count == n_pairs and block.shape[0] == n_pairs and block.dtype == sums.dtype:
            # One block holds every pair: no copy.
            return block.view(problem.n_baselines, problem.n_rows, -1)
        sums[first : first + count] = block[:count]
        first += count
    return sums.view(problem.n_baselines, problem.n_rows, -1)


def _activation_tail(kink: KinkSplit, options: RunOptions, x: Tensor
                     ) -> tuple[nn.Module, ...] | None:
    """The tail's layers when it is differentiated with torch's backward kernels (see
    engine.tails): one output, eager, full precision, on a CPU; else None."""
    if options.compile_mode or options.precision != "fp32" or x.device.type != "cpu" \
            or x.dtype not in (torch.float32, torch.float64) \
            or kink.linear.out_features != 1:
        return None
    return activation_chain(kink.tail) or None


def _chain_tail_gradient(layers: tuple[nn.Module, ...], problem: PathProblem,
                         point_rows: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    gradient = chain_gradient(layers)

    def tail_gradient(mixed: Tensor) -> tuple[Tensor, Tensor]:
        grad, output = gradient(mixed)
        return grad, problem.select(output, point_rows)

    return tail_gradient


def _tail_gradient(
    step_fn: Callable[..., tuple[tuple[Tensor, ...], Tensor]], point_rows: Tensor
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def tail_gradient(mixed: Tensor) -> tuple[Tensor, Tensor]:
        grads, selected = step_fn((mixed,), point_rows)
        return grads[0], selected

    return tail_gradient


def _check_tail_selection(kink: KinkSplit, problem: PathProblem) -> None:
    """Select the target of one tail output eagerly, so that target errors read as usual."""
    device = problem.inputs[0].device
    point = torch.zeros((2, kink.linear.out_features), dtype=problem.inputs[0].dtype,
                        device=device)
    with torch.no_grad():
        output = _forward(kink.tail, (point,), ())
    problem.select(output, torch.zeros(2, dtype=torch.long, device=device))


# Bytes per number of the closed form's work arrays (float64).
WORK_BYTES = 8


def _kinked_block_pairs(
    kink: KinkSplit, problem: PathProblem, rule: QuadratureRule, options: RunOptions
) -> int:
    """Pairs per block: ``internal_batch_size`` points, or what fits the budget."""
    n_pairs, n_steps = problem.n_baselines * problem.n_rows, rule.n_steps
    padded = options.compile_mode is not None
    if options.internal_batch_size is not None:
        most = max(1, options.internal_batch_size // n_steps)
        if padded and most >= n_pairs:
            return padded_size(n_pairs, most)
        return min(n_pairs, most)
    x = problem.inputs[0]
    hidden, mixed = x.shape[1], kink.linear.out_features
    device = x.device

    def tail_bytes() -> float:
        def run(count: int) -> int:
            def forward() -> None:
                points = torch.zeros((count, mixed), dtype=x.dtype, device=device,
                                     requires_grad=True)
                with precision_context(options, device):
                    kink.tail(points)

            with torch.enable_grad():
                return saved_bytes(forward)

        return (run(PROBE_POINTS) - run(PROBE_POINTS // 2)) / (PROBE_POINTS // 2)

    key = ("tail activation", mixed, x.dtype, device, options.precision)
    per_point = max(float(memo(kink.tail, key, tail_bytes)), 0.0)
    # Running sums over the nodes and the per-unit gathers, in float64, next to the
    # tail's activations.
    arrays = 10 * (n_steps + 1) * mixed + 10 * hidden * mixed
    tail = BACKWARD_FACTOR * n_steps * per_point
    budget = options.memory_budget or default_memory_budget(device)
    most = int(budget // (WORK_BYTES * arrays + tail))
    if device.type == "cpu":
        # The cache-sized cap as tuned, counted in the inputs' element size: counted in
        # float64 it halved the blocks and made 20k rows 11% slower (145 against 130 ms).
        most = min(most, int(FUSED_CPU_CHUNK_BYTES // (x.element_size() * arrays + tail)))
    return balanced_chunk(max(1, most), n_pairs, padded)


def _hoisted_block_rows(problem: PathProblem, hidden_base: Tensor, options: RunOptions) -> int:
    """Rows per block: hidden inputs, per-row hidden baselines and sums within a quarter budget."""
    device = problem.inputs[0].device
    budget = options.memory_budget or default_memory_budget(device)
    hidden_row = hidden_base[0, 0].numel() * 8
    per_row_base = problem.baselines[0].shape[1] == problem.n_rows
    row_bytes = hidden_row * (1 + problem.n_baselines * (2 if per_row_base else 1))
    return max(1, min(problem.n_rows, budget // 4 // max(row_bytes, 1)))


def _rows_of(targets: Any, rows: slice) -> Any:
    return targets[rows] if isinstance(targets, Tensor) else targets


def _forward(forward_func: Callable[..., Tensor], points: tuple[Tensor, ...], args) -> Tensor:
    try:
        output = forward_func(*points, *args)
    except torch.OutOfMemoryError:
        raise  # the chunk loop halves the chunk and retries
    except RuntimeError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "device" in first_line:
            raise ArgumentError(
                f"the model failed on inputs on {points[0].device}: {first_line} (move the "
                "model and every tensor it uses to the inputs' device)"
            ) from error
        # Per point, and how many: the batch holds the engine's own points (the probe's
        # rows with their baselines, a chunk of path points), not the caller's rows.
        shapes = ", ".join(str(tuple(p.shape[1:])) for p in points)
        hint = ""
        if any(p.dim() == 1 for p in points):
            hint = (" (inputs are (N, *F), rows first: one row of F features is "
                    "x.unsqueeze(0))")
        elif "type" in first_line \
                and (dtypes := _mismatched_dtypes(forward_func, points)) is not None:
            hint = (f" (the inputs are {dtypes[0]} and the model's weights {dtypes[1]}: "
                    f"convert one to the other, model.to(torch.{dtypes[0]}) or "
                    f"x.to(torch.{dtypes[1]}))")
        raise ModelError(
            f"the model failed on a batch of {points[0].shape[0]} points (rows, baselines "
            f"or points between them) each of shape {shapes}{hint}: {first_line}"
        ) from error
    if not isinstance(output, Tensor):
        raise ModelError(f"the model must return a Tensor, got {type(output).__name__}")
    if output.dim() == 0 and points[0].shape[0] == 1:
        # A model that squeezes its (rows, 1) output gives a scalar for one row: the last
        # chunk of some chunk sizes, or a one-row job.
        output = output.reshape(1)
    if output.dim() == 0 or output.shape[0] != points[0].shape[0]:
        # The engine's batches are its own (path points, probe batches): say so, or a
        # user who passed 4 rows reads "for 5 rows" as a miscount.
        raise ModelError(
            f"the model returned shape {tuple(output.shape)} for a batch of "
            f"{points[0].shape[0]} path points: expected one output row per input row"
        )
    if not output.is_floating_point():
        raise ModelError(
            f"the model returned {str(output.dtype).removeprefix('torch.')} outputs: "
            "Integrated Gradients needs real floating point outputs to differentiate"
        )
    if output[0].numel() == 0:
        raise ModelError(f"the model returned shape {tuple(output.shape)}: no outputs per row")
    return output


def _mismatched_dtypes(forward_func: Callable[..., Tensor],
                       points: tuple[Tensor, ...]) -> tuple[str, str] | None:
    """The floating dtype of the points and of the model's weights, where each is one
    dtype and they differ: a model whose weights mix dtypes gets no advice."""
    module = module_of(forward_func)
    if module is None:
        return None
    weights = {w.dtype for w in module.parameters() if w.is_floating_point()}
    given = {p.dtype for p in points if p.is_floating_point()}
    if len(weights) != 1 or len(given) != 1 or weights == given:
        return None
    return _dtype_name(given.pop()), _dtype_name(weights.pop())


def _refuse_non_finite(selected: Tensor, rows: Tensor) -> None:
    if all_finite(selected):
        return
    finite = torch.isfinite(selected.detach())
    shown = shown_rows(torch.unique(rows[~finite]).tolist())
    raise NonFiniteOutputError(
        f"the model returned non-finite outputs (nan or inf) on the path of row(s) {shown}: "
        "check those rows and their baselines"
    )


@contextlib.contextmanager
def weights_blamed(forward_func: Callable[..., Tensor]) -> Iterator[None]:
    """Name the model's nan or inf weights when they are why its outputs are non-finite.

    The parameters are only looked at after non-finite outputs were found: a healthy run
    pays nothing. A plain function hides its weights, and keeps the message on the rows.
    """
    try:
        yield
    except NonFiniteOutputError as error:
        culprits = non_finite_weights(module_of(forward_func))
        if not culprits:
            raise
        raise NonFiniteError(
            f"the model's weights hold nan or inf ({culprits}), which makes its outputs "
            "non-finite: retrain the model or load other weights"
        ) from error


def refuse_coupled_rows(forward_func: Callable[..., Tensor]) -> None:
    """Raise ``ModelError`` if the model has layers that mix rows or draw random numbers.

    Summing the outputs before the backward is exact only when each output depends on its
    own row alone; batch statistics (BatchNorm in training mode, or without running
    statistics in any mode) break that, and would also change with the chunking. Dropout
    in training mode gives every path point a different random model. A random model can
    get past the probe by chance, so all of these are found by name.
    """
    module = module_of(forward_func)
    if module is None:
        return
    coupled, random, no_statistics = [], [], []
    for name, layer in module.named_modules():
        if not layer.training:
            if uses_batch_statistics(layer):
                no_statistics.append(name or type(module).__name__)
            continue
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            coupled.append(name or type(module).__name__)
        elif (isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0) \
                or isinstance(layer, nn.RReLU):
            random.append(name or type(module).__name__)
    if coupled:
        raise ModelError(
            f"layer(s) {', '.join(coupled)} are in training mode and mix rows through batch "
            "statistics: call model.eval() before computing attributions "
            "(or pass allow_coupled_rows=True)"
        )
    if no_statistics:
        raise ModelError(
            f"BatchNorm layer(s) {', '.join(no_statistics)} have no running statistics "
            "(track_running_stats=False), so they normalise with the batch's statistics even "
            "in eval mode and mix rows: per-row attributions need running statistics (or "
            "pass allow_coupled_rows=True)"
        )
    if random:
        raise ModelError(
            f"random layer(s) {', '.join(random)} (dropout, RReLU) are in training mode, "
            "so the model is random: call model.eval() before computing attributions "
            "(or pass allow_coupled_rows=True)"
        )


@dataclass(frozen=True)
class ModelSample:
    """The model's ``outputs`` at a few ``points`` of its single input, rows independent;
    the points begin with the input's first ``rows`` rows.

    ``later``, when not None, is the rest of the row-coupling probe, left for the caller
    to run or skip (see ``check_independent_rows``).
    """

    points: Tensor
    outputs: Tensor
    rows: int
    kinds: int = 0  # row 0's first baselines among the points
    later: _LaterProbe | None = dataclasses.field(default=None, compare=False)


def check_independent_rows(
    forward_func: Callable[..., Tensor], problem: PathProblem, allow: bool,
    tensors: ModelTensors | None = None, *, defer: bool = False,
) -> ModelSample | None:
    """Refuse models whose output for one row depends on the other rows of the batch.

    Known culprits (BatchNorm and dropout in training mode) are found by name; anything
    else by a probe: the first rows (up to PROBE_ROWS) are evaluated once, then again at
    other positions beside other partners (see ``_probe_pairs``), and their outputs must
    not change; a model that draws random numbers on every call is refused as random.
    ``allow`` turns the refusal into a logged warning.

    Returns the probe's first batch (its points and outputs) when the model has one input
    and no extra arguments and its rows are independent, else None. With ``defer`` the
    probe's later batches may be left to the caller, as the sample's ``later``: one who
    integrates through a checked trace that cannot mix rows (see ``engine.rowwise``) skips
    them, and anyone else runs them before any other work. ``tensors`` is what
    ``check_model_device`` returned, if it ran.
    """
    try:
        refuse_coupled_rows(forward_func)
        # Probed on every call: a flag read in forward can couple rows without any
        # change to the model's layers.
        if tensors is None:
            tensors = model_tensors(forward_func)
        return _probe_row_coupling(forward_func, problem, tensors, defer and not allow)
    except ModelError as error:
        if not allow:
            raise
        log.warning("allow_coupled_rows=True: %s; attributions are not per-row IG", error)
        return None


def _input_layout(problem: PathProblem) -> tuple[object, ...]:
    return tuple((tuple(x.shape[1:]), x.dtype, x.device) for x in problem.inputs)


# Rows the probe runs: all of them up to this many, and up to about this many input
# numbers in all (wide inputs such as images get at least PROBE_MIN_ROWS rows).
PROBE_ROWS = 1024
PROBE_ELEMENTS = 1 << 16
PROBE_MIN_ROWS = 4
# Baselines of row 0 in the probe's first batch, so that the trace check sees them too.
PROBE_KINDS = 64
# Where the probe's points between row 0 and its first baseline lie on their path: not the
# midpoint, whose batch with the row and the baseline has their batch's mean. Batch one
# holds the first (for the trace check), batch two the second, so that a row's neighbours
# differ between the two however few rows there are.
PROBE_ALPHA = 0.25
PROBE_LATER_ALPHA = 0.75


@dataclass(frozen=True)
class _ProbePoints:
    """The probe's points as path pairs (see ``_probe_pairs``)."""

    pair: Tensor  # every point's pair, in the order of the batches
    between: tuple[Tensor, Tensor]  # pairs and alphas of the points inside a path
    first_at: Tensor  # where each probed row is in batch one
    later_at: Tensor  # and where in the later batches
    later_numpy: np.ndarray  # later_at for numpy
    ends: tuple[int, int, int, int]  # where the batches start, and the last one ends


# _ProbePoints per (device, rows, baseline kinds, probed rows): the probe runs on every
# call.
_PROBE_POINTS: dict[tuple[object, ...], _ProbePoints] = {}


def _probe_pairs(problem: PathProblem) -> _ProbePoints:
    """The probe's points as path pairs and alphas, in the order of its three batches.

    Batch one holds rows 0 to R - 1, then row 0's baselines (up to PROBE_KINDS of them,
    K) and a point of row 0's path to its first baseline (at PROBE_ALPHA): what the
    trace check compares. Batch two holds another point of that path (at
    PROBE_LATER_ALPHA) and row R - 1; batch three row 0's last baseline and rows R - 2 to
    0. R = min(N, PROBE_ROWS), fewer for wide inputs (see PROBE_ELEMENTS). Every row sits
    at another position, beside other partners, in a batch of another size; row R - 1 in
    a batch of two, whose mean and extremes differ from batch one's however many rows
    there are.
    """
    device, n_rows = problem.inputs[0].device, problem.n_rows
    row_size = max(1, sum(x[0].numel() for x in problem.inputs))
    count = min(n_rows, PROBE_ROWS, max(PROBE_MIN_ROWS, PROBE_ELEMENTS // row_size))
    key = (device, n_rows, problem.n_baselines, count)
    if key not in _PROBE_POINTS:
        last_kind = (problem.n_baselines - 1) * n_rows
        kinds = [k * n_rows for k in range(min(problem.n_baselines, PROBE_KINDS))]
        pair = [*range(count), *kinds, 0, 0, count - 1, last_kind, *range(count - 2, -1, -1)]
        second = count + len(kinds) + 1
        # Row R - 1 is the second point of batch two; row i < R - 1 is point 1 + (R - 2 - i)
        # of batch three.
        later = [second + 3 + (count - 2 - i) for i in range(count - 1)] + [second + 1]
        if len(_PROBE_POINTS) > 64:
            _PROBE_POINTS.clear()
        _PROBE_POINTS[key] = _ProbePoints(
            torch.tensor(pair, dtype=torch.long, device=device),
            (torch.zeros(2, dtype=torch.long, device=device),
             torch.tensor([PROBE_ALPHA, PROBE_LATER_ALPHA], dtype=torch.float64,
                          device=device)),
            torch.arange(count, device=device),
            torch.tensor(later, dtype=torch.long, device=device),
            np.array(later, dtype=np.int64),
            (0, second, second + 2, len(pair)),
        )
    return _PROBE_POINTS[key]


def _probe_row_coupling(
    forward_func: Callable[..., Tensor], problem: PathProblem, tensors: ModelTensors,
    defer: bool = False,
) -> ModelSample | None:
    probe = _probe_pairs(problem)
    count = probe.first_at.shape[0]
    first_end = probe.ends[1]
    kinds = min(problem.n_baselines, PROBE_KINDS)
    # The rows and row 0's baselines themselves (their paths' ends) and two points inside
    # a path, one for batch one and one for batch two: slicing and flipping the inputs
    # costs less than gathering every point by its pair, and the hoisted path takes the
    # prefix outputs of the rows and baselines from the trace check on batch one (see
    # _sample_prefix).
    between = problem.path_points(*probe.between)
    points = tuple(
        torch.cat([x[:count], base[:kinds, 0], inside, x[count - 1 : count], base[-1:, 0],
                   x[: count - 1].flip(0)])
        for x, base, inside in zip(problem.inputs, problem.baselines, between)
    )
    rows = probe.pair % problem.n_rows
    device = problem.inputs[0].device
    # The random generator's state before the calls and after each: see
    # _draws_on_every_call.
    states = [_generator_state(device)]
    with torch.no_grad():
        first = _forward(forward_func, tuple(p[:first_end] for p in points),
                         problem.args_for(rows[:first_end]))
    states.append(_generator_state(device))
    # A target the model's output does not have fails here, before any real work.
    selected = problem.select(first, rows[:first_end])
    later = _LaterProbe(forward_func, problem, tensors, probe, points, rows, first, selected,
                        states)
    if len(points) != 1 or problem.forward_args:
        later.run()
        return None
    # The trace is checked on batch one, and on the last baseline when batch one does not
    # hold every baseline: the later batches repeat batch one's rows.
    if kinds == problem.n_baselines:
        if defer and (states[0] is None or _same_state(states[0], states[1])):
            return ModelSample(points[0][:first_end], first, count, kinds, later=later)
        later.run()
        return ModelSample(points[0][:first_end], first, count, kinds)
    outputs = later.run()
    last_base = probe.ends[2]
    return ModelSample(torch.cat([points[0][:first_end], points[0][last_base : last_base + 1]]),
                       torch.cat([first, outputs[last_base : last_base + 1]]), count, kinds)


class _LaterProbe:
    """The row-coupling probe's batches two and three and the comparison with batch one;
    ``run`` does them once."""

    def __init__(self, forward_func: Callable[..., Tensor], problem: PathProblem,
                 tensors: ModelTensors, probe: _ProbePoints, points: tuple[Tensor, ...],
                 rows: Tensor, first: Tensor, selected: Tensor,
                 states: list[Tensor | None]) -> None:
        self._call = (forward_func, problem, tensors, probe, points, rows, first, selected,
                      states)
        self.done = False

    def spared_by(self, traced_outputs: Tensor | None) -> bool:
        """Whether a trace whose outputs on batch one are ``traced_outputs`` spares the
        later batches: the random generator has not moved since batch one (the trace
        check's own model calls draw nothing either), and each row's output equals the
        model's within the probe's tolerance. The trace check compares the batch as a
        whole, so one large output would hide noise in the others (numpy's, which leaves
        torch's generator alone): the probe's per-row tolerance does not."""
        if self.done or traced_outputs is None:
            return False
        _, problem, tensors, _, points, rows, first, first_selected, states = self._call
        if states[1] is not None \
                and not _same_state(states[1], _generator_state(points[0].device)):
            return False
        if traced_outputs.shape != first.shape:
            return False
        traced = problem.select(traced_outputs, rows[: first.shape[0]])
        eps = _probe_eps(problem, tensors, first, traced_outputs)
        model_view, traced_view = numpy_view(first_selected), numpy_view(traced)
        if model_view is not None and traced_view is not None:
            with np.errstate(invalid="ignore", over="ignore"):
                change = np.abs(model_view.astype(np.float64) - traced_view).max()
            if change <= eps ** 0.5:
                return True
        return _gap_over_tolerance(first_selected, traced, eps) is None

    def run(self) -> Tensor | None:
        """The outputs of all three batches, the first time; None after."""
        if self.done:
            return None
        self.done = True
        call, self._call = self._call, None
        return _probe_later_batches(*call)


def _probe_later_batches(
    forward_func: Callable[..., Tensor], problem: PathProblem, tensors: ModelTensors,
    probe: _ProbePoints, points: tuple[Tensor, ...], rows: Tensor, first: Tensor,
    first_selected: Tensor, states: list[Tensor | None],
) -> Tensor:
    """Batches two and three of the probe (see ``_probe_pairs``); raises ``ModelError``
    when a row's output moved from batch one or the model draws random numbers. Returns
    the outputs of all three batches."""
    # Among nearly the same rows as in batch one, a batch statistic (a mean, a maximum)
    # moves by about 1/rows, less than the tolerance below once there are a few hundred
    # rows; in the batch of two it moves for any number.
    ends = probe.ends
    outputs = [first]
    with torch.no_grad():
        for start, end in zip(ends[1:], ends[2:]):
            outputs.append(_forward(forward_func, tuple(p[start:end] for p in points),
                                    problem.args_for(rows[start:end])))
            states.append(_generator_state(device=problem.inputs[0].device))
    both = torch.cat(outputs)
    selected = torch.cat([first_selected, problem.select(both[ends[1]:], rows[ends[1]:])])
    if _draws_on_every_call(states):
        # Dropout called as a function in eval mode, noise added in forward: it may
        # change few outputs, or none in these batches, and would still change the paths.
        raise ModelError(
            "the model draws random numbers in its forward pass, so its outputs are random "
            "(dropout called with training=True, or noise added in forward?): make it "
            "deterministic for attributions, or pass allow_coupled_rows=True"
        )
    eps = _probe_eps(problem, tensors, both)
    if _largest_change(selected, probe) <= eps ** 0.5:
        return both  # within the tolerance of a row of size 0, the smallest there is
    gap = _gap_over_tolerance(selected[probe.first_at], selected[probe.later_at], eps)
    if gap is not None:
        raise ModelError(
            f"the model's output for a row changed by {gap:.3g} when the "
            "other rows of the batch changed: rows interact or the model is random "
            "(BatchNorm or Dropout in training mode?); call model.eval() or pass "
            "allow_coupled_rows=True"
        )
    return both


def _probe_eps(problem: PathProblem, tensors: ModelTensors, *outputs: Tensor) -> float:
    """Machine epsilon of the least precise dtype the model computes in: its parameters
    and buffers, the inputs and the ``outputs`` (a float32 network may return float64)."""
    dtypes = [x.dtype for x in problem.inputs]
    dtypes += [output.dtype for output in outputs if output.is_floating_point()]
    return max(tensors.eps, *(torch.finfo(dtype).eps for dtype in dtypes))


def _gap_over_tolerance(first: Tensor, later: Tensor, eps: float) -> float | None:
    """The largest gap between the same rows' outputs ``first`` and ``later`` among those
    beyond the probe's tolerance, or None when every row is within it."""
    first, later = first.double(), later.double()
    gap = (first - later).abs()
    size = first.abs()
    if not all_finite(gap):
        # Compare the finite outputs; the same infinity, or nan in both, is no change.
        finite = torch.isfinite(first) & torch.isfinite(later)
        same = (first == later) | (first.isnan() & later.isnan())
        gap = torch.where(finite, gap, torch.where(same, 0.0, float("inf")))
        size = torch.where(finite, size, 0.0)
    # Batched kernels may round differently with other partners, never by more than this,
    # in the least precise dtype the model computes in. Each row is measured against its
    # own size, but at least the rows' median one: one row with a huge output leaves the
    # others' tolerance as it was, and a row near zero (large terms that cancel) keeps the
    # room its peers have.
    tolerance = eps ** 0.5 * (1.0 + torch.maximum(size, size.median()))
    over = gap > tolerance
    return float(gap[over].max()) if bool(over.any()) else None


def _largest_change(selected: Tensor, probe: _ProbePoints) -> float:
    """The largest change of a probed row's output between batch one and the later
    batches; nan where an output is nan. Through numpy where it reads the outputs: a few
    small torch operations cost more than the comparison."""
    array = numpy_view(selected)
    if array is None:
        first, later = selected[probe.first_at].double(), selected[probe.later_at].double()
        return float((first - later).abs().max())
    with np.errstate(invalid="ignore", over="ignore"):
        first = array[: probe.first_at.shape[0]].astype(np.float64)
        return float(np.abs(first - array[probe.later_numpy]).max())


def _draws_on_every_call(states: list[Tensor | None]) -> bool:
    """Whether the generator moved on at each of the probe's calls (``states``: before
    them and after each). A model that seeds the generator itself, or draws once (a lazy
    layer's first weights, a projection made at the first call), leaves the same state
    after every call: its outputs do not change from call to call."""
    if states[0] is None or torch.equal(states[0], states[-1]):
        return False
    return not all(torch.equal(states[1], state) for state in states[2:])


def _same_state(first: Tensor, second: Tensor) -> bool:
    """Whether two generator states are equal: byte for byte, through numpy on a CPU,
    where ``torch.equal`` costs several times more."""
    if first.device.type == "cpu" and second.device.type == "cpu":
        return first.numpy().tobytes() == second.numpy().tobytes()
    return torch.equal(first, second)


def _generator_state(device: torch.device) -> Tensor | None:
    """The state of the random number generator the model would draw from on ``device``."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


@dataclass(frozen=True)
class ModelTensors:
    """What the row-coupling probe needs to know of the model's parameters and buffers."""

    eps: float  # the largest machine epsilon among them; float32's for a plain function


def model_tensors(forward_func: Callable[..., Tensor]) -> ModelTensors:
    """``ModelTensors`` of the model (a plain function hides its tensors: float32 is
    assumed inside at least)."""
    module = module_of(forward_func)
    if module is None:
        return _PLAIN_FUNCTION
    return _tensor_facts(itertools.chain(module.parameters(), module.buffers()))


_PLAIN_FUNCTION = ModelTensors(torch.finfo(torch.float32).eps)


def _tensor_facts(tensors: Iterable[Tensor]) -> ModelTensors:
    dtypes = {tensor.dtype for tensor in tensors if tensor.is_floating_point()}
    return ModelTensors(max((torch.finfo(dtype).eps for dtype in dtypes), default=0.0))


def _uninitialized(tensor: Tensor) -> bool:
    """A lazy layer's parameter before its first call: it has no shape or data yet."""
    return isinstance(tensor, nn.parameter.UninitializedTensorMixin)


def check_model_device(forward_func: Callable[..., Tensor], device: torch.device
                       ) -> ModelTensors:
    """Raise ``ArgumentError`` when the model's parameters are not on the inputs' device,
    or were made inside ``torch.inference_mode()`` (autograd cannot use those).

    Returns the ``ModelTensors`` the row-coupling probe needs, read on the same pass.
    """
    module = module_of(forward_func)
    if module is None:
        return _PLAIN_FUNCTION
    named = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in named:
        if _uninitialized(tensor):
            continue  # a lazy layer's, made at its first call
        if tensor.is_inference():
            raise ArgumentError(
                f"the model's tensor {name} was made inside torch.inference_mode(), where "
                "autograd cannot follow it: create or load the model outside inference mode"
            )
        if tensor.device != device and not _same_device(tensor.device, device):
            raise ArgumentError(
                f"the model is on {tensor.device} (parameter {name}) but the inputs are on "
                f"{device}: move one to the other, e.g. model.to({str(device)!r})"
            )
    return _tensor_facts(tensor for _, tensor in named)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when 0 is the current one.
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def convergence_delta(
    forward_func: Callable[..., Tensor],
    problem: PathProblem,
    attributions: tuple[Tensor, ...],
    chunk_points: int,
) -> Tensor:
    """sum(attributions) - (F(x) - F(baseline)) per (baseline, row), shape (B, N)."""
    # reshape, not flatten: inputs may be (N,) with no feature dimensions.
    attribution_sum = sum(a.double().reshape(*a.shape[:2], -1).sum(-1) for a in attributions)
    return attribution_sum - output_gap(forward_func, problem, chunk_points)


def output_gap(
    forward_func: Callable[..., Tensor], problem: PathProblem, chunk_points: int
) -> Tensor:
    """F(x) - F(baseline) of the target output per (baseline, row): (B, N) float64."""
    device = problem.inputs[0].device
    n_pairs = problem.n_baselines * problem.n_rows
    if problem.targets_checked and all(base.shape[1] == 1 for base in problem.baselines):
        return _shared_output_gap(forward_func, problem, chunk_points)
    ends = torch.empty(2, n_pairs, dtype=torch.float64, device=device)

    with torch.no_grad():
        for end, alpha in enumerate((1.0, 0.0)):
            for start in range(0, n_pairs, chunk_points):
                pair = torch.arange(start, min(start + chunk_points, n_pairs), device=device)
                alphas = torch.full((len(pair),), alpha, dtype=torch.float64, device=device)
                rows = pair % problem.n_rows
                points = problem.path_points(pair, alphas)
                output = _forward(forward_func, points, problem.args_for(rows))
                ends[end, pair] = problem.select(output, rows).double()

    ends = ends.view(2, problem.n_baselines, problem.n_rows)
    refuse_non_finite_ends(ends[0], ends[1])
    return ends[0] - ends[1]


def refuse_non_finite_ends(at_inputs: Tensor | None, at_baselines: Tensor | None,
                           baseline: str = "its baseline") -> None:
    """Raise ``NonFiniteOutputError`` where the model's output at an input (``at_inputs``)
    or at its baseline (``at_baselines``), each (B, N) or None when not at hand, is nan or
    inf.

    Quadrature nodes need not reach the path's ends (Gauss-Legendre's never do), so the
    attributions can be finite there; F(x) - F(baseline), which they must add up to, is
    not, and refining the steps (``delta_tolerance``) would only run to ``max_steps``.
    """
    for outputs, end in ((at_inputs, "at the input itself"), (at_baselines, f"at {baseline}")):
        if outputs is None or all_finite(outputs):
            continue
        rows = torch.unique((~torch.isfinite(outputs)).nonzero()[:, 1]).tolist()
        raise NonFiniteOutputError(
            f"the model returned non-finite outputs (nan or inf) {end}, an end of the "
            f"path, for row(s) {shown_rows(rows)}: F(x) - F(baseline), which the "
            "attributions add up to, is not finite; check those rows and their baselines"
        )


def _shared_output_gap(
    forward_func: Callable[..., Tensor], problem: PathProblem, chunk_points: int
) -> Tensor:
    """``output_gap`` with F(x) once per row and F(b) once per shared baseline kind.

    Only for problems whose rows the probe found independent (one input, no extra
    arguments): a row's output then does not depend on its batch, so the B x N pairs
    need B + N points, not 2 B N. The B baselines come first, then the rows, in chunks of
    ``chunk_points``: the baselines never make a batch of their own (a model that
    squeezes its output would fail on a batch of one), and many baselines stay within
    the chunk size.
    """
    x, base = problem.inputs[0], problem.baselines[0]
    n_baselines, n_rows = problem.n_baselines, problem.n_rows
    device = x.device
    kinds = base[:, 0]  # (B, *F)
    at_rows = torch.empty(n_rows, dtype=torch.float64, device=device)
    kind_outputs = []
    with torch.no_grad():
        for start in range(0, n_baselines + n_rows, chunk_points):
            stop = min(start + chunk_points, n_baselines + n_rows)
            first_row, last_row = max(start - n_baselines, 0), max(stop - n_baselines, 0)
            points = torch.cat([kinds[start:stop], x[first_row:last_row]])
            output = _forward(forward_func, (points,), ())
            n_kinds = max(min(stop, n_baselines) - start, 0)
            kind_outputs.append(output[:n_kinds])
            if last_row > first_row:
                rows = torch.arange(first_row, last_row, device=device)
                at_rows[first_row:last_row] = problem.select(output[n_kinds:], rows).double()
        outputs = torch.cat(kind_outputs)  # (B, *outputs)
        at_kinds = torch.empty(n_baselines, n_rows, dtype=torch.float64, device=device)
        every_row = torch.arange(n_rows, device=device)
        for kind in range(n_baselines):
            # Each row's target, read from the kind's outputs (expanded: no copy).
            shared = outputs[kind].expand(n_rows, *outputs.shape[1:])
            at_kinds[kind] = problem.select(shared, every_row).double()
    refuse_non_finite_ends(at_rows.expand(n_baselines, n_rows), at_kinds)
    return at_rows.unsqueeze(0) - at_kinds


def make_problem(
    inputs: TensorOrTuple,
    baselines: BaselineArg,
    target: TargetArg,
    additional_forward_args: Any,
) -> PathProblem:
    """Check the arguments and lay them out as a ``PathProblem``; raise ``ArgumentError``."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # Whatever the transform wraps (an input, a baseline, a weight the model closes
        # over), the engine's own autograd and numpy reads cannot run under it.
        raise ArgumentError(
            "the engine is called inside a torch.func transform (vmap, grad, jacrev, ...): "
            "it computes its own gradients, so call it outside the transform"
        )
    input_tuple = _as_input_tuple(inputs)
    baseline_tuple = _as_baseline_tuple(baselines, len(input_tuple))
    n_rows = input_tuple[0].shape[0]

    laid_out = tuple(
        _lay_out_baseline(base, x, i, len(input_tuple) > 1)
        for i, (base, x) in enumerate(zip(baseline_tuple, input_tuple))
    )
    kinds = {base.shape[0] for base in laid_out}
    if 0 in kinds:
        raise ArgumentError("baselines hold no baseline (B = 0): expected at least one")
    if len(kinds) > 1:
        raise ArgumentError(f"every input needs the same number of baselines, got {sorted(kinds)}")
    # Before the expansion below, so that a shared baseline is not named by a row.
    _refuse_non_finite_values(input_tuple, laid_out, isinstance(inputs, tuple))
    refuse_overflowing_differences(input_tuple, laid_out, isinstance(inputs, tuple))
    if len({base.shape[1] for base in laid_out}) > 1:
        # Mixed per-row and shared baselines: expand the shared ones so indexing is uniform.
        laid_out = tuple(base.expand(base.shape[0], n_rows, *base.shape[2:]) for base in laid_out)
    targets = _as_targets(target, n_rows, input_tuple[0].device)
    return PathProblem(
        inputs=input_tuple,
        baselines=laid_out,
        targets=targets,
        forward_args=_as_forward_args(additional_forward_args),
        target_range=_target_range(targets),
    )


def _refuse_non_finite_values(inputs: tuple[Tensor, ...], baselines: tuple[Tensor, ...],
                              many: bool) -> None:
    """Refuse nan or inf in the inputs or baselines, naming the rows (or baseline kinds).

    A path to or from an infinite point has no finite gradient integral: a saturating
    layer (tanh) can keep the outputs finite, and the attribution would come back nan
    (0 x inf) without a word.
    """
    for i, (x, base) in enumerate(zip(inputs, baselines)):
        if all_finite(x) and all_finite(base):
            continue
        name = f"inputs[{i}]" if many else "inputs"
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if not bool(finite.all()):
            shown = shown_rows((~finite).nonzero()[:, 0].tolist())
            raise ArgumentError(
                f"{name} hold nan or inf in row(s) {shown}: attributions need finite "
                "inputs (drop or impute those rows)"
            )
        finite = torch.isfinite(base.reshape(*base.shape[:2], -1)).all(2)
        if not bool(finite.all()):
            kind, row = (int(v) for v in (~finite).nonzero()[0])
            # One kind (always so through the Captum-style class): only the row is news.
            where = [f"baseline kind {kind}"] if base.shape[0] > 1 else []
            where += [f"row {row}"] if base.shape[1] > 1 else []
            shown = f" ({', '.join(where)})" if where else ""
            name = f"baselines[{i}]" if many else "baselines"
            raise ArgumentError(f"{name} hold nan or inf{shown}: baselines must be finite")


def refuse_overflowing_differences(
    inputs: tuple[Tensor, ...], baselines: tuple[Tensor, ...], many: bool,
    name: str = "baselines",
) -> None:
    """Refuse inputs (N, *F) and baselines (B, N or 1, *F) whose difference overflows their
    dtype, naming the rows: the path b + a (x - b) cannot be formed (3e38 against -3e38 in
    float32, 40,000 against -40,000 in float16).

    A saturating model keeps the outputs on such a path finite, so before, the attribution
    came back nan, or finite and wrong where the gradient at the infinite points is 0, as
    Captum's do. |x| + |b| within the dtype's range rules this out without forming the
    differences; only then are they formed, one baseline kind at a time.
    """
    for i, (x, base) in enumerate(zip(inputs, baselines)):
        largest = torch.finfo(x.dtype).max if x.is_floating_point() else None
        if largest is None or _largest_magnitude(x) + _largest_magnitude(base) <= largest:
            continue
        rows: set[int] = set()
        for kind in base:
            finite = torch.isfinite((x - kind).reshape(x.shape[0], -1)).all(1)
            rows.update((~finite).nonzero()[:, 0].tolist())
        if rows:
            which = f"inputs[{i}] minus {name}[{i}]" if many else f"inputs minus {name}"
            raise ArgumentError(
                f"{which} overflow {_dtype_name(x.dtype)} (largest value "
                f"{_shown_largest(x.dtype)}) in row(s) {shown_rows(sorted(rows))}: the path "
                f"b + a (x - b) cannot be formed in that dtype; {_remedy(x.dtype, name)}"
            )


def _largest_magnitude(values: Tensor) -> float:
    """max |values| as a Python float (0 for an empty tensor); through numpy on a CPU."""
    if values.numel() == 0:
        return 0.0
    array = numpy_view(values)
    if array is not None:
        return float(np.abs(array).max())
    return float(values.detach().abs().max())


def _remedy(dtype: torch.dtype, name: str) -> str:
    """What to do about values beyond ``dtype``'s range."""
    wider = {torch.float16: "float32", torch.bfloat16: "float32", torch.float32: "float64"}
    if dtype in wider:
        return f"pass the inputs and {name} as {wider[dtype]}, or scale the features"
    return "scale the features"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shown_largest(dtype: torch.dtype) -> str:
    largest = torch.finfo(dtype).max
    return f"{largest:,.0f}" if largest < 1e6 else f"{largest:.3g}"


def _as_input_tuple(inputs: TensorOrTuple) -> tuple[Tensor, ...]:
    input_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    if len(input_tuple) == 0:
        raise ArgumentError("inputs is an empty tuple: expected at least one Tensor")
    for i, x in enumerate(input_tuple):
        name = f"inputs[{i}]" if isinstance(inputs, tuple) else "inputs"
        if not isinstance(x, Tensor):
            raise ArgumentError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _refuse_unreadable(x, name)
        if not x.is_floating_point():
            raise ArgumentError(
                f"{name} has dtype {x.dtype}: gradients need a floating point dtype "
                "(convert with .float())"
            )
        if x.dim() == 0 or x.shape[0] == 0:
            raise ArgumentError(f"{name} has shape {tuple(x.shape)}: expected (N, *features)")
        if x.numel() == 0:
            raise ArgumentError(
                f"{name} has shape {tuple(x.shape)}: every row needs at least one feature"
            )
    first = input_tuple[0]
    for i, x in enumerate(input_tuple[1:], start=1):
        if x.shape[0] != first.shape[0]:
            raise ArgumentError(
                f"inputs[{i}] has {x.shape[0]} rows but inputs[0] has {first.shape[0]}"
            )
        if x.device != first.device:
            raise ArgumentError(f"inputs[{i}] is on {x.device} but inputs[0] is on {first.device}")
    return tuple(x.detach() for x in input_tuple)


def _refuse_unreadable(tensor: Tensor, name: str) -> None:
    """Refuse tensors whose values the engine cannot read as one dense array: sparse and
    other non-strided layouts, nested and quantized tensors, 8-bit floats (torch has no
    isfinite for them), meta tensors (no values), tensor subclasses that dispatch every
    operation themselves (MaskedTensor, DTensor, FakeTensor) and the wrapped tensors of
    ``torch.func`` transforms."""
    if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        raise ArgumentError(
            f"{name} is a tensor inside a torch.func transform (vmap, grad, ...): the engine "
            "computes its own gradients, so call it outside the transform"
        )
    if type(tensor).__torch_dispatch__ is not Tensor.__torch_dispatch__:
        raise ArgumentError(
            f"{name} is a {type(tensor).__name__}, a tensor subclass with its own operations: "
            "expected a plain tensor (for example its dense values)"
        )
    if tensor.is_nested:
        raise ArgumentError(f"{name} is a nested tensor: expected a dense one (pad it with "
                            ".to_padded_tensor(0))")
    if tensor.layout != torch.strided:
        layout = str(tensor.layout).removeprefix("torch.").lstrip("_")
        raise ArgumentError(
            f"{name} is a {layout} tensor: expected a dense one (convert with .to_dense())"
        )
    if tensor.is_quantized:
        raise ArgumentError(f"{name} is a quantized tensor: expected a float one "
                            "(convert with .dequantize())")
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits == 8:
        raise ArgumentError(f"{name} has dtype {tensor.dtype}: expected float16 or wider "
                            "(convert with .float())")
    if tensor.device.type == "meta":
        raise ArgumentError(f"{name} is on the meta device, which holds no values")


def _as_baseline_tuple(baselines: BaselineArg, n_inputs: int) -> tuple[Any, ...]:
    if baselines is None:
        return (0.0,) * n_inputs
    baseline_tuple = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(baseline_tuple) != n_inputs:
        raise ArgumentError(
            f"got {len(baseline_tuple)} baselines for {n_inputs} inputs: expected one per input"
        )
    return baseline_tuple


def _lay_out_baseline(base: Any, x: Tensor, index: int, many: bool) -> Tensor:
    """(B, *F) -> (B, 1, *F); (B, N, *F) stays; a scalar -> (1, 1, *F)."""
    name = f"baselines[{index}]" if many else "baselines"
    features = tuple(x.shape[1:])
    if isinstance(base, (int, float)) and not isinstance(base, bool):
        try:
            value = float(base)
        except OverflowError:  # an int beyond every float
            value = math.inf
        # nan and inf themselves are named as such with the other non-finite baselines.
        explicit = isinstance(base, float) and not math.isfinite(base)
        if not explicit and abs(value) > torch.finfo(x.dtype).max:
            shown = repr(base) if len(repr(base)) <= 24 else f"{float(value):.3g}"
            if math.isinf(value):
                shown = f"an integer of {len(str(abs(base)))} digits"
            _refuse_beyond_range(f"{name} {shown} is beyond", x.dtype)
        return torch.full((1, 1, *features), value, dtype=x.dtype, device=x.device)
    if not isinstance(base, Tensor):
        raise ArgumentError(f"{name} must be a Tensor or a number, got {type(base).__name__}")
    _refuse_unreadable(base, name)
    _check_baseline_dtype(base, x, name, f"inputs[{index}]" if many else "inputs")
    if not base.is_floating_point() and base.numel() \
            and float(base.detach().double().abs().max()) > torch.finfo(x.dtype).max:
        # An integer converts to inf beyond the dtype, which would be blamed on the user as
        # "nan or inf" below.
        _refuse_beyond_range(f"{name} hold integers beyond", x.dtype)
    base = base.detach().to(device=x.device, dtype=x.dtype)

    shape = tuple(base.shape)
    if shape[1:] == features and len(shape) == x.dim():
        return base.unsqueeze(1)
    if len(shape) == x.dim() + 1 and shape[1] == x.shape[0] and shape[2:] == features:
        return base
    raise ArgumentError(
        f"{name} has shape {shape}: expected (B, {', '.join(map(str, features))}) for B "
        f"baseline kinds or (B, {x.shape[0]}, {', '.join(map(str, features))}) per row"
    )


def _refuse_beyond_range(what: str, dtype: torch.dtype) -> NoReturn:
    raise ArgumentError(
        f"{what} the inputs' {_dtype_name(dtype)} range (largest value "
        f"{_shown_largest(dtype)}): baselines take the inputs' dtype; "
        f"{_remedy(dtype, 'baselines')}"
    )


def _check_baseline_dtype(base: Tensor, x: Tensor, name: str, input_name: str) -> None:
    # Integer baselines convert exactly (Captum accepts them too); another floating dtype
    # would silently round the path, so it is refused like Captum's model would refuse it.
    if base.dtype == torch.bool or base.is_complex():
        raise ArgumentError(f"{name} has dtype {base.dtype}: expected {x.dtype} like {input_name}")
    if base.is_floating_point() and base.dtype != x.dtype:
        raise ArgumentError(
            f"{name} has dtype {base.dtype} but {input_name} has {x.dtype}: convert the "
            f"baselines with .to({x.dtype})"
        )


def _as_targets(target: TargetArg, n_rows: int, device: torch.device) -> Any:
    """None, a tuple index for every row, or a (N, k) long tensor: one index per row."""
    if target is None or (isinstance(target, tuple) and not target):
        return None  # Captum reads () as no index: the output itself, as for None
    if isinstance(target, (bool, str, bytes, float)):
        raise ArgumentError(f"target must be an int, a tuple or one int per row, got {target!r}")
    if isinstance(target, int):
        return (target,)
    if isinstance(target, list) and not target:
        # torch reads [] as an empty float tensor, whose dtype would be named instead.
        raise ArgumentError("target is an empty list: expected an int, a tuple, or one target"
                            " per row")
    if isinstance(target, tuple) and all(_is_index(t) for t in target) and len(target) > 0:
        return tuple(int(t) for t in target)
    if isinstance(target, list) and target and all(isinstance(t, tuple) for t in target):
        # Captum's list of tuples: one multi-dimensional index per row.
        if len({len(t) for t in target}) != 1 or not all(_is_index(i) for t in target for i in t):
            raise ArgumentError("target is a list of tuples of different lengths or non-integers")
        target = torch.tensor(target, dtype=torch.long)
    per_row = torch.as_tensor(target) if not isinstance(target, Tensor) else target
    if per_row.is_floating_point() or per_row.is_complex() or per_row.dtype == torch.bool:
        raise ArgumentError(f"target has dtype {per_row.dtype}: expected integer indices")
    if per_row.numel() == 1 and per_row.dim() <= 1:
        return (int(per_row.reshape(())),)
    if per_row.dim() not in (1, 2) or per_row.shape[0] != n_rows:
        raise ArgumentError(
            f"target has shape {tuple(per_row.shape)}: expected an int, a tuple, or {n_rows} "
            "targets, one per row"
        )
    if per_row.dim() == 1:
        per_row = per_row.unsqueeze(1)
    return per_row.to(device=device, dtype=torch.long)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target_range(targets: Any) -> tuple[tuple[int, int], ...]:
    if targets is None:
        return ()
    if isinstance(targets, tuple):
        return tuple((t, t) for t in targets)
    low, high = targets.amin(0).tolist(), targets.amax(0).tolist()
    return tuple(zip(low, high))


def _as_forward_args(additional_forward_args: Any) -> tuple[Any, ...]:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)
