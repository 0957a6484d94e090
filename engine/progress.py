"""A progress bar over path points that appears only for long runs on a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm.auto import tqdm

__all__ = ["Progress", "on_a_terminal"]

# Runs shorter than this never show a bar.
SHOW_AFTER_SECONDS = 3.0


class Progress:
    """Counts path points; draws a tqdm bar after a few seconds when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        show = on_a_terminal() if enabled is None else enabled
        # No tqdm object at all when off: building one costs about as much as a small run.
        self._bar = tqdm(
            total=total, unit="pt", unit_scale=True, desc="integrated gradients",
            delay=SHOW_AFTER_SECONDS, leave=False,
        ) if show else None

    def update(self, points: int) -> None:
        if self._bar is not None:
            self._bar.update(points)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @classmethod
    @contextlib.contextmanager
    def or_nested(cls, parent: Progress | None, total: int, options) -> Iterator[Progress]:
        """``parent`` if there is one (an outer loop owns the bar), else a new bar."""
        if parent is not None:
            yield parent
            return
        bar = cls(total, options.progress)
        try:
            yield bar
        finally:
            bar.close()


def on_a_terminal() -> bool:
    """Whether stderr is a terminal; False when it is None, closed or not a real stream."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):
        return False
