"""What a trace baked in: attributes read in forward, and blocks that switch gradients."""

from __future__ import annotations

import copy
import enum
import types

import pytest
import torch
from torch import nn

from engine import integrated_gradients
from engine.hoist import fast_model, split_affine_prefix
from engine.trace import TraceRefused, trace

HOISTS = [True, "affine", False]


def _captum(model, x, base, **kwargs):
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(x, base, **kwargs)


def _float64_reference(model, x, base, n_steps):
    """Plain autograd, midpoint rule, in float64."""
    if any(p.dtype != torch.float64 for p in model.parameters()):
        model = copy.deepcopy(model).double()  # (a float64 model is used as it is)
    alphas = (torch.arange(n_steps, dtype=torch.float64) + 0.5) / n_steps
    x, base = x.double(), base.double()
    points = (base + alphas.view(-1, 1, 1) * (x - base)).reshape(-1, x.shape[1])
    points.requires_grad_()
    (grad,) = torch.autograd.grad(model(points).sum(), points)
    return (x - base) * grad.view(n_steps, *x.shape).mean(0)


class _Kinked(nn.Module):
    """-|x1| + 0.3 relu(x2): row 1's path below rises above both of its ends in the middle."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
            self.l2.weight.copy_(torch.tensor([[-1.0, -1.0, 0.3]]))

    def hidden(self, x):
        return self.l2(torch.relu(self.l1(x)))


# Row 0 sits on the baseline; row 1 crosses x1 = 0, where the output peaks mid-path.
X = torch.tensor([[-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
BASE = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
STEPS = dict(n_steps=20, method="riemann_middle")


class _Capped(_Kinked):
    def __init__(self):
        super().__init__()
        self.cap = 10.0

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=self.cap)


@pytest.mark.parametrize("hoist", HOISTS)
def test_an_attribute_that_matters_only_inside_the_paths_is_seen(hoist):
    model = _Capped().double().eval()
    integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)  # traced with cap 10
    # Every row, baseline and row 0's midpoint stay below -0.7: only the middle of row
    # 1's path reaches the new cap.
    model.cap = 0.0

    got = integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)[0]

    expected = _float64_reference(model, X, BASE, 20)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, _captum(model, X, BASE, **STEPS), rtol=1e-6, atol=1e-9)
    assert float((got - integrated_gradients(_Capped().double().eval(), X, BASE,
                                             **STEPS)[0]).abs().max()) > 0.01


class _Configured(_Kinked):
    """The cap lives in a config object, the way models often keep their settings."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=self.config.limits["cap"])


@pytest.mark.parametrize("config", [
    types.SimpleNamespace(limits={"cap": 10.0}),
    type("Config", (), {"__init__": lambda self: setattr(self, "limits", {"cap": 10.0})})(),
], ids=["namespace", "object"])
def test_a_setting_changed_inside_a_config_object_is_seen(config):
    model = _Configured(config).double().eval()
    integrated_gradients(model, X, BASE, **STEPS)
    config.limits["cap"] = 0.0

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


class _Gated(_Kinked):
    def forward(self, x):
        z = self.hidden(x)
        with torch.no_grad():  # a gate the model treats as a constant
            gate = torch.relu(z)  # 0 at every row and baseline
        return z * (1 + 20 * gate)


@pytest.mark.parametrize("hoist", HOISTS)
def test_a_block_without_gradients_inside_forward_is_not_differentiated(hoist):
    model = _Gated().double().eval()

    got = integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)[0]

    # (Captum agrees to 3e-6: its alphas are rounded to float32, and the gate scales
    # the output twentyfold.)
    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)
    assert split_affine_prefix(model) is None and fast_model(model) is None


