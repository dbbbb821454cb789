"""
The TLS and connection-failure side of the outbound SMTP client: verifying
a next hop's certificate and saying in words why a connection or a TLS
handshake failed.

Owns: L{client_creator} (the TLS context for STARTTLS at a given
security level), L{VerifyingCreator} (client TLS connections that check the chain
and the name, RFC 6125 through service_identity, and remember OpenSSL's
X.509 verification error), L{ObservingCreator} (connections that only
record what a verification would say, for opportunistic TLS, DANE and
MTA-STS testing), L{trust_from_file}, L{tls_failure_text} and L{connect_reason}
(Postfix-style texts: "connect to HOST[IP]:PORT: Connection refused",
"TLS: certificate of mx.example has expired").

Must not touch: the SMTP conversation (L{mailhub.relay.client}), routing,
retry decisions, configuration files.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import idna
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    DNSMismatch,
    IPAddress_ID,
    IPAddressMismatch,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet import error, ssl
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "VerifyingCreator", "ObservingCreator", "client_creator", "connect_reason", "tls_failure_text", "trust_from_file",
]


#: OpenSSL X.509 verification errors (X509_V_ERR_*) as OpenSSL words them.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    26: "unsupported certificate purpose",
}
_X509_NOT_YET_VALID, _X509_EXPIRED = 9, 10


def _identity(hostname: str) -> tuple[list[Any], bytes | None]:
    """The service identities a peer named C{hostname} must prove, and the SNI to send (none for an address)."""
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        return [DNS_ID(hostname)], idna.encode(hostname, uts46=True)
    return [IPAddress_ID(str(ip))], None


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingCreator:
    """
    Client TLS connections that verify the peer's chain against C{options}'
    trust roots and its name against C{hostname} (RFC 6125, through
    service_identity, as Twisted's C{optionsForClientTLS}), and record the
    first X.509 verification error OpenSSL reports, so that a failed
    handshake can say why ("certificate has expired") instead of OpenSSL's
    "certificate verify failed".
    """

    def __init__(self, options: Any, hostname: str, record: Callable[[int, int], None]) -> None:
        self._ctx = options.getContext()
        self._ids, self._sni = _identity(hostname)
        self._record = record
        self.connection: Any = None

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        conn = self.connection = SSL.Connection(self._ctx, None)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)
        ids, record = self._ids, self._record

        def verify(_conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if not ok:
                record(errno, depth)
                return False
            if depth != 0:
                return True
            try:
                verify_service_identity(extract_patterns(cert), ids, [])
            except (VerificationError, CertificateError):
                tls_protocol.failVerification(Failure())
                return False
            return True

        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return conn


@implementer(IOpenSSLClientConnectionCreator)
class ObservingCreator:
    """
    Client TLS connections that do not fail on the peer's certificate but
    remember what a verification would have said: for opportunistic TLS
    (the TLS version and cipher are read from L{connection}), for DANE
    (the chain is matched against TLSA records after the handshake) and for
    MTA-STS in testing mode (L{pkix_error}: None when the chain is trusted
    and names C{hostname}).

    @param options: C{CertificateOptions}; with trust roots when
        C{observe} is set.
    @param observe: check chain and name, without failing the handshake.
    """

    def __init__(self, options: Any, hostname: str, observe: bool) -> None:
        self._ctx = options.getContext()
        self._hostname = hostname
        self._ids, self._sni = _identity(hostname)
        self._observe = observe
        self.connection: Any = None
        self.pkix_error: str | None = None if observe else "not checked"

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        conn = self.connection = SSL.Connection(self._ctx, None)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)

        def verify(_conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if not ok and self.pkix_error is None:
                self.pkix_error = tls_failure_text(self._hostname, "", None, (errno, depth))
            elif ok and depth == 0 and self.pkix_error is None:
                try:
                    verify_service_identity(extract_patterns(cert), self._ids, [])
                except (VerificationError, CertificateError) as e:
                    self.pkix_error = tls_failure_text(self._hostname, "", e, None)
            return True

        conn.set_verify(SSL.VERIFY_PEER if self._observe else SSL.VERIFY_NONE, verify)
        return conn


def trust_from_file(ca_file: str) -> Any:
    """
    The trust roots in PEM file C{ca_file}.

    @raise OSError: it cannot be read.
    @raise ValueError: it holds no certificate.
    """
    with open(ca_file, "rb") as f:
        pem = f.read()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if not blocks:
        raise ValueError(f"no certificate in {ca_file}")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


def _ssl_reasons(err: BaseException) -> str:
    """OpenSSL's reason strings from an C{SSL.Error} ("wrong version number")."""
    out = []
    for item in (err.args[0] if err.args and isinstance(err.args[0], list) else []):
        if isinstance(item, tuple) and len(item) >= 3 and item[2]:
            out.append(str(item[2]))
    return "; ".join(out) or "unknown error"


def tls_failure_text(
    name: str, remote_mta: str, reason: BaseException | None, verify_error: tuple[int, int] | None
) -> str:
    """
    What went wrong in a TLS handshake with C{name}, in words: a name
    mismatch, an untrusted, expired or not yet valid certificate, or the
    handshake itself (OpenSSL's reason), or a connection lost during it.

    @param verify_error: the first (X509_V_ERR code, chain depth) OpenSSL
        reported while verifying the peer's chain, if any.
    """
    if isinstance(reason, VerificationError):
        ids = []
        for m in reason.errors:
            mid = getattr(m, "mismatched_id", None)
            if isinstance(m, IPAddressMismatch):
                ids.append(f"IP address {getattr(mid, 'ip', '?')}")
            elif isinstance(m, DNSMismatch):
                host = getattr(mid, "hostname", b"?")
                ids.append(f"DNS name {host.decode('ascii', 'replace') if isinstance(host, bytes) else host}")
            else:
                ids.append(type(m).__name__)
        return f"TLS: certificate of {name} does not match its name ({', '.join(ids)})"
    if isinstance(reason, CertificateError):
        return f"TLS: certificate of {name} names no host (no subjectAltName)"
    if verify_error is not None:
        errno, depth = verify_error
        if depth == 0 and errno == _X509_EXPIRED:
            return f"TLS: certificate of {name} has expired"
        if depth == 0 and errno == _X509_NOT_YET_VALID:
            return f"TLS: certificate of {name} is not yet valid"
        return f"TLS: certificate of {name} is not trusted ({_X509_ERRORS.get(errno, f'verification error {errno}')})"
    if isinstance(reason, SSL.Error):
        return f"TLS: handshake with {name} failed ({_ssl_reasons(reason)})"
    return f"lost connection with {remote_mta} while performing the TLS handshake"


def connect_reason(err: BaseException) -> str:
    """
    Postfix's words for a failed connect ("Connection refused", "Connection
    timed out", "No route to host"), not Twisted's "Connection was refused
    by other side: 111: Connection refused.".
    """
    if isinstance(err, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(err, (error.TCPTimedOutError, error.TimeoutError, TimeoutError, CancelledError,
                        ConnectingCancelledError)):
        return "Connection timed out"
    if isinstance(err, error.NoRouteError):
        return "No route to host"
    if isinstance(err, error.DNSLookupError):
        return "Host not found"
    if isinstance(err, error.ConnectError) and err.osError:
        return str(err.osError).rstrip(".")
    return str(err).rstrip(".") or type(err).__name__


def client_creator(
    verify: bool,
    ca_file: str | None,
    hostname: str,
    record_verify_error: Callable[[int, int], None],
    observe: bool = False,
) -> Any:
    """
    The connection creator for STARTTLS.  With C{verify} (level "verify"),
    a L{VerifyingCreator} checking C{hostname} against the certificates in
    C{ca_file} (the platform's trust store when None); otherwise an
    L{ObservingCreator}: encrypted, not authenticated (Postfix does not
    verify at "may" / "encrypt" either), with C{observe} recording what a
    verification would have said.  TLS 1.2 at least.

    @raise OSError: C{ca_file} cannot be read.
    @raise ValueError: C{ca_file} holds no certificate.
    """
    if verify or observe:
        trust = trust_from_file(ca_file) if ca_file else ssl.platformTrust()
        options = ssl.CertificateOptions(trustRoot=trust, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        if verify:
            return VerifyingCreator(options, hostname, record_verify_error)
        return ObservingCreator(options, hostname, True)
    return ObservingCreator(
        ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2), hostname, False
    )
