"""One self-contained HTML page with everything ``--all`` found.

The page needs no server and no network: its pictures are embedded as base64 ``data:``
URIs, its style is inline, and it has no scripts. It opens from a file, a mail
attachment or an archive exactly as written.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from engine.callbacks import EpochCost
from engine.core import integrated_gradients
from engine.errors import ArgumentError
from engine.io import counted
from engine.validate import ValidationReport

__all__ = ["FlippedPassenger", "TitanicReport", "explain_flipped", "render_report"]


@dataclass(frozen=True)
class FlippedPassenger:
    """One test passenger as is and with one feature flipped, explained and predicted.

    ``features`` and ``attributions`` hold the two versions in that order: ``(2, F)`` and
    ``(2, B, F)``; ``probabilities`` are the model's survival probabilities of both.
    ``raw`` holds the passenger's values as the data file has them, when known; ``spread``
    is the flipped feature's range over the whole file after scaling (1, or 0 when every
    passenger has the same value), when known.
    """

    row: int
    passenger_id: int
    feature: str
    feature_names: tuple[str, ...]
    features: np.ndarray
    attributions: np.ndarray
    probabilities: tuple[float, float]
    name: str | None = None
    raw: tuple[str, ...] | None = None
    spread: float | None = None

    def labels(self) -> tuple[str, str]:
        """Legend labels of the two versions, naming the flipped feature's values."""
        before, after = self._values()
        return f"as is ({before})", f"{self.feature} {self.change} ({after})"

    def title(self) -> str:
        """The comparison's title: who, and what became of the feature, and why if nothing."""
        title = f"Passenger {self.passenger_id} (test row {self.row}): {self.feature} {self.change}"
        return title if self.reason is None else f"{title}\n{self.reason}"

    @property
    def unchanged(self) -> bool:
        """True when flipping left the value as it was: in the middle of its range (0.5), or
        one that every passenger in the file shares."""
        index = self._feature_index()
        return bool(self.features[0, index] == self.features[1, index])

    @property
    def change(self) -> str:
        """What became of the feature, in one word: "flipped" or "unchanged"."""
        return "unchanged" if self.unchanged else "flipped"

    @property
    def no_spread(self) -> bool:
        """True when every passenger in the file has the same value of the feature, so it
        was left as it is: scaling put it at 0 for all of them, and 1 was never seen."""
        return _has_no_spread(self.spread, self._raw_sex(),
                              float(self.features[0, self._feature_index()]))

    @property
    def reason(self) -> str | None:
        """Why the feature is unchanged, in words; None when it was flipped."""
        if self.no_spread:
            value = self._file_value()
            named = "" if value is None else f" ({value})"
            return f"every passenger in the file has the same {self.feature}{named}"
        if self.unchanged:
            return f"this passenger's {self.feature} is in the middle of its range"
        return None

    def _values(self) -> tuple[str, str]:
        index = self._feature_index()
        before, after = self.features[:, index]
        sex = self._raw_sex()
        if self.feature != "Sex" or (sex is None and self.no_spread):
            return f"{before:.3f}", f"{after:.3f}"

        # The file names the passenger's sex; the scaled value does only when the file
        # holds both sexes. Without the file's value, assume it does.
        sex = sex or ("male" if before >= 0.5 else "female")
        return sex, sex if self.unchanged else _OTHER_SEX[sex]

    def _raw_sex(self) -> str | None:
        if self.raw is None or self.feature != "Sex":
            return None
        sex = self.raw[self._feature_index()]
        return sex if sex in _OTHER_SEX else None

    def _file_value(self) -> str | None:
        """The passenger's value as the file writes it; None for a blank the median filled."""
        if self.raw is None:
            return None
        value = self.raw[self._feature_index()]
        if value in _OTHER_SEX:
            return value
        try:
            float(value)
        except ValueError:
            return None
        return value

    def _feature_index(self) -> int:
        return self.feature_names.index(self.feature)


_OTHER_SEX = {"male": "female", "female": "male"}


def _has_no_spread(spread: float | None, sex: str | None, value: float) -> bool:
    if spread is not None:
        return spread == 0.0
    # Without the file's spread only a man shows it: Sex is 1 (male) / 0 (female) before
    # min-max scaling, so a man is scaled to 0 only when no woman is in the file.
    return sex == "male" and value < 0.5


