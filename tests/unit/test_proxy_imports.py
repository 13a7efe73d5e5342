"""proxy/ is a Workload API client like any workload: of our packages it imports only
identity/ and the generated protos (DESIGN.md, Layout), never agent/ or ca/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("identity", "api", "ca", "agent", "attestation", "proxy", "migrations", "tests", "bench")
ALLOWED = ("identity", "api.protos", "proxy")


def imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_proxy_imports_only_identity_and_the_protos() -> None:
    files = sorted((ROOT / "proxy").rglob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files for name in imported_modules(path)
        if name.split(".")[0] in OURS
        and not any(name == a or name.startswith(a + ".") for a in ALLOWED)
    ]
    assert bad == []
