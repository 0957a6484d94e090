"""report.html is one self-contained page, and the flipped-passenger comparison it shows."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import integrated_gradients
from engine.callbacks import EpochCost
from engine.errors import ArgumentError
from engine.model import TitanicMLP, predict_proba
from engine.report import FlippedPassenger, TitanicReport, explain_flipped, render_report
from engine.validate import ValidationReport

FEATURES = ("Pclass", "Sex", "Age", "SibSp", "Fare")
BASELINES = ("mean-base", "random-base", "zero-base", "one-base")

# Attributes through which a page can pull in another resource.
URL_ATTRIBUTES = {"src", "href", "srcset", "poster", "data", "action", "background",
                  "formaction", "cite", "longdesc", "manifest", "xlink:href"}
LOADING_TAGS = {"script", "link", "iframe", "object", "embed", "base", "frame", "applet"}


class References(HTMLParser):
    """Every URL-carrying attribute, every tag that loads something, every style block."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.loading_tags: list[str] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        if tag in LOADING_TAGS:
            self.loading_tags.append(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append(value)
            if name == "style" and value:
                self.styles.append(value)

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def references(page: str) -> References:
    parser = References()
    parser.feed(page)
    parser.close()
    return parser


def picture(path: Path, kind: str, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (8, 6), colour).save(path, format=kind)
    return path


@pytest.fixture
def report(tmp_path) -> TitanicReport:
    heatmaps = {kind: picture(tmp_path / f"h_{kind}.png", "PNG", (i * 40, 120, 60))
                for i, kind in enumerate(BASELINES)}
    passenger = FlippedPassenger(
        row=6, passenger_id=719, feature="Sex", feature_names=FEATURES,
        features=np.array([[1.0, 1.0, 0.35, 0.0, 0.03], [1.0, 0.0, 0.35, 0.0, 0.03]]),
        attributions=np.zeros((2, 4, 5)), probabilities=(0.14, 0.59),
        name="McEvoy, Mr. Michael", raw=("3", "male", "blank (median used)", "0", "15.5"),
    )
    validation = ValidationReport(
        max_rel_error=8.5e-8, n_rows=179, n_baselines=4, n_steps=50, method="gausslegendre",
        dtype="float32", engine_seconds=0.05, captum_seconds=0.46,
    )
    return TitanicReport(
        source="data/train.csv", n_passengers=891, n_train=713, n_test=179,
        feature_names=FEATURES, baseline_names=BASELINES, epochs=2, seed=404,
        layer_order="article", device="cpu", n_steps=50, method="gausslegendre",
        accuracy=0.838, classification_report="  precision <recall> & f1\n",
        top_features=dict(zip(BASELINES, ("Sex", "SibSp", "Sex", "SibSp"))),
        side_by_side=picture(tmp_path / "side.png", "PNG", (10, 200, 10)),
        heatmaps=heatmaps,
        animation=picture(tmp_path / "epochs.gif", "GIF", (200, 10, 10)),
        epoch_costs=[EpochCost(0, 0.3, None), EpochCost(1, 0.06, 0.02), EpochCost(2, 0.05, 0.02)],
        passenger=passenger,
        passenger_figure=picture(tmp_path / "passenger.png", "PNG", (10, 10, 200)),
        validation=validation, max_abs_delta=0.043,
    )


def test_page_loads_nothing_from_outside(report):
    page = render_report(report)
    found = references(page)

    assert found.loading_tags == []
    assert found.urls, "the page should carry its pictures"
    assert all(url.startswith("data:") for url in found.urls), found.urls
    for style in found.styles:
        assert "@import" not in style
        assert all(url.strip("'\" ").startswith("data:")
                   for url in re.findall(r"url\(([^)]*)\)", style))


def test_every_picture_is_embedded_byte_for_byte(report):
    page = render_report(report)
    embedded = [url for url in references(page).urls if url.startswith("data:")]

    pictures = [report.side_by_side, *report.heatmaps.values(), report.animation,
                report.passenger_figure]
    expected = {(f"image/{p.suffix[1:]}", p.read_bytes()) for p in pictures}
    decoded = set()
    for url in embedded:
        header, payload = url.split(",", 1)
        assert header.endswith(";base64")
        decoded.add((header[len("data:"):-len(";base64")], base64.b64decode(payload)))
    assert decoded == expected


def test_page_shows_the_numbers_it_is_given(report):
    page = render_report(report)
    for text in ("891", "713", "179", "0.838", "8.50e-08", "9.2x", "McEvoy, Mr. Michael",
                 "0.14", "0.59", "blank (median used)", "Validation against Captum",
                 "One passenger, one feature"):
        assert text in page, text


def test_text_is_escaped(report):
    page = render_report(report)
    assert "&lt;recall&gt; &amp; f1" in page
    assert "<recall>" not in page


def test_a_missing_picture_is_named(report, tmp_path):
    report.side_by_side.unlink()
    with pytest.raises(ArgumentError, match="side.png"):
        render_report(report)


def visible_text(page: str) -> str:
    """The page's words as a reader sees them: no tags, no style, spaces collapsed."""
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def one_of_everything(report) -> TitanicReport:
    """One test passenger, one baseline, one epoch: every count on the page is 1."""
    validation = dataclasses.replace(report.validation, n_rows=1, n_baselines=1, n_steps=1,
                                     max_rel_error=2e-5, engine_vs_float64=3e-6,
                                     captum_vs_float64=2e-5, pairs_off=0)
    return dataclasses.replace(
        report, n_test=1, baseline_names=("mean-base",), epochs=1, n_steps=1,
        top_features={"mean-base": "Sex"}, validation=validation,
        epoch_costs=[EpochCost(0, 0.3, None), EpochCost(1, 0.06, 0.02)],
    )


def test_a_count_of_one_takes_the_singular(one_of_everything):
    text = visible_text(render_report(one_of_everything))

    assert "1 test passenger explained against 1 baseline with" in text
    assert "1 epoch, Adam" in text
    assert "explained against the baseline before training and after epoch 1," in text
    assert "1 row x 1 baseline x 1 step (" in text
    assert "off in 0 of 1 row-baseline pair (" in text
    assert "unless at most 1 pair is off" in text
    assert not re.search(r"\b1 (passengers|baselines|epochs|rows|steps|pairs)\b", text), text


def test_counts_above_one_take_the_plural(report):
    text = visible_text(render_report(report))

    assert "179 test passengers explained against 4 baselines with" in text
    assert "2 epochs, Adam" in text
    assert "179 rows x 4 baselines x 50 steps (" in text


@pytest.mark.parametrize(("epochs", "said"), [
    ([1, 2], "before training and after each epoch,"),
    ([1], "before training and after epoch 1,"),
    ([3], "before training and after epoch 3,"),
    ([5, 7], "before training and after epochs 5, 7,"),
    ([5, 10, 12], "before training and after epochs 5, 10, 12,"),
    ([], "before training,"),
])
def test_the_snapshot_epochs_are_named_as_a_reader_would(report, epochs, said):
    costs = [EpochCost(0, 0.3, None), *(EpochCost(epoch, 0.06, 0.02) for epoch in epochs)]
    text = visible_text(render_report(dataclasses.replace(report, epoch_costs=costs)))

    assert f"explained against every baseline {said} with one batched" in text


# ---------------------------------------------------------------------------
# The flipped passenger


@pytest.fixture
def net_rows_baselines():
    torch.manual_seed(0)
    net = TitanicMLP().eval()
    rows = torch.rand(10, 5, generator=torch.Generator().manual_seed(1))
    rows[:, 1] = torch.tensor([1.0, 0.0] * 5)  # Sex is 0 or 1
    baselines = torch.rand(4, 5, generator=torch.Generator().manual_seed(2))
    return net, rows, baselines


def test_flip_changes_only_the_chosen_feature_to_one_minus_it(net_rows_baselines):
    net, rows, baselines = net_rows_baselines
    result = explain_flipped(net, rows, baselines, FEATURES, row=3, feature="Sex",
                             passenger_ids=list(range(100, 110)))

    assert result.passenger_id == 103
    np.testing.assert_array_equal(result.features[0], rows[3].double().numpy())
    expected = rows[3].double().numpy().copy()
    expected[1] = 1.0 - expected[1]
    np.testing.assert_array_equal(result.features[1], expected)
    assert result.labels() == ("as is (female)", "Sex flipped (male)")


def test_flipped_passenger_matches_direct_engine_and_prediction(net_rows_baselines):
    net, rows, baselines = net_rows_baselines
    result = explain_flipped(net, rows, baselines, FEATURES, row=2, feature="Pclass",
                             passenger_ids=list(range(10)), n_steps=16)

    versions = torch.from_numpy(result.features).float()
    expected = integrated_gradients(net, versions, baselines, n_steps=16)  # (B, 2, F)
    np.testing.assert_allclose(result.attributions, expected.transpose(0, 1).double().numpy(),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.probabilities, predict_proba(net, versions).numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize(("row", "feature", "message"), [
    (10, "Sex", "--explain-row 10: expected a test row from 0 to 9"),
    (-1, "Sex", "--explain-row -1"),
    (0, "Name", "--flip 'Name': expected one of Pclass, Sex"),
])
def test_bad_row_or_feature_is_named(net_rows_baselines, row, feature, message):
    net, rows, baselines = net_rows_baselines
    with pytest.raises(ArgumentError) as err:
        explain_flipped(net, rows, baselines, FEATURES, row=row, feature=feature,
                        passenger_ids=list(range(10)))
    assert message in str(err.value)


def test_a_flip_that_changes_nothing_is_pointed_out(net_rows_baselines, report):
    net, rows, baselines = net_rows_baselines
    rows[4, 0] = 0.5  # Pclass 2nd: the middle of the range, where 1 - v = v
    result = explain_flipped(net, rows, baselines, FEATURES, row=4, feature="Pclass",
                             passenger_ids=list(range(10)))

    assert result.unchanged
    assert result.probabilities[0] == result.probabilities[1]
    page = render_report(dataclasses.replace(report, passenger=result))
    assert "flipping leaves it unchanged" in page


def test_a_real_flip_is_not_called_unchanged(report):
    assert not report.passenger.unchanged
    assert "flipping leaves it unchanged" not in render_report(report)


@pytest.fixture
def men_only(net_rows_baselines):
    """A file of men only: min-max scaling puts every man's Sex at 0, none at 1."""
    net, rows, baselines = net_rows_baselines
    rows[:, 1] = 0.0
    raw = ("3", "male", "28", "0", "15.5")
    return net, rows, baselines, raw


def test_the_sex_is_named_from_the_file_not_from_the_scaled_value(men_only, report):
    net, rows, baselines, raw = men_only
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Sex",
                             passenger_ids=list(range(10)), raw=raw)

    page = render_report(dataclasses.replace(report, passenger=result))
    assert all("female" not in label for label in result.labels()), result.labels()
    assert "as is (male)" in page
    assert "female" not in page.split("One passenger")[1].split("</section>")[0]


def test_a_sex_every_passenger_shares_is_left_as_it_is(men_only, report):
    net, rows, baselines, raw = men_only
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Sex",
                             passenger_ids=list(range(10)), raw=raw)

    np.testing.assert_array_equal(result.features[1], result.features[0])
    assert result.unchanged and result.no_spread
    assert result.labels() == ("as is (male)", "Sex unchanged (male)")
    page = render_report(dataclasses.replace(report, passenger=result))
    assert "every passenger in the file has the same Sex (male)" in page
    assert "middle of its range" not in page


