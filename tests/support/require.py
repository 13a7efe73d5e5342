"""Required real parts of the test run: skipped on a developer's machine, failed in CI.

Some tests need something outside the repository: py-spiffe and the other test
extras, ``openssl``, root, SoftHSM2, nginx, the database servers, the go-spiffe
vectors in ``../shared/testdata``. On a developer's machine a missing one skips
those tests with a message (``pytest -ra`` lists them). In CI a silent skip would
pass a run that never exercised them, so there :func:`require` fails the test (or,
at module level, the collection) with the same message. Every such skip in
``tests/`` goes through this module; the genuinely optional ones (a kernel feature,
a test that only applies to one database) call ``pytest.skip`` themselves.
docs/development.md, "Required and optional parts", lists both.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

HINT = "see docs/development.md, 'Required and optional parts'"


def in_ci() -> bool:
    """True when the environment variable CI is set (CI=true; anything but 0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(why: str, hint: str = HINT) -> NoReturn:
    """Skip (locally) or fail (in CI) because a required part is missing: ``why``."""
    __tracebackhide__ = True  # skips and failures point at the caller
    if in_ci():
        pytest.fail(f"CI requires it: {why} ({hint})", pytrace=False)
    pytest.skip(f"{why} ({hint})", allow_module_level=True)


def require(condition: bool, why: str) -> None:
    """Go on when ``condition`` holds; else skip locally, fail in CI, saying ``why``.

    Usable in a test, a fixture, or at module level (then in CI the module's
    collection fails, which fails the run).
    """
    __tracebackhide__ = True  # skips and failures point at the caller
    if not condition:
        missing(why)


def require_module(name: str, package: str | None = None) -> ModuleType:
    """Import ``name`` (from the distribution ``package``, for the message), or :func:`missing`."""
    __tracebackhide__ = True  # skips and failures point at the caller
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        error = exc
    missing(f"{package or name} is not installed ({error}); `python3 dev.py test` installs "
            "the test extra")


def require_program(name: str) -> str:
    """The path of the program ``name`` on PATH, or :func:`missing`."""
    __tracebackhide__ = True  # skips and failures point at the caller
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (not on PATH)")
    assert path is not None
    return path


def require_root(what: str) -> None:
    """Root is needed for ``what`` (e.g. "to run a process as another user")."""
    __tracebackhide__ = True  # skips and failures point at the caller
    require(os.geteuid() == 0, f"needs root {what}")
