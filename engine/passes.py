"""Graph passes for compiled chunks on a CPU: narrow products get a faster layout, and
biases move into the elementwise kernel after their product.

The backward of a layer with few inputs (a tabular model's first ``Linear``, 5 features
wide on the Titanic job) is a product ``(points, K) @ (K, n)`` with the weight, row-major,
as the right factor and only a handful of output columns. The CPU's BLAS runs that shape
several times slower than the same product with the right factor column-major: on this
project's 2-core test machine, 4,000 x 128 @ 128 x 5 took 336 us row-major and 110 us
column-major, and the row-major product was 15-20% of a compiled plain-path chunk of the
Titanic job. Products with one column, or with 16 or more, or with a short inner
dimension ran at the same speed either way (``bench/test_chunks.py`` has the sweep).

``rewrite_narrow_products`` runs after Inductor's own post-grad passes (as the
``post_grad_custom_post_pass`` that ``compile_options`` sets): for each such ``mm`` or
``addmm`` on a CPU it copies the right factor into column-major order (a few hundred
numbers) and multiplies by the copy. The result is the same product; only the order in
which the BLAS adds its terms may differ, by rounding. Eager chunks get the same layout
from a substitute layer (``_NarrowInputLinear`` in ``engine.hoist``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

__all__ = ["compile_options", "rewrite_narrow_products", "unfuse_bias_adds"]

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Output columns for which a row-major right factor is slow (2 to 15), the inner
# dimension from which it matters, and rows below which the product is too small to care.
MAX_NARROW_COLUMNS = 15
MIN_INNER = 32
MIN_ROWS = 256


def unfuse_bias_adds(graph: torch.fx.Graph) -> None:
    """Split float32/float64 CPU ``addmm(bias, a, b)`` into ``mm(a, b) + bias`` where every
    use of the result is elementwise, so that Inductor adds the bias inside the kernel that
    follows.

    On a CPU ``addmm`` first copies the broadcast bias into its output, a pass over the
    whole (points, n) result: 10% of a compiled plain-path chunk of the Titanic job.
    Inductor makes this split on GPUs only. Half-precision products keep the bias inside
    (their sum is rounded once there, as in eager).
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default \
                or node.kwargs:
            continue
        bias, left, right = node.args[:3]
        value, bias_value = _value(node), _value(bias)
        if value is None or bias_value is None or value.device.type != "cpu" \
                or value.dtype not in (torch.float32, torch.float64) \
                or bias_value.dtype != value.dtype or len(node.args) != 3 \
                or not node.users or not all(_elementwise_use(use) for use in node.users):
            continue
        with graph.inserting_before(node):
            product = graph.call_function(aten.mm.default, (left, right))
            product.meta.update(node.meta)
            total = graph.call_function(aten.add.Tensor, (product, bias))
            total.meta.update(node.meta)
        node.replace_all_uses_with(total)
        graph.erase_node(node)
    graph.lint()


def _elementwise_use(use: torch.fx.Node) -> bool:
    """Whether ``use`` (following views) is elementwise, so Inductor can fuse into it."""
    if use.op != "call_function" or not isinstance(use.target, torch._ops.OpOverload):
        return False
    if use.target.is_view:
        return all(_elementwise_use(user) for user in use.users)
    return torch.Tag.pointwise in use.target.tags


def rewrite_narrow_products(graph: torch.fx.Graph) -> None:
    """Multiply narrow CPU products in ``graph`` (ATen ops) by a column-major right factor."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.mm.default:
            position = 1
        elif node.target is aten.addmm.default:
            position = 2
        else:
            continue
        left, right = node.args[position - 1], node.args[position]
        if not _is_narrow(_value(left), _value(right)):
            continue
        with graph.inserting_before(node):
            flipped = graph.call_function(aten.permute.default, (right, [1, 0]))
            copied = graph.call_function(aten.clone.default, (flipped,),
                                         {"memory_format": torch.contiguous_format})
            column_major = graph.call_function(aten.permute.default, (copied, [1, 0]))
        node.args = (*node.args[:position], column_major, *node.args[position + 1:])
        log.debug("narrow product %s: %s @ %s with a column-major right factor",
                  node.target, tuple(_value(left).shape), tuple(_value(right).shape))
    graph.lint()


@functools.cache
def _narrow_products_pass() -> Any:
    """``rewrite_narrow_products`` as an Inductor ``CustomGraphPass``.

    A custom pass must say how to hash it for Inductor's on-disk graph cache to keep
    working. Built on first use: importing Inductor takes about a second.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class NarrowProducts(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            unfuse_bias_adds(graph)
            rewrite_narrow_products(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((__file__,))

    return NarrowProducts()


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_narrow(left: torch.Tensor | None, right: torch.Tensor | None) -> bool:
    """A (M, K) @ (K, n) CPU product with a row-major right factor of 2-15 columns."""
    if left is None or right is None or right.device.type != "cpu" or right.dim() != 2:
        return False
    try:
        rows, inner, columns = int(left.shape[0]), int(right.shape[0]), int(right.shape[1])
        strides = tuple(int(s) for s in right.stride())
    except (TypeError, RuntimeError):  # symbolic sizes: leave the product alone
        return False
    return (2 <= columns <= MAX_NARROW_COLUMNS and inner >= MIN_INNER and rows >= MIN_ROWS
            and strides == (columns, 1))


def compile_options(mode: str) -> dict[str, Any]:
    """``torch.compile`` options equivalent to ``mode=mode``, plus the narrow-product pass.

    ``torch.compile`` takes a mode or options, not both; Inductor turns a mode into
    exactly these options. A post-grad pass the user has set in Inductor's config takes
    precedence: Inductor has one slot for it, and the engine's pass then stays out.
    """
    from torch._inductor import config, list_mode_options

    options: dict[str, Any] = {}
    if mode != "default":
        options.update(list_mode_options(mode, dynamic=False))
    if config.post_grad_custom_post_pass is None:
        options["post_grad_custom_post_pass"] = _narrow_products_pass()
    else:
        log.debug("a post-grad pass is already set in Inductor's config: narrow products "
                  "keep their layout")
    return options
