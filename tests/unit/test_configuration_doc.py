"""docs/configuration.md documents exactly the keys the config modules accept."""

from __future__ import annotations

import re
from pathlib import Path

import agent.config
import ca.config.server

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_ROW_KEY = re.compile(r"^\|\s*`([a-z][a-z0-9_]*)`\s*\|")
_TABLE_HEADING = re.compile(r"^#{2,4}\s+`\[([a-z][a-z0-9_]*)[\].]")


def documented_keys(section_title: str) -> set[str]:
    """Top-level keys in one ``# ...`` section: first-column names of its tables
    (lower case, so environment variables are not counted) outside ``[table]``
    subsections, plus the name of each ``[table]`` subsection."""
    keys: set[str] = set()
    in_section = in_subtable = False
    for line in DOC.read_text().splitlines():
        if line.startswith("# "):
            in_section = line[2:].strip() == section_title
            in_subtable = False
            continue
        if not in_section:
            continue
        if line.startswith("#"):
            heading = _TABLE_HEADING.match(line)
            in_subtable = heading is not None
            if heading:
                keys.add(heading.group(1))
            continue
        row = _ROW_KEY.match(line)
        if row and not in_subtable:
            keys.add(row.group(1))
    return keys


def test_server_keys_match_the_doc() -> None:
    documented = documented_keys("Server configuration")
    assert sorted(documented - ca.config.server.KNOWN_KEYS) == [], "documented but unknown"
    assert sorted(ca.config.server.KNOWN_KEYS - documented) == [], "known but undocumented"


def test_agent_keys_match_the_doc() -> None:
    documented = documented_keys("Agent configuration")
    assert sorted(documented - agent.config.KNOWN_KEYS) == [], "documented but unknown"
    assert sorted(agent.config.KNOWN_KEYS - documented) == [], "known but undocumented"


def test_the_parser_sees_tables_and_subtables() -> None:
    # A guard on the guard: if the doc's layout changed so that nothing matched,
    # the comparisons above would fail loudly rather than pass on empty sets.
    assert {"trust_domain", "bind_address"} <= documented_keys("Server configuration")
    assert {"workload_attestors", "sync_interval"} <= documented_keys("Agent configuration")
