"""Scoped admins: who may call which admin RPC (``[admin]`` in the server config).

An admin caller is a Unix user on the admin socket (its uid and gid from the
kernel, ``SO_PEERCRED``) or a workload on the agent API's TLS port whose X.509-SVID
is that of an entry marked ``admin``. Each ``[[admin.grant]]`` gives one such
identity a role; :data:`METHOD_ROLES` names the role every admin RPC needs, in one
table (a test checks it lists every method of the service, so a new RPC cannot be
left out: one missing from it is refused to everybody).

Roles: ``read`` (every call that changes nothing), ``entries`` (read, and create,
update and delete entries whose SPIFFE IDs are under the grant's ``paths``),
``agents`` (read, ban, evict, purge, join tokens), ``authority`` (read, local
authorities, foreign bundles, federation relationships, revoking SVIDs), ``all`` (everything,
minting SVIDs and the ``admin`` flag of entries included). The socket's owner
(root and the server's own user) always has ``all``; without an ``[admin]`` table
everybody who can open the socket has ``all``, as before scoped admins.

This module decides; ``ca.api.adminguard`` applies it at the gRPC edge.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.errors import ConfigError, PermissionDeniedError
from identity.errors import InvalidSpiffeIdError
from identity.spiffeid import SpiffeId, TrustDomain

READ = "read"
ENTRIES = "entries"
AGENTS = "agents"
AUTHORITY = "authority"
ALL = "all"
ROLES = (READ, ENTRIES, AGENTS, AUTHORITY, ALL)

METHOD_ROLES: Mapping[str, str] = {
    # Entries (ENTRIES methods are also checked against the grant's paths).
    "CreateEntry": ENTRIES,
    "BatchCreateEntry": ENTRIES,
    "UpdateEntry": ENTRIES,
    "DeleteEntry": ENTRIES,
    "ListEntries": READ,
    "GetEntry": READ,
    "CountEntries": READ,
    # Agents and join tokens.
    "CreateJoinToken": AGENTS,
    "BanAgent": AGENTS,
    "EvictAgent": AGENTS,
    "PurgeAgents": AGENTS,  # with dry_run it only lists, but it is one call
    "ListAgents": READ,
    "GetAgent": READ,
    "CountAgents": READ,
    # The CA, trust bundles and federation.
    "PrepareLocalAuthority": AUTHORITY,
    "ActivateLocalAuthority": AUTHORITY,
    "TaintLocalAuthority": AUTHORITY,
    "RevokeLocalAuthority": AUTHORITY,
    "ListLocalAuthorities": READ,
    "SetBundle": AUTHORITY,
    "BatchSetFederatedBundles": AUTHORITY,
    "DeleteBundle": AUTHORITY,
    "GetBundle": READ,
    "ListBundles": READ,
    "CreateFederationRelationship": AUTHORITY,
    "UpdateFederationRelationship": AUTHORITY,
    "DeleteFederationRelationship": AUTHORITY,
    "RefreshFederatedBundle": AUTHORITY,
    "ListFederationRelationships": READ,
    "GetFederationRelationship": READ,
    # An SVID for any ID of the trust domain: whoever may do this may be anybody.
    "MintX509SVID": ALL,
    "MintJWTSVID": ALL,
    # Cutting off issued SVIDs is an incident response for the trust domain.
    "RevokeSVID": AUTHORITY,
    "ListRevokedSVIDs": READ,
    "Health": READ,
}

DEFAULTS: Mapping[str, object] = {"admin": None}
AUDIT_LOG_FILE = "admin-audit.log"
_ADMIN_KEYS = frozenset({"grant", "audit_log"})
_GRANT_KEYS = frozenset({"unix_user", "unix_group", "spiffe_id", "role", "paths"})
_IDENTITY_KEYS = ("unix_user", "unix_group", "spiffe_id")


@dataclass(frozen=True, slots=True)
class Grant:
    """One ``[[admin.grant]]``: an identity (exactly one of the three) and its role."""

    role: str
    paths: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None
    spiffe_id: SpiffeId | None = None

    def allows(self, needed: str) -> bool:
        """Whether this grant's role covers a method needing ``needed`` (paths aside)."""
        return self.role in (ALL, needed) or needed == READ

    def covers(self, path: str) -> bool:
        """Whether a SPIFFE ID path is under one of this grant's path prefixes."""
        if self.role == ALL:
            return True
        return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/")
                   for p in self.paths)

    def describe(self) -> str:
        """``entries for /team-a/, /ops/`` or just the role."""
        if self.role == ENTRIES:
            return f"{ENTRIES} for {', '.join(self.paths)}"
        return self.role


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The validated ``[admin]`` table.

    Attributes:
        enabled: an ``[admin]`` table was given (else whoever can open the
            socket has ``all``, and no SVID is an admin over TLS).
        grants: the ``[[admin.grant]]`` entries, in file order.
        audit_log: the JSON-lines audit file (default ``<data_dir>/admin-audit.log``).
    """

    enabled: bool = False
    grants: tuple[Grant, ...] = ()
    audit_log: Path | None = None

    @property
    def unix_grants(self) -> bool:
        """Whether a grant names a Unix user or group (the socket must let them in)."""
        return any(g.uid is not None or g.gid is not None for g in self.grants)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling the admin API.

    A Unix caller has ``uid`` (and ``groups``: its gid and the groups its user
    is a member of); an SVID caller has ``spiffe_id``.
    """

    transport: str  # "unix" or "tls"
    uid: int | None = None
    groups: frozenset[int] = frozenset()
    spiffe_id: SpiffeId | None = None
    user: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def unix(cls, uid: int, gid: int) -> Caller:
        """A caller on the admin socket, with the groups its user is a member of."""
        groups = {gid}
        try:
            user = pwd.getpwuid(uid).pw_name
            groups.update(os.getgrouplist(user, gid))
        except KeyError:
            user = ""
        return cls(transport="unix", uid=uid, groups=frozenset(groups), user=user)

    @classmethod
    def svid(cls, spiffe_id: SpiffeId) -> Caller:
        """A workload calling over TLS with the X.509-SVID of an admin entry."""
        return cls(transport="tls", spiffe_id=spiffe_id)

    @property
    def name(self) -> str:
        """How messages name the caller: the user name, ``uid N`` or the SPIFFE ID."""
        if self.spiffe_id is not None:
            return str(self.spiffe_id)
        return self.user or f"uid {self.uid}"

    def audit_fields(self) -> dict[str, Any]:
        """Who, for the audit log."""
        if self.spiffe_id is not None:
            return {"spiffe_id": str(self.spiffe_id)}
        return {"uid": self.uid, "user": self.user}


