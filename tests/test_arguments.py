"""Every argument form Captum accepts, and a named error for every bad one."""

import logging

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn

import engine
from engine import expected_gradients, integrated_gradients
from engine.errors import ArgumentError, ModelError, NonFiniteError, NonFiniteOutputError
from tests.test_core import mlp, relative_error


def captum_ig(model, x, baseline, **kwargs):
    return CaptumIG(model).attribute(x, baseline, **kwargs)


class MultiDimOutput(nn.Module):
    """(N, 3) -> (N, 2, 3): a model whose output per row is a matrix."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 6).double()

    def forward(self, x):
        return torch.tanh(self.linear(x)).view(-1, 2, 3)


class TwoInputs(nn.Module):
    """Tuple inputs (N, 3) and (N, 2, 2) plus an extra per-row tensor and a scale."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4).double()
        self.b = nn.Linear(4, 4).double()

    def forward(self, x, y, extra, scale):
        hidden = torch.tanh(self.a(x) + self.b(y.flatten(1)) * extra)
        return scale * hidden


def test_per_row_tuple_targets_equal_captum():
    torch.manual_seed(10)
    model = MultiDimOutput().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    target = [(1, 0), (0, 2), (1, 1), (0, 0)]

    actual = integrated_gradients(model, x, torch.zeros(1, 3, dtype=torch.float64),
                                  target=target, n_steps=20)
    expected = captum_ig(model, x, 0.0, target=target, n_steps=20)

    assert relative_error(actual[0], expected) <= 1e-6


def test_one_tuple_target_applies_to_every_row():
    torch.manual_seed(11)
    model = MultiDimOutput().eval()
    x = torch.randn(5, 3, dtype=torch.float64)

    actual = integrated_gradients(model, x, target=(1, 2), n_steps=10)
    per_row = integrated_gradients(model, x, target=[(1, 2)] * 5, n_steps=10)

    torch.testing.assert_close(actual, per_row, rtol=0, atol=0)


@pytest.mark.parametrize(
    "target", [2, torch.tensor(2), torch.tensor([2]), [2, 2, 2, 2], torch.full((4,), 2)]
)
def test_target_forms_for_the_same_class_agree(target):
    torch.manual_seed(12)
    model = mlp(3, 8, 4)
    x = torch.randn(4, 3, dtype=torch.float64)

    actual = integrated_gradients(model, x, target=target, n_steps=6)
    expected = integrated_gradients(model, x, target=2, n_steps=6)

    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(-1,), (-1, 1)])
def test_models_returning_one_value_per_row_need_no_target(shape):
    torch.manual_seed(13)
    net = mlp(3, 8, 1)

    def model(x):
        return net(x).view(shape)

    x = torch.randn(5, 3, dtype=torch.float64)
    actual = integrated_gradients(model, x, n_steps=8)

    expected = captum_ig(model, x, None, n_steps=8)
    assert relative_error(actual[0], expected) <= 1e-6


def test_tuple_inputs_with_scalar_kind_and_per_row_baselines_equal_captum():
    torch.manual_seed(14)
    model = TwoInputs().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, 2, dtype=torch.float64)
    extra = torch.randn(6, 4, dtype=torch.float64)
    y_base = torch.randn(6, 2, 2, dtype=torch.float64)

    # One baseline kind: a scalar for x, a per-row tensor for y: (1, N, *F).
    ax, ay = integrated_gradients(
        model, (x, y), (0.5, y_base.unsqueeze(0)), target=1,
        additional_forward_args=(extra, 3.0), n_steps=16,
    )
    cx, cy = CaptumIG(model).attribute(
        (x, y), (0.5, y_base), target=1, additional_forward_args=(extra, 3.0), n_steps=16
    )

    assert ax.shape == (1, 6, 3) and ay.shape == (1, 6, 2, 2)
    assert relative_error(ax[0], cx) <= 1e-6
    assert relative_error(ay[0], cy) <= 1e-6


def test_per_row_forward_args_follow_their_row_across_baseline_kinds():
    torch.manual_seed(15)
    model = TwoInputs().eval()
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    extra = torch.randn(3, 4, dtype=torch.float64)
    baselines = (torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64))

    together = integrated_gradients(model, (x, y), baselines, target=0,
                                    additional_forward_args=(extra, 2.0), n_steps=5)

    for row in range(3):
        alone = integrated_gradients(
            model, (x[row : row + 1], y[row : row + 1]), baselines, target=0,
            additional_forward_args=(extra[row : row + 1], 2.0), n_steps=5,
        )
        for joint, single in zip(together, alone):
            torch.testing.assert_close(joint[:, row], single[:, 0], rtol=1e-12, atol=1e-14)


def test_multiply_by_inputs_false_gives_the_averaged_gradient():
    torch.manual_seed(16)
    model = mlp(4, 8, 1)
    x = torch.randn(5, 4, dtype=torch.float64)
    baselines = torch.randn(2, 4, dtype=torch.float64)

    ig = integrated_gradients(model, x, baselines, n_steps=9)
    averaged = integrated_gradients(model, x, baselines, n_steps=9, multiply_by_inputs=False)

    torch.testing.assert_close(averaged * (x - baselines.unsqueeze(1)), ig, rtol=1e-12, atol=0)


