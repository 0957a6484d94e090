"""The resumable chunk store: row ranges, atomic chunk files, and the manifest's guard."""

import contextlib
import errno
import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.distributed import write_tables
from engine.errors import ArgumentError, DataError
from engine.io import tidy_attributions, tidy_deltas
from engine.store import ChunkStore, config_hash, plan_chunks

KINDS = ("mean-base", "zero-base")
FEATURES = ("a", "b", "c")


def make_store(folder, n_rows=10, chunk_rows=4, **config):
    config = {"n_steps": 8, "method": "gausslegendre", **config}
    return ChunkStore(folder, config, plan_chunks(n_rows, chunk_rows), KINDS)


def chunk_arrays(chunk, generator):
    return {
        "attributions": torch.randn(len(KINDS), chunk.n_rows, len(FEATURES),
                                    generator=generator).numpy(),
        "delta": torch.randn(len(KINDS), chunk.n_rows, generator=generator,
                             dtype=torch.float64).numpy(),
        "passenger_id": np.arange(chunk.start, chunk.stop) + 100,
    }


def test_plan_covers_every_row_once_in_order():
    chunks = plan_chunks(10, 4)

    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert [c.index for c in chunks] == [0, 1, 2]


@pytest.mark.parametrize(("n_rows", "chunk_rows"), [(0, 4), (10, 0), (10, True)])
def test_plan_refuses_counts_below_one(n_rows, chunk_rows):
    with pytest.raises(ArgumentError, match="positive integer"):
        plan_chunks(n_rows, chunk_rows)


def test_config_hash_ignores_key_order_but_not_values():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1, "b": 2}) != config_hash({"a": 1, "b": 3})


def with_one_chunk(store):
    """``store`` opened, with its first chunk written: what a run leaves to resume."""
    store.open()
    store.write(store.chunks[0], chunk_arrays(store.chunks[0], torch.Generator().manual_seed(0)))
    return store


def test_opening_writes_nothing_until_the_first_chunk(tmp_path):
    store = make_store(tmp_path / "out" / "chunks")

    store.open()

    assert not (tmp_path / "out").exists()
    store.write(store.chunks[1], chunk_arrays(store.chunks[1], torch.Generator().manual_seed(0)))
    assert sorted(p.name for p in store.folder.iterdir()) == ["chunk-000001.npz", "manifest.json"]


def test_a_ctrl_c_inside_the_chunk_writer_waits_for_the_chunk(tmp_path, monkeypatch):
    # Raised inside numpy's zip writer it left the writer half closed, whose clean-up
    # printed "AttributeError: 'ZipFile' object has no attribute '_writing'" at exit.
    import signal

    import engine.store
    from tests.stop_signals import stop_signals_as_started

    store = make_store(tmp_path / "chunks")
    store.open()
    real_savez = np.savez

    def ctrl_c_then_savez(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(engine.store.np, "savez", ctrl_c_then_savez)
    chunk = store.chunks[0]
    with stop_signals_as_started(), pytest.raises(KeyboardInterrupt):
        store.write(chunk, chunk_arrays(chunk, torch.Generator().manual_seed(0)))

    monkeypatch.undo()
    assert store.done() == {0}
    assert store.read(chunk)["passenger_id"].tolist() == [100, 101, 102, 103]


def test_manifest_records_row_ranges_baselines_and_hash(tmp_path):
    store = with_one_chunk(make_store(tmp_path / "chunks"))

    manifest = json.loads((tmp_path / "chunks" / "manifest.json").read_text())
    assert manifest["config_hash"] == store.hash
    assert manifest["baselines"] == list(KINDS)
    assert [c["rows"] for c in manifest["chunks"]] == [[0, 4], [4, 8], [8, 10]]


def test_written_chunks_are_done_and_read_back_exactly(tmp_path):
    store = make_store(tmp_path / "chunks")
    store.open()
    arrays = chunk_arrays(store.chunks[1], torch.Generator().manual_seed(0))

    store.write(store.chunks[1], arrays)

    assert store.done() == {1}
    assert [c.index for c in store.pending()] == [0, 2]
    back = store.read(store.chunks[1])
    for name, value in arrays.items():
        assert np.array_equal(back[name], value) and back[name].dtype == value.dtype


def test_reopening_with_the_same_config_keeps_finished_chunks(tmp_path):
    store = make_store(tmp_path / "chunks")
    store.open()
    store.write(store.chunks[0], chunk_arrays(store.chunks[0], torch.Generator().manual_seed(0)))

    again = make_store(tmp_path / "chunks")
    again.open()

    assert again.done() == {0}


def test_a_changed_config_is_refused_naming_the_setting(tmp_path):
    with_one_chunk(make_store(tmp_path / "chunks", n_steps=8))

    with pytest.raises(ArgumentError, match=r"another job \(n_steps: 8 then, 16 now\)") as error:
        make_store(tmp_path / "chunks", n_steps=16).open()
    assert "\n" not in str(error.value)


def test_a_manifest_without_chunks_is_replaced_by_another_job(tmp_path):
    # A job killed between writing its manifest and its first chunk guards nothing.
    stale = with_one_chunk(make_store(tmp_path / "chunks", n_steps=8))
    stale.path(stale.chunks[0]).unlink()
    store = make_store(tmp_path / "chunks", n_steps=16)

    with_one_chunk(store)

    manifest = json.loads((tmp_path / "chunks" / "manifest.json").read_text())
    assert manifest["config_hash"] == store.hash and store.done() == {0}


def test_a_temporary_file_left_by_a_kill_is_not_a_finished_chunk(tmp_path):
    store = make_store(tmp_path / "chunks")
    store.open()
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / ".chunk-000000.npz.x1y2.tmp").write_bytes(b"half a chunk")

    assert store.done() == set()


