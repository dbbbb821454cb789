"""
End to end on loopback: the relay's TLS policies (MTA-STS, DANE, the
[relay.tls_policy] table) with real DNS, a real HTTPS policy server and
real SMTP receivers.

- DNS: a twisted.names server on 127.0.0.1 serving the zone below (MX,
  C{_mta-sts} TXT, TLSA records), playing a local validating resolver:
  answers under C{dane.test} and C{both.test} carry the AD bit.
- HTTPS: a twisted.web site with a certificate from a test CA serving the
  policies of C{mta-sts.DOMAIN}.
- Receivers: STARTTLS with a certificate from the test CA, with a
  self-signed one, or no STARTTLS at all (what stripping looks like).
- Client: L{RemoteDelivery} with the real SMTP client, the HTTPS fetcher
  reaching the policy server on its free port (the daemon uses 443).
"""

from __future__ import annotations

import hashlib

import pytest
from conftest import in_reactor
from dnszone import MX, TLSA, TXT, A, ValidatingServerFactory, Zone
from tlspeers import PKI, PolicySite, ReceiverFactory, cert_sha256, spki_sha256
from twisted.names import dns

from mailhub.envelope import DELIVERED_OUTCOME, TEMPORARY, Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.relay.agent import RemoteDelivery
from mailhub.relay.dane import DaneLookup, ValidatingResolver
from mailhub.relay.mtasts import MTASTS, https_agent, https_fetcher, txt_lookup
from mailhub.relay.nexthop import parse_dns_server
from mailhub.relay.tlspolicy import TLSPolicy
from mailhub.relay.tlsrpt import TLSReports, build_report, day_of, https_poster, load_day

MESSAGE = b"From: a@example.org\r\nTo: b@sts.test\r\nSubject: tls policy\r\n\r\nprotected body\r\n"
MX_NAMES = ("mx.sts.test", "mx.testing.test", "mx.outside.test", "mx.dane.test", "mx.plain.test",
            "mx.both.test", "mx.insecure.test", "mx.half.test")
ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n"

ZONE = {
    "sts.test": [MX(10, "mx.sts.test")],
    "_mta-sts.sts.test": [TXT("v=STSv1; id=20260101")],
    "_smtp._tls.sts.test": [TXT("v=TLSRPTv1; rua=https://mta-sts.sts.test/tlsrpt,mailto:tlsrpt@sts.test")],
    "testing.test": [MX(10, "mx.testing.test")],
    "_mta-sts.testing.test": [TXT("v=STSv1; id=1")],
    "outside.test": [MX(10, "mx.outside.test")],
    "_mta-sts.outside.test": [TXT("v=STSv1; id=1")],
    "dane.test": [MX(10, "mx.dane.test")],
    "both.test": [MX(10, "mx.both.test")],
    "_mta-sts.both.test": [TXT("v=STSv1; id=1")],
    "insecure.test": [MX(10, "mx.insecure.test")],
    "half.dane.test": [MX(10, "mx.half.test")],  # a secure MX record naming a host in an unsigned zone
    "plain.test": [MX(10, "mx.plain.test")],
}
for _n in MX_NAMES + tuple(f"mta-sts.{d}" for d in ("sts.test", "testing.test", "outside.test", "both.test")):
    ZONE[_n] = [A("127.0.0.1")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("tlspki"))


@pytest.fixture(scope="module")
def dns_server(reactor):
    zone = Zone("test", ZONE, failure=RuntimeError)  # a servfail name answers SERVFAIL, not NXDOMAIN

    def start():
        # _tcp.mx.half.test: TLSA answers validate, the address of mx.half.test does not
        factory = ValidatingServerFactory([zone], secure=("dane.test", "both.test", "_tcp.mx.half.test"))
        return reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")

    port = in_reactor(reactor, start)
    yield f"127.0.0.1:{port.getHost().port}", zone
    in_reactor(reactor, port.stopListening)


