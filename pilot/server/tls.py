"""TLS for the pilot's HTTPS calls: whom to trust, and how to prove who we are.

Verification of the server's certificate is always on; there is no switch to turn
it off.  Trust comes from ``--cacert`` (a PEM bundle), ``--capath`` /
``X509_CERT_DIR`` (a grid CA directory), or the system store.  The pilot proves its
identity with the X.509 proxy in ``X509_USER_PROXY`` (one PEM file: the proxy
certificate, its private key, then the chain) unless it authenticates with a token.

Grid proxies are short-lived and renewed in place by the site; the proxy file's
modification time is checked whenever a new connection is made, so a renewed proxy
is used without restarting the pilot.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pilot.logs import pilot_observer
from pilot.model.credentials import Credentials
from pilot.util.records import record

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?P<kind>[A-Z0-9 ]+)-----\r?\n.+?\r?\n-----END (?P=kind)-----",
    re.DOTALL,
)


class CredentialError(Exception):
    """The pilot's credentials or trust anchors cannot be used; the message says why."""


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """The (kind, block) pairs of a PEM file, in order (``CERTIFICATE``, ``PRIVATE KEY``...)."""
    return [(m.group("kind").decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def load_ca_certificates(cacert: Path | None, capath: Path | None) -> list[ssl.Certificate]:
    """CA certificates from a PEM bundle and/or a hashed CA directory."""
    certificates: list[ssl.Certificate] = []
    sources: list[Path] = []
    if cacert is not None:
        sources.append(cacert)
    if capath is not None:
        try:
            entries = sorted(capath.iterdir())
        except OSError as exc:
            raise CredentialError(f"cannot list CA directory {capath}: {exc.strerror}") from None
        sources += [p for p in entries if p.suffix in (".0", ".1", ".2", ".pem", ".crt") and p.is_file()]
    for path in sources:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CredentialError(f"cannot read CA file {path}: {exc.strerror}") from None
        for kind, block in pem_blocks(data):
            if kind in ("CERTIFICATE", "TRUSTED CERTIFICATE"):
                try:
                    certificates.append(ssl.Certificate.loadPEM(block))
                except crypto.Error:
                    continue
    if (cacert is not None or capath is not None) and not certificates:
        raise CredentialError(f"no CA certificate found in {cacert or capath}")
    return certificates


_SYSTEM_BUNDLES = (
    Path("/etc/ssl/certs/ca-certificates.crt"),
    Path("/etc/pki/tls/certs/ca-bundle.crt"),
    Path("/etc/ssl/cert.pem"),
)


def _system_bundle() -> Path | None:
    return next((p for p in _SYSTEM_BUNDLES if p.is_file()), None)


@record(frozen=True)
class ClientIdentity:
    """A client certificate with its key and the chain that completes it."""

    certificate: ssl.PrivateCertificate
    chain: tuple[crypto.X509, ...]
    subject: str


def load_proxy(path: Path) -> ClientIdentity:
    """Load an X509_USER_PROXY-style PEM: certificate, key and chain in one file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read X.509 proxy {path}: {exc.strerror}") from None
    blocks = pem_blocks(data)
    certs = [block for kind, block in blocks if kind == "CERTIFICATE"]
    keys = [block for kind, block in blocks if kind.endswith("PRIVATE KEY")]
    if not certs or not keys:
        raise CredentialError(f"X.509 proxy {path} must hold a certificate and its private key")
    try:
        leaf = ssl.Certificate.loadPEM(certs[0])
        key = ssl.KeyPair.load(keys[0], crypto.FILETYPE_PEM)
        chain = tuple(ssl.Certificate.loadPEM(c).original for c in certs[1:])
    except crypto.Error as exc:
        raise CredentialError(f"X.509 proxy {path} is not valid PEM: {exc}") from None
    private = ssl.PrivateCertificate.fromCertificateAndKeyPair(leaf, key)
    subject = "".join(
        f"/{name.decode()}={value.decode()}" for name, value in leaf.original.get_subject().get_components()
    )
    return ClientIdentity(private, chain, subject)


@implementer(IPolicyForHTTPS)
class PilotTLSPolicy:
    """Verifying TLS policy for treq/Agent, presenting the proxy when there is one.

    ``stat`` is injectable so tests can simulate proxy renewal without touching mtimes.
    """

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        credentials: Credentials,
        *,
        present_proxy: bool = True,
        stat: Callable[[Path], float] = lambda p: p.stat().st_mtime,
        with_system_cas: bool = False,
    ) -> None:
        # the configured CAs are checked now (a bad --cacert fails the start); the public
        # ones a storage client adds are loaded on its first connection (a pilot whose jobs
        # never reach an object store never pays for 150 certificates)
        self._cas = load_ca_certificates(credentials.cacert, credentials.capath)
        self._with_system_cas = with_system_cas
        self._trust_root: Any = None  # an IOpenSSLTrustRoot (Twisted exports no public name)
        self._proxy = credentials.proxy if present_proxy else None
        self._stat = stat
        self._identity: ClientIdentity | None = None
        self._identity_mtime: float | None = None
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}
        if self._proxy is not None:
            self._reload_identity()

    def _reload_identity(self) -> None:
        assert self._proxy is not None
        try:
            mtime = self._stat(self._proxy)
        except OSError as exc:
            raise CredentialError(f"X.509 proxy {self._proxy} is not accessible: {exc.strerror}") from None
        if mtime == self._identity_mtime:
            return
        self._identity = load_proxy(self._proxy)
        self._identity_mtime = mtime
        self._creators.clear()
        self.log.info(
            "using client certificate {subject}", subject=self._identity.subject, event="tls.identity"
        )

    @property
    def identity(self) -> ClientIdentity | None:
        return self._identity

    @property
    def _trust(self) -> Any:
        if self._trust_root is None:
            cas = list(self._cas)
            bundle = _system_bundle()
            if self._with_system_cas and cas and bundle is not None:
                cas += load_ca_certificates(bundle, None)  # explicit grid CAs plus the public ones
            self._trust_root = ssl.trustRootFromCertificates(cas) if cas else ssl.platformTrust()
        return self._trust_root

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        if self._proxy is not None:
            try:
                self._reload_identity()
            except CredentialError as exc:
                # Keep using the identity we have; the server will refuse it if it expired.
                self.log.warn("cannot reload X.509 proxy: {error}", error=str(exc))
        host = hostname.decode("ascii")
        creator = self._creators.get(host)
        if creator is None:
            extra = {"extraCertChain": list(self._identity.chain)} if self._identity else None
            creator = ssl.optionsForClientTLS(
                host,
                trustRoot=self._trust,
                clientCertificate=self._identity.certificate if self._identity else None,
                extraCertificateOptions=extra,
            )
            self._creators[host] = creator
        return creator


# -- session resumption ----------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class ResumingCreator:
    """A connection creator that offers the server the last session it gave us."""

    def __init__(
        self, inner: IOpenSSLClientConnectionCreator, sessions: TLSSessions, key: tuple[str, int]
    ) -> None:
        self._inner = inner
        self._sessions = sessions
        self._key = key

    @property
    def host(self) -> str:
        return self._key[0]

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        session = self._sessions.session_for(self._key, self._inner)
        if session is not None:
            connection.set_session(session)
        return connection

    def remember(self, connection: SSL.Connection) -> None:
        """Keep ``connection``'s session (TLS 1.3: the ticket that came after the handshake)."""
        self._sessions.remember(self._key, self._inner, connection.get_session())


class TLSSessions:
    """The last TLS session of each server, so that a new connection resumes it.

    A resumed handshake skips the certificate exchange and its signatures: about a
    third of the round trips and most of the CPU of a full one.  The server name is
    still checked against the certificate kept in the session.  A session belongs to
    the connection creator it came from: when the policy builds a new creator (the
    proxy was renewed), the old session is not offered again, so the server sees the
    new certificate.
    """

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], tuple[IOpenSSLClientConnectionCreator, SSL.Session]] = {}

    def resuming(self, creator: IOpenSSLClientConnectionCreator, host: str, port: int) -> ResumingCreator:
        """``creator``, offering the server's last session to each new connection."""
        return ResumingCreator(creator, self, (host, port))

    def session_for(
        self, key: tuple[str, int], creator: IOpenSSLClientConnectionCreator
    ) -> SSL.Session | None:
        entry = self._sessions.get(key)
        if entry is None or entry[0] is not creator:
            return None
        return entry[1]

    def remember(
        self, key: tuple[str, int], creator: IOpenSSLClientConnectionCreator, session: SSL.Session | None
    ) -> None:
        if session is not None:
            self._sessions[key] = (creator, session)

    def forget(self, host: str, port: int) -> None:
        self._sessions.pop((host, port), None)


def was_resumed(connection: SSL.Connection) -> bool:
    """Whether the handshake just completed on ``connection`` resumed a session.

    pyOpenSSL has no ``SSL_session_reused``; a resumed handshake verifies no
    certificate, so OpenSSL keeps no verified chain for it (``SSL_get0_verified_chain``
    is NULL), while every full handshake of this client verifies the server's chain.
    """
    return connection.get_verified_chain() is None


def keep_resumable(connection: SSL.Connection) -> None:
    """Mark a connection that ended after a good handshake as shut down, so its session stays usable.

    OpenSSL invalidates the session of a connection freed without a close_notify
    (``ssl_clear_bad_session``), the way SSL 3.0 demanded; TLS 1.1 and later (RFC 4346
    §7.2.1) no longer ask for it, and servers closing idle keep-alive connections
    often skip the alert.  Fatal TLS errors still invalidate the session themselves.
    """
    connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
