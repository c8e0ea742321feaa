"""A throw-away grid PKI for the development server and its clients.

The real PanDA server sits behind Apache ``mod_ssl`` with grid CAs and the pilot
authenticates with an RFC 3820 proxy certificate.  To exercise exactly that path
without any external service we generate, into one directory:

* a CA (``ca.pem``) and the same CA as an OpenSSL hashed directory
  (``certificates/<subject_hash>.0``) for ``--capath`` / ``X509_CERT_DIR`` users;
* a server certificate for ``localhost`` (DNS:localhost, IP:127.0.0.1, IP:::1);
* a user certificate ``/C=XX/O=PandaTest/CN=testpilot`` (``usercert.pem``/``userkey.pem``);
* an RFC 3820 proxy signed by the user certificate, written like
  ``X509_USER_PROXY``: proxy certificate, proxy key, then the user certificate.

Existing files are reused when they still form a valid PKI, so that restarting a
server keeps its CA and clients configured against it keep working.  Keys are EC
P-256: generation takes milliseconds, which keeps tests fast.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from OpenSSL import crypto

#: RFC 3820 proxyCertInfo extension.
PROXY_CERT_INFO_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
#: RFC 3820 policy language "inherit all" (id-ppl-inheritAll).
INHERIT_ALL_OID = "1.3.6.1.5.5.7.21.1"

USER_DN = "/C=XX/O=PandaTest/CN=testpilot"

CERT_LIFETIME = datetime.timedelta(days=10)
#: Files expiring sooner than this are regenerated at start-up.
RENEW_MARGIN = datetime.timedelta(days=1)
#: Tolerance for clients whose clock is slightly behind ours.
BACKDATE = datetime.timedelta(hours=1)

_User = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PandaTest"),
        x509.NameAttribute(NameOID.COMMON_NAME, "testpilot"),
    ]
)
_CA = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PandaTest"),
        x509.NameAttribute(NameOID.COMMON_NAME, "PanDA dev CA"),
    ]
)
_Server = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PandaTest"),
        x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
    ]
)


@dataclass(frozen=True)
class PKIFiles:
    """Where the generated PKI lives (all absolute paths)."""

    ca_cert: Path
    ca_dir: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_proxy: Path
    user_dn: str


def generate_pki(directory: Path) -> PKIFiles:
    """Create (or reuse) the development PKI under ``directory``.

    Each part is regenerated only when it is missing, unreadable, expiring within a
    day, or no longer chains to the current CA; regenerating the CA regenerates
    everything.  Synchronous: a few milliseconds of CPU and small file writes.
    """
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    files = PKIFiles(
        ca_cert=directory / "ca.pem",
        ca_dir=directory / "certificates",
        server_cert=directory / "hostcert.pem",
        server_key=directory / "hostkey.pem",
        client_cert=directory / "usercert.pem",
        client_key=directory / "userkey.pem",
        client_proxy=directory / "x509up",
        user_dn=USER_DN,
    )
    ca_key_path = directory / "ca-key.pem"
    now = datetime.datetime.now(datetime.UTC)

    ca = _load_pair(files.ca_cert, ca_key_path, now)
    fresh_ca = ca is None or not _is_self_signed(ca[0])
    if ca is None or fresh_ca:
        ca = _make_ca(now)
        _write_pair(files.ca_cert, ca_key_path, ca)
    ca_cert, ca_key = ca

    server = None if fresh_ca else _load_pair(files.server_cert, files.server_key, now)
    if server is None or not _issued_by(server[0], ca_cert):
        server = _make_server(now, ca_cert, ca_key)
        _write_pair(files.server_cert, files.server_key, server)

    user = None if fresh_ca else _load_pair(files.client_cert, files.client_key, now)
    fresh_user = user is None or not _issued_by(user[0], ca_cert)
    if user is None or fresh_user:
        user = _make_user(now, ca_cert, ca_key)
        _write_pair(files.client_cert, files.client_key, user)

    if fresh_user or not _proxy_ok(files.client_proxy, user[0], now):
        _write_proxy(files.client_proxy, _make_proxy(now, *user), user[0])

    _write_hashed_dir(files.ca_dir, ca_cert)
    return files


# -- building certificates -----------------------------------------------------------------------

_Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(now: datetime.datetime) -> _Pair:
    key = _new_key()
    cert = (
        _builder(_CA, _CA, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _signed_by_ca(
    builder: x509.CertificateBuilder, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def _make_server(
    now: datetime.datetime, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> _Pair:
    key = _new_key()
    names = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    builder = (
        _builder(_Server, ca_cert.subject, key.public_key(), now)
        .add_extension(names, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return _signed_by_ca(builder, ca_cert, ca_key), key


def _make_user(
    now: datetime.datetime, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> _Pair:
    key = _new_key()
    builder = _builder(_User, ca_cert.subject, key.public_key(), now).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    return _signed_by_ca(builder, ca_cert, ca_key), key


def proxy_cert_info_der() -> bytes:
    """DER of ``ProxyCertInfo ::= SEQUENCE { proxyPolicy SEQUENCE { policyLanguage inheritAll } }``."""
    oid = bytes([0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x15, 0x01])  # 1.3.6.1.5.5.7.21.1
    policy = bytes([0x06, len(oid)]) + oid
    proxy_policy = bytes([0x30, len(policy)]) + policy
    return bytes([0x30, len(proxy_policy)]) + proxy_policy


def _make_proxy(
    now: datetime.datetime, user_cert: x509.Certificate, user_key: ec.EllipticCurvePrivateKey
) -> _Pair:
    """An RFC 3820 "impersonation" proxy: subject = issuer + ``CN=<serial>``, inherit-all policy."""
    key = _new_key()
    serial = secrets.randbelow(2**31 - 1) + 1
    subject = x509.Name(
        [
            *user_cert.subject.rdns,
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))]),
        ]
    )
    not_after = min(now + CERT_LIFETIME, user_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(user_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO_OID, proxy_cert_info_der()), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .sign(user_key, hashes.SHA256())
    )
    return cert, key


# -- validation of existing files ----------------------------------------------------------------


def _load_pair(cert_path: Path, key_path: Path, now: datetime.datetime) -> _Pair | None:
    """The certificate and key at these paths, if readable, matching and not expiring soon."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if not _current(cert, now):
        return None
    return cert, key