def test_a_chunk_of_another_job_is_refused_on_read(tmp_path):
    store = make_store(tmp_path / "chunks")
    store.open()
    (tmp_path / "chunks").mkdir()
    other = make_store(tmp_path / "other", n_steps=16)
    other.open()
    other.write(other.chunks[0], chunk_arrays(other.chunks[0], torch.Generator().manual_seed(0)))
    (tmp_path / "other" / "chunk-000000.npz").rename(tmp_path / "chunks" / "chunk-000000.npz")

    with pytest.raises(DataError, match="another job"):
        store.read(store.chunks[0])


def _full_store(folder):
    store = make_store(folder)
    store.open()
    generator = torch.Generator().manual_seed(2)
    for chunk in store.chunks:
        store.write(chunk, chunk_arrays(chunk, generator))
    return store


def _rewrite(path, **arrays):
    with np.load(path) as stored:
        kept = {name: stored[name] for name in stored.files}
    kept.update(arrays)
    kept = {name: value for name, value in kept.items() if value is not None}
    with open(path, "wb") as stream:
        np.savez(stream, **kept)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "no rows", "short arrays",
                                    "no delta", "nan", "int attributions", "string delta",
                                    "big-endian", "float ids", "objects", "no hash"])
def test_a_damaged_chunk_is_one_error_naming_the_file_and_the_fix(tmp_path, damage):
    store = _full_store(tmp_path / "chunks")
    path = store.path(store.chunks[1])
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("passenger,value\n1,2\n")
    elif damage == "no rows":
        _rewrite(path, rows=None)
    elif damage == "short arrays":
        _rewrite(path, attributions=np.zeros((2, 1, 3), np.float32))
    elif damage == "no delta":
        _rewrite(path, delta=None)
    elif damage == "nan":
        _rewrite(path, attributions=np.full((2, 4, 3), np.nan, np.float32))
    elif damage == "int attributions":
        _rewrite(path, attributions=np.zeros((2, 4, 3), np.int64))
    elif damage == "string delta":
        _rewrite(path, delta=np.full((2, 4), "x"))
    elif damage == "big-endian":
        _rewrite(path, delta=np.zeros((2, 4), ">f8"))
    elif damage == "float ids":
        _rewrite(path, passenger_id=np.arange(4) + 0.5)
    elif damage == "objects":
        with open(path, "wb") as stream:
            np.savez(stream, rows=np.array([4, 8]), delta=np.array([{}], dtype=object))
    else:
        _rewrite(path, config_hash=None)

    with pytest.raises(DataError) as error:
        write_tables(store, tmp_path / "out", FEATURES, "csv")

    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert message.endswith("delete it and rerun to compute rows 4-7 again")
    assert "pickle" not in message
    assert not (tmp_path / "out" / "interpretation_results.csv").exists()


