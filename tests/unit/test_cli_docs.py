"""docs/cli.md lists every command of both programs (a heading each), and nothing
else; each example there names only options its command has. Shell completion, as
documented there, answers."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from agent.cli import main as agent_cli
from ca.cli import cli as server_cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
ROOTS = {"sigil-server": server_cli, "sigil-agent": agent_cli}


def _leaves(cmd: click.Command, path: list[str]) -> Iterator[tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, [*path, name])
    else:
        yield " ".join(path), cmd


def _tree() -> dict[str, click.Command]:
    return {p: c for prog, root in ROOTS.items() for p, c in _leaves(root, [prog])}


def _sections() -> dict[str, str]:
    """Each ``#### `sigil-... ...``` heading of the reference, with its text."""
    text = DOC.read_text()
    parts = re.split(r"^#### `(sigil-(?:server|agent) [^`]+)`\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_command_has_a_heading_and_every_heading_a_command() -> None:
    documented = set(_sections())
    actual = set(_tree())
    assert not actual - documented, f"commands missing from docs/cli.md: {actual - documented}"
    assert not documented - actual, f"docs/cli.md documents no such command: {documented - actual}"


@pytest.mark.parametrize("path", sorted(_sections()))
def test_each_example_uses_real_options(path: str) -> None:
    section = _sections()[path]
    examples = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert examples, f"{path}: no example"
    cmd = _tree()[path]
    known = {opt for p in cmd.params for opt in [*p.opts, *p.secondary_opts]}
    for line in examples[0].strip().splitlines():
        command = re.split(r" [>|] ", line)[0]  # a redirection or a pipe ends it
        words = shlex.split(re.sub(r"<[^>]*>", "X", command))  # <placeholders>
        assert " ".join(words[: len(path.split())]) == path, line
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        assert flags <= known, f"{path}: {flags - known} are not options"


@pytest.mark.parametrize(("prog", "words", "cword", "expected"), [
    ("sigil-server", "sigil-server en", "1", "plain,entry"),
    ("sigil-agent", "sigil-agent api f", "2", "plain,fetch"),
])
def test_shell_completion_answers(prog: str, words: str, cword: str, expected: str) -> None:
    var = "_" + prog.upper().replace("-", "_") + "_COMPLETE"
    script = Path(sys.executable).parent / prog
    assert script.exists(), f"{prog} is not installed next to {sys.executable}"
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, var: "bash_complete", "COMP_WORDS": words,
                               "COMP_CWORD": cword})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [expected]
