"""``torch.fx`` traces that know what Python state they baked in.

A symbolic trace runs the model's ``forward`` once and records its tensor operations.
Everything else that ``forward`` read is frozen into the graph as it was at that moment:

- a plain attribute (``self.cap`` in ``clamp(h, max=self.cap)``, a flag choosing a
  branch) becomes a constant, so setting the attribute later changes the model but not
  the trace. Outputs at a few checked points need not show it: a cap that only the middle
  of a path reaches leaves every path's ends alone.
- the grad mode and autocast are not recorded at all: a block run under
  ``torch.no_grad()`` is differentiated through in the trace, and a block under
  ``torch.autocast`` runs in full precision.

``trace`` records, while tracing, every attribute of a module that ``forward`` reads
(through its own code or a property): the module's own, or its class's when the module
has none of that name. It refuses a forward that creates graph nodes with gradients or
autocast switched from how they were when the trace began. ``Guards.hold`` then tells,
on every later call, whether each attribute read still has the value the trace was made
with:

- numbers, strings, flags and other plain values by value (long strings by length and
  hash), and lists, tuples, dicts, deques, small numpy and ``array`` arrays, short
  bytearrays and plain objects (a config object, a ``SimpleNamespace``, a dataclass with
  or without slots) by their contents, up to 256 values per attribute;
- an attribute ``forward`` looked up and did not find (``getattr(self, "cap", default)``,
  ``hasattr``) as missing, and the names each of the model's own classes defines, so
  that a setting added later is seen;
- slots and other data descriptors (not properties) by the value they serve; a class
  kept as a value by the names its classes define; a helper's bound method by the helper;
  the attributes of container subclasses, functions, enum members and the target of a
  weak reference too;
- anything else (a tensor, a function, a larger container) by identity, through a weak
  reference where the object allows one, so that a guard neither keeps a model alive nor
  mistakes a new object at a freed address for the old one.

A method ``forward`` runs through (a helper, a block's ``forward``, the model's own) is
guarded by its function: identity, code and default arguments; so are staticmethods,
classmethods, properties and partialmethods, every method and descriptor of the model's
own classes, and the methods of a plain helper object's class.

What no guard sees: module-level globals and closures read in ``forward`` (a Python
module kept as an attribute among them), context variables, metaclass attributes, values
a custom ``__getattr__`` serves from elsewhere, values read past attribute access
(``vars(self)``, ``self.__dict__``, ``object.__getattribute__``), contents beyond those
bounds changed in place, and a large tensor edited through ``.data``.
"""

from __future__ import annotations

import array
import collections
import contextlib
import enum
import functools
import sys
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Guards", "TraceRefused", "trace"]


class TraceRefused(Exception):
    """The model's forward does something a trace cannot record."""


# Attributes every module has (its parameter, buffer, submodule and hook tables, its
# mode): engine.step.layout and the trace itself cover these.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# Plain values compared by value, and how many of them one attribute may hold in all
# (nested in containers and plain objects) before it is compared by identity instead.
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
            enum.Enum)
_MOST_VALUES = 256
# Strings and bytes longer than this are compared by length and hash (cached by Python).
_LONG_TEXT = 256
_IDENTITY = object()
_MISSING = object()


class _Same:
    """Compares equal to another ``_Same`` of the very same live object."""

    __slots__ = ("_ref", "_strong")

    def __init__(self, value: object) -> None:
        try:
            self._ref, self._strong = weakref.ref(value), None
        except TypeError:  # no weak references to it: hold it (plain objects, small)
            self._ref, self._strong = None, value

    def get(self) -> object:
        return self._strong if self._ref is None else self._ref()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        mine = self.get()
        return mine is not None and mine is other.get()

    __hash__ = None  # type: ignore[assignment]


