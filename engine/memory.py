"""Keep freed CPU memory in the process, so that the next chunk reuses it without page faults.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc hands blocks above a
threshold (128 KiB at start, raised up to 32 MiB as such blocks are freed) straight to
the kernel with ``mmap``, and returns free memory at the top of its heap once more than a
trim threshold is free (128 KiB at start, twice the mmap threshold once that has moved).
Either way, the next allocation of the same size gets fresh pages, and the kernel zeroes
each of them on first touch. The engine allocates and frees the same few activation sizes
in every chunk and every call, so a small job spends up to half its time in those page
faults.

``keep_freed_memory`` sets both thresholds once for the whole process (glibc's
``mallopt``), so freed chunks stay in the heap and are reused. The cost: the process holds
on to its peak heap until it exits or calls ``malloc_trim``, as it would under jemalloc or
tcmalloc, the allocators often preloaded for PyTorch on CPUs. It changes ``malloc`` for
all code in the process, so the library never calls it on its own: the command line does,
and a program opts in with one call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems; larger blocks are rare here
# (chunks are capped far below it) and still go to mmap.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap that is kept instead of returned to the kernel.
TRIM_THRESHOLD = 1 << 30

_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc's ``malloc`` to keep freed memory for reuse; True when it took effect.

    Process-wide and idempotent. Does nothing and returns False where the C library is not
    glibc (macOS, Windows, musl): the thresholds it sets exist only there. Under a
    preloaded jemalloc or tcmalloc, which keep freed memory anyway, glibc's settings are
    set but unused.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        log.debug("keep_freed_memory: not a glibc system (%s); malloc left as it is",
                  sys.platform)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        log.debug("keep_freed_memory: the C library is not glibc; malloc left as it is")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    gnu_get_libc_version.restype = ctypes.c_char_p
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.debug("keep_freed_memory: glibc %s refused the thresholds",
                  gnu_get_libc_version().decode())
        return False
    _kept = True
    log.debug("keep_freed_memory: glibc %s keeps freed blocks up to %d MiB",
              gnu_get_libc_version().decode(), MMAP_THRESHOLD >> 20)
    return True