def explain_flipped(
    model: nn.Module,
    inputs: Tensor,
    baselines: Tensor,
    feature_names: Sequence[str],
    *,
    row: int,
    feature: str,
    passenger_ids: Sequence[int],
    n_steps: int = 50,
    method: str = "gausslegendre",
    name: str | None = None,
    raw: Sequence[str] | None = None,
    spread: Sequence[float] | None = None,
) -> FlippedPassenger:
    """Explain ``inputs[row]`` and a copy with ``feature`` flipped, in one engine call.

    Features are min-max normalised, so flipping maps a value ``v`` to ``1 - v``: Sex
    turns male (1) into female (0) and back; a graded feature is mirrored within its
    range (Pclass 1st <-> 3rd). A feature every passenger in the file shares is scaled to 0
    for all of them, and 1 is a value the model never saw: it is left as it is. ``spread``
    tells which features those are; without it, only a file of men only is recognised,
    from ``raw``.

    Parameters
    ----------
    model
        The trained network in eval mode, mapping ``(N, F)`` to ``(N, 1)`` probabilities.
    inputs
        ``(N, F)`` normalised rows (the test set).
    baselines
        ``(B, F)`` baselines.
    feature_names
        ``F`` names; ``feature`` must be one of them.
    row
        Which row of ``inputs``, 0-based.
    feature
        The feature to flip.
    passenger_ids
        ``N`` ids, to name the passenger.
    n_steps, method
        Passed to :func:`engine.integrated_gradients`.
    name
        The passenger's name, if known.
    raw
        ``F`` values as the file has them, if known: the report's table shows them, and
        the passenger's sex is named from them.
    spread
        ``F`` ranges (max - min) of the normalised features over the whole file, if known;
        a feature whose range is 0 is left as it is.

    Raises
    ------
    ArgumentError
        If ``row`` is outside ``inputs``, ``feature`` is unknown or ``spread`` does not
        have one value per feature.
    """
    n_rows = inputs.shape[0]
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < n_rows:
        raise ArgumentError(f"--explain-row {row!r}: expected a test row from 0 to {n_rows - 1}")
    if feature not in feature_names:
        raise ArgumentError(
            f"--flip {feature!r}: expected one of {', '.join(feature_names)}"
        )
    if spread is not None and len(spread) != len(feature_names):
        raise ArgumentError(
            f"spread: expected {len(feature_names)} values, one per feature, got {len(spread)}"
        )
    index = list(feature_names).index(feature)
    spread = None if spread is None else float(spread[index])

    original = inputs[row : row + 1]
    flipped = original.clone()
    sex = None if raw is None or feature != "Sex" else str(raw[index])
    if not _has_no_spread(spread, sex, float(original[0, index])):
        flipped[0, index] = 1.0 - flipped[0, index]
    versions = torch.cat([original, flipped])  # (2, F)

    attributions = integrated_gradients(model, versions, baselines, n_steps=n_steps,
                                        method=method)  # (B, 2, F)
    with torch.no_grad():
        probabilities = model(versions).reshape(2).tolist()
    return FlippedPassenger(
        row=row,
        passenger_id=int(passenger_ids[row]),
        feature=feature,
        feature_names=tuple(feature_names),
        features=versions.detach().cpu().double().numpy(),
        attributions=attributions.transpose(0, 1).detach().cpu().double().numpy(),
        probabilities=(float(probabilities[0]), float(probabilities[1])),
        name=name,
        raw=None if raw is None else tuple(map(str, raw)),
        spread=spread,
    )


@dataclass(frozen=True)
class TitanicReport:
    """What the page shows; pictures are paths to files already written."""

    source: str
    n_passengers: int
    n_train: int
    n_test: int
    feature_names: tuple[str, ...]
    baseline_names: tuple[str, ...]
    epochs: int
    seed: int
    layer_order: str
    device: str
    n_steps: int
    method: str
    accuracy: float
    classification_report: str
    top_features: Mapping[str, str]
    side_by_side: Path
    heatmaps: Mapping[str, Path]
    animation: Path
    epoch_costs: Sequence[EpochCost]
    passenger: FlippedPassenger
    passenger_figure: Path
    validation: ValidationReport
    max_abs_delta: float


