"""The issuance policy: which identities, DNS names and lifetimes the server hands out.

``[[policy.rule]]`` tables in the server's config (docs/configuration.md, "[policy]";
docs/operations.md, "Issuance policy"). Each rule has a *scope* (which entries it
speaks about) and *constraints* (what those entries must satisfy):

- scope: ``parent_ids`` (patterns of the parent's SPIFFE ID path, ``*`` one segment,
  a final ``**`` any number) or ``parent_selectors`` (node selectors the agent
  carries), and ``paths`` (SPIFFE ID path prefixes); a rule without any applies to
  every entry;
- constraints: ``allow_paths`` / ``deny_paths`` (path prefixes, at segment
  boundaries), ``allow_dns`` / ``deny_dns`` (``example.com`` exactly, or
  ``*.example.com``: any name below it, at label boundaries), ``max_x509_svid_ttl``
  and ``max_jwt_svid_ttl``.

Every rule whose scope matches must hold; a name matching a ``deny_*`` pattern is
refused whatever any ``allow_*`` says (deny wins). No rule: nothing is checked.

Where it is enforced: an entry's create and update (admin API, entry files, the
Kubernetes controller) with what is known of its parent then; every minted SVID
(``BatchNewX509SVID``, ``NewJWTSVID``, the operator's mints) with the agent's own
ID and node selectors, which is what makes it airtight for entries written before
the policy or reached through aliases and nesting. Per-SVID checks are cached by
(agent scope, entry id, entry revision).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ca.config.tomllines import KeyLines, KeyPath
from ca.errors import ConfigError, InvalidArgumentError
from identity import configvalues
from identity.errors import InvalidSelectorError, InvalidValueError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

if TYPE_CHECKING:  # the datastore package loads SQLAlchemy: not for ca.config.server's users
    from ca.datastore.records import EntryRecord

DEFAULTS: Mapping[str, object] = {"policy": None}

_POLICY_KEYS = frozenset({"rule"})
_RULE_KEYS = frozenset({"name", "parent_ids", "parent_selectors", "paths", "allow_paths",
                        "deny_paths", "allow_dns", "deny_dns", "max_x509_svid_ttl",
                        "max_jwt_svid_ttl"})
_CONSTRAINTS = ("allow_paths", "deny_paths", "allow_dns", "deny_dns", "max_x509_svid_ttl",
                "max_jwt_svid_ttl")
_SEGMENT = re.compile(r"^[A-Za-z0-9._*-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SERVER_PATH = "/sigil/server"
"""The path of the server's ID: the parent of node aliases, which the policy leaves
alone (no SVID is ever signed for an alias; its children are checked)."""
MAX_RULES = 256
MAX_PATTERNS = 256
_CACHE_LIMIT = 100_000


class PolicyViolationError(InvalidArgumentError):
    """An entry or SVID request breaks a policy rule; the message names the rule."""


# ---- patterns ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A SPIFFE ID path pattern: literal segments, ``*`` in a segment (no ``/``), and
    for ``parent_ids`` a final ``**`` (any number of further segments, none included).
    """

    text: str
    segments: tuple[str, ...]
    globbed: bool
    recursive: bool = False

    def _segment_matches(self, pattern: str, segment: str) -> bool:
        return pattern == segment or (self.globbed and "*" in pattern
                                      and fnmatch.fnmatchcase(segment, pattern))

    def covers(self, segments: Sequence[str]) -> bool:
        """Whether a path (its segments) is this prefix or below it."""
        if len(segments) < len(self.segments):
            return False
        return all(self._segment_matches(p, s)
                   for p, s in zip(self.segments, segments, strict=False))

    def matches(self, segments: Sequence[str]) -> bool:
        """Whether a path is exactly this pattern (a final ``**``: or below it)."""
        if self.recursive:
            return self.covers(segments)
        return len(segments) == len(self.segments) and self.covers(segments)

    def __str__(self) -> str:
        return self.text


