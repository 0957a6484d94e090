"""keep_freed_memory: freed tensors are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A child process allocates the same sixteen 1 MiB tensors ten times over and counts the
# page faults of the last nine rounds: memory that came back from the heap faults nothing.
CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    import engine.core  # all that a call of the engine loads, as in a real process
    from engine.memory import keep_freed_memory

    if sys.argv[1] == "keep":
        assert keep_freed_memory() and keep_freed_memory()
    def round_trip():
        tensors = [torch.empty(1 << 18).fill_(1.0) for _ in range(16)]
        del tensors
    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
        round_trip()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)
# Nine rounds touch 9 x 16 MiB = 36,864 pages of 4 KiB.
PAGES_TOUCHED = 9 * 16 * (1 << 20) // 4096


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    # Measured: 1-2% of the pages (the heap grows now and then).
    assert page_faults("keep") < PAGES_TOUCHED // 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_by_default_the_same_rounds_fault_their_pages_again():
    # Without this, the test above could pass because nothing faulted anyway. glibc's own
    # thresholds sometimes keep most of the memory (about one run in three here), so the
    # default gets a few tries to show it faults nearly every page.
    assert any(page_faults("default") > PAGES_TOUCHED // 2 for _ in range(5))
