"""OIDC discovery for JWT-SVIDs: what a cloud identity provider reads to trust them.

Two documents over HTTPS (``[oidc_discovery]``), built from the current bundle at
each request so a JWT key rotation shows at once:

- ``/.well-known/openid-configuration``: issuer ``https://<domain>``, ``jwks_uri``
  ``https://<domain>/keys``, ``authorization_endpoint`` "" (there is none: JWT-SVIDs
  are not obtained through OAuth flows), ``response_types_supported`` ["id_token"],
  ``subject_types_supported`` ["public"] and the algorithms of our JWT keys;
- ``/keys``: the JWKS of the JWT-SVID keys, each with ``kid``, ``use`` "sig" and
  ``alg`` (the algorithm the authority signs with for that key type).

The certificate comes from ``cert_file``/``key_file`` (a Web PKI one for ``domain``),
re-read when they change. With ``omit_post_quantum_keys`` (the default) both
documents are built from the bundle without its ML-DSA (``kty: AKP``) keys: go-jose
and other JOSE libraries refuse a whole JWKS over one key type they do not know.
"""

from __future__ import annotations

import json
from typing import Any

from ca.authority import CertificateAuthority
from ca.config.federation import OidcDiscoveryConfig, oidc_issuer
from ca.federation.https import Document, FileContextSource, HttpsServer
from identity.bundle import Bundle
from identity.errors import JwtSvidError
from identity.jwtsvid import default_algorithm
from identity.keys import JwtPublicKey

CONFIGURATION_PATH = "/.well-known/openid-configuration"
KEYS_PATH = "/keys"


def algorithm_for(key: JwtPublicKey) -> str:
    """The JWS algorithm our signer uses for a key (identity.jwtsvid's default)."""
    try:
        return default_algorithm(key)
    except JwtSvidError as exc:
        raise ValueError(str(exc)) from None


def jwks(bundle: Bundle) -> dict[str, Any]:
    """The JWT-SVID keys of ``bundle`` as an OIDC JWKS."""
    doc = json.loads(bundle.jwt_jwks())
    by_kid = {a.key_id: a for a in bundle.jwt_authorities}
    keys = []
    for jwk in doc["keys"]:
        jwk["use"] = "sig"
        jwk["alg"] = algorithm_for(by_kid[jwk["kid"]].public_key)
        keys.append(jwk)
    return {"keys": keys}


def configuration(domain: str, bundle: Bundle) -> dict[str, Any]:
    """The discovery document for issuer ``https://<domain>``."""
    issuer = oidc_issuer(domain)
    algs = sorted({algorithm_for(a.public_key) for a in bundle.jwt_authorities})
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}{KEYS_PATH}",
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
    }


def _json(doc: dict[str, Any]) -> Document:
    return Document(json.dumps(doc, separators=(",", ":")).encode())


class OidcDiscovery:
    """Serves the two documents on ``[oidc_discovery] address``."""

    def __init__(self, config: OidcDiscoveryConfig, authority: CertificateAuthority) -> None:
        self._config = config
        self._authority = authority
        contexts = FileContextSource(config.cert_file, config.key_file, what="oidc_discovery")
        self._server = HttpsServer(config.address, name="oidc_discovery",
                                   contexts=contexts.current, routes={
                                       CONFIGURATION_PATH: self.configuration_document,
                                       KEYS_PATH: self.keys_document})

    @property
    def bound_address(self) -> str:
        """``HOST:PORT`` actually bound (after start)."""
        return self._server.bound_address

    def _bundle(self) -> Bundle:
        """The current bundle, without ML-DSA keys by default."""
        bundle = self._authority.bundle()
        if self._config.omit_post_quantum_keys:
            # A relying party on go-jose (or another JOSE library that does not know
            # kty "AKP") refuses the whole JWKS over one such key, EC keys included;
            # it could not verify an ML-DSA token anyway (docs/federation.md).
            bundle = bundle.without_ml_dsa_keys()
        return bundle

    def configuration_document(self) -> Document:
        """``/.well-known/openid-configuration`` (algorithms of the keys in ``/keys``)."""
        return _json(configuration(self._config.domain, self._bundle()))

    def keys_document(self) -> Document:
        """``/keys`` (without ML-DSA keys, by default)."""
        return _json(jwks(self._bundle()))

    def start(self) -> None:
        """Listen (ConfigError when the certificate or address is unusable)."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()
