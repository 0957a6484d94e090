"""Integrated Gradients for every row, every baseline and every path step in one pass."""

from engine.adaptive import IGResult
from engine.compat import IntegratedGradients
from engine.core import integrated_gradients
from engine.errors import ArgumentError, CheckpointError, DataError, EngineError, ModelError
from engine.expected import expected_gradients
from engine.memory import keep_freed_memory
from engine.quadrature import METHODS, quadrature_rule

__all__ = [
    "METHODS",
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "EngineError",
    "IGResult",
    "IntegratedGradients",
    "ModelError",
    "expected_gradients",
    "integrated_gradients",
    "keep_freed_memory",
    "quadrature_rule",
]
