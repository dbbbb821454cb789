"""
The anvil (mailhub/daemon/anvil.py): the state the SMTP acceptor
processes share, in memory and over AMP between in-memory transports
(twisted.test.iosim), time from a task.Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.protocols import amp
from twisted.test import iosim

from mailhub.daemon.anvil import (
    Anvil,
    AnvilCounter,
    AnvilError,
    AnvilResponder,
    Hit,
    RemoteGate,
    RemoteThrottle,
    WindowCounter,
)
from mailhub.smtp.sasl import AuthThrottle


def make_anvil(clock: task.Clock, total: int = 3, per_ip: int = 2, **kw: Any) -> Anvil:
    throttle = AuthThrottle(clock, delay=1.0, max_failures=3, window=300.0)
    return Anvil(clock, lambda: (total, per_ip), throttle, **kw)


def connect(anvil: Anvil, holder: Any) -> tuple[amp.AMP, AnvilResponder, iosim.IOPump]:
    """An acceptor's AMP client connected to the anvil's responder in memory."""
    server = AnvilResponder(anvil, holder)
    client = amp.AMP()
    c, s, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
    return client, server, pump


def result(d: defer.Deferred[Any], pump: iosim.IOPump) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    pump.flush()
    assert out, "no answer"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


# -- connections -------------------------------------------------------------------------


def test_per_ip_limit_counts_every_process() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock, total=10, per_ip=2)
    assert anvil.admit("p1", "smtp", "192.0.2.1") == ""
    assert anvil.admit("p2", "smtp", "192.0.2.1") == ""
    # a third from the same IP, whichever process asks
    assert anvil.admit("p1", "smtp", "192.0.2.1") == "max_connections_per_ip"
    assert anvil.admit("p3", "smtp", "192.0.2.1") == "max_connections_per_ip"
    assert anvil.admit("p3", "smtp", "192.0.2.2") == ""
    # another listener counts apart, as each listener's factory did
    assert anvil.admit("p1", "submission", "192.0.2.1") == ""
    anvil.release("p2", "smtp", "192.0.2.1")
    assert anvil.admit("p3", "smtp", "192.0.2.1") == ""


def test_total_limit() -> None:
    anvil = make_anvil(task.Clock(), total=2, per_ip=5)
    assert anvil.admit("p1", "smtp", "192.0.2.1") == ""
    assert anvil.admit("p2", "smtp", "192.0.2.2") == ""
    assert anvil.admit("p1", "smtp", "192.0.2.3") == "max_connections"


def test_forget_gives_back_what_a_process_held() -> None:
    anvil = make_anvil(task.Clock(), total=3, per_ip=3)
    for _ in range(3):
        assert anvil.admit("dead", "smtp", "192.0.2.1") == ""
    assert anvil.admit("alive", "smtp", "192.0.2.1") == "max_connections"
    assert anvil.sessions() == {"dead": 3}
    anvil.forget("dead")
    assert anvil.connections("smtp") == 0
    assert anvil.admit("alive", "smtp", "192.0.2.1") == ""
    assert anvil.sessions() == {"alive": 1}


def test_release_of_what_was_never_held_changes_nothing() -> None:
    anvil = make_anvil(task.Clock())
    assert anvil.admit("p1", "smtp", "192.0.2.1") == ""
    anvil.release("p2", "smtp", "192.0.2.1")  # p2 holds nothing
    anvil.release("p1", "smtp", "192.0.2.9")
    assert anvil.connections("smtp", "192.0.2.1") == 1
    assert anvil.connections("smtp") == 1


def test_limits_are_read_at_each_admission() -> None:
    limits = [(1, 1)]
    anvil = Anvil(task.Clock(), lambda: limits[0])
    assert anvil.admit("p", "smtp", "192.0.2.1") == ""
    assert anvil.admit("p", "smtp", "192.0.2.2") == "max_connections"
    limits[0] = (5, 5)  # a reload
    assert anvil.admit("p", "smtp", "192.0.2.2") == ""


def test_admission_over_amp_and_a_lost_connection() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock, total=10, per_ip=2)
    client1, server1, pump1 = connect(anvil, 101)
    client2, _, pump2 = connect(anvil, 102)
    gate1, gate2 = RemoteGate(client1), RemoteGate(client2)
    assert result(gate1.admit("smtp", "192.0.2.1"), pump1) == ""
    assert result(gate2.admit("smtp", "192.0.2.1"), pump2) == ""
    assert result(gate2.admit("smtp", "192.0.2.1"), pump2) == "max_connections_per_ip"
    assert anvil.sessions() == {101: 1, 102: 1}
    gate2.release("smtp", "192.0.2.1")
    pump2.flush()
    assert anvil.sessions() == {101: 1, 102: 0}
    # process 101 dies: its connection ends, its sessions are forgotten
    server1.transport.loseConnection()
    pump1.flush()
    assert anvil.connections("smtp", "192.0.2.1") == 0
    assert 101 not in anvil.sessions()


def test_gate_refuses_when_the_main_process_is_gone() -> None:
    anvil = make_anvil(task.Clock())
    client, server, pump = connect(anvil, 1)
    server.transport.loseConnection()
    pump.flush()
    assert result(RemoteGate(client).admit("smtp", "192.0.2.1"), pump) == "anvil"


def test_overlong_keys_are_refused() -> None:
    anvil = make_anvil(task.Clock())
    client, _, pump = connect(anvil, 1)
    d = client.callRemote(Hit, key="k" * 600, window=1.0, cost=1)
    with pytest.raises(AnvilError):
        result(d, pump)
    assert result(RemoteGate(client).admit("smtp", "x" * 600), pump) == "anvil"


# -- AUTH -------------------------------------------------------------------------------------


def test_auth_failures_count_over_every_process() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock)  # max_failures=3
    clients = [connect(anvil, pid) for pid in (1, 2, 3)]
    throttles = [(RemoteThrottle(c, clock, delay=1.0), p) for c, _, p in clients]
    for throttle, pump in throttles:
        assert result(throttle.begin("192.0.2.7"), pump) is True
        d = throttle.finish("192.0.2.7", ok=False)
        pump.flush()
        fired: list[Any] = []
        d.addCallback(fired.append)
        assert fired == []  # the delay runs in the acceptor
        clock.advance(1.0)
        assert len(fired) == 1
    # the third failure (in a third process) blocked the IP everywhere
    assert fired == [True]
    assert anvil.throttle.failures("192.0.2.7") == 3
    throttle, pump = throttles[0]
    assert result(throttle.blocked("192.0.2.7"), pump) is True
    assert result(throttle.begin("192.0.2.7"), pump) is False
    assert result(throttle.blocked("192.0.2.8"), pump) is False
    clock.advance(301)
    assert result(throttle.blocked("192.0.2.7"), pump) is False


def test_auth_checks_in_flight_count_and_are_given_back_by_a_dead_process() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock)  # max_failures=3
    client1, server1, pump1 = connect(anvil, 1)
    client2, _, pump2 = connect(anvil, 2)
    t1, t2 = RemoteThrottle(client1, clock), RemoteThrottle(client2, clock)
    assert result(t1.begin("192.0.2.7"), pump1) is True
    assert result(t1.begin("192.0.2.7"), pump1) is True
    assert result(t2.begin("192.0.2.7"), pump2) is True
    # three guesses in flight: a fourth waits for none of them
    assert result(t2.begin("192.0.2.7"), pump2) is False
    server1.transport.loseConnection()
    pump1.flush()
    assert anvil.throttle.in_flight("192.0.2.7") == 1
    assert result(t2.begin("192.0.2.7"), pump2) is True


def test_a_success_gives_the_slot_back_without_counting() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock)
    client, _, pump = connect(anvil, 1)
    t = RemoteThrottle(client, clock)
    assert result(t.begin("192.0.2.7"), pump) is True
    assert result(t.finish("192.0.2.7", ok=True), pump) is False
    pump.flush()
    assert anvil.throttle.in_flight("192.0.2.7") == 0
    assert anvil.throttle.failures("192.0.2.7") == 0


def test_finish_without_begin_counts_nothing() -> None:
    anvil = make_anvil(task.Clock())
    assert anvil.auth_finish("p", "192.0.2.7", ok=False) is False
    assert anvil.throttle.failures("192.0.2.7") == 0


def test_cancelled_delay_stops_its_timer() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock)
    client, _, pump = connect(anvil, 1)
    t = RemoteThrottle(client, clock)
    assert result(t.begin("192.0.2.7"), pump) is True
    d = t.finish("192.0.2.7", ok=False)
    pump.flush()
    d.cancel()
    d.addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []
    assert anvil.throttle.failures("192.0.2.7") == 1  # counted all the same


# -- rate-limit counters --------------------------------------------------------------------


def test_window_counter() -> None:
    clock = task.Clock()
    counter = WindowCounter(clock)
    got: list[int] = []
    for cost in (1, 2, 3):
        counter.hit("k", 60.0, cost).addCallback(got.append)
    counter.hit("other", 60.0).addCallback(got.append)
    assert got == [1, 3, 6, 1]
    clock.advance(60)
    counter.hit("k", 60.0).addCallback(got.append)
    assert got[-1] == 1


def test_window_counter_stays_bounded() -> None:
    clock = task.Clock()
    counter = WindowCounter(clock, max_keys=10)
    for i in range(100):
        counter.hit(f"k{i}", 60.0)
    assert len(counter._counts) <= 10


def test_counter_over_amp_is_shared() -> None:
    clock = task.Clock()
    anvil = make_anvil(clock)
    (c1, _, p1), (c2, _, p2) = connect(anvil, 1), connect(anvil, 2)
    a, b = AnvilCounter(c1), AnvilCounter(c2)
    assert result(a.hit("ip:192.0.2.1", 60.0), p1) == 1
    assert result(b.hit("ip:192.0.2.1", 60.0, 5), p2) == 6
    assert result(a.hit("ip:192.0.2.1", 60.0), p1) == 7
    clock.advance(60)
    assert result(b.hit("ip:192.0.2.1", 60.0), p2) == 1


def test_counter_is_pluggable() -> None:
    class Fixed:
        def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
            return defer.succeed(42)

    anvil = make_anvil(task.Clock(), counter=Fixed())
    client, _, pump = connect(anvil, 1)
    assert result(AnvilCounter(client).hit("k", 1.0), pump) == 42


def test_counter_refuses_a_window_that_is_not_positive() -> None:
    anvil = make_anvil(task.Clock())
    client, _, pump = connect(anvil, 1)
    with pytest.raises(AnvilError):
        result(AnvilCounter(client).hit("k", 0.0), pump)


# -- rate limits over every process ----------------------------------------------------


def test_rate_limits_count_over_every_process() -> None:
    from mailhub.configschema import LimitsConfig
    from mailhub.ratelimit.counter import MemoryCounter
    from mailhub.ratelimit.limits import RateLimits

    clock = task.Clock()
    anvil = make_anvil(clock, counter=MemoryCounter(clock))
    (c1, _, p1), (c2, _, p2) = connect(anvil, 1), connect(anvil, 2)
    config = LimitsConfig(client_messages_per_min=2)
    one, two = RateLimits(config, AnvilCounter(c1), clock), RateLimits(config, AnvilCounter(c2), clock)
    assert result(one.mail("192.0.2.1", None), p1) is None
    assert result(two.mail("192.0.2.1", None), p2) is None
    verdict = result(one.mail("192.0.2.1", None), p1)
    assert (verdict.limit, verdict.code, verdict.enhanced) == ("client_messages", 450, "4.7.1")
    assert result(two.mail("192.0.2.9", None), p2) is None  # another client


def test_a_counter_that_cannot_count_is_said_so_and_keeps_the_channel() -> None:
    from mailhub.configschema import LimitsConfig
    from mailhub.ratelimit.counter import CounterUnavailable
    from mailhub.ratelimit.limits import RateLimits

    class Down:
        def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
            return defer.fail(CounterUnavailable("connection refused"))

    clock = task.Clock()
    anvil = make_anvil(clock, counter=Down())
    client, _, pump = connect(anvil, 1)
    with pytest.raises(CounterUnavailable):
        result(AnvilCounter(client).hit("k", 60.0), pump)
    closed = RateLimits(LimitsConfig(client_messages_per_min=2, redis_failure="closed"), AnvilCounter(client), clock)
    verdict = result(closed.mail("192.0.2.1", None), pump)
    assert (verdict.limit, verdict.code) == ("unavailable", 451)
    opened = RateLimits(LimitsConfig(client_messages_per_min=2), AnvilCounter(client), clock)
    assert result(opened.mail("192.0.2.1", None), pump) is None
    # the channel is still up
    assert result(RemoteGate(client).admit("smtp", "192.0.2.1"), pump) == ""
