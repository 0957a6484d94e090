"""The chunk loop's speed paths give the plain path's numbers: hoisting, planning, precision."""

import logging
import weakref

import pytest
import torch
from torch import nn

from engine import integrated_gradients
from engine.core import PathProblem, _chunk_points, make_problem
from engine.errors import ArgumentError, ModelError
from engine.hoist import fast_model, split_affine_prefix
from engine.model import TitanicMLP
from engine.plan import BACKWARD_FACTOR, run_options
from engine.quadrature import quadrature_rule


def titanic_job(order: str = "article", dtype=torch.float64, rows: int = 23, seed: int = 0):
    torch.manual_seed(seed)
    net = TitanicMLP(order).to(dtype).eval()
    x = torch.rand(rows, 5, dtype=dtype)
    baselines = torch.stack([x.mean(0), torch.rand(5, dtype=dtype), torch.zeros(5, dtype=dtype),
                             torch.ones(5, dtype=dtype)])
    return net, x, baselines


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


class RowCounter:
    """Counts the rows a Linear layer multiplies, through ``torch.nn.functional.linear``.

    Neither a hook nor a replaced ``forward``: the engine does not hoist layers with
    either, since both can change what the layer returns.
    """

    def __init__(self, module: nn.Linear, monkeypatch) -> None:
        self.rows = 0
        linear = nn.functional.linear

        def counted(x, weight, bias=None):
            if weight is module.weight:
                self.rows += x.shape[0]
            return linear(x, weight, bias)

        monkeypatch.setattr(nn.functional, "linear", counted)


# ---------------------------------------------------------------------------
# Affine prefix hoisting


@pytest.mark.parametrize("order, layers", [("article", ("l1", "l2")), ("conventional", ("l1",))])
def test_affine_prefix_is_found_by_tracing(order, layers):
    split = split_affine_prefix(TitanicMLP(order).eval())

    assert split is not None and split.layers == layers


@pytest.mark.parametrize("order", ["article", "conventional"])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_hoisted_equals_plain_path_in_float64(order, method):
    net, x, baselines = titanic_job(order)

    hoisted = integrated_gradients(net, x, baselines, n_steps=20, method=method, hoist=True)
    plain = integrated_gradients(net, x, baselines, n_steps=20, method=method, hoist=False)

    # Exact in exact arithmetic; float64 rounding through a 128-wide layer stays far below.
    assert relative_error(hoisted, plain) <= 1e-12


def test_hoisting_runs_the_prefix_once_per_row_and_baseline(monkeypatch):
    net, x, baselines = titanic_job()
    counter = RowCounter(net.l2, monkeypatch)

    integrated_gradients(net, x, baselines, n_steps=50)

    # 23 rows and 4 baselines, a few rows to check the split, and the pull-back; never
    # anything like the 4 * 23 * 50 = 4600 path points.
    assert 0 < counter.rows < 400


def test_hoist_false_runs_the_prefix_on_every_point(monkeypatch):
    net, x, baselines = titanic_job()
    counter = RowCounter(net.l2, monkeypatch)

    integrated_gradients(net, x, baselines, n_steps=50, hoist=False)

    assert counter.rows >= 4 * 23 * 50


def test_hoisted_conv_batchnorm_prefix_equals_plain_path():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.Conv1d(6, 4, 3), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 6, 3),
    ).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(7, 2, 8, dtype=torch.float64)
    baselines = torch.randn(2, 2, 8, dtype=torch.float64)

    assert split_affine_prefix(model).layers == ("0", "1", "2")
    hoisted = integrated_gradients(model, x, baselines, target=1, n_steps=15)
    plain = integrated_gradients(model, x, baselines, target=1, n_steps=15, hoist=False)

    assert relative_error(hoisted, plain) <= 1e-12


def test_hoisted_per_row_baselines_and_targets_equal_plain_path():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 32), nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 3))
    model = model.double().eval()
    x = torch.randn(9, 6, dtype=torch.float64)
    baselines = torch.randn(3, 9, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (9,))

    hoisted = integrated_gradients(model, x, baselines, target=target, n_steps=12)
    plain = integrated_gradients(model, x, baselines, target=target, n_steps=12, hoist=False)

    assert relative_error(hoisted, plain) <= 1e-12


def test_hoisted_rows_in_blocks_under_a_small_budget_equal_plain_path():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 32), nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 1))
    model = model.double().eval()
    x = torch.randn(9, 6, dtype=torch.float64)
    baselines = torch.randn(3, 9, 6, dtype=torch.float64)

    # 20 kB: a quarter budget holds the hidden rows and sums of two rows at a time.
    blocked = integrated_gradients(model, x, baselines, n_steps=12, memory_budget=20_000)
    plain = integrated_gradients(model, x, baselines, n_steps=12, hoist=False)

    assert relative_error(blocked, plain) <= 1e-12