def test_a_manifest_whose_config_is_not_an_object_is_refused(tmp_path):
    store = with_one_chunk(make_store(tmp_path / "chunks"))
    manifest = tmp_path / "chunks" / "manifest.json"
    stored = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**stored, "config": [1, 2], "config_hash": "x"}))

    with pytest.raises(ArgumentError, match=r"manifest.json: its config is a list, not an "):
        make_store(tmp_path / "chunks").open()
    assert store.done() == {0}


def test_a_file_where_the_chunk_folder_goes_is_refused_on_open(tmp_path):
    (tmp_path / "chunks").write_text("not a folder")

    with pytest.raises(ArgumentError, match=r"chunks is a file where the chunks of the job go"):
        make_store(tmp_path / "chunks").open()


def test_a_changed_seed_is_named_before_the_values_it_changes(tmp_path):
    with_one_chunk(make_store(tmp_path / "chunks", seed=404,
                              baseline_values=[[0.5, 0.25, 0.125], [0.0, 0.0, 0.0]]))

    with pytest.raises(ArgumentError) as error:
        make_store(tmp_path / "chunks", seed=1,
                   baseline_values=[[0.5, 0.75, 0.125], [0.0, 0.0, 0.0]]).open()

    assert ("another job (seed: 404 then, 1 now; baseline_values: 0.25 then, 0.75 now at "
            "number 1)") in str(error.value)


def test_tables_from_chunks_are_the_tables_of_the_whole_arrays(tmp_path):
    store = make_store(tmp_path / "chunks")
    store.open()
    generator = torch.Generator().manual_seed(1)
    parts = [chunk_arrays(chunk, generator) for chunk in store.chunks]
    for chunk, arrays in zip(store.chunks, parts):
        store.write(chunk, arrays)

    write_tables(store, tmp_path / "out", FEATURES, "csv")

    attributions = torch.from_numpy(np.concatenate([p["attributions"] for p in parts], axis=1))
    delta = torch.from_numpy(np.concatenate([p["delta"] for p in parts], axis=1))
    ids = np.concatenate([p["passenger_id"] for p in parts])
    expected = tidy_attributions(attributions, ids, KINDS, FEATURES).to_csv(index=False)
    assert (tmp_path / "out" / "interpretation_results.csv").read_text() == expected
    expected = tidy_deltas(delta, ids, KINDS).to_csv(index=False)
    assert (tmp_path / "out" / "convergence.csv").read_text() == expected


def test_parquet_tables_hold_the_same_rows_as_csv(tmp_path):
    store = make_store(tmp_path / "chunks")
    store.open()
    generator = torch.Generator().manual_seed(2)
    for chunk in store.chunks:
        store.write(chunk, chunk_arrays(chunk, generator))

    write_tables(store, tmp_path / "csv", FEATURES, "csv")
    write_tables(store, tmp_path / "parquet", FEATURES, "parquet")

    for name in ("interpretation_results", "convergence"):
        from_csv = pd.read_csv(tmp_path / "csv" / f"{name}.csv")
        from_parquet = pd.read_parquet(tmp_path / "parquet" / f"{name}.parquet")
        pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Results folders (engine.io.OutputDir)


def _publish(folder, names):
    from engine.io import OutputDir

    with OutputDir(folder) as outputs:
        for name in names:
            outputs.write_text(name, f"{name} of this run")
        return outputs.commit()


def test_a_rerun_removes_the_files_only_the_earlier_run_wrote(tmp_path):
    folder = tmp_path / "results"
    _publish(folder, ["report.html", "heatmap_zero-base.png", "heatmap_one-base.png"])
    (folder / "notes.txt").write_text("the user's own file")

    published = _publish(folder, ["report.html", "heatmap_zero-base.png"])

    assert sorted(p.name for p in published) == ["heatmap_zero-base.png", "report.html"]
    assert sorted(p.name for p in folder.iterdir()) == [
        ".written", "heatmap_zero-base.png", "notes.txt", "report.html"]
    assert (folder / "notes.txt").read_text() == "the user's own file"


