"""
The HTTP API in memory: the real Site and HTTP parser over a StringTransport,
a real spool in tmp_path, a real users file with tokens, a fake scheduler.
"""

from __future__ import annotations

import base64
import email
import email.policy
import errno
import json
import os
import re

import pytest
from httpharness import Env, conforms, message_json, openapi, post_json

from mailhub.users import UsersFile
from mailhub.web.api import ROUTES, make_http_site

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "openapi.json")


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


# -- submission -----------------------------------------------------------------------------


def test_post_json_queues_a_mime_message(env):
    att = base64.b64encode(b"\x00\x01binary").decode()
    attachment = {"filename": "a.bin", "content_type": "application/pdf", "content_base64": att}
    r = post_json(env, message_json(cc=["carol@example.net"], bcc=["dave@example.net"], html="<p>Hello</p>",
                                    attachments=[attachment]))
    assert r.status == 202, r.raw
    qid = r.json()["queue_id"]
    assert r.headers["content-type"] == "application/json"
    env_ = env.spool.load(qid)
    assert env_.sender == "alice@example.com"
    assert [x.address for x in env_.recipients] == ["bob@example.org", "carol@example.net", "dave@example.net"]
    assert env_.client["protocol"] == "HTTP" and env_.client["user"] == "alice@example.com"
    assert env.scheduler.enqueued == [env_]
    with env.spool.open_message(qid) as f:
        raw = f.read()
    assert raw.startswith(
        b"Received: from [127.0.0.1] (user alice@example.com)\r\n\tby mx.example.com (mailhub) with HTTP id " + qid.encode()
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "alice@example.com" and msg["To"] == "bob@example.org" and msg["Cc"] == "carol@example.net"
    assert msg["Bcc"] is None and msg["Subject"] == "Hi" and msg["Message-ID"].endswith("@mx.example.com>")
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("plain",))
    assert body.get_content() == "Hello Bob\r\n"
    assert msg.get_body(("html",)).get_content() == "<p>Hello</p>\r\n"
    atts = list(msg.iter_attachments())
    assert [(a.get_filename(), a.get_content_type(), a.get_content()) for a in atts] == [
        ("a.bin", "application/pdf", b"\x00\x01binary")
    ]
    # the accepted metric went up through the log
    assert env_.esmtp["size"] == len(raw)


def test_post_raw_with_query_envelope(env):
    raw = b"From: Alice <alice@example.com>\nTo: x@example.org\nBcc: secret@example.org\nSubject: raw\n\nbody line\n"
    r = env.request("POST", "/v1/messages?from=alice%2Blists@example.com&to=bob@example.org&to=carol@example.org",
                    raw, {"Content-Type": "message/rfc822"}, token=env.alice)
    assert r.status == 202, r.raw
    e = env.spool.load(r.json()["queue_id"])
    assert e.sender == "alice+lists@example.com"
    assert [x.address for x in e.recipients] == ["bob@example.org", "carol@example.org"]
    with env.spool.open_message(e.queue_id) as f:
        stored = f.read()
    assert re.search(rb"\r\nFrom: Alice <alice@example.com>\r\nTo: x@example.org\r\nSubject: raw\r\n"
                     rb"Date: Tue, 14 Nov 2023 22:13:20 \+0000\r\nMessage-ID: <[^>\r\n]+@mx\.example\.com>\r\n"
                     rb"\r\nbody line\r\n\Z", stored), stored
    assert b"for <bob@example.org>" not in stored


def test_post_raw_envelope_from_headers(env):
    raw = (
        b"From: alice@example.com\r\nTo: a@example.org, B <b@example.org>\r\n"
        b"Cc: c@example.org\r\nBcc: d@example.org\r\n\r\nx\r\n"
    )
    r = env.request("POST", "/v1/messages", raw, {"Content-Type": "message/rfc822; charset=utf-8"}, token=env.alice)
    assert r.status == 202, r.raw
    e = env.spool.load(r.json()["queue_id"])
    assert [x.address for x in e.recipients] == ["a@example.org", "b@example.org", "c@example.org", "d@example.org"]
    with env.spool.open_message(e.queue_id) as f:
        assert b"Bcc" not in f.read()


