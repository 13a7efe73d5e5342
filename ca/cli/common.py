"""What every sigil-server command shares: the admin socket client, output and
option helpers, and the value types (durations, selectors, SPIFFE IDs) of the flags."""

from __future__ import annotations

# isort: off
from attestation import quietgrpc  # noqa: F401  (before anything imports grpc)
# isort: on

import datetime as dt
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc

from api.protos.sigil.admin.v1 import admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from ca.config.defaults import DEFAULT_SOCKET_PATH
from identity.errors import SigilError

EXIT_ERROR = 2
ADMIN_TIMEOUT = 30.0
T = TypeVar("T")


class CliError(click.ClickException):
    """An error shown as one ``Error: <reason>`` line, exit code 2."""

    exit_code = EXIT_ERROR


def _fail(message: str) -> NoReturn:
    raise CliError(" ".join(message.split()))


def _default_socket() -> str:
    return os.environ.get("SIGIL_SERVER_SOCKET") or DEFAULT_SOCKET_PATH


socket_option = click.option(
    "--socket-path", type=click.Path(dir_okay=False), default=_default_socket,
    show_default="$SIGIL_SERVER_SOCKET or " + DEFAULT_SOCKET_PATH,
    help="The server's admin socket.",
)
output_option = click.option(
    "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Output format; json keys are stable.",
)