class Branchy(nn.Module):
    """A model whose forward branches on data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)
        if hidden.sum() > 0:
            hidden = torch.tanh(hidden)
        return self.head(torch.sigmoid(hidden))


def test_untraceable_model_falls_back_to_the_plain_path():
    torch.manual_seed(5)
    model = Branchy().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    baselines = torch.zeros(1, 4, dtype=torch.float64)

    assert split_affine_prefix(model) is None
    auto = integrated_gradients(model, x, baselines, n_steps=10)
    plain = integrated_gradients(model, x, baselines, n_steps=10, hoist=False)

    assert torch.equal(auto, plain)


def test_prefix_with_dropout_in_training_mode_is_not_hoisted(monkeypatch):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 1)).double()
    model.train()
    counter = RowCounter(model[2], monkeypatch)
    x = torch.randn(5, 4, dtype=torch.float64)

    integrated_gradients(model, x, torch.zeros(1, 4, dtype=torch.float64), n_steps=10)

    assert counter.rows >= 5 * 10


def test_parameters_require_grad_again_after_a_run():
    net, x, baselines = titanic_job()
    net.l1.weight.requires_grad_(False)

    integrated_gradients(net, x, baselines, n_steps=5)

    assert not net.l1.weight.requires_grad
    assert all(p.requires_grad for name, p in net.named_parameters() if name != "l1.weight")


def test_kernel_substitutions_are_bit_identical():
    net, x, _ = titanic_job("conventional", dtype=torch.float32)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    fast = fast_model(net)
    points = x.clone().requires_grad_()
    substituted = {type(m).__name__ for m in fast.modules()}
    assert {"_ScalarSlopePReLU", "_SingleOutputLinear", "_NarrowInputLinear"} <= substituted

    expected = net(points)
    (expected_grad,) = torch.autograd.grad(expected.sum(), points)
    actual = fast(points)
    (actual_grad,) = torch.autograd.grad(actual.sum(), points)

    assert torch.equal(actual, expected)
    # The first layer's backward product sums in another order (column-major weight):
    # equal to float32 rounding, not bit for bit.
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_substitutions_under_autocast_are_bit_identical(dtype, monkeypatch):
    # The single-output Linear's input gradient is a broadcast product; under autocast it
    # must multiply in the autocast dtype, as autograd's product does, not promote to
    # float32 (a slow mixed-dtype product, then a cast back). The narrow first layer is
    # meant to differ (see the split tests below): here it multiplies as autocast does.
    from engine import hoist

    monkeypatch.setattr(hoist, "_split_half_linear",
                        lambda x, weight, bias, dtype: nn.functional.linear(x, weight, bias))
    net, x, _ = titanic_job("conventional", dtype=torch.float32)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    fast = fast_model(net)

    grads, outputs = [], []
    for model in (net, fast):
        points = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            output = model(points)
            (grad,) = torch.autograd.grad(output.sum(), points)
        outputs.append(output)
        grads.append(grad)

    assert outputs[1].dtype == outputs[0].dtype
    assert torch.equal(outputs[1], outputs[0])
    assert torch.equal(grads[1], grads[0])


def _autocast_linear(x, weight, bias, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return nn.functional.linear(x, weight, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_split_half_product_is_rounded_once_like_a_float32_one(dtype):
    from engine.hoist import _split_half_linear

    torch.manual_seed(5)
    layer = nn.Linear(5, 64)
    x = torch.randn(400, 5)
    exact = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())

    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        split = _split_half_linear(x, layer.weight, layer.bias, dtype)
    plain = _autocast_linear(x, layer.weight, layer.bias, dtype)

    assert split.dtype == plain.dtype == dtype
    # Rounding the exact product to the half dtype once, bias included, is all that is
    # left; autocast also rounds the points and the weight before multiplying.
    once = (nn.functional.linear(x.double(), layer.weight.double())
            + layer.bias.to(dtype).double()).to(dtype)
    assert torch.equal(split, once) or (split.double() - once.double()).abs().max() <= \
        torch.finfo(dtype).eps * once.double().abs().max()
    split_error = (split.double() - exact).norm()
    plain_error = (plain.double() - exact).norm()
    assert split_error < 0.7 * plain_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_split_half_layers_input_gradient_is_closer_than_autocasts(dtype):
    from engine.hoist import _split_half_linear

    errors = {"split": [], "autocast": []}
    for seed in range(5):
        torch.manual_seed(seed)
        layer = nn.Linear(5, 64).requires_grad_(False)
        x = torch.rand(1000, 5, requires_grad=True)
        upstream = torch.randn(1000, 64).to(dtype)
        exact = upstream.double() @ layer.weight.double()
        with torch.autocast("cpu", dtype=dtype):
            outputs = {"split": _split_half_linear(x, layer.weight, layer.bias, dtype),
                       "autocast": layer(x)}
        for name, output in outputs.items():
            (grad,) = torch.autograd.grad(output, x, upstream)
            assert grad.dtype == torch.float32
            errors[name].append(float((grad.double() - exact).norm() / exact.norm()))

    # upstream @ (W_hi + W_lo) summed in float32: the weight is not rounded, and the sum
    # is not rounded to the half dtype a second time.
    assert all(split < plain for split, plain in zip(errors["split"], errors["autocast"]))


def test_compiled_chunks_keep_autocasts_product_for_narrow_layers(monkeypatch):
    # Inductor's fused code already rounds less, and the split cost compiled bf16 a
    # fifth or more of its time: compiled, the substitute is autocast's Linear.
    from engine import hoist

    def refuse(*args):
        raise AssertionError("split inside a compiled graph")

    monkeypatch.setattr(hoist, "_split_half_linear", refuse)
    torch.manual_seed(7)
    layer = nn.Linear(5, 64).requires_grad_(False)
    narrow = hoist._NarrowInputLinear(layer)
    x = torch.randn(256, 5)

    def run(points):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return narrow(points)

    compiled = torch.compile(run, fullgraph=True)(x)

    plain = _autocast_linear(x, layer.weight, layer.bias, torch.bfloat16)
    torch.testing.assert_close(compiled, plain)


def test_fp16_points_beyond_its_range_overflow_as_under_autocast():
    # hi is inf there; lo and the hi W_lo block must then add nothing rather than nan.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()
    x = torch.rand(20, 5)
    x[3, 2] = 7e4
    reference = integrated_gradients(net, x, torch.zeros(1, 5), hoist=False)

    half = integrated_gradients(net, x, torch.zeros(1, 5), hoist=False, precision="fp16")

    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, reference, rtol=2e-2, atol=2e-3)


def test_a_split_product_overflows_where_autocasts_does_and_nowhere_else():
    from engine.hoist import _split_half_linear

    torch.manual_seed(8)
    layer = nn.Linear(5, 64).requires_grad_(False)
    x = torch.rand(40, 5)
    x[3, 2], x[7, 0] = 7e4, -1e6

    def split(points):
        with torch.autocast("cpu", dtype=torch.float16):
            return _split_half_linear(points, layer.weight, layer.bias, torch.float16)

    got = split(x)
    plain = _autocast_linear(x, layer.weight, layer.bias, torch.float16)

    assert not got.isnan().any()
    overflowed = ~torch.isfinite(plain)
    assert overflowed[[3, 7]].all() and not overflowed[[0, 1, 2]].any()
    assert torch.equal(got[overflowed], plain[overflowed])
    assert torch.isfinite(got[~overflowed]).all()


def test_an_overflowing_point_leaves_the_split_of_the_others_alone():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()
    x = torch.rand(50, 5)
    alone = integrated_gradients(net, x[1:], torch.zeros(1, 5), hoist=False,
                                 precision="fp16")
    x[0, 2] = 7e4

    together = integrated_gradients(net, x, torch.zeros(1, 5), hoist=False, precision="fp16")

    # One chunk holds every point: row 0 overflows, rows 1.. keep their split products.
    torch.testing.assert_close(together[:, 1:], alone, rtol=1e-6, atol=1e-9)


class _Routed(nn.Module):
    """Rows routed to one of two experts by their first feature (rows stay independent)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 64), nn.Linear(5, 64)
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        chosen = x[:, 0] > 0.5
        hidden = torch.zeros(x.shape[0], 64, dtype=torch.bfloat16, device=x.device)
        hidden = hidden.masked_scatter(chosen.unsqueeze(1), self.a(x[chosen]).bfloat16())
        hidden = hidden.masked_scatter(~chosen.unsqueeze(1), self.b(x[~chosen]).bfloat16())
        return self.head(torch.tanh(hidden.float()))


