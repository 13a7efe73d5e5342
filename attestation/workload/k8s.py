"""The ``k8s`` workload attestor: a process's pod and container, from cgroups and the kubelet.

1. ``/proc/<pid>/cgroup`` names the pod UID and the container ID. Both cgroup
   versions (v1: one line per controller, ``4:memory:/kubepods/...``; v2: one
   ``0::/...`` line), both kubelet cgroup drivers (cgroupfs:
   ``/kubepods/burstable/pod<uid>/<id>``; systemd:
   ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/<runtime>-<id>.scope``)
   and the runtimes' ID forms (containerd ``cri-containerd-<id>.scope``, CRI-O
   ``crio-<id>.scope``, Docker ``docker-<id>.scope`` or a bare ``<id>``). The path
   is anchored: it must start at the kubelet's pods cgroup (``cgroup_roots``) and
   continue exactly ``[<qos>/]<pod>/<container>``, because anyone with a delegated
   cgroup subtree can create a cgroup *named* like another pod's container below
   it. Paths relative to the agent's cgroup namespace (``/../../kubepods-...``)
   may only climb (``..``) before that layout. A process whose cgroups name no pod
   is not in a pod: no ``k8s`` selectors (its ``unix`` ones still apply); one whose
   cgroups name a pod anywhere else is refused.
2. The kubelet's ``/pods`` lists the node's pods: the secure port (HTTPS, verified
   with the kubelet CA, the agent's service-account token as bearer; the agent's
   service account needs ``get`` on ``nodes/proxy``) or, when configured, the
   read-only HTTP port. A container that just started may not have its status
   there yet, so the attestor asks again a few times before giving up.

Selectors (type ``k8s``): ``ns:``, ``sa:``, ``pod-name:``, ``pod-uid:``,
``pod-label:<k>:<v>``, ``pod-owner:<Kind>:<name>``, ``container-name:``,
``container-image:`` (the image as in the pod spec, and as the runtime resolved it
when that differs), ``node-name:``.
"""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.workload import (
    DEFAULT_PROC_ROOT,
    ProcessGoneError,
    ProcessInfo,
    WorkloadAttestationError,
)
from identity.configvalues import parse_duration
from identity.errors import InvalidValueError
from identity.selectors import Selector

NAME = "k8s"

DEFAULT_TOKEN_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBELET_CA_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
MAX_POD_LIST_BYTES = 32 << 20
KUBELET_TIMEOUT = 5.0

# A pod UID: a UUID (with '_' for '-' under the systemd driver), or the 32-hex
# config hash of a static pod.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# Anywhere in a path: does it *name* a pod? (cgroupfs "pod<uid>"; systemd
# "<root>[-<qos>]-pod<uid>.slice"). Only used to tell "not in a pod" from "names a
# pod where the kubelet never puts one", which is refused.
_POD_NAME = re.compile(rf"^(?:pod(?:{_UID})|[a-z0-9-]*-pod(?:{_UID})\.slice)$")
_CONTAINER_SEGMENT = re.compile(
    r"^(?:(?:cri-containerd|crio|docker|containerd)-)?([0-9a-f]{64})(?:\.scope)?$"
)
_QOS_CLASSES = ("burstable", "besteffort")  # guaranteed pods sit right under the root
DEFAULT_CGROUP_ROOTS = ("/kubepods.slice", "/kubepods")
"""The kubelet's pods cgroup under its systemd and its cgroupfs driver (--cgroup-root=/)."""


@dataclass(frozen=True, slots=True)
class PodContainer:
    """Where a process runs: the pod UID and the container ID from its cgroups."""

    pod_uid: str
    container_id: str