def test_integer_baselines_are_converted_like_captum_does():
    model = mlp(3, 4, 1)
    x = torch.randn(2, 3, dtype=torch.float64)

    from_ints = integrated_gradients(model, x, torch.ones(1, 3, dtype=torch.long), n_steps=4)
    from_floats = integrated_gradients(model, x, torch.ones(1, 3, dtype=torch.float64), n_steps=4)

    torch.testing.assert_close(from_ints, from_floats, rtol=0, atol=0)


# Bad arguments: one test per mistake, each checks the message names it.


def test_baseline_of_another_float_dtype_is_refused():
    with pytest.raises(ArgumentError, match=r"baselines has dtype torch.float64 but inputs"):
        integrated_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.zeros(1, 3).double())


def test_baseline_with_wrong_row_count_is_refused():
    with pytest.raises(ArgumentError, match=r"\(1, 3, 3\).*\(B, 2, 3\) per row"):
        integrated_gradients(nn.Linear(3, 1), torch.randn(2, 3), torch.zeros(1, 3, 3))


def test_tuple_baseline_count_must_match_inputs():
    with pytest.raises(ArgumentError, match="got 1 baselines for 2 inputs"):
        integrated_gradients(lambda a, b: a.sum(1) + b.sum(1),
                             (torch.randn(2, 3), torch.randn(2, 3)), (torch.zeros(1, 3),))


def test_model_on_another_device_is_named_with_both_devices():
    model = nn.Linear(3, 1, device="meta")

    with pytest.raises(ArgumentError, match=r"model is on meta \(parameter weight\).*on cpu"):
        integrated_gradients(model, torch.randn(2, 3))


def test_device_failure_inside_a_plain_function_is_explained():
    weight = torch.randn(3, 1, device="meta")

    def model(x):
        if x.device != weight.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found two")
        return x @ weight

    with pytest.raises(ArgumentError, match="failed on inputs on cpu: Expected all tensors"):
        integrated_gradients(model, torch.randn(2, 3))


def test_integer_inputs_are_refused_with_the_fix():
    with pytest.raises(ArgumentError, match=r"inputs has dtype torch.int64.*\.float\(\)"):
        integrated_gradients(nn.Linear(3, 1), torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("target", [4, -5, [0, 4], torch.tensor([1, 7])])
def test_target_out_of_range_names_target_and_output_count(target):
    with pytest.raises(ArgumentError, match=r"target -?\d+ is out of range.*returns 4 outputs"):
        integrated_gradients(nn.Linear(3, 4), torch.randn(2, 3), target=target)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_bad_target_fails_on_the_first_forward(compile):
    # The row-coupling probe's forwards select the target; nothing is integrated.
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))

    with pytest.raises(ArgumentError, match="target 4 is out of range"):
        integrated_gradients(model, torch.randn(5, 3), target=4, compile=compile)
    # The probe's first batch (five rows, a baseline and a path point) selects it.
    assert calls == [7]


def test_too_many_target_indices_are_refused():
    with pytest.raises(ArgumentError, match=r"target has 2 indices.*shape \(4,\)"):
        integrated_gradients(nn.Linear(3, 4), torch.randn(2, 3), target=(1, 0))


def test_target_selecting_several_outputs_is_refused():
    with pytest.raises(ArgumentError, match=r"selects \(3,\) outputs per row"):
        integrated_gradients(MultiDimOutput().eval(), torch.randn(2, 3).double(), target=1)


def test_float_targets_are_refused():
    with pytest.raises(ArgumentError, match="target has dtype torch.float32"):
        integrated_gradients(nn.Linear(3, 4), torch.randn(2, 3), target=torch.tensor([0.0, 1.0]))


def test_an_empty_target_list_is_refused_by_name():
    # An empty list reads as a float tensor, whose dtype alone says nothing of the cause.
    with pytest.raises(ArgumentError, match="target is an empty list"):
        integrated_gradients(nn.Linear(3, 4), torch.randn(2, 3), target=[])


def test_target_list_of_wrong_length_is_refused():
    with pytest.raises(ArgumentError, match=r"target has shape \(3,\).*2 targets"):
        integrated_gradients(nn.Linear(3, 4), torch.randn(2, 3), target=[0, 1, 2])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_inputs_are_refused_naming_the_rows(value):
    # A saturating layer keeps the outputs finite; the attribution would be 0 x inf = nan.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    x = torch.rand(6, 5)
    x[3, 2] = x[5, 0] = value

    with pytest.raises(ArgumentError, match=r"inputs hold nan or inf in row\(s\) 3, 5"):
        integrated_gradients(net, x, torch.zeros(1, 5))


def test_non_finite_baselines_are_refused_naming_the_kind_and_row():
    x = torch.rand(4, 3)
    shared = torch.zeros(2, 3)
    shared[1, 0] = float("nan")
    per_row = torch.zeros(2, 4, 3)
    per_row[1, 2, 1] = float("inf")

    with pytest.raises(ArgumentError, match=r"baselines hold nan or inf \(baseline kind 1\)"):
        integrated_gradients(nn.Linear(3, 1), x, shared)
    with pytest.raises(ArgumentError, match=r"baseline kind 1, row 2\)"):
        integrated_gradients(nn.Linear(3, 1), x, per_row)


