"""
Unit tests for mailhub.relay (agent, mx, pool): routing, DNS (MX / implicit MX / null MX /
CNAME / errors), trying hosts in order, loop detection, TLS fallback,
concurrency limits and connection reuse.

In memory: the resolver is a real twisted.names authority (L{Zone}, in
tests/dnszone.py) serving a dict, the clock is a C{MemoryReactorClock}, and C{connect} is L{FakeNet},
which follows smtpclient.connect's contract (fires an SMTPConnection-like
object or errbacks with SessionError, connect failures included).
"""

from __future__ import annotations

from typing import Any

import pytest
from dnszone import AAAA, CNAME, MX, A, Zone
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names import error as dnserror

from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.queue.queuefile import open_message, queue_file_bytes
from mailhub.relay import client as smtpclient
from mailhub.relay.agent import RemoteDelivery
from mailhub.relay.nexthop import Destination, parse_dns_server, parse_nexthop
from mailhub.relay.reply import SessionError

# -- a fake network following smtpclient.connect's contract ------------------------------


class FakeConnection:
    def __init__(self, net: FakeNet, name: str, ip: str, port: int, options: Any) -> None:
        self.net = net
        self.remote_mta = f"{name}[{ip}]:{port}"
        self.options = options
        self.extensions: dict[str, str] = {"PIPELINING": ""}
        self.tls = options.tls != "none"
        self.usable = True
        self.resets = 0
        self.quits = 0
        self.sent: list[tuple[str, list[str]]] = []

    def send(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> defer.Deferred:
        with open_message(message_path) as f:  # a queue file: read up to the end of the message only
            body = f.read()
        self.sent.append((envelope.queue_id, [r.address for r in recipients]))
        self.net.messages.append((self.remote_mta, envelope.queue_id, [r.address for r in recipients], body))
        return defer.succeed([
            Outcome.delivered(r.address, f"host {self.remote_mta} said: 250 2.0.0 Ok", self.remote_mta)
            for r in recipients
        ])

    def reset(self) -> defer.Deferred:
        self.resets += 1
        return defer.succeed(None)

    def quit(self) -> defer.Deferred:
        self.usable = False
        self.quits += 1
        self.net.open -= 1
        return defer.succeed(None)


class FakeNet:
    """
    C{behaviour[ip]}: "ok" (default), "refused", "hold" (the Deferred is
    kept in C{held} for the test to fire), a SessionError to raise, or
    "tlsfail" (fails with tls_failed unless options.tls == "none").
    """

    def __init__(self, **behaviour: Any) -> None:
        self.behaviour: dict[str, Any] = {}
        self.connects: list[tuple[str, str, int, Any]] = []
        self.conns: list[FakeConnection] = []
        self.messages: list[tuple[str, str, list[str], bytes]] = []
        self.held: list[tuple[defer.Deferred, FakeConnection]] = []
        self.open = 0
        self.max_open = 0

    def connect(self, reactor: Any, endpoint: Any, options: Any, remote_name: str,
                remote_ip: str = "", port: int = 25) -> defer.Deferred:
        self.connects.append((remote_name, remote_ip, port, options))
        mta = f"{remote_name}[{remote_ip}]:{port}"
        how = self.behaviour.get(remote_ip, "ok")
        if how == "refused":
            # as smtpclient.connect words it: no reply code, no remote MTA
            return defer.fail(SessionError(0, "4.4.1", f"connect to {mta}: Connection refused"))
        if isinstance(how, SessionError):
            return defer.fail(how)
        if how == "tlsfail" and options.tls != "none":
            return defer.fail(SessionError(451, "4.7.5", f"Cannot start TLS with {mta}: handshake failed",
                                           False, mta, tls_failed=True))
        conn = FakeConnection(self, remote_name, remote_ip, port, options)
        self.conns.append(conn)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        if how == "hold":
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, conn))
            return d
        return defer.succeed(conn)

    def release(self, n: int = 0) -> None:
        d, conn = self.held.pop(n)
        d.callback(conn)

    @property
    def ips(self) -> list[str]:
        return [c[1] for c in self.connects]


class Reverse:
    """An injected random whose shuffle reverses: makes equal-preference order visible."""

    def shuffle(self, items: list) -> None:
        items.reverse()


class Keep:
    def shuffle(self, items: list) -> None:
        pass