def test_a_folder_where_a_result_goes_is_named_before_anything_moves(tmp_path):
    from engine.errors import ArgumentError

    folder = tmp_path / "results"
    _publish(folder, ["a.csv", "report.html"])
    (folder / "a.csv").write_text("earlier")
    (folder / "report.html").unlink()
    (folder / "report.html").mkdir()

    with pytest.raises(ArgumentError, match="report.html is a folder where a result file goes"):
        _publish(folder, ["a.csv", "report.html"])

    assert (folder / "a.csv").read_text() == "earlier"
    assert not list(tmp_path.glob(".results.partial-*"))


def test_a_listing_cannot_name_files_outside_the_folder(tmp_path):
    folder = tmp_path / "results"
    _publish(folder, ["a.csv"])
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    (folder / ".written").write_text("# written by: all\na.csv\n../keep.txt\n/etc/hostname\n")

    _publish(folder, ["b.csv"])

    assert outside.read_text() == "keep"
    assert sorted(p.name for p in folder.iterdir()) == [".written", "b.csv"]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _write_csv(outputs):
    outputs.write_csv("table.csv", pd.DataFrame({"a": [1, 2]}))


def _write_json(outputs):
    outputs.write_json("validation.json", {"passed": True})


def _save_weights(outputs):
    from engine.model import TitanicMLP, save_weights

    save_weights(TitanicMLP(), outputs.file("model.pt"))


def _save_weights_zip_writer(outputs, monkeypatch):
    # torch.save's zip writer meets a full disk as an OSError, and raises a RuntimeError
    # about file positions while handling it.
    import torch

    from engine.model import TitanicMLP, save_weights

    def zip_writer_full(payload, stream):
        try:
            stream.write(b"PK")
            _disk_full()
        finally:
            # Closing the archive, while the OSError propagates: it becomes the context.
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "4608 vs 4500")  # noqa: B012

    monkeypatch.setattr(torch, "save", zip_writer_full)
    save_weights(TitanicMLP(), outputs.file("model.pt"))


def _draw(outputs):
    # A picture library writing its own file: the error names no file at all.
    with open(outputs.file("heatmap.png"), "wb") as stream:
        stream.write(b"\x89PNG")
        _disk_full()


# Each result written with its low-level write failing for want of space, and what the
# error names: the file as it would be in the folder, or the folder when nothing says.
@pytest.mark.parametrize("write, low_level, named", [
    (_write_csv, "pandas.DataFrame.to_csv", "table.csv"),
    (_write_json, "pathlib.Path.write_text", "validation.json"),
    (_save_weights, "torch.save", "model.pt"),
    (_draw, None, ""),
    (_save_weights_zip_writer, "monkeypatch", "model.pt"),
], ids=["csv", "json", "weights", "caller-own-file", "weights-zip-writer"])
def test_a_full_disk_names_what_could_not_be_written_and_keeps_the_folder(
    tmp_path, monkeypatch, write, low_level, named
):
    from engine.io import OutputDir

    folder = tmp_path / "results"
    _publish(folder, ["report.html"])

    with pytest.raises(OSError) as err, OutputDir(folder) as outputs:
        outputs.write_text("report.html", "this run")
        if low_level == "monkeypatch":
            write(outputs, monkeypatch)
        else:
            if low_level is not None:
                monkeypatch.setattr(low_level, _disk_full)
            write(outputs)
        outputs.commit()

    target = folder / named if named else folder
    assert str(err.value) == f"could not write {target}: {os.strerror(errno.ENOSPC)}"
    assert err.value.errno == errno.ENOSPC
    assert (folder / "report.html").read_text() == "report.html of this run"
    assert sorted(p.name for p in folder.iterdir()) == [".written", "report.html"]
    assert not list(tmp_path.glob(".results.partial-*"))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_a_full_disk_before_the_first_result_names_the_folder_and_leaves_nothing(
    tmp_path, monkeypatch
):
    from engine.io import OutputDir

    monkeypatch.setattr("pathlib.Path.write_text", _disk_full)

    with pytest.raises(OSError) as err:
        OutputDir(tmp_path / "results")

    folder = tmp_path / "results"
    assert str(err.value) == f"could not write {folder}: {os.strerror(errno.ENOSPC)}"
    assert list(tmp_path.iterdir()) == []


