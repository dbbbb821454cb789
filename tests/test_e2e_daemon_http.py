"""
End-to-end: the real daemon (C{twistd -n mailhub}) with C{server.http} on a
free loopback port and C{server.event_log} set.  Mail sent with smtplib
moves the Prometheus counters; a token made with C{mailhub user token}
submits a message over C{POST /v1/messages}, which lands in a Maildir;
C{GET /v1/messages/ID} follows it after it left the queue (from the event
log) and C{mailhub log ID} tells its story.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from daemon import CLEAN_EXIT, DOMAIN, Daemon, read_maildir, send, split_message, wait_for

_HTTP = re.compile(r"listening for HTTP on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")

CONFIG = f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = []
http = ["tcp:0:interface=127.0.0.1"]
http_admins = ["admin@{DOMAIN}"]
event_log = "events.jsonl"
http_header_timeout = 2
http_request_timeout = 4
http_max_connections_per_ip = 5

[spool]
path = "spool"

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice", "bob"]

[auth]
users = "users"

[relay]
min_backoff = 1
max_backoff = 2
"""


def mailhub(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The C{mailhub} console script against the daemon's configuration."""
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "--config", d.conf, *args],
        cwd=d.home, env=d.env(), input=stdin, capture_output=True, text=True, timeout=60,
    )


class HttpDaemon(Daemon):
    http_port = 0

    def start(self) -> HttpDaemon:
        super().start()
        m = wait_for(lambda: _HTTP.search(self.log()), 10, "the HTTP listener")
        self.http_port = int(m.group(1))
        return self

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = HttpDaemon(tmp_path_factory.mktemp("http"), CONFIG).start()
    yield d
    assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()
    assert d.stderr() == ""


@pytest.fixture(scope="module")
def token(daemon):
    r = mailhub(daemon, "user", "add", f"alice@{DOMAIN}", "--password-stdin", stdin="correct horse\n")
    assert (r.returncode, r.stderr) == (0, f"mailhub: added user alice@{DOMAIN}\n")
    r = mailhub(daemon, "user", "token", f"alice@{DOMAIN}")
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"mailhub: created an API token for alice@{DOMAIN}; it is shown only once\n"
    assert re.fullmatch(r"mh_[A-Za-z0-9_-]{40,}\n", r.stdout), r.stdout
    token = r.stdout.strip()
    # the daemon looks at the users file at most once a second (docs/submission.rst)
    wait_for(lambda: daemon.request("GET", "/v1/queue", headers={"Authorization": f"Bearer {token}"})[0] != 401,
             10, "the daemon to see the new token")
    return token


