"""
DANE for SMTP (RFC 7672): TLSA records of MX hosts, looked up through the
configured DNS resolvers with the AD bit, and a peer's certificate chain
matched against them.

Owns: L{ValidatingResolver} (twisted.names queries that ask for the AD bit
and hand back the whole response: its answers and whether the resolver
says it validated them), L{TLSA} (the record, parsed from the raw rdata:
twisted.names has no TLSA class), L{DaneLookup} (is a domain's MX RRset
DNSSEC-secure, are an MX host's addresses, the usable TLSA records of
C{_PORT._tcp.HOST}) and
L{tlsa_match} (DANE-EE 3 0 x / 3 1 x and DANE-TA 2 x x).

The AD bit is believed only from a resolver on this host (loopback), as
Postfix requires (C{smtp_dns_support_level = dnssec} with a local
validating resolver): from anywhere else the bit can be forged on the way.

Must not touch: the decision which policy applies to a domain
(L{mailhub.relay.tlspolicy}), connections and the SMTP conversation
(L{mailhub.relay.client}, L{mailhub.relay.tls}), MX order and addresses
(L{mailhub.relay.mx}).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client as dnsclient
from twisted.names import dns

__all__ = [
    "TLSA_TYPE", "TLSA", "ValidatingResolver", "DaneLookup", "DaneAnswer", "tlsa_match", "DNSFailure",
    "resolv_conf_servers",
]

log = Logger()

#: The TLSA RR type (RFC 6698).
TLSA_TYPE = 52
#: TLSA records used per host at most (a hostile zone cannot make us hash without end).
MAX_TLSA = 16
#: Longest association data accepted (a SHA-512 digest is 64 octets, a certificate a few KB).
MAX_TLSA_DATA = 8192

_HASHES = {1: hashlib.sha256, 2: hashlib.sha512}


class DNSFailure(Exception):
    """A validating lookup that did not answer (SERVFAIL, timeout): nothing can be concluded."""


@dataclass(frozen=True)
class TLSA:
    """One TLSA record: usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def parse(cls, rdata: bytes) -> TLSA:
        """
        From the wire rdata (RFC 6698 2.1).

        @raise ValueError: shorter than four octets or too long.
        """
        if len(rdata) < 4 or len(rdata) > 3 + MAX_TLSA_DATA:
            raise ValueError("malformed TLSA record")
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @property
    def usable(self) -> bool:
        """
        Usable for SMTP (RFC 7672 3.1.3): DANE-TA(2) or DANE-EE(3), selector
        0 or 1, matching type 0, 1 or 2 with data of the digest's length.
        PKIX-TA(0) and PKIX-EE(1) are not.
        """
        if self.usage not in (2, 3) or self.selector not in (0, 1) or self.mtype not in (0, 1, 2):
            return False
        if self.mtype in _HASHES:
            return len(self.data) == _HASHES[self.mtype]().digest_size
        return len(self.data) > 0

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _matches(cert: x509.Certificate, rec: TLSA) -> bool:
    data = _selected(cert, rec.selector)
    if rec.mtype in _HASHES:
        data = _HASHES[rec.mtype](data).digest()
    return data == rec.data


def tlsa_match(
    chain: Sequence[x509.Certificate], records: Sequence[TLSA], hostnames: Sequence[str], now: datetime.datetime
) -> str | None:
    """
    Whether the chain a server presented (leaf first) matches its TLSA
    records; the matching record as text, or None.

    DANE-EE (3 x x): the leaf's certificate or public key matches; no name,
    chain or expiry checks (RFC 7672 3.1.1).  DANE-TA (2 x x): a
    certificate of the chain matches, and the leaf chains up to it and is
    valid for one of C{hostnames} at C{now} (RFC 7672 3.1.2, 3.2.2).
    """
    if not chain:
        return None
    leaf = chain[0]
    for rec in records:
        if rec.usage == 3 and _matches(leaf, rec):
            return str(rec)
    for rec in records:
        if rec.usage != 2:
            continue
        for anchor in chain:
            if not _matches(anchor, rec):
                continue
            for name in hostnames:
                try:
                    verifier = (
                        verification.PolicyBuilder()
                        .store(verification.Store([anchor]))
                        .time(now)
                        .build_server_verifier(x509.DNSName(name))
                    )
                    verifier.verify(leaf, [c for c in chain[1:] if c is not anchor])
                except (verification.VerificationError, ValueError):
                    continue
                return str(rec)
    return None


# -- queries with the AD bit ---------------------------------------------------------------


class _ADDatagram(dns.DNSDatagramProtocol):
    def writeMessage(self, message: dns.Message, address: tuple[str, int]) -> None:
        message.authenticData = 1  # RFC 6840 5.7: ask for the AD bit
        super().writeMessage(message, address)


class _ADStream(dns.DNSProtocol):
    def writeMessage(self, message: dns.Message) -> None:
        message.authenticData = 1
        super().writeMessage(message)