@pytest.fixture(scope="module")
def https(reactor, pki):
    site = PolicySite()
    _, options = pki.issue(*(f"mta-sts.{d}" for d in ("sts.test", "testing.test", "outside.test", "both.test")))
    site.set("sts.test", ENFORCE)
    site.set("testing.test", "version: STSv1\nmode: testing\nmx: *.testing.test\nmax_age: 86400\n")
    site.set("outside.test", "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n")
    site.set("both.test", "version: STSv1\nmode: enforce\nmx: nowhere.both.test\nmax_age: 86400\n")
    port = in_reactor(reactor, reactor.listenSSL, 0, site.site, options, interface="127.0.0.1")
    yield site, port.getHost().port
    in_reactor(reactor, port.stopListening)


@pytest.fixture
def receiver(reactor):
    ports = []

    def start(tls_options=None):
        f = ReceiverFactory(tls_options)
        port = in_reactor(reactor, reactor.listenTCP, 0, f, interface="127.0.0.1")
        ports.append(port)
        return f, port.getHost().port

    yield start
    for p in ports:
        in_reactor(reactor, p.stopListening)


@pytest.fixture
def relay(reactor, dns_server, https, pki, tmp_path):
    """relay(port, table=..., default=...) -> a started RemoteDelivery; stopped after the test.

    The TLSA records a test adds to the module's zone (L{set_tlsa}) are removed after it."""
    agents = []
    zone_records = dict(dns_server[1].records)

    def make(port: int, table=None, default="may", state=None, fetch_ca=pki.ca_file):
        dns_addr = dns_server[0]
        state = state or tmp_path / "tls"

        def build():
            agent = RemoteDelivery(
                reactor, "relay.example.org", dns_servers=[dns_addr], port=port, tls=default,
                loopback_is_self=False,
                client_options={"tls_ca_file": pki.ca_file, "connect_timeout": 10.0, "command_timeout": 20.0,
                                "greeting_timeout": 20.0},
            )
            fetch = https_fetcher(reactor, agent.mx_addresses, port=https[1], ca_file=fetch_ca, timeout=10.0)
            mtasts = MTASTS(reactor, str(state / "mta-sts"), txt_lookup(agent.resolver), fetch)
            dane = DaneLookup(ValidatingResolver(servers=[parse_dns_server(dns_addr)], reactor=reactor))
            agent.tls_policy = TLSPolicy(default, table or {}, dane, mtasts)
            agent.tls_reports = TLSReports(reactor, str(state), organization="relay.example.org",
                                           sender="postmaster@example.org")
            agent.startService()
            return agent

        agent = in_reactor(reactor, build)
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        if a.running:
            in_reactor(reactor, a.stopService)
    dns_server[1].records.clear()
    dns_server[1].records.update(zone_records)


def deliver(reactor, agent, tmp_path, rcpt: str):
    path = tmp_path / "Q0000000001"
    env = Envelope("Q0000000001", "a@example.org", [Recipient(rcpt)], 0.0)
    path.write_bytes(queue_file_bytes(MESSAGE, env))
    [outcome] = in_reactor(reactor, lambda: agent.deliver(env, env.recipients, str(path), report=lambda o: None))
    return outcome


def tls_events(events, result=None):
    return [e for e in events if e.get("mail_event") == "relay_tls" and (result is None or e["result"] == result)]


def set_tlsa(zone, host: str, port: int, *records) -> None:
    zone.records[f"_{port}._tcp.{host}".encode()] = list(records)


# -- MTA-STS ------------------------------------------------------------------------


def test_sts_enforce_delivers_over_verified_tls(reactor, pki, receiver, relay, https, tmp_path, events):
    _, good = pki.issue(*MX_NAMES)
    f, port = receiver(good)
    before = len(https[0].requests)  # the policy server is shared by the module's tests
    o = deliver(reactor, relay(port), tmp_path, "b@sts.test")
    assert o.kind == DELIVERED_OUTCOME, o.text
    assert " verified=mta-sts" in o.text and " tls=TLSv1." in o.text and " cipher=" in o.text
    assert [tls for tls, _ in f.messages] == [True]
    assert ("mta-sts.sts.test", "/.well-known/mta-sts.txt") in https[0].requests[before:]
    [ev] = tls_events(events, "delivered")
    assert (ev["policy"], ev["verified"], ev["count"]) == ("sts", "mta-sts", 1)


