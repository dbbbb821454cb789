"""
The in-memory harness the mailhub.smtp.server tests share (not a test file).

Owns: a Client (one StringTransport connection to an SMTPServerFactory), a
Harness (task.Clock at NOW, a real Spool in tmp_path, a Directory, a list
as enqueue), the fake TLS pair (FakeTLS, TLSStringTransport) and the
replies and helpers every smtpd transcript uses.
Must not hold assertions about the server's behaviour beyond the steps
every transcript shares (greeting, EHLO, MAIL/RCPT/DATA accepted,
STARTTLS started): those stay in the test files, so each keeps its exact
expected replies.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.queue.spool import Spool
from mailhub.smtp import sasl as auth
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy
from mailhub.users import UsersChecker, UsersFile

HOST = "mx.example.com"
NOW = 1700000000.0  # Tue, 14 Nov 2023 22:13:20 +0000
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
FOREIGN = "198.51.100.7"
GREETING = f"220 {HOST} ESMTP mailhub\r\n"
OK = "250 2.0.0 Ok\r\n"
MAIL_OK = "250 2.1.0 Ok\r\n"
RCPT_OK = "250 2.1.5 Ok\r\n"
GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n\Z")
EHLO = (
    f"250-{HOST}\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
    "250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 DSN\r\n"
)
TLS_OPTIONS = object()
_SETTINGS_FIELDS = {f.name for f in dataclasses.fields(SMTPSettings)} - {"server", "listener"}
_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}  # what the fake ServerTLS hands to startTLS


class FakeTLS:
    """Stands in for mailhub.tls.ServerTLS: options() is what startTLS gets."""

    def options(self) -> object:
        return TLS_OPTIONS


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS instead of doing a handshake (the bytes stay clear text)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.tls_started: list[object] = []
        self.written_before_tls = b""

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started.append(contextFactory)
        self.written_before_tls = self.value()


class Client:
    """One in-memory connection; send() returns what the server wrote."""

    def __init__(self, factory: SMTPServerFactory, ip: str, transport_class: type = StringTransport) -> None:
        self.proto = factory.buildProtocol(None)
        peer = IPv6Address("TCP", ip, 40000) if ":" in ip else IPv4Address("TCP", ip, 40000)
        self.transport = transport_class(peerAddress=peer)
        self.proto.makeConnection(self.transport)
        self.greeting = self.read()

    def read(self) -> str:
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return out

    def send(self, data: bytes | str) -> str:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)
        return self.read()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    @property
    def user(self) -> str | None:
        return self.proto.session.authenticated_user

    def lose(self) -> None:
        self.proto.connectionLost(None)


class Harness:
    """
    Everything an SMTPServerFactory needs, in memory, with time at NOW.
    serve() builds the factory, so a test file can add its own factory
    arguments (users, TLS, limits) made from this harness's clock.
    """

    def __init__(
        self,
        tmp_path: Any,
        domains: tuple[str, ...] = ("example.com",),
        aliases: str | None = None,
        **config: Any,
    ) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = Spool(str(tmp_path / "spool"), fsync=False)
        self.queued: list = []
        directory_kw: dict = {}
        if aliases is not None:
            (tmp_path / "aliases").write_text(aliases)
            directory_kw["aliases_path"] = str(tmp_path / "aliases")
        self.directory = Directory(list(domains), str(tmp_path / "mailboxes"), users=["alice", "bob"], **directory_kw)
        self.config = ServerConfig(hostname=HOST, **config)
        self.policy = Policy(self.directory, self.config.trusted_networks)

    def serve(self, listener: str = "smtp", **factory_kw: Any) -> SMTPServerFactory:
        """
        Build the factory; keywords naming an L{SMTPSettings} field or a
        L{ServerConfig} field go there, the others to the factory.
        """
        settings = {k: factory_kw.pop(k) for k in list(factory_kw) if k in _SETTINGS_FIELDS}
        server = {k: factory_kw.pop(k) for k in list(factory_kw) if k in _SERVER_FIELDS}
        config = dataclasses.replace(self.config, **server) if server else self.config
        self.factory = SMTPServerFactory(
            SMTPSettings(config, listener, **settings), self.spool, self.queued.append, self.policy, self.clock,
            **factory_kw,
        )
        return self.factory

    def hold_commits(self) -> list[defer.Deferred]:
        """
        Make the factory's commits wait: each runs when the test fires its
        Deferred in the returned list (in arrival order).
        """
        pending: list[defer.Deferred] = []

        def run(f: Any, *args: Any) -> defer.Deferred:
            d = defer.Deferred()
            d.addCallback(lambda _: f(*args))
            pending.append(d)
            return d

        self.factory.run = run
        return pending

    def connect(self, ip: str = FOREIGN, **kw: Any) -> Client:
        return Client(self.factory, ip, **kw)

    def message(self, qid: str) -> bytes:
        with self.spool.open_message(qid) as f:
            return f.read()

    def body(self, qid: str) -> bytes:
        """The spooled message without the Received header the server added."""
        return strip_received(self.message(qid))[1]

    def spool_is_empty(self) -> bool:
        return all(not os.listdir(os.path.join(self.spool.path, d)) for d in ("tmp", "queue", "envelopes"))


def strip_received(raw: bytes) -> tuple[bytes, bytes]:
    # our trace header, and the empty line after it when the content starts with white space
    m = re.match(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*(?:\r\n(?=[ \t]))?", raw)
    assert m, raw[:200]
    return m.group(0), raw[m.end() :]


def queued_id(reply: str) -> str:
    m = QUEUED.match(reply)
    assert m, reply
    return m.group(1)


def converse(client: Client, script: list[tuple[bytes | str, str]]) -> None:
    for send, expected in script:
        assert client.send(send) == expected, send


class TwoDomainHarness(Harness):
    """Two local domains and an aliases file, served at once; ServerConfig fields as keywords."""

    def __init__(self, tmp_path, **config) -> None:
        super().__init__(
            tmp_path, domains=("example.com", "example.org"), aliases="list: alice, bob\npostmaster: alice\n", **config
        )
        self.serve()

    def ehlo(self, ip: str = FOREIGN) -> Client:
        c = self.connect(ip)
        assert c.greeting == GREETING
        assert c.send("EHLO client.test\r\n") == EHLO
        return c


def send_message(c: Client, body: bytes, rcpts=("alice@example.com",), mail="MAIL FROM:<sender@elsewhere.test>") -> str:
    assert c.send(mail + "\r\n") == MAIL_OK
    for r in rcpts:
        assert c.send(f"RCPT TO:<{r}>\r\n") == RCPT_OK
    assert c.send("DATA\r\n") == GO_AHEAD
    return c.send(body)


# -- STARTTLS and AUTH ------------------------------------------------------------------------

AUTH_USER, AUTH_PASSWORD = "alice@example.com", "s3cret-Pa55"
AUTH_OK = "235 2.7.0 Authentication successful\r\n"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid\r\n"
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentication attempts, closing connection\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


PLAIN = b64(f"\0{AUTH_USER}\0{AUTH_PASSWORD}")
PLAIN_WRONG = b64(f"\0{AUTH_USER}\0wrong")


def serve_with_auth(h: Harness, tmp_path: Any, listener: str = "smtp", **factory_kw: Any) -> SMTPServerFactory:
    """
    Serve C{h} with FakeTLS, a users file holding AUTH_USER (bcrypt, 4
    rounds, checked synchronously) and a throttle on C{h}'s clock (1 s
    delay per failure, blocked after 3 within 300 s).
    """
    users = UsersFile(str(tmp_path / "users"), clock=h.clock, rounds=4)
    users.add(AUTH_USER, AUTH_PASSWORD)
    kw: dict[str, Any] = dict(
        tls=FakeTLS(), users=users,
        checker=UsersChecker(users, run=lambda f, *a: defer.maybeDeferred(f, *a)),
        throttle=auth.AuthThrottle(h.clock, delay=1.0, max_failures=3, window=300),
    )
    kw.update(factory_kw)
    return h.serve(listener, **kw)


def tls_session(h: Harness, ip: str = FOREIGN) -> Client:
    """Connected over a TLSStringTransport, EHLO, STARTTLS, EHLO again: ready for AUTH."""
    c = Client(h.factory, ip, TLSStringTransport)
    assert c.greeting == GREETING
    assert c.send("EHLO client.test\r\n").startswith("250-")
    assert c.send("STARTTLS\r\n") == "220 2.0.0 Ready to start TLS\r\n"
    assert c.send("EHLO client.test\r\n").startswith("250-")
    return c