def _segments(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")[1:]) if path else ()


def parse_path_pattern(text: object, *, trust_domain: TrustDomain,
                       allow_recursive: bool = False) -> PathPattern:
    """A path pattern from the config.

    Raises:
        ValueError: not a path in the form described on :class:`PathPattern`.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    path = text
    if path.startswith("spiffe://"):
        prefix = trust_domain.id_string()
        if path != prefix and not path.startswith(prefix + "/"):
            raise ValueError(f"{text!r} is not in the trust domain {trust_domain}")
        path = path[len(prefix):] or "/"
    if not path.startswith("/"):
        raise ValueError(f"{text!r} must start with / (a SPIFFE ID path)")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    segments = _segments(path) if path != "/" else ()
    for i, seg in enumerate(segments):
        if seg == "**":
            if not allow_recursive or i != len(segments) - 1:
                raise ValueError(f"{text!r}: ** is allowed only as the last segment of "
                                 "parent_ids")
            continue
        if not _SEGMENT.match(seg) or seg in (".", ".."):
            raise ValueError(f"{text!r}: segment {seg!r} is not a SPIFFE ID path segment "
                             "(letters, digits, '.', '-', '_', and '*' as a wildcard)")
    recursive = bool(segments) and segments[-1] == "**"
    if recursive:
        segments = segments[:-1]
    shown = "/" + "/".join(segments) if segments else ""
    return PathPattern(text=shown + ("/**" if recursive else ""), segments=segments,
                       globbed=any("*" in s for s in segments), recursive=recursive)


@dataclass(frozen=True, slots=True)
class DnsPattern:
    """``example.com`` (that name) or ``*.example.com`` (any name below it)."""

    text: str
    suffix: str
    wildcard: bool

    def matches(self, name: str) -> bool:
        """Whether a DNS name (lowercase) is this one or, for ``*.``, below it.

        Label boundaries count: ``*.example.com`` does not match ``badexample.com``.
        A wildcard SAN (``*.a.example.com``) is below ``a.example.com``, so it
        counts as below ``example.com`` too.
        """
        if not self.wildcard:
            return name == self.suffix
        return name.endswith("." + self.suffix)


def parse_dns_pattern(text: object) -> DnsPattern:
    """A DNS pattern from the config.

    Raises:
        ValueError: not a host name, optionally with a leading ``*.``.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    name = text.lower().rstrip(".")
    wildcard = name.startswith("*.")
    suffix = name[2:] if wildcard else name
    labels = suffix.split(".")
    if not suffix or len(suffix) > 253 or not all(_DNS_LABEL.match(lab) for lab in labels):
        raise ValueError(f"{text!r} is not a DNS name or *.suffix pattern (labels of "
                         "letters, digits and '-')")
    return DnsPattern(text=name, suffix=suffix, wildcard=wildcard)


# ---- rules -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[policy.rule]]``; ``where`` is ``"server.toml line 42"`` (or the index)."""

    name: str
    where: str
    parent_ids: tuple[PathPattern, ...] = ()
    parent_selectors: frozenset[Selector] = frozenset()
    paths: tuple[PathPattern, ...] = ()
    allow_paths: tuple[PathPattern, ...] = ()
    deny_paths: tuple[PathPattern, ...] = ()
    allow_dns: tuple[DnsPattern, ...] = ()
    deny_dns: tuple[DnsPattern, ...] = ()
    max_x509_svid_ttl: int = 0
    max_jwt_svid_ttl: int = 0

    @property
    def has_parent_scope(self) -> bool:
        """Whether the rule speaks only about some parents."""
        return bool(self.parent_ids or self.parent_selectors)

    def in_paths(self, segments: Sequence[str]) -> bool:
        """Whether a SPIFFE ID path is within the rule's ``paths`` (all when none)."""
        return not self.paths or any(p.covers(segments) for p in self.paths)

    def parent_id_matches(self, parent: SpiffeId) -> bool:
        """Whether a parent or agent ID matches one of ``parent_ids``."""
        segs = _segments(parent.path)
        return any(p.matches(segs) for p in self.parent_ids)

    def scope_text(self) -> str:
        """`` for parents matching ...`` and `` for SPIFFE IDs under ...``, as set."""
        out = ""
        if self.parent_selectors:
            out += " for parents matching " + ",".join(str(s) for s in
                                                       sorted(self.parent_selectors))
        elif self.parent_ids:
            out += " for parents matching " + " or ".join(str(p) for p in self.parent_ids)
        if self.paths:
            out += " for SPIFFE IDs under " + " or ".join(_under(p) for p in self.paths)
        return out

    def broken(self, spiffe_id: SpiffeId, segments: Sequence[str], dns_names: Iterable[str],
               x509_ttl: int, jwt_ttl: int) -> str | None:
        """What the identity breaks of this rule's constraints (the first), or None."""
        for p in self.deny_paths:
            if p.covers(segments):
                return f"{spiffe_id} is under the denied {_under(p)}"
        if self.allow_paths and not any(p.covers(segments) for p in self.allow_paths):
            return f"{spiffe_id} is not under {' or '.join(_under(p) for p in self.allow_paths)}"
        for name in dns_names:
            for d in self.deny_dns:
                if d.matches(name):
                    return f"DNS name {name} is denied ({d.text})"
            if self.allow_dns and not any(d.matches(name) for d in self.allow_dns):
                allowed = ", ".join(d.text for d in self.allow_dns)
                return f"DNS name {name} is not allowed (allowed: {allowed})"
        if self.max_x509_svid_ttl and x509_ttl > self.max_x509_svid_ttl:
            return (f"x509_svid_ttl {x509_ttl}s of {spiffe_id} is above the maximum "
                    f"{self.max_x509_svid_ttl}s")
        if self.max_jwt_svid_ttl and jwt_ttl > self.max_jwt_svid_ttl:
            return (f"jwt_svid_ttl {jwt_ttl}s of {spiffe_id} is above the maximum "
                    f"{self.max_jwt_svid_ttl}s")
        return None

    def message(self, detail: str) -> str:
        """The refusal text naming the rule and where it is written."""
        return f'policy rule "{self.name}" ({self.where}): {detail}{self.scope_text()}'


def _under(p: PathPattern) -> str:
    return p.text + "/"


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken rule and the refusal text (which names it)."""

    rule: str
    message: str

    def __str__(self) -> str:
        return self.message

    def error(self) -> PolicyViolationError:
        """As the error create, update and mint raise (InvalidArgument at the API)."""
        return PolicyViolationError(self.message)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What signing one entry's SVID may do: refused, or within these maximums.

    Attributes:
        violation: the first broken rule, or None.
        max_x509: seconds, 0 for no maximum; ``max_jwt`` likewise.
    """

    violation: Violation | None = None
    max_x509: int = 0
    max_jwt: int = 0

    def x509_ttl(self, entry_ttl: int, default: dt.timedelta) -> dt.timedelta:
        """The entry's own TTL (checked already), else the default clamped to the maximum."""
        return _ttl(entry_ttl, default, self.max_x509)

    def jwt_ttl(self, entry_ttl: int, default: dt.timedelta) -> dt.timedelta:
        """As :meth:`x509_ttl`, for JWT-SVIDs."""
        return _ttl(entry_ttl, default, self.max_jwt)


def _ttl(entry_ttl: int, default: dt.timedelta, maximum: int) -> dt.timedelta:
    if entry_ttl:
        return dt.timedelta(seconds=entry_ttl)
    if maximum and default.total_seconds() > maximum:
        return dt.timedelta(seconds=maximum)
    return default


ALLOWED = Verdict()


class Scope:
    """The rules that apply because of who is asking (one agent, for one request)."""

    __slots__ = ("_key", "_policy")

    def __init__(self, policy: Policy, key: tuple[int, ...]) -> None:
        self._policy = policy
        self._key = key

    def verdict(self, entry: EntryRecord) -> Verdict:
        """Whether the entry's SVID may be signed for this agent, and its maximum TTLs."""
        if not self._policy.rules:
            return ALLOWED
        return self._policy._verdict(self._key, entry)


class Policy:
    """The compiled ``[policy]``; an empty one allows everything."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.has_selector_rules = any(r.parent_selectors for r in self.rules)
        self._cache: dict[tuple[tuple[int, ...], str, int], Verdict] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and other.rules == self.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"Policy({len(self.rules)} rules)"

    # ---- entries ---------------------------------------------------------------------

    def check_entry(self, entry: EntryRecord, *,
                    parent_selectors: Iterable[frozenset[Selector]] = ()) -> Violation | None:
        """The first rule a new or stored entry breaks, or None.

        A rule scoped by ``parent_ids`` applies when the entry's parent matches;
        one scoped by ``parent_selectors`` when one of ``parent_selectors`` (what is
        known of the parent: the attested agent's node selectors, the selectors of
        node aliases with the parent's ID) holds them all. Signing checks again
        with the agent's own selectors (:meth:`scope`). Node aliases (parent: the
        server) pass: nothing is signed for them.
        """
        if not self.rules or entry.parent_id.path == SERVER_PATH:
            return None
        known = list(parent_selectors)
        applies = [i for i, r in enumerate(self.rules)
                   if not r.has_parent_scope
                   or (r.parent_ids and r.parent_id_matches(entry.parent_id))
                   or (r.parent_selectors and any(r.parent_selectors <= k for k in known))]
        return self._evaluate(applies, entry).violation

    def scope(self, agent_id: SpiffeId, node_selectors: Iterable[Selector]) -> Scope:
        """The agent's scope, to check each SVID of one request (cheap when no rules)."""
        if not self.rules:
            return Scope(self, ())
        held = frozenset(node_selectors)
        key = tuple(i for i, r in enumerate(self.rules)
                    if r.has_parent_scope and (
                        (r.parent_ids and r.parent_id_matches(agent_id))
                        or (r.parent_selectors and r.parent_selectors <= held)))
        return Scope(self, key)

    def _verdict(self, key: tuple[int, ...], entry: EntryRecord) -> Verdict:
        cache_key = (key, entry.id, entry.revision)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        applies = sorted(set(key) | {i for i, r in enumerate(self.rules)
                                     if not r.has_parent_scope
                                     or (r.parent_ids and r.parent_id_matches(entry.parent_id))})
        verdict = self._evaluate(applies, entry)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[cache_key] = verdict
        return verdict

    def _evaluate(self, applies: Iterable[int], entry: EntryRecord) -> Verdict:
        return self._evaluate_id(applies, entry.spiffe_id, entry.dns_names,
                                 entry.x509_svid_ttl, entry.jwt_svid_ttl)

    def _evaluate_id(self, applies: Iterable[int], spiffe_id: SpiffeId,
                     dns_names: Sequence[str], x509_ttl: int, jwt_ttl: int) -> Verdict:
        segments = _segments(spiffe_id.path)
        max_x509 = max_jwt = 0
        for i in applies:
            rule = self.rules[i]
            if not rule.in_paths(segments):
                continue
            detail = rule.broken(spiffe_id, segments, dns_names, x509_ttl, jwt_ttl)
            if detail is not None:
                return Verdict(violation=Violation(rule.name, rule.message(detail)))
            if rule.max_x509_svid_ttl:
                max_x509 = min(max_x509 or rule.max_x509_svid_ttl, rule.max_x509_svid_ttl)
            if rule.max_jwt_svid_ttl:
                max_jwt = min(max_jwt or rule.max_jwt_svid_ttl, rule.max_jwt_svid_ttl)
        return Verdict(max_x509=max_x509, max_jwt=max_jwt)

    # ---- operators' mints ------------------------------------------------------------

    def check_mint(self, spiffe_id: SpiffeId, *, dns_names: Sequence[str] = (),
                   x509_ttl: int = 0, jwt_ttl: int = 0) -> Verdict:
        """An operator's mint (no entry, no parent): the rules without a parent scope."""
        if not self.rules:
            return ALLOWED
        applies = [i for i, r in enumerate(self.rules) if not r.has_parent_scope]
        return self._evaluate_id(applies, spiffe_id, dns_names, x509_ttl, jwt_ttl)


# ---- loading ------------------------------------------------------------------------


@dataclass
class _Where:
    """Names a place in the config file for error messages."""

    file: Path | None
    lines: KeyLines | None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, path: KeyPath) -> int | None:
        return self.lines.line(path) if self.lines is not None else None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        line = self.line(path)
        if self.file is not None and line is not None:
            return ConfigError(f"config file {self.file} line {line}: {message}")
        if self.file is not None:
            return ConfigError(f"config file {self.file}: {message}")
        return ConfigError(message)

    def label(self, path: KeyPath, index: int) -> str:
        line = self.line(path)
        if self.file is not None and line is not None:
            return f"{self.file.name} line {line}"
        return f"policy.rule[{index}]"


