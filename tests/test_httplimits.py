"""
The HTTP listener's deadlines and connection caps in memory: the real Site
over StringTransports, time from a task.Clock.
"""

from __future__ import annotations

import json

import pytest
from httpharness import Env, message_json
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mailhub.metrics import MetricsObserver
from mailhub.web.api import make_http_site
from mailhub.web.limits import ABORT_GRACE, RefusedConnection


class Site:
    def __init__(self, tmp_path, run=None, **limits) -> None:
        self.env = Env(tmp_path)
        e = self.env
        self.clock = e.clock
        self.site = make_http_site(
            e.spool, e.scheduler.enqueue, e.scheduler, e.users, e.metrics, "mx.example.com",
            run=run, clock=e.clock, **limits,
        )

    def connect(self, ip: str = "127.0.0.1"):
        proto = self.site.buildProtocol(IPv4Address("TCP", ip, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        proto.makeConnection(transport)
        return proto, transport


def lose(proto, transport):
    transport.loseConnection()
    proto.connectionLost(Failure(ConnectionDone()))


def answer(transport) -> tuple[int, dict]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture
def limited(tmp_path):
    return Site(tmp_path, header_timeout=60, request_timeout=300, max_connections=10, max_connections_per_ip=3)


def test_a_trickling_header_is_cut_at_the_header_deadline(limited):
    proto, transport = limited.connect()
    for byte in b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
        if limited.clock.seconds() - 1_700_000_000 >= 59:
            break
        proto.dataReceived(bytes([byte]))
        limited.clock.advance(1)  # one byte a second: never idle
    assert not transport.disconnecting and transport.value() == b""
    limited.clock.advance(1)
    assert transport.disconnecting
    assert answer(transport) == (408, {"error": "header not complete within 60 seconds", "code": 408})
    # a client that does not read is aborted a little later
    assert not transport.disconnected
    limited.clock.advance(ABORT_GRACE)
    assert transport.disconnected


def test_a_trickling_body_is_cut_at_the_request_deadline(limited):
    proto, transport = limited.connect()
    body = message_json()
    proto.dataReceived(
        (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"Authorization: Bearer {limited.env.alice}\r\nContent-Length: {len(body)}\r\n\r\n").encode())
    limited.clock.advance(61)  # the header deadline is met
    assert not transport.disconnecting
    assert len(body) > 60
    for byte in body[:60]:
        proto.dataReceived(bytes([byte]))
        limited.clock.advance(5)
    assert transport.disconnecting
    assert answer(transport) == (408, {"error": "request not complete within 300 seconds", "code": 408})
    assert limited.env.spool.queue_ids() == []


def test_no_deadline_while_mailhub_works_and_fresh_ones_after_the_answer(tmp_path):
    pending: list = []

    def run(f):
        d = defer.Deferred()
        pending.append((d, f))
        return d

    s = Site(tmp_path, run=run, header_timeout=60, request_timeout=300)
    proto, transport = s.connect()
    body = message_json()
    proto.dataReceived(
        (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"Authorization: Bearer {s.env.alice}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    s.clock.advance(1000)  # a slow spool: not the client's fault
    assert not transport.disconnecting and transport.value() == b""
    d, f = pending.pop()
    d.callback(f())
    assert transport.value().startswith(b"HTTP/1.1 202 ")
    transport.clear()
    # kept alive: the next request has its own deadlines from now
    s.clock.advance(59)
    assert not transport.disconnecting
    s.clock.advance(1)
    assert transport.disconnecting
    assert answer(transport)[0] == 408


def test_connections_per_address_and_in_total_are_capped(limited):
    observer = MetricsObserver(limited.env.metrics)
    globalLogPublisher.addObserver(observer)
    try:
        _capped(limited)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert limited.env.metrics.rejected.labels(reason="too_many_connections")._value.get() == 2


def _capped(limited):
    conns = [limited.connect("192.0.2.1") for _ in range(3)]
    assert all(not isinstance(p, RefusedConnection) for p, _ in conns)
    refused, transport = limited.connect("192.0.2.1")
    assert isinstance(refused, RefusedConnection)
    assert transport.disconnecting
    status, body = answer(transport)
    assert (status, body) == (503, {"error": "too many connections", "code": 503})
    assert b"Retry-After: 60\r\n" in transport.value()
    # another address is not affected; a closed connection makes room
    other, _ = limited.connect("192.0.2.2")
    assert not isinstance(other, RefusedConnection)
    lose(*conns[0])
    again, t = limited.connect("192.0.2.1")
    assert not isinstance(again, RefusedConnection) and t.value() == b""
    # the total: 10 at most
    more = [limited.connect(f"192.0.2.{10 + i}") for i in range(6)]
    assert all(not isinstance(p, RefusedConnection) for p, _ in more)
    assert limited.site.limits.connections == 10
    p, t = limited.connect("192.0.2.99")
    assert isinstance(p, RefusedConnection) and answer(t)[0] == 503


def test_counts_return_to_zero_and_timers_stop(limited):
    conns = [limited.connect() for _ in range(3)]
    for c in conns:
        lose(*c)
    assert limited.site.limits.connections == 0 and limited.site.limits.per_ip == {}
    assert limited.clock.getDelayedCalls() == [] or all(
        "_updateLogDateTime" in repr(c.func) for c in limited.clock.getDelayedCalls())
