"""Ctrl-C during training or attribution: status 130, one message, no result files.

The CLI runs as a real subprocess; the test waits for the phase line on stderr, then
sends SIGINT as a terminal would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stop_signals import default_stop_signals, stop_signals_as_started

pytestmark = pytest.mark.skipif(os.name != "posix", reason="sends SIGINT to a subprocess")


def interrupt_when(folder: Path, phase: str, *flags: str, settle: float = 0.0,
                   sig: int = signal.SIGINT):
    """Start the CLI, send ``sig`` once ``phase`` appears on stderr (plus ``settle`` s)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.attribute", "--all", "--out", str(folder / "results"),
         *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder,
        env=os.environ.copy(), preexec_fn=default_stop_signals,
    )
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith(phase):
                time.sleep(settle)
                process.send_signal(sig)
                break
        out, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert any(line.startswith(phase) for line in seen), f"no line starting {phase!r}: {seen}"
    return process.returncode, "".join(seen) + rest


def assert_interrupted(
    status: int, stderr: str, folder: Path, earlier_results: list[str] | None = None,
    sig: int = signal.SIGINT,
) -> None:
    assert status == 128 + sig, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: no results were written"
    if earlier_results is None:
        assert not (folder / "results").exists()
    else:
        assert sorted(p.name for p in (folder / "results").iterdir()) == earlier_results
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]


def test_ctrl_c_during_training_keeps_earlier_results_as_they_were(tmp_path, titanic_csv):
    earlier = tmp_path / "results"
    earlier.mkdir()
    (earlier / "convergence.csv").write_text("from an earlier run\n")

    # Far more epochs than the test will wait for; the pause lets Lightning's fit begin,
    # which handles Ctrl-C its own way (it calls sys.exit(1)).
    status, stderr = interrupt_when(
        tmp_path, "training", "--data", str(titanic_csv), "--epochs", "100000", settle=1.5
    )

    assert_interrupted(status, stderr, tmp_path, earlier_results=["convergence.csv"])
    assert (earlier / "convergence.csv").read_text() == "from an earlier run\n"


def test_ctrl_c_during_attribution(tmp_path, titanic_csv):
    # 179 rows x 4 baselines x 400 steps: long enough to be inside the engine or Captum.
    status, stderr = interrupt_when(
        tmp_path, "explaining", "--data", str(titanic_csv), "--epochs", "1", "--n-steps", "400"
    )

    assert_interrupted(status, stderr, tmp_path)


def test_ctrl_c_during_the_final_renames_is_held_until_all_files_are_in_place(
    tmp_path, monkeypatch, caplog
):
    from engine import io

    outputs = io.OutputDir(tmp_path / "results")
    for name in ("a.txt", "b.txt", "c.txt"):
        outputs.write_text(name, name)
    real_replace = io.os.replace
    calls = []

    def replace_then_ctrl_c(source, target):
        real_replace(source, target)
        calls.append(target)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(io.os, "replace", replace_then_ctrl_c)
    with stop_signals_as_started():
        handler_before = signal.getsignal(signal.SIGINT)
        # Once every file is in place, the Ctrl-C is delivered: it is not lost.
        with caplog.at_level("INFO", logger="engine.io"), pytest.raises(KeyboardInterrupt):
            outputs.commit()
        handler_after = signal.getsignal(signal.SIGINT)

    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert names == [".written", "a.txt", "b.txt", "c.txt"]
    assert "(SIGINT)" in caplog.text
    assert handler_after is handler_before


def test_a_ctrl_c_held_when_a_rename_fails_still_stops_the_caller(tmp_path, monkeypatch):
    # The failed commit puts the folder back as it was; the Ctrl-C was lost with the error.
    from engine import io

    outputs = io.OutputDir(tmp_path / "results")
    for name in ("a.txt", "b.txt"):
        outputs.write_text(name, name)
    real_replace = io.os.replace
    calls = []

    def ctrl_c_then_fail(source, target):
        calls.append(target)
        if len(calls) == 1:
            real_replace(source, target)
            signal.raise_signal(signal.SIGINT)
            return
        raise OSError(5, "Input/output error", str(target))

    monkeypatch.setattr(io.os, "replace", ctrl_c_then_fail)
    with stop_signals_as_started(), pytest.raises(KeyboardInterrupt):
        outputs.commit()

    assert not (tmp_path / "results" / "a.txt").exists()


