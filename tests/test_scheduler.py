"""
Scheduler tests: a task.Clock, a real Spool in tmp_path, and a fake
deliver() whose Deferreds the tests fire (or which answers from a script).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
from dataclasses import dataclass, field

import pytest
from agentfakes import FakeDeliver, Scripted, SlowAndFast
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent

from mailhub.envelope import DELIVERED, FAILED, PENDING, Envelope, Outcome, Recipient, ReportFunction
from mailhub.queue.queuefile import FOOTER_SIZE
from mailhub.queue.scheduler import RetryPolicy, Scheduler
from mailhub.queue.spool import Spool

T0 = 1_700_000_000.0
BODY = b"Subject: hello\r\nFrom: alice@example.com\r\nMessage-ID: <m1@example.com>\r\n\r\nHi there.\r\n"


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(T0)
    return c


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(str(tmp_path / "spool"), fsync=False)


def delivery_lines(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("mail_event") == "delivery"]


def queue(spool: Spool, clock: task.Clock, rcpts=("bob@example.org",), sender="alice@example.com", body=BODY, **kw) -> Envelope:
    writer = spool.new_message()
    writer.write(body)
    env = Envelope(
        queue_id=writer.queue_id,
        sender=sender,
        recipients=[r if isinstance(r, Recipient) else Recipient(r) for r in rcpts],
        arrival=clock.seconds(),
        next_attempt=clock.seconds(),
        **kw,
    )
    writer.commit(env)
    return env


def make(spool, clock, deliver, policy=None, **kw) -> Scheduler:
    s = Scheduler(spool, deliver, clock, policy or RetryPolicy(jitter=0.0), hostname="mx.example.org", **kw)
    s.startService()
    return s


_FOOTER = re.compile(rb"\n#mailhub-queue 2 ([0-9a-f]{16}) ([0-9a-f]{8})\n")


def on_disk(spool: Spool, qid: str) -> dict:
    """
    The envelope a restart would read, straight from the files: the
    envelope file once the envelope changed after the commit, else the copy
    in the queue file (found through its footer).  FileNotFoundError: the
    message is not queued.
    """
    with open(spool.message_path(qid), "rb") as queued:
        try:
            with open(spool.envelope_path(qid), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            pass
        size = os.fstat(queued.fileno()).st_size
        queued.seek(size - FOOTER_SIZE)
        footer = _FOOTER.fullmatch(queued.read())
        assert footer, f"{qid}: not a queue file"
        message_length, envelope_length = int(footer[1], 16), int(footer[2], 16)
        assert message_length + envelope_length + FOOTER_SIZE == size
        queued.seek(message_length)
        return json.loads(queued.read(envelope_length))


def dsns(spool: Spool) -> list[tuple[Envelope, email.message.EmailMessage]]:
    """Every queued message from <> with its parsed bytes."""
    out = []
    for env in spool:
        if env.sender == "":
            with spool.open_message(env.queue_id) as f:
                out.append((env, email.message_from_bytes(f.read(), policy=email.policy.default)))
    return out


def report(msg) -> tuple[dict, list[dict]]:
    """(per-message fields, [per-recipient fields]) of a parsed DSN."""
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = [dict(b.items()) for b in status.get_payload()]
    return blocks[0], blocks[1:]


# -- retries ----------------------------------------------------------------------


def test_temporary_three_times_then_delivered_at_backoff_times(spool, clock, events):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "try later")] * 3})
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    assert [c.at for c in deliver.calls] == [T0]
    assert on_disk(spool, env.queue_id)["next_attempt"] == T0 + 300
    clock.advance(299.9)
    assert len(deliver.calls) == 1
    clock.advance(0.1)
    assert len(deliver.calls) == 2
    clock.advance(600)
    clock.advance(1200)
    assert [c.at for c in deliver.calls] == [T0, T0 + 300, T0 + 900, T0 + 2100]
    assert spool.queue_ids() == [] and len(s) == 0
    assert not clock.getDelayedCalls()
    lines = delivery_lines(events)
    assert lines[0] == (
        f"{env.queue_id}: to=<bob@example.org>, orig_to=<bob@example.org>, relay=local, delay=0, "
        "attempts=1, dsn=4.2.0, status=deferred (try later)"
    )
    assert lines[-1] == (
        f"{env.queue_id}: to=<bob@example.org>, orig_to=<bob@example.org>, relay=local, delay=2100, "
        "attempts=4, dsn=2.0.0, status=sent (delivered)"
    )


def test_backoff_doubles_clamps_and_jitters():
    p = RetryPolicy(min_backoff=300, max_backoff=4000, jitter=0.1)
    assert [p.backoff(n, lambda: 0.5) for n in (1, 2, 3, 4, 5, 6, 1000)] == [300, 600, 1200, 2400, 4000, 4000, 4000]
    assert p.backoff(1, lambda: 0.0) == pytest.approx(270)
    assert p.backoff(1, lambda: 1.0) == pytest.approx(330)
    assert p.backoff(5, lambda: 1.0) == 4000  # never past max_backoff
    env = Envelope("ABCDEFGHJK", "a@b.c", [Recipient("x@y.z")], arrival=0.0, attempts=3)
    q = RetryPolicy(max_queue_lifetime=1000, jitter=0)
    assert q.next_attempt(env, 100.0) == 1000.0  # capped at the expiry
    env.attempts = 1
    assert q.next_attempt(env, 100.0) == 400.0


def test_one_timer_for_the_earliest_message(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    s = make(spool, clock, deliver)
    late = queue(spool, clock)
    late.next_attempt = T0 + 500
    early = queue(spool, clock)
    early.next_attempt = T0 + 100
    s.enqueue(late)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [T0 + 500]
    s.enqueue(early)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [T0 + 100]
    clock.advance(100)
    assert [c.envelope.queue_id for c in deliver.calls] == [early.queue_id]
    assert [c.getTime() for c in clock.getDelayedCalls()] == [T0 + 500]


# -- bounces ------------------------------------------------------------------------


def test_permanent_failure_gives_exactly_one_bounce(spool, clock, events):
    deliver = FakeDeliver(clock, {"bob@example.org": [(550, "5.1.1", "user unknown")]})
    env = queue(spool, clock, rcpts=[Recipient("bob@example.org", original="b@example.org")])
    make(spool, clock, deliver)
    # original gone; the bounce queued, delivered to the sender and gone too
    assert env.queue_id not in spool.queue_ids()
    bounce_calls = deliver.to("alice@example.com")
    assert len(bounce_calls) == 1
    b = bounce_calls[0].envelope
    assert b.sender == "" and [r.address for r in b.recipients] == ["alice@example.com"]
    assert b.client["bounce_of"] == env.queue_id
    assert spool.queue_ids() == []
    bounce_events = [e for e in events if e.get("mail_event") == "bounce"]
    assert len(bounce_events) == 1 and bounce_events[0]["dsn_id"] == b.queue_id


def test_bounce_bytes_parse_back(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(550, "5.1.1", "user unknown")]})
    deliver_bounces = FakeDeliver(clock, auto=False)

    def route(envelope, rcpts, report):
        return (deliver_bounces if envelope.sender == "" else deliver)(envelope, rcpts, report)

    env = queue(spool, clock, rcpts=[Recipient("bob@example.org", original="b@example.org")])
    make(spool, clock, route)
    [(benv, msg)] = dsns(spool)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    per_msg, [rcpt] = report(msg)
    assert per_msg["Reporting-MTA"] == "dns; mx.example.org"
    assert per_msg["X-Mailhub-Queue-ID"] == env.queue_id
    assert rcpt["Final-Recipient"] == "rfc822; bob@example.org"
    assert rcpt["Original-Recipient"] == "rfc822; b@example.org"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"
    headers = msg.get_payload()[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <m1@example.com>" in headers.get_payload()
    assert "Hi there." not in headers.get_payload()


def test_expiry_bounces_with_4_4_7(spool, clock):
    policy = RetryPolicy(min_backoff=300, max_backoff=4000, max_queue_lifetime=1000, jitter=0)
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "mailbox busy")] * 10})
    deliver_bounces = FakeDeliver(clock, auto=False)
    route = lambda e, r, report: (deliver_bounces if e.sender == "" else deliver)(e, r, report)
    env = queue(spool, clock)
    make(spool, clock, route, policy)
    clock.advance(300)
    clock.advance(600)
    assert on_disk(spool, env.queue_id)["next_attempt"] == T0 + 1000  # not T0 + 2100
    clock.advance(100)
    assert [c.at for c in deliver.calls] == [T0, T0 + 300, T0 + 900, T0 + 1000]
    assert env.queue_id not in spool.queue_ids()
    [(benv, msg)] = dsns(spool)
    _, [rcpt] = report(msg)
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.4.7"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.2.0 mailbox busy"
    assert "delivery time expired" in msg.get_payload()[0].get_content()
    clock.advance(100000)
    assert len(deliver.calls) == 4


def test_mixed_outcomes(spool, clock):
    deliver = FakeDeliver(
        clock,
        {
            "ok@example.org": [(250, "2.0.0", "delivered")],
            "gone@example.org": [(550, "5.1.1", "no such user")],
            "busy@example.org": [(452, "4.2.2", "over quota")],
        },
    )
    deliver_bounces = FakeDeliver(clock, auto=False)
    route = lambda e, r, report: (deliver_bounces if e.sender == "" else deliver)(e, r, report)
    env = queue(spool, clock, rcpts=("ok@example.org", "gone@example.org", "busy@example.org"))
    make(spool, clock, route)
    states = {r["address"]: r["state"] for r in on_disk(spool, env.queue_id)["recipients"]}
    assert states == {"ok@example.org": DELIVERED, "gone@example.org": FAILED, "busy@example.org": PENDING}
    [(benv, msg)] = dsns(spool)
    _, rcpts = report(msg)
    assert [r["Final-Recipient"] for r in rcpts] == ["rfc822; gone@example.org"]
    clock.advance(300)
    assert deliver.calls[-1].recipients == ["busy@example.org"]
    assert spool.queue_ids() == [benv.queue_id]  # original done and removed


def test_null_sender_gets_no_bounce_but_postmaster_gets_one_double_bounce(spool, clock, events):
    deliver = FakeDeliver(clock, {"bob@example.org": [(550, "5.1.1", "user unknown")]})
    to_postmaster = FakeDeliver(clock, {"postmaster@mx.example.org": [(550, "5.2.0", "postmaster broken")]})
    route = lambda e, r, report: (to_postmaster if e.client.get("double_bounce") else deliver)(e, r, report)
    queue(spool, clock, sender="")
    make(spool, clock, route)
    # one double bounce to the postmaster, and it failed too: nothing more
    assert len(to_postmaster.calls) == 1
    dbl = to_postmaster.calls[0].envelope
    assert dbl.sender == "" and dbl.client["double_bounce"] is True
    assert [r.address for r in dbl.recipients] == ["postmaster@mx.example.org"]
    assert not any(r.address == "" for c in deliver.calls + to_postmaster.calls for r in c.envelope.recipients)
    assert spool.queue_ids() == []
    clock.advance(100000)
    assert len(deliver.calls) == 1 and len(to_postmaster.calls) == 1
    texts = [formatEvent(e) for e in events if e.get("mail_event") == "bounce"]
    assert any("postmaster non-delivery notification" in t for t in texts)
    assert any(f"{dbl.queue_id}: undeliverable postmaster notification discarded" == t for t in texts)


def test_double_bounce_message_itself_never_bounces(spool, clock):
    deliver = FakeDeliver(clock, {"x@example.org": [(550, "5.1.1", "no")]})
    queue(spool, clock, sender="", rcpts=("x@example.org",), client={"double_bounce": True})
    make(spool, clock, deliver)
    assert len(deliver.calls) == 1 and spool.queue_ids() == []


def test_notify_never_suppresses_the_bounce(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(550, "5.1.1", "no")]})
    queue(spool, clock, rcpts=[Recipient("bob@example.org", notify=["NEVER"])])
    make(spool, clock, deliver)
    assert len(deliver.calls) == 1 and spool.queue_ids() == []


def test_delay_warning_sent_once(spool, clock):
    policy = RetryPolicy(delay_warning=500, jitter=0)
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "busy")] * 10})
    deliver_bounces = FakeDeliver(clock, auto=False)
    route = lambda e, r, report: (deliver_bounces if e.sender == "" else deliver)(e, r, report)
    env = queue(spool, clock)
    make(spool, clock, route, policy)
    clock.advance(300)
    assert dsns(spool) == []
    clock.advance(600)  # round at age 900 >= 500
    [(benv, msg)] = dsns(spool)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, [rcpt] = report(msg)
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.2.0"
    assert "Will-Retry-Until" in rcpt
    assert on_disk(spool, env.queue_id)["warned"] is True
    clock.advance(1200)
    clock.advance(2400)
    assert len(dsns(spool)) == 1


# -- persistence ---------------------------------------------------------------------


def test_restart_resumes_at_persisted_time(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "later")]})
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    assert on_disk(spool, env.queue_id)["next_attempt"] == T0 + 300
    assert on_disk(spool, env.queue_id)["attempts"] == 1
    s.stopService()
    assert not clock.getDelayedCalls()

    clock2 = task.Clock()
    clock2.advance(T0 + 100)
    deliver2 = FakeDeliver(clock2)
    s2 = make(Spool(spool.path, fsync=False), clock2, deliver2)
    assert deliver2.calls == [] and s2.next_due(env.queue_id) == T0 + 300
    clock2.advance(199)
    assert deliver2.calls == []
    clock2.advance(1)
    assert [c.at for c in deliver2.calls] == [T0 + 300]
    assert spool.queue_ids() == []


def test_restart_keeps_held_messages_held(spool, clock):
    env = queue(spool, clock, held=True)
    deliver = FakeDeliver(clock)
    s = make(spool, clock, deliver)
    clock.advance(10000)
    assert deliver.calls == [] and len(s) == 1 and s.next_due(env.queue_id) is None


def test_spool_update_error_keeps_message(spool, clock, monkeypatch):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "later")]})
    env = queue(spool, clock)

    def broken(envelope):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "update", broken)
    s = make(spool, clock, deliver)
    assert len(s) == 1 and s.next_due(env.queue_id) == T0 + 300
    monkeypatch.undo()
    clock.advance(300)
    assert len(deliver.calls) == 2 and spool.queue_ids() == []


def test_spool_remove_error_persists_and_retries_removal(spool, clock, monkeypatch):
    deliver = FakeDeliver(clock)
    env = queue(spool, clock)
    real_remove = spool.remove

    def broken(qid):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spool, "remove", broken)
    s = make(spool, clock, deliver)
    assert on_disk(spool, env.queue_id)["recipients"][0]["state"] == DELIVERED
    monkeypatch.setattr(spool, "remove", real_remove)
    clock.advance(300)
    assert len(deliver.calls) == 1  # removal retried, no second delivery
    assert spool.queue_ids() == [] and len(s) == 0


# -- concurrency and in-flight ------------------------------------------------------------


def test_concurrency_limit(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    envs = [queue(spool, clock) for _ in range(5)]
    s = Scheduler(spool, deliver, clock, RetryPolicy(jitter=0), concurrency=2)
    s.startService()  # recovers all five, all due now
    ids = sorted(e.queue_id for e in envs)
    assert [c.envelope.queue_id for c in deliver.calls] == ids[:2]
    assert s.in_flight == set(ids[:2])
    assert not clock.getDelayedCalls()  # at the limit: no timer, the end of a round pumps
    deliver.calls[1].deferred.callback([Outcome.delivered("bob@example.org")])
    assert [c.envelope.queue_id for c in deliver.calls] == ids[:3]
    assert s.in_flight == {ids[0], ids[2]}
    clock.advance(1000)
    assert len(deliver.calls) == 3
    while any(not c.deferred.called for c in deliver.calls):
        assert len(s.in_flight) <= 2
        next(c for c in deliver.calls if not c.deferred.called).deferred.callback([Outcome.delivered("bob@example.org")])
    assert [c.envelope.queue_id for c in deliver.calls] == ids
    assert spool.queue_ids() == [] and s.in_flight == frozenset()


def test_ready_queue_is_fifo_by_due_time(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    s = Scheduler(spool, deliver, clock, RetryPolicy(jitter=0), concurrency=1)
    s.startService()
    blocker = queue(spool, clock)
    s.enqueue(blocker)
    waiting = []
    for due in (T0 - 5, T0 - 50, T0 - 20):
        e = queue(spool, clock)
        e.next_attempt = due
        s.enqueue(e)
        waiting.append(e)
    assert len(deliver.calls) == 1
    for _ in range(3):
        deliver.calls[-1].deferred.callback([Outcome.delivered("bob@example.org")])
    order = [c.envelope.queue_id for c in deliver.calls[1:]]
    assert order == [waiting[1].queue_id, waiting[2].queue_id, waiting[0].queue_id]


def test_never_dispatched_twice_at_once_and_flush_remembered(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    assert len(deliver.calls) == 1
    s.flush(env.queue_id)
    s.enqueue(env)
    s.flush()
    assert len(deliver.calls) == 1
    deliver.calls[0].deferred.callback([Outcome.temporary("bob@example.org", "busy")])
    # the flush asked during the round makes it due at once, not in 300 s
    assert len(deliver.calls) == 2 and deliver.calls[1].at == T0


def test_flush(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "later")]})
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    clock.advance(10)
    assert len(deliver.calls) == 1
    s.flush(env.queue_id)
    assert len(deliver.calls) == 2 and deliver.calls[1].at == T0 + 10
    with pytest.raises(KeyError):
        s.flush("NOSUCHQUEUEID")


def test_hold_release_remove(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "later")] * 2})
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    s.hold(env.queue_id)
    assert on_disk(spool, env.queue_id)["held"] is True
    s.flush()
    clock.advance(1000)
    assert len(deliver.calls) == 1
    s.release(env.queue_id)
    assert on_disk(spool, env.queue_id)["held"] is False
    assert len(deliver.calls) == 2 and deliver.calls[1].at == T0 + 1000  # its due time had passed
    s.remove(env.queue_id)
    assert spool.queue_ids() == [] and len(s) == 0
    clock.advance(100000)
    assert len(deliver.calls) == 2


def test_remove_while_in_flight_waits_for_the_round(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    s.remove(env.queue_id)
    assert spool.queue_ids() == [env.queue_id]  # message still being read
    deliver.calls[0].deferred.callback([Outcome.temporary("bob@example.org", "busy")])
    assert spool.queue_ids() == [] and len(s) == 0 and not clock.getDelayedCalls()


def test_stop_service_waits_for_deliveries(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    other = queue(spool, clock)
    other.next_attempt = T0 + 50
    s.enqueue(other)
    assert len(deliver.calls) == 1
    stopped = s.stopService()
    assert not stopped.called and not clock.getDelayedCalls()
    deliver.calls[0].deferred.callback([Outcome.temporary("bob@example.org", "busy")])
    assert stopped.called
    assert on_disk(spool, env.queue_id)["next_attempt"] == T0 + 300  # recorded
    clock.advance(1000)
    assert len(deliver.calls) == 1  # stopped: nothing more dispatched


@pytest.mark.parametrize("how", ["raise", "errback"])
def test_deliver_exception_is_temporary(spool, clock, how):
    calls = []

    def deliver(envelope, recipients, report):
        calls.append(clock.seconds())
        if how == "raise":
            raise RuntimeError("agent bug")
        return defer.fail(RuntimeError("agent bug"))

    env = queue(spool, clock, rcpts=("a@example.org", "b@example.org"))
    s = make(spool, clock, deliver)
    disk = on_disk(spool, env.queue_id)
    assert [r["state"] for r in disk["recipients"]] == [PENDING, PENDING]
    assert [r["last_code"] for r in disk["recipients"]] == [451, 451]
    assert "agent bug" in disk["recipients"][0]["last_text"]
    assert s.next_due(env.queue_id) == T0 + 300
    clock.advance(300)
    assert calls == [T0, T0 + 300]


def test_unreported_recipient_is_temporary(spool, clock):
    def deliver(envelope, recipients, report):
        return defer.succeed([Outcome.delivered("a@example.org"), Outcome.delivered("stranger@example.org")])

    env = queue(spool, clock, rcpts=("a@example.org", "b@example.org"))
    make(spool, clock, deliver)
    states = [r["state"] for r in on_disk(spool, env.queue_id)["recipients"]]
    assert states == [DELIVERED, PENDING]


def test_hundred_thousand_messages_share_one_timer(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    s = make(spool, clock, deliver)
    envs = [
        Envelope(
            f"{i:012d}AAAA", "a@example.com", [Recipient("b@example.org")], arrival=T0, next_attempt=T0 + 10 + (i * 7919) % 100000
        )
        for i in range(100_000)
    ]
    # One timer for the whole queue, however long: a timer or a sort per
    # message would not finish within the suite's per-test timeout (setup.cfg).
    for e in envs:
        s.enqueue(e)
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == T0 + 10
    assert len(s) == 100_000


def test_clock_set_back_never_waits_longer_than_max_backoff(spool, clock):
    env = queue(spool, clock)
    env.next_attempt = T0 + 10 * 86400
    spool.update(env)
    deliver = FakeDeliver(clock)
    s = make(spool, clock, deliver)
    assert s.next_due(env.queue_id) == T0 + 4000
    clock.advance(4000)
    assert len(deliver.calls) == 1


# -- RFC 3461 success notices ----------------------------------------------------------

MX = "mx.example.net[192.0.2.1]:25"


def relayed(address: str, dsn_passed: bool) -> Outcome:
    return Outcome.delivered(
        address, f"host {MX} said: 250 2.0.0 Ok: queued as 4XYZ (in reply to end of DATA command)", MX,
        dsn_passed=dsn_passed,
    )


def test_success_notice_for_local_delivery_with_envid_and_orcpt(spool, clock, events):
    deliver = Scripted(clock)
    env = queue(
        spool, clock,
        rcpts=[Recipient("bob@example.org", notify=["SUCCESS"], orcpt="rfc822;Bob.Original@example.org")],
        esmtp={"envid": "QQ314159", "ret": "FULL"},
    )
    make(spool, clock, deliver)
    assert env.queue_id not in spool.queue_ids()  # delivered and gone
    [(benv, msg)] = dsns(spool)
    assert benv.sender == "" and [r.address for r in benv.recipients] == ["alice@example.com"]
    assert benv.client["bounce_of"] == env.queue_id
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert msg["To"] == "alice@example.com"
    per_msg, [rcpt] = report(msg)
    assert per_msg["Original-Envelope-Id"] == "QQ314159"
    assert rcpt == {
        "Original-Recipient": "rfc822; Bob.Original@example.org",
        "Final-Recipient": "rfc822; bob@example.org",
        "Action": "delivered",
        "Status": "2.0.0",
        "Diagnostic-Code": "smtp; 250 2.0.0 delivered to maildir",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    # RET=FULL is for failure reports only (RFC 3461 4.3): headers here
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <m1@example.com>" in returned.get_payload()
    assert "Hi there." not in returned.get_payload()
    assert "delivered: delivered to maildir" in msg.get_payload()[0].get_content()
    texts = [formatEvent(e) for e in events if e.get("mail_event") == "bounce"]
    assert texts == [f"{env.queue_id}: sender delivery status notification: {benv.queue_id}"]


def test_success_notice_relayed_only_when_next_hop_lacks_dsn(spool, clock):
    deliver = Scripted(clock, {
        "dsnhop@remote.example": relayed("dsnhop@remote.example", dsn_passed=True),
        "plainhop@other.example": relayed("plainhop@other.example", dsn_passed=False),
    })
    rcpts = [Recipient(a, notify=["SUCCESS", "FAILURE"]) for a in
             ("dsnhop@remote.example", "plainhop@other.example", "local@example.org")]
    env = queue(spool, clock, rcpts=rcpts)
    make(spool, clock, deliver)
    # exactly one notice for the round, listing both events, not the DSN-capable hop
    [(benv, msg)] = dsns(spool)
    per_msg, blocks = report(msg)
    assert "Original-Envelope-Id" not in per_msg  # no ENVID given
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; plainhop@other.example", "relayed", "2.0.0"),
        ("rfc822; local@example.org", "delivered", "2.0.0"),
    ]
    relay_block = blocks[0]
    assert relay_block["Remote-MTA"] == "dns; mx.example.net"  # MX is "mx.example.net[192.0.2.1]:25"
    assert relay_block["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4XYZ"
    assert "Original-Recipient" not in relay_block
    human = msg.get_payload()[0].get_content()
    assert "<plainhop@other.example>: relayed to a host that does not support delivery notifications" in human
    assert "dsnhop" not in human
    assert env.queue_id not in spool.queue_ids()


def test_no_success_notice_when_next_hop_took_notify(spool, clock):
    deliver = Scripted(clock, {"a@remote.example": relayed("a@remote.example", dsn_passed=True)})
    queue(spool, clock, rcpts=[Recipient("a@remote.example", notify=["SUCCESS"])], esmtp={"envid": "X1"})
    make(spool, clock, deliver)
    assert dsns(spool) == [] and spool.queue_ids() == []


@pytest.mark.parametrize("notify", [[], ["FAILURE"], ["DELAY", "FAILURE"], ["NEVER"]])
def test_no_success_notice_without_success_keyword(spool, clock, notify):
    deliver = Scripted(clock, {"a@remote.example": relayed("a@remote.example", dsn_passed=False)})
    queue(spool, clock, rcpts=[Recipient("a@remote.example", notify=notify), Recipient("b@example.org", notify=notify)])
    make(spool, clock, deliver)
    assert dsns(spool) == [] and spool.queue_ids() == []


@pytest.mark.parametrize("how", ["local", "relayed"])
def test_null_sender_never_gets_a_success_notice(spool, clock, how):
    calls = []

    def deliver(e, rcpts, report):
        calls.append([r.address for r in rcpts])
        return defer.succeed([
            Outcome.delivered(r.address) if how == "local" else relayed(r.address, dsn_passed=False) for r in rcpts
        ])

    queue(spool, clock, sender="", rcpts=[Recipient("bob@example.org", notify=["SUCCESS"])])
    make(spool, clock, deliver)
    assert calls == [["bob@example.org"]] and spool.queue_ids() == []


def test_notify_success_only_suppresses_the_bounce_and_mixed_round_gives_two_reports(spool, clock):
    deliver = Scripted(clock, {
        "gone@example.org": Outcome.permanent("gone@example.org", "no such user", 550, "5.1.1"),
        "also-gone@example.org": Outcome.permanent("also-gone@example.org", "no such user", 550, "5.1.1"),
    })
    rcpts = [
        Recipient("ok@example.org", notify=["SUCCESS", "FAILURE"], orcpt="rfc822;ok-orig@example.org"),
        Recipient("gone@example.org", notify=["SUCCESS", "FAILURE"], orcpt="rfc822;gone-orig@example.org"),
        Recipient("also-gone@example.org", notify=["SUCCESS"]),  # no FAILURE: no bounce for it
    ]
    queue(spool, clock, rcpts=rcpts, esmtp={"envid": "E-7"})
    make(spool, clock, deliver)
    found = {msg["Subject"]: msg for _, msg in dsns(spool)}
    assert set(found) == {"Successful Mail Delivery Report", "Undelivered Mail Returned to Sender"}
    ok_msg, ok_blocks = report(found["Successful Mail Delivery Report"])
    bad_msg, bad_blocks = report(found["Undelivered Mail Returned to Sender"])
    assert ok_msg["Original-Envelope-Id"] == bad_msg["Original-Envelope-Id"] == "E-7"
    assert [(b["Original-Recipient"], b["Action"]) for b in ok_blocks] == [("rfc822; ok-orig@example.org", "delivered")]
    assert [(b["Original-Recipient"], b["Action"], b["Status"]) for b in bad_blocks] == [
        ("rfc822; gone-orig@example.org", "failed", "5.1.1")
    ]


def test_success_notice_per_round(spool, clock):
    deliver = FakeDeliver(clock, {"b@example.org": [(451, "4.2.0", "busy")]})
    routed = []

    def route(e, r, report):
        if e.sender == "":
            routed.append(e)
            return Deferred()
        return deliver(e, r, report)

    rcpts = [Recipient(a, notify=["SUCCESS", "DELAY"]) for a in ("a@example.org", "b@example.org")]
    queue(spool, clock, rcpts=rcpts, esmtp={"envid": "R2"})
    make(spool, clock, route, RetryPolicy(jitter=0, delay_warning=100))
    [(_, first)] = dsns(spool)
    assert [b["Final-Recipient"] for b in report(first)[1]] == ["rfc822; a@example.org"]
    clock.advance(300)  # b delivered now
    notices = [m for _, m in dsns(spool)]
    assert len(notices) == 2
    second = next(m for m in notices if m is not first and m["Message-ID"] != first["Message-ID"])
    per_msg, [b] = report(second)
    assert per_msg["Original-Envelope-Id"] == "R2"
    assert (b["Final-Recipient"], b["Action"]) == ("rfc822; b@example.org", "delivered")
    assert len(routed) == 2


def test_delay_warning_carries_envid_and_orcpt(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "busy")] * 10})
    route = lambda e, r, report: Deferred() if e.sender == "" else deliver(e, r, report)
    queue(spool, clock, rcpts=[Recipient("bob@example.org", orcpt="rfc822;first@example.org")],
          esmtp={"envid": "D-1", "ret": "FULL"})
    make(spool, clock, route, RetryPolicy(jitter=0, delay_warning=200))
    clock.advance(300)
    [(_, msg)] = dsns(spool)
    per_msg, [rcpt] = report(msg)
    assert per_msg["Original-Envelope-Id"] == "D-1"
    assert rcpt["Original-Recipient"] == "rfc822; first@example.org"
    assert rcpt["Action"] == "delayed"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"  # RET=FULL: failures only


# -- per-destination fairness ---------------------------------------------------------------


def test_slow_destination_does_not_hold_back_other_domains(spool, clock):
    deliver = SlowAndFast(clock)
    s = make(spool, clock, deliver, concurrency=100)
    slow = [queue(spool, clock, rcpts=(f"u{i}@slow.example",)) for i in range(150)]
    for e in slow:
        s.enqueue(e)
    assert len(deliver.slow) == 20 and len(s.in_flight) == 20 and s.waiting == 130
    assert not clock.getDelayedCalls()  # nothing spins on the parked messages
    fast = queue(spool, clock, rcpts=("bob@fast.example",))
    s.enqueue(fast)
    assert deliver.fast == [(fast.queue_id, T0)]
    assert fast.queue_id not in spool.queue_ids()
    # a slow round ends: the earliest parked slow message takes its slot
    first_id, d, rcpts = deliver.slow[0]
    d.callback([Outcome.temporary(rcpts[0], "connection timed out", 451, "4.4.1")])
    assert len(deliver.slow) == 21 and deliver.slow[20][0] == slow[20].queue_id
    assert len(s.in_flight) == 20 and s.waiting == 129
    # the deferred one comes back after its backoff and waits its turn too
    assert s.next_due(first_id) == T0 + 300
    assert [c.getTime() for c in clock.getDelayedCalls()] == [T0 + 300]
    clock.advance(300)
    assert s.waiting == 130 and len(s.in_flight) == 20
    # parked messages keep their order: the next one out is slow[21], not the retried one
    deliver.slow[1][1].callback([Outcome.delivered(deliver.slow[1][2][0])])
    assert deliver.slow[-1][0] == slow[21].queue_id


def test_global_limit_still_counts_all_destinations(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    s = make(spool, clock, deliver, concurrency=3, destination_concurrency=2)
    envs = [queue(spool, clock, rcpts=(f"x{i}@{d}.example",)) for i, d in enumerate(["d0", "d0", "d0", "d1", "d2"])]
    for e in envs:
        s.enqueue(e)
    # the third d0 message waits for d0, the d1 one takes the last global slot, d2 waits for a global slot
    assert [c.recipients[0] for c in deliver.calls] == ["x0@d0.example", "x1@d0.example", "x3@d1.example"]
    assert s.waiting == 1 and len(s.in_flight) == 3
    deliver.calls[2].deferred.callback([Outcome.delivered("x3@d1.example")])
    assert [c.recipients[0] for c in deliver.calls][3:] == ["x4@d2.example"]
    deliver.calls[0].deferred.callback([Outcome.delivered("x0@d0.example")])
    assert [c.recipients[0] for c in deliver.calls][4:] == ["x2@d0.example"]
    assert s.waiting == 0 and len(s.in_flight) == 3


def test_blocked_multi_destination_message_passes_its_wakeup_on(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    s = make(spool, clock, deliver, destination_concurrency=1)
    m1 = queue(spool, clock, rcpts=("x@a.example",))
    m2 = queue(spool, clock, rcpts=("x@b.example",))
    m3 = queue(spool, clock, rcpts=("y@a.example", "y@b.example"))
    m4 = queue(spool, clock, rcpts=("z@a.example",))
    for e in (m1, m2, m3, m4):
        s.enqueue(e)
    assert [c.envelope.queue_id for c in deliver.calls] == [m1.queue_id, m2.queue_id]
    assert s.waiting == 2
    deliver.calls[0].deferred.callback([Outcome.delivered("x@a.example")])
    # m3 was woken for a.example but b.example is full: m4 gets the a.example slot
    assert [c.envelope.queue_id for c in deliver.calls][2:] == [m4.queue_id]
    deliver.calls[1].deferred.callback([Outcome.delivered("x@b.example")])
    assert len(deliver.calls) == 3  # m3 still needs a.example (m4 in flight)
    deliver.calls[2].deferred.callback([Outcome.delivered("z@a.example")])
    assert deliver.calls[3].envelope.queue_id == m3.queue_id
    assert deliver.calls[3].recipients == ["y@a.example", "y@b.example"]
    assert s.waiting == 0


def test_parked_message_hold_flush_and_remove(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    s = make(spool, clock, deliver, destination_concurrency=1)
    busy = queue(spool, clock, rcpts=("a@d.example",))
    held = queue(spool, clock, rcpts=("b@d.example",))
    gone = queue(spool, clock, rcpts=("c@d.example",))
    flushed = queue(spool, clock, rcpts=("e@d.example",))
    for e in (busy, held, gone, flushed):
        s.enqueue(e)
    assert s.waiting == 3
    s.hold(held.queue_id)
    s.remove(gone.queue_id)
    s.flush(flushed.queue_id)  # still blocked: parked again, once
    assert s.waiting == 1 and len(deliver.calls) == 1
    deliver.calls[0].deferred.callback([Outcome.delivered("a@d.example")])
    assert [c.envelope.queue_id for c in deliver.calls] == [busy.queue_id, flushed.queue_id]
    deliver.calls[1].deferred.callback([Outcome.delivered("e@d.example")])
    assert len(deliver.calls) == 2 and s.waiting == 0
    s.release(held.queue_id)
    assert [c.envelope.queue_id for c in deliver.calls][2:] == [held.queue_id]


# -- notifications go through the recipient resolver (aliases, +extensions) -------------

from mailhub.delivery.directory import AliasLoop, AliasUnavailable, Directory, UnknownRecipient  # noqa: E402
from mailhub.delivery.local import LocalDelivery  # noqa: E402
from mailhub.delivery.router import Router  # noqa: E402


class Resolver:
    """A fake of the pickup resolver: a table for local addresses, errors by address, others as given."""

    def __init__(self, table: dict, errors: dict | None = None) -> None:
        self.table = table
        self.errors = errors or {}
        self.calls: list[str] = []

    def __call__(self, address: str) -> list[str]:
        self.calls.append(address)
        error = self.errors.get(address)
        if error is not None:
            raise error
        return list(self.table.get(address, [address]))


def rcpts_of(env: Envelope) -> list[tuple[str, str]]:
    return [(r.address, r.original) for r in env.recipients]


def test_bounce_to_alias_sender_is_resolved(spool, clock):
    deliver = Scripted(clock, {"bob@example.net": Outcome.permanent("bob@example.net", "no such user", 550, "5.1.1")})
    resolve = Resolver({"webmaster@example.org": ["alice@example.org"]})
    env = queue(spool, clock, rcpts=("bob@example.net",), sender="webmaster@example.org")
    make(spool, clock, deliver, resolve=resolve)
    [(benv, msg)] = dsns(spool)
    assert rcpts_of(benv) == [("alice@example.org", "webmaster@example.org")]
    assert benv.client == {"protocol": "dsn", "bounce_of": env.queue_id}
    assert msg["To"] == "webmaster@example.org"  # the header names the sender as written
    assert resolve.calls == ["webmaster@example.org"]


def test_success_and_delay_notices_are_resolved_too(spool, clock):
    deliver = Scripted(clock, {"carol@example.net": Outcome.temporary("carol@example.net", "later", 451, "4.2.0")})
    resolve = Resolver({"alice+tag@example.org": ["alice@example.org"]})
    policy = RetryPolicy(jitter=0.0, delay_warning=100.0)
    env = queue(spool, clock, rcpts=[Recipient("bob@example.net", notify=["SUCCESS"]), "carol@example.net"],
                sender="alice+tag@example.org")
    make(spool, clock, deliver, policy=policy, resolve=resolve)
    clock.advance(300)  # second round: carol still deferred, past delay_warning
    notices = dsns(spool)
    assert sorted(msg["Subject"] for _, msg in notices) == [
        "Delayed Mail (still being retried)", "Successful Mail Delivery Report"]
    for benv, _ in notices:
        assert rcpts_of(benv) == [("alice@example.org", "alice+tag@example.org")]
    assert env.queue_id in spool.queue_ids()


def test_unknown_sender_bounce_goes_to_the_postmaster_alias(spool, clock, events):
    deliver = Scripted(clock, {"bob@example.net": Outcome.permanent("bob@example.net", "no such user", 550, "5.1.1")})
    resolve = Resolver({"postmaster@mx.example.org": ["admin@mx.example.org", "ops@example.net"]},
                       errors={"gone@mx.example.org": UnknownRecipient()})
    env = queue(spool, clock, rcpts=("bob@example.net",), sender="gone@mx.example.org")
    make(spool, clock, deliver, resolve=resolve)
    [(benv, msg)] = dsns(spool)
    assert rcpts_of(benv) == [("admin@mx.example.org", "postmaster@mx.example.org"),
                              ("ops@example.net", "postmaster@mx.example.org")]
    assert benv.client == {"protocol": "dsn", "bounce_of": env.queue_id, "double_bounce": True}
    assert msg["To"] == "postmaster@mx.example.org"
    texts = [formatEvent(e) for e in events if e.get("mail_event") == "bounce"]
    assert texts == [f"{env.queue_id}: postmaster non-delivery notification: {benv.queue_id}"]


def bounce_held_back(clock: task.Clock) -> tuple[FakeDeliver, FakeDeliver, object]:
    """(deliver for originals: bob@example.net refused; deliver for notifications: never answers; route)."""
    originals = FakeDeliver(clock, {"bob@example.net": [(550, "5.1.1", "no such user")]})
    notices = FakeDeliver(clock, auto=False)
    return originals, notices, lambda e, r, report: (notices if e.client.get("bounce_of") else originals)(e, r, report)


def test_double_bounce_follows_the_postmaster_alias(spool, clock):
    _, _, deliver = bounce_held_back(clock)
    resolve = Resolver({"postmaster@mx.example.org": ["admin@mx.example.org"]})
    queue(spool, clock, rcpts=("bob@example.net",), sender="")
    make(spool, clock, deliver, resolve=resolve)
    [(benv, _)] = [(e, m) for e, m in dsns(spool) if e.client.get("bounce_of")]
    assert rcpts_of(benv) == [("admin@mx.example.org", "postmaster@mx.example.org")]
    assert benv.client["double_bounce"] is True


def test_unresolvable_postmaster_is_logged_and_gets_its_own_mailbox(spool, clock, events):
    _, _, deliver = bounce_held_back(clock)
    resolve = Resolver({}, errors={"postmaster@mx.example.org": AliasLoop()})
    env = queue(spool, clock, rcpts=("bob@example.net",), sender="")
    make(spool, clock, deliver, resolve=resolve)
    [(benv, _)] = [(e, m) for e, m in dsns(spool) if e.client.get("bounce_of")]
    assert rcpts_of(benv) == [("postmaster@mx.example.org", "postmaster@mx.example.org")]
    texts = [formatEvent(e) for e in events if e.get("log_level") is not None and "cannot resolve" in formatEvent(e)]
    assert texts == [f"{env.queue_id}: cannot resolve the notification recipient postmaster@mx.example.org: "
                     "550 5.4.6 alias loop; sending to it unexpanded"]


def test_temporary_resolver_error_keeps_the_bounce_for_later(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.net": [(550, "5.1.1", "no")] * 2})
    resolve = Resolver({"webmaster@example.org": ["alice@example.org"]},
                       errors={"webmaster@example.org": AliasUnavailable()})
    env = queue(spool, clock, rcpts=("bob@example.net",), sender="webmaster@example.org")
    make(spool, clock, deliver, resolve=resolve)
    assert dsns(spool) == [] and env.queue_id in spool.queue_ids()
    assert on_disk(spool, env.queue_id)["recipients"][0]["state"] == PENDING
    del resolve.errors["webmaster@example.org"]
    clock.advance(300)
    assert env.queue_id not in spool.queue_ids()
    [bounce_call] = deliver.to("alice@example.org")
    assert rcpts_of(bounce_call.envelope) == [("alice@example.org", "webmaster@example.org")]


def test_failed_bounce_to_an_aliased_postmaster_is_discarded(spool, clock, events):
    deliver = FakeDeliver(clock, {"admin@example.net": [(550, "5.1.1", "no")]})
    resolve = Resolver({"postmaster@mx.example.org": ["admin@example.net"]})
    queue(spool, clock, sender="", rcpts=[Recipient("admin@example.net", original="postmaster@mx.example.org")])
    make(spool, clock, deliver, resolve=resolve)
    assert len(deliver.calls) == 1 and spool.queue_ids() == []
    texts = [formatEvent(e) for e in events if e.get("mail_event") == "bounce"]
    assert any(t.endswith("undeliverable bounce to postmaster discarded") for t in texts)


class RemoteRefuses:
    """The remote agent: every recipient refused for good."""

    def deliver(self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction) -> Deferred:
        return defer.succeed([Outcome.permanent(r.address, "no such user", 550, "5.1.1", remote_mta="mx.example.net")
                              for r in recipients])


def sync_run(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


def maildir_files(root, user: str) -> list[bytes]:
    new = root / "example.org" / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


@pytest.mark.parametrize("sender", ["webmaster@example.org", "alice+tag@example.org", "Alice@Example.org"])
def test_bounce_to_local_alias_or_extension_reaches_the_mailbox(tmp_path, spool, clock, sender):
    """The real resolver, directory and local agent: the bounce lands in alice's Maildir."""
    from mailhub.tap import _pickup_resolver

    root = tmp_path / "mailboxes"
    for user in ("alice", "admin"):
        (root / "example.org" / user).mkdir(parents=True)
    aliases = tmp_path / "aliases"
    aliases.write_text("webmaster: alice\npostmaster: admin\n")
    directory = Directory(["example.org"], str(root), aliases_path=str(aliases), clock=clock)
    router = Router(spool, directory, LocalDelivery(directory, "mx.example.org", run=sync_run, fsync=False),
                    RemoteRefuses())
    queue(spool, clock, rcpts=("bob@example.net",), sender=sender)
    make(spool, clock, router, resolve=_pickup_resolver(directory), postmaster="postmaster@example.org")
    assert spool.queue_ids() == []
    [bounce_msg] = maildir_files(root, "alice")
    assert b"Subject: Undelivered Mail Returned to Sender" in bounce_msg
    assert f"To: {sender}\r\n".encode() in bounce_msg.replace(b"\n", b"\r\n").replace(b"\r\r", b"\r")
    assert maildir_files(root, "admin") == [] and maildir_files(root, "postmaster") == []


