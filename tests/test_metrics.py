"""
Metrics in memory: events in, Prometheus text out (parsed with
prometheus_client's own parser), and the real scheduler driven by a
task.Clock so the event names and fields the metrics read are the ones the
scheduler really emits.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from tlsauthharness import TLSAuthHarness
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.metrics import MailMetrics, MetricsObserver, reject_reason, spool_queue_stats
from mailhub.queue.scheduler import RetryPolicy, Scheduler
from mailhub.queue.spool import Spool

T0 = 1_700_000_000.0


def samples(metrics: MailMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: MailMetrics, name: str, **labels) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(T0)
    return c


def test_private_registry_and_initial_series(clock):
    a, b = MailMetrics(clock), MailMetrics(clock)
    a.observe({"mail_event": "bounce", "kind": "sender non-delivery notification", "dsn_id": "X", "queue_id": "Q"})
    assert value(a, "mailhub_bounces_total") == 1.0
    assert value(b, "mailhub_bounces_total") == 0.0
    assert REGISTRY.get_sample_value("mailhub_bounces_total") is None  # never the global registry
    for status in ("sent", "deferred", "bounced"):
        assert value(b, "mailhub_deliveries_total", status=status, transport="local") == 0.0
    assert value(b, "mailhub_queue_size") == 0.0 and value(b, "mailhub_oldest_message_age_seconds") == 0.0


def test_events_to_counters(clock):
    m = MailMetrics(clock)
    obs = MetricsObserver(m)
    obs({"mail_event": "connection", "listener": "submission", "tls": True})
    obs({"mail_event": "connection", "listener": "smtp"})
    obs({"mail_event": "starttls"})
    obs({"mail_event": "accepted", "proto": "ESMTPS", "queue_id": "A"})
    obs({"mail_event": "accepted", "proto": "HTTP", "queue_id": "B"})
    obs({"mail_event": "accepted", "listener": "submission", "queue_id": "C"})
    obs({"mail_event": "pickup", "queue_id": "D"})
    obs({"mail_event": "reject", "enhanced": "5.7.1", "code": 554})
    obs({"mail_event": "reject", "enhanced": "5.1.1", "code": 550})
    obs({"mail_event": "reject", "reason": "spam", "enhanced": "5.7.1"})
    obs({"mail_event": "reject", "reason": 'bad"label{', "enhanced": "4.3.0"})  # not a safe label: derived
    obs({"mail_event": "delivery", "status": "sent", "relay": "local", "delay": "3"})
    obs({"mail_event": "delivery", "status": "deferred", "relay": "mx.example.net[192.0.2.1]:25", "delay": "10"})
    obs({"mail_event": "delivery", "status": "bounced", "transport": "smtp", "delay": "7200"})
    obs({"mail_event": "delivery", "status": "weird"})
    obs({"mail_event": "bounce", "kind": "delay notification", "dsn_id": "Y"})
    obs({"mail_event": "bounce", "kind": "undeliverable bounce to postmaster discarded"})
    obs({"log_format": "not a mail event"})
    s = samples(m)
    assert s[("mailhub_connections_total", (("listener", "submission"),))] == 1.0
    assert s[("mailhub_connections_total", (("listener", "smtp"),))] == 1.0
    assert s[("mailhub_tls_connections_total", ())] == 2.0
    assert s[("mailhub_messages_accepted_total", (("listener", "smtp"),))] == 1.0
    assert s[("mailhub_messages_accepted_total", (("listener", "http"),))] == 1.0
    assert s[("mailhub_messages_accepted_total", (("listener", "submission"),))] == 1.0
    assert s[("mailhub_messages_accepted_total", (("listener", "pickup"),))] == 1.0
    assert s[("mailhub_messages_rejected_total", (("reason", "relay_denied"),))] == 1.0
    assert s[("mailhub_messages_rejected_total", (("reason", "unknown_recipient"),))] == 1.0
    assert s[("mailhub_messages_rejected_total", (("reason", "spam"),))] == 1.0
    assert s[("mailhub_messages_rejected_total", (("reason", "temporary"),))] == 1.0
    assert s[("mailhub_deliveries_total", (("status", "sent"), ("transport", "local")))] == 1.0
    assert s[("mailhub_deliveries_total", (("status", "deferred"), ("transport", "smtp")))] == 1.0
    assert s[("mailhub_deliveries_total", (("status", "bounced"), ("transport", "smtp")))] == 1.0
    assert s[("mailhub_bounces_total", ())] == 0.0
    # latency: only final outcomes (3 s sent, 7200 s bounced)
    assert s[("mailhub_delivery_latency_seconds_count", ())] == 2.0
    assert s[("mailhub_delivery_latency_seconds_sum", ())] == 7203.0
    assert s[("mailhub_delivery_latency_seconds_bucket", (("le", "5.0"),))] == 1.0
    assert s[("mailhub_delivery_latency_seconds_bucket", (("le", "3600.0"),))] == 1.0
    assert s[("mailhub_delivery_latency_seconds_bucket", (("le", "14400.0"),))] == 2.0


def test_reject_reason():
    assert reject_reason({"enhanced": "5.7.1"}) == "relay_denied"
    assert reject_reason({"enhanced": "5.7.1", "sender": "a@example.com", "rcpt": "b@example.org"}) == "relay_denied"
    assert reject_reason({"enhanced": "5.7.1", "sender": "a@example.com"}) == "sender_not_owned"
    assert reject_reason({"enhanced": "5.9.9"}) == "other"
    assert reject_reason({"enhanced": "4.9.9"}) == "temporary"
    assert reject_reason({"reason": "x" * 41, "enhanced": "5.1.1"}) == "unknown_recipient"


def test_queue_gauges_computed_at_scrape_time(tmp_path, clock):
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    m = MailMetrics(clock, spool_queue_stats(spool))
    assert value(m, "mailhub_queue_size") == 0.0
    spool.add(Envelope("0000000000000AAAAA", "a@example.com", [Recipient("b@example.org")], arrival=T0 - 100), b"x\r\n")
    spool.add(Envelope("0000000000001AAAAA", "a@example.com", [Recipient("b@example.org")], arrival=T0 - 5), b"x\r\n")
    assert value(m, "mailhub_queue_size") == 2.0
    assert value(m, "mailhub_oldest_message_age_seconds") == 100.0
    clock.advance(50)
    assert value(m, "mailhub_oldest_message_age_seconds") == 150.0
    spool.remove("0000000000000AAAAA")
    assert value(m, "mailhub_oldest_message_age_seconds") == 55.0


def test_history_per_minute(clock):
    sizes = iter([4, 2])
    m = MailMetrics(clock, lambda: (next(sizes), None))
    m.observe({"mail_event": "accepted", "proto": "ESMTP"})
    m.sample()
    clock.advance(120)
    m.observe({"mail_event": "delivery", "status": "sent", "relay": "local", "delay": "1"})
    m.observe({"mail_event": "delivery", "status": "bounced", "relay": "local", "delay": "1", "to": "x@y"})
    m.sample()
    h = m.history()
    assert len(h) == 60
    assert [(b.accepted, b.sent, b.bounced, b.queue_size) for b in h[-3:]] == [(1, 0, 0, 4), (0, 0, 0, None), (0, 1, 1, 2)]
    assert [d["to"] for d in m.recent.deliveries if "to" in d] == ["x@y"]
    clock.advance(3600)
    assert all(b.accepted == 0 and b.sent == 0 for b in m.history())


def test_recent_is_bounded(clock):
    m = MailMetrics(clock)
    for i in range(80):
        m.observe({"mail_event": "delivery", "status": "sent", "relay": "local", "delay": "1", "queue_id": str(i)})
    assert len(m.recent.deliveries) == 50
    assert m.recent.deliveries[-1]["queue_id"] == "79"


def test_observer_never_raises(clock, capsys):
    class Broken(MailMetrics):
        def observe(self, event):
            raise RuntimeError("boom")

    MetricsObserver(Broken(clock))({"mail_event": "accepted"})
    assert "boom" in capsys.readouterr().err


def test_fed_by_the_real_scheduler(tmp_path, clock):
    """A message with one deliverable and one failing recipient: the scheduler's own events drive the metrics."""
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    m = MailMetrics(clock, spool_queue_stats(spool))

    def deliver(env, recipients, report):
        return defer.succeed([
            Outcome.delivered(r.address) if not r.address.startswith("bad") else
            Outcome.permanent(r.address, "no such user", 550, "5.1.1", remote_mta="mx.example.net[192.0.2.1]:25")
            for r in recipients
        ])

    sched = Scheduler(spool, deliver, clock, RetryPolicy(), hostname="mx.example.com")
    obs = MetricsObserver(m)
    globalLogPublisher.addObserver(obs)
    try:
        sched.startService()
        env = Envelope("0000000000000AAAAA", "alice@example.com",
                       [Recipient("good@example.com"), Recipient("bad@example.net")], arrival=T0 - 30, next_attempt=T0)
        spool.add(env, b"Subject: x\r\n\r\nhi\r\n")
        sched.enqueue(env)
        clock.advance(0)
        # the DSN to alice is queued and delivered too
        clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(obs)
        sched.stopService()
    s = samples(m)
    assert s[("mailhub_deliveries_total", (("status", "sent"), ("transport", "local")))] == 2.0  # good@ and the DSN
    assert s[("mailhub_deliveries_total", (("status", "bounced"), ("transport", "smtp")))] == 1.0
    assert s[("mailhub_bounces_total", ())] == 1.0
    assert s[("mailhub_delivery_latency_seconds_count", ())] == 3.0
    assert s[("mailhub_queue_size", ())] == 0.0
    assert [b["kind"] for b in m.recent.bounces] == ["sender non-delivery notification"]


