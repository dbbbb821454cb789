"""
Outbound relay: the delivery agent for recipients in domains that are not ours.

Owns: choosing the next hop for each recipient domain (the routes table,
the smarthost, DNS MX records through twisted.names), the order in which MX
hosts and their addresses are tried, mail-loop detection, the limits on
connections per destination and in total, and keeping idle SMTP
connections for reuse.

Must not touch: retry policy, bounces and the spool (house rule 4: this
module returns one L{Outcome} per recipient and the scheduler decides what
it means); the SMTP protocol itself (L{mailhub.relay.client}); configuration
files (L{mailhub.config} hands us plain values).

Routing order for a recipient domain, as Postfix does it with
C{transport_maps} and C{relayhost}:

 1. C{routes}: the exact domain, then C{.parent} entries matching any
    subdomain, nearest parent first;
 2. C{smarthost}, for everything else;
 3. DNS: MX records of the domain (an address literal goes to its address).

A next hop written C{[host]:port} is used as is, C{host:port} means "look
up the MX records of host" (Postfix brackets).  See docs/relay.rst.

Outcomes are given back twice: to the optional C{report} callback of
L{RemoteDelivery.deliver} as soon as each transaction (one next hop, at
most C{recipient_limit} recipients) has ended or its next hop has failed,
so the scheduler records a fast domain's deliveries while a slow one is
still in its DATA timeout; and all together when the Deferred fires.
"""

from __future__ import annotations

import ipaddress
import random as _random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger
from twisted.names import cache, dns, resolve
from twisted.names import client as dnsclient
from twisted.names import error as dnserror
from twisted.names import hosts as hostsmodule

from mailhub.address import AddressError, normalize_domain
from mailhub.envelope import PERMANENT, TEMPORARY, Envelope, Outcome, Recipient
from mailhub.relay import client as smtpclient
from mailhub.relay.reply import SessionError
from mailhub.relay.tls import connect_reason
from mailhub.relay.nexthop import (
    Destination,
    _ip,
    _route_key,
    parse_dns_server,
    parse_nexthop,
)

__all__ = ["RemoteDelivery"]

log = Logger()

#: How many MX hosts are looked up at most (Postfix smtp_mx_address_limit is
#: about addresses; this bounds the DNS work for absurd MX sets).
MAX_MX_HOSTS = 10
#: CNAME chain length we follow before calling it a DNS failure.
MAX_CNAME_DEPTH = 8


# -- errors carried inside this module -------------------------------------------------


class _Fail(Exception):
    """
    Every recipient of a group gets this outcome.  C{code} is 0 unless a
    server replied with it; C{remote_mta} is the host connected to, if any.
    """

    def __init__(self, kind: str, code: int, status: str, text: str, remote_mta: str = "") -> None:
        super().__init__(text)
        self.kind, self.code, self.status, self.text, self.remote_mta = kind, code, status, text, remote_mta

    def outcome(self, recipient: str) -> Outcome:
        return Outcome(recipient, self.kind, self.code, self.status, self.text, self.remote_mta)


class _NotFound(Exception):
    """NXDOMAIN, or no records of the type asked."""

    def __init__(self, name: str, nxdomain: bool) -> None:
        super().__init__(name)
        self.name, self.nxdomain = name, nxdomain


class _DNSTemporary(Exception):
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
class _Target:
    """One address to connect to."""

    name: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}[{self.ip}]:{self.port}"


_CONNECT_TEXT = re.compile(
    r"^(connect to \S+): .*?\b(Connection refused|No route to host|Network is unreachable|"
    r"Connection timed out|Connection reset by peer)\b"
)


def _tidy(text: str) -> str:
    """
    Postfix's short form for connect errors: Twisted's "Connection was
    refused by other side: 111: Connection refused." becomes "Connection
    refused", so logs and bounces read C{connect to mx[ip]:25: Connection
    refused}.
    """
    m = _CONNECT_TEXT.match(text)
    return f"{m.group(1)}: {m.group(2)}" if m else text


def _connect_reason(err: BaseException) -> str:
    """Postfix-style reason for a failed connect."""
    return connect_reason(err)


