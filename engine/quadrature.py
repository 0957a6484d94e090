"""Quadrature rules for the path integral, with Captum's definitions, in float64.

Every rule maps ``n_steps`` to ``alphas`` (where on the path from baseline to input the
gradient is taken, in [0, 1]) and ``weights`` (how much each of those gradients counts).
The definitions are Captum's (``captum.attr._utils.approximation_methods``), so the same
``method`` and ``n_steps`` give the same integral. Two deliberate differences, both
below float32 rounding:

- Captum builds the Riemann alphas with ``torch.linspace`` in float32 and rounds every
  step weight to float32 before use; here both are exact float64 values.
- Captum's ``riemann_trapezoid`` uses ``1/n`` spacing for ``n`` points on [0, 1], so its
  weights sum to ``(n - 1) / n``, not 1. That is kept, not fixed: a user switching from
  Captum must get Captum's numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from engine.errors import ArgumentError

__all__ = ["METHODS", "QuadratureRule", "quadrature_rule"]

METHODS = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


@dataclass(frozen=True)
class QuadratureRule:
    """Nodes and weights of one rule at one ``n_steps``; both float64, shape (n_steps,)."""

    method: str
    alphas: np.ndarray
    weights: np.ndarray

    @property
    def n_steps(self) -> int:
        return len(self.alphas)


def _min_steps(method: str) -> int:
    # Captum's Riemann builders divide by (n - 1) or need two ends; Gauss-Legendre works
    # from a single node.
    return 1 if method == "gausslegendre" else 2


# Gauss-Legendre nodes come from an eigenvalue problem whose cost grows with n^3 (0.5 s at
# 2048 nodes, about 5 s at 4096, hours at 30,000); smooth paths need far fewer nodes.
MAX_GAUSS_LEGENDRE_STEPS = 2048
# Riemann nodes are cheap, but each float64 array holds n_steps values.
MAX_RIEMANN_STEPS = 1_000_000


def max_steps_of(method: str) -> int:
    """The most nodes ``quadrature_rule`` builds for ``method``."""
    return MAX_GAUSS_LEGENDRE_STEPS if method == "gausslegendre" else MAX_RIEMANN_STEPS


def check_method(method: object, n_steps: object) -> None:
    """Raise ``ArgumentError`` unless ``method`` is a known rule usable at ``n_steps``."""
    if not isinstance(method, str) or method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise ArgumentError(f"n_steps must be an integer, got {n_steps!r}")
    if n_steps < _min_steps(method):
        raise ArgumentError(
            f"n_steps={n_steps} is too small for method {method!r}: "
            f"it needs at least {_min_steps(method)}"
        )
    if n_steps > max_steps_of(method):
        raise ArgumentError(
            f"n_steps={n_steps} is too large for method {method!r}: it allows at most "
            f"{max_steps_of(method):,}"
            + (" (its nodes take minutes to compute beyond that, and smooth paths need far "
               "fewer)" if method == "gausslegendre" else "")
        )


def quadrature_rule(method: str, n_steps: int) -> QuadratureRule:
    """Alphas and weights of ``method`` with ``n_steps`` nodes, as Captum defines them.

    Parameters
    ----------
    method : str
        One of ``METHODS``.
    n_steps : int
        Number of nodes: at least 1 for ``gausslegendre``, 2 for the Riemann rules.

    Returns
    -------
    QuadratureRule
        ``alphas`` in [0, 1] and ``weights``, float64.

    References
    ----------
    Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    """
    check_method(method, n_steps)
    return _rule(method, int(n_steps))


@functools.lru_cache(maxsize=64)
def _rule(method: str, n: int) -> QuadratureRule:
    # Cached: leggauss costs about a millisecond at 50 nodes, a tenth of a small job.
    alphas, weights = _nodes(method, n)
    alphas.setflags(write=False)
    weights.setflags(write=False)
    return QuadratureRule(method, alphas, weights)


def _nodes(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if method == "gausslegendre":
        nodes, node_weights = np.polynomial.legendre.leggauss(n)
        # leggauss integrates over [-1, 1]; the path parameter lives on [0, 1].
        return 0.5 * (1.0 + nodes), 0.5 * node_weights

    k = np.arange(n, dtype=np.float64)
    weights = np.full(n, 1.0 / n)
    if method == "riemann_left":
        alphas = k / n
    elif method == "riemann_right":
        alphas = (k + 1.0) / n
    elif method == "riemann_middle":
        alphas = (k + 0.5) / n
    else:
        alphas = k / (n - 1)
        weights[0] /= 2.0
        weights[-1] /= 2.0
    return alphas, weights
