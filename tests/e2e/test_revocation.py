"""Revocation end to end: a real server, a real agent, py-spiffe as the workload.

- ``svid revoke --serial`` of the workload's X.509-SVID: the agent drops it at its
  next sync and signs a new one in the same tick; the workload gets the new one
  and never the revoked one again.
- ``svid revoke --jti`` of a JWT-SVID the workload fetched: ValidateJWTSVID refuses
  it from the agent's next sync on, and the next fetch hands out a new token.

The revoke-to-refusal time is printed (run with ``-s``); bench/revocation.py
measures it repeatedly. Timing is never asserted.
"""

from __future__ import annotations

import time

import jwt
import pytest

from tests.e2e.conftest import Stack, running_stack, wait_for
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import WorkloadApiClient  # noqa: E402
from spiffe.workloadapi.errors import FetchX509SvidError, ValidateJwtSvidError  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TD = "e2e.sigil.test"
WORKLOAD = f"spiffe://{TD}/revoked-workload"
AUDIENCE = f"spiffe://{TD}/verifier"


def _serial(client: WorkloadApiClient) -> int:
    [svid] = client.fetch_x509_context(timeout=10).x509_svids
    return int(svid.leaf.serial_number)


def _wait_for_svid(client: WorkloadApiClient, st: Stack) -> int:
    found: list[int] = []

    def check() -> bool:
        try:
            found.append(_serial(client))
        except FetchX509SvidError:  # not served yet: try again
            return False
        return True

    try:
        wait_for(check, timeout=30, what="the workload's SVID")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nagent log:\n{st.log('agent')}") from None
    return found[-1]


def test_a_revoked_serial_is_replaced_and_never_served_again(uid_selector: str) -> None:
    with running_stack() as st:
        client = WorkloadApiClient(socket_path=st.endpoint)
        try:
            st.create_entry(WORKLOAD, uid_selector)
            revoked = _wait_for_svid(client, st)
            st.server_cli("svid", "revoke", "--serial", format(revoked, "x"))
            started = time.monotonic()
            served: list[int] = []

            def replaced() -> bool:
                served.append(_serial(client))
                return served[-1] != revoked

            wait_for(replaced, timeout=30, what="a new SVID after the revocation")
            elapsed = time.monotonic() - started
            print(f"revoke to new X.509-SVID: {elapsed:.2f}s (sync_interval 1s)")
            # From then on only the new one: three more fetches, none revoked.
            after = [_serial(client) for _ in range(3)]
            assert revoked not in after, after
            lines = [line for line in st.log("agent").splitlines()
                     if "revoked svid dropped" in line]
            assert len(lines) == 1, st.log("agent")
            listed = st.server_cli("svid", "list-revoked", "--output", "json").stdout
            assert format(revoked, "x") in listed
        finally:
            client.close()


def test_a_revoked_jti_is_refused_by_validate_jwt_svid(uid_selector: str) -> None:
    with running_stack() as st:
        client = WorkloadApiClient(socket_path=st.endpoint)
        try:
            st.create_entry(WORKLOAD, uid_selector)
            _wait_for_svid(client, st)
            token = client.fetch_jwt_svid(audience={AUDIENCE}).token
            assert str(client.validate_jwt_svid(token, AUDIENCE).spiffe_id) == WORKLOAD
            jti = jwt.decode(token, options={"verify_signature": False})["jti"]
            st.server_cli("svid", "revoke", "--jti", jti)
            started = time.monotonic()
            errors: list[str] = []

            def refused() -> bool:
                try:
                    client.validate_jwt_svid(token, AUDIENCE)
                except ValidateJwtSvidError as exc:
                    errors.append(str(exc))
                    return True
                return False

            wait_for(refused, timeout=30, what="ValidateJWTSVID to refuse the revoked jti")
            print(f"revoke to ValidateJWTSVID refusal: {time.monotonic() - started:.2f}s")
            assert "revoked" in errors[-1], errors[-1]
            # The agent dropped its cached copy: the next fetch is a new token.
            fresh = client.fetch_jwt_svid(audience={AUDIENCE}).token
            assert jwt.decode(fresh, options={"verify_signature": False})["jti"] != jti
            assert str(client.validate_jwt_svid(fresh, AUDIENCE).spiffe_id) == WORKLOAD
        finally:
            client.close()


def test_revoking_a_spiffe_id_replaces_its_svid(uid_selector: str) -> None:
    with running_stack() as st:
        client = WorkloadApiClient(socket_path=st.endpoint)
        try:
            st.create_entry(WORKLOAD, uid_selector)
            revoked = _wait_for_svid(client, st)
            out = st.server_cli("svid", "revoke", "--spiffe-id", WORKLOAD, "--output", "json")
            assert '"kind": "x509_spiffe_id"' in out.stdout
            wait_for(lambda: _serial(client) != revoked, timeout=30,
                     what="a new SVID after revoking the SPIFFE ID")
            # The new SVIDs were signed after the cutoff: served, and the revoked
            # one never again.
            assert revoked not in [_serial(client) for _ in range(3)]
        finally:
            client.close()
