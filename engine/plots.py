"""The article's pictures: heatmaps per baseline, baselines side by side, a GIF over the
training epochs, and one passenger's attributions with a feature flipped.

Every colour scale is red (pushes survival down) to green (pushes it up), centred on
zero, and symmetric so that equal magnitudes get equal intensity whatever their sign.
The finite values set it; a nan cell is grey and reads "nan". Cells are written with
three decimals; when the largest magnitude is below 0.01 (or from 1000 up) they are
written in units of a power of ten, which the colour bar names and reads in too.
Names and titles are drawn as written: a "$" is a dollar sign, never mathtext.
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image  # noqa: E402

from engine.errors import ArgumentError  # noqa: E402

__all__ = [
    "attribution_gif",
    "attribution_heatmap",
    "baseline_comparison",
    "passenger_comparison",
]

# Red for features that push the prediction down, green for those that push it up; a nan
# cell is grey, outside the scale.
DIVERGING = "RdYlGn"
NAN_GREY = "0.75"
DPI = 110
TITLE_MARGIN = 0.15  # inches of white left and right of the widest title
SMALLEST_LIMIT = 1e-12  # colour limit of all-zero values: a scale must not divide by 0


def _literal_text(draw: Callable) -> Callable:
    """Draw every name and title as written: a "$" in a feature's name is a dollar sign,
    not the start of matplotlib's mathtext (which fails on an unmatched one)."""

    @functools.wraps(draw)
    def literal(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return literal


@_literal_text
def attribution_heatmap(
    mean_attribution: np.ndarray,
    feature_names: Sequence[str],
    path: str | Path,
    *,
    title: str,
) -> None:
    """One annotated column of mean attributions per feature, diverging around zero.

    Parameters
    ----------
    mean_attribution
        ``(F,)`` mean attribution of each feature for one baseline.
    feature_names
        ``F`` row labels.
    path
        The PNG to write.
    title
        Names the baseline and the epoch.
    """
    values = np.asarray(mean_attribution, dtype=float).reshape(-1, 1)
    _check_names(values.shape[0], feature_names, "feature")
    _refuse_empty("mean_attribution", values.shape[:1], ("features",))

    figure, axes = plt.subplots(figsize=(3.6, 3.8), layout="constrained")
    image = _matrix(axes, values, feature_names, ["mean attribution"], _limit(values))
    _title(figure, title, fontsize=10)
    _colour_bar(figure, image, axes, label="", shrink=0.8)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


@_literal_text
def baseline_comparison(
    mean_attribution: np.ndarray,
    baseline_names: Sequence[str],
    feature_names: Sequence[str],
    path: str | Path,
    *,
    title: str,
) -> None:
    """All baselines side by side on one shared colour scale: a column per baseline.

    Parameters
    ----------
    mean_attribution
        ``(B, F)`` mean attribution per baseline and feature.
    baseline_names, feature_names
        Column and row labels.
    path
        The PNG to write.
    title
        Names the epoch (and anything else the reader needs).
    """
    values = _checked_matrix(mean_attribution, baseline_names, feature_names)
    figure = _comparison_figure(values, baseline_names, feature_names, _limit(values), title)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


@_literal_text
def attribution_gif(
    mean_by_epoch: np.ndarray,
    epochs: Sequence[int],
    baseline_names: Sequence[str],
    feature_names: Sequence[str],
    path: str | Path,
    *,
    frame_ms: int = 600,
    last_frame_ms: int = 2400,
) -> int:
    """An animated GIF of the side-by-side heatmaps, one frame per snapshot.

    The colour scale is fixed over all frames so that a colour means the same value in
    every frame; epoch 0 is titled "before training", and an epoch with more than one
    snapshot names the snapshot too, so that every snapshot keeps its frame.

    Parameters
    ----------
    mean_by_epoch
        ``(E, B, F)`` mean attribution per snapshot, baseline and feature.
    epochs
        ``E`` epoch numbers, 0 for the model before training.
    baseline_names, feature_names
        Column and row labels.
    path
        The GIF to write.
    frame_ms, last_frame_ms
        How long each frame shows; the last one stays longer before the loop restarts.

    Returns
    -------
    int
        The number of frames written.
    """
    stacked = np.asarray(mean_by_epoch, dtype=float)
    if stacked.ndim != 3 or stacked.shape[0] != len(epochs):
        raise ArgumentError(
            f"mean_by_epoch must be (epochs, baselines, features) with {len(epochs)} epochs, "
            f"got shape {stacked.shape}"
        )
    _refuse_empty("mean_by_epoch", stacked.shape, ("epochs", "baselines", "features"))
    for frame in stacked:
        _checked_matrix(frame, baseline_names, feature_names)

    limit, titles = _limit(stacked), _frame_titles(epochs)
    frames = []
    for title, values in zip(titles, stacked):
        # Every frame is as wide as the widest title needs: a GIF has one size.
        figure = _comparison_figure(values, baseline_names, feature_names, limit, title,
                                    fit=titles)
        frames.append(_to_image(figure))
        plt.close(figure)

    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
    # An adaptive palette per frame keeps the colours true; the frames all differ at least
    # in their title, so Pillow keeps every one of them.
    palette = [frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for frame in frames]
    palette[0].save(
        path, format="GIF", save_all=True, append_images=palette[1:], duration=durations,
        loop=0, disposal=1,
    )
    return len(frames)


@_literal_text
def passenger_comparison(
    attributions: np.ndarray,
    probabilities: Sequence[float],
    labels: Sequence[str],
    baseline_names: Sequence[str],
    feature_names: Sequence[str],
    path: str | Path,
    *,
    title: str,
) -> None:
    """One passenger as is and with a feature changed: survival and attributions.

    The left panel shows the predicted survival probability of each version; one panel
    per baseline shows the attribution of every feature, the versions as paired bars.

    Parameters
    ----------
    attributions
        ``(V, B, F)`` attributions of ``V`` versions of the passenger (usually 2).
    probabilities
        ``V`` predicted survival probabilities.
    labels
        ``V`` legend labels, for example ``"as is (male)"`` and ``"Sex flipped (female)"``.
    baseline_names, feature_names
        Panel titles and bar labels.
    path
        The PNG to write.
    title
        The figure's title.
    """
    values = np.asarray(attributions, dtype=float)
    if values.ndim != 3 or not (len(probabilities) == len(labels) == values.shape[0]):
        raise ArgumentError(
            f"attributions must be (versions, baselines, features) with one probability and "
            f"label per version, got shape {values.shape}, {len(probabilities)} probabilities "
            f"and {len(labels)} labels"
        )
    _refuse_empty("attributions", values.shape, ("versions", "baselines", "features"))
    for version in values:
        _checked_matrix(version, baseline_names, feature_names)

    n_versions, n_kinds, n_features = values.shape
    colours = plt.get_cmap("tab10").colors
    figure, axes = plt.subplots(
        1, n_kinds + 1, figsize=(2.1 + 2.6 * n_kinds, 3.6), layout="constrained",
        gridspec_kw={"width_ratios": [0.8] + [1.0] * n_kinds},
    )

    survival = axes[0]
    survival.bar(range(n_versions), probabilities, color=colours[:n_versions], width=0.6)
    for index, probability in enumerate(probabilities):
        survival.text(index, probability + 0.02, f"{probability:.2f}", ha="center", fontsize=9)
    survival.axhline(0.5, color="0.5", linewidth=0.8, linestyle="--")
    survival.set_ylim(0, 1.1)
    short = [textwrap.fill(label, 14) for label in labels]
    survival.set_xticks(range(n_versions), labels=short, fontsize=8)
    survival.set_title("P(survival)", fontsize=10)

    limit = _limit(values) * 1.15
    height = 0.8 / n_versions
    positions = np.arange(n_features)
    for panel, kind in zip(axes[1:], range(n_kinds)):
        for version in range(n_versions):
            offset = (version - (n_versions - 1) / 2) * height
            panel.barh(positions + offset, values[version, kind], height=height,
                       color=colours[version])
        panel.axvline(0.0, color="0.3", linewidth=0.8)
        panel.set_xlim(-limit, limit)
        panel.set_yticks(positions, labels=list(feature_names) if kind == 0 else [])
        panel.invert_yaxis()
        panel.set_title(baseline_names[kind], fontsize=10)
        panel.tick_params(axis="x", labelsize=8)
        panel.grid(axis="x", color="0.9")
        panel.set_axisbelow(True)

    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in range(n_versions)]
    figure.legend(handles, list(labels), loc="outside lower center", ncols=n_versions, fontsize=9,
                  frameon=False)
    _title(figure, title, fontsize=11)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


