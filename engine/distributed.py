"""Attribution of many rows as Lightning's ``Trainer.predict``, on any devices and nodes.

The job's rows are cut into chunks (:mod:`engine.store`). Lightning starts the
processes (one per device, on every node) and each process explains its share of the
chunks still missing, in batched passes of :func:`engine.integrated_gradients`, writing
every finished chunk to the store. When all processes are done, rank 0 reads the chunks
in row order and writes the two tables of ``--all`` once, each file appearing whole.

A killed job keeps its finished chunks: run it again with the same arguments and only
the missing chunks are computed. A job that ends before its first chunk is finished
leaves no store (and no ``--out`` folder it created). The store must be on a file system
every process sees (any folder on one machine; a shared one across nodes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from engine.baselines import BASELINE_KINDS, make_baselines
from engine.core import integrated_gradients
from engine.data import (
    FEATURES,
    SEX_CODES,
    RowLines,
    _check_ids,
    _checked_sex,
    _shown,
    _where,
    check_feature_ranges,
    numeric_columns,
    read_csv_table,
)
from engine.errors import ArgumentError, DataError
from engine.io import (
    CHUNKS_FOLDER,
    OutputDir,
    check_output_folder,
    tidy_attributions,
    tidy_deltas,
    writing,
)
from engine.model import TitanicMLP, quiet_lightning
from engine.progress import on_a_terminal
from engine.quadrature import check_method
from engine.store import ChunkStore, RowChunk, plan_chunks

__all__ = [
    "OUTPUT_FORMATS",
    "AttributionJob",
    "ChunkAttribution",
    "FeatureScaling",
    "StoppedBySignal",
    "explain_rows",
    "read_rows",
    "write_tables",
]

log = logging.getLogger(__name__)

# The batch of a process that has no chunk to compute (see ExplainRows.predict_dataloader).
_NOTHING_TO_DO = -1

OUTPUT_FORMATS = ("csv", "parquet")
TABLES = ("interpretation_results", "convergence")
STORE_NAME = CHUNKS_FOLDER

# ---------------------------------------------------------------------------
# Rows to explain, scaled as the model was trained


@dataclass(frozen=True)
class FeatureScaling:
    """How the model's training file was prepared: medians fill blanks, min-max scales.

    A saved model only makes sense on features prepared like its training data, so a
    new file is scaled with the *training* file's numbers, not its own.

    Attributes
    ----------
    low, high, median
        Per feature (in ``FEATURES`` order) of the training file, after filling blanks.
    mean
        Mean of each scaled training feature: the ``mean-base`` baseline.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    median: tuple[float, ...]
    mean: tuple[float, ...]

    @classmethod
    def from_reference(cls, frame: pd.DataFrame) -> FeatureScaling:
        """The numbers :func:`engine.data.prepare_titanic` uses on ``frame``.

        Parameters
        ----------
        frame
            The training table, as read by :func:`engine.data.load_titanic`.

        Returns
        -------
        FeatureScaling
            Low, high, median and scaled mean of each feature.
        """
        table = _feature_table(frame)
        median = table.median()
        table = table.fillna(median)
        low, high = table.min(), table.max()
        scaled = _scaled(table, low.to_numpy(), high.to_numpy())
        mean = torch.tensor(scaled, dtype=torch.float32).mean(dim=0)
        return cls(
            low=tuple(map(float, low)), high=tuple(map(float, high)),
            median=tuple(map(float, median)), mean=tuple(map(float, mean)),
        )

    def apply(self, frame: pd.DataFrame) -> torch.Tensor:
        """``(N, 5)`` float32 features of ``frame``, prepared like the training file."""
        table = _feature_table(frame).fillna(dict(zip(FEATURES, self.median)))
        scaled = _scaled(table, np.asarray(self.low), np.asarray(self.high))
        return torch.tensor(scaled, dtype=torch.float32)

    def mean_baseline(self) -> torch.Tensor:
        """``(5,)`` float32 mean of the scaled training features."""
        return torch.tensor(self.mean, dtype=torch.float32)