def test_double_bounce_reaches_the_postmaster_alias_mailbox(tmp_path, spool, clock):
    from mailhub.tap import _pickup_resolver

    root = tmp_path / "mailboxes"
    (root / "example.org" / "admin").mkdir(parents=True)
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: admin\n")
    directory = Directory(["example.org"], str(root), aliases_path=str(aliases), clock=clock)
    router = Router(spool, directory, LocalDelivery(directory, "mx.example.org", run=sync_run, fsync=False),
                    RemoteRefuses())
    queue(spool, clock, rcpts=("bob@example.net",), sender="")
    make(spool, clock, router, resolve=_pickup_resolver(directory), postmaster="postmaster@example.org")
    assert spool.queue_ids() == []
    [dbl] = maildir_files(root, "admin")
    assert b"To: postmaster@example.org" in dbl
    assert maildir_files(root, "postmaster") == []


# -- operator actions on a message in flight ---------------------------------------------


def test_remove_in_flight_is_pending_and_sends_no_notices(spool, clock, monkeypatch, events):
    deliver = FakeDeliver(clock, auto=False)
    env = queue(spool, clock, rcpts=["bob@example.net", Recipient("carol@example.org", notify=["SUCCESS"]),
                                     "dave@example.net"])
    s = make(spool, clock, deliver)
    updates = []
    real_update = spool.update
    monkeypatch.setattr(spool, "update", lambda e: (updates.append(e.queue_id), real_update(e)))
    assert s.remove(env.queue_id) == "pending"
    assert s.remove(env.queue_id) == "pending"  # asking twice changes nothing
    assert spool.queue_ids() == [env.queue_id]
    deliver.calls[0].deferred.callback([
        Outcome.permanent("bob@example.net", "no such user", 550, "5.1.1"),
        Outcome.delivered("carol@example.org", "delivered to maildir"),
        Outcome.temporary("dave@example.net", "later", 451, "4.2.0"),
    ])
    assert spool.queue_ids() == [] and len(s) == 0 and dsns(spool) == []
    assert updates == [] and len(deliver.calls) == 1 and not clock.getDelayedCalls()
    assert not [e for e in events if e.get("mail_event") == "bounce"]
    # the deliveries that did happen are still logged
    assert len(delivery_lines(events)) == 3
    assert any(formatEvent(e) == f"{env.queue_id}: removed (removed by operator)"
               for e in events if e.get("mail_event") == "removed")


