"""A throwaway SoftHSM2 token for tests of the PKCS#11 key manager.

SoftHSM2 (Debian's ``softhsm2``) is a real PKCS#11 module. Each token lives in a
temporary directory named by its own ``SOFTHSM2_CONF``, so tests never touch a
system token. ``tests/run.py`` installs the package when it is missing; outside
CI a machine without it skips these tests with a message, in CI (``CI=true``)
they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.require import missing

MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
USER_PIN = "1234"
SO_PIN = "12345678"


@dataclass(frozen=True)
class SoftHsmToken:
    """A freshly initialised token: where its module is, its label and PIN."""

    module_path: str
    token_label: str
    pin: str
    conf: Path


def module_path() -> str | None:
    """The SoftHSM2 module on this machine, or None."""
    return next((p for p in MODULE_PATHS if Path(p).exists()), None)


def unavailable(reason: str) -> None:
    """Skip outside CI; fail loudly in CI, where SoftHSM2 is required."""
    __tracebackhide__ = True
    missing(f"SoftHSM2 unavailable ({reason}); install Debian's softhsm2")


_token: SoftHsmToken | None = None


def make_token(tmp_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """This process's token, initialised on first use.

    The module reads SOFTHSM2_CONF and lists its tokens once, when python-pkcs11
    loads it (C_Initialize), and python-pkcs11 keeps one loaded library per
    process: so a process has one temporary token, shared by its tests (key ids
    are replaced on generate, so tests do not see each other's keys by accident).
    """
    global _token
    if _token is not None:
        return _token
    path = module_path()
    util = shutil.which("softhsm2-util")
    if path is None or util is None:
        unavailable("no libsofthsm2.so or softhsm2-util")
    assert path is not None and util is not None
    tmp = tmp_factory.mktemp("softhsm")
    tokens = tmp / "tokens"
    tokens.mkdir(mode=0o700)
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    label = "sigil-test"
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", USER_PIN,
         "--so-pin", SO_PIN],
        check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    _token = SoftHsmToken(path, label, USER_PIN, conf)
    return _token
