"""Integrate through the first ReLU-like layer after the affine prefix in closed form.

After the affine prefix (see engine.hoist) the path is a straight line in hidden space,
h(a) = h_b + a d with d = h_x - h_b. When the rest of the model starts with an
activation that is linear on either side of zero (ReLU, LeakyReLU, PReLU:
phi_j(t) = t for t > 0 and s_j t otherwise) and then a Linear layer (W, c), each hidden
unit j changes slope at most once along the path, where h_j crosses zero at
a*_j = -h_bj / d_j. So the Linear layer's output at node a_k,

    u(a_k) = c + sum_j W[:, j] phi_j(h_bj + a_k d_j),

is the slope-s sum plus the contributions of the units that are positive at a_k, and
the units that turn positive (or stop being positive) at a node can be found by
searching each a*_j among the sorted nodes. Running sums over the nodes of what each
unit adds when it switches then give u at every node without visiting every
(node, unit) pair. The rest of the model (the tail) runs on u: H2 numbers per point
instead of H1. Its gradient g_k at each node comes back the same way:

    sum_k w_k dF/dh_j(a_k) = W[:, j] . (s_j * G_neg_j + G_pos_j),

with G_neg_j and G_pos_j the sums of w_k g_k over the nodes on each side of a*_j, read
off one running sum over the nodes. Per (row, baseline) pair that is O(H1 H2 + K H2)
work instead of O(K H1 H2) for K nodes.

Exact in exact arithmetic. In floating point the values differ from evaluating each
node by rounding, and a node that lands within rounding of a unit's crossing may take
the other slope there; so can the plain path, whose own rounding decides that sign.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn

from engine import kink_loops
from engine.fused import select_output
from engine.quadrature import quadrature_rule
from engine.step import compiled_copy, layout

__all__ = ["KinkSplit", "Nodes", "compiled_kinked", "fused_kinked", "integrate_kinked",
           "rule_nodes", "sorted_nodes", "split_kink"]

log = logging.getLogger(__name__)

_KINKED_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
# Compiled copies of fused_kinked per model (its Linear layer) and mode.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[object, Callable[..., tuple[Tensor, ...]]]] = (
    weakref.WeakKeyDictionary()
)
_RELU_FUNCTIONS = (torch.relu, nn.functional.relu)


@dataclass(frozen=True)
class KinkSplit:
    """``suffix(h) == tail(linear(activation(h)))`` with a ReLU-like ``activation``.

    ``activation`` is the model's own module (ReLU, LeakyReLU, PReLU), or None for a
    call of ``relu``; ``linear`` is the model's ``nn.Linear``, so both are read with
    their current weights at every call.
    """

    activation: nn.Module | None
    linear: nn.Linear
    tail: nn.Module

    def run(self, hidden: Tensor) -> Tensor:
        """``tail(linear(activation(hidden)))``, without writing ``hidden``."""
        if self.activation is None:
            activated = torch.relu(hidden)
        elif getattr(self.activation, "inplace", False):
            activated = self.activation(hidden.clone())
        else:
            activated = self.activation(hidden)
        return self.tail(self.linear(activated))

    def negative_slopes(self, like: Tensor) -> Tensor:
        """The activation's slope below zero: (1,) or one per hidden unit, like ``like``."""
        if isinstance(self.activation, nn.PReLU):
            return self.activation.weight.detach().to(like.dtype)
        slope = self.activation.negative_slope if isinstance(self.activation, nn.LeakyReLU) else 0.0
        return torch.full((1,), float(slope), dtype=like.dtype, device=like.device)