# ---------------------------------------------------------------------------
# Drawing helpers


def _limit(values: np.ndarray) -> float:
    # Symmetric limits keep zero at the neutral colour whatever the signs present. Only
    # finite values set them: a nan is drawn grey and an inf at the end of the scale.
    magnitudes = np.abs(values[np.isfinite(values)])
    return max(float(magnitudes.max(initial=0.0)), SMALLEST_LIMIT)


def _unit_exponent(limit: float) -> int:
    """The power of ten the cells are written in: 0 (the values as they are) when the
    largest magnitude ``limit`` is from 0.01 to 1000, where three decimals show it with two
    significant digits or more; else its own power, so that the cells read up to 9.99."""
    if limit <= SMALLEST_LIMIT or 0.01 <= limit < 1000:
        return 0
    return math.floor(math.log10(limit))


def _cell_text(value: float, exponent: int) -> str:
    if np.isnan(value):
        return "nan"
    if exponent == 0:
        return f"{value:+.3f}"
    return f"{value / 10.0**exponent:+.2f}"


def _matrix(
    axes: Axes,
    values: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    limit: float,
):
    """An annotated (rows, columns) heatmap on ``axes``; returns the image for a colorbar."""
    norm = TwoSlopeNorm(0.0, -limit, limit)
    exponent = _unit_exponent(limit)
    colours = plt.get_cmap(DIVERGING).with_extremes(bad=NAN_GREY)
    image = axes.imshow(values, cmap=colours, norm=norm, aspect="auto")
    for (row, column), value in np.ndenumerate(values):
        # Dark text on the pale middle of the scale, white on its saturated ends.
        strong = abs(value) > 0.6 * limit
        axes.text(column, row, _cell_text(value, exponent), ha="center", va="center",
                  fontsize=10, color="white" if strong else "black")
    axes.set_yticks(range(len(row_labels)), labels=list(row_labels))
    axes.set_xticks(range(len(column_labels)), labels=list(column_labels))
    axes.tick_params(length=0)
    return image


