"""Check the engine against Captum's IntegratedGradients on the same job."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

__all__ = ["KINK_PAIRS_FRACTION", "ValidationReport", "captum_attributions",
           "compare_with_captum", "pairs_beyond", "relative_error", "synchronize"]

log = logging.getLogger(__name__)


# A path point within rounding of a kink moves the (baseline, row) pair it lies on, and
# no other: its size depends on the node's weight (a tenth of the path at 10 steps) and
# the slopes, so it is not bounded. What sets it apart from an error in the engine, which
# moves most pairs, is how few pairs it moves: at most this fraction of them (at least
# one) may be off for computing the attributions again in float64 to be the remedy.
KINK_PAIRS_FRACTION = 0.01


@dataclass(frozen=True)
class ValidationReport:
    """How far the engine is from Captum, and how long each took, on one job.

    ``max_rel_error`` is the largest ||engine - captum|| / ||captum|| over the baselines
    (Frobenius norms over rows and features of one baseline). When it exceeds the
    tolerance, both are measured against Captum run in float64 (``engine_vs_float64``,
    ``captum_vs_float64``): a path point within rounding of a ReLU-like kink can take the
    other slope in either float32 run, and the float64 run tells whose rounding it was.
    ``pairs_off`` counts the (baseline, row) pairs where the engine is off float64 Captum
    by more than the tolerance of the pair's own size. When they are few (see
    ``KINK_PAIRS_FRACTION``) and the caller gave a way to compute the attributions again
    in float64, ``recomputed_vs_float64`` is how far those are from float64 Captum.
    """

    max_rel_error: float
    n_rows: int
    n_baselines: int
    n_steps: int
    method: str
    dtype: str
    engine_seconds: float
    captum_seconds: float
    tolerance: float = 1e-5
    engine_vs_float64: float | None = None
    captum_vs_float64: float | None = None
    pairs_off: int | None = None
    recomputed_vs_float64: float | None = None

    @property
    def speedup(self) -> float:
        return self.captum_seconds / self.engine_seconds

    @property
    def engine_error(self) -> float:
        """The engine's error: against float64 Captum when that was run, else against Captum."""
        return self.max_rel_error if self.engine_vs_float64 is None else self.engine_vs_float64

    @property
    def tolerance_text(self) -> str:
        """The tolerance as people write it: 1e-5, not 1e-05."""
        return f"{self.tolerance:g}".replace("e-0", "e-").replace("e+0", "e+")

    @property
    def kink_pairs(self) -> int:
        """The most pairs off float64 that a kink's rounding explains."""
        return kink_pairs(self.n_rows * self.n_baselines)

    @property
    def recomputed(self) -> bool:
        """Whether the run's attributions are the float64 ones computed again."""
        return self.recomputed_vs_float64 is not None

    @property
    def passed(self) -> bool:
        """Whether the attributions the run keeps are within the tolerance: the engine's,
        or the float64 ones computed again when the engine's were not."""
        kept = self.recomputed_vs_float64 if self.recomputed else self.engine_error
        return kept <= self.tolerance

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "speedup": self.speedup}


