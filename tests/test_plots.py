"""The pictures are valid image files of the expected size and frame count."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image, ImageSequence

import engine.plots
from engine.errors import ArgumentError
from engine.plots import (
    attribution_gif,
    attribution_heatmap,
    baseline_comparison,
    passenger_comparison,
)

FEATURES = ("Pclass", "Sex", "Age", "SibSp", "Fare")
BASELINES = ("mean-base", "random-base", "zero-base", "one-base")


def seeded(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.1, size=shape)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """Every figure the plots draw, kept as they close it, to read what it shows."""
    figures = []
    close = plt.close

    def keep(figure=None):
        figures.append(figure)
        close(figure)

    monkeypatch.setattr(engine.plots.plt, "close", keep)
    return figures


def texts(figure) -> list[Text]:
    return [text for text in figure.findobj(Text) if text.get_text()]


def test_heatmap_is_a_valid_png(tmp_path):
    path = tmp_path / "heatmap.png"
    attribution_heatmap(seeded(5), FEATURES, path, title="mean-base, epoch 3")
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def test_heatmap_of_all_zeros_still_draws(tmp_path):
    # Before training every attribution can be zero: the colour scale must not divide by 0.
    path = tmp_path / "zeros.png"
    attribution_heatmap(np.zeros(5), FEATURES, path, title="zeros")
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_side_by_side_is_one_png_wider_than_a_single_heatmap(tmp_path):
    single, side = tmp_path / "single.png", tmp_path / "side.png"
    attribution_heatmap(seeded(5), FEATURES, single, title="one")
    baseline_comparison(seeded(4, 5), BASELINES, FEATURES, side, title="all four")
    with Image.open(single) as one, Image.open(side) as four:
        assert four.format == "PNG"
        assert four.width > one.width  # four columns need more room than one


def test_gif_has_one_frame_per_snapshot(tmp_path):
    path = tmp_path / "epochs.gif"
    epochs = list(range(4))  # before training and three epochs
    means = np.cumsum(seeded(4, 4, 5), axis=0)

    written = attribution_gif(means, epochs, BASELINES, FEATURES, path, frame_ms=300,
                              last_frame_ms=1500)

    with Image.open(path) as image:
        assert image.format == "GIF"
        assert image.is_animated and image.n_frames == written == len(epochs)
        sizes, durations = set(), []
        for frame in range(image.n_frames):
            image.seek(frame)
            sizes.add(image.size)
            durations.append(image.info["duration"])
    assert len(sizes) == 1
    assert durations == [300] * 3 + [1500]


def test_gif_keeps_frames_whose_attributions_do_not_change(tmp_path):
    # Identical numbers in two snapshots still make two frames: the titles differ.
    path = tmp_path / "still.gif"
    means = np.repeat(seeded(1, 4, 5), 3, axis=0)
    attribution_gif(means, [0, 1, 2], BASELINES, FEATURES, path)
    with Image.open(path) as image:
        assert image.n_frames == 3


def test_gif_keeps_a_frame_per_snapshot_when_an_epoch_repeats(tmp_path, drawn):
    # Two snapshots of one epoch with the same numbers would be identical pictures, which
    # the GIF writer merges into one frame.
    path = tmp_path / "repeated.gif"
    written = attribution_gif(np.repeat(seeded(1, 4, 5), 3, axis=0), [1, 1, 2], BASELINES,
                              FEATURES, path)

    with Image.open(path) as image:
        assert written == image.n_frames == 3
    titles = [figure.get_suptitle() or figure.axes[0].get_title() for figure in drawn]
    assert len(set(titles)) == 3, titles


def test_gif_with_mismatched_epochs_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match="3 epochs"):
        attribution_gif(seeded(4, 4, 5), [0, 1, 2], BASELINES, FEATURES, tmp_path / "x.gif")
    assert not (tmp_path / "x.gif").exists()


def test_passenger_comparison_is_a_valid_png(tmp_path):
    path = tmp_path / "passenger.png"
    passenger_comparison(seeded(2, 4, 5), [0.14, 0.59], ["as is (male)", "Sex flipped (female)"],
                         BASELINES, FEATURES, path, title="Passenger 719")
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def test_passenger_comparison_needs_a_probability_per_version(tmp_path):
    with pytest.raises(ArgumentError, match="1 probabilities"):
        passenger_comparison(seeded(2, 4, 5), [0.1], ["a", "b"], BASELINES, FEATURES,
                             tmp_path / "p.png", title="t")


def test_comparison_with_the_wrong_shape_names_both_shapes(tmp_path):
    with pytest.raises(ArgumentError) as err:
        baseline_comparison(seeded(5, 4), BASELINES, FEATURES, tmp_path / "s.png", title="t")
    assert "(4, 5)" in str(err.value) and "(5, 4)" in str(err.value)


@pytest.mark.parametrize(("draw", "nothing"), [
    (lambda path: attribution_heatmap(np.zeros(0), [], path, title="t"), "no features"),
    (lambda path: baseline_comparison(np.zeros((0, 5)), [], FEATURES, path, title="t"),
     "no baselines"),
    (lambda path: baseline_comparison(np.zeros((4, 0)), BASELINES, [], path, title="t"),
     "no features"),
    (lambda path: attribution_gif(np.zeros((0, 4, 5)), [], BASELINES, FEATURES, path),
     "no epochs"),
    (lambda path: attribution_gif(np.zeros((2, 0, 5)), [0, 1], [], FEATURES, path),
     "no baselines"),
    (lambda path: attribution_gif(np.zeros((2, 4, 0)), [0, 1], BASELINES, [], path),
     "no features"),
    (lambda path: passenger_comparison(np.zeros((0, 4, 5)), [], [], BASELINES, FEATURES, path,
                                       title="t"), "no versions"),
    (lambda path: passenger_comparison(np.zeros((2, 0, 5)), [0.3, 0.4], ["a", "b"], [],
                                       FEATURES, path, title="t"), "no baselines"),
    (lambda path: passenger_comparison(np.zeros((2, 4, 0)), [0.3, 0.4], ["a", "b"], BASELINES,
                                       [], path, title="t"), "no features"),
], ids=["heatmap-features", "comparison-baselines", "comparison-features", "gif-epochs",
        "gif-baselines", "gif-features", "passenger-versions", "passenger-baselines",
        "passenger-features"])
def test_nothing_to_draw_is_refused_by_name(tmp_path, draw, nothing):
    path = tmp_path / "empty.png"
    with pytest.raises(ArgumentError, match=f"nothing to draw: .* has {nothing}"):
        draw(path)
    assert not path.exists()


NAMES_WITH_DOLLARS = ("cost $x^$", "$\\frac$", "$x$", "fare in $")


def test_names_and_titles_with_dollar_signs_are_shown_as_written(tmp_path, drawn):
    features = (*NAMES_WITH_DOLLARS, "Age")
    attribution_heatmap(seeded(5), features, tmp_path / "h.png", title="$x$ mean")
    baseline_comparison(seeded(4, 5), NAMES_WITH_DOLLARS, features, tmp_path / "c.png",
                        title="$\\frac$")
    attribution_gif(seeded(2, 4, 5), [0, 1], NAMES_WITH_DOLLARS, features, tmp_path / "g.gif")
    passenger_comparison(seeded(2, 4, 5), [0.1, 0.6], ["$x$", "cost $x^$"],
                         NAMES_WITH_DOLLARS, features, tmp_path / "p.png", title="$5")

    assert len(drawn) == 5
    shown = [text for figure in drawn for text in texts(figure)]
    assert set(NAMES_WITH_DOLLARS) <= {text.get_text() for text in shown}
    mathtext = [text.get_text() for text in shown if text.get_parse_math()]
    assert mathtext == []


FINITE = np.array([[0.1, -0.2, 0.0, 0.05, 0.3], [0.2, 0.1, -0.1, 0.0, -0.3]])  # (B, F)


def test_nan_and_inf_leave_the_colour_scale_to_the_finite_values(tmp_path, drawn):
    odd = FINITE.copy()
    odd[0, 1], odd[1, 2] = np.nan, np.inf
    attribution_gif(np.stack([FINITE, odd]), [0, 1], BASELINES[:2], FEATURES,
                    tmp_path / "nan.gif")

    assert len(drawn) == 2
    for figure in drawn:  # the frame without nan is drawn on the same scale as the other
        norm = figure.axes[0].images[0].norm
        assert (norm.vmin, norm.vmax) == pytest.approx((-0.3, 0.3))


def test_a_nan_cell_is_grey_and_reads_nan(tmp_path, drawn):
    values = FINITE.copy()
    values[1, 3] = np.nan
    baseline_comparison(values, BASELINES[:2], FEATURES, tmp_path / "nan.png", title="t")

    axes = drawn[0].axes[0]
    cells = [text.get_text() for text in axes.texts]
    assert cells.count("nan") == 1
    assert np.isfinite([float(cell) for cell in cells if cell != "nan"]).all()
    red, green, blue, alpha = axes.images[0].to_rgba(np.array([[np.nan]]))[0, 0]
    assert red == green == blue and alpha == 1.0  # opaque grey, no colour of the scale


def test_a_nan_bar_leaves_the_passengers_axes_to_the_finite_values(tmp_path, drawn):
    versions = np.stack([FINITE, FINITE / 2])
    versions[1, 0, 4] = np.nan
    passenger_comparison(versions, [0.2, 0.7], ["a", "b"], BASELINES[:2], FEATURES,
                         tmp_path / "nan.png", title="t")

    for panel in drawn[0].axes[1:]:
        assert panel.get_xlim() == pytest.approx((-0.3 * 1.15, 0.3 * 1.15))


def sides_are_blank(path) -> bool:
    """True when, in every frame, the outermost pixel columns are all background: nothing
    drawn runs off the picture's left or right edge."""
    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            pixels = np.asarray(frame.convert("RGB"))
            if pixels[:, [0, -1]].min() < 250:
                return False
    return True


