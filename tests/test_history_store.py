"""
The history store on SQLite (the same SQL runs on PostgreSQL:
tests/test_e2e_history_postgres.py): what events make of a message's
state, the filters, the cursor, the statistics, the percentiles, pruning
by age and by size, and hostile field values.
"""

from __future__ import annotations

import datetime
import sqlite3

import pytest

from mailhub.history import query
from mailhub.history.query import Filters, QueryError
from mailhub.history.rows import MAX_ADDRESS, MAX_TEXT, event_row
from mailhub.history.store import SQLiteStore, StoreError, rows_of

T0 = 1_800_000_000.0


def accepted(qid, t, rcpts, sender="a@x.test", client="192.0.2.1", user=""):
    return {"mail_event": "accepted", "queue_id": qid, "from": sender, "sender": sender, "client": client,
            "size": 100, "nrcpt": len(rcpts), "user": user, "proto": "ESMTP", "rcpts": rcpts, "log_time": t,
            "log_mail_text": f"{qid}: accepted from=<{sender}>"}


def delivery(qid, t, to, status, code=250, dsn="2.0.0", text="ok", **extra):
    return {"mail_event": "delivery", "queue_id": qid, "to": to, "status": status, "code": code, "dsn": dsn,
            "text": text, "relay": "mx.y.test", "attempts": 1, "log_time": t, **extra}


def reject(t, client, rcpt="", reason="", enhanced="5.7.1"):
    return {"mail_event": "reject", "client": client, "code": 554, "enhanced": enhanced, "text": "Relay access denied",
            "sender": "s@x.test", "rcpt": rcpt, "reason": reason, "log_time": t}


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "h" / "history.sqlite"), node="mx1")
    yield s
    s.close()


def status_of(store, qid):
    return query.message_json(store, qid)["status"]


def test_a_message_goes_from_queued_to_deferred_to_sent_with_its_latency(store):
    store.write(rows_of([accepted("Q1", T0, ["b@y.test"])]))
    assert status_of(store, "Q1") == "queued"
    store.write(rows_of([delivery("Q1", T0 + 10, "b@y.test", "deferred", 451, "4.0.0", "try later")]))
    assert status_of(store, "Q1") == "deferred"
    store.write(rows_of([delivery("Q1", T0 + 70, "b@y.test", "sent"), {"mail_event": "removed", "queue_id": "Q1",
                                                                      "log_time": T0 + 70}]))
    m = query.message_json(store, "Q1")
    assert (m["status"], m["state"], m["latency"], m["finished"]) == ("sent", "done", 70.0, T0 + 70)
    assert m["recipients"][0]["state"] == "delivered" and m["recipients"][0]["remote_mta"] == "mx.y.test"


def test_one_recipient_waiting_keeps_the_message_deferred(store):
    store.write(rows_of([accepted("Q1", T0, ["b@y.test", "c@z.test"]), delivery("Q1", T0 + 1, "b@y.test", "sent")]))
    assert status_of(store, "Q1") == "queued"  # c@z.test has no outcome yet
    store.write(rows_of([delivery("Q1", T0 + 1, "c@z.test", "deferred", 451, "4.0.0")]))
    assert status_of(store, "Q1") == "deferred"
    store.write(rows_of([delivery("Q1", T0 + 9, "c@z.test", "bounced", 550, "5.1.1", expired=True)]))
    assert status_of(store, "Q1") == "bounced"
    kinds = [e["event"] for e in query.story(store, "Q1")]
    assert kinds == ["accepted", "delivery", "delivery", "expired"]


def test_hold_release_and_delete_by_the_operator(store):
    store.write(rows_of([accepted("Q1", T0, ["b@y.test"]), {"mail_event": "hold", "queue_id": "Q1", "log_time": T0 + 1}]))
    assert status_of(store, "Q1") == "held"
    store.write(rows_of([{"mail_event": "release", "queue_id": "Q1", "log_time": T0 + 2}]))
    assert status_of(store, "Q1") == "queued"
    store.write(rows_of([{"mail_event": "removed", "queue_id": "Q1", "why": "removed by operator", "log_time": T0 + 3}]))
    m = query.message_json(store, "Q1")
    assert (m["status"], m["state"]) == ("deleted", "done")