_SAMPLE = re.compile(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", re.M)


def scrape(d: HttpDaemon) -> dict[str, float]:
    status, headers, body = d.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return {name: float(value) for name, value in _SAMPLE.findall(body.decode())}


ACCEPTED_SMTP = 'mailhub_messages_accepted_total{listener="smtp"}'
ACCEPTED_HTTP = 'mailhub_messages_accepted_total{listener="http"}'
SENT_LOCAL = 'mailhub_deliveries_total{status="sent",transport="local"}'


def find_in_maildir(d: Daemon, user: str, needle: bytes) -> bytes:
    def find():
        return next((raw for raw in read_maildir(d.maildir(user)) if needle in raw), None)

    return wait_for(find, 10, f"{needle!r} in {user}'s Maildir")


def test_startup_log_names_the_http_listener(daemon):
    assert f"listening for HTTP on tcp:0:interface=127.0.0.1 (127.0.0.1:{daemon.http_port})" in daemon.log()
    assert f"event log: {os.path.join(daemon.home, 'events.jsonl')}" in daemon.log()


def test_smtp_mail_moves_the_counters(daemon):
    before = scrape(daemon)
    qid = send(
        daemon, f"alice@{DOMAIN}",
        b"From: s@client.test\r\nSubject: counted\r\nMessage-ID: <counted@client.test>\r\n\r\nhello\r\n",
    )
    find_in_maildir(daemon, "alice", b"<counted@client.test>")
    # the delivery event follows the Maildir rename; poll the scrape, bounded
    after = wait_for(
        lambda: (m := scrape(daemon))[SENT_LOCAL] == before[SENT_LOCAL] + 1 and m, 10, "mailhub_deliveries_total to move"
    )
    assert after[ACCEPTED_SMTP] == before[ACCEPTED_SMTP] + 1
    assert after['mailhub_deliveries_total{status="deferred",transport="local"}'] == before[
        'mailhub_deliveries_total{status="deferred",transport="local"}'
    ]
    assert after["mailhub_delivery_latency_seconds_count"] == before["mailhub_delivery_latency_seconds_count"] + 1
    assert "mailhub_queue_size" in after and "mailhub_oldest_message_age_seconds" in after
    # and the event log has the story
    r = mailhub(daemon, "log", qid)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"{qid}: accepted " in lines[0] or f"{qid}: " in lines[0]
    assert any(f"to=<alice@{DOMAIN}>" in l and "status=sent" in l for l in lines), lines


def test_api_needs_a_token(daemon):
    status, headers, body = daemon.request("GET", "/v1/queue")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(body)["code"] == 401
    status, _, body = daemon.request("GET", "/v1/queue", headers={"Authorization": "Bearer mh_wrong"})
    assert (status, json.loads(body)["code"]) == (401, 401)


def test_http_submission_is_delivered_and_followed(daemon, token):
    before = scrape(daemon)
    auth = {"Authorization": f"Bearer {token}"}
    payload = {
        "from": f"alice@{DOMAIN}",
        "to": [f"bob+api@{DOMAIN}"],
        "subject": "via HTTP",
        "text": "Sent through the API.\n",
    }
    status, _, body = daemon.request(
        "POST", "/v1/messages", json.dumps(payload).encode(), {**auth, "Content-Type": "application/json"}
    )
    assert status == 202, body
    qid = json.loads(body)["queue_id"]
    assert re.fullmatch(r"[0-9A-Z]+", qid)

    raw = find_in_maildir(daemon, "bob", b"Subject: via HTTP")
    head, text = split_message(raw)
    assert f"with HTTP id {qid}".encode() in head
    assert f"Delivered-To: bob@{DOMAIN}".encode() in head  # the extension resolved like SMTP/pickup
    assert text == b"Sent through the API.\n"
    wait_for(lambda: qid + ".json" not in daemon.queued(), 10, "the spool to drop " + qid)

    # left the queue: the answer comes from the event log
    def followed():
        status, _, body = daemon.request("GET", f"/v1/messages/{qid}", headers=auth)
        doc = json.loads(body)
        return status == 200 and doc["recipients"] and doc

    doc = wait_for(followed, 10, "GET /v1/messages/ID from the event log")
    assert doc["queue_id"] == qid and doc["state"] == "done"
    assert [(r["address"], r["original"], r["state"]) for r in doc["recipients"]] == [
        (f"bob@{DOMAIN}", f"bob+api@{DOMAIN}", "delivered")
    ]

    after = scrape(daemon)
    assert after[ACCEPTED_HTTP] == before.get(ACCEPTED_HTTP, 0.0) + 1
    assert after[SENT_LOCAL] == before[SENT_LOCAL] + 1

    # mailhub log tells the same story: accepted over HTTP, then the delivery
    r = mailhub(daemon, "log", qid)
    assert (r.returncode, r.stderr) == (0, "")
    lines = r.stdout.splitlines()
    assert re.match(rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z {qid}: accepted .*proto=HTTP", lines[0]), lines
    assert any(f"to=<bob@{DOMAIN}>" in l and "status=sent" in l for l in lines[1:]), lines
    r = mailhub(daemon, "log", "--json", qid)
    events = [json.loads(l)["event"] for l in r.stdout.splitlines()]
    assert events[0] == "accepted" and "delivery" in events


def test_sender_not_owned_is_403(daemon, token):
    payload = {"from": f"bob@{DOMAIN}", "to": [f"alice@{DOMAIN}"], "subject": "x", "text": "x"}
    status, _, body = daemon.request(
        "POST", "/v1/messages", json.dumps(payload).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert (status, json.loads(body)["code"]) == (403, 403)


def test_status_page(daemon):
    status, headers, body = daemon.request("GET", "/status")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"<svg" in body and b"mx.example.test" in body


# -- the listener's limits, with real sockets ----------------------------------------------------------


def _read_until_closed(sock, deadline: float) -> bytes:
    import time

    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open; got {data!r}")


def test_slow_header_is_closed_at_the_header_deadline(daemon):
    """One byte of header every 0.5 s keeps Twisted's idle timer alive, but not the 2 s header deadline."""
    import socket as _socket
    import time

    s = _socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10)
    start = time.monotonic()
    sent = b""
    try:
        for byte in b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            sent += bytes([byte])
            s.settimeout(0.5)
            try:
                answer = s.recv(4096)
            except TimeoutError:
                continue
            answer += _read_until_closed(s, start + 15)
            break
        else:
            raise AssertionError("the slow header was never cut off")
    finally:
        s.close()
    elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "header not complete within 2 seconds", "code": 408}
    assert 1.5 < elapsed < 10, elapsed
    wait_for(lambda: "HTTP: header not complete within 2 s from [127.0.0.1]: closing" in daemon.log(), 10, "the log line")


def test_connections_per_address_are_capped(daemon):
    import socket as _socket

    idle = [_socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10) for _ in range(5)]
    try:
        extra = _socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10)
        try:
            import time

            answer = _read_until_closed(extra, time.monotonic() + 10)
        finally:
            extra.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"Retry-After: 60" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "too many connections", "code": 503}
    finally:
        for s in idle:
            s.close()
    # the idle ones are gone (closed by us, or at the header deadline): room again
    wait_for(lambda: daemon.request("GET", "/metrics")[0] == 200, 10, "a new connection to be served")
    metrics = scrape(daemon)
    assert metrics['mailhub_messages_rejected_total{reason="too_many_connections"}'] >= 1