class Guards:
    """The attributes a trace read, each with a fingerprint of the value it saw.

    ``reads`` are (module, name, fingerprint) as a read through the module finds them;
    ``constants`` (class, name, fingerprint) are a class's own plain values.
    """

    def __init__(self, reads: tuple[tuple[nn.Module, str, object], ...] = (),
                 constants: tuple[tuple[type, str, object], ...] = (),
                 numbers: tuple[torch.Tensor, ...] = (),
                 classes: tuple[type, ...] = ()) -> None:
        # Weak references: a guard must not keep the model (or any module) alive.
        self._reads = tuple((weakref.ref(owner), name, seen, False)
                            for owner, name, seen in reads)
        self._reads += tuple((weakref.ref(owner), name, seen, True)
                             for owner, name, seen in constants)
        # Tensors forward took a number out of (``self.cap.item()``), with their contents.
        self._numbers = tuple((weakref.ref(tensor), _contents(tensor)) for tensor in numbers)
        # The names each of the model's own classes defines: one added later (a setting
        # forward looks up with a default, ``getattr(type(self), "CAP", 10.0)``) is seen.
        self._classes = tuple((weakref.ref(klass), _class_names(klass)) for klass in classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, on_class in self._reads if not on_class)

    @property
    def constants(self) -> tuple[tuple[type, str, object], ...]:
        return tuple((ref(), name, seen) for ref, name, seen, on_class in self._reads
                     if on_class and ref() is not None)

    def hold(self) -> bool:
        """Whether every attribute read still has the value the trace was made with."""
        try:
            return not any(True for _ in self._changed())
        except Exception:  # noqa: BLE001 - a value that cannot be compared: trace again
            return False

    def changed(self) -> str:
        """The attributes read whose values changed, for messages."""
        try:
            return ", ".join(self._changed())
        except Exception as error:  # noqa: BLE001 - for a message only
            return f"(cannot compare: {type(error).__name__})"

    def _changed(self) -> Iterator[str]:
        # Modules often share one object (a config every block keeps): summarise it once.
        summaries: dict[int, object] = {}
        for ref, name, seen, on_class in self._reads:
            owner = ref()
            if owner is None:
                yield f"(a dropped object).{name}"
                continue
            value = _class_value(owner, name) if on_class else _read(owner, name)
            if id(value) not in summaries:
                summaries[id(value)] = _fingerprint(value)
            if summaries[id(value)] != seen:
                yield f"{owner.__name__ if on_class else type(owner).__name__}.{name}"
        for ref, seen in self._numbers:
            tensor = ref()
            if tensor is None or _contents(tensor) != seen:
                yield "a number taken out of a tensor"
        for ref, names in self._classes:
            klass = ref()
            if klass is None or _class_names(klass) != names:
                yield f"the attributes of class {getattr(klass, '__name__', '(dropped)')}"


def _class_names(klass: type) -> frozenset[str]:
    return frozenset(name for name in vars(klass) if not name.startswith("__"))


def _read(module: nn.Module, name: str) -> object:
    """What ``module.name`` finds as a plain value: the module's own (in its ``__dict__`` or
    a slot of its class), else its class's."""
    own = vars(module)
    if name in own:
        return own[name]
    value = _class_value(type(module), name)
    if _stores_values(value):
        try:
            return value.__get__(module, type(module))
        except AttributeError:  # a slot not set
            return _MISSING
    return value


def _stores_values(value: object) -> bool:
    """Whether a class attribute serves each instance a value of its own: a slot, or a
    data descriptor other than a property (whose function the guards compare, and whose
    reads are recorded as it runs)."""
    kind = type(value)
    return isinstance(value, types.MemberDescriptorType) or (
        hasattr(kind, "__get__") and hasattr(kind, "__set__")
        and not isinstance(value, (property, types.GetSetDescriptorType)))


def _class_value(klass: type, name: str) -> object:
    """What ``klass.name`` finds in the class or the first of its bases that has it."""
    for base in klass.__mro__:
        if name in vars(base):
            return vars(base)[name]
    return _MISSING


def _fingerprint(value: object) -> object:
    """A comparable summary of ``value``: plain values themselves, the rest by identity."""
    if value is _MISSING:
        return ("missing",)
    summary = _summary(value, [_MOST_VALUES])
    return _identity(value) if summary is _IDENTITY else summary


