"""Integrating through the first ReLU-like layer in closed form gives the per-point numbers."""

import logging
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import engine.core
import engine.hoist
import engine.kink_loops
import engine.kinks
from engine import integrated_gradients
from engine.hoist import split_affine_prefix
from engine.kinks import _switches, sorted_nodes
from engine.model import TitanicMLP
from engine.quadrature import quadrature_rule
from tests.test_chunk_loop import RowCounter, relative_error, titanic_job
from tests.test_core import METHODS, reference_ig


@pytest.fixture
def kink_calls(monkeypatch):
    """Counts the calls of the closed-form integration."""
    calls = []
    original = engine.core.integrate_kinked

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.core, "integrate_kinked", counted)
    return calls


@pytest.fixture(params=["loops", "tensors"])
def implementation(request, monkeypatch):
    """The closed form as numba loops (the CPU's default) and as tensor operations."""
    if request.param == "tensors":
        monkeypatch.setattr(engine.kink_loops, "ENABLED", False)
    return request.param


either_way = pytest.mark.usefixtures("implementation")


def three_ways(model, x, baselines, **kwargs):
    """Through the kinks, hoisted affine prefix only, and every layer at every point."""
    return tuple(
        integrated_gradients(model, x, baselines, hoist=hoist, **kwargs)
        for hoist in (True, "affine", False)
    )


# ---------------------------------------------------------------------------
# Which models take the closed form


@pytest.mark.parametrize("order, mixed", [("article", 1), ("conventional", 128)])
def test_the_titanic_networks_split_at_their_first_prelu(order, mixed):
    split = split_affine_prefix(TitanicMLP(order).eval())

    assert split.kink is not None
    assert isinstance(split.kink.activation, nn.PReLU)
    assert split.kink.linear.out_features == mixed


@pytest.mark.parametrize("rest", [
    [nn.Tanh(), nn.Linear(8, 1)],
    [nn.ReLU6(), nn.Linear(8, 1)],
    [nn.ReLU(), nn.Identity(), nn.Linear(8, 1)],
    [nn.ReLU(), nn.Bilinear(8, 8, 1)],
], ids=["smooth", "two-kinks", "identity-between", "not-linear"])
def test_other_suffixes_are_not_split(rest):
    model = nn.Sequential(nn.Linear(3, 8), *rest).eval()

    split = split_affine_prefix(model)

    assert split is not None and split.kink is None


class Skip(nn.Module):
    """The activation's input is used again after the Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8)

    def forward(self, x):
        hidden = self.l1(x)
        return (self.l2(self.act(hidden)) + hidden).sum(-1)


def test_an_activation_input_used_twice_is_not_split():
    assert split_affine_prefix(Skip().eval()).kink is None


def test_hoist_affine_keeps_the_per_point_suffix(kink_calls):
    net, x, baselines = titanic_job()

    integrated_gradients(net, x, baselines, n_steps=10, hoist="affine")
    assert kink_calls == []
    integrated_gradients(net, x, baselines, n_steps=10)
    assert len(kink_calls) == 1


# ---------------------------------------------------------------------------
# Same numbers as the per-point paths


@either_way
@pytest.mark.parametrize("order", ["article", "conventional"])
@pytest.mark.parametrize("method", METHODS)
def test_titanic_networks_equal_the_per_point_paths_in_float64(order, method, kink_calls,
                                                               monkeypatch):
    # The conventional network's Linear after the PReLU has 128 outputs: by default the
    # affine-hoisted path is faster there, but the closed form must still be exact.
    monkeypatch.setattr(engine.core, "MAX_CLOSED_FORM_OUTPUTS", 1 << 20)
    net, x, baselines = titanic_job(order)

    kinked, affine, plain = three_ways(net, x, baselines, n_steps=20, method=method)

    assert kink_calls, "the closed form did not run"
    assert relative_error(kinked, affine) <= 1e-12
    assert relative_error(kinked, plain) <= 1e-12


@pytest.mark.parametrize("order, closed_form", [("article", True), ("conventional", False)])
def test_the_closed_form_is_used_only_where_the_next_layer_has_few_outputs(
    order, closed_form, kink_calls
):
    net, x, baselines = titanic_job(order, rows=20)

    integrated_gradients(net, x, baselines, n_steps=20)

    assert bool(kink_calls) == closed_form


@either_way
def test_float64_loop_reference_and_completeness():
    net, x, baselines = titanic_job(rows=5)

    actual, delta = integrated_gradients(net, x, baselines, n_steps=64,
                                         return_convergence_delta=True)
    expected = reference_ig(net, x, baselines, None, "gausslegendre", 64)

    assert relative_error(actual, expected) <= 1e-12
    # The article network has kinks inside the path, so 64 nodes leave a quadrature error;
    # the sum still tracks F(x) - F(b).
    gap = (net(x).view(1, -1) - net(baselines).view(-1, 1)).abs()
    assert bool((delta.abs() <= 0.05 * gap + 1e-3).all())


@either_way
@pytest.mark.parametrize("activation", [
    nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.2), nn.PReLU(), nn.PReLU(16),
], ids=["relu", "relu-inplace", "leaky", "prelu", "prelu-per-unit"])
def test_relu_family_with_several_outputs_and_per_row_targets(activation, kink_calls):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 16), activation, nn.Linear(16, 6), nn.Tanh(),
                          nn.Linear(6, 3)).double().eval()
    if isinstance(activation, nn.PReLU):
        nn.init.uniform_(activation.weight, -0.5, 1.5)
    x = torch.randn(11, 4, dtype=torch.float64)
    baselines = torch.randn(3, 4, dtype=torch.float64)
    target = torch.randint(0, 3, (11,))

    kinked, affine, plain = three_ways(model, x, baselines, target=target, n_steps=17)

    assert kink_calls
    assert relative_error(kinked, affine) <= 1e-12
    assert relative_error(kinked, plain) <= 1e-12


class TailWritesInPlace(nn.Module):
    """The closed form's Linear output written in place by the next operation."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.write = write
        self.l1 = nn.Linear(5, 16)
        self.l2 = nn.Linear(16, 4)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        mixed = self.l2(torch.relu(self.l1(x)))
        if self.write == "module":
            mixed = self.act(mixed)
        elif self.write == "method":
            mixed = mixed.mul_(2.0)
        elif self.write == "operator":
            mixed += 1.0
        elif self.write == "transposed view":
            mixed.T.add_(1.0)
        elif self.write == "narrowed view":
            torch.narrow(mixed, 1, 0, 2).mul_(3.0)
        elif self.write == "method by name":
            mixed = mixed.__iadd__(1.0)
        else:
            mixed = nn.functional.leaky_relu(mixed, 0.1, inplace=True)
        return self.out(mixed)


