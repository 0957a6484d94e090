"""The closed form of engine.kinks as two loops per (row, baseline) pair, compiled by numba.

The tensor version of ``integrate_kinked`` makes about twenty passes over (pairs, units)
arrays in float64, each a separate kernel; on a CPU the closed form's own arithmetic
took about half of a Titanic call. Here one loop per pair visits each hidden unit once
on the way in (its switch node, and its terms in the running sums) and once on the way
out (its gradient sum), with the pair's running sums small enough to stay in cache.
The tail between the two loops still runs in torch, so any model can follow the kink.

Same formulas, same float64 work and the same switch nodes as the tensor version (the
lookup tables of ``Nodes`` decide them); only the order of some float64 additions
differs. Used on the CPU for float32 and float64 points when numba is installed and
compiles (not with ``NUMBA_DISABLE_JIT``), and never inside a compiled graph.

Pairs are independent, so the loops split them into one block per thread (as many
threads as torch uses) and run the blocks in numba's thread pool; each pair's numbers
are the same as in one thread. This needs numba's ``omp`` or ``tbb`` threading layer:
its ``workqueue`` layer, the one left where neither loads, made the Titanic call slower
than one thread on two cores, so there the loops go back to one thread after the first
launch. A launch from a second thread while one runs, and every launch in a forked
process, runs in one thread too: the ``workqueue`` pool aborts on overlapping launches,
and a forked process cannot use the GNU OpenMP pool of its parent (torch's, shared by
numba's ``omp`` layer). A launch leaves torch's and numba's thread counts as it found them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # numba is a dependency; without it the tensor version runs
    numba = None

if TYPE_CHECKING:
    from engine.kinks import Nodes

__all__ = ["applies", "integrate_pairs"]

log = logging.getLogger(__name__)

# Tests switch the loops off to check the tensor version on the CPU.
ENABLED = True


def applies(hidden_x: Tensor, hidden_base: Tensor) -> bool:
    """Whether the loops run these hidden rows.

    They need float32 or float64 rows on the CPU, outside a compiled graph, and numba
    compiling (installed, and ``NUMBA_DISABLE_JIT`` unset: the loops in plain Python
    would be a hundred times slower than the tensor version).
    """
    if not (ENABLED and hidden_x.device.type == "cpu" and hidden_base.device == hidden_x.device
            and hidden_x.dtype in (torch.float32, torch.float64)
            and hidden_base.dtype == hidden_x.dtype and not torch.compiler.is_compiling()):
        return False
    if numba is None or numba.config.DISABLE_JIT:
        if not _SAID_WHY:
            _SAID_WHY.append(True)
            log.info("the closed form runs as tensor operations: %s",
                     "numba is not installed" if numba is None else "NUMBA_DISABLE_JIT is set")
        return False
    return True


_SAID_WHY: list[bool] = []


def integrate_pairs(
    hidden_x: Tensor,
    hidden_base: Tensor,
    shape: tuple[int, ...],
    nodes: Nodes,
    linear: tuple[Tensor, Tensor, Tensor, Tensor],
    tail_gradient: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """``engine.kinks.integrate_kinked`` for the CPU: (P, H1) float64 sums and the outputs.

    ``shape`` is the broadcast shape of ``hidden_x`` and ``hidden_base``, and ``linear``
    the float64 ``(weight, low, step, bias)`` of the Linear layer after the kink.
    """
    n_hidden = shape[-1]
    rows_x, index_x = _rows_and_index(hidden_x, shape)
    rows_base, index_base = _rows_and_index(hidden_base, shape)
    weight, low, step, bias = (t.contiguous().numpy() for t in linear)
    n_pairs, n_nodes, n_mixed = len(index_x), nodes.alphas.shape[0], weight.shape[0]
    if nodes.cells is None:
        cells, below, inside = 0, np.zeros(1, np.int64), np.zeros(1)
    else:
        cells, below, inside = nodes.cells, nodes.below.numpy(), nodes.inside.numpy()
    alphas_np, weights_np = nodes.alphas.numpy(), nodes.weights.numpy()

    slots = np.empty((n_pairs, n_hidden), dtype=np.int32)
    mixed = np.empty((n_pairs, n_nodes, n_mixed), dtype=np.float64)
    _in_blocks(_forward, _forward_blocks, n_pairs, rows_x, index_x, rows_base, index_base,
               alphas_np, cells, below, inside, low, step, bias, slots, mixed)

    points = torch.from_numpy(mixed).view(n_pairs * n_nodes, n_mixed).to(hidden_x.dtype)
    grad, selected = tail_gradient(points)
    grad = grad.detach().reshape(n_pairs, n_nodes, n_mixed).contiguous().numpy()

    sums = np.empty((n_pairs, n_hidden), dtype=np.float64)
    _in_blocks(_backward, _backward_blocks, n_pairs, grad, weights_np, weight, low, slots, sums)
    return torch.from_numpy(sums), selected


# Fewer pairs than this per thread run in one thread: a launch costs more than it saves.
MIN_BLOCK_PAIRS = 32

# Held while the thread pool runs the loops. A second launch meanwhile runs in one thread.
_POOL_BUSY = threading.Lock()
# Why the loops no longer use the pool in this process, once there is a reason.
_NO_POOL: list[str] = []
# numba's threading layers that run the blocks faster than one thread.
FAST_LAYERS = ("omp", "tbb")


def _forked() -> None:
    # A process forked from one whose OpenMP threads ever ran (torch's own, which numba's
    # omp layer shares, or any library's) inherits a pool whose threads are gone: its
    # first parallel region would wait for them for ever, or numba would end the process.
    _NO_POOL[:] = ["a forked process"]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _in_blocks(serial: Callable[..., None], blocked: Callable[..., None], n_pairs: int,
               *args: object) -> None:
    """``serial(*args, 0, n_pairs)``, or ``blocked`` on one block of pairs per thread."""
    n_blocks = min(_pool_threads(), n_pairs // MIN_BLOCK_PAIRS)
    if n_blocks >= 2 and not _NO_POOL and _POOL_BUSY.acquire(blocking=False):
        try:
            _launch(blocked, n_blocks, args)
            return
        except Exception as error:  # noqa: BLE001 - numba found no threading layer
            log.info("the closed form's loops run in one thread: %s", error)
            _NO_POOL[:] = [str(error)]
        finally:
            _POOL_BUSY.release()
    serial(*args, 0, n_pairs)


def _launch(blocked: Callable[..., None], n_blocks: int, args: tuple[object, ...]) -> None:
    """``blocked(*args, n_blocks)`` in numba's pool, leaving the caller's thread counts."""
    # The omp layer's first launch sets OpenMP's thread count to numba's pool size, in the
    # libgomp that torch uses too; numba's count holds per calling thread. Both come back.
    torch_threads = torch.get_num_threads()
    caller_threads = numba.get_num_threads()
    numba.set_num_threads(n_blocks)
    try:
        blocked(*args, n_blocks)
    finally:
        numba.set_num_threads(caller_threads)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    layer = numba.threading_layer()
    if layer not in FAST_LAYERS:
        log.info("the closed form's loops run in one thread from now on: numba's %r "
                 "threading layer is slower", layer)
        _NO_POOL[:] = [f"numba's {layer!r} threading layer"]


def _pool_threads() -> int:
    """Threads for the blocks: torch's intra-op threads, at most numba's pool size."""
    if not PARALLEL or numba is None:
        return 1
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


# Tests switch the thread pool off to compare one thread with many.
PARALLEL = True


def _rows_and_index(hidden: Tensor, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (rows, H1) of ``hidden`` and, per pair of ``shape``, its row there."""
    n_hidden = shape[-1]
    rows = hidden.detach().reshape(-1, n_hidden).contiguous()
    lead = hidden.shape[:-1]
    index = torch.arange(rows.shape[0]).view(lead) if lead else torch.zeros((), dtype=torch.long)
    index = index.expand(shape[:-1]).reshape(-1)
    return rows.numpy(), index.numpy()


