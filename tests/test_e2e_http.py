"""
End to end on 127.0.0.1: the HTTP site and the SMTP server of one mailhub
(real spool with fsync, real scheduler on the real reactor, a delivery
agent that records), driven by urllib, smtplib and raw sockets; metrics
scraped from /metrics after real mail went through.
"""

from __future__ import annotations

import json
import smtplib
import socket
import threading
import urllib.error
import urllib.request

import pytest
from conftest import in_reactor
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogPublisher

from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.envelope import Outcome
from mailhub.eventlog import EventLogObserver, story
from mailhub.metrics import MailMetrics, MetricsObserver, spool_queue_stats
from mailhub.queue.scheduler import RetryPolicy, Scheduler
from mailhub.queue.spool import Spool
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy
from mailhub.users import UsersFile
from mailhub.web.api import make_http_site


class Hub:
    def __init__(self, reactor, tmp_path) -> None:
        self.reactor = reactor
        self.delivered: list[tuple[str, str]] = []
        self.done = threading.Condition()
        self.spool = Spool(str(tmp_path / "spool"), fsync=True)
        self.users = UsersFile(str(tmp_path / "users"), rounds=4)
        self.users.add("alice@example.com", "pw")
        self.token = self.users.add_token("alice@example.com")
        self.metrics = MailMetrics(reactor, spool_queue_stats(self.spool))
        self.event_log = str(tmp_path / "events.jsonl")
        self.observers = [MetricsObserver(self.metrics), EventLogObserver(self.event_log)]
        for o in self.observers:
            globalLogPublisher.addObserver(o)

        def deliver(env, recipients, report):
            with self.done:
                self.delivered += [(env.queue_id, r.address) for r in recipients]
                self.done.notify_all()
            return defer.succeed([Outcome.delivered(r.address) for r in recipients])

        self.scheduler = Scheduler(self.spool, deliver, reactor, RetryPolicy(), hostname="mx.example.com")
        directory = Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice", "bob"])
        cfg = ServerConfig(hostname="mx.example.com")
        smtp = SMTPServerFactory(
            SMTPSettings(cfg), self.spool, self.scheduler.enqueue, Policy(directory, cfg.trusted_networks), reactor
        )
        site = make_http_site(self.spool, self.scheduler.enqueue, self.scheduler, self.users, self.metrics,
                              "mx.example.com", max_body=50_000, run=threads.deferToThread,
                              admins=["alice@example.com"], event_log=self.event_log)

        def start():
            self.scheduler.startService()
            a = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(smtp)
            b = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
            return defer.gatherResults([a, b])

        self.smtp_port, self.http_port = in_reactor(reactor, start)
        self.smtp_addr = ("127.0.0.1", self.smtp_port.getHost().port)
        self.base = f"http://127.0.0.1:{self.http_port.getHost().port}"

    def stop(self) -> None:
        for o in self.observers:
            globalLogPublisher.removeObserver(o)
        self.observers[1].close()

        def stop():
            return defer.gatherResults([
                defer.maybeDeferred(self.smtp_port.stopListening),
                defer.maybeDeferred(self.http_port.stopListening),
                defer.maybeDeferred(self.scheduler.stopService),
            ])

        in_reactor(self.reactor, stop)

    def wait_delivered(self, n: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.delivered) >= n, timeout=10), self.delivered

    def wait_removed(self, qid: str) -> None:
        """The scheduler removes after recording the round; wait on the reactor for that."""
        for _ in range(200):
            if in_reactor(self.reactor, lambda: qid not in self.spool.queue_ids()):
                return
            in_reactor(self.reactor, _later, self.reactor)
        raise AssertionError(f"{qid} still queued")

    def call(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None, token: str | None = "default"):
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if token == "default":
            token = self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def scrape(self) -> dict:
        status, headers, body = self.call("GET", "/metrics", token=None)
        assert status == 200
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def _later(reactor, delay: float = 0.02):
    d = defer.Deferred()
    reactor.callLater(delay, d.callback, None)
    return d


@pytest.fixture
def hub(reactor, tmp_path):
    h = Hub(reactor, tmp_path)
    yield h
    h.stop()


def test_submit_json_deliver_and_scrape(hub):
    body = json.dumps({"from": "alice@example.com", "to": ["bob@example.com"], "subject": "hi", "text": "hello"}).encode()
    status, headers, data = hub.call("POST", "/v1/messages", body, "application/json")
    assert status == 202, data
    qid = json.loads(data)["queue_id"]
    hub.wait_delivered(1)
    assert hub.delivered == [(qid, "bob@example.com")]
    hub.wait_removed(qid)
    m = hub.scrape()
    assert m[("mailhub_messages_accepted_total", (("listener", "http"),))] == 1.0
    assert m[("mailhub_deliveries_total", (("status", "sent"), ("transport", "local")))] == 1.0
    assert m[("mailhub_delivery_latency_seconds_count", ())] == 1.0
    assert m[("mailhub_queue_size", ())] == 0.0
    # gone from the queue: answered from the event log
    status, _, data = hub.call("GET", f"/v1/messages/{qid}")
    assert status == 200, data
    got = json.loads(data)
    assert got["state"] == "done"
    assert [(r["address"], r["state"]) for r in got["recipients"]] == [("bob@example.com", "delivered")]
    assert [e["event"] for e in story(hub.event_log, qid)] == ["accepted", "delivery", "removed"]


def test_smtp_mail_shows_in_metrics(hub):
    with smtplib.SMTP(*hub.smtp_addr, timeout=10) as s:
        s.sendmail("carol@example.org", ["bob@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    with smtplib.SMTP(*hub.smtp_addr, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("carol@example.org")
        assert s.rcpt("nosuchuser@example.com")[0] == 550
    hub.wait_delivered(1)
    m = hub.scrape()
    assert m[("mailhub_messages_accepted_total", (("listener", "smtp"),))] == 1.0
    assert m[("mailhub_messages_rejected_total", (("reason", "unknown_recipient"),))] == 1.0


def test_api_errors_over_sockets(hub):
    body = json.dumps({"from": "alice@example.com", "to": ["bob@example.com"], "text": "x"}).encode()
    status, headers, data = hub.call("POST", "/v1/messages", body, "application/json", token="mh_bad")
    assert (status, json.loads(data)) == (401, {"error": "invalid token", "code": 401})
    assert headers["WWW-Authenticate"] == 'Bearer realm="mailhub"'
    status, _, data = hub.call("POST", "/v1/messages", b"{", "application/json")
    assert status == 400 and json.loads(data)["error"].startswith("malformed JSON")
    status, _, _ = hub.call("POST", "/v1/queue/flush")
    assert status == 202
    # 413 arrives before the client sends any of the body
    port = hub.http_port.getHost().port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
            + f"Authorization: Bearer {hub.token}\r\n".encode()
            + b"Content-Length: 999999999\r\n\r\n"
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert answer.endswith(b'{"error": "request body larger than 50000 bytes", "code": 413}\n')
    assert hub.spool.queue_ids() == []