def test_a_narrow_layer_given_no_rows_runs_under_half_precision():
    torch.manual_seed(10)
    model = _Routed().eval()
    x = torch.rand(20, 5)
    x[:, 0] = 0.9  # every row goes to a: b gets an empty batch

    half = integrated_gradients(model, x, torch.zeros(1, 5), hoist=False, precision="bf16",
                                internal_batch_size=7)
    full = integrated_gradients(model, x, torch.zeros(1, 5), hoist=False,
                                internal_batch_size=7)

    assert relative_error(half, full) < 3e-2


def test_bf16_plain_path_is_closer_to_fp32_with_the_split_first_layer(monkeypatch):
    from engine import hoist

    net, x, baselines = titanic_job(dtype=torch.float32, rows=60)
    reference = integrated_gradients(net, x, baselines, n_steps=50, hoist=False)
    errors = {}
    for name in ("split", "autocast"):
        if name == "autocast":
            monkeypatch.setattr(hoist, "_split_half_linear",
                                lambda x, weight, bias, _: nn.functional.linear(x, weight, bias))
        actual = integrated_gradients(net, x, baselines, n_steps=50, hoist=False,
                                      precision="bf16")
        errors[name] = relative_error(actual, reference)

    assert errors["split"] < 0.9 * errors["autocast"]


# ---------------------------------------------------------------------------
# Chunk planning


def planned_chunk(net, x, baselines, budget: int, n_steps: int = 50) -> tuple[int, PathProblem]:
    problem = make_problem(x, baselines, None, None)
    rule = quadrature_rule("gausslegendre", n_steps)
    options = run_options(memory_budget=budget)
    return _chunk_points(None, problem, rule, net, options), problem


def test_planned_chunk_fits_the_memory_budget():
    net, x, baselines = titanic_job("conventional", dtype=torch.float32)
    budget = 2 << 20

    chunk, _ = planned_chunk(net, x, baselines, budget)

    # The conventional network saves at least three 128-wide float32 activations a point.
    assert 1 <= chunk * 3 * 128 * 4 * BACKWARD_FACTOR <= budget


