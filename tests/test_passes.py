"""The graph pass that gives narrow CPU products a column-major right factor."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from engine import integrated_gradients
from engine.passes import compile_options, rewrite_narrow_products, unfuse_bias_adds

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

    rewrite_narrow_products(traced.graph)
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

    rewrite_narrow_products(traced.graph)

    assert [(n.target, n.args) for n in traced.graph.nodes] == before


def _targets(graph: torch.fx.Graph) -> list[object]:
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bias_before_elementwise_work_moves_out_of_the_product(dtype):
    torch.manual_seed(0)
    left, right, bias = (torch.randn(300, 64, dtype=dtype), torch.randn(64, 32, dtype=dtype),
                         torch.randn(32, dtype=dtype))

    def layer(a, b, c):
        return torch.relu(torch.addmm(c, a, b).view(300, 4, 8))

    traced = make_fx(layer)(left, right, bias)

    unfuse_bias_adds(traced.graph)
    traced.recompile()

    assert aten.addmm.default not in _targets(traced.graph)
    assert {aten.mm.default, aten.add.Tensor} <= set(_targets(traced.graph))
    # The BLAS adds the bias after the product (the same bits, as on Intel CPUs) or folds
    # it into its sums (float64 on an AMD EPYC): equal to the rounding of each sum.
    scale = (left.abs() @ right.abs() + bias.abs()).view(300, 4, 8)
    gap = (traced(left, right, bias) - layer(left, right, bias)).abs()
    assert bool((gap <= 4 * torch.finfo(dtype).eps * scale).all())


@pytest.mark.parametrize("case", ["feeds a product", "is returned", "bf16", "scaled"])
def test_a_bias_stays_in_the_product_where_nothing_would_take_it(case):
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    left, right, bias = (torch.randn(300, 64, dtype=dtype), torch.randn(64, 32, dtype=dtype),
                         torch.randn(32, dtype=dtype))

    def layer(a, b, c):
        if case == "scaled":
            return torch.relu(torch.addmm(c, a, b, beta=0.5))
        out = torch.addmm(c, a, b)
        if case == "feeds a product":
            return out @ b.t()
        return out if case == "is returned" else torch.relu(out)

    traced = make_fx(layer)(left, right, bias)
    before = _targets(traced.graph)

    unfuse_bias_adds(traced.graph)

    assert _targets(traced.graph) == before


def test_compile_options_are_the_mode_plus_the_pass():
    assert set(compile_options("default")) == {"post_grad_custom_post_pass"}
    options = compile_options("max-autotune-no-cudagraphs")
    assert options["max_autotune"] is True
    custom_pass = options["post_grad_custom_post_pass"]
    assert custom_pass is compile_options("default")["post_grad_custom_post_pass"]
    assert custom_pass.uuid()  # hashable: Inductor's graph cache stays on


def test_compiled_plain_path_uses_the_pass_and_matches_eager(caplog):
    # A tabular first layer (5 features into 64 units): its backward is the narrow product.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()
    # 64 paths of 10 steps, one chunk: a size compiled chunks keep unpadded.
    x, baselines = torch.rand(32, 5), torch.rand(2, 5)
    eager = integrated_gradients(net, x, baselines, n_steps=10, hoist=False)

    # The on-disk graph cache would skip the pass on a second run of the test suite.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            caplog.at_level(logging.DEBUG, logger="engine.passes"):
        compiled = integrated_gradients(net, x, baselines, n_steps=10, hoist=False,
                                        compile=True)

    assert "narrow product aten.mm.default: (640, 64) @ (64, 5)" in caplog.text
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_eager_chunks_substitute_a_column_major_weight_for_narrow_inputs():
    from engine.hoist import _NarrowInputLinear, fast_model

    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3), nn.Tanh(),
                        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double().eval()
    fast = fast_model(net)
    substituted = [type(m) for m in fast.modules() if isinstance(m, _NarrowInputLinear)]
    points = torch.rand(300, 5, dtype=torch.float64, requires_grad=True)

    for parameter in net.parameters():
        parameter.requires_grad_(False)
    (want,) = torch.autograd.grad(net(points)[:, 1].sum(), points)
    (got,) = torch.autograd.grad(fast(points)[:, 1].sum(), points)

    # Linear(5, 64) qualifies (5 columns, inner 64); Linear(3, 16) has too short an
    # inner dimension; Linear(64, 3) and Linear(16, 2) are wide in their inputs.
    assert len(substituted) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_eager_plain_path_with_a_narrow_first_layer_equals_the_unsubstituted_model(
        monkeypatch):
    from engine import hoist

    calls = []
    original = hoist._NarrowInputLinear.forward
    monkeypatch.setattr(hoist._NarrowInputLinear, "forward",
                        lambda self, x: calls.append(x.shape) or original(self, x))
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).double().eval()
    x, baselines = torch.rand(30, 5, dtype=torch.float64), torch.rand(2, 5, dtype=torch.float64)
    grads = []

    def unsubstituted(points):  # a plain function: never traced or substituted
        return net(points)

    for model in (net, unsubstituted):
        grads.append(integrated_gradients(model, x, baselines, n_steps=12, hoist=False))

    assert (30 * 2 * 12, 5) in calls  # the chunk ran through the substitute
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# What a trace cannot see: backward-only behaviour and views


class _StraightThroughClamp(torch.autograd.Function):
    """Clamps in the forward, passes the gradient through unchanged in the backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-0.5, 0.5)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _captum(model, x, target=None):
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(x, torch.zeros_like(x), target=target,
                                                n_steps=20, method="gausslegendre")