class _Thresholded(nn.Module):
    """Detaches the hidden units above ``threshold``: outputs and graph shape never change."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(5, 32), nn.PReLU(), nn.Linear(32, 1)
        self.threshold = 1e9

    def forward(self, x):
        h = self.act(self.l1(x))
        return self.l2(torch.where(h > self.threshold, h.detach(), h))


@pytest.mark.parametrize("hoist", HOISTS)
def test_a_detach_switched_by_an_attribute_between_calls_is_seen(hoist):
    torch.manual_seed(0)
    model, x = _Thresholded().double().eval(), torch.rand(30, 5, dtype=torch.float64)
    base = torch.zeros(1, 5, dtype=torch.float64)
    integrated_gradients(model, x, base, hoist=hoist, **STEPS)
    model.threshold = 0.0

    got = integrated_gradients(model, x, base, hoist=hoist, **STEPS)[0]

    torch.testing.assert_close(got, _captum(model, x, base, **STEPS), rtol=1e-6, atol=1e-9)


class _Counting(_Capped):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_a_forward_that_changes_what_it_reads_runs_untraced():
    model = _Counting().double().eval()

    with pytest.raises(TraceRefused, match=r"_Counting\.calls"):
        trace(model)
    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    assert split_affine_prefix(model) is None
    torch.testing.assert_close(got, _captum(model, X, BASE, **STEPS), rtol=1e-6, atol=1e-9)


def test_autocast_inside_forward_is_refused():
    class Mixed(_Kinked):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.hidden(x)

    with pytest.raises(TraceRefused, match="autocast"):
        trace(Mixed())


def test_guards_compare_plain_values_by_value_and_the_rest_by_identity():
    model = _Capped()
    model.flag, model.table, model.weights = float("nan"), [1, (2, "a")], torch.ones(2)
    model.forward = None  # not read below: only what forward reads is guarded
    del model.forward

    class Reader(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            inner = self.inner
            return x * inner.cap + inner.table[1][0] + inner.weights.sum() + (inner.flag != 0)

    reader = Reader(model)
    _, guards = trace(reader)
    assert set(guards.names) == {"cap", "table", "flag", "weights"}
    assert guards.hold()  # nan equals nan here
    model.table = [1, (2, "a")]  # an equal list
    assert guards.hold()
    model.cap = 10  # an int where a float was
    assert not guards.hold() and guards.changed() == "_Capped.cap"
    model.cap = 10.0
    model.weights = torch.ones(2)  # an equal but different tensor
    assert not guards.hold()


def test_nn_module_attribute_access_is_restored_after_a_trace():
    before = nn.Module.__dict__.get("__getattribute__")
    with pytest.raises(TraceRefused):
        trace(_Counting())
    trace(_Capped())

    assert nn.Module.__dict__.get("__getattribute__") is before


def test_a_traced_model_is_freed_when_dropped():
    import gc
    import weakref

    model = _Capped().double().eval()
    integrated_gradients(model, X, BASE, **STEPS)
    alive = weakref.ref(model)
    del model
    gc.collect()

    assert alive() is None


class _Shadowed(_Kinked):
    cap = 10.0  # a class default, shadowed or changed later

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=self.cap)


@pytest.mark.parametrize("change", ["instance", "class"])
def test_a_class_default_shadowed_or_changed_is_seen(change):
    class Model(_Shadowed):
        pass

    model = Model().double().eval()
    integrated_gradients(model, X, BASE, **STEPS)
    if change == "instance":
        model.cap = 0.0
    else:
        Model.cap = 0.0

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.cap = 10.0


class _Shared(_Kinked):
    """Reads its cap from a module it holds in a list, not as a submodule."""

    def __init__(self):
        super().__init__()
        self.shared = [_Holder()]

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=self.shared[0].cap)


def test_a_setting_on_a_module_held_outside_the_submodules_is_seen():
    model = _Shared().double().eval()
    integrated_gradients(model, X, BASE, **STEPS)
    model.shared[0].cap = 0.0

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


def _capped_at(cap):
    return lambda h: torch.clamp(h, max=cap)  # traced through: the trace keeps only cap


class _Activated(_Kinked):
    def __init__(self):
        super().__init__()
        self.act = _capped_at(10.0)

    def forward(self, x):
        return self.act(self.hidden(x))


def test_a_function_attribute_replaced_is_seen_even_at_a_reused_address():
    model = _Activated().double().eval()
    integrated_gradients(model, X, BASE, **STEPS)
    traced_at = id(model.act)
    for _ in range(1000):
        model.act = _capped_at(5.0)  # the traced function is freed here
        model.act = _capped_at(0.0)  # and this one may take its address
        if id(model.act) == traced_at:
            break

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


class _Base:
    """A plain mixin (after nn.Module in the MRO) that renames a setting."""

    def __getattribute__(self, name):
        return object.__getattribute__(self, "cap_now" if name == "cap" else name)


class _Mixed(_Capped, _Base):
    def __init__(self):
        super().__init__()
        self.cap_now = 0.0  # what the model really uses; cap stays 10


def test_a_mixins_own_attribute_access_is_kept_while_tracing():
    assert _Mixed.__mro__.index(nn.Module) < _Mixed.__mro__.index(_Base)
    model = _Mixed().double().eval()

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


def test_a_value_forward_stores_and_reads_back_does_not_trace_again_every_call(monkeypatch):
    import engine.hoist

    class Keeps(_Kinked):
        def forward(self, x):
            self.features = self.l1(x)
            return self.l2(torch.relu(self.features))

    traced = []
    original = engine.hoist.trace
    monkeypatch.setattr(engine.hoist, "trace", lambda model: traced.append(1) or original(model))
    model = Keeps().double().eval()
    for _ in range(4):
        integrated_gradients(model, X, BASE, **STEPS)

    assert len(traced) == 1


class _CapInList(_Kinked):
    def __init__(self):
        super().__init__()
        self.settings = [10.0, torch.ones(2)]  # a tensor beside the cap

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=self.settings[0])


class _CapTensor(_Kinked):
    def __init__(self):
        super().__init__()
        self.cap = torch.tensor(10.0)  # a plain tensor attribute, read as a number

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=self.cap.item())


class _CapOnClass(_Kinked):
    CAP = 10.0

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=type(self).CAP)


@pytest.mark.parametrize("case", ["beside a tensor", "tensor changed in place",
                                  "class constant read through the class"])
def test_more_places_a_setting_can_live_are_seen(case):
    model = {"beside a tensor": _CapInList, "tensor changed in place": _CapTensor,
             "class constant read through the class": type("Model", (_CapOnClass,), {})}[case]()
    model = model.double().eval()
    integrated_gradients(model, X, BASE, **STEPS)
    if case == "beside a tensor":
        model.settings[0] = 0.0
    elif case == "tensor changed in place":
        model.cap.fill_(0.0)
    else:
        type(model).CAP = 0.0

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


class _CapBuffer(_Kinked):
    def __init__(self):
        super().__init__()
        self.register_buffer("cap", torch.tensor(10.0))

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=float(self.cap))


class _CapAsTensor(_Kinked):
    """The cap is a buffer the trace holds as a tensor (a JumpReLU-style threshold)."""

    def __init__(self, parameter=False):
        super().__init__()
        cap = torch.tensor(10.0)
        if parameter:
            self.cap = nn.Parameter(cap, requires_grad=False)
        else:
            self.register_buffer("cap", cap)

    def forward(self, x):
        return torch.minimum(self.hidden(x), self.cap)


class _Clip:
    def __init__(self, cap):
        self.cap = cap

    def __call__(self, h):
        return torch.clamp(h, max=self.cap)


class _Slotted:
    __slots__ = ("cap",)

    def __init__(self, cap):
        self.cap = cap


class _Defaults:
    cap = 10.0


class _Helped(_Kinked):
    def __init__(self, helper):
        super().__init__()
        self.helper = helper

    def forward(self, x):
        helper = self.helper
        if callable(helper):
            return helper(self.hidden(x))
        return torch.clamp(self.hidden(x), max=helper.cap)


def _changes():
    import functools

    def buffer_filled(model):
        model.cap.fill_(0.0)

    def buffer_loaded(model):
        model.load_state_dict({**model.state_dict(), "cap": torch.tensor(0.0)})

    def set_cap(model):
        model.helper.cap = 0.0

    def tensor_assigned(model):
        model.cap = torch.tensor(0.0, dtype=torch.float64)

    def tensor_loaded_by_assignment(model):
        model.load_state_dict({**model.state_dict(), "cap": torch.tensor(0.0).double()},
                              assign=True)

    def parameter_replaced(model):
        model.cap = nn.Parameter(torch.tensor(0.0).double(), requires_grad=False)

    def converted_and_back_then_filled(model):
        model.float().double()  # new buffer tensors
        model.cap.fill_(0.0)

    def partial_edited(model):
        model.helper.keywords["max"] = 0.0

    def class_default(model):
        type(model.helper).cap = 0.0

    return {
        "buffer filled": (_CapBuffer, buffer_filled),
        "buffer loaded": (_CapBuffer, buffer_loaded),
        "tensor buffer assigned": (_CapAsTensor, tensor_assigned),
        "tensor buffer loaded with assign": (_CapAsTensor, tensor_loaded_by_assignment),
        "tensor parameter replaced": (lambda: _CapAsTensor(parameter=True),
                                      parameter_replaced),
        "tensor buffer converted and back": (_CapAsTensor, converted_and_back_then_filled),
        "callable helper": (lambda: _Helped(_Clip(10.0)), set_cap),
        "partial": (lambda: _Helped(functools.partial(torch.clamp, max=10.0)), partial_edited),
        "slotted config": (lambda: _Helped(_Slotted(10.0)), set_cap),
        "config class default": (lambda: _Helped(type("Config", (_Defaults,), {})()),
                                 class_default),
    }


def _assert_the_change_is_seen(model, change, hoist):
    """Explain, ``change`` the model, explain again: the second call must see the change."""
    integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)
    change(model)

    got = integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("case", list(_changes()))
def test_settings_in_buffers_helpers_and_config_classes_are_seen(case):
    make, change = _changes()[case]
    for hoist in (True, False):
        _assert_the_change_is_seen(make().double().eval(), change, hoist)


def test_a_class_level_counter_is_not_a_reason_to_trace_every_call(monkeypatch):
    import engine.hoist

    class Counted(_Capped):
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            return super().forward(x)

    traced = []
    original = engine.hoist.trace
    monkeypatch.setattr(engine.hoist, "trace", lambda model: traced.append(1) or original(model))
    model = Counted().double().eval()
    results = [integrated_gradients(model, X, BASE, **STEPS)[0] for _ in range(4)]

    # Refused once per kind of trace (it changes what it reads), then never tried again.
    assert len(traced) <= 2
    torch.testing.assert_close(results[-1], _float64_reference(model, X, BASE, 20),
                               rtol=1e-9, atol=1e-12)


class _CapMethod(_Kinked):
    def cap(self, h):
        return torch.clamp(h, max=10.0)

    def forward(self, x):
        return self.cap(self.hidden(x))


def _capped_at_zero(self, h):
    return torch.clamp(h, max=0.0)


class _KeptMethod(_CapMethod):
    """A bound method kept as an attribute, chosen at construction."""

    def __init__(self):
        super().__init__()
        self.chosen = self.cap

    def at_zero(self, h):
        return torch.clamp(h, max=0.0)

    def forward(self, x):
        return self.chosen(self.hidden(x))


class _CapBlock(nn.Module):
    def forward(self, h):
        return torch.clamp(h, max=10.0)


class _WithBlock(_Kinked):
    def __init__(self):
        super().__init__()
        self.block = _CapBlock()

    def forward(self, x):
        return self.block(self.hidden(x))


def _described(kind):
    """A model whose cap comes from a class-level staticmethod, classmethod, property or
    partialmethod, or from a helper object's ``__call__``; a fresh class per model."""
    import functools

    def cap(h, limit=10.0):
        return torch.clamp(h, max=limit)

    if kind == "helper":
        helper = type("Helper", (), {"__call__": lambda self, h: cap(h)})
        namespace = {"forward": lambda self, x: self.act(self.hidden(x))}
        model = type("Helped", (_Kinked,), namespace)()
        model.act = helper()
        return model
    attribute = {
        "staticmethod": staticmethod(cap),
        "classmethod": classmethod(lambda cls, h: cap(h)),
        "property": property(lambda self: 10.0),
        "partialmethod": functools.partialmethod(lambda self, limit, h: cap(h, limit), 10.0),
    }[kind]

    def forward(self, x):
        h = self.hidden(x)
        return torch.clamp(h, max=self.capping) if kind == "property" else self.capping(h)

    return type("Described", (_Kinked,), {"capping": attribute, "forward": forward})()