def _compiled(function: Callable[..., None], **options: bool) -> Callable[..., None]:
    """``function`` for numba to compile at its first call, cached on disk where it can be.

    error_model="numpy": x / 0 gives inf or nan, as in torch, instead of raising. Where
    numba finds no writable cache location (a read-only install and home directory),
    each process compiles again (about 3 s) instead of failing the import.
    """
    if numba is None:
        return function
    try:
        return numba.njit(cache=True, error_model="numpy", **options)(function)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator"
        log.debug("compiled code of %s is not cached: %s", function.__name__, error)
        return numba.njit(error_model="numpy", **options)(function)


@_compiled
def _forward(rows_x, index_x, rows_base, index_base, alphas, cells, below, inside, low,
             step, bias, slots, mixed, first_pair, end_pair):  # pragma: no cover - compiled
    """Pairs first_pair..end_pair - 1: each unit's slot, then u at every node from running
    sums over the slots.

    A rising unit switching at node s goes to slot s; a falling one to slot 2w - 1 - s,
    with w = K + 1, so that a running sum over slots w.. read backwards counts the
    falling units still positive at a node (see engine.kinks.integrate_kinked).
    """
    n_hidden = slots.shape[1]
    n_nodes, n_mixed = mixed.shape[1], mixed.shape[2]
    width = n_nodes + 1
    levels = np.empty((n_mixed, 2, 2 * width))
    first = np.empty((2, n_mixed))
    starts = np.empty(n_hidden)
    directions = np.empty(n_hidden)
    for p in range(first_pair, end_pair):
        x_row, base_row = rows_x[index_x[p]], rows_base[index_base[p]]
        for j in range(n_hidden):
            starts[j] = base_row[j]
            # The points' dtype rounds the difference, as torch.sub does before widening.
            directions[j] = x_row[j] - base_row[j]
        slot_row = slots[p]
        if cells > 0:
            _table_slots(starts, directions, cells, below, inside, width, slot_row)
        else:
            _searched_slots(starts, directions, alphas, width, slot_row)

        # The slope-below-zero part of u, which every unit has at every node.
        for m in range(n_mixed):
            first[0, m] = _dot(starts, low[m]) + bias[m]
            first[1, m] = _dot(directions, low[m])
        levels[:] = 0.0
        for m in range(n_mixed):
            # What each unit adds from its slot on: (start, direction) x its step.
            start_terms, direction_terms, step_m = levels[m, 0], levels[m, 1], step[m]
            for j in range(n_hidden):
                slot = np.uint64(slot_row[j])
                start_terms[slot] += starts[j] * step_m[j]
                direction_terms[slot] += directions[j] * step_m[j]
            for terms in (start_terms, direction_terms):
                rising = 0.0
                falling_sum = 0.0
                for s in range(width):
                    rising += terms[s]
                    terms[s] = rising
                    falling_sum += terms[width + s]
                    terms[width + s] = falling_sum
            for k in range(n_nodes):
                on = start_terms[k] + start_terms[2 * width - 2 - k]
                on_slope = direction_terms[k] + direction_terms[2 * width - 2 - k]
                mixed[p, k, m] = (first[0, m] + on) + alphas[k] * (first[1, m] + on_slope)