def test_a_non_finite_gradient_with_finite_outputs_names_the_rows():
    def root(points):
        return torch.sqrt(points).sum(1)

    x = torch.rand(5, 3) + 0.1
    baselines = torch.ones(1, 3)
    baselines_at_zero = torch.zeros(2, 3)
    baselines_at_zero[0] = 1.0

    # riemann_left evaluates the baseline itself, where sqrt's gradient is infinite.
    with pytest.raises(ModelError, match=r"gradient is nan or inf on the path of row\(s\) 0, 1"):
        integrated_gradients(root, x, baselines_at_zero, method="riemann_left")
    # Away from zero the same model is fine.
    assert torch.isfinite(integrated_gradients(root, x, baselines, method="riemann_left")).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_callers_autocast_does_not_change_the_result(precision, caplog):
    from engine import step

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)).eval()
    x = torch.rand(30, 5)
    expected = integrated_gradients(net, x, 0.0, hoist=False, precision=precision)

    step._warned_autocast = False
    with caplog.at_level("WARNING", logger="engine"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        got = integrated_gradients(net, x, 0.0, hoist=False, precision=precision)

    # Before, the caller's bf16 also rounded the sums over the steps and the backward.
    assert torch.equal(got, expected)
    assert "torch.autocast is active around the call" in caplog.text


def test_a_model_made_in_inference_mode_is_named_and_left_as_it_was():
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).eval()

    with pytest.raises(ArgumentError, match=r"tensor 0\.weight was made inside "
                                             r"torch\.inference_mode\(\)"):
        integrated_gradients(model, torch.rand(6, 5), 0.0)
    assert all(p.requires_grad for p in model.parameters())


def test_inference_mode_is_named():
    with torch.inference_mode(), pytest.raises(ArgumentError, match="inference_mode"):
        integrated_gradients(nn.Linear(3, 1), torch.rand(4, 3))


def test_non_finite_model_output_names_the_rows():
    def model(x):
        out = x.sum(1)
        return torch.where(x[:, 0] > 10, out / 0.0 * 0.0, out)

    x = torch.zeros(4, 2)
    x[1, 0] = x[3, 0] = 20.0
    with pytest.raises(NonFiniteOutputError, match=r"non-finite outputs.*row\(s\) 1, 3") as raised:
        integrated_gradients(model, x, torch.zeros(1, 2))
    # The type users see is the public one, not a private subclass.
    assert type(raised.value) is NonFiniteOutputError


@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "plain"])
def test_non_finite_weights_are_named_instead_of_the_rows(hoist):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    with torch.no_grad():
        model[2].weight[0, 5] = float("nan")

    with pytest.raises(ModelError, match=r"weights hold nan or inf \(parameter 2\.weight: 1 of 8 "
                                         r"values\)") as error:
        integrated_gradients(model, torch.rand(4, 3), torch.zeros(1, 3), hoist=hoist)
    assert "row(s)" not in str(error.value)


def test_non_finite_buffers_are_named_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).eval()
    model[1].running_mean[2] = float("nan")

    with pytest.raises(ModelError, match=r"\(buffer 1\.running_mean: 1 of 4 values\)"):
        integrated_gradients(model, torch.rand(4, 3), torch.zeros(1, 3))


def test_training_mode_batchnorm_names_the_layer_and_the_opt_in():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()

    with pytest.raises(ModelError, match=r"layer\(s\) 1 are in training mode.*allow_coupled"):
        integrated_gradients(model, torch.randn(4, 3))


def test_rows_coupled_without_batchnorm_are_found_by_the_probe():
    def batch_centred(x):
        # Subtracting the batch mean mixes rows, with no BatchNorm layer to find.
        return (x - x.mean(0, keepdim=True)).pow(2).sum(1)

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(batch_centred, torch.randn(3, 2), torch.zeros(1, 2))


def test_training_mode_dropout_is_caught_by_the_probe():
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5), nn.Linear(64, 1)).train()

    with pytest.raises(ModelError, match=r"model is random.*model\.eval\(\)"):
        integrated_gradients(model, torch.randn(3, 3))


def test_rows_coupled_where_row_0_cannot_show_it_are_found():
    class FeatureTimesBatchMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, x):
            return self.linear(x) + x[:, :1] * x[:, 1:2].mean()

    torch.manual_seed(22)
    x = torch.randn(6, 3)
    x[0, 0] = 0.0  # row 0's output ignores the batch mean

    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(FeatureTimesBatchMean().eval(), x, 0.0)


class CoupledFirstOutput(nn.Module):
    """Output 0 mixes rows through the batch mean; output 1 is huge and independent."""

    def __init__(self, huge: float = 1e6):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.huge = huge

    def forward(self, x):
        coupled = self.linear(x) + x[:, :1] * x[:, 1:2].mean()
        return torch.cat([coupled, torch.full_like(coupled, self.huge) + x[:, 2:]], dim=1)


def test_a_huge_other_output_does_not_hide_coupling():
    torch.manual_seed(25)
    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(CoupledFirstOutput(), torch.randn(6, 3), 0.0, target=0)


def test_an_infinite_output_on_row_0_does_not_switch_the_probe_off():
    def model(x):
        # log(0) = -inf on row 0, whose path points are all finite; rows interact.
        return torch.log(x[:, :1]) + x[:, 1:2] * x[:, 1:2].mean()

    x = torch.rand(6, 2) + 0.5
    x[0, 0] = 0.0
    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(model, x, 1.0)


@pytest.mark.parametrize("coupling", ["rolled by four", "batches over eight"])
def test_coupling_that_four_rows_cannot_show_is_found(coupling):
    def model(x):
        if coupling == "rolled by four":
            return x.sum(1, keepdim=True) * torch.roll(x, 4, dims=0)[:, :1]
        if x.shape[0] > 8:
            return x.sum(1, keepdim=True) - x.mean(0).sum()
        return x.sum(1, keepdim=True)

    torch.manual_seed(26)
    with pytest.raises(ModelError, match="rows interact"):
        integrated_gradients(model, torch.randn(12, 3), 0.0)


