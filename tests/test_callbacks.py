"""Attribution during training: a snapshot per epoch that leaves training as it was."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from engine import integrated_gradients
from engine.baselines import BASELINE_KINDS, make_baselines
from engine.callbacks import AttributionCallback
from engine.data import load_titanic, prepare_titanic
from engine.errors import ArgumentError, ModelError
from engine.model import TitanicClassifier, train_titanic

EPOCHS = 3
# Few nodes keep the tests fast; the callback does not care how many there are.
N_STEPS = 8


@pytest.fixture(scope="module")
def data(titanic_csv):
    return prepare_titanic(load_titanic(titanic_csv), source=titanic_csv)


@pytest.fixture(scope="module")
def baselines(data):
    return make_baselines(BASELINE_KINDS, data.mean_baseline, seed=404)


def new_callback(data, baselines) -> AttributionCallback:
    return AttributionCallback(
        data.test_features, baselines, BASELINE_KINDS, data.feature_names,
        row_ids=data.test_passenger_ids, n_steps=N_STEPS,
    )


@pytest.fixture(scope="module")
def watched(data, baselines):
    """A 3-epoch run with the callback, and the same run without it."""
    callback = new_callback(data, baselines)
    with_callback = train_titanic(data, epochs=EPOCHS, seed=404, accelerator="cpu",
                                  progress=False, callbacks=[callback])
    without = train_titanic(data, epochs=EPOCHS, seed=404, accelerator="cpu", progress=False)
    return callback, with_callback, without


def test_table_has_a_row_for_every_epoch_row_baseline_and_feature(watched, data):
    callback, _, _ = watched
    table = callback.table()

    n_rows = len(data.test_index)
    assert list(table.columns) == ["epoch", "row", "passenger_id", "base-type", "feature",
                                   "value"]
    assert len(table) == (EPOCHS + 1) * len(BASELINE_KINDS) * n_rows * len(data.feature_names)
    combinations = table.groupby(["epoch", "row", "base-type", "feature"]).size()
    assert (combinations == 1).all()
    assert sorted(table["epoch"].unique()) == list(range(EPOCHS + 1))
    assert set(table["passenger_id"]) == set(data.test_passenger_ids)
    assert table["value"].notna().all()


def test_table_writes_zero_attributions_without_a_sign(watched):
    callback, _, _ = watched
    # A feature equal to its baseline gets 0 times a gradient: -0.0 where that is negative.
    raw = callback.attributions
    assert torch.signbit(raw[raw == 0]).any()

    values = callback.table()["value"].to_numpy()
    assert (values == 0).sum() == (raw == 0).sum()
    assert not np.signbit(values[values == 0]).any()


def test_last_epoch_equals_a_direct_engine_call_on_the_trained_model(watched, data, baselines):
    callback, trained, _ = watched

    expected = integrated_gradients(trained.net.eval(), data.test_features, baselines,
                                    n_steps=N_STEPS)

    # The same float32 arithmetic on the same weights; the tolerance only allows for a
    # different summation order inside the matrix products.
    torch.testing.assert_close(callback.attributions[-1], expected, rtol=1e-5, atol=1e-7)
    table = callback.table()
    last = table[table["epoch"] == EPOCHS]["value"].to_numpy()
    torch.testing.assert_close(torch.tensor(last), expected.double().flatten(),
                               rtol=1e-5, atol=1e-7)


def test_epoch_zero_explains_the_untrained_model(watched, data, baselines):
    callback, _, _ = watched
    pl.seed_everything(404, workers=True, verbose=False)
    untrained = TitanicClassifier().net.eval()  # what train_titanic starts from

    expected = integrated_gradients(untrained, data.test_features, baselines, n_steps=N_STEPS)

    assert callback.epochs[0] == 0
    torch.testing.assert_close(callback.attributions[0], expected, rtol=1e-5, atol=1e-7)


def test_snapshots_change_as_the_model_learns(watched):
    callback, _, _ = watched
    means = callback.mean_attributions()  # (epochs + 1, baselines, features)
    assert means.shape == (EPOCHS + 1, len(BASELINE_KINDS), 5)
    assert all((means[k] != means[k + 1]).any() for k in range(EPOCHS))


def test_training_with_the_callback_gives_the_same_weights(watched):
    _, with_callback, without = watched
    first, second = with_callback.net.state_dict(), without.net.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_outputs_are_the_survival_probabilities_of_each_snapshot(watched, data):
    callback, trained, _ = watched
    with torch.no_grad():
        expected = trained.net.eval()(data.test_features).squeeze(-1)
    assert callback.outputs.shape == (EPOCHS + 1, len(data.test_index))
    torch.testing.assert_close(callback.outputs[-1], expected)


def test_cost_is_recorded_for_every_snapshot_with_the_epoch_duration(watched):
    callback, _, _ = watched
    assert [cost.epoch for cost in callback.costs] == list(range(EPOCHS + 1))
    assert callback.costs[0].epoch_seconds is None and callback.costs[0].fraction is None
    for cost in callback.costs[1:]:
        assert cost.attribution_seconds > 0 and cost.epoch_seconds > 0
        assert cost.fraction == pytest.approx(cost.attribution_seconds / cost.epoch_seconds)


def test_cost_per_epoch_is_logged(data, baselines, caplog):
    callback = new_callback(data, baselines)
    with caplog.at_level(logging.INFO, logger="engine.callbacks"):
        train_titanic(data, epochs=1, seed=404, accelerator="cpu", progress=False,
                      callbacks=[callback])
    messages = [r.getMessage() for r in caplog.records if r.name == "engine.callbacks"]
    assert any("before training" in m and "ms" in m for m in messages)
    assert any("after epoch 1" in m and "% of the epoch" in m for m in messages)


def test_training_does_not_make_the_snapshots_trace_the_model_again(data, baselines,
                                                                     monkeypatch):
    # The trace is guarded by the attributes forward reads; Lightning's own state, which
    # changes from hook to hook, must not be among them.
    import engine.hoist

    traced = []
    original = engine.hoist.trace
    monkeypatch.setattr(engine.hoist, "trace", lambda model: traced.append(model)
                        or original(model))

    train_titanic(data, epochs=EPOCHS, seed=404, accelerator="cpu", progress=False,
                  callbacks=[new_callback(data, baselines)])

    assert len(traced) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_last_epoch_equals_a_direct_engine_call(data, baselines):
    callback = new_callback(data, baselines)
    trained = train_titanic(data, epochs=2, seed=404, accelerator="gpu", progress=False,
                            callbacks=[callback])

    net = trained.net.cuda().eval()
    expected = integrated_gradients(net, data.test_features.cuda(), baselines.cuda(),
                                    n_steps=N_STEPS)

    # TF32 or a different kernel choice may round differently from the training-time call.
    torch.testing.assert_close(callback.attributions[-1], expected.cpu(), rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------
# Leaving the model as it was


class Mixed(nn.Module):
    """A model with dropout (random, mode-dependent) and a submodule left in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 16)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.frozen(self.drop(torch.tanh(self.hidden(x)))))