def render_report(report: TitanicReport) -> str:
    """The whole page as one HTML string, pictures embedded.

    Parameters
    ----------
    report
        What to show; its picture files must exist.

    Returns
    -------
    str
        A complete HTML document that references nothing outside itself.

    Raises
    ------
    ArgumentError
        If a picture file is missing.
    """
    sections = [
        _section("Data and split", _data_section(report)),
        _section("Model and accuracy", _model_section(report)),
        _section("Baseline choice changes the story", _baselines_section(report)),
        _section("One heatmap per baseline", _heatmaps_section(report)),
        _section("Attribution during training", _training_section(report)),
        _section(f"One passenger, one feature {report.passenger.change}",
                 _passenger_section(report)),
        _section("Validation against Captum", _validation_section(report)),
    ]
    return _PAGE.format(
        style=_STYLE,
        title="Integrated Gradients on the Titanic test set",
        lede=html.escape(
            f"{counted(report.n_test, 'test passenger')} explained against "
            f"{counted(len(report.baseline_names), 'baseline')} with {report.n_steps}-step "
            f"{report.method} quadrature, every path point in one batched pass."
        ),
        body="\n".join(sections),
    )


# ---------------------------------------------------------------------------
# Sections


def _data_section(report: TitanicReport) -> str:
    rows = [
        ("source", report.source),
        ("passengers", f"{report.n_passengers}"),
        ("training rows", f"{report.n_train} (the first 80% of the file)"),
        ("test rows", f"{report.n_test} (the rest; one row is in both, as in the article)"),
        ("features", ", ".join(report.feature_names)),
        ("preparation", "Sex as 1 (male) / 0 (female); missing values filled with the "
                        "column median; every column min-max scaled to [0, 1]"),
    ]
    return _key_values(rows)


def _model_section(report: TitanicReport) -> str:
    rows = [
        ("network", f"5-128-128-1 MLP, PReLU, sigmoid; {report.layer_order} layer order"),
        ("training", f"{counted(report.epochs, 'epoch')}, Adam lr 0.01, batch 512, "
                     f"seed {report.seed}, on {report.device}"),
        ("test accuracy", f"{report.accuracy:.3f}"),
    ]
    return (_key_values(rows)
            + "<h3>Classification report (test set)</h3>"
            + f"<pre>{html.escape(report.classification_report.rstrip())}</pre>")


def _baselines_section(report: TitanicReport) -> str:
    tops = ", ".join(
        f"<b>{html.escape(kind)}</b>: {html.escape(feature)}"
        for kind, feature in report.top_features.items()
    )
    text = (
        "<p>Each column is the mean attribution of every feature over the test passengers, "
        "for one baseline, on one colour scale: green pushes the predicted survival up, "
        "red pushes it down. The same model and the same passengers tell a different story "
        f"depending on what they are compared with. Largest feature per baseline: {tops}.</p>"
    )
    return text + _figure(report.side_by_side, "Mean attribution per feature and baseline, "
                          f"after epoch {report.epochs}")


def _heatmaps_section(report: TitanicReport) -> str:
    cells = "".join(
        _figure(path, kind, css_class="cell") for kind, path in report.heatmaps.items()
    )
    note = ("<p>The same numbers, one picture per baseline, each on its own colour scale: "
            "read the signs and the order of the features, not the colours across pictures."
            "</p>")
    return note + f'<div class="grid">{cells}</div>'


def _snapshot_times(costs: Sequence[EpochCost]) -> str:
    """When the snapshots were taken, as a reader would say it: "before training and after
    each epoch", "... after epoch 3", "... after epochs 5, 10, 12"."""
    epochs = [cost.epoch for cost in costs if cost.epoch > 0]
    if not epochs:
        return "before training"
    if len(epochs) == 1:
        return f"before training and after epoch {epochs[0]}"
    if epochs == list(range(1, len(epochs) + 1)):
        return "before training and after each epoch"
    return "before training and after epochs " + ", ".join(str(epoch) for epoch in epochs)


def _training_section(report: TitanicReport) -> str:
    against = "the baseline" if len(report.baseline_names) == 1 else "every baseline"
    text = (
        f"<p>The test set was explained against {against} "
        f"{_snapshot_times(report.epoch_costs)}, with one batched engine call per snapshot. "
        "The colour scale is fixed over all frames.</p>"
    )
    return text + _figure(report.animation, "Mean attribution per baseline, epoch by epoch") \
        + _cost_table(report.epoch_costs)


