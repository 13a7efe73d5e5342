"""Helper mode's SPIFFE bundle map file (``helper.bundle_map_file``): every trust
domain's X.509 authorities in one JSON document, replaced atomically."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.helper import load_config_file
from identity.bundle import parse_bundle_map
from identity.errors import BundleError
from identity.spiffeid import TrustDomain
from tests.integration.test_agent_cli_helper import UID, WEB, run_helper, wait_until
from tests.integration.workload_api_harness import Harness, TestCA, entry

OWN = TrustDomain("example.org")


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def _map(path: Path) -> dict[str, tuple[object, ...]]:
    return {b.trust_domain.name: b.x509_authorities for b in parse_bundle_map(path.read_bytes())}


def test_helper_writes_the_bundle_map_atomically(harness: Harness, tmp_path: Path) -> None:
    fed = TestCA(TrustDomain("partner.org"))
    web = entry("w", WEB, UID)
    web = type(web)(**{**{f: getattr(web, f) for f in web.__slots__},  # type: ignore[attr-defined]
                       "federates_with": (fed.td,)})
    harness.set_state([web])
    harness.call(lambda: harness.cache.set_bundles({OWN: harness.ca.bundle(),
                                                    fed.td: fed.bundle()}))
    out = tmp_path / "out"
    toml = tmp_path / "helper.toml"
    toml.write_text(f"[helper]\nsocket_path = '{harness.socket_path}'\ndir = '{out}'\n"
                    "bundle_map_file = 'bundles.json'\n")
    config = load_config_file(toml, {})
    assert config.bundle_map_file == out / "bundles.json"
    old_umask = os.umask(0o077)  # a restrictive umask: the map must still be 0644
    helper, t = run_helper(config)
    try:
        path = out / "bundles.json"
        wait_until(lambda: path.exists() and "partner.org" in _map(path))
        assert _map(path) == {"example.org": (harness.ca.cert,), "partner.org": (fed.cert,)}
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        # A reader polling the file during rotations never sees a partial document.
        stop = threading.Event()
        reads: list[int] = []
        failures: list[str] = []

        def read() -> None:
            while not stop.is_set():
                try:
                    parse_bundle_map(path.read_bytes())
                    reads.append(1)
                except (BundleError, FileNotFoundError) as exc:
                    failures.append(str(exc))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for _ in range(5):
            before = helper.updates
            harness.set_state([web], bundles=False)
            wait_until(lambda before=before: helper.updates > before)
        stop.set()
        reader.join(timeout=10)
        assert failures == [] and len(reads) > 0
        # Federation dropped: the map follows; no temporary file is left behind.
        harness.call(lambda: harness.cache.set_bundles({OWN: harness.ca.bundle()}))
        wait_until(lambda: "partner.org" not in _map(path))
        assert _map(path) == {"example.org": (harness.ca.cert,)}
        assert sorted(p.name for p in out.iterdir()) == [
            "bundle.pem", "bundles.json", "svid.key", "svid.pem"]
    finally:
        os.umask(old_umask)
        helper.stop()
        t.join(timeout=10)
    assert not t.is_alive()


@pytest.mark.parametrize("name", ["svid.pem", "svid.key", "bundle.pem",
                                  "federated_bundle_x.pem"])
def test_bundle_map_file_may_not_overwrite_another_helper_file(tmp_path: Path,
                                                                name: str) -> None:
    result = CliRunner().invoke(main, ["helper", "--socket-path", "/s.sock", "--dir", "d",
                                       "--bundle-map-file", name],
                                env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "would overwrite one of the helper's other files" in lines[0]


def test_helper_cli_flag_writes_the_map(harness: Harness, tmp_path: Path) -> None:
    harness.set_state([entry("w", WEB, UID)])
    out = tmp_path / "files"
    elsewhere = tmp_path / "shared" / "spiffe-bundles.json"  # an absolute path
    result = CliRunner().invoke(main, ["helper", "--socket-path", str(harness.socket_path),
                                       "--dir", str(out), "--bundle-map-file", str(elsewhere),
                                       "--count", "1"], env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 0, result.output
    assert _map(elsewhere) == {"example.org": (harness.ca.cert,)}
    assert not (out / "spiffe-bundles.json").exists()