def test_planned_chunk_does_not_grow_with_the_rows():
    net, small, baselines = titanic_job("conventional", dtype=torch.float32, rows=200)
    large = torch.rand(20_000, 5)

    small_chunk, _ = planned_chunk(net, small, baselines, 4 << 20)
    large_chunk, _ = planned_chunk(net, large, baselines, 4 << 20)

    assert small_chunk == large_chunk < 4 * 20_000 * 50


def test_planned_chunk_holds_whole_paths():
    net, x, baselines = titanic_job("conventional", dtype=torch.float32)

    chunk, _ = planned_chunk(net, x, baselines, 16 << 20, n_steps=37)

    assert chunk % 37 == 0


@pytest.mark.parametrize("budget", [1 << 18, 1 << 22, 1 << 30])
def test_result_does_not_depend_on_the_budget(budget):
    net, x, baselines = titanic_job("conventional")
    reference = integrated_gradients(net, x, baselines, n_steps=20, internal_batch_size=10**6)

    actual = integrated_gradients(net, x, baselines, n_steps=20, memory_budget=budget)

    assert relative_error(actual, reference) <= 1e-13


def test_chunks_cutting_paths_equal_whole_paths():
    net, x, baselines = titanic_job("conventional")

    cut = integrated_gradients(net, x, baselines, n_steps=20, internal_batch_size=33, hoist=False)
    whole = integrated_gradients(net, x, baselines, n_steps=20, internal_batch_size=40,
                                 hoist=False)

    assert relative_error(cut, whole) <= 1e-13


