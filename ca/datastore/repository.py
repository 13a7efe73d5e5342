"""The one repository that queries the datastore.

Each public method runs in its own session and transaction. Operations that must
commit together (node attestation: consume a token, store the node, create its
alias entry) use :meth:`Datastore.transaction`, whose :class:`Transaction` offers
the same writes inside one transaction.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, func, not_, or_, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from attestation.node.join_token import StoredJoinToken
from ca.datastore import models as m
from ca.datastore.engine import READ_ONLY, make_engine
from ca.datastore.federation import FederationQueries
from ca.datastore.records import (
    FOREIGN_BUNDLES_CHANGED,
    CaKeyRecord,
    EntryFilter,
    EntryRecord,
    Match,
    NodeRecord,
    StoredBundle,
    selector_hash,
)
from ca.datastore.revocations import RevocationQueries
from ca.errors import (
    AlreadyExistsError,
    ConflictError,
    DatastoreError,
    NotFoundError,
    PermissionDeniedError,
)
from identity.refusal import RefusalReason
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

TRUST_DOMAIN_INFO = "trust_domain"
"""The ``datastore_info`` row naming the database's trust domain (revision 0006)."""
SERVER_HOST_INFO = "host:"
"""Prefix of the ``datastore_info`` rows naming each server instance's host
(``host:<instance id>`` -> host name), for ``sigil-server status``."""


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