ZERO_BASELINE_NOTE = "against the zero baseline a Sex of 0"


def test_the_zero_baseline_note_shows_when_the_zero_baseline_was_chosen(report):
    assert ZERO_BASELINE_NOTE in passenger_section(render_report(report))


@pytest.mark.parametrize("baselines", [("mean-base",), ("mean-base", "random-base", "one-base")])
def test_the_zero_baseline_note_is_left_out_without_the_zero_baseline(report, baselines):
    page = render_report(dataclasses.replace(report, baseline_names=baselines))

    assert ZERO_BASELINE_NOTE not in passenger_section(page)


def test_the_zero_baseline_note_is_left_out_for_another_feature(report):
    passenger = dataclasses.replace(report.passenger, feature="Pclass")
    page = render_report(dataclasses.replace(report, passenger=passenger))

    assert ZERO_BASELINE_NOTE not in passenger_section(page)


def test_a_man_among_women_is_named_and_flipped_from_the_file(report):
    assert report.passenger.labels() == ("as is (male)", "Sex flipped (female)")
    assert "as is (male)" in render_report(report)


# ---------------------------------------------------------------------------
# A feature every passenger in the file shares: min-max scaling puts it at 0 for all of
# them, and 1 - 0 is a value the model never saw, so it is left as it is.


