"""Inside ca/ the import arrows point one way (docs/internals.md, "Map of ca/"):

    cli -> server, workers, health -> api -> registry, authority, federation, kubernetes
        -> datastore, keys, config -> errors, log, metrics, ratelimit -> identity

A module may import its own part, any part of a lower layer, and a part of its own
layer as long as the parts' graph stays free of cycles. Nothing imports ca/cli/.
And ca/cli/ talks to the server through the admin API client: what it imports from
below is listed in CLI_BELOW, each with the command that needs it.

Every module is parsed (ast), so lazy imports inside functions count too; imports
under ``if TYPE_CHECKING:`` do not (annotations only, no arrow at run time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Top layer first. A "part" is a subpackage of ca/ or one of its remaining flat modules.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ca.cli",),
    ("ca.server", "ca.workers", "ca.health"),
    ("ca.api",),
    ("ca.registry", "ca.authority", "ca.federation", "ca.kubernetes"),
    ("ca.datastore", "ca.keys", "ca.config"),
    ("ca.errors", "ca.log", "ca.metrics", "ca.ratelimit", "ca"),
)
LAYER_OF = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}

# What ca/cli/ imports from below the admin API, and why (by design, not a shortcut).
CLI_BELOW = {
    "ca.server": "run: assembles the server in this process",
    "ca.workers": "run: supervises the extra agent API processes",
    "ca.ratelimit": "run: the rate-limit buckets shared with the workers",
    "ca.config": "run and config check load the file; defaults for --help",
    "ca.datastore": "entry check: reads the stored entries without a running server",
    "ca.registry.policycheck": "entry check: the same check the server runs at start",
    "ca.registry.foreign_bundles": "bundle set: parse and check the input before sending",
    "ca.errors": "the error types those parsers raise",
    "ca.log": "run: log setup",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    pieces = module.split(".")
    return ".".join(pieces[:2]) if len(pieces) > 1 else module


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, typing_too: bool) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if not typing_too and isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for stmt in child.orelse for n in [stmt, *_walk(stmt, typing_too)])
            continue
        yield child
        yield from _walk(child, typing_too)


def imports_of(path: Path, prefix: str = "ca.", *, typing_too: bool = False) -> set[str]:
    """The modules under ``prefix`` imported (for ``from a.b import c``: a.b, and a.b.c
    when that is a module); ``typing_too`` counts ``if TYPE_CHECKING:`` imports too."""
    names: set[str] = set()
    for node in _walk(ast.parse(path.read_text(), str(path)), typing_too):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (ROOT / (sub.replace(".", "/") + ".py")).exists() or \
                        (ROOT / sub.replace(".", "/") / "__init__.py").exists():
                    names.add(sub)
    return {n for n in names if n.startswith(prefix) or n == prefix.rstrip(".")}


def ca_imports() -> dict[str, set[str]]:
    files = sorted((ROOT / "ca").rglob("*.py"))
    assert files
    return {module_name(path): imports_of(path) for path in files}


def test_every_part_of_ca_has_a_layer() -> None:
    unmapped = sorted({part_of(m) for m in ca_imports()} - set(LAYER_OF))
    assert unmapped == [], "add these to LAYERS (and to the map in docs/internals.md)"


def test_no_import_points_up() -> None:
    bad = []
    for module, imported in ca_imports().items():
        src = part_of(module)
        for name in imported:
            dst = part_of(name)
            if dst != src and dst in LAYER_OF and LAYER_OF[dst] < LAYER_OF[src]:
                bad.append(f"{module} imports {name}")
    assert sorted(bad) == []


def test_the_parts_form_no_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for module, imported in ca_imports().items():
        src = part_of(module)
        edges.setdefault(src, set()).update(
            part_of(n) for n in imported if part_of(n) != src)
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, "import cycle: " + " -> ".join((*path, node))
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, (*path, node))
        done.add(node)

    for start in sorted(edges):
        visit(start, ())


def test_the_cli_reaches_below_the_admin_api_only_where_listed() -> None:
    bad = []
    for module, imported in ca_imports().items():
        if part_of(module) != "ca.cli":
            continue
        for name in imported:
            if part_of(name) in ("ca.cli", "ca"):  # "ca": from ca import log
                continue
            if not any(name == allowed or name.startswith(allowed + ".") for allowed in CLI_BELOW):
                bad.append(f"{module} imports {name}")
    assert sorted(bad) == []


def _find_cycle(edges: dict[str, set[str]]) -> list[str]:
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        for nxt in sorted(edges.get(node, ())):
            if found := visit(nxt, (*path, node)):
                return found
        done.add(node)
        return []

    for start in sorted(edges):
        if found := visit(start, ()):
            return found
    return []


def test_identity_has_no_import_cycle_not_even_for_annotations() -> None:
    # bundle.py imports x509svid.py; x509svid.py declares the Protocol it needs itself.
    edges = {module_name(path): imports_of(path, "identity.", typing_too=True)
             for path in sorted((ROOT / "identity").rglob("*.py"))}
    assert " -> ".join(_find_cycle(edges)) == ""


def test_ca_does_not_import_the_migrations_package() -> None:
    # migrations/env.py imports the datastore; the runner (ca.datastore.migrate) finds
    # the scripts by path, so the arrow between the two points one way.
    bad = [f"{module_name(path)} imports {name}"
           for path in sorted((ROOT / "ca").rglob("*.py"))
           for name in imports_of(path, "migrations.", typing_too=True)]
    assert bad == []


def test_the_checker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nimport ca.cli\n"
                      "if TYPE_CHECKING:\n    from ca.server import SigilServer\n"
                      "def f():\n    from ca.api import admin\n")
    assert imports_of(source) == {"ca.cli", "ca.api", "ca.api.admin"}
    assert imports_of(source, typing_too=True) == {
        "ca.cli", "ca.api", "ca.api.admin", "ca.server"}
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