def test_a_bounce_links_the_notification_and_the_story_follows_it(store):
    store.write(rows_of([
        accepted("Q1", T0, ["b@y.test"]),
        delivery("Q1", T0 + 1, "b@y.test", "bounced", 550, "5.1.1", "no such user"),
        {"mail_event": "bounce", "queue_id": "Q1", "kind": "sender non-delivery notification", "dsn_id": "D1",
         "log_time": T0 + 1},
        delivery("D1", T0 + 2, "a@x.test", "sent"),
    ]))
    assert query.message_json(store, "Q1")["notices"] == ["D1"]
    assert query.message_json(store, "D1")["bounce_of"] == "Q1"
    assert [(e["queue_id"], e["event"]) for e in query.story(store, "Q1")] == [
        ("Q1", "accepted"), ("Q1", "delivery"), ("Q1", "bounce"), ("D1", "delivery")]
    assert [e["queue_id"] for e in query.story(store, "Q1", follow=False)] == ["Q1"] * 3


def test_filters(store):
    store.write(rows_of([
        accepted("Q1", T0, ["b@y.test"], sender="One@X.test", client="192.0.2.1"),
        accepted("Q2", T0 + 10, ["c@z.test"], client="192.0.2.2", user="alice@x.test"),
        delivery("Q1", T0 + 1, "b@y.test", "sent"),
        reject(T0 + 5, "198.51.100.7", "d@w.test"),
    ]))

    def ids(**kw):
        return [m["queue_id"] for m in query.list_messages(store, Filters(**kw))[0]]

    assert ids(sender="one@x.test") == ["Q1"]
    assert ids(recipient="C@Z.test") == ["Q2"]
    assert ids(domain="y.test") == ["Q1"]
    assert ids(status="sent") == ["Q1"]
    assert ids(client="192.0.2.2") == ["Q2"]
    assert ids(since=T0 + 2, until=T0 + 9) == [m["queue_id"] for m in query.list_messages(store, Filters(status="rejected"))[0]]
    assert ids(user="ALICE@x.test") == ["Q2"]
    assert len(ids()) == 3
    with pytest.raises(QueryError):
        Filters(status="lost")


