"""The article's four baselines: feature mean, uniform random, zeros and ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import ArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["BASELINE_KINDS", "make_baselines"]

# The names the article's tables use, in its order.
BASELINE_KINDS = ("mean-base", "random-base", "zero-base", "one-base")


def make_baselines(
    kinds: tuple[str, ...],
    feature_mean: torch.Tensor,
    *,
    seed: int,
) -> torch.Tensor:
    """One baseline row per kind, shape (len(kinds), F), in ``feature_mean``'s dtype.

    ``random-base`` is drawn uniformly from [0, 1) (the range of min-max normalised
    features) with a generator seeded by ``seed``, so a run is repeatable.
    """
    # Imported here: the command line reads BASELINE_KINDS before torch has loaded.
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for kind in kinds:
        if kind == "mean-base":
            rows.append(feature_mean)
        elif kind == "random-base":
            rows.append(torch.rand(feature_mean.shape, generator=generator))
        elif kind == "zero-base":
            rows.append(torch.zeros_like(feature_mean))
        elif kind == "one-base":
            rows.append(torch.ones_like(feature_mean))
        else:
            raise ArgumentError(
                f"unknown baseline {kind!r}: expected one of {', '.join(BASELINE_KINDS)}"
            )
    return torch.stack([row.to(feature_mean.dtype) for row in rows])