def test_sts_enforce_defers_when_starttls_is_stripped(reactor, receiver, relay, tmp_path):
    f, port = receiver(None)
    o = deliver(reactor, relay(port), tmp_path, "b@sts.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert "required by the MTA-STS policy of sts.test" in o.text
    assert not any(c.startswith("MAIL") for c in f.commands) and f.messages == []


def test_sts_enforce_defers_on_an_untrusted_certificate(reactor, pki, receiver, relay, tmp_path, events):
    _, bad = PKI.self_signed(*MX_NAMES)
    f, port = receiver(bad)
    agent = relay(port)
    o = deliver(reactor, agent, tmp_path, "b@sts.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert "not trusted" in o.text
    assert f.messages == []
    [ev] = tls_events(events, "failed")
    assert ev["policy"] == "sts"
    in_reactor(reactor, agent.tls_reports.flush)
    report = build_report("sts.test", day_of(reactor.seconds()),
                          load_day(str(tmp_path / "tls"), day_of(reactor.seconds()))["sts.test"], "o", "c", "id")
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["policy"]["mx-host"] == ["mx.sts.test"]
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert policy["failure-details"][0]["result-type"] == "certificate-not-trusted"
    assert policy["failure-details"][0]["receiving-mx-hostname"] == "mx.sts.test"


def test_sts_enforce_never_connects_to_an_mx_outside_the_policy(reactor, pki, receiver, relay, tmp_path):
    _, good = pki.issue(*MX_NAMES)
    f, port = receiver(good)
    o = deliver(reactor, relay(port), tmp_path, "b@outside.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert "MX host mx.outside.test does not match the MTA-STS policy of outside.test" in o.text
    assert f.commands == []


def test_sts_testing_delivers_and_logs_what_would_have_failed(reactor, receiver, relay, tmp_path, events):
    _, bad = PKI.self_signed(*MX_NAMES)
    f, port = receiver(bad)
    o = deliver(reactor, relay(port), tmp_path, "b@testing.test")
    assert o.kind == DELIVERED_OUTCOME, o.text
    assert " verified=none" in o.text
    assert [tls for tls, _ in f.messages] == [True]
    [ev] = tls_events(events, "testing-failed")
    assert ev["policy"] == "sts" and "not trusted" in ev["reason"]


def test_cached_policy_survives_a_restart_and_a_failed_txt_lookup(reactor, pki, receiver, relay, dns_server,
                                                                   https, tmp_path):
    _, good = pki.issue(*MX_NAMES)
    f, port = receiver(good)
    first = relay(port)
    assert deliver(reactor, first, tmp_path, "b@sts.test").kind == DELIVERED_OUTCOME
    in_reactor(reactor, first.stopService)
    assert (tmp_path / "tls" / "mta-sts" / "sts.test.json").exists()
    zone = dns_server[1]
    site = https[0]
    saved = site.policies.pop("mta-sts.sts.test")
    zone._servfail.add(b"_mta-sts.sts.test")
    try:
        stripped, plain_port = receiver(None)
        o = deliver(reactor, relay(plain_port), tmp_path, "b@sts.test")  # a new agent: the restart
        assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
        assert stripped.messages == []
    finally:
        zone._servfail.discard(b"_mta-sts.sts.test")
        site.policies["mta-sts.sts.test"] = saved


@pytest.mark.parametrize("status, ctype, body", [
    (302, "text/plain", ENFORCE.encode()),  # a redirect is a failed fetch, whatever it carries
    (200, "text/html", ENFORCE.encode()),  # not text/plain
    (200, "text/plain", ENFORCE.encode() + b"x: " + b"y" * 70000 + b"\r\n"),  # over 64 KB
])
def test_bad_policy_responses_are_no_policy(reactor, receiver, relay, https, tmp_path, status, ctype, body):
    site = https[0]
    saved = site.policies["mta-sts.sts.test"]
    site.policies["mta-sts.sts.test"] = (status, ctype, body)
    try:
        f, port = receiver(None)
        o = deliver(reactor, relay(port), tmp_path, "b@sts.test")
        assert o.kind == DELIVERED_OUTCOME, o.text  # no policy: opportunistic, plain text to a stripped server
        assert [tls for tls, _ in f.messages] == [False]
        assert " verified=none" in o.text and " tls=none" in o.text
    finally:
        site.policies["mta-sts.sts.test"] = saved


def test_policy_host_with_an_untrusted_certificate_gives_no_policy(reactor, pki, receiver, relay, https, tmp_path):
    other = PKI(tmp_path, "another CA")  # the policy server's certificate is not from this one
    f, port = receiver(None)
    o = deliver(reactor, relay(port, fetch_ca=other.ca_file), tmp_path, "b@sts.test")
    assert o.kind == DELIVERED_OUTCOME and [tls for tls, _ in f.messages] == [False], o.text


# -- DANE ---------------------------------------------------------------------------


def test_dane_ee_matches_a_certificate_pkix_would_refuse(reactor, receiver, relay, dns_server, tmp_path, events):
    cert, own = PKI.self_signed("mx.dane.test")
    f, port = receiver(own)
    set_tlsa(dns_server[1], "mx.dane.test", port, TLSA(3, 1, 1, spki_sha256(cert)))
    o = deliver(reactor, relay(port), tmp_path, "b@dane.test")
    assert o.kind == DELIVERED_OUTCOME, o.text
    assert " verified=dane" in o.text
    assert [tls for tls, _ in f.messages] == [True]
    assert tls_events(events, "delivered")[0]["policy"] == "tlsa"


def test_dane_mismatch_defers_a_certificate_pkix_would_accept(reactor, pki, receiver, relay, dns_server, tmp_path):
    cert, good = pki.issue("mx.dane.test")
    f, port = receiver(good)
    set_tlsa(dns_server[1], "mx.dane.test", port, TLSA(3, 1, 1, hashlib.sha256(b"another key").digest()))
    o = deliver(reactor, relay(port, default="verify"), tmp_path, "b@dane.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert "does not match its TLSA records" in o.text
    assert not any(c.startswith("MAIL") for c in f.commands)


def test_dane_ta_checks_the_chain_and_the_name(reactor, pki, receiver, relay, dns_server, tmp_path):
    _, good = pki.issue("mx.dane.test")
    f, port = receiver(good)
    set_tlsa(dns_server[1], "mx.dane.test", port, TLSA(2, 0, 1, cert_sha256(pki.cert)))
    o = deliver(reactor, relay(port), tmp_path, "b@dane.test")
    assert o.kind == DELIVERED_OUTCOME and " verified=dane" in o.text, o.text
    _, wrong_name = pki.issue("mx.other.test")
    f2, port2 = receiver(wrong_name)
    set_tlsa(dns_server[1], "mx.dane.test", port2, TLSA(2, 0, 1, cert_sha256(pki.cert)))
    o = deliver(reactor, relay(port2), tmp_path, "b@dane.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert f2.messages == []


def test_dane_stripped_starttls_defers(reactor, receiver, relay, dns_server, tmp_path):
    f, port = receiver(None)
    set_tlsa(dns_server[1], "mx.dane.test", port, TLSA(3, 1, 1, hashlib.sha256(b"k").digest()))
    o = deliver(reactor, relay(port), tmp_path, "b@dane.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert "DANE" in o.text and f.messages == []


def test_tlsa_without_the_ad_bit_is_not_used(reactor, receiver, relay, dns_server, tmp_path):
    _, own = PKI.self_signed("mx.insecure.test")
    f, port = receiver(own)
    set_tlsa(dns_server[1], "mx.insecure.test", port, TLSA(3, 1, 1, hashlib.sha256(b"k").digest()))
    o = deliver(reactor, relay(port), tmp_path, "b@insecure.test")
    assert o.kind == DELIVERED_OUTCOME and " verified=none" in o.text, o.text


def test_tlsa_of_an_mx_host_with_insecure_addresses_is_not_used(reactor, receiver, relay, dns_server, tmp_path):
    _, own = PKI.self_signed("mx.half.test")
    f, port = receiver(own)
    set_tlsa(dns_server[1], "mx.half.test", port, TLSA(3, 1, 1, hashlib.sha256(b"k").digest()))
    o = deliver(reactor, relay(port), tmp_path, "b@half.dane.test")
    assert o.kind == DELIVERED_OUTCOME and " verified=none" in o.text, o.text


def test_dane_takes_precedence_over_mta_sts(reactor, receiver, relay, dns_server, tmp_path):
    # both.test's MTA-STS policy names no MX it has; its TLSA records rule.
    cert, own = PKI.self_signed("mx.both.test")
    f, port = receiver(own)
    set_tlsa(dns_server[1], "mx.both.test", port, TLSA(3, 1, 1, spki_sha256(cert)))
    o = deliver(reactor, relay(port), tmp_path, "b@both.test")
    assert o.kind == DELIVERED_OUTCOME and " verified=dane" in o.text, o.text


# -- the table ------------------------------------------------------------------------


def test_table_overrides_mta_sts(reactor, receiver, relay, tmp_path):
    f, port = receiver(None)
    o = deliver(reactor, relay(port, table={"sts.test": "may"}), tmp_path, "b@sts.test")
    assert o.kind == DELIVERED_OUTCOME, o.text
    assert [tls for tls, _ in f.messages] == [False]


def test_table_encrypt_and_dane_only_defer(reactor, receiver, relay, tmp_path):
    f, port = receiver(None)
    o = deliver(reactor, relay(port, table={".plain.test": "encrypt"}), tmp_path, "b@plain.test")
    assert o.kind == DELIVERED_OUTCOME  # ".plain.test" covers subdomains only
    o = deliver(reactor, relay(port, table={"plain.test": "encrypt"}), tmp_path, "b@plain.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.4"), o.text
    fresh, fresh_port = receiver(None)
    o = deliver(reactor, relay(fresh_port, table={"plain.test": "dane-only"}), tmp_path, "b@plain.test")
    assert (o.kind, o.status) == (TEMPORARY, "4.7.5"), o.text
    assert "no usable DNSSEC-validated TLSA records for mx.plain.test" in o.text
    assert fresh.commands == []  # never connected


# -- TLS reports ----------------------------------------------------------------------


def test_daily_report_posted_over_https_and_mailed(reactor, pki, relay, https, tmp_path):
    import gzip
    import json

    agent = relay(25)  # its resolver and address lookups
    yesterday = day_of(reactor.seconds() - 86400)
    (tmp_path / "tls" / "tlsrpt").mkdir(parents=True)
    counts = {"sts.test": {json.dumps(["sts", ["version: STSv1"], ["mx.sts.test"]]): {
        "success": 7, "failure": 1, "details": {json.dumps(["certificate-expired", "mx.sts.test", "", ""]): 1}}}}
    (tmp_path / "tls" / "tlsrpt" / f"{yesterday}.json").write_text(json.dumps(counts))
    mailed = []

    def submit(sender, to, message):
        mailed.append((sender, to, message))

    async def none():
        return None

    def build():
        web = https_agent(reactor, agent.mx_addresses, port=https[1], ca_file=pki.ca_file, timeout=10.0)
        reports = TLSReports(reactor, str(tmp_path / "tls"), organization="relay.example.org",
                             sender="postmaster@example.org", txt=txt_lookup(agent.resolver),
                             submit=lambda *a: (submit(*a), none())[1], send=True, post=https_poster(web, reactor))
        return reports.send_due()

    before = len(https[0].posts)  # the policy server is shared by the module's tests
    in_reactor(reactor, build)
    [(host, path, ctype, body)] = https[0].posts[before:]
    assert (host, path, ctype) == ("mta-sts.sts.test", "/tlsrpt", "application/tlsrpt+gzip")
    report = json.loads(gzip.decompress(body))
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 7,
                                                "total-failure-session-count": 1}
    assert [(s, t) for s, t, _ in mailed] == [("postmaster@example.org", "tlsrpt@sts.test")]
    assert (tmp_path / "tls" / "tlsrpt" / f"{yesterday}.sent").exists()