@pytest.mark.parametrize("shape, probed", [((2000, 5), 1024), ((20, 3, 100, 100), 4)])
def test_the_probe_runs_up_to_1024_rows_and_fewer_wide_ones(shape, probed):
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(1))
    model(torch.zeros(1, *shape[1:]))
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))

    with pytest.raises(ArgumentError, match="target 3 is out of range"):
        integrated_gradients(model, torch.randn(*shape), target=3)

    # The probe's first batch: the probed rows, a baseline and a path point, which select
    # the target before the later batches run.
    assert calls == [probed + 2]


def test_training_mode_rrelu_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.RReLU(), nn.Linear(8, 1)).train()
    with pytest.raises(ModelError, match=r"random layer\(s\) 1 \(dropout, RReLU\)"):
        integrated_gradients(model, torch.randn(5, 4), 0.0)


def test_allow_coupled_rows_compiles_with_training_mode_batchnorm():
    torch.manual_seed(27)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()

    attributions = integrated_gradients(model, torch.randn(4, 3), allow_coupled_rows=True,
                                        compile=True, n_steps=5)

    assert attributions.shape == (1, 4, 3)
    assert torch.isfinite(attributions).all()


@pytest.mark.parametrize("seed", range(6))
def test_training_mode_dropout_is_refused_by_name(seed):
    # A light dropout often leaves the probe's rows alone; the name never misses it.
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    with pytest.raises(ModelError, match=r"random layer\(s\) 0 \(dropout, RReLU\) are in"):
        integrated_gradients(model.train(), torch.randn(5, 4), 0.0)
    integrated_gradients(model.eval(), torch.randn(5, 4), 0.0)


@pytest.mark.parametrize("output", ["long", "bool", "complex", "empty", "detached", "constant"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_outputs_without_a_gradient_are_refused(output, compile):
    torch.manual_seed(23)
    linear = nn.Linear(4, 3)
    model = {
        "long": lambda x: (linear(x) > 0).long(),
        "bool": lambda x: linear(x) > 0,
        "complex": lambda x: torch.complex(linear(x), linear(x)),
        "empty": lambda x: linear(x)[:, :0],
        "detached": lambda x: linear(x).detach(),
        "constant": lambda x: torch.ones(x.shape[0], 1),
    }[output]
    target = None if output in ("empty", "constant") else 0
    message = {"long": "int64 outputs", "bool": "bool outputs", "complex": "complex64 outputs",
               "empty": "no outputs per row"}.get(output, "does not depend on its inputs")

    with pytest.raises(ModelError, match=message):
        integrated_gradients(model, torch.randn(5, 4), 0.0, target=target, compile=compile)


def test_allow_coupled_rows_runs_and_warns(caplog):
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()

    with caplog.at_level(logging.WARNING, logger="engine.core"):
        attributions = integrated_gradients(model, torch.randn(4, 3), allow_coupled_rows=True)

    assert attributions.shape == (1, 4, 3)
    assert torch.isfinite(attributions).all()
    assert "allow_coupled_rows=True" in caplog.text


@pytest.mark.parametrize("hoist", [True, False])
def test_allow_coupled_rows_leaves_the_running_statistics_alone(hoist):
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    model(torch.randn(8, 3))  # statistics of one real batch
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}

    integrated_gradients(model, torch.randn(4, 3), allow_coupled_rows=True, hoist=hoist)

    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_eval_mode_batchnorm_is_accepted():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).eval()
    x = torch.randn(4, 3)

    actual = integrated_gradients(model, x, n_steps=10)

    assert relative_error(actual[0], captum_ig(model, x, None, n_steps=10)) <= 1e-5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cpu_model_with_cuda_inputs_names_both_devices():
    with pytest.raises(ArgumentError, match=r"model is on cpu .* inputs are on cuda"):
        integrated_gradients(nn.Linear(3, 1), torch.randn(2, 3, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_every_argument_form_runs_on_cuda_like_on_cpu():
    torch.manual_seed(19)
    model = MultiDimOutput().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    baselines = torch.randn(2, 4, 3, dtype=torch.float64)
    target = [(1, 0), (0, 2), (1, 1), (0, 0)]

    on_cpu = integrated_gradients(model, x, baselines, target=target, n_steps=7,
                                  delta_tolerance=1e-3, error_estimate=True)
    on_gpu = integrated_gradients(model.cuda(), x.cuda(), baselines.cuda(), target=target,
                                  n_steps=7, delta_tolerance=1e-3, error_estimate=True)

    torch.testing.assert_close(on_gpu.attributions.cpu(), on_cpu.attributions,
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(on_gpu.n_steps.cpu(), on_cpu.n_steps)


def test_a_model_that_rejects_the_input_shape_is_named_in_one_line():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))

    with pytest.raises(ModelError, match=r"batch of \d+ points \(rows, baselines or points "
                                         r"between them\) each of shape \(5,\): mat1 and mat2"
                       ) as info:
        integrated_gradients(model, torch.randn(3, 5))

    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["a", 1.0])
def test_a_target_that_is_not_an_index_is_refused(target):
    with pytest.raises(ArgumentError, match="target must be an int"):
        integrated_gradients(nn.Linear(3, 2), torch.randn(2, 3), target=target)