def test_remove_returns_removed_when_idle(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "later")]})
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    assert s.remove(env.queue_id) == "removed"
    assert spool.queue_ids() == []
    with pytest.raises(KeyError):
        s.remove(env.queue_id)


def test_hold_in_flight_is_not_rescheduled_when_the_round_ends(spool, clock):
    deliver = FakeDeliver(clock, auto=False)
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    s.hold(env.queue_id)
    s.flush(env.queue_id)
    deliver.calls[0].deferred.callback([Outcome.temporary("bob@example.org", "busy", 451, "4.2.0")])
    assert s.next_due(env.queue_id) is None and not clock.getDelayedCalls()
    clock.advance(100000)
    assert len(deliver.calls) == 1
    assert on_disk(spool, env.queue_id)["held"] is True
    assert on_disk(spool, env.queue_id)["next_attempt"] == T0 + 300
    s.release(env.queue_id)
    assert len(deliver.calls) == 2  # its time had passed


def test_flush_reports_held(spool, clock):
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.2.0", "later")] * 2})
    env = queue(spool, clock)
    s = make(spool, clock, deliver)
    assert s.flush(env.queue_id) == "flushed"
    s.hold(env.queue_id)
    assert s.flush(env.queue_id) == "held"
    assert len(deliver.calls) == 2


