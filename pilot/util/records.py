"""``record``: dataclasses whose methods are shared, not compiled for every class.

Why it exists: ``dataclasses.dataclass`` writes the source of ``__init__``,
``__repr__`` and ``__eq__`` (for a frozen class also ``__setattr__``, ``__delattr__``
and ``__hash__``) for every class and compiles each with ``exec`` while the module
is imported.  That costs 0.5-1.5 ms per class; for the ~60 classes the pilot imports
before it can ask for a job it was 60-90 ms of CPU, two thirds of the pilot's own
import time, paid again by every pilot on every worker node (``bench/pilotcost``).

``record`` keeps the dataclass contract.  The class *is* a dataclass: ``fields``,
``asdict``, ``astuple``, ``replace`` and ``is_dataclass`` work, pickling and
copying work, and type checkers read it as one (PEP 681 ``dataclass_transform``).
``dataclasses`` only collects the fields; the methods are the module-level functions
below, which read a per-class ``_Spec``.  A class costs ~40 us to create; building
an instance costs ~1 us more than with a generated ``__init__``.

Behaviour matches ``@dataclass`` / ``@dataclass(frozen=True)`` as the pilot uses
them: positional or keyword arguments in field order, ``default`` and
``default_factory``, ``field(repr=False)``, ``field(compare=False)``,
``field(init=False)``, ``field(kw_only=True)``, ``__post_init__``; ``==`` between
instances of exactly the same class; frozen records are hashable and refuse
assignment with ``FrozenInstanceError``, mutable ones are unhashable; a method the
class defines itself is kept.  ``InitVar``, ``order``, ``slots`` and
``unsafe_hash`` are not offered: use ``@dataclass`` where one is needed.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable
from dataclasses import MISSING, Field, FrozenInstanceError
from typing import Any, TypeVar, dataclass_transform, overload

T = TypeVar("T")

#: The per-class attribute holding its ``_Spec``.
SPEC = "__record_spec__"


class _Spec:
    """What the shared methods need to know about one record class."""

    cls: type
    __slots__ = (
        "cls",
        "frozen",
        "positional",
        "init_names",
        "init_fields",
        "derived",
        "repr_names",
        "compare_names",
        "hash_names",
        "field_names",
        "post_init",
    )

    def __init__(self, cls: type, frozen: bool) -> None:
        own = dataclasses.fields(cls)
        self.cls = cls
        self.frozen = frozen
        init = [f for f in own if f.init]
        self.positional = tuple(f.name for f in init if not f.kw_only)
        self.init_names = frozenset(f.name for f in init)
        self.init_fields = tuple((f.name, f.default, f.default_factory) for f in init)
        self.derived = tuple((f.name, f.default, f.default_factory) for f in own if not f.init)
        self.repr_names = tuple(f.name for f in own if f.repr)
        self.compare_names = tuple(f.name for f in own if f.compare)
        self.hash_names = tuple(f.name for f in own if (f.compare if f.hash is None else f.hash))
        self.field_names = frozenset(f.name for f in own)
        self.post_init = hasattr(cls, "__post_init__")
        _check_order(cls, [f for f in init if not f.kw_only])


def _check_order(cls: type, positional: list[Field[Any]]) -> None:
    """A field without a default may not follow one with a default (as ``@dataclass``)."""
    seen_default = False
    for f in positional:
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        if seen_default and not has_default:
            raise TypeError(f"{cls.__qualname__}: non-default argument {f.name!r} follows default argument")
        seen_default = seen_default or has_default


def _spec(self: object) -> _Spec:
    spec: _Spec = getattr(type(self), SPEC)
    return spec


def _init(self: object, *args: Any, **kwargs: Any) -> None:
    spec = _spec(self)
    if len(args) > len(spec.positional):
        raise TypeError(
            f"{type(self).__qualname__}() takes {len(spec.positional)} positional arguments"
            f" but {len(args)} were given"
        )
    given = dict(zip(spec.positional, args, strict=False))
    for name, value in kwargs.items():
        if name not in spec.init_names:
            raise TypeError(f"{type(self).__qualname__}() got an unexpected keyword argument {name!r}")
        if name in given:
            raise TypeError(f"{type(self).__qualname__}() got multiple values for argument {name!r}")
        given[name] = value
    assign = object.__setattr__ if spec.frozen else setattr
    missing = []
    for name, default, factory in spec.init_fields:
        if name in given:
            assign(self, name, given[name])
        elif default is not MISSING:
            assign(self, name, default)
        elif factory is not MISSING:
            assign(self, name, factory())
        else:
            missing.append(name)
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise TypeError(f"{type(self).__qualname__}() missing required argument(s): {names}")
    for name, default, factory in spec.derived:
        if default is not MISSING:
            assign(self, name, default)
        elif factory is not MISSING:
            assign(self, name, factory())
    if spec.post_init:
        self.__post_init__()  # type: ignore[attr-defined]


@reprlib.recursive_repr()
def _repr(self: object) -> str:
    spec = _spec(self)
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in spec.repr_names)
    return f"{type(self).__qualname__}({inner})"


def _eq(self: object, other: object) -> object:
    if other.__class__ is not self.__class__:
        return NotImplemented
    names = _spec(self).compare_names
    mine: tuple[Any, ...] = tuple(getattr(self, n) for n in names)
    theirs: tuple[Any, ...] = tuple(getattr(other, n) for n in names)
    return mine == theirs


def _hash(self: object) -> int:
    return hash(tuple(getattr(self, n) for n in _spec(self).hash_names))


def _frozen_setattr(self: object, name: str, value: Any) -> None:
    spec = _spec(self)
    if type(self) is spec.cls or name in spec.field_names:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")
    base: Any = super(spec.cls, self)
    base.__setattr__(name, value)


def _frozen_delattr(self: object, name: str) -> None:
    spec = _spec(self)
    if type(self) is spec.cls or name in spec.field_names:
        raise FrozenInstanceError(f"cannot delete field {name!r}")
    base: Any = super(spec.cls, self)
    base.__delattr__(name)


def _has_explicit_hash(cls: type) -> bool:
    """The class body defines ``__hash__`` (not the ``None`` that defining ``__eq__`` implies)."""
    value = cls.__dict__.get("__hash__", MISSING)
    return not (value is MISSING or (value is None and "__eq__" in cls.__dict__))


def _finish(cls: type[T], frozen: bool) -> type[T]:
    explicit_hash = _has_explicit_hash(cls)
    dataclasses.dataclass(init=False, repr=False, eq=False)(cls)
    setattr(cls, SPEC, _Spec(cls, frozen))
    own = cls.__dict__
    for name, method in (("__init__", _init), ("__repr__", _repr), ("__eq__", _eq)):
        if name not in own:
            setattr(cls, name, method)
    if frozen:
        for name, method in (("__setattr__", _frozen_setattr), ("__delattr__", _frozen_delattr)):
            if name in own:
                raise TypeError(f"cannot overwrite attribute {name} in class {cls.__name__}")
            setattr(cls, name, method)
    if not explicit_hash:
        hashing: Callable[[object], int] | None = _hash if frozen else None
        type.__setattr__(cls, "__hash__", hashing)
    return cls


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, Field))
def record(cls: type[T] | None = None, /, *, frozen: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """``@record`` or ``@record(frozen=True)``: a dataclass without per-class compiled code."""
    if cls is not None:
        return _finish(cls, frozen)

    def wrap(target: type[T]) -> type[T]:
        return _finish(target, frozen)

    return wrap