@pytest.mark.parametrize(
    ("method", "n_steps"),
    [("gausslegendre", 2049), ("riemann_middle", 1_000_001), ("gausslegendre", 10**9)],
)
def test_too_many_steps_are_refused_before_any_work(method, n_steps):
    # Gauss-Legendre nodes cost n^3 to compute (hours at 30,000 nodes); a Riemann rule
    # with 10^9 nodes would allocate gigabytes before the first chunk.
    model = mlp(4, 8, 1)
    with pytest.raises(ArgumentError, match=f"n_steps={n_steps} is too large for method"):
        integrated_gradients(model, torch.rand(2, 4, dtype=torch.float64),
                             torch.zeros(1, 4, dtype=torch.float64), n_steps=n_steps,
                             method=method)


def test_adaptive_steps_stop_at_the_largest_rule():
    from engine.adaptive import _check_adaptive
    from engine.quadrature import MAX_GAUSS_LEGENDRE_STEPS, quadrature_rule

    rule = quadrature_rule("gausslegendre", 200)
    # The default ceiling (16 x 200 nodes) is cut to the largest rule, or to half of it
    # when the error estimate doubles the last level.
    assert _check_adaptive(1e-3, None, rule, False)[1] == MAX_GAUSS_LEGENDRE_STEPS
    assert _check_adaptive(1e-3, None, rule, True)[1] == MAX_GAUSS_LEGENDRE_STEPS // 2
    with pytest.raises(ArgumentError, match="max_steps=4096 is too large"):
        _check_adaptive(1e-3, 4096, rule, False)
    with pytest.raises(ArgumentError, match="n_steps=2000 is too large.*error_estimate"):
        _check_adaptive(None, None, quadrature_rule("gausslegendre", 2000), True)


def test_a_model_that_cannot_be_called_is_named():
    with pytest.raises(ArgumentError, match="forward_func must be a model or function"):
        integrated_gradients(42, torch.rand(3, 5))


def test_a_memory_budget_written_as_a_whole_float_is_taken_and_a_fraction_is_not():
    model, x = mlp(5, 16, 1, torch.float32), torch.rand(6, 5)

    got = integrated_gradients(model, x, 0.0, n_steps=8, memory_budget=1e9)

    torch.testing.assert_close(got, integrated_gradients(model, x, 0.0, n_steps=8))
    with pytest.raises(ArgumentError, match="memory_budget must be a positive number"):
        integrated_gradients(model, x, 0.0, memory_budget=1.5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_with_float64_inputs_is_refused_not_ignored(precision):
    model, x = mlp(5, 16, 1), torch.rand(6, 5, dtype=torch.float64)

    with pytest.raises(ArgumentError, match="the inputs are float64"):
        integrated_gradients(model, x, 0.0, precision=precision)


def test_a_one_dimensional_input_gets_a_hint_about_rows():
    with pytest.raises(ModelError, match=r"rows first: one row of F features is x.unsqueeze\(0\)"):
        integrated_gradients(nn.Linear(5, 1), torch.rand(5), 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1.0])
def test_the_finiteness_check_sees_every_value_in_any_layout(dtype, value):
    from engine.step import all_finite

    base = torch.zeros(4, 6, dtype=dtype)
    base[3, 5] = value
    finite = value == 1.0
    # Contiguous, transposed, expanded (stride 0), sliced, and with autograd attached.
    layouts = [base, base.t(), base[3:4, :].expand(5, 6), base[:, 5], base.clone().requires_grad_()]
    assert [all_finite(t) for t in layouts] == [finite] * len(layouts)
    assert all_finite(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("layout", ["sparse input", "sparse baseline", "csr input", "mkldnn input",
                                    "meta input", "nested input", "quantized baseline",
                                    "float8 input"])
def test_tensors_without_dense_values_are_refused_by_name(layout):
    x, base = torch.rand(3, 4), torch.zeros(1, 4)
    if layout == "nested input":
        x, expected = torch.nested.nested_tensor(list(x)), "inputs is a nested tensor"
    elif layout == "quantized baseline":
        base = torch.quantize_per_tensor(base, 0.1, 0, torch.quint8)
        expected = "baselines is a quantized tensor"
    elif layout == "float8 input":
        x, expected = x.to(torch.float8_e4m3fn), "inputs has dtype torch.float8_e4m3fn"
    elif layout == "sparse input":
        x, expected = x.to_sparse(), "inputs is a sparse_coo tensor"
    elif layout == "sparse baseline":
        base, expected = base.to_sparse(), "baselines is a sparse_coo tensor"
    elif layout == "csr input":
        x, expected = x.to_sparse_csr(), "inputs is a sparse_csr tensor"
    elif layout == "mkldnn input":
        x, expected = x.to_mkldnn(), "inputs is a mkldnn tensor"
    else:
        x, expected = torch.empty(3, 4, device="meta"), "inputs is on the meta device"

    with pytest.raises(ArgumentError, match=expected):
        integrated_gradients(nn.Linear(4, 1), x, base)


@pytest.mark.parametrize("kind", ["masked input", "fake baseline", "vmap", "grad"])
def test_tensor_subclasses_and_transforms_are_refused_by_name(kind):
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    net, x, base = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)), \
        torch.rand(3, 4), torch.zeros(1, 4)

    with pytest.raises(ArgumentError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MaskedTensor's prototype warning
        if kind == "masked input":
            from torch.masked import masked_tensor

            integrated_gradients(net, masked_tensor(x, torch.ones_like(x, dtype=torch.bool)),
                                 base)
        elif kind == "fake baseline":
            with FakeTensorMode() as mode:
                fake = mode.from_tensor(base)
            integrated_gradients(net, x, fake)
        elif kind == "vmap":
            torch.func.vmap(lambda row: integrated_gradients(net, row.unsqueeze(0), base))(x)
        else:
            torch.func.grad(lambda rows: integrated_gradients(net, rows, base).sum())(x)

    expected = {
        "masked input": "inputs is a MaskedTensor, a tensor subclass with its own operations",
        "fake baseline": "baselines is a FakeTensor, a tensor subclass with its own operations",
        "vmap": "the engine is called inside a torch.func transform",
        "grad": "the engine is called inside a torch.func transform",
    }[kind]
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize("wrapped", ["closure weight", "background", "unrelated"])
def test_any_torch_func_transform_around_the_call_is_refused(wrapped):
    from engine import expected_gradients

    torch.manual_seed(1)
    x, weight = torch.rand(3, 4), torch.rand(4, 1)

    def call(value):
        if wrapped == "closure weight":
            return integrated_gradients(lambda z: z @ value, x).sum()
        if wrapped == "background":
            return expected_gradients(lambda z: z @ weight, x, value, n_samples=2).sum()
        return integrated_gradients(lambda z: z @ weight, x).sum() * value.sum()

    value = weight if wrapped == "closure weight" else torch.rand(3, 4)
    with pytest.raises(ArgumentError, match="^the engine is called inside a torch.func "):
        torch.func.grad(call)(value)


def test_a_plain_tensor_subclass_and_a_parameter_are_inputs_like_any_other():
    class Tagged(torch.Tensor):
        pass

    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)), torch.rand(3, 4)
    reference = integrated_gradients(net, x, torch.zeros(1, 4), n_steps=8)

    for inputs in (x.as_subclass(Tagged), nn.Parameter(x.clone())):
        got = integrated_gradients(net, inputs, torch.zeros(1, 4), n_steps=8)
        torch.testing.assert_close(got.as_subclass(torch.Tensor), reference, rtol=0, atol=0)


