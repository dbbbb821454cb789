"""
The configured rate limits (C{[limits]}, docs/ratelimits.rst) and what
going over one means.

Owns: L{RateLimits}: which counters each event hits (a connection, a
MAIL, a RCPT, an HTTP submission, a relay transaction to a domain), with
which window (a minute per client address, an hour per authenticated
user and per API token, a second per destination domain), the verdict
when a count is over its limit (L{Verdict}: the SMTP reply code,
enhanced status and text), the C{rate_limited} mail event of every
verdict (log line and metric, L{mailhub.metrics}), and the behaviour when
the counter's store is down (C{redis_failure}: C{"open"} lets the event
through, C{"closed"} refuses it with a 4xx).  Exempt client networks
(C{exempt_networks}) skip the per-address limits.

Must not touch: the counting itself (L{mailhub.ratelimit.counter.Counter}:
memory or Redis), replies on the wire (the SMTP session, the HTTP API and
the relay agent turn a verdict into their own answer).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.maillog import mail_event
from mailhub.ratelimit.counter import Counter

__all__ = ["RateLimits", "Verdict", "MINUTE", "HOUR", "SECOND", "token_key"]

log = Logger()

SECOND, MINUTE, HOUR = 1.0, 60.0, 3600.0

#: Seconds between two log lines about the counter's store being down.
UNAVAILABLE_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class Verdict:
    """
    An event refused by a limit (or by the store being down, failing closed).

    @ivar limit: the limit's name (C{client_messages}...; C{unavailable}).
    @ivar code: C{421} (close the connection), C{450} or C{451}.
    @ivar enhanced: C{4.7.0}, C{4.7.1} or C{4.3.0}.
    @ivar text: what the client reads.
    @ivar retry_after: seconds after which trying again may succeed (the window).
    """

    limit: str
    code: int
    enhanced: str
    text: str
    retry_after: int


#: limit name -> (config attribute, window, what is counted (for the text), per what)
_LIMITS: dict[str, tuple[str, float, str, str]] = {
    "client_connections": ("client_connections_per_min", MINUTE, "connections", "from your address"),
    "client_messages": ("client_messages_per_min", MINUTE, "messages", "from your address"),
    "client_recipients": ("client_recipients_per_min", MINUTE, "recipients", "from your address"),
    "user_messages": ("user_messages_per_hour", HOUR, "messages", "for your user"),
    "user_recipients": ("user_recipients_per_hour", HOUR, "recipients", "for your user"),
    "token_messages": ("token_messages_per_hour", HOUR, "messages", "for this token"),
    "token_recipients": ("token_recipients_per_hour", HOUR, "recipients", "for this token"),
    "domain_messages": ("domain_messages_per_sec", SECOND, "messages", "to this domain"),
}


def token_key(token: str) -> str:
    """The name an API token is counted under: never the token itself (keys are logged and stored)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