DATE = b"Tue, 14 Nov 2023 22:13:20 +0000"  # the Env clock, 1_700_000_000, as smtpd writes dates
MSGID = rb"Message-ID: <[^>\r\n]+@mx\.example\.com>\r\n"


def post_raw(env, raw: bytes, query: str = "?from=alice@example.com&to=bob@example.org") -> bytes:
    r = env.request("POST", "/v1/messages" + query, raw, {"Content-Type": "message/rfc822"}, token=env.alice)
    assert r.status == 202, r.raw
    with env.spool.open_message(r.json()["queue_id"]) as f:
        return f.read()


def received_of(stored: bytes) -> tuple[bytes, bytes]:
    """(the date of the Received header mailhub wrote first, the message after that header)."""
    m = re.match(rb"Received: from \[127\.0\.0\.1\] \(user alice@example\.com\)\r\n"
                 rb"\tby mx\.example\.com \(mailhub\) with HTTP id [0-9A-Z]+(\r\n\tfor <[^>]+>)?; (.*?)\r\n", stored)
    assert m, stored
    return m.group(2), stored[m.end():]


@pytest.mark.parametrize(
    "raw, expected",
    [
        # Date and Message-ID go at the end of the header section; look-alikes in the body do not count
        (b"From: alice@example.com\nSubject: s\n  folded\n\nDate: not a header\nMessage-ID: <body@x>\n\n.\n",
         rb"From: alice@example.com\r\nSubject: s\r\n  folded\r\nDate: " + re.escape(DATE) + rb"\r\n" + MSGID +
         rb"\r\nDate: not a header\r\nMessage-ID: <body@x>\r\n\r\n\.\r\n"),
        # present ones are kept as they are (any case), nothing is added
        (b"DATE: Mon, 1 Jan 2024 00:00:00 +0100\r\nmessage-id: <m@x>\r\n\r\nbody\r\n",
         rb"DATE: Mon, 1 Jan 2024 00:00:00 \+0100\r\nmessage-id: <m@x>\r\n\r\nbody\r\n"),
        (b"Subject: s\nMessage-Id: <m@x>\n\nbody",
         rb"Subject: s\r\nMessage-Id: <m@x>\r\nDate: " + re.escape(DATE) + rb"\r\n\r\nbody\r\n"),
        # no empty line: the body starts at the first line that is not a field; the separator is inserted
        (b"Subject: s\nhello world: not a field\n", rb"Subject: s\r\nDate: " + re.escape(DATE) + rb"\r\n" + MSGID +
         rb"\r\nhello world: not a field\r\n"),
        # only a header section (and a Bcc, which must still go)
        (b"Subject: s\nBcc: secret@example.org\n", rb"Subject: s\r\nDate: " + re.escape(DATE) + rb"\r\n" + MSGID + rb"\r\n"),
        # no header at all
        (b"just text\n", rb"Date: " + re.escape(DATE) + rb"\r\n" + MSGID + rb"\r\njust text\r\n"),
    ],
)
def test_post_raw_adds_date_and_message_id_to_the_header_only(env, raw, expected):
    date, message = received_of(post_raw(env, raw))
    assert date == DATE
    assert re.fullmatch(expected, message), message


def test_http_dates_are_written_as_smtpd_writes_them(env, tmp_path):
    from mailhub.smtp.proto import received_header

    smtp = received_header("c", "192.0.2.1", "mx.example.com", "ESMTP", "Q", None, env.clock.seconds())
    assert smtp.endswith(b"; " + DATE + b"\r\n")
    r = post_json(env, message_json())
    with env.spool.open_message(r.json()["queue_id"]) as f:
        stored = f.read()
    assert received_of(stored)[0] == DATE
    assert re.search(rb"\r\nDate: " + re.escape(DATE) + rb"\r\n", stored)


# -- the OpenAPI document and the code agree ------------------------------------------------------


