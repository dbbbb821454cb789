"""
Server-side TLS: the certificate and key the listeners present, reloadable.

Owns: reading the PEM certificate (chain) and private key named by
C{server.tls_cert} / C{server.tls_key}, building the OpenSSL server context
(TLS 1.2 minimum), swapping it on SIGHUP without touching the listeners,
wrapping an endpoint in implicit TLS (C{server.smtps}), and writing a
self-signed certificate for C{mailhub make-cert}.

Must not touch: the SMTP protocol (smtpd.py calls C{transport.startTLS(
server_tls.options())} after its own 220 reply), configuration files, and
any private key but the one it is asked to read or write.

Design: one L{ServerTLS} object per process is handed to every listener and
to every STARTTLS.  It I{is} the L{IOpenSSLServerConnectionCreator}: each new
handshake asks it for a connection, and it builds that connection from the
I{current} L{CertificateOptions}.  L{ServerTLS.reload} replaces only that
reference, so new handshakes get the new certificate, sessions already
established keep theirs, and no listener is stopped or re-created.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorCore,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

__all__ = [
    "ServerTLS",
    "load_certificate_options",
    "certificate_options",
    "install_sighup_reload",
    "implicit_tls_endpoint",
    "make_self_signed",
    "MINIMUM_TLS_VERSION",
]

log = Logger()

#: RFC 8996 deprecates TLS 1.0 and 1.1; RFC 8314 asks submission servers for 1.2+.
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read TLS {what}: {e.strerror or e}") from e


def load_certificate_options(cert_path: str, key_path: str) -> tuple[CertificateOptions, x509.Certificate]:
    """
    Read a PEM certificate file (leaf first, then any intermediates, as in
    a Let's Encrypt C{fullchain.pem}) and a PEM private key, check that they
    belong together, and build server options with TLS 1.2 as the minimum.

    @return: the options and the leaf certificate (for logging its serial
        and expiry).
    @raise ValueError: naming the file at fault, for a missing or unreadable
        file, a file without a PEM certificate/key, an encrypted key, or a
        key that does not match the certificate.
    """
    return certificate_options(_read(cert_path, "certificate"), _read(key_path, "private key"), cert_path, key_path)


def certificate_options(
    cert_pem: bytes, key_pem: bytes, cert_path: str = "certificate", key_path: str = "private key"
) -> tuple[CertificateOptions, x509.Certificate]:
    """
    L{load_certificate_options} from the files' bytes: the acceptor
    processes (L{mailhub.daemon.acceptor}) get them from the main process,
    which read them before it gave up root.  C{cert_path} and C{key_path}
    only name the files in errors.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise ValueError(f"{cert_path}: not a PEM certificate file: {e}") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as e:  # encrypted key, no password
        raise ValueError(f"{key_path}: private key is encrypted; mailhub needs an unencrypted key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"{key_path}: not a PEM private key: {e}") from e
    leaf, *intermediates = chain
    try:
        options = CertificateOptions(
            # pyOpenSSL >= 24.3 takes cryptography objects (and deprecates
            # its own X509/PKey); CertificateOptions only hands them on.
            privateKey=key,  # type: ignore[arg-type]
            certificate=leaf,  # type: ignore[arg-type]
            extraCertChain=list(intermediates),  # type: ignore[arg-type]
            raiseMinimumTo=MINIMUM_TLS_VERSION,
        )
        # Build the context now: this is where OpenSSL checks the key
        # against the certificate, so a mismatch is reported here and not at
        # the first client's handshake.
        options.getContext()
    except (SSL.Error, ValueError, TypeError) as e:
        raise ValueError(
            f"{key_path}: private key does not match certificate {cert_path} "
            f"or is unusable: {e}"
        ) from e
    return options, leaf


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The server's TLS configuration, reloadable in place.

    Pass the object itself (or L{options}, which returns it) wherever Twisted
    wants server TLS options: C{transport.startTLS(server_tls.options())},
    L{endpoints.wrapServerTLS}, L{twisted.protocols.tls.TLSMemoryBIOFactory}.

    @ivar cert_path: the PEM certificate (chain) file.
    @ivar key_path: the PEM private key file.
    @ivar certificate: the leaf certificate currently served
        (L{cryptography.x509.Certificate}).
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        """
        @raise ValueError: naming the file, if the certificate or key cannot
            be used.  A daemon must not start without its certificate.
        """
        self.cert_path = cert_path
        self.key_path = key_path
        self.pem = (_read(cert_path, "certificate"), _read(key_path, "private key"))
        self._options, self.certificate = certificate_options(*self.pem, cert_path, key_path)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, cert_path: str = "", key_path: str = "") -> ServerTLS:
        """
        A L{ServerTLS} from the bytes of the files (an acceptor process:
        the main process read them, perhaps as root).  Its L{reload} reads
        nothing: L{use_pem} takes the new bytes.

        @raise ValueError: as L{certificate_options}.
        """
        self = cls.__new__(cls)
        self.cert_path, self.key_path = cert_path, key_path
        self.pem = (cert_pem, key_pem)
        self._options, self.certificate = certificate_options(cert_pem, key_pem, cert_path, key_path)
        return self

    def use_pem(self, cert_pem: bytes, key_pem: bytes) -> bool:
        """New handshakes use this certificate and key (bytes); False (and logged) when they do not load."""
        try:
            options, leaf = certificate_options(cert_pem, key_pem, self.cert_path, self.key_path)
        except ValueError as e:
            log.error("TLS certificate not replaced: {reason}", reason=str(e))
            return False
        self.pem = (cert_pem, key_pem)
        self._options, self.certificate = options, leaf
        return True

    def options(self) -> ServerTLS:
        """
        The object to give to C{startTLS} and to TLS listeners.  It is this
        object, so that a later L{reload} reaches every listener.
        """
        return self

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        L{IOpenSSLServerConnectionCreator}: a connection from the current
        context; called once per handshake.
        """
        return SSL.Connection(self._options.getContext(), None)

    def getContext(self) -> SSL.Context:
        """L{IOpenSSLContextFactory}, for APIs that still want a context."""
        return self._options.getContext()

    def reload(self) -> bool:
        """
        Re-read the certificate and key files.  On success new handshakes
        use them; on failure the old certificate stays in service and the
        reason is logged.

        @return: whether the new files were loaded.
        """
        try:
            pem = (_read(self.cert_path, "certificate"), _read(self.key_path, "private key"))
            options, leaf = certificate_options(*pem, self.cert_path, self.key_path)
        except ValueError as e:
            log.error(
                "TLS reload failed, keeping certificate serial {serial:x}: {reason}",
                serial=self.certificate.serial_number,
                reason=str(e),
            )
            return False
        self.pem = pem
        self._options, self.certificate = options, leaf
        log.info(
            "TLS certificate reloaded from {cert_path}: serial {serial:x}, expires {expires}",
            cert_path=self.cert_path,
            serial=leaf.serial_number,
            expires=leaf.not_valid_after_utc.isoformat(),
        )
        return True


def install_sighup_reload(
    server_tls: ServerTLS,
    reactor: IReactorCore,
    also: Callable[[], Any] | None = None,
) -> Callable[[], None]:
    """
    Reload C{server_tls} (then call C{also}, if given) when the process gets
    SIGHUP, the way certbot/acme deploy hooks expect (C{kill -HUP}).

    The signal handler only schedules the work with C{reactor.callFromThread},
    which is safe from a signal handler and wakes the reactor; the files are
    read in the reactor thread.  Must be called from the main thread (as
    C{makeService} is).

    @return: a function that restores the previous SIGHUP handler.
    """

    def reload() -> None:
        server_tls.reload()
        if also is not None:
            also()

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)  # type: ignore[attr-defined]

    previous = signal.signal(signal.SIGHUP, handler)

    def uninstall() -> None:
        signal.signal(signal.SIGHUP, previous)

    return uninstall


def implicit_tls_endpoint(
    reactor: Any,
    endpoint_string: str,
    server_tls: ServerTLS,
    beneath: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
) -> IStreamServerEndpoint:
    """
    A server endpoint for implicit TLS (RFC 8314 "submissions", port 465):
    the plain endpoint described by C{endpoint_string} (C{"tcp:465"},
    C{"tcp6:465:interface=\\:\\:1"}, C{"unix:/run/x"}) with a TLS layer that
    uses C{server_tls}'s current certificate for every handshake.

    @param beneath: wraps the TLS layer's factory, for what comes in clear
        before the handshake (a PROXY header: L{mailhub.smtp.proxytls}).

    @raise ValueError: for an C{ssl:} endpoint string, which would carry
        its own, non-reloadable certificate (or TLS twice).
    """
    if endpoint_string.split(":", 1)[0].strip().lower() in ("ssl", "tls", "le", "lets"):
        raise ValueError(
            f"{endpoint_string!r}: give a plain endpoint (tcp:PORT...); "
            "mailhub adds TLS with server.tls_cert / server.tls_key"
        )
    plain = endpoints.serverFromString(reactor, endpoint_string)
    if beneath is None:
        return endpoints.wrapServerTLS(server_tls, plain)
    return _WrappedEndpoint(plain, lambda factory: beneath(TLSMemoryBIOFactory(server_tls, False, factory)))


@implementer(IStreamServerEndpoint)
class _WrappedEndpoint:
    """A server endpoint whose factory is wrapped before the plain endpoint listens with it."""

    def __init__(self, plain: IStreamServerEndpoint, wrap: Callable[[IProtocolFactory], IProtocolFactory]) -> None:
        self._plain = plain
        self._wrap = wrap

    def listen(self, factory: IProtocolFactory) -> Any:
        return self._plain.listen(self._wrap(factory))


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_self_signed(hostname: str, cert_path: str, key_path: str, days: int = 365) -> None:
    """
    Write a self-signed certificate for C{hostname} (in the subject CN and
    as the subjectAltName, an IP address SAN if it is an IP literal) and its
    private key (ECDSA P-256, file mode 0600).  Both files are written
    atomically; existing files are replaced.

    Good for tests and private setups where clients pin the certificate;
    public servers should use a certificate from a CA (ACME).

    @raise ValueError: for an empty hostname or C{days} < 1.
    @raise OSError: if a file cannot be written.
    """
    if not hostname or days < 1:
        raise ValueError("make_self_signed needs a hostname and days >= 1")
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a certificate whose key is missing is worse than the reverse.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
