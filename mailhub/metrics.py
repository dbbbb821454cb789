"""
Metrics: Prometheus counters, gauges and a histogram about mail flow, plus
the last hour per minute and the latest deliveries and bounces for the
status page.

Owns: a private L{CollectorRegistry} (never prometheus_client's global one,
so two instances -- tests, or two daemons in one process -- never mix),
the metric names, and the mapping from mail events (L{mailhub.maillog}) to
metric updates in L{MetricsObserver}.  No other module imports this one:
the metrics are fed from the log, so adding a metric never touches the
SMTP server or the scheduler.

Must not touch: the spool (except reading its envelope list through the
C{queue_stats} callable at scrape time), the network, configuration.

Mail events read (name: fields used):

- C{connection}: C{listener}, C{tls} (bool)        -> connections_total, tls_connections_total
- C{tls}/C{starttls}: --                           -> tls_connections_total
- C{accepted}: C{listener} (else from C{proto})    -> messages_accepted_total
- C{pickup}: --                                    -> messages_accepted_total{listener="pickup"}
- C{reject}: C{reason} (else from C{enhanced})     -> messages_rejected_total
- C{delivery}: C{status}, C{transport} (else from C{relay}), C{delay}
                                                   -> deliveries_total, delivery_latency_seconds
- C{bounce} with C{dsn_id}, not a delay notice      -> bounces_total
- C{rate_limited}: C{limit}                        -> rate_limited_total
- C{relay_tls}: C{policy}, C{result}, C{verified}, C{count}
                                                   -> relay_tls_total
- C{accepted} with C{spf}, C{dkim}, C{dmarc}         -> auth_results_total (mailhub.auth.check)
- C{dkim_sign}: C{a}                               -> dkim_signatures_total (mailhub.auth.sign)

Every name carries the application prefix L{NAMESPACE} (C{mailhub_}), as
Prometheus' naming rules ask: C{mailhub_messages_accepted_total}.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

__all__ = [
    "MailMetrics",
    "MetricsObserver",
    "MinuteBucket",
    "spool_queue_stats",
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "reject_reason",
]

log = Logger()

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: the prefix of every metric name (Prometheus naming: one application prefix)
NAMESPACE = "mailhub"

#: arrival -> final delivery: seconds to days (queue lifetime is 5 days)
LATENCY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 432000.0)

#: minutes kept for the status page charts
HISTORY_MINUTES = 60
#: recent deliveries / bounces kept for the status page
RECENT = 50

_STATUSES = ("sent", "deferred", "bounced")

# enhanced status -> reason label; labels must be a small fixed set
_REASONS = {
    "5.7.1": "relay_denied",
    "5.1.1": "unknown_recipient",
    "5.4.6": "alias_loop",
    "5.1.3": "bad_address",
    "5.1.2": "bad_address",
    "5.6.7": "bad_address",
    "4.5.3": "too_many_recipients",
    "5.3.4": "too_large",
    "5.2.3": "too_large",
    "5.7.0": "auth_required",
    "5.7.8": "auth_failed",
    "4.7.0": "rate_limited",
}


#: the authentication results counted (RFC 8601 words; anything else is ignored: bounded labels)
_AUTH_METHODS = ("spf", "dkim", "dmarc")
_AUTH_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror", "policy")


def reject_reason(event: dict[str, Any]) -> str:
    """
    A label for a rejection: the event's explicit C{reason}, or one derived
    from its enhanced code.  5.7.1 is both "relay denied" (RCPT, the event
    has C{rcpt}) and "sender not owned" (MAIL, no C{rcpt}).
    """
    reason = event.get("reason")
    if isinstance(reason, str) and reason and len(reason) <= 40 and reason.replace("_", "").isalnum():
        return reason
    enhanced = str(event.get("enhanced", ""))
    if enhanced == "5.7.1" and "rcpt" not in event and "sender" in event:
        return "sender_not_owned"
    if enhanced in _REASONS:
        return _REASONS[enhanced]
    return "temporary" if enhanced.startswith("4") else "other"


class _WallClock:
    def seconds(self) -> float:
        return time.time()


@dataclass
class MinuteBucket:
    """What happened in one minute (for the status page charts)."""

    minute: int  # int(seconds // 60)
    accepted: int = 0
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    queue_size: int | None = None  # last sample within the minute


@dataclass
class _Recent:
    deliveries: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    bounces: deque = field(default_factory=lambda: deque(maxlen=RECENT))


QueueStats = Callable[[], "tuple[int, float | None]"]


def spool_queue_stats(spool: Any) -> QueueStats:
    """
    A C{queue_stats} callable over a L{mailhub.queue.spool.Spool}: the number of
    queued messages and the arrival time of the oldest one.  Queue ids
    sort by arrival, so only the first readable envelope is loaded.
    """

    def stats() -> tuple[int, float | None]:
        ids = spool.queue_ids()
        for qid in ids[:10]:
            try:
                return len(ids), float(spool.load(qid).arrival)
            except Exception:  # removed meanwhile, corrupt: the next one
                continue
        return len(ids), None

    return stats


class _QueueCollector:
    """Gauges computed at scrape time, so they are never stale."""

    def __init__(self, metrics: MailMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        yield GaugeMetricFamily(f"{NAMESPACE}_queue_size", "Messages in the queue")
        yield GaugeMetricFamily(f"{NAMESPACE}_oldest_message_age_seconds", "Age of the oldest queued message")
        yield GaugeMetricFamily(f"{NAMESPACE}_smtp_sessions", "Open SMTP sessions", labels=["process"])
        yield GaugeMetricFamily(f"{NAMESPACE}_smtp_processes", "Processes serving SMTP sessions")

    def collect(self) -> Iterable[Any]:
        size, oldest = self.metrics.queue_stats()
        age = max(0.0, self.metrics.clock.seconds() - oldest) if oldest is not None else 0.0
        yield GaugeMetricFamily(f"{NAMESPACE}_queue_size", "Messages in the queue", value=size)
        yield GaugeMetricFamily(f"{NAMESPACE}_oldest_message_age_seconds", "Age of the oldest queued message", value=age)
        sessions = self.metrics.sessions() if self.metrics.sessions is not None else {}
        gauge = GaugeMetricFamily(
            f"{NAMESPACE}_smtp_sessions", "Open SMTP sessions, per process that serves them", labels=["process"]
        )
        for pid, count in sorted(sessions.items()):
            gauge.add_metric([str(pid)], count)
        yield gauge
        yield GaugeMetricFamily(f"{NAMESPACE}_smtp_processes", "Processes serving SMTP sessions", value=len(sessions))


class MailMetrics:
    """
    All of mailhub's metrics in one private registry.

    @param clock: time for the per-minute history and message ages.
    @param queue_stats: returns C{(queued messages, oldest arrival or None)};
        see L{spool_queue_stats}.  Without it the queue gauges read 0.
    """

    def __init__(self, clock: IReactorTime | None = None, queue_stats: QueueStats | None = None) -> None:
        self.clock = clock if clock is not None else _WallClock()
        self.queue_stats: QueueStats = queue_stats or (lambda: (0, None))
        #: open SMTP sessions per process id (the daemon sets it; the
        #: acceptor processes' counts come from the main process's anvil)
        self.sessions: Callable[[], dict[str, int]] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("connections", "Client connections accepted", ["listener"], namespace=NAMESPACE, registry=r)
        self.tls_connections = Counter("tls_connections", "Connections that negotiated TLS", namespace=NAMESPACE, registry=r)
        self.accepted = Counter("messages_accepted", "Messages queued", ["listener"], namespace=NAMESPACE, registry=r)
        self.rejected = Counter(
            "messages_rejected", "Recipients or messages refused", ["reason"], namespace=NAMESPACE, registry=r
        )
        self.deliveries = Counter(
            "deliveries", "Delivery attempts per recipient", ["status", "transport"], namespace=NAMESPACE, registry=r
        )
        self.bounces = Counter("bounces", "Non-delivery notifications queued", namespace=NAMESPACE, registry=r)
        self.rate_limited = Counter(
            "rate_limited", "Events refused or deferred by a rate limit", ["limit"], namespace=NAMESPACE, registry=r
        )
        self.relay_tls = Counter(
            "relay_tls", "Outbound recipients delivered, and sessions failed, by TLS policy and protection",
            ["policy", "result", "verified"], namespace=NAMESPACE, registry=r,
        )
        self.auth_results = Counter(
            "auth_results", "SPF, DKIM and DMARC results of accepted inbound mail", ["method", "result"],
            namespace=NAMESPACE, registry=r,
        )
        self.dkim_signatures = Counter(
            "dkim_signatures", "DKIM signatures made for outgoing mail", ["algorithm"], namespace=NAMESPACE, registry=r
        )
        self.latency = Histogram(
            "delivery_latency_seconds",
            "Arrival to final delivery (sent or bounced), per recipient",
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        r.register(_QueueCollector(self))
        # series that exist from the start read 0 instead of being absent,
        # so rate() and alerts work before the first event
        for status in _STATUSES:
            for transport in ("local", "smtp"):
                self.deliveries.labels(status=status, transport=transport)
        self.accepted.labels(listener="smtp")
        self._history: deque[MinuteBucket] = deque(maxlen=HISTORY_MINUTES)
        self.recent = _Recent()
        # labelled children by label values: Counter.labels() validates and
        # locks on every call, and it ran four times per message
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, counter: Any, *values: str) -> Any:
        key = (id(counter), *values)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 1024:  # label values come from events: stay bounded
                self._children.clear()
            child = self._children[key] = counter.labels(*values)
        return child

    # -- exposition ----------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        self.sample()
        return generate_latest(self.registry)

    # -- per-minute history ------------------------------------------------------

    def _bucket(self) -> MinuteBucket:
        minute = int(self.clock.seconds() // 60)
        if not self._history or self._history[-1].minute != minute:
            self._history.append(MinuteBucket(minute))
        return self._history[-1]

    def sample(self) -> None:
        """Record the current queue size in this minute's bucket (the status page and a timer call it)."""
        try:
            size, _ = self.queue_stats()
        except Exception:
            log.failure("metrics: cannot read the queue size")
            return
        self._bucket().queue_size = size

    def history(self, minutes: int = HISTORY_MINUTES) -> list[MinuteBucket]:
        """One bucket per minute for the last C{minutes}, oldest first, gaps filled with zeros."""
        now = int(self.clock.seconds() // 60)
        have = {b.minute: b for b in self._history}
        return [have.get(m, MinuteBucket(m)) for m in range(now - minutes + 1, now + 1)]

    # -- feeding --------------------------------------------------------------

    def observe(self, event: dict[str, Any]) -> None:
        """Update the metrics from one mail event (see the module docstring)."""
        name = event.get("mail_event")
        if name == "connection":
            self._child(self.connections, str(event.get("listener", "smtp"))).inc()
            if event.get("tls"):
                self.tls_connections.inc()
        elif name in ("tls", "starttls"):
            self.tls_connections.inc()
        elif name in ("accepted", "pickup"):
            if name == "pickup":
                listener = "pickup"
            else:
                listener = event.get("listener") or ("http" if str(event.get("proto", "")).upper() == "HTTP" else "smtp")
            self._child(self.accepted, str(listener)).inc()
            self._bucket().accepted += 1
            for method in _AUTH_METHODS:
                result = event.get(method)
                if result in _AUTH_RESULTS:
                    self._child(self.auth_results, method, str(result)).inc()
        elif name == "dkim_sign":
            algorithm = event.get("a")
            if algorithm in ("rsa-sha256", "ed25519-sha256"):
                self._child(self.dkim_signatures, str(algorithm)).inc()
        elif name == "reject":
            self._child(self.rejected, reject_reason(event)).inc()
        elif name == "delivery":
            self._delivery(event)
        elif name == "rate_limited":
            self._child(self.rate_limited, reject_reason({"reason": event.get("limit")})).inc()
        elif name == "relay_tls":
            try:
                count = max(0, int(event.get("count", 1)))
            except (TypeError, ValueError):
                count = 1
            self._child(self.relay_tls, str(event.get("policy", "")), str(event.get("result", "")),
                        str(event.get("verified", "none"))).inc(count)
        elif name == "bounce":
            dsn = event.get("dsn_id")
            if dsn and "delay" not in str(event.get("kind", "")):
                self.bounces.inc()
                self.recent.bounces.append(self._row(event))

    def _delivery(self, event: dict[str, Any]) -> None:
        status = str(event.get("status", ""))
        if status not in _STATUSES:
            return
        transport = event.get("transport")
        if not transport:
            transport = "local" if event.get("relay", "local") == "local" else "smtp"
        self._child(self.deliveries, status, str(transport)).inc()
        bucket = self._bucket()
        setattr(bucket, status, getattr(bucket, status) + 1)
        if status in ("sent", "bounced"):
            try:
                self.latency.observe(max(0.0, float(event.get("delay", 0))))
            except (TypeError, ValueError):
                pass
        self.recent.deliveries.append(self._row(event))

    def _row(self, event: dict[str, Any]) -> dict[str, Any]:
        keep = ("queue_id", "to", "orig_to", "relay", "delay", "attempts", "dsn", "status", "text", "kind", "dsn_id")
        row = {k: event[k] for k in keep if k in event}
        row["time"] = event.get("log_time", self.clock.seconds())
        return row


@implementer(ILogObserver)
class MetricsObserver:
    """
    The log observer that feeds L{MailMetrics}: add it to the global log
    publisher (tap.py).  Events without C{mail_event} are ignored; an error
    while counting is never raised into the logging system.
    """

    def __init__(self, metrics: MailMetrics) -> None:
        self.metrics = metrics

    def __call__(self, event: dict[str, Any]) -> None:
        if "mail_event" not in event:
            return
        try:
            self.metrics.observe(event)
        except Exception:
            # never log from inside an observer about itself: print instead
            import traceback

            traceback.print_exc()