@_compiled
def _dot(values, coefficients):  # pragma: no cover - compiled
    """sum_j values[j] coefficients[j] in four interleaved partial sums (no serial chain)."""
    n = values.shape[0]
    first = second = third = fourth = 0.0
    for j in range(0, n - n % 4, 4):
        first += values[j] * coefficients[j]
        second += values[j + 1] * coefficients[j + 1]
        third += values[j + 2] * coefficients[j + 2]
        fourth += values[j + 3] * coefficients[j + 3]
    for j in range(n - n % 4, n):
        first += values[j] * coefficients[j]
    return (first + second) + (third + fourth)


@_compiled
def _table_slots(starts, directions, cells, below, inside, width, slots):  # pragma: no cover
    """Each unit's slot from the nodes' lookup tables, without branches.

    The negated crossing is -(-h_b / d), and 0 / 0 counts as -inf (never positive); a
    falling unit reads the second copy of the tables (see ``engine.kinks._switches``).
    """
    for j in range(starts.shape[0]):
        against = starts[j] / directions[j]
        against = -np.inf if against != against else against
        falling = np.uint64(directions[j] < 0)
        entry = min(max(against * -cells, 0.0), np.float64(cells))
        # Unsigned: numba then skips the wraparound test of negative indices.
        cell = np.uint64(entry) + falling * np.uint64(cells + 1)
        count = below[cell] + np.int64(against <= inside[cell])
        slots[j] = count + np.int64(falling) * (2 * width - 1 - 2 * count)