def test_delay_notice_to_an_unknown_sender_is_dropped_not_sent_to_postmaster(spool, clock, events):
    deliver = FakeDeliver(clock, {"bob@example.net": [(451, "4.2.0", "later")] * 3})
    resolve = Resolver({}, errors={"gone@mx.example.org": UnknownRecipient()})
    env = queue(spool, clock, rcpts=("bob@example.net",), sender="gone@mx.example.org")
    make(spool, clock, deliver, policy=RetryPolicy(jitter=0.0, delay_warning=100.0), resolve=resolve)
    clock.advance(300)
    clock.advance(600)
    assert dsns(spool) == [] and on_disk(spool, env.queue_id)["warned"] is True
    assert resolve.calls == ["gone@mx.example.org"]  # once: warned is recorded
    texts = [formatEvent(e) for e in events if "discarded" in formatEvent(e)]
    assert texts == [f"{env.queue_id}: delayed notification for gone@mx.example.org discarded: "
                     "550 5.1.1 User unknown in local recipient table"]


def test_bad_sender_address_bounces_to_the_postmaster(spool, clock):
    from mailhub.address import AddressError

    _, _, deliver = bounce_held_back(clock)
    resolve = Resolver({}, errors={"x@bad.example": AddressError("bad domain")})
    env = queue(spool, clock, rcpts=("bob@example.net",), sender="x@bad.example")
    make(spool, clock, deliver, resolve=resolve)
    [(benv, _)] = dsns(spool)
    assert rcpts_of(benv) == [("postmaster@mx.example.org", "postmaster@mx.example.org")]
    assert benv.client == {"protocol": "dsn", "bounce_of": env.queue_id, "double_bounce": True}


