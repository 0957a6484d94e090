"""Stop signals as a terminal delivers them, whatever the test runner inherited.

A test runner started in the background ignores SIGINT, one started under ``nohup``
ignores SIGHUP, and children inherit both. The command line keeps an inherited "ignore"
on purpose, so the tests that send these signals first put back the dispositions a
process started from a terminal has.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_stop_signals() -> None:
    """``preexec_fn`` for a child: the default disposition for every stop signal."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


@contextmanager
def stop_signals_as_started() -> Iterator[None]:
    """In this process, for the block: Python's own SIGINT handler (Ctrl-C raises
    KeyboardInterrupt) and the default for the rest; the earlier handlers afterwards."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
