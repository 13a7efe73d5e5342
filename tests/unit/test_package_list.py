"""pyproject.toml lists every package explicitly ("api", "agent" and "ca" are generic
names): a new subpackage missing from that list would be missing from the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("identity", "api", "ca", "agent", "attestation", "proxy", "migrations")


def test_every_package_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in TOPS for init in (ROOT / top).rglob("__init__.py")}
    assert sorted(found - listed) == [], "add these to [tool.setuptools] packages"
    assert sorted(listed - found) == [], "listed but not a package"