def _below_root(rest: list[str], root_name: str) -> PodContainer | None:
    """``rest``, the segments below the kubelet's pods cgroup ``root_name``, when they
    are exactly ``[<qos>/]<pod>/<container>`` as that driver names them."""
    if len(rest) not in (2, 3):
        return None
    pod, container = rest[-2], _CONTAINER_SEGMENT.match(rest[-1])
    if container is None:
        return None
    if root_name.endswith(".slice"):  # systemd: each name extends its parent's
        base = root_name.removesuffix(".slice")
        if len(rest) == 3:
            if not rest[0].startswith(base + "-") or not rest[0].endswith(".slice"):
                return None
            qos = rest[0][len(base) + 1:-len(".slice")]
            if qos not in _QOS_CLASSES:
                return None
            base = f"{base}-{qos}"
        match = re.fullmatch(rf"{re.escape(base)}-pod({_UID})\.slice", pod)
    else:  # cgroupfs: plain names
        if len(rest) == 3 and rest[0] not in _QOS_CLASSES:
            return None
        match = re.fullmatch(rf"pod({_UID})", pod)
    if match is None:
        return None
    return PodContainer(match.group(1).replace("_", "-"), container.group(1))


def _anchored(segments: list[str], roots: tuple[str, ...]) -> PodContainer | None:
    """The pod and container of a cgroup path at the kubelet's place for them, else None.

    Absolute paths must start with one of ``roots`` and continue exactly as the
    kubelet lays pods out below it. A path relative to the agent's cgroup namespace
    (``/../../kubepods-besteffort-pod<uid>.slice/...``) climbs only through our
    own ancestors, which are the kubelet's (the agent runs in a pod) or the
    host's, never a user's: there, what follows the ``..`` must be the kubelet's
    layout from the root's name, a QoS class or a pod down.
    """
    for root in roots:
        root_parts = [p for p in root.split("/") if p]
        if segments[:len(root_parts)] == root_parts:
            found = _below_root(segments[len(root_parts):], root_parts[-1])
            if found is not None:
                return found
        ups = 0
        while ups < len(segments) and segments[ups] == "..":
            ups += 1
        if ups:
            tail = segments[ups:]
            name = root_parts[-1]
            for rest in (tail[1:] if tail[:1] == [name] else None, tail):
                found = _below_root(rest, name) if rest is not None else None
                if found is not None:
                    return found
            if name.endswith(".slice") and len(tail) == 2:
                # A pod slice whose QoS slice is our ancestor:
                # "<root>-<qos>-pod<uid>.slice" (its parent's name is part of it).
                base = name.removesuffix(".slice")
                for qos in _QOS_CLASSES:
                    found = _below_root([f"{base}-{qos}.slice", *tail], name)
                    if found is not None:
                        return found
    return None


def parse_cgroups(text: str, *, roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS
                  ) -> PodContainer | None:
    """The pod and container named by the contents of ``/proc/<pid>/cgroup``.

    A container counts only where the kubelet puts it: right below one of
    ``roots`` (the kubelet's pods cgroup), ``[<qos>/]<pod>/<container>`` and
    nothing more. Anyone with a delegated cgroup subtree (systemd
    ``Delegate=yes``) can create a cgroup named like any pod's container below
    it and move into it, so a pod name anywhere else is refused, not searched for.

    Args:
        text: the file's contents.
        roots: the kubelet's pods cgroups, absolute (``/kubepods.slice``).

    Returns:
        None when no line names a pod (not a pod's process).

    Raises:
        WorkloadAttestationError: a line names a pod or container where the kubelet
            puts none (nested, or outside its root), or lines name different
            containers.
    """
    found: PodContainer | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        segments = [s for s in parts[2].split("/") if s]
        here = _anchored(segments, roots)
        if here is None:
            if any(_POD_NAME.match(s) for s in segments) and any(
                _CONTAINER_SEGMENT.match(s) for s in segments
            ):
                raise WorkloadAttestationError(
                    f"cgroup {parts[2]!r} names a pod container, but not where the "
                    f"kubelet puts containers (below {', '.join(roots)})"
                )
            continue  # not a pod's (or the pod's own cgroup, or crio-conmon-...)
        if found is not None and found != here:
            raise WorkloadAttestationError(
                f"cgroups name two containers: {found.container_id} and "
                f"{here.container_id}"
            )
        found = here
    return found


