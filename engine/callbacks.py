"""Attribution during training: the same explanation after every epoch, as a tidy table.

A Lightning callback explains a fixed set of rows against fixed baselines before the first
epoch and after each one, with one batched call of the engine per epoch. The model is
only read: its modes, parameters, gradients and the random number generators are left
exactly as training had them, so a run with the callback trains the same weights as a
run without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from engine.core import integrated_gradients
from engine.errors import ArgumentError, EngineError, NonFiniteError
from engine.io import signless_zeros
from engine.plan import run_options
from engine.quadrature import check_method
from engine.step import owns_precision

__all__ = ["AttributionCallback", "EpochCost"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochCost:
    """Seconds spent attributing at one epoch, next to the seconds the epoch took.

    ``epoch_seconds`` runs from the epoch's start to its end hook, validation included;
    it is None for the snapshot taken before training.
    """

    epoch: int
    attribution_seconds: float
    epoch_seconds: float | None

    @property
    def fraction(self) -> float | None:
        """Attribution time over epoch time, or None before training."""
        if not self.epoch_seconds:
            return None
        return self.attribution_seconds / self.epoch_seconds


class AttributionCallback(pl.Callback):
    """Integrated Gradients of chosen rows against chosen baselines at every epoch.

    Snapshots are labelled by the number of finished epochs: ``epoch 0`` is the model
    before training, ``epoch k`` the model after ``k`` epochs. A fit resumed from a
    checkpoint starts at the checkpoint's epoch, and gets the snapshots before it back
    from the checkpoint (see :meth:`state_dict`); a later fit that starts at an epoch
    already held replaces the snapshots from there on. A snapshot of a model whose
    outputs or gradients are nan or inf (training diverged) holds nan and is logged as a
    warning; training goes on.

    Parameters
    ----------
    inputs
        ``(N, F)`` rows to explain, for the Titanic job the test set.
    baselines
        ``(B, F)`` baselines, one per kind.
    baseline_names
        ``B`` names, for the ``base-type`` column.
    feature_names
        ``F`` names, for the ``feature`` column.
    row_ids
        ``N`` identifiers (passenger ids) for a ``passenger_id`` column; optional.
    target
        None for a model with one output; the output column to explain (an integer); or
        one column per row (``N`` integers, a list or a tensor), as in
        :func:`engine.integrated_gradients`.
    n_steps, method, internal_batch_size, compile, precision
        Passed to :func:`engine.integrated_gradients`. ``compile=True`` compiles once, at
        the snapshot before training (seconds). On a CPU with numba the Titanic job then
        compiles only the model's tail, and its snapshots were slower than eager ones
        (2.8 against 2.5 ms).
        On a CPU, :func:`engine.keep_freed_memory` (which the command line calls) saves
        the page faults of every snapshot's chunks.
    every_n_epochs
        Snapshot after every n-th epoch (and always after the last one); the snapshot
        before training is always taken.

    Attributes
    ----------
    epochs : list of int
        The epoch of each snapshot: ``[0, 1, ..., E]`` after a full run, or
        ``[0, n, 2n, ..., E]`` with ``every_n_epochs=n``.
    costs : list of EpochCost
        Seconds spent per snapshot, and the epoch's own duration.
    """

    def __init__(
        self,
        inputs: Tensor,
        baselines: Tensor,
        baseline_names: Sequence[str],
        feature_names: Sequence[str],
        *,
        row_ids: Sequence[int] | None = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        target: int | Sequence[int] | Tensor | None = None,
        internal_batch_size: int | None = None,
        compile: bool | str = False,
        precision: str = "fp32",
        every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, numbers.Integral) \
                or every_n_epochs < 1:
            raise ArgumentError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        # The engine would check these at the first snapshot, once training has started.
        check_method(method, n_steps)
        run_options(compile=compile, precision=precision)
        if not isinstance(inputs, Tensor) or inputs.dim() != 2:
            raise ArgumentError(f"inputs must be a (N, F) tensor, got {_describe(inputs)}")
        if not isinstance(baselines, Tensor) or baselines.shape[1:] != inputs.shape[1:]:
            raise ArgumentError(
                f"baselines must be a (B, {inputs.shape[1]}) tensor, got {_describe(baselines)}"
            )
        if len(baseline_names) != baselines.shape[0]:
            raise ArgumentError(
                f"got {len(baseline_names)} baseline names for {baselines.shape[0]} baselines"
            )
        if len(feature_names) != inputs.shape[1]:
            raise ArgumentError(
                f"got {len(feature_names)} feature names for {inputs.shape[1]} features"
            )
        if row_ids is not None and len(row_ids) != inputs.shape[0]:
            raise ArgumentError(f"got {len(row_ids)} row ids for {inputs.shape[0]} rows")
        for kind, names in (("baseline", baseline_names), ("feature", feature_names)):
            repeated = sorted({str(name) for name in names if list(names).count(name) > 1})
            if repeated:
                raise ArgumentError(
                    f"{kind} names must differ, got {', '.join(map(repr, repeated))} more than once"
                )

        self.inputs = inputs.detach()
        self.baselines = baselines.detach()
        # Plain Python values (not numpy's): they go into checkpoints, which Lightning
        # loads with torch's weights-only unpickler.
        self.baseline_names = tuple(str(name) for name in baseline_names)
        self.feature_names = tuple(str(name) for name in feature_names)
        self.row_ids = None if row_ids is None else np.asarray(row_ids)
        self.n_steps = int(n_steps)
        self.method = method
        self.target = _checked_target(target, inputs.shape[0])
        self.internal_batch_size = internal_batch_size
        self.compile = compile
        self.precision = precision
        self.every_n_epochs = int(every_n_epochs)

        self.epochs: list[int] = []
        self.costs: list[EpochCost] = []
        self._snapshots: list[Tensor] = []  # each (B, N, F) on the CPU
        self._outputs: list[Tensor] = []  # each (N,) on the CPU
        self._epoch_started: float | None = None
        # The last finished epoch not yet snapshotted, and how long it took.
        self._pending: tuple[int, float | None] | None = None
        # Snapshots read from a checkpoint, taken up when a fit resumes from it.
        self._restored: dict[str, object] | None = None

    # -- Lightning hooks ------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint starts after the epochs it had finished.
        epoch = trainer.current_epoch
        restored, self._restored = self._restored, None
        if trainer.ckpt_path is not None and restored is not None:
            self._take_up(restored)
            # The checkpoint's snapshots stand for the epochs it had finished, as in a fit
            # never stopped; its weights get theirs at the next epoch end that is due. A
            # checkpoint saved at validation's end, before this epoch's end, holds weights
            # past what the epoch number names, and Lightning runs that end again.
            self._forget_from(epoch + 1)
            return
        if trainer.ckpt_path is not None and epoch in self.epochs:
            # The checkpoint brought this epoch's snapshot back with the others. Its
            # weights may be past it (a checkpoint taken within the next epoch), which no
            # epoch number names: the snapshot taken at the epoch's end stays.
            self._forget_from(epoch + 1)
            return
        self._snapshot(pl_module, epoch=epoch, epoch_seconds=None)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch_seconds = None
        if self._epoch_started is not None:
            epoch_seconds = time.perf_counter() - self._epoch_started
        finished = trainer.current_epoch + 1
        if finished % self.every_n_epochs == 0 or finished == trainer.max_epochs:
            self._pending = None
            self._snapshot(pl_module, epoch=finished, epoch_seconds=epoch_seconds)
        else:
            self._pending = (finished, epoch_seconds)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training stopped early between two snapshots: the final model still gets one.
        if self._pending is not None:
            finished, epoch_seconds = self._pending
            self._pending = None
            self._snapshot(pl_module, epoch=finished, epoch_seconds=epoch_seconds)

    # -- The work -------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # Lightning keeps each callback's state under its key and refuses two callbacks
        # with one key, so every setting goes in. A resumed fit finds its snapshots by
        # what they explain instead (see on_load_checkpoint), whatever the settings.
        return self._generate_state_key(
            layout=self._layout(), compile=self.compile, precision=self.precision,
            every_n_epochs=self.every_n_epochs, internal_batch_size=self.internal_batch_size,
        )

    def state_dict(self) -> dict[str, object]:
        """The snapshots so far, for Lightning's checkpoints: a fit resumed from one
        keeps the epochs before it."""
        return {
            "layout": self._layout(),
            "epochs": list(self.epochs),
            "snapshots": list(self._snapshots),
            "outputs": list(self._outputs),
            "costs": [(c.epoch, c.attribution_seconds, c.epoch_seconds) for c in self.costs],
        }

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Keep the snapshots of :meth:`state_dict` for a fit that resumes from the
        checkpoint, if they explain the same rows against the same baselines and features
        with the same steps, method and target. A test or validation run from a
        checkpoint leaves the snapshots as they are."""
        if state_dict.get("layout") == self._layout():
            self._restored = state_dict

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, object]) -> None:
        # Saved by a callback with other settings (every_n_epochs, compile, precision),
        # the snapshots are under another key: find them by what they explain. Each
        # checkpoint replaces what an earlier one (a validate or test run) left pending.
        self._restored = None
        layout, others = self._layout(), 0
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if not (str(key).startswith(type(self).__qualname__) and isinstance(state, dict)):
                continue
            if state.get("layout") == layout:
                self._restored = state
                return
            others += 1
        if others:
            log.warning("the checkpoint's attribution snapshots explain other rows, baselines, "
                        "features, steps or targets: they are not kept")

    def _take_up(self, state: dict[str, object]) -> None:
        self.epochs = [int(e) for e in state["epochs"]]
        self._snapshots = list(state["snapshots"])
        self._outputs = list(state["outputs"])
        self.costs = [EpochCost(*cost) for cost in state["costs"]]

    def _layout(self) -> tuple[object, ...]:
        """What the snapshots explain: rows, baselines, features, steps, method, target."""
        values = hashlib.sha256()
        for tensor in (self.inputs, self.baselines):
            values.update(tensor.detach().cpu().contiguous().double().numpy().tobytes())
        target = self.target.tolist() if isinstance(self.target, Tensor) else self.target
        return (tuple(self.inputs.shape), self.baseline_names, self.feature_names,
                self.n_steps, self.method, repr(target), values.hexdigest())

    @owns_precision
    def explain(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """Attributions ``(B, N, F)`` and outputs ``(N,)`` of ``model``, leaving it untouched.

        The model is put in eval mode for the call and every submodule gets its own mode
        back afterwards; the random number generators are restored; parameter gradients
        are never written (the engine differentiates with respect to the inputs only).
        A caller's autocast is off for the call, outputs included (see
        ``engine.step.owns_precision``); ``precision`` decides. The rows and baselines go
        to the model's device and floating dtype (a Trainer with ``precision="64-true"``
        or ``"bf16-true"`` converts the model).
        """
        device, dtype = _device_and_dtype(model, self.inputs)
        inputs = self.inputs.to(device=device, dtype=dtype)
        baselines = self.baselines.to(device=device, dtype=dtype)
        target = self.target.to(device) if isinstance(self.target, Tensor) else self.target

        with _eval_mode(model), _kept_rng(device):
            attributions = integrated_gradients(
                model, inputs, baselines, target=target, n_steps=self.n_steps,
                method=self.method, internal_batch_size=self.internal_batch_size,
                compile=self.compile, precision=self.precision,
            )
            with torch.no_grad():
                outputs = model(inputs)
        if isinstance(target, Tensor):
            # Negative indices count from the end, as the engine (which checked them) reads.
            index = torch.where(target < 0, target + outputs.shape[1], target)
            outputs = outputs.gather(1, index.view(-1, 1))
        elif target is not None:
            outputs = outputs[:, target]
        return attributions.detach(), outputs.detach().reshape(inputs.shape[0])

    def _snapshot(self, model: nn.Module, *, epoch: int, epoch_seconds: float | None) -> None:
        self._forget_from(epoch)
        started = time.perf_counter()
        try:
            attributions, outputs = self.explain(model)
        except NonFiniteError as error:
            # Training that diverged goes on as it would without the callback.
            log.warning("%s: %s; its attributions are nan", self._when(epoch, epoch_seconds),
                        error)
            attributions, outputs = self._nan_snapshot(model)
        except EngineError as error:
            raise type(error)(f"{self._when(epoch, epoch_seconds)}: {error}") from error
        except Exception as error:
            # The model's own error (a forward that takes no (N, F) tensor, say): as it is,
            # with a note on where it came from.
            if hasattr(error, "add_note"):  # Python 3.11 on
                error.add_note(f"{self._when(epoch, epoch_seconds)}: the callback calls the "
                               f"model on ({self.inputs.shape[0]}, {self.inputs.shape[1]}) rows")
            raise
        attributions, outputs = attributions.cpu(), outputs.cpu()
        seconds = time.perf_counter() - started

        self.epochs.append(epoch)
        self._snapshots.append(attributions)
        self._outputs.append(outputs)
        cost = EpochCost(epoch, seconds, epoch_seconds)
        self.costs.append(cost)
        if cost.fraction is None:
            log.info("attribution before training: %.1f ms", seconds * 1e3)
        else:
            log.info(
                "attribution after epoch %d: %.1f ms, %.0f%% of the epoch's %.1f ms",
                epoch, seconds * 1e3, 100 * cost.fraction, epoch_seconds * 1e3,
            )

    @staticmethod
    def _when(epoch: int, epoch_seconds: float | None) -> str:
        when = "before training" if epoch_seconds is None else f"after epoch {epoch}"
        return f"attribution callback, {when}"

    def _forget_from(self, epoch: int) -> None:
        """Drop the snapshots from ``epoch`` on: training went back there (a fit resumed
        from an earlier checkpoint, or a new fit), and the new ones replace them."""
        kept = [i for i, e in enumerate(self.epochs) if e < epoch]
        if len(kept) == len(self.epochs):
            return
        log.info("attribution snapshots from epoch %d on are replaced: training starts "
                 "again there", epoch)
        self.epochs = [self.epochs[i] for i in kept]
        self._snapshots = [self._snapshots[i] for i in kept]
        self._outputs = [self._outputs[i] for i in kept]
        self.costs = [self.costs[i] for i in kept]

    def _nan_snapshot(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        _, dtype = _device_and_dtype(model, self.inputs)
        n_rows = self.inputs.shape[0]
        return (torch.full((self.baselines.shape[0], *self.inputs.shape), float("nan"),
                           dtype=dtype),
                torch.full((n_rows,), float("nan"), dtype=dtype))

    # -- Results --------------------------------------------------------------------------

    @property
    def attributions(self) -> Tensor:
        """``(E + 1, B, N, F)`` attributions, one snapshot per entry of :attr:`epochs`."""
        if not self._snapshots:
            raise ArgumentError("no attributions yet: the callback has not seen any training")
        return torch.stack(self._snapshots)

    @property
    def outputs(self) -> Tensor:
        """``(E + 1, N)`` model outputs (survival probabilities) of the explained rows."""
        if not self._outputs:
            raise ArgumentError("no outputs yet: the callback has not seen any training")
        return torch.stack(self._outputs)

    def mean_attributions(self) -> np.ndarray:
        """``(E + 1, B, F)`` mean attribution per feature over the rows, per epoch."""
        return self.attributions.mean(dim=2).double().numpy()

    def table(self) -> pd.DataFrame:
        """Rows ``epoch, row, [passenger_id,] base-type, feature, value``.

        One row per epoch x baseline x explained row x feature, epochs in order.
        """
        stacked = self.attributions  # (E + 1, B, N, F)
        n_epochs, n_kinds, n_rows, n_features = stacked.shape
        epoch, kind, row, feature = np.meshgrid(
            np.arange(n_epochs), np.arange(n_kinds), np.arange(n_rows), np.arange(n_features),
            indexing="ij",
        )
        columns = {"epoch": np.asarray(self.epochs)[epoch.ravel()], "row": row.ravel()}
        if self.row_ids is not None:
            columns["passenger_id"] = self.row_ids[row.ravel()]
        columns["base-type"] = np.asarray(self.baseline_names)[kind.ravel()]
        columns["feature"] = np.asarray(self.feature_names)[feature.ravel()]
        columns["value"] = signless_zeros(stacked.double().numpy().ravel())
        return pd.DataFrame(columns)


def _checked_target(target: object, n_rows: int) -> int | Tensor | None:
    """None, one output column for every row, or a (N,) tensor of one column per row."""
    if target is None:
        return None
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return int(target)
    values = None
    if isinstance(target, (list, tuple, Tensor, np.ndarray)):
        try:
            values = torch.as_tensor(target).detach()
        except (TypeError, ValueError, RuntimeError):
            values = None
    integral = values is not None and not values.is_floating_point() \
        and not values.is_complex() and values.dtype != torch.bool
    if integral and values.dim() == 0:
        return int(values.item())  # one index for every row, as integrated_gradients takes
    if integral and values.dim() == 1 and values.shape[0] == n_rows:
        return values.to(torch.long).cpu()
    shown = f"{_describe(values)} of {values.dtype}" if values is not None else \
        _describe(target)
    raise ArgumentError(
        f"target must be an integer or {n_rows} integers (one per row), got {shown}"
    )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _device_and_dtype(model: nn.Module, rows: Tensor) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter and the dtype of its first floating one;
    the rows' own for a model without them."""
    device, dtype = None, None
    for parameter in model.parameters():
        device = parameter.device if device is None else device
        if parameter.is_floating_point():
            dtype = parameter.dtype
            break
    return (rows.device if device is None else device,
            rows.dtype if dtype is None else dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; each submodule gets back its own mode, mixed or not."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _kept_rng(device: torch.device) -> Iterator[None]:
    """Restore the CPU (and the current CUDA device's) generator after the block.

    The engine draws no random numbers today; restoring costs microseconds and keeps
    training identical even if a model samples in its forward pass.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