def _described_changed(model):
    import functools

    klass = type(model)
    if "act" in vars(model):
        type(model.act).__call__ = lambda self, h: torch.clamp(h, max=0.0)
        return
    current = vars(klass)["capping"]
    klass.capping = {
        staticmethod: lambda: staticmethod(lambda h: torch.clamp(h, max=0.0)),
        classmethod: lambda: classmethod(lambda cls, h: torch.clamp(h, max=0.0)),
        property: lambda: property(lambda self: 0.0),
        functools.partialmethod: lambda: functools.partialmethod(
            lambda self, limit, h: torch.clamp(h, max=limit), 0.0),
    }[type(current)]()


def _method_changes():
    def on_instance(model):
        model.cap = types.MethodType(_capped_at_zero, model)

    def on_class(model):
        type(model).cap = _capped_at_zero

    def code_swapped(model):
        type(model).cap.__code__ = _capped_at_zero.__code__

    def class_reassigned(model):
        model.__class__ = type("Zeroed", (type(model),), {"cap": _capped_at_zero})

    def block_forward(model):
        type(model.block).forward = _capped_at_zero

    def method_kept_swapped(model):
        model.chosen = model.at_zero

    def default_edited(model):
        type(model).forward.__defaults__[0][0] = 0.0

    # A fresh class (and function) per model: the changes write on them.
    def fresh(base):
        return lambda: type(base.__name__, (base,), {})()

    return {
        "helper set on the instance": (fresh(_CapMethod), on_instance),
        "helper set on the class": (fresh(_CapMethod), on_class),
        "helper's code swapped": (_swappable, code_swapped),
        "instance's class reassigned": (fresh(_CapMethod), class_reassigned),
        "a block's forward replaced on its class": (_fresh_block_model, block_forward),
        "forward's default edited": (_defaulted, default_edited),
        "a bound method kept as an attribute swapped": (_KeptMethod, method_kept_swapped),
        **{f"a {kind} replaced on the class": (lambda kind=kind: _described(kind),
                                               _described_changed)
           for kind in ("staticmethod", "classmethod", "property", "partialmethod")},
        "a helper object's __call__ replaced on its class": (lambda: _described("helper"),
                                                             _described_changed),
    }