def split_kink(suffix: fx.GraphModule) -> KinkSplit | None:
    """The suffix as activation, Linear and tail, or None when it does not start that way.

    ``suffix`` is the rest of a model after its affine prefix (one placeholder). The
    placeholder, possibly through one ``clone``, must feed only a ReLU, LeakyReLU or
    PReLU, which must feed only an ``nn.Linear``.
    """
    graph = suffix.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    skipped = [placeholders[0]]
    node = _only_user(placeholders[0])
    if node is not None and node.op == "call_method" and node.target == "clone" \
            and node.args == (skipped[-1],) and not node.kwargs:
        skipped.append(node)
        node = _only_user(node)
    if node is None:
        return None

    activation = _activation_of(suffix, node, skipped[-1])
    if activation is False:
        return None
    skipped.append(node)
    linear_node = _only_user(node)
    if linear_node is None or linear_node.op != "call_module" \
            or linear_node.args != (node,) or linear_node.kwargs:
        return None
    linear = suffix.get_submodule(str(linear_node.target))
    if type(linear) is not nn.Linear:
        return None

    tail = fx.Graph()
    env = {linear_node: tail.placeholder("mixed")}
    for rest in graph.nodes:
        if rest not in skipped and rest is not linear_node:
            env[rest] = tail.node_copy(rest, lambda n: env[n])
    log.debug("the affine prefix is followed by %s and %s: integrating through the kinks",
              type(activation).__name__ if activation is not None else "relu",
              linear_node.target)
    return KinkSplit(activation=activation, linear=linear, tail=fx.GraphModule(suffix, tail))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _activation_of(suffix: fx.GraphModule, node: fx.Node, argument: fx.Node) -> object:
    """The activation module ``node`` calls on ``argument``, None for relu, else False."""
    if node.args != (argument,):
        return False
    if node.op == "call_module" and not node.kwargs:
        module = suffix.get_submodule(str(node.target))
        if type(module) in _KINKED_MODULES:
            return module
        return False
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS \
            and set(node.kwargs) <= {"inplace"}:
        return None
    return False


# Largest lookup table for finding each unit's crossing among the nodes; rules whose
# nodes are closer than 2 / _MAX_CELLS (Gauss-Legendre beyond about 350 nodes) search.
_MAX_CELLS = 1 << 16


@dataclass(frozen=True)
class Nodes:
    """A rule's nodes, sorted ascending, and tables to count the nodes below a number.

    ``alphas`` are the plain path's nodes (the rule's float64 alphas cast to the points'
    dtype), held in float64 like the ``weights``. With ``cells`` set, [0, 1) is cut into
    that many equal cells, few enough that each holds at most one node; cell 0 also takes
    everything below 0 and cell ``cells`` everything from 1 on. ``below[c]`` counts the
    nodes left of cell c and ``inside[c]`` is minus the node in cell c, or nan if it has
    none. Both tables come twice: entries ``cells + 1`` on are for falling units, with each
    node moved up by one ulp (see ``_switches``).
    """

    alphas: Tensor
    weights: Tensor
    cells: int | None
    below: Tensor | None
    inside: Tensor | None


@functools.lru_cache(maxsize=32)
def rule_nodes(method: str, n_steps: int, dtype: torch.dtype, device: torch.device) -> Nodes:
    """``sorted_nodes`` of a quadrature rule, kept for the next call."""
    rule = quadrature_rule(method, n_steps)
    return sorted_nodes(rule.alphas, rule.weights, dtype, device)


def sorted_nodes(alphas: np.ndarray, weights: np.ndarray, dtype: torch.dtype,
                 device: torch.device) -> Nodes:
    """The rule's nodes in ascending order, with lookup tables when they are small."""
    order = np.argsort(alphas, kind="stable")
    cast = torch.tensor(alphas[order], dtype=torch.float64).to(dtype).double()
    tables = _lookup_tables(cast.numpy())
    return Nodes(
        alphas=cast.to(device),
        weights=torch.tensor(weights[order], dtype=torch.float64, device=device),
        cells=tables[0] if tables else None,
        below=tables[1].to(device) if tables else None,
        inside=tables[2].to(device) if tables else None,
    )