class RunsOutOfMemory(nn.Module):
    """Raises the CUDA out-of-memory error for any batch larger than ``limit`` points."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"{x.shape[0]} points do not fit")
        return self.net(x)


def test_out_of_memory_halves_the_chunk_and_retries(caplog):
    torch.manual_seed(7)
    model = RunsOutOfMemory(limit=100).eval()
    x = torch.randn(10, 3, dtype=torch.float64)
    baselines = torch.zeros(1, 3, dtype=torch.float64)
    expected = integrated_gradients(model.net, x, baselines, n_steps=20, hoist=False)

    with caplog.at_level(logging.WARNING, logger="engine.core"):
        actual = integrated_gradients(model, x, baselines, n_steps=20, internal_batch_size=200)

    assert relative_error(actual, expected) <= 1e-13
    assert "out of memory" in caplog.text and "200 -> 100" in caplog.text


@pytest.mark.parametrize("where", ["closed form", "compiled whole paths"])
def test_out_of_memory_at_one_path_per_chunk_is_a_model_error(where, monkeypatch, caplog):
    from engine import core

    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) > 50:  # a loop that never gives up
            raise AssertionError("still retrying after 50 out-of-memory errors")
        raise torch.OutOfMemoryError("nothing fits")

    if where == "closed form":
        monkeypatch.setattr(core, "integrate_kinked", out_of_memory)
        net, x, baselines = titanic_job(rows=20)
        options = {}
    else:
        monkeypatch.setattr(core, "compiled_whole_paths", lambda model, mode: out_of_memory)
        net, x, baselines = titanic_job("conventional", rows=20)
        options = {"compile": True, "hoist": False}

    with caplog.at_level(logging.WARNING, logger="engine.core"), \
            pytest.raises(ModelError, match=r"out of memory on cpu with a single path \(10 "
                                            r"points\) per chunk"):
        integrated_gradients(net, x, baselines, n_steps=10, **options)

    assert len(calls) > 1 and "out of memory on cpu" in caplog.text


# ---------------------------------------------------------------------------
# Precision and compilation


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_stays_within_one_percent_of_fp32(precision):
    net, x, baselines = titanic_job(dtype=torch.float32, rows=50)
    reference = integrated_gradients(net, x, baselines, n_steps=50)

    actual = integrated_gradients(net, x, baselines, n_steps=50, precision=precision)

    # bf16 keeps 8 bits of mantissa (relative rounding 4e-3); summed over 50 steps the
    # rounding errors average out, and the gradients are summed in float32.
    assert actual.dtype == torch.float32
    assert relative_error(actual, reference) <= 1e-2


def test_tf32_on_a_cpu_is_plain_fp32():
    net, x, baselines = titanic_job(dtype=torch.float32)

    tf32 = integrated_gradients(net, x, baselines, n_steps=10, precision="tf32")
    fp32 = integrated_gradients(net, x, baselines, n_steps=10)

    assert torch.equal(tf32, fp32)


@pytest.mark.parametrize("caller", ["untouched", "legacy switch", "new switch"])
def test_the_tf32_switch_is_restored_whichever_api_the_caller_used(caller):
    from engine.plan import _tf32_matmuls

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.fp32_precision, cudnn.fp32_precision)
    try:
        if caller == "legacy switch":
            matmul.allow_tf32 = False
        elif caller == "new switch":
            matmul.fp32_precision = "ieee"  # reading allow_tf32 would now raise
        before = (matmul.fp32_precision, cudnn.fp32_precision)

        with _tf32_matmuls():
            assert matmul.fp32_precision == cudnn.fp32_precision == "tf32"

        assert (matmul.fp32_precision, cudnn.fp32_precision) == before
        if caller == "legacy switch":
            assert matmul.allow_tf32 is False
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = saved


def test_eager_chunks_run_the_backward_under_the_matmul_setting_too(monkeypatch):
    # precision="tf32" allows TensorFloat-32 matmuls on CUDA for the forward and the
    # backward alike; the backward used to run after the setting was restored.
    import contextlib

    from engine import core, plan

    inside = []
    seen_in_backward = []

    @contextlib.contextmanager
    def spy(options, device):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    class Seen(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen_in_backward.append(bool(inside))
            return grad

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

        def forward(self, x):
            return self.net(Seen.apply(x))

    monkeypatch.setattr(plan, "matmul_context", spy)
    monkeypatch.setattr(core, "matmul_context", spy)
    integrated_gradients(Model().eval(), torch.rand(4, 3), n_steps=5, precision="tf32",
                         hoist=False)

    assert seen_in_backward and all(seen_in_backward)


def test_compiled_equals_eager_on_cpu():
    net, x, baselines = titanic_job("conventional", dtype=torch.float32, rows=30)
    eager = integrated_gradients(net, x, baselines, n_steps=16, internal_batch_size=256)

    # 30 * 4 * 16 = 1920 points: the last of eight chunks is padded to the same shape.
    compiled = integrated_gradients(net, x, baselines, n_steps=16, internal_batch_size=256,
                                    compile=True)

    # Fused kernels reorder float32 sums: agreement to float32 rounding of the layers.
    assert relative_error(compiled, eager) <= 1e-5


def test_compiled_whole_paths_handle_targets_tuples_and_forward_args():
    # Two inputs, a per-row extra argument, per-row targets, per-row baselines, and 7
    # pairs in chunks of 3: the last chunk is padded. float64 so that only the fused
    # kernels' summation order differs.
    torch.manual_seed(5)
    left, right = nn.Linear(3, 8).double(), nn.Linear(2, 8).double()

    def model(a, b, scale):
        return torch.tanh(left(a) + right(b)) * scale.unsqueeze(1)

    a, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    bases = (torch.randn(1, 7, 3, dtype=torch.float64), torch.zeros(1, 7, 2, dtype=torch.float64))
    scale = torch.rand(7, dtype=torch.float64) + 0.5
    target = [0, 3, 7, 1, 2, 5, 4]
    kwargs = dict(target=target, additional_forward_args=(scale,), n_steps=6,
                  internal_batch_size=18)

    eager = integrated_gradients(model, (a, b), bases, **kwargs)
    compiled = integrated_gradients(model, (a, b), bases, compile=True, **kwargs)

    for got, want in zip(compiled, eager):
        assert relative_error(got, want) <= 1e-12


def test_compiled_whole_paths_compile_once_for_every_chunk(monkeypatch):
    from torch._dynamo.utils import counters

    from engine import fused

    monkeypatch.setattr(fused, "_COMPILED", weakref.WeakKeyDictionary())
    torch._dynamo.reset()
    counters.clear()
    net, x, baselines = titanic_job("article", dtype=torch.float32, rows=11)

    # 44 pairs in chunks of 5: nine chunks, the last padded from 4 pairs.
    integrated_gradients(net, x, baselines, n_steps=8, internal_batch_size=40, compile=True)

    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_whole_paths_fall_back_when_they_do_not_compile(monkeypatch, caplog):
    from engine import core

    def broken(model, mode):
        def fail(*args, **kwargs):
            raise RuntimeError("functorch cannot differentiate this model")

        return fail

    monkeypatch.setattr(core, "compiled_whole_paths", broken)
    net, x, baselines = titanic_job("conventional", dtype=torch.float64, rows=9)
    eager = integrated_gradients(net, x, baselines, n_steps=8)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        compiled = integrated_gradients(net, x, baselines, n_steps=8, compile=True,
                                        hoist=False, internal_batch_size=40)

    assert "whole-path compile failed (functorch cannot differentiate" in caplog.text
    assert relative_error(compiled, eager) <= 1e-12


def test_compiled_whole_paths_refuse_bad_targets_and_non_finite_outputs():
    net = nn.Sequential(nn.Linear(3, 2)).double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)

    with pytest.raises(ArgumentError, match="target 2 is out of range"):
        integrated_gradients(net, x, target=2, compile=True, hoist=False)

    def log_of_first(points):
        return torch.log(points[:, 0] - 0.5)

    with pytest.raises(ModelError, match="non-finite"):
        integrated_gradients(log_of_first, torch.rand(4, 3, dtype=torch.float64), compile=True)


@pytest.mark.parametrize(
    "name, value",
    [("memory_budget", -1), ("memory_budget", 1.5), ("compile", "fastest"),
     ("precision", "fp8"), ("hoist", "yes"), ("progress", 1)],
)
def test_bad_speed_arguments_raise_argument_error(name, value):
    net, x, baselines = titanic_job()

    with pytest.raises(ArgumentError, match=name):
        integrated_gradients(net, x, baselines, n_steps=5, **{name: value})


# ---------------------------------------------------------------------------
# Progress


@pytest.mark.parametrize("stream", [None, object(), "closed"])
def test_no_terminal_to_ask_means_no_bar(monkeypatch, stream):
    import io
    import sys

    if stream == "closed":
        stream = io.StringIO()
        stream.close()
    monkeypatch.setattr(sys, "stderr", stream)
    torch.manual_seed(24)

    attributions = integrated_gradients(nn.Linear(4, 1), torch.randn(3, 4), n_steps=5)

    assert attributions.shape == (1, 3, 4)


@pytest.mark.parametrize("progress, shown", [(True, True), (False, False)])
def test_progress_bar_follows_the_progress_argument(monkeypatch, capsys, progress, shown):
    import engine.progress

    # No delay, so that even this short run would draw a bar.
    monkeypatch.setattr(engine.progress, "SHOW_AFTER_SECONDS", 0.0)
    net, x, baselines = titanic_job()

    integrated_gradients(net, x, baselines, n_steps=5, progress=progress)

    assert ("integrated gradients" in capsys.readouterr().err) is shown


def test_a_swapped_layer_is_traced_again():
    net, x, baselines = titanic_job("article")
    before = integrated_gradients(net, x, baselines, n_steps=10)
    torch.manual_seed(99)
    net.l2 = nn.Linear(128, 128).double()

    after = integrated_gradients(net, x, baselines, n_steps=10)
    plain = integrated_gradients(net, x, baselines, n_steps=10, hoist=False)

    # The new layer is used, and hoisted again rather than left to the plain path.
    assert not torch.allclose(after, before)
    assert relative_error(after, plain) <= 1e-10
    assert split_affine_prefix(net).modules[1] is net.l2


def test_many_compiled_models_each_get_compiled_code(monkeypatch):
    # Dynamo stops compiling a function after a few versions (8 by default) and runs it
    # eagerly; every model gets its own copy of the whole-path function, so the tenth
    # model is compiled too.
    from torch._dynamo.utils import counters

    from engine import fused

    monkeypatch.setattr(fused, "_COMPILED", weakref.WeakKeyDictionary())
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(8)
    x = torch.randn(3, 2, dtype=torch.float64)
    for width in range(1, 11):
        model = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).double()
        integrated_gradients(model, x, n_steps=4, compile=True, hoist=False)

    assert counters["stats"]["unique_graphs"] == 10


class Tempered(nn.Module):
    """A model whose forward reads plain Python attributes a trace would bake in."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 16)
        self.out = nn.Linear(16, 1)
        self.temperature = 1.0
        self.squash = True

    def forward(self, x):
        logit = self.out(torch.tanh(self.l1(x))) / self.temperature
        return torch.sigmoid(logit) if self.squash else logit