def test_rejections_are_counted_by_their_real_reason(tmp_path):
    """A sender-ownership refusal (553 5.7.1 at MAIL) is not a relay denial (554 5.7.1 at RCPT)."""
    h = TLSAuthHarness(tmp_path)
    m = MailMetrics(h.clock)
    observer = MetricsObserver(m)
    globalLogPublisher.addObserver(observer)
    try:
        c = h.authenticated()
        assert c.send("MAIL FROM:<bob@example.com>\r\n")[:10] == "553 5.7.1 "
        u = h.connect()
        u.send("EHLO client.test\r\n")
        u.send("MAIL FROM:<x@example.net>\r\n")
        assert u.send("RCPT TO:<y@elsewhere.example>\r\n")[:10] == "554 5.7.1 "
    finally:
        globalLogPublisher.removeObserver(observer)
    s = samples(m)
    assert s[("mailhub_messages_rejected_total", (("reason", "sender_not_owned"),))] == 1.0
    assert s[("mailhub_messages_rejected_total", (("reason", "relay_denied"),))] == 1.0


def test_every_metric_has_the_application_prefix(clock):
    names = [f.name for f in text_string_to_metric_families(MailMetrics(clock).exposition().decode())]
    assert names and all(n.startswith("mailhub_") for n in names), names