def _current(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc > now + RENEW_MARGIN


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _proxy_ok(path: Path, user_cert: x509.Certificate, now: datetime.datetime) -> bool:
    try:
        data = path.read_bytes()
        certs = x509.load_pem_x509_certificates(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError):
        return False
    return (
        len(certs) == 2
        and certs[1] == user_cert
        and _issued_by(certs[0], user_cert)
        and _current(certs[0], now)
        and key.public_key() == certs[0].public_key()
    )


# -- writing -----------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a key behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _write_pair(cert_path: Path, key_path: Path, pair: _Pair) -> None:
    cert, key = pair
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_proxy(path: Path, proxy: _Pair, user_cert: x509.Certificate) -> None:
    cert, key = proxy
    pem = serialization.Encoding.PEM
    _write_atomic(path, cert.public_bytes(pem) + _key_pem(key) + user_cert.public_bytes(pem), 0o600)


def subject_hash(cert: x509.Certificate) -> str:
    """OpenSSL's ``X509_subject_name_hash`` as used for hashed CA directories (``%08x``)."""
    value: object = crypto.X509.from_cryptography(cert).subject_name_hash()
    assert isinstance(value, int)  # pyOpenSSL returns X509_subject_name_hash's unsigned long
    return f"{value:08x}"


def _write_hashed_dir(directory: Path, ca_cert: x509.Certificate) -> None:
    directory.mkdir(exist_ok=True)
    wanted = f"{subject_hash(ca_cert)}.0"
    pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    for stale in directory.glob("*.[0-9]"):
        if stale.name != wanted:
            stale.unlink()
    target = directory / wanted
    if not target.exists() or target.read_bytes() != pem:
        _write_atomic(target, pem, 0o644)
