"""Banning and evicting a running agent, against a real server and a real agent.

- ``agent ban``: the server refuses the agent from its next sync on. The agent
  says so once in its log, keeps serving the SVIDs it holds until they expire
  (never an expired one), and gets nothing new: an entry registered after the
  ban never reaches its workloads.
- ``agent evict`` of a join-token agent: the token is single use and already
  spent, so the agent cannot attest again by itself. It says so once, does not
  keep presenting the spent token, and keeps serving what it holds; restarted
  with a new token it attests again.
- ``agent evict`` of a k8s_psat agent: it attests again with its projected
  token, gets a new agent SVID, and keeps serving workloads (new entries too).

The workload is this test process, through py-spiffe.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack, psat_stack, running_stack, wait_for
from tests.support.k8s_api import FakeKubeApi
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import WorkloadApiClient  # noqa: E402
from spiffe.workloadapi.errors import FetchX509SvidError  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TD = "e2e.sigil.test"
NODE_UID = "0d7c9a52-3b5e-4c1f-9e0a-2f4b6c8d0e12"
# Short syncs and backoff, so every refusal shows within a second or two.
AGENT_CONFIG = 'sync_backoff_max = "2s"\n'
BANNED = "agent banned: the server refuses this agent, no new SVIDs will be served"


def svid_ids(client: WorkloadApiClient) -> list[str]:
    return sorted(str(s.spiffe_id) for s in client.fetch_x509_context(timeout=10).x509_svids)


def wait_for_svids(client: WorkloadApiClient, wanted: list[str], st: Stack,
                   timeout: float = 30) -> None:
    last: object = None

    def check() -> bool:
        nonlocal last
        try:
            last = svid_ids(client)
        except FetchX509SvidError as exc:
            last = exc
            return False
        return last == sorted(wanted)

    try:
        wait_for(check, timeout=timeout, what=f"SVIDs {wanted}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer: {last}\nagent log:\n{st.log('agent')}\n"
                             f"server log:\n{st.log('server')}") from None


def refusals(st: Stack, reason: str) -> int:
    return sum(1 for line in st.log("server").splitlines()
               if "request refused" in line and reason in line)


def agent_lines(st: Stack, text: str) -> list[str]:
    return [line for line in st.log("agent").splitlines() if text in line]


def test_a_banned_agent_serves_what_it_holds_until_expiry_and_nothing_new(
    uid_selector: str,
) -> None:
    client: WorkloadApiClient | None = None
    with running_stack(agent_config=AGENT_CONFIG) as st:
        client = WorkloadApiClient(socket_path=st.endpoint)
        held = f"spiffe://{TD}/before-ban"
        # A short-lived SVID, so that the test sees it expire (long enough to
        # outlive the few refused syncs below).
        st.create_entry(held, uid_selector, extra=("--x509-svid-ttl", "15"))
        wait_for_svids(client, [held], st)

        st.server_cli("agent", "ban", "--id", st.agent_id)
        wait_for(lambda: bool(agent_lines(st, BANNED)), timeout=30, what="the ban in the log")
        [line] = agent_lines(st, BANNED)
        assert st.agent_id in line and "agent is banned" in line, line
        assert line.startswith("error "), line

        # Registered after the ban: the agent never learns of it (the workload
        # carries its selector too, so it would be served if the agent knew).
        st.create_entry(f"spiffe://{TD}/after-ban", f"unix:gid:{os.getgid()}")
        seen = refusals(st, "agent is banned")
        wait_for(lambda: refusals(st, "agent is banned") >= seen + 2, timeout=30,
                 what="two more refused syncs")
        ctx = client.fetch_x509_context(timeout=10)
        assert [str(s.spiffe_id) for s in ctx.x509_svids] == [held]
        expires = min(s.leaf.not_valid_after_utc for s in ctx.x509_svids)

        # Served until it expires, never after; the agent stays up and quiet.
        # (Each check compares against the time before or after the call, so a
        # slow call cannot make it fail.)
        def gone() -> bool:
            before = dt.datetime.now(dt.UTC)
            try:
                served = client.fetch_x509_context(timeout=10).x509_svids  # type: ignore[union-attr]
            except FetchX509SvidError as exc:
                assert dt.datetime.now(dt.UTC) >= expires, f"nothing served before expiry: {exc}"
                return True
            assert [str(s.spiffe_id) for s in served] == [held]
            assert all(s.leaf.not_valid_after_utc > before for s in served), "served expired"
            return False

        wait_for(gone, timeout=40, what="the held SVID to expire")
        wait_for(lambda: bool(agent_lines(st, "svid expired")), timeout=15,
                 what="svid expired in the log")
        assert len(agent_lines(st, BANNED)) == 1
        assert not agent_lines(st, "Traceback")
        assert st.procs["agent"].poll() is None
        client.close()
        client = None


def test_an_evicted_join_token_agent_says_it_needs_a_new_token_and_keeps_serving(
    uid_selector: str,
) -> None:
    with running_stack(agent_config=AGENT_CONFIG) as st:
        client = WorkloadApiClient(socket_path=st.endpoint)
        try:
            held = f"spiffe://{TD}/before-evict"
            st.create_entry(held, uid_selector)
            wait_for_svids(client, [held], st)
            evicted_id = st.agent_id

            st.server_cli("agent", "evict", "--id", evicted_id)
            failed = "agent evicted: attesting again failed"
            wait_for(lambda: bool(agent_lines(st, failed)), timeout=30,
                     what="the failed re-attestation in the log")
            [line] = agent_lines(st, failed)
            assert line.startswith("error "), line
            assert "is already used (join tokens are single use)" in line, line
            assert "--join-token" in line and evicted_id in line, line

            # It keeps trying the server (an operator may undo nothing, but the
            # server may come back), never with its spent token, and says so once.
            seen = refusals(st, "agent is not attested")
            wait_for(lambda: refusals(st, "agent is not attested") >= seen + 2, timeout=30,
                     what="two more refused syncs")
            assert refusals(st, "method=AttestAgent") == 0, st.log("server")
            assert len(agent_lines(st, failed)) == 1
            assert len(agent_lines(st, "agent evicted: attesting again")) == 2  # try, failed
            assert svid_ids(client) == [held]
            assert st.procs["agent"].poll() is None
            assert not agent_lines(st, "Traceback")

            # Restarted with a new token, it attests again (a new agent ID: join
            # token IDs name the token) and serves what is registered for it.
            assert st.stop("agent") == 0
            st.start_agent()
            assert st.agent_id != evicted_id
            wait_for(lambda: bool(agent_lines(st, "agent attested again")), timeout=30,
                     what="attested again with the new token")
            assert st.agent_id in agent_lines(st, "agent attested again")[0]
            fresh = f"spiffe://{TD}/after-evict"
            st.create_entry(fresh, uid_selector)
            wait_for_svids(client, [fresh], st)
        finally:
            client.close()


def test_an_evicted_k8s_psat_agent_attests_again_and_keeps_serving(
    uid_selector: str,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    client: WorkloadApiClient | None = None
    with FakeKubeApi() as kube:
        st = psat_stack(kube, root, trust_domain=TD, node_name="node-e", node_uid=NODE_UID)
        try:
            st.start_server()
            st.start_psat_agent(AGENT_CONFIG)
            st.agent_id = f"spiffe://{TD}/sigil/agent/k8s_psat/demo/{NODE_UID}"
            client = WorkloadApiClient(socket_path=st.endpoint)
            held = f"spiffe://{TD}/psat-workload"
            st.create_entry(held, uid_selector)
            wait_for_svids(client, [held], st)

            def shown() -> dict[str, object]:
                out = st.server_cli("agent", "show", "--id", st.agent_id, "--output", "json")
                return json.loads(out.stdout)  # type: ignore[no-any-return]

            before = shown()
            st.server_cli("agent", "evict", "--id", st.agent_id)
            wait_for(lambda: bool(agent_lines(st, "agent attested again")), timeout=30,
                     what="the agent to attest again")
            after = shown()
            assert after["serial"] != before["serial"] and after["banned"] is False, after
            assert len(agent_lines(st, "agent evicted: attesting again")) == 1
            assert not agent_lines(st, "attesting again failed")

            # It keeps serving, and syncs with its new SVID: a new entry arrives.
            assert svid_ids(client) == [held]
            fresh = f"spiffe://{TD}/psat-after-evict"
            st.create_entry(fresh, f"unix:gid:{os.getgid()}")
            wait_for_svids(client, [held, fresh], st)
            assert shown()["serial"] == after["serial"]
            assert not agent_lines(st, "Traceback")
        finally:
            if client is not None:
                client.close()
            codes = {name: st.stop(name) for name in list(st.procs)}
            logs = (st.log("server"), st.log("agent"))
            shutil.rmtree(root, ignore_errors=True)
        assert codes == {"server": 0, "agent": 0}, logs
