"""
The history over HTTP, in memory (tests/httpharness.py's site with a
SQLite history): C{GET /v1/messages} (filters, pagination, a user's own
mail), C{GET /v1/stats} (administrators), C{GET /v1/messages/ID} for a
message that left the queue, the status page's history section and its
range switch; every answer checked against docs/openapi.json.
"""

from __future__ import annotations

import json

import pytest
from historyharness import conforms, openapi
from httpharness import Env

from mailhub.history.store import SQLiteStore, rows_of
from mailhub.web.api import make_http_site

T0 = 1_700_000_000.0


def accepted(qid, t, rcpts, user=""):
    return {"mail_event": "accepted", "queue_id": qid, "from": "alice@example.com", "client": "192.0.2.1",
            "size": 10, "nrcpt": len(rcpts), "user": user, "proto": "HTTP", "rcpts": rcpts, "log_time": t}


def delivery(qid, t, to, status="sent", code=250, dsn="2.0.0"):
    return {"mail_event": "delivery", "queue_id": qid, "to": to, "status": status, "code": code, "dsn": dsn,
            "text": "ok", "relay": "local", "attempts": 1, "log_time": t}


class HistoryEnv(Env):
    def __init__(self, tmp_path, history=True) -> None:
        super().__init__(tmp_path)
        self.store = SQLiteStore(str(tmp_path / "history.sqlite"))
        self.flushed = 0

        def flush():
            from twisted.internet import defer

            self.flushed += 1
            return defer.succeed(None)

        self.site = make_http_site(
            self.spool, self.scheduler.enqueue, self.scheduler, self.users, self.metrics, "mx.example.com",
            admins=["root@example.com"], clock=self.clock, history=(self.store, flush) if history else None,
        )


@pytest.fixture
def env(tmp_path):
    e = HistoryEnv(tmp_path)
    e.store.write(rows_of([
        accepted("Q1", T0 - 300, ["bob@example.org"], user="alice@example.com"),
        delivery("Q1", T0 - 290, "bob@example.org"),
        accepted("Q2", T0 - 200, ["carol@example.net"]),
        delivery("Q2", T0 - 190, "carol@example.net", "deferred", 451, "4.2.0"),
        accepted("Q3", T0 - 100, ["dave@<b>evil.example"], user="alice@example.com"),
        delivery("Q3", T0 - 90, "dave@<b>evil.example", "bounced", 550, "5.1.1"),
        {"mail_event": "bounce", "queue_id": "Q3", "kind": "sender non-delivery notification", "dsn_id": "D3",
         "log_time": T0 - 90},
        {"mail_event": "reject", "client": "198.51.100.9", "code": 554, "enhanced": "5.7.1", "text": "Relay access denied",
         "sender": "x@y.test", "rcpt": "z@w.test", "reason": "relay_denied", "log_time": T0 - 50},
    ]))
    return e


def schema(name):
    """A reference to schema C{name} of docs/openapi.json, and the document."""
    doc = openapi()
    return {"$ref": f"#/components/schemas/{name}"}, doc


def test_list_filters_and_openapi(env):
    r = env.request("GET", "/v1/messages", token=env.root)
    assert r.status == 200, r.raw
    page = r.json()
    ref, doc = schema("HistoryPage")
    assert conforms(page, ref, doc)
    # the refused transaction, the bounce Q3 caused, then the messages
    assert [m["queue_id"] for m in page["messages"]][1:] == ["D3", "Q3", "Q2", "Q1"] and page["next_cursor"] is None
    assert page["messages"][0]["status"] == "rejected"
    def ids(query):
        return [m["queue_id"] for m in env.request("GET", f"/v1/messages?{query}", token=env.root).json()["messages"]]

    assert ids("status=deferred") == ["Q2"]
    assert ids("domain=example.org") == ["Q1"]
    assert ids("recipient=CAROL@example.net") == ["Q2"]
    assert [m["queue_id"] for m in env.request("GET", f"/v1/messages?since={int(T0 - 150)}&until=1700000000",
                                               token=env.root).json()["messages"]][1:] == ["D3", "Q3"]


