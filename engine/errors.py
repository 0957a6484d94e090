"""Exceptions for mistakes a user can fix: each message names the bad thing."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class DataError(EngineError, ValueError):
    """A data file or table is missing, unreadable or does not match the schema."""


class ArgumentError(EngineError, ValueError):
    """An argument has the wrong type, shape, dtype or value."""


class CheckpointError(EngineError, ValueError):
    """A saved model cannot be loaded into the requested network."""


class ModelError(EngineError, RuntimeError):
    """The model misbehaves: non-finite outputs, rows that interact, bad output shape."""


class NonFiniteError(ModelError):
    """The model gives nan or inf outputs or gradients where its inputs are finite (often
    because its weights hold nan or inf), or attributions beyond the dtype they are
    returned in."""


class NonFiniteOutputError(NonFiniteError):
    """The model's outputs are nan or inf on the path of some rows, whose points are
    finite; the message names the rows (or the weights, when those hold nan or inf, as a
    plain ``NonFiniteError``)."""