_TWO_STOPS_DURING_THE_RENAMES = """
import signal, sys
from pathlib import Path
from engine import io

signal.signal(signal.SIGTERM, signal.SIG_DFL)
outputs = io.OutputDir(Path(sys.argv[1]))
outputs.write_text("a.txt", "a")
real_replace = io.os.replace

def replace_then_two_stops(source, target):
    real_replace(source, target)
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGTERM)

io.os.replace = replace_then_two_stops
try:
    outputs.commit()
except KeyboardInterrupt:
    print("KeyboardInterrupt")
print("still alive")
"""


def test_a_sigterm_held_beside_a_ctrl_c_still_ends_the_process(tmp_path):
    # The Ctrl-C's KeyboardInterrupt came first, and the SIGTERM was never delivered.
    completed = subprocess.run(
        [sys.executable, "-c", _TWO_STOPS_DURING_THE_RENAMES, str(tmp_path / "results")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=60,
        preexec_fn=default_stop_signals,
    )

    assert completed.returncode == -signal.SIGTERM, completed.stderr
    assert completed.stdout == ""
    assert (tmp_path / "results" / "a.txt").read_text() == "a"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_the_command_handles_is_held_during_the_renames_too(
    tmp_path, monkeypatch, caplog, sig
):
    from engine import io
    from engine.attribute import _noticed_interrupts

    outputs = io.OutputDir(tmp_path / "results")
    for name in ("a.txt", "b.txt", "c.txt"):
        outputs.write_text(name, name)
    real_replace = io.os.replace
    calls = []

    def replace_then_signal(source, target):
        real_replace(source, target)
        calls.append(target)
        if len(calls) == 1:
            signal.raise_signal(sig)

    monkeypatch.setattr(io.os, "replace", replace_then_signal)
    # The command line's handlers, which turn the signal into KeyboardInterrupt.
    with stop_signals_as_started(), \
            _noticed_interrupts(signal.SIGTERM, signal.SIGHUP) as received:
        handler_before = signal.getsignal(sig)
        with caplog.at_level("INFO", logger="engine.io"), pytest.raises(KeyboardInterrupt):
            outputs.commit()
        assert signal.getsignal(sig) is handler_before
        # The command's handler got the signal once the files were in place, once.
        assert received == [sig]

    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert names == [".written", "a.txt", "b.txt", "c.txt"]
    assert "stop signal" in caplog.text


def test_a_stop_whose_interrupt_was_swallowed_still_drops_the_results(tmp_path):
    from engine import io
    from engine.attribute import _noticed_interrupts

    results = tmp_path / "results"
    earlier = io.OutputDir(results)
    earlier.write_text("a.txt", "earlier")
    earlier.commit()
    outputs = io.OutputDir(results)
    outputs.write_text("a.txt", "new")

    with stop_signals_as_started(), _noticed_interrupts(signal.SIGTERM) as received:
        # Python drops an exception raised inside some callbacks ("Exception ignored"):
        # the handler ran, and the run went on.
        try:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt), outputs:
            outputs.commit()

    assert received == [signal.SIGTERM]
    assert (results / "a.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    # Outside the handlers' block a commit publishes again.
    later = io.OutputDir(results)
    later.write_text("a.txt", "later")
    later.commit()
    assert (results / "a.txt").read_text() == "later"


def test_staging_left_by_a_killed_run_is_removed_by_the_next_one(tmp_path):
    import socket

    from engine import io

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    host = socket.gethostname()
    abandoned = tmp_path / ".results.partial-abandoned"
    abandoned.mkdir()
    (abandoned / io.OWNER_FILE).write_text(f"{host} {dead_pid}\n")
    (abandoned / "model.pt").write_bytes(b"half written")
    running = tmp_path / ".results.partial-running"
    running.mkdir()
    (running / io.OWNER_FILE).write_text(f"{host} {os.getpid()}\n")
    elsewhere = tmp_path / ".results.partial-elsewhere"
    elsewhere.mkdir()
    (elsewhere / io.OWNER_FILE).write_text(f"another-{host} {dead_pid}\n")
    unowned = tmp_path / ".results.partial-unowned"
    unowned.mkdir()

    outputs = io.OutputDir(tmp_path / "results")
    outputs.discard()

    assert not abandoned.exists()
    assert running.exists() and elsewhere.exists() and unowned.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("phase, flags", [
    ("training", ("--epochs", "100000")),
    ("explaining", ("--epochs", "1", "--n-steps", "400")),
], ids=["training", "attribution"])
def test_a_stop_signal_drops_the_staged_results_like_ctrl_c(tmp_path, titanic_csv, sig,
                                                             phase, flags):
    status, stderr = interrupt_when(tmp_path, phase, "--data", str(titanic_csv), *flags,
                                    settle=1.5 if phase == "training" else 0.0, sig=sig)

    assert_interrupted(status, stderr, tmp_path, sig=sig)


_INTERRUPTED_WHILE_IMPORTING = """
import os, runpy, signal, sys

STOP = getattr(signal, sys.argv[2])

class InterruptTorchImport:
    # A stop signal that arrives while torch loads, at a known moment.
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), STOP)
        return None

sys.meta_path.insert(0, InterruptTorchImport())
sys.argv = ["engine.attribute", "--all", "--out", sys.argv[1], *sys.argv[3:]]
runpy.run_module("engine.attribute", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_the_command_starts_is_one_line(tmp_path, name):
    # SIGTERM and SIGHUP used to end the process there without a word.
    completed = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_WHILE_IMPORTING, str(tmp_path / "results"), name],
        capture_output=True, text=True, cwd=tmp_path, env=os.environ.copy(),
        preexec_fn=default_stop_signals, timeout=120,
    )

    assert completed.returncode == 128 + getattr(signal, name), completed.stderr
    assert completed.stderr == "interrupted: no results were written\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP"])
def test_a_stop_signal_ignored_when_the_command_starts_stays_ignored(tmp_path, name):
    # As for a command started with `&` from a script (SIGINT) or under nohup (SIGHUP):
    # the signal while torch loads is not an interruption. SIGINT's was, before.
    def ignore() -> None:
        default_stop_signals()
        signal.signal(getattr(signal, name), signal.SIG_IGN)

    results = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_WHILE_IMPORTING, str(results), name,
         "--data", "missing.csv"],
        capture_output=True, text=True, cwd=tmp_path, env=os.environ.copy(),
        preexec_fn=ignore, timeout=120,
    )

    # It went on to its next step, which finds no such file.
    assert completed.returncode == 2, completed.stderr
    assert "interrupted" not in completed.stderr
    assert "missing.csv" in completed.stderr


_SIGTERM_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from engine import io

folder = Path(sys.argv[1])
outputs = io.OutputDir(folder)
for name in ("a.txt", "b.txt"):
    outputs.write_text(name, "new")
real_replace = os.replace

def replace_then_sigterm(source, target):
    real_replace(source, target)
    if str(target).endswith("a.txt"):
        os.kill(os.getpid(), signal.SIGTERM)  # nobody handles it: it ends the process

io.os.replace = replace_then_sigterm
outputs.commit()
print("not reached")
"""


def test_an_unhandled_sigterm_between_the_renames_ends_the_process_after_them(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("old")

    completed = subprocess.run(
        [sys.executable, "-c", _SIGTERM_BETWEEN_RENAMES, str(folder)], capture_output=True,
        text=True, env=os.environ.copy(), timeout=120, preexec_fn=default_stop_signals,
    )

    assert completed.returncode == -signal.SIGTERM, completed.stderr
    assert "not reached" not in completed.stdout
    assert [(folder / name).read_text() for name in ("a.txt", "b.txt")] == ["new", "new"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


_HANDLER_WHEN_THE_LIBRARY_LOADS = """
import importlib.abc, runpy, signal, sys

assert "statistics" not in sys.modules
seen = []

class Watch(importlib.abc.MetaPathFinder):  # notes the Ctrl-C handler at the first import
    def find_spec(self, name, path, target=None):
        if name == "statistics" and not seen:
            seen.append(getattr(signal.getsignal(signal.SIGINT), "__name__", None))
        return None

sys.meta_path.insert(0, Watch())
sys.argv = ["engine.attribute", "--help"]
try:
    runpy.run_module("engine.attribute", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(seen, file=sys.stderr)
"""


def test_the_start_up_handler_is_set_before_the_standard_library_modules_load():
    # They took about 20 ms, during which a Ctrl-C printed a traceback.
    completed = subprocess.run(
        [sys.executable, "-c", _HANDLER_WHEN_THE_LIBRARY_LOADS], capture_output=True,
        text=True, cwd=Path(__file__).resolve().parents[1], timeout=60,
        preexec_fn=default_stop_signals,
    )

    assert completed.stderr.strip().splitlines()[-1] == "['_interrupted_while_starting']"


_SIGNAL_AFTER_THE_RUN = """
import os, signal, sys, time
from engine.attribute import finish_quietly
print("results in place", flush=True)
finish_quietly(0)
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
time.sleep(5)  # the interpreter's shutdown, where the signal lands
print("not reached")
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_after_the_run_keeps_its_status_and_says_nothing(name):
    completed = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AFTER_THE_RUN, name], capture_output=True, text=True,
        cwd=Path(__file__).resolve().parents[1], timeout=60, preexec_fn=default_stop_signals,
    )

    assert completed.returncode == 0
    assert completed.stdout == "results in place\n"
    assert completed.stderr == ""


_CTRL_C_DURING_THE_SUMMARY = """
import os, signal, sys, time
import engine.attribute as attribute

# As `python -m engine.attribute` does at import; the job itself is stood in for.
signal.signal(signal.SIGINT, attribute._interrupted_while_starting)
attribute.job_config = lambda args: None
attribute.run_all = lambda config: {"out": "the-results"}

def slow_summary(summary):  # a terminal that takes its time
    os.kill(os.getpid(), getattr(signal, (sys.argv[1:] or ["SIGINT"])[0]))
    time.sleep(5)
    print("not reached")

attribute.print_summary = slow_summary
status = attribute.main(["--all"])
attribute._outcome.append(status)
attribute.finish_quietly(status)
sys.exit(status)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_while_the_summary_prints_says_the_results_are_complete(name):
    # SIGTERM and SIGHUP there exited 0, silently, with the summary cut short.
    completed = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DURING_THE_SUMMARY, name], capture_output=True,
        text=True, cwd=Path(__file__).resolve().parents[1], timeout=60,
        preexec_fn=default_stop_signals,
    )

    assert completed.returncode == 128 + getattr(signal, name), completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "interrupted: the results in the-results are complete"]
    assert "not reached" not in completed.stdout


