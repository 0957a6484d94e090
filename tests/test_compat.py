"""engine.IntegratedGradients as a drop-in for Captum's, on Captum's own test models.

The models and the shared attribution test configuration come from the installed
``captum.testing`` package. Every scenario runs through Captum's class and ours with the
same arguments and seeds; ours must give Captum's shapes, types and numbers (to float32
rounding: Captum rounds its step weights to float32, the engine does not).
"""

import importlib
import random

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import NoiseTunnel
from captum.testing.helpers.basic_models import (
    BasicModel,
    BasicModel2,
    BasicModel3,
    BasicModel4_MultiArgs,
    BasicModel5_MultiArgs,
    BasicModel6_MultiTensor,
    BasicModel_ConvNet,
    BasicModel_MultiLayer,
)

from engine import IntegratedGradients
from engine.errors import ArgumentError
from tests.test_core import relative_error


def load_captum_config():
    """Captum's shared attribution test cases; its import reseeds every generator, undone."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cudnn_deterministic = torch.backends.cudnn.deterministic
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return importlib.import_module("captum.testing.attr.helpers.test_config").config
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.backends.cudnn.deterministic = cudnn_deterministic
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


captum_config = load_captum_config()

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid",
           "gausslegendre")

IG_CONFIGS = [
    case for case in captum_config
    if CaptumIG in case["algorithms"] and "layer" not in case
]


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def assert_same(ours, theirs, tolerance):
    assert type(ours) is type(theirs)
    for mine, reference in zip(as_tuple(ours), as_tuple(theirs)):
        assert mine.shape == reference.shape
        assert mine.dtype == reference.dtype
        difference = float((mine.double() - reference.double()).abs().max())
        assert difference <= tolerance * (1.0 + float(reference.double().abs().max()))


def run_both(attribute, make_class, seed=0, **kwargs):
    results = []
    for cls in (CaptumIG, IntegratedGradients):
        torch.manual_seed(seed)
        results.append(attribute(make_class(cls), **kwargs))
    return results


def test_captum_configs_cover_every_target_form():
    names = {case["name"] for case in IG_CONFIGS}

    assert {"basic_multiple_tuple_target", "basic_tensor_multi_target",
            "basic_multi_input_multi_target_nt"} <= names


@pytest.mark.filterwarnings("ignore:Internal batch size cannot be less")
@pytest.mark.parametrize("case", IG_CONFIGS, ids=[c["name"] for c in IG_CONFIGS])
def test_captum_shared_config_gives_captums_answer(case):
    model, args = case["model"], dict(case["attribute_args"])

    def attribute(explainer):
        if case.get("noise_tunnel"):
            return NoiseTunnel(explainer).attribute(**args)
        return explainer.attribute(**args)

    theirs, ours = run_both(attribute, lambda cls: cls(model))

    # float32 models: Captum's float32 step weights against float64 ones.
    assert_same(ours, theirs, 1e-5)


PLAIN_CONFIGS = [case for case in IG_CONFIGS if not case.get("noise_tunnel")]


@pytest.mark.parametrize("case", PLAIN_CONFIGS, ids=[c["name"] for c in PLAIN_CONFIGS])
def test_captum_config_rows_batched_equal_rows_alone(case):
    model, args = case["model"], dict(case["attribute_args"])
    inputs, target = as_tuple(args.pop("inputs")), args.pop("target")
    baselines = args.pop("baselines", None)
    explainer = IntegratedGradients(model)

    together = as_tuple(explainer.attribute(inputs, baselines, target=target, **args))

    for row in range(inputs[0].shape[0]):
        row_target = target
        if isinstance(target, list) or (torch.is_tensor(target) and target.numel() > 1):
            row_target = [target[row]] if isinstance(target, list) else target[row : row + 1]
        row_base = None if baselines is None else baselines[row : row + 1]
        row_args = tuple(
            a[row : row + 1] if torch.is_tensor(a) and a.dim() > 0 else a
            for a in args.get("additional_forward_args", ()) or ()
        )
        alone = as_tuple(explainer.attribute(
            tuple(x[row : row + 1] for x in inputs), row_base, target=row_target,
            additional_forward_args=row_args or None, n_steps=args.get("n_steps", 50),
        ))
        for joint, single in zip(together, alone):
            torch.testing.assert_close(joint[row : row + 1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_two_variable_paper_models_match_captum_and_the_known_values(method, multiply_by_inputs):
    inputs = (torch.tensor([3.0]), torch.tensor([1.0]))
    baselines = (torch.tensor([0.0]), torch.tensor([0.0]))

    for model in (BasicModel2(), BasicModel3()):
        def attribute(explainer, model=model):
            return explainer.attribute(inputs, baselines, method=method, n_steps=500,
                                       return_convergence_delta=True)

        theirs, ours = run_both(
            attribute, lambda cls, model=model: cls(model, multiply_by_inputs=multiply_by_inputs)
        )
        assert_same(ours[0], theirs[0], 1e-5)
        assert ours[1].shape == (1,)
        # The paper's example: attributions 1.5 and -0.5 (0.5 and -0.5 without the inputs).
        expected = (1.5 if multiply_by_inputs else 0.5, -0.5)
        for attribution, value in zip(ours[0], expected):
            assert abs(float(attribution) - value) <= 0.05


@pytest.mark.parametrize("method", METHODS)
def test_delta_equals_captums_own_convergence_delta(method):
    torch.manual_seed(20)
    model = BasicModel_MultiLayer()
    x = torch.randn(5, 3)
    explainer = IntegratedGradients(model)

    attributions, delta = explainer.attribute(x, target=0, method=method, n_steps=300,
                                              return_convergence_delta=True)
    external = explainer.compute_convergence_delta(attributions, torch.zeros(5, 3), x, target=0)

    assert delta.shape == (5,)
    torch.testing.assert_close(delta, external, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "inputs", "baselines", "forward_args"),
    [
        (BasicModel(), torch.tensor([1.0]), torch.tensor([0.0]), None),
        (BasicModel(), torch.tensor([-1.0]), 0.00001, None),
        (BasicModel4_MultiArgs(), (torch.tensor([[1.5, 2.0, 34.3]]),
                                   torch.tensor([[3.0, 3.5, 23.2]])),
         (0.0, torch.zeros(1, 3)), torch.arange(1.0, 4.0).reshape(1, 3)),
        (BasicModel4_MultiArgs(), (torch.tensor([[1.5, 2.0, 34.3], [3.4, 1.2, 2.0]]),
                                   torch.tensor([[3.0, 3.5, 23.2], [2.3, 1.2, 0.3]])),
         (torch.zeros(2, 3), 0.0), (torch.arange(1.0, 7.0).reshape(2, 3), 1)),
        (BasicModel5_MultiArgs(), (torch.tensor([[1.5, 2.0, 34.3], [3.4, 1.2, 2.0]]),
                                   torch.tensor([[3.0, 3.5, 23.2], [2.3, 1.2, 0.3]])),
         (torch.zeros(1, 3), 0.00001), ([2, 3], 1)),
        (BasicModel6_MultiTensor(), (torch.tensor([[1.5, 2.0, 3.3]]),
                                     torch.tensor([[3.0, 3.5, 2.2]])), None, None),
    ],
    ids=["univariable", "univariable-scalar-base", "multi-args-tensor", "multi-args-batched",
         "multi-args-list", "multi-tensor"],
)
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_captum_basic_scenarios_match(model, inputs, baselines, forward_args, method):
    def attribute(explainer):
        return explainer.attribute(inputs, baselines, additional_forward_args=forward_args,
                                   method=method, n_steps=500, return_convergence_delta=True)

    theirs, ours = run_both(attribute, lambda cls: cls(model))

    assert_same(ours[0], theirs[0], 1e-5)
    assert_same(ours[1], theirs[1], 1e-4)
    assert float(ours[1].abs().max()) <= 0.07


@pytest.mark.parametrize("internal_batch_size", [None, 1, 10, 20])
def test_internal_batch_size_does_not_change_captums_answer(internal_batch_size):
    torch.manual_seed(21)
    model = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])

    ours = IntegratedGradients(model).attribute(x, target=0, n_steps=100,
                                                internal_batch_size=internal_batch_size)
    theirs = CaptumIG(model).attribute(x, target=0, n_steps=100)

    assert_same(ours, theirs, 1e-5)


@pytest.mark.parametrize("internal_batch_size", [0, -3])
def test_internal_batch_size_below_one_warns_and_runs_like_captum(internal_batch_size):
    model = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])

    with pytest.warns(UserWarning, match="one step of every row") as caught:
        ours = IntegratedGradients(model).attribute(x, target=0,
                                                    internal_batch_size=internal_batch_size)
    theirs = CaptumIG(model).attribute(x, target=0)

    assert_same(ours, theirs, 1e-5)
    assert caught[0].filename == __file__


@pytest.mark.parametrize(("baselines", "dtype"), [
    (None, torch.float32),
    (1, torch.float32),
    (torch.tensor([[1, 0, 2]]), torch.float32),
    (torch.tensor([[0.5, 0.0, 1.0]], dtype=torch.float64), torch.float64),
])
def test_integer_inputs_are_explained_in_captums_floating_dtype(baselines, dtype):
    model = BasicModel_MultiLayer().to(dtype)
    x = torch.tensor([[3, 2, 1], [0, 1, 4], [2, 2, 2]])

    theirs, ours = run_both(lambda explainer: explainer.attribute(x, baselines, target=0),
                            lambda cls: cls(model))
    # Captum runs the model on the integer rows themselves for the delta, and fails there.
    _, delta = IntegratedGradients(model).attribute(x, baselines, target=0,
                                                    return_convergence_delta=True)

    assert ours.dtype == dtype
    assert_same(ours, theirs, 1e-5)
    assert float(delta.abs().max()) < 1e-3
    assert x.dtype == torch.int64  # the caller's tensor is left as it was


def test_integer_inputs_in_a_tuple_beside_floating_ones():
    model = BasicModel6_MultiTensor()
    inputs = (torch.tensor([[3, 1], [0, 2]]), torch.tensor([[0.5, 1.5], [2.0, 0.1]]))

    theirs, ours = run_both(lambda explainer: explainer.attribute(inputs),
                            lambda cls: cls(model))

    assert_same(ours, theirs, 1e-5)
    assert ours[0].dtype == torch.float32


class _MixedDtypes(torch.nn.Module):
    def forward(self, first, second):
        return first.sum(1) + 2.0 * second.double().sum(1)


def test_delta_of_mixed_dtype_inputs_has_the_promoted_dtype_like_captums():
    inputs = (torch.tensor([[0.5, 1.0], [2.0, 0.3]]),
              torch.tensor([[1.5, 0.1], [0.2, 0.4]], dtype=torch.float64))

    theirs, ours = run_both(
        lambda explainer: explainer.attribute(inputs, return_convergence_delta=True),
        lambda cls: cls(_MixedDtypes()),
    )

    assert ours[1].dtype == theirs[1].dtype == torch.float64
    assert_same(ours[0], theirs[0], 1e-6)


@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
def test_a_narrower_floating_baseline_is_widened_like_captums_path(shared):
    torch.manual_seed(31)
    model = BasicModel_MultiLayer().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    base = torch.randn(1 if shared else 4, 3)  # float32

    theirs, ours = run_both(lambda explainer: explainer.attribute(x, base, target=0),
                            lambda cls: cls(model))
    # Captum runs the model on the float32 baselines for the delta, and fails there; ours
    # is the delta of the same baselines given in float64.
    _, delta = IntegratedGradients(model).attribute(x, base, target=0,
                                                    return_convergence_delta=True)
    _, widened = IntegratedGradients(model).attribute(x, base.double(), target=0,
                                                      return_convergence_delta=True)

    assert ours.dtype == theirs.dtype == torch.float64
    assert_same(ours, theirs, 1e-6)
    assert torch.equal(delta, widened)
    assert base.dtype == torch.float32  # the caller's tensor is left as it was


def test_n_steps_as_a_zero_dimensional_tensor_like_captum():
    torch.manual_seed(32)
    model = BasicModel_MultiLayer()
    x = torch.randn(3, 3)

    theirs, ours = run_both(
        lambda explainer: explainer.attribute(x, target=1, n_steps=torch.tensor(10)),
        lambda cls: cls(model),
    )

    assert_same(ours, theirs, 1e-5)
    with pytest.raises(ArgumentError, match="n_steps"):
        IntegratedGradients(model).attribute(x, target=1, n_steps=torch.tensor([10]))


def test_an_empty_tuple_target_is_no_index_as_in_captum():
    torch.manual_seed(23)
    linear = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)

    theirs, ours = run_both(lambda explainer: explainer.attribute(x, target=()),
                            lambda cls: cls(lambda rows: linear(rows).squeeze(1)))

    assert_same(ours, theirs, 1e-6)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("nt_samples_batch_size", [None, 1, 2, 3])
def test_noise_tunnel_wraps_ours_like_captums(nt_type, nt_samples_batch_size):
    model = BasicModel_MultiLayer()
    inputs = (torch.tensor([[1.5, 2.1, 1.9], [0.5, 0.0, 0.7], [1.5, 2.1, 1.1]]),
              torch.tensor([[0.3, 1.9, 2.4], [0.5, 0.6, 2.1], [1.2, 2.1, 0.2]]))

    def attribute(explainer):
        return NoiseTunnel(explainer).attribute(
            inputs, nt_type=nt_type, nt_samples=5, stdevs=0.01, target=0, n_steps=200,
            nt_samples_batch_size=nt_samples_batch_size, return_convergence_delta=True,
        )

    theirs, ours = run_both(attribute, lambda cls: cls(model), seed=22)

    assert_same(ours[0], theirs[0], 1e-4)
    assert ours[1].shape == theirs[1].shape == (15,)


def test_noise_tunnel_without_multiplying_by_inputs():
    model = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])

    plain = NoiseTunnel(IntegratedGradients(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=5, stdevs=0.0, target=0, n_steps=200)
    averaged = NoiseTunnel(IntegratedGradients(model, multiply_by_inputs=False)).attribute(
        x, nt_type="smoothgrad", nt_samples=5, stdevs=0.0, target=0, n_steps=200)

    torch.testing.assert_close(averaged * x, plain, rtol=1e-5, atol=1e-6)


def test_softmax_convnet_per_row_targets_match_captum():
    torch.manual_seed(23)
    model = BasicModel_ConvNet().eval()
    x = torch.randn(4, 1, 10, 10)
    target = torch.tensor([1, 3, 5, 7])
    # Its default initialisation leaves the softmax flat: attributions near 1e-9 would be
    # float32 rounding noise. Unit-scale weights give attributions to compare.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0)

    ours = IntegratedGradients(model).attribute(x, target=target, n_steps=40)
    theirs = CaptumIG(model).attribute(x, target=target, n_steps=40)

    assert float(theirs.abs().max()) > 1e-2
    assert relative_error(ours, theirs) <= 1e-5


def test_multiplies_by_inputs_and_delta_support_are_reported():
    assert IntegratedGradients(BasicModel()).multiplies_by_inputs is True
    assert IntegratedGradients(BasicModel(), multiply_by_inputs=False).multiplies_by_inputs is False
    assert IntegratedGradients(BasicModel()).has_convergence_delta()


def test_baseline_of_neither_captum_shape_is_refused():
    with pytest.raises(ArgumentError, match=r"baselines has shape \(2, 3\): expected \(4, 3\)"):
        IntegratedGradients(BasicModel_MultiLayer()).attribute(
            torch.randn(4, 3), torch.zeros(2, 3), target=0)


def test_a_non_finite_baseline_is_named_by_its_row_without_engine_terms():
    per_row = torch.zeros(4, 3)
    per_row[2, 1] = float("nan")
    shared = torch.full((1, 3), float("inf"))
    ig = IntegratedGradients(BasicModel_MultiLayer())

    with pytest.raises(ArgumentError, match=r"^baselines hold nan or inf \(row 2\): ") as error:
        ig.attribute(torch.randn(4, 3), per_row, target=0)
    assert "kind" not in str(error.value)
    with pytest.raises(ArgumentError, match=r"^baselines hold nan or inf: baselines must be"):
        ig.attribute(torch.randn(4, 3), shared, target=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_drop_in_class_inside_noise_tunnel_on_cuda():
    model = BasicModel_MultiLayer().cuda()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3]], device="cuda")

    def attribute(explainer):
        return NoiseTunnel(explainer).attribute(x, nt_type="smoothgrad", nt_samples=4,
                                                stdevs=0.0, target=0, n_steps=50)

    theirs, ours = run_both(attribute, lambda cls: cls(model))

    assert ours.device.type == "cuda"
    assert_same(ours, theirs, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_get_float32_results_as_from_captum(dtype):
    torch.manual_seed(21)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 1)).to(dtype).eval()
    x = torch.rand(5, 3).to(dtype)

    ours, our_delta = IntegratedGradients(model).attribute(x, target=0,
                                                           return_convergence_delta=True)
    theirs, their_delta = CaptumIG(model).attribute(x, target=0, return_convergence_delta=True)

    assert ours.dtype == theirs.dtype == torch.float32
    assert our_delta.dtype == their_delta.dtype == torch.float32
    # Both run the model in half precision: they agree to its rounding.
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= tolerance