def _comparison_figure(
    values: np.ndarray,
    baseline_names: Sequence[str],
    feature_names: Sequence[str],
    limit: float,
    title: str,
    fit: Sequence[str] = (),
) -> Figure:
    # (B, F) -> features down, baselines across, as the article's tables read.
    figure, axes = plt.subplots(
        figsize=(1.6 + 1.35 * len(baseline_names), 3.8), layout="constrained"
    )
    image = _matrix(axes, values.T, feature_names, baseline_names, limit)
    axes.xaxis.tick_top()
    _title(figure, title, fontsize=11, fit=fit)
    _colour_bar(figure, image, axes, label="mean attribution", shrink=0.85)
    return figure


def _colour_bar(figure: Figure, image: AxesImage, axes: Axes, *, label: str,
                shrink: float) -> None:
    """The colour bar of a :func:`_matrix` image, in the unit its cells are written in."""
    exponent = _unit_exponent(image.norm.vmax)
    if exponent == 0:
        figure.colorbar(image, ax=axes, shrink=shrink, label=label)
        return

    unit = 10.0**exponent
    in_unit = FuncFormatter(lambda tick, _: f"{tick / unit:g}".replace("-", "\N{MINUS SIGN}"))
    label = ", ".join(part for part in (label, f"in units of 1e{exponent}") if part)
    figure.colorbar(image, ax=axes, shrink=shrink, label=label, format=in_unit)


def _title(figure: Figure, title: str, *, fontsize: float, fit: Sequence[str] = ()) -> None:
    """Title the whole figure, widening it where the title, or any text of ``fit`` (the
    other frames' titles), would not fit: a narrow figure (one baseline) clips its title
    at both edges."""
    renderer = figure.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    lines = [line for text in (title, *fit) for line in text.split("\n")]
    widest = max(renderer.get_text_width_height_descent(line, font, ismath=False)[0]
                 for line in lines)  # pixels at the figure's dpi
    needed = widest / figure.dpi + 2 * TITLE_MARGIN
    figure.set_figwidth(max(figure.get_figwidth(), needed))
    figure.suptitle(title, fontsize=fontsize)


def _frame_titles(epochs: Sequence[int]) -> list[str]:
    """A title per snapshot, each different from the others: the GIF writer merges
    identical frames, so two snapshots of one epoch also name the snapshot."""
    last, snapshots = max(epochs), Counter(epochs)
    titles = []
    for snapshot, epoch in enumerate(epochs, start=1):
        when = "before training" if epoch == 0 else f"after epoch {epoch} of {last}"
        if snapshots[epoch] > 1:
            when += f" (snapshot {snapshot} of {len(epochs)})"
        titles.append(f"Mean attribution, {when}")
    return titles


def _to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def _checked_matrix(
    values: np.ndarray, baseline_names: Sequence[str], feature_names: Sequence[str]
) -> np.ndarray:
    matrix = np.asarray(values, dtype=float)
    expected = (len(baseline_names), len(feature_names))
    if matrix.shape != expected:
        raise ArgumentError(
            f"attributions must have shape (baselines, features) = {expected}, "
            f"got {matrix.shape}"
        )
    _refuse_empty("attributions", matrix.shape, ("baselines", "features"))
    return matrix


def _refuse_empty(name: str, shape: tuple[int, ...], dimensions: Sequence[str]) -> None:
    """Name the first of ``dimensions`` (one per axis of ``shape``) that holds nothing."""
    for size, dimension in zip(shape, dimensions):
        if size == 0:
            raise ArgumentError(f"nothing to draw: {name} of shape {shape} has no {dimension}")


def _check_names(count: int, names: Sequence[str], what: str) -> None:
    if len(names) != count:
        raise ArgumentError(f"got {len(names)} {what} names for {count} {what}s")