def test_numpy_integers_are_accepted_as_sizes():
    import numpy as np

    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), torch.rand(5, 4)
    reference = integrated_gradients(net, x, torch.zeros(1, 4), n_steps=8)

    actual = integrated_gradients(net, x, torch.zeros(1, 4), n_steps=np.int64(8),
                                  internal_batch_size=np.int64(7),
                                  memory_budget=np.int64(1 << 20))

    torch.testing.assert_close(actual, reference, rtol=1e-6, atol=1e-7)


def test_a_numpy_integer_max_steps_is_accepted():
    import numpy as np

    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), torch.rand(5, 4)
    options = dict(n_steps=2, delta_tolerance=1e-9)

    actual = integrated_gradients(net, x, torch.zeros(1, 4), max_steps=np.int64(8), **options)
    reference = integrated_gradients(net, x, torch.zeros(1, 4), max_steps=8, **options)

    torch.testing.assert_close(actual.attributions, reference.attributions, rtol=0, atol=0)
    assert actual.n_steps.max() == 8


def test_inputs_in_another_dtype_than_the_weights_get_the_conversion_as_a_hint():
    # Before: torch's "mat1 and mat2 must have the same dtype" alone.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))

    with pytest.raises(ModelError, match=r"\(the inputs are float64 and the model's weights "
                                         r"float32: convert one to the other, "
                                         r"model.to\(torch.float64\) or x.to\(torch.float32\)\)"):
        integrated_gradients(net, torch.rand(4, 5, dtype=torch.float64))
    # The same model in float64 runs.
    assert integrated_gradients(net.double(), torch.rand(4, 5, dtype=torch.float64)).dtype \
        == torch.float64


def test_the_dtype_hint_is_only_given_where_the_dtypes_are_the_error():
    class Converts(nn.Module):  # takes any float input itself, fails on its width
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 1)

        def forward(self, x):
            return self.layer(x.float())

    class Mixed(nn.Module):  # one float64 layer the inputs never reach
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 1).double()
            self.body = nn.Linear(5, 1)

        def forward(self, x):
            return self.body(x.float()) @ torch.ones(2, 1)

    x = torch.rand(4, 5, dtype=torch.float64)
    for model in (Converts(), Mixed()):
        with pytest.raises(ModelError) as raised:
            integrated_gradients(model, x)
        assert "convert one to the other" not in str(raised.value)


def _reciprocal(x):
    # Finite everywhere but where the first feature is 0.
    return 1.0 / x[:, 0] + x[:, 1]


@pytest.mark.parametrize("route", ["delta", "adaptive", "drop-in", "expected"])
def test_non_finite_outputs_at_the_ends_of_the_path_are_named(route):
    # Gauss-Legendre's nodes never reach the baseline, so the attributions were finite and
    # the delta inf (adaptive steps refined to max_steps for nothing), as in Captum.
    x = torch.tensor([[1.0, 2.0], [0.5, 1.0], [2.0, 1.0]])
    base = torch.tensor([[0.0, 0.0]])
    calls = {
        "delta": lambda: integrated_gradients(_reciprocal, x, base, n_steps=8,
                                              return_convergence_delta=True),
        "adaptive": lambda: integrated_gradients(_reciprocal, x, base, delta_tolerance=1e-3),
        "drop-in": lambda: engine.IntegratedGradients(_reciprocal).attribute(
            x, base.expand(3, 2), n_steps=8, return_convergence_delta=True),
        "expected": lambda: expected_gradients(_reciprocal, x, base.expand(4, 2), n_samples=4,
                                               return_convergence_delta=True),
    }
    end = "a background sample" if route == "expected" else "its baseline"

    with pytest.raises(NonFiniteOutputError, match=rf"\) at {end}, an end of the path, for "
                                                   r"row\(s\) 0, 1, 2: F\(x\) - F"):
        calls[route]()