def _cost_table(costs: Sequence[EpochCost]) -> str:
    trained = [cost for cost in costs if cost.epoch_seconds]
    if not costs:
        return ""
    attribution_ms = np.array([cost.attribution_seconds for cost in costs]) * 1e3
    summary = (
        f"<p>Cost of one snapshot: median {np.median(attribution_ms):.1f} ms "
        f"(first {attribution_ms[0]:.1f} ms, which includes warm-up and any compiling), "
        f"{attribution_ms.sum() / 1e3:.2f} s in all."
    )
    if trained:
        epoch_ms = np.array([cost.epoch_seconds for cost in trained]) * 1e3
        summary += (
            f" A training epoch took a median {np.median(epoch_ms):.1f} ms: a snapshot is "
            "far more arithmetic than an epoch of this small job, since every test row x "
            "baseline x step is a forward and backward pass."
        )
    summary += "</p>"

    rows = "".join(
        f"<tr><td>{cost.epoch}</td><td>{cost.attribution_seconds * 1e3:.1f}</td>"
        f"<td>{'' if not cost.epoch_seconds else f'{cost.epoch_seconds * 1e3:.1f}'}</td></tr>"
        for cost in costs
    )
    table = (
        "<details><summary>Per-epoch timings</summary><table class=\"numbers\">"
        "<tr><th>epoch</th><th>attribution (ms)</th><th>training epoch (ms)</th></tr>"
        f"{rows}</table></details>"
    )
    return summary + table


def _passenger_section(report: TitanicReport) -> str:
    passenger = report.passenger
    who = f"passenger {passenger.passenger_id}"
    if passenger.name:
        who += f" ({passenger.name})"
    before, after = passenger.probabilities
    labels = passenger.labels()
    text = (
        f"<p>Test row {passenger.row}: {html.escape(who)}. The model gives a survival "
        f"probability of <b>{before:.2f}</b> {html.escape(labels[0])} and <b>{after:.2f}</b> "
        f"with {html.escape(labels[1])}, every other feature unchanged. "
        "Flipping maps a normalised value v to 1 - v.</p>"
    )
    feature = html.escape(passenger.feature)
    if passenger.no_spread:
        text += (f"<p><b>Note:</b> {html.escape(passenger.reason)}, so min-max scaling put it "
                 "at 0 for all of them and the model never saw it vary: 1 - 0 would be a "
                 f"value no passenger has. {feature} is left unchanged; choose another "
                 "feature.</p>")
    elif passenger.unchanged:
        text += (f"<p><b>Note:</b> this passenger's {feature} is in the middle of its range, "
                 "so flipping leaves it unchanged; choose another row or feature.</p>")
    if passenger.feature == "Sex" and "zero-base" in report.baseline_names:
        text += ("<p>A feature equal to the baseline's value gets no attribution (IG "
                 "multiplies by x - baseline): against the zero baseline a Sex of 0 (a woman, "
                 "or anyone in a file of one sex) gets an attribution of 0.</p>")
    return text + _passenger_table(passenger) + _figure(
        report.passenger_figure,
        f"Survival probability and attributions, as is and {passenger.change}",
    )


def _passenger_table(passenger: FlippedPassenger) -> str:
    raw = passenger.raw
    header = ("<tr><th>feature</th>" + ("<th>in the file</th>" if raw else "")
              + f"<th>as is</th><th>{passenger.change}</th></tr>")
    rows = "".join(
        ('<tr class="changed">' if name == passenger.feature else "<tr>")
        + f"<td>{html.escape(name)}</td>"
        + (f"<td>{html.escape(raw[i])}</td>" if raw else "")
        + f"<td>{passenger.features[0, i]:.3f}</td><td>{passenger.features[1, i]:.3f}</td></tr>"
        for i, name in enumerate(passenger.feature_names)
    )
    note = f"as is and {passenger.change}: the model's inputs, min-max normalised"
    if passenger.reason is not None:
        note += f"; {passenger.feature} is unchanged: {passenger.reason}"
    return f'<table class="numbers">{header}{rows}</table><p class="note">{html.escape(note)}</p>'


