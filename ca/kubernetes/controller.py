"""The registration controller: IdentityTemplates and running pods -> entries.

For every running pod (phase ``Running``, on a node) and every IdentityTemplate
that selects it (``podSelector`` over the pod's labels, ``namespaceSelector``
over its namespace's labels), the datastore holds exactly one entry: the rendered
SPIFFE ID, parent the k8s_psat agent of the pod's node
(``spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node-uid>``), selector
``k8s:pod-uid:<uid>``. The entry's ``owner`` column says which pod and template it
stands for (``k8s/<cluster>/<pod-uid>/<template>``, unique in the schema), so a
restarted server, or a second server of an HA pair, finds its entries again and
never makes a second one.

The entry exists as soon as the pod runs, whether or not the node's agent has
attested yet (as SPIRE's controller does): the agent receives it when it arrives,
and no other agent ever can, since only that node's agent has that ID.

Threads: one watcher per resource (pods, namespaces, identitytemplates) keeps an
in-memory copy current: list, then watch from the list's resourceVersion,
resume from the last seen resourceVersion (BOOKMARKs advance it) whenever the
stream ends, and list again on 410 Gone. A reconciler thread turns changes into
datastore writes: a pod's change reconciles that pod's entries; a template or
namespace change, or a relist, reconciles everything. Nothing is reconciled
until all three resources have been listed once, so a half-loaded view never
deletes entries. An APScheduler job relists everything every ``resync_interval``
as a safety net (a lost event, an entry changed or deleted by hand).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from attestation.kubeapi import JsonObject, KubeApiError
from ca.config.policy import Policy, PolicyViolationError
from ca.datastore import Datastore, EntryRecord
from ca.errors import AlreadyExistsError, ConflictError, NotFoundError
from ca.kubernetes.templates import (
    IdentityTemplate,
    PodFacts,
    RenderError,
    TemplateError,
    desired_entry,
    labels_of,
    owner_key,
    parse_template,
    same_content,
    selects,
)
from ca.log import event
from ca.metrics import count_kubernetes_reconcile
from ca.registry.entries import EntryService
from identity.clock import Clock
from identity.spiffeid import TrustDomain

KINDS = ("namespaces", "identitytemplates", "pods")


class Stream(Protocol):
    """An open watch (:class:`attestation.kubeapi.WatchStream`)."""

    def __iter__(self) -> Iterator[tuple[str, JsonObject]]:
        """``(type, object)`` events until the stream ends."""
        ...

    def close(self) -> None:
        """End the stream from another thread."""
        ...


class WatchApi(Protocol):
    """The API calls the controller makes (:class:`attestation.kubeapi.KubeApi`)."""

    def list_objects(self, kind: str) -> tuple[list[JsonObject], str]:
        """Every object of a kind and the list's resourceVersion."""
        ...

    def watch_objects(self, kind: str, resource_version: str) -> Stream:
        """A watch from a resourceVersion."""
        ...

    def get_node(self, name: str) -> JsonObject | None:
        """A node, or None."""
        ...


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """What the controller needs besides the API and the datastore.

    Attributes:
        trust_domain: ours; rendered SPIFFE IDs must be in it.
        cluster: the cluster name, as in the k8s_psat agent IDs of its nodes.
        max_ttl: the longest ``ttl`` a template may ask for.
        resync_interval: how often everything is listed again.
        retry_delay: seconds to wait after a failed API call or datastore write.
        policy: the issuance policy; an entry breaking it is not written.
    """

    trust_domain: TrustDomain
    cluster: str
    max_ttl: dt.timedelta
    resync_interval: dt.timedelta = dt.timedelta(minutes=10)
    retry_delay: float = 1.0
    policy: Policy = field(default_factory=Policy)


