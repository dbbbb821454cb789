"""
A DNS zone in memory (not a test file): record constructors and L{Zone},
a real twisted.names authority serving a dict.  The unit tests of
mailhub.relay.agent use it as the resolver, the end-to-end relay tests serve it
with a real twisted.names DNS server on 127.0.0.1.  Holds no assertions.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.names import authority, dns, server
from twisted.names import error as dnserror

__all__ = ["MX", "A", "AAAA", "CNAME", "TXT", "TLSA", "Zone", "ValidatingServerFactory"]


def MX(pref: int, host: str) -> dns.Record_MX:
    return dns.Record_MX(pref, host.encode(), ttl=60)


def A(ip: str) -> dns.Record_A:
    return dns.Record_A(ip, ttl=60)


def AAAA(ip: str) -> dns.Record_AAAA:
    return dns.Record_AAAA(ip, ttl=60)


def CNAME(host: str) -> dns.Record_CNAME:
    return dns.Record_CNAME(host.encode(), ttl=60)


def TXT(*strings: str) -> dns.Record_TXT:
    return dns.Record_TXT(*[x.encode() for x in strings], ttl=60)


class Record_TLSA(dns.UnknownRecord):
    """A TLSA record (RFC 6698) as twisted.names serves an unknown type: its raw rdata."""

    TYPE = 52
    fancybasename = "TLSA"


def TLSA(usage: int, selector: int, mtype: int, data: bytes) -> Record_TLSA:
    return Record_TLSA(bytes([usage, selector, mtype]) + data, ttl=60)


class ValidatingServerFactory(server.DNSServerFactory):
    """
    A DNS server that plays a validating resolver: answers about names in
    (or under) C{secure} carry the AD bit, as a DNSSEC-validating resolver
    sets it on data it validated -- only to a query that asked for it with
    the AD bit (RFC 6840 5.7), as unbound and BIND do.
    """

    def __init__(self, authorities: list[Any], secure: tuple[str, ...] = ()) -> None:
        super().__init__(authorities=authorities)
        self.secure = {s.lower() for s in secure}
        self._asked_ad: dict[int, bool] = {}

    def messageReceived(self, message: dns.Message, proto: Any, address: Any = None) -> None:
        if len(self._asked_ad) > 1000:
            self._asked_ad.clear()
        self._asked_ad[message.id] = bool(message.authenticData)
        super().messageReceived(message, proto, address)

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        if message.queries and self._asked_ad.pop(message.id, False):
            name = message.queries[0].name.name.decode().lower()
            if any(name == s or name.endswith("." + s) for s in self.secure):
                message.authenticData = 1
        super().sendReply(protocol, message, address)


class Zone(authority.FileAuthority):
    """
    An authoritative zone from a dict {name: [records]}.  Names in
    C{servfail} fail with C{failure()} (SERVFAIL: a DNSServerError for a
    resolver used directly; the e2e server turns any non-DomainError into
    an ESERVER reply).
    """

    def __init__(self, origin: str, records: dict[str, list[Any]], servfail: tuple[str, ...] = (),
                 failure: type[Exception] = dnserror.DNSServerError) -> None:
        self._origin = origin
        self._source = records
        self._servfail = {n.lower().encode() for n in servfail}
        self._failure = failure
        self.queries: list[tuple[str, int]] = []
        super().__init__(None)

    def loadFile(self, filename: Any) -> None:
        origin = self._origin.encode()
        soa = dns.Record_SOA(mname=b"ns." + origin, rname=b"root." + origin, serial=1,
                             refresh=60, retry=60, expire=60, minimum=60, ttl=60)
        self.soa = (origin, soa)
        self.records = {origin: [soa]}
        for name, recs in self._source.items():
            self.records.setdefault(name.lower().encode(), []).extend(recs)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> defer.Deferred:
        self.queries.append((name.decode().lower(), type))
        if name.lower() in self._servfail:
            return defer.fail(self._failure(name))
        return super()._lookup(name, cls, type, timeout)
