"""A resumable store of finished chunks: one file per row range, and a manifest.

A long attribution job is cut into chunks of consecutive rows. Each finished chunk is
written to its own file with an atomic rename, so a killed job leaves only whole chunks
behind. The manifest records what the chunks are results *of* (a hash of the job's
configuration, the row ranges and the baselines); a job restarted with the same
configuration skips the chunks already on disk, and a job with another configuration
is refused rather than mixed with them.

The folder and its manifest appear with the first finished chunk: a job that fails or is
stopped before then leaves nothing behind, since there would be nothing to resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ArgumentError, DataError
from engine.io import atomic_path, stop_signals_held

__all__ = ["ChunkStore", "RowChunk", "config_hash", "plan_chunks"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "engine.chunks/1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class RowChunk:
    """Rows ``start`` (inclusive) to ``stop`` (exclusive) of the job, numbered ``index``."""

    index: int
    start: int
    stop: int

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    @property
    def file_name(self) -> str:
        return f"chunk-{self.index:06d}.npz"


def plan_chunks(n_rows: int, chunk_rows: int) -> list[RowChunk]:
    """Cut ``n_rows`` rows into consecutive chunks of at most ``chunk_rows`` rows.

    Parameters
    ----------
    n_rows
        Rows in the job, at least 1.
    chunk_rows
        Rows per chunk, at least 1; the last chunk may be shorter.

    Returns
    -------
    list of RowChunk
        Chunks in row order, numbered from 0.

    Raises
    ------
    ArgumentError
        If either count is not a positive integer.
    """
    for name, value in (("n_rows", n_rows), ("chunk_rows", chunk_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return [
        RowChunk(index, start, min(start + chunk_rows, n_rows))
        for index, start in enumerate(range(0, n_rows, chunk_rows))
    ]


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON-able configuration, independent of key order."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ChunkStore:
    """Finished chunks of one job in a folder, guarded by a manifest.

    Parameters
    ----------
    folder
        Where the chunk files and ``manifest.json`` live; created by :meth:`open`.
    config
        Everything the chunks' numbers depend on, JSON-able (the data and model hashes,
        quadrature, baselines, chunk size). Its hash names the job.
    chunks
        The job's row ranges, from :func:`plan_chunks`.
    baseline_names
        The baseline kinds, in the order of the stored arrays' first axis.
    """

    def __init__(
        self,
        folder: str | Path,
        config: Mapping[str, Any],
        chunks: Sequence[RowChunk],
        baseline_names: Sequence[str],
    ) -> None:
        self.folder = Path(folder)
        self.config = dict(config)
        self.chunks = list(chunks)
        self.baseline_names = list(baseline_names)
        self.hash = config_hash({**self.config, "baselines": self.baseline_names})
        self._manifest_written = False

    # -- the manifest ------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "config_hash": self.hash,
            "config": self.config,
            "baselines": self.baseline_names,
            "chunks": [
                {"index": c.index, "rows": [c.start, c.stop], "file": c.file_name}
                for c in self.chunks
            ],
        }

    def open(self) -> None:
        """Check that the folder holds no chunks of another job; nothing is written yet.

        The folder and manifest are created by the first :meth:`write`. A manifest beside
        no chunk file (left by a job killed between the two) guards nothing: the first
        write replaces it.

        Raises
        ------
        ArgumentError
            If the folder holds chunks of a job with another configuration; the message
            names the first setting that differs.
        """
        path = self.folder / MANIFEST_NAME
        if self.folder.exists() and not self.folder.is_dir():
            raise ArgumentError(
                f"{self.folder} is a file where the chunks of the job go: move or delete it"
            )
        if not self.folder.is_dir() or not any(self.folder.glob("chunk-*.npz")):
            return
        if not path.is_file():
            raise ArgumentError(
                f"{self.folder} holds chunk files but no {MANIFEST_NAME}: delete the folder "
                "to start over"
            )
        self._check_manifest(path)

    def _write_manifest(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Every process of a job writes it before its first chunk: the same bytes each time.
        with atomic_path(self.folder / MANIFEST_NAME) as temp:
            temp.write_text(json.dumps(self.manifest(), indent=2, sort_keys=True) + "\n")
        self._manifest_written = True
        log.debug("chunk store %s: new manifest %s", self.folder, self.hash[:12])

    def _check_manifest(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ArgumentError(
                f"{path}: unreadable chunk manifest ({error}): delete {self.folder} to start over"
            ) from error
        if not isinstance(stored, dict) or stored.get("format") != MANIFEST_FORMAT:
            raise ArgumentError(
                f"{path}: not a chunk manifest of format {MANIFEST_FORMAT}: "
                f"delete {self.folder} to start over"
            )
        if stored.get("config_hash") == self.hash:
            return
        config = stored.get("config", {})
        if not isinstance(config, dict):
            raise ArgumentError(
                f"{path}: its config is a {type(config).__name__}, not an object: delete "
                f"{self.folder} to start over"
            )
        old = {**config, "baselines": stored.get("baselines")}
        # As stored: through JSON, where tuples become lists.
        new = json.loads(json.dumps({**self.config, "baselines": self.baseline_names}))
        changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        # Settings the user gave first, then what follows from them (the baselines' values
        # follow from the seed, the data and the scaling).
        changed.sort(key=lambda key: key in _DERIVED)
        what = "; ".join(_change(key, old.get(key), new.get(key)) for key in changed) \
            or "config"
        raise ArgumentError(
            f"{self.folder} holds chunks of another job ({what}): rerun with the same "
            f"arguments to resume, or delete {self.folder} to start over"
        )

    # -- chunks ------------------------------------------------------------------------

    def path(self, chunk: RowChunk) -> Path:
        return self.folder / chunk.file_name

    def done(self) -> set[int]:
        """Indices of the chunks whose files are on disk (each was written whole)."""
        names = {c.file_name: c.index for c in self.chunks}
        if not self.folder.is_dir():
            return set()
        return {names[p.name] for p in self.folder.glob("chunk-*.npz") if p.name in names}

    def pending(self) -> list[RowChunk]:
        """The chunks still to compute, in row order."""
        finished = self.done()
        return [c for c in self.chunks if c.index not in finished]

    def write(self, chunk: RowChunk, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write one chunk's arrays atomically: the file appears whole or not at all.

        The first write of a process creates the folder and writes the manifest.
        """
        if not self._manifest_written:
            self._write_manifest()
        target = self.path(chunk)
        # A stop that lands inside numpy's zip writer leaves the writer half closed, and
        # its clean-up then prints an error at exit: the chunk is finished first.
        with stop_signals_held("a stop signal came while a chunk was being written; it "
                               "was finished first"), atomic_path(target) as temp:
            with open(temp, "wb") as stream:
                rows = np.array([chunk.start, chunk.stop])
                np.savez(stream, config_hash=np.array(self.hash), rows=rows, **arrays)
                stream.flush()
                os.fsync(stream.fileno())
        log.info("chunk %d (rows %d-%d) written", chunk.index, chunk.start, chunk.stop - 1)
        return target

    def read(self, chunk: RowChunk) -> dict[str, np.ndarray]:
        """One chunk's arrays, checked to belong to this job and row range.

        Raises
        ------
        DataError
            If the file is missing, unreadable, or from another job or row range.
        """
        path = self.path(chunk)
        again = f"delete it and rerun to compute rows {chunk.start}-{chunk.stop - 1} again"
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except Exception as error:  # noqa: BLE001 - numpy and zipfile raise many kinds
            detail = str(error) or type(error).__name__
            if "pickle" in detail:  # numpy's advice to load it unsafely helps nobody here
                detail = "holds Python objects" if _is_zip(path) else "not an .npz file"
            raise DataError(f"{path}: unreadable chunk file ({detail}): {again}") from error
        if "config_hash" not in arrays:
            raise DataError(f"{path}: chunk file without its job's hash: {again}")
        if str(arrays["config_hash"]) != self.hash:
            raise DataError(f"{path}: chunk of another job: delete {self.folder} to start over")
        if "rows" not in arrays:
            raise DataError(f"{path}: chunk file without its row range: {again}")
        if arrays["rows"].tolist() != [chunk.start, chunk.stop]:
            raise DataError(
                f"{path}: holds rows {arrays['rows'].tolist()}, expected "
                f"[{chunk.start}, {chunk.stop}]"
            )
        return arrays

    def iter_read(self) -> Iterator[tuple[RowChunk, dict[str, np.ndarray]]]:
        """Every chunk in row order with its arrays."""
        for chunk in self.chunks:
            yield chunk, self.read(chunk)

    def remove(self) -> None:
        """Delete the folder and everything in it (after the final files are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self._manifest_written = False


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(2) == b"PK"


# Manifest settings computed from others, named after the settings they come from.
_DERIVED = {"baseline_values", "baselines"}


def _change(key: str, old: Any, new: Any) -> str:
    """``key: OLD then, NEW now``, at the first element that differs for long lists."""
    same_kind = (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)) \
        or (isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys())
    if same_kind:
        flat_old, flat_new = _flat(old), _flat(new)
        if len(flat_old) == len(flat_new):
            index = next((i for i, (a, b) in enumerate(zip(flat_old, flat_new)) if a != b),
                         None)
            if index is not None:
                return (f"{key}: {_short(flat_old[index])} then, {_short(flat_new[index])} "
                        f"now at number {index}")
    return f"{key}: {_short(old)} then, {_short(new)} now"


def _flat(value: Any) -> list[Any]:
    """The leaves of nested lists and objects, objects in key order."""
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flat(item)]
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in _flat(value[key])]
    return [value]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]
