"""Tidy tables and all-or-nothing writes of result files."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock (see exclusive_use)
    fcntl = None

from engine.errors import ArgumentError, EngineError

__all__ = ["OutputDir", "WriteError", "atomic_path", "check_output_folder", "counted",
           "exclusive_use", "os_error_behind", "published_folders", "refuse_overwriting_inputs",
           "signless_zeros", "stop_signals_held", "tidy_attributions", "tidy_deltas", "writing"]

log = logging.getLogger(__name__)


class WriteError(OSError):
    """A file could not be written (a full disk, a quota): ``filename`` names it.

    The system's own message names no file when a write, rather than an open, fails.
    """

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror}"


# What a write fails with when the storage has no room left: the disk, a quota, the
# largest file allowed. Such an error names no file.
_NO_ROOM = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG")
                     if hasattr(errno, name))


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Raise an ``OSError`` from the block as a ``WriteError`` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as error:
        cause = os_error_behind(error)
        if cause is None:
            raise
        raise WriteError(cause.errno, cause.strerror or str(cause), str(path)) from error


def os_error_behind(error: BaseException) -> OSError | None:
    """``error`` if it is an ``OSError``; for a library's ``RuntimeError``, the full disk
    it was raised from or while handling (torch.save's zip writer turns one into a
    RuntimeError about file positions); else None.

    Only a full disk (or quota, or file size limit) is followed through a RuntimeError:
    any other OSError it met on the way may have nothing to do with writing. The engine's
    own errors keep their message.
    """
    if isinstance(error, OSError):
        return error
    for _ in range(8):
        if not isinstance(error, RuntimeError) or isinstance(error, EngineError):
            return None
        if error.__cause__ is not None:
            error = error.__cause__
        elif error.__suppress_context__:
            return None
        else:
            error = error.__context__
        if isinstance(error, OSError):
            return error if error.errno in _NO_ROOM else None
    return None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    An ``OSError`` on the way (a full disk while the caller writes, say) becomes a
    ``WriteError`` naming ``path``.
    """
    path = Path(path)
    with writing(path):
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
        os.close(handle)
        temp = Path(temp_name)
        # mkstemp creates 0600; the finished file gets the mode a plain open() would give it.
        umask = os.umask(0)
        os.umask(umask)
        temp.chmod(0o666 & ~umask)
        try:
            yield temp
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)


# What wrote a results folder: the worked example (--all) or explaining a file
# (--checkpoint). Each lists its own files; neither replaces or removes the other's.
RUN_KINDS = {"all": "--all", "checkpoint": "--checkpoint"}


def refuse_folders_where_files_go(path: Path, names: Iterable[str]) -> None:
    """Raise ``ArgumentError`` if a folder inside ``path`` has the name of a result file:
    publishing the file would fail there. Checked before a run's work and again before
    its first file moves in."""
    for name in names:
        if (path / name).is_dir():
            raise ArgumentError(
                f"--out {path}: {path / name} is a folder where a result file goes; move it "
                "away and run again"
            )


def check_output_folder(path: Path, kind: str | None = None) -> None:
    """Raise ``ArgumentError`` unless ``path`` is a writable folder, or can be made as one
    in an existing writable folder; nothing is created.

    With ``kind``, also refuse a folder holding the results of the other kind of run
    (see RUN_KINDS): the two write some of the same names, and each removes the files
    its own earlier run wrote and this one did not.
    """
    try:
        _check_output_folder(path, kind)
    except OSError as error:  # a name too long for the file system, a symlink loop
        raise ArgumentError(
            f"--out {path}: {error.strerror or type(error).__name__}"
        ) from error