def test_huge_finite_outputs_at_the_background_samples_are_not_refused():
    # The samples' outputs were checked after adding them up, which overflowed float64.
    def huge(x):
        return 1.5e308 * torch.tanh(x.sum(1) + 5.0)

    x = torch.rand(4, 3, dtype=torch.float64)
    attributions, delta = expected_gradients(huge, x, torch.zeros(5, 3, dtype=torch.float64),
                                             n_samples=4, return_convergence_delta=True)

    assert torch.isfinite(attributions).all() and delta.shape == (4,)


def test_a_non_finite_output_at_the_input_itself_names_that_row():
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])

    with pytest.raises(NonFiniteOutputError, match=r"at the input itself, an end of the path, "
                                                   r"for row\(s\) 1:"):
        integrated_gradients(_reciprocal, x, torch.ones(1, 2), n_steps=8,
                             return_convergence_delta=True)


def test_an_fp16_overflow_names_the_precision():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(4, 5) * 1e5  # finite in float32, beyond float16's range

    assert torch.isfinite(integrated_gradients(net, x, 0.0, target=0)).all()
    with pytest.raises(NonFiniteOutputError, match=r"non-finite outputs.*precision='fp16' "
                                                  r"overflows beyond 65,504"):
        integrated_gradients(net, x, 0.0, target=0, precision="fp16", hoist=False)