def _cgroup_roots(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{where}.cgroup_roots must be a list of absolute cgroup paths, "
                         f"not {value!r}")
    roots = []
    for root in value:
        parts = root.split("/") if isinstance(root, str) else []
        if (not isinstance(root, str) or not root.startswith("/")
                or not [p for p in parts if p] or {".", ".."} & set(parts)):
            raise ValueError(f"{where}.cgroup_roots: {root!r} is not an absolute cgroup path "
                             "below /")
        roots.append("/" + "/".join(p for p in parts if p))
    return tuple(roots)


@dataclass(frozen=True, slots=True)
class K8sAttestorConfig:
    """Options of the k8s attestor (``[workload_attestors.k8s]``).

    Attributes:
        kubelet_host: where the kubelet listens (the node itself: the agent runs with
            host networking or reaches it through the node's IP).
        kubelet_secure_port: the kubelet's HTTPS port.
        kubelet_read_only_port: when not 0, use this plain-HTTP read-only port instead.
        kubelet_ca_path: PEM CA of the kubelet's serving certificate.
        skip_kubelet_verification: do not verify the kubelet's certificate (for kubelets
            with self-signed serving certificates).
        token_path: the agent's service-account token, sent to the secure port.
        max_poll_attempts: how many times to ask the kubelet for a container status.
        poll_retry_interval: seconds between those attempts.
        proc_root: where ``<pid>/cgroup`` is read (the host's ``/proc``: the agent
            runs with ``hostPID``); another root serves tests and nested setups.
        cgroup_roots: the kubelet's pods cgroups (where its cgroup driver puts pods),
            as ``/proc/<pid>/cgroup`` shows them; containers anywhere else are refused.
    """

    kubelet_host: str = "127.0.0.1"
    kubelet_secure_port: int = 10250
    kubelet_read_only_port: int = 0
    kubelet_ca_path: Path = DEFAULT_KUBELET_CA_PATH
    skip_kubelet_verification: bool = False
    token_path: Path = DEFAULT_TOKEN_PATH
    max_poll_attempts: int = 20
    poll_retry_interval: float = 0.25
    proc_root: Path = DEFAULT_PROC_ROOT
    cgroup_roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS


CONFIG_KEYS = frozenset(K8sAttestorConfig.__dataclass_fields__)


def parse_config(options: Mapping[str, Any]) -> K8sAttestorConfig:
    """Validate ``[workload_attestors.k8s]``.

    Raises:
        ValueError: an unknown key or a bad value, naming the key.
    """
    where = "workload_attestors.k8s"
    for key in options:
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown key '{where}.{key}'")
    defaults = K8sAttestorConfig()
    values: dict[str, Any] = {}
    for key in ("kubelet_secure_port", "kubelet_read_only_port", "max_poll_attempts"):
        value = options.get(key, getattr(defaults, key))
        low = 0 if key == "kubelet_read_only_port" else 1
        high = 65535 if key.endswith("_port") else 1000
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}.{key} must be a whole number from {low} to {high}, "
                             f"not {value!r}")
        values[key] = value
    host = options.get("kubelet_host", defaults.kubelet_host)
    if not isinstance(host, str) or not host or "/" in host:
        raise ValueError(f"{where}.kubelet_host must be a host name or address, not {host!r}")
    values["kubelet_host"] = host
    for key in ("kubelet_ca_path", "token_path", "proc_root"):
        value = options.get(key, str(getattr(defaults, key)))
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key} must be a file path")
        values[key] = Path(value)
    skip = options.get("skip_kubelet_verification", False)
    if not isinstance(skip, bool):
        raise ValueError(f"{where}.skip_kubelet_verification must be true or false")
    values["skip_kubelet_verification"] = skip
    interval = options.get("poll_retry_interval", defaults.poll_retry_interval)
    if isinstance(interval, str):
        try:
            interval = parse_duration(interval).total_seconds()
        except InvalidValueError as exc:
            raise ValueError(f"{where}.poll_retry_interval: {exc}") from None
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not (
        0 < interval <= 60
    ):
        raise ValueError(f"{where}.poll_retry_interval must be a duration up to 60s")
    values["poll_retry_interval"] = float(interval)
    if "cgroup_roots" in options:
        values["cgroup_roots"] = _cgroup_roots(options["cgroup_roots"], where)
    return K8sAttestorConfig(**values)


