"""The issuance policy (ca/config/policy.py) as tables: patterns, scopes, deny over allow,
TTL maximums and clamps, the per-revision verdict cache; and the config loader's
line-precise errors (ca/config/tomllines.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from attestation.node.k8s_psat import implied_selectors
from ca.config.policy import Policy, parse_dns_pattern, parse_path_pattern, validate
from ca.config.server import load_config
from ca.config.tomllines import KeyLines
from ca.datastore import EntryRecord
from ca.errors import ConfigError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("td.test")
PROD_AGENT = SpiffeId.parse("spiffe://td.test/sigil/agent/k8s_psat/prod/node-1")
DEV_AGENT = SpiffeId.parse("spiffe://td.test/sigil/agent/k8s_psat/dev/node-1")
PROD = frozenset({Selector("k8s_psat", "cluster:prod"), Selector("k8s_psat", "agent_ns:sigil")})
DEV = frozenset({Selector("k8s_psat", "cluster:dev")})


def _segments(path: str) -> list[str]:
    return path.split("/")[1:] if path else []


@pytest.mark.parametrize(("pattern", "path", "covers"), [
    ("/ns/prod", "/ns/prod", True),
    ("/ns/prod", "/ns/prod/sa/api", True),
    ("/ns/prod/", "/ns/prod/sa/api", True),          # a trailing slash changes nothing
    ("/ns/prod", "/ns/production", False),           # segment boundary
    ("/ns/prod", "/ns/production/sa/api", False),
    ("/ns/prod", "/ns", False),
    ("/ns/prod", "/nsx/prod", False),
    ("/ns/*/sa/admin", "/ns/prod/sa/admin", True),
    ("/ns/*/sa/admin", "/ns/prod/sa/admin/x", True),
    ("/ns/*/sa/admin", "/ns/prod/sa/api", False),
    ("/ns/prod-*", "/ns/prod-eu/x", True),
    ("/ns/prod-*", "/ns/prod/x", False),
    ("/", "/anything/at/all", True),
    ("spiffe://td.test/ns/prod", "/ns/prod/x", True),
])
def test_path_prefixes_at_segment_boundaries(pattern: str, path: str, covers: bool) -> None:
    assert parse_path_pattern(pattern, trust_domain=TD).covers(_segments(path)) is covers


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("/sigil/agent/k8s_psat/prod/*", "/sigil/agent/k8s_psat/prod/node-1", True),
    ("/sigil/agent/k8s_psat/prod/*", "/sigil/agent/k8s_psat/prod", False),
    ("/sigil/agent/k8s_psat/prod/*", "/sigil/agent/k8s_psat/prod/node-1/x", False),
    ("/sigil/agent/k8s_psat/prod/*", "/sigil/agent/k8s_psat/production/node-1", False),
    ("/sigil/agent/k8s_psat/prod/**", "/sigil/agent/k8s_psat/prod", True),
    ("/sigil/agent/k8s_psat/prod/**", "/sigil/agent/k8s_psat/prod/a/b/c", True),
    ("/sigil/agent/k8s_psat/prod/**", "/sigil/agent/k8s_psat/prodx/a", False),
    ("/nodes/rack-*", "/nodes/rack-7", True),
    ("/nodes/rack-*", "/nodes/racks", False),
])
def test_parent_patterns_match_whole_ids(pattern: str, path: str, matches: bool) -> None:
    p = parse_path_pattern(pattern, trust_domain=TD, allow_recursive=True)
    assert p.matches(_segments(path)) is matches


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("example.com", "example.com", True),
    ("example.com", "www.example.com", False),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),     # label boundary
    ("*.example.com", "www.badexample.com", False),
    ("*.example.com", "*.svc.example.com", True),   # a wildcard SAN below it
    ("EXAMPLE.com", "example.com", True),
])
def test_dns_patterns_at_label_boundaries(pattern: str, name: str, matches: bool) -> None:
    assert parse_dns_pattern(pattern).matches(name) is matches


@pytest.mark.parametrize(("pattern", "recursive", "error"), [
    ("ns/prod", False, "must start with /"),
    ("/ns//prod", False, "is not a SPIFFE ID path segment"),
    ("/ns/../prod", False, "is not a SPIFFE ID path segment"),
    ("/ns/pr od", False, "is not a SPIFFE ID path segment"),
    ("/ns/**", False, "only as the last segment of parent_ids"),
    ("/ns/**/x", True, "only as the last segment of parent_ids"),
    ("spiffe://other.test/ns", False, "is not in the trust domain td.test"),
    (42, False, "is not a string"),
])
def test_bad_path_patterns(pattern: Any, recursive: bool, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("*", r"\*")):
        parse_path_pattern(pattern, trust_domain=TD, allow_recursive=recursive)


@pytest.mark.parametrize("pattern", ["", "*", "*.", "exa mple.com", "a..b", "*.*.example.com",
                                     "-a.example.com", "a" * 64 + ".com"])
def test_bad_dns_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="is not a DNS name"):
        parse_dns_pattern(pattern)


def _policy(*rules: dict[str, Any]) -> Policy:
    return validate({"policy": {"rule": list(rules)}}, TD)


def _entry(path: str, *, parent: str = "/sigil/agent/k8s_psat/prod/node-1",
           dns: tuple[str, ...] = (), x509_ttl: int = 0, jwt_ttl: int = 0,
           revision: int = 1, entry_id: str = "e1") -> EntryRecord:
    return EntryRecord(spiffe_id=SpiffeId.parse(f"spiffe://td.test{path}"),
                       parent_id=SpiffeId.parse(f"spiffe://td.test{parent}"),
                       selectors=(Selector("k8s", "pod-uid:1"),), id=entry_id,
                       dns_names=dns, x509_svid_ttl=x509_ttl, jwt_svid_ttl=jwt_ttl,
                       revision=revision)


PROD_ONLY = {"name": "prod-only", "parent_selectors": ["k8s_psat:cluster:prod"],
             "allow_paths": ["/ns/prod"], "deny_paths": ["/ns/prod/sa/admin"]}
RACKS = {"name": "racks", "parent_ids": ["/nodes/rack-*"], "allow_paths": ["/batch"]}
ZONE = {"name": "zone", "allow_dns": ["*.example.com", "example.com"],
        "deny_dns": ["mail.example.com", "*.internal.example.com"]}
PAYMENTS = {"name": "payments", "paths": ["/ns/payments"], "max_x509_svid_ttl": "30m",
            "max_jwt_svid_ttl": "2m"}
RULES = (PROD_ONLY, RACKS, ZONE, PAYMENTS)


@pytest.mark.parametrize(("path", "parent", "known", "dns", "x509", "jwt", "broken"), [
    # parent_selectors: applies when the parent is known to carry them.
    ("/ns/prod/sa/api", "/sigil/agent/k8s_psat/prod/n", [PROD], (), 0, 0, None),
    ("/ns/dev/sa/api", "/sigil/agent/k8s_psat/prod/n", [PROD], (), 0, 0, "prod-only"),
    ("/ns/production/sa/api", "/sigil/agent/k8s_psat/prod/n", [PROD], (), 0, 0, "prod-only"),
    ("/ns/dev/sa/api", "/sigil/agent/k8s_psat/dev/n", [DEV], (), 0, 0, None),
    ("/ns/dev/sa/api", "/sigil/agent/k8s_psat/prod/n", [], (), 0, 0, None),
    ("/ns/dev/sa/api", "/nodes/prod-alias", [DEV, PROD], (), 0, 0, "prod-only"),
    # deny wins over allow: under /ns/prod, yet denied.
    ("/ns/prod/sa/admin", "/sigil/agent/k8s_psat/prod/n", [PROD], (), 0, 0, "prod-only"),
    ("/ns/prod/sa/admin/x", "/sigil/agent/k8s_psat/prod/n", [PROD], (), 0, 0, "prod-only"),
    ("/ns/prod/sa/administrator", "/sigil/agent/k8s_psat/prod/n", [PROD], (), 0, 0, None),
    # parent_ids
    ("/batch/job-1", "/nodes/rack-1", [], (), 0, 0, None),
    ("/web", "/nodes/rack-1", [], (), 0, 0, "racks"),
    ("/web", "/nodes/racks", [], (), 0, 0, None),
    # DNS: allowed suffix and exact name, denied within the allowed suffix.
    ("/web", "/n", [], ("www.example.com", "example.com"), 0, 0, None),
    ("/web", "/n", [], ("badexample.com",), 0, 0, "zone"),
    ("/web", "/n", [], ("mail.example.com",), 0, 0, "zone"),
    ("/web", "/n", [], ("db.internal.example.com",), 0, 0, "zone"),
    ("/web", "/n", [], ("internal.example.com",), 0, 0, None),
    # TTL maximums per path prefix (entries asking for more are refused).
    ("/ns/payments/sa/api", "/n", [], (), 1800, 120, None),
    ("/ns/payments/sa/api", "/n", [], (), 1801, 0, "payments"),
    ("/ns/payments/sa/api", "/n", [], (), 0, 121, "payments"),
    ("/ns/paymentsx/sa/api", "/n", [], (), 86400, 3600, None),
])
def test_check_entry(path: str, parent: str, known: list[frozenset[Selector]],
                     dns: tuple[str, ...], x509: int, jwt: int, broken: str | None) -> None:
    policy = _policy(*RULES)
    violation = policy.check_entry(_entry(path, parent=parent, dns=dns, x509_ttl=x509,
                                          jwt_ttl=jwt), parent_selectors=known)
    assert (violation.rule if violation else None) == broken


def test_node_aliases_are_left_alone() -> None:
    # No SVID is signed for an alias; its children are what the rules judge.
    policy = _policy({"name": "ns-only", "allow_paths": ["/ns"]})
    assert policy.check_entry(_entry("/nodes/rack-1", parent="/sigil/server")) is None
    violation = policy.check_entry(_entry("/nodes/rack-1", parent="/sigil/serverx"))
    assert violation is not None and violation.rule == "ns-only"


def test_every_matching_rule_must_hold() -> None:
    # Two allow lists that both apply: the ID must be in both (their intersection).
    policy = _policy({"name": "a", "allow_paths": ["/ns"]},
                     {"name": "b", "allow_paths": ["/ns/prod", "/other"]})
    assert policy.check_entry(_entry("/ns/prod/x")) is None
    violation = policy.check_entry(_entry("/ns/dev/x"))
    assert violation is not None and violation.rule == "b"
    violation = policy.check_entry(_entry("/other/x"))
    assert violation is not None and violation.rule == "a"


def test_refusal_text_names_rule_place_and_scope() -> None:
    policy = _policy(PROD_ONLY, ZONE, PAYMENTS)
    v = policy.check_entry(_entry("/ns/dev/x"), parent_selectors=[PROD])
    assert v is not None
    assert v.message == ('policy rule "prod-only" (policy.rule[0]): spiffe://td.test/ns/dev/x '
                         "is not under /ns/prod/ for parents matching k8s_psat:cluster:prod")
    v = policy.check_entry(_entry("/ns/prod/sa/admin"), parent_selectors=[PROD])
    assert v is not None and v.message == (
        'policy rule "prod-only" (policy.rule[0]): spiffe://td.test/ns/prod/sa/admin is under '
        "the denied /ns/prod/sa/admin/ for parents matching k8s_psat:cluster:prod")
    v = policy.check_entry(_entry("/web", dns=("evil.org",)))
    assert v is not None and v.message == (
        'policy rule "zone" (policy.rule[1]): DNS name evil.org is not allowed '
        "(allowed: *.example.com, example.com)")
    v = policy.check_entry(_entry("/ns/payments/x", x509_ttl=3600))
    assert v is not None and v.message == (
        'policy rule "payments" (policy.rule[2]): x509_svid_ttl 3600s of '
        "spiffe://td.test/ns/payments/x is above the maximum 1800s for SPIFFE IDs under "
        "/ns/payments/")


def test_signing_scope_uses_the_agents_own_selectors_and_id() -> None:
    policy = _policy(PROD_ONLY, {"name": "prod-agents", "parent_ids":
                                 ["/sigil/agent/k8s_psat/prod/*"], "deny_paths": ["/ns/dev"]})
    # Reached through an alias or nesting: the entry's parent says nothing, the
    # agent that would receive the SVID does.
    nested = _entry("/ns/dev/x", parent="/nodes/some-alias")
    assert policy.check_entry(nested) is None
    verdict = policy.scope(PROD_AGENT, PROD).verdict(nested)
    assert verdict.violation is not None and verdict.violation.rule == "prod-only"
    verdict = policy.scope(PROD_AGENT, DEV).verdict(nested)  # the ID pattern alone
    assert verdict.violation is not None and verdict.violation.rule == "prod-agents"
    assert policy.scope(DEV_AGENT, DEV).verdict(nested).violation is None


def test_ttls_clamp_defaults_and_keep_entry_values() -> None:
    policy = _policy(PAYMENTS)
    scope = policy.scope(PROD_AGENT, PROD)
    default_x509, default_jwt = dt.timedelta(hours=1), dt.timedelta(minutes=5)
    v = scope.verdict(_entry("/ns/payments/api"))
    assert (v.max_x509, v.max_jwt) == (1800, 120)
    assert v.x509_ttl(0, default_x509) == dt.timedelta(minutes=30)   # clamped
    assert v.jwt_ttl(0, default_jwt) == dt.timedelta(minutes=2)      # clamped
    assert v.x509_ttl(0, dt.timedelta(minutes=10)) == dt.timedelta(minutes=10)  # below
    v = scope.verdict(_entry("/ns/payments/api", x509_ttl=600, entry_id="e2"))
    assert v.x509_ttl(600, default_x509) == dt.timedelta(minutes=10)
    v = scope.verdict(_entry("/ns/other/api", entry_id="e3"))
    assert v.x509_ttl(0, default_x509) == default_x509
    # The smallest maximum of all rules that apply wins.
    both = _policy(PAYMENTS, {"name": "all", "max_x509_svid_ttl": "10m"})
    v = both.scope(PROD_AGENT, PROD).verdict(_entry("/ns/payments/api"))
    assert v.max_x509 == 600 and v.max_jwt == 120


def test_verdicts_are_cached_per_revision() -> None:
    policy = _policy(PROD_ONLY)
    scope = policy.scope(PROD_AGENT, PROD)
    good = _entry("/ns/prod/x", revision=1)
    assert scope.verdict(good).violation is None
    # Same id and revision: the cached verdict (an entry's content is fixed per revision).
    assert scope.verdict(good) is scope.verdict(good)
    moved = _entry("/ns/dev/x", revision=2)
    v = scope.verdict(moved)
    assert v.violation is not None and v.violation.rule == "prod-only"


def test_no_policy_allows_everything() -> None:
    policy = Policy()
    assert not policy
    e = _entry("/anything", dns=("whatever.org",), x509_ttl=86400)
    assert policy.check_entry(e) is None
    v = policy.scope(PROD_AGENT, PROD).verdict(e)
    assert v.violation is None and v.x509_ttl(0, dt.timedelta(hours=5)) == dt.timedelta(hours=5)
    assert validate({"policy": None}, TD) == Policy()


def test_operator_mints_follow_rules_without_a_parent_scope() -> None:
    policy = _policy(PROD_ONLY, ZONE, PAYMENTS)
    sid = SpiffeId.parse("spiffe://td.test/ns/dev/debug")
    assert policy.check_mint(sid).violation is None   # prod-only needs a parent
    v = policy.check_mint(sid, dns_names=("x.evil.org",))
    assert v.violation is not None and v.violation.rule == "zone"
    pay = SpiffeId.parse("spiffe://td.test/ns/payments/debug")
    assert policy.check_mint(pay, x509_ttl=3600).violation is not None
    assert policy.check_mint(pay).x509_ttl(0, dt.timedelta(hours=1)) == dt.timedelta(minutes=30)


# ---- loading, with the line of each mistake ------------------------------------------

HEAD = """\
trust_domain = "td.test"

