"""
Outbound relay: the delivery agent for recipients in domains that are not ours.

Owns: L{RemoteDelivery} -- grouping recipients by next hop and choosing
the next hop for each recipient domain (the routes table, the smarthost,
DNS), connecting to the addresses L{mailhub.relay.mx} gives in order (the
first that greets and accepts EHLO wins; TLS "may" falls back to plain
text), running the transactions (at most C{recipient_limit} recipients
each) on a connection taken from L{mailhub.relay.pool}, and turning every
failure into outcomes.

Must not touch: retry policy, bounces and the spool (agents return
outcomes, the scheduler decides: this module returns one L{Outcome} per
recipient); DNS resolution and loop detection (L{mailhub.relay.mx});
connection limits and idle connections (L{mailhub.relay.pool}); the SMTP
protocol itself (L{mailhub.relay.client}); configuration files
(L{mailhub.config} hands us plain values).

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

import dataclasses
import random as _random
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger

from mailhub.address import AddressError, normalize_domain
from mailhub.envelope import DELIVERED_OUTCOME, PERMANENT, TEMPORARY, Envelope, Outcome, Recipient, ReportFunction
from mailhub.relay import client
from mailhub.relay.mx import HopFailure, MXResolver, Target
from mailhub.relay.nexthop import Destination, _ip, _route_key, parse_dns_server, parse_nexthop
from mailhub.relay.pool import ConnectionPool
from mailhub.relay.reply import SessionError
from mailhub.relay.tls import connect_reason
from mailhub.relay.tlspolicy import DomainPolicy, HostPolicy, TLSPolicy, verified
from mailhub.relay.tlsrpt import record_session, session_info, tls_delivered, tls_failure

__all__ = ["RemoteDelivery"]

log = Logger()

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


# -- the delivery agent ------------------------------------------------------------


class RemoteDelivery(service.Service):
    """
    Delivery agent for non-local recipients (C{DeliveryAgent}): groups the
    recipients by next hop, finds the addresses to try, connects (or reuses
    an idle connection) within the concurrency limits and hands the
    transaction to L{client.SMTPConnection.send}.

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
        connect: Callable[..., Deferred] = client.connect,
        resolver: Any = None,
        random: Any = None,
        idle_timeout: float = 5.0,
        max_addresses: int = 5,
        recipient_limit: int = 50,
        loopback_is_self: bool = True,
        ratelimit: Any = None,
        tls_policy: TLSPolicy | None = None,
        tls_reports: Any = None,
    ) -> None:
        if tls not in (client.TLS_NONE, client.TLS_MAY, client.TLS_ENCRYPT, client.TLS_VERIFY):
            raise ValueError(f"tls must be none, may, encrypt or verify, got {tls!r}")
        self._reactor = reactor
        self._helo = helo_name
        self._port = port
        self._tls = tls
        self._smarthost = parse_nexthop(smarthost, port) if smarthost else None
        self._smarthost_auth = smarthost_auth
        self._routes: dict[str, Destination | None] = {
            _route_key(k): parse_nexthop(v, port) for k, v in (routes or {}).items()
        }
        self._client_options = dict(client_options or {})
        # Fail at construction (config time) on an unknown option.
        client.ClientOptions(helo_name=helo_name, **self._client_options)
        self._connect = connect
        self._recipient_limit = recipient_limit
        self._mx = MXResolver(
            reactor,
            dns_servers=[parse_dns_server(s) for s in dns_servers] if dns_servers else None,
            resolver=resolver,
            random=random if random is not None else _random.SystemRandom(),
            local_addresses=local_addresses,
            local_names=local_names,
            loopback_is_self=loopback_is_self,
            max_addresses=max_addresses,
        )
        self._pool = ConnectionPool(reactor, destination_concurrency, total_concurrency, idle_timeout)
        # [limits] domain_messages_per_sec (mailhub.ratelimit.limits.RateLimits), or None
        self._ratelimit = ratelimit
        self.tls_policy = tls_policy if tls_policy is not None else TLSPolicy(tls)
        self.tls_reports = tls_reports
        self._conn_policy: weakref.WeakKeyDictionary[Any, tuple[DomainPolicy, HostPolicy]] = weakref.WeakKeyDictionary()

    # -- public -------------------------------------------------------------------

    def deliver(
        self,
        envelope: Envelope,
        recipients: list[Recipient],
        message_path: str,
        report: ReportFunction,
    ) -> Deferred:
        """
        Deliver C{message_path} to C{recipients}; fires with one L{Outcome}
        per recipient, never with a failure.

        @param report: called with the outcomes of each transaction as soon
            as it ends (and of each next hop that could not be reached), so
            they can be recorded before the slowest next hop has answered.
            The final list repeats them.  An exception from it is logged.

        With a destination rate limit, each recipient domain counts one
        message; the recipients of a domain over its limit are postponed
        (L{Outcome.postponed}: not tried, so no attempt and no failure; the
        scheduler tries them again once the limit's window has passed).
        """
        if self._ratelimit is None:
            return self._deliver(envelope, recipients, message_path, report)
        return defer.ensureDeferred(self._limited(envelope, recipients, message_path, report))

    async def _limited(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> list[Outcome]:
        by_domain: dict[str, list[Recipient]] = {}
        for r in recipients:
            by_domain.setdefault(r.address.rpartition("@")[2].lower(), []).append(r)
        allowed: list[Recipient] = []
        deferred: list[Outcome] = []
        for domain, rcpts in by_domain.items():
            verdict = await self._ratelimit.destination(domain) if domain else None
            if verdict is None:
                allowed.extend(rcpts)
            else:
                text = f"rate limited: {verdict.text}"
                deferred.extend(Outcome.postponed(r.address, text, verdict.retry_after) for r in rcpts)
        self._report(report, envelope, deferred)
        outcomes = await self._deliver(envelope, allowed, message_path, report) if allowed else []
        return deferred + outcomes

    def _deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> Deferred:
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
            for (ok, value), (dest, rcpts) in zip(results, groups.items(), strict=True):
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

    def _subservices(self) -> list[Any]:
        return [s for s in (self.tls_policy.mtasts, self.tls_reports) if s is not None]

    def startService(self) -> None:
        super().startService()
        for s in self._subservices():
            s.startService()

    def stopService(self) -> Deferred:
        """Close every idle connection; stop the policy refresh and write the TLS report counts."""
        super().stopService()
        for s in self._subservices():
            if s.running:
                s.stopService()
        return self._pool.close()

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
            conn = self._pool.pop_idle(dest)
            if conn is not None:
                slot = True
                conn = await self._pool.reuse(dest, conn)
            if conn is None:
                targets = await self._mx.targets(dest)
                if not slot:
                    conn = await self._pool.acquire(dest)
                    slot = True
                    if conn is not None:
                        conn = await self._pool.reuse(dest, conn)
                if conn is None:
                    conn = await self._connect_any(dest, targets, envelope)
            outcomes, broken = await self._transactions(conn, envelope, rcpts, path, report)
            if broken:
                self._pool.quit(dest, conn)
                conn = None
            return outcomes
        except HopFailure as f:
            failed = [f.outcome(r.address) for r in rcpts]
            self._report(report, envelope, failed)
            return failed
        finally:
            if slot:
                self._pool.release(dest, conn)

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
            got = self._tls_delivered(conn, envelope, got)
            done = list(got) + [
                Outcome.temporary(r.address, "no reply for this recipient", 0, "4.4.2", conn.remote_mta)
                for r in chunk
                if r.address not in answered
            ]
            self._report(report, envelope, done)
            outcomes.extend(done)
        return outcomes, False

    def _session_fail(self, e: BaseException, remote: str) -> HopFailure:
        if isinstance(e, SessionError):
            kind = PERMANENT if e.permanent else TEMPORARY
            # remote_mta is empty when no connection was made (refused, timed out)
            return HopFailure(kind, e.code, e.enhanced, _tidy(e.text), e.remote_mta)
        return HopFailure(TEMPORARY, 0, "4.4.2", f"conversation with {remote} failed: {e}", remote)

    # -- finding addresses -------------------------------------------------------------

    def resolver(self) -> Any:
        """The twisted.names resolver in use, created on first use."""
        return self._mx.resolver()

    async def targets(self, dest: Destination) -> list[Target]:
        """
        The addresses that would be tried for C{dest} (C{mailhub tls check}).

        @raise HopFailure: nothing can be tried.
        """
        return await self._mx.targets(dest)

    async def mx_addresses(self, host: str) -> list[str]:
        """The addresses of C{host} through the relay's resolver (the MTA-STS policy host)."""
        return await self._mx.addresses(host)

    # -- connecting ------------------------------------------------------------------

    def _options(self, dest: Destination, target: Target, tls: str | None = None,
                 host: HostPolicy | None = None) -> Any:
        kw: dict[str, Any] = {
            "helo_name": self._helo,
            "tls": tls or self._tls,
            "tls_hostname": None if _ip(target.name) is not None else target.name,
            "auth": self._smarthost_auth if dest == self._smarthost else None,
        }
        kw.update(self._client_options)
        if host is not None:
            kw["tls"] = host.tls
            kw["tls_observe"] = host.observe and host.tls != client.TLS_NONE
            kw["dane_tlsa"] = host.tlsa
            kw["dane_names"] = (target.name, dest.host) if host.tlsa else ()
        if tls is not None:
            kw["tls"] = tls
        return client.ClientOptions(**kw)

    def _endpoint(self, target: Target) -> Any:
        timeout = self._client_options.get("connect_timeout", 30.0)
        if ":" in target.ip:
            return TCP6ClientEndpoint(self._reactor, target.ip, target.port, timeout=timeout)
        return TCP4ClientEndpoint(self._reactor, target.ip, target.port, timeout=timeout)

    async def _connect_any(self, dest: Destination, targets: list[Target], envelope: Envelope | None = None) -> Any:
        """
        Try C{targets} in order; the first that greets, accepts EHLO and
        gives the protection its TLS policy asks for wins.  Connection
        failures and 4xx/5xx greetings mean "try the next" (Postfix tries
        all MX hosts, smtp_skip_5xx_greeting); so does a host the policy
        refuses (an MX outside an enforced MTA-STS policy, a failed TLSA
        lookup).  Only level "may" falls back to plain text.

        @raise HopFailure: all failed; temporary unless every one answered 5xx.
        """
        last_temp: HopFailure | None = None
        last_perm: HopFailure | None = None
        dp = await self.tls_policy.for_destination(dest)
        hosts: dict[tuple[str, int], HostPolicy] = {}
        for target in targets:
            key = (target.name, target.port)
            if key not in hosts:
                hosts[key] = await self.tls_policy.for_host(dp, target.name, target.port)
            hp = hosts[key]
            if hp.refuse:
                last_temp = HopFailure(TEMPORARY, 0, "4.7.5", f"{hp.refuse}; not sending to {target}")
                self._tls_event(envelope, dp, hp, target, "failed", reason=hp.refuse, rtype=hp.result_type)
                log.info("{text}", text=last_temp.text)
                continue
            if hp.warning:
                self._tls_event(envelope, dp, hp, target, "testing-failed", reason=hp.warning,
                                rtype="validation-failure")
            options = self._options(dest, target, host=hp)
            while True:
                log.debug("connecting to {target} for {dest}", target=str(target), dest=str(dest))
                try:
                    conn = await self._connect(self._reactor, self._endpoint(target), options,
                                               target.name, target.ip, target.port)
                except SessionError as e:
                    tls_problem = e.tls_failed or e.enhanced in ("4.7.4", "4.7.5")
                    if e.tls_failed and options.tls == client.TLS_MAY:
                        log.info("TLS with {target} failed ({error}); retrying without TLS",
                                 target=str(target), error=e.text)
                        if hp.observe:
                            self._tls_event(envelope, dp, hp, target, "testing-failed", reason=e.text)
                        options = self._options(dest, target, tls=client.TLS_NONE, host=hp)
                        continue
                    fail = self._session_fail(e, str(target))
                    if tls_problem and hp.source in ("mta-sts", "dane"):
                        what = "DANE" if hp.tlsa else f"the MTA-STS policy of {dp.domain}"
                        fail = HopFailure(TEMPORARY, 0, "4.7.5", f"{fail.text} (required by {what})",
                                          fail.remote_mta)
                    if tls_problem:
                        self._tls_event(envelope, dp, hp, target, "failed", reason=e.text)
                    if fail.kind == PERMANENT:
                        last_perm = fail
                    else:
                        last_temp = fail
                    log.info("{text}", text=fail.text, target=str(target), dest=str(dest))
                    break
                except Exception as e:
                    text = f"connect to {target}: {connect_reason(e)}"
                    last_temp = HopFailure(TEMPORARY, 0, "4.4.1", text)
                    log.info("{text}", text=text, target=str(target), dest=str(dest))
                    break
                else:
                    self._conn_policy[conn] = (dp, hp)
                    info = session_info(conn)
                    problem = None
                    if hp.observe:
                        problem = info["pkix_error"] if info["version"] else "STARTTLS was not offered"
                    if problem:
                        self._tls_event(envelope, dp, hp, target, "testing-failed", reason=problem)
                    else:
                        record_session(self.tls_reports, dp, hp, target.name, target.ip, None)
                    log.info("connected to {remote} for {dest} (tls={tls} verified={verified})",
                             remote=conn.remote_mta, dest=str(dest), tls=info["version"] or "none",
                             verified=verified(hp, info))
                    return conn
        if last_temp is not None:
            raise last_temp
        if last_perm is not None:
            raise last_perm
        raise HopFailure(TEMPORARY, 0, "4.4.1", f"no address to try for {dest}")

    # -- TLS: what the log, the metrics and the TLS reports are told (relay.tlsrpt) -----

    def _tls_event(self, envelope: Envelope | None, dp: DomainPolicy, hp: HostPolicy, target: Target, result: str,
                   reason: str = "", rtype: str = "") -> None:
        tls_failure(self.tls_reports, envelope.queue_id if envelope is not None else "-", dp, hp, target.name,
                    target.ip, str(target), result, reason, rtype)

    def _tls_delivered(self, conn: Any, envelope: Envelope, got: list[Outcome]) -> list[Outcome]:
        """The delivered outcomes say how the session was protected (C{tls=... cipher=... verified=...})."""
        delivered = [o for o in got if o.kind == DELIVERED_OUTCOME]
        if not delivered:
            return got
        dp, hp = self._conn_policy.get(conn, (None, None))
        note = tls_delivered(envelope.queue_id, dp, hp, conn.remote_mta, session_info(conn), len(delivered))
        return [dataclasses.replace(o, text=o.text + note) if o.kind == DELIVERED_OUTCOME else o for o in got]