PodLister = Callable[[], list[Mapping[str, Any]]]


class KubeletClient:
    """Reads the kubelet's ``/pods``."""

    def __init__(self, config: K8sAttestorConfig) -> None:
        self._config = config

    def _url_and_context(self) -> tuple[str, ssl.SSLContext | None]:
        cfg = self._config
        host = f"[{cfg.kubelet_host}]" if ":" in cfg.kubelet_host else cfg.kubelet_host
        if cfg.kubelet_read_only_port:
            return f"http://{host}:{cfg.kubelet_read_only_port}/pods", None
        if cfg.skip_kubelet_verification:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                ctx = ssl.create_default_context(cafile=str(cfg.kubelet_ca_path))
            except OSError as exc:
                raise WorkloadAttestationError(
                    f"cannot read the kubelet CA {cfg.kubelet_ca_path}: {exc.strerror}"
                ) from None
        return f"https://{host}:{cfg.kubelet_secure_port}/pods", ctx

    def pods(self) -> list[Mapping[str, Any]]:
        """The node's pods.

        Raises:
            WorkloadAttestationError: the kubelet is unreachable, refuses us or answers
                something that is not a pod list.
        """
        url, ctx = self._url_and_context()
        # S310: the URL is built above, http or https only.
        request = urllib.request.Request(  # noqa: S310
            url, headers={"Accept": "application/json"}
        )
        if ctx is not None:
            try:
                token = self._config.token_path.read_text().strip()
            except OSError as exc:
                raise WorkloadAttestationError(
                    f"cannot read the service account token {self._config.token_path}: "
                    f"{exc.strerror}"
                ) from None
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(  # noqa: S310 - http(s) only, see above
                request, context=ctx, timeout=KUBELET_TIMEOUT
            ) as resp:
                body = resp.read(MAX_POD_LIST_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise WorkloadAttestationError(f"the kubelet answered {exc.code} for {url}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise WorkloadAttestationError(f"cannot reach the kubelet at {url}: {exc}") from None
        if len(body) > MAX_POD_LIST_BYTES:
            raise WorkloadAttestationError("the kubelet's pod list is too large")
        try:
            doc = json.loads(body)
        except ValueError:
            raise WorkloadAttestationError("the kubelet's pod list is not JSON") from None
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise WorkloadAttestationError("the kubelet's answer is not a pod list")
        return [p for p in items if isinstance(p, dict)]


def _strip_runtime(container_id: object) -> str:
    # "containerd://<id>", "cri-o://<id>", "docker://<id>"
    return str(container_id).rpartition("://")[2] if container_id else ""


def _find(pods: list[Mapping[str, Any]], where: PodContainer
          ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    for pod in pods:
        if (pod.get("metadata") or {}).get("uid") != where.pod_uid:
            continue
        status = pod.get("status") or {}
        for key in ("containerStatuses", "initContainerStatuses",
                    "ephemeralContainerStatuses"):
            for cs in status.get(key) or ():
                if isinstance(cs, dict) and _strip_runtime(cs.get("containerID")) == (
                    where.container_id
                ):
                    return pod, cs
        return pod, None
    return None, None


def pod_selectors(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[Selector]:
    """The ``k8s`` selectors of a container of a pod (as the kubelet lists them)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    out = [
        Selector(NAME, f"ns:{meta.get('namespace', '')}"),
        Selector(NAME, f"sa:{spec.get('serviceAccountName') or 'default'}"),
        Selector(NAME, f"pod-name:{meta.get('name', '')}"),
        Selector(NAME, f"pod-uid:{meta.get('uid', '')}"),
        Selector(NAME, f"node-name:{spec.get('nodeName', '')}"),
    ]
    for key, value in sorted((meta.get("labels") or {}).items()):
        out.append(Selector(NAME, f"pod-label:{key}:{value}"))
    for owner in meta.get("ownerReferences") or ():
        if isinstance(owner, dict):
            out.append(Selector(NAME, f"pod-owner:{owner.get('kind')}:{owner.get('name')}"))
    name = container.get("name", "")
    out.append(Selector(NAME, f"container-name:{name}"))
    spec_images = [c.get("image") for key in ("containers", "initContainers",
                                                "ephemeralContainers")
                   for c in spec.get(key) or () if isinstance(c, dict) and c.get("name") == name]
    for image in (*spec_images, container.get("image")):
        if image:
            out.append(Selector(NAME, f"container-image:{image}"))
    return list(dict.fromkeys(out))


def pod_object_selectors(pod: Mapping[str, Any]) -> list[Selector]:
    """The pod-level ``k8s`` selectors of a pod (no ``container-*`` ones): what a
    pod named by a broker's Kubernetes object reference is attested with."""
    return [s for s in pod_selectors(pod, {}) if not s.value.startswith("container-")]


class K8sAttestor:
    """Produces ``k8s:*`` selectors for processes in pods."""

    def __init__(
        self,
        config: K8sAttestorConfig | None = None,
        *,
        proc_root: Path | None = None,
        pods: PodLister | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._config = config or K8sAttestorConfig()
        self._proc_root = proc_root if proc_root is not None else self._config.proc_root
        self._pods = pods or KubeletClient(self._config).pods
        self._sleep = sleep

    @property
    def name(self) -> str:
        """``k8s``."""
        return NAME

    def find_pod(self, *, namespace: str | None, name: str | None,
                 uid: str | None) -> Mapping[str, Any] | None:
        """The running pod of this node with that namespace and name and/or UID.

        Only the kubelet's list is asked, so only pods of this node are found; a
        pod that finished (phase Succeeded or Failed) is not. When both a name and
        a UID are given, the pod must have both.

        Raises:
            WorkloadAttestationError: the kubelet cannot be asked.
        """
        for pod in self._pods():
            meta = pod.get("metadata") or {}
            if uid and meta.get("uid") != uid:
                continue
            if name is not None and (meta.get("name") != name
                                     or meta.get("namespace") != namespace):
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return None
            return pod
        return None

    def attest(self, process: ProcessInfo) -> list[Selector]:
        """The process's pod and container selectors; none when it is not in a pod.

        Raises:
            ProcessGoneError: the process no longer exists.
            WorkloadAttestationError: its cgroups are unreadable, the kubelet cannot be
                asked, or its container never appeared in the kubelet's pod list.
        """
        path = self._proc_root / str(process.pid) / "cgroup"
        try:
            text = path.read_text()
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGoneError(f"process {process.pid} is gone") from exc
        except OSError as exc:
            raise WorkloadAttestationError(
                f"cannot read /proc/{process.pid}/cgroup: {exc.strerror}"
            ) from exc
        where = parse_cgroups(text, roots=self._config.cgroup_roots)
        if where is None:
            return []
        attempts = self._config.max_poll_attempts
        for attempt in range(attempts):
            pod, container = _find(self._pods(), where)
            if pod is not None and container is not None:
                return pod_selectors(pod, container)
            if attempt + 1 < attempts:
                self._sleep(self._config.poll_retry_interval)
        raise WorkloadAttestationError(
            f"container {where.container_id[:12]} of pod {where.pod_uid} is not in the "
            f"kubelet's pod list after {attempts} attempts"
        )