@dataclass
class ReconcileResult:
    """What one reconcile pass changed."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class _State:
    objects: dict[str, dict[str, JsonObject]] = field(
        default_factory=lambda: {k: {} for k in KINDS})
    listed: set[str] = field(default_factory=set)
    dirty_all: bool = False
    dirty_pods: set[str] = field(default_factory=set)
    relist: set[str] = field(default_factory=set)


def _key(kind: str, obj: JsonObject) -> str:
    meta = obj.get("metadata") or {}
    # Pods by UID: a pod deleted and recreated under its name is another pod.
    return str(meta.get("uid") if kind == "pods" else meta.get("name") or "")


class RegistrationController:
    """Keeps one entry per running pod and IdentityTemplate (see the module docstring)."""

    def __init__(self, api: WatchApi, datastore: Datastore, settings: ControllerSettings,
                 *, clock: Clock) -> None:
        self._api = api
        self._datastore = datastore
        self._entries = EntryService(datastore, clock, settings.policy)
        self._settings = settings
        self._cond = threading.Condition()
        self._state = _State()
        self._streams: dict[str, Stream] = {}
        self._node_uids: dict[str, str] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scheduler: BackgroundScheduler | None = None
        self._passes = 0
        self._bad_templates: dict[str, str] = {}
        # Problems already logged, by subject: said again only when the reason
        # changes, so a standing conflict does not fill the log every resync.
        # A full pass forgets those it did not meet again (resolved, or gone).
        self._reported: dict[str, str] = {}
        self._met: set[str] | None = None
        self._busy = False

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the watchers, the reconciler and the periodic resync."""
        for kind in KINDS:
            t = threading.Thread(target=self._watch_loop, args=(kind,), daemon=True,
                                 name=f"k8s-watch-{kind}")
            self._threads.append(t)
        self._threads.append(threading.Thread(target=self._reconcile_loop, daemon=True,
                                              name="k8s-reconcile"))
        for t in self._threads:
            t.start()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self.request_resync, "interval",
                                seconds=max(1.0, self._settings.resync_interval.total_seconds()),
                                id="k8s-resync", max_instances=1, coalesce=True)
        self._scheduler.start()
        event("kubernetes controller started", cluster=self._settings.cluster)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every thread; a write in progress finishes first."""
        self._stopping.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        with self._cond:
            streams = list(self._streams.values())
            self._cond.notify_all()
        for stream in streams:
            _interrupt(stream)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        event("kubernetes controller stopped", cluster=self._settings.cluster)

    def __enter__(self) -> RegistrationController:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def request_resync(self) -> None:
        """List every resource again and reconcile everything (the periodic safety net)."""
        with self._cond:
            self._state.relist.update(KINDS)
            self._node_uids.clear()
            streams = list(self._streams.values())
        for stream in streams:
            _interrupt(stream)

    @property
    def passes(self) -> int:
        """How many reconcile passes have completed (for tests and health)."""
        with self._cond:
            return self._passes

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything is listed and no change is pending (for tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                st = self._state
                if (len(st.listed) == len(KINDS) and not st.dirty_all and not st.dirty_pods
                        and not st.relist and not self._busy):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))

    # ---- watching ---------------------------------------------------------------------

    def _watch_loop(self, kind: str) -> None:
        rv = ""
        delay = self._settings.retry_delay
        while not self._stopping.is_set():
            try:
                with self._cond:
                    if kind in self._state.relist:
                        self._state.relist.discard(kind)
                        rv = ""
                if not rv:
                    rv = self._relist(kind)
                stream = self._api.watch_objects(kind, rv)
                with self._cond:
                    self._streams[kind] = stream
                opened = time.monotonic()
                try:
                    rv = self._follow(kind, stream, rv)
                finally:
                    with self._cond:
                        self._streams.pop(kind, None)
                    stream.close()
                delay = self._settings.retry_delay
                if rv and time.monotonic() - opened < 1.0:
                    # A stream that ends at once, again and again, must not spin.
                    self._stopping.wait(delay)
            except KubeApiError as exc:
                if self._stopping.is_set():
                    return
                event("kubernetes watch failed", level=logging.WARNING, resource=kind,
                      error=str(exc), retry_in=f"{delay:.1f}s")
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            except Exception as exc:  # keep watching; the traceback says what broke
                event("kubernetes watch failed", level=logging.ERROR, resource=kind,
                      error=f"{exc.__class__.__name__}: {exc}", exc_info=True)
                self._stopping.wait(delay)

    def _relist(self, kind: str) -> str:
        items, rv = self._api.list_objects(kind)
        with self._cond:
            self._state.objects[kind] = {_key(kind, o): o for o in items if _key(kind, o)}
            self._state.listed.add(kind)
            self._state.dirty_all = True
            self._cond.notify_all()
        event("kubernetes resource listed", level=logging.DEBUG, resource=kind,
              count=len(items), resource_version=rv)
        return rv

    def _follow(self, kind: str, stream: Stream, rv: str) -> str:
        """Apply a stream's events; the resourceVersion to resume from ("" to relist)."""
        for etype, obj in stream:
            if self._stopping.is_set():
                break
            if etype == "ERROR":
                code = obj.get("code")
                if code == 410:
                    event("kubernetes watch expired", resource=kind, resource_version=rv,
                          action="relist")
                    return ""
                raise KubeApiError(f"watch {kind}: {obj.get('message') or obj}")
            new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "") or rv
            if etype == "BOOKMARK":
                rv = new_rv
            elif etype in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(kind, etype, obj)
                rv = new_rv
            with self._cond:
                if kind in self._state.relist:
                    break
        return rv

    def _apply(self, kind: str, etype: str, obj: JsonObject) -> None:
        key = _key(kind, obj)
        if not key:
            return
        with self._cond:
            objects = self._state.objects[kind]
            if etype == "DELETED":
                objects.pop(key, None)
            else:
                objects[key] = obj
            if kind == "pods":
                self._state.dirty_pods.add(key)
            else:
                self._state.dirty_all = True
            self._cond.notify_all()

    # ---- reconciling ------------------------------------------------------------------

    def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                while not self._stopping.is_set() and not (
                    len(self._state.listed) == len(KINDS)
                    and (self._state.dirty_all or self._state.dirty_pods)
                ):
                    self._cond.wait(1.0)
                if self._stopping.is_set():
                    return
                everything = self._state.dirty_all
                pods = set(self._state.dirty_pods)
                self._state.dirty_all = False
                self._state.dirty_pods.clear()
                self._busy = True
            try:
                self.reconcile(None if everything else pods)
            except Exception as exc:  # a datastore outage: mark it all again, retry
                event("kubernetes reconcile failed", level=logging.ERROR,
                      error=f"{exc.__class__.__name__}: {exc}", exc_info=True)
                with self._cond:
                    self._state.dirty_all = self._state.dirty_all or everything
                    self._state.dirty_pods |= pods
                self._stopping.wait(self._settings.retry_delay)
            finally:
                with self._cond:
                    self._busy = False
                    self._passes += 1
                    self._cond.notify_all()

    def _templates(self, objects: Iterable[JsonObject]) -> list[IdentityTemplate]:
        out: list[IdentityTemplate] = []
        bad: dict[str, str] = {}
        for obj in objects:
            try:
                out.append(parse_template(obj, max_ttl=self._settings.max_ttl))
            except TemplateError as exc:
                name = str((obj.get("metadata") or {}).get("name") or "")
                bad[name] = str(exc)
        for name, reason in bad.items():
            if self._bad_templates.get(name) != reason:
                event("identity template invalid", level=logging.WARNING, template=name,
                      reason=reason)
        self._bad_templates = bad
        return sorted(out, key=lambda t: t.name)

    def _first_report(self, subject: str, reason: str) -> bool:
        """True when a problem with ``subject`` is new or its reason changed: log it."""
        if self._met is not None:
            self._met.add(subject)
        if self._reported.get(subject) == reason:
            return False
        self._reported[subject] = reason
        return True

    def _resolved(self, subject: str) -> None:
        self._reported.pop(subject, None)

    def _node_uid(self, name: str) -> str | None:
        with self._cond:
            found = self._node_uids.get(name)
        if found is not None:
            return found
        node = self._api.get_node(name)
        uid = (node.get("metadata") or {}).get("uid") if node is not None else None
        if not isinstance(uid, str) or not uid:
            return None
        with self._cond:
            self._node_uids[name] = uid
        return uid

    def desired(self, pod_uids: set[str] | None = None) -> dict[str, EntryRecord]:
        """The entries that should exist (by owner), for some pods or all of them."""
        with self._cond:
            pods = dict(self._state.objects["pods"])
            namespaces = dict(self._state.objects["namespaces"])
            template_objects = list(self._state.objects["identitytemplates"].values())
        templates = self._templates(template_objects)
        s = self._settings
        out: dict[str, EntryRecord] = {}
        for uid, obj in pods.items():
            if pod_uids is not None and uid not in pod_uids:
                continue
            pod = PodFacts.from_object(obj)
            if not pod.running:
                continue
            ns = namespaces.get(pod.namespace)
            ns_labels = labels_of(ns) if ns is not None else {}
            chosen = [t for t in templates if selects(t, pod, ns_labels)]
            if not chosen:
                continue
            node_uid = self._node_uid(pod.node_name)
            name = f"{pod.namespace}/{pod.name}"
            if node_uid is None:
                reason = f"node {pod.node_name} does not exist"
                if self._first_report(f"pod {uid}", reason):
                    event("pod skipped", level=logging.WARNING, pod=name, reason=reason)
                continue
            self._resolved(f"pod {uid}")
            for template in chosen:
                subject = f"pod {uid} template {template.name}"
                try:
                    entry = desired_entry(template, pod, cluster=s.cluster, node_uid=node_uid,
                                          trust_domain=s.trust_domain)
                except RenderError as exc:
                    if self._first_report(subject, str(exc)):
                        event("pod skipped", level=logging.WARNING, pod=name,
                              template=template.name, reason=str(exc))
                    continue
                self._resolved(subject)
                out[entry.owner] = entry
        return out

    def reconcile(self, pod_uids: set[str] | None = None) -> ReconcileResult:
        """Make the datastore match the current view, for some pods or everything.

        Safe to run again at any time: it only writes differences.

        Raises:
            KubeApiError: a node lookup failed (nothing half-done: retry later).
            SigilError: the datastore failed.
        """
        s = self._settings
        self._met = set() if pod_uids is None else None
        want = self.desired(pod_uids)
        have: dict[str, EntryRecord] = {}
        prefixes = ([owner_key(s.cluster)] if pod_uids is None
                    else [owner_key(s.cluster, uid) for uid in sorted(pod_uids)])
        for prefix in prefixes:
            for entry in self._datastore.list_owned_entries(prefix):
                have[entry.owner] = entry
        result = ReconcileResult()
        for owner, entry in have.items():
            if owner not in want:
                try:
                    self._entries.delete(entry.id)
                    result.deleted += 1
                except NotFoundError:
                    pass  # another server (or an operator) deleted it first
        for owner, entry in want.items():
            current = have.get(owner)
            try:
                if current is None:
                    self._entries.create(entry)
                    result.created += 1
                elif not same_content(current, replace(entry, id=current.id)):
                    self._update(current, entry)
                    result.updated += 1
            except (AlreadyExistsError, ConflictError, NotFoundError,
                    PolicyViolationError) as exc:
                # Another template or entry claims the same identity, another
                # server wrote first, or the issuance policy refuses the entry:
                # report it (once per reason); the next pass sees the new state.
                result.skipped.append(owner)
                if self._first_report(f"entry {owner}", str(exc)):
                    event("entry not reconciled", level=logging.WARNING, owner=owner,
                          spiffe_id=entry.spiffe_id, reason=str(exc))
            else:
                self._resolved(f"entry {owner}")
        if self._met is not None:
            self._reported = {k: v for k, v in self._reported.items() if k in self._met}
            self._met = None
        count_kubernetes_reconcile(everything=pod_uids is None, created=result.created,
                                   updated=result.updated, deleted=result.deleted,
                                   skipped=len(result.skipped))
        if result.created or result.updated or result.deleted:
            event("kubernetes entries reconciled", created=result.created,
                  updated=result.updated, deleted=result.deleted,
                  scope="all" if pod_uids is None else f"{len(pod_uids)} pods")
        return result

    def _update(self, current: EntryRecord, entry: EntryRecord) -> None:
        def change(_stored: EntryRecord) -> EntryRecord:
            return entry

        self._entries.update(current.id, change, fields=("kubernetes",))


def _interrupt(stream: Stream) -> None:
    """Close a stream so that a thread blocked reading it wakes up."""
    # Closing a socket does not wake a thread blocked in recv() on it on Linux;
    # shutting it down does.
    sock = _socket_of(stream)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    stream.close()


def _socket_of(stream: object) -> socket.socket | None:
    resp = getattr(stream, "_resp", None)
    conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None

