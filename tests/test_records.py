"""``pilot.util.records.record`` behaves as ``@dataclass`` does where the pilot relies on it.

Each behaviour is checked against the standard library's own ``@dataclass`` on the
same class body, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import FrozenInstanceError, asdict, astuple, field, fields, replace
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.util.records import record


@record(frozen=True)
class Point:
    """A frozen record with defaults, a factory and a field kept out of repr."""

    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)
    secret: str = field(default="", repr=False)
    note: str = field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class StdPoint:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)
    secret: str = field(default="", repr=False)
    note: str = field(default="", compare=False)


@record
class Counter:
    """A mutable record."""

    name: str
    count: int = 0


@record(frozen=True)
class Derived:
    """``init=False`` and ``kw_only`` fields and a ``__post_init__``."""

    base: int
    doubled: int = field(init=False, default=0)
    label: str = field(kw_only=True, default="d")

    def __post_init__(self) -> None:
        object.__setattr__(self, "doubled", self.base * 2)


@record(frozen=True)
class Child(Point):
    """A record derived from a record adds fields after the parent's."""

    z: int = 0


class Plain(Point):
    """An undecorated subclass inherits the methods, as with ``@dataclass``."""


@record(frozen=True)
class OwnMethods:
    """Methods the class defines itself are kept."""

    value: int

    def __repr__(self) -> str:
        return "mine"

    def __hash__(self) -> int:
        return 7


class ConstructionTests(SynchronousTestCase):
    def test_positional_keyword_and_defaults(self) -> None:
        p = Point(1, y=2)
        self.assertEqual((p.x, p.y, p.tags, p.secret, p.note), (1, 2, [], "", ""))

    def test_factory_gives_each_instance_its_own_value(self) -> None:
        a, b = Point(1), Point(1)
        a.tags.append("t")
        self.assertEqual(b.tags, [])

    def test_argument_errors_are_type_errors(self) -> None:
        cases: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            ((), {}),
            ((1, 2, [], "", "", 9), {}),
            ((1,), {"x": 2}),
            ((1,), {"nope": 1}),
        ]
        for args, kwargs in cases:
            with self.subTest(args=args, kwargs=kwargs):
                self.assertRaises(TypeError, Point, *args, **kwargs)
                self.assertRaises(TypeError, StdPoint, *args, **kwargs)

    def test_init_false_kw_only_and_post_init(self) -> None:
        d = Derived(4, label="x")
        self.assertEqual((d.base, d.doubled, d.label), (4, 8, "x"))
        self.assertRaises(TypeError, Derived, 4, "x")
        self.assertRaises(TypeError, Derived, 4, doubled=1)

    def test_non_default_after_default_is_refused_at_class_creation(self) -> None:
        def make() -> type:
            @record
            class Bad:
                a: int = 0
                b: int  # type: ignore[misc]

            return Bad

        self.assertRaises(TypeError, make)

    def test_subclass_fields_follow_the_parents(self) -> None:
        c = Child(1, 2, z=3)
        self.assertEqual([f.name for f in fields(c)], ["x", "y", "tags", "secret", "note", "z"])
        self.assertEqual((c.x, c.y, c.z), (1, 2, 3))