@dataclass(frozen=True, slots=True)
class EntryTarget:
    """What an entry call would touch: SPIFFE IDs (paths) and whether it sets ``admin``."""

    spiffe_ids: Sequence[str] = ()
    sets_admin: bool = False


class Authorizer:
    """Decides each admin call from the grants.

    Args:
        config: the ``[admin]`` table.
        trust_domain: ours (entry IDs of another trust domain are under no path).
        owner_uids: the Unix users that always have ``all`` (root, the server's).
    """

    def __init__(self, config: AdminConfig, trust_domain: TrustDomain, *,
                 owner_uids: Iterable[int] = (0, os.geteuid())) -> None:
        self._config = config
        self._td = trust_domain
        self._owners = frozenset(owner_uids)

    def grants_for(self, caller: Caller) -> list[Grant]:
        """The grants that apply to a caller (a socket owner's is one ``all``)."""
        if caller.transport == "unix":
            if not self._config.enabled or caller.uid in self._owners:
                return [Grant(role=ALL)]
            return [g for g in self._config.grants
                    if (g.uid is not None and g.uid == caller.uid)
                    or (g.gid is not None and g.gid in caller.groups)]
        return [g for g in self._config.grants
                if g.spiffe_id is not None and g.spiffe_id == caller.spiffe_id]

    def check(self, method: str, caller: Caller,
              target: Callable[[], EntryTarget] | None = None) -> str:
        """Allow the call, or raise.

        Args:
            method: the RPC's name (``CreateEntry``).
            caller: who calls.
            target: for ``entries`` methods, what the call would touch (asked
                only when the caller's grants are scoped to paths).

        Returns:
            The role the call was allowed by.

        Raises:
            PermissionDeniedError: naming the role needed and what the caller has.
        """
        needed = METHOD_ROLES.get(method)
        if needed is None:
            raise PermissionDeniedError(f"{method} is not in the admin role table")
        grants = self.grants_for(caller)
        if not grants:
            raise PermissionDeniedError(
                f"role \"{needed}\" is required for {method}; {caller.name} has no admin grant")
        allowing = [g for g in grants if g.allows(needed)]
        has = "; ".join(dict.fromkeys(g.describe() for g in grants))
        if not allowing:
            raise PermissionDeniedError(
                f"role \"{needed}\" is required for {method}; {caller.name} has {has}")
        if needed != ENTRIES or any(g.role == ALL for g in allowing):
            return ALL if any(g.role == ALL for g in allowing) else needed
        touched = target() if target is not None else EntryTarget()
        if touched.sets_admin:
            raise PermissionDeniedError(
                f"role \"{ALL}\" is required to set the admin flag of an entry; "
                f"{caller.name} has {has}")
        for value in touched.spiffe_ids:
            path = self._path_of(value)
            if path is None or not any(g.covers(path) for g in allowing):
                shown = path if path is not None else value
                raise PermissionDeniedError(
                    f"role \"{ENTRIES}\" for {shown} is required; {caller.name} has {has}")
        return ENTRIES

    def _path_of(self, value: str) -> str | None:
        try:
            spiffe_id = SpiffeId.parse(value)
        except InvalidSpiffeIdError:
            return None
        return spiffe_id.path if spiffe_id.is_member_of(self._td) else None