# -- outcomes recorded per destination, as each answers (report=) ----------------------


@dataclass
class Progress:
    """One call of a report-taking deliver(): its report callback and its final Deferred."""

    recipients: list[str]
    report: object
    deferred: Deferred


@dataclass
class ReportingDeliver:
    """deliver(envelope, recipients, report): the test reports and fires by hand."""

    calls: list[Progress] = field(default_factory=list)

    def __call__(self, envelope: Envelope, recipients: list[Recipient], report: ReportFunction) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(Progress([r.address for r in recipients], report, d))
        return d


FAST, SLOW = "bob@fast.example", "carol@slow.example"


def states(spool: Spool, qid: str) -> dict[str, str]:
    return {r["address"]: r["state"] for r in on_disk(spool, qid)["recipients"]}


def counting_updates(spool: Spool, monkeypatch) -> list[str]:
    updates: list[str] = []
    real_update = spool.update
    monkeypatch.setattr(spool, "update", lambda e: (updates.append(e.queue_id), real_update(e)))
    return updates


def test_fast_destination_is_on_disk_while_the_slow_one_is_pending(tmp_path, spool, clock, monkeypatch, events):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW))
    s = make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    [call] = deliver.calls
    assert call.recipients == [FAST, SLOW] and call.report is not None
    clock.advance(3)
    call.report([Outcome.delivered(FAST, "host mx.fast said: 250 ok", "mx.fast[192.0.2.1]:25")])
    # written at once, one update for the report; the round is still open
    assert updates == [env.queue_id]
    assert states(spool, env.queue_id) == {FAST: DELIVERED, SLOW: PENDING}
    fast = on_disk(spool, env.queue_id)["recipients"][0]
    assert (fast["attempts"], fast["last_attempt"], fast["remote_mta"]) == (1, T0 + 3, "mx.fast[192.0.2.1]:25")
    assert env.queue_id in s.in_flight and delivery_lines(events) == []  # logged when the round ends

    # the daemon dies here (slow.example still in its DATA timeout); a new
    # scheduler on the same spool retries only the slow recipient
    again = ReportingDeliver()
    make(Spool(str(tmp_path / "spool"), fsync=False), clock, again)
    assert [c.recipients for c in again.calls] == [[SLOW]]


