"""Memory budget -> path points per chunk, and the run options that shape the chunk loop.

The kernel never lays out the whole (baselines, rows, steps, *features) batch: it cuts the
points into chunks whose activations fit a byte budget. The activation size per point is
measured, not guessed: two small probe forwards record the bytes autograd saves for the
backward, and their difference divided by the difference in points is the per-point cost
(weights and other constants cancel out).

On a CPU a chunk that fits the budget can still be too big to be fast: once one layer's
activations spill out of the cache, every elementwise op streams through main memory.
``CPU_CHUNK_BYTES`` caps the saved bytes of a CPU chunk (a few thousand points on the
Titanic network). ``bench/test_chunks.py`` sweeps the chunk size. On a shared, loaded
machine separate runs only ruled out very small and very large chunks. Chunk sizes
alternated within one process (where a slow stretch hits all of them alike) favoured
4-7k points over 14k on the plain path's eager chunks (22.4-22.5 against 24.5 ms on the
Titanic job; compiled chunks were the same within 2%), but a 4 MiB cap halved the
chunks of the affine-hoisted suffix (2,056 bytes a point: 2,000 points) and made that
path 1.6x slower at 20k rows (8,000 points: 1.14 s, 4,000: 1.45 s, 2,000: 4.1 s), so
the cap stays at 8 MiB.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.errors import ArgumentError

__all__ = ["PRECISIONS", "RunOptions", "balanced_chunk", "default_memory_budget", "padded_size",
           "run_options"]

log = logging.getLogger(__name__)

# Autocast dtype per precision name; "tf32" is float32 storage with TensorFloat-32 matmuls
# on CUDA (plain float32 on a CPU).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

CPU_BUDGET_BYTES = 1 << 30
CUDA_FREE_FRACTION = 0.5
CPU_CHUNK_BYTES = 8 << 20
# Compiled whole-path chunks of a hoisted model (elementwise work after the prefix) keep
# most activations in registers and pay guard checks per call, which favours larger
# chunks: on the hoisted Titanic job 8k-36k points were about equal, 4k about 1.3x slower.
# Compiled chunks of a plain path, whose matmul outputs go to memory, keep the eager cap
# (4k points were 1.15x faster than 10k at 20k rows).
FUSED_CPU_CHUNK_BYTES = 16 << 20
# Backward keeps a gradient alongside each saved activation, plus temporaries.
BACKWARD_FACTOR = 3


@dataclass(frozen=True)
class RunOptions:
    """How the chunk loop runs; see ``integrated_gradients`` for the meaning of each."""

    memory_budget: int | None = None
    compile: bool | str = False
    precision: str = "fp32"
    hoist: bool | str = True
    progress: bool | None = None
    internal_batch_size: int | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode, or None for eager."""
        if self.compile is False:
            return None
        return "default" if self.compile is True else str(self.compile)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def run_options(
    memory_budget: int | None = None,
    compile: bool | str = False,
    precision: str = "fp32",
    hoist: bool | str = True,
    progress: bool | None = None,
) -> RunOptions:
    """Check the speed and memory arguments; raise ``ArgumentError`` naming the bad one."""
    if isinstance(memory_budget, float) and math.isfinite(memory_budget) \
            and memory_budget.is_integer():
        memory_budget = int(memory_budget)  # 1e9 bytes, written the usual way
    if isinstance(memory_budget, numbers.Integral) and not isinstance(memory_budget, bool):
        memory_budget = int(memory_budget)  # numpy integers too
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise ArgumentError(
            f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}"
        )
    if not isinstance(compile, bool) and compile not in COMPILE_MODES:
        raise ArgumentError(
            f"compile must be True, False or one of {', '.join(COMPILE_MODES)}, got {compile!r}"
        )
    if precision not in PRECISIONS:
        raise ArgumentError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if not isinstance(hoist, bool) and hoist != "affine":
        raise ArgumentError(f"hoist must be True, False or 'affine', got {hoist!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ArgumentError(f"progress must be True, False or None, got {progress!r}")
    return RunOptions(memory_budget, compile, precision, hoist, progress)


def default_memory_budget(device: torch.device) -> int:
    """Bytes the chunk loop may use: half the free memory on CUDA, 1 GiB on a CPU.

    On CUDA, free memory counts what torch's caching allocator holds without using it:
    the driver reports it as taken, so a budget from the driver alone would shrink after
    every large call.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + max(cached, 0)) * CUDA_FREE_FRACTION)
    return CPU_BUDGET_BYTES


def saved_bytes(run_forward: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for the backward while ``run_forward`` runs."""
    seen: dict[tuple[int, torch.device], int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_forward()
    return sum(seen.values())


def choose_chunk_points(
    bytes_per_point: float,
    budget: int,
    total: int,
    n_steps: int,
    device: torch.device,
    fused: bool = False,
    padded: bool = False,
) -> int:
    """Points per chunk: within the budget, cache-sized on a CPU, whole paths when possible.

    ``fused``: the chunks run as compiled whole-path graphs of a hoisted model, which
    allow larger chunks. ``padded``: chunks are padded to the planned size (compiled
    chunks), so a job of one chunk is planned at a bucket size (see ``balanced_chunk``).
    """
    per_point = max(bytes_per_point, 1.0)
    points = int(budget // (per_point * BACKWARD_FACTOR))
    if device.type == "cpu":
        cap = FUSED_CPU_CHUNK_BYTES if fused else CPU_CHUNK_BYTES
        points = min(points, int(cap // per_point))
    points = max(1, points)
    if points < n_steps:
        return balanced_chunk(points, total, padded)
    # Whole paths fold over the step axis without a scatter.
    return balanced_chunk(points // n_steps, -(-total // n_steps), padded) * n_steps


def balanced_chunk(most: int, total: int, padded: bool = False) -> int:
    """Units per chunk for ``total`` units in chunks of at most ``most``: as few chunks, as
    even as an eighth of ``most`` allows.

    Compiled chunks are padded to one shape: 716 pairs in chunks of up to 524 would
    compute 1,048 (46% padding), in chunks of 393 they compute 786. An even share is
    always more than half of ``most``, so rounding it up to an eighth of ``most`` leaves
    at most five chunk shapes for one model to compile among jobs of several chunks.

    A job that fits one chunk runs at its own size, unless ``padded`` (the chunk is
    compiled): then it is padded to a bucket, so that jobs of any size compile few
    shapes (see ``padded_size``).
    """
    if most >= total:
        return padded_size(total, most) if padded else total
    chunks = -(-total // most)
    eighth = -(-most // 8)
    even = -(-total // chunks)
    return min(most, -(-even // eighth) * eighth)


def padded_size(total: int, most: int) -> int:
    """The compiled size of a job of ``total`` units that fits one chunk of ``most``.

    From half of ``most`` up: the eighths of ``most`` that jobs of several chunks use.
    Below: the next power of two or one and a half times a power of two. Jobs of every
    size then share at most five shapes plus two per doubling of the size, each at most
    a third or a half more than the job, instead of compiling a shape per size (and
    Dynamo stops compiling after a few shapes and runs the rest eagerly).
    """
    if 2 * total >= most:
        eighth = -(-most // 8)
        return min(most, -(-total // eighth) * eighth)
    power = 1 << max(total - 1, 0).bit_length()
    between = 3 * power // 4
    return min(most, between if between >= total else power)


@contextlib.contextmanager
def precision_context(options: RunOptions, device: torch.device) -> Iterator[None]:
    """Autocast for bf16/fp16; TensorFloat-32 matmuls for tf32 on CUDA."""
    with contextlib.ExitStack() as stack:
        if options.autocast_dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=options.autocast_dtype))
        stack.enter_context(matmul_context(options, device))
        yield


@contextlib.contextmanager
def matmul_context(options: RunOptions, device: torch.device) -> Iterator[None]:
    """TensorFloat-32 matmuls for tf32 on CUDA; nothing otherwise (autocast is separate)."""
    with contextlib.ExitStack() as stack:
        if options.precision == "tf32" and device.type == "cuda":
            stack.enter_context(_tf32_matmuls())
        yield


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """TensorFloat-32 for cuBLAS and cuDNN inside the block, the caller's setting after.

    Through ``fp32_precision``: once a caller has set that (torch's newer switch),
    reading the older ``allow_tf32`` raises, while ``fp32_precision`` reads and restores
    cleanly whichever switch the caller used.
    """
    switches = [torch.backends.cuda.matmul, torch.backends.cudnn]
    saved = [switch.fp32_precision for switch in switches]
    for switch in switches:
        switch.fp32_precision = "tf32"
    try:
        yield
    finally:
        for switch, value in zip(switches, saved):
            switch.fp32_precision = value
