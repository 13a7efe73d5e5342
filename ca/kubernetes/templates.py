"""IdentityTemplates: parse the custom resource, select pods, render their entries.

Pure functions over the JSON the API server sends; no I/O. The registration
controller (:mod:`ca.kubernetes.controller`) feeds them pods, namespaces and
templates, and stores what :func:`desired_entry` returns.

Placeholders in ``spiffeIDTemplate`` and ``dnsNameTemplates``: ``{trust_domain}``,
``{namespace}``, ``{service_account}``, ``{pod_name}``, ``{pod_uid}``,
``{node_name}``, ``{label:<key>}`` (a pod label; a pod without it gets no entry from
that template).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attestation.kubeapi import JsonObject
from attestation.node.k8s_psat import agent_id
from ca.datastore import EntryRecord
from ca.registry import validate
from identity.configvalues import parse_duration
from identity.errors import InvalidValueError, SigilError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

DEFAULT_SPIFFE_ID_TEMPLATE = "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
OWNER_PREFIX = "k8s"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELDS = frozenset({"trust_domain", "namespace", "service_account", "pod_name", "pod_uid",
                     "node_name"})
_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})
_SPEC_KEYS = frozenset({"spiffeIDTemplate", "podSelector", "namespaceSelector", "ttl",
                        "dnsNameTemplates", "federatesWith", "hint"})
MAX_DNS_NAME_TEMPLATES = 32


class TemplateError(SigilError):
    """An IdentityTemplate's spec is invalid; the message names the template and field."""