def test_pagination(env):
    seen, cursor = [], ""
    for _ in range(5):
        r = env.request("GET", "/v1/messages?limit=2" + (f"&cursor={cursor}" if cursor else ""), token=env.root)
        seen += [m["queue_id"] for m in r.json()["messages"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen[1:] == ["D3", "Q3", "Q2", "Q1"] and len(seen) == 5


@pytest.mark.parametrize("query, error", [
    ("status=lost", "unknown status"),
    ("since=yesterday", "not a time"),
    ("cursor=%21%21", "invalid cursor"),
    ("limit=0", "limit must be"),
    ("limit=abc", "limit must be"),
    ("status=sent&status=bounced", "status given more than once"),
])
def test_bad_parameters_are_400_with_the_json_error(env, query, error):
    r = env.request("GET", f"/v1/messages?{query}", token=env.root)
    assert r.status == 400 and r.json()["code"] == 400 and r.json()["error"].startswith(error), r.body


def test_a_user_sees_only_their_own(env):
    r = env.request("GET", "/v1/messages", token=env.alice)
    assert [m["queue_id"] for m in r.json()["messages"]] == ["Q3", "Q1"]
    assert env.request("GET", "/v1/messages/Q2", token=env.alice).status == 404
    assert env.request("GET", "/v1/stats", token=env.alice).status == 403
    assert env.request("GET", "/v1/messages", token="mh_wrong").status == 401


def test_a_finished_message_from_the_history(env):
    qid = "0000000Q3"
    env.store.write(rows_of([accepted(qid, T0 - 10, ["bob@example.org"], user="alice@example.com"),
                             delivery(qid, T0 - 9, "bob@example.org"),
                             {"mail_event": "bounce", "queue_id": qid, "kind": "delay notification", "dsn_id": "DD",
                              "log_time": T0 - 8}]))
    before = env.flushed
    r = env.request("GET", f"/v1/messages/{qid}", token=env.alice)
    assert r.status == 200, r.raw
    assert env.flushed == before + 1  # the recorder wrote what waited first
    data = r.json()
    ref, doc = schema("Message")
    assert conforms(data, ref, doc)
    assert set(data) == {"queue_id", "state", "sender", "arrival", "next_attempt", "attempts", "size", "recipients",
                         "bounces", "delay_notices"}
    assert data["state"] == "done" and data["delay_notices"] == ["DD"] and data["bounces"] == []
    assert data["recipients"][0]["state"] == "delivered" and data["recipients"][0]["last_code"] == 250


def test_stats_and_openapi(env):
    r = env.request("GET", "/v1/stats?since=1h&bucket=minute", token=env.root)
    assert r.status == 200, r.raw
    data = r.json()
    ref, doc = schema("Stats")
    assert conforms(data, ref, doc)
    assert data["totals"] == {"accepted": 3, "sent": 1, "deferred": 1, "bounced": 1, "rejected": 1}
    assert len(data["buckets"]) == 61 and data["latency"]["count"] == 1 and data["latency"]["p50"] == 10.0
    assert data["top_rejected_clients"] == [{"name": "198.51.100.9", "count": 1}]
    assert env.request("GET", "/v1/stats?bucket=year", token=env.root).status == 400
    r = env.request("GET", "/v1/stats?since=30d&bucket=minute", token=env.root)
    assert r.status == 400 and "too many buckets" in r.json()["error"]


def test_history_disabled_is_404(tmp_path):
    e = HistoryEnv(tmp_path, history=False)
    for path in ("/v1/messages", "/v1/stats"):
        r = e.request("GET", path, token=e.root)
        assert r.status == 404 and r.json()["error"].startswith("history disabled")


@pytest.mark.parametrize("range_, unit, bars", [("hour", "-60 min", 60), ("day", "-24 h", 24), ("week", "-7 d", 7)])
def test_status_page_history_and_range_switch(env, range_, unit, bars):
    r = env.request("GET", f"/?range={range_}")
    assert r.status == 200 and r.headers["content-security-policy"].startswith("default-src 'none'")
    page = r.body.decode()
    assert f'<strong id="range-current">{range_}</strong>' in page and unit in page
    others = [name for name in ("hour", "day", "week") if name != range_]
    assert all(f'href="?range={name}"' in page for name in others)
    assert 'id="history-accepted">3</div>' in page and 'id="history-rejected">1</div>' in page
    assert "<script" not in page
    # a hostile recipient domain is text
    assert "&lt;b&gt;evil.example" in page and "<b>evil" not in page
    assert f'content="{ {"hour": 30, "day": 60, "week": 300}[range_] }"' in page


def test_status_page_unknown_range_is_the_hour(env):
    page = env.request("GET", "/?range=%3Cx%3E").body.decode()
    assert '<strong id="range-current">hour</strong>' in page and "<x>" not in page


def test_answers_are_json_documents(env):
    r = env.request("GET", "/v1/messages", token=env.root)
    assert r.headers["content-type"] == "application/json" and json.loads(r.body)