def frame_value(name: str, code: float) -> object:
    """A feature value as the CSV writes it: Sex by its label, numbers as they are."""
    if name == "Sex":
        return next((label for label, value in SEX_CODES.items() if value == code), code)
    return code


def _feature_table(frame: pd.DataFrame) -> pd.DataFrame:
    table = frame[list(FEATURES)].copy()
    table["Sex"] = table["Sex"].map(SEX_CODES)
    return table.astype("float64")


def _scaled(table: pd.DataFrame, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    # A constant training column has no range: it scales to zeros, as in training.
    span = np.where(high - low == 0.0, 1.0, high - low)
    return ((table - low) / span).to_numpy()


def read_rows(path: str | Path) -> pd.DataFrame:
    """Read a CSV of passengers to explain: PassengerId and the five feature columns.

    ``Survived`` and any other column may be present and are ignored, so Kaggle's
    ``test.csv`` works as well as ``train.csv``.

    Parameters
    ----------
    path
        A UTF-8 CSV with the columns PassengerId, Pclass, Sex, Age, SibSp and Fare.

    Returns
    -------
    pandas.DataFrame
        The file with those columns checked (numbers as float, Sex as its labels).

    Raises
    ------
    DataError
        With one line naming the file, and the column and row at fault.
    """
    return _read_rows(Path(path))[0]


def _read_rows(path: Path) -> tuple[pd.DataFrame, RowLines | None, str]:
    """:func:`read_rows`, the lines of the file each row is on, for later messages, and
    the SHA-256 of the bytes read."""
    # The same reading and refusals as --all's training file.
    frame, lines = read_csv_table(path, label=str(path))
    digest = frame.attrs["sha256"]
    if len(frame) == 0:
        raise DataError(f"{path}: has a header but no data rows")
    missing = [name for name in ("PassengerId", *FEATURES) if name not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)};"
            f" found {', '.join(map(str, frame.columns))}"
        )
    # A column with no values would be all the reference's median: refused, as in --all.
    label = str(path)
    frame = numeric_columns(frame, ("PassengerId", "Pclass", "Age", "SibSp", "Fare"), label,
                            lines=lines)
    frame["Sex"] = _checked_sex(frame["Sex"], label, lines=lines)
    _check_ids(frame["PassengerId"], label, lines=lines)
    check_feature_ranges(frame, label, lines=lines)
    frame["PassengerId"] = frame["PassengerId"].astype("int64")
    return frame, lines, digest


def _check_scaled(
    features: torch.Tensor, frame: pd.DataFrame, scaling: FeatureScaling, path: Path, *,
    lines: RowLines | None = None,
) -> None:
    """Refuse a value that the training file's range scales past float32.

    :func:`read_rows` bounds every value, so only a reference with next to no spread in a
    column (a range of 1e-300, say) gets here. A reference with no spread at all (one
    passenger) scales a constant column to zeros, as training does, and any other value
    by a range of 1: in raw units, which the model never saw. Such a value is refused.
    """
    table = _feature_table(frame).to_numpy()
    for column, name in enumerate(FEATURES):
        low, high = scaling.low[column], scaling.high[column]
        if low != high:
            continue
        # Blanks are filled with the reference's median, which is that one value.
        other = np.flatnonzero(~np.isnan(table[:, column]) & (table[:, column] != low))
        if len(other):
            row = int(other[0])
            value = _shown(frame[name].iloc[row])
            raise DataError(
                f"{path}: column {name}, {_where(row, lines)}: {value}, but "
                f"every row of the reference has {name} {_shown(frame_value(name, low))}: the "
                f"model saw no other value and min-max scaling has no range to map this one "
                "with; pass the model's training file as --reference"
            )
    bad = (~torch.isfinite(features)).nonzero()
    if len(bad) == 0:
        return
    row, column = (int(index) for index in bad[0])
    name = FEATURES[column]
    value = _shown(frame[name].iloc[row])
    raise DataError(
        f"{path}: column {name}, {_where(row, lines)}: {value} scales to "
        f"{float(features[row, column])} against the reference's {name} range "
        f"{scaling.low[column]:g} to {scaling.high[column]:g}: use a reference whose "
        f"{name} values spread wider"
    )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# The Lightning module: one predict step per chunk


