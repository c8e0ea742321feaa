"""Who is calling: X.509 client certificates (proxies included) and bearer tokens.

The real server delegates TLS to Apache ``mod_ssl`` (``SSLVerifyClient optional``,
``SSLVerifyDepth 10``, grid CAs, ``LegacyDNStringFormat``) and only looks at the
resulting ``SSL_CLIENT_S_DN``; tokens are decoded by ``PandaRequest`` into the same
variables.  We reproduce that contract:

* TLS: a client certificate is optional; if one is sent it must verify against the
  development CA, and RFC 3820 proxy certificates are accepted (OpenSSL's
  ``X509_V_FLAG_ALLOW_PROXY_CERTS``).
* The caller's DN is the subject of the end-entity certificate of the verified
  chain (proxy certificates skipped) in OpenSSL's ``/C=XX/O=.../CN=...`` form,
  which is what the server's ``get_bare_dn`` leaves of a proxy's subject.
* Bearer tokens are a development stand-in for OIDC: a token is accepted when it
  equals a configured one (and the ``Origin`` VO matches), and refused with the
  server's ``403 ERROR : Token authentication failed. <reason>``.
* Roles are decided per API generation, like the two server versions do.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from pilot.devserver.pki import PKIFiles

#: RFC 3820 proxyCertInfo, and the pre-RFC (GT3) draft OID some old proxies carry.
_PROXY_OIDS = (ObjectIdentifier("1.3.6.1.5.5.7.1.14"), ObjectIdentifier("1.3.6.1.4.1.3536.1.222"))
VERIFY_DEPTH = 10


# -- TLS -----------------------------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server-side TLS like ``mod_ssl`` with ``SSLVerifyClient optional`` and grid proxies.

    By default sessions are not cached: every connection verifies its client chain,
    so the chain is always available to work out the caller's DN.  With ``sessions``
    a client may resume (session cache and tickets, as mod_ssl offers); a resumed
    connection has no verified chain and its DN comes from the peer certificate.
    """

    def __init__(self, pki: PKIFiles, *, sessions: bool = False) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate_chain_file(str(pki.server_cert))
        context.use_privatekey_file(str(pki.server_key))
        context.check_privatekey()
        context.load_verify_locations(str(pki.ca_cert), str(pki.ca_dir))
        # without this flag OpenSSL refuses proxy certificates ("certificate unknown")
        context.get_cert_store().set_flags(crypto.X509StoreFlags.ALLOW_PROXY_CERTS)
        # VERIFY_PEER without FAIL_IF_NO_PEER_CERT: a certificate is optional, but must verify if sent
        context.set_verify(SSL.VERIFY_PEER)
        context.set_verify_depth(VERIFY_DEPTH)
        ca = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
        context.add_client_ca(ca)
        if sessions:
            context.set_session_id(b"panda-dev")
        else:
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            context.set_options(SSL.OP_NO_TICKET)
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


# -- certificates to DNs ---------------------------------------------------------------------------


def openssl_dn(name: crypto.X509Name) -> str:
    """``/C=XX/O=PandaTest/CN=testpilot``: OpenSSL's one-line (mod_ssl legacy) DN format."""
    return "".join(
        f"/{key.decode()}={value.decode('utf-8', 'replace')}" for key, value in name.get_components()
    )


def _is_proxy(certificate: x509.Certificate) -> bool:
    for oid in _PROXY_OIDS:
        try:
            certificate.extensions.get_extension_for_oid(oid)
        except x509.ExtensionNotFound:
            continue
        return True
    # pre-RFC "legacy" Globus proxies: subject = issuer + /CN=proxy or /CN=limited proxy
    last = certificate.subject.rdns[-1:] if certificate.subject.rdns else []
    return (
        bool(last)
        and certificate.subject.rdns[:-1] == certificate.issuer.rdns
        and any(attribute.value in ("proxy", "limited proxy") for attribute in last[0])
    )


@dataclass(frozen=True)
class CertificateIdentity:
    """``dn``: end-entity subject; ``subject``: the presented certificate's own subject."""

    dn: str
    subject: str


