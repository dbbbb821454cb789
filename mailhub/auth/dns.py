"""
DNS for the authentication checks and DKIM: every query through
twisted.names, with a deadline, cached for the answer's TTL.

Owns: L{AuthDNS} -- TXT, A, AAAA, MX and PTR lookups through the resolver
mailhub already uses (C{relay.dns_servers}, or /etc/resolv.conf and
/etc/hosts: L{make_resolver}), a deadline per query, a bounded cache keyed
by name and type (positive answers for their smallest TTL, "no such
name/no data" for L{NEGATIVE_TTL}; temporary failures are never cached),
and the one bridge the synchronous libraries use: L{AuthDNS.blocking},
called from a worker thread, waits for the reactor to do the query (the
reactor thread itself never waits).  A temporary failure (timeout,
SERVFAIL, refused) is L{DNSTempError}; a name that does not exist or has no
records of the type asked is an empty answer.

Must not touch: the SPF, DKIM and DMARC logic (this only answers queries),
the relay's resolver state (it shares the servers, not the cache), files.
"""

from __future__ import annotations

import socket
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, threads
from twisted.names import cache, dns, resolve
from twisted.names import client as dnsclient
from twisted.names import error as dnserror
from twisted.names import hosts as hostsmodule

__all__ = ["AuthDNS", "DNSTempError", "make_resolver", "NEGATIVE_TTL", "MAX_CACHE", "Answer"]

#: Seconds a "no such name" or "no data" answer is kept.
NEGATIVE_TTL = 60
#: Most (name, type) answers kept in the cache; the oldest go first.
MAX_CACHE = 10000
#: Longest TTL honoured (a record saying a week is asked again after a day).
MAX_TTL = 86400
#: Most records of one answer kept (a hostile zone cannot fill memory).
MAX_RECORDS = 100

_TYPES = {"TXT": dns.TXT, "A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR, "SPF": dns.SPF}

#: One answer: (owner name, record type name, value) per record, CNAMEs included
#: (value: TXT a list of bytes strings, A/AAAA an address, MX (preference, host),
#: PTR/CNAME a host name).
Answer = list[tuple[str, str, Any]]


class DNSTempError(Exception):
    """The query could not be answered now (timeout, SERVFAIL, refused): try again later."""


def make_resolver(reactor: Any, dns_servers: Sequence[tuple[str, int]] | None) -> Any:
    """
    The twisted.names resolver of the configured servers, or of the
    system's (/etc/hosts, then /etc/resolv.conf), as the relay builds it.
    """
    if dns_servers:
        return resolve.ResolverChain([dnsclient.Resolver(servers=list(dns_servers), reactor=reactor)])
    return resolve.ResolverChain(
        [
            hostsmodule.Resolver(b"/etc/hosts"),
            cache.CacheResolver(reactor=reactor),
            dnsclient.Resolver(resolv="/etc/resolv.conf", reactor=reactor),
        ]
    )


def _name(value: Any) -> str:
    return str(value).lower().rstrip(".")


class AuthDNS:
    """
    Cached DNS lookups with a deadline.

    @param reactor: the reactor (time for the cache and the deadline; the
        thread the blocking bridge waits on).
    @param resolver: a twisted.names resolver (L{make_resolver}, or a zone in tests).
    @param timeout: seconds one query may take before it is a L{DNSTempError}.
    """

    def __init__(self, reactor: Any, resolver: Any, timeout: float = 10.0, max_cache: int = MAX_CACHE) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.timeout = timeout
        self.max_cache = max_cache
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        #: queries sent to the resolver (not answered from the cache)
        self.queries = 0
        self._reactor_thread = threading.get_ident()

    def lookup(self, name: str, rtype: str) -> defer.Deferred[Answer]:
        """The records of C{rtype} (a name in L{_TYPES}) for C{name}; [] when there are none."""
        return defer.Deferred.fromCoroutine(self._lookup(name, rtype))

    async def _lookup(self, name: str, rtype: str) -> Answer:
        key = (_name(name), rtype)
        now = self.reactor.seconds()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[key]
        if not key[0] or len(key[0]) > 253:
            return []
        try:
            qname = key[0].encode("ascii") if key[0].isascii() else key[0].encode("idna")
        except UnicodeError:
            return []  # not a name DNS can hold: nothing there
        self.queries += 1
        query = self.resolver.query(dns.Query(qname, _TYPES[rtype]), timeout=(self.timeout,))
        query.addTimeout(self.timeout, self.reactor)
        try:
            answers, _auth, _add = await query
        except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
            return self._store(key, [], NEGATIVE_TTL)
        except dnserror.DNSNotImplementedError as e:
            raise DNSTempError(f"{key[0]}: not implemented") from e
        except defer.TimeoutError as e:
            raise DNSTempError(f"{key[0]}: timeout") from e
        except dnserror.DNSQueryTimeoutError as e:
            raise DNSTempError(f"{key[0]}: timeout") from e
        except dnserror.DomainError:  # DNSServerError, DNSQueryRefusedError, DNSFormatError...
            raise DNSTempError(f"{key[0]}: server failure") from None
        except Exception as e:
            raise DNSTempError(f"{key[0]}: {type(e).__name__}") from e
        out: Answer = []
        ttl = MAX_TTL
        for rr in answers[:MAX_RECORDS]:
            value = _value(rr)
            if value is None:
                continue
            out.append((_name(rr.name), value[0], value[1]))
            ttl = min(ttl, max(0, int(rr.ttl or 0)))
        return self._store(key, out, ttl if out else NEGATIVE_TTL)

    def _store(self, key: tuple[str, str], answer: Answer, ttl: int) -> Answer:
        if ttl > 0:
            self._cache[key] = (self.reactor.seconds() + ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cache:
                self._cache.popitem(last=False)
        return answer

    async def txt(self, name: str) -> list[bytes]:
        """The TXT records of C{name} itself (CNAMEs followed by the server), each joined."""
        got = await self._lookup(name, "TXT")
        return [b"".join(v) for _owner, kind, v in got if kind == "TXT"]

    def blocking(self, name: str, rtype: str) -> Answer:
        """
        L{lookup} for code running in a worker thread: waits for the
        reactor to answer.  Never call it in the reactor thread.
        """
        if threading.get_ident() == self._reactor_thread:
            raise RuntimeError("AuthDNS.blocking called in the reactor thread")
        return threads.blockingCallFromThread(self.reactor, self.lookup, name, rtype)


def _value(rr: Any) -> tuple[str, Any] | None:
    p = rr.payload
    if rr.type in (dns.TXT, dns.SPF):
        return ("TXT" if rr.type == dns.TXT else "SPF", [bytes(s) for s in p.data])
    if rr.type == dns.A:
        return ("A", p.dottedQuad())
    if rr.type == dns.AAAA:
        return ("AAAA", socket.inet_ntop(socket.AF_INET6, p.address))
    if rr.type == dns.MX:
        return ("MX", (int(p.preference), _name(p.name)))
    if rr.type == dns.PTR:
        return ("PTR", _name(p.name))
    if rr.type == dns.CNAME:
        return ("CNAME", _name(p.name))
    return None