def _dt(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def _entry_record(row: m.RegistrationEntry) -> EntryRecord:
    return EntryRecord(
        id=row.id,
        spiffe_id=SpiffeId.parse(row.spiffe_id),
        parent_id=SpiffeId.parse(row.parent_id),
        selectors=tuple(Selector(s.type, s.value) for s in row.selectors),
        x509_svid_ttl=row.x509_svid_ttl,
        jwt_svid_ttl=row.jwt_svid_ttl,
        dns_names=tuple(d.name for d in row.dns_names),
        federates_with=tuple(TrustDomain(f.trust_domain) for f in row.federates_with),
        hint=row.hint,
        admin=row.admin,
        downstream=row.downstream,
        expires_at=row.expires_at,
        owner=row.owner or "",
        revision=row.revision,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _node_record(row: m.AttestedNode) -> NodeRecord:
    return NodeRecord(
        spiffe_id=SpiffeId.parse(row.spiffe_id),
        attestor=row.attestor,
        serial=int(row.serial),
        new_serial=int(row.new_serial) if row.new_serial else None,
        expires_at=row.expires_at,
        selectors=tuple(Selector(s.type, s.value) for s in row.selectors),
        banned=row.banned,
        can_reattest=row.can_reattest,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _ca_key_record(row: m.CaKey) -> CaKeyRecord:
    return CaKeyRecord(
        id=row.id, kind=row.kind, status=row.status, key_id=row.key_id,
        public_key=row.public_key, certificate=row.certificate,
        not_after=row.not_after, created_at=row.created_at, owner=row.owner,
        not_before=row.not_before, activated_at=row.activated_at,
        deactivated_at=row.deactivated_at, signed_until=row.signed_until,
    )


def _insert_first_bundle(session: Session, trust_domain: TrustDomain, data: str,
                         sequence: int) -> bool:
    """Insert a trust domain's first bundle row; False if one exists (or just appeared)."""
    if session.get(m.BundleRow, trust_domain.name) is not None:
        return False
    try:
        # A savepoint: losing the race to insert must not doom the session.
        with session.begin_nested():
            session.add(m.BundleRow(trust_domain=trust_domain.name, data=data,
                                    sequence=sequence))
    except IntegrityError:
        return False
    return True


def _record_change(session: Session, kind: str, entry_id: str, now: int) -> int:
    ev = m.ChangeEvent(kind=kind, entry_id=entry_id, at=now)
    session.add(ev)
    session.flush()
    return ev.id


def _record_bundle_change(session: Session) -> None:
    # The event's time is informational (nothing reads it back): the wall clock
    # keeps the bundle writers' signatures free of a clock they do not need.
    _record_change(session, "bundle_changed", FOREIGN_BUNDLES_CHANGED, int(time.time()))


def _create_entry(session: Session, entry: EntryRecord, now: int) -> EntryRecord:
    digest = selector_hash(entry.spiffe_id, entry.parent_id, entry.selectors)
    existing = session.scalar(
        select(m.RegistrationEntry.id).where(m.RegistrationEntry.selector_hash == digest)
    )
    if existing is not None:
        raise AlreadyExistsError(
            f"an entry with SPIFFE ID {entry.spiffe_id}, parent {entry.parent_id} and these "
            f"selectors already exists (id {existing})"
        )
    entry_id = str(uuid.uuid4())
    try:
        # A savepoint: a concurrent insert may win the unique selector_hash between
        # our check and our flush; the failed flush then undoes only this entry and
        # its change event, and the caller's transaction stays usable (PostgreSQL
        # refuses every further statement in a transaction whose statement failed;
        # SQLAlchemy does the same to a session whose flush failed).
        with session.begin_nested():
            revision = _record_change(session, "entry_created", entry_id, now)
            row = m.RegistrationEntry(
                id=entry_id,
                spiffe_id=str(entry.spiffe_id),
                parent_id=str(entry.parent_id),
                selector_hash=digest,
                x509_svid_ttl=entry.x509_svid_ttl,
                jwt_svid_ttl=entry.jwt_svid_ttl,
                hint=entry.hint,
                admin=entry.admin,
                downstream=entry.downstream,
                expires_at=entry.expires_at,
                owner=entry.owner or None,
                revision=revision,
                created_at=now,
                updated_at=now,
                selectors=[m.EntrySelector(type=s.type, value=s.value)
                           for s in sorted(set(entry.selectors))],
                dns_names=[m.EntryDnsName(name=n) for n in dict.fromkeys(entry.dns_names)],
                federates_with=[m.EntryFederatesWith(trust_domain=td.name)
                                for td in dict.fromkeys(entry.federates_with)],
            )
            session.add(row)
            session.flush()
    except IntegrityError:
        raise AlreadyExistsError(
            f"an entry with SPIFFE ID {entry.spiffe_id}, parent {entry.parent_id} and these "
            "selectors already exists"
        ) from None
    return _entry_record(row)


def _set_condition(
    child: type[m.EntrySelector] | type[m.EntryFederatesWith],
    conds: Sequence[ColumnElement[bool]],
    match: Match,
) -> ColumnElement[bool]:
    """An entry's child rows (selectors or federated trust domains) against given values.

    Correlated EXISTS subqueries, so the database filters and pagination stays exact.
    """

    def exists(*where: ColumnElement[bool]) -> ColumnElement[bool]:
        return select(child.id).where(child.entry_id == m.RegistrationEntry.id, *where).exists()

    anything_else = exists(not_(or_(*conds)))
    if match is Match.ANY:
        return exists(or_(*conds))
    if match is Match.SUBSET:
        return and_(exists(), not_(anything_else))
    every = and_(*(exists(c) for c in conds))
    if match is Match.SUPERSET:
        return every
    return and_(every, not_(anything_else))


def _entry_query_filters(f: EntryFilter) -> list[ColumnElement[bool]]:
    e = m.RegistrationEntry
    where: list[ColumnElement[bool]] = []
    if f.spiffe_id is not None:
        where.append(e.spiffe_id == str(f.spiffe_id))
    if f.parent_id is not None:
        where.append(e.parent_id == str(f.parent_id))
    if f.hint is not None:
        where.append(e.hint == f.hint)
    if f.selectors:
        where.append(_set_condition(m.EntrySelector, [
            and_(m.EntrySelector.type == sel.type, m.EntrySelector.value == sel.value)
            for sel in sorted(set(f.selectors))
        ], f.selector_match))
    if f.federates_with:
        where.append(_set_condition(m.EntryFederatesWith, [
            m.EntryFederatesWith.trust_domain == td.name
            for td in sorted(set(f.federates_with), key=lambda t: t.name)
        ], f.federates_with_match))
    return where


def _fill_node(row: m.AttestedNode, node: NodeRecord, ts: int) -> None:
    row.attestor = node.attestor
    row.serial = str(node.serial)
    row.new_serial = "" if node.new_serial is None else str(node.new_serial)
    row.expires_at = node.expires_at
    row.banned = node.banned
    row.can_reattest = node.can_reattest
    row.updated_at = ts
    row.selectors = [m.NodeSelector(type=s.type, value=s.value) for s in node.selectors]


class Transaction:
    """Writes that commit together. Obtain one from :meth:`Datastore.transaction`.

    Implements :class:`attestation.node.join_token.JoinTokenStore`.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    def claim_join_token(self, token_id: str, *, now: dt.datetime) -> StoredJoinToken | None:
        """Mark the token used if unused; return it as it was before (see JoinTokenStore)."""
        # The conditional UPDATE comes first and alone decides who wins: it takes the
        # write lock (SQLite) or the row lock (PostgreSQL, MariaDB), so of two
        # concurrent claims exactly one changes a row.
        result = self._session.execute(
            update(m.JoinToken)
            .where(m.JoinToken.token_id == token_id, m.JoinToken.used_at.is_(None))
            .values(used_at=_ts(now))
            .execution_options(synchronize_session=False)
        )
        claimed = getattr(result, "rowcount", 0) == 1
        row = self._session.get(m.JoinToken, token_id, populate_existing=True)
        if row is None:
            return None
        used_at = None if claimed or row.used_at is None else _dt(row.used_at)
        return StoredJoinToken(
            token_id=row.token_id,
            secret_sha256=row.secret_sha256,
            alias=row.alias,
            expires_at=_dt(row.expires_at),
            used_at=used_at,
        )

    def get_node(self, spiffe_id: SpiffeId) -> NodeRecord | None:
        """The attested node with that ID, or None."""
        row = self._session.get(m.AttestedNode, str(spiffe_id))
        return None if row is None else _node_record(row)

    def put_node(self, node: NodeRecord, *, now: dt.datetime) -> None:
        """Create or replace an attested node and its selectors.

        Two transactions may put the same new node at once (one node attesting
        twice): the loser's insert fails inside a savepoint, and it replaces the
        winner's row instead, so both succeed and the last one to commit stands.

        Replacing never lifts a ban: the caller's earlier check of ``banned`` read
        without a lock, and under READ COMMITTED an ``agent ban`` may have committed
        since. The locked read decides.

        Raises:
            PermissionDeniedError: the stored node is banned (reason
                ``agent_banned``) and ``node`` would unban it.
        """
        ts = _ts(now)
        key = str(node.spiffe_id)
        # populate_existing: an earlier read in this session may have left its copy
        # of the row in the identity map; the locked read's values are the ones that
        # count (SQLAlchemy refreshes on FOR UPDATE already; this says so).
        row = self._session.get(m.AttestedNode, key, with_for_update=True,
                                populate_existing=True)
        if row is None:
            try:
                with self._session.begin_nested():
                    row = m.AttestedNode(spiffe_id=key, created_at=ts)
                    _fill_node(row, node, ts)
                    self._session.add(row)
                    self._session.flush()
                return
            except IntegrityError:
                row = self._session.get(m.AttestedNode, key, with_for_update=True,
                                        populate_existing=True)
                if row is None:  # pragma: no cover - inserted, then deleted meanwhile
                    raise
        if row.banned and not node.banned:
            raise PermissionDeniedError(f"agent is banned: {key}",
                                        reason=RefusalReason.AGENT_BANNED)
        _fill_node(row, node, ts)
        self._session.flush()
    def create_entry(self, entry: EntryRecord, *, now: dt.datetime) -> EntryRecord:
        """Create an entry (see :meth:`Datastore.create_entry`)."""
        return _create_entry(self._session, entry, _ts(now))


class Datastore(FederationQueries, RevocationQueries):
    """The repository. Thread-safe: every call opens its own session."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = make_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        # Same pool; on SQLite its transactions begin without the write lock.
        self._read_engine = self._engine.execution_options(**{READ_ONLY: True})
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for migrations and tests)."""
        return self._engine

    @property
    def read_engine(self) -> Engine:
        """The engine for connections that only read (no write lock on SQLite)."""
        return self._read_engine

    def listen_session_event(self, name: str, fn: Callable[..., Any]) -> None:
        """Attach a SQLAlchemy session event listener to this datastore's sessions.

        The entry index uses it to learn of this process's own entry changes at
        commit (``ca.datastore.feed.DatastoreFeed.on_local_change``).
        """
        sa_event.listen(self._sessions, name, fn)

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self, *, read_only: bool = False) -> Iterator[Session]:
        session = (self._read_sessions if read_only else self._sessions)()
        try:
            with session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise DatastoreError(f"datastore error: {exc.__class__.__name__}: {exc}") from exc
        finally:
            session.close()

    def _reading(self) -> AbstractContextManager[Session]:
        """A session that only reads: one snapshot, no write lock (SQLite)."""
        return self._session(read_only=True)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction: commits when the block ends, rolls back if it raises."""
        with self._session() as session:
            yield Transaction(session)

    # ---- the database itself -------------------------------------------------------

    def claim_trust_domain(self, trust_domain: TrustDomain) -> str:
        """The trust domain the database belongs to, recording ``trust_domain`` if none.

        Written only when no trust domain is recorded yet (a new database, or one
        migrated without CA slots); of two servers recording at once, the first
        commit wins and the other reads it.

        Returns:
            The recorded trust domain's name: compare it with ``trust_domain``.
        """
        with self._session() as s:
            row = s.get(m.DatastoreInfo, TRUST_DOMAIN_INFO)
            if row is not None:
                return row.value
            try:
                with s.begin_nested():
                    s.add(m.DatastoreInfo(name=TRUST_DOMAIN_INFO, value=trust_domain.name))
                    s.flush()
            except IntegrityError:
                row = s.get(m.DatastoreInfo, TRUST_DOMAIN_INFO, populate_existing=True)
                if row is None:  # pragma: no cover - inserted, then deleted meanwhile
                    raise
                return row.value
            return trust_domain.name

    def record_server_host(self, instance_id: str, hostname: str) -> None:
        """Record (or update) the host a server instance runs on."""
        name = SERVER_HOST_INFO + instance_id
        with self._session() as s:
            row = s.get(m.DatastoreInfo, name)
            if row is None:
                s.add(m.DatastoreInfo(name=name, value=hostname[:m.TRUST_DOMAIN_LENGTH]))
            else:
                row.value = hostname[:m.TRUST_DOMAIN_LENGTH]

    def server_hosts(self) -> dict[str, str]:
        """Host name by server instance id, as each server recorded it at start."""
        query = select(m.DatastoreInfo).where(m.DatastoreInfo.name.startswith(SERVER_HOST_INFO))
        with self._reading() as s:
            return {r.name[len(SERVER_HOST_INFO):]: r.value for r in s.scalars(query)}

    # ---- entries ------------------------------------------------------------------

    def create_entry(self, entry: EntryRecord, *, now: dt.datetime) -> EntryRecord:
        """Store a new entry with a fresh id and revision.

        Raises:
            AlreadyExistsError: an entry with the same SPIFFE ID, parent and selectors.
        """
        with self._session() as s:
            return _create_entry(s, entry, _ts(now))

    def get_entry(self, entry_id: str) -> EntryRecord:
        """The entry with that id.

        Raises:
            NotFoundError: no such entry.
        """
        with self._reading() as s:
            row = s.get(m.RegistrationEntry, entry_id)
            if row is None:
                raise NotFoundError(f"entry {entry_id!r} not found")
            return _entry_record(row)

    def list_entries(
        self,
        *,
        spiffe_id: SpiffeId | None = None,
        parent_id: SpiffeId | None = None,
        selectors: Sequence[Selector] | None = None,
    ) -> list[EntryRecord]:
        """Entries matching every given filter; ``selectors`` matches the exact set."""
        query = select(m.RegistrationEntry).order_by(
            m.RegistrationEntry.created_at, m.RegistrationEntry.id
        )
        if spiffe_id is not None:
            query = query.where(m.RegistrationEntry.spiffe_id == str(spiffe_id))
        if parent_id is not None:
            query = query.where(m.RegistrationEntry.parent_id == str(parent_id))
        with self._reading() as s:
            rows = [_entry_record(r) for r in s.scalars(query)]
        if selectors:
            wanted = set(selectors)
            rows = [r for r in rows if set(r.selectors) == wanted]
        return rows

    def list_entries_page(
        self, filters: EntryFilter, *, limit: int, after: tuple[int, str] | None = None
    ) -> list[EntryRecord]:
        """Up to ``limit`` entries matching ``filters``, in creation order.

        Args:
            filters: every given filter must hold.
            limit: the page size.
            after: ``(created_at, id)`` of the last entry of the previous page.
        """
        e = m.RegistrationEntry
        query = select(e).where(*_entry_query_filters(filters))
        if after is not None:
            created_at, entry_id = after
            query = query.where(or_(e.created_at > created_at,
                                    and_(e.created_at == created_at, e.id > entry_id)))
        query = query.order_by(e.created_at, e.id).limit(limit)
        with self._reading() as s:
            return [_entry_record(r) for r in s.scalars(query)]

    def count_entries(self) -> int:
        """How many entries there are."""
        with self._reading() as s:
            return int(s.scalar(select(func.count()).select_from(m.RegistrationEntry)) or 0)

    def update_entry(
        self, entry_id: str, entry: EntryRecord, *, expected_revision: int, now: dt.datetime
    ) -> EntryRecord:
        """Replace an entry's fields (not its id or creation time); bump its revision.

        Args:
            entry_id: the entry to change.
            entry: the complete new values.
            expected_revision: the revision the caller read; a concurrent change
                since then makes this fail rather than silently overwrite it.

        Raises:
            NotFoundError: no such entry.
            ConflictError: the entry changed since ``expected_revision``.
            AlreadyExistsError: another entry has the new SPIFFE ID, parent and selectors.
        """
        ts = _ts(now)
        with self._session() as s:
            row = s.get(m.RegistrationEntry, entry_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"entry {entry_id!r} not found")
            if row.revision != expected_revision:
                raise ConflictError(
                    f"entry {entry_id} changed while it was being updated (revision "
                    f"{row.revision}, expected {expected_revision}); read it and retry"
                )
            digest = selector_hash(entry.spiffe_id, entry.parent_id, entry.selectors)
            clash = s.scalar(select(m.RegistrationEntry.id).where(
                m.RegistrationEntry.selector_hash == digest, m.RegistrationEntry.id != entry_id))
            if clash is not None:
                raise AlreadyExistsError(
                    f"an entry with SPIFFE ID {entry.spiffe_id}, parent {entry.parent_id} and "
                    f"these selectors already exists (id {clash})"
                )
            row.spiffe_id = str(entry.spiffe_id)
            row.parent_id = str(entry.parent_id)
            row.selector_hash = digest
            row.x509_svid_ttl = entry.x509_svid_ttl
            row.jwt_svid_ttl = entry.jwt_svid_ttl
            row.hint = entry.hint
            row.admin = entry.admin
            row.downstream = entry.downstream
            row.expires_at = entry.expires_at
            row.owner = entry.owner or None
            row.revision = _record_change(s, "entry_updated", entry_id, ts)
            row.updated_at = ts
            row.selectors = [m.EntrySelector(type=sel.type, value=sel.value)
                             for sel in sorted(set(entry.selectors))]
            row.dns_names = [m.EntryDnsName(name=n) for n in dict.fromkeys(entry.dns_names)]
            row.federates_with = [m.EntryFederatesWith(trust_domain=td.name)
                                  for td in dict.fromkeys(entry.federates_with)]
            try:
                s.flush()
            except IntegrityError:
                raise AlreadyExistsError(
                    f"an entry with SPIFFE ID {entry.spiffe_id}, parent {entry.parent_id} and "
                    "these selectors already exists"
                ) from None
            return _entry_record(row)

    def list_entries_by_parents(self, parent_ids: Iterable[SpiffeId]) -> list[EntryRecord]:
        """Entries whose parent is any of ``parent_ids``."""
        ids = sorted({str(p) for p in parent_ids})
        if not ids:
            return []
        out: list[EntryRecord] = []
        with self._reading() as s:
            # Chunks keep the IN list under every database's bound-parameter limit.
            for i in range(0, len(ids), 500):
                query = select(m.RegistrationEntry).where(
                    m.RegistrationEntry.parent_id.in_(ids[i : i + 500])
                )
                out.extend(_entry_record(r) for r in s.scalars(query))
        return out

    def list_owned_entries(self, owner_prefix: str) -> list[EntryRecord]:
        """Entries whose owner starts with ``owner_prefix`` (a controller's entries).

        Args:
            owner_prefix: a non-empty prefix; ``%`` and ``_`` in it match themselves.
        """
        if not owner_prefix:
            raise ValueError("owner_prefix must not be empty")
        e = m.RegistrationEntry
        query = select(e).where(e.owner.startswith(owner_prefix, autoescape=True)).order_by(
            e.owner)
        with self._reading() as s:
            return [_entry_record(r) for r in s.scalars(query)]

    def delete_entry(self, entry_id: str, *, now: dt.datetime) -> EntryRecord:
        """Delete an entry and record the change.

        Raises:
            NotFoundError: no such entry.
        """
        with self._session() as s:
            # Locked: of two deleters at once (two servers' controllers), the second
            # waits, then finds nothing and says so, instead of "deleting" it again.
            row = s.get(m.RegistrationEntry, entry_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"entry {entry_id!r} not found")
            record = _entry_record(row)
            s.delete(row)
            _record_change(s, "entry_deleted", entry_id, _ts(now))
            return record

    def current_revision(self) -> int:
        """The highest change event id: grows with every entry change."""
        with self._reading() as s:
            return int(s.scalar(select(func.coalesce(func.max(m.ChangeEvent.id), 0))) or 0)

    # ---- join tokens -------------------------------------------------------------

    def create_join_token(
        self, *, token_id: str, secret_sha256: str, alias: SpiffeId | None,
        expires_at: dt.datetime, now: dt.datetime,
    ) -> None:
        """Store a join token (its secret only hashed)."""
        with self._session() as s:
            s.add(m.JoinToken(
                token_id=token_id, secret_sha256=secret_sha256,
                alias=None if alias is None else str(alias),
                expires_at=_ts(expires_at), used_at=None, created_at=_ts(now),
            ))

    def get_join_token(self, token_id: str) -> StoredJoinToken | None:
        """A stored join token as it is now, changing nothing (None: no such token)."""
        with self._reading() as s:
            row = s.get(m.JoinToken, token_id)
            if row is None:
                return None
            return StoredJoinToken(
                token_id=row.token_id, secret_sha256=row.secret_sha256, alias=row.alias,
                expires_at=_dt(row.expires_at),
                used_at=None if row.used_at is None else _dt(row.used_at),
            )

    def claim_join_token(self, token_id: str, *, now: dt.datetime) -> StoredJoinToken | None:
        """Claim a token in a transaction of its own (see JoinTokenStore)."""
        with self.transaction() as tx:
            return tx.claim_join_token(token_id, now=now)

    def prune_join_tokens(self, *, before: dt.datetime) -> int:
        """Delete tokens that expired before ``before``; returns how many."""
        with self._session() as s:
            result = s.execute(delete(m.JoinToken).where(m.JoinToken.expires_at < _ts(before)))
            return int(getattr(result, "rowcount", 0))

    # ---- attestation nonces (x509pop, sshpop) ------------------------------------

    def add_attestation_nonce(self, nonce_sha256: str, *, attestor: str,
                              expires_at: dt.datetime, now: dt.datetime) -> None:
        """Record an issued challenge nonce (see attestation.node.pop.NonceStore).

        Nonces that expired unanswered are dropped in the same transaction, so the
        table holds at most what was issued within the nonce lifetime.
        """
        with self._session() as s:
            s.execute(delete(m.AttestationNonce)
                      .where(m.AttestationNonce.expires_at < _ts(now))
                      .execution_options(synchronize_session=False))
            s.add(m.AttestationNonce(nonce_sha256=nonce_sha256, attestor=attestor,
                                     expires_at=_ts(expires_at), created_at=_ts(now)))

    def take_attestation_nonce(self, nonce_sha256: str, *, attestor: str,
                               now: dt.datetime) -> bool:
        """Spend a nonce: True when this call deleted it (issued for ``attestor``,
        unexpired). The conditional DELETE alone decides, so of two concurrent
        answers (other workers, other servers) at most one wins."""
        with self._session() as s:
            result = s.execute(
                delete(m.AttestationNonce)
                .where(m.AttestationNonce.nonce_sha256 == nonce_sha256,
                       m.AttestationNonce.attestor == attestor,
                       m.AttestationNonce.expires_at > _ts(now))
                .execution_options(synchronize_session=False))
            return int(getattr(result, "rowcount", 0)) == 1

    # ---- nodes -------------------------------------------------------------------

    def get_node(self, spiffe_id: SpiffeId) -> NodeRecord | None:
        """The attested node with that ID, or None."""
        with self._reading() as s:
            return Transaction(s).get_node(spiffe_id)

    def put_node(self, node: NodeRecord, *, now: dt.datetime) -> None:
        """Create or replace an attested node."""
        with self.transaction() as tx:
            tx.put_node(node, now=now)

    def set_node_new_serial(
        self, spiffe_id: SpiffeId, *, serial: int, expires_at: int, now: dt.datetime
    ) -> None:
        """Record a renewed SVID; it becomes current when the agent first uses it.

        Until then both the old and the new SVID authenticate the agent, so calls on
        a connection opened with the old one keep working during renewal.

        Raises:
            NotFoundError: no such node.
        """
        with self._session() as s:
            row = s.get(m.AttestedNode, str(spiffe_id))
            if row is None:
                raise NotFoundError(f"node {spiffe_id} not found")
            row.new_serial = str(serial)
            row.expires_at = expires_at
            row.updated_at = _ts(now)

    def promote_node_serial(self, spiffe_id: SpiffeId, *, now: dt.datetime) -> None:
        """Make the renewed SVID the only current one (the old one stops working)."""
        with self._session() as s:
            row = s.get(m.AttestedNode, str(spiffe_id))
            if row is None or not row.new_serial:
                return
            row.serial = row.new_serial
            row.new_serial = ""
            row.updated_at = _ts(now)

    def set_node_banned(self, spiffe_id: SpiffeId, banned: bool, *, now: dt.datetime) -> None:
        """Ban or unban a node.

        Raises:
            NotFoundError: no such node.
        """
        with self._session() as s:
            row = s.get(m.AttestedNode, str(spiffe_id))
            if row is None:
                raise NotFoundError(f"node {spiffe_id} not found")
            row.banned = banned
            row.updated_at = _ts(now)

    def list_nodes_page(self, *, limit: int, after: str | None = None) -> list[NodeRecord]:
        """Up to ``limit`` attested nodes ordered by ID, those after ``after``."""
        query = select(m.AttestedNode)
        if after is not None:
            query = query.where(m.AttestedNode.spiffe_id > after)
        query = query.order_by(m.AttestedNode.spiffe_id).limit(limit)
        with self._reading() as s:
            return [_node_record(r) for r in s.scalars(query)]

    def count_nodes(self) -> int:
        """How many attested nodes there are."""
        with self._reading() as s:
            return int(s.scalar(select(func.count()).select_from(m.AttestedNode)) or 0)

    def delete_node(self, spiffe_id: SpiffeId) -> NodeRecord:
        """Delete an attested node and its selectors; its SVIDs stop authenticating.

        Raises:
            NotFoundError: no such node.
        """
        with self._session() as s:
            row = s.get(m.AttestedNode, str(spiffe_id), with_for_update=True)
            if row is None:
                raise NotFoundError(f"agent {spiffe_id} not found")
            record = _node_record(row)
            s.delete(row)
            return record

    def purge_nodes(self, *, expired_before: int, dry_run: bool = False) -> list[SpiffeId]:
        """Delete nodes whose SVID expired before ``expired_before`` (unix seconds).

        Returns:
            The IDs of the nodes deleted (or that would be, when ``dry_run``).
        """
        with self._session() as s:
            rows = list(s.scalars(
                select(m.AttestedNode).where(m.AttestedNode.expires_at < expired_before)
                .order_by(m.AttestedNode.spiffe_id)
            ))
            ids = [SpiffeId.parse(r.spiffe_id) for r in rows]
            if not dry_run:
                for row in rows:
                    s.delete(row)
            return ids

    # ---- CA keys and bundles -----------------------------------------------------

    def list_ca_keys(self, kind: str | None = None) -> list[CaKeyRecord]:
        """CA key slots, oldest first."""
        query = select(m.CaKey).order_by(m.CaKey.created_at, m.CaKey.id)
        if kind is not None:
            query = query.where(m.CaKey.kind == kind)
        with self._reading() as s:
            return [_ca_key_record(r) for r in s.scalars(query)]

    def add_ca_key(self, record: CaKeyRecord) -> None:
        """Store a CA key slot."""
        with self._session() as s:
            s.add(m.CaKey(
                id=record.id, kind=record.kind, status=record.status, key_id=record.key_id,
                public_key=record.public_key, certificate=record.certificate,
                not_after=record.not_after, created_at=record.created_at,
                owner=record.owner, not_before=record.not_before,
                activated_at=record.activated_at, deactivated_at=record.deactivated_at,
                signed_until=record.signed_until,
            ))

    def update_ca_key(self, record_id: str, **fields: object) -> None:
        """Change some columns of a CA key slot (rotation: status, times, signed_until).

        ``signed_until`` only moves forward: the processes of one server
        (``worker_processes``) sign with the same slot, and one that signed less
        must not lower what another wrote. The comparison is in the UPDATE itself,
        so concurrent writers cannot undo each other.

        Raises:
            NotFoundError: no such slot.
        """
        allowed = {"status", "activated_at", "deactivated_at", "signed_until"}
        if not set(fields) <= allowed:
            raise ValueError(f"update_ca_key: cannot change {sorted(set(fields) - allowed)}")
        signed_until = fields.pop("signed_until", None)
        with self._session() as s:
            row = s.get(m.CaKey, record_id)
            if row is None:
                raise NotFoundError(f"CA key slot {record_id} not found")
            for name, value in fields.items():
                setattr(row, name, value)
            if signed_until is not None:
                s.execute(update(m.CaKey)
                          .where(m.CaKey.id == record_id, m.CaKey.signed_until < signed_until)
                          .values(signed_until=signed_until))

    def delete_ca_key(self, record_id: str) -> bool:
        """Remove a CA key slot; False when it was already gone."""
        with self._session() as s:
            result = s.execute(delete(m.CaKey).where(m.CaKey.id == record_id))
            return bool(getattr(result, "rowcount", 0))

    def compare_and_put_bundle(
        self, trust_domain: TrustDomain, expected_sequence: int, data: str
    ) -> StoredBundle | None:
        """Store ``data`` as sequence ``expected_sequence + 1`` if nobody changed it.

        Optimistic concurrency for servers sharing one database: the write only
        lands when the stored sequence is still ``expected_sequence`` (0: no row
        yet). Returns the stored bundle, or None when another writer won; the
        caller re-reads and retries.
        """
        new_sequence = expected_sequence + 1
        with self._session() as s:
            if expected_sequence == 0:
                if not _insert_first_bundle(s, trust_domain, data, new_sequence):
                    return None
            else:
                result = s.execute(
                    update(m.BundleRow)
                    .where(m.BundleRow.trust_domain == trust_domain.name,
                           m.BundleRow.sequence == expected_sequence)
                    .values(data=data, sequence=new_sequence)
                )
                if getattr(result, "rowcount", 0) != 1:
                    return None
            return StoredBundle(trust_domain.name, data, new_sequence)

    def get_bundle(self, trust_domain: TrustDomain) -> StoredBundle | None:
        """The stored bundle of a trust domain, or None."""
        with self._reading() as s:
            row = s.get(m.BundleRow, trust_domain.name)
            return None if row is None else StoredBundle(row.trust_domain, row.data, row.sequence)

    def put_bundle(
        self, trust_domain: TrustDomain, render: Callable[[int], str]
    ) -> StoredBundle:
        """Replace a bundle, incrementing its sequence number.

        Args:
            trust_domain: whose bundle.
            render: builds the bundle document given its new sequence number.
        """
        for attempt in range(2):
            try:
                with self._session() as s:
                    row = s.get(m.BundleRow, trust_domain.name, with_for_update=True)
                    if row is None:
                        row = m.BundleRow(trust_domain=trust_domain.name, data="", sequence=0)
                        s.add(row)
                    row.sequence = (row.sequence or 0) + 1
                    row.data = render(row.sequence)
                    stored = StoredBundle(row.trust_domain, row.data, row.sequence)
                return stored
            except DatastoreError as exc:
                # FOR UPDATE locks nothing while the row does not exist: two servers
                # starting on one database may both insert it. The loser retries and
                # now finds (and locks) the winner's row.
                if attempt == 1 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")

    # ---- foreign bundles (federation) ------------------------------------------
    # Rows keyed by trust domain, like our own. The refresher and the admin API
    # (bundle set/delete) write them; the agent sync reads them with get_bundle.
    # Each write that lands records a change event (FOREIGN_BUNDLES_CHANGED) in
    # its transaction: every server's entry index sees it and the syncs' bundle
    # cache reads again, so an unchanged bundle costs a sync no read.

    def list_bundles(self, *, exclude: TrustDomain | None = None) -> list[StoredBundle]:
        """Every stored bundle ordered by trust domain, without ``exclude`` (our own)."""
        query = select(m.BundleRow).order_by(m.BundleRow.trust_domain)
        if exclude is not None:
            query = query.where(m.BundleRow.trust_domain != exclude.name)
        with self._reading() as s:
            return [StoredBundle(r.trust_domain, r.data, r.sequence) for r in s.scalars(query)]

    def set_bundle(self, trust_domain: TrustDomain, data: str, sequence: int) -> StoredBundle:
        """Store a foreign bundle as given, whatever sequence was held (an override).

        Args:
            trust_domain: whose bundle; never our own (its sequence is the CA's).
            data: the SPIFFE bundle document.
            sequence: the document's sequence number.
        """
        for attempt in range(2):
            try:
                with self._session() as s:
                    row = s.get(m.BundleRow, trust_domain.name, with_for_update=True)
                    if row is None:
                        row = m.BundleRow(trust_domain=trust_domain.name)
                        s.add(row)
                    row.data, row.sequence = data, sequence
                    _record_bundle_change(s)
                return StoredBundle(trust_domain.name, data, sequence)
            except DatastoreError as exc:
                # Two writers inserting the first row: the loser retries as an update.
                if attempt == 1 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")

    def set_bundles(
        self, bundles: Sequence[tuple[TrustDomain, Callable[[int], tuple[str, int]]]]
    ) -> list[StoredBundle]:
        """Store several foreign bundles in one transaction: all of them, or none.

        Like :meth:`set_bundle` for each, but an error at any member (the
        database's, or ``render`` raising) rolls back every write before it.

        Args:
            bundles: each trust domain (never our own, each once) with a function
                that, given the sequence number held (0: none), returns the
                document and the sequence number to store.

        Returns:
            What was stored, in the given order.
        """
        if not bundles:
            return []
        for attempt in range(2):
            try:
                stored: list[StoredBundle] = []
                with self._session() as s:
                    for trust_domain, render in bundles:
                        row = s.get(m.BundleRow, trust_domain.name, with_for_update=True)
                        if row is None:
                            row = m.BundleRow(trust_domain=trust_domain.name, sequence=0)
                            s.add(row)
                        data, sequence = render(row.sequence or 0)
                        row.data, row.sequence = data, sequence
                        stored.append(StoredBundle(trust_domain.name, data, sequence))
                        # Written now, so a database error names its member's step
                        # and the next member's read sees this one.
                        s.flush()
                    _record_bundle_change(s)
                return stored
            except DatastoreError as exc:
                # Two writers inserting a first row: the loser retries, now updating.
                if attempt == 1 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")

    def replace_bundle(self, trust_domain: TrustDomain, held: StoredBundle | None,
                       data: str, sequence: int) -> bool:
        """Store a foreign bundle only if what is stored is still ``held``.

        For writers that decide from what they read (the federation refresher):
        between its read and this write another server sharing the database may
        have stored a newer bundle, which must not be overwritten by an older one.

        Args:
            held: the row read before deciding (None: there was none).

        Returns:
            Whether it was stored; False when the row changed meanwhile (re-read).
        """
        with self._session() as s:
            if held is None:
                stored = _insert_first_bundle(s, trust_domain, data, sequence)
            else:
                result = s.execute(
                    update(m.BundleRow)
                    .where(m.BundleRow.trust_domain == trust_domain.name,
                           m.BundleRow.sequence == held.sequence,
                           m.BundleRow.data == held.data)
                    .values(data=data, sequence=sequence)
                )
                stored = getattr(result, "rowcount", 0) == 1
            if stored:
                _record_bundle_change(s)
            return stored

    def delete_bundle(self, trust_domain: TrustDomain) -> bool:
        """Remove a trust domain's bundle; False when there was none."""
        with self._session() as s:
            result = s.execute(
                delete(m.BundleRow).where(m.BundleRow.trust_domain == trust_domain.name))
            deleted = bool(getattr(result, "rowcount", 0))
            if deleted:
                _record_bundle_change(s)
            return deleted
