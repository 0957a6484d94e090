"""Integrated Gradients for every row, every baseline and every path step in one pass."""

from engine.core import integrated_gradients
from engine.errors import ArgumentError, CheckpointError, DataError, EngineError, ModelError
from engine.quadrature import METHODS, quadrature_rule

__all__ = [
    "METHODS",
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "EngineError",
    "ModelError",
    "integrated_gradients",
    "quadrature_rule",
]