@either_way
@pytest.mark.parametrize("write", ["module", "method", "operator", "functional",
                                   "transposed view", "narrowed view", "method by name"])
def test_an_in_place_write_after_the_kink_gets_a_copy(write, kink_calls, caplog):
    torch.manual_seed(8)
    model = TailWritesInPlace(write).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    baselines = torch.randn(2, 5, dtype=torch.float64)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        kinked, affine, plain = three_ways(model, x, baselines, target=1, n_steps=13)

    assert kink_calls
    assert "without hoisting" not in caplog.text  # the copy, not the fallback
    assert relative_error(kinked, plain) <= 1e-12
    assert relative_error(affine, plain) <= 1e-12


def test_an_in_place_write_the_graph_scan_misses_runs_unhoisted(monkeypatch, caplog):
    torch.manual_seed(9)
    model = TailWritesInPlace("module").double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    baselines = torch.randn(2, 5, dtype=torch.float64)
    plain = integrated_gradients(model, x, baselines, target=1, n_steps=13, hoist=False)
    monkeypatch.setattr(engine.hoist, "_modified_in_place", lambda *args: False)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        hoisted = integrated_gradients(model, x, baselines, target=1, n_steps=13)

    assert relative_error(hoisted, plain) <= 1e-12
    assert "output in place: running it without hoisting" in caplog.text