class RateLimits:
    """
    The limits of C{config} (a L{mailhub.configschema.LimitsConfig}),
    counted on C{counter}.  Every check fires with C{None} (go on) or a
    L{Verdict}; none fails.

    @param clock: for spacing the log lines about an unavailable store.
    """

    def __init__(self, config: Any, counter: Counter, clock: Any) -> None:
        self.config = config
        self.counter = counter
        self.clock = clock
        self.fail_open = config.redis_failure == "open"
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in config.exempt_networks]
        self._unavailable_logged = -UNAVAILABLE_LOG_INTERVAL

    @property
    def active(self) -> bool:
        """Some limit is set."""
        return any(getattr(self.config, attr) for attr, _, _, _ in _LIMITS.values())

    def max(self, limit: str) -> int:
        return int(getattr(self.config, _LIMITS[limit][0]))

    def exempt(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in self._exempt)

    # -- the events ------------------------------------------------------------

    def connection(self, ip: str) -> Deferred[Verdict | None]:
        """A client connected (C{421 4.7.0} over the limit: the session closes)."""
        hits = [] if self.exempt(ip) else [("client_connections", ip, 1)]
        return self._check(hits, "CONNECT", ip, closing=True)

    def mail(self, ip: str, user: str | None) -> Deferred[Verdict | None]:
        """A MAIL command (counted whether it is accepted or not, as Postfix's anvil does)."""
        hits = [] if self.exempt(ip) else [("client_messages", ip, 1)]
        if user:
            hits.append(("user_messages", user, 1))
        return self._check(hits, "MAIL", ip)

    def rcpt(self, ip: str, user: str | None) -> Deferred[Verdict | None]:
        """A RCPT command."""
        hits = [] if self.exempt(ip) else [("client_recipients", ip, 1)]
        if user:
            hits.append(("user_recipients", user, 1))
        return self._check(hits, "RCPT", ip)

    def api_message(self, ip: str, token: str, recipients: int) -> Deferred[Verdict | None]:
        """An HTTP submission with C{recipients} recipients, authenticated by C{token}."""
        name = token_key(token)
        hits = [("token_messages", name, 1), ("token_recipients", name, max(1, recipients))]
        return self._check(hits, "HTTP", ip)

    def destination(self, domain: str) -> Deferred[Verdict | None]:
        """One relay transaction to C{domain} is about to start."""
        return self._check([("domain_messages", domain.lower(), 1)], "RELAY", "")

    # -- counting ---------------------------------------------------------------

    def _check(
        self, hits: Iterable[tuple[str, str, int]], where: str, client: str, closing: bool = False
    ) -> Deferred[Verdict | None]:
        wanted = [(limit, key, cost) for limit, key, cost in hits if self.max(limit) > 0]
        if not wanted:
            return defer.succeed(None)
        counts = [
            defer.maybeDeferred(self.counter.hit, f"{limit}:{key}", _LIMITS[limit][1], cost)
            for limit, key, cost in wanted
        ]
        d: Deferred[Any] = defer.DeferredList(counts, consumeErrors=True)
        d.addCallback(self._judge, wanted, where, client, closing)
        return d

    def _judge(
        self, results: list[tuple[bool, Any]], wanted: list[tuple[str, str, int]], where: str, client: str,
        closing: bool,
    ) -> Verdict | None:
        for (ok, value), (limit, key, _cost) in zip(results, wanted, strict=True):
            if not ok:
                verdict = self._unavailable(value, where, client, closing)
                if verdict is not None:
                    return verdict
                continue
            maximum = self.max(limit)
            if value > maximum:
                attr, window, what, per = _LIMITS[limit]
                unit = {SECOND: "second", MINUTE: "minute", HOUR: "hour"}[window]
                code, enhanced = (421, "4.7.0") if closing else (450, "4.7.1")
                text = f"Error: too many {what} {per} (more than {maximum} per {unit}); try again later"
                verdict = Verdict(limit, code, enhanced, text, int(window))
                party = "from [{client}]" if client else "to {key}"
                mail_event(
                    "rate_limited",
                    "NOQUEUE: rate limit: {where} " + party + ": {code} {enhanced} {text}; limit={limit} key={key}"
                    " count={count}",
                    where=where, client=client, code=code, enhanced=enhanced, text=text, limit=limit, key=key,
                    count=value, max=maximum,
                )
                return verdict
        return None

    def _unavailable(self, failure: Failure, where: str, client: str, closing: bool) -> Verdict | None:
        now = self.clock.seconds()
        if now - self._unavailable_logged >= UNAVAILABLE_LOG_INTERVAL:
            self._unavailable_logged = now
            log.warn(
                "rate limits: the counter cannot count ({error}); failing {how} (limits.redis_failure)",
                error=failure.getErrorMessage(), how="open" if self.fail_open else "closed",
            )
        if self.fail_open:
            return None
        code = 421 if closing else 451
        text = "Error: rate limit service unavailable; try again later"
        mail_event(
            "rate_limited",
            "NOQUEUE: rate limit: {where} from [{client}]: {code} {enhanced} {text}; limit={limit}",
            where=where, client=client, code=code, enhanced="4.3.0", text=text, limit="unavailable",
        )
        return Verdict("unavailable", code, "4.3.0", text, 60)


def build_rate_limits(config: Any, reactor: Any) -> tuple[RateLimits | None, Any]:
    """
    The daemon's limits from C{config.limits}: (L{RateLimits} or C{None}
    when no limit is set, the Redis counter's service to start with the
    daemon or C{None} when counting in memory).
    """
    from mailhub.ratelimit.counter import MemoryCounter

    cfg = config.limits
    counter: Any
    service = None
    if cfg.redis:
        from mailhub.ratelimit.redisstore import RedisCounter

        counter = service = RedisCounter(cfg.redis, reactor, timeout=cfg.redis_timeout)
    else:
        counter = MemoryCounter(reactor)
    limits = RateLimits(cfg, counter, reactor)
    if not limits.active:
        return None, None
    return limits, service