def no_spread(feature: str) -> list[float]:
    """The spread (max - min) of each normalised feature over a file where only ``feature``
    has a single value."""
    return [0.0 if name == feature else 1.0 for name in FEATURES]


def passenger_section(page: str) -> str:
    return page.split("One passenger")[1].split("</section>")[0]


def test_a_sex_every_woman_shares_is_left_as_it_is(net_rows_baselines, report):
    net, rows, baselines = net_rows_baselines
    rows[:, 1] = 0.0  # a file of women only scales every woman to 0, as it does every man
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Sex",
                             passenger_ids=list(range(10)), raw=("1", "female", "30", "0", "80"),
                             spread=no_spread("Sex"))

    np.testing.assert_array_equal(result.features[1], result.features[0])
    assert result.no_spread and result.unchanged
    assert result.labels() == ("as is (female)", "Sex unchanged (female)")
    section = passenger_section(render_report(dataclasses.replace(report, passenger=result)))
    assert "every passenger in the file has the same Sex (female)" in section
    assert not re.search(r"\bmale\b", section), section


def test_a_class_every_passenger_shares_is_left_as_it_is(net_rows_baselines, report):
    net, rows, baselines = net_rows_baselines
    rows[:, 0] = 0.0  # every passenger 3rd class
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Pclass",
                             passenger_ids=list(range(10)), raw=("3", "male", "30", "0", "8"),
                             spread=no_spread("Pclass"))

    np.testing.assert_array_equal(result.features[1], result.features[0])
    assert result.labels() == ("as is (0.000)", "Pclass unchanged (0.000)")
    section = passenger_section(render_report(dataclasses.replace(report, passenger=result)))
    assert "every passenger in the file has the same Pclass (3)" in section
    assert '<th>as is</th><th>unchanged</th>' in section
    assert "flipping leaves it unchanged" not in section