@pytest.mark.parametrize(
    "fields, recipients",
    [
        ({"to": "bob@example.org"}, ["bob@example.org"]),
        ({"to": ["bob@example.org"], "cc": "carol@example.net", "bcc": "dave@example.net"},
         ["bob@example.org", "carol@example.net", "dave@example.net"]),
        ({"to": ["bob@example.org", "carol@example.net"]}, ["bob@example.org", "carol@example.net"]),
        ({"to": 5}, None),
        ({"to": ["bob@example.org", 5]}, None),
        ({"to": {"address": "bob@example.org"}}, None),
        ({"cc": None, "to": "bob@example.org"}, None),
    ],
)
def test_recipient_fields_accept_what_openapi_says(env, fields, recipients):
    """to/cc/bcc: one address as a string or a list of them -- the document and the code agree."""
    doc = openapi()
    body = {"from": "alice@example.com", "text": "x", **fields}
    assert conforms(body, doc["components"]["schemas"]["NewMessage"], doc) == (recipients is not None)
    r = post_json(env, json.dumps(body).encode())
    if recipients is None:
        assert r.status == 400 and "must be a list of addresses" in r.json()["error"], r.raw
        return
    assert r.status == 202, r.raw
    e = env.spool.load(r.json()["queue_id"])
    assert [x.address for x in e.recipients] == recipients
    with env.spool.open_message(e.queue_id) as f:
        msg = email.message_from_bytes(f.read(), policy=email.policy.default)
    if isinstance(fields["to"], str):
        assert msg["To"] == fields["to"]


@pytest.mark.parametrize(
    "headers, token, status, text",
    [
        ({}, None, 401, "missing bearer token"),
        ({"Authorization": "Basic YTpi"}, None, 401, "expected Authorization: Bearer TOKEN"),
        ({}, "mh_wrong", 401, "invalid token"),
    ],
)
def test_bad_tokens(env, headers, token, status, text):
    h = {"Content-Type": "application/json"} | headers
    r = env.request("POST", "/v1/messages", message_json(), h, token=token)
    assert r.status == status
    assert r.json() == {"error": text, "code": status}
    assert r.headers["www-authenticate"] == 'Bearer realm="mailhub"'
    assert env.spool.queue_ids() == []


@pytest.mark.parametrize(
    "body, status, error",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON body must be an object"),
        (b'{"from": "alice@example.com", "to": ["b@example.org"]}', 400, "give text or html"),
        (b'{"from": "alice@example.com", "to": [], "text": "x"}', 400, "no recipients"),
        (b'{"from": "alice@example.com", "to": "not an address", "text": "x"}', 400, "invalid recipient"),
        (b'{"from": "alice@example.com", "to": ["b@example.org"], "text": 5}', 400, "text must be a string"),
        (
            b'{"from": "alice@example.com", "to": ["b@example.org"], "text": "x", "subject": "a\\r\\nBcc: x@y"}',
            400, "subject: control character U+000D",
        ),
        (b'{"from": "alice@example.com", "to": ["b@example.org"], "text": "x", "evil": 1}', 400, "unknown field(s): evil"),
        (b'{"to": ["b@example.org"], "text": "x"}', 400, "missing sender"),
        (
            b'{"from": "alice@example.com", "to": ["b@example.org"], "text": "x", '
            b'"attachments": [{"filename": "a", "content_base64": "!!"}]}',
            400, "not base64",
        ),
        (
            b'{"from": "bob@example.com", "to": ["b@example.org"], "text": "x"}',
            403, "sender <bob@example.com> is not owned by alice@example.com",
        ),
        (b'{"from": "alice@example.com", "to": ["b@example.org"], "text": "\\ud800"}', 400, "lone surrogate"),
    ],
)
def test_bad_json_bodies(env, body, status, error):
    r = post_json(env, body)
    assert r.status == status, r.raw
    assert r.json()["code"] == status
    assert error in r.json()["error"]
    assert env.spool.queue_ids() == [] and env.scheduler.enqueued == []


def test_wrong_content_type(env):
    r = env.request("POST", "/v1/messages", message_json(), {"Content-Type": "text/plain"}, token=env.alice)
    assert r.status == 415
    assert r.json() == {"error": "Content-Type must be application/json or message/rfc822", "code": 415}