def identity_from_chain(chain: Sequence[crypto.X509]) -> CertificateIdentity | None:
    """The caller's identity from a verified chain (peer certificate first)."""
    if not chain:
        return None
    subject = openssl_dn(chain[0].get_subject())
    for certificate in chain:
        if not _is_proxy(certificate.to_cryptography()):
            return CertificateIdentity(openssl_dn(certificate.get_subject()), subject)
    return CertificateIdentity(bare_dn(subject), subject)


def bare_dn(dn: str) -> str:
    """Strip proxy components from a DN (fallback when no chain is available)."""
    dn = dn.replace("/CN=limited proxy", "")
    dn = re.sub("(/CN=proxy)+", "", dn)
    return re.sub(r"(/CN=\d+)+$", "", dn)


def peer_chain(transport: object) -> list[crypto.X509]:
    """The verified client chain of an HTTP channel's transport, or ``[]`` (no TLS, no certificate)."""
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return []
    connection = transport.getHandle()  # type: ignore[no-untyped-call]
    if not isinstance(connection, SSL.Connection):
        return []
    chain = connection.get_verified_chain()
    if chain:
        return list(chain)
    peer = connection.get_peer_certificate()
    return [peer] if peer is not None else []


# -- identities and roles --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrant:
    """A development bearer token: the caller using it gets ``dn`` and, if ``production``, the role.

    ``vo`` restricts the ``Origin`` header's VO; ``None`` accepts any VO.
    """

    token: str
    vo: str | None = None
    dn: str | None = None
    production: bool = True

    @property
    def identity_dn(self) -> str:
        if self.dn:
            return self.dn
        return "/CN=token:" + hashlib.sha256(self.token.encode()).hexdigest()[:12]

    @classmethod
    def parse(cls, text: str) -> TokenGrant:
        """``TOKEN[:VO]`` as given on the command line or in a token file."""
        token, _, vo = text.strip().partition(":")
        if not token:
            raise ValueError("empty token")
        return cls(token=token, vo=vo or None)


@dataclass(frozen=True)
class Identity:
    """What the server knows about a caller (``SSL_CLIENT_S_DN`` and FQANs)."""

    dn: str | None = None
    subject: str | None = None
    fqans: tuple[str, ...] = ()
    via: str = "anonymous"  # certificate, token, plain or anonymous
    production_override: bool = False  # plain-HTTP mode: everyone is the production user

    @property
    def secure_v1(self) -> bool:
        """1.0.x ``is_secure``: a DN, and not a (legacy) limited proxy."""
        return self.dn is not None and "/CN=limited proxy" not in (self.subject or "")


class TokenAuthenticationFailed(Exception):
    """Becomes ``403 ERROR : Token authentication failed. <reason>``."""