def _validation_section(report: TitanicReport) -> str:
    validation = report.validation
    rows = [
        ("job", f"{counted(validation.n_rows, 'row')} x "
                f"{counted(validation.n_baselines, 'baseline')} x "
                f"{counted(validation.n_steps, 'step')} "
                f"({validation.method}, {validation.dtype})"),
        ("max relative error", f"{validation.max_rel_error:.2e} (above "
                               f"{validation.tolerance_text} both are compared with Captum "
                               "in float64)"),
        *([("against Captum in float64",
            f"engine {validation.engine_vs_float64:.2e}, Captum "
            f"{validation.captum_vs_float64:.2e}; the engine off in {validation.pairs_off} of "
            f"{counted(validation.n_rows * validation.n_baselines, 'row-baseline pair')} "
            f"(the run fails when the engine's is above {validation.tolerance_text}, unless "
            f"at most {counted(validation.kink_pairs, 'pair')} "
            f"{'is' if validation.kink_pairs == 1 else 'are'} off, a kink's rounding: then "
            "the engine computes the attributions again in float64)")]
          if validation.engine_vs_float64 is not None else []),
        *([("computed again in float64",
            f"{validation.recomputed_vs_float64:.2e} from Captum in float64: a path point "
            "within rounding of a ReLU-like kink took the other slope in the engine's "
            "float32 run, so the heatmaps, interpretation_results and convergence are "
            "the float64 ones (the run fails when these are above "
            f"{validation.tolerance_text} too); the snapshots over epochs and the passenger "
            "comparison are float32")]
          if validation.recomputed else []),
        ("max |convergence delta|", f"{report.max_abs_delta:.2e} (sum of attributions minus "
                                    "F(x) - F(baseline): the quadrature error, which the "
                                    "PReLU kinks shrink only as 1/steps)"),
        ("engine", f"{validation.engine_seconds * 1e3:.1f} ms, one batched call"),
        ("Captum", f"{validation.captum_seconds * 1e3:.1f} ms, one call per baseline"),
        ("speed-up", f"{validation.speedup:.1f}x"),
    ]
    note = ("<p>Captum's <code>IntegratedGradients</code> was run on the same model, rows, "
            "baselines and quadrature rule; the relative error is the largest, over the "
            "baselines, of ||engine - Captum|| / ||Captum||.</p>")
    return note + _key_values(rows)


# ---------------------------------------------------------------------------
# HTML pieces


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _key_values(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"
        for key, value in rows
    )
    return f'<table class="facts">{cells}</table>'


def _figure(path: Path, caption: str, css_class: str = "") -> str:
    css = f' class="{css_class}"' if css_class else ""
    return (
        f'<figure{css}><img src="{_data_uri(path)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _data_uri(path: str | Path) -> str:
    """The file as a base64 ``data:`` URI, its type guessed from the suffix.

    Raises
    ------
    ArgumentError
        If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ArgumentError(f"{path}: picture for the report not found")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


_STYLE = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d232a; background: #f6f7f9; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; }
header { border-bottom: 3px solid #2b7a4b; margin-bottom: 8px; }
h1 { font-size: 28px; margin: 16px 0 4px; }
.lede { color: #4a5560; margin: 0 0 16px; }
section { background: #fff; border: 1px solid #dfe3e8; border-radius: 8px;
          padding: 8px 24px 16px; margin: 20px 0; }
h2 { font-size: 20px; color: #2b7a4b; margin: 12px 0 8px; }
h3 { font-size: 16px; margin: 16px 0 4px; }
table { border-collapse: collapse; margin: 8px 0; }
.facts th { text-align: left; font-weight: 600; padding: 3px 24px 3px 0;
            vertical-align: top; white-space: nowrap; }
.facts td { padding: 3px 0; }
.numbers th, .numbers td { border-bottom: 1px solid #e5e8ec; padding: 3px 14px;
                           text-align: right; font-variant-numeric: tabular-nums; }
.numbers th:first-child, .numbers td:first-child { text-align: left; }
.numbers tr.changed td { background: #fff4d6; font-weight: 600; }
pre { background: #f3f5f7; border-radius: 6px; padding: 10px 14px; overflow-x: auto;
      font-size: 14px; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceff2; }
.note, figcaption { font-size: 14px; color: #5b6670; margin-top: 2px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
        gap: 8px 16px; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #2b7a4b; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
<header><h1>{title}</h1><p class="lede">{lede}</p></header>
{body}
</main>
</body>
</html>
"""