def _lookup_tables(values: np.ndarray) -> tuple[int, Tensor, Tensor] | None:
    """(cells, below, inside) for ``Nodes``, or None when the nodes are too close."""
    gaps = np.diff(values)
    if (gaps <= 0).any() or values[0] < 0 or values[-1] > 1:
        return None
    smallest = gaps.min() if len(gaps) else 1.0
    cells = 1 << max(1, int(np.ceil(np.log2(2.0 / smallest))))
    if cells > _MAX_CELLS:
        return None
    edges = np.arange(cells + 1, dtype=np.float64) / cells
    below = np.searchsorted(values, edges, side="left")
    below[0] = 0
    inside = np.full(cells + 1, np.nan)
    inside[np.minimum(np.floor(values * cells), cells).astype(np.int64)] = values
    rising = torch.tensor(inside, dtype=torch.float64)
    falling = torch.nextafter(rising, torch.full_like(rising, np.inf))
    return (
        cells,
        torch.tensor(np.concatenate([below, below]), dtype=torch.int64),
        -torch.cat([rising, falling]),
    )


def _switches(start: Tensor, direction: Tensor, falling: Tensor, nodes: Nodes) -> Tensor:
    """Per unit, the first node on the other side of its crossing, (P, H1) int64.

    ``falling`` is True where the direction is negative. Rising units are positive from
    the switch node on: it counts the nodes <= the crossing. Falling units are positive
    before it: it counts the nodes < the crossing. A flat unit crosses at -inf when
    positive (positive from node 0) and at +inf or nan otherwise (never positive; nan is
    taken as +inf). A direction of -0.0 needs a start of +0.0, so the sign of a zero
    direction never matters.
    """
    # The negated crossing, -(-h_b / d).
    against = start / direction
    # nan (0 / 0) -> -inf. A compiled graph evaluates nan_to_num and isnan one element at
    # a time but vectorises a comparison of the crossings with themselves; eager
    # nan_to_num is the faster one.
    if torch.compiler.is_compiling():
        against.masked_fill_(against != against, float("-inf"))
    else:
        against.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if nodes.cells is None:
        crossing = against.neg_()
        rising_count = torch.searchsorted(nodes.alphas, crossing, right=True)
        falling_count = torch.searchsorted(nodes.alphas, crossing, right=False)
        return torch.where(falling, falling_count, rising_count)
    cells = nodes.cells
    # Each crossing's cell, exact since cells is a power of two (truncation is the floor
    # on [0, cells]; crossings below 0 share cell 0, whose lookup still counts right).
    # Falling units look up the second copy of the tables.
    entry = (against * -cells).clamp_(0, cells)
    entry.add_(falling, alpha=cells + 1)
    entry = entry.to(torch.int64).view(-1)
    below = nodes.below.index_select(0, entry).view(against.shape)
    inside = nodes.inside.index_select(0, entry).view(against.shape)
    return below + (against <= inside)


def running_sum(values: Tensor, dim: int) -> Tensor:
    """``values.cumsum(dim)``, also where torch is asked for deterministic algorithms.

    Under ``torch.use_deterministic_algorithms(True)`` (Lightning's ``deterministic=True``
    turns it on for the whole fit) torch refuses a floating-point cumsum on CUDA. There
    the sum is a product with a triangular matrix of ones instead: the same terms, added
    in an order fixed by the matrix product, at K x K work per sum of K nodes.
    """
    if not (values.is_cuda and torch.are_deterministic_algorithms_enabled()):
        return values.cumsum(dim)
    return triangular_sum(values, dim)


def triangular_sum(values: Tensor, dim: int) -> Tensor:
    """The running sum of ``values`` along ``dim`` as a product with a triangular matrix."""
    count = values.shape[dim]
    upper = torch.ones((count, count), dtype=values.dtype, device=values.device).triu()
    return (values.movedim(dim, -1) @ upper).movedim(-1, dim)


