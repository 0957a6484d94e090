"""Check the engine against Captum's IntegratedGradients on the same job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from captum.attr import IntegratedGradients
from torch import Tensor

__all__ = ["ValidationReport", "captum_attributions", "compare_with_captum"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationReport:
    """How far the engine is from Captum, and how long each took, on one job.

    ``max_rel_error`` is the largest ||engine - captum|| / ||captum|| over the baselines
    (Frobenius norms over rows and features of one baseline).
    """

    max_rel_error: float
    n_rows: int
    n_baselines: int
    n_steps: int
    method: str
    dtype: str
    engine_seconds: float
    captum_seconds: float

    @property
    def speedup(self) -> float:
        return self.captum_seconds / self.engine_seconds

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
) -> ValidationReport:
    """Run Captum on the job the engine did and compare the attributions."""
    started = time.perf_counter()
    reference = captum_attributions(
        forward_func, inputs, baselines, target=target, n_steps=n_steps, method=method
    )
    captum_seconds = time.perf_counter() - started

    difference = (engine_attributions.double() - reference.double()).flatten(1).norm(dim=1)
    scale = reference.double().flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    report = ValidationReport(
        max_rel_error=float((difference / scale).max()),
        n_rows=inputs.shape[0],
        n_baselines=baselines.shape[0],
        n_steps=n_steps,
        method=method,
        dtype=str(inputs.dtype).removeprefix("torch."),
        engine_seconds=engine_seconds,
        captum_seconds=captum_seconds,
    )
    log.info(
        "engine vs Captum: max relative error %.2e, %.4fs vs %.4fs",
        report.max_rel_error, engine_seconds, captum_seconds,
    )
    return report