class _ADFactory(dnsclient.DNSClientFactory):
    protocol = _ADStream

    def buildProtocol(self, addr: Any) -> _ADStream:
        p = _ADStream(self.controller, reactor=self.controller._reactor)
        p.factory = self
        return p


class ValidatingResolver(dnsclient.Resolver):
    """
    A twisted.names client resolver (the same servers as the relay's) whose
    queries set the AD bit and whose L{message} hands back the whole
    response, so the caller sees whether it was validated.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factory = _ADFactory(self, self.timeout[0] if self.timeout else 10)  # type: ignore[assignment]

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        proto = _ADDatagram(self, reactor=self._reactor)
        self._reactor.listenUDP(0, proto, interface=interface)
        return proto

    def trusted(self) -> bool:
        """Every server is on this host: its AD bit can be believed."""
        servers: list[tuple[str, int]] = list(self.servers or []) + list(self.dynServers or [])
        try:
            return bool(servers) and all(ipaddress.ip_address(h).is_loopback for h, _p in servers)
        except ValueError:
            return False

    async def message(self, name: str, rtype: int) -> dns.Message:
        """The response to one query (over TCP when the UDP answer was truncated)."""
        query = [dns.Query(name.encode("idna"), rtype, dns.IN)]
        m = await self.queryUDP(query)
        if m.trunc:
            m = await self.queryTCP(query)
        return m


def resolv_conf_servers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """
    The C{nameserver} lines of C{path}, read once (the validating resolver
    starts no re-read timer); [] when it cannot be read.
    """
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        servers.append((ipaddress.ip_address(words[1].split("%")[0]).compressed, 53))
                    except ValueError:
                        continue
    except OSError:
        return []
    return servers


@dataclass(frozen=True)
class DaneAnswer:
    """What DNS said about one host's TLSA records."""

    secure: bool  # the answer (or the denial) was validated
    records: tuple[TLSA, ...]  # the usable ones

    @property
    def usable(self) -> bool:
        return self.secure and bool(self.records)


class DaneLookup:
    """
    The DNSSEC side of DANE: whether an MX RRset is secure, and the TLSA
    records of an MX host, through a L{ValidatingResolver}.
    """

    def __init__(self, resolver: ValidatingResolver | Callable[[], ValidatingResolver]) -> None:
        self._resolver = resolver if isinstance(resolver, ValidatingResolver) else None
        self._factory = None if isinstance(resolver, ValidatingResolver) else resolver

    def resolver(self) -> ValidatingResolver:
        """The resolver, made on first use (so a configuration that is only checked starts no timer)."""
        if self._resolver is None:
            assert self._factory is not None
            self._resolver = self._factory()
        return self._resolver

    @property
    def trusted(self) -> bool:
        """The AD bit of the resolvers can be believed (they are on this host)."""
        return self.resolver().trusted()

    async def _ask(self, name: str, rtype: int) -> tuple[list[Any], bool]:
        try:
            m = await self.resolver().message(name, rtype)
        except (defer.TimeoutError, dns.DNSQueryTimeoutError) as e:
            raise DNSFailure(f"{name}: timed out") from e
        except Exception as e:
            raise DNSFailure(f"{name}: {e or type(e).__name__}") from e
        if m.rCode not in (dns.OK, dns.ENAME):
            raise DNSFailure(f"{name}: rcode {m.rCode}")
        secure = bool(m.authenticData) and self.trusted
        owner = name.lower().rstrip(".")
        return [rr.payload for rr in m.answers if rr.type == rtype and str(rr.name).lower().rstrip(".") == owner], secure

    async def mx_secure(self, domain: str) -> bool:
        """The MX RRset of C{domain} (or its denial) validated."""
        _records, secure = await self._ask(domain, dns.MX)
        return secure

    async def host_secure(self, host: str) -> bool:
        """
        The address records of MX host C{host} validated: only then are its
        TLSA records looked up (RFC 7672 2.2.2).  A failed lookup counts as
        insecure (the connection itself uses the relay's resolver).
        """
        try:
            _records, secure = await self._ask(host, dns.A)
        except DNSFailure:
            return False
        return secure

    async def tlsa(self, host: str, port: int) -> DaneAnswer:
        """
        The usable TLSA records of C{_PORT._tcp.HOST}.

        @raise DNSFailure: the lookup failed; for a secure MX host that
            means this host must not be used (RFC 7672 2.2).
        """
        name = f"_{port}._tcp.{host}"
        payloads, secure = await self._ask(name, TLSA_TYPE)
        records: list[TLSA] = []
        for p in payloads[:MAX_TLSA]:
            raw = getattr(p, "data", None)
            if not isinstance(raw, bytes):
                continue
            try:
                rec = TLSA.parse(raw)
            except ValueError:
                continue
            if rec.usable:
                records.append(rec)
        return DaneAnswer(secure, tuple(records))