def test_final_list_does_not_apply_a_reported_outcome_twice(spool, clock, monkeypatch, events):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW))
    s = make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    [call] = deliver.calls
    call.report([Outcome.delivered(FAST, "250 ok", "mx.fast[192.0.2.1]:25")])
    call.report([Outcome.temporary(FAST, "late contradiction", 451, "4.4.2")])  # the first outcome wins
    assert updates == [env.queue_id]
    clock.advance(600)
    # the final list repeats the fast outcome (or contradicts it): ignored
    call.deferred.callback([Outcome.temporary(FAST, "agent error", 451, "4.3.0"),
                            Outcome.temporary(SLOW, "data timeout", 451, "4.4.2")])
    disk = on_disk(spool, env.queue_id)["recipients"]
    assert [(r["address"], r["state"], r["attempts"], r["last_text"]) for r in disk] == [
        (FAST, DELIVERED, 1, "250 ok"),
        (SLOW, PENDING, 1, "data timeout"),
    ]
    assert updates == [env.queue_id, env.queue_id]  # the report, then the round's end
    assert s.next_due(env.queue_id) == T0 + 600 + 300
    lines = delivery_lines(events)
    assert len(lines) == 2 and "status=sent (250 ok)" in lines[0] and "status=deferred (data timeout)" in lines[1]
    assert not [e for e in events if "ignoring outcome" in formatEvent(e)]
    # the next round gives only the slow one, and the message is done when it is delivered
    clock.advance(300)
    assert deliver.calls[1].recipients == [SLOW]
    deliver.calls[1].deferred.callback([Outcome.delivered(SLOW)])
    assert spool.queue_ids() == []