# -- the delivery agent ------------------------------------------------------------


class RemoteDelivery(service.Service):
    """
    Delivery agent for non-local recipients (C{DeliveryAgent}): groups the
    recipients by next hop, finds the addresses to try, connects (or reuses
    an idle connection) within the concurrency limits and hands the
    transaction to L{smtpclient.SMTPConnection.send}.

    It is also a service: stopping it closes the idle connections.

    @param reactor: IReactorTime (idle timers), IReactorTCP (endpoints) and
        the reactor given to C{connect}; tests pass a C{MemoryReactorClock}.
    @param random: C{shuffle}s MX hosts of equal preference (RFC 5321 5.1).
    @param idle_timeout: seconds an idle connection is kept for reuse.
    @param max_addresses: addresses tried per delivery (Postfix
        C{smtp_mx_address_limit} = 5).
    @param recipient_limit: recipients per transaction (Postfix
        C{smtp_destination_recipient_limit} = 50); more go in further
        transactions on the same connection.
    @param local_addresses: our own addresses: an MX host resolving to one
        of them is us (loop detection, Postfix C{inet_interfaces} +
        C{proxy_interfaces}).
    @param local_names: our own host names (C{myhostname}): an MX host of
        that name is us.
    @param loopback_is_self: count 127.0.0.0/8 and ::1 as ours when they
        come from DNS (not from an explicit route).  Only the end-to-end
        tests, whose DNS points MX records at loopback, turn it off.
    """

    def __init__(
        self,
        reactor: Any,
        helo_name: str,
        *,
        smarthost: str | None = None,
        smarthost_auth: tuple[str, str] | None = None,
        routes: Mapping[str, str] | None = None,
        dns_servers: Sequence[str] | None = None,
        port: int = 25,
        tls: str = "may",
        destination_concurrency: int = 20,
        total_concurrency: int = 100,
        local_addresses: Sequence[str] = (),
        local_names: Sequence[str] = (),
        client_options: dict | None = None,
        connect: Callable[..., Deferred] = smtpclient.connect,
        resolver: Any = None,
        random: Any = None,
        idle_timeout: float = 5.0,
        max_addresses: int = 5,
        recipient_limit: int = 50,
        loopback_is_self: bool = True,
    ) -> None:
        if tls not in (smtpclient.TLS_NONE, smtpclient.TLS_MAY, smtpclient.TLS_ENCRYPT, smtpclient.TLS_VERIFY):
            raise ValueError(f"tls must be none, may, encrypt or verify, got {tls!r}")
        if destination_concurrency < 1 or total_concurrency < 1:
            raise ValueError("concurrency limits must be positive")
        self._reactor = reactor
        self._helo = helo_name
        self._port = port
        self._tls = tls
        self._smarthost = parse_nexthop(smarthost, port) if smarthost else None
        self._smarthost_auth = smarthost_auth
        self._routes: dict[str, Destination | None] = {
            _route_key(k): parse_nexthop(v, port) for k, v in (routes or {}).items()
        }
        self._dns_servers = [parse_dns_server(s) for s in dns_servers] if dns_servers else None
        self._resolver = resolver
        self._dest_limit = destination_concurrency
        self._total_limit = total_concurrency
        self._local_ips = {ipaddress.ip_address(a) for a in local_addresses}
        self._local_names = {normalize_domain(n) for n in local_names}
        self._loopback_is_self = loopback_is_self
        self._client_options = dict(client_options or {})
        # Fail at construction (config time) on an unknown option.
        smtpclient.ClientOptions(helo_name=helo_name, **self._client_options)
        self._connect = connect
        self._random = random if random is not None else _random.SystemRandom()
        self._idle_timeout = idle_timeout
        self._max_addresses = max_addresses
        self._recipient_limit = recipient_limit
        # Connection accounting: a slot is held by a delivery in progress
        # or by an idle connection.
        self._count: dict[Destination, int] = {}
        self._total = 0
        self._idle: dict[Destination, list[tuple[Any, Any]]] = {}
        self._waiters: list[tuple[Destination, Deferred]] = []
        self._stopped = False

    # -- public -------------------------------------------------------------------

    def deliver(
        self,
        envelope: Envelope,
        recipients: list[Recipient],
        message_path: str,
        report: Callable[[list[Outcome]], None] | None = None,
    ) -> Deferred:
        """
        Deliver C{message_path} to C{recipients}; fires with one L{Outcome}
        per recipient, never with a failure.

        @param report: called with the outcomes of each transaction as soon
            as it ends (and of each next hop that could not be reached), so
            they can be recorded before the slowest next hop has answered.
            The final list repeats them.  An exception from it is logged.
        """
        groups: dict[Destination, list[Recipient]] = {}
        early: list[Outcome] = []
        for r in recipients:
            at = r.address.rfind("@")
            if at < 0:
                early.append(Outcome.permanent(r.address, "recipient address has no domain", 0, "5.1.3"))
                continue
            try:
                domain = normalize_domain(r.address[at + 1 :])
            except AddressError as e:
                early.append(Outcome.permanent(r.address, f"bad recipient domain: {e}", 0, e.enhanced))
                continue
            groups.setdefault(self.route(domain), []).append(r)
        ds = [
            defer.ensureDeferred(self._deliver_group(dest, envelope, rcpts, message_path, report))
            for dest, rcpts in groups.items()
        ]

        def merge(results: list) -> list[Outcome]:
            out = list(early)
            for (ok, value), (dest, rcpts) in zip(results, groups.items()):
                if ok:
                    out.extend(value)
                else:  # a bug, not a remote problem; keep the message
                    log.failure("delivery to {dest} crashed", value, dest=str(dest))
                    out.extend(
                        Outcome.temporary(r.address, f"internal error: {value.getErrorMessage()}", 0, "4.3.0")
                        for r in rcpts
                    )
            return out

        return defer.DeferredList(ds, consumeErrors=True).addCallback(merge)

    def route(self, domain: str) -> Destination:
        """The next hop for normalised C{domain}: routes, smarthost, then MX."""
        if domain in self._routes:
            found = self._routes[domain]
            return found if found is not None else self._direct(domain)
        labels = domain.split(".")
        for i in range(1, len(labels)):
            key = "." + ".".join(labels[i:])
            if key in self._routes:
                found = self._routes[key]
                return found if found is not None else self._direct(domain)
        if self._smarthost is not None:
            return self._smarthost
        return self._direct(domain)

    def _direct(self, domain: str) -> Destination:
        if domain.startswith("["):
            body = domain[1:-1]
            if body.lower().startswith("ipv6:"):
                body = body[5:]
            return Destination(body, self._port, mx=False, explicit=False)
        return Destination(domain, self._port, mx=True, explicit=False)

    def stopService(self) -> Deferred:
        """Close every idle connection."""
        super().stopService()
        self._stopped = True
        ds = []
        for dest, entries in list(self._idle.items()):
            for conn, call in entries:
                if call.active():
                    call.cancel()
                ds.append(self._quit(dest, conn))
                self._free(dest)
        self._idle.clear()
        return defer.DeferredList(ds, consumeErrors=True)

    # -- one group of recipients to one next hop ---------------------------------------

    @staticmethod
    def _report(report: Callable[[list[Outcome]], None] | None, envelope: Envelope, outcomes: list[Outcome]) -> None:
        """Pass one transaction's outcomes on; the caller's bug never breaks a delivery."""
        if report is None or not outcomes:
            return
        try:
            report(list(outcomes))
        except Exception:
            log.failure("{queue_id}: error reporting outcomes", queue_id=envelope.queue_id)

    async def _deliver_group(
        self,
        dest: Destination,
        envelope: Envelope,
        rcpts: list[Recipient],
        path: str,
        report: Callable[[list[Outcome]], None] | None = None,
    ) -> list[Outcome]:
        conn = None
        slot = False
        try:
            conn = self._pop_idle(dest)
            if conn is not None:
                slot = True
                conn = await self._reuse(dest, conn)
            if conn is None:
                targets = await self._targets(dest)
                if not slot:
                    conn = await self._acquire(dest)
                    slot = True
                    if conn is not None:
                        conn = await self._reuse(dest, conn)
                if conn is None:
                    conn = await self._connect_any(dest, targets)
            outcomes, broken = await self._transactions(conn, envelope, rcpts, path, report)
            if broken:
                self._quit(dest, conn)
                conn = None
            return outcomes
        except _Fail as f:
            failed = [f.outcome(r.address) for r in rcpts]
            self._report(report, envelope, failed)
            return failed
        finally:
            if slot:
                self._release(dest, conn)

    async def _transactions(
        self,
        conn: Any,
        envelope: Envelope,
        rcpts: list[Recipient],
        path: str,
        report: Callable[[list[Outcome]], None] | None = None,
    ) -> tuple[list[Outcome], bool]:
        """
        Send in chunks of C{recipient_limit}, reporting each chunk's outcomes
        when its transaction ends; (outcomes, connection broken).
        """
        outcomes: list[Outcome] = []
        chunks = [rcpts[i : i + self._recipient_limit] for i in range(0, len(rcpts), self._recipient_limit)]
        for n, chunk in enumerate(chunks):
            try:
                if n:
                    await conn.reset()
                got = await conn.send(envelope, chunk, path)
            except Exception as e:
                fail = self._session_fail(e, conn.remote_mta)
                log.info("transaction with {remote} failed: {error}", remote=conn.remote_mta, error=fail.text)
                failed = [fail.outcome(r.address) for rest in chunks[n:] for r in rest]
                self._report(report, envelope, failed)
                outcomes.extend(failed)
                return outcomes, True
            answered = {o.recipient for o in got}
            done = list(got) + [
                Outcome.temporary(r.address, "no reply for this recipient", 0, "4.4.2", conn.remote_mta)
                for r in chunk
                if r.address not in answered
            ]
            self._report(report, envelope, done)
            outcomes.extend(done)
        return outcomes, False

    def _session_fail(self, e: BaseException, remote: str) -> _Fail:
        if isinstance(e, SessionError):
            kind = PERMANENT if e.permanent else TEMPORARY
            # remote_mta is empty when no connection was made (refused, timed out)
            return _Fail(kind, e.code, e.enhanced, _tidy(e.text), e.remote_mta)
        return _Fail(TEMPORARY, 0, "4.4.2", f"conversation with {remote} failed: {e}", remote)

    # -- finding addresses -------------------------------------------------------------

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

    async def _query(self, name: str, rtype: int) -> list[Any]:
        """
        Records of C{rtype} for C{name}, following CNAMEs (within the answer
        and by asking again for the canonical name).  [] is NODATA.

        @raise _NotFound: NXDOMAIN.
        @raise _DNSTemporary: anything else that went wrong.
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
                raise _NotFound(current, True)
            except _TEMPORARY_DNS as e:
                raise _DNSTemporary(f"{type(e).__name__}")
            except dnserror.DomainError:
                raise _NotFound(current, True)
            except Exception as e:
                raise _DNSTemporary(str(e) or type(e).__name__)
            cnames = {}
            for rr in answers:
                if rr.type == dns.CNAME:
                    cnames[str(rr.name).lower().rstrip(".")] = str(rr.payload.name).lower().rstrip(".")
            moved = False
            while current in cnames:
                current = cnames[current]
                if current in seen:
                    raise _DNSTemporary(f"CNAME loop at {current}")
                seen.add(current)
                moved = True
            records = [rr.payload for rr in answers if rr.type == rtype and str(rr.name).lower().rstrip(".") == current]
            if records or not moved:
                return records
            # The answer named a canonical name but held none of its records.
        raise _DNSTemporary(f"CNAME chain too long for {name}")

    async def _addresses(self, host: str) -> list[str]:
        """
        IPv4 then IPv6 addresses of C{host}.

        @raise _NotFound: neither A nor AAAA exists.
        @raise _DNSTemporary: no address, and at least one lookup failed softly.
        """
        if _ip(host) is not None:
            return [_ip(host).compressed]
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._query(host, dns.A)), defer.ensureDeferred(self._query(host, dns.AAAA))],
            consumeErrors=True,
        )
        out: list[str] = []
        temporary = None
        nxdomain = False
        for (ok, value), rtype in zip(results, (dns.A, dns.AAAA)):
            if ok:
                for rec in value:
                    if rtype == dns.A:
                        out.append(rec.dottedQuad())
                    else:
                        out.append(ipaddress.IPv6Address(rec.address).compressed)
            elif value.check(_NotFound):
                nxdomain = nxdomain or value.value.nxdomain
            elif value.check(_DNSTemporary):
                temporary = value.value
            else:
                temporary = _DNSTemporary(value.getErrorMessage())
        if out:
            return out
        if temporary is not None:
            raise temporary
        raise _NotFound(host, nxdomain)

    async def _mx(self, domain: str) -> list[tuple[str, int]] | None:
        """
        MX (host name, preference) in the order to try (preference, random
        among equals); C{None} when there is no MX (implicit MX).

        @raise _Fail: NXDOMAIN, null MX, DNS failure.
        """
        try:
            records = await self._query(domain, dns.MX)
        except _NotFound:
            raise _Fail(
                PERMANENT, 0, "5.1.2",
                f"Host or domain name not found. Name service error for name={domain} type=MX: Host not found",
            )
        except _DNSTemporary as e:
            log.info("MX lookup for {domain} failed: {error}", domain=domain, error=str(e))
            raise _Fail(
                TEMPORARY, 0, "4.4.3",
                f"Host or domain name not found. Name service error for name={domain} type=MX: "
                "Host not found, try again",
            )
        if not records:
            return None
        real = [r for r in records if str(r.name).rstrip(".") != ""]
        if not real:  # RFC 7505 null MX
            raise _Fail(PERMANENT, 0, "5.1.10", f"Domain {domain} does not accept mail (null MX)")
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

    def _is_self(self, name: str, addresses: Sequence[str], explicit: bool) -> bool:
        if name in self._local_names:
            return True
        for a in addresses:
            ip = ipaddress.ip_address(a)
            if ip in self._local_ips:
                return True
            if not explicit and self._loopback_is_self and (ip.is_loopback or ip.is_unspecified):
                return True
        return False

    async def _targets(self, dest: Destination) -> list[_Target]:
        """
        The addresses to try for C{dest}, best first, at most
        C{max_addresses}.

        @raise _Fail: when nothing can be tried (the outcome for everyone).
        """
        if not dest.mx:
            try:
                addrs = await self._addresses(dest.host)
            except (_NotFound, _DNSTemporary) as e:
                raise self._host_fail(dest.host, e, dest.explicit)
            if not dest.explicit and self._is_self(dest.host, addrs, False):
                raise self._loop(dest.host)
            return [_Target(dest.host, a, dest.port) for a in addrs][: self._max_addresses]

        mx = await self._mx(dest.host)
        if mx is None:  # implicit MX: the domain's own addresses, preference 0
            hosts, prefs = [dest.host], {dest.host: 0}
        else:
            hosts = [n for n, _p in mx[:MAX_MX_HOSTS]]
            prefs = dict(mx[:MAX_MX_HOSTS])
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._addresses(h)) for h in hosts], consumeErrors=True
        )
        resolved: list[tuple[str, list[str]]] = []
        errors: list[BaseException] = []
        for host, (ok, value) in zip(hosts, results):
            if ok:
                resolved.append((host, value))
            else:
                errors.append(value.value)
                log.info("MX host {host} for {domain}: no address ({error})", host=host, domain=dest.host,
                         error=type(value.value).__name__)
        # Loop detection (Postfix smtp_addr.c): the best MX is us -> loop;
        # a worse MX is us -> we are a backup, try only better ones.
        for i, (host, addrs) in enumerate(resolved):
            if self._is_self(host, addrs, dest.explicit):
                if i == 0 or prefs.get(host) == prefs.get(resolved[0][0]):
                    raise self._loop(dest.host)
                resolved = [(h, a) for h, a in resolved[:i] if prefs.get(h, 0) < prefs.get(host, 0)]
                if not resolved:
                    raise self._loop(dest.host)
                break
        targets = [_Target(h, a, dest.port) for h, addrs in resolved for a in addrs]
        if targets:
            return targets[: self._max_addresses]
        # Nothing resolved.
        if any(isinstance(e, _DNSTemporary) for e in errors) or dest.explicit:
            host = hosts[0]
            raise _Fail(
                TEMPORARY, 0, "4.4.3",
                f"Host or domain name not found. Name service error for name={host} type=A: Host not found, try again",
            )
        if mx is None:
            raise _Fail(PERMANENT, 0, "5.4.4",
                        f"Host or domain name not found: {dest.host} has no MX, A or AAAA records")
        raise _Fail(PERMANENT, 0, "5.4.4",
                    f"Host or domain name not found: no MX host for {dest.host} has an address ({', '.join(hosts)})")

    def _host_fail(self, host: str, e: BaseException, explicit: bool) -> _Fail:
        if isinstance(e, _NotFound) and not explicit:
            return _Fail(PERMANENT, 0, "5.4.4",
                         f"Host or domain name not found. Name service error for name={host} type=A: Host not found")
        # A route or smarthost that does not resolve is the operator's to fix:
        # keep the mail (Postfix would bounce it).
        return _Fail(TEMPORARY, 0, "4.4.3" if isinstance(e, _DNSTemporary) else "4.4.4",
                     f"Host or domain name not found. Name service error for name={host} type=A: "
                     f"{'Host not found, try again' if isinstance(e, _DNSTemporary) else 'Host not found'}")

    def _loop(self, domain: str) -> _Fail:
        log.warn("mail for {domain} loops back to myself", domain=domain)
        return _Fail(PERMANENT, 0, "5.4.6", f"mail for {domain} loops back to myself")

    # -- connecting ------------------------------------------------------------------

    def _options(self, dest: Destination, target: _Target, tls: str | None = None) -> Any:
        kw: dict[str, Any] = {
            "helo_name": self._helo,
            "tls": tls or self._tls,
            "tls_hostname": None if _ip(target.name) is not None else target.name,
            "auth": self._smarthost_auth if dest == self._smarthost else None,
        }
        kw.update(self._client_options)
        if tls is not None:
            kw["tls"] = tls
        return smtpclient.ClientOptions(**kw)

    def _endpoint(self, target: _Target) -> Any:
        timeout = self._client_options.get("connect_timeout", 30.0)
        if ":" in target.ip:
            return TCP6ClientEndpoint(self._reactor, target.ip, target.port, timeout=timeout)
        return TCP4ClientEndpoint(self._reactor, target.ip, target.port, timeout=timeout)

    async def _connect_any(self, dest: Destination, targets: list[_Target]) -> Any:
        """
        Try C{targets} in order; the first that greets and accepts EHLO
        wins.  Connection failures and 4xx/5xx greetings mean "try the
        next" (Postfix tries all MX hosts, smtp_skip_5xx_greeting).

        @raise _Fail: all failed; temporary unless every one answered 5xx.
        """
        last_temp: _Fail | None = None
        last_perm: _Fail | None = None
        for target in targets:
            options = self._options(dest, target)
            while True:
                log.debug("connecting to {target} for {dest}", target=str(target), dest=str(dest))
                try:
                    conn = await self._connect(self._reactor, self._endpoint(target), options,
                                               target.name, target.ip, target.port)
                except SessionError as e:
                    if e.tls_failed and options.tls == smtpclient.TLS_MAY:
                        log.info("TLS with {target} failed ({error}); retrying without TLS",
                                 target=str(target), error=e.text)
                        options = self._options(dest, target, tls=smtpclient.TLS_NONE)
                        continue
                    fail = self._session_fail(e, str(target))
                    if e.permanent:
                        last_perm = fail
                    else:
                        last_temp = fail
                    log.info("{text}", text=fail.text, target=str(target), dest=str(dest))
                    break
                except Exception as e:
                    text = f"connect to {target}: {_connect_reason(e)}"
                    last_temp = _Fail(TEMPORARY, 0, "4.4.1", text)
                    log.info("{text}", text=text, target=str(target), dest=str(dest))
                    break
                else:
                    log.info("connected to {remote} for {dest} (tls={tls})", remote=conn.remote_mta,
                             dest=str(dest), tls=getattr(conn, "tls", False))
                    return conn
        if last_temp is not None:
            raise last_temp
        if last_perm is not None:
            raise last_perm
        raise _Fail(TEMPORARY, 0, "4.4.1", f"no address to try for {dest}")

    # -- connection slots and reuse ------------------------------------------------------

    def _pop_idle(self, dest: Destination) -> Any:
        """Take an idle connection to C{dest} with its slot, or None."""
        entries = self._idle.get(dest)
        while entries:
            conn, call = entries.pop()
            if call.active():
                call.cancel()
            if conn.usable:
                if not entries:
                    del self._idle[dest]
                return conn
            self._quit(dest, conn)
            self._free(dest)
        self._idle.pop(dest, None)
        return None

    async def _reuse(self, dest: Destination, conn: Any) -> Any:
        """RSET a kept connection; None (slot still held) if it is dead."""
        if not conn.usable:
            self._quit(dest, conn)
            return None
        try:
            await conn.reset()
        except Exception as e:
            log.info("cached connection to {remote} failed RSET: {error}", remote=conn.remote_mta, error=str(e))
            self._quit(dest, conn)
            return None
        if not conn.usable:
            self._quit(dest, conn)
            return None
        log.info("reusing connection to {remote} for {dest}", remote=conn.remote_mta, dest=str(dest))
        return conn

    def _acquire(self, dest: Destination) -> Deferred:
        """Fires (with an idle connection or None) when a slot for C{dest} is ours."""
        d: Deferred = Deferred()
        self._waiters.append((dest, d))
        self._wake()
        return d

    def _try_grant(self, dest: Destination) -> bool:
        if self._count.get(dest, 0) >= self._dest_limit:
            return False
        if self._total >= self._total_limit:
            victim = next(((vd, entries) for vd, entries in self._idle.items() if entries), None)
            if victim is None:
                return False
            vdest, entries = victim
            conn, call = entries.pop(0)
            if not entries:
                del self._idle[vdest]
            if call.active():
                call.cancel()
            self._quit(vdest, conn)
            self._free(vdest)
            if self._count.get(dest, 0) >= self._dest_limit:
                return False
        self._count[dest] = self._count.get(dest, 0) + 1
        self._total += 1
        return True

    def _wake(self) -> None:
        """Grant slots (or idle connections) to waiters, first come first served."""
        progress = True
        while progress:
            progress = False
            for i, (dest, d) in enumerate(self._waiters):
                conn = self._pop_idle(dest)
                if conn is not None or self._try_grant(dest):
                    del self._waiters[i]
                    d.callback(conn)
                    progress = True
                    break

    def _free(self, dest: Destination) -> None:
        n = self._count.get(dest, 0) - 1
        if n > 0:
            self._count[dest] = n
        else:
            self._count.pop(dest, None)
        self._total -= 1

    def _release(self, dest: Destination, conn: Any) -> None:
        """The delivery is done with its slot; keep C{conn} idle if it still works."""
        if conn is not None and conn.usable and not self._stopped:
            call = self._reactor.callLater(self._idle_timeout, self._expire, dest, conn)
            self._idle.setdefault(dest, []).append((conn, call))
        else:
            if conn is not None:
                self._quit(dest, conn)
            self._free(dest)
        self._wake()

    def _expire(self, dest: Destination, conn: Any) -> None:
        entries = self._idle.get(dest, [])
        for i, (c, _call) in enumerate(entries):
            if c is conn:
                del entries[i]
                break
        else:
            return
        if not entries:
            self._idle.pop(dest, None)
        self._quit(dest, conn)
        self._free(dest)
        self._wake()

    def _quit(self, dest: Destination, conn: Any) -> Deferred:
        log.debug("closing connection to {remote} ({dest})", remote=getattr(conn, "remote_mta", "?"), dest=str(dest))
        try:
            d = defer.maybeDeferred(conn.quit)
        except Exception:  # pragma: no cover - maybeDeferred catches
            return defer.succeed(None)
        return d.addErrback(lambda f: None)