def mixed_model() -> Mixed:
    torch.manual_seed(0)
    model = Mixed().train()
    model.frozen.eval()
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    return model


def test_explain_restores_each_submodules_mode(data, baselines):
    model = mixed_model()
    new_callback(data, baselines).explain(model)
    assert model.training and model.hidden.training and model.drop.training
    assert not model.frozen.training


def test_explain_leaves_parameter_gradients_untouched(data, baselines):
    model = mixed_model()
    before = [p.grad.clone() for p in model.parameters()]
    new_callback(data, baselines).explain(model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


class Noisy(nn.Module):
    """Draws random numbers in every forward pass, in any mode (too few to move an output
    beyond rounding: the engine refuses it for the draw itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + 1e-7 * torch.rand_like(x))


def test_explain_leaves_the_random_generator_where_it_was(data, baselines):
    model = Noisy()
    torch.manual_seed(123)
    expected = torch.rand(4)

    torch.manual_seed(123)
    with pytest.raises(ModelError, match="draws random numbers"):
        new_callback(data, baselines).explain(model)
    assert torch.equal(torch.rand(4), expected)


def test_explain_runs_in_eval_mode(data, baselines):
    # Dropout in train mode would make two calls differ; eval mode makes them equal.
    model = mixed_model()
    callback = new_callback(data, baselines)
    first, _ = callback.explain(model)
    second, _ = callback.explain(model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"baseline_names": ("only-one",)}, "1 baseline names for 4 baselines"),
        ({"feature_names": ("a", "b")}, "2 feature names for 5 features"),
        ({"row_ids": [1, 2, 3]}, "3 row ids for 179 rows"),
        ({"baselines": torch.zeros(4, 3)}, "(B, 5)"),
        ({"inputs": torch.zeros(5)}, "(N, F)"),
        ({"target": [0, 1]}, "target must be an integer or 179 integers (one per row), "
                             "got shape (2,)"),
        ({"target": torch.zeros(179)}, "179 integers (one per row), got shape (179,) of "
                                       "torch.float32"),
        ({"target": 0.5}, "179 integers (one per row), got a float"),
    ],
)
def test_mismatched_arguments_are_named(data, baselines, change, message):
    arguments = {
        "inputs": data.test_features, "baselines": baselines,
        "baseline_names": BASELINE_KINDS, "feature_names": data.feature_names,
        "row_ids": data.test_passenger_ids,
    }
    arguments.update(change)
    with pytest.raises(ArgumentError) as err:
        AttributionCallback(
            arguments.pop("inputs"), arguments.pop("baselines"), arguments.pop("baseline_names"),
            arguments.pop("feature_names"), **arguments,
        )
    assert message in str(err.value) and "\n" not in str(err.value)


def test_results_before_any_training_are_an_argument_error(data, baselines):
    with pytest.raises(ArgumentError, match="not seen any training"):
        new_callback(data, baselines).table()


# ---------------------------------------------------------------------------
# Lightning's progress bar: on a terminal, not in CI


def train_one_epoch_on_a_terminal(data, monkeypatch, ci: str | None):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return train_titanic(data, epochs=1, seed=404, accelerator="cpu").trainer


def test_progress_bar_shows_on_a_terminal(data, monkeypatch):
    trainer = train_one_epoch_on_a_terminal(data, monkeypatch, ci=None)
    assert trainer.progress_bar_callback is not None


def test_progress_bar_is_off_in_ci_even_on_a_terminal(data, monkeypatch):
    trainer = train_one_epoch_on_a_terminal(data, monkeypatch, ci="true")
    assert trainer.progress_bar_callback is None


def test_progress_bar_is_off_when_not_on_a_terminal(data, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    trainer = train_titanic(data, epochs=1, seed=404, accelerator="cpu").trainer
    assert trainer.progress_bar_callback is None


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_every_n_epochs_must_be_a_positive_integer(data, baselines, value):
    with pytest.raises(ArgumentError, match="every_n_epochs must be an integer >= 1"):
        AttributionCallback(data.test_features, baselines, BASELINE_KINDS, data.feature_names,
                            every_n_epochs=value)


# ---------------------------------------------------------------------------
# Fewer snapshots, compiled snapshots


def test_every_n_epochs_keeps_the_first_and_last_snapshot(data, baselines):
    callback = AttributionCallback(
        data.test_features, baselines, BASELINE_KINDS, data.feature_names, n_steps=N_STEPS,
        every_n_epochs=2,
    )
    trained = train_titanic(data, epochs=5, seed=404, accelerator="cpu", progress=False,
                            callbacks=[callback])

    assert callback.epochs == [0, 2, 4, 5]
    assert [cost.epoch for cost in callback.costs] == [0, 2, 4, 5]
    assert set(callback.table()["epoch"]) == {0, 2, 4, 5}
    expected = integrated_gradients(trained.net.eval(), data.test_features, baselines,
                                    n_steps=N_STEPS)
    torch.testing.assert_close(callback.attributions[-1], expected, rtol=1e-5, atol=1e-7)


class StopAfter(pl.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_a_run_stopped_between_snapshots_still_snapshots_its_final_model(data, baselines):
    callback = AttributionCallback(
        data.test_features, baselines, BASELINE_KINDS, data.feature_names, n_steps=N_STEPS,
        every_n_epochs=2,
    )
    trained = train_titanic(data, epochs=10, seed=404, accelerator="cpu", progress=False,
                            callbacks=[callback, StopAfter(3)])

    assert callback.epochs == [0, 2, 3]
    expected = integrated_gradients(trained.net.eval(), data.test_features, baselines,
                                    n_steps=N_STEPS)
    torch.testing.assert_close(callback.attributions[-1], expected, rtol=1e-5, atol=1e-7)


def test_compiled_snapshots_equal_eager_ones(data, baselines):
    eager = new_callback(data, baselines)
    compiled = AttributionCallback(
        data.test_features, baselines, BASELINE_KINDS, data.feature_names, n_steps=N_STEPS,
        compile=True,
    )
    train_titanic(data, epochs=2, seed=404, accelerator="cpu", progress=False,
                  callbacks=[eager, compiled])

    torch.testing.assert_close(compiled.attributions, eager.attributions, rtol=1e-4, atol=1e-6)


def test_explain_inside_a_callers_autocast_gives_float32_outputs(data, baselines):
    torch.manual_seed(3)
    model = TitanicClassifier()
    callback = new_callback(data, baselines)
    expected = callback.explain(model)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = callback.explain(model)

    assert got[1].dtype == torch.float32
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


class _TwoClasses(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)

    def training_step(self, batch, _):
        features, labels = batch
        return nn.functional.cross_entropy(self.net(features), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _watched_two_classes(data, baselines, target, epochs):
    """The callback with ``target`` over a two-class model's training; the trained model."""
    callback = AttributionCallback(data.test_features, baselines, BASELINE_KINDS,
                                   data.feature_names, n_steps=N_STEPS, target=target)
    model = _TwoClasses()
    rows = torch.utils.data.TensorDataset(data.features, torch.arange(len(data.features)) % 2)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(model, torch.utils.data.DataLoader(rows, batch_size=256))
    return callback, model.eval()


def _assert_last_snapshot_explains(callback, model, data, baselines, per_row):
    direct = integrated_gradients(model, data.test_features, baselines, target=per_row,
                                  n_steps=N_STEPS)
    with torch.no_grad():
        chosen = model(data.test_features)[torch.arange(len(per_row)), per_row]
    torch.testing.assert_close(callback.attributions[-1], direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(callback.outputs[-1], chosen, rtol=0, atol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_target_per_row_explains_each_rows_own_class(data, baselines, as_tensor):
    torch.manual_seed(0)
    labels = data.test_labels.long()  # each passenger's own outcome as the class
    target = labels if as_tensor else labels.tolist()

    callback, model = _watched_two_classes(data, baselines, target, epochs=2)

    _assert_last_snapshot_explains(callback, model, data, baselines, labels)
    assert callback.epochs == [0, 1, 2]


@pytest.mark.parametrize("target", ["zero-d tensor", "negative per row"])
def test_other_target_forms_the_engine_takes_work_too(data, baselines, target):
    n_rows = len(data.test_features)
    if target == "zero-d tensor":
        given, per_row = torch.tensor(1), torch.ones(n_rows, dtype=torch.long)
    else:
        given = [-1 if row % 2 else -2 for row in range(n_rows)]
        per_row = torch.tensor([1 if row % 2 else 0 for row in range(n_rows)])

    callback, model = _watched_two_classes(data, baselines, given, epochs=1)

    _assert_last_snapshot_explains(callback, model, data, baselines, per_row)


# ---------------------------------------------------------------------------
# Trainer precision, resumed and repeated fits, diverging training


class _Small(pl.LightningModule):
    """A small regression model; ``diverge_at`` fills a weight with nan in that epoch."""

    def __init__(self, diverge_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.diverge_at = diverge_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        features, labels = batch
        if self.current_epoch == self.diverge_at:
            with torch.no_grad():
                self.net[2].weight.fill_(float("nan"))
        return ((self(features).squeeze(-1) - labels) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _small_fit(callback, model, epochs, ckpt_path=None, **trainer_args):
    torch.manual_seed(3)
    x = torch.rand(64, 5)
    rows = torch.utils.data.TensorDataset(x, x[:, 0])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], **trainer_args)
    trainer.fit(model, torch.utils.data.DataLoader(rows, batch_size=32), ckpt_path=ckpt_path)
    return trainer


def _checkpointed(tmp_path, callback, model, epochs):
    """Train ``model`` with ``callback`` for ``epochs`` and save a checkpoint at the end."""
    trainer = _small_fit(callback, model, epochs)
    checkpoint = tmp_path / f"after-{epochs}.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def _small_callback(**kwargs):
    torch.manual_seed(4)
    return AttributionCallback(torch.rand(6, 5), torch.zeros(2, 5), ("zero", "other"),
                               tuple("abcde"), n_steps=N_STEPS, **kwargs)


@pytest.mark.parametrize("precision,dtype", [("64-true", torch.float64),
                                             ("bf16-true", torch.bfloat16)])
def test_a_trainer_that_converts_the_model_gets_rows_in_its_dtype(precision, dtype):
    callback = _small_callback()
    model = _Small()

    _small_fit(callback, model, epochs=1, precision=precision)

    assert callback.epochs == [0, 1]
    assert callback.attributions.dtype == dtype
    expected = integrated_gradients(model.eval(), callback.inputs.to(dtype),
                                    callback.baselines.to(dtype), n_steps=N_STEPS)
    torch.testing.assert_close(callback.attributions[-1], expected)


def test_a_resumed_fit_continues_the_epochs_of_its_checkpoint(tmp_path):
    first = _small_callback()
    checkpoint = _checkpointed(tmp_path, first, _Small(), epochs=2)

    resumed = _small_callback()
    _small_fit(resumed, _Small(), epochs=4, ckpt_path=str(checkpoint))

    assert resumed.epochs == [0, 1, 2, 3, 4]
    # The checkpoint's snapshots came back, and epoch 2 is the checkpoint's model.
    torch.testing.assert_close(resumed.attributions[:3], first.attributions)
    table = resumed.table()
    assert not table.duplicated(["epoch", "row", "base-type", "feature"]).any()


def test_a_checkpoint_of_other_rows_brings_no_snapshots_back(tmp_path, caplog):
    first = _small_callback()
    checkpoint = _checkpointed(tmp_path, first, _Small(), epochs=1)
    other = AttributionCallback(torch.rand(6, 5) + 1, torch.zeros(2, 5), ("zero", "other"),
                                tuple("abcde"), n_steps=N_STEPS)

    with caplog.at_level(logging.WARNING, logger="engine.callbacks"):
        _small_fit(other, _Small(), epochs=2, ckpt_path=str(checkpoint))

    assert other.epochs == [1, 2]
    assert "not kept" in caplog.text


def test_a_second_fit_replaces_the_snapshots_of_the_first(caplog):
    callback = _small_callback()
    model = _Small()
    _small_fit(callback, model, epochs=2)
    before = callback.attributions

    with caplog.at_level(logging.INFO, logger="engine.callbacks"):
        _small_fit(callback, model, epochs=1)

    assert callback.epochs == [0, 1]
    # Its epoch 0 is the model the first fit trained.
    torch.testing.assert_close(callback.attributions[0], before[-1])
    assert not callback.table().duplicated(["epoch", "row", "base-type", "feature"]).any()
    assert "replaced" in caplog.text


def test_training_that_diverges_to_nan_goes_on_with_nan_snapshots(caplog):
    callback = _small_callback()

    with caplog.at_level(logging.WARNING, logger="engine.callbacks"):
        trainer = _small_fit(callback, _Small(diverge_at=1), epochs=3)

    assert trainer.current_epoch == 3
    assert callback.epochs == [0, 1, 2, 3]
    values = callback.attributions
    assert torch.isfinite(values[:2]).all() and values[2:].isnan().all()
    assert callback.outputs[2:].isnan().all()
    assert "attribution callback, after epoch 2" in caplog.text
    assert "weights hold nan" in caplog.text


class _Growing(_Small):
    """A model whose attributions pass 65,504 in float16 once its weights grow, while its
    outputs stay 0: two features weighted +w and -w."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 1, bias=False))
        self._set_weights(1.0)

    def _set_weights(self, size: float) -> None:
        with torch.no_grad():
            self.net[0].weight.copy_(torch.tensor([[size, -size, 0.0, 0.0, 0.0]]))

    def training_step(self, batch, _):
        if self.current_epoch == 1:
            self._set_weights(1000.0)
        return self(batch[0]).sum() * 0.0


def test_attributions_that_overflow_a_half_precision_model_go_on_as_nan_snapshots(caplog):
    # Trainer(precision="16-true") makes the callback explain in float16: rows of 100
    # against zeros give +-100, then +-100,000 once the weights are +-1,000. Before, the
    # overflow stopped the fit with an ArgumentError.
    callback = AttributionCallback(torch.full((3, 5), 100.0), torch.zeros(1, 5), ("zero",),
                                   tuple("abcde"), n_steps=N_STEPS)

    with caplog.at_level(logging.WARNING, logger="engine.callbacks"):
        trainer = _small_fit(callback, _Growing(), epochs=3, precision="16-true")

    assert trainer.current_epoch == 3
    values = callback.attributions
    assert values.dtype == torch.float16
    assert torch.isfinite(values[:2]).all() and values[2:].isnan().all()
    assert "attribution callback, after epoch 2" in caplog.text
    assert "overflow float16 (largest value 65,504)" in caplog.text


def test_a_failing_snapshot_says_it_comes_from_the_callback():
    class TakesADict(_Small):
        def forward(self, batch):
            return self.net(batch["x"])

        def training_step(self, batch, _):
            features, labels = batch
            return ((self({"x": features}).squeeze(-1) - labels) ** 2).mean()

    with pytest.raises(TypeError) as error:
        _small_fit(_small_callback(), TakesADict(), epochs=1)
    if sys.version_info < (3, 11):
        pytest.skip("exception notes need Python 3.11")
    assert "attribution callback, before training: the callback calls the model on (6, 5) " \
        "rows" in error.value.__notes__


def test_an_engine_error_of_a_snapshot_names_the_callback_and_the_epoch():
    class Coupled(_Small):
        def forward(self, x):
            hidden = self.net[0](x)
            return self.net[2](torch.tanh(hidden - hidden.mean(0)))

    with pytest.raises(ModelError, match=r"^attribution callback, before training: the "
                                         r"model's output for a row changed"):
        _small_fit(_small_callback(), Coupled(), epochs=1)


@pytest.mark.parametrize("change,message", [
    ({"n_steps": 0}, "n_steps=0 is too small"),
    ({"method": "simpson"}, "unknown method 'simpson'"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"baseline_names": ("zero", "zero")}, "baseline names must differ, got 'zero'"),
])
def test_bad_settings_are_refused_when_the_callback_is_made(change, message):
    arguments = {"baseline_names": ("zero", "other"), **change}
    with pytest.raises(ArgumentError, match=message):
        AttributionCallback(torch.rand(6, 5), torch.zeros(2, 5), arguments.pop("baseline_names"),
                            tuple("abcde"), **arguments)


def test_every_n_epochs_takes_a_numpy_integer():
    assert _small_callback(every_n_epochs=np.int64(2)).every_n_epochs == 2


def test_a_fit_resumed_within_an_epoch_keeps_that_epochs_snapshot(tmp_path):
    # Two steps per epoch; the checkpoint is taken after three, in the second epoch.
    first = _small_callback()
    torch.manual_seed(3)
    x = torch.rand(64, 5)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[first, saver])
    trainer.fit(_Small(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0]),
                                                      batch_size=32))
    (checkpoint,) = tmp_path.glob("*step=3.ckpt")

    resumed = _small_callback()
    _small_fit(resumed, _Small(), epochs=3, ckpt_path=str(checkpoint))

    assert resumed.epochs == [0, 1, 2, 3]
    # Epoch 1 is the snapshot taken at that epoch's end, not the weights one step later.
    torch.testing.assert_close(resumed.attributions[:2], first.attributions[:2])


def test_a_resumed_fit_may_snapshot_at_another_pace(tmp_path):
    first = _small_callback()
    checkpoint = _checkpointed(tmp_path, first, _Small(), epochs=2)

    resumed = _small_callback(every_n_epochs=2)
    _small_fit(resumed, _Small(), epochs=4, ckpt_path=str(checkpoint))

    assert resumed.epochs == [0, 1, 2, 4]


class _Validated(_Small):
    def validation_step(self, batch, _):
        features, labels = batch
        return ((self(features).squeeze(-1) - labels) ** 2).mean()


def test_validating_from_a_checkpoint_leaves_the_snapshots_as_they_are(tmp_path):
    callback = _small_callback()
    checkpoint = _checkpointed(tmp_path, callback, _Validated(), epochs=2)
    model = _Validated()
    trainer = _small_fit(callback, model, epochs=4)
    held = callback.attributions

    x = torch.rand(16, 5)
    trainer.validate(model, torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, 0]), batch_size=8), ckpt_path=str(checkpoint),
        verbose=False)

    assert callback.epochs == [0, 1, 2, 3, 4]
    assert torch.equal(callback.attributions, held)


def test_numpy_names_and_steps_give_a_checkpoint_that_loads_weights_only(tmp_path):
    def numpy_callback():
        torch.manual_seed(4)
        return AttributionCallback(torch.rand(6, 5), torch.zeros(2, 5), np.array(["z", "o"]),
                                   np.array(list("abcde")), n_steps=np.int64(N_STEPS))

    checkpoint = _checkpointed(tmp_path, numpy_callback(), _Small(), epochs=1)
    torch.load(checkpoint, weights_only=True)  # what Lightning does by default

    resumed = numpy_callback()
    _small_fit(resumed, _Small(), epochs=2, ckpt_path=str(checkpoint))
    assert resumed.epochs == [0, 1, 2]


@pytest.mark.parametrize("change", [{"rows": True}, {"every_n_epochs": 2},
                                    {"internal_batch_size": 4}])
def test_two_callbacks_that_differ_train_side_by_side(change):
    first = _small_callback()
    torch.manual_seed(9)
    rows = torch.rand(6, 5) if change.pop("rows", False) else first.inputs
    second = AttributionCallback(rows, first.baselines, first.baseline_names,
                                 first.feature_names, n_steps=N_STEPS, **change)
    torch.manual_seed(3)
    x = torch.rand(64, 5)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[first, second])
    trainer.fit(_Small(), torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, 0]), batch_size=32))

    assert first.epochs == [0, 1, 2] and second.epochs[-1] == 2


@pytest.mark.parametrize("change", [{"compile": True}, {"precision": "tf32"}])
def test_a_fit_resumed_with_other_settings_keeps_the_snapshots(tmp_path, change):
    checkpoint = _checkpointed(tmp_path, _small_callback(), _Small(), epochs=2)

    resumed = _small_callback(**change)
    _small_fit(resumed, _Small(), epochs=3, ckpt_path=str(checkpoint))

    assert resumed.epochs == [0, 1, 2, 3]


def _fit_with_validation_checkpoints(tmp_path, callback, epochs):
    """Fit ``_Validated`` with checkpoints saved at each validation's end, which comes
    before the callback's end of that epoch (as with ``monitor=`` or
    ``val_check_interval`` < 1)."""
    torch.manual_seed(3)
    x = torch.rand(64, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0]),
                                         batch_size=16)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1,
                                         save_on_train_epoch_end=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, saver])
    trainer.fit(_Validated(), loader, loader)
    return loader


def test_a_fit_resumed_from_a_validation_checkpoint_snapshots_as_one_never_stopped(tmp_path):
    full = _small_callback(every_n_epochs=2)
    loader = _fit_with_validation_checkpoints(tmp_path, full, epochs=4)
    (checkpoint,) = tmp_path.glob("epoch=1-*.ckpt")  # weights after two epochs

    resumed = _small_callback(every_n_epochs=2)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[resumed])
    trainer.fit(_Validated(), loader, loader, ckpt_path=str(checkpoint))

    assert full.epochs == [0, 2, 4]
    assert resumed.epochs == [0, 2, 4]
    # Epoch 2 explains the checkpoint's weights, the same as the run never stopped.
    torch.testing.assert_close(resumed.attributions[:2], full.attributions[:2])


def test_snapshots_read_for_a_validation_are_not_taken_up_by_a_later_fit(tmp_path):
    callback = _small_callback()
    with_snapshots = _checkpointed(tmp_path, callback, _Validated(), epochs=2)
    held = callback.attributions
    # A checkpoint of another run, saved without the callback.
    plain = tmp_path / "plain.ckpt"
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    torch.manual_seed(11)
    x = torch.rand(64, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0]),
                                         batch_size=32)
    trainer.fit(_Validated(), loader)
    trainer.save_checkpoint(plain)

    later = _small_callback()
    validator = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                           enable_model_summary=False, callbacks=[later])
    validator.validate(_Validated(), loader, ckpt_path=str(with_snapshots), verbose=False)
    _small_fit(later, _Validated(), epochs=3, ckpt_path=str(plain))

    # Only the plain checkpoint's own fit: its weights at epoch 1, then epochs 2 and 3.
    assert later.epochs == [1, 2, 3]
    assert not any(torch.equal(snapshot, old) for snapshot in later.attributions
                   for old in held)