# ---- configuration --------------------------------------------------------------------


def validate(raw: Mapping[str, Any], trust_domain: TrustDomain, data_dir: Path) -> AdminConfig:
    """Validate the ``admin`` table of a merged configuration.

    Raises:
        ConfigError: naming the grant (``admin.grant[2]``), the key and the rule.
    """
    table = raw.get("admin")
    if table is None:
        return AdminConfig(audit_log=data_dir / AUDIT_LOG_FILE)
    if not isinstance(table, dict):
        raise ConfigError("admin must be a table ([admin])")
    for key in table:
        if key not in _ADMIN_KEYS:
            raise ConfigError(f"admin: unknown key {key!r} (known: audit_log, grant)")
    audit = table.get("audit_log", "")
    if not isinstance(audit, str):
        raise ConfigError(f"admin.audit_log must be a file path, not {audit!r}")
    audit_log = (Path(audit).expanduser().absolute() if audit
                 else data_dir / AUDIT_LOG_FILE)
    items = table.get("grant", [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise ConfigError("admin.grant must be an array of tables ([[admin.grant]])")
    grants = tuple(_grant(item, i, trust_domain) for i, item in enumerate(items))
    return AdminConfig(enabled=True, grants=grants, audit_log=audit_log)


def _grant(item: Mapping[str, Any], index: int, trust_domain: TrustDomain) -> Grant:
    where = f"admin.grant[{index}]"
    for key in item:
        if key not in _GRANT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: "
                              f"{', '.join(sorted(_GRANT_KEYS))})")
    named = [k for k in _IDENTITY_KEYS if k in item]
    if len(named) != 1:
        raise ConfigError(f"{where}: give exactly one of unix_user, unix_group, spiffe_id "
                          f"(got {', '.join(named) or 'none'})")
    role = item.get("role")
    if role not in ROLES:
        raise ConfigError(f"{where}: role {role!r} is not one of: {', '.join(ROLES)}")
    paths = _paths(item.get("paths"), role, where)
    key = named[0]
    value = item[key]
    if key == "unix_user":
        return Grant(role=role, paths=paths, uid=_lookup(value, where, key, pwd.getpwnam))
    if key == "unix_group":
        return Grant(role=role, paths=paths, gid=_lookup(value, where, key, grp.getgrnam))
    if not isinstance(value, str):
        raise ConfigError(f"{where}: spiffe_id must be a string, not {value!r}")
    try:
        spiffe_id = SpiffeId.parse(value)
    except InvalidSpiffeIdError as exc:
        raise ConfigError(f"{where}: spiffe_id: {exc}") from None
    if not spiffe_id.is_member_of(trust_domain) or not spiffe_id.has_path:
        raise ConfigError(f"{where}: spiffe_id {value!r} must be a workload ID of "
                          f"{trust_domain.name}")
    if spiffe_id.path == "/sigil" or spiffe_id.path.startswith("/sigil/"):
        raise ConfigError(f"{where}: spiffe_id {value!r} is under /sigil/, the server's "
                          "and agents' own IDs")
    return Grant(role=role, paths=paths, spiffe_id=spiffe_id)


def _paths(value: object, role: str, where: str) -> tuple[str, ...]:
    if role != ENTRIES:
        if value is not None:
            raise ConfigError(f"{where}: paths apply only to role \"entries\" (role is {role!r})")
        return ()
    if (not isinstance(value, list) or not value
            or not all(isinstance(p, str) for p in value)):
        raise ConfigError(f"{where}: role \"entries\" needs paths, a non-empty list of "
                          "path prefixes like [\"/team-a/\"]")
    for p in value:
        segments = p.strip("/").split("/")
        if not p.startswith("/") or p.strip("/") == "" or any(s in ("", ".", "..")
                                                              for s in segments):
            raise ConfigError(f"{where}: path {p!r} must be an absolute path prefix with "
                              "at least one segment, like \"/team-a/\"")
    return tuple(value)


def _lookup(value: object, where: str, key: str, by_name: Callable[[str], Any]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a name or a number, not {value!r}")
    try:
        entry = by_name(value)
    except KeyError:
        kind = "user" if key == "unix_user" else "group"
        raise ConfigError(f"{where}: {key} {value!r}: no such {kind} on this machine") from None
    number: int = entry.pw_uid if key == "unix_user" else entry.gr_gid
    return number