def test_a_chunk_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    store = make_store(tmp_path / "chunks")
    store.open()
    monkeypatch.setattr("engine.store.np.savez", _disk_full)

    with pytest.raises(OSError) as err:
        store.write(store.chunks[0], chunk_arrays(store.chunks[0],
                                                  torch.Generator().manual_seed(0)))

    assert str(err.value) == (f"could not write {store.path(store.chunks[0])}: "
                              f"{os.strerror(errno.ENOSPC)}")
    assert store.done() == set()


@pytest.mark.parametrize("earlier, later", [("all", "checkpoint"), ("checkpoint", "all")])
def test_a_run_of_the_other_kind_does_not_touch_a_folders_results(tmp_path, earlier, later):
    from engine.io import OutputDir

    folder = tmp_path / "results"
    with OutputDir(folder, earlier) as outputs:
        outputs.write_text("model.pt", "weights")
        outputs.write_text("interpretation_results.csv", "earlier table")
        outputs.commit()

    with pytest.raises(ArgumentError, match=rf"^--out {folder} holds the results of a "
                                            rf"--{earlier} run .*choose another --out"):
        OutputDir(folder, later)

    assert (folder / "model.pt").read_text() == "weights"
    assert (folder / "interpretation_results.csv").read_text() == "earlier table"
    assert not list(tmp_path.glob(".results.partial-*"))


def test_a_listing_without_its_kind_that_names_a_model_is_an_all_run(tmp_path):
    from engine.io import OutputDir

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "model.pt").write_text("weights")
    (folder / ".written").write_text("model.pt\nreport.html\n")

    with pytest.raises(ArgumentError, match="holds the results of a --all run"):
        OutputDir(folder, "checkpoint")
    _publish(folder, ["report.html"])  # an --all run replaces its own files as before

    assert sorted(p.name for p in folder.iterdir()) == [".written", "report.html"]


def test_a_changed_object_setting_names_the_number_that_changed(tmp_path):
    with_one_chunk(make_store(tmp_path / "chunks",
                              scaling={"high": [3.0, 1.0, 80.0], "low": [1.0, 0.0, 0.0]}))

    with pytest.raises(ArgumentError, match=r"scaling: 80\.0 then, 81\.5 now at number 2"):
        make_store(tmp_path / "chunks",
                   scaling={"high": [3.0, 1.0, 81.5], "low": [1.0, 0.0, 0.0]}).open()


def test_an_out_folder_that_cannot_be_created_in_is_refused(tmp_path, monkeypatch):
    import tempfile

    from engine.io import check_output_folder

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ArgumentError, match=r"is not writable: cannot create a folder in .* "
                                            r"\(Permission denied\)"):
        check_output_folder(tmp_path / "results")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# One run at a time per results folder (engine.io.exclusive_use)


HOLD_LOCK = """
import fcntl, os, sys, time
handle = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(handle, fcntl.LOCK_EX)
os.write(handle, b"otherhost 4242\\n")
print("holding", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def holding(lock):
    """A process that holds ``lock`` as a run would, killed when the block ends."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "holding"
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_a_folder_in_use_is_refused_by_any_spelling_and_free_once_its_run_ends(tmp_path):
    from engine.io import exclusive_use

    folder, lock = tmp_path / "results", tmp_path / ".results.lock"
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    (folder / "sub").mkdir()
    with holding(lock):
        for spelling in (folder, tmp_path / "link", folder / "sub" / ".."):
            with pytest.raises(ArgumentError, match=rf"^--out {spelling} is in use by another "
                                                    rf"run \(process 4242 on otherhost, lock "
                                                    rf"{lock}\)"):
                with exclusive_use(spelling):
                    pass

    # The system let go of the killed process's lock; its file is simply reused.
    assert lock.exists()
    with exclusive_use(folder):
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert not lock.exists()


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_an_odd_file_where_the_lock_goes_is_one_error(tmp_path, kind):
    from engine.io import exclusive_use

    lock = tmp_path / ".results.lock"
    if kind == "directory":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.symlink_to(tmp_path / "elsewhere")

    with pytest.raises(ArgumentError, match=rf"^--out {tmp_path / 'results'}: "):
        with exclusive_use(tmp_path / "results"):
            pass


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "RANK", "SLURM_PROCID"])
def test_the_other_processes_of_a_run_do_not_take_the_lock(tmp_path, monkeypatch, variable):
    from engine.io import exclusive_use

    monkeypatch.setenv(variable, "1")
    with exclusive_use(tmp_path / "results"):
        assert list(tmp_path.iterdir()) == []