ZONE = {
    # MX with preferences (listed out of order on purpose)
    "pref.test": [MX(20, "mx2.pref.test"), MX(10, "mx1.pref.test")],
    "mx1.pref.test": [A("192.0.2.1")],
    "mx2.pref.test": [A("192.0.2.2")],
    # three hosts, two at equal preference
    "equal.test": [MX(10, "a.equal.test"), MX(10, "b.equal.test"), MX(20, "c.equal.test")],
    "a.equal.test": [A("192.0.2.11")],
    "b.equal.test": [A("192.0.2.12")],
    "c.equal.test": [A("192.0.2.13")],
    # implicit MX: A and AAAA only
    "aonly.test": [A("192.0.2.20"), AAAA("2001:db8::20")],
    # null MX
    "nullmx.test": [MX(0, ".")],
    # MX host is a CNAME, and a domain that is a CNAME
    "cname.test": [MX(10, "alias.cname.test")],
    "alias.cname.test": [CNAME("real.cname.test")],
    "real.cname.test": [A("192.0.2.30")],
    "other.test": [CNAME("pref.test")],
    # MX host with no address at all
    "noaddr.test": [MX(10, "ghost.noaddr.test")],
    # loops
    "loop.test": [MX(10, "me.loop.test")],
    "me.loop.test": [A("198.51.100.1")],
    "loopback.test": [MX(10, "lo.loopback.test")],
    "lo.loopback.test": [A("127.0.0.1")],
    "byname.test": [MX(10, "mail.example.org")],
    "mail.example.org": [A("192.0.2.99")],
    "backup.test": [MX(10, "primary.backup.test"), MX(20, "me.loop.test"), MX(30, "worse.backup.test")],
    "primary.backup.test": [A("192.0.2.40")],
    "worse.backup.test": [A("192.0.2.41")],
    # routes and smarthost targets
    "relay.test": [A("192.0.2.50")],
    "relaymx.test": [MX(10, "mx.relaymx.test")],
    "mx.relaymx.test": [A("192.0.2.51")],
    "smart.test": [A("192.0.2.60")],
}


def make(tmp_path, net: FakeNet | None = None, zone: Zone | None = None, **kw: Any):
    net = net or FakeNet()
    zone = zone or Zone("test", ZONE, servfail=("servfail.test", "flaky.test"))
    clock = MemoryReactorClock()
    kw.setdefault("random", Keep())
    agent = RemoteDelivery(clock, "mailhub.example.org", connect=net.connect, resolver=zone, **kw)
    msg = tmp_path / "msg"  # a queue file, as the spool hands it to agents
    msg.write_bytes(queue_file_bytes(b"Subject: hi\r\n\r\nbody\r\n", env("u@pref.test")[0]))
    return agent, net, zone, clock, str(msg)


def env(*rcpts: str, qid: str = "Q1") -> tuple[Envelope, list[Recipient]]:
    recipients = [Recipient(r) for r in rcpts]
    return Envelope(qid, "sender@example.org", recipients, 0.0), recipients


def run(agent: RemoteDelivery, msg: str, *rcpts: str, qid: str = "Q1") -> list[Outcome]:
    e, r = env(*rcpts, qid=qid)
    d = agent.deliver(e, r, msg, report=lambda outcomes: None)
    result = []
    d.addBoth(result.append)
    assert result, "delivery did not finish"
    assert isinstance(result[0], list), result[0]
    return result[0]


def one(outcomes: list[Outcome]) -> Outcome:
    assert len(outcomes) == 1
    return outcomes[0]


# -- next hop syntax ---------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("relay.test", Destination("relay.test", 25, mx=True, explicit=True)),
    ("relay.test:587", Destination("relay.test", 587, mx=True, explicit=True)),
    ("[relay.test]", Destination("relay.test", 25, mx=False, explicit=True)),
    ("[Relay.Test]:2525", Destination("relay.test", 2525, mx=False, explicit=True)),
    ("smtp:[relay.test]:26", Destination("relay.test", 26, mx=False, explicit=True)),
    ("127.0.0.1:2525", Destination("127.0.0.1", 2525, mx=False, explicit=True)),
    ("[::1]:2525", Destination("::1", 2525, mx=False, explicit=True)),
    ("[IPv6:2001:db8::1]", Destination("2001:db8::1", 25, mx=False, explicit=True)),
    ("", None),
    ("smtp:", None),
])
def test_parse_nexthop(value: str, expected: Destination | None) -> None:
    assert parse_nexthop(value) == expected


@pytest.mark.parametrize("value", ["[relay.test", "relay.test:x", "relay.test:0", "::1:25", "bad_host!:25",
                                   "relay.test:70000"])
def test_parse_nexthop_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_nexthop(value)