class Authenticator:
    """Turns a connection's certificates and a request's headers into an ``Identity``."""

    def __init__(
        self,
        *,
        production_dns: Iterable[str],
        tokens: Iterable[TokenGrant] = (),
        plain_http: bool = False,
        default_dn: str,
    ) -> None:
        self.production_dns = tuple(dn for dn in production_dns if dn)
        self._tokens = {grant.token: grant for grant in tokens}
        self._plain = plain_http
        self.default_dn = default_dn

    def identify(
        self, chain: Sequence[crypto.X509], authorization: str | None, origin: str | None
    ) -> Identity:
        """Certificate first, then token (which must be valid whenever one is presented)."""
        if self._plain:
            identity = Identity(
                dn=self.default_dn, subject=self.default_dn, via="plain", production_override=True
            )
        else:
            certificate = identity_from_chain(chain)
            identity = (
                Identity(dn=certificate.dn, subject=certificate.subject, via="certificate")
                if certificate
                else Identity()
            )
        if self._tokens and authorization is not None:
            parts = authorization.split()
            # like PandaRequest: a header without a second word is ignored (and logged there)
            if len(parts) >= 2:
                identity = self._with_token(identity, parts[1], origin)
        return identity

    def _with_token(self, identity: Identity, token: str, origin: str | None) -> Identity:
        if origin is None:
            raise TokenAuthenticationFailed("Token decode failure. no VO given in the Origin header")
        grant = self._tokens.get(token)
        if grant is None:
            raise TokenAuthenticationFailed("Invalid token. Signature verification failed")
        vo, role = _split_origin(origin)
        if grant.vo is not None and vo != grant.vo:
            raise TokenAuthenticationFailed(f"Unknown vo : {vo}")
        if role and role == "production" and not grant.production:
            raise TokenAuthenticationFailed(f"Not a member of the {vo}/{role} group")
        if identity.dn is not None:
            # certificate and token: the server keeps the certificate's identity
            return identity
        fqans: tuple[str, ...] = ()
        if role:
            fqans = (f"/{vo}/Role={role}",)
        elif grant.production:
            fqans = (f"/{vo}/Role=production",)
        return Identity(dn=grant.identity_dn, subject=grant.identity_dn, fqans=fqans, via="token")

    def production_v1(self, identity: Identity) -> bool:
        """1.0.x ``has_production_role``: DN contains a production DN, or a production FQAN."""
        if identity.production_override:
            return True
        dn = identity.dn or ""
        if any(production in dn for production in self.production_dns):
            return True
        return _fqan_matches(identity.fqans, _V1_PRODUCTION_FQANS)

    def production_legacy(self, identity: Identity, *, voms_patch: bool = True) -> bool:
        """0.8.1 ``_checkRole``: production/pilot FQANs (any FQAN of some VOs with the "VOMS patch"),
        or a DN matching a production DN (a regular expression search, as there)."""
        if identity.production_override:
            return True
        patterns = _LEGACY_PRODUCTION_FQANS + (_VOMS_PATCH if voms_patch else ())
        if _fqan_matches(identity.fqans, patterns):
            return True
        dn = identity.dn
        return dn is not None and any(re.search(production, dn) for production in self.production_dns)


_V1_PRODUCTION_FQANS = ("/atlas/usatlas/Role=production", "/atlas/Role=production", "^/[^/]+/Role=production")
_LEGACY_PRODUCTION_FQANS = (
    "/atlas/usatlas/Role=production",
    "/atlas/usatlas/Role=pilot",
    "/atlas/Role=production",
    "/atlas/Role=pilot",
    "/osg/Role=pilot",
    "^/[^/]+/Role=production$",
    "/ams/Role=pilot",
    "/Engage/LBNE/Role=pilot",
)
#: The server's default "VOMS patch": any FQAN of these VOs counts.
_VOMS_PATCH = (
    "/atlas/",
    "/osg/",
    "/cms/",
    "/ams/",
    "/Engage/LBNE/",
)


def _fqan_matches(fqans: Iterable[str], patterns: Iterable[str]) -> bool:
    """The servers test each pattern both as a prefix and as a regular expression."""
    patterns = tuple(patterns)
    return any(fqan.startswith(p) or re.search(p, fqan) for fqan in fqans for p in patterns)


def _split_origin(origin: str) -> tuple[str, str | None]:
    """``atlas``, ``atlas:production`` or ``atlas.production`` -> (vo, role)."""
    if ":" in origin:
        vo, role = origin.split(":", 1)
        return vo, role or None
    if "." in origin:
        vo, role = origin.rsplit(".", 1)
        return vo, role or None
    return origin, None


def clean_user_id(dn: str) -> str:
    """The compact user name PanDA stores as ``prodUserName`` (``testpilot`` for our DN)."""
    name = re.sub("/(DC|O|OU|C|L)=[^/]+", "", dn)
    name = re.sub("/CN=[0-9]+", "", name)
    for proxy in ("/CN=proxy", "/CN=limited proxy", "limited proxy"):
        name = name.replace(proxy, "")
    name = re.sub("/CN=(Robot|nickname):[^/]+", "", name)
    match = re.match(".*/CN=([^/]+)/CN=([^/]+)", name)
    name = match.group(2) if match else name.replace("/CN=", "")
    cut = name.lower().find("/email")
    if cut > 0:
        name = name[:cut]
    return name.strip()