def _identity(value: object) -> object:
    """``value`` by identity. A tensor's contents are live in the trace (it reads the same
    tensor); only a number taken out of one is baked in, and guarded as ``_ScalarReads``
    records it."""
    return _Same(value)


def _summary(value: object, budget: list[int]) -> object:
    budget[0] -= 1
    if budget[0] < 0:
        return _IDENTITY
    if isinstance(value, (str, bytes)) and len(value) > _LONG_TEXT:
        return (type(value), len(value), hash(value))
    if isinstance(value, enum.Enum):
        # Attributes set on a member (Mode.A.cap = ...) beside its name and value.
        extra = {name: item for name, item in vars(value).items() if not name.startswith("_")}
        return _with_state((type(value), repr(value)), extra, budget)
    if isinstance(value, _SCALARS):
        # repr tells 0.0 from -0.0 and matches nan with nan; the type tells 1 from 1.0.
        return (type(value), repr(value))
    if isinstance(value, bytearray):
        # Bytes that may change in place: by value while short, else by identity.
        return (bytearray, bytes(value)) if len(value) <= _LONG_TEXT else _IDENTITY
    if isinstance(value, array.array):
        if len(value) > budget[0]:
            return _IDENTITY
        budget[0] -= len(value)
        return (array.array, value.typecode, value.tobytes())
    if isinstance(value, _CONTAINERS):
        return _container_summary(value, budget)
    if isinstance(value, _METHOD_LIKE):
        # The functions inside, each by identity, code and defaults.
        if isinstance(value, property):
            inner = (value.fget, value.fset, value.fdel)
        elif isinstance(value, functools.partialmethod):
            inner = (value.func, value.args, value.keywords)
        else:
            inner = value.__func__
        summary = _summary(inner, budget)
        return _IDENTITY if summary is _IDENTITY else (type(value), _Same(value), summary)
    if isinstance(value, types.FunctionType):
        return _function_summary(value, budget)
    if isinstance(value, types.MethodType) and not isinstance(value.__self__, nn.Module):
        # A helper's bound method (self.fn = helper.apply): its function and its helper.
        summary = _summary((value.__func__, value.__self__), budget)
        return _IDENTITY if summary is _IDENTITY else (types.MethodType, summary)
    if isinstance(value, weakref.ref) and not isinstance(value, weakref.WeakMethod):
        target = value()
        summary = _summary(target, budget)
        return _IDENTITY if summary is _IDENTITY else (weakref.ref, _Same(target), summary)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.size > budget[0]:
            return _IDENTITY
        budget[0] -= value.size
        return (np.ndarray, value.dtype.str, value.shape, value.tobytes())
    fields = _class_state(value) if isinstance(value, type) else _plain_state(value)
    if fields is not None:
        summary = _summary(fields, budget)
        return _IDENTITY if summary is _IDENTITY else (type(value), _Same(value), summary)
    # A tensor, a module or another object: by identity, its neighbours still by value.
    return _identity(value)


_CONTAINERS = (tuple, list, dict, set, frozenset, collections.deque, types.MappingProxyType)


def _container_summary(value: object, budget: list[int]) -> object:
    """Items in order (a dict's and a mapping proxy's as pairs), and the attributes of a
    subclass's instance (a dict that also carries ``.cap``)."""
    items = value.items() if isinstance(value, (dict, types.MappingProxyType)) else value
    parts = []
    for item in items:
        part = _summary(item, budget)
        if part is _IDENTITY:
            return _IDENTITY  # too many values: the container by identity
        parts.append(part)
    return _with_state((type(value), tuple(parts)), getattr(value, "__dict__", None), budget)