def validate(raw: Mapping[str, Any], trust_domain: TrustDomain, *,
             file: Path | None = None, lines: KeyLines | None = None) -> Policy:
    """Compile the ``policy`` table.

    Args:
        raw: the layered settings (``raw["policy"]`` is the table or None).
        trust_domain: ours (``spiffe://`` patterns must be in it).
        file: the config file, to name it in errors and rule locations.
        lines: the file's key positions, for line-precise errors.

    Raises:
        ConfigError: naming the file, the line and the key.
    """
    table = raw.get("policy")
    if table is None:
        return Policy()
    where = _Where(file, lines)
    base: KeyPath = ("policy",)
    if not isinstance(table, dict):
        raise where.error(base, "policy must be a table ([policy])")
    for key in table:
        if key not in _POLICY_KEYS:
            raise where.error((*base, key), f"policy: unknown key {key!r} (known: rule)")
    items = table.get("rule", [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise where.error((*base, "rule"), "policy.rule must be an array of tables "
                          "([[policy.rule]])")
    if len(items) > MAX_RULES:
        raise where.error((*base, "rule"), f"policy: at most {MAX_RULES} rules")
    rules: list[Rule] = []
    names: dict[str, int] = {}
    for index, item in enumerate(items):
        rule = _rule(item, index, trust_domain, where)
        if rule.name in names:
            raise where.error((*base, "rule", index, "name"),
                              f"policy.rule name {rule.name!r} is used twice "
                              f"(also by rule {names[rule.name] + 1})")
        names[rule.name] = index
        rules.append(rule)
    return Policy(rules)


def _rule(item: Mapping[str, Any], index: int, td: TrustDomain, where: _Where) -> Rule:
    at: KeyPath = ("policy", "rule", index)
    for key in item:
        if key not in _RULE_KEYS:
            raise where.error((*at, key), f"policy.rule: unknown key {key!r} (known: "
                              f"{', '.join(sorted(_RULE_KEYS))})")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise where.error((*at, "name") if "name" in item else at,
                          "policy.rule needs a name: 1 to 63 letters, digits, '.', '-', '_'")
    prefix = f"policy.rule {name!r}"

    def strings(key: str) -> list[Any]:
        value = item.get(key, [])
        if not isinstance(value, list):
            raise where.error((*at, key), f"{prefix}: {key} must be an array of strings")
        if key in item and not value:
            raise where.error((*at, key), f"{prefix}: {key} must not be empty (leave the "
                              "key out instead)")
        if len(value) > MAX_PATTERNS:
            raise where.error((*at, key), f"{prefix}: {key} holds at most {MAX_PATTERNS}")
        return value

    def paths(key: str, *, recursive: bool = False) -> tuple[PathPattern, ...]:
        out: list[PathPattern] = []
        for i, value in enumerate(strings(key)):
            try:
                out.append(parse_path_pattern(value, trust_domain=td,
                                              allow_recursive=recursive))
            except ValueError as exc:
                raise where.error((*at, key, i), f"{prefix}: {key}: {exc}") from None
        return tuple(out)

    def dns(key: str) -> tuple[DnsPattern, ...]:
        out: list[DnsPattern] = []
        for i, value in enumerate(strings(key)):
            try:
                out.append(parse_dns_pattern(value))
            except ValueError as exc:
                raise where.error((*at, key, i), f"{prefix}: {key}: {exc}") from None
        return tuple(out)

    def ttl(key: str) -> int:
        value = item.get(key)
        if value is None:
            return 0
        if not isinstance(value, str):
            raise where.error((*at, key), f"{prefix}: {key} must be a duration string "
                              f"such as \"1h\", not {value!r}")
        try:
            seconds = configvalues.parse_duration(value, allow_milliseconds=False)
        except InvalidValueError as exc:
            raise where.error((*at, key), f"{prefix}: {key}: {exc}") from None
        return int(seconds.total_seconds())

    selectors: list[Selector] = []
    for i, value in enumerate(strings("parent_selectors")):
        try:
            if not isinstance(value, str):
                raise InvalidSelectorError(f"{value!r} is not a string")
            selectors.append(Selector.parse(value))
        except InvalidSelectorError as exc:
            raise where.error((*at, "parent_selectors", i),
                              f"{prefix}: parent_selectors: {exc}") from None
    parent_ids = paths("parent_ids", recursive=True)
    if parent_ids and selectors:
        raise where.error((*at, "parent_selectors"),
                          f"{prefix}: name parents by parent_ids or by parent_selectors, "
                          "not both (make two rules)")
    if not any(k in item for k in _CONSTRAINTS):
        raise where.error(at, f"{prefix} constrains nothing: give at least one of "
                          f"{', '.join(_CONSTRAINTS)}")
    return Rule(
        name=name, where=where.label(at, index), parent_ids=parent_ids,
        parent_selectors=frozenset(selectors), paths=paths("paths"),
        allow_paths=paths("allow_paths"), deny_paths=paths("deny_paths"),
        allow_dns=dns("allow_dns"), deny_dns=dns("deny_dns"),
        max_x509_svid_ttl=ttl("max_x509_svid_ttl"), max_jwt_svid_ttl=ttl("max_jwt_svid_ttl"),
    )