def integrate_kinked(
    kink: KinkSplit,
    hidden_x: Tensor,
    hidden_base: Tensor,
    nodes: Nodes,
    tail_gradient: Callable[[Tensor], tuple[Tensor, Tensor]],
    accumulate: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Sum over the nodes of w_k dF/dh at h_b + a_k (h_x - h_b) per pair, and the outputs.

    ``hidden_x`` is (P, H1) or broadcasts against ``hidden_base`` to it: one row per
    (row, baseline) pair. ``tail_gradient(u)`` returns dF/du at the (P * K, H2) points
    ``u`` (pair-major, node fastest) and the target output at each. Returns the (P, H1)
    sums in ``accumulate`` and the (P * K,) outputs.

    On a CPU with numba the work up to the tail and after it runs as two compiled loops
    per pair (see engine.kink_loops); elsewhere, and inside a compiled graph, as tensor
    operations.
    """
    dtype, device = hidden_x.dtype, hidden_x.device
    # Everything up to the tail runs in float64: the tail may have kinks of its own,
    # where a rounding error in u can pick the other slope.
    work = torch.float64
    weight = kink.linear.weight.detach().to(work)  # (H2, H1)
    n_mixed, n_hidden = weight.shape
    n_nodes = nodes.alphas.shape[0]
    slopes = kink.negative_slopes(hidden_x).to(work)  # (1,) or (H1,)
    # Per unit and output: the weight times the slope below zero, and times what the
    # slope changes by at zero.
    low, step = slopes * weight, (1 - slopes) * weight  # (H2, H1)

    shape = _broadcast_shape(hidden_x.shape, hidden_base.shape)
    if kink_loops.applies(hidden_x, hidden_base):
        bias = kink.linear.bias
        bias = torch.zeros(n_mixed, dtype=work) if bias is None else bias.detach().to(work)
        sums, selected = kink_loops.integrate_pairs(
            hidden_x, hidden_base, shape, nodes, (weight, low, step, bias), tail_gradient,
        )
        return sums.to(accumulate), selected

    # parts[0] = h_b, parts[1] = d: the path is parts[0] + a parts[1].
    parts = torch.empty((2, *shape), dtype=work, device=device)
    parts[0] = hidden_base
    torch.sub(hidden_x, hidden_base, out=parts[1])
    parts = parts.view(2, -1, n_hidden)
    n_pairs = parts.shape[1]
    falling = parts[1] < 0
    switch = _switches(parts[0], parts[1], falling, nodes)  # (P, H1)

    # u(a_k) = c + sum_j W[:, j] s_j (h_bj + a_k d_j)
    #            + sum over units positive at a_k of W[:, j] (1 - s_j) (h_bj + a_k d_j),
    # for both coefficients (of 1 and of a_k) at once. A rising unit is positive from its
    # switch node on: a running sum over the nodes of the terms placed at each switch. A
    # falling unit is positive before its switch: a running sum from the last node back.
    # Neither subtracts a unit's term where it turns off, which would leave the rounding
    # of a large unit in every later node.
    # levels[:, :, 0, s] holds the terms of rising units switching at node s, and
    # levels[:, :, 1, K - s] those of falling units switching at node s: a falling unit is
    # on at node k when K - s <= K - 1 - k, a running sum read backwards.
    width = n_nodes + 1
    levels = torch.zeros((2, n_pairs, 2, width, n_mixed), dtype=work, device=device)
    slot = torch.where(falling, 2 * width - 1 - switch, switch)  # (P, H1)
    if n_mixed == 1:
        # Products and a sum rather than a matrix-vector product, which a compiled graph
        # would call out to instead of fusing.
        first = (parts * low[0]).sum(-1, keepdim=True)  # (2, P, 1)
        levels.view(2, n_pairs, 2 * width).scatter_add_(2, slot.expand(2, -1, -1),
                                                        parts * step[0])
    else:
        first = parts @ low.t()  # (2, P, H2)
        index = slot.unsqueeze(-1).expand(2, -1, -1, n_mixed)
        levels.view(2, n_pairs, 2 * width, n_mixed).scatter_add_(2, index,
                                                                 parts.unsqueeze(-1) * step.t())
    if kink.linear.bias is not None:
        first[0] += kink.linear.bias.detach().to(work)
    running = running_sum(levels, 3)
    on = running[:, :, 0, :n_nodes] + running[:, :, 1, :n_nodes].flip(2)
    levels = first.unsqueeze(2) + on  # (2, P, K, H2)
    mixed = torch.addcmul(levels[0], nodes.alphas.view(1, -1, 1), levels[1])

    # sum_k w_k s_j(a_k) (g_k W)_j = (slope before . G_before)_j + (slope after . G_after)_j,
    # with G_before the weighted gradients summed over the nodes before the unit's switch
    # and G_after over the rest. Each side gets its own slope: W - (1 - s) W would lose a
    # tiny slope s to rounding.
    grad, selected = tail_gradient(mixed.reshape(n_pairs * n_nodes, n_mixed).to(dtype))
    weighted = grad.view(n_pairs, n_nodes, n_mixed).to(work) * nodes.weights.view(1, -1, 1)
    # running[:, k]: the weighted gradients of the nodes before node k.
    running = nn.functional.pad(running_sum(weighted, 1), (0, 0, 1, 0))
    total = running[:, -1:]  # (P, 1, H2)
    before = running.gather(1, switch.unsqueeze(-1).expand(-1, -1, n_mixed))  # (P, H1, H2)
    # A rising unit has the low slope before its switch node, a falling one slope 1.
    falling = falling.unsqueeze(-1)
    slope_before = torch.where(falling, weight.t(), low.t())  # (P, H1, H2)
    slope_after = torch.where(falling, low.t(), weight.t())
    sums = (slope_before * before + slope_after * (total - before)).sum(-1)
    return sums.to(accumulate), selected


def _broadcast_shape(first: torch.Size, second: torch.Size) -> tuple[int, ...]:
    """The shape two tensors broadcast to (torch.broadcast_shapes is slow for small jobs)."""
    rank = max(len(first), len(second))
    first = (1,) * (rank - len(first)) + tuple(first)
    second = (1,) * (rank - len(second)) + tuple(second)
    shape = []
    for a, b in zip(first, second):
        if a != b and 1 not in (a, b):
            raise ValueError(f"shapes {first} and {second} do not broadcast")
        shape.append(b if a == 1 else a)
    return tuple(shape)


def fused_kinked(
    kink: KinkSplit,
    hidden_x: Tensor,
    hidden_base: Tensor,
    nodes: Nodes,
    targets: None | tuple[int, ...] | Tensor,
    autocast: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``integrate_kinked`` with the tail differentiated by ``torch.func.grad``, for compiling.

    ``targets`` is None, one index tuple for every point, or a (P * K, k) index per point.
    Returns the (P, H1) sums in float32 (float64 for float64 inputs), the outputs and
    whether they are all finite.
    """

    def tail_gradient(mixed: Tensor) -> tuple[Tensor, Tensor]:
        def total(points: Tensor) -> tuple[Tensor, Tensor]:
            with torch.autocast(points.device.type, dtype=autocast or torch.float32,
                                enabled=autocast is not None):
                selected = select_output(kink.tail(points), targets)
            return selected.sum(), selected.detach()

        return torch.func.grad(total, has_aux=True)(mixed)

    accumulate = torch.float64 if hidden_x.dtype == torch.float64 else torch.float32
    sums, selected = integrate_kinked(kink, hidden_x, hidden_base, nodes, tail_gradient,
                                      accumulate)
    return sums, selected, torch.isfinite(selected).all()


def compiled_kinked(kink: KinkSplit, mode: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``fused_kinked`` compiled with ``mode`` and fixed shapes, one copy per model.

    A copy of the function per model gives each its own code object, on which Dynamo
    keeps its compiled versions (see ``engine.fused.compiled_whole_paths``).
    """
    # torch.compile does not check module hooks again: a change of hooks in the tail
    # compiles anew.
    per_model = _COMPILED.setdefault(kink.linear, {})
    return compiled_copy(fused_kinked, per_model, mode, layout(kink.tail))