def _function_summary(function: types.FunctionType, budget: list[int]) -> object:
    """A function by identity, code, defaults and its own attributes (``fn.cap = ...``):
    any of them may be swapped or edited in place."""
    defaults = _summary((function.__defaults__, function.__kwdefaults__), budget)
    parts = (types.FunctionType, _Same(function), _Same(function.__code__),
             defaults if defaults is not _IDENTITY else _Same(function.__defaults__))
    return _with_state(parts, function.__dict__, budget)


def _with_state(summary: tuple[object, ...], state: dict[str, object] | None,
                budget: list[int]) -> object:
    """``summary`` with that of ``state`` added when there is any."""
    if not state:
        return summary
    extra = _summary(dict(state), budget)
    return _IDENTITY if extra is _IDENTITY else (*summary, extra)


def _class_state(klass: type) -> dict[str, object] | None:
    """What a class used as a value holds (a config kept as a class, ``cfg = Config``):
    the names its own classes define; None for the frameworks' and builtin classes."""
    if _framework_function(klass) or klass.__module__ == "builtins":
        return None
    return _class_defaults(klass, {}, call_too=False)


def _class_defaults(klass: type, state: dict[str, object], *, call_too: bool
                    ) -> dict[str, object]:
    """``state`` with the names ``klass`` and its own bases define that it lacks (not
    ``object``'s, builtins' or the frameworks'); no dunder names, but ``__call__`` when
    ``call_too``."""
    for base in klass.__mro__:
        if base is object or base.__module__ == "builtins" or _framework_function(base):
            continue
        for name, value in vars(base).items():
            if name not in state and (not name.startswith("__")
                                      or (call_too and name == "__call__")):
                state[name] = value
    return state


def _plain_state(value: object) -> dict[str, object] | None:
    """The settings of a plain object, or None for anything else.

    A config object, a ``SimpleNamespace``, a dataclass or ``attrs`` class (with or
    without slots), a callable helper object (``Clip(cap)``), a ``functools.partial``:
    its fields, and the plain values of its class it does not override.
    """
    if isinstance(value, _NOT_PLAIN):
        return None
    if isinstance(value, functools.partial):
        return {"func": value.func, "args": value.args, "keywords": value.keywords}
    state: dict[str, object] = {}
    own = getattr(value, "__dict__", None)
    if isinstance(own, dict):
        state.update(own)
    klass = type(value)
    for base in klass.__mro__:
        slots = vars(base).get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and slot not in state:
                state[slot] = getattr(value, slot, _MISSING)
    if not state and not isinstance(own, dict) and "__slots__" not in vars(klass):
        return None  # a value of a built-in or compiled type: by identity
    # Its class's defaults, and its methods (a helper's __call__ included), which may be
    # replaced on the class.
    return _class_defaults(klass, state, call_too=True)


_NOT_PLAIN = (nn.Module, torch.Tensor, type, enum.Enum, types.ModuleType, types.FunctionType,
              types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType)


# Per thread: the attribute reads of the trace in progress, {(id, name): (module, name,
# fingerprint when first read)}, or None.
_local = threading.local()


def _recording_getattribute(self: nn.Module, name: str) -> Any:
    # The next __getattribute__ after nn.Module's place in the class's MRO: a mixin's own,
    # or object's.
    try:
        value = super(nn.Module, self).__getattribute__(name)
    except AttributeError:
        # An optional setting (getattr(self, "cap", default), hasattr, try/except): that
        # it is missing is baked in as much as a value would be.
        # Not the tracer's own lookups (a free name for a constant it then sets).
        reads = getattr(_local, "reads", None)
        if reads is not None and (id(self), name) not in reads and _absent(self, name) \
                and not _framework_caller(sys._getframe(1)):
            reads[id(self), name] = (self, name, _fingerprint(_MISSING))
        raise
    reads = getattr(_local, "reads", None)
    if reads is not None and (id(self), name) not in reads and _recordable(self, name, value):
        reads[id(self), name] = (self, name, _fingerprint(_read(self, name)))
    return value


def _framework_caller(frame: types.FrameType) -> bool:
    """Whether ``frame`` runs torch's or Lightning's code."""
    return str(frame.f_globals.get("__name__", "")).split(".")[0] in _FRAMEWORKS