def _check_output_folder(path: Path, kind: str | None) -> None:
    if path.is_symlink() and not path.exists():
        # Nothing can be made in its place, and the folder it names would surprise.
        raise ArgumentError(
            f"--out {path} is a broken symbolic link (to {os.readlink(path)}): create the "
            "folder it points to, or choose another --out"
        )
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"--out {path} exists and is not a directory")
    if kind is not None and path.is_dir():
        earlier, _ = _written_before(path)
        if earlier is not None and earlier != kind:
            raise ArgumentError(
                f"--out {path} holds the results of a {RUN_KINDS[earlier]} run (listed in "
                f"{path / WRITTEN_FILE}); a {RUN_KINDS[kind]} run there would replace or "
                "remove them: choose another --out"
            )
        if kind != "checkpoint" and (path / CHUNKS_FOLDER).exists():
            raise ArgumentError(
                f"--out {path} holds the finished chunks of an unfinished --checkpoint run "
                f"({path / CHUNKS_FOLDER}): run that command again to finish it, or choose "
                "another --out"
            )
    parent = path.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise ArgumentError(f"--out {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise ArgumentError(f"--out {path}: parent folder {parent} does not exist")
    if not path.exists() and not path.parent.is_dir():
        # Resolving takes missing/.. for the folder it names; making the folder does not.
        raise ArgumentError(f"--out {path}: folder {path.parent} does not exist")
    # An existing folder is written from inside (see work_folder): its parent may be
    # read-only, or another file system (a mounted volume).
    work = work_folder(path)
    if not os.access(work, os.W_OK):
        raise ArgumentError(f"--out {path} is not writable")
    # os.access cannot see everything (root, read-only mounts, /proc): trying can.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{_short(path.name)}.check-", dir=work))
    except OSError as error:
        raise ArgumentError(
            f"--out {path} is not writable: cannot create a folder in {work}"
            f" ({error.strerror or type(error).__name__})"
        ) from error


def work_folder(path: Path) -> Path:
    """Where a run into ``path`` stages its files: inside it when it is a folder already,
    else beside it (in the parent, where it will be made).

    A rename works within one file system only. Staged inside an existing folder, the
    files move into place even when the folder is a mount point (a container's volume, a
    network share), and its parent need not be writable.
    """
    resolved = path.resolve()
    return resolved if resolved.is_dir() else resolved.parent


def refuse_overwriting_inputs(out: Path, names: Iterable[str],
                              inputs: Mapping[str, Path | None]) -> None:
    """Raise ``ArgumentError`` when an input file is one a run writing ``names`` into
    ``out`` would replace or remove.

    ``inputs`` maps each flag to the file it named. A results file replaces the file of
    its name, a run removes the files its folder's listing says an earlier run wrote and
    this one does not, and a --checkpoint run removes its chunk folder: an input there (a
    table of an earlier run read as data) would be gone, with the run reporting success.
    Paths are compared resolved, so a symlink to such a file counts as the file.
    """
    try:
        folder = out.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the folder checks report it
        return
    _, earlier = _written_before(folder)
    doomed = {*names, *earlier, WRITTEN_FILE}
    for flag, path in inputs.items():
        if path is None:
            continue
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            continue
        # The chunk folder of a --checkpoint run goes whole once its tables are written.
        if (resolved.parent == folder and resolved.name in doomed) \
                or resolved.is_relative_to(folder / CHUNKS_FOLDER):
            raise ArgumentError(
                f"{flag} {path} is {resolved}, a file this run would replace or remove in "
                f"--out {out}: copy it elsewhere or choose another --out"
            )


class OutputDir:
    """A results folder whose files appear together, or not at all.

    Files are written into a hidden staging folder (inside the target when it exists,
    else beside it: see ``work_folder``); ``commit`` moves each into place with an
    atomic rename. A run that fails or is interrupted before ``commit`` leaves the
    target folder as it was.
    """

    def __init__(self, path: str | Path, kind: str = "all") -> None:
        self.path = Path(path)
        self.kind = kind
        check_output_folder(self.path, kind)
        work = work_folder(self.path)
        try:
            self.staging = Path(
                tempfile.mkdtemp(prefix=_staging_prefix(self.path.name), dir=work)
            )
        except OSError as error:
            # os.access cannot see everything (root, read-only mounts, /proc): trying can.
            raise ArgumentError(
                f"--out {self.path} is not writable: cannot create a folder in {work}"
                f" ({error.strerror or type(error).__name__})"
            ) from error
        try:
            with writing(self.path):
                (self.staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        except WriteError:
            self.discard()
            raise
        self.written: list[str] = []
        # The files the run read, by flag: never replaced or removed (see commit).
        self.inputs: dict[str, Path] = {}
        _remove_abandoned(work, self.path.name)
        if work != self.path.resolve().parent:
            # Left beside the folder by a run that began before the folder existed.
            _remove_abandoned(self.path.resolve().parent, self.path.name)

    def file(self, name: str) -> Path:
        """The staging path for ``name``; the caller writes it, ``commit`` publishes it."""
        self.written.append(name)
        return self.staging / name

    def write_csv(self, name: str, frame: pd.DataFrame) -> None:
        self._write(name, lambda path: frame.to_csv(path, index=False))

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, indent=2, default=_jsonable) + "\n"
        self._write(name, lambda path: path.write_text(text))

    def write_text(self, name: str, text: str) -> None:
        self._write(name, lambda path: path.write_text(text))

    def _write(self, name: str, write: Callable[[Path], object]) -> None:
        """Stage ``name`` with ``write``; an ``OSError`` names the file as it would be in
        the folder (a WriteError)."""
        staged = self.file(name)
        with writing(self.path / name):
            write(staged)

    def commit(self, then: Callable[[], object] | None = None) -> list[Path]:
        """Move every staged file into the folder; remove the files an earlier run wrote
        there that this one did not (a run with fewer baselines has fewer heatmaps).

        The folder's other files are left alone: the names written are listed in
        ``WRITTEN_FILE`` inside it. ``then`` runs once the files are in place, before a
        stop that came meanwhile is acted on (a --checkpoint run removes its chunks).
        """
        self.path.mkdir(exist_ok=True)
        # A rename onto a folder fails: find that before the first rename, not halfway.
        refuse_folders_where_files_go(self.path, self.written)
        # Checked again: another run may have written the folder since this one began.
        check_output_folder(self.path, self.kind)
        refuse_overwriting_inputs(self.path, self.written, self.inputs)
        _, earlier = _written_before(self.path)
        listing = self.file(WRITTEN_FILE)
        listing.write_text(f"{_KIND_LINE}{self.kind}\n" + "".join(
            f"{name}\n" for name in self.written if name != WRITTEN_FILE))
        # A Ctrl-C between two renames would leave new files beside old ones: hold it.
        with stop_signals_held("a stop signal came while the results were being moved into "
                               "place; they were finished first"):
            if _stop_noted():
                # A stop whose KeyboardInterrupt was swallowed on the way: drop the results
                # as the interrupt would have.
                raise KeyboardInterrupt
            published = [target for target in self._move_into_place()
                         if target.name != WRITTEN_FILE]
            for name in sorted(earlier - set(self.written)):
                stale = self.path / name
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
                    log.info("removed %s, written by an earlier run and not by this one", stale)
            _published.append(self.path)
            log.info("wrote %d files to %s", len(published), self.path)
            self.discard()
            if then is not None:
                then()
        return published

    def _move_into_place(self) -> list[Path]:
        """Rename every staged file onto its place in the folder. If one rename fails (an
        I/O error), the files already moved are taken back out and the earlier ones put
        back, so the folder is as it was, and the error is raised.

        Each earlier file is first linked (or, where links fail, copied) into the staging
        folder: a rename replaces a file in one step, and so does putting it back.
        """
        kept = self.staging / ".kept"
        kept.mkdir()
        moved: list[tuple[Path, Path | None]] = []  # (place, earlier file kept, if any)
        try:
            for index, name in enumerate(self.written):
                target = self.path / name
                earlier = None
                if target.is_file() or target.is_symlink():
                    earlier = kept / str(index)
                    _keep_copy(target, earlier)
                os.replace(self.staging / name, target)
                moved.append((target, earlier))
        except BaseException:
            for target, earlier in reversed(moved):
                try:
                    if earlier is None:
                        target.unlink()
                    else:
                        os.replace(earlier, target)
                except OSError as error:
                    log.warning("could not put back %s as it was: %s", target, error)
            raise
        return [target for target, _ in moved]

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Reached without commit only on an error or interrupt: drop everything staged.
        self.discard()
        cause = os_error_behind(exc) if exc is not None else None
        if cause is not None:
            named = self._write_error(cause)
            if named is not None:
                raise named from exc

    def _write_error(self, error: OSError) -> WriteError | None:
        """``error`` as a WriteError naming the file or folder it failed to write, or None
        when it is not about this folder.

        The callers write some files themselves (the pictures, the weights, the tables of
        a --checkpoint run): a staged file is named by its place in the folder, and a full
        disk that names no file, by the folder.
        """
        try:
            staged = Path(error.filename).relative_to(self.staging)
        except (TypeError, ValueError):  # no file named, or another one
            staged = None
        if staged is not None:
            target = self.path / staged
        elif error.filename is None and error.errno in _NO_ROOM:
            target = self.path
        else:
            return None
        return WriteError(error.errno, error.strerror or str(error), str(target))


# Environment variables launchers set to a process's rank: a process whose rank is not 0
# was started by a run that already holds the lock (Lightning's DDP launcher, torchrun,
# SLURM).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


@contextmanager
def exclusive_use(path: Path) -> Iterator[None]:
    """Hold ``path`` (a results folder) for this run: a second run into it is refused.

    The lock is a file beside the folder, ``.<name>.lock`` after the folder's resolved
    name (so ``out``, a symlink to it and ``sub/..`` are one lock), and one inside it
    (``INNER_LOCK_FILE``) when the folder exists, each held with ``flock``:
    the system releases it when its process ends, however it ends, so a lock left by a
    killed run is no obstacle. The file names the host and process, for the message a
    second run gets. The processes a launcher starts for the same run (a rank other
    than 0) do not take it. Without ``fcntl`` (not POSIX) there is no lock.
    """
    if fcntl is None or any(os.environ.get(name, "0") not in ("", "0")
                            for name in _RANK_VARIABLES):
        yield
        return
    resolved = path.resolve()
    held: list[tuple[Path, int]] = []
    try:
        beside = resolved.parent / f".{_unique_short(resolved.name)}.lock"
        try:
            held.append((beside, _locked(beside, path)))
        except _NoLockFile:
            if not resolved.is_dir():
                raise
        if resolved.is_dir():
            # An existing folder is locked from inside too: a run that cannot write the
            # parent (a read-only one, for it) can only lock there, and must meet any
            # other run into the folder.
            inner = resolved / INNER_LOCK_FILE
            held.append((inner, _locked(inner, path)))
        for _, handle in held:
            with suppress(OSError):  # not writable when another user's file is reused
                os.ftruncate(handle, 0)
                os.write(handle, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        for lock, handle in reversed(held):
            # Removed while still held: a run waiting on this file finds it gone and
            # retries.
            with suppress(OSError):
                os.unlink(lock)
            os.close(handle)


def _locked(lock: Path, path: Path) -> int:
    """An open descriptor of ``lock`` holding its exclusive flock, or ``ArgumentError``."""
    while True:
        flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            try:
                handle = os.open(lock, os.O_RDWR | flags, 0o666)
            except PermissionError:
                # Another user's lock file: flock works on a descriptor opened to read.
                handle = os.open(lock, os.O_RDONLY | flags)
        except OSError as error:
            no_file = _NoLockFile if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) \
                else ArgumentError
            raise no_file(
                f"--out {path}: cannot use the lock file {lock} "
                f"({error.strerror or type(error).__name__})"
            ) from error
        try:
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                raise ArgumentError(f"--out {path}: {lock} is not a plain file: remove it")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 200, 0).decode(errors="replace").split()
                who = (f"process {holder[1]} on {holder[0]}" if len(holder) == 2
                       else "another process")
                raise ArgumentError(
                    f"--out {path} is in use by another run ({who}, lock {lock}); wait for "
                    "it to finish, or choose another --out"
                ) from None
            try:
                current = os.stat(lock, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(handle)
            raise
        if current == os.fstat(handle).st_ino:
            return handle
        # The run that held it finished and removed the file meanwhile: open it again.
        os.close(handle)


class _NoLockFile(ArgumentError):
    """The lock file cannot be made where it goes (a read-only folder)."""


# The lock inside an existing results folder (see exclusive_use).
INNER_LOCK_FILE = ".engine-attribute.lock"


def _unique_short(name: str) -> str:
    """``_short(name)``, with a digest of the whole name when that cuts it: two long
    names alike in their first bytes get two locks."""
    short = _short(name)
    if short == name:
        return short
    return f"{short}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _short(name: str) -> str:
    """``name`` cut to leave room for a hidden prefix and suffix within a 255-byte name.

    Whole characters, counted in the bytes the file system holds: a byte that is not
    UTF-8 (``\\xff``) is one character of one byte.
    """
    size = 0
    for end, character in enumerate(name):
        size += len(os.fsencode(character))
        if size > MAX_NAME_IN_STAGING:
            return name[:end]
    return name


def readable_path(path: object) -> str:
    """``path`` as text any encoding can write: bytes that are not UTF-8 show as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _staging_prefix(name: str) -> str:
    return f".{_short(name)}.partial-"


# Bytes of the results folder's name kept in its staging folder's name.
MAX_NAME_IN_STAGING = 200
OWNER_FILE = ".owner"
# Inside a --checkpoint run's results folder: its finished chunks (see engine.store).
CHUNKS_FOLDER = ".chunks"
# Inside a results folder: the names of the files the last run wrote there.
WRITTEN_FILE = ".written"


# The listing's first line: which kind of run wrote the folder.
_KIND_LINE = "# written by: "


def _written_before(folder: Path) -> tuple[str | None, set[str]]:
    """The kind of run that wrote ``folder`` (None when the listing does not say) and the
    plain file names its listing holds (nothing with a path in it)."""
    try:
        lines = (folder / WRITTEN_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None, set()
    kind = None
    if lines and lines[0].startswith(_KIND_LINE):
        kind = lines.pop(0)[len(_KIND_LINE):]
        kind = kind if kind in RUN_KINDS else None
    names = {line for line in lines if line and line == Path(line).name
             and line not in (".", "..", WRITTEN_FILE)}
    if kind is None and names:
        # A listing from before the first line said: only --all saves a model.
        kind = "all" if "model.pt" in names else "checkpoint"
    return kind, names


def _remove_abandoned(parent: Path, name: str) -> None:
    """Remove staging folders of earlier runs on this machine whose process is gone.

    A run killed with SIGKILL cannot clean up after itself. Each staging folder names its
    host and process; one from this host whose process no longer exists is removed. Others
    (another host, a live process, no owner file) are left alone.
    """
    host = socket.gethostname()
    for folder in parent.glob(f"{glob.escape(_staging_prefix(name))}*"):
        try:
            owner_host, pid = (folder / OWNER_FILE).read_text().split()
            if owner_host != host or _alive(int(pid)):
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by an earlier run that was killed", folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


# The stop signals a caller's handler acted on while ``stops_watched`` runs (see
# engine.attribute): a results folder is not committed after one.
_stops_noted: list[list[int]] = []


@contextmanager
def stops_watched(noted: list[int]) -> Iterator[None]:
    """While the block runs, ``commit`` refuses to publish once ``noted`` holds a signal.

    A handler that raises KeyboardInterrupt to stop the run can have its exception
    swallowed: raised inside a callback (an import lock's, a ctypes one), Python reports
    "Exception ignored" and goes on. The run would then finish and replace the results
    it was told to drop; the list the handler also appends to is what commit reads.
    """
    _stops_noted.append(noted)
    try:
        yield
    finally:
        _stops_noted.remove(noted)


def _stop_noted() -> bool:
    return any(_stops_noted)


# Every folder whose results ``commit`` has put in place, in this process, in order.
_published: list[Path] = []


def published_folders() -> list[Path]:
    """The folders ``OutputDir.commit`` has published, oldest first: a stop that lands
    while a run winds down (its staging removed, its summary made) can tell that its
    results are complete."""
    return list(_published)


@contextmanager
def stop_signals_held(note: str) -> Iterator[list[int]]:
    """Record SIGINT, SIGTERM and SIGHUP instead of acting on them while the block runs
    (main thread only), then deliver each one received, once, as the block ends, however
    it ends: the stop is never lost. ``note`` is logged when one was held.

    Those the system's default would act on come first (the process ends, as it would
    have), then those a Python handler takes (the command line's, Python's own
    KeyboardInterrupt for Ctrl-C), which may raise in place of the block's own error.
    """
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    numbers = [number for number in (getattr(signal, name, None)
                                     for name in ("SIGINT", "SIGTERM", "SIGHUP"))
               if number is not None and signal.getsignal(number) is not signal.SIG_IGN]
    previous = {number: signal.signal(number, lambda signum, frame: held.append(signum))
                for number in numbers}
    try:
        yield held
    finally:
        for number, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back from here.
            if handler is None:
                handler = signal.default_int_handler if number == signal.SIGINT \
                    else signal.SIG_DFL
            signal.signal(number, handler)
        if held:
            log.info("%s (%s)", note, ", ".join(signal.Signals(n).name for n in held))
        received = list(dict.fromkeys(held))
        for number in sorted(received, key=lambda n: signal.getsignal(n) is not signal.SIG_DFL):
            signal.raise_signal(number)


def _keep_copy(path: Path, copy: Path) -> None:
    """A hard link to ``path`` (a link itself, not what it points to) at ``copy``; a copy
    where the file system has no hard links or ``path`` is on another one."""
    try:
        os.link(path, copy, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, copy, follow_symlinks=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def counted(count: int, noun: str) -> str:
    """``1 passenger``, ``2 passengers``: a count with its noun in the number it takes."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def signless_zeros(values: np.ndarray) -> np.ndarray:
    """``values`` with -0.0 made 0.0, so that tables never show "-0.0".

    A feature whose input equals its baseline gets 0 times a gradient, which is -0.0 when
    the gradient is negative; adding 0.0 turns it into 0.0 and leaves everything else as is.
    """
    return values + 0.0


def tidy_attributions(
    attributions: torch.Tensor,
    passenger_ids: Sequence[int],
    baseline_names: Sequence[str],
    feature_names: Sequence[str],
) -> pd.DataFrame:
    """(B, N, F) attributions -> rows ``row, passenger_id, base-type, feature, value``."""
    n_kinds, n_rows, n_features = attributions.shape
    kind, row, feature = np.meshgrid(
        np.arange(n_kinds), np.arange(n_rows), np.arange(n_features), indexing="ij"
    )
    return pd.DataFrame(
        {
            "row": row.ravel(),
            "passenger_id": np.asarray(passenger_ids)[row.ravel()],
            "base-type": np.asarray(baseline_names)[kind.ravel()],
            "feature": np.asarray(feature_names)[feature.ravel()],
            "value": signless_zeros(attributions.detach().double().cpu().numpy().ravel()),
        }
    )


def tidy_deltas(
    delta: torch.Tensor, passenger_ids: Sequence[int], baseline_names: Sequence[str]
) -> pd.DataFrame:
    """(B, N) convergence deltas -> rows ``row, passenger_id, base-type, delta``."""
    n_kinds, n_rows = delta.shape
    kind, row = np.meshgrid(np.arange(n_kinds), np.arange(n_rows), indexing="ij")
    return pd.DataFrame(
        {
            "row": row.ravel(),
            "passenger_id": np.asarray(passenger_ids)[row.ravel()],
            "base-type": np.asarray(baseline_names)[kind.ravel()],
            "delta": signless_zeros(delta.detach().double().cpu().numpy().ravel()),
        }
    )
