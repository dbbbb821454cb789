"""
Shutdown of the SMTP listeners: commits in flight finish and their reply is
flushed before twistd lets the reactor drop the connections
(SMTPServerFactory.drain, mailhub.tap._Listener.stopService).
In memory: StringTransport, task.Clock, a controllable commit runner.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.queue.spool import Spool
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy
from mailhub.tap import _Listener

HOST = "mx.example.com"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n\Z")


class Runner:
    """A C{run} for the factory: each commit waits until the test lets it finish."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, tuple, defer.Deferred]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((f, args, d))
        return d

    def finish(self) -> None:
        f, args, d = self.pending.pop(0)
        d.callback(f(*args))

    def fail(self) -> None:
        _, _, d = self.pending.pop(0)
        d.errback(OSError(28, "No space left on device"))


def make_factory(tmp_path: Any) -> tuple[SMTPServerFactory, Runner, task.Clock, list]:
    clock = task.Clock()
    clock.advance(1700000000.0)
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    directory = Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice"])
    config = ServerConfig(hostname=HOST)
    queued: list = []
    runner = Runner()
    factory = SMTPServerFactory(
        SMTPSettings(config, "smtp"), spool, queued.append, Policy(directory, config.trusted_networks), clock, run=runner
    )
    return factory, runner, clock, queued


def connect(factory: SMTPServerFactory) -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 40000))
    proto.makeConnection(transport)
    return proto, transport


def start_commit(factory: SMTPServerFactory) -> tuple[Any, StringTransport]:
    proto, transport = connect(factory)
    proto.dataReceived(
        b"EHLO c.example.net\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
    )
    transport.clear()
    proto.dataReceived(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert transport.value() == b""  # the commit is running: no reply yet
    return proto, transport


def test_drain_waits_for_commit_and_its_250(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    proto, transport = start_commit(factory)
    fired: list = []
    factory.drain().addCallback(fired.append)
    assert fired == []
    clock.advance(5)
    assert fired == []
    runner.finish()
    assert QUEUED.match(transport.value())
    assert len(queued) == 1
    # the reply is flushed by closing the session; drain ends at connectionLost
    assert transport.disconnecting
    assert fired == []
    proto.connectionLost(None)
    assert fired == [None]
    assert clock.getDelayedCalls() == []  # the drain's timeout and the session's are cancelled


def test_drain_waits_for_451_too(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    proto, transport = start_commit(factory)
    fired: list = []
    factory.drain().addCallback(fired.append)
    runner.fail()
    assert transport.value().startswith(b"451 4.3.0 ")
    assert queued == []
    proto.connectionLost(None)
    assert fired == [None]


def test_drain_without_sessions_fires_at_once(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    fired: list = []
    factory.drain().addCallback(fired.append)
    assert fired == [None]


SHUTTING_DOWN = f"421 4.3.2 {HOST} Service shutting down, closing transmission channel\r\n".encode()


def test_idle_session_is_told_421_and_closed(tmp_path: Any) -> None:
    """RFC 5321 3.8: a server that must close says 421 first."""
    factory, runner, clock, queued = make_factory(tmp_path)
    proto, transport = connect(factory)
    proto.dataReceived(b"EHLO c.example.net\r\n")
    transport.clear()
    fired: list = []
    factory.drain().addCallback(fired.append)
    assert transport.value() == SHUTTING_DOWN
    assert transport.disconnecting
    assert fired == []  # the 421 is flushed by the close: drain ends at connectionLost
    proto.connectionLost(None)
    assert fired == [None]
    assert factory.sessions == set()


def test_message_still_arriving_is_dropped_with_421(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    proto, transport = connect(factory)
    proto.dataReceived(
        b"EHLO c.example.net\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
        + b"Subject: x\r\n\r\n" + b"y" * 100_000  # beyond the in-memory limit: a file in tmp/
    )
    assert os.listdir(str(tmp_path / "spool" / "tmp"))
    transport.clear()
    factory.drain()
    assert transport.value() == SHUTTING_DOWN
    assert os.listdir(str(tmp_path / "spool" / "tmp")) == []  # no 250, nothing kept
    assert queued == []
    proto.connectionLost(None)


def test_session_with_a_commit_gets_its_250_not_421(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    busy, busy_transport = start_commit(factory)
    idle, idle_transport = connect(factory)
    idle_transport.clear()
    fired: list = []
    factory.drain().addCallback(fired.append)
    assert idle_transport.value() == SHUTTING_DOWN and busy_transport.value() == b""
    runner.finish()
    assert QUEUED.match(busy_transport.value())
    idle.connectionLost(None)
    assert fired == []
    busy.connectionLost(None)
    assert fired == [None]


def test_drain_is_bounded(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    start_commit(factory)
    fired: list = []
    factory.drain(timeout=30.0).addCallback(fired.append)
    clock.advance(29.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]


def test_session_that_left_during_commit_does_not_block(tmp_path: Any) -> None:
    factory, runner, clock, queued = make_factory(tmp_path)
    proto, transport = start_commit(factory)
    proto.connectionLost(None)
    fired: list = []
    factory.drain().addCallback(fired.append)
    runner.finish()
    assert fired == [None]


class FakePort:
    def __init__(self) -> None:
        self.stopped = False

    def getHost(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 2525)

    def stopListening(self) -> defer.Deferred:
        self.stopped = True
        return defer.succeed(None)


class FakeEndpoint:
    def __init__(self) -> None:
        self.port = FakePort()

    def listen(self, factory: Any) -> defer.Deferred:
        return defer.succeed(self.port)


def test_listener_stops_listening_then_waits_for_drain() -> None:
    endpoint = FakeEndpoint()
    drained: defer.Deferred = defer.Deferred()
    calls: list = []

    def drain() -> defer.Deferred:
        calls.append(endpoint.port.stopped)
        return drained

    svc = _Listener("tcp:2525", endpoint, object(), "smtp", drain)
    svc.privilegedStartService()
    svc.startService()
    fired: list = []
    svc.stopService().addCallback(fired.append)
    assert calls == [True]  # the port stopped listening before the drain began
    assert fired == []
    drained.callback(None)
    assert fired == [None]