def _swappable():
    def cap(self, h):
        return torch.clamp(h, max=10.0)

    return type("Swapped", (_CapMethod,), {"cap": cap})()


def _defaulted():
    def forward(self, x, limits=[10.0]):  # noqa: B006 - the edited default is the point
        return torch.clamp(self.hidden(x), max=limits[0])

    return type("Defaulted", (_Kinked,), {"forward": forward})()


def _fresh_block_model():
    model = _WithBlock()
    model.block = type("Block", (_CapBlock,), {})()
    return model


@pytest.mark.parametrize("case", list(_method_changes()))
def test_methods_forward_runs_through_are_guarded(case):
    make, change = _method_changes()[case]
    for hoist in (True, False):
        model = make().double().eval()
        before = integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)[0]
        change(model)

        got = integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)[0]

        torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                                   atol=1e-12)
        assert float((got - before).abs().max()) > 0.01


# ---------------------------------------------------------------------------
# Optional settings: missing when traced, set later


class _OptionalCap(_Kinked):
    """Reads a cap that need not exist, falling back to 10 (no cap on these paths)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    @property
    def cap_or_default(self):
        return getattr(self, "_cap", 10.0)

    def forward(self, x):
        if self.spelling == "getattr with a default":
            cap = getattr(self, "cap", 10.0)
        elif self.spelling == "property with a default":
            cap = self.cap_or_default
        elif self.spelling == "try and except":
            try:
                cap = self.cap
            except AttributeError:
                cap = 10.0
        elif self.spelling == "hasattr":
            cap = self.cap if hasattr(self, "cap") else 10.0
        else:  # a class attribute looked up with a default
            cap = getattr(type(self), "CAP", 10.0)
        return torch.clamp(self.hidden(x), max=cap)


@pytest.mark.parametrize("spelling", ["getattr with a default", "property with a default",
                                      "try and except", "hasattr", "class attribute"])
def test_a_setting_that_was_missing_when_traced_is_seen_once_set(spelling):
    for hoist in (True, False):
        # A class of its own per run: the class attribute is set on it.
        model = type("Model", (_OptionalCap,), {})(spelling).double().eval()
        _assert_the_change_is_seen(model, _set_the_cap(spelling), hoist)


def _set_the_cap(spelling):
    def change(model):
        if spelling == "class attribute":
            type(model).CAP = 0.0
        elif spelling == "property with a default":
            model._cap = 0.0
        else:
            model.cap = 0.0

    return change


class _CapInContainer(_Kinked):
    def __init__(self, caps):
        super().__init__()
        self.caps = caps

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=float(self.caps[0]))


@pytest.mark.parametrize("container", ["deque", "array", "bytearray"])
def test_settings_in_other_mutable_containers_changed_in_place_are_seen(container):
    import array
    import collections

    make = {"deque": lambda: collections.deque([10.0]), "array": lambda: array.array("d", [10.0]),
            "bytearray": lambda: bytearray([10])}[container]
    for hoist in (True, False):
        model = _CapInContainer(make()).double().eval()
        _assert_the_change_is_seen(model, lambda m: m.caps.__setitem__(0, 0), hoist)


def test_a_model_without_optional_settings_is_traced_once(monkeypatch):
    import engine.hoist

    calls = []
    original = engine.hoist.trace

    def counted(model):
        calls.append(type(model).__name__)
        return original(model)

    monkeypatch.setattr(engine.hoist, "trace", counted)
    model = type("Model", (_OptionalCap,), {})("getattr with a default").double().eval()
    for _ in range(3):
        integrated_gradients(model, X, BASE, **STEPS)

    assert calls == ["Model"]  # the affine split, made once and reused


# ---------------------------------------------------------------------------
# More places a setting can live: slots, classes, helpers' methods, containers' attributes


class _Settings:
    cap = 10.0


class _NoState:
    """A helper without instance state: its setting is a class attribute."""

    __slots__ = ()
    cap = 10.0

    def get(self):
        return type(self).cap


class _Holder:
    def __init__(self):
        self.cap = 10.0

    def get(self):
        return self.cap


class _StoredElsewhere:
    """A data descriptor keeping each instance's value under another name."""

    def __get__(self, owner, kind=None):
        return owner.__dict__["_stored_cap"]

    def __set__(self, owner, value):
        owner.__dict__["_stored_cap"] = value