def test_parse_dns_server() -> None:
    assert parse_dns_server("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_dns_server("[::1]:5353") == ("::1", 5353)
    assert parse_dns_server("2001:db8::53") == ("2001:db8::53", 53)
    with pytest.raises(ValueError):
        parse_dns_server("ns.example")


def test_bad_settings_rejected() -> None:
    with pytest.raises(ValueError):
        RemoteDelivery(MemoryReactorClock(), "h", tls="sometimes")
    with pytest.raises(ValueError):
        RemoteDelivery(MemoryReactorClock(), "h", routes={"x.test": "[x"})
    with pytest.raises(TypeError):
        RemoteDelivery(MemoryReactorClock(), "h", client_options={"no_such_option": 1})


# -- MX --------------------------------------------------------------------------------------


def test_mx_preference_order(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@pref.test"))
    assert o.kind == "delivered"
    assert o.remote_mta == "mx1.pref.test[192.0.2.1]:25"
    assert net.ips == ["192.0.2.1"]
    assert net.messages == [("mx1.pref.test[192.0.2.1]:25", "Q1", ["u@pref.test"],
                             b"Subject: hi\r\n\r\nbody\r\n")]
    # The MX host name is what TLS would verify.
    assert net.connects[0][3].tls_hostname == "mx1.pref.test"
    assert net.connects[0][3].helo_name == "mailhub.example.org"
    assert net.connects[0][3].tls == "may"
    assert net.connects[0][3].auth is None


def test_dead_first_mx_second_used(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour["192.0.2.1"] = "refused"
    o = one(run(agent, msg, "u@pref.test"))
    assert o.kind == "delivered"
    assert o.remote_mta == "mx2.pref.test[192.0.2.2]:25"
    assert net.ips == ["192.0.2.1", "192.0.2.2"]


def test_all_dead_is_temporary_with_last_error(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour.update({"192.0.2.1": "refused", "192.0.2.2": "refused"})
    outcomes = run(agent, msg, "u@pref.test", "v@pref.test")
    assert [(o.recipient, o.kind, o.code, o.status, o.text, o.remote_mta) for o in outcomes] == [
        (r, "temporary", 0, "4.4.1", "connect to mx2.pref.test[192.0.2.2]:25: Connection refused", "")
        for r in ("u@pref.test", "v@pref.test")
    ]
    assert not any(o.replied for o in outcomes)


def test_equal_preference_uses_injected_random(tmp_path) -> None:
    for rnd, order in ((Keep(), ["192.0.2.11", "192.0.2.12", "192.0.2.13"]),
                       (Reverse(), ["192.0.2.12", "192.0.2.11", "192.0.2.13"])):
        agent, net, _, _, msg = make(tmp_path, random=rnd)
        net.behaviour.update({ip: "refused" for ip in order})
        o = one(run(agent, msg, "u@equal.test"))
        assert o.kind == "temporary"
        assert net.ips == order  # the worse preference is always last


def test_implicit_mx_uses_a_and_aaaa(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour["192.0.2.20"] = "refused"
    o = one(run(agent, msg, "u@aonly.test"))
    assert o.kind == "delivered"
    assert net.ips == ["192.0.2.20", "2001:db8::20"]
    assert o.remote_mta == "aonly.test[2001:db8::20]:25"


def test_null_mx_is_permanent_at_once(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@nullmx.test"))
    assert (o.kind, o.code, o.status) == ("permanent", 0, "5.1.10")
    assert o.text == "Domain nullmx.test does not accept mail (null MX)"
    assert net.connects == []


def test_nxdomain_is_permanent(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@nowhere.test"))
    assert (o.kind, o.code, o.status) == ("permanent", 0, "5.1.2")
    assert o.text.startswith("Host or domain name not found. Name service error for name=nowhere.test type=MX")
    assert net.connects == []


def test_servfail_is_temporary(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@servfail.test"))
    assert (o.kind, o.code, o.status) == ("temporary", 0, "4.4.3")
    assert o.text == "Host or domain name not found. Name service error for name=servfail.test type=MX: Host not found, try again"
    assert not o.replied and o.remote_mta == ""
    assert net.connects == []


def test_dns_timeout_is_temporary(tmp_path) -> None:
    zone = Zone("test", ZONE, servfail=("slow.test",), failure=dnserror.DNSQueryTimeoutError)
    agent, net, _, _, msg = make(tmp_path, zone=zone)
    o = one(run(agent, msg, "u@slow.test"))
    assert (o.kind, o.code, o.status) == ("temporary", 0, "4.4.3")


def test_mx_host_without_address_is_permanent(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@noaddr.test"))
    assert (o.kind, o.code, o.status) == ("permanent", 0, "5.4.4")
    assert net.connects == []


def test_cname_mx_host_followed(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@cname.test"))
    assert o.kind == "delivered"
    assert net.connects[0][:3] == ("alias.cname.test", "192.0.2.30", 25)


def test_cname_domain_followed(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@other.test"))
    assert o.kind == "delivered"
    assert net.ips == ["192.0.2.1"]


def test_cname_chain_not_in_answer_is_asked_again(tmp_path) -> None:
    # A resolver answering with a bare CNAME (no target records) is asked again.
    class Bare:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def lookupMailExchange(self, name: str) -> defer.Deferred:
            self.asked.append(name)
            if name == "bare.test":
                return defer.succeed(([dns.RRHeader(b"bare.test", dns.CNAME, payload=CNAME("target.test"))], [], []))
            if name == "target.test":
                return defer.succeed(([dns.RRHeader(b"target.test", dns.MX, payload=MX(5, "mx.target.test"))], [], []))
            return defer.fail(dnserror.DNSNameError(name))

        def lookupAddress(self, name: str) -> defer.Deferred:
            return defer.succeed(([dns.RRHeader(b"mx.target.test", dns.A, payload=A("192.0.2.77"))], [], []))

        def lookupIPV6Address(self, name: str) -> defer.Deferred:
            return defer.succeed(([], [], []))

    bare = Bare()
    net = FakeNet()
    agent = RemoteDelivery(MemoryReactorClock(), "h", connect=net.connect, resolver=bare)
    (tmp_path / "m").write_bytes(queue_file_bytes(b"x\r\n", env("u@bare.test")[0]))
    o = one(run(agent, str(tmp_path / "m"), "u@bare.test"))
    assert o.kind == "delivered"
    assert bare.asked == ["bare.test", "target.test"]
    assert net.ips == ["192.0.2.77"]


def test_max_addresses(tmp_path) -> None:
    zone = {"many.test": [MX(i, f"mx{i}.many.test") for i in range(8)]}
    zone.update({f"mx{i}.many.test": [A(f"192.0.2.{100 + i}")] for i in range(8)})
    agent, net, _, _, msg = make(tmp_path, zone=Zone("test", zone), max_addresses=3)
    net.behaviour.update({f"192.0.2.{100 + i}": "refused" for i in range(8)})
    o = one(run(agent, msg, "u@many.test"))
    assert o.kind == "temporary"
    assert net.ips == ["192.0.2.100", "192.0.2.101", "192.0.2.102"]


# -- greetings and TLS -----------------------------------------------------------------------


def greet(code: int, ip: str, name: str) -> SessionError:
    mta = f"{name}[{ip}]:25"
    return SessionError(code, f"{code // 100}.3.2", f"host {mta} said: {code} go away (in reply to initial server greeting)",
                        code >= 500, mta)


def test_5xx_greeting_tries_next(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour["192.0.2.1"] = greet(554, "192.0.2.1", "mx1.pref.test")
    o = one(run(agent, msg, "u@pref.test"))
    assert o.kind == "delivered"
    assert net.ips == ["192.0.2.1", "192.0.2.2"]


def test_permanent_on_all_hosts_is_permanent(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour["192.0.2.1"] = greet(554, "192.0.2.1", "mx1.pref.test")
    net.behaviour["192.0.2.2"] = greet(550, "192.0.2.2", "mx2.pref.test")
    o = one(run(agent, msg, "u@pref.test"))
    assert (o.kind, o.code, o.status) == ("permanent", 550, "5.3.2")
    assert o.text == "host mx2.pref.test[192.0.2.2]:25 said: 550 go away (in reply to initial server greeting)"
    assert o.remote_mta == "mx2.pref.test[192.0.2.2]:25"


def test_mixed_permanent_and_temporary_is_temporary(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour["192.0.2.1"] = "refused"
    net.behaviour["192.0.2.2"] = greet(554, "192.0.2.2", "mx2.pref.test")
    o = one(run(agent, msg, "u@pref.test"))
    assert (o.kind, o.code, o.status, o.remote_mta) == ("temporary", 0, "4.4.1", "")
    assert o.text == "connect to mx1.pref.test[192.0.2.1]:25: Connection refused"


def test_tls_failure_under_may_retries_same_host_without_tls(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    net.behaviour["192.0.2.1"] = "tlsfail"
    o = one(run(agent, msg, "u@pref.test"))
    assert o.kind == "delivered"
    assert [(c[1], c[3].tls) for c in net.connects] == [("192.0.2.1", "may"), ("192.0.2.1", "none")]


def test_tls_failure_under_encrypt_tries_next_host(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, tls="encrypt")
    net.behaviour["192.0.2.1"] = "tlsfail"
    net.behaviour["192.0.2.2"] = "tlsfail"
    o = one(run(agent, msg, "u@pref.test"))
    assert (o.kind, o.status) == ("temporary", "4.7.5")
    assert [(c[1], c[3].tls) for c in net.connects] == [("192.0.2.1", "encrypt"), ("192.0.2.2", "encrypt")]


def test_client_options_passed(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, tls="verify",
                                 client_options={"tls_ca_file": "/ca.pem", "command_timeout": 7.0})
    run(agent, msg, "u@pref.test")
    o = net.connects[0][3]
    assert (o.tls, o.tls_ca_file, o.command_timeout, o.tls_hostname) == ("verify", "/ca.pem", 7.0, "mx1.pref.test")


# -- loops -------------------------------------------------------------------------------------


def test_best_mx_is_my_address_loops(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, local_addresses=["198.51.100.1"])
    o = one(run(agent, msg, "u@loop.test"))
    assert (o.kind, o.code, o.status, o.text) == ("permanent", 0, "5.4.6", "mail for loop.test loops back to myself")
    assert net.connects == []


def test_best_mx_on_loopback_loops(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@loopback.test"))
    assert (o.kind, o.status) == ("permanent", "5.4.6")
    assert net.connects == []


def test_best_mx_named_like_me_loops(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, local_names=["Mail.Example.org"])
    o = one(run(agent, msg, "u@byname.test"))
    assert (o.kind, o.status) == ("permanent", "5.4.6")


def test_backup_mx_tries_only_better_hosts(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, local_addresses=["198.51.100.1"])
    net.behaviour["192.0.2.40"] = "refused"
    o = one(run(agent, msg, "u@backup.test"))
    assert o.kind == "temporary"
    assert net.ips == ["192.0.2.40"]  # never ourselves, never the worse one


def test_address_literal_of_loopback_loops(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path)
    o = one(run(agent, msg, "u@[127.0.0.1]"))
    assert (o.kind, o.status) == ("permanent", "5.4.6")
    assert net.connects == []


def test_explicit_route_to_loopback_is_not_a_loop(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, routes={"loop.test": "[127.0.0.1]:2525"},
                                 local_addresses=["198.51.100.1"])
    o = one(run(agent, msg, "u@loop.test"))
    assert o.kind == "delivered"
    # the name given to the client (Remote-MTA in a DSN) is the route's host: here the IP literal
    assert net.connects[0][:3] == ("127.0.0.1", "127.0.0.1", 2525)
    assert o.remote_mta == "127.0.0.1[127.0.0.1]:2525"


# -- routes, smarthost, literals -----------------------------------------------------------------


def test_route_exact_with_mx_lookup_of_route_host(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path, routes={"pref.test": "relaymx.test:2526"})
    o = one(run(agent, msg, "u@pref.test"))
    assert o.kind == "delivered"
    assert net.connects[0][:3] == ("mx.relaymx.test", "192.0.2.51", 2526)
    assert ("relaymx.test", dns.MX) in zone.queries
    assert ("pref.test", dns.MX) not in zone.queries


def test_route_parent_matches_subdomains_only(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path, routes={".corp.test": "[relay.test]"})
    o = one(run(agent, msg, "u@deep.sub.corp.test"))
    assert o.kind == "delivered"
    assert net.connects[0][:3] == ("relay.test", "192.0.2.50", 25)
    o = one(run(agent, msg, "u@corp.test"))  # the parent itself is not matched: MX -> NXDOMAIN here
    assert (o.kind, o.status) == ("permanent", "5.1.2")


def test_bracketed_route_skips_mx(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path, routes={"pref.test": "[relaymx.test]:2525"})
    o = one(run(agent, msg, "u@pref.test"))
    # relaymx.test has no A record: a bracketed route does not look at its MX.
    assert o.kind == "temporary"
    assert net.connects == []
    assert ("relaymx.test", dns.MX) not in zone.queries
    assert {q for q in zone.queries} == {("relaymx.test", dns.A), ("relaymx.test", dns.AAAA)}


def test_smarthost_for_everything_with_auth(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path, smarthost="[smart.test]:587", smarthost_auth=("user", "pw"))
    outcomes = run(agent, msg, "a@pref.test", "b@aonly.test", "c@nowhere.test")
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    # One connection, one transaction for all three domains.
    assert net.messages == [("smart.test[192.0.2.60]:587", "Q1", ["a@pref.test", "b@aonly.test", "c@nowhere.test"],
                             b"Subject: hi\r\n\r\nbody\r\n")]
    assert net.connects[0][3].auth == ("user", "pw")
    assert net.connects[0][3].tls_hostname == "smart.test"
    assert all(name == "smart.test" for name, _ in zone.queries)


def test_routes_beat_smarthost_and_empty_route_means_mx(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, smarthost="[smart.test]", smarthost_auth=("user", "pw"),
                                 routes={"pref.test": "", "aonly.test": "[relay.test]"})
    outcomes = run(agent, msg, "a@pref.test", "b@aonly.test", "c@other.example")
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    by_rcpt = {m[2][0]: m[0] for m in net.messages}
    assert by_rcpt == {"a@pref.test": "mx1.pref.test[192.0.2.1]:25",
                       "b@aonly.test": "relay.test[192.0.2.50]:25",
                       "c@other.example": "smart.test[192.0.2.60]:25"}
    # Credentials only go to the smarthost.
    assert {c[0]: c[3].auth for c in net.connects} == {
        "mx1.pref.test": None, "relay.test": None, "smart.test": ("user", "pw")}


def test_address_literal_goes_to_that_ip(tmp_path) -> None:
    agent, net, zone, _, msg = make(tmp_path, port=2525)
    o = one(run(agent, msg, "u@[192.0.2.9]"))
    assert o.kind == "delivered"
    assert net.connects[0][:3] == ("192.0.2.9", "192.0.2.9", 2525)
    assert net.connects[0][3].tls_hostname is None
    assert zone.queries == []


def test_bad_domain_is_permanent(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    outcomes = run(agent, msg, "u@bad_domain!", "nodomain")
    assert [(o.kind, o.status) for o in outcomes] == [("permanent", "5.1.2"), ("permanent", "5.1.3")]


def test_domains_normalised_and_grouped(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    outcomes = run(agent, msg, "a@PREF.test", "b@pref.TEST.")
    assert [o.kind for o in outcomes] == ["delivered", "delivered"]
    assert len(net.connects) == 1
    assert net.messages[0][2] == ["a@PREF.test", "b@pref.TEST."]


def test_recipient_limit_splits_transactions_on_one_connection(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, recipient_limit=2)
    outcomes = run(agent, msg, "a@pref.test", "b@pref.test", "c@pref.test")
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    assert len(net.conns) == 1
    assert net.conns[0].sent == [("Q1", ["a@pref.test", "b@pref.test"]), ("Q1", ["c@pref.test"])]
    assert net.conns[0].resets == 1


def test_broken_connection_mid_message_is_not_kept(tmp_path) -> None:
    agent, net, _, clock, msg = make(tmp_path)

    class Breaking(FakeConnection):
        def send(self, envelope, recipients, message_path):
            self.usable = False
            return defer.succeed([Outcome.temporary(r.address, "lost connection", 451, "4.4.2", self.remote_mta)
                                  for r in recipients])

    real = net.connect

    def connect(*a, **k):
        d = real(*a, **k)
        return d.addCallback(lambda c: (setattr(c, "__class__", Breaking), c)[1])

    agent._connect = connect
    o = one(run(agent, msg, "u@pref.test"))
    assert (o.kind, o.status) == ("temporary", "4.4.2")
    run(agent, msg, "u@pref.test", qid="Q2")
    assert len(net.conns) == 2  # no reuse of a dead connection
    assert [c.quits for c in net.conns] == [1, 1]
    assert agent._pool.total == 0  # both freed their slots


# -- concurrency and reuse --------------------------------------------------------------------------


def test_destination_concurrency_limit(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, destination_concurrency=2)
    net.behaviour["192.0.2.1"] = "hold"
    results: list = []
    for i in range(5):
        e, r = env("u@pref.test", qid=f"Q{i}")
        agent.deliver(e, r, msg, report=lambda outcomes: None).addCallback(results.append)
    assert len(net.connects) == 2 and results == []
    net.release(0)
    # The first connection delivered Q0, then was handed (after RSET) to
    # each waiter in turn; no third connection was opened.
    assert len(results) == 4 and len(net.connects) == 2
    assert net.conns[0].sent == [("Q0", ["u@pref.test"]), ("Q2", ["u@pref.test"]),
                                 ("Q3", ["u@pref.test"]), ("Q4", ["u@pref.test"])]
    assert net.conns[0].resets == 3
    net.release(0)
    assert len(results) == 5
    assert len(net.connects) == 2 and net.max_open == 2
    assert net.conns[1].sent == [("Q1", ["u@pref.test"])]


def test_total_concurrency_limit(tmp_path) -> None:
    agent, net, _, clock, msg = make(tmp_path, total_concurrency=2)
    for ip in ("192.0.2.1", "192.0.2.20", "192.0.2.30"):
        net.behaviour[ip] = "hold"
    results: list = []
    for i, dom in enumerate(("pref.test", "aonly.test", "cname.test")):
        e, r = env(f"u@{dom}", qid=f"Q{i}")
        agent.deliver(e, r, msg, report=lambda outcomes: None).addCallback(results.append)
    assert len(net.connects) == 2
    net.release(0)
    # Q0 done; its idle connection is closed to make room for the third destination.
    assert len(results) == 1
    assert net.conns[0].quits == 1
    assert len(net.connects) == 3
    assert net.max_open == 2
    net.release(0)
    net.release(0)
    assert len(results) == 3
    assert agent._pool.total == 2  # two idle connections, within the limit


def test_connection_reused_for_next_message_then_expires(tmp_path) -> None:
    agent, net, _, clock, msg = make(tmp_path, idle_timeout=5.0)
    assert one(run(agent, msg, "u@pref.test", qid="Q1")).kind == "delivered"
    clock.advance(4)
    assert one(run(agent, msg, "v@pref.test", qid="Q2")).kind == "delivered"
    assert len(net.connects) == 1
    conn = net.conns[0]
    assert conn.sent == [("Q1", ["u@pref.test"]), ("Q2", ["v@pref.test"])]
    assert conn.resets == 1  # RSET before the second message
    assert conn.quits == 0
    clock.advance(4.9)
    assert conn.quits == 0
    clock.advance(0.2)
    assert conn.quits == 1
    assert agent._pool.total == 0
    run(agent, msg, "w@pref.test", qid="Q3")
    assert len(net.connects) == 2


def test_unusable_idle_connection_is_replaced(tmp_path) -> None:
    agent, net, _, clock, msg = make(tmp_path)
    run(agent, msg, "u@pref.test", qid="Q1")
    net.conns[0].usable = False  # the server closed it while idle
    assert one(run(agent, msg, "v@pref.test", qid="Q2")).kind == "delivered"
    assert len(net.connects) == 2
    assert net.conns[0].resets == 0
    assert agent._pool.total == 1


def test_stop_service_closes_idle_connections(tmp_path) -> None:
    agent, net, _, clock, msg = make(tmp_path)
    agent.startService()
    run(agent, msg, "u@pref.test")
    run(agent, msg, "u@aonly.test")
    result: list = []
    agent.stopService().addCallback(result.append)
    assert result
    assert [c.quits for c in net.conns] == [1, 1]
    assert agent._pool.total == 0 and clock.getDelayedCalls() == []
    # After stop nothing is kept idle.
    run(agent, msg, "u@pref.test")
    assert net.conns[-1].quits == 1


def test_connection_events_logged(tmp_path) -> None:
    from twisted.logger import globalLogPublisher

    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        agent, net, _, _, msg = make(tmp_path)
        net.behaviour["192.0.2.1"] = "refused"
        run(agent, msg, "u@pref.test")
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [e.get("text") for e in events if e.get("log_namespace") == "mailhub.relay.agent"]
    assert "connect to mx1.pref.test[192.0.2.1]:25: Connection refused" in texts


def test_fakes_match_smtpclient_contract(tmp_path) -> None:
    """The fake connect / connection have the real ones' signatures and members (fakes meet the real contract)."""
    import inspect

    real = list(inspect.signature(smtpclient.connect).parameters)
    fake = list(inspect.signature(FakeNet().connect).parameters)
    assert fake == real
    conn = FakeConnection(FakeNet(), "h", "192.0.2.1", 25, smtpclient.ClientOptions(helo_name="x"))
    for name in ("remote_mta", "extensions", "tls", "usable", "send", "reset", "quit"):
        assert hasattr(smtpclient.SMTPConnection, name), name
        assert hasattr(conn, name), name
    for name in ("send", "reset", "quit"):
        assert (list(inspect.signature(getattr(smtpclient.SMTPConnection, name)).parameters)
                == ["self"] + list(inspect.signature(getattr(conn, name)).parameters)), name
    e = SessionError(451, "4.4.1", "x", False, "m", tls_failed=True)
    assert (e.code, e.enhanced, e.text, e.permanent, e.remote_mta, e.tls_failed) == (451, "4.4.1", "x", False, "m", True)


# -- outcomes reported per transaction (report=) ---------------------------------------------


def slow_sends(agent: RemoteDelivery, net: FakeNet, ip: str) -> list[tuple[defer.Deferred, list[Recipient], str]]:
    """Connections to C{ip} take the message and keep the final "." unanswered until the test fires."""
    held: list[tuple[defer.Deferred, list[Recipient], str]] = []

    class SlowSend(FakeConnection):
        def send(self, envelope, recipients, message_path):
            d: defer.Deferred = defer.Deferred()
            held.append((d, list(recipients), self.remote_mta))
            return d

    real = net.connect

    def connect(*a, **k):
        d = real(*a, **k)
        return d.addCallback(lambda c: (c.remote_mta.endswith(f"[{ip}]:25") and setattr(c, "__class__", SlowSend), c)[1])

    agent._connect = connect
    return held


def answer(held, n: int = 0) -> None:
    d, rcpts, mta = held.pop(n)
    d.callback([Outcome.delivered(r.address, f"host {mta} said: 250 2.0.0 Ok", mta) for r in rcpts])


def test_each_next_hop_reported_when_its_transaction_ends(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)
    held = slow_sends(agent, net, "192.0.2.1")  # pref.test's MX is slow
    reports: list[list[Outcome]] = []
    results: list = []
    e, r = env("slow@pref.test", "fast@aonly.test", "bad@nullmx.test")
    agent.deliver(e, r, msg, report=reports.append).addCallback(results.append)
    # aonly.test answered and nullmx.test failed at once; pref.test is still in DATA
    assert sorted((o.recipient, o.kind) for rep in reports for o in rep) == [
        ("bad@nullmx.test", "permanent"), ("fast@aonly.test", "delivered")]
    assert len(reports) == 2 and results == []
    answer(held)
    assert [(o.recipient, o.kind) for o in reports[2]] == [("slow@pref.test", "delivered")]
    [out] = results
    assert sorted(o.recipient for o in out) == ["bad@nullmx.test", "fast@aonly.test", "slow@pref.test"]
    assert reports[2][0] in out  # the final list repeats what was reported


def test_one_report_per_transaction_and_for_a_failed_session(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path, recipient_limit=2)
    reports: list[list[Outcome]] = []
    run_with = lambda *rcpts: agent.deliver(*env(*rcpts), msg, report=reports.append)  # noqa: E731
    run_with("a@pref.test", "b@pref.test", "c@pref.test")
    assert [[o.recipient for o in rep] for rep in reports] == [["a@pref.test", "b@pref.test"], ["c@pref.test"]]
    reports.clear()
    net.behaviour["192.0.2.20"] = "refused"
    net.behaviour["2001:db8::20"] = "refused"
    run_with("x@aonly.test")
    [[o]] = reports
    assert (o.recipient, o.kind, o.status) == ("x@aonly.test", "temporary", "4.4.1")


def test_a_failing_report_does_not_break_the_delivery(tmp_path) -> None:
    agent, net, _, _, msg = make(tmp_path)

    def report(outcomes):
        raise RuntimeError("scheduler bug")

    result: list = []
    agent.deliver(*env("u@pref.test"), msg, report=report).addBoth(result.append)
    [[o]] = result
    assert o.kind == "delivered" and agent._pool.total == 1  # the connection went back to the idle pool


def test_scheduler_records_the_fast_domain_while_the_slow_one_is_in_data(tmp_path) -> None:
    """
    Scheduler, Router and this agent in memory: a message to a fast and a
    slow domain.  When the fast one has answered, its recipient is delivered
    on disk; a scheduler started on that spool (after a crash) only tries
    the slow one.
    """
    from mailhub.delivery.router import Router
    from mailhub.queue.scheduler import RetryPolicy, Scheduler
    from mailhub.queue.spool import Spool

    class Remote:
        def is_local(self, domain: str) -> bool:
            return False

    agent, net, _, clock, msg = make(tmp_path)
    held = slow_sends(agent, net, "192.0.2.1")
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    writer = spool.new_message()
    writer.write(b"Subject: hi\r\n\r\nbody\r\n")
    e = Envelope(writer.queue_id, "sender@example.org", [Recipient("slow@pref.test"), Recipient("fast@aonly.test")],
                 arrival=0.0)
    writer.commit(e)
    sched = Scheduler(spool, Router(spool, Remote(), agent, agent), clock, RetryPolicy(jitter=0.0))
    sched.startService()
    assert len(held) == 1 and e.queue_id in sched.in_flight

    def on_disk() -> dict[str, str]:
        # what a daemon started after a crash would read (spool format 2:
        # the envelope file once it changed, else the copy in the queue file)
        on_disk = Spool(str(tmp_path / "spool"), fsync=False).load(e.queue_id)
        return {r.address: r.state for r in on_disk.recipients}

    assert on_disk() == {"slow@pref.test": "pending", "fast@aonly.test": "delivered"}

    # a crash now: the next daemon's scheduler sends only to the slow domain
    given: list[list[str]] = []

    def after_crash(envelope, recipients, report):
        given.append([r.address for r in recipients])
        return defer.Deferred()

    Scheduler(Spool(str(tmp_path / "spool"), fsync=False), after_crash, clock, RetryPolicy(jitter=0.0)).startService()
    assert given == [["slow@pref.test"]]

    # without a crash the round ends normally: done, nothing sent twice
    answer(held)
    assert spool.queue_ids() == [] and e.queue_id not in sched.in_flight
    assert sorted(m[2][0] for m in net.messages) == ["fast@aonly.test"]  # slow ones are not in net.messages


def test_system_resolver_logs_its_configuration_path_as_text(events) -> None:
    """Twisted logs "<resolv> changed, reparsing" when the resolver starts: a path, not a b'' repr."""
    import os

    from twisted.logger import formatEvent

    if not os.path.exists("/etc/resolv.conf"):
        pytest.skip("no /etc/resolv.conf")
    agent = RemoteDelivery(MemoryReactorClock(), "relay.example.org")
    agent.resolver()
    texts = [formatEvent(e) for e in events]
    assert "/etc/resolv.conf changed, reparsing" in texts
    assert not [t for t in texts if "b'" in t]
