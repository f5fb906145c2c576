"""The package's floors: no module imports one on a higher floor, and no import circle.

The house order is `cli → server → api → services → {storage, db, format}`, with the SDK
(`client`) beside the server side and standing only on the floors below it. Every module of
`exchange` is placed in `FLOORS` by its dotted name (the longest matching prefix wins); a new
module that fits no entry fails `test_every_module_has_a_floor` until it is given one.

The graph is read from the source with `ast`, not by importing: relative imports are resolved,
and every import counts wherever it stands — inside functions, and inside `if TYPE_CHECKING:`
(a type-only import still says which way the knowledge runs, and turns into a real one the day
someone drops the guard).

What this test does not do: look at third-party imports, or at which names a module uses from
another (`_private` names across modules are a review matter, not a graph one).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exchange"

#: Floor -> the modules on it (dotted prefixes) and the lower floors it may import; same-floor
#: imports are always allowed. Listed low to high: a floor may only name floors listed before it.
FLOORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # Pure leaves: bytes in, bytes out; nothing here imports anything above it.
    "format": (
        (
            "exchange",  # the package itself: its version
            "exchange.format",
            "exchange.errors",
            "exchange.durations",
            "exchange.sizes",
            "exchange.redaction",
            "exchange.text",
        ),
        (),
    ),
    # What the services stand on: the database, object storage, settings, keys, atomic file
    # writes, and the audit log's verifier and witness (which the CLI also runs on their own).
    "base": (
        (
            "exchange.db",
            "exchange.storage",
            "exchange.settings",
            "exchange.files",
            "exchange.identity",
            "exchange.auditverify",
            "exchange.witness",
        ),
        ("format",),
    ),
    "services": (("exchange.services",), ("base", "format")),
    "api": (("exchange.api",), ("services", "base", "format")),
    # The process around the app.
    "server": (("exchange.server",), ("api", "services", "base", "format")),
    # Development tooling (the `dev` extra): the embedded SeaweedFS and the local stack around
    # the server. Nothing of the product imports it.
    "dev": (("exchange.dev",), ("server", "api", "services", "base", "format")),
    # The SDK: the other side of the wire, never the server's code.
    "client": (("exchange.client",), ("base", "format")),
    # The auditors' console: a local server on the SDK's side of the wire.
    "console": (("exchange.console",), ("client", "base", "format")),
    "cli": (("exchange.cli",), ("console", "client", "server", "api", "services", "base", "format")),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The package's modules `name` imports, each with the line of the import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from .pkg import mod` imports the submodule; `from .mod import name`, the module.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "exchange" or target.startswith("exchange."):
                # `import exchange.a.b` names a module; a name past it is an attribute.
                while target not in modules:
                    target = target.rpartition(".")[0]
                yield target, node.lineno


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, path, modules):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _floor(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for floor, (prefixes, _) in FLOORS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), floor)
    return None if best is None else best[1]


def _cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle, as the modules along it (first == last), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_floors_are_listed_low_to_high() -> None:
    seen: list[str] = []
    for floor, (_, below) in FLOORS.items():
        assert set(below) <= set(seen), f"{floor} may import floors not listed before it"
        seen.append(floor)


def test_every_module_has_a_floor() -> None:
    homeless = sorted(m for m in _modules() if _floor(m) is None)
    assert not homeless, f"add these modules to FLOORS in tests/test_layers.py: {homeless}"


def _upward(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import of a floor its importer may not import, as `module:line: …`."""
    upward = []
    for module, edges in sorted(graph.items()):
        floor = _floor(module)
        for target, line in sorted(edges.items()):
            to = _floor(target)
            if floor is None or to is None or to == floor:
                continue
            if to not in FLOORS[floor][1]:
                upward.append(f"{module}:{line}: {module} ({floor}) imports {target} ({to})")
    return upward


def test_no_module_imports_a_higher_floor() -> None:
    upward = _upward(_graph())
    assert not upward, "imports up a floor (or across to the other side):\n" + "\n".join(upward)


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("exchange.services.uploads", "exchange.services.records", True),
        ("exchange.services.records", "exchange.format.manifest", True),
        ("exchange.api.artifacts", "exchange.services.uploads", True),
        ("exchange.cli.server", "exchange.server", True),
        ("exchange.client.links", "exchange.format.age", True),
        ("exchange.services.records", "exchange.api.keys", False),
        ("exchange.db._base", "exchange.services.audit", False),
        ("exchange.format.manifest", "exchange.storage", False),
        ("exchange.errors", "exchange.settings", False),
        ("exchange.api.app", "exchange.server", False),
        ("exchange.client.artifacts", "exchange.services.artifacts", False),
        ("exchange.services.links", "exchange.client", False),
    ],
)
def test_the_floor_check_refuses_upward_imports(importer: str, imported: str, allowed: bool) -> None:
    assert (_upward({importer: {imported: 1}, imported: {}}) == []) is allowed


def test_no_import_circle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "circle"),
    [
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {}}, None),
        ({"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {}}, None),
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, ["a", "b", "c", "a"]),
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {"b": 1}}, ["b", "c", "b"]),
        ({"a": {"a": 1}}, ["a", "a"]),
    ],
)
def test_the_circle_finder_finds_circles(graph: dict[str, dict[str, int]], circle: list[str] | None) -> None:
    assert _cycle(graph) == circle