class Functional(nn.Module):
    """``torch.relu`` called in forward, a Linear without bias, nothing after it."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 12)
        self.l2 = nn.Linear(12, 1, bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@either_way
def test_functional_relu_and_a_bare_linear_ending(kink_calls):
    torch.manual_seed(6)
    model = Functional().double().eval()
    x = torch.randn(8, 3, dtype=torch.float64)
    baselines = torch.randn(2, 8, 3, dtype=torch.float64)  # one baseline per row

    kinked, affine, plain = three_ways(model, x, baselines, n_steps=9,
                                       method="riemann_trapezoid")

    assert kink_calls
    assert relative_error(kinked, plain) <= 1e-12
    # Nothing after the Linear layer: the output is piecewise linear along each path and
    # the trapezoid rule with the kinks at any node is exact only per piece; the three
    # ways still agree with each other.
    assert relative_error(affine, plain) <= 1e-12


@either_way
def test_float32_equals_the_per_point_path_to_rounding():
    net, x, baselines = titanic_job(dtype=torch.float32, rows=50)

    kinked, affine, plain = three_ways(net, x, baselines, n_steps=50)

    assert kinked.dtype == torch.float32
    assert relative_error(kinked, plain) <= 2e-6


@pytest.mark.parametrize("dim", [0, 1, 3])
def test_the_triangular_running_sum_equals_cumsum(dim):
    from engine.kinks import triangular_sum

    torch.manual_seed(3)
    values = torch.randn(3, 7, 2, 51, dtype=torch.float64)

    torch.testing.assert_close(triangular_sum(values, dim), values.cumsum(dim),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("order", ["article", "conventional"])
def test_the_closed_form_with_triangular_running_sums_equals_cumsum(order, monkeypatch):
    # On CUDA under deterministic algorithms the running sums are triangular products.
    monkeypatch.setattr(engine.kink_loops, "ENABLED", False)
    net, x, baselines = titanic_job(order)
    expected = integrated_gradients(net, x, baselines, n_steps=20)

    monkeypatch.setattr(engine.kinks, "running_sum", engine.kinks.triangular_sum)
    actual = integrated_gradients(net, x, baselines, n_steps=20)

    assert relative_error(actual, expected) <= 1e-13


@either_way
def test_blocks_of_pairs_equal_one_block(kink_calls):
    net, x, baselines = titanic_job()

    whole = integrated_gradients(net, x, baselines, n_steps=10)
    blocked = integrated_gradients(net, x, baselines, n_steps=10, internal_batch_size=70)
    budgeted = integrated_gradients(net, x, baselines, n_steps=10, memory_budget=50_000)

    # The whole run is one call on the 23 rows; the others go 7 pairs (70 points) or
    # fewer at a time.
    assert kink_calls[0][0] == 23 and len(kink_calls) > 3
    assert max(shape[0] for shape in kink_calls[1:]) <= 7
    assert relative_error(blocked, whole) <= 1e-14
    assert relative_error(budgeted, whole) <= 1e-14


@either_way
def test_low_precision_tail_stays_within_one_percent():
    net, x, baselines = titanic_job(dtype=torch.float32)

    full = integrated_gradients(net, x, baselines, n_steps=30)
    half = integrated_gradients(net, x, baselines, n_steps=30, precision="bf16")

    assert relative_error(half, full) <= 1e-2


def test_compiled_graph_of_the_tensor_version_equals_eager(kink_calls, monkeypatch, caplog):
    # Where the numba loops do not run (a GPU), the whole closed form is one compiled graph.
    monkeypatch.setattr(engine.kink_loops, "ENABLED", False)
    net, x, baselines = titanic_job(dtype=torch.float32)
    compiled_blocks = []
    original = engine.core.compiled_kinked

    def counted(kink, mode):
        function = original(kink, mode)

        def run(*args):
            compiled_blocks.append(args[1].shape)
            return function(*args)

        return run

    monkeypatch.setattr(engine.core, "compiled_kinked", counted)
    eager = integrated_gradients(net, x, baselines, n_steps=20)
    with caplog.at_level(logging.INFO, logger="engine.core"):
        compiled = integrated_gradients(net, x, baselines, n_steps=20, compile=True)
        blocked = integrated_gradients(net, x, baselines, n_steps=20, compile=True,
                                       internal_batch_size=20 * 30)

    assert len(kink_calls) == 1  # the eager run
    # One block of 92 pairs padded to 96 for the first compiled run; then 30, 30, 30 and
    # 2 padded to 30 pairs.
    assert [shape[0] for shape in compiled_blocks] == [96, 30, 30, 30, 30]
    assert "running it eagerly" not in caplog.text
    assert relative_error(compiled, eager) <= 1e-6
    assert relative_error(blocked, eager) <= 1e-6


def test_compiled_tensor_version_with_per_row_targets_stays_compiled(monkeypatch, caplog):
    monkeypatch.setattr(engine.kink_loops, "ENABLED", False)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(5, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    net = net.eval()
    x, baselines = torch.rand(23, 5), torch.rand(4, 5)
    targets = torch.arange(23) % 3
    eager = integrated_gradients(net, x, baselines, target=targets, n_steps=20)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        compiled = integrated_gradients(net, x, baselines, target=targets, n_steps=20,
                                        compile=True)

    assert "running it eagerly" not in caplog.text
    assert relative_error(compiled, eager) <= 1e-6


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts the calls of the numba loops."""
    calls = []
    original = engine.kink_loops.integrate_pairs

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.kink_loops, "integrate_pairs", counted)
    return calls


def test_the_cpu_runs_the_closed_form_as_numba_loops(loop_calls, monkeypatch):
    net, x, baselines = titanic_job()

    loops = integrated_gradients(net, x, baselines, n_steps=50)
    monkeypatch.setattr(engine.kink_loops, "ENABLED", False)
    tensors = integrated_gradients(net, x, baselines, n_steps=50)

    assert loop_calls == [(4, 23, 128)]
    # The same float64 formulas; only the order of some additions differs.
    assert relative_error(loops, tensors) <= 1e-14


