"""
Rate limits in memory: the counter's windows on a task.Clock, the limits'
verdicts, fail open and closed, and the SMTP session's replies at connect,
MAIL and RCPT (421 4.7.0 / 450 4.7.1), the relay agent's deferral and the
HTTP API's 429.  Redis: tests/test_e2e_ratelimit.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from smtpharness import EHLO, GREETING, HOST, MAIL_OK, RCPT_OK, Harness
from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher

from mailhub.configschema import LimitsConfig
from mailhub.envelope import Envelope, Recipient
from mailhub.maillog import mail_publisher
from mailhub.metrics import MailMetrics
from mailhub.ratelimit.counter import PRUNE_EVERY, CounterUnavailable, MemoryCounter
from mailhub.ratelimit.limits import RateLimits, Verdict, token_key
from mailhub.relay.agent import RemoteDelivery


def hit(counter: Any, key: str, window: float, cost: int = 1) -> int:
    result: list[int] = []
    counter.hit(key, window, cost).addCallback(result.append)
    assert result, "a memory counter answers at once"
    return result[0]


def test_memory_counter_window_starts_at_first_hit():
    clock = task.Clock()
    c = MemoryCounter(clock)
    assert [hit(c, "a", 60) for _ in range(3)] == [1, 2, 3]
    assert hit(c, "b", 60) == 1  # keys are separate
    clock.advance(59.9)
    assert hit(c, "a", 60, cost=5) == 8
    clock.advance(0.1)  # the window of "a" ended 60 s after its first hit
    assert hit(c, "a", 60) == 1
    clock.advance(59.5)
    assert hit(c, "a", 60) == 2


def test_memory_counter_forgets_ended_windows():
    clock = task.Clock()
    c = MemoryCounter(clock)
    for n in range(100):
        hit(c, f"k{n}", 1)
    clock.advance(2)
    for _ in range(PRUNE_EVERY):
        hit(c, "live", 10)
    assert len(c) == 1


def limits(counter: Any = None, clock: Any = None, **keys: Any) -> RateLimits:
    clock = clock or task.Clock()
    return RateLimits(LimitsConfig(**keys), counter or MemoryCounter(clock), clock)


def verdict_of(d: defer.Deferred) -> Verdict | None:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "answered at once"
    assert not isinstance(out[0], Exception)
    return out[0]


@pytest.fixture
def events():
    seen: list[dict] = []
    mail_publisher.addObserver(seen.append)
    yield seen
    mail_publisher.removeObserver(seen.append)


def test_limits_verdicts_and_events(events):
    rl = limits(client_messages_per_min=2, user_recipients_per_hour=3)
    assert verdict_of(rl.mail("192.0.2.1", None)) is None
    assert verdict_of(rl.mail("192.0.2.1", None)) is None
    v = verdict_of(rl.mail("192.0.2.1", None))
    assert v == Verdict(
        "client_messages", 450, "4.7.1",
        "Error: too many messages from your address (more than 2 per minute); try again later", 60,
    )
    assert verdict_of(rl.mail("192.0.2.2", None)) is None  # another address
    for _ in range(3):
        assert verdict_of(rl.rcpt("192.0.2.9", "alice@example.com")) is None
    v = verdict_of(rl.rcpt("192.0.2.10", "alice@example.com"))  # the user, from any address
    assert v is not None and v.limit == "user_recipients" and v.retry_after == 3600
    limited = [e for e in events if e.get("mail_event") == "rate_limited"]
    assert [(e["limit"], e["key"], e["count"], e["max"]) for e in limited] == [
        ("client_messages", "192.0.2.1", 3, 2),
        ("user_recipients", "alice@example.com", 4, 3),
    ]


def test_connection_limit_closes_and_exempt_networks():
    rl = limits(client_connections_per_min=1, exempt_networks=("10.0.0.0/8",))
    assert verdict_of(rl.connection("192.0.2.1")) is None
    v = verdict_of(rl.connection("192.0.2.1"))
    assert v is not None and (v.code, v.enhanced, v.limit) == (421, "4.7.0", "client_connections")
    for _ in range(5):
        assert verdict_of(rl.connection("10.1.2.3")) is None


def test_no_limit_set_counts_nothing():
    class Refuse:
        def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
            raise AssertionError("counted")

    rl = limits(Refuse())
    assert not rl.active
    assert verdict_of(rl.mail("192.0.2.1", "alice@example.com")) is None


class Down:
    def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
        return defer.fail(CounterUnavailable("redis: Connection refused"))


def test_store_down_fails_open_or_closed(events):
    warnings: list[dict] = []
    globalLogPublisher.addObserver(warnings.append)
    try:
        clock = task.Clock()
        rl = limits(Down(), clock, client_messages_per_min=5)
        assert verdict_of(rl.mail("192.0.2.1", None)) is None
        assert verdict_of(rl.mail("192.0.2.1", None)) is None
        said = [e for e in warnings if "cannot count" in str(e.get("log_format", ""))]
        assert len(said) == 1 and said[0]["log_level"] == LogLevel.warn  # once a minute, not per event
        clock.advance(60)
        closed = limits(Down(), clock, client_messages_per_min=5, client_connections_per_min=5,
                        redis_failure="closed")
        v = verdict_of(closed.mail("192.0.2.1", None))
        assert v is not None and (v.code, v.enhanced, v.limit) == (451, "4.3.0", "unavailable")
        v = verdict_of(closed.connection("192.0.2.1"))
        assert v is not None and (v.code, v.enhanced) == (421, "4.3.0")
    finally:
        globalLogPublisher.removeObserver(warnings.append)


def test_api_token_key_never_the_token():
    rl = limits(token_messages_per_hour=1, token_recipients_per_hour=10)
    assert verdict_of(rl.api_message("192.0.2.1", "secret-token", 4)) is None
    v = verdict_of(rl.api_message("192.0.2.1", "secret-token", 1))
    assert v is not None and v.limit == "token_messages"
    other = limits(token_recipients_per_hour=10)
    assert verdict_of(other.api_message("192.0.2.1", "t", 10)) is None
    v = verdict_of(other.api_message("192.0.2.1", "t", 1))
    assert v is not None and v.limit == "token_recipients"
    assert "secret" not in token_key("secret-token") and len(token_key("x")) == 16


def test_metric_counts_rate_limited_events():
    metrics = MailMetrics(task.Clock())
    metrics.observe({"mail_event": "rate_limited", "limit": "client_messages"})
    metrics.observe({"mail_event": "rate_limited", "limit": "client_messages"})
    assert b'mailhub_rate_limited_total{limit="client_messages"} 2.0' in metrics.exposition()


# -- the SMTP session ------------------------------------------------------------------


def serve(tmp_path: Any, counter: Any = None, **keys: Any) -> Harness:
    h = Harness(tmp_path, trusted_networks=())
    h.serve(ratelimit=RateLimits(LimitsConfig(**keys), counter or MemoryCounter(h.clock), h.clock))
    return h


def test_smtp_connection_rate(tmp_path):
    h = serve(tmp_path, client_connections_per_min=2)
    assert h.connect().greeting == GREETING
    assert h.connect().greeting == GREETING
    third = h.connect()
    assert third.greeting == (
        f"421 4.7.0 {HOST} Error: too many connections from your address (more than 2 per minute);"
        " try again later\r\n"
    )
    assert third.closed
    h.clock.advance(60)
    assert h.connect().greeting == GREETING


def test_smtp_message_and_recipient_rates(tmp_path):
    h = serve(tmp_path, client_messages_per_min=1, client_recipients_per_min=2)
    c = h.connect()
    assert c.send("EHLO client.example\r\n") == EHLO
    assert c.send("MAIL FROM:<x@client.example>\r\n") == MAIL_OK
    assert c.send("RCPT TO:<alice@example.com>\r\n") == RCPT_OK
    assert c.send("RCPT TO:<bob@example.com>\r\n") == RCPT_OK
    assert c.send("RCPT TO:<alice@example.com>\r\n") == (
        "450 4.7.1 Error: too many recipients from your address (more than 2 per minute); try again later\r\n"
    )
    assert c.send("RSET\r\n") == "250 2.0.0 Ok\r\n"
    # pipelined: the refused MAIL is answered in order, and the session goes on
    assert c.send("MAIL FROM:<x@client.example>\r\nNOOP\r\n") == (
        "450 4.7.1 Error: too many messages from your address (more than 1 per minute); try again later\r\n"
        "250 2.0.0 Ok\r\n"
    )
    assert not c.closed


def test_smtp_waits_for_a_slow_counter(tmp_path):
    class Slow:
        def __init__(self) -> None:
            self.pending: list[defer.Deferred[int]] = []

        def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
            d: defer.Deferred[int] = defer.Deferred()
            self.pending.append(d)
            return d

    slow = Slow()
    h = serve(tmp_path, slow, client_messages_per_min=1)
    c = h.connect()
    assert c.send("EHLO client.example\r\n") == EHLO
    # MAIL waits for the count; RCPT, pipelined after it, waits too
    assert c.send("MAIL FROM:<x@client.example>\r\nRCPT TO:<alice@example.com>\r\n") == ""
    slow.pending.pop().callback(1)
    assert c.read() == MAIL_OK + RCPT_OK
    assert c.send("RSET\r\nMAIL FROM:<x@client.example>\r\n") == "250 2.0.0 Ok\r\n"
    slow.pending.pop().errback(CounterUnavailable("down"))  # fails open by default
    assert c.read() == MAIL_OK
    c.lose()
    assert slow.pending == []


def test_smtp_counter_answer_after_the_client_left(tmp_path):
    slow: list[defer.Deferred[int]] = []

    class Slow:
        def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
            d: defer.Deferred[int] = defer.Deferred()
            slow.append(d)
            return d

    h = serve(tmp_path, Slow(), client_messages_per_min=1)
    c = h.connect()
    c.send("EHLO client.example\r\nMAIL FROM:<x@client.example>\r\n")
    c.lose()
    slow.pop().callback(5)  # nobody to answer: nothing is written, nothing fails
    assert c.read() == ""


def test_smtp_authenticated_user_limit_uses_the_user(tmp_path):
    h = serve(tmp_path, user_messages_per_hour=1)
    seen: list[tuple[str, str | None]] = []
    real = h.factory.ratelimit

    class Spy:
        active = True

        def connection(self, ip: str) -> Any:
            return real.connection(ip)

        def mail(self, ip: str, user: str | None) -> Any:
            seen.append((ip, user))
            return real.mail(ip, user)

        def rcpt(self, ip: str, user: str | None) -> Any:
            return real.rcpt(ip, user)

    h.factory.ratelimit = Spy()  # type: ignore[assignment]
    c = h.connect()
    c.proto.session.authenticated_user = "alice@example.com"
    c.send("EHLO client.example\r\n")
    assert c.send("MAIL FROM:<alice@example.com>\r\n") == MAIL_OK
    c.send("RSET\r\n")
    assert c.send("MAIL FROM:<alice@example.com>\r\n").startswith(
        "450 4.7.1 Error: too many messages for your user (more than 1 per hour)"
    )
    assert seen == [("198.51.100.7", "alice@example.com")] * 2


# -- the relay agent -------------------------------------------------------------------------


def test_relay_defers_recipients_over_the_destination_rate(tmp_path, events):
    clock = task.Clock()
    rl = limits(MemoryCounter(clock), clock, domain_messages_per_sec=1)
    sent: list[list[str]] = []
    agent = RemoteDelivery(clock, "mx.example.com", ratelimit=rl)

    def fake_deliver(envelope: Any, recipients: list[Recipient], path: str, report: Any) -> defer.Deferred:
        sent.append([r.address for r in recipients])
        from mailhub.envelope import Outcome

        return defer.succeed([Outcome.delivered(r.address) for r in recipients])

    agent._deliver = fake_deliver  # type: ignore[method-assign]
    env = Envelope("Q1", "s@example.com", [], 0.0)
    rcpts = [Recipient("a@one.example"), Recipient("b@one.example"), Recipient("c@two.example")]
    reported: list = []
    out: list = []
    agent.deliver(env, rcpts, "/nonexistent", reported.extend).addCallback(out.append)
    assert sent == [["a@one.example", "b@one.example", "c@two.example"]]
    out.clear()
    agent.deliver(env, rcpts, "/nonexistent", reported.extend).addCallback(out.append)
    kinds = {o.recipient: (o.kind, o.code, o.status) for o in out[0]}
    assert kinds == {
        "a@one.example": ("temporary", 0, "4.4.5"),
        "b@one.example": ("temporary", 0, "4.4.5"),
        "c@two.example": ("temporary", 0, "4.4.5"),
    }
    assert "too many messages to this domain" in out[0][0].text
    assert out[0][0].text == (
        "rate limited: Error: too many messages to this domain (more than 1 per second); try again later"
    )
    assert {o.retry_after for o in out[0]} == {1.0}  # postponed for the window, not a failed attempt
    lines = [e for e in events if e.get("mail_event") == "rate_limited"]
    assert [e["key"] for e in lines] == ["one.example", "two.example"]
    assert lines[0]["log_format"] == (
        "NOQUEUE: rate limit: RELAY to one.example: 450 4.7.1 Error: too many messages to this domain"
        " (more than 1 per second); try again later; limit=domain_messages key=one.example count=2"
    )
    clock.advance(1)
    out.clear()
    agent.deliver(env, rcpts[2:], "/nonexistent", reported.extend).addCallback(out.append)
    assert [o.kind for o in out[0]] == ["delivered"]


def test_limits_config_defaults_are_off():
    cfg = LimitsConfig()
    assert all(getattr(cfg, f.name) == 0 for f in dataclasses.fields(cfg) if f.name.endswith(("_min", "_hour", "_sec")))
    assert (cfg.redis, cfg.redis_failure) == (None, "open")


# -- the HTTP API ---------------------------------------------------------------------------


def test_http_api_token_limits(tmp_path):
    from httpharness import Env, message_json, post_json

    env = Env(tmp_path)
    env.site.resource.ratelimit = limits(MemoryCounter(env.clock), env.clock, token_messages_per_hour=2,
                                         token_recipients_per_hour=3)
    assert post_json(env, message_json()).status == 202
    assert post_json(env, message_json()).status == 202
    r = post_json(env, message_json())
    assert (r.status, r.headers["retry-after"]) == (429, "3600"), r.raw
    assert r.json()["error"] == "Error: too many messages for this token (more than 2 per hour); try again later"
    assert post_json(env, message_json(**{"from": "root@example.com"}), token="root").status == 202  # another token
    three = ["a@example.org", "b@example.org", "c@example.org"]
    r = post_json(env, message_json(**{"from": "root@example.com", "to": three}), token="root")
    assert r.status == 429 and "too many recipients for this token" in r.json()["error"]
    env.clock.advance(3600)
    assert post_json(env, message_json()).status == 202
    env.site.resource.ratelimit = limits(Down(), env.clock, token_messages_per_hour=2, redis_failure="closed")
    r = post_json(env, message_json())
    assert (r.status, r.json()["error"]) == (503, "Error: rate limit service unavailable; try again later")


def test_smtp_a_failing_limit_check_is_a_temporary_error(tmp_path):
    class Broken:
        active = True

        def connection(self, ip: str) -> Any:
            return defer.fail(RuntimeError("bug"))

        def mail(self, ip: str, user: str | None) -> Any:
            return defer.fail(RuntimeError("bug"))

    h = Harness(tmp_path, trusted_networks=())
    h.serve(ratelimit=Broken())
    c = h.connect()
    assert c.greeting == f"421 4.3.0 {HOST} Error: rate limit service unavailable; try again later\r\n"
    h.factory.ratelimit.connection = lambda ip: defer.succeed(None)  # type: ignore[union-attr]
    c = h.connect()
    c.send("EHLO client.example\r\n")
    assert c.send("MAIL FROM:<x@client.example>\r\n") == (
        "451 4.3.0 Error: rate limit service unavailable; try again later\r\n"
    )
    assert not c.closed