@pytest.mark.parametrize("hoist", [True, "affine", False], ids=["hoisted", "affine", "plain"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_an_input_minus_its_baseline_beyond_the_dtype_is_refused_naming_the_row(hoist,
                                                                                adaptive):
    # 3e38 - (-3e38) is inf in float32. The saturating model keeps every output on the
    # path finite, so before, every path returned nan for row 2, as Captum does (and the
    # adaptive path, which multiplies in float64, a number from a path of inf points).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    x = torch.rand(4, 3)
    x[2, 0] = 3e38
    baselines = torch.zeros(1, 3)
    baselines[0, 0] = -3e38
    extra = {"delta_tolerance": 1.0} if adaptive else {}

    with pytest.raises(ArgumentError, match=r"^inputs minus baselines overflow float32 "
                                            r"\(largest value 3\.4e\+38\) in row\(s\) 2: "
                                            r".*pass the inputs and baselines as float64"):
        integrated_gradients(net, x, baselines, hoist=hoist, **extra)
    # In float64 the same numbers are fine.
    assert torch.isfinite(integrated_gradients(net.double(), x.double(), baselines.double(),
                                               hoist=hoist)).all()


def test_per_row_baselines_name_only_the_rows_whose_difference_overflows():
    x = torch.ones(5, 2)
    x[3, 1] = 3e38
    baselines = torch.zeros(2, 5, 2)
    baselines[1, 3, 1] = -3e38  # row 3 against its second baseline
    baselines[0, 1, 1] = -3e38  # against row 1's 1.0: finite

    with pytest.raises(ArgumentError, match=r"overflow float32 .* in row\(s\) 3: "):
        integrated_gradients(nn.Linear(2, 1), x, baselines)


class MixedDtypes(nn.Module):
    def forward(self, halves, singles):
        return (halves.double() * 2).sum(1) + torch.tanh(singles.double() / 1e38).sum(1)


def test_the_overflowing_input_of_a_tuple_is_named_with_its_own_dtype():
    halves = torch.ones(3, 2, dtype=torch.float16)
    singles = torch.ones(3, 2)
    singles[2, 0] = 3e38
    baselines = (torch.zeros(1, 2, dtype=torch.float16), torch.full((1, 2), -3e38))

    with pytest.raises(ArgumentError, match=r"^inputs\[1\] minus baselines\[1\] overflow "
                                            r"float32 \(largest value 3\.4e\+38\) in "
                                            r"row\(s\) 2: "):
        integrated_gradients(MixedDtypes(), (halves, singles), baselines, hoist=False)


def half_rows(large: float) -> torch.Tensor:
    """Three float16 rows of 100s, with ``large`` at row 1, feature 0."""
    x = torch.full((3, 2), 100.0, dtype=torch.float16)
    x[1, 0] = large
    return x


def saturating(points):
    return torch.tanh(points.float() / 1e5).sum(1)


def test_the_drop_in_class_names_float16_where_the_half_inputs_difference_overflows():
    # Its results are float32, but the path is formed in the inputs' float16.
    from engine import IntegratedGradients

    x = half_rows(40000.0)
    baselines = torch.zeros_like(x)
    baselines[1, 0] = -40000.0

    with pytest.raises(ArgumentError, match=r"^inputs minus baselines overflow float16 "
                                            r"\(largest value 65,504\) in row\(s\) 1: .*"
                                            r"as float32"):
        IntegratedGradients(saturating).attribute(x, baselines)


def half_sum(points):
    return (2 * points.float()).sum(1)  # float32 outputs: only the attributions overflow


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_an_attribution_beyond_float16_is_refused_naming_the_row(adaptive):
    x = half_rows(60000.0)  # attribution 120,000, beyond float16's 65,504
    baselines = torch.zeros(1, 2, dtype=torch.float16)
    extra = {"delta_tolerance": 1.0} if adaptive else {}

    with pytest.raises(NonFiniteError, match=r"^the attributions of row\(s\) 1 overflow "
                                             r"float16 \(largest value 65,504\): pass the "
                                             r"inputs and baselines as float32"):
        integrated_gradients(half_sum, x, baselines, **extra)


def test_an_expected_gradient_beyond_float16_is_refused_naming_the_row():
    from engine import expected_gradients

    x = half_rows(60000.0)
    background = torch.zeros(4, 2, dtype=torch.float16)

    with pytest.raises(NonFiniteError, match=r"row\(s\) 1 overflow float16 .*: pass the "
                                             r"inputs and background as float32"):
        expected_gradients(half_sum, x, background, n_samples=8)


def test_an_input_minus_its_background_beyond_the_dtype_is_named_as_such():
    # Before, the sums of these factors were blamed on the model's gradient.
    from engine import expected_gradients

    x = half_rows(40000.0)
    background = torch.zeros(2, 2, dtype=torch.float16)
    background[1, 0] = -40000.0

    with pytest.raises(ArgumentError, match=r"^inputs minus background overflow float16 "
                                            r"\(largest value 65,504\) in row\(s\) 1: "):
        expected_gradients(saturating, x, background, n_samples=4)


def test_the_drop_in_class_gives_half_inputs_float32_attributions_that_do_not_overflow():
    from engine import IntegratedGradients

    x = half_rows(60000.0)

    attributions = IntegratedGradients(half_sum).attribute(x, torch.zeros_like(x))

    assert attributions.dtype == torch.float32
    assert attributions[1, 0].item() == pytest.approx(120000.0, rel=1e-3)


@pytest.mark.parametrize(("baseline", "shown"), [
    (1e6, "baselines 1000000.0 is beyond"),
    (10**400, "baselines an integer of 401 digits is beyond"),
    (torch.full((1, 3), 100000), "baselines hold integers beyond"),
], ids=["float", "huge-int", "integer-tensor"])
def test_a_baseline_beyond_the_inputs_dtype_is_named_with_the_range(baseline, shown):
    # A number raised torch's "value cannot be converted to type c10::Half without
    # overflow"; integers became inf and were called "nan or inf".
    x = torch.rand(4, 3, dtype=torch.float16)

    with pytest.raises(ArgumentError, match=rf"^{shown} the inputs' float16 range \(largest "
                                            r"value 65,504\): .*as float32"):
        integrated_gradients(half_sum, x, baseline)


def test_baselines_within_the_inputs_dtype_are_taken_as_they_are():
    def gentle(points):
        return (points.float() * 1e-3).sum(1)  # attributions of at most about 65

    x = torch.rand(4, 3, dtype=torch.float16)

    for baseline in (65504.0, -2, torch.full((1, 3), 60000)):
        assert torch.isfinite(integrated_gradients(gentle, x, baseline).float()).all()
    with pytest.raises(ArgumentError, match=r"^baselines hold nan or inf"):
        integrated_gradients(gentle, x, float("inf"))


def test_a_shared_non_finite_baseline_next_to_a_per_row_one_names_no_row():
    class Two(nn.Module):
        def forward(self, x, v):
            return x.sum(1, keepdim=True) + v.sum((1, 2)).unsqueeze(1)

    shared = torch.zeros(1, 4)
    shared[0, 2] = float("nan")

    with pytest.raises(ArgumentError, match=r"^baselines\[0\] hold nan or inf: baselines"):
        integrated_gradients(Two(), (torch.rand(5, 4), torch.rand(5, 2, 3)),
                             (shared, torch.zeros(1, 5, 2, 3)))


@pytest.mark.parametrize("options", [{}, {"hoist": False}, {"hoist": False, "compile": True}])
def test_an_input_the_model_ignores_gets_zero_attributions(options):
    class FirstOnly(nn.Module):
        def forward(self, x, ignored):
            return (x ** 2).sum(1, keepdim=True)

    x, ignored = torch.rand(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)

    used, unused = integrated_gradients(FirstOnly(), (x, ignored), (0.0, 0.0), n_steps=16,
                                        **options)

    assert torch.equal(unused, torch.zeros(1, 3, 2, dtype=torch.float64))
    # Completeness on the input that is used: x^2 summed.
    torch.testing.assert_close(used[0].sum(1), (x ** 2).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["sparse", "meta", "complex", "quantized"])
def test_a_background_without_real_dense_values_is_refused(kind):
    from engine.expected import expected_gradients

    background = torch.rand(5, 4)
    expected = {"sparse": "background is a sparse_coo tensor",
                "meta": "background is on the meta device",
                "complex": "background has dtype torch.complex64",
                "quantized": "background is a quantized tensor"}[kind]
    if kind == "sparse":
        background = background.to_sparse()
    elif kind == "meta":
        background = torch.empty(5, 4, device="meta")
    elif kind == "complex":
        background = background.to(torch.complex64)
    else:
        background = torch.quantize_per_tensor(background, 0.1, 0, torch.quint8)

    with pytest.raises(ArgumentError, match=expected):
        expected_gradients(nn.Linear(4, 1), torch.rand(3, 4), background)
