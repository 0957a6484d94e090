"""``torch.fx`` traces that know what Python state they baked in.

A symbolic trace runs the model's ``forward`` once and records its tensor operations.
Everything else that ``forward`` read is frozen into the graph as it was at that moment:

- a plain attribute (``self.cap`` in ``clamp(h, max=self.cap)``, a flag choosing a
  branch) becomes a constant, so setting the attribute later changes the model but not
  the trace. Outputs at a few checked points need not show it: a cap that only the middle
  of a path reaches leaves every path's ends alone.
- the grad mode and autocast are not recorded at all: a block run under
  ``torch.no_grad()`` is differentiated through in the trace, and a block under
  ``torch.autocast`` runs in full precision.

``trace`` records, while tracing, every instance attribute of the model's modules that
``forward`` reads (through its own code or a property), and refuses a forward that
creates graph nodes with gradients or autocast switched from how they were when the
trace began. ``Guards.hold`` then tells, on every later call, whether each attribute read
still has the value the trace was made with: numbers, strings, flags and other plain
values by value (nested lists, tuples, dicts and plain objects too, up to a size), and
anything else (a tensor, a function) by identity. What no guard sees: module-level
globals and closures read in ``forward``, and state beyond those bounds.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Guards", "TraceRefused", "trace"]


class TraceRefused(Exception):
    """The model's forward does something a trace cannot record."""


# Attributes every module has (its parameter, buffer, submodule and hook tables, its
# mode): engine.step.layout and the trace itself cover these.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# Plain values compared by value, and how many of them one attribute may hold in all
# (nested in containers and plain objects) before it is compared by identity instead.
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
            enum.Enum)
_MOST_VALUES = 256
_IDENTITY = object()


@dataclass(frozen=True)
class Guards:
    """The attributes a trace read: (module, name, fingerprint of the value it saw)."""

    reads: tuple[tuple[nn.Module, str, object], ...] = ()

    def hold(self) -> bool:
        """Whether every attribute read still has the value the trace was made with."""
        for module, name, seen in self.reads:
            if _fingerprint(vars(module).get(name, _MISSING)) != seen:
                return False
        return True

    def changed(self) -> str:
        """The attributes read whose values changed, for the log."""
        return ", ".join(
            f"{type(module).__name__}.{name}" for module, name, seen in self.reads
            if _fingerprint(vars(module).get(name, _MISSING)) != seen
        )


_MISSING = object()


def _fingerprint(value: object) -> object:
    """A comparable summary of ``value``: plain values themselves, the rest by identity."""
    if value is _MISSING:
        return _MISSING
    summary = _summary(value, [_MOST_VALUES])
    return ("id", id(value)) if summary is _IDENTITY else summary


def _summary(value: object, budget: list[int]) -> object:
    budget[0] -= 1
    if budget[0] < 0:
        return _IDENTITY
    if isinstance(value, _SCALARS):
        # repr tells 0.0 from -0.0 and matches nan with nan; the type tells 1 from 1.0.
        return (type(value), repr(value))
    if isinstance(value, (tuple, list, dict, set, frozenset)):
        items = value.items() if isinstance(value, dict) else value
        parts = []
        for item in items:
            part = _summary(item, budget)
            if part is _IDENTITY:
                return _IDENTITY
            parts.append(part)
        return (type(value), tuple(parts))
    if _plain_object(value):
        fields = _summary(vars(value), budget)
        return _IDENTITY if fields is _IDENTITY else (type(value), id(value), fields)
    return ("id", id(value))


def _plain_object(value: object) -> bool:
    """An object holding its state in ``__dict__``: a config object, a SimpleNamespace."""
    return (hasattr(value, "__dict__") and not callable(value) and not isinstance(
        value, (nn.Module, torch.Tensor, type, enum.Enum, types.ModuleType)))


# Per thread: the attribute reads of the trace in progress, {(id, name): (module, name,
# fingerprint when first read)}, or None.
_local = threading.local()


def _recording_getattribute(self: nn.Module, name: str) -> Any:
    value = object.__getattribute__(self, name)
    reads = getattr(_local, "reads", None)
    if reads is not None and name not in _MODULE_INTERNALS \
            and (id(self), name) not in reads:
        own = object.__getattribute__(self, "__dict__")
        if name in own and own[name] is value:
            reads[id(self), name] = (self, name, _fingerprint(value))
    return value


_patch_lock = threading.RLock()


@contextlib.contextmanager
def _recorded_reads() -> Iterator[dict[tuple[int, str], tuple[nn.Module, str, object]]]:
    """Record the instance attributes of modules read on this thread while it runs."""
    reads: dict[tuple[int, str], tuple[nn.Module, str, object]] = {}
    with _patch_lock:
        had_own = "__getattribute__" in vars(nn.Module)
        original = vars(nn.Module).get("__getattribute__")
        outer = getattr(_local, "reads", None)
        nn.Module.__getattribute__ = _recording_getattribute  # type: ignore[method-assign]
        _local.reads = reads
        try:
            yield reads
        finally:
            _local.reads = outer
            if had_own:
                nn.Module.__getattribute__ = original  # type: ignore[method-assign]
            else:
                del nn.Module.__getattribute__


def _modes() -> tuple[object, ...]:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
              for device in ("cpu", "cuda")))


class _ModeCheckingTracer(fx.Tracer):
    """Refuses nodes created with gradients or autocast switched inside ``forward``."""

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._modes = _modes()
        return super().trace(root, concrete_args)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        if _modes() != self._modes:
            raise TraceRefused(
                "forward switches gradients or autocast for part of its work (torch.no_grad, "
                "torch.autocast, ...), which a trace does not record"
            )
        return super().create_node(*args, **kwargs)


def trace(model: nn.Module) -> tuple[fx.GraphModule, Guards]:
    """``torch.fx.symbolic_trace(model)`` and the guards on what it read.

    Traced with gradients on and autocast off, so that a block of ``forward`` that
    switches either shows. Raises ``TraceRefused`` for such a block or for a ``forward``
    that changes an attribute it reads (a call counter: every call would need a new
    trace), and whatever ``torch.fx`` raises for a model it cannot trace.
    """
    tracer = _ModeCheckingTracer()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        reads = stack.enter_context(_recorded_reads())
        graph = tracer.trace(model)
    owned = {id(module) for module in model.modules()}
    guards = Guards(tuple(read for (key, _), read in reads.items() if key in owned))
    changed = guards.changed()
    if changed:
        raise TraceRefused(f"forward changes what it reads ({changed})")
    return fx.GraphModule(tracer.root, graph, type(model).__name__), guards