@contextmanager
def _admin(socket_path: str) -> Iterator[admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    try:
        yield admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()


def _call(socket_path: str, fn: Callable[[admin_pb2_grpc.AdminStub], T]) -> T:
    if not Path(socket_path).exists():
        _fail(f"cannot reach the server: admin socket {socket_path} does not exist "
              "(is the server running? pass --socket-path)")
    # Whoever controls the socket's directory could serve a fake admin API there
    # (and read what we send, or hand us their join token): refuse to talk.
    from attestation.socketdir import check_socket_directory

    try:
        check_socket_directory(Path(socket_path), client=True)
    except SigilError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot check admin socket {socket_path}: {exc.strerror}")
    with _admin(socket_path) as stub:
        try:
            return fn(stub)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                _fail(f"cannot reach the server at {socket_path}: {exc.details()}")
            _fail(f"{exc.details()} ({code.name})")


def _unix_to_rfc3339(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def entry_json(e: types_pb2.Entry) -> dict[str, Any]:
    """An entry as stable JSON keys (times RFC 3339 UTC, null when unset)."""
    return {
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": [{"type": s.type, "value": s.value} for s in e.selectors],
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": list(e.dns_names),
        "federates_with": list(e.federates_with),
        "hint": e.hint,
        "admin": e.admin,
        "downstream": e.downstream,
        "expires_at": _unix_to_rfc3339(e.expires_at) if e.expires_at else None,
        "revision": e.revision,
        "created_at": _unix_to_rfc3339(e.created_at) if e.created_at else None,
        "updated_at": _unix_to_rfc3339(e.updated_at) if e.updated_at else None,
    }


def _entry_text(e: types_pb2.Entry) -> str:
    lines = [
        f"Entry ID      : {e.id}",
        f"SPIFFE ID     : {e.spiffe_id}",
        f"Parent ID     : {e.parent_id}",
        f"X509-SVID TTL : {e.x509_svid_ttl or 'default'}",
        f"JWT-SVID TTL  : {e.jwt_svid_ttl or 'default'}",
    ]
    lines += [f"Selector      : {s.type}:{s.value}" for s in e.selectors]
    lines += [f"DNS name      : {n}" for n in e.dns_names]
    lines += [f"Federates with: {td}" for td in e.federates_with]
    if e.hint:
        lines.append(f"Hint          : {e.hint}")
    return "\n".join(lines)


def _emit_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def _emit_count(count: int, output: str, one: str, many: str) -> None:
    """A count as ``{"count": n}`` or as "n things"."""
    if output == "json":
        _emit_json({"count": count})
    else:
        click.echo(f"{count} {one if count == 1 else many}")


# Selector types some attestor produces: a selector's type is its plugin's name
# (attestation/), plus the join-token agent's spiffe_id. An entry with another type
# can never match anything: it is nearly always a typo, or a missing "unix:".
KNOWN_SELECTOR_TYPES = ("join_token", "k8s", "k8s_psat", "spiffe_id", "sshpop", "unix",
                        "x509pop")
# Values of the unix and k8s workload attestors, for "did you mean" when the type is missing.
_SELECTOR_HINTS = {
    "unix": ("uid", "gid", "user", "group", "path", "sha256", "supplementary_gid",
             "supplementary_group"),
    "k8s": ("ns", "sa", "pod-uid", "pod-name", "pod-label", "pod-owner", "node-name",
            "container-name", "container-image"),
}
# A join token is "<16 hex id>.<secret>" (attestation/node/join_token.py).
_JOIN_TOKEN_RE = re.compile(r"\b([0-9a-f]{16})\.[A-Za-z0-9_-]{16,}")


def _refuse_token_secret(flag: str, value: str) -> None:
    """Refuse a value holding a whole join token: the secret part must never reach
    the datastore (nor this command's output); the agent's ID uses the token's ID."""
    match = _JOIN_TOKEN_RE.search(value)
    if match:
        _fail(f"{flag} contains a join token's secret (the part after the dot): give only "
              f"its ID, {match.group(1)} (e.g. spiffe://<trust domain>/sigil/agent/join_token/"
              f"{match.group(1)}); nothing was sent")


def _parse_selectors(values: Sequence[str], *, check_types: bool = False,
                     force: bool = False) -> list[types_pb2.Selector]:
    from identity.selectors import Selector

    out = []
    for text in values:
        _refuse_token_secret("--selector", text)
        try:
            sel = Selector.parse(text)
        except SigilError as exc:
            _fail(str(exc))
        if check_types and sel.type not in KNOWN_SELECTOR_TYPES:
            _unknown_selector_type(text, sel.type, force=force)
        out.append(types_pb2.Selector(type=sel.type, value=sel.value))
    return out


def _unknown_selector_type(text: str, kind: str, *, force: bool) -> None:
    hint = ""
    for known, values in _SELECTOR_HINTS.items():
        if kind in values:
            hint = f" (did you mean {known}:{text}?)"
    message = (f"--selector {text}: no attestor makes selectors of type {kind!r}{hint}; "
               f"known types: {', '.join(KNOWN_SELECTOR_TYPES)}")
    if not force:
        _fail(f"{message}; --force to register it anyway")
    click.echo(f"Warning: {message}", err=True)


def _check_spiffe_id(value: str | None, flag: str) -> None:
    from identity.spiffeid import SpiffeId

    if value is None:
        return
    _refuse_token_secret(flag, value)
    try:
        SpiffeId.parse(value)
    except SigilError as exc:
        _fail(f"{flag}: {exc}")


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """A lifetime in whole seconds: ``600``, ``90s``, ``10m``, ``1h``, ``2d`` or ``1h30m``.

    Every TTL flag takes it, so one form works everywhere (config keys too:
    identity.configvalues). ``allow_zero``: ``0`` is accepted and means "the
    server's default" (the entry TTLs)."""

    name = "duration"

    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from identity.configvalues import parse_duration

        if isinstance(value, int):
            value = str(value)
        if self.allow_zero and value.strip() in ("0", "0s"):
            return 0
        try:
            seconds = int(parse_duration(value.strip(), allow_milliseconds=False)
                          .total_seconds())
        except SigilError as exc:
            self.fail(str(exc), param, ctx)
        if seconds > 2**31 - 1:
            self.fail(f"duration {value!r} is too long", param, ctx)
        return seconds


DURATION = Duration()
DURATION_OR_DEFAULT = Duration(allow_zero=True)


def sigil_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sigil")
    except PackageNotFoundError:
        return "unknown"


def _all_pages(socket_path: str, list_page: Callable[[admin_pb2_grpc.AdminStub, str], Any],
               items: str) -> list[Any]:
    """Every item of a paged admin listing: ``list_page(stub, page_token)`` per page."""
    out: list[Any] = []
    token = ""
    while True:
        page = _call(socket_path, lambda stub: list_page(stub, token))  # noqa: B023 - called now
        out.extend(getattr(page, items))
        token = page.next_page_token
        if not token:
            return out


def _emit_list(items: Sequence[Any], output: str, to_json: Callable[[Any], object],
               to_text: Callable[[Any], str], one: str, many: str) -> None:
    """A listing as ``{"<many>": [...]}`` (the shape of every list command), or
    "Found n things" and each thing's text."""
    if output == "json":
        _emit_json({many: [to_json(i) for i in items]})
        return
    click.echo(f"Found {len(items)} {one if len(items) == 1 else many}")
    for i in items:
        click.echo("")
        click.echo(to_text(i))