class _Mode(enum.Enum):
    A = 1


class _SlotMixin:
    __slots__ = ("cap",)


def _routes():
    """(what forward reads the cap through, how the cap is set to 0 later)."""
    import types
    import weakref

    holder = _Holder()
    settings = type("Settings", (_Settings,), {})

    def function():
        return None

    function.cap = 10.0
    as_dict = {"cap": 10.0}
    mode = enum.Enum("Mode", "A")
    mode.A.cap = 10.0
    return {
        "a slot of the module's class": (
            lambda m: m.cap, lambda m: setattr(m, "cap", 0.0), {"cap": 10.0}, (_SlotMixin,)),
        "a config kept as a class": (
            lambda m: m.settings.cap, lambda m: setattr(settings, "cap", 0.0),
            {"settings": settings}, ()),
        "a helper's bound method": (
            lambda m: m.get(), lambda m: setattr(holder, "cap", 0.0), {"get": holder.get}, ()),
        "a stateless helper's class attribute": (
            lambda m: m.helper.get(), lambda m: setattr(_NoStateCopy, "cap", 0.0),
            {"helper": _NoStateCopy()}, ()),
        "an attribute of a dict subclass": (
            lambda m: m.table.cap, lambda m: setattr(m.table, "cap", 0.0),
            {"table": _AttrDict(cap=10.0)}, ()),
        "a weak reference": (
            lambda m: m.ref().cap, lambda m: setattr(holder, "cap", 0.0),
            {"ref": weakref.ref(holder)}, ()),
        "an enum member's attribute": (
            lambda m: m.mode.cap, lambda m: setattr(mode.A, "cap", 0.0), {"mode": mode.A}, ()),
        "a mapping proxy": (
            lambda m: m.view["cap"], lambda m: as_dict.update(cap=0.0),
            {"view": types.MappingProxyType(as_dict)}, ()),
        "a function's attribute": (
            lambda m: m.fn.cap, lambda m: setattr(function, "cap", 0.0), {"fn": function}, ()),
        "a data descriptor": (
            lambda m: m.stored, lambda m: setattr(m, "stored", 0.0), {"stored": 10.0},
            (type("Stored", (), {"stored": _StoredElsewhere()}),)),
    }