# Issuance policy. A comment with [brackets], "quotes" and key = value.
[policy]

[[policy.rule]]
name = "prod-only"
parent_selectors = ["k8s_psat:cluster:prod"]
allow_paths = [
    "/ns/prod",       # the prod namespace
    "/ns/shared",
]

[[policy.rule]]
name = 'zone'
allow_dns = ["*.example.com"]
"""


@pytest.mark.parametrize(("tail", "line", "message"), [
    # An array element on its own line, in the third rule.
    ('[[policy.rule]]\nname = "third"\ndeny_paths = [\n  "/ok",\n  "not/absolute",\n]\n',
     22, "policy.rule 'third': deny_paths: 'not/absolute' must start with /"),
    ('[[policy.rule]]\nname = "third"\nallow_dns = ["ok.example.com", "bad_name.com"]\n',
     20, "policy.rule 'third': allow_dns: 'bad_name.com' is not a DNS name"),
    ('[[policy.rule]]\nname = "third"\nmax_x509_svid_ttl = "soon"\n', 20,
     "policy.rule 'third': max_x509_svid_ttl: "),
    ('[[policy.rule]]\nname = "third"\nallow_paths = ["/x"]\nmax_jwt_svid_ttl = 60\n', 21,
     "policy.rule 'third': max_jwt_svid_ttl must be a duration string"),
    ('[[policy.rule]]\nname = "third"\nallow_path = ["/x"]\n', 20,
     "policy.rule: unknown key 'allow_path'"),
    ('[[policy.rule]]\nname = "zone"\nallow_paths = ["/x"]\n', 19,
     "policy.rule name 'zone' is used twice (also by rule 2)"),
    ('[[policy.rule]]\nallow_paths = ["/x"]\n', 18, "policy.rule needs a name"),
    ('[[policy.rule]]\nname = "third"\n', 18, "policy.rule 'third' constrains nothing"),
    ('[[policy.rule]]\nname = "third"\nparent_ids = ["/n/*"]\n'
     'parent_selectors = ["a:b"]\nallow_paths = ["/x"]\n', 21,
     "policy.rule 'third': name parents by parent_ids or by parent_selectors, not both"),
    ('[[policy.rule]]\nname = "third"\nparent_selectors = ["nocolon"]\nallow_paths = ["/x"]\n',
     20, "policy.rule 'third': parent_selectors: "),
    ('[[policy.rule]]\nname = "third"\nallow_paths = []\n', 20,
     "policy.rule 'third': allow_paths must not be empty"),
    # A multi-line string before the mistake must not shift the count.
    ('[[policy.rule]]\nname = """third"""\n# """ not a string\ndeny_dns = [\n'
     '  """a.example.com""",\n  "*.",\n]\n', 23, "policy.rule 'third': deny_dns: '*.'"),
])
def test_config_errors_name_the_line(tmp_path: Path, tail: str, line: int,
                                     message: str) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(HEAD + "\n" + tail)
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert str(err.value).startswith(f"config file {conf} line {line}: {message}"), err.value


