"""The server's proof-of-possession node attestors: ``[node_attestors.x509pop]`` and
``[node_attestors.sshpop]``.

Validated (CA files read) at load into :class:`PopConfig`; :func:`pop_verifiers`
turns it into the verifiers AttestAgent runs before its transaction. The
``node_attestors`` table is shared with k8s_psat (ca/config/kubernetes.py), which
leaves these two names to this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from attestation.node import AttestationResult, pop, sshpop, x509pop
from ca.errors import ConfigError
from identity.clock import Clock
from identity.spiffeid import TrustDomain

NAMES = (x509pop.NAME, sshpop.NAME)
"""The attestors this module configures (both need a challenge nonce)."""

NodeVerifier = Callable[[bytes], AttestationResult]


@dataclass(frozen=True, slots=True)
class PopConfig:
    """Validated x509pop / sshpop settings; None: that attestor is off."""

    x509pop: x509pop.ServerAttestorConfig | None = None
    sshpop: sshpop.ServerAttestorConfig | None = None


def validate(raw: Mapping[str, Any]) -> PopConfig:
    """Validate ``node_attestors.x509pop`` and ``node_attestors.sshpop``.

    Raises:
        ConfigError: an unknown key, a bad value, or an unreadable CA file, naming
            the key.
    """
    attestors = raw.get("node_attestors")
    if not isinstance(attestors, dict):
        return PopConfig()  # absent; a non-table is refused by ca/config/kubernetes.py
    try:
        x509 = (x509pop.parse_server_config(attestors[x509pop.NAME])
                if x509pop.NAME in attestors else None)
        ssh = (sshpop.parse_server_config(attestors[sshpop.NAME])
               if sshpop.NAME in attestors else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return PopConfig(x509pop=x509, sshpop=ssh)


def pop_verifiers(config: PopConfig, trust_domain: TrustDomain, nonces: pop.NonceStore,
                  clock: Clock) -> dict[str, NodeVerifier]:
    """The enabled x509pop / sshpop verifiers, by name."""
    verifiers: dict[str, NodeVerifier] = {}
    if config.x509pop is not None:
        verifiers[x509pop.NAME] = x509pop.X509PopVerifier(
            trust_domain, config.x509pop, nonces, clock).verify
    if config.sshpop is not None:
        verifiers[sshpop.NAME] = sshpop.SshPopVerifier(
            trust_domain, config.sshpop, nonces, clock).verify
    return verifiers