def test_the_cursor_walks_every_message_once_even_with_equal_times(store):
    store.write(rows_of([accepted(f"Q{i:02d}", T0 + i // 3, ["b@y.test"]) for i in range(10)]))
    seen, cursor = [], None
    while True:
        page, cursor = query.list_messages(store, Filters(), limit=4, cursor=cursor)
        seen += [m["queue_id"] for m in page]
        if cursor is None:
            break
    # newest first; equal times by queue id, descending
    assert seen == sorted((f"Q{i:02d}" for i in range(10)), key=lambda q: (int(q[1:]) // 3, q), reverse=True)
    for bad in ("!!", "e30", "x" * 300):
        with pytest.raises(QueryError):
            query.list_messages(store, Filters(), cursor=bad)


def test_stats_per_bucket_percentiles_and_top_lists(store):
    events = []
    for i in range(10):
        events += [accepted(f"Q{i}", T0 + 60 * i, [f"u{i}@y.test"]),
                   delivery(f"Q{i}", T0 + 60 * i + (i + 1), f"u{i}@y.test", "sent")]
    events += [delivery("Q9", T0 + 1, "late@z.test", "deferred", 451, "4.0.0")] * 2
    events += [reject(T0 + 5, "198.51.100.7", "x@w.test", reason="relay_denied")] * 3
    events += [reject(T0 + 6, "198.51.100.8")]
    store.write(rows_of(events))
    s = query.stats(store, T0, T0 + 600, "minute", now=T0 + 600)
    assert len(s["buckets"]) == 10 and s["buckets"][0]["start"] == T0 // 60 * 60
    assert s["totals"] == {"accepted": 10, "sent": 10, "deferred": 2, "bounced": 0, "rejected": 4}
    assert s["buckets"][0] == {"start": T0 // 60 * 60, "accepted": 1, "sent": 1, "deferred": 2, "bounced": 0, "rejected": 4}
    # latencies 1..10 s except Q9, still waiting for late@z.test
    assert s["latency"] == {"count": 9, "p50": 5.0, "p90": 9.0, "p99": 9.0}
    assert s["top_deferred_domains"] == [{"name": "z.test", "count": 2}]
    assert s["top_domains"][0] == {"name": "y.test", "count": 10}
    assert s["top_rejected_clients"] == [{"name": "198.51.100.7", "count": 3}, {"name": "198.51.100.8", "count": 1}]
    assert s["top_reject_reasons"] == [{"name": "relay_denied", "count": 3}, {"name": "5.7.1", "count": 1}]
    hourly = query.stats(store, T0, T0 + 7200, "hour", now=T0)
    assert sum(b["sent"] for b in hourly["buckets"]) == 10
    with pytest.raises(QueryError):
        query.stats(store, T0, T0 + 86400 * 30, "minute")
    with pytest.raises(QueryError):
        query.stats(store, T0, T0 - 1, "hour")


def test_prune_by_age_keeps_what_is_recent(store):
    store.write(rows_of([accepted("OLD", T0, ["b@y.test"]), delivery("OLD", T0 + 1, "b@y.test", "sent"),
                         accepted("NEW", T0 + 86400 * 40, ["b@y.test"])]))
    assert store.prune(T0 + 86400 * 41, 30 * 86400, 0) == 2
    assert [m["queue_id"] for m in query.list_messages(store, Filters())[0]] == ["NEW"]
    assert query.story(store, "OLD") == []
    assert store.fetch("SELECT COUNT(*) FROM recipients WHERE queue_id = 'OLD'") == [(0,)]


def test_prune_by_size_deletes_the_oldest_until_under_the_cap(store):
    for batch in range(20):
        store.write(rows_of([accepted(f"Q{batch}-{i}", T0 + batch * 100 + i, ["b@y.test"]) for i in range(50)]))
    conn = store.connect()
    size = store.size(conn)
    cap = size // 2
    assert store.prune(T0 + 5000, 0, cap) > 0
    assert store.size(conn) <= cap
    left = store.fetch("SELECT MIN(time) FROM events")[0][0]
    assert left > T0 + 500  # the oldest went first
    assert store.fetch("SELECT COUNT(*) FROM events WHERE time >= ?", [T0 + 1900]) == [(50,)]  # the newest stayed


def test_hostile_values_are_bounded(store):
    long = "x" * 5000 + "@" + "y" * 100
    row = event_row({"mail_event": "delivery", "queue_id": "Q1", "to": long, "status": "sent", "text": "t" * 9000,
                     "code": 10**9, "log_time": "soon", "weird": object()})
    assert row is not None and len(row.recipient) == MAX_ADDRESS and len(row.detail) == MAX_TEXT and row.code is None
    store.write([row])
    assert len(query.message_json(store, "Q1")["recipients"][0]["address"]) == MAX_ADDRESS
    assert event_row({"log_format": "not a mail event"}) is None


def test_wal_and_a_second_writer(tmp_path):
    path = str(tmp_path / "history.sqlite")
    a, b = SQLiteStore(path, "a"), SQLiteStore(path, "b")
    a.write(rows_of([accepted("QA", T0, ["b@y.test"])]))
    b.write(rows_of([accepted("QB", T0 + 1, ["b@y.test"])]))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert {m["node"] for m in query.list_messages(a, Filters())[0]} == {"a", "b"}


def test_errors_are_one_line(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(StoreError, match="history database .*dir.sqlite"):
        SQLiteStore(str(tmp_path / "dir.sqlite")).write(rows_of([accepted("Q", T0, [])]))
    with pytest.raises(StoreError, match="no such file"):
        SQLiteStore(str(tmp_path / "none.sqlite"), readonly=True).fetch("SELECT 1")


def test_parse_time():
    assert query.parse_time("2h", T0) == T0 - 7200
    assert query.parse_time("90", T0) == T0 - 90
    assert query.parse_time("1800000000", T0) == 1800000000.0
    assert query.parse_time("2027-01-15", T0) == datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC).timestamp()
    assert query.parse_time("2027-01-15T08:00:00Z", T0) == query.parse_time("2027-01-15T09:00:00+01:00", T0)
    for bad in ("yesterday", "", "1" * 50):
        with pytest.raises(QueryError):
            query.parse_time(bad, T0)
