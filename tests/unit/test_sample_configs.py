"""deploy/config/server.toml and agent.toml: they load with the real loaders, every
key docs/configuration.md documents appears in them, and each top-level line they
show commented out is valid when uncommented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import agent.config
import ca.config.server

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
SAMPLES = {"Server configuration": ROOT / "deploy" / "config" / "server.toml",
           "Agent configuration": ROOT / "deploy" / "config" / "agent.toml"}
LOADERS = {"Server configuration": ca.config.server.load_config,
           "Agent configuration": agent.config.load_config}
_ROW_KEY = re.compile(r"^\|\s*`([a-z][a-z0-9_]*)`\s*\|")
_TABLE = re.compile(r"^#{2,4}\s+`\[([a-z][a-z0-9_.<>]*)\]`")


def documented(section: str) -> tuple[set[str], set[str]]:
    """(keys, tables) of one ``# ...`` section of docs/configuration.md."""
    keys: set[str] = set()
    tables: set[str] = set()
    inside = False
    for line in DOC.read_text().splitlines():
        if line.startswith("# "):
            inside = line[2:].strip() == section
        elif inside and (table := _TABLE.match(line)):
            tables.add(table.group(1))
        elif inside and (row := _ROW_KEY.match(line)):
            keys.add(row.group(1))
    return keys, tables


@pytest.mark.parametrize("section", sorted(SAMPLES))
def test_every_documented_key_and_table_is_in_the_sample(section: str) -> None:
    keys, tables = documented(section)
    assert len(keys) > 15 and tables, "the doc's layout changed: nothing found"
    text = SAMPLES[section].read_text()
    missing = sorted(k for k in keys if not re.search(rf"^#? ?{k} = ", text, flags=re.M))
    assert missing == [], f"{SAMPLES[section].name} lacks {missing}"
    for table in tables:
        pattern = re.escape(table).replace(re.escape("<name>"), "[a-z0-9-]+")
        assert re.search(rf"^#? ?\[\[?{pattern}\]", text, flags=re.M), table


@pytest.mark.parametrize("section", sorted(SAMPLES))
def test_the_sample_loads(section: str) -> None:
    cfg = LOADERS[section](SAMPLES[section])
    assert cfg.trust_domain.name == "example.org"


def _top_level_commented(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        if re.match(r"^# ?\[", line):
            break  # tables from here on: they depend on each other
        if re.match(r"^# [a-z_0-9]+ = ", line):
            out.append(line[2:])
    return out


@pytest.mark.parametrize(("section", "line"), [
    (s, line) for s in sorted(SAMPLES) for line in _top_level_commented(SAMPLES[s])])
def test_each_commented_line_is_valid_uncommented(section: str, line: str,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SAMPLES[section].read_text() + "\n" + line + "\n")
    LOADERS[section](path)