@pytest.mark.parametrize("hoist", [True, False])
def test_python_state_changed_between_calls_is_followed(hoist):
    torch.manual_seed(12)
    net = Tempered().double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    integrated_gradients(net, x, n_steps=10, hoist=hoist)  # traces with temperature 1

    for change in ({"temperature": 5.0}, {"squash": False}):
        for name, value in change.items():
            setattr(net, name, value)
        got = integrated_gradients(net, x, n_steps=10, hoist=hoist)
        # A plain function is never traced: the reference runs the model as it is now.
        want = integrated_gradients(lambda points: net(points), x, n_steps=10)
        assert relative_error(got, want) <= 1e-12


class ClampedFar(nn.Module):
    """Clamps its hidden units at a plain attribute that only far rows reach."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 16)
        self.out = nn.Linear(16, 1)
        self.cap = 1e9

    def forward(self, x):
        return self.out(torch.clamp(torch.relu(self.l1(x)), max=self.cap))


@pytest.mark.parametrize("hoist", [True, False])
def test_python_state_that_matters_only_past_the_probed_rows_is_followed(hoist):
    # The probe and its trace check see the first 1,024 rows; only row 1,400 reaches the
    # cap once it is lowered, so the trace made with the old cap must be found stale.
    torch.manual_seed(13)
    net = ClampedFar().double().eval()
    x = torch.rand(1500, 5, dtype=torch.float64) * 0.1
    x[1400] = 50.0
    base = torch.zeros(1, 5, dtype=torch.float64)
    integrated_gradients(net, x, base, n_steps=16, hoist=hoist)  # traced with no cap

    net.cap = 3.0
    got = integrated_gradients(net, x, base, n_steps=16, hoist=hoist)

    want = integrated_gradients(lambda points: net(points), x, base, n_steps=16)
    assert relative_error(got[:, 1400], want[:, 1400]) <= 1e-12


@pytest.mark.parametrize("baselines", ["middle kind", "per row"])
@pytest.mark.parametrize("hoist", [True, False])
def test_python_state_that_matters_only_at_one_baseline_is_followed(hoist, baselines):
    torch.manual_seed(14)
    net = ClampedFar().double().eval()
    x = torch.rand(50, 5, dtype=torch.float64) * 0.1
    if baselines == "middle kind":
        base = torch.stack([torch.zeros(5), torch.full((5,), 50.0), torch.zeros(5)]).double()
        far = (1, slice(None))
    else:
        base = torch.zeros(2, 50, 5, dtype=torch.float64)
        base[1, 7] = 50.0
        far = (1, 7)
    integrated_gradients(net, x, base, n_steps=16, hoist=hoist)  # traced with no cap

    net.cap = 3.0
    got = integrated_gradients(net, x, base, n_steps=16, hoist=hoist)

    want = integrated_gradients(lambda points: net(points), x, base, n_steps=16)
    assert relative_error(got[far], want[far]) <= 1e-12


class Scaled(nn.Module):
    """Scales its input by a plain attribute; also makes its output bfloat16 if asked."""

    def __init__(self, bf16_output: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
        self.scale = 1.0
        self.bf16_output = bf16_output

    def forward(self, x):
        out = self.net(x * self.scale)
        return out.to(torch.bfloat16) if self.bf16_output else out


@pytest.mark.parametrize("hoist", [True, "affine", False])
def test_a_change_is_seen_when_row_0_is_its_baseline(hoist):
    # Row 0's whole path is the baseline: the change shows only on other rows.
    torch.manual_seed(13)
    net = Scaled().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[0] = 0.0
    integrated_gradients(net, x, 0.0, n_steps=10, hoist=hoist)  # traces with scale 1
    net.scale = 3.0

    got = integrated_gradients(net, x, 0.0, n_steps=10, hoist=hoist)

    want = integrated_gradients(lambda points: net(points), x, 0.0, n_steps=10)
    assert relative_error(got, want) <= 1e-12


class Capped(nn.Module):
    """Caps its output at a plain attribute, which only large rows reach."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        self.cap = 1000.0

    def forward(self, x):
        return self.net(x).clamp(max=self.cap)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("hoist", [True, "affine", False])