def test_reports_with_only_temporary_outcomes_write_nothing(spool, clock, monkeypatch):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW, "dave@third.example", "erin@fourth.example"))
    make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    call = deliver.calls[0]
    call.report([Outcome.temporary(FAST, "greylisted", 451, "4.7.1")])
    assert updates == []  # nothing a crash could repeat: wait for the end of the round
    call.report([Outcome.delivered(SLOW), Outcome.delivered("dave@third.example")])
    assert updates == [env.queue_id]  # one update per report
    assert states(spool, env.queue_id) == {FAST: PENDING, SLOW: DELIVERED, "dave@third.example": DELIVERED,
                                           "erin@fourth.example": PENDING}
    assert on_disk(spool, env.queue_id)["recipients"][0]["last_text"] == "greylisted"


def test_a_report_answering_the_whole_round_is_not_written_twice(spool, clock, monkeypatch):
    """One destination (the common case): the report and the round's end cost one removal, no update."""
    deliver = ReportingDeliver()
    queue(spool, clock, rcpts=(FAST, "dave@fast.example"))
    s = make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    deliver.calls[0].report([Outcome.delivered(FAST), Outcome.delivered("dave@fast.example")])
    assert updates == []
    deliver.calls[0].deferred.callback([Outcome.delivered(FAST), Outcome.delivered("dave@fast.example")])
    assert updates == [] and spool.queue_ids() == [] and len(s) == 0


def test_permanent_failures_wait_for_one_bounce_per_round(spool, clock, monkeypatch):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW, "dave@third.example", "erin@fourth.example"))
    make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    call = deliver.calls[0]
    call.report([Outcome.permanent(FAST, "no such user", 550, "5.1.1", "mx.fast[192.0.2.1]:25")])
    # not written as failed before its bounce exists: a crash now retries it, never loses the bounce
    assert updates == [] and states(spool, env.queue_id)[FAST] == PENDING and dsns(spool) == []
    call.report([Outcome.delivered("erin@fourth.example")])
    assert states(spool, env.queue_id) == {FAST: PENDING, SLOW: PENDING, "dave@third.example": PENDING,
                                           "erin@fourth.example": DELIVERED}
    assert dsns(spool) == []
    call.deferred.callback([Outcome.permanent(SLOW, "mailbox disabled", 550, "5.2.1"),
                            Outcome.temporary("dave@third.example", "later", 451, "4.2.0")])
    # the permanent outcomes of the round in one bounce
    [(benv, msg)] = dsns(spool)
    _, per_rcpt = report(msg)
    assert [b["Final-Recipient"] for b in per_rcpt] == [f"rfc822; {FAST}", f"rfc822; {SLOW}"]
    assert [b["Status"] for b in per_rcpt] == ["5.1.1", "5.2.1"]
    assert states(spool, env.queue_id) == {FAST: FAILED, SLOW: FAILED, "dave@third.example": PENDING,
                                           "erin@fourth.example": DELIVERED}


