"""The article's Titanic network, its Lightning wrapper, training and checkpoints."""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import io
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import pytorch_lightning as pl
import torch
from torch import nn

from engine.data import FEATURES, TitanicData, TitanicDataModule, file_kind
from engine.errors import ArgumentError, CheckpointError
from engine.io import atomic_path
from engine.progress import on_a_terminal
from engine.step import non_finite_weights

__all__ = [
    "CHECKPOINT_FORMAT",
    "LAYER_ORDERS",
    "TitanicClassifier",
    "TitanicMLP",
    "load_weights",
    "load_weights_with_sha256",
    "predict_proba",
    "save_weights",
    "train_titanic",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "engine.titanic_mlp/1"

# The names of the modules each forward pass applies, in call order; the
# sigmoid always comes last.
LAYER_ORDERS = {
    "article": ("l1", "l2", "r1", "out", "r2"),
    "conventional": ("l1", "r1", "l2", "r2", "out"),
}

N_FEATURES = len(FEATURES)
HIDDEN = 128

_LIGHTNING_LOGGERS = (
    "lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric",
)


class TitanicMLP(nn.Module):
    """The article's 5-128-128-1 network with PReLU activations and a sigmoid.

    The modules are defined as ``l1 = Linear(5, 128)``, ``r1 = PReLU()``,
    ``l2 = Linear(128, 128)``, ``r2 = PReLU()`` and ``out = Linear(128, 1)``.
    Both PReLUs hold a single shared slope, so either may act on any width.

    Two call orders are offered:

    ``"article"`` (default)
        ``l1 -> l2 -> r1 -> out -> r2 -> sigmoid``: the article's forward pass,
        which calls ``l1, r1, out, r2`` in that order with ``l2`` straight after
        ``l1``. The two leading Linear layers are back to back with nothing
        between them, so together they are one affine map ``5 -> 128`` that
        holds most of the network's arithmetic (the 128 x 128 product); the
        second PReLU acts on the single output logit.
    ``"conventional"``
        ``l1 -> r1 -> l2 -> r2 -> out -> sigmoid``: the textbook order.

    Parameters
    ----------
    layer_order
        ``"article"`` or ``"conventional"``.

    Raises
    ------
    ArgumentError
        If ``layer_order`` is neither.
    """

    def __init__(self, layer_order: str = "article") -> None:
        super().__init__()
        self.layer_order = _checked_order(layer_order)
        self.l1 = nn.Linear(N_FEATURES, HIDDEN)
        self.r1 = nn.PReLU()
        self.l2 = nn.Linear(HIDDEN, HIDDEN)
        self.r2 = nn.PReLU()
        self.out = nn.Linear(HIDDEN, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 5)`` features to ``(N, 1)`` survival probabilities."""
        for name in LAYER_ORDERS[self.layer_order]:
            x = getattr(self, name)(x)
        return self.sigmoid(x)

    def extra_repr(self) -> str:
        return f"layer_order={self.layer_order!r}"


def _checked_order(layer_order: object) -> str:
    if not isinstance(layer_order, str) or layer_order not in LAYER_ORDERS:
        raise ArgumentError(
            f"layer_order must be one of {', '.join(map(repr, LAYER_ORDERS))},"
            f" got {layer_order!r}"
        )
    return str(layer_order)


class TitanicClassifier(pl.LightningModule):
    """Trains a :class:`TitanicMLP` with Adam and binary cross-entropy, as the article did.

    Parameters
    ----------
    layer_order
        Passed to :class:`TitanicMLP`.
    lr
        Adam's learning rate; the article used 0.01.
    """

    def __init__(self, layer_order: str = "article", lr: float = 0.01) -> None:
        super().__init__()
        # Lightning's checkpoints then store the call order, which load_weights reads.
        self.save_hyperparameters()
        self.net = TitanicMLP(layer_order)
        self.lr = lr
        self.loss_fn = nn.BCELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 5)`` features -> ``(N, 1)`` probabilities."""
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        features, labels = batch
        loss = self.loss_fn(self(features).squeeze(-1), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).squeeze(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def _score(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        features, labels = batch
        probabilities = self(features).squeeze(-1)
        loss = self.loss_fn(probabilities, labels)
        accuracy = ((probabilities > 0.5).float() == labels).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, batch_size=len(labels))


# ---------------------------------------------------------------------------
# Training and prediction


def train_titanic(
    data: TitanicData,
    *,
    epochs: int = 20,
    seed: int = 404,
    accelerator: str = "auto",
    layer_order: str = "article",
    progress: bool | None = None,
    callbacks: Iterable[pl.Callback] = (),
) -> TitanicClassifier:
    """Train the article's network on the prepared Titanic table.

    Parameters
    ----------
    data
        The prepared table; training uses its train rows, validation its test
        rows.
    epochs
        Passes over the training rows; the article used 20.
    seed
        Seeds weights, shuffling and every other random draw, so the same seed
        gives the same weights on the same machine.
    accelerator
        Lightning's accelerator name (``"cpu"``, ``"gpu"``, ``"auto"``).
    layer_order
        See :class:`TitanicMLP`.
    progress
        Show Lightning's progress bar; by default only on a terminal outside CI.
    callbacks
        Extra Lightning callbacks, for example per-epoch attribution.

    Returns
    -------
    TitanicClassifier
        The trained module, in eval mode, on the CPU.

    Raises
    ------
    ArgumentError
        If ``epochs`` is not a positive integer, ``data`` is not a
        :class:`TitanicData` or ``layer_order`` is unknown.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ArgumentError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(data, TitanicData):
        raise ArgumentError(f"data must be a TitanicData, got {type(data).__name__}")
    if progress is None:
        progress = on_a_terminal() and not os.environ.get("CI")

    with quiet_lightning(), _restored_determinism():
        # Seeding first makes the initial weights part of what the seed fixes.
        pl.seed_everything(seed, workers=True)
        module = TitanicClassifier(layer_order=layer_order)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            deterministic=True,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
            # Two batches an epoch: log each step so Lightning does not warn
            # that the logging interval exceeds the epoch.
            log_every_n_steps=1,
        )
        logger.info("training the Titanic network for %d epochs (seed %d)", epochs, seed)
        trainer.fit(module, datamodule=TitanicDataModule(data, seed=seed))

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    logger.info("trained: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return module.cpu().eval()


@contextlib.contextmanager
def quiet_lightning(*messages: str) -> Iterator[None]:
    """Hide Lightning's info chatter and its warning about data loader workers.

    The data fit in memory and batches are slices of one tensor, so worker
    processes would only add start-up time.
    """
    saved = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # Lightning 2.6 on a newer torch reports its own use of a deprecated
            # pytree class; nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            # Callers add warnings of their own that nobody can act on.
            for message in messages:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _restored_determinism() -> Iterator[None]:
    """Undo the process-wide switch ``Trainer(deterministic=True)`` leaves on.

    Left on, it would make later code (attribution kernels on a GPU, say) fail
    on operations that have no deterministic implementation.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def predict_proba(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Survival probability of each row, without tracking gradients.

    Parameters
    ----------
    net
        A :class:`TitanicMLP`, a :class:`TitanicClassifier` or any module that
        maps ``(N, 5)`` to ``(N, 1)``. It is evaluated in eval mode and put back
        in the mode it was in.
    features
        ``(N, 5)`` prepared features.

    Returns
    -------
    torch.Tensor
        ``(N,)`` probabilities on the network's device.

    Raises
    ------
    ArgumentError
        If ``features`` is not a ``(N, 5)`` tensor.
    """
    if not isinstance(features, torch.Tensor):
        raise ArgumentError(
            f"features must be a (N, {N_FEATURES}) tensor, got a {type(features).__name__}"
        )
    if features.ndim != 2 or features.shape[1] != N_FEATURES:
        raise ArgumentError(
            f"features must be a (N, {N_FEATURES}) tensor, got shape {tuple(features.shape)}"
        )

    parameter = next(net.parameters(), None)
    if parameter is not None:
        features = features.to(device=parameter.device, dtype=parameter.dtype)

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net(features).squeeze(-1)
    finally:
        net.train(was_training)


# ---------------------------------------------------------------------------
# Checkpoints


def save_weights(net: TitanicMLP | TitanicClassifier, path: str | Path) -> Path:
    """Save the network's weights and call order, atomically.

    The file is a plain dict of tensors and strings, so it loads with
    ``torch.load(path, weights_only=True)`` and never needs to run code.

    Parameters
    ----------
    net
        The network, or the Lightning module that holds it.
    path
        Where to write; missing parent folders are created.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ArgumentError
        If ``net`` is not a Titanic network.
    """
    net = net.net if isinstance(net, TitanicClassifier) else net
    if not isinstance(net, TitanicMLP):
        raise ArgumentError(f"net must be a TitanicMLP, got {type(net).__name__}")
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "layer_order": net.layer_order,
        "state_dict": {name: value.detach().cpu() for name, value in net.state_dict().items()},
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, temporary.open("wb") as stream:
        torch.save(payload, stream)
        stream.flush()
        os.fsync(stream.fileno())
    logger.info("saved Titanic network weights to %s", path)
    return path


# What torch.load raises on a file that is not a checkpoint: bad bytes, a cut
# file, or a pickle that would need to run code (refused by weights_only).
_UNREADABLE = (
    pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
    KeyError, TypeError, AttributeError, IndexError, ImportError,
)


def load_weights(path: str | Path, layer_order: str | None = None) -> TitanicMLP:
    """Load a network saved by :func:`save_weights`.

    Loading uses ``torch.load(weights_only=True)``: a file that would run code
    when unpickled is refused, not executed. A checkpoint that Lightning's Trainer
    saved of a :class:`TitanicClassifier` is read too (its ``net.*`` weights and the
    call order among its hyper-parameters). A bare state dict (a mapping of
    parameter names to tensors) is accepted too; it stores no call order, so unless
    ``layer_order`` is given it gets the article order, with a logged warning.
    Weights in another real floating dtype (float16, bfloat16, float64) are
    converted to the network's float32; a warning names float64 weights whose
    nonzero values are too small for float32 and became 0.

    Parameters
    ----------
    path
        The checkpoint.
    layer_order
        Overrides the call order stored in the file.

    Returns
    -------
    TitanicMLP
        The network in eval mode, on the CPU.

    Raises
    ------
    CheckpointError
        If the file is missing, is not a regular file (a named pipe, device or
        socket, also through a symbolic link), is not a checkpoint, its keys or
        shapes do not match the network, a weight is sparse, has no values, is not
        real floating point or lies beyond float32, or a weight is nan or inf.
    ArgumentError
        If ``layer_order`` is given and unknown.
    """
    net, _ = load_weights_with_sha256(path, layer_order)
    return net


def load_weights_with_sha256(
    path: str | Path, layer_order: str | None = None
) -> tuple[TitanicMLP, str]:
    """:func:`load_weights`, and the SHA-256 of the bytes the network came from.

    The file is read once, and those bytes are both loaded and hashed: hashing the file
    by name afterwards could hash another one, put in its place meanwhile.

    Returns
    -------
    tuple
        The network, as :func:`load_weights` returns it, and the hex digest.
    """
    path = Path(path)
    if layer_order is not None:
        layer_order = _checked_order(layer_order)
    _check_regular_file(path)

    try:
        with _open_regular_file(path) as stream:
            contents = stream.read()
        _check_not_text(contents, path)
        with warnings.catch_warnings():
            # torch warns about the pickle protocol before refusing the file anyway, and
            # that sparse support is in beta or quantized tensors deprecated: such
            # weights are refused just below.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            warnings.filterwarnings("ignore", message="Sparse .* support is in beta")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation .*deprecated")
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            payload = torch.load(io.BytesIO(contents), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except _UNREADABLE as err:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_load_reason(err)})") from err

    state_dict, stored_order = _unpack(payload, path)
    if stored_order is None and layer_order is None:
        # Both orders have the same parameters: nothing in the file tells them apart.
        logger.warning("%s is a bare state dict or a Lightning checkpoint without "
                       "hyper-parameters, which does not store the order the layers are "
                       "called in: read in the article's order (%s); save it with "
                       "engine.model.save_weights to store its order", path,
                       " -> ".join(LAYER_ORDERS["article"]))
    net = TitanicMLP(layer_order or stored_order or "article")
    _check_state_dict(state_dict, net, path)
    _check_weight_kinds(state_dict, path)
    _check_weight_dtypes(state_dict, path)
    net.load_state_dict(state_dict)
    # A diverged training run saves nan weights without complaint; say so here, before
    # they turn every output into nan and the rows get the blame.
    culprits = non_finite_weights(net)
    if culprits:
        raise CheckpointError(
            f"{path}: the weights hold nan or inf ({culprits}): retrain the model or use "
            "another checkpoint"
        )
    _warn_of_underflow(state_dict, path)
    return net.eval(), hashlib.sha256(contents).hexdigest()


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file before opening it.

    Opening a named pipe to read waits, forever, for a writer; /dev/zero never ends;
    a socket cannot be opened at all. ``stat`` follows symbolic links, so a link to
    any of these is refused as well.
    """
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as err:
        raise CheckpointError(
            f"{path}: cannot read ({err.strerror or type(err).__name__})"
        ) from err
    kind = file_kind(mode)
    if kind:
        raise CheckpointError(f"{path}: is {kind}, expected a checkpoint file")


def _open_regular_file(path: Path) -> BinaryIO:
    """``path`` opened to read, refused if it stopped being a regular file since the check.

    O_NONBLOCK keeps the open itself from waiting should a pipe have been put in the
    file's place; it changes nothing for a regular file, whose reads never block.
    """
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        kind = file_kind(os.fstat(handle).st_mode)
        if kind:
            raise CheckpointError(f"{path}: is {kind}, expected a checkpoint file")
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


# torch's legacy serialisation's magic number as pickle protocol 0 writes it.
_LEGACY_TEXT_MAGIC = b"L119547037146038801333356L"


def _check_not_text(contents: bytes, path: Path) -> None:
    """Refuse an empty file or one of text (a CSV or a config passed by mistake) by what it
    is; torch's reader fails on either with a bare ``EOFError`` or ``KeyError: 101``.

    A checkpoint is a zip archive or a pickle, both binary from their first bytes, except
    torch's legacy format saved with pickle protocol 0, whose text starts with torch's
    magic number; torch refuses that one itself.
    """
    if not contents:
        raise CheckpointError(f"{path}: is empty, expected a checkpoint written by "
                              "engine.model.save_weights or torch.save")
    head = contents[:4096]
    if head.startswith(_LEGACY_TEXT_MAGIC):
        return
    text = _as_text(head, cut=len(head) < len(contents))
    if text is not None and all(char.isprintable() or char.isspace() for char in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        shown = first if len(first) <= 40 else first[:40] + "..."
        what = f"a text file (it begins {shown!r})" if first else "a text file of blank lines"
        raise CheckpointError(f"{path}: is {what}, expected a checkpoint written by "
                              "engine.model.save_weights or torch.save")


def _as_text(head: bytes, *, cut: bool) -> str | None:
    """The first bytes of a file as text in the encodings text files come in, or None.

    UTF-16 with its byte-order mark (a spreadsheet's "Unicode text"), UTF-8 with or
    without one, and else Windows-1252 (Latin-1 with curly quotes), in which every
    checkpoint's bytes hold control characters. ``cut``: the file goes on past ``head``,
    which may end inside a character; a DOS end-of-file mark ending it is dropped.
    """
    for mark, codec in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if head.startswith(mark):
            body = head[len(mark):]
            return body[: len(body) - len(body) % 2 if cut else None].decode(codec, "replace")
    head = head.removeprefix(codecs.BOM_UTF8)
    if not cut:
        head = head.removesuffix(b"\x1a")
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as error:
        if cut and error.reason == "unexpected end of data":
            return head[: error.start].decode("utf-8")  # a character the slice cut in two
    try:
        return head.decode("cp1252")
    except UnicodeDecodeError:  # a byte cp1252 leaves undefined
        return None


def _unpack(payload: object, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """Split a loaded file into its state dict and stored call order (None for a bare
    state dict, which stores none)."""
    if isinstance(payload, Mapping) and "format" in payload:
        if payload["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: checkpoint format {payload['format']!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        state_dict = payload.get("state_dict")
        stored_order = payload.get("layer_order")
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(f"{path}: checkpoint has no 'state_dict' mapping")
        if not isinstance(stored_order, str) or stored_order not in LAYER_ORDERS:
            raise CheckpointError(
                f"{path}: checkpoint layer_order {stored_order!r} is not one of"
                f" {', '.join(map(repr, LAYER_ORDERS))}"
            )
        return state_dict, str(stored_order)

    if isinstance(payload, Mapping) and LIGHTNING_VERSION_KEY in payload:
        return _lightning_weights(payload, path)
    if isinstance(payload, Mapping) and payload and all(
        isinstance(value, torch.Tensor) for value in payload.values()
    ):
        return payload, None
    raise CheckpointError(
        f"{path}: not an engine checkpoint (holds a {type(payload).__name__},"
        f" expected a dict with format {CHECKPOINT_FORMAT!r})"
    )


# The key every checkpoint Lightning's Trainer saves holds.
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def _lightning_weights(
    payload: Mapping[str, object], path: Path
) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The network's weights and call order from a ``TitanicClassifier`` checkpoint that
    Lightning's Trainer saved (``trainer.save_checkpoint``, ``ModelCheckpoint``)."""
    module_state = payload.get("state_dict")
    prefix = "net."
    nested = _network_prefix(module_state) if isinstance(module_state, Mapping) else None
    if nested is not None and nested != prefix:
        raise CheckpointError(
            f"{path}: a Lightning checkpoint that holds the Titanic network's weights under "
            f"{nested!r}, not {prefix!r} (a module around the network?): save the network "
            "itself with engine.model.save_weights, or checkpoint TitanicClassifier"
        )
    if not isinstance(module_state, Mapping) or not any(
        isinstance(name, str) and name.startswith(prefix) for name in module_state
    ):
        raise CheckpointError(
            f"{path}: a Lightning checkpoint without the Titanic network's weights (no "
            f"'{prefix}*' entries in its state_dict): expected one of "
            "engine.model.TitanicClassifier"
        )
    state_dict = {name.removeprefix(prefix): value for name, value in module_state.items()
                  if isinstance(name, str) and name.startswith(prefix)}
    hyper_parameters = payload.get("hyper_parameters")
    stored_order = (hyper_parameters.get("layer_order")
                    if isinstance(hyper_parameters, Mapping) else None)
    if stored_order is not None and (not isinstance(stored_order, str)
                                     or stored_order not in LAYER_ORDERS):
        raise CheckpointError(
            f"{path}: Lightning checkpoint layer_order {stored_order!r} is not one of"
            f" {', '.join(map(repr, LAYER_ORDERS))}"
        )
    return state_dict, stored_order


def _network_prefix(state: Mapping[object, object]) -> str | None:
    """The prefix under which ``state`` holds every entry of the Titanic network's state
    dict ("" for the entries themselves), the shortest there is; None when it holds
    them under none. A module that holds the network as ``self.net`` keeps it under
    ``"net."``."""
    names = _network_names()
    first = names[0]
    prefixes = sorted({key[: len(key) - len(first)] for key in state
                       if isinstance(key, str) and key.endswith(first)
                       and (key == first or key[-len(first) - 1] == ".")}, key=len)
    return next((prefix for prefix in prefixes
                 if all(prefix + name in state for name in names)), None)


@functools.cache
def _network_names() -> tuple[str, ...]:
    # On the meta device: no memory, and the random generator is left as it was.
    with torch.device("meta"):
        return tuple(TitanicMLP().state_dict())


def _check_state_dict(state_dict: Mapping[str, object], net: TitanicMLP, path: Path) -> None:
    """Name every missing, unexpected, non-tensor or misshapen entry at once."""
    expected = {name: tuple(value.shape) for name, value in net.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    nested = _network_prefix(state_dict) if missing else None
    if nested:
        raise CheckpointError(
            f"{path}: the checkpoint holds the network's weights under {nested!r} (the state "
            "dict of a module around the network?): save the network itself with "
            "engine.model.save_weights"
        )
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint keys do not match the network:"
            f" missing {', '.join(missing) or 'none'};"
            f" unexpected {', '.join(map(str, unexpected)) or 'none'}"
        )

    problems = []
    for name, shape in expected.items():
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != shape:
            problems.append(f"{name} has shape {tuple(value.shape)}, expected {shape}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit the network: {'; '.join(problems)}")


def _check_weight_kinds(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse tensors that ``load_state_dict`` cannot copy into the network's weights.

    It fails on sparse and meta tensors with a page of text that names neither the
    file nor the fix.
    """
    sparse = _grouped(state_dict, lambda value: (
        None if value.layout == torch.strided else str(value.layout).removeprefix("torch.")
    ))
    if sparse:
        raise CheckpointError(
            f"{path}: checkpoint weights must be dense (strided) tensors: {sparse}"
        )
    empty = _grouped(state_dict, lambda value: "meta" if value.is_meta else None)
    if empty:
        raise CheckpointError(f"{path}: checkpoint weights were saved without values: {empty}")


def _check_weight_dtypes(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that would change meaning on the way into the float32 network.

    ``load_state_dict`` casts complex weights to real, dropping the imaginary part
    with nothing but a warning, and takes integer, bool and quantized ones as plain
    numbers, without the scale that gave them their meaning. Other floating dtypes
    convert as they always did: float16, bfloat16 and float8 exactly, float64 to the
    nearest float32, except values beyond float32's range, which would become inf
    and be blamed on training.
    """
    typed = _grouped(state_dict, lambda value: (
        None if value.dtype.is_floating_point else str(value.dtype).removeprefix("torch.")
    ))
    if typed:
        raise CheckpointError(
            f"{path}: checkpoint weights must be real floating point (float32; float16,"
            f" bfloat16 and float64 are converted): {typed}"
        )

    float32_max = torch.finfo(torch.float32).max
    too_wide = [
        f"{name} holds {value[beyond][0].item():.3g}"
        for name, value in state_dict.items()
        if torch.finfo(value.dtype).max > float32_max
        and (beyond := value.isfinite() & value.float().isinf()).any()
    ]
    if too_wide:
        raise CheckpointError(
            f"{path}: checkpoint weights lie beyond float32, the network's dtype:"
            f" {'; '.join(too_wide)}"
        )


def _warn_of_underflow(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Log the weights whose nonzero values became 0 on the way into float32.

    Only float64 reaches below float32's smallest value (about 1.4e-45). Next to the
    weights float32 can hold such a value is negligible, so the checkpoint is used; still,
    the network is not exactly the file, and whoever loads it should know.
    """
    float32_tiny = torch.finfo(torch.float32).tiny
    lost = []
    for name, value in state_dict.items():
        if torch.finfo(value.dtype).tiny >= float32_tiny:
            continue
        count = int(((value != 0) & (value.float() == 0)).sum())
        if count:
            lost.append(f"{name}: {count:,} of {value.numel():,} values")
    if lost:
        logger.warning("%s: float64 weights too small for float32 (under 1.4e-45) were "
                       "loaded as 0: %s", path, "; ".join(lost))


def _grouped(
    tensors: Mapping[str, torch.Tensor], describe: Callable[[torch.Tensor], str | None]
) -> str:
    """``"a, b are X; c is Y"`` for the tensors ``describe`` finds fault with, or ``""``."""
    names_by_fault: dict[str, list[str]] = {}
    for name, value in tensors.items():
        fault = describe(value)
        if fault is not None:
            names_by_fault.setdefault(fault, []).append(name)
    return "; ".join(
        f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} {fault}"
        for fault, names in names_by_fault.items()
    )


def _load_reason(err: BaseException) -> str:
    """A one-line reason from torch.load's error, which runs to a page.

    The first line of torch's own message suggests retrying with
    ``weights_only=False``; that is the one thing not to do with an unknown
    file, so it is never passed on.
    """
    text = str(err)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"it would import {refused.group(1)} to run code; refused by weights_only loading"
    if isinstance(err, pickle.UnpicklingError):
        return "its bytes are neither a torch zip archive nor a tensor-only pickle"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(err, (PermissionError, IsADirectoryError)) and lines:
        return lines[0]
    # A truncated or damaged archive fails somewhere deep in the reader, with a bare key,
    # a decoding error or an errno that mean nothing to whoever passed the file.
    detail = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return f"the file is truncated or corrupted ({detail})"
