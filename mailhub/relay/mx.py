"""
Where mail for a next hop goes: DNS resolution through twisted.names.

Owns: MX lookups (preference order, random among equals, RFC 7505 null
MX, implicit MX), A/AAAA lookups (IPv4 first), following CNAME chains
(within an answer and by asking again, at most L{MAX_CNAME_DEPTH}), the
list of addresses to try for a L{Destination} (at most C{max_addresses}),
and mail-loop detection (an MX host that is us, Postfix smtp_addr.c), with
the texts of the outcomes when nothing can be tried (L{HopFailure}).

Must not touch: connections (L{mailhub.relay.pool}), the SMTP
conversation (L{mailhub.relay.client}), retry decisions (the scheduler
decides what an outcome means), configuration files.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import cache, dns, resolve
from twisted.names import client as dnsclient
from twisted.names import error as dnserror
from twisted.names import hosts as hostsmodule
from twisted.python.failure import Failure

from mailhub.address import normalize_domain
from mailhub.envelope import PERMANENT, TEMPORARY, Outcome
from mailhub.relay.nexthop import Destination, _ip

__all__ = [
    "MAX_MX_HOSTS",
    "MAX_CNAME_DEPTH",
    "HopFailure",
    "NotFound",
    "DNSTemporary",
    "Target",
    "MXResolver",
]

log = Logger()

#: How many MX hosts are looked up at most (Postfix smtp_mx_address_limit is
#: about addresses; this bounds the DNS work for absurd MX sets).
MAX_MX_HOSTS = 10
#: CNAME chain length we follow before calling it a DNS failure.
MAX_CNAME_DEPTH = 8


class HopFailure(Exception):
    """
    Every recipient routed to one next hop gets this outcome (nothing can
    be resolved, a loop, no host reached).  C{code} is 0 unless a server
    replied with it; C{remote_mta} is the host connected to, if any.
    """

    def __init__(self, kind: str, code: int, status: str, text: str, remote_mta: str = "") -> None:
        super().__init__(text)
        self.kind, self.code, self.status, self.text, self.remote_mta = kind, code, status, text, remote_mta

    def outcome(self, recipient: str) -> Outcome:
        return Outcome(recipient, self.kind, self.code, self.status, self.text, self.remote_mta)


class NotFound(Exception):
    """NXDOMAIN, or no records of the type asked."""

    def __init__(self, name: str, nxdomain: bool) -> None:
        super().__init__(name)
        self.name, self.nxdomain = name, nxdomain


class DNSTemporary(Exception):
    """SERVFAIL, timeout, refused: try again later."""


_TEMPORARY_DNS = (
    dnserror.DNSServerError,
    dnserror.DNSQueryRefusedError,
    dnserror.DNSFormatError,
    dnserror.DNSNotImplementedError,
    dnserror.DNSUnknownError,
    dnserror.DNSQueryTimeoutError,
    defer.TimeoutError,
)


@dataclass(frozen=True)
class Target:
    """One address to connect to."""

    name: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}[{self.ip}]:{self.port}"


class MXResolver:
    """
    Finds the addresses to try for a next hop.

    @param reactor: given to the twisted.names resolvers it creates.
    @param dns_servers: C{(host, port)} pairs to ask instead of
        /etc/resolv.conf (and then /etc/hosts is not read).
    @param resolver: a twisted.names resolver to use as is (tests).
    @param random: C{shuffle}s MX hosts of equal preference (RFC 5321 5.1).
    @param local_addresses: our own addresses (loop detection).
    @param local_names: our own host names, normalised (loop detection).
    @param loopback_is_self: count loopback and unspecified addresses from
        DNS as ours.
    @param max_addresses: addresses returned per next hop at most.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        dns_servers: list[tuple[str, int]] | None,
        resolver: Any,
        random: Any,
        local_addresses: Sequence[str] = (),
        local_names: Sequence[str] = (),
        loopback_is_self: bool = True,
        max_addresses: int = 5,
    ) -> None:
        self._reactor = reactor
        self._dns_servers = dns_servers
        self._resolver = resolver
        self._random = random
        self._local_ips = {ipaddress.ip_address(a) for a in local_addresses}
        self._local_names = {normalize_domain(n) for n in local_names}
        self._loopback_is_self = loopback_is_self
        self._max_addresses = max_addresses

    def resolver(self) -> Any:
        """The twisted.names resolver in use, created on first use."""
        if self._resolver is None:
            if self._dns_servers:
                self._resolver = resolve.ResolverChain(
                    [
                        cache.CacheResolver(reactor=self._reactor),
                        dnsclient.Resolver(servers=self._dns_servers, reactor=self._reactor),
                    ]
                )
            else:
                self._resolver = resolve.ResolverChain(
                    [
                        hostsmodule.Resolver(b"/etc/hosts"),
                        cache.CacheResolver(reactor=self._reactor),
                        # a str path: Twisted logs it ("... changed, reparsing")
                        dnsclient.Resolver(resolv="/etc/resolv.conf", reactor=self._reactor),
                    ]
                )
        return self._resolver

    async def query(self, name: str, rtype: int) -> list[Any]:
        """
        Records of C{rtype} for C{name}, following CNAMEs (within the answer
        and by asking again for the canonical name).  [] is NODATA.

        @raise NotFound: NXDOMAIN.
        @raise DNSTemporary: anything else that went wrong.
        """
        lookup = {
            dns.MX: self.resolver().lookupMailExchange,
            dns.A: self.resolver().lookupAddress,
            dns.AAAA: self.resolver().lookupIPV6Address,
        }[rtype]
        current = name.lower().rstrip(".")
        seen = {current}
        for _ in range(MAX_CNAME_DEPTH):
            try:
                answers, _auth, _add = await lookup(current)
            except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
                raise NotFound(current, True)
            except _TEMPORARY_DNS as e:
                raise DNSTemporary(f"{type(e).__name__}")
            except dnserror.DomainError:
                raise NotFound(current, True)
            except Exception as e:
                raise DNSTemporary(str(e) or type(e).__name__)
            cnames = {}
            for rr in answers:
                if rr.type == dns.CNAME:
                    cnames[str(rr.name).lower().rstrip(".")] = str(rr.payload.name).lower().rstrip(".")
            moved = False
            while current in cnames:
                current = cnames[current]
                if current in seen:
                    raise DNSTemporary(f"CNAME loop at {current}")
                seen.add(current)
                moved = True
            records = [rr.payload for rr in answers if rr.type == rtype and str(rr.name).lower().rstrip(".") == current]
            if records or not moved:
                return records
            # The answer named a canonical name but held none of its records.
        raise DNSTemporary(f"CNAME chain too long for {name}")

    async def addresses(self, host: str) -> list[str]:
        """
        IPv4 then IPv6 addresses of C{host}.

        @raise NotFound: neither A nor AAAA exists.
        @raise DNSTemporary: no address, and at least one lookup failed softly.
        """
        literal = _ip(host)
        if literal is not None:
            return [literal.compressed]
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.query(host, dns.A)), defer.ensureDeferred(self.query(host, dns.AAAA))],
            consumeErrors=True,
        )
        out: list[str] = []
        temporary = None
        nxdomain = False
        for (ok, value), rtype in zip(results, (dns.A, dns.AAAA), strict=True):
            if ok:
                for rec in value:
                    if rtype == dns.A:
                        out.append(rec.dottedQuad())
                    else:
                        out.append(ipaddress.IPv6Address(rec.address).compressed)
                continue
            failure = cast(Failure, value)  # DeferredList: (False, Failure); Twisted types only the success value
            if failure.check(NotFound):
                nxdomain = nxdomain or failure.value.nxdomain
            elif failure.check(DNSTemporary):
                temporary = failure.value
            else:
                temporary = DNSTemporary(failure.getErrorMessage())
        if out:
            return out
        if temporary is not None:
            raise temporary
        raise NotFound(host, nxdomain)

    async def mx(self, domain: str) -> list[tuple[str, int]] | None:
        """
        MX (host name, preference) in the order to try (preference, random
        among equals); C{None} when there is no MX (implicit MX).

        @raise HopFailure: NXDOMAIN, null MX, DNS failure.
        """
        try:
            records = await self.query(domain, dns.MX)
        except NotFound:
            raise HopFailure(
                PERMANENT, 0, "5.1.2",
                f"Host or domain name not found. Name service error for name={domain} type=MX: Host not found",
            )
        except DNSTemporary as e:
            log.info("MX lookup for {domain} failed: {error}", domain=domain, error=str(e))
            raise HopFailure(
                TEMPORARY, 0, "4.4.3",
                f"Host or domain name not found. Name service error for name={domain} type=MX: "
                "Host not found, try again",
            )
        if not records:
            return None
        real = [r for r in records if str(r.name).rstrip(".") != ""]
        if not real:  # RFC 7505 null MX
            raise HopFailure(PERMANENT, 0, "5.1.10", f"Domain {domain} does not accept mail (null MX)")
        by_pref: dict[int, list[str]] = {}
        for r in real:
            name = str(r.name).lower().rstrip(".")
            if name not in by_pref.setdefault(r.preference, []):
                by_pref[r.preference].append(name)
        ordered: list[tuple[str, int]] = []
        seen: set[str] = set()
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._random.shuffle(group)
            for n in group:
                if n not in seen:
                    seen.add(n)
                    ordered.append((n, pref))
        return ordered

    def is_self(self, name: str, addresses: Sequence[str], explicit: bool) -> bool:
        if name in self._local_names:
            return True
        for a in addresses:
            ip = ipaddress.ip_address(a)
            if ip in self._local_ips:
                return True
            if not explicit and self._loopback_is_self and (ip.is_loopback or ip.is_unspecified):
                return True
        return False

    async def targets(self, dest: Destination) -> list[Target]:
        """
        The addresses to try for C{dest}, best first, at most
        C{max_addresses}.

        @raise HopFailure: when nothing can be tried (the outcome for everyone).
        """
        if not dest.mx:
            try:
                addrs = await self.addresses(dest.host)
            except (NotFound, DNSTemporary) as e:
                raise self._host_fail(dest.host, e, dest.explicit)
            if not dest.explicit and self.is_self(dest.host, addrs, False):
                raise self._loop(dest.host)
            return [Target(dest.host, a, dest.port) for a in addrs][: self._max_addresses]

        mx = await self.mx(dest.host)
        if mx is None:  # implicit MX: the domain's own addresses, preference 0
            hosts, prefs = [dest.host], {dest.host: 0}
        else:
            hosts = [n for n, _p in mx[:MAX_MX_HOSTS]]
            prefs = dict(mx[:MAX_MX_HOSTS])
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.addresses(h)) for h in hosts], consumeErrors=True
        )
        resolved: list[tuple[str, list[str]]] = []
        errors: list[BaseException] = []
        for host, (ok, value) in zip(hosts, results, strict=True):
            if ok:
                resolved.append((host, value))
            else:
                error = cast(Failure, value).value  # DeferredList: (False, Failure); Twisted types only the success value
                errors.append(error)
                log.info("MX host {host} for {domain}: no address ({error})", host=host, domain=dest.host,
                         error=type(error).__name__)
        # Loop detection (Postfix smtp_addr.c): the best MX is us -> loop;
        # a worse MX is us -> we are a backup, try only better ones.
        for i, (host, addrs) in enumerate(resolved):
            if self.is_self(host, addrs, dest.explicit):
                if i == 0 or prefs.get(host) == prefs.get(resolved[0][0]):
                    raise self._loop(dest.host)
                resolved = [(h, a) for h, a in resolved[:i] if prefs.get(h, 0) < prefs.get(host, 0)]
                if not resolved:
                    raise self._loop(dest.host)
                break
        targets = [Target(h, a, dest.port) for h, addrs in resolved for a in addrs]
        if targets:
            return targets[: self._max_addresses]
        # Nothing resolved.
        if any(isinstance(e, DNSTemporary) for e in errors) or dest.explicit:
            host = hosts[0]
            raise HopFailure(
                TEMPORARY, 0, "4.4.3",
                f"Host or domain name not found. Name service error for name={host} type=A: Host not found, try again",
            )
        if mx is None:
            raise HopFailure(PERMANENT, 0, "5.4.4",
                        f"Host or domain name not found: {dest.host} has no MX, A or AAAA records")
        raise HopFailure(PERMANENT, 0, "5.4.4",
                    f"Host or domain name not found: no MX host for {dest.host} has an address ({', '.join(hosts)})")

    def _host_fail(self, host: str, e: BaseException, explicit: bool) -> HopFailure:
        if isinstance(e, NotFound) and not explicit:
            return HopFailure(PERMANENT, 0, "5.4.4",
                         f"Host or domain name not found. Name service error for name={host} type=A: Host not found")
        # A route or smarthost that does not resolve is the operator's to fix:
        # keep the mail (Postfix would bounce it).
        return HopFailure(TEMPORARY, 0, "4.4.3" if isinstance(e, DNSTemporary) else "4.4.4",
                     f"Host or domain name not found. Name service error for name={host} type=A: "
                     f"{'Host not found, try again' if isinstance(e, DNSTemporary) else 'Host not found'}")

    def _loop(self, domain: str) -> HopFailure:
        log.warn("mail for {domain} loops back to myself", domain=domain)
        return HopFailure(PERMANENT, 0, "5.4.6", f"mail for {domain} loops back to myself")