def captum_attributions(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    baselines: Tensor,
    *,
    target: int | None,
    n_steps: int,
    method: str,
) -> Tensor:
    """Captum at its best on this layout: one call per baseline over all rows -> (B, N, *F)."""
    ig = IntegratedGradients(forward_func)
    return torch.stack(
        [
            ig.attribute(inputs, base.unsqueeze(0), target=target, n_steps=n_steps, method=method)
            for base in baselines
        ]
    )


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device; nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_with_captum(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    baselines: Tensor,
    engine_attributions: Tensor,
    engine_seconds: float,
    *,
    target: int | None = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    tolerance: float = 1e-5,
    recompute: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
) -> ValidationReport:
    """Run Captum on the job the engine did and compare the attributions.

    Above ``tolerance``, and for a float32 (or half) ``nn.Module``, both results are also
    compared with Captum on a float64 copy of the model. When the engine's result is the
    one further than ``tolerance`` from it, in few (baseline, row) pairs (a kink's
    rounding, not an error; see ``KINK_PAIRS_FRACTION``), ``recompute(model, inputs,
    baselines)`` (if given) is called with the float64 copy and float64 tensors, and what
    it returns is compared with float64 Captum too: a caller that keeps those
    attributions keeps results within rounding of float64 instead of failing.
    """
    synchronize(inputs.device)
    started = time.perf_counter()
    reference = captum_attributions(
        forward_func, inputs, baselines, target=target, n_steps=n_steps, method=method
    )
    synchronize(inputs.device)  # CUDA runs asynchronously: time the work, not the launch
    captum_seconds = time.perf_counter() - started

    max_rel_error = relative_error(engine_attributions, reference)
    engine_vs_float64 = captum_vs_float64 = recomputed_vs_float64 = pairs_off = None
    if max_rel_error > tolerance and isinstance(forward_func, nn.Module) \
            and inputs.dtype != torch.float64:
        exact = captum_attributions(
            copy.deepcopy(forward_func).double(), inputs.double(), baselines.double(),
            target=target, n_steps=n_steps, method=method,
        )
        engine_vs_float64 = relative_error(engine_attributions, exact)
        captum_vs_float64 = relative_error(reference, exact)
        log.info("engine vs float64 Captum: %.2e; Captum vs float64 Captum: %.2e",
                 engine_vs_float64, captum_vs_float64)
        pairs_off = pairs_beyond(engine_attributions, exact, tolerance)
        n_pairs = exact.shape[0] * exact.shape[1]
        log.info("engine vs float64 Captum: %d of %d pairs off", pairs_off, n_pairs)
        if engine_vs_float64 > tolerance and pairs_off <= kink_pairs(n_pairs) \
                and recompute is not None:
            recomputed_vs_float64 = relative_error(
                recompute(copy.deepcopy(forward_func).double(), inputs.double(),
                          baselines.double()),
                exact,
            )
            log.info("engine in float64 vs float64 Captum: %.2e", recomputed_vs_float64)
    report = ValidationReport(
        max_rel_error=max_rel_error,
        n_rows=inputs.shape[0],
        n_baselines=baselines.shape[0],
        n_steps=n_steps,
        method=method,
        dtype=str(inputs.dtype).removeprefix("torch."),
        engine_seconds=engine_seconds,
        captum_seconds=captum_seconds,
        tolerance=tolerance,
        engine_vs_float64=engine_vs_float64,
        captum_vs_float64=captum_vs_float64,
        pairs_off=pairs_off,
        recomputed_vs_float64=recomputed_vs_float64,
    )
    log.info(
        "engine vs Captum: max relative error %.2e, %.4fs vs %.4fs",
        report.max_rel_error, engine_seconds, captum_seconds,
    )
    return report


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """The largest ||actual - expected|| / ||expected|| over the first dimension (baselines)."""
    difference = (actual.double() - expected.double()).flatten(1).norm(dim=1)
    scale = expected.double().flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float((difference / scale).max())


def kink_pairs(n_pairs: int) -> int:
    """The most of ``n_pairs`` (baseline, row) pairs a kink's rounding explains."""
    return max(1, int(KINK_PAIRS_FRACTION * n_pairs))


def pairs_beyond(actual: Tensor, expected: Tensor, tolerance: float) -> int:
    """How many (baseline, row) pairs of (B, N, *F) attributions are further than
    ``tolerance`` of their own size apart.

    A pair's size is the norm of its expected attributions, with a floor of 1e-3 of the
    pairs' root mean square: a row equal to its baseline has no attributions, and float32
    rounding alone would put it off.
    """
    difference = (actual.double() - expected.double()).flatten(2).norm(dim=2)
    size = expected.double().flatten(2).norm(dim=2)
    floor = 1e-3 * size.square().mean(dim=1, keepdim=True).sqrt()
    return int((difference > tolerance * torch.maximum(size, floor)).sum())
