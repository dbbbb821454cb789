"""
End to end: LMTP delivery (local.transport = "lmtp:...") into a real
Dovecot (dovecot-lmtpd, started here on 127.0.0.1 and a UNIX socket),
read back over Dovecot's IMAP.  One message to a user who gets it, a user
over quota (452 with quota_full_tempfail, 552 without) and an unknown
user (550): each recipient gets its own outcome.  Connections are reused;
a Dovecot that is down defers everything.  Last, the same through a real
mailhub daemon (tests/daemon.py).
"""

from __future__ import annotations

import os

import pytest
from conftest import in_reactor, require_tool
from daemon import Daemon, wait_for
from dovecotpeer import Dovecot
from twisted.internet import defer

from mailhub.delivery.lmtp import LMTPDelivery
from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.queue.spool import Spool

DOMAIN = "example.test"
USERS = {f"alice@{DOMAIN}": 0, f"bob@{DOMAIN}": 0, f"full@{DOMAIN}": 1000}
BODY = (
    b"From: Joerg <joerg@remote.example>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: LMTP e2e\r\n"
    b"Message-ID: <lmtp-1@remote.example>\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".a line that was dot-stuffed on the wire\r\n"
    b".\r\n"
    + b"filler line so the message is larger than the full user's quota\r\n" * 100
)


@pytest.fixture
def traversable(tmp_path):
    """Dovecot's unprivileged processes must reach tmp_path (pytest makes it 0700): o+x up the tree."""
    changed = []
    if os.getuid() == 0:
        for p in [tmp_path, *tmp_path.parents]:
            mode = os.stat(p).st_mode & 0o7777
            if mode & 0o001:
                break
            os.chmod(p, mode | 0o001)
            changed.append((p, mode))
    yield
    for p, mode in changed:
        os.chmod(p, mode)


@pytest.fixture
def dovecot(tmp_path, traversable):
    binary = require_tool("dovecot")
    require_tool("/usr/lib/dovecot/lmtp")  # dovecot-lmtpd
    started: list[Dovecot] = []

    def start(tempfail: bool = True) -> Dovecot:
        d = Dovecot(binary, str(tmp_path / "dovecot"), str(tmp_path / "mailboxes"), USERS, tempfail)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


def queue_file(tmp_path, body: bytes = BODY) -> str:
    path = str(tmp_path / "message.queue")
    with open(path, "wb") as f:
        f.write(queue_file_bytes(body, envelope("alice")))
    return path


def envelope(*users: str) -> Envelope:
    return Envelope("0123456789ABCDEFG", "joerg@remote.example", [Recipient(f"{u}@{DOMAIN}") for u in users], 0.0)


def deliver(reactor, agent: LMTPDelivery, env: Envelope, path: str) -> list:
    reported: list = []

    def go() -> defer.Deferred:
        return agent.deliver(env, env.recipients, path, reported.extend)

    return in_reactor(reactor, go)


def outcomes_of(outcomes: list) -> dict:
    return {o.recipient.split("@")[0]: (o.kind, o.code, o.status) for o in outcomes}


@pytest.mark.parametrize("tempfail, full", [
    (True, ("temporary", 452, "4.2.2")),
    (False, ("permanent", 552, "5.2.2")),
], ids=["quota-452", "quota-552"])
def test_each_recipient_gets_its_own_reply(tmp_path, dovecot, reactor, tempfail, full):
    dc = dovecot(tempfail)
    agent = LMTPDelivery(reactor, f"lmtp:inet:127.0.0.1:{dc.lmtp_port}", "mx.example.test")
    in_reactor(reactor, agent.startService)
    try:
        outcomes = deliver(reactor, agent, envelope("alice", "full", "ghost", "bob"), queue_file(tmp_path))
    finally:
        in_reactor(reactor, agent.stopService)
    assert outcomes_of(outcomes) == {
        "alice": ("delivered", 250, "2.0.0"),
        "full": full,
        "ghost": ("permanent", 550, "5.1.1"),
        "bob": ("delivered", 250, "2.0.0"),
    }
    by = {o.recipient.split("@")[0]: o for o in outcomes}
    assert "User doesn't exist" in by["ghost"].text and by["ghost"].remote_mta == f"127.0.0.1:{dc.lmtp_port}"
    assert "Quota exceeded" in by["full"].text
    for user in ("alice", "bob"):
        (got,) = dc.messages(f"{user}@{DOMAIN}")
        assert got.startswith(b"Return-Path: <joerg@remote.example>\r\n")
        # Dovecot's own Received, then exactly the queued bytes (dot-stuffing undone)
        assert got.endswith(BODY)
    assert dc.messages(f"full@{DOMAIN}") == []