def test_without_numba_the_tensor_version_runs(loop_calls, kink_calls, monkeypatch):
    monkeypatch.setattr(engine.kink_loops, "numba", None)
    net, x, baselines = titanic_job(rows=7)

    attributions = integrated_gradients(net, x, baselines, n_steps=20)

    assert loop_calls == [] and len(kink_calls) == 1
    assert relative_error(attributions, reference_ig(net, x, baselines, None,
                                                     "gausslegendre", 20)) <= 1e-12


def test_compiled_with_the_loops_compiles_only_the_tail(loop_calls, monkeypatch, caplog):
    compiled_graphs = []
    monkeypatch.setattr(engine.core, "compiled_kinked",
                        lambda *args: compiled_graphs.append(args) or None)
    net, x, baselines = titanic_job(dtype=torch.float32)
    eager = integrated_gradients(net, x, baselines, n_steps=20)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        compiled = integrated_gradients(net, x, baselines, n_steps=20, compile=True)
        blocked = integrated_gradients(net, x, baselines, n_steps=20, compile=True,
                                       internal_batch_size=20 * 30)

    assert compiled_graphs == []
    # One call for the eager run, one for the first compiled run, then 30, 30, 30 and 2.
    assert [shape[:-1] for shape in loop_calls] == [(4, 23), (4, 23), (30,), (30,), (30,),
                                                    (2,)]
    assert "running it eagerly" not in caplog.text
    assert relative_error(compiled, eager) <= 1e-6
    assert relative_error(blocked, eager) <= 1e-6


def test_a_tail_that_does_not_compile_runs_eagerly(loop_calls, monkeypatch, caplog):
    def broken(model, mode):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor cannot lower this tail")

        return fail

    monkeypatch.setattr(engine.core, "compiled_model", broken)
    net, x, baselines = titanic_job(dtype=torch.float64, rows=9)
    eager = integrated_gradients(net, x, baselines, n_steps=8)

    with caplog.at_level(logging.INFO, logger="engine.core"):
        compiled = integrated_gradients(net, x, baselines, n_steps=8, compile=True)

    assert "compiling the kinked integral failed" in caplog.text
    assert "inductor cannot lower this tail); running it eagerly" in caplog.text
    assert relative_error(compiled, eager) <= 1e-14


def test_compiled_with_per_row_targets_and_a_bad_target():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(11, 4)
    baselines = torch.randn(2, 4)
    target = torch.randint(0, 3, (11,))

    eager = integrated_gradients(model, x, baselines, target=target, n_steps=8)
    compiled = integrated_gradients(model, x, baselines, target=target, n_steps=8,
                                    compile=True)

    assert relative_error(compiled, eager) <= 1e-6
    with pytest.raises(engine.errors.ArgumentError, match="target 3 is out of range"):
        integrated_gradients(model, x, baselines, target=3, n_steps=8, compile=True)


def test_parameters_are_left_as_they_were():
    net, x, baselines = titanic_job()
    before = [p.detach().clone() for p in net.parameters()]

    integrated_gradients(net, x, baselines, n_steps=10)

    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@either_way
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_non_finite_tail_outputs_are_refused(compile):
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1), Log()).double().eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.fill_(-1.0)
        model[2].bias.zero_()
    x = torch.ones(3, 2, dtype=torch.float64)

    with pytest.raises(engine.errors.ModelError, match="non-finite"):
        integrated_gradients(model, x, torch.zeros(1, 2, dtype=torch.float64), n_steps=4,
                             compile=compile)


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


# ---------------------------------------------------------------------------
# Where each unit switches slope: ties, flat units and both ways of counting


@pytest.mark.parametrize("method, n_steps", [
    ("gausslegendre", 50), ("riemann_left", 8), ("riemann_right", 8),
    ("riemann_trapezoid", 9), ("riemann_middle", 4), ("gausslegendre", 600),
])
@pytest.mark.parametrize("way", ["tensors", "loops"])
def test_switches_count_the_nodes_on_each_side(method, n_steps, way):
    rule = quadrature_rule(method, n_steps)
    nodes = sorted_nodes(rule.alphas, rule.weights, torch.float32, torch.device("cpu"))
    assert (nodes.cells is None) == (n_steps == 600)
    alphas = nodes.alphas
    generator = torch.Generator().manual_seed(1)
    # Crossings at every node exactly, just beside them, outside [0, 1], and at random.
    crossings = torch.cat([
        alphas, torch.nextafter(alphas[alphas > 0], torch.tensor(2.0)),
        torch.nextafter(alphas[alphas > 0], torch.tensor(-1.0)),
        torch.tensor([-3.0, -1e-9, 0.0, 1e-9, 1.0, 7.0]),
        torch.rand(300, generator=generator, dtype=torch.float64) * 1.4 - 0.2,
    ])
    # Powers of two: -start / direction gives the crossing back exactly.
    direction = torch.where(torch.arange(len(crossings)) % 2 == 0, 2.0, -0.5).double()
    start = -crossings * direction
    falling = direction < 0

    switch = switches_by(way, start, direction, nodes)

    # A unit is positive where start + a direction > 0, in exact rational arithmetic.
    positive = torch.tensor([
        [Fraction(s) + Fraction(a) * Fraction(d) > 0 for a in alphas.tolist()]
        for s, d in zip(start.tolist(), direction.tolist())
    ])
    k = torch.arange(len(alphas)).view(1, -1)
    predicted = torch.where(falling.view(-1, 1), k < switch.view(-1, 1),
                            k >= switch.view(-1, 1))
    assert torch.equal(-(start / direction), crossings)
    assert torch.equal(predicted, positive)