@_compiled
def _searched_slots(starts, directions, alphas, width, slots):  # pragma: no cover
    """Each unit's slot by binary search, for nodes too close for the lookup tables."""
    for j in range(starts.shape[0]):
        against = starts[j] / directions[j]
        against = -np.inf if against != against else against
        if directions[j] < 0:
            slots[j] = 2 * width - 1 - np.searchsorted(alphas, -against, side="left")
        else:
            slots[j] = np.searchsorted(alphas, -against, side="right")


@_compiled
def _backward(grad, weights, weight, low, slots, sums, first_pair,
              end_pair):  # pragma: no cover - compiled
    """Pairs first_pair..end_pair - 1: sum_k w_k s_j(a_k) (g_k W)_j from running sums of
    the weighted gradients."""
    n_hidden = slots.shape[1]
    n_nodes, n_mixed = grad.shape[1], grad.shape[2]
    width = n_nodes + 1
    running = np.empty(width)
    for p in range(first_pair, end_pair):
        sum_row, slot_row = sums[p], slots[p]
        sum_row[:] = 0.0
        for m in range(n_mixed):
            # running[k]: the weighted gradients of the nodes before node k.
            total = 0.0
            running[0] = 0.0
            for k in range(n_nodes):
                total += np.float64(grad[p, k, m]) * weights[k]
                running[k + 1] = total
            weight_m, low_m = weight[m], low[m]
            for j in range(n_hidden):
                # A rising unit has the low slope before its switch node and slope 1 from
                # it on; a falling one the other way round. Each side gets its own slope
                # times its own sum: W - (1 - s) W would lose a tiny slope s to rounding.
                slot = slot_row[j]
                falling = slot >= width
                switch = np.uint64(2 * width - 1 - slot if falling else slot)
                before = running[switch]
                slope_before = weight_m[j] if falling else low_m[j]
                slope_after = low_m[j] if falling else weight_m[j]
                sum_row[j] += slope_before * before + slope_after * (total - before)


def _parallel(function: Callable[..., None]) -> Callable[..., None]:
    """``function`` compiled for numba's thread pool (``numba.prange``)."""
    return _compiled(function, parallel=True)


# numba runs the iterations of a prange loop in its thread pool.
_prange = range if numba is None else numba.prange


@_parallel
def _forward_blocks(rows_x, index_x, rows_base, index_base, alphas, cells, below, inside,
                    low, step, bias, slots, mixed, n_blocks):  # pragma: no cover - compiled
    """``_forward`` on ``n_blocks`` blocks of pairs, one per thread."""
    n_pairs = slots.shape[0]
    for block in _prange(n_blocks):
        _forward(rows_x, index_x, rows_base, index_base, alphas, cells, below, inside, low,
                 step, bias, slots, mixed, block * n_pairs // n_blocks,
                 (block + 1) * n_pairs // n_blocks)


@_parallel
def _backward_blocks(grad, weights, weight, low, slots, sums,
                     n_blocks):  # pragma: no cover - compiled
    """``_backward`` on ``n_blocks`` blocks of pairs, one per thread."""
    n_pairs = slots.shape[0]
    for block in _prange(n_blocks):
        _backward(grad, weights, weight, low, slots, sums, block * n_pairs // n_blocks,
                  (block + 1) * n_pairs // n_blocks)