def test_a_listing_without_its_kind_or_a_model_is_a_checkpoint_run(tmp_path):
    from engine.io import OutputDir

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "interpretation_results.csv").write_text("earlier table")
    (folder / ".written").write_text("interpretation_results.csv\n")

    with pytest.raises(ArgumentError, match="holds the results of a --checkpoint run"):
        OutputDir(folder, "all")
    assert (folder / "interpretation_results.csv").read_text() == "earlier table"


def test_the_chunks_of_an_unfinished_checkpoint_run_keep_other_runs_out(tmp_path):
    from engine.io import OutputDir, check_output_folder

    folder = tmp_path / "results"
    (folder / ".chunks").mkdir(parents=True)

    with pytest.raises(ArgumentError, match=r"holds the finished chunks of an unfinished "
                                            r"--checkpoint run .*run that command again"):
        OutputDir(folder, "all")
    check_output_folder(folder, "checkpoint")  # its own run resumes


def _library_bug_during_missing_file():
    try:
        os.stat("/nonexistent/probe")
    except OSError:
        raise RuntimeError("a library's own bug")  # noqa: B904 - the context is the point


def _library_bug_hiding_a_full_disk():
    try:
        _disk_full()
    except OSError:
        raise RuntimeError("a library's own bug") from None


def _engine_error_from_a_full_disk():
    from engine.errors import ModelError

    try:
        _disk_full()
    except OSError as error:
        raise ModelError("computing again failed: no room in the cache") from error


# Errors that are not a failed write of a result, though an OSError is somewhere near:
# they keep their own type and message.
@pytest.mark.parametrize("raise_it, kind, message", [
    (_library_bug_during_missing_file, RuntimeError, "a library's own bug"),
    (_library_bug_hiding_a_full_disk, RuntimeError, "a library's own bug"),
    (_engine_error_from_a_full_disk, RuntimeError, "computing again failed"),
], ids=["runtime-error-while-a-file-was-missing", "context-suppressed", "engine-error"])
def test_errors_that_are_not_failed_writes_keep_their_message(tmp_path, raise_it, kind,
                                                                message):
    from engine.io import OutputDir, WriteError

    folder = tmp_path / "results"
    _publish(folder, ["report.html"])

    with pytest.raises(kind) as err, OutputDir(folder) as outputs:
        outputs.write_text("report.html", "this run")
        outputs._write("table.csv", lambda path: raise_it())

    assert not isinstance(err.value, WriteError)
    assert str(err.value).startswith(message)
    assert (folder / "report.html").read_text() == "report.html of this run"


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_a_rename_failing_halfway_leaves_the_folder_as_it_was(tmp_path, monkeypatch, failing):
    import engine.io
    from engine.io import OutputDir

    folder = tmp_path / "results"
    _publish(folder, ["report.html", "a.csv", "old.png"])
    (folder / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    renames = []
    replace = os.replace

    def flaky(source, target):
        renames.append(target)
        if len(renames) == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(source))
        replace(source, target)

    with pytest.raises(OSError) as err, OutputDir(folder) as outputs:
        for name in ("report.html", "a.csv", "new.csv"):
            outputs.write_text(name, f"{name} of the second run")
        monkeypatch.setattr(engine.io.os, "replace", flaky)
        outputs.commit()

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert str(err.value).startswith("could not write")
    assert not list(tmp_path.glob(".results.partial-*"))


