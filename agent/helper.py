"""Helper mode: keep SVID files on disk for programs that read files (spiffe-helper style).

``sigil-agent helper`` streams FetchX509SVID from the agent and, on every update,
writes into its directory:

- ``svid.pem``: the default X.509-SVID's chain, leaf first;
- ``svid.key``: its private key, PKCS#8 PEM, mode 0600;
- ``bundle.pem``: the X.509 authorities of the SVID's trust domain;
- ``federated_bundle_<trust domain>.pem``: one per federated trust domain
  (files of trust domains no longer federated are removed);
- with ``bundle_map_file`` set, a SPIFFE bundle map (Trust Domain and Bundle §5,
  ``{"trust_domains": {name: bundle}}``) of the SVID's trust domain and every
  federated one, in one file: a reader loads every trust domain's authorities in
  one read, the direction of the SPIFFE Filesystem Delivery proposal.

With ``wit_svid_file`` and ``wit_svid_key_file`` set, it also streams
FetchWITSVID and writes the default WIT-SVID (the compact JWS, mode 0644: a
WIT-SVID is worthless without a proof signed by its key, WIT-SVID §7.1) and its
private key as the JWK the agent sent (mode 0600; the JWK keeps ``alg``, which
every proof of possession must use), key first, on every rotation.

Each file is replaced atomically (a temporary file in the same directory,
fsync, rename; then the directory is fsynced), so a reader sees the old file or
the new one, never a mix. Then it runs ``cmd`` (split like a shell would, not
run by one) or sends ``signal`` to the process whose PID is in ``pid_file`` —
nginx's ``-s reload`` or ``SIGHUP``, Envoy's hot restart, and so on.

When the agent goes away (restart, upgrade) the helper reconnects with backoff
and keeps the files it wrote meanwhile: they stay valid until they expire.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal as signal_module
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent import log
from agent.config import load_toml
from agent.endpoint import parse_endpoint_address
from agent.errors import AgentError, ConfigError, EndpointAddressError
from agent.state import write_file_atomic
from agent.workload_api.client import WorkloadApiClient
from api.protos import workload_pb2 as pb
from identity.bundle import Bundle, bundle_map_to_json
from identity.errors import SigilError
from identity.keys import public_keys_equal
from identity.spiffeid import TrustDomain
from identity.witsvid import WitSvid, load_private_jwk, parse_wit_svid_insecure
from identity.x509svid import X509Svid, certificates_to_pem, load_certificates_der

SVID_FILE = "svid.pem"
KEY_FILE = "svid.key"
BUNDLE_FILE = "bundle.pem"
FEDERATED_PREFIX = "federated_bundle_"
HELPER_KEYS = frozenset({"socket_path", "dir", "cmd", "signal", "pid_file", "cmd_timeout",
                         "bundle_map_file", "wit_svid_file", "wit_svid_key_file"})
_OWN_FILES = frozenset({SVID_FILE, KEY_FILE, BUNDLE_FILE})
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0


class HelperError(AgentError):
    """Helper mode cannot write its files or notify its process."""


@dataclass(frozen=True, slots=True)
class HelperConfig:
    """What the helper does.

    Attributes:
        socket_path: the agent's Workload API socket (a path).
        dir: where the files go (created 0755 if missing).
        cmd: a command to run after each update (split with shell rules).
        signal: a signal to send after each update, to the PID in ``pid_file``.
        pid_file: a file holding the PID to signal.
        cmd_timeout: seconds ``cmd`` may run.
        bundle_map_file: where to write the SPIFFE bundle map, if anywhere
            (a relative path is inside ``dir``).
        wit_svid_file: where to write the default WIT-SVID, if anywhere (a
            relative path is inside ``dir``); set with ``wit_svid_key_file``.
        wit_svid_key_file: where to write its private key (JWK JSON, 0600).
    """

    socket_path: Path
    dir: Path
    cmd: str | None = None
    signal: signal_module.Signals | None = None
    pid_file: Path | None = None
    cmd_timeout: float = 30.0
    bundle_map_file: Path | None = None
    wit_svid_file: Path | None = None
    wit_svid_key_file: Path | None = None

    @property
    def writes_wit(self) -> bool:
        """Whether WIT-SVID files are configured (then both paths are set)."""
        return self.wit_svid_file is not None and self.wit_svid_key_file is not None


def parse_signal(text: str) -> signal_module.Signals:
    """``HUP``, ``SIGHUP`` or ``1`` -> ``signal.SIGHUP``.

    Raises:
        ConfigError: not a signal name or number this system knows.
    """
    value = text.strip().upper()
    try:
        if value.isdigit():
            return signal_module.Signals(int(value))
        return signal_module.Signals[value if value.startswith("SIG") else "SIG" + value]
    except (KeyError, ValueError):
        raise ConfigError(f"signal {text!r} is not a signal name (HUP, USR1, ...) or number") \
            from None


def build_config(raw: Mapping[str, Any], *, source: str = "") -> HelperConfig:
    """Validate helper settings (from flags or a ``[helper]`` table).

    Raises:
        ConfigError: a missing or bad value, naming it (and ``source`` when given).
    """
    where = f"{source}: " if source else ""
    for key in raw:
        if key not in HELPER_KEYS:
            raise ConfigError(f"{where}unknown key 'helper.{key}'")

    def text(key: str) -> str | None:
        value = raw.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}helper.{key} must be a string, not {value!r}")
        return value

    socket_text = text("socket_path")
    if socket_text is None:
        raise ConfigError(f"{where}the agent's socket is required (--socket-path or "
                          "helper.socket_path)")
    try:
        socket_path = Path(parse_endpoint_address(socket_text))
    except EndpointAddressError as exc:
        raise ConfigError(f"{where}socket_path: {exc}") from None
    directory = text("dir")
    if directory is None:
        raise ConfigError(f"{where}the output directory is required (--dir or helper.dir)")
    cmd = text("cmd")
    sig_text = raw.get("signal")
    sig = None
    if sig_text is not None and sig_text != "":
        sig = parse_signal(str(sig_text))
    pid_file = text("pid_file")
    if cmd is not None and sig is not None:
        raise ConfigError(f"{where}give either a command (cmd) or a signal, not both")
    if sig is not None and pid_file is None:
        raise ConfigError(f"{where}a signal needs the PID file of the process to signal "
                          "(--pid-file or helper.pid_file)")
    if pid_file is not None and sig is None:
        raise ConfigError(f"{where}pid_file is only used with a signal (--signal)")
    if cmd is not None:
        try:
            if not shlex.split(cmd):
                raise ConfigError(f"{where}cmd is empty")
        except ValueError as exc:
            raise ConfigError(f"{where}cmd {cmd!r} cannot be split: {exc}") from None
    timeout = raw.get("cmd_timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{where}helper.cmd_timeout must be a positive number of seconds")
    extra: dict[str, Path] = {}
    for key in ("bundle_map_file", "wit_svid_file", "wit_svid_key_file"):
        value = text(key)
        if value is None:
            continue
        path = Path(directory) / value  # an absolute path stays as it is
        if (path.name in _OWN_FILES or path.name.startswith(FEDERATED_PREFIX)
                or path in extra.values()):
            raise ConfigError(f"{where}helper.{key} {value!r} would overwrite "
                              "one of the helper's other files")
        extra[key] = path
    if ("wit_svid_file" in extra) != ("wit_svid_key_file" in extra):
        # A token without its key cannot make the proof it needs, and a key
        # without its token proves nothing: both or neither.
        raise ConfigError(f"{where}helper.wit_svid_file and helper.wit_svid_key_file "
                          "go together: give both or neither")
    return HelperConfig(
        socket_path=socket_path, dir=Path(directory), cmd=cmd, signal=sig,
        pid_file=Path(pid_file) if pid_file else None, cmd_timeout=float(timeout),
        bundle_map_file=extra.get("bundle_map_file"),
        wit_svid_file=extra.get("wit_svid_file"),
        wit_svid_key_file=extra.get("wit_svid_key_file"),
    )


def load_config_file(path: Path, overrides: Mapping[str, Any]) -> HelperConfig:
    """The ``[helper]`` table of a TOML file, with command-line ``overrides`` on top.

    The file may be the agent's own config (its other keys are left to the agent).

    Raises:
        ConfigError: unreadable file, no ``[helper]`` table, or a bad value.
    """
    doc = load_toml(path)
    table = doc.get("helper")
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path} has no [helper] table")
    merged = dict(table)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(merged, source=f"config file {path}")


# Writing -----------------------------------------------------------------------------


def federated_file_name(trust_domain: TrustDomain) -> str:
    """``federated_bundle_<trust domain>.pem`` (trust domain names are file-safe)."""
    return f"{FEDERATED_PREFIX}{trust_domain.name}.pem"


def write_files(directory: Path, response: pb.X509SVIDResponse, *,
                bundle_map: Path | None = None) -> X509Svid:
    """Write the default SVID, its key and the bundles of one update.

    Args:
        directory: where the files go.
        response: one update of the X.509 stream.
        bundle_map: also write the SPIFFE bundle map there (the X.509 authorities
            of the SVID's trust domain and of each federated one; the X.509 stream
            carries no JWT keys).

    Returns:
        The SVID written.

    Raises:
        HelperError: the response has no SVID or an unusable one, or a write failed.
    """
    if not response.svids:
        raise HelperError("the agent sent no X.509-SVID")
    first = response.svids[0]
    try:
        svid = X509Svid.parse_raw(first.x509_svid, first.x509_svid_key)
        own = load_certificates_der(first.bundle)
        federated = {
            TrustDomain.parse(td): load_certificates_der(der)
            for td, der in response.federated_bundles.items()
        }
    except SigilError as exc:
        raise HelperError(f"the agent sent an unusable SVID or bundle: {exc}") from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_file_atomic(directory / BUNDLE_FILE, certificates_to_pem(own), mode=0o644)
        wanted = set()
        for td, certs in federated.items():
            name = federated_file_name(td)
            wanted.add(name)
            write_file_atomic(directory / name, certificates_to_pem(certs), mode=0o644)
        for stale in directory.glob(f"{FEDERATED_PREFIX}*.pem"):
            if stale.name not in wanted:
                stale.unlink()
        if bundle_map is not None:
            own_td = svid.spiffe_id.trust_domain
            bundles = [Bundle(own_td, own)]
            bundles += [Bundle(td, certs) for td, certs in federated.items() if td != own_td]
            bundle_map.parent.mkdir(parents=True, exist_ok=True)
            _write_public_file(bundle_map, bundle_map_to_json(bundles) + b"\n")
            if bundle_map.parent != directory:
                _fsync_dir(bundle_map.parent)
        # Key before certificate: a reader that loads both between the two
        # renames gets a mismatch error and retries, rather than a stale pair
        # that looks valid.
        write_file_atomic(directory / KEY_FILE, svid.key_pem(), mode=0o600)
        write_file_atomic(directory / SVID_FILE, svid.chain_pem(), mode=0o644)
        _fsync_dir(directory)
    except OSError as exc:
        raise HelperError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    return svid


def write_wit_files(response: pb.WITSVIDResponse, *, svid_path: Path,
                    key_path: Path) -> WitSvid:
    """Write the default WIT-SVID of one FetchWITSVID update and its private key.

    The key is written as the agent sent it, a private JWK (RFC 7517) with
    ``alg``: a WIT-SVID is only ever presented with a proof of possession (the
    WIMSE WPT) whose ``alg`` must equal ``cnf.jwk.alg``, and a PEM file cannot
    say which algorithm (RS256 or PS256 for one RSA key). JOSE libraries load a
    JWK as it is. Mode 0600. The token, 0644 like ``svid.pem``: a WIT-SVID
    alone authenticates nobody (WIT-SVID §7.1: never a bearer token).

    Args:
        response: one update of the WIT stream.
        svid_path: where the token goes.
        key_path: where the key goes.

    Returns:
        The WIT-SVID written.

    Raises:
        HelperError: the response has no WIT-SVID, an unusable one, a key that is
            not its ``cnf`` key, or a write failed.
    """
    if not response.svids:
        raise HelperError("the agent sent no WIT-SVID")
    first = response.svids[0]
    try:
        wit = parse_wit_svid_insecure(first.wit_svid)
        key = load_private_jwk(first.wit_svid_key)
    except SigilError as exc:
        raise HelperError(f"the agent sent an unusable WIT-SVID or key: {exc}") from None
    if not public_keys_equal(key.public_key(), wit.confirmation_key):
        raise HelperError("the agent sent a WIT-SVID key that is not its cnf key")
    try:
        for path in (svid_path, key_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        # Key before token, as for X.509: a reader between the two renames holds a
        # key that does not match the token's cnf, which fails loudly, rather than
        # an old pair that looks valid.
        write_file_atomic(key_path, first.wit_svid_key.encode(), mode=0o600)
        write_file_atomic(svid_path, wit.token.encode(), mode=0o644)
        for directory in {svid_path.parent, key_path.parent}:
            _fsync_dir(directory)
    except OSError as exc:
        raise HelperError(f"cannot write the WIT-SVID files: {exc.strerror or exc}") from None
    return wit


def _write_public_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with a file of mode 0644 whatever the umask.

    Readers of the bundle map run as other users (that is its point), so a
    restrictive umask of the helper must not make it unreadable.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # not filtered by the umask, unlike open's mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    # The renames are durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def notify(config: HelperConfig) -> None:
    """Run the command or send the signal, if configured.

    Raises:
        HelperError: the command failed or the process could not be signalled.
    """
    if config.cmd is not None:
        argv = shlex.split(config.cmd)
        try:
            done = subprocess.run(argv, timeout=config.cmd_timeout, check=False,
                                  capture_output=True, text=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HelperError(f"command {argv[0]!r} did not run: {exc}") from None
        if done.returncode != 0:
            raise HelperError(f"command {argv[0]!r} exited with {done.returncode}: "
                              f"{done.stderr.strip()[-200:]}")
    if config.signal is not None:
        assert config.pid_file is not None
        try:
            pid = int(config.pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise HelperError(f"no PID in {config.pid_file}: {exc}") from None
        if pid <= 1:
            raise HelperError(f"refusing to signal PID {pid} from {config.pid_file}")
        try:
            os.kill(pid, config.signal)
        except OSError as exc:
            raise HelperError(f"cannot send {config.signal.name} to {pid}: "
                              f"{exc.strerror}") from None


# The loop ----------------------------------------------------------------------------


class Helper:
    """Streams X.509 updates (and WIT-SVID updates, when configured) and writes
    them, until :meth:`stop`.

    Each stream runs its own loop (the WIT one in a second thread) with its own
    reconnect backoff; writing and notifying are serialized, so the program is
    told once per update and never while another stream's files are half written.

    Args:
        config: what to do.
        on_update: called after each X.509 update has been written and notified
            (tests and ``--count`` use it).
        on_wit_update: the same for each WIT-SVID update.
    """

    def __init__(self, config: HelperConfig, *,
                 on_update: Callable[[X509Svid], None] | None = None,
                 on_wit_update: Callable[[WitSvid], None] | None = None) -> None:
        self.config = config
        self._on_update = on_update
        self._on_wit_update = on_wit_update
        self._stop = threading.Event()
        self._calls: set[Any] = set()
        self._calls_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.updates = 0
        """X.509 updates written."""
        self.wit_updates = 0
        """WIT-SVID updates written."""
        self.notify_failures: list[str] = []
        """Why each failed command or signal failed, in order (``--count`` exits 1 on any)."""

    def stop(self) -> None:
        """End :meth:`run` (safe from another thread or a signal handler)."""
        self._stop.set()
        with self._calls_lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def run(self) -> None:
        """Write every update until stopped; reconnect with backoff when the agent goes."""
        wit: threading.Thread | None = None
        if self.config.writes_wit:
            wit = threading.Thread(
                target=self._follow, name="helper-wit", daemon=True,
                args=("FetchWITSVID", pb.WITSVIDRequest(), pb.WITSVIDResponse,
                      self._handle_wit))
            wit.start()
        try:
            self._follow("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse,
                         self._handle)
        finally:
            self.stop()
            if wit is not None:
                wit.join()

    def _follow(self, method: str, request: Any, response_type: Any,
                handle: Callable[[Any], None]) -> None:
        delay = RECONNECT_MIN
        while not self._stop.is_set():
            stream: Any = None
            try:
                with WorkloadApiClient(self.config.socket_path) as client:
                    stream = client.stream(method, request, response_type)
                    with self._calls_lock:
                        self._calls.add(stream)
                    if self._stop.is_set():
                        return
                    for response in stream:
                        delay = RECONNECT_MIN
                        handle(response)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                code = exc.code()
                log.event("helper stream ended", method=method,
                          code=code.name if code else "UNKNOWN", reason=exc.details(),
                          retry_in=f"{delay:.1f}s")
            finally:
                with self._calls_lock:
                    self._calls.discard(stream)
            if self._stop.wait(delay):
                return
            delay = min(RECONNECT_MAX, delay * 2)

    def _notify(self) -> None:
        try:
            notify(self.config)
        except HelperError as exc:
            # A program still serving the old SVID fails once that expires: warn.
            log.event("helper notify failed", level=logging.WARNING, reason=str(exc))
            self.notify_failures.append(str(exc))

    def _handle(self, response: pb.X509SVIDResponse) -> None:
        with self._write_lock:
            try:
                svid = write_files(self.config.dir, response,
                                   bundle_map=self.config.bundle_map_file)
            except HelperError as exc:
                log.event("helper update not written", level=logging.WARNING, reason=str(exc))
                return
            log.event("helper files written", spiffe_id=svid.spiffe_id, dir=self.config.dir,
                      expires_at=svid.expires_at.isoformat())
            self._notify()
            self.updates += 1
        if self._on_update is not None:
            self._on_update(svid)

    def _handle_wit(self, response: pb.WITSVIDResponse) -> None:
        assert self.config.wit_svid_file is not None
        assert self.config.wit_svid_key_file is not None
        with self._write_lock:
            try:
                wit = write_wit_files(response, svid_path=self.config.wit_svid_file,
                                      key_path=self.config.wit_svid_key_file)
            except HelperError as exc:
                log.event("helper wit-svid not written", level=logging.WARNING,
                          reason=str(exc))
                return
            log.event("helper wit-svid written", spiffe_id=wit.spiffe_id,
                      path=self.config.wit_svid_file, expires_at=wit.expires_at.isoformat())
            self._notify()
            self.wit_updates += 1
        if self._on_wit_update is not None:
            self._on_wit_update(wit)


def wait_for_file(path: Path, timeout: float) -> bool:
    """Poll until ``path`` exists (tests and scripts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()