def test_a_change_only_late_rows_show_is_seen(hoist, compile):
    torch.manual_seed(15)
    net = Capped().double().eval()
    x = torch.randn(10, 3, dtype=torch.float64) * 0.01
    x[5:] *= 1000.0  # only these rows reach the cap once it is lowered
    integrated_gradients(net, x, 0.0, n_steps=10, hoist=hoist, compile=compile)
    net.cap = float(net(x[:5]).max()) + 0.1

    got = integrated_gradients(net, x, 0.0, n_steps=10, hoist=hoist, compile=compile)

    want = integrated_gradients(lambda points: net(points), x, 0.0, n_steps=10)
    assert not torch.allclose(want[0, 5:], torch.zeros_like(want[0, 5:]))
    assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("hoist", [True, False])
def test_a_change_is_seen_through_a_bfloat16_output(hoist):
    torch.manual_seed(14)
    net = Scaled(bf16_output=True).eval()
    x = torch.randn(6, 3)
    integrated_gradients(net, x, 0.0, n_steps=10, hoist=hoist)
    net.scale = 3.0

    got = integrated_gradients(net, x, 0.0, n_steps=10, hoist=hoist)

    want = integrated_gradients(lambda points: net(points), x, 0.0, n_steps=10)
    # bfloat16 outputs: the stale trace was off by a factor of three, not by rounding.
    assert relative_error(got, want) <= 2e-2


def test_rows_coupled_by_a_flag_after_a_first_call_are_refused():
    from engine.errors import ModelError

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.mix = False

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True) if self.mix else x)

    net = Mixer().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    integrated_gradients(net, x)
    net.mix = True

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(net, x)


def test_adaptive_steps_use_the_speed_options():
    net, x, baselines = titanic_job(dtype=torch.float32, rows=12)
    kwargs = dict(n_steps=8, delta_tolerance=1e-3, max_steps=32, hoist=False)

    fp32 = integrated_gradients(net, x, baselines, **kwargs)
    bf16 = integrated_gradients(net, x, baselines, precision="bf16", **kwargs)

    # bf16 rounds every product: the result moves, but only by bf16 rounding.
    difference = relative_error(bf16.attributions, fp32.attributions)
    assert 0 < difference <= 3e-2