class _AttrDict(dict):
    def __init__(self, cap):
        super().__init__(a=1)
        self.cap = cap


_NoStateCopy = type("NoState", (_NoState,), {"__slots__": ()})


def _reading(read, bases):
    """A model class whose forward caps its output at ``read(self)``."""

    def forward(self, x):
        return torch.clamp(self.hidden(x), max=read(self))

    return type("Model", (*bases, _Kinked), {"forward": forward})


@pytest.mark.parametrize("route", list(_routes()))
def test_a_setting_reached_through_more_routes_is_seen(route):
    for hoist in (True, False):
        read, change, values, bases = _routes()[route]
        model = _reading(read, bases)()
        for name, value in values.items():
            setattr(model, name, value)
        _assert_the_change_is_seen(model.double().eval(), change, hoist)


class _CappedCall(_Kinked):
    """Caps the output in ``__call__``, which a trace of ``forward`` never runs."""

    def forward(self, x):
        return self.hidden(x)

    def __call__(self, x):
        return torch.clamp(super().__call__(x), max=0.0)


@pytest.mark.parametrize("where", ["the model", "a block inside it"])
@pytest.mark.parametrize("hoist", HOISTS)
def test_a_module_class_with_its_own_call_is_run_as_called(where, hoist):
    model = _CappedCall() if where == "the model" else nn.Sequential(_CappedCall(), nn.Tanh())
    model = model.double().eval()

    got = integrated_gradients(model, X, BASE, hoist=hoist, **STEPS)[0]

    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)


def test_tensors_forward_makes_leave_no_attributes_on_the_model():
    class MakesTensors(_Kinked):
        def forward(self, x):
            return self.hidden(x) * torch.tensor(2.0, dtype=x.dtype) + torch.ones(1).double()

    model = MakesTensors().double().eval()
    names = set(vars(model))

    got = integrated_gradients(model, X, BASE, **STEPS)[0]

    assert set(vars(model)) == names
    torch.testing.assert_close(got, _float64_reference(model, X, BASE, 20), rtol=1e-9,
                               atol=1e-12)