def _stopped_run(tmp_path, monkeypatch, sig, job, *, during_renames=False, folder=None):
    """main() on a stand-in job that writes a.txt into its --out (or ``folder``) and gets
    ``sig`` once the file is in place, or during the renames; its status and stderr."""
    import engine.attribute as attribute
    from engine import io

    out = tmp_path / "results"
    real_replace = io.os.replace

    def replace_then_stop(source, target):
        real_replace(source, target)
        signal.raise_signal(sig)

    def run(config):
        with io.OutputDir(folder or config.out) as outputs:
            outputs.write_text("a.txt", "done")
            if during_renames:
                monkeypatch.setattr(io.os, "replace", replace_then_stop)
            outputs.commit()
            if not during_renames:
                # The stop lands while the run winds down: the staging folder is being
                # removed, the summary not yet made.
                signal.raise_signal(sig)
        return {"out": config.out}

    if job == "all":
        monkeypatch.setattr(attribute, "run_all", run)
        argv = ["--all", "--out", str(out)]
    else:
        monkeypatch.setattr(attribute, "run_checkpoint", run)
        argv = ["--data", "rows.csv", "--checkpoint", "model.pt", "--out", str(out)]
    with stop_signals_as_started():
        status = attribute.main(argv)
    return status, out


@pytest.mark.parametrize("during_renames", [False, True], ids=["after", "during-renames"])
@pytest.mark.parametrize("job", ["all", "checkpoint"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_once_the_results_are_in_place_says_they_are_complete(
    tmp_path, monkeypatch, capsys, sig, job, during_renames
):
    # After: it said "no results were written". During the renames: the stop was held,
    # then dropped, and the run went on to exit 0.
    status, out = _stopped_run(tmp_path, monkeypatch, sig, job, during_renames=during_renames)

    assert status == 128 + sig
    assert capsys.readouterr().err.splitlines() == [
        f"interrupted: the results in {out} are complete"]
    assert (out / "a.txt").read_text() == "done"


def test_results_put_in_another_folder_are_not_claimed_for_out(tmp_path, monkeypatch, capsys):
    status, out = _stopped_run(tmp_path, monkeypatch, signal.SIGINT, "all",
                               folder=tmp_path / "elsewhere")

    assert status == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted: no results were written"]
    assert not out.exists()


def test_lightnings_exit_on_ctrl_c_is_said_by_the_first_process_only(
    tmp_path, monkeypatch, capsys
):
    # Lightning turns a Ctrl-C during fit into sys.exit(1); under DDP each process gets it.
    import engine.attribute as attribute

    def run_all(config):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            sys.exit(1)

    monkeypatch.setattr(attribute, "run_all", run_all)
    for rank, said in (("1", []), ("0", ["interrupted: no results were written"])):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with stop_signals_as_started():
            assert attribute.main(["--all", "--out", str(tmp_path / "r")]) == 130
        assert capsys.readouterr().err.splitlines() == said


_SECOND_CTRL_C = _CTRL_C_DURING_THE_SUMMARY.replace(
    "attribute.print_summary = slow_summary",
    """attribute.print_summary = slow_summary
escaped = attribute._escaped_breaks

def second_ctrl_c(text):  # while the "complete" line is being made
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    return escaped(text)

attribute._escaped_breaks = second_ctrl_c""")


def test_a_second_ctrl_c_after_the_results_keeps_the_status_and_claims_nothing():
    completed = subprocess.run(
        [sys.executable, "-c", _SECOND_CTRL_C], capture_output=True, text=True,
        cwd=Path(__file__).resolve().parents[1], timeout=60, preexec_fn=default_stop_signals,
    )

    assert completed.returncode == 130, completed.stderr
    assert "no results were written" not in completed.stderr
    assert "Traceback" not in completed.stderr


_SIGNAL_DURING_THE_SHUTDOWN = """
import os, sys, time
from engine.attribute import finish_quietly

class SlowToFree:  # a library's cleanup while the interpreter shuts down
    def __del__(self):
        os.write(1, b"freeing\\n")
        time.sleep(3)

keep = SlowToFree()
print("results in place", flush=True)
finish_quietly(0)
sys.exit(0)
"""


def test_a_stop_signal_while_the_interpreter_shuts_down_keeps_the_status():
    # The shutdown puts Python's handlers back to the default before it frees modules;
    # a SIGTERM there ended a finished run with 143.
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_DURING_THE_SHUTDOWN], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
        preexec_fn=default_stop_signals,
    )
    lines = [child.stdout.readline(), child.stdout.readline()]
    child.send_signal(signal.SIGTERM)

    assert child.wait(timeout=60) == 0
    assert lines == ["results in place\n", "freeing\n"]
    assert child.stderr.read() == ""