def test_a_feature_that_varies_in_the_file_is_flipped_even_at_zero(net_rows_baselines):
    net, rows, baselines = net_rows_baselines
    rows[6, 0] = 0.0  # 1st class in a file that holds other classes too
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Pclass",
                             passenger_ids=list(range(10)), spread=no_spread("Fare"))

    assert not result.no_spread and not result.unchanged
    assert result.features[1, 0] == 1.0
    assert result.labels() == ("as is (0.000)", "Pclass flipped (1.000)")


def test_a_blank_the_median_filled_is_not_named_as_the_files_value(net_rows_baselines, report):
    net, rows, baselines = net_rows_baselines
    rows[:, 2] = 0.0
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Age",
                             passenger_ids=list(range(10)),
                             raw=("3", "male", "blank (median used)", "0", "8"),
                             spread=no_spread("Age"))

    assert result.reason == "every passenger in the file has the same Age"


def test_a_spread_per_feature_is_required(net_rows_baselines):
    net, rows, baselines = net_rows_baselines
    with pytest.raises(ArgumentError, match="spread: expected 5 values"):
        explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Sex",
                        passenger_ids=list(range(10)), spread=[0.0, 1.0])


def test_the_figure_title_says_flipped_only_when_the_feature_changed(net_rows_baselines,
                                                                     report, men_only):
    assert report.passenger.title() == "Passenger 719 (test row 6): Sex flipped"

    net, rows, baselines, raw = men_only
    result = explain_flipped(net, rows, baselines, FEATURES, row=6, feature="Sex",
                             passenger_ids=list(range(10)), raw=raw)
    assert result.title() == ("Passenger 6 (test row 6): Sex unchanged\n"
                              "every passenger in the file has the same Sex (male)")

    rows[4, 0] = 0.5
    middle = explain_flipped(net, rows, baselines, FEATURES, row=4, feature="Pclass",
                             passenger_ids=list(range(10)))
    assert middle.title() == ("Passenger 4 (test row 4): Pclass unchanged\n"
                              "this passenger's Pclass is in the middle of its range")