def switches_by(way, start, direction, nodes):
    """Each unit's switch node, (U,) from (U,) float64 starts and directions."""
    if way == "tensors":
        return _switches(start.view(1, -1), direction.view(1, -1), (direction < 0).view(1, -1),
                         nodes)[0]
    if way == "compiled":
        switches = torch.compile(_switches, fullgraph=True)
        return switches(start.view(1, -1), direction.view(1, -1), (direction < 0).view(1, -1),
                        nodes)[0]
    # The loops' slots: a falling unit switching at node s sits in slot 2 (K + 1) - 1 - s.
    width = nodes.alphas.shape[0] + 1
    slots = np.empty(len(start), dtype=np.int32)
    if nodes.cells is None:
        engine.kink_loops._searched_slots(start.numpy(), direction.numpy(),
                                          nodes.alphas.numpy(), width, slots)
    else:
        engine.kink_loops._table_slots(start.numpy(), direction.numpy(), nodes.cells,
                                       nodes.below.numpy(), nodes.inside.numpy(), width, slots)
    return torch.from_numpy(np.where(slots >= width, 2 * width - 1 - slots, slots))


@pytest.mark.parametrize("way", ["tensors", "compiled", "loops"])
def test_flat_units_take_the_sign_of_their_start(way):
    # Compiled, the 0 / 0 crossings go through a different nan test than eager; the loops
    # divide by zero under numpy's rules.
    rule = quadrature_rule("riemann_trapezoid", 5)
    nodes = sorted_nodes(rule.alphas, rule.weights, torch.float64, torch.device("cpu"))
    start = torch.tensor([2.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    direction = torch.tensor([0.0, 0.0, 0.0, -0.0], dtype=torch.float64)

    switch = switches_by(way, start, direction, nodes)

    # Rising units: positive from the switch on. Always, never, never (0 is not > 0).
    assert switch.tolist() == [0, 5, 5, 5]


@either_way
def test_zero_baseline_through_a_bias_free_prefix_ties_at_the_first_node(kink_calls):
    # h_b = 0 exactly: every unit crosses at a = 0, a node of the left and trapezoid rules,
    # where the kink's derivative is the slope below zero.
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 10, bias=False), nn.LeakyReLU(0.1), nn.Linear(10, 1),
                          nn.Sigmoid()).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    zero = torch.zeros(1, 3, dtype=torch.float64)

    for method in ("riemann_left", "riemann_trapezoid"):
        kinked, affine, plain = three_ways(model, x, zero, n_steps=6, method=method)
        assert relative_error(kinked, affine) <= 1e-12
        assert relative_error(kinked, plain) <= 1e-12
    assert kink_calls


@either_way
def test_baseline_equal_to_the_input_gives_zero():
    net, x, _ = titanic_job()

    attributions = integrated_gradients(net, x, x[:1], n_steps=10)

    assert bool((attributions[0, 0] == 0).all())


def test_the_lookup_table_is_small_and_exact():
    rule = quadrature_rule("gausslegendre", 50)
    nodes = sorted_nodes(rule.alphas, rule.weights, torch.float32, torch.device("cpu"))
    values = nodes.alphas.numpy()

    assert nodes.cells is not None and nodes.cells <= 1 << 12
    # Each cell holds at most one node.
    cells = np.floor(values * nodes.cells)
    assert len(np.unique(cells)) == len(values)
    assert engine.kinks._MAX_CELLS == 1 << 16


# ---------------------------------------------------------------------------
# Pulling the hidden sums back through the prefix


def test_many_rows_pull_back_through_a_conv_batchnorm_prefix_jacobian():
    # More pairs than hidden units: the Jacobian is built from unit vectors.
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.Flatten(), nn.ReLU(),
        nn.Linear(3 * 8, 2),
    ).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(30, 2, 8, dtype=torch.float64)
    baselines = torch.randn(2, 2, 8, dtype=torch.float64)

    kinked, affine, plain = three_ways(model, x, baselines, target=1, n_steps=10)

    assert relative_error(kinked, plain) <= 1e-12
    assert relative_error(affine, plain) <= 1e-12