@pytest.mark.parametrize("closed", ["stdout", "stderr", "both"])
def test_a_closed_output_stream_leaves_one_error_line_and_the_status(tmp_path, closed):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    script = (
        "import os, runpy, sys\n"
        f"for name in {['stdout', 'stderr'] if closed == 'both' else [closed]!r}:\n"
        "    os.close(getattr(sys, name).fileno()); setattr(sys, name, None)\n"
        f"sys.argv = ['attribute', '--all', '--data', {str(empty)!r}, '--out', "
        f"{str(tmp_path / 'out')!r}]\n"
        "runpy.run_module('engine.attribute', run_name='__main__')\n"
    )
    if closed != "stdout":
        streams["stdout"] = subprocess.PIPE
    if closed != "stderr":
        streams["stderr"] = subprocess.PIPE
    completed = subprocess.run([sys.executable, "-c", script], text=True, timeout=120,
                               cwd=Path(__file__).resolve().parents[1], **streams)

    assert completed.returncode == 2
    said = (completed.stdout or "") + (completed.stderr or "")
    assert "Traceback" not in said
    if closed != "both":
        assert said.strip().startswith("error: ") and "file is empty" in said
    assert not (tmp_path / "out").exists()


def test_lines_to_a_terminal_that_closed_are_dropped(monkeypatch):
    from engine import attribute
    from engine.progress import on_a_terminal

    class Closed:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

        def isatty(self):
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(sys, "stderr", Closed())
    attribute._say("interrupted: no results were written")  # no error
    assert on_a_terminal() is False
    monkeypatch.setattr(sys, "stderr", None)
    attribute._say("interrupted: no results were written")
    assert on_a_terminal() is False


def test_a_sigterm_while_the_distributed_module_imports_stops_at_once(monkeypatch):
    # The handler found the half-imported module in sys.modules without defer_stop and
    # raised AttributeError from inside the signal handler.
    import types

    from engine.attribute import _defer_sigterm

    monkeypatch.setitem(sys.modules, "engine.distributed",
                        types.ModuleType("engine.distributed"))

    assert _defer_sigterm(signal.SIGTERM) is False

