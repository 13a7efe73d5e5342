"""The Workload API's wire names, shared by the servicer and the client.

A module of its own so the client (and every ``sigil-agent api ...`` command) does
not import the servicer, the agent's cache and asyncio.
"""

SERVICE_NAME = "SpiffeWorkloadAPI"
SECURITY_HEADER = "workload.spiffe.io"