def test_titles_fit_a_single_baseline_comparison_and_every_gif_frame(tmp_path):
    one = BASELINES[:1]
    side, gif = tmp_path / "side.png", tmp_path / "epochs.gif"
    baseline_comparison(seeded(1, 5), one, FEATURES, side,
                        title="Mean attribution per baseline, epoch 20")
    attribution_gif(seeded(3, 1, 5), [0, 1, 20], one, FEATURES, gif)

    assert sides_are_blank(side)
    assert sides_are_blank(gif)


def test_a_long_title_widens_the_heatmap_and_the_passenger_figure(tmp_path):
    title = "Mean attribution of every passenger in the test set, one-base, epoch 100"
    heatmap, passenger = tmp_path / "heatmap.png", tmp_path / "passenger.png"
    attribution_heatmap(seeded(5), FEATURES, heatmap, title=title)
    passenger_comparison(seeded(2, 1, 5), [0.1, 0.6], ["as is", "flipped"], BASELINES[:1],
                         FEATURES, passenger, title=f"{title}\n{title}")

    assert sides_are_blank(heatmap)
    assert sides_are_blank(passenger)


def test_small_attributions_are_written_in_a_unit_that_shows_them(tmp_path, drawn):
    # After one epoch against the mean baseline every mean is below 0.0005: "+0.000".
    values = np.array([[3.2e-4, -8.4e-5, 2.5e-4, 5.3e-5, -3.1e-5]])  # (B, F)
    baseline_comparison(values, BASELINES[:1], FEATURES, tmp_path / "small.png", title="t")

    heatmap, colour_bar = drawn[0].axes
    label = re.fullmatch(r"mean attribution, in units of (1e-\d+)", colour_bar.get_ylabel())
    assert label, colour_bar.get_ylabel()
    unit = float(label.group(1))
    cells = np.array([float(text.get_text()) for text in heatmap.texts]) * unit
    # Two decimals in the unit: each cell within half of its last digit.
    np.testing.assert_allclose(cells, values[0], rtol=0, atol=0.005 * unit)
    for tick in colour_bar.get_yticklabels():  # the colour bar reads in the same unit
        shown = float(tick.get_text().replace("\N{MINUS SIGN}", "-")) * unit
        assert shown == pytest.approx(tick.get_position()[1], abs=1e-3 * unit)


def test_a_single_heatmap_names_the_unit_of_small_attributions(tmp_path, drawn):
    attribution_heatmap(seeded(5) * 1e-3, FEATURES, tmp_path / "small.png", title="t")

    heatmap, colour_bar = drawn[0].axes
    assert re.fullmatch(r"in units of 1e-\d+", colour_bar.get_ylabel())
    assert not any(text.get_text() in ("+0.000", "-0.000") for text in heatmap.texts)


def test_usual_attributions_are_written_as_they_are_with_three_decimals(tmp_path, drawn):
    baseline_comparison(FINITE, BASELINES[:2], FEATURES, tmp_path / "usual.png", title="t")

    heatmap, colour_bar = drawn[0].axes
    assert colour_bar.get_ylabel() == "mean attribution"
    cells = [text.get_text() for text in heatmap.texts]
    assert cells == [f"{value:+.3f}" for value in FINITE.T.ravel()]