def test_remove_in_flight_writes_no_reported_outcome(spool, clock, monkeypatch, events):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW))
    s = make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    assert s.remove(env.queue_id) == "pending"
    call = deliver.calls[0]
    call.report([Outcome.delivered(FAST)])
    assert updates == [] and states(spool, env.queue_id) == {FAST: PENDING, SLOW: PENDING}
    call.deferred.callback([Outcome.delivered(FAST), Outcome.permanent(SLOW, "no such user", 550, "5.1.1")])
    assert updates == [] and spool.queue_ids() == [] and dsns(spool) == []
    lines = delivery_lines(events)  # still logged, once each
    assert len(lines) == 2 and "status=sent" in lines[0] and "status=bounced" in lines[1]


def test_remove_after_a_written_report_still_removes(spool, clock, monkeypatch):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW))
    s = make(spool, clock, deliver)
    updates = counting_updates(spool, monkeypatch)
    call = deliver.calls[0]
    call.report([Outcome.delivered(FAST)])
    assert updates == [env.queue_id]
    assert s.remove(env.queue_id) == "pending"
    call.report([Outcome.delivered(SLOW)])
    assert updates == [env.queue_id]  # removed meanwhile: no more writes
    call.deferred.callback([])
    assert spool.queue_ids() == [] and len(s) == 0


def test_hold_in_flight_survives_a_report(spool, clock):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW))
    s = make(spool, clock, deliver)
    s.hold(env.queue_id)
    deliver.calls[0].report([Outcome.delivered(FAST)])
    disk = on_disk(spool, env.queue_id)
    assert disk["held"] is True and states(spool, env.queue_id)[FAST] == DELIVERED
    deliver.calls[0].deferred.callback([Outcome.temporary(SLOW, "later", 451, "4.2.0")])
    assert s.next_due(env.queue_id) is None and on_disk(spool, env.queue_id)["held"] is True
    s.release(env.queue_id)
    clock.advance(300)
    assert deliver.calls[1].recipients == [SLOW]


def test_reported_delivery_survives_an_agent_error(spool, clock):
    """deliver() reports a delivery, then fails: the delivery stays recorded, only the rest is retried."""
    reports = []

    def deliver(envelope, recipients, report=None):
        reports.append([r.address for r in recipients])
        if FAST in reports[-1]:
            report([Outcome.delivered(FAST)])  # synchronously, before deliver returns
        raise RuntimeError("agent bug")

    env = queue(spool, clock, rcpts=(FAST, SLOW))
    s = make(spool, clock, deliver)
    assert states(spool, env.queue_id) == {FAST: DELIVERED, SLOW: PENDING}
    assert "agent bug" in on_disk(spool, env.queue_id)["recipients"][1]["last_text"]
    clock.advance(300)
    assert reports == [[FAST, SLOW], [SLOW]] and s.next_due(env.queue_id) == T0 + 300 + 600


def test_report_after_the_round_is_ignored(spool, clock, monkeypatch, events):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST, SLOW))
    make(spool, clock, deliver)
    call = deliver.calls[0]
    call.deferred.callback([Outcome.temporary(FAST, "later", 451, "4.2.0"), Outcome.temporary(SLOW, "later", 451, "4.2.0")])
    updates = counting_updates(spool, monkeypatch)
    call.report([Outcome.delivered(FAST), Outcome.delivered("stranger@example.org")])
    assert updates == [] and states(spool, env.queue_id) == {FAST: PENDING, SLOW: PENDING}
    assert any("reported after the round ended" in formatEvent(e) for e in events)


def test_stray_reported_outcome_is_ignored(spool, clock, events):
    deliver = ReportingDeliver()
    env = queue(spool, clock, rcpts=(FAST,))
    make(spool, clock, deliver)
    deliver.calls[0].report([Outcome.delivered("stranger@example.org")])
    assert states(spool, env.queue_id) == {FAST: PENDING}
    assert any(formatEvent(e) == f"{env.queue_id}: ignoring outcome for stranger@example.org" for e in events)


def test_router_reports_the_local_batch_before_the_remote_agent_ends(tmp_path, spool, clock):
    """Scheduler, Router, the real local agent and a remote agent that never answers."""
    root = tmp_path / "mailboxes"
    (root / "example.org" / "bob").mkdir(parents=True)
    directory = Directory(["example.org"], str(root), clock=clock)
    remote = []

    class SlowRemote:
        def deliver(self, envelope, recipients, message_path, report):
            remote.append(Deferred())
            return remote[-1]

    router = Router(spool, directory, LocalDelivery(directory, "mx.example.org", run=sync_run, fsync=False),
                    SlowRemote())
    env = queue(spool, clock, rcpts=("bob@example.org", SLOW))
    make(spool, clock, router)
    assert len(remote) == 1 and len(maildir_files(root, "bob")) == 1
    assert states(spool, env.queue_id) == {"bob@example.org": DELIVERED, SLOW: PENDING}
    remote[0].callback([Outcome.temporary(SLOW, "data timeout", 451, "4.4.2")])
    disk = on_disk(spool, env.queue_id)["recipients"]
    assert [(r["state"], r["attempts"]) for r in disk] == [(DELIVERED, 1), (PENDING, 1)]


def test_relay_field_is_none_for_an_unreached_remote_domain(spool, clock, events):
    """Postfix writes relay=none when no host answered (failed MX lookup) for a remote domain."""
    deliver = FakeDeliver(clock, {"bob@example.org": [(451, "4.4.3", "Host or domain name not found")]})
    env = queue(spool, clock)
    make(spool, clock, deliver, is_local=lambda domain: domain == "example.com")
    assert delivery_lines(events)[0] == (
        f"{env.queue_id}: to=<bob@example.org>, orig_to=<bob@example.org>, relay=none, delay=0, "
        "attempts=1, dsn=4.4.3, status=deferred (Host or domain name not found)"
    )


def test_relay_field_is_local_for_our_domains(spool, clock, events):
    deliver = FakeDeliver(clock, {})
    env = queue(spool, clock)
    make(spool, clock, deliver, is_local=lambda domain: domain == "example.org")
    assert delivery_lines(events)[0] == (
        f"{env.queue_id}: to=<bob@example.org>, orig_to=<bob@example.org>, relay=local, delay=0, "
        "attempts=1, dsn=2.0.0, status=sent (delivered)"
    )


def test_queue_stats_from_memory(tmp_path):
    """Size and oldest arrival without listing the spool (the metrics' gauges)."""
    from twisted.internet.task import Clock

    from mailhub.envelope import Envelope, Recipient
    from mailhub.queue.queuefile import new_queue_id
    from mailhub.queue.scheduler import RetryPolicy, Scheduler
    from mailhub.queue.spool import Spool

    spool = Spool(str(tmp_path / "spool"), fsync=False)
    clock = Clock()
    clock.advance(1_000_000)
    s = Scheduler(spool, lambda env, rcpts: None, clock, RetryPolicy())
    assert s.queue_stats() == (0, None)
    for arrival in (1000.0, 500.0, 2000.0):
        env = Envelope(new_queue_id(arrival), "a@x.example", [Recipient("b@y.example")], arrival,
                       next_attempt=clock.seconds() + 3600, attempts=1)
        spool.add(env, b"Subject: x\r\n\r\nbody\r\n")
        s.enqueue(env)
    assert s.queue_stats() == (3, 500.0)
