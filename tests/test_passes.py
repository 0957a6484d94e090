"""The graph pass that gives narrow CPU products a column-major right factor."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from engine import integrated_gradients
from engine.passes import NarrowProducts, compile_options

aten = torch.ops.aten


def _products(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]


def _right_factor(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[1] if node.target is aten.mm.default else node.args[2]


@pytest.mark.parametrize("columns", [2, 5, 15])
def test_narrow_products_get_a_column_major_copy_and_the_same_result(columns):
    torch.manual_seed(0)
    left, right, bias = torch.randn(300, 64), torch.randn(64, columns), torch.randn(columns)

    def products(a, b, c):
        return a @ b, torch.addmm(c, a, b)

    traced = make_fx(products)(left, right, bias)
    expected = products(left, right, bias)

    NarrowProducts()(traced.graph)
    traced.recompile()

    for node in _products(traced.graph):
        copied = _right_factor(node)
        assert copied.target is aten.permute.default
        assert copied.args[0].target is aten.clone.default
    for got, want in zip(traced(left, right, bias), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rows, inner, columns, column_major",
    [
        (300, 64, 1, False),    # one column: no layout is faster
        (300, 64, 16, False),   # 16 or more columns run fast row-major
        (300, 8, 5, False),     # a short inner dimension: no gain
        (100, 64, 5, False),    # too few rows to matter
        (300, 64, 5, True),     # already column-major
    ],
)
def test_other_products_are_left_alone(rows, inner, columns, column_major):
    left = torch.randn(rows, inner)
    right = torch.randn(columns, inner).t() if column_major else torch.randn(inner, columns)
    traced = make_fx(lambda a, b: a @ b)(left, right)
    before = [(n.target, n.args) for n in traced.graph.nodes]

    NarrowProducts()(traced.graph)

    assert [(n.target, n.args) for n in traced.graph.nodes] == before


def test_compile_options_are_the_mode_plus_the_pass():
    assert set(compile_options("default")) == {"post_grad_custom_post_pass"}
    options = compile_options("max-autotune-no-cudagraphs")
    assert options["max_autotune"] is True
    assert isinstance(options["post_grad_custom_post_pass"], NarrowProducts)


def test_compiled_plain_path_uses_the_pass_and_matches_eager(caplog):
    # A tabular first layer (5 features into 64 units): its backward is the narrow product.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()
    x, baselines = torch.rand(40, 5), torch.rand(2, 5)
    eager = integrated_gradients(net, x, baselines, n_steps=10, hoist=False)

    # The on-disk graph cache would skip the pass on a second run of the test suite.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            caplog.at_level(logging.DEBUG, logger="engine.passes"):
        compiled = integrated_gradients(net, x, baselines, n_steps=10, hoist=False,
                                        compile=True)

    assert "narrow product aten.mm.default: (800, 64) @ (64, 5)" in caplog.text
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