class RenderError(SigilError):
    """A template cannot be rendered for one pod (a missing label, a bad result)."""


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector: ``matchLabels`` and ``matchExpressions``, ANDed.

    An empty selector selects everything, as in Kubernetes.
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[tuple[str, str, frozenset[str]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether an object with these labels is selected."""
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


def parse_label_selector(value: object, where: str) -> LabelSelector:
    """Parse a ``metav1.LabelSelector``.

    Raises:
        TemplateError: a malformed selector, naming ``where``.
    """
    if value is None:
        return LabelSelector()
    if not isinstance(value, dict) or set(value) - {"matchLabels", "matchExpressions"}:
        raise TemplateError(f"{where} must hold only matchLabels and matchExpressions")
    labels = value.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise TemplateError(f"{where}.matchLabels must map label keys to strings")
    expressions: list[tuple[str, str, frozenset[str]]] = []
    for i, expr in enumerate(value.get("matchExpressions") or []):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, dict) or not isinstance(expr.get("key"), str):
            raise TemplateError(f"{at} needs a key and an operator")
        op = expr.get("operator")
        if op not in _OPERATORS:
            raise TemplateError(f"{at}.operator {op!r} is not one of In, NotIn, Exists, "
                                "DoesNotExist")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise TemplateError(f"{at}.values must be a list of strings")
        if (op in ("In", "NotIn")) != bool(values):
            raise TemplateError(f"{at}: In and NotIn need values, Exists and DoesNotExist "
                                "take none")
        expressions.append((expr["key"], str(op), frozenset(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


@dataclass(frozen=True, slots=True)
class IdentityTemplate:
    """A parsed IdentityTemplate (``sigil.dev/v1alpha1``)."""

    name: str
    spiffe_id_template: str = DEFAULT_SPIFFE_ID_TEMPLATE
    pod_selector: LabelSelector = LabelSelector()
    namespace_selector: LabelSelector = LabelSelector()
    x509_svid_ttl: int = 0
    dns_name_templates: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""


def _check_placeholders(text: str, where: str) -> None:
    for name in _PLACEHOLDER.findall(text):
        if name not in _FIELDS and not (name.startswith("label:") and len(name) > 6):
            raise TemplateError(f"{where}: unknown placeholder {{{name}}} (known: "
                                f"{', '.join('{' + f + '}' for f in sorted(_FIELDS))}, "
                                "{label:<key>})")


def parse_template(obj: JsonObject, *, max_ttl: dt.timedelta) -> IdentityTemplate:
    """Validate an IdentityTemplate object as the API server sent it.

    Raises:
        TemplateError: naming the template and the bad field.
    """
    name = str((obj.get("metadata") or {}).get("name") or "")
    where = f"IdentityTemplate {name!r}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise TemplateError(f"{where}: spec must be an object")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown field spec.{unknown[0]}")
    id_template = spec.get("spiffeIDTemplate") or DEFAULT_SPIFFE_ID_TEMPLATE
    if not isinstance(id_template, str):
        raise TemplateError(f"{where}: spec.spiffeIDTemplate must be a string")
    _check_placeholders(id_template, f"{where}: spec.spiffeIDTemplate")
    ttl = 0
    if spec.get("ttl") is not None:
        try:
            seconds = parse_duration(str(spec["ttl"]), allow_milliseconds=False)
            ttl = validate.ttl_seconds(int(seconds.total_seconds()), "spec.ttl",
                                       maximum=max_ttl)
        except (InvalidValueError, SigilError) as exc:
            raise TemplateError(f"{where}: spec.ttl: {exc}") from None
    dns = spec.get("dnsNameTemplates") or []
    if (not isinstance(dns, list) or len(dns) > MAX_DNS_NAME_TEMPLATES
            or not all(isinstance(d, str) and d for d in dns)):
        raise TemplateError(f"{where}: spec.dnsNameTemplates must be a list of at most "
                            f"{MAX_DNS_NAME_TEMPLATES} strings")
    for d in dns:
        _check_placeholders(d, f"{where}: spec.dnsNameTemplates")
    feds = spec.get("federatesWith") or []
    if not isinstance(feds, list) or not all(isinstance(f, str) for f in feds):
        raise TemplateError(f"{where}: spec.federatesWith must be a list of trust domains")
    try:
        federates = tuple(validate.trust_domain_name(f, "spec.federatesWith") for f in feds)
    except SigilError as exc:
        raise TemplateError(f"{where}: {exc}") from None
    hint = spec.get("hint") or ""
    if not isinstance(hint, str) or len(hint) > 1024:
        raise TemplateError(f"{where}: spec.hint must be a string of at most 1024 characters")
    return IdentityTemplate(
        name=name, spiffe_id_template=id_template,
        pod_selector=parse_label_selector(spec.get("podSelector"), f"{where}: spec.podSelector"),
        namespace_selector=parse_label_selector(spec.get("namespaceSelector"),
                                                f"{where}: spec.namespaceSelector"),
        x509_svid_ttl=ttl, dns_name_templates=tuple(dns), federates_with=federates, hint=hint,
    )


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What templates read from a pod."""

    namespace: str
    name: str
    uid: str
    service_account: str
    node_name: str
    phase: str
    labels: Mapping[str, str]

    @classmethod
    def from_object(cls, obj: JsonObject) -> PodFacts:
        """Read a Pod object (missing fields become empty strings)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        labels = meta.get("labels") or {}
        return cls(
            namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            service_account=str(spec.get("serviceAccountName") or "default"),
            node_name=str(spec.get("nodeName") or ""),
            phase=str((obj.get("status") or {}).get("phase") or ""),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict)
            else {},
        )

    @property
    def running(self) -> bool:
        """Scheduled on a node and in phase Running: the pods that get entries."""
        return self.phase == "Running" and bool(self.node_name) and bool(self.uid)


def render(text: str, pod: PodFacts, trust_domain: TrustDomain) -> str:
    """Fill a template's placeholders for one pod.

    Raises:
        RenderError: the pod lacks a label the template names.
    """
    values = {"trust_domain": trust_domain.name, "namespace": pod.namespace,
              "service_account": pod.service_account, "pod_name": pod.name,
              "pod_uid": pod.uid, "node_name": pod.node_name}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("label:"):
            key = name[6:]
            if key not in pod.labels:
                raise RenderError(f"pod {pod.namespace}/{pod.name} has no label {key!r}")
            return pod.labels[key]
        return values[name]

    return _PLACEHOLDER.sub(fill, text)


def owner_key(cluster: str, pod_uid: str = "", template: str = "") -> str:
    """The owner marker of an entry (or, with fewer parts, the prefix of a group).

    ``k8s/<cluster>/<pod uid>/<template>``: one entry per pod and template, found
    again after a restart; the pod UID comes first so one pod's entries share a prefix.
    """
    parts = [OWNER_PREFIX, cluster, pod_uid, template]
    while parts and not parts[-1]:
        parts.pop()
    return "/".join(parts) + ("/" if len(parts) < 4 else "")


def selects(template: IdentityTemplate, pod: PodFacts,
            namespace_labels: Mapping[str, str]) -> bool:
    """Whether the template selects the pod (both selectors)."""
    return (template.pod_selector.matches(pod.labels)
            and template.namespace_selector.matches(namespace_labels))


def desired_entry(template: IdentityTemplate, pod: PodFacts, *, cluster: str,
                  node_uid: str, trust_domain: TrustDomain) -> EntryRecord:
    """The entry the template gives the pod: parent the node's agent, selector pod-uid.

    Raises:
        RenderError: a missing label, or a rendered SPIFFE ID or DNS name that is
            invalid (not ours, reserved, not a host name).
    """
    try:
        spiffe_id: SpiffeId = validate.workload_id(
            render(template.spiffe_id_template, pod, trust_domain), "spiffeIDTemplate",
            trust_domain)
        dns = validate.dns_names(render(d, pod, trust_domain)
                                 for d in template.dns_name_templates)
    except RenderError:
        raise
    except SigilError as exc:
        raise RenderError(f"IdentityTemplate {template.name!r}, pod {pod.namespace}/"
                          f"{pod.name}: {exc}") from None
    return EntryRecord(
        spiffe_id=spiffe_id,
        parent_id=agent_id(trust_domain, cluster, node_uid),
        selectors=(Selector("k8s", f"pod-uid:{pod.uid}"),),
        x509_svid_ttl=template.x509_svid_ttl,
        dns_names=dns,
        federates_with=template.federates_with,
        hint=template.hint,
        owner=owner_key(cluster, pod.uid, template.name),
    )


def same_content(a: EntryRecord, b: EntryRecord) -> bool:
    """Whether two entries hand out the same thing (ids, revisions and times aside)."""
    return (a.spiffe_id == b.spiffe_id and a.parent_id == b.parent_id
            and sorted(a.selectors) == sorted(b.selectors)
            and a.x509_svid_ttl == b.x509_svid_ttl and a.dns_names == b.dns_names
            and a.federates_with == b.federates_with and a.hint == b.hint
            and a.owner == b.owner and a.jwt_svid_ttl == b.jwt_svid_ttl
            and a.admin == b.admin and a.downstream == b.downstream
            and a.expires_at == b.expires_at)


def labels_of(obj: JsonObject) -> dict[str, str]:
    """An object's labels as strings."""
    labels: Any = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