def test_a_loaded_rule_knows_its_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(HEAD)
    policy = load_config(conf).policy
    assert [(r.name, r.where) for r in policy.rules] == [
        ("prod-only", "server.toml line 6"), ("zone", "server.toml line 14")]
    assert [str(p) for p in policy.rules[0].allow_paths] == ["/ns/prod", "/ns/shared"]


def test_unknown_policy_key_names_its_line(tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text('trust_domain = "td.test"\n\n[policy]\nrules = []\n')
    with pytest.raises(ConfigError, match=r"line 4: policy: unknown key 'rules'"):
        load_config(conf)


def test_key_lines_of_a_tricky_document() -> None:
    text = """\
a = "x # not a comment [not] = 1"
'quoted key' = 1
b.c = [1, [2, 3],
  { d = 4 }, 'e']
[t]
s = '''
[[not.a.table]]
k = 1
'''
after = 2
[[arr]]
x = 1
[[arr]]
[arr.sub]
y = 2
[[arr.items]]
z = 3
[[arr.items]]
"""
    lines = KeyLines(text)
    assert lines.line(("a",)) == 1
    assert lines.line(("quoted key",)) == 2
    assert lines.line(("b", "c")) == 3
    assert lines.line(("b", "c", 1)) == 3
    assert lines.line(("b", "c", 2)) == 4
    assert lines.line(("b", "c", 3)) == 4
    assert lines.line(("t", "s")) == 6
    assert lines.line(("t", "after")) == 10
    assert lines.line(("not",)) is None
    assert lines.line(("arr", 0, "x")) == 12
    assert lines.line(("arr", 1)) == 13
    assert lines.line(("arr", 1, "sub", "y")) == 15
    assert lines.line(("arr", 1, "items", 0, "z")) == 17
    assert lines.line(("arr", 1, "items", 1)) == 18
    assert lines.line(("arr", 1, "items", 1, "missing")) == 18   # falls back to its table


@pytest.mark.parametrize(("agent", "implied"), [
    ("spiffe://td.test/sigil/agent/k8s_psat/prod/uid-1",
     (Selector("k8s_psat", "cluster:prod"), Selector("k8s_psat", "agent_node_uid:uid-1"))),
    ("spiffe://td.test/sigil/agent/k8s_psat/prod", ()),
    ("spiffe://td.test/sigil/agent/k8s_psat/prod/uid-1/x", ()),
    ("spiffe://td.test/sigil/agent/join_token/abc", ()),
    ("spiffe://td.test/nodes/k8s_psat/prod/uid-1", ()),
])
def test_k8s_psat_agent_ids_imply_their_cluster(agent: str, implied: tuple[Selector, ...]
                                                ) -> None:
    assert implied_selectors(SpiffeId.parse(agent)) == implied
