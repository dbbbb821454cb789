"""
The LMTP client and agent in memory (a scripted server on a
StringTransport, time on a task.Clock): replies after DATA taken one per
recipient, and every way a server can go wrong -- a dropped connection in
the middle of the replies, a malformed or overlong reply, silence, a 2xx
to DATA -- ending with the recipients already answered keeping their
answer and the others temporary (code 0), never delivered and never
failed.  With a real Dovecot: tests/test_e2e_lmtp.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mailhub.configcheck import BadValue, local_transport
from mailhub.delivery.lmtp import LMTPDelivery, lmtp_name
from mailhub.delivery.lmtpclient import MAX_LINE, LMTPClient
from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes

BODY = b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"


def envelope(*users: str) -> Envelope:
    return Envelope("Q1", "s@remote.example", [Recipient(f"{u}@example.test") for u in users], 0.0,
                    esmtp={"body": "8BITMIME"})


@pytest.fixture
def path(tmp_path) -> str:
    p = tmp_path / "q"
    p.write_bytes(queue_file_bytes(BODY, envelope("a")))
    return str(p)


class Server:
    """The server's side: what the client wrote, and replies to feed it."""

    def __init__(self, clock: task.Clock | None = None) -> None:
        self.clock = clock or task.Clock()
        self.client = LMTPClient(self.clock, "mx.example.test", "lmtp.example:24", 10.0, 20.0)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.said("220 lmtp ready\r\n")
        assert self.read() == b"LHLO mx.example.test\r\n"
        self.said("250-lmtp.example\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
        assert self.client.ready.called and self.client.usable

    def said(self, data: str | bytes) -> None:
        self.client.dataReceived(data.encode() if isinstance(data, str) else data)

    def read(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def lose(self) -> None:
        self.client.connectionLost(None)


def start(server: Server, env: Envelope, path: str) -> list:
    result: list = []
    defer.ensureDeferred(server.client.transaction(env, env.recipients, path)).addBoth(result.append)
    return result


def kinds(outcomes: list) -> list[tuple[str, str, int, str]]:
    return [(o.recipient.split("@")[0], o.kind, o.code, o.status) for o in outcomes]


def through_data(server: Server, env: Envelope, path: str, rcpt_replies: list[str]) -> list:
    result = start(server, env, path)
    assert server.read() == b"MAIL FROM:<s@remote.example> BODY=8BITMIME\r\n"
    server.said("250 2.1.0 OK\r\n")
    for r, reply in zip(env.recipients, rcpt_replies, strict=True):
        assert server.read() == f"RCPT TO:<{r.address}>\r\n".encode()
        server.said(reply)
    assert server.read() == b"DATA\r\n"
    server.said("354 OK\r\n")
    assert server.read() == b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"
    return result


def test_one_reply_per_recipient_after_data(path):
    s = Server()
    env = envelope("a", "full", "ghost", "b")
    result = through_data(s, env, path, ["250 2.1.5 OK\r\n", "250 2.1.5 OK\r\n",
                                         "550 5.1.1 <ghost@example.test> User doesn't exist\r\n", "250 2.1.5 OK\r\n"])
    s.said("250 2.0.0 <a@example.test> Saved\r\n")
    assert not result
    s.said("452 4.2.2 <full@example.test> Quota exceeded\r\n250 2.0.0 <b@example.test> Saved\r\n")
    assert kinds(result[0]) == [
        ("a", "delivered", 250, "2.0.0"), ("full", "temporary", 452, "4.2.2"),
        ("ghost", "permanent", 550, "5.1.1"), ("b", "delivered", 250, "2.0.0"),
    ]
    assert result[0][1].text == (
        "host lmtp.example:24 said: 452 4.2.2 <full@example.test> Quota exceeded (in reply to end of data)"
    )
    assert s.client.usable


def test_connection_dropped_between_replies_loses_nothing(path):
    s = Server()
    env = envelope("a", "b", "c")
    result = through_data(s, env, path, ["250 2.1.5 OK\r\n"] * 3)
    s.said("250 2.0.0 <a@example.test> Saved\r\n")
    s.lose()
    assert kinds(result[0]) == [
        ("a", "delivered", 250, "2.0.0"), ("b", "temporary", 0, "4.4.2"), ("c", "temporary", 0, "4.4.2"),
    ]
    assert result[0][1].text == "lost connection with lmtp.example:24"
    assert not s.client.usable


def test_silence_after_data_times_out(path):
    s = Server()
    env = envelope("a", "b")
    result = through_data(s, env, path, ["250 2.1.5 OK\r\n"] * 2)
    s.said("550 5.2.1 <a@example.test> mailbox disabled\r\n")
    s.clock.advance(19.9)
    assert not result
    s.clock.advance(0.1)
    assert kinds(result[0]) == [("a", "permanent", 550, "5.2.1"), ("b", "temporary", 0, "4.4.2")]
    assert "timed out while waiting for the replies after the data" in result[0][1].text
    assert s.transport.disconnecting or not s.client.usable


@pytest.mark.parametrize("garbage, why", [
    (b"hello there\r\n", "malformed reply from lmtp.example:24: 'hello there'"),
    (b"2" * (MAX_LINE + 10), "reply line from lmtp.example:24 too long"),
    (b"250-more\r\n" * 101, "reply from lmtp.example:24 has too many lines"),
    (b"354 again\r\n", "unexpected reply from lmtp.example:24 to end of data: 354 again"),
], ids=["malformed", "long", "many-lines", "354"])
def test_protocol_errors_after_data(path, garbage, why):
    s = Server()
    env = envelope("a", "b")
    result = through_data(s, env, path, ["250 2.1.5 OK\r\n"] * 2)
    s.said(b"250 2.0.0 <a@example.test> Saved\r\n" + garbage)
    assert kinds(result[0]) == [("a", "delivered", 250, "2.0.0"), ("b", "temporary", 0, "4.5.0")]
    assert result[0][1].text == why
    assert not s.client.usable


def test_refusals_before_data(path):
    s = Server()
    env = envelope("a", "b")
    result = start(s, env, path)
    s.read()
    s.said("451 4.3.0 try later\r\n")
    assert s.read() == b"RSET\r\n"
    s.said("250 2.0.0 OK\r\n")
    assert kinds(result[0]) == [("a", "temporary", 451, "4.3.0"), ("b", "temporary", 451, "4.3.0")]
    # no recipient accepted: no DATA
    result = start(s, env, path)
    s.read()
    s.said("250 2.1.0 OK\r\n")
    s.read()
    s.said("550 5.1.1 no\r\n")
    s.read()
    s.said("450 4.2.1 busy\r\n")
    assert s.read() == b"RSET\r\n"
    s.said("250 2.0.0 OK\r\n")
    assert kinds(result[0]) == [("a", "permanent", 550, "5.1.1"), ("b", "temporary", 450, "4.2.1")]
    # a 2xx to DATA is no 354: nothing is sent, nothing counts as delivered
    result = start(s, env, path)
    s.read()
    s.said("250 2.1.0 OK\r\n")
    s.read()
    s.said("250 2.1.5 OK\r\n")
    s.read()
    s.said("250 2.1.5 OK\r\n")
    assert s.read() == b"DATA\r\n"
    s.said("250 2.0.0 OK\r\n")
    assert kinds(result[0]) == [("a", "temporary", 0, "4.5.0"), ("b", "temporary", 0, "4.5.0")]
    assert not s.client.usable


def test_bad_greeting_fails_ready():
    clock = task.Clock()
    client = LMTPClient(clock, "mx", "x", 10.0, 20.0)
    client.makeConnection(StringTransport())
    client.dataReceived(b"554 go away\r\n")
    failures: list = []
    client.ready.addErrback(failures.append)
    assert failures and failures[0].value.text == "x greeted with 554 go away"


def test_agent_reuses_and_replaces_closed_idle_connections(path):
    clock = task.Clock()
    made: list[Server] = []

    class Endpoint:
        def connect(self, factory: Any) -> defer.Deferred:
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            s = Server.__new__(Server)
            s.clock, s.client, s.transport = clock, proto, transport
            made.append(s)
            return defer.succeed(proto)

    agent = LMTPDelivery(clock, "lmtp:inet:127.0.0.1:24", "mx.example.test", endpoint=Endpoint(), idle_timeout=30)
    agent.startService()

    def greet(s: Server) -> None:
        s.said("220 ready\r\n")
        s.read()
        s.said("250 lmtp\r\n")

    def serve(s: Server, env: Envelope) -> None:
        s.read()
        s.said("250 OK\r\n")
        for _ in env.recipients:
            s.read()
            s.said("250 OK\r\n")
        s.read()
        s.said("354 OK\r\n")
        s.read()
        s.said("".join(f"250 2.0.0 {r.address} Saved\r\n" for r in env.recipients))

    env = envelope("a")
    out: list = []
    d = agent.deliver(env, env.recipients, path, lambda o: None)
    d.addCallback(out.append)
    greet(made[0])
    serve(made[0], env)
    assert [o.kind for o in out[0]] == ["delivered"] and agent.idle == 1
    d = agent.deliver(env, env.recipients, path, lambda o: None).addCallback(out.append)
    serve(made[0], env)
    assert len(made) == 1 and [o.kind for o in out[1]] == ["delivered"]
    # the server closes the idle connection just as MAIL is sent: a new one, no outcome from the old
    made[0].client.usable = True
    d = agent.deliver(env, env.recipients, path, lambda o: None).addCallback(out.append)
    made[0].lose()
    greet(made[1])
    serve(made[1], env)
    assert len(made) == 2 and [o.kind for o in out[2]] == ["delivered"]
    clock.advance(30)  # idle too long: QUIT
    assert made[1].read() == b"QUIT\r\n" and agent.idle == 0
    agent.stopService()


def test_transport_values():
    assert local_transport("maildir") == "maildir"
    assert local_transport("lmtp:unix:/run/dovecot/lmtp") == "lmtp:unix:/run/dovecot/lmtp"
    assert local_transport("lmtp:inet:[::1]:24") == "lmtp:inet:[::1]:24"
    for bad in ("lmtp", "lmtp:unix:relative", "lmtp:inet:host", "lmtp:inet:host:0", "smtp:inet:h:25", "lmtp:inet::24"):
        with pytest.raises(BadValue):
            local_transport(bad)
    assert lmtp_name("lmtp:inet:127.0.0.1:24") == "127.0.0.1:24"
    assert lmtp_name("lmtp:unix:/run/x") == "unix:/run/x"