# -- message status with the default settings (event log under the data directory) --------------------

DEFAULTS_CONFIG = f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
http = ["tcp:0:interface=127.0.0.1"]

[local]
domains = ["{DOMAIN}"]
users = ["alice", "bob"]

[auth]
users = "users"

[relay]
smarthost = "[127.0.0.1]:1"
"""


@pytest.fixture(scope="module")
def default_daemon(tmp_path_factory):
    d = HttpDaemon(tmp_path_factory.mktemp("http-defaults"), DEFAULTS_CONFIG).start()
    yield d
    assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()


def test_message_status_with_default_settings(default_daemon):
    d = default_daemon
    assert mailhub(d, "user", "add", f"alice@{DOMAIN}", "--password-stdin", stdin="pw\n").returncode == 0
    token = mailhub(d, "user", "token", f"alice@{DOMAIN}").stdout.strip()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def submit(to: str) -> str:
        body = json.dumps({"from": f"alice@{DOMAIN}", "to": [to], "subject": "status", "text": "hi"}).encode()
        status, _, answer = d.request("POST", "/v1/messages", body, auth)
        assert status == 202, answer
        return json.loads(answer)["queue_id"]

    def get(qid: str) -> dict:
        status, _, answer = d.request("GET", f"/v1/messages/{qid}", headers=auth)
        assert status == 200, answer
        return json.loads(answer)

    local = submit(f"bob@{DOMAIN}")
    remote = submit("carol@remote.example")  # the smarthost refuses connections: stays queued
    done = wait_for(lambda: (m := get(local))["state"] == "done" and m, 20, "the local message to be done")
    queued = wait_for(lambda: (m := get(remote))["recipients"][0]["attempts"] and m, 20, "a delivery attempt")
    assert queued["state"] == "queued"
    # one shape, one meaning, before and after the message left the queue
    assert sorted(done) == sorted(queued)
    assert sorted(done["recipients"][0]) == sorted(queued["recipients"][0])
    r = done["recipients"][0]
    assert (r["address"], r["state"], r["attempts"], r["last_status"]) == (f"bob@{DOMAIN}", "delivered", 1, "2.0.0")
    assert isinstance(r["last_code"], int) and r["last_code"] // 100 == 2
    assert f"{local}:" not in r["last_text"] and "status=" not in r["last_text"] and r["last_text"]
    q = queued["recipients"][0]
    assert q["state"] == "pending" and q["last_status"].startswith("4.")
    assert (done["bounces"], done["delay_notices"], queued["bounces"]) == ([], [], [])
    assert done["sender"] == f"alice@{DOMAIN}" and done["size"] > 0 and done["next_attempt"] is None
    # the event log is under the data directory, with no setting
    assert os.path.isfile(os.path.join(d.home, "mailhub-data", "events.jsonl"))
