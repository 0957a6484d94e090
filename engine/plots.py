"""The article's pictures: a heatmap of the mean attribution per feature, per baseline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

__all__ = ["attribution_heatmap"]

# Red for features that push the prediction down, green for those that push it up.
DIVERGING = "RdYlGn"


def attribution_heatmap(
    mean_attribution: np.ndarray,
    feature_names: Sequence[str],
    path: str | Path,
    *,
    title: str,
) -> None:
    """One annotated column of mean attributions per feature, diverging around zero."""
    values = np.asarray(mean_attribution, dtype=float).reshape(-1, 1)
    # Symmetric limits keep zero at the neutral colour whatever the signs present.
    limit = max(float(np.abs(values).max()), 1e-12)

    figure, axes = plt.subplots(figsize=(3.6, 3.8), layout="constrained")
    image = axes.imshow(
        values, cmap=DIVERGING, norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto"
    )
    for index, value in enumerate(values[:, 0]):
        axes.text(0, index, f"{value:+.3f}", ha="center", va="center", fontsize=10)
    axes.set_yticks(range(len(feature_names)), labels=list(feature_names))
    axes.set_xticks([0], labels=["mean attribution"])
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
