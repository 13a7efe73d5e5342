"""``sigil-server x509 mint`` and ``jwt mint``: SVIDs for operators."""

from __future__ import annotations

import os
from pathlib import Path

import click

from api.protos.sigil.admin.v1 import admin_pb2
from ca.cli.common import (
    ADMIN_TIMEOUT,
    DURATION,
    _call,
    _check_spiffe_id,
    _emit_json,
    _fail,
    _unix_to_rfc3339,
    output_option,
    socket_option,
)


@click.group()
def x509() -> None:
    """X.509-SVIDs for operators."""


@x509.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to put in the SVID.")
@click.option("--ttl", type=DURATION,
              help="Lifetime: seconds or 10m, 1h (default: the server's x509_svid_ttl).")
@click.option("--dns-name", "dns_names", multiple=True, help="DNS SAN; repeatable.")
@click.option("--write", "write_dir", type=click.Path(file_okay=False),
              help="Write svid.pem, svid.key (mode 0600) and bundle.pem into this directory.")
@socket_option
@output_option
def x509_mint(spiffe_id: str, ttl: int | None, dns_names: tuple[str, ...],
              write_dir: str | None, socket_path: str, output: str) -> None:
    """Mint an X.509-SVID for any workload SPIFFE ID of the trust domain.

    The private key is made here and never sent: the server signs a CSR. Without
    --write the SVID, its PRIVATE KEY and the bundle are printed (PEM, or JSON keys
    svid_pem, key_pem, bundle_pem with --output json): keep that output secret.

    \b
    Examples:
      sigil-server x509 mint --spiffe-id spiffe://example.org/debug --ttl 10m --write ./svid
      sigil-server x509 mint --spiffe-id spiffe://example.org/debug --output json
    """
    from cryptography import x509 as cx509

    from identity.keys import generate_private_key, private_key_to_pem
    from identity.x509svid import certificates_to_pem, new_csr

    _check_spiffe_id(spiffe_id, "--spiffe-id")
    key = generate_private_key()
    req = admin_pb2.MintX509SVIDRequest(spiffe_id=spiffe_id, csr=new_csr(key), ttl=ttl or 0,
                                        dns_names=list(dns_names))
    resp = _call(socket_path, lambda s: s.MintX509SVID(req, timeout=ADMIN_TIMEOUT))
    chain_pem = certificates_to_pem(cx509.load_der_x509_certificate(d)
                                    for d in resp.svid.cert_chain).decode()
    key_pem = private_key_to_pem(key).decode()
    bundle_pem = certificates_to_pem(cx509.load_der_x509_certificate(d)
                                     for d in resp.bundle.x509_authorities).decode()
    expires = _unix_to_rfc3339(resp.svid.expires_at)
    if write_dir is not None:
        paths = _write_svid_files(Path(write_dir), chain_pem, key_pem, bundle_pem)
        if output == "json":
            _emit_json({"spiffe_id": resp.svid.spiffe_id, "expires_at": expires,
                        "files": [str(p) for p in paths]})
        else:
            click.echo(f"Wrote {', '.join(str(p) for p in paths)} (expires {expires})")
        return
    if output == "json":
        _emit_json({"spiffe_id": resp.svid.spiffe_id, "expires_at": expires,
                    "svid_pem": chain_pem, "key_pem": key_pem, "bundle_pem": bundle_pem})
    else:
        click.echo(f"X509-SVID ({resp.svid.spiffe_id}, expires {expires}):")
        click.echo(chain_pem, nl=False)
        click.echo("Private key:")
        click.echo(key_pem, nl=False)
        click.echo("Bundle:")
        click.echo(bundle_pem, nl=False)


def _write_svid_files(directory: Path, chain_pem: str, key_pem: str,
                      bundle_pem: str) -> list[Path]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, text, mode in (("svid.pem", chain_pem, 0o644), ("svid.key", key_pem, 0o600),
                                 ("bundle.pem", bundle_pem, 0o644)):
            path = directory / name
            # Create with the final mode so the key is never readable by others,
            # not even for the moment between write and chmod.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), mode)
                fh.write(text)
            out.append(path)
        return out
    except OSError as exc:
        _fail(f"cannot write to {directory}: {exc.strerror}")


@click.group()
def jwt() -> None:
    """JWT-SVIDs for operators."""


@jwt.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to put in the token (sub).")
@click.option("--audience", "audience", multiple=True, required=True,
              help="Audience (aud); repeatable.")
@click.option("--ttl", type=DURATION,
              help="Lifetime: seconds or 5m (default: the server's jwt_svid_ttl).")
@socket_option
@output_option
def jwt_mint(spiffe_id: str, audience: tuple[str, ...], ttl: int | None, socket_path: str,
             output: str) -> None:
    """Mint a JWT-SVID for any workload SPIFFE ID of the trust domain.

    The token is a bearer credential: it is printed, never logged.

    \b
    Example:
      sigil-server jwt mint --spiffe-id spiffe://example.org/debug \\
          --audience spiffe://example.org/db --ttl 2m
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    resp = _call(socket_path, lambda s: s.MintJWTSVID(admin_pb2.MintJWTSVIDRequest(
        spiffe_id=spiffe_id, audience=list(audience), ttl=ttl or 0), timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"token": resp.token, "spiffe_id": resp.spiffe_id,
                    "expires_at": _unix_to_rfc3339(resp.expires_at)})
    else:
        click.echo(resp.token)