@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False),
                                    (False, False)])
def test_many_rows_pull_back_through_a_product_of_linear_weights(biases):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6, bias=biases[0]), nn.Identity(),
                          nn.Linear(6, 4, bias=biases[1]), nn.Tanh(),
                          nn.Linear(4, 1)).double().eval()
    x = torch.randn(40, 3, dtype=torch.float64)

    hoisted = integrated_gradients(model, x, torch.zeros(2, 3, dtype=torch.float64),
                                   n_steps=10)
    plain = integrated_gradients(model, x, torch.zeros(2, 3, dtype=torch.float64),
                                 n_steps=10, hoist=False)

    assert relative_error(hoisted, plain) <= 1e-12


def test_a_prefix_of_linear_layers_pulls_back_through_the_float64_product_of_weights():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), nn.Identity(), nn.Linear(6, 4, bias=False),
                          nn.ReLU(), nn.Linear(4, 1))
    split = split_affine_prefix(model)
    x = torch.randn(9, 3)

    jacobian = split.linear_jacobian(x)

    assert jacobian.dtype == torch.float64
    torch.testing.assert_close(jacobian, model[2].weight.double() @ model[0].weight.double(),
                               rtol=1e-15, atol=1e-15)
    with torch.no_grad():
        model[2].weight.mul_(-3)  # read at every call
    torch.testing.assert_close(split.linear_jacobian(x),
                               model[2].weight.double() @ model[0].weight.double(),
                               rtol=1e-15, atol=1e-15)


def test_other_prefixes_have_no_product_of_weights():
    torch.manual_seed(7)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.ReLU(), nn.Linear(4, 1))
    assert split_affine_prefix(conv).linear_jacobian(torch.randn(3, 1, 6)) is None
    linear = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    split = split_affine_prefix(linear)
    # Rows of another dtype (the model itself would fail on them) or not (N, F).
    assert split.linear_jacobian(torch.randn(2, 3, dtype=torch.float64)) is None
    assert split.linear_jacobian(torch.randn(2, 2, 3)) is None
    assert split.linear_jacobian(torch.randn(2, 3)) is not None
    linear[0].register_forward_hook(lambda module, args, output: 2 * output)
    assert split.linear_jacobian(torch.randn(2, 3)) is None


@pytest.mark.parametrize("method", ["riemann_left", "riemann_trapezoid"])
def test_hidden_units_the_model_puts_at_zero_stay_at_zero(method):
    # A standardising Linear layer, then another: at the mean baseline the model's hidden
    # units are exactly zero, and the nodes at alpha = 0 sit on the ReLU's kink. The prefix
    # must compute them as the model does (the product of the two weights rounds them to
    # +-1e-7, and the ReLU then takes the other side).
    torch.manual_seed(0)
    mean = torch.tensor([0.5, 2.0, 1.0, 0.25, 4.0])  # powers of 2: scale * mean is exact
    scale = 1 / (torch.rand(5) + 0.5)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 64, bias=False), nn.ReLU(),
                          nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(scale))
        model[0].bias.copy_(-(scale * mean))
    # More rows than the gradient check's points, so that only rows are checked.
    x = torch.randn(100, 5) * 2 + mean
    baseline = mean[None]
    assert bool((model[:2](baseline) == 0).all())

    hoisted = integrated_gradients(model, x, baseline, method=method)
    affine = integrated_gradients(model, x, baseline, method=method, hoist="affine")
    reference = integrated_gradients(model.double(), x.double(), baseline.double(),
                                     method=method, hoist=False)

    assert relative_error(hoisted.double(), reference) <= 1e-5
    assert relative_error(affine.double(), reference) <= 1e-5


# ---------------------------------------------------------------------------
# Forward hooks


@pytest.mark.parametrize("layer", ["l1", "l2", "r1", "out"])
def test_a_hook_that_changes_a_layer_is_followed(layer, kink_calls):
    # Doubling a layer's output keeps the prefix affine but changes the model; sin makes
    # the prefix or the Linear after the kink non-affine.
    net, x, baselines = titanic_job()

    def change(module, args, output):
        return output.sin() if layer in ("l1", "out") else 2 * output

    getattr(net, layer).register_forward_hook(change)
    hooked_run = integrated_gradients(net, x, baselines, n_steps=12)
    plain = integrated_gradients(net, x, baselines, n_steps=12, hoist=False)

    assert relative_error(hooked_run, plain) <= 1e-12
    assert kink_calls == []


def test_a_global_forward_hook_is_followed(kink_calls):
    net, x, baselines = titanic_job()
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output.tanh() if module is net.l2 else None
    )
    try:
        hooked_run = integrated_gradients(net, x, baselines, n_steps=12)
        plain = integrated_gradients(net, x, baselines, n_steps=12, hoist=False)
    finally:
        handle.remove()

    assert relative_error(hooked_run, plain) <= 1e-12
    assert kink_calls == []