@pytest.mark.parametrize("options", [{}, {"hoist": False}, {"hoist": False, "compile": True}])
def test_a_custom_autograd_backward_is_not_traced_away(options):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(5, 64), nn.Linear(64, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.fc(_StraightThroughClamp.apply(torch.sin(x)))))

    torch.manual_seed(0)
    model, x = Net().double().eval(), torch.randn(50, 5, dtype=torch.float64)

    got = integrated_gradients(model, x, 0.0, target=1, n_steps=20, **options)[0]

    # A trace inlines the clamp and would differentiate it (zero gradient where clamped).
    torch.testing.assert_close(got, _captum(model, x, target=1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("hoist", [True, False])
def test_a_containers_backward_hook_is_not_traced_away(hoist):
    torch.manual_seed(1)
    body = nn.Sequential(nn.Linear(5, 64), nn.Tanh())
    model = nn.Sequential(body, nn.Linear(64, 1)).double().eval()
    body.register_full_backward_hook(lambda module, grad_in, _: tuple(2 * g for g in grad_in))
    x = torch.rand(40, 5, dtype=torch.float64)

    got = integrated_gradients(model, x, 0.0, n_steps=20, hoist=hoist)[0]

    torch.testing.assert_close(got, _captum(model, x), rtol=1e-6, atol=1e-9)


def test_a_narrow_layer_on_3d_inputs_may_be_followed_by_an_in_place_activation():
    class PerToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(5, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))

        def forward(self, x):
            return self.mlp(torch.sin(x)).sum((1, 2))

    torch.manual_seed(2)
    model, x = PerToken().double().eval(), torch.randn(20, 7, 5, dtype=torch.float64)

    for hoist in (True, False):
        got = integrated_gradients(model, x, 0.0, n_steps=20, hoist=hoist)[0]
        torch.testing.assert_close(got, _captum(model, x), rtol=1e-6, atol=1e-9)


def test_a_users_own_post_grad_pass_takes_precedence():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Mine(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "mine"

    with torch._inductor.config.patch(post_grad_custom_post_pass=Mine()):
        options = compile_options("default")

    assert "post_grad_custom_post_pass" not in options


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_a_feature_with_small_gradients_is_checked_on_its_own_scale():
    # Column 0: an amount in dollars, rounded to 10k with a straight-through gradient;
    # column 1: a 0/1 flag with gradients 1e5 times larger.
    class Income(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(2, 64), nn.Linear(64, 1)

        def forward(self, x):
            rounded = _RoundStraightThrough.apply(x[:, :1] / 1e4)
            return self.l2(torch.relu(self.l1(torch.cat([rounded, x[:, 1:]], 1))))

    torch.manual_seed(0)
    model = Income().double().eval()
    x = torch.stack([torch.rand(50) * 1e5, (torch.rand(50) > 0.5).float()], 1).double()

    got = integrated_gradients(model, x, 0.0, n_steps=20)[0]

    torch.testing.assert_close(got, _captum(model, x), rtol=1e-6, atol=1e-9)


def test_a_backward_that_differs_only_for_negative_upstream_gradients_is_seen():
    class GuidedRelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * (x > 0) * (grad > 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 2), nn.Linear(2, 2)
            with torch.no_grad():
                self.l1.bias.fill_(0.5)
                self.l2.weight.copy_(torch.tensor([[3.0, -1.0], [-1.0, 3.0]]))

        def forward(self, x):
            return self.l2(GuidedRelu.apply(self.l1(x)))

    torch.manual_seed(0)
    model, x = Net().double().eval(), torch.rand(6, 3, dtype=torch.float64)

    got = integrated_gradients(model, x, 0.0, target=0, n_steps=20)[0]

    torch.testing.assert_close(got, _captum(model, x, target=0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("hoist", [True, False, "affine"])
def test_a_forward_under_no_grad_is_refused_not_traced_around(hoist):
    from engine.errors import ModelError

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(5, 64), nn.Linear(64, 1)

        @torch.no_grad()
        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)))

    with pytest.raises(ModelError, match="does not depend on its inputs through autograd"):
        integrated_gradients(Detached().eval(), torch.rand(10, 5), 0.0, hoist=hoist)


# What changes between calls: each call checks the model's own graph


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _Switchable(nn.Module):
    """Reverses the gradient of its hidden layer when ``reverse`` is set (forward unchanged)."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(5, 64), nn.PReLU(), nn.Linear(64, 1)
        self.reverse = False

    def forward(self, x):
        hidden = self.act(self.l1(x))
        if self.reverse:
            hidden = _ReverseGradient.apply(hidden)
        return self.l2(hidden)


@pytest.mark.parametrize("options", [{}, {"hoist": "affine"}, {"hoist": False},
                                     {"delta_tolerance": 1e-3}])
def test_a_custom_backward_switched_on_between_calls_is_seen(options):
    torch.manual_seed(3)
    model, x = _Switchable().double().eval(), torch.rand(30, 5, dtype=torch.float64)

    def attributions():
        result = integrated_gradients(model, x, 0.0, n_steps=20, **options)
        return result.attributions[0] if "delta_tolerance" in options else result[0]

    plain = attributions()  # traced and checked without the Function
    model.reverse = True
    reversed_ = attributions()

    if "delta_tolerance" in options:
        # Adaptive steps differ between the two runs; a lost reversal would flip the sign.
        torch.testing.assert_close(reversed_, -plain, rtol=0, atol=1e-2 * float(plain.abs().max()))
    else:
        torch.testing.assert_close(plain, _captum(model, x).neg(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(reversed_, _captum(model, x), rtol=1e-6, atol=1e-9)


def test_a_custom_backward_that_differs_only_after_training_is_seen():
    # The clamp passes its gradient straight through. With small weights nothing is
    # clamped on the first call, so the trace's gradient agrees with the model's there;
    # after the weights grow (as in training) it would not.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(5, 64), nn.Linear(64, 1)

        def forward(self, x):
            return self.l2(_StraightThroughClamp.apply(torch.tanh(self.l1(x))))

    torch.manual_seed(4)
    model, x = Net().double().eval(), torch.rand(30, 5, dtype=torch.float64)
    with torch.no_grad():
        model.l1.weight.mul_(0.01)
        model.l1.bias.zero_()
    integrated_gradients(model, x, 0.0, n_steps=20)
    with torch.no_grad():
        model.l1.weight.mul_(1000.0)

    got = integrated_gradients(model, x, 0.0, n_steps=20)[0]

    torch.testing.assert_close(got, _captum(model, x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("register", ["register_full_backward_hook", "register_backward_hook"])
def test_a_gradient_clipping_hook_that_acts_only_after_training_is_seen(register):
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 64)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    torch.manual_seed(5)
    body = Body()
    model = nn.Sequential(body, nn.PReLU(), nn.Linear(64, 1)).double().eval()
    # Clips the gradient at the body's input, which is small until the weights grow.
    getattr(body, register)(lambda module, grad_in, _: tuple(
        None if g is None else g.clamp(-0.05, 0.05) for g in grad_in))
    x = torch.rand(30, 5, dtype=torch.float64)
    with torch.no_grad():
        body.fc.weight.mul_(0.01)
    integrated_gradients(model, x, 0.0, n_steps=20)
    with torch.no_grad():
        body.fc.weight.mul_(100.0)
        model[2].weight.mul_(100.0)

    got = integrated_gradients(model, x, 0.0, n_steps=20)[0]

    torch.testing.assert_close(got, _captum(model, x), rtol=1e-6, atol=1e-9)


def test_model_graph_names_a_custom_node_and_numbers_shared_branches_once():
    from engine.hoist import model_graph

    def plain(x):
        for _ in range(60):  # 2**60 paths if shared nodes were revisited
            x = x * 2 + x.sin()
        return x

    graph = model_graph(plain, torch.rand(2, 3))
    custom = model_graph(lambda x: _ReverseGradient.apply(plain(x)), torch.rand(2, 3))

    assert graph.custom is None and len(graph.signature) == 1 + 1 + 3 * 60
    assert custom.custom == "_ReverseGradientBackward"


def test_model_graph_signature_sees_detach_no_grad_and_tensor_hooks_not_weights():
    from engine.hoist import model_graph

    signatures = {}
    for kind in ("detach", "no_grad", "hook"):
        model = _GradientSwitch(kind).eval()
        off = model_graph(model, torch.rand(2, 5)).signature
        with torch.no_grad():
            model.l1.weight.mul_(3)
        assert model_graph(model, torch.rand(2, 5)).signature == off
        model.on = True
        signatures[kind] = model_graph(model, torch.rand(2, 5)).signature
        assert signatures[kind] != off
    # A detach and a block without gradients both cut the side branch off.
    assert signatures["detach"] == signatures["no_grad"] != signatures["hook"]


class _GradientSwitch(nn.Module):
    """A flag read in ``forward`` changes the gradient and leaves every output as it was."""

    def __init__(self, kind):
        super().__init__()
        self.l1, self.act = nn.Linear(5, 32), nn.PReLU()
        self.out, self.side = nn.Linear(32, 1), nn.Linear(32, 1)
        self.kind, self.on = kind, False

    def forward(self, x):
        hidden = self.act(self.l1(x))
        if self.on and self.kind == "hook" and hidden.requires_grad:
            hidden.register_hook(lambda grad: 3 * grad)
        if self.on and self.kind == "no_grad":
            with torch.no_grad():
                side = self.side(hidden)
        else:
            side = self.side(hidden)
        if self.on and self.kind == "detach":
            side = side.detach()
        return self.out(hidden) + side


@pytest.mark.parametrize("kind", ["detach", "no_grad", "hook"])
@pytest.mark.parametrize("options", [{}, {"hoist": "affine"}, {"hoist": False}])
def test_a_gradient_switched_by_python_state_between_calls_is_seen(kind, options):
    torch.manual_seed(7)
    model, x = _GradientSwitch(kind).double().eval(), torch.rand(30, 5, dtype=torch.float64)
    integrated_gradients(model, x, 0.0, n_steps=20, **options)  # traced with the flag off
    model.on = True

    got = integrated_gradients(model, x, 0.0, n_steps=20, **options)[0]

    torch.testing.assert_close(got, _captum(model, x), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_a_gradient_switched_between_compiled_calls_is_seen():
    torch.manual_seed(8)
    model, x = _GradientSwitch("detach").eval(), torch.rand(30, 5)
    integrated_gradients(model, x, 0.0, n_steps=20, hoist=False, compile=True)
    model.on = True

    got = integrated_gradients(model, x, 0.0, n_steps=20, hoist=False, compile=True)[0]

    torch.testing.assert_close(got, _captum(model, x), rtol=1e-4, atol=1e-6)
