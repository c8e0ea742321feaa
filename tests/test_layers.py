"""The shape of the code base: imports run only downwards, no cycles, no oversized module.

``LAYERS`` is the architecture (``docs/architecture.md``) written as data: every module
of ``pilot/`` belongs to one layer, and a module may import only from its own layer or
the layers below.  Imports inside functions and under ``TYPE_CHECKING`` count too: a
lazy import is still a dependency.  The development server is an island: it may use
the bottom layer and nothing else, and nothing in the pilot may import it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pilot"

#: Largest module, in lines (STYLE: small modules with one clear job each).
MAX_LINES = 600

#: (layer number, module prefixes), bottom first.  A prefix matches the module and its
#: submodules.  The numbers leave room: two modules in one layer may import each other
#: only if that makes no cycle.
LAYERS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (0, ("pilot", "pilot.errorcodes", "pilot.logs", "pilot.util", "pilot.data")),
    (1, ("pilot.errors", "pilot.model", "pilot.queuedata")),
    (2, ("pilot.process",)),
    (3, ("pilot.container", "pilot.server")),
    (4, ("pilot.staging", "pilot.monitor")),
    (5, ("pilot.interfaces", "pilot.config", "pilot.experiments", "pilot.eventservice")),
    (6, ("pilot.source",)),
    (7, ("pilot.job",)),
    (8, ("pilot.service",)),
    (9, ("pilot.options", "pilot.tap", "pilot.demo", "pilot.demo_es", "pilot.localrun")),
    # payload-side programs (the Ray driver): above everything, so nothing imports them
    (10, ("pilot.hpc",)),
)
DEVSERVER = "pilot.devserver"
#: Runs in the payload's environment: it may import nothing of the pilot but itself.
STANDALONE = "pilot.hpc"
#: What the development server may use of the pilot: the bottom layer only.
DEVSERVER_MAY_USE = 0


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pilot_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: the longest matching prefix wins."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for number, prefixes in LAYERS:
        for prefix in prefixes:
            # the package itself ("pilot": its version) holds nothing below it
            if module == prefix or (prefix != "pilot" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), number)
    return None if best is None else best[1]


def imports_of(path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) for every ``pilot`` module ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pilot":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "pilot":
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield node.lineno, submodule if submodule in known else node.module


def import_graph() -> dict[str, set[str]]:
    modules = pilot_modules()
    known = set(modules)
    return {name: {target for _, target in imports_of(path, known)} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a list of modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target == node or target not in graph:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


class LayerTests(SynchronousTestCase):
    def test_every_module_has_a_layer(self) -> None:
        homeless = [m for m in pilot_modules() if layer_of(m) is None and not m.startswith(DEVSERVER)]
        self.assertEqual(homeless, [], "add these modules to LAYERS (and docs/architecture.md)")

    def test_imports_run_downwards(self) -> None:
        modules = pilot_modules()
        known = set(modules)
        upward: list[str] = []
        for name, path in modules.items():
            if name.startswith(DEVSERVER):
                continue
            mine = layer_of(name)
            assert mine is not None
            for line, target in imports_of(path, known):
                if target.startswith(DEVSERVER):
                    upward.append(f"{name}:{line} imports the development server ({target})")
                    continue
                theirs = layer_of(target)
                if theirs is not None and theirs > mine:
                    upward.append(f"{name}:{line} (layer {mine}) imports {target} (layer {theirs})")
        self.assertEqual(upward, [])

    def test_devserver_is_an_island(self) -> None:
        modules = pilot_modules()
        known = set(modules)
        leaks = [
            f"{name}:{line} imports {target}"
            for name, path in modules.items()
            if name.startswith(DEVSERVER)
            for line, target in imports_of(path, known)
            if not target.startswith(DEVSERVER) and (layer_of(target) or 0) > DEVSERVER_MAY_USE
        ]
        self.assertEqual(leaks, [])

    def test_payload_side_programs_stand_alone(self) -> None:
        modules = pilot_modules()
        known = set(modules)
        leaks = [
            f"{name}:{line} imports {target}"
            for name, path in modules.items()
            if name.startswith(STANDALONE)
            for line, target in imports_of(path, known)
            if not target.startswith(STANDALONE)
        ]
        self.assertEqual(leaks, [])
        self.assertIn(f"{STANDALONE}.raydriver", modules)

    def test_no_import_cycles(self) -> None:
        self.assertIsNone(find_cycle(import_graph()))

    def test_no_module_over_the_limit(self) -> None:
        long = {
            name: count
            for name, path in pilot_modules().items()
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
        }
        self.assertEqual(long, {})


class CheckerTests(SynchronousTestCase):
    """The checks above can fail: they find what they are meant to find."""

    def test_layer_of_uses_the_longest_prefix(self) -> None:
        self.assertEqual(layer_of("pilot"), 0)
        self.assertEqual(layer_of("pilot.model.job"), 1)
        self.assertEqual(layer_of("pilot.job.pipeline"), 7)
        self.assertIsNone(layer_of("pilot.nowhere"))

    def test_upward_import_is_seen(self) -> None:
        path = Path(self.mktemp())
        path.write_text("from pilot.job.pipeline import JobRun\nimport pilot.tap\n")
        found = list(imports_of(path, {"pilot.job.pipeline"}))
        self.assertEqual(found, [(1, "pilot.job.pipeline"), (2, "pilot.tap")])

    def test_cycle_is_found(self) -> None:
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(find_cycle(graph), ["a", "b", "c", "a"])
        self.assertIsNone(find_cycle({"a": {"b"}, "b": set()}))