class _InPlaceAfterPrefix(nn.Module):
    """Linear, then an in-place write of its output in one of several spellings."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.layer = nn.Linear(5, 16)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layer(x)
        if self.spelling == "module":
            hidden = self.act(hidden)
        elif self.spelling == "functional":
            hidden = nn.functional.relu(hidden, inplace=True)
        elif self.spelling == "method":
            hidden = hidden.relu_()
        elif self.spelling == "operator":
            hidden += 0.5
            hidden = torch.tanh(hidden)
        elif self.spelling == "view":
            hidden.view(-1, 4, 4).tanh_()
        return self.out(hidden)


@torch.fx.wrap
def _bump_in_place(hidden: torch.Tensor) -> torch.Tensor:
    # Wrapped: the tracer records one opaque call and cannot see the in-place write.
    return hidden.add_(0.5)


class _HiddenInPlaceAfterPrefix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(_bump_in_place(self.layer(x))))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("spelling", ["module", "functional", "method", "operator", "view"])
def test_in_place_write_after_the_prefix_is_hoisted_and_exact(spelling, compile, caplog):
    torch.manual_seed(3)
    model = _InPlaceAfterPrefix(spelling).double().eval()
    inputs = torch.rand(6, 5, dtype=torch.float64)
    baselines = torch.rand(2, 5, dtype=torch.float64)

    assert split_affine_prefix(model) is not None
    with caplog.at_level(logging.INFO, logger="engine.core"):
        hoisted = integrated_gradients(model, inputs, baselines, compile=compile)
    plain = integrated_gradients(model, inputs, baselines, hoist=False)

    torch.testing.assert_close(hoisted, plain, rtol=1e-10, atol=1e-12)
    assert "without hoisting" not in caplog.text


def test_in_place_write_the_trace_cannot_see_runs_unhoisted(caplog):
    torch.manual_seed(4)
    model = _HiddenInPlaceAfterPrefix().double().eval()
    inputs = torch.rand(6, 5, dtype=torch.float64)
    baselines = torch.rand(2, 5, dtype=torch.float64)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        result = integrated_gradients(model, inputs, baselines)
    plain = integrated_gradients(model, inputs, baselines, hoist=False)

    torch.testing.assert_close(result, plain, rtol=0, atol=0)
    assert "without hoisting" in caplog.text


def test_the_cuda_budget_counts_memory_the_allocator_holds_unused(monkeypatch):
    from engine.plan import CPU_BUDGET_BYTES, default_memory_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 8 << 30)

    # Half of the 6 GiB the driver calls free and the 2 GiB cached but unused.
    assert default_memory_budget(torch.device("cuda", 0)) == 4 << 30
    assert default_memory_budget(torch.device("cpu")) == CPU_BUDGET_BYTES


@pytest.mark.parametrize("most", [1, 7, 50, 289, 524])
def test_balanced_chunks_pad_little_and_take_few_shapes(most):
    from engine.plan import balanced_chunk

    sizes = set()
    for total in range(1, 12 * most + 2):
        size = balanced_chunk(most, total)
        chunks = -(-total // size)
        assert size <= most and chunks == -(-total // most), (most, total, size)
        # Padding the last chunk to the others' shape wastes less than an eighth of the
        # cap per chunk (the old plan padded up to a whole chunk).
        assert chunks * size - total < chunks * -(-most // 8) or size == total
        if total > most:
            sizes.add(size)
    assert len(sizes) <= 5


@pytest.mark.parametrize("most", [1, 7, 50, 289, 524, 4900])
def test_one_chunk_jobs_compile_few_shapes_padded_little(most):
    from engine.plan import balanced_chunk, padded_size

    sizes = {balanced_chunk(most, total, padded=True) for total in range(1, 12 * most + 2)}
    for total in range(1, most + 1):
        size = padded_size(total, most)
        assert total <= size <= most and size <= 1.5 * total, (most, total, size)
    # Five shapes of the jobs of several chunks and two per doubling below.
    assert len(sizes) <= 5 + 2 * most.bit_length()
    # Unpadded (eager) jobs still run at their own size.
    assert balanced_chunk(most, most - (most > 1)) == most - (most > 1)


def test_the_recompile_limit_is_raised_for_the_engines_calls_only():
    from torch._dynamo.utils import counters

    from engine.step import RECOMPILE_LIMIT, _with_room

    def double(x):
        return x * 2

    torch._dynamo.reset()
    counters.clear()
    roomy = _with_room(torch.compile(double, backend="eager", dynamic=False))
    for size in range(1, 13):
        assert torch.equal(roomy(torch.ones(size)), torch.full((size,), 2.0))
    # Dynamo's own limit is eight shapes; beyond it a function runs eagerly, uncompiled.
    assert counters["stats"]["unique_graphs"] == 12
    assert torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT


def test_compiled_jobs_of_many_row_counts_share_one_shape(monkeypatch):
    from torch._dynamo.utils import counters

    from engine import fused

    monkeypatch.setattr(fused, "_COMPILED", weakref.WeakKeyDictionary())
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double().eval()
    x, base = torch.rand(42, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)

    # Ten row counts, 33 to 42 paths: each one chunk, all padded to 48 paths.
    for rows in range(33, 43):
        compiled = integrated_gradients(net, x[:rows], base, n_steps=4, compile=True,
                                        hoist=False)
        eager = integrated_gradients(net, x[:rows], base, n_steps=4, hoist=False)
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)

    assert counters["stats"]["unique_graphs"] == 1


def test_the_titanic_job_compiles_two_chunks_of_even_size():
    from engine.plan import choose_chunk_points

    # 716 pairs of 50 steps where the budget allows 524 pairs a chunk.
    chunk = choose_chunk_points(1.0, 524 * 50 * BACKWARD_FACTOR, 716 * 50, 50,
                                torch.device("cuda"))

    assert chunk == 396 * 50


@pytest.mark.parametrize("hoist", [True, False])
def test_out_of_memory_in_the_probes_is_one_model_error(hoist):
    # Chunks of 40 points would fit, but the row-coupling probe's first batch holds 62
    # points: the 60 rows, the baseline and a point of a path.
    torch.manual_seed(8)
    model = RunsOutOfMemory(limit=40).eval()
    x, baselines = torch.randn(60, 3, dtype=torch.float64), torch.zeros(1, 3,
                                                                       dtype=torch.float64)

    with pytest.raises(ModelError, match=r"^out of memory outside the chunks, in the engine's "
                                         r"checks of the model \(up to 1024 rows in one batch\): "
                                         r"62 points do not fit"):
        integrated_gradients(model, x, baselines, n_steps=8, internal_batch_size=40,
                             hoist=hoist)
