"""JWT-SVID mint and validate rates: ES256 and ML-DSA-65 side by side.

Usage:
    python bench/jwt_svids.py [--seconds 3] [--algs ES256,ML-DSA-65]

For each algorithm, in this one process (one core), about ``--seconds`` each,
the measurements taking turns in short slices so machine load hits all alike:

- mint: ``identity.jwtsvid.sign_jwt_svid`` (what the CA does per JWT-SVID: claims,
  JSON, base64url, one signature);
- validate: ``identity.jwtsvid.validate_jwt_svid`` against a bundle holding an EC
  and an ML-DSA key (a mixed bundle, as during a switch): alg allow-list, claims,
  key by kid, key type against alg, one signature check, time and audience.

Prints each rate, the token size, and the ratios of every algorithm to the first
(ES256 by default). Both run in the same process on the same machine, so the
ratios hold on a busy machine where the absolute figures do not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory is sys.path[0], and this file's name
# would then hide PyJWT's ``jwt`` package: put the repository root there instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from identity.bundle import Bundle, JwtAuthority  # noqa: E402
from identity.jwtsvid import sign_jwt_svid, validate_jwt_svid  # noqa: E402
from identity.keys import JwtPrivateKey, KeyType, generate_jwt_key, key_id  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402

TD = TrustDomain("bench.sigil.test")
SUB = SpiffeId.parse("spiffe://bench.sigil.test/ns/default/sa/web")
KEY_TYPES = {"ES256": KeyType.EC_P256, "ES384": KeyType.EC_P384, "RS256": KeyType.RSA_2048,
             "ML-DSA-44": KeyType.ML_DSA_44, "ML-DSA-65": KeyType.ML_DSA_65,
             "ML-DSA-87": KeyType.ML_DSA_87}


SLICE = 0.2  # seconds: measurements take turns in slices this long


def _run(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n, now - start


def _rates(fns: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Operations per second of each function, measured in turns of :data:`SLICE`.

    Taking turns, rather than one function after the other, exposes every function
    to the same load from the rest of the machine, so the ratios hold on a busy
    machine (a shared CI runner) where sequential runs drift apart.
    """
    counts = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    deadline = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < deadline:
        for name, fn in fns.items():
            n, t = _run(fn, SLICE)
            counts[name] += n
            spent[name] += t
    return {name: counts[name] / spent[name] for name in fns}


def _raw(key: JwtPrivateKey, token: str) -> tuple[Callable[[], object],
                                                  Callable[[], object]]:
    """One bare signature and one bare verification over a token's signing input:
    the cryptography alone, without JOSE, JSON or claims."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    data = token.rsplit(".", 1)[0].encode()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algo = ec.ECDSA(hashes.SHA256())
        ec_key, ec_pub = key, key.public_key()
        ec_sig = ec_key.sign(data, algo)
        return (lambda: ec_key.sign(data, algo)), (lambda: ec_pub.verify(ec_sig, data, algo))
    if isinstance(key, rsa.RSAPrivateKey):
        rsa_key, rsa_pub = key, key.public_key()
        pad = padding.PKCS1v15()
        rsa_sig = rsa_key.sign(data, pad, hashes.SHA256())
        return ((lambda: rsa_key.sign(data, pad, hashes.SHA256())),
                (lambda: rsa_pub.verify(rsa_sig, data, pad, hashes.SHA256())))
    ml_key, ml_pub = key, key.public_key()
    ml_sig = ml_key.sign(data)
    return (lambda: ml_key.sign(data)), (lambda: ml_pub.verify(ml_sig, data))


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--algs", default="ES256,ML-DSA-65",
                        help="comma-separated, the first is the baseline: "
                             + ", ".join(KEY_TYPES))
    args = parser.parse_args()
    algs = [a.strip() for a in args.algs.split(",") if a.strip()]
    unknown = [a for a in algs if a not in KEY_TYPES]
    if unknown or not algs:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {', '.join(KEY_TYPES)}")

    keys: dict[str, JwtPrivateKey] = {a: generate_jwt_key(KEY_TYPES[a]) for a in algs}
    kids = {a: key_id(k.public_key()) for a, k in keys.items()}
    bundle = Bundle(TD, jwt_authorities=tuple(
        JwtAuthority(kids[a], k.public_key()) for a, k in keys.items()))
    now = dt.datetime.now(dt.UTC)
    exp = now + dt.timedelta(minutes=5)

    fns: dict[str, Callable[[], object]] = {}
    sizes: dict[str, int] = {}
    for alg in algs:
        key, kid = keys[alg], kids[alg]

        def mint(key: JwtPrivateKey = key, kid: str = kid) -> str:
            return sign_jwt_svid(spiffe_id=SUB, audience=["spiffe://bench.sigil.test/db"],
                                 key=key, key_id=kid, issued_at=now, expires_at=exp)

        token = mint()

        def validate(token: str = token) -> object:
            return validate_jwt_svid(token, bundles=bundle,
                                     audience="spiffe://bench.sigil.test/db", now=now)

        sign, verify = _raw(key, token)
        fns[f"mint {alg}"] = mint
        fns[f"validate {alg}"] = validate
        fns[f"sign {alg}"] = sign
        fns[f"verify {alg}"] = verify
        sizes[alg] = len(token)
    rates = _rates(fns, args.seconds)
    results = {alg: (rates[f"mint {alg}"], rates[f"validate {alg}"], sizes[alg])
               for alg in algs}
    raw = {alg: (rates[f"sign {alg}"], rates[f"verify {alg}"]) for alg in algs}

    print(f"JWT-SVID, one core, {args.seconds:g} s per figure in {SLICE:g} s turns")
    print(f"{'alg':<10} {'mint/s':>10} {'validate/s':>12} {'token bytes':>12} "
          f"{'raw sign/s':>11} {'raw verify/s':>13}")
    for alg, (m, v, size) in results.items():
        print(f"{alg:<10} {m:>10,.0f} {v:>12,.0f} {size:>12,} {raw[alg][0]:>11,.0f} "
              f"{raw[alg][1]:>13,.0f}")
    base = algs[0]
    bm, bv, bsize = results[base]
    for alg in algs[1:]:
        m, v, size = results[alg]
        print(f"ratio {alg}/{base}: mint {m / bm:.2f}, validate {v / bv:.2f}, "
              f"token size {size / bsize:.1f}x")


if __name__ == "__main__":
    main()
