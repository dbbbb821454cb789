"""
TLS peers for the outbound TLS policy tests (not a test file): a test CA
issuing certificates (L{PKI}), an SMTP receiver that offers STARTTLS with
a given certificate or strips it (L{Receiver}), and a twisted.web HTTPS
server serving MTA-STS policies (L{PolicySite}).  Servers bind 127.0.0.1
only.  Holds no assertions.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

__all__ = ["PKI", "Receiver", "ReceiverFactory", "PolicySite", "spki_sha256", "cert_sha256"]

PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class PKI:
    """A test CA; L{issue} makes server certificates signed by it, L{self_signed} ones signed by nobody."""

    def __init__(self, directory: Any, name: str = "mailhub TLS policy test CA") -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = str(directory / "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(self.cert.public_bytes(PEM))

    def _leaf(self, names: list[str], issuer_key: Any, issuer: x509.Name, key: Any) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )

    def issue(self, *names: str) -> tuple[x509.Certificate, Any]:
        """A certificate for C{names} signed by the CA, and the server TLS options presenting it and the CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(list(names), self.key, self.cert.subject, key)
        return cert, _options(cert, key, [self.cert])

    @staticmethod
    def self_signed(*names: str) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(_name(names[0]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, _options(cert, key, [])

    def pem(self, cert: x509.Certificate) -> bytes:
        return cert.public_bytes(PEM)


def _options(cert: x509.Certificate, key: Any, chain: list[x509.Certificate]) -> Any:
    raw = cert.public_bytes(PEM) + key.private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    priv = ssl.PrivateCertificate.loadPEM(raw)
    return ssl.CertificateOptions(
        privateKey=priv.privateKey.original, certificate=priv.original,
        extraCertChain=[ssl.Certificate.loadPEM(c.public_bytes(PEM)).original for c in chain],
    )


def spki_sha256(cert: x509.Certificate) -> bytes:
    """TLSA 3 1 1 / 2 1 1 data of C{cert}."""
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def cert_sha256(cert: x509.Certificate) -> bytes:
    """TLSA 3 0 1 / 2 0 1 data of C{cert}."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


class Receiver(Protocol):
    """
    A small ESMTP receiver: STARTTLS offered with the factory's
    certificate, or not at all (the factory's C{tls_options} is None: a
    server whose STARTTLS an attacker stripped looks the same).  Records
    the commands, whether each message came over TLS, and the messages.
    """

    factory: ReceiverFactory

    def connectionMade(self) -> None:
        self.buf = b""
        self.data: bytes | None = None
        self.tls = False
        assert self.transport is not None
        self.transport.write(b"220 receiver.test ESMTP\r\n")

    def reply(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(text.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while True:
            if self.data is not None:
                self.data += self.buf
                self.buf = b""
                end = self.data.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.factory.messages.append((self.tls, self.data[2: end + 2]))
                self.buf = self.data[end + 5:]
                self.data = None
                self.reply("250 2.0.0 Ok: queued")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            self.buf = rest
            cmd = line.decode()
            self.factory.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                caps = ["receiver.test", "PIPELINING", "8BITMIME"]
                if self.factory.tls_options is not None and not self.tls:
                    caps.append("STARTTLS")
                self.transport.write(
                    b"".join(f"250{'-' if i < len(caps) - 1 else ' '}{c}\r\n".encode() for i, c in enumerate(caps)))
            elif verb == "STARTTLS" and self.factory.tls_options is not None:
                self.reply("220 2.0.0 Ready to start TLS")
                self.transport.startTLS(self.factory.tls_options)  # type: ignore[attr-defined]
                self.tls = True
            elif verb in ("MAIL", "RCPT", "RSET"):
                self.reply("250 2.0.0 Ok")
            elif verb == "DATA":
                self.data = b"\r\n"
                self.reply("354 End data with <CR><LF>.<CR><LF>")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                self.transport.loseConnection()
            else:
                self.reply("502 5.5.2 Error: command not recognized")


class ReceiverFactory(Factory):
    protocol = Receiver

    def __init__(self, tls_options: Any = None) -> None:
        self.tls_options = tls_options
        self.commands: list[str] = []
        self.messages: list[tuple[bool, bytes]] = []


class _Policy(resource.Resource):
    isLeaf = True

    def __init__(self, site: PolicySite) -> None:
        super().__init__()
        self.site = site

    def render_GET(self, request: Any) -> bytes:
        host = (request.getHeader(b"host") or b"").split(b":")[0].decode().lower()
        self.site.requests.append((host, request.path.decode()))
        entry = self.site.policies.get(host)
        if request.path != b"/.well-known/mta-sts.txt" or entry is None:
            request.setResponseCode(404)
            return b"not found"
        status, ctype, body = entry
        request.setResponseCode(status)
        if status in (301, 302):
            request.setHeader(b"location", b"https://elsewhere.test/.well-known/mta-sts.txt")
        request.setHeader(b"content-type", ctype.encode())
        return body


    def render_POST(self, request: Any) -> bytes:
        host = (request.getHeader(b"host") or b"").split(b":")[0].decode().lower()
        self.site.posts.append((host, request.path.decode(), (request.getHeader(b"content-type") or b"").decode(),
                                request.content.read()))
        return b"thanks"


class PolicySite:
    """
    The HTTPS side of MTA-STS: C{policies[host] = (status, content type, body)},
    served on C{/.well-known/mta-sts.txt}; C{requests} lists (host, path).
    A POST (a TLS report) is answered 200 and kept in C{posts}:
    (host, path, content type, body).
    """

    def __init__(self) -> None:
        self.policies: dict[str, tuple[int, str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.posts: list[tuple[str, str, str, bytes]] = []
        self.site = server.Site(_Policy(self))

    def set(self, domain: str, body: str, status: int = 200, ctype: str = "text/plain") -> None:
        self.policies[f"mta-sts.{domain}"] = (status, ctype, body.encode())
