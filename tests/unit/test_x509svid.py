"""identity.x509svid: the issued profile, parsing, verification and CSRs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from identity.bundle import Bundle, BundleSet
from identity.errors import InvalidKeyError, X509SvidError
from identity.keys import (
    KeyType,
    PrivateKey,
    generate_private_key,
    private_key_to_pem,
    private_key_to_pkcs8_der,
)
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import (
    SvidSigner,
    X509Svid,
    certificates_to_der,
    certificates_to_pem,
    load_certificates_der,
    load_certificates_pem,
    new_ca_certificate,
    new_csr,
    new_svid_certificate,
    parse_csr,
    validate_leaf,
    validate_signing_certificate,
    verify_chain,
)

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("domain1.test")
TD2 = TrustDomain("domain2.test")
WORKLOAD = SpiffeId.parse("spiffe://domain1.test/workload")


def make_ca(
    td: TrustDomain = TD, key: PrivateKey | None = None
) -> tuple[x509.Certificate, PrivateKey]:
    key = key or generate_private_key()
    cert = new_ca_certificate(
        trust_domain=td,
        public_key=key.public_key(),
        signer_key=key,
        not_before=NOW - dt.timedelta(hours=1),
        not_after=NOW + dt.timedelta(days=1),
    )
    return cert, key


@pytest.fixture(scope="module")
def ca1() -> tuple[x509.Certificate, PrivateKey]:
    return make_ca()


@pytest.fixture(scope="module")
def ca2() -> tuple[x509.Certificate, PrivateKey]:
    return make_ca(TD2)


def issue(
    ca: tuple[x509.Certificate, PrivateKey],
    spiffe_id: SpiffeId = WORKLOAD,
    key: PrivateKey | None = None,
    **kw: object,
) -> tuple[x509.Certificate, PrivateKey]:
    key = key or generate_private_key()
    cert = new_svid_certificate(
        spiffe_id=spiffe_id,
        public_key=key.public_key(),
        ca_cert=ca[0],
        ca_key=ca[1],
        not_before=kw.pop("not_before", NOW - dt.timedelta(minutes=1)),  # type: ignore[arg-type]
        not_after=kw.pop("not_after", NOW + dt.timedelta(hours=1)),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    return cert, key


def ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_oid(oid)


# ------------------------------------------------------------------ the leaf profile


def test_leaf_profile_ec(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    cert, key = issue(ca1, dns_names=["api.example.org", "*.svc.example.org"])
    assert cert.subject == x509.Name([])
    assert cert.issuer == ca1[0].subject
    assert cert.version == x509.Version.v3

    san = ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical is True  # empty subject -> critical SAN (RFC 5280 §4.1.2.6)
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
    assert san.value.get_values_for_type(x509.DNSName) == ["api.example.org", "*.svc.example.org"]

    bc = ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical is True
    assert bc.value == x509.BasicConstraints(ca=False, path_length=None)

    ku = ext(cert, ExtensionOID.KEY_USAGE)
    assert ku.critical is True
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature is True
    assert ku.value.key_encipherment is False  # EC key
    assert ku.value.key_cert_sign is False
    assert ku.value.crl_sign is False
    assert ku.value.content_commitment is False
    assert ku.value.data_encipherment is False
    assert ku.value.key_agreement is False

    eku = ext(cert, ExtensionOID.EXTENDED_KEY_USAGE)
    assert eku.critical is False
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # type: ignore[call-overload]

    ski = ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert ski.critical is False
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    assert aki.critical is False
    ca_ski = ext(ca1[0], ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier == ca_ski.digest  # type: ignore[attr-defined]

    assert {e.oid for e in cert.extensions} == {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    assert 0 < cert.serial_number < 2**128
    assert validate_leaf(cert) == WORKLOAD
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(ca1[0])


def test_leaf_profile_rsa_has_key_encipherment(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    cert, _ = issue(ca1, key=generate_private_key(KeyType.RSA_2048))
    ku = ext(cert, ExtensionOID.KEY_USAGE)
    assert ku.critical is True
    assert ku.value.digital_signature is True  # type: ignore[attr-defined]
    assert ku.value.key_encipherment is True  # type: ignore[attr-defined]
    assert ku.value.key_cert_sign is False  # type: ignore[attr-defined]


def test_serials_are_random_and_explicit_serial_used(
    ca1: tuple[x509.Certificate, PrivateKey],
) -> None:
    a, _ = issue(ca1)
    b, _ = issue(ca1)
    assert a.serial_number != b.serial_number
    c, _ = issue(ca1, serial=12345)
    assert c.serial_number == 12345


def test_not_after_clamped_to_ca(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    cert, _ = issue(ca1, not_after=NOW + dt.timedelta(days=30))
    assert cert.not_valid_after_utc == ca1[0].not_valid_after_utc


def test_not_before_clamped_to_ca(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    cert, _ = issue(ca1, not_before=NOW - dt.timedelta(days=30))
    assert cert.not_valid_before_utc == ca1[0].not_valid_before_utc


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"spiffe_id": SpiffeId.parse("spiffe://domain1.test")}, "needs an ID with a path"),
        ({"spiffe_id": SpiffeId.parse("spiffe://domain2.test/w")}, "cannot issue"),
        ({"not_before": NOW, "not_after": NOW}, "lifetime is empty"),
        (
            {"not_before": NOW + dt.timedelta(days=5), "not_after": NOW + dt.timedelta(days=6)},
            "lifetime is empty",
        ),
        ({"not_after": dt.datetime(2030, 1, 1, 13)}, "timezone-aware"),
        ({"dns_names": ["bad name"]}, "invalid DNS name"),
        ({"dns_names": ["-x.example"]}, "invalid DNS name"),
        ({"dns_names": [""]}, "invalid DNS name"),
        ({"serial": 0}, "positive"),
        ({"serial": 2**160}, "20 octets"),
    ],
)
def test_issue_rejects(
    ca1: tuple[x509.Certificate, PrivateKey], kwargs: dict[str, object], error: str
) -> None:
    with pytest.raises(X509SvidError, match=error):
        issue(ca1, **kwargs)  # type: ignore[arg-type]


def test_issue_rejects_weak_key(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(InvalidKeyError, match="too weak"):
        issue(ca1, key=weak)  # type: ignore[arg-type]


def test_issue_rejects_wrong_ca_key(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    with pytest.raises(X509SvidError, match="ca_key does not match"):
        issue((ca1[0], generate_private_key()))


# ------------------------------------------------------------------ CA certificates


class _FaultySigner(ec.EllipticCurvePrivateKey):
    """A CA key (as an HSM would present it) whose signatures are made by another key."""

    def __init__(self, claimed: ec.EllipticCurvePrivateKey, *, faulty: bool = True) -> None:
        self._claimed = claimed
        self._actual = ec.generate_private_key(ec.SECP256R1())
        self.faulty = faulty

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm  # type: ignore[override]
             ) -> bytes:
        return (self._actual if self.faulty else self._claimed).sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._claimed.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._claimed.curve

    @property
    def key_size(self) -> int:
        return self._claimed.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError

    def private_bytes(self, *args: object, **kwargs: object) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> _FaultySigner:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _FaultySigner:
        return self


def test_signer_verifying_signatures_catches_a_faulty_signer() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = make_ca(key=key)
    faulty = _FaultySigner(key)
    leaf_key = generate_private_key()
    kwargs = {"spiffe_id": WORKLOAD, "public_key": leaf_key.public_key(),
              "not_before": NOW, "not_after": NOW + dt.timedelta(hours=1)}
    with pytest.raises(X509SvidError, match="does not verify against its issuer"):
        SvidSigner(cert, faulty, verify_signatures=True).sign(**kwargs)  # type: ignore[arg-type]
    # Without the check the bad leaf comes out; a relying party then rejects it
    # (the agent does, before serving it), which is what makes skipping it safe
    # for keys whose signatures this process computes itself.
    leaf = SvidSigner(cert, faulty, verify_signatures=False).sign(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(X509SvidError, match="signature"):
        verify_chain([leaf], Bundle(TD, x509_authorities=(cert,)), now=NOW)


@pytest.mark.parametrize("verify", [True, False])
def test_signer_leaves_verify_and_follow_the_profile(
    ca1: tuple[x509.Certificate, PrivateKey], verify: bool
) -> None:
    signer = SvidSigner(*ca1, verify_signatures=verify)
    bundle = Bundle(TD, x509_authorities=(ca1[0],))
    for n, key in enumerate([generate_private_key(), generate_private_key(KeyType.RSA_2048)]):
        spiffe_id = SpiffeId.parse(f"spiffe://domain1.test/w/{n}")
        leaf = signer.sign(spiffe_id=spiffe_id, public_key=key.public_key(),
                           not_before=NOW, not_after=NOW + dt.timedelta(hours=1),
                           dns_names=("a.example",))
        assert verify_chain([leaf], bundle, now=NOW + dt.timedelta(minutes=1)) == spiffe_id
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_encipherment is (n == 1)  # RSA leaf only
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca1[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
    with pytest.raises(X509SvidError, match=r"trust domain domain1\.test cannot issue"):
        signer.sign(spiffe_id=SpiffeId.parse("spiffe://domain2.test/w"),
                    public_key=generate_private_key().public_key(),
                    not_before=NOW, not_after=NOW + dt.timedelta(hours=1))


def test_random_serials_come_from_fresh_bytes_per_process_and_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import identity.x509svid as module

    reads: list[int] = []
    real = module.secrets.token_bytes

    def counted(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(module.secrets, "token_bytes", counted)
    source = module._SerialSource()
    serials = [source.take() for _ in range(600)]
    assert len(set(serials)) == 600 and all(0 < s < 2**128 for s in serials)
    assert reads == [4096, 4096, 4096]  # 256 serials per read
    # After a fork the child never uses bytes its parent read (or will use).
    monkeypatch.setattr(module.os, "getpid", lambda: -1)
    source.take()
    assert reads == [4096] * 4
    # Each thread reads its own bytes.
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(source.take()))
    thread.start()
    thread.join()
    assert reads == [4096] * 5 and seen[0] not in serials


def test_signer_validates_each_identity_once_per_ca(
    ca1: tuple[x509.Certificate, PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first leaf of an identity is validated as a relying party would; later
    leaves reuse the validated template; a new signer (CA slot) validates again."""
    import identity.x509svid as module

    calls: list[SpiffeId] = []
    real = module.validate_leaf

    def counting(cert: x509.Certificate) -> SpiffeId:
        calls.append(real(cert))
        return calls[-1]

    monkeypatch.setattr(module, "validate_leaf", counting)
    signer = SvidSigner(*ca1, verify_signatures=False)
    other = SpiffeId.parse("spiffe://domain1.test/other")
    bundle = Bundle(TD, x509_authorities=(ca1[0],))
    leaves = []
    for spiffe_id in (WORKLOAD, WORKLOAD, other, WORKLOAD, other):
        key = generate_private_key()
        leaves.append(signer.sign(spiffe_id=spiffe_id, public_key=key.public_key(),
                                  not_before=NOW, not_after=NOW + dt.timedelta(hours=1)))
    assert calls == [WORKLOAD, other]
    # Every leaf is still its own: its ID, its key, its serial, a valid chain.
    assert [verify_chain([leaf], bundle, now=NOW) for leaf in leaves] == [
        WORKLOAD, WORKLOAD, other, WORKLOAD, other]
    assert len({leaf.serial_number for leaf in leaves}) == 5
    assert len({leaf.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
                for leaf in leaves}) == 5
    calls.clear()  # verify_chain validated the leaves too
    # The same identity with DNS names, or with an RSA key, is another template.
    signer.sign(spiffe_id=WORKLOAD, public_key=generate_private_key().public_key(),
                not_before=NOW, not_after=NOW + dt.timedelta(hours=1), dns_names=("a.example",))
    signer.sign(spiffe_id=WORKLOAD, public_key=generate_private_key(KeyType.RSA_2048).public_key(),
                not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
    assert calls == [WORKLOAD, WORKLOAD]
    SvidSigner(*ca1, verify_signatures=False).sign(
        spiffe_id=WORKLOAD, public_key=generate_private_key().public_key(),
        not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
    assert calls == [WORKLOAD, WORKLOAD, WORKLOAD]


def test_signer_template_failing_validation_is_never_trusted(
    ca1: tuple[x509.Certificate, PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    import identity.x509svid as module

    def refuse(cert: x509.Certificate) -> SpiffeId:
        raise X509SvidError("leaf certificate must not have CA flag set to true")

    monkeypatch.setattr(module, "validate_leaf", refuse)
    signer = SvidSigner(*ca1, verify_signatures=False)
    for _ in range(2):  # a template that failed once is checked again, and fails again
        with pytest.raises(X509SvidError, match="CA flag"):
            signer.sign(spiffe_id=WORKLOAD, public_key=generate_private_key().public_key(),
                        not_before=NOW, not_after=NOW + dt.timedelta(hours=1))


def test_signer_checks_identity_before_key_and_bounds_its_templates(
    ca1: tuple[x509.Certificate, PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    import identity.x509svid as module

    signer = SvidSigner(*ca1, verify_signatures=False)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(X509SvidError, match="needs an ID with a path"):
        signer.sign(spiffe_id=SpiffeId.parse("spiffe://domain1.test"), public_key=weak,
                    not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
    with pytest.raises(X509SvidError, match="invalid DNS name"):
        signer.sign(spiffe_id=WORKLOAD, public_key=generate_private_key().public_key(),
                    not_before=NOW, not_after=NOW + dt.timedelta(hours=1), dns_names=("a..b",))
    with pytest.raises(InvalidKeyError):
        signer.sign(spiffe_id=WORKLOAD, public_key=weak,
                    not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
    monkeypatch.setattr(module, "MAX_LEAF_TEMPLATES", 3)
    for n in range(7):
        signer.sign(spiffe_id=SpiffeId.parse(f"spiffe://domain1.test/w/{n}"),
                    public_key=generate_private_key().public_key(),
                    not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
        assert len(signer._templates) <= 3


def test_signer_checks_the_ca_once_when_made(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    leaf, _ = issue(ca1)
    with pytest.raises(X509SvidError, match="CA flag"):
        SvidSigner(leaf, ca1[1])
    with pytest.raises(X509SvidError, match="does not match"):
        SvidSigner(ca1[0], generate_private_key())


def test_root_ca_profile(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    cert, _ = ca1
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "SPIFFE"
    bc = ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical is True
    assert bc.value.ca is True  # type: ignore[attr-defined]
    ku = ext(cert, ExtensionOID.KEY_USAGE)
    assert ku.critical is True
    assert isinstance(ku.value, x509.KeyUsage)
    assert (ku.value.key_cert_sign, ku.value.crl_sign, ku.value.digital_signature) == (
        True,
        True,
        True,
    )
    assert ku.value.key_encipherment is False
    san = ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical is False  # subject is not empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [  # type: ignore[attr-defined]
        "spiffe://domain1.test"
    ]
    ski = ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    aki = ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    assert ski.critical is False and aki.critical is False
    assert aki.value.key_identifier == ski.value.digest  # type: ignore[attr-defined]
    cert.verify_directly_issued_by(cert)
    validate_signing_certificate(cert)


def test_intermediate_ca_and_chain(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    ikey = generate_private_key(KeyType.EC_P384)
    inter = new_ca_certificate(
        trust_domain=TD,
        public_key=ikey.public_key(),
        signer_key=ca1[1],
        issuer=ca1[0],
        not_before=NOW - dt.timedelta(minutes=5),
        not_after=NOW + dt.timedelta(days=10),
    )
    assert inter.issuer == ca1[0].subject
    assert inter.not_valid_after_utc == ca1[0].not_valid_after_utc  # clamped
    aki = ext(inter, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    assert aki.key_identifier == ext(ca1[0], ExtensionOID.SUBJECT_KEY_IDENTIFIER).value.digest  # type: ignore[attr-defined]
    inter.verify_directly_issued_by(ca1[0])
    leaf, _ = issue((inter, ikey))
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    assert verify_chain([leaf, inter], Bundle(TD, (ca1[0],)), now=NOW) == WORKLOAD
    # Without the intermediate the path cannot be built.
    with pytest.raises(X509SvidError, match="cannot verify"):
        verify_chain([leaf], Bundle(TD, (ca1[0],)), now=NOW)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("self-signed-wrong-key", "signer_key does not match public_key"),
        ("issuer-wrong-key", "does not match the issuer"),
        ("empty", "validity is empty"),
    ],
)
def test_ca_rejects(ca1: tuple[x509.Certificate, PrivateKey], kind: str, error: str) -> None:
    key = generate_private_key()
    kw: dict[str, object] = {
        "trust_domain": TD,
        "public_key": key.public_key(),
        "signer_key": key,
        "not_before": NOW,
        "not_after": NOW + dt.timedelta(hours=1),
    }
    if kind == "self-signed-wrong-key":
        kw["signer_key"] = generate_private_key()
    elif kind == "issuer-wrong-key":
        kw["issuer"] = ca1[0]
    else:
        kw["not_after"] = NOW
    with pytest.raises(X509SvidError, match=error):
        new_ca_certificate(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------- hand-made certificates


def raw_cert(
    signer: tuple[x509.Certificate, PrivateKey] | None,
    *,
    uris: tuple[str, ...] = ("spiffe://domain1.test/workload",),
    ca: bool | None = False,
    ku: dict[str, bool] | None = None,
    key: PrivateKey | None = None,
    extra: Callable[[x509.CertificateBuilder], x509.CertificateBuilder] | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A certificate built without our profile, to test the validators."""
    key = key or generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer[0].subject if signer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(hours=1))
    )
    if uris:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    usage = {"digital_signature": True, "key_cert_sign": False, "crl_sign": False}
    if ku is not None:
        usage.update(ku)
    b = b.add_extension(
        x509.KeyUsage(
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
            **usage,
        ),
        critical=True,
    )
    if extra:
        b = extra(b)
    return b.sign(signer[1] if signer else key, hashes.SHA256()), key


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"uris": ()}, "contains no URI SAN"),
        ({"uris": ("spiffe://domain1.test/a", "spiffe://domain1.test/b")}, "more than one URI SAN"),
        ({"uris": ("sparfe://domain1.test/workload",)}, "scheme is missing or invalid"),
        ({"uris": ("spiffe://domain1.test",)}, "non-root path"),
        ({"ca": True}, "must not have CA flag"),
        ({"ku": {"digital_signature": False}}, "must have 'digitalSignature'"),
        ({"ku": {"key_cert_sign": True}}, "must not have 'keyCertSign'"),
        ({"ku": {"crl_sign": True}}, "must not have 'cRLSign'"),
    ],
)
def test_validate_leaf_rejects(
    ca1: tuple[x509.Certificate, PrivateKey], kwargs: dict[str, object], error: str
) -> None:
    cert, _ = raw_cert(ca1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(X509SvidError, match=error):
        validate_leaf(cert)
    # verify_chain applies the same leaf rules before any path building.
    with pytest.raises(X509SvidError, match=error):
        verify_chain([cert], Bundle(TD, (ca1[0],)), now=NOW)


def test_validate_leaf_accepts_leaf_without_basic_constraints(
    ca1: tuple[x509.Certificate, PrivateKey],
) -> None:
    # go-spiffe's Verify tests use leaves with no basicConstraints; cA defaults to false.
    cert, _ = raw_cert(ca1, ca=None)
    assert validate_leaf(cert) == WORKLOAD
    assert verify_chain([cert], Bundle(TD, (ca1[0],)), now=NOW) == WORKLOAD


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ca": False, "ku": {"key_cert_sign": True}}, "must have CA flag"),
        ({"ca": None, "ku": {"key_cert_sign": True}}, "must have CA flag"),
        ({"ca": True, "ku": {"key_cert_sign": False, "crl_sign": True}}, "'keyCertSign'"),
        (
            {"ca": True, "ku": {"key_cert_sign": True}, "uris": ("spiffe://domain1.test/x",)},
            "must have no path",
        ),
    ],
)
def test_validate_signing_certificate_rejects(kwargs: dict[str, object], error: str) -> None:
    cert, _ = raw_cert(None, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(X509SvidError, match=error):
        validate_signing_certificate(cert)


# ------------------------------------------------------------------ verify_chain


def test_verify_success(
    ca1: tuple[x509.Certificate, PrivateKey], ca2: tuple[x509.Certificate, PrivateKey]
) -> None:
    leaf, _ = issue(ca1)
    bundles = BundleSet([Bundle(TD, (ca1[0],)), Bundle(TD2, (ca2[0],))])
    assert verify_chain([leaf], bundles, now=NOW) == WORKLOAD
    # a bundle is its own one-trust-domain source
    assert verify_chain([leaf], Bundle(TD, (ca1[0],)), now=NOW) == WORKLOAD


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("empty chain", "empty certificate chain"),
        ("no bundle for trust domain", "no X.509 bundle for trust domain domain1.test"),
        ("no roots", "has no X.509 authorities"),
        ("roots of another trust domain filed under ours", "cannot verify"),
        ("expired", "not valid at"),
        ("not yet valid", "not valid at"),
        ("naive time", "timezone-aware"),
        ("unknown critical extension", "unaccounted-for critical extensions"),
    ],
)
def test_verify_rejects(
    ca1: tuple[x509.Certificate, PrivateKey],
    ca2: tuple[x509.Certificate, PrivateKey],
    case: str,
    error: str,
) -> None:
    leaf, _ = issue(ca1)
    chain: list[x509.Certificate] = [leaf]
    bundles: BundleSet = BundleSet([Bundle(TD, (ca1[0],))])
    now = NOW
    if case == "empty chain":
        chain = []
    elif case == "no bundle for trust domain":
        # Never pool: domain2's bundle holds CA1, yet domain1's leaf must not pass.
        bundles = BundleSet([Bundle(TD2, (ca1[0],))])
    elif case == "no roots":
        bundles = BundleSet([Bundle(TD)])
    elif case == "roots of another trust domain filed under ours":
        bundles = BundleSet([Bundle(TD, (ca2[0],))])
    elif case == "expired":
        now = leaf.not_valid_after_utc + dt.timedelta(seconds=1)
    elif case == "not yet valid":
        now = leaf.not_valid_before_utc - dt.timedelta(seconds=1)
    elif case == "naive time":
        now = dt.datetime(2030, 1, 1, 12, 0)
    elif case == "unknown critical extension":
        weird = x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
        )
        chain = [raw_cert(ca1, extra=lambda b: b.add_extension(weird, critical=True))[0]]
    with pytest.raises(X509SvidError, match=error):
        verify_chain(chain, bundles, now=now)


def test_verify_rejects_intermediate_that_is_not_a_ca(
    ca1: tuple[x509.Certificate, PrivateKey],
) -> None:
    # A leaf "signed" by another leaf: RFC 5280 §6.1.4 (k) requires cA on issuers.
    fake_ca, fake_key = raw_cert(ca1, uris=("spiffe://domain1.test/evil",), ca=False)
    leaf, _ = raw_cert((fake_ca, fake_key))
    with pytest.raises(X509SvidError, match="cannot verify"):
        verify_chain([leaf, fake_ca], Bundle(TD, (ca1[0],)), now=NOW)


def test_verify_at_the_edges(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    leaf, _ = issue(ca1)
    bundle = Bundle(TD, (ca1[0],))
    assert verify_chain([leaf], bundle, now=leaf.not_valid_before_utc) == WORKLOAD
    assert verify_chain([leaf], bundle, now=leaf.not_valid_after_utc) == WORKLOAD


# ------------------------------------------------------------------ X509Svid


def test_x509svid_round_trips(ca1: tuple[x509.Certificate, PrivateKey]) -> None:
    leaf, key = issue(ca1)
    svid = X509Svid.parse(certificates_to_pem([leaf, ca1[0]]), private_key_to_pem(key))
    assert svid.spiffe_id == WORKLOAD
    assert svid.leaf == leaf
    assert svid.cert_chain == (leaf, ca1[0])
    assert svid.expires_at == leaf.not_valid_after_utc
    assert svid.expires_at.tzinfo is not None
    raw = X509Svid.parse_raw(svid.chain_der(), svid.key_der())
    assert raw.cert_chain == svid.cert_chain
    assert raw.key_der() == private_key_to_pkcs8_der(key)
    assert X509Svid.parse(svid.chain_pem(), svid.key_pem()).cert_chain == svid.cert_chain


@pytest.mark.parametrize(
    ("certs", "key", "error"),
    [
        (b"", b"", "no PEM blocks found"),
        (b"junk", b"junk", "cannot parse PEM encoded certificate: .*no PEM blocks found"),
        ("leaf", b"junk", "cannot parse PEM encoded private key: no PEM blocks found"),
        ("leaf", "leaf", "no private key found"),
        ("key", "key", "no certificates found"),
        ("leaf", "other-key", "does not match private key"),
        ("leaf", "ec-legacy", "no private key found"),
    ],
)
def test_parse_rejects(
    ca1: tuple[x509.Certificate, PrivateKey], certs: bytes | str, key: bytes | str, error: str
) -> None:
    leaf, leaf_key = issue(ca1)
    legacy = leaf_key.private_bytes(  # 'EC PRIVATE KEY' blocks are skipped, as go-spiffe does
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    blobs = {
        "leaf": certificates_to_pem([leaf]),
        "key": private_key_to_pem(leaf_key),
        "other-key": private_key_to_pem(generate_private_key()),
        "ec-legacy": legacy,
    }
    c = blobs[certs] if isinstance(certs, str) else certs
    k = blobs[key] if isinstance(key, str) else key
    with pytest.raises(X509SvidError, match=error):
        X509Svid.parse(c, k)


@pytest.mark.parametrize(
    ("certs", "key", "error"),
    [
        (b"not-DER-encoded", "key", "cannot parse DER encoded certificate"),
        ("leaf", b"not-DER-encoded", "cannot parse DER encoded private key"),
        (b"", "key", "no certificates found"),
        ("leaf+junk", "key", "cannot parse DER encoded certificate"),
    ],
)
def test_parse_raw_rejects(
    ca1: tuple[x509.Certificate, PrivateKey], certs: bytes | str, key: bytes | str, error: str
) -> None:
    leaf, leaf_key = issue(ca1)
    blobs = {
        "leaf": certificates_to_der([leaf]),
        "leaf+junk": certificates_to_der([leaf]) + b"\x30\x05ab",
        "key": private_key_to_pkcs8_der(leaf_key),
    }
    c = blobs[certs] if isinstance(certs, str) else certs
    k = blobs[key] if isinstance(key, str) else key
    with pytest.raises(X509SvidError, match=error):
        X509Svid.parse_raw(c, k)


def test_svid_without_key() -> None:
    ca, cak = make_ca()
    leaf, _ = issue((ca, cak))
    svid = X509Svid(WORKLOAD, (leaf,))
    with pytest.raises(X509SvidError, match="no private key"):
        svid.key_der()
    with pytest.raises(X509SvidError, match="at least one certificate"):
        X509Svid(WORKLOAD, ())


# ------------------------------------------------------------------ encodings


def test_certificate_encodings(
    ca1: tuple[x509.Certificate, PrivateKey], ca2: tuple[x509.Certificate, PrivateKey]
) -> None:
    certs = (ca1[0], ca2[0])
    assert load_certificates_pem(certificates_to_pem(certs)) == certs
    assert load_certificates_der(certificates_to_der(certs)) == certs
    assert load_certificates_der(b"") == ()
    with pytest.raises(X509SvidError, match="no PEM blocks found"):
        load_certificates_pem(b"hello")
    key_only = private_key_to_pem(generate_private_key())
    assert load_certificates_pem(key_only) == ()  # other block types are skipped
    bad = b"-----BEGIN CERTIFICATE-----\nQ09SUlVQVA==\n-----END CERTIFICATE-----\n"
    with pytest.raises(X509SvidError, match="malformed certificate"):
        load_certificates_pem(bad)


# ------------------------------------------------------------------ CSRs


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_csr_round_trip(key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    csr = parse_csr(new_csr(key))
    assert csr.public_key() == key.public_key()
    assert csr.subject == x509.Name([])


def _csr_with(key: object) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(
            key,
            hashes.SHA256(),  # type: ignore[arg-type]
        )
    )
    return csr.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: b"garbage", "cannot parse CSR"),
        (lambda: b"", "cannot parse CSR"),
        (lambda: b"\x30" * (64 * 1024 + 1), "exceeds the limit"),
        (lambda: _csr_with(rsa.generate_private_key(65537, 1024)), "too weak"),
        (lambda: _csr_with(ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
        (lambda: _tampered_csr(), "signature is invalid"),
    ],
)
def test_parse_csr_rejects(make: Callable[[], bytes], error: str) -> None:
    with pytest.raises(X509SvidError, match=error):
        parse_csr(make())


def _tampered_csr() -> bytes:
    # Sign with one key but claim another: possession is not proven.
    a, b = generate_private_key(), generate_private_key()
    good = x509.load_der_x509_csr(new_csr(a))
    der = good.public_bytes(serialization.Encoding.DER)
    pub_a = a.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_b = b.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pub_a in der
    return der.replace(pub_a, pub_b)