@pytest.mark.parametrize("layer", ["l2", "r1", "out"])
def test_a_forward_replaced_on_the_instance_is_followed(layer, kink_calls):
    net, x, baselines = titanic_job()
    module = getattr(net, layer)
    original = module.forward
    module.forward = lambda hidden: original(hidden).tanh()

    replaced = integrated_gradients(net, x, baselines, n_steps=12)
    plain = integrated_gradients(net, x, baselines, n_steps=12, hoist=False)

    assert relative_error(replaced, plain) <= 1e-12
    assert kink_calls == []


def test_a_hooked_first_layer_is_not_pulled_back_through_its_weights():
    # More rows than hidden units: pull_back would use the product of the weights.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4), nn.Tanh(),
                          nn.Linear(4, 1)).double().eval()
    model[0].register_forward_hook(lambda module, args, output: 2 * output)
    x = torch.randn(40, 5, dtype=torch.float64)
    baselines = torch.randn(1, 5, dtype=torch.float64)

    kinked, affine, plain = three_ways(model, x, baselines, n_steps=20)

    assert relative_error(kinked, plain) <= 1e-12
    assert relative_error(affine, plain) <= 1e-12


@either_way
def test_a_huge_unit_switching_off_leaves_no_rounding_behind():
    # Unit 0 is 1e11 at the baseline and turns off at a = 0.1: its term must vanish from
    # the later nodes exactly, not as the difference of two 1e11s.
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1), nn.Tanh()).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1e12, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([1e11, 0.3, 0.2]))
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    x = torch.tensor([[1.0, 0.7]], dtype=torch.float64)
    baseline = torch.tensor([[0.0, -0.5]], dtype=torch.float64)

    kinked, affine, plain = three_ways(model, x, baseline, n_steps=50)

    assert relative_error(kinked[..., 1], plain[..., 1]) <= 1e-12
    assert relative_error(kinked, plain) <= 1e-12


# ---------------------------------------------------------------------------
# Backward hooks, the model's own hooks, and hooks added after a first call


def five_layers():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(),
                          nn.Linear(6, 1)).double().eval()
    x = torch.randn(40, 5, dtype=torch.float64)
    return model, x, torch.zeros(1, 5, dtype=torch.float64)


@pytest.mark.parametrize("layer", [0, 1, 2, 4])
def test_a_backward_hook_is_followed(layer):
    model, x, baseline = five_layers()
    model[layer].register_full_backward_hook(lambda module, grad_in, grad_out:
                                             (3 * grad_in[0],))

    for hoist in (True, "affine", False):
        actual = integrated_gradients(model, x, baseline, n_steps=10, hoist=hoist)
        expected = reference_ig(model, x[:3], baseline, None, "gausslegendre", 10)
        assert relative_error(actual[:, :3], expected) <= 1e-12, hoist


def test_the_models_own_forward_hook_is_followed():
    model, x, baseline = five_layers()
    model.register_forward_hook(lambda module, args, output: output.sin())

    for hoist in (True, False):
        actual = integrated_gradients(model, x, baseline, n_steps=10, hoist=hoist)
        expected = reference_ig(model, x[:3], baseline, None, "gausslegendre", 10)
        assert relative_error(actual[:, :3], expected) <= 1e-12, hoist


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_forward_replaced_after_a_first_call_is_followed(compile):
    model, x, baseline = five_layers()
    model, x, baseline = model.float(), x.float(), baseline.float()
    before = integrated_gradients(model, x, baseline, n_steps=10, hoist=False,
                                  compile=compile)
    original = model[4].forward
    model[4].forward = lambda hidden: 2 * original(hidden)

    after = integrated_gradients(model, x, baseline, n_steps=10, hoist=False, compile=compile)

    assert relative_error(after, 2 * before) <= 1e-5


@either_way
@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("direction", ["falling", "rising"])
def test_a_tiny_negative_slope_keeps_its_digits(outputs, direction):
    # Every unit stays below zero along the path, so only the slope 1e-12 carries
    # gradient; W - (1 - s) W would leave rounding of W's size in place of s W.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(1e-12), nn.Linear(4, outputs),
                          nn.Linear(outputs, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(4, 3) + 0.5)
        model[0].bias.fill_(-10.0)
    baseline = torch.full((1, 3), 2.0, dtype=torch.float64)
    x = torch.full((1, 3), 1.0 if direction == "falling" else 3.0, dtype=torch.float64)

    kinked, affine, plain = three_ways(model, x, baseline, n_steps=50)

    assert relative_error(kinked, plain) <= 1e-12
    assert relative_error(affine, plain) <= 1e-12