# The whole run, on small files with one value in a column: what the page and the figure say.


@pytest.fixture(scope="module")
def one_valued_runs(tmp_path_factory, titanic_csv):
    """``--all`` on 120 women only (flipping Sex) and 120 passengers all in 3rd class
    (flipping Pclass); each run's page and the title and legend of its passenger figure."""
    import pandas as pd

    import engine.plots
    from engine.attribute import main

    kaggle = pd.read_csv(titanic_csv)
    files = {"Sex": kaggle[kaggle["Sex"] == "female"].head(120),
             "Pclass": kaggle.head(120).assign(Pclass=3)}
    drawn = {}
    draw = engine.plots.passenger_comparison

    def recorded(attributions, probabilities, labels, *args, title, **kwargs):
        drawn[feature] = {"title": title, "labels": list(labels)}
        draw(attributions, probabilities, labels, *args, title=title, **kwargs)

    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.plots, "passenger_comparison", recorded)
        for feature, frame in files.items():
            folder = tmp_path_factory.mktemp(f"one_{feature}")
            frame.to_csv(folder / "passengers.csv", index=False)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                status = main(["--all", "--data", str(folder / "passengers.csv"),
                               "--out", str(folder / "results"), "--epochs", "1",
                               "--n-steps", "8", "--flip", feature])
            assert status == 0
            page = (folder / "results" / "report.html").read_text()
            runs[feature] = {**drawn[feature], "section": passenger_section(page),
                             "printed": printed.getvalue()}
    return runs


def test_a_women_only_file_keeps_sex_and_never_says_male(one_valued_runs):
    run = one_valued_runs["Sex"]

    assert run["labels"] == ["as is (female)", "Sex unchanged (female)"]
    assert "every passenger in the file has the same Sex (female)" in run["section"]
    assert not re.search(r"\bmale\b", run["section"])
    assert re.search(r'<tr class="changed"><td>Sex</td><td>female</td>'
                     r"<td>0\.000</td><td>0\.000</td></tr>", run["section"])


def test_a_single_class_file_keeps_pclass_and_says_why(one_valued_runs):
    run = one_valued_runs["Pclass"]

    assert run["labels"] == ["as is (0.000)", "Pclass unchanged (0.000)"]
    assert "every passenger in the file has the same Pclass (3)" in run["section"]
    assert re.search(r'<tr class="changed"><td>Pclass</td><td>3</td>'
                     r"<td>0\.000</td><td>0\.000</td></tr>", run["section"])


@pytest.mark.parametrize("feature", ["Sex", "Pclass"])
def test_the_figure_title_says_unchanged_with_the_reason(one_valued_runs, feature):
    title = one_valued_runs[feature]["title"]

    assert f"{feature} unchanged" in title
    assert f"every passenger in the file has the same {feature}" in title
    assert "flipped" not in title


@pytest.mark.parametrize("feature", ["Sex", "Pclass"])
def test_the_printed_summary_says_unchanged_with_the_reason(one_valued_runs, feature):
    line = next(line for line in one_valued_runs[feature]["printed"].splitlines()
                if line.startswith("passenger "))

    assert f"with {feature} unchanged (every passenger in the file has the same {feature}" \
        in line
    assert "flipped" not in line


def test_a_passengers_values_in_the_report_are_as_the_file_wrote_them():
    import pandas as pd

    from engine.attribute import _passenger_in_file

    frame = pd.DataFrame({"Name": ["A"], "Pclass": [3], "Sex": ["male"], "Age": [22.0],
                          "SibSp": [0], "Fare": [512.3292]})

    found = _passenger_in_file(frame, 0, ["Pclass", "Sex", "Age", "SibSp", "Fare"])

    assert found["raw"] == ["3", "male", "22", "0", "512.3292"]