def test_unix_socket_and_connection_reuse(tmp_path, dovecot, reactor):
    dc = dovecot()
    agent = LMTPDelivery(reactor, f"lmtp:unix:{dc.socket}", "mx.example.test")
    in_reactor(reactor, agent.startService)
    path = queue_file(tmp_path)
    try:
        first = deliver(reactor, agent, envelope("alice"), path)
        assert agent.idle == 1
        second = deliver(reactor, agent, envelope("alice", "bob"), path)
        assert agent.idle == 1
    finally:
        in_reactor(reactor, agent.stopService)
    assert [o.kind for o in first + second] == ["delivered"] * 3
    assert len(dc.messages(f"alice@{DOMAIN}")) == 2
    assert dc.log().count("lmtp(") and dc.log().count("Connect from local") == 1, dc.log()


def test_dovecot_down_defers_everything(tmp_path, dovecot, reactor):
    dc = dovecot()
    agent = LMTPDelivery(reactor, f"lmtp:inet:127.0.0.1:{dc.lmtp_port}", "mx.example.test")
    in_reactor(reactor, agent.startService)
    path = queue_file(tmp_path)
    try:
        assert [o.kind for o in deliver(reactor, agent, envelope("alice"), path)] == ["delivered"]
        dc.stop()  # the idle connection is closed by Dovecot's shutdown
        outcomes = deliver(reactor, agent, envelope("alice", "ghost"), path)
    finally:
        in_reactor(reactor, agent.stopService)
    assert [(o.kind, o.code, o.status) for o in outcomes] == [("temporary", 0, "4.4.1")] * 2
    assert "connect to 127.0.0.1:" in outcomes[0].text


def test_daemon_delivers_through_dovecot(tmp_path, dovecot):
    dc = dovecot()
    home = tmp_path / "mailhub"
    home.mkdir()
    d = Daemon(home, f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = []

[spool]
path = "spool"

[local]
domains = ["{DOMAIN}"]
users = ["alice", "bob", "full", "ghost"]
transport = "lmtp:inet:127.0.0.1:{dc.lmtp_port}"

[relay]
min_backoff = 60
max_backoff = 120
routes = {{ "remote.example" = "[127.0.0.1]:1" }}  # the bounce to joerg: refused, no DNS
""").start()
    try:
        with d.smtp() as s:
            refused = s.sendmail(
                "joerg@remote.example", [f"alice@{DOMAIN}", f"full@{DOMAIN}", f"ghost@{DOMAIN}"],
                b"Subject: through the daemon\r\nMessage-ID: <lmtp-daemon@remote.example>\r\n\r\n"
                + b"x" * 2000 + b"\r\n",
            )
        assert refused == {}

        def logged() -> bool:
            log = d.log()
            return "status=sent" in log and "status=bounced" in log and "status=deferred" in log

        wait_for(logged, 30, "the three outcomes in the daemon's log")
        (got,) = dc.messages(f"alice@{DOMAIN}")
        assert b"Message-ID: <lmtp-daemon@remote.example>" in got
        assert b"by mx.example.test (mailhub)" in got  # our Received, under Dovecot's
        log = d.log()
        assert f"to=<ghost@{DOMAIN}>" in log and "User doesn't exist" in log
        assert "Quota exceeded" in log
        # the over-quota recipient stays queued for the next attempt; nothing else does
        spool = Spool(d.spool)
        (env,) = [e for e in (spool.load(n[:-5]) for n in d.queued()) if e.sender == "joerg@remote.example"]
        assert {r.address: r.state for r in env.recipients} == {
            f"alice@{DOMAIN}": "delivered", f"full@{DOMAIN}": "pending", f"ghost@{DOMAIN}": "failed",
        }
    finally:
        d.stop()