def test_the_loops_compile_where_nothing_can_be_cached():
    # A read-only install and home directory leave numba no cache location, which it
    # reports when the function is decorated; a file-less function does the same.
    namespace = {}
    source = "def double(values, out):\n    for i in range(values.shape[0]):\n" \
             "        out[i] = 2 * values[i]\n"
    exec(compile(source, "<generated>", "exec"), namespace)
    with pytest.raises(RuntimeError, match="cannot cache"):
        engine.kink_loops.numba.njit(cache=True)(namespace["double"])

    double = engine.kink_loops._compiled(namespace["double"])
    out = np.empty(3)
    double(np.arange(3.0), out)

    assert out.tolist() == [0.0, 2.0, 4.0]


def test_with_numba_jit_disabled_the_tensor_version_runs(loop_calls, kink_calls, monkeypatch,
                                                         caplog):
    # The loops in plain Python would take seconds where the tensors take milliseconds.
    monkeypatch.setattr(engine.kink_loops.numba.config, "DISABLE_JIT", True)
    monkeypatch.setattr(engine.kink_loops, "_SAID_WHY", [])
    net, x, baselines = titanic_job(rows=7)

    with caplog.at_level(logging.INFO, logger="engine.kink_loops"):
        integrated_gradients(net, x, baselines, n_steps=20)

    assert loop_calls == [] and len(kink_calls) == 1
    assert "tensor operations: NUMBA_DISABLE_JIT is set" in caplog.text


# ---------------------------------------------------------------------------
# The prefix outputs the trace check computed on the probe's points


def test_the_rows_and_baselines_go_through_the_prefix_once_per_call(monkeypatch):
    net, x, baselines = titanic_job(rows=23)
    integrated_gradients(net, x, baselines, n_steps=20)  # the trace is made and checked
    counter = RowCounter(net.l1, monkeypatch)

    reused = integrated_gradients(net, x, baselines, n_steps=20)
    rows_reused, counter.rows = counter.rows, 0
    monkeypatch.setattr(engine.core, "_sample_prefix", lambda *args: (None, None))
    computed = integrated_gradients(net, x, baselines, n_steps=20)

    # The check ran the prefix on the 23 rows and 4 baselines among the probe's points.
    assert counter.rows - rows_reused == 23 + 4
    assert relative_error(reused, computed) <= 1e-12


class InPlaceRelu(nn.Module):
    """An in-place ReLU on the prefix's output, then the closed form's Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 1)

    def forward(self, x):
        return torch.sigmoid(self.l2(self.act(self.l1(x))))


class SuffixDoublesInPlace(nn.Module):
    """A smooth suffix that writes the prefix's output in place."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 16), nn.Linear(16, 1)

    def forward(self, x):
        hidden = self.l1(x)
        hidden.mul_(2.0)
        return self.l2(torch.tanh(hidden))


def _job(case):
    torch.manual_seed(3)
    x = torch.rand(23, 5, dtype=torch.float64)
    shared = torch.stack([x.mean(0), torch.zeros(5, dtype=torch.float64),
                          torch.ones(5, dtype=torch.float64)])
    net, method = TitanicMLP().double().eval(), "gausslegendre"
    if case == "per-row baselines":
        return net, x, torch.rand(3, 23, 5, dtype=torch.float64), method
    if case == "more kinds than the probe holds":
        return net, x, torch.rand(engine.core.PROBE_KINDS + 6, 5, dtype=torch.float64), method
    if case == "negative zero baseline, node at zero":
        return net, x, torch.full((1, 5), -0.0, dtype=torch.float64), "riemann_left"
    if case == "in-place relu":
        net = InPlaceRelu().double().eval()
    elif case == "suffix writes in place":
        net = SuffixDoublesInPlace().double().eval()
    elif case == "smooth suffix":
        net = nn.Sequential(nn.Linear(5, 16), nn.Linear(16, 8), nn.Tanh(),
                            nn.Linear(8, 1)).double().eval()
    return net, x, shared, method


@pytest.mark.parametrize("case", [
    "shared baselines", "per-row baselines", "more kinds than the probe holds",
    "negative zero baseline, node at zero", "in-place relu", "suffix writes in place",
    "smooth suffix",
])
def test_prefix_outputs_from_the_check_give_the_same_attributions(case, monkeypatch):
    net, x, baselines, method = _job(case)
    plain = integrated_gradients(net, x, baselines, n_steps=16, method=method, hoist=False)
    reused = integrated_gradients(net, x, baselines, n_steps=16, method=method)
    monkeypatch.setattr(engine.core, "_sample_prefix", lambda *args: (None, None))
    computed = integrated_gradients(net, x, baselines, n_steps=16, method=method)

    assert relative_error(reused, computed) <= 1e-12
    assert relative_error(reused, plain) <= 1e-10