def _absent(module: nn.Module, name: str) -> bool:
    """Whether ``module.name`` is missing, rather than a parameter, buffer or submodule
    (which ``nn.Module.__getattr__`` serves, and engine.step.layout covers)."""
    if name in _MODULE_INTERNALS or (name.startswith("__") and name.endswith("__")):
        return False
    own = vars(module)
    if any(name in own.get(table, ()) for table in ("_parameters", "_buffers", "_modules")):
        return False
    return _read(module, name) is _MISSING


def _recordable(module: nn.Module, name: str, value: object) -> bool:
    """Whether a read of ``module.name`` giving ``value`` is state the trace bakes in."""
    if name in _MODULE_INTERNALS or (name.startswith("__") and name.endswith("__")):
        return False
    if isinstance(value, fx.Proxy):
        return False  # computed inside this forward (self.features = ...), not state
    found = _read(module, name)
    if isinstance(value, types.MethodType) and value.__self__ is module and found is not value:
        # A method the trace ran through (a helper, a submodule's forward): guarded by
        # its function, so that one set on the instance or the class later is seen. Not
        # the frameworks' own (the tracer calls named_modules and the like).
        return value.__func__ is found and not _framework_function(found)
    # A value of the module's own (a function it calls included) or of its class; not a
    # submodule or a parameter, which are not attributes of the instance.
    return found is value


_METHOD_LIKE = (staticmethod, classmethod, property, functools.partialmethod)


def _framework_function(function: object) -> bool:
    """Whether ``function`` (or a class) is torch's or Lightning's own."""
    module = getattr(function, "__module__", None) or ""
    return module.split(".")[0] in _FRAMEWORKS


def _contents(tensor: torch.Tensor) -> object:
    """A small tensor's values (a number taken out of it is baked into the trace); a
    large one's identity and version."""
    tensor = tensor.detach()
    if tensor.numel() > _MOST_VALUES:
        return ("large", tensor._version)
    return (tensor.dtype, tuple(tensor.shape), tensor.cpu().contiguous().view(-1).tolist())


# Tensor methods that hand forward a Python number, which the trace then holds as a constant.
_TO_NUMBER = frozenset({"item", "tolist", "numpy", "__float__", "__int__", "__bool__",
                        "__index__", "__complex__"})


class _ScalarReads(TorchFunctionMode):
    """Records the real tensors forward takes numbers out of while it is traced."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[int, weakref.ref] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if getattr(func, "__name__", None) in _TO_NUMBER and args \
                and isinstance(args[0], torch.Tensor):
            self.tensors.setdefault(id(args[0]), weakref.ref(args[0]))
        return func(*args, **(kwargs or {}))


_patch_lock = threading.RLock()


@contextlib.contextmanager
def _recorded_reads() -> Iterator[dict[tuple[int, str], tuple[nn.Module, str, object]]]:
    """Record the attributes of modules read on this thread while it runs."""
    reads: dict[tuple[int, str], tuple[nn.Module, str, object]] = {}
    with _patch_lock:
        had_own = "__getattribute__" in vars(nn.Module)
        original = vars(nn.Module).get("__getattribute__")
        outer = getattr(_local, "reads", None)
        nn.Module.__getattribute__ = _recording_getattribute  # type: ignore[method-assign]
        _local.reads = reads
        try:
            yield reads
        finally:
            _local.reads = outer
            if had_own:
                nn.Module.__getattribute__ = original  # type: ignore[method-assign]
            else:
                del nn.Module.__getattribute__


def _modes() -> tuple[object, ...]:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
              for device in ("cpu", "cuda")))


class _ModeCheckingTracer(fx.Tracer):
    """Refuses nodes created with gradients or autocast switched inside ``forward``."""

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._modes = _modes()
        return super().trace(root, concrete_args)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        if _modes() != self._modes:
            raise TraceRefused(
                "forward switches gradients or autocast for part of its work (torch.no_grad, "
                "torch.autocast, ...), which a trace does not record"
            )
        return super().create_node(*args, **kwargs)


# Classes whose constants are the frameworks' own, not the model's settings.
_FRAMEWORKS = ("torch", "pytorch_lightning", "lightning", "lightning_fabric")


def _module_classes(model: nn.Module,
                    reads: dict[tuple[int, str], tuple[nn.Module, str, object]]) -> set[type]:
    """The classes of the model's modules and of the modules forward read."""
    modules = {id(module): module for module in model.modules()}
    modules.update((id(module), module) for module, _, _ in reads.values())
    return {type(module) for module in modules.values()}