class StoppedBySignal(RuntimeError):
    """The run was asked to stop; its finished chunks are on disk."""


# [predict is running, a stop was asked for while it ran]. Set only from the main thread
# (explain_rows, and signal handlers, which Python runs there).
_PREDICT_STATE = [False, False]


def defer_stop() -> bool:
    """For a stop signal's handler: True while the chunks are computed, after noting the
    request (the chunk loop then stops before its next chunk, or once predict returns);
    False otherwise, when the handler should stop the run at once."""
    if not _PREDICT_STATE[0]:
        return False
    _PREDICT_STATE[1] = True
    return True


@contextlib.contextmanager
def _predicting() -> Iterator[None]:
    _PREDICT_STATE[:] = [True, False]
    try:
        yield
    finally:
        _PREDICT_STATE[0] = False


def _stop_requested(trainer: pl.Trainer) -> bool:
    """A SIGTERM reached Lightning's handler, or the command line's (see defer_stop)."""
    return bool(getattr(trainer, "received_sigterm", False) or _PREDICT_STATE[1])


class ChunkAttribution(pl.LightningModule):
    """Integrated Gradients of the job's missing chunks as a Lightning predict loop.

    Each predict batch is one chunk index. ``setup`` runs on every process before any of
    them starts work (Lightning puts a barrier on each side of it), so all processes see
    the same list of missing chunks and deal it out the same way: chunk ``i`` of the
    list goes to rank ``i % world_size``.

    Parameters
    ----------
    net
        The model, ``(n, 5) -> (n, 1)``; moved to the process's device by Lightning.
    features
        ``(N, 5)`` prepared rows of the whole job, on the CPU.
    passenger_ids
        ``(N,)`` PassengerId of each row.
    baselines
        ``(B, 5)`` one baseline per kind of the store.
    store
        Where finished chunks go.
    n_steps, method, internal_batch_size
        As in :func:`engine.integrated_gradients`.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        features: torch.Tensor,
        passenger_ids: np.ndarray,
        baselines: torch.Tensor,
        store: ChunkStore,
        *,
        n_steps: int,
        method: str,
        internal_batch_size: int | None,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.features = features
        self.passenger_ids = passenger_ids
        self.baselines = baselines
        self.store = store
        self.n_steps = n_steps
        self.method = method
        self.internal_batch_size = internal_batch_size
        self.assigned: list[RowChunk] = []
        self.missing: list[RowChunk] = []

    def setup(self, stage: str) -> None:
        self.missing = self.store.pending()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.assigned = self.missing[rank::world]
        log.debug("rank %d of %d: %d of %d missing chunks", rank, world,
                  len(self.assigned), len(self.missing))

    def predict_dataloader(self) -> DataLoader:
        # Lightning refuses a process whose loader is empty, which a process gets when
        # fewer chunks are missing than there are processes (a small file, or a resumed
        # run near its end): it gets one placeholder that predict_step skips.
        indices = [chunk.index for chunk in self.assigned] or [_NOTHING_TO_DO]
        return DataLoader(indices, batch_size=None)

    def predict_step(self, batch: int, batch_idx: int) -> int:
        # Lightning notes a SIGTERM but lets predict run on; stop between chunks instead,
        # so a scheduler's warning before its kill costs no finished work.
        if _stop_requested(self.trainer):
            raise _stopped(self.store)
        if int(batch) == _NOTHING_TO_DO:
            return _NOTHING_TO_DO
        chunk = self.store.chunks[int(batch)]
        inputs = self.features[chunk.start:chunk.stop].to(self.device)
        attributions, delta = integrated_gradients(
            self.net, inputs, self.baselines.to(self.device), n_steps=self.n_steps,
            method=self.method, internal_batch_size=self.internal_batch_size,
            return_convergence_delta=True,
        )
        # attributions (B, n, 5) in float32; delta (B, n) in float64
        self.store.write(chunk, {
            "attributions": attributions.detach().cpu().numpy(),
            "delta": delta.detach().cpu().numpy(),
            "passenger_id": self.passenger_ids[chunk.start:chunk.stop],
        })
        return chunk.index


# ---------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class AttributionJob:
    """Everything one distributed attribution run needs.

    Attributes
    ----------
    data
        CSV of the rows to explain (see :func:`read_rows`).
    out
        Folder for the two tables; the chunk store is ``out/.chunks``.
    n_steps, method, seed
        Quadrature and the seed of the random baseline.
    scaling
        The training file's preparation (see :class:`FeatureScaling`).
    checkpoint_sha256
        Names the weights in the store's configuration.
    output_format
        ``"csv"`` or ``"parquet"``.
    chunk_rows
        Rows per chunk: the unit of work, of progress and of resumption.
    internal_batch_size
        Path points per forward/backward inside a chunk.
    accelerator, devices, strategy, num_nodes
        Passed to ``lightning.Trainer``; they do not change the numbers, so a job may be
        resumed with other values.
    """

    data: Path
    out: Path
    n_steps: int
    method: str
    seed: int
    scaling: FeatureScaling
    checkpoint_sha256: str
    output_format: str = "csv"
    chunk_rows: int = 1024
    internal_batch_size: int | None = 32768
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1

    def store_config(self, n_rows: int, layer_order: str, baselines: torch.Tensor,
                     data_sha256: str | None = None) -> dict:
        """The settings the chunks' numbers depend on (not the devices, not the format).

        ``data_sha256`` is the digest of the data as it was read; without it the file is
        read again to hash it.
        """
        return {
            "data_sha256": data_sha256 or file_sha256(self.data),
            "checkpoint_sha256": self.checkpoint_sha256,
            "layer_order": layer_order,
            "scaling": asdict(self.scaling),
            "n_rows": n_rows,
            "chunk_rows": self.chunk_rows,
            "n_steps": self.n_steps,
            "method": self.method,
            "seed": self.seed,
            "baseline_values": baselines.tolist(),
            "internal_batch_size": self.internal_batch_size,
        }


def explain_rows(job: AttributionJob, net: TitanicMLP) -> dict[str, Any]:
    """Explain every row of ``job.data`` with ``net`` over Lightning; resume if possible.

    Every process Lightning starts runs this function; rank 0 alone writes the tables.

    Parameters
    ----------
    job
        The run's settings.
    net
        The trained network.

    Returns
    -------
    dict
        ``is_global_zero``, ``n_rows``, ``n_chunks``, ``reused`` (chunks found from an
        earlier run), ``computed``, ``seconds`` (of ``Trainer.predict``, starting the
        processes included), ``files`` (written by rank 0) and ``world_size``.

    Raises
    ------
    ArgumentError
        If a setting is invalid or the store holds chunks of another job.
    DataError
        If the data file cannot be used.
    """
    check_method(job.method, job.n_steps)
    if job.output_format not in OUTPUT_FORMATS:
        raise ArgumentError(
            f"--format {job.output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}"
        )
    if job.output_format == "parquet":
        _check_pyarrow()
    # As --all does, before any work: the chunks go into --out too.
    check_output_folder(job.out, "checkpoint")
    frame, lines, data_sha256 = _read_rows(Path(job.data))
    features = job.scaling.apply(frame)
    _check_scaled(features, frame, job.scaling, job.data, lines=lines)
    passenger_ids = frame["PassengerId"].to_numpy().astype(np.int64)
    baselines = make_baselines(BASELINE_KINDS, job.scaling.mean_baseline(), seed=job.seed)

    # Lightning checks the strategy and devices here: before anything touches --out.
    trainer = _trainer(job)
    config = job.store_config(len(frame), net.layer_order, baselines, data_sha256)
    store = ChunkStore(job.out / STORE_NAME, config, plan_chunks(len(frame), job.chunk_rows),
                       BASELINE_KINDS)
    store.open()
    reused = len(store.done())
    log.info("%d rows in %d chunks, %d already done", len(frame), len(store.chunks), reused)

    module = ChunkAttribution(
        net, features, passenger_ids, baselines, store, n_steps=job.n_steps,
        method=job.method, internal_batch_size=job.internal_batch_size,
    )
    out_existed = job.out.exists()
    started = time.perf_counter()
    try:
        with _quiet_lightning(), _predicting():
            trainer.predict(module, return_predictions=False)
    except BaseException:
        _drop_if_unfinished(store, job.out, out_existed)
        raise
    if _stop_requested(trainer):
        # Asked during the last chunk: predict had no next chunk to stop before.
        raise _stopped(store)
    # Every process has written its chunks once all of them pass this point.
    trainer.strategy.barrier("chunks-written")
    seconds = time.perf_counter() - started

    files: list[Path] = []
    if trainer.is_global_zero:
        missing = store.pending()
        if missing:
            # A process died without an error reaching this one; a rerun resumes.
            raise RuntimeError(
                f"{len(missing)} chunk(s) missing after all processes finished, first rows "
                f"{missing[0].start}-{missing[0].stop - 1}: run the same command again to resume"
            )
        # Once the tables are in place, the chunk folder goes before a stop is acted on:
        # stopped halfway, it would be left in part, which a rerun recomputes and an --all
        # run refuses.
        files = write_tables(store, job.out, FEATURES, job.output_format, then=store.remove)
    return {
        "is_global_zero": trainer.is_global_zero,
        "n_rows": len(frame),
        "n_chunks": len(store.chunks),
        "reused": reused,
        "computed": len(store.chunks) - reused,
        "seconds": seconds,
        "files": files,
        "world_size": trainer.world_size,
    }


def _stopped(store: ChunkStore) -> StoppedBySignal:
    kept = len(store.done())
    if not kept:
        return StoppedBySignal("stopped by SIGTERM before any chunk finished; nothing was "
                               "kept: run the same command again to start over")
    return StoppedBySignal(
        f"stopped by SIGTERM; {kept} finished chunk(s) are kept in {store.folder}: run the "
        "same command again to resume"
    )


def _drop_if_unfinished(store: ChunkStore, out: Path, out_existed: bool) -> None:
    """After a failed run: a store without a finished chunk has nothing to resume.

    The store only appears with its first chunk; this covers a run stopped while writing
    that chunk. ``out`` goes too when this run created it and nothing else is in it.
    """
    if store.done():
        return
    store.remove()
    if not out_existed:
        with contextlib.suppress(OSError):
            out.rmdir()


def _check_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as error:
        raise ArgumentError(
            "--format parquet needs pyarrow: pip install 'engine[parquet]' (or use --format csv)"
        ) from error


def _trainer(job: AttributionJob) -> pl.Trainer:
    progress = on_a_terminal() and not os.environ.get("CI")
    try:
        with _quiet_lightning():
            return pl.Trainer(
                accelerator=job.accelerator,
                devices=job.devices,
                strategy=job.strategy,
                num_nodes=job.num_nodes,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
                # Gradients along the path need autograd: no inference mode in predict.
                inference_mode=False,
                # The module deals out chunks itself; a distributed sampler would pad.
                use_distributed_sampler=False,
            )
    except (ValueError, MisconfigurationException) as error:
        # Lightning checks the strategy/devices/accelerator combination here.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArgumentError(
            f"Lightning refused --strategy {job.strategy!r} with {job.devices} device(s) on "
            f"{job.accelerator}: {reason}"
        ) from error


def _quiet_lightning() -> contextlib.AbstractContextManager[None]:
    """Lightning kept quiet, and a rank whose chunks were all done earlier left in peace:
    it has nothing to predict."""
    return quiet_lightning(".*Total length of .* across ranks is zero.*")


# ---------------------------------------------------------------------------
# The final tables


def write_tables(
    store: ChunkStore, out: str | Path, feature_names: Sequence[str], output_format: str = "csv",
    then: Callable[[], object] | None = None,
) -> list[Path]:
    """Write ``interpretation_results`` and ``convergence`` from the finished chunks.

    The tables have the columns and row order of ``--all`` (baseline kind, then row, then
    feature). They are streamed chunk by chunk, so memory stays bounded by one chunk, and
    both files appear together, each by an atomic rename.

    Parameters
    ----------
    store
        A store with every chunk written.
    out
        The results folder.
    feature_names
        Names of the feature axis.
    output_format
        ``"csv"`` or ``"parquet"``.
    then
        Run once the tables are in place, before a stop that came meanwhile is acted on
        (see ``OutputDir.commit``).

    Returns
    -------
    list of Path
        The two files written.
    """
    outputs = OutputDir(out, "checkpoint")
    with outputs, contextlib.ExitStack() as writers:
        attribution_writer = writers.enter_context(
            _TableWriter(outputs.file(f"{TABLES[0]}.{output_format}"), output_format))
        delta_writer = writers.enter_context(
            _TableWriter(outputs.file(f"{TABLES[1]}.{output_format}"), output_format))
        # The tables list baseline kinds outermost, so each kind is one pass over the chunks.
        for kind_index, kind in enumerate(store.baseline_names):
            for chunk, arrays in store.iter_read():
                _check_chunk_shapes(store, chunk, arrays, len(feature_names))
                ids = arrays["passenger_id"]
                attributions = torch.from_numpy(arrays["attributions"][kind_index:kind_index + 1])
                delta = torch.from_numpy(arrays["delta"][kind_index:kind_index + 1])
                table = tidy_attributions(attributions, ids, [kind], feature_names)
                table["row"] += chunk.start
                attribution_writer.write(table)
                table = tidy_deltas(delta, ids, [kind])
                table["row"] += chunk.start
                delta_writer.write(table)
        writers.close()
        return outputs.commit(then)


def _check_chunk_shapes(store: ChunkStore, chunk: Any, arrays: dict[str, np.ndarray],
                        n_features: int) -> None:
    """Refuse a chunk whose arrays are not what this job writes: its rows' shapes, real
    finite numbers in native byte order and integer passenger ids (a file edited or
    damaged)."""
    rows, kinds = chunk.stop - chunk.start, len(store.baseline_names)
    expected = {"attributions": ((kinds, rows, n_features), np.float32),
                "delta": ((kinds, rows), np.float64), "passenger_id": ((rows,), np.int64)}
    again = f"delete it and rerun to compute rows {chunk.start}-{chunk.stop - 1} again"
    for name, (shape, dtype) in expected.items():
        found = arrays.get(name)
        if found is None or tuple(found.shape) != shape:
            what = "no such array" if found is None else f"shape {tuple(found.shape)}"
            raise DataError(f"{store.path(chunk)}: {name} has {what}, expected {shape}: "
                            f"{again}")
        if found.dtype != np.dtype(dtype):
            raise DataError(f"{store.path(chunk)}: {name} has dtype {found.dtype}, expected "
                            f"{np.dtype(dtype)}: {again}")
        if found.dtype.kind == "f" and not np.isfinite(found).all():
            raise DataError(f"{store.path(chunk)}: {name} holds nan or inf: {again}")


class _TableWriter:
    """Appends frames to one CSV (one header) or one Parquet file (a row group each)."""

    def __init__(self, path: Path, output_format: str) -> None:
        self.path = path
        self.output_format = output_format
        self.stream = None
        self.parquet = None

    def write(self, frame: pd.DataFrame) -> None:
        # A full disk names no file: name this one (OutputDir names it by its final place).
        with writing(self.path):
            self._write(frame)

    def _write(self, frame: pd.DataFrame) -> None:
        if self.output_format == "csv":
            first = self.stream is None
            if first:
                self.stream = open(self.path, "w", newline="")
            frame.to_csv(self.stream, header=first, index=False)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.path, table.schema)
        self.parquet.write_table(table)

    def __enter__(self) -> _TableWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with writing(self.path):
            if self.stream is not None:
                self.stream.close()
            if self.parquet is not None:
                self.parquet.close()
