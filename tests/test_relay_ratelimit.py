"""
The relay's per-destination rate limit (C{limits.domain_messages_per_sec})
with the scheduler, in memory with a task.Clock: recipients over the limit
are postponed, not failed -- tried again after the limit's window (about a
second), not after the retry backoff; no attempt is counted, nothing is
written, no bounce or delay notice, a "rate-limited" log line -- and a
burst of messages to one domain is spread over about N/limit seconds.
With a real daemon and smtp-sink: tests/test_e2e_relay_ratelimit.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent

from mailhub.configschema import LimitsConfig
from mailhub.envelope import DELIVERED, PENDING, Envelope, Outcome, Recipient
from mailhub.maillog import mail_publisher
from mailhub.queue.scheduler import RetryPolicy, Scheduler
from mailhub.queue.spool import Spool
from mailhub.ratelimit.counter import MemoryCounter
from mailhub.ratelimit.limits import RateLimits
from mailhub.relay.agent import RemoteDelivery

T0 = 1_700_000_000.0


def queue(spool: Spool, clock: task.Clock, rcpts: tuple[str, ...]) -> Envelope:
    writer = spool.new_message()
    writer.write(b"Subject: hello\r\nFrom: alice@example.com\r\n\r\nHi there.\r\n")
    env = Envelope(queue_id=writer.queue_id, sender="alice@example.com", recipients=[Recipient(r) for r in rcpts],
                   arrival=clock.seconds(), next_attempt=clock.seconds())
    writer.commit(env)
    return env


def notices(spool: Spool) -> list[Envelope]:
    """Queued messages from <> (bounces, delay notices)."""
    return [env for env in spool if env.sender == ""]


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(T0)
    return c


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(str(tmp_path / "spool"), fsync=False)


@pytest.fixture
def events():
    seen: list[dict] = []
    mail_publisher.addObserver(seen.append)
    yield seen
    mail_publisher.removeObserver(seen.append)


class Relay:
    """The remote agent with a destination limit; its transactions are recorded and answered at once."""

    def __init__(self, clock: task.Clock, per_sec: int, fail: dict[str, Outcome] | None = None) -> None:
        self.clock = clock
        self.sent: list[tuple[float, str, list[str]]] = []
        self.fail = fail or {}
        limits = RateLimits(LimitsConfig(domain_messages_per_sec=per_sec), MemoryCounter(clock), clock)
        self.agent = RemoteDelivery(clock, "mx.example.com", ratelimit=limits)
        self.agent._deliver = self._transaction  # type: ignore[method-assign]

    def _transaction(self, envelope: Any, recipients: list[Recipient], path: str, report: Any) -> defer.Deferred:
        self.sent.append((self.clock.seconds(), envelope.queue_id, [r.address for r in recipients]))
        return defer.succeed([self.fail.get(r.address) or Outcome.delivered(r.address, "250 ok", "sink[127.0.0.1]:25")
                              for r in recipients])

    def __call__(self, envelope, recipients, report):
        if envelope.sender == "":
            return defer.Deferred()  # notices stay queued, to be read
        return self.agent.deliver(envelope, recipients, "/nonexistent", report)


def make(spool, clock, deliver, **kw) -> Scheduler:
    s = Scheduler(spool, deliver, clock, RetryPolicy(jitter=0.0, delay_warning=0.5, **kw), hostname="mx.example.org")
    s.startService()
    return s


def advance(clock: task.Clock, seconds: float, step: float = 0.25) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_burst_is_spread_over_the_windows(spool, clock, events):
    relay = Relay(clock, per_sec=2)
    envs = [queue(spool, clock, rcpts=(f"u{i}@dest.example",)) for i in range(7)]
    make(spool, clock, relay)
    assert len(relay.sent) == 2  # the first window's two
    advance(clock, 5)
    assert spool.queue_ids() == []  # all delivered
    times = sorted(t - T0 for t, _, _ in relay.sent)
    assert [round(t, 1) for t in times] == [0, 0, 1, 1, 2, 2, 3]  # 2 a second, not 2 then a backoff
    lines = [formatEvent(e) for e in events if e.get("mail_event") == "postponed"]
    qid = envs[-1].queue_id
    assert f"{qid}: to=<u6@dest.example>, orig_to=<u6@dest.example>, delay=0, attempts=0, " \
           "status=rate-limited (rate limited: Error: too many messages to this domain " \
           "(more than 2 per second); try again later); next try in 1s" in lines
    sent = [formatEvent(e) for e in events if e.get("mail_event") == "delivery"]
    assert len(sent) == 7 and all("status=sent" in line and "attempts=1," in line for line in sent)
    assert not any(e.get("mail_event") == "delivery" and "status=deferred" in formatEvent(e) for e in events)
    assert notices(spool) == []  # no delay notice, though older than delay_warning


def test_postponed_round_is_no_attempt_and_writes_nothing(spool, clock, monkeypatch):
    relay = Relay(clock, per_sec=1)
    first = queue(spool, clock, rcpts=("a@dest.example",))
    env = queue(spool, clock, rcpts=("b@dest.example",))
    writes: list[str] = []
    real_update = spool.update
    monkeypatch.setattr(spool, "update", lambda e: (writes.append(e.queue_id), real_update(e))[1])
    s = make(spool, clock, relay)
    held = s._queue[env.queue_id]
    assert held.attempts == 0 and held.recipients[0].attempts == 0
    assert held.recipients[0].state == PENDING and held.recipients[0].last_text == ""
    assert s.next_due(env.queue_id) == T0 + 1  # the window, not min_backoff (300)
    assert writes == []  # nothing on the envelope changed
    assert spool.load(env.queue_id).attempts == 0
    clock.advance(1)
    assert [q for _, q, _ in relay.sent] == [first.queue_id, env.queue_id]
    assert spool.queue_ids() == []


def test_mixed_message_keeps_the_backoff_of_a_real_failure(spool, clock):
    busy = Outcome.temporary("x@other.example", "451 busy", 451, "4.2.0")
    relay = Relay(clock, per_sec=1, fail={"x@other.example": busy})
    queue(spool, clock, rcpts=("a@dest.example",))
    env = queue(spool, clock, rcpts=("b@dest.example", "x@other.example"))
    s = make(spool, clock, relay)
    held = s._queue[env.queue_id]
    # b postponed (not tried), x tried and deferred: the round counts, the backoff applies to both
    assert held.attempts == 1
    b, x = held.recipients
    assert (b.attempts, x.attempts) == (0, 1)
    assert s.next_due(env.queue_id) == T0 + 300
    assert spool.load(env.queue_id).next_attempt == T0 + 300


def test_postponed_next_to_a_delivery_is_retried_after_the_window(spool, clock):
    relay = Relay(clock, per_sec=1)
    queue(spool, clock, rcpts=("a@dest.example",))
    env = queue(spool, clock, rcpts=("b@dest.example", "c@other.example"))
    s = make(spool, clock, relay)
    held = s._queue[env.queue_id]
    assert [r.state for r in held.recipients] == [PENDING, DELIVERED]
    assert held.attempts == 1  # something was tried
    assert s.next_due(env.queue_id) == T0 + 1
    clock.advance(1)
    assert spool.queue_ids() == []
    assert relay.sent[-1][2] == ["b@dest.example"]