def _own_classes(model: nn.Module, reads: dict[tuple[int, str], tuple[nn.Module, str, object]]
                 ) -> list[type]:
    """The classes of the model's modules (and of those forward read), with their bases,
    less ``object`` and the frameworks' own."""
    classes: dict[type, None] = {}
    for klass in _module_classes(model, reads):
        for base in klass.__mro__:
            if base is not object and not _framework_function(base):
                classes[base] = None
    return list(classes)


def _class_constants(model: nn.Module, reads: dict[tuple[int, str], tuple[nn.Module, str,
                                                                         object]]
                     ) -> tuple[tuple[type, str, object], ...]:
    """Every plain value the model's own classes hold, as each module's class finds it.

    ``forward`` may read one as ``type(self).CAP`` or ``MyNet.CAP``, which no instance
    attribute access shows. Guarded through the module's own class, so that a value set
    later on a subclass, shadowing its base's, is seen too. Framework classes (torch,
    Lightning) are left out; the model's own classes are few and hold few such values.
    """
    constants = {}
    for klass in _module_classes(model, reads):
        for base in klass.__mro__:
            if base is object or _framework_function(base):
                continue
            for name in vars(base):
                if (klass, name) in constants or name.startswith("__"):
                    continue  # the class machinery
                # Plain values, and the methods and descriptors forward may reach through
                # the class (type(self).helper, Net.scale) or an instance.
                constants[klass, name] = (klass, name, _fingerprint(_class_value(klass, name)))
    return tuple(constants.values())


def trace(model: nn.Module) -> tuple[fx.GraphModule, Guards]:
    """``torch.fx.symbolic_trace(model)`` and the guards on what it read.

    Traced with gradients on and autocast off, so that a block of ``forward`` that
    switches either shows. Raises ``TraceRefused`` for such a block or for a ``forward``
    that changes an attribute it reads (a call counter: every call would need a new
    trace), and whatever ``torch.fx`` raises for a model it cannot trace.
    """
    tracer = _ModeCheckingTracer()
    constants_before = _class_constants(model, {})
    names_before = set(vars(model))
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        reads = stack.enter_context(_recorded_reads())
        numbers = stack.enter_context(_ScalarReads())
        graph = tracer.trace(model)
    # A tensor made inside forward and gone now is no setting.
    kept = tuple(t for t in (ref() for ref in numbers.tensors.values()) if t is not None)
    # The tracer takes the model's forward from its class, not through the instance: the
    # class constants guard it, with the classes' other methods.
    guards = Guards(tuple(reads.values()), _class_constants(model, reads), kept,
                    tuple(_own_classes(model, reads)))
    before = {(klass, name): seen for klass, name, seen in constants_before}
    counters = [f"{klass.__name__}.{name}" for klass, name, seen in guards.constants
                if (klass, name) in before and before[klass, name] != seen]
    changed = ", ".join(counters) or guards.changed()
    try:
        if changed:
            raise TraceRefused(f"forward changes what it reads ({changed})")
        return fx.GraphModule(tracer.root, graph, type(model).__name__), guards
    finally:
        # The tracer keeps the tensors forward makes (torch.tensor(2.0)) as attributes of
        # the model; the graph module has its own copies. The user's model is left as it was.
        for name in set(vars(model)) - names_before:
            if name.startswith("_tensor_constant"):
                delattr(model, name)