class DataclassContractTests(SynchronousTestCase):
    def test_dataclass_functions(self) -> None:
        p = Point(1, 2, ["a"], "s", "n")
        s = StdPoint(1, 2, ["a"], "s", "n")
        self.assertTrue(dataclasses.is_dataclass(p))
        self.assertEqual([f.name for f in fields(p)], [f.name for f in fields(s)])
        self.assertEqual(asdict(p), asdict(s))
        self.assertEqual(astuple(p), astuple(s))
        self.assertEqual(replace(p, y=5), Point(1, 5, ["a"], "s", "n"))
        self.assertEqual(Point.__match_args__, StdPoint.__match_args__)

    def test_repr_as_dataclass(self) -> None:
        p = Point(1, 2, ["a"], "hidden", "n")
        s = StdPoint(1, 2, ["a"], "hidden", "n")
        self.assertEqual(repr(p).replace("Point", "StdPoint", 1), repr(s))
        self.assertNotIn("hidden", repr(p))

    def test_recursive_repr_does_not_recurse_forever(self) -> None:
        c = Counter("loop")
        c.count = c  # type: ignore[assignment]
        self.assertEqual(repr(c), "Counter(name='loop', count=...)")

    def test_equality(self) -> None:
        self.assertEqual(Point(1, note="a"), Point(1, note="b"))  # compare=False
        self.assertNotEqual(Point(1), Point(2))
        self.assertNotEqual(Point(1), StdPoint(1))
        self.assertNotEqual(Point(1), Child(1))
        other: object = (1, 0, [], "", "")
        self.assertFalse(Point(1) == other)

    def test_frozen_records_hash_like_dataclasses(self) -> None:
        p, s = Point(1, 2, [], "", "x"), StdPoint(1, 2, [], "", "x")
        self.assertRaises(TypeError, hash, p)  # a list field: unhashable, as with @dataclass
        self.assertRaises(TypeError, hash, s)
        q = Derived(3)
        self.assertEqual(hash(q), hash(Derived(3)))
        self.assertEqual(len({Derived(3), Derived(3), Derived(4)}), 2)

    def test_mutable_records_are_unhashable(self) -> None:
        self.assertIsNone(Counter.__hash__)
        self.assertRaises(TypeError, hash, Counter("a"))

    def test_methods_the_class_defines_are_kept(self) -> None:
        o = OwnMethods(1)
        self.assertEqual((repr(o), hash(o)), ("mine", 7))

    def test_pickle_and_copy(self) -> None:
        p = Point(1, 2, ["a"], "s", "n")
        self.assertEqual(pickle.loads(pickle.dumps(p)), p)
        self.assertEqual(copy.deepcopy(p), p)
        self.assertEqual(copy.copy(p), p)


class FrozenTests(SynchronousTestCase):
    def test_fields_cannot_be_assigned_or_deleted(self) -> None:
        p = Point(1)
        with self.assertRaises(FrozenInstanceError):
            p.x = 2  # type: ignore[misc]
        with self.assertRaises(FrozenInstanceError):
            del p.x
        with self.assertRaises(FrozenInstanceError):
            p.other = 1  # type: ignore[attr-defined]

    def test_undecorated_subclass_may_add_attributes_but_not_fields(self) -> None:
        p: Any = Plain(1)
        p.extra = 1
        self.assertEqual(p.extra, 1)
        with self.assertRaises(FrozenInstanceError):
            p.x = 2

    def test_frozen_record_may_not_define_setattr(self) -> None:
        def make() -> type:
            @record(frozen=True)
            class Bad:
                a: int

                def __setattr__(self, name: str, value: object) -> None:
                    pass

            return Bad

        self.assertRaises(TypeError, make)

    def test_mutable_record_assigns(self) -> None:
        c = Counter("a")
        c.count += 1
        self.assertEqual(c, Counter("a", 1))


class PilotUsesRecordsTests(SynchronousTestCase):
    def test_no_compiled_dataclasses_in_the_pilot(self) -> None:
        """The pilot's modules use ``record``: one ``@dataclass`` costs ~1 ms at every start.

        The development server is a separate process whose start-up nobody pays
        per job; it keeps the standard decorator.  So does ``pilot.hpc``: the Ray driver
        is a payload, started once per job, and imports nothing of the pilot.
        """
        from pathlib import Path

        package = Path(__file__).resolve().parent.parent / "pilot"
        offenders = [
            str(path.relative_to(package))
            for path in sorted(package.rglob("*.py"))
            if "devserver" not in path.parts
            and "hpc" not in path.parts
            and path.name != "records.py"
            and "@dataclass" in path.read_text(encoding="utf-8")
        ]
        self.assertEqual(offenders, [])