def test_oversized_content_length_refused_before_reading(env):
    head = (
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {env.alice}\r\nContent-Length: 100001\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    r = env.request("POST", "/v1/messages", raw=head)  # no body sent at all
    assert r.status == 413
    assert r.json() == {"error": "request body larger than 100000 bytes", "code": 413}
    assert r.headers["connection"] == "close"
    assert b"100 Continue" not in r.raw
    assert r.transport.disconnecting
    assert env.spool.queue_ids() == []


def test_oversized_chunked_body_refused(env):
    chunk = b"x" * 60000
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    head = (
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
        f"Authorization: Bearer {env.alice}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    r = env.request("POST", "/v1/messages", raw=head + body)
    assert r.status == 413
    assert r.raw.count(b"HTTP/1.1") == 1
    assert env.spool.queue_ids() == []


def test_body_at_the_limit_is_accepted(tmp_path):
    e = Env(tmp_path, max_body=2000)
    body = message_json(text="x" * 100)
    body = body[:-1] + b" " * (2000 - len(body)) + b"}"
    assert len(body) == 2000
    r = post_json(e, body)
    assert r.status == 202, r.raw


@pytest.mark.parametrize("err, status", [(errno.ENOSPC, 507), (errno.EIO, 503)])
def test_spool_failure_is_not_202_and_queues_nothing(env, monkeypatch, err, status):
    from mailhub.queue import spool as spool_mod

    def failing_commit(self, envelope):
        self.abort()  # what the real commit does on any error
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(spool_mod.SpoolWriter, "commit", failing_commit)
    r = post_json(env, message_json())
    assert r.status == status
    assert r.json()["code"] == status
    assert env.spool.queue_ids() == [] and env.scheduler.enqueued == []
    assert os.listdir(os.path.join(env.spool.path, "tmp")) == []


# -- status and queue --------------------------------------------------------------------------


def test_get_message_and_queue(env):
    qid = post_json(env, message_json()).json()["queue_id"]
    r = env.request("GET", f"/v1/messages/{qid}", token=env.alice)
    assert r.status == 200
    data = r.json()
    assert data["queue_id"] == qid and data["state"] == "queued" and data["sender"] == "alice@example.com"
    assert [(x["address"], x["state"], x["attempts"]) for x in data["recipients"]] == [("bob@example.org", "pending", 0)]
    # root (admin) sees it, another user does not
    env.users.add("eve@example.com", "secret-e")
    eve = env.users.add_token("eve@example.com")
    assert env.request("GET", f"/v1/messages/{qid}", token=eve).status == 404
    assert env.request("GET", f"/v1/messages/{qid}", token=env.root).status == 200
    assert env.request("GET", "/v1/queue", token=eve).json() == {"messages": [], "count": 0}
    q = env.request("GET", "/v1/queue", token=env.root).json()
    assert q["count"] == 1 and q["messages"][0]["queue_id"] == qid
    assert env.request("GET", "/v1/queue", token=env.alice).json()["count"] == 1
    assert env.request("GET", "/v1/queue").status == 401


def test_get_unknown_or_bad_message_is_404(env):
    assert env.request("GET", "/v1/messages/0000000000000ZZZZZ", token=env.alice).json() == {
        "error": "no such message (not in the queue, and no event log)", "code": 404}
    assert env.request("GET", "/v1/messages/..%2F..%2Fetc", token=env.alice).status == 404
    assert env.request("GET", "/v1/messages/", token=env.alice).status == 404


def test_get_message_from_event_log_after_it_left(tmp_path):
    from twisted.logger import globalLogPublisher

    from mailhub.eventlog import EventLogObserver
    from mailhub.maillog import mail_event

    e = Env(tmp_path)
    log_path = str(tmp_path / "events.jsonl")
    e.site.resource.event_log = log_path
    obs = EventLogObserver(log_path)
    globalLogPublisher.addObserver(obs)
    try:
        qid = post_json(e, message_json()).json()["queue_id"]
        mail_event("bounce", "{queue_id}: {kind}: {dsn_id}", queue_id=qid, kind="sender delay notification",
                   dsn_id="0000000000001DDDDD")
        queued = e.request("GET", f"/v1/messages/{qid}", token=e.alice).json()
        # as the scheduler logs it (Scheduler._log_delivery)
        mail_event("delivery", "{queue_id}: to=<{to}>, relay={relay}, dsn={dsn}, status={status} ({text})",
                   queue_id=qid, to="bob@example.org", orig_to="bob@example.org", relay="mx.example.org[192.0.2.1]:25",
                   attempts=2, dsn="5.1.1", status="bounced", text="host mx.example.org said: 550 5.1.1 no such user",
                   delay="1", code=550, remote_mta="mx.example.org[192.0.2.1]:25", last_attempt=1_700_000_100.0)
        mail_event("bounce", "{queue_id}: {kind}: {dsn_id}", queue_id=qid, kind="sender non-delivery notification",
                   dsn_id="0000000000001BBBBB")
        e.spool.remove(qid)
    finally:
        globalLogPublisher.removeObserver(obs)
        obs.close()
    r = e.request("GET", f"/v1/messages/{qid}", token=e.alice)
    assert r.status == 200, r.raw
    done = r.json()
    assert queued["state"] == "queued" and done["state"] == "done"
    assert sorted(queued) == sorted(done)
    assert sorted(queued["recipients"][0]) == sorted(done["recipients"][0])
    assert (queued["bounces"], queued["delay_notices"]) == ([], ["0000000000001DDDDD"])
    assert (done["bounces"], done["delay_notices"]) == (["0000000000001BBBBB"], ["0000000000001DDDDD"])
    assert done["recipients"] == [{
        "address": "bob@example.org", "original": "bob@example.org", "state": "failed", "attempts": 2,
        "last_code": 550, "last_status": "5.1.1", "last_text": "host mx.example.org said: 550 5.1.1 no such user",
        "last_attempt": 1_700_000_100.0, "remote_mta": "mx.example.org[192.0.2.1]:25"}]
    assert done["sender"] == "alice@example.com" and done["next_attempt"] is None and done["attempts"] == 2
    e.users.add("eve@example.com", "secret-e")
    assert e.request("GET", f"/v1/messages/{qid}", token=e.users.add_token("eve@example.com")).status == 404


def test_flush(env):
    assert env.request("POST", "/v1/queue/flush", token=env.alice).status == 403
    r = env.request("POST", "/v1/queue/flush", token=env.root)
    assert r.status == 202 and r.json() == {"flushed": "all"}
    r = env.request("POST", "/v1/queue/flush?queue_id=0000000000000AAAAA", token=env.root)
    assert r.status == 202 and r.json() == {"flushed": "0000000000000AAAAA", "result": "flushed"}
    # a held message is not flushed (Scheduler.flush -> "held"): the answer says so
    r = env.request("POST", "/v1/queue/flush?queue_id=0000000000000HHHHH", token=env.root)
    assert r.status == 202 and r.json() == {"flushed": "0000000000000HHHHH", "result": "held"}
    assert env.request("POST", "/v1/queue/flush?queue_id=0000000000000ZZZZZ", token=env.root).status == 404
    assert env.scheduler.flushed == [None, "0000000000000AAAAA", "0000000000000HHHHH"]


def test_flush_answers_match_openapi(env):
    doc = openapi()
    schema = doc["paths"]["/v1/queue/flush"]["post"]["responses"]["202"]["content"]["application/json"]["schema"]
    for query in ("", "?queue_id=0000000000000AAAAA", "?queue_id=0000000000000HHHHH"):
        answer = env.request("POST", "/v1/queue/flush" + query, token=env.root).json()
        assert conforms(answer, schema, doc), answer
    assert not conforms({"flushed": "x", "result": "maybe"}, schema, doc)


def test_flush_with_the_real_scheduler_reports_held(tmp_path):
    from twisted.internet import defer

    from mailhub.queue.scheduler import RetryPolicy, Scheduler

    e = Env(tmp_path)
    attempts: list = []
    sched = Scheduler(e.spool, lambda *a, **kw: attempts.append(a) or defer.Deferred(), e.clock, RetryPolicy(jitter=0.0))
    e.site = make_http_site(e.spool, sched.enqueue, sched, e.users, e.metrics, "mx.example.com",
                            admins=["root@example.com"], clock=e.clock)
    sched.startService()
    qid = post_json(e, message_json()).json()["queue_id"]
    assert len(attempts) == 1
    r = e.request("POST", f"/v1/queue/flush?queue_id={qid}", token=e.root)
    assert r.status == 202 and r.json() == {"flushed": qid, "result": "flushed"}
    sched.hold(qid)
    r = e.request("POST", f"/v1/queue/flush?queue_id={qid}", token=e.root)
    assert r.status == 202 and r.json() == {"flushed": qid, "result": "held"}
    assert e.request("POST", "/v1/queue/flush", token=e.root).json() == {"flushed": "all"}


def test_405_and_404(env):
    r = env.request("DELETE", "/v1/queue", token=env.root)
    assert r.status == 405 and r.headers["allow"] == "GET" and r.json()["code"] == 405
    assert env.request("PUT", "/v1/messages", token=env.alice).headers["allow"] == "GET, POST"
    assert env.request("GET", "/nope").json() == {"error": "no such resource", "code": 404}


def test_metrics_endpoint_counts_http_submissions(env):
    from twisted.logger import globalLogPublisher

    from mailhub.metrics import MetricsObserver

    obs = MetricsObserver(env.metrics)
    globalLogPublisher.addObserver(obs)
    try:
        post_json(env, message_json())
    finally:
        globalLogPublisher.removeObserver(obs)
    r = env.request("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=")
    text = r.body.decode()
    assert 'mailhub_messages_accepted_total{listener="http"} 1.0' in text.splitlines()
    assert "mailhub_queue_size 1.0" in text.splitlines()
    assert "mailhub_oldest_message_age_seconds 0.0" in text.splitlines()
    env.clock.advance(30)
    assert "mailhub_oldest_message_age_seconds 30.0" in env.request("GET", "/metrics").body.decode().splitlines()


def test_status_page_escapes_addresses(env):
    env.metrics.observe({"mail_event": "delivery", "status": "bounced", "to": "<script>alert(1)</script>@x.org",
                         "queue_id": "Q1", "relay": "local", "delay": "1", "text": "550 <b>no</b>", "dsn": "5.1.1"})
    r = env.request("GET", "/")
    assert r.status == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert b"<script>" not in r.body
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;@x.org" in r.body
    assert b"550 &lt;b&gt;no&lt;/b&gt;" in r.body
    assert env.request("GET", "/status").body.count(b"<svg") == 2


def test_status_page_says_the_version(env):
    from mailhub import __version__

    body = env.request("GET", "/").body
    assert f'mailhub <span id="version">{__version__}</span>'.encode() in body


def test_openapi_describes_every_route():
    with open(DOCS) as f:
        doc = json.load(f)
    assert doc["openapi"].startswith("3.1")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m in ("get", "post", "put", "delete")}
    assert described == set(ROUTES)
    for method, path in ROUTES:
        op = doc["paths"][path][method.lower()]
        assert "200" in op["responses"] or "202" in op["responses"]
        if path.startswith("/v1/"):
            assert op["security"] == [{"bearer": []}] and "401" in op["responses"]
    # every $ref resolves
    refs = re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', json.dumps(doc))
    for kind, name in refs:
        assert name in doc["components"][kind]


def test_tokens_are_stored_hashed_and_cli_prints_one(tmp_path):
    import io

    from mailhub.cli.user import UserOptions, run_user

    users = UsersFile(str(tmp_path / "users"), rounds=4)
    users.add("alice@example.com", "pw", extensions=["senders=a@example.org"])
    opts = UserOptions()
    opts.parseOptions(["token", "Alice@Example.COM"])
    out, err = io.StringIO(), io.StringIO()
    assert run_user(opts, users.path, stdout=out, stderr=err) == 0
    token = out.getvalue().strip()
    assert re.fullmatch(r"mh_[A-Za-z0-9_-]{43}", token)
    with open(users.path) as f:
        line = f.read()
    assert token not in line and ":senders=a@example.org:token=sha256-" in line
    fresh = UsersFile(users.path)
    assert fresh.check_token(token) == "alice@example.com"
    assert fresh.check_token(token + "x") is None and fresh.check_token("") is None
    assert fresh.get("alice@example.com").senders == ("a@example.org",)
    second = fresh.add_token("alice@example.com")
    assert fresh.check_token(token) == fresh.check_token(second) == "alice@example.com"
    opts = UserOptions()
    opts.parseOptions(["token", "nobody@example.com"])
    assert run_user(opts, users.path, stdout=io.StringIO(), stderr=io.StringIO()) == 67