def test_two_long_folder_names_alike_in_their_first_bytes_get_two_locks(tmp_path):
    from engine.io import exclusive_use

    first, second = tmp_path / ("q" * 240 + "A"), tmp_path / ("q" * 240 + "B")

    with exclusive_use(first), exclusive_use(second):
        locks = sorted(p.name for p in tmp_path.iterdir())

    assert len(locks) == 2 and all(name.endswith(".lock") for name in locks)
    assert all(len(name.encode()) < 256 for name in locks)


def test_an_existing_folder_on_another_file_system_takes_its_results(tmp_path, monkeypatch):
    from engine import io

    results = tmp_path / "mounted"
    results.mkdir()
    (results / "a.txt").write_text("earlier")
    real_replace = io.os.replace

    def within_one_file_system(source, target):
        # The folder is a mount point: a rename from outside it crosses devices.
        if results not in Path(source).parents or results not in Path(target).parents:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(source, target)

    monkeypatch.setattr(io.os, "replace", within_one_file_system)
    outputs = io.OutputDir(results)
    outputs.write_text("a.txt", "new")
    outputs.write_text("b.txt", "new")
    outputs.commit()

    assert (results / "a.txt").read_text() == (results / "b.txt").read_text() == "new"
    assert sorted(p.name for p in results.iterdir()) == [".written", "a.txt", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mounted"]


READ_ONLY_PARENT_RUN = """
import sys
from pathlib import Path
from engine.io import OutputDir, exclusive_use
out = Path(sys.argv[1])
with exclusive_use(out), OutputDir(out) as outputs:
    outputs.write_text("a.txt", "new")
    outputs.commit()
print(sorted(p.name for p in out.iterdir()))
"""


def test_a_writable_folder_in_a_read_only_parent_takes_its_results(tmp_path):
    import shutil
    import subprocess
    import sys

    parent = tmp_path / "read-only"
    results = parent / "results"
    results.mkdir(parents=True)
    parent.chmod(0o555)
    command = [sys.executable, "-c", READ_ONLY_PARENT_RUN, str(results)]
    if os.geteuid() == 0:
        # Permission bits do not stop root: drop the capabilities that override them.
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run without root's permission override")
        caps = "-dac_override,-dac_read_search,-fowner"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    try:
        completed = subprocess.run(command, capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parents[1])
        probe = subprocess.run([*command[:-2], "-c", f"open({str(parent / 'x')!r}, 'w')"],
                               capture_output=True, text=True)
    finally:
        parent.chmod(0o755)

    assert probe.returncode != 0, "the parent folder was writable after all"
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "['.written', 'a.txt']"
    assert sorted(p.name for p in parent.iterdir()) == ["results"]


def test_a_run_locked_inside_the_folder_keeps_a_run_locking_beside_it_out(tmp_path):
    from engine.io import INNER_LOCK_FILE, exclusive_use

    folder = tmp_path / "results"
    folder.mkdir()
    # A run that cannot write the parent (read-only for it) holds the lock inside.
    with holding(folder / INNER_LOCK_FILE):
        with pytest.raises(ArgumentError, match=r"is in use by another run"):
            with exclusive_use(folder):
                pass
        assert not (tmp_path / ".results.lock").exists()

    with exclusive_use(folder):
        assert (folder / INNER_LOCK_FILE).exists() and (tmp_path / ".results.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert list(folder.iterdir()) == []


def test_tables_write_zeros_without_a_sign():
    attributions = torch.tensor([[[0.0, -0.0, -1.5]], [[-0.0, 2.0, 0.0]]])
    delta = torch.tensor([[-0.0], [0.25]], dtype=torch.float64)

    table = tidy_attributions(attributions, [7], KINDS, FEATURES)
    deltas = tidy_deltas(delta, [7], KINDS)

    assert table["value"].tolist() == [0.0, 0.0, -1.5, 0.0, 2.0, 0.0]
    assert not np.signbit(table["value"].to_numpy()[[0, 1, 3, 5]]).any()
    assert not np.signbit(deltas["delta"].to_numpy()[0])
    assert "-0.0" not in table.to_csv(index=False) + deltas.to_csv(index=False)
