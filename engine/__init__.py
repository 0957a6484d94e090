"""Integrated Gradients for every row, every baseline and every path step in one pass.

The names below are imported on first use, so that ``python -m engine.attribute`` can
catch a Ctrl-C before torch has loaded (a few seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.adaptive import IGResult
    from engine.compat import IntegratedGradients
    from engine.core import integrated_gradients
    from engine.errors import (
        ArgumentError,
        CheckpointError,
        DataError,
        EngineError,
        ModelError,
        NonFiniteError,
        NonFiniteOutputError,
    )
    from engine.expected import expected_gradients
    from engine.memory import keep_freed_memory
    from engine.quadrature import METHODS, quadrature_rule

_HOMES = {
    "METHODS": "engine.quadrature",
    "ArgumentError": "engine.errors",
    "CheckpointError": "engine.errors",
    "DataError": "engine.errors",
    "EngineError": "engine.errors",
    "IGResult": "engine.adaptive",
    "IntegratedGradients": "engine.compat",
    "ModelError": "engine.errors",
    "NonFiniteError": "engine.errors",
    "NonFiniteOutputError": "engine.errors",
    "expected_gradients": "engine.expected",
    "integrated_gradients": "engine.core",
    "keep_freed_memory": "engine.memory",
    "quadrature_rule": "engine.quadrature",
}

__all__ = [
    "METHODS",
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "EngineError",
    "IGResult",
    "IntegratedGradients",
    "ModelError",
    "NonFiniteError",
    "NonFiniteOutputError",
    "expected_gradients",
    "integrated_gradients",
    "keep_freed_memory",
    "quadrature_rule",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
