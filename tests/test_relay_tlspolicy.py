"""
Unit tests of the outbound TLS policies, in memory: MTA-STS parsing,
matching, cache and refresh (L{mailhub.relay.mtasts}, with a C{Clock} and
fake lookups), TLSA records and chain matching (L{mailhub.relay.dane}),
the precedence of the policy sources (L{mailhub.relay.tlspolicy}), TLS
reports (L{mailhub.relay.tlsrpt}) and the metric they feed.  End to end on
sockets: test_e2e_tls_policy.py, test_e2e_daemon_tls.py.
"""

from __future__ import annotations

import datetime
import email
import gzip
import hashlib
import json

import pytest
from tlspeers import PKI, cert_sha256, spki_sha256
from twisted.internet import defer, task

from mailhub.metrics import MailMetrics
from mailhub.relay.dane import TLSA, DaneAnswer, DNSFailure, ValidatingResolver, resolv_conf_servers, tlsa_match
from mailhub.relay.mtasts import MTASTS, PolicyError, mx_matches, parse_policy, parse_txt
from mailhub.relay.nexthop import Destination
from mailhub.relay.tlspolicy import HostPolicy, TLSPolicy, table_key, verified
from mailhub.relay.tlsrpt import TLSReports, build_report, load_day, parse_rua, report_message, result_type

NOW = datetime.datetime.now(datetime.UTC)

# -- MTA-STS: formats ------------------------------------------------------------------


def test_parse_txt():
    assert parse_txt([[b"v=STSv1; id=20160831085700Z;"]]) == "20160831085700Z"
    assert parse_txt([[b"v=STSv1; ", b"id=abc"]]) == "abc"  # strings of one record are joined
    assert parse_txt([[b"something else"]]) is None
    assert parse_txt([]) is None
    assert parse_txt([[b"v=STSv1; id=a"], [b"v=STSv1; id=b"]]) is None  # two records: none (RFC 8461 3.1)
    with pytest.raises(PolicyError):
        parse_txt([[b"v=STSv1; id=" + b"x" * 33]])
    with pytest.raises(PolicyError):
        parse_txt([[b"v=STSv1; id=not-alnum"]])


def test_parse_policy():
    p = parse_policy(b"version: STSv1\r\nmode: enforce\r\nmx: MX1.Example.NET.\r\nmx: *.example.net\r\n"
                     b"max_age: 604800\r\nunknown: ignored\r\n")
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mx1.example.net", "*.example.net"), 604800)
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n").mx == ()
    assert parse_policy(b"version: STSv1\nmode: testing\nmx: a.b\nmax_age: 9999999999\n").max_age == 31557600
    for bad in (b"mode: enforce\nmx: a\nmax_age: 1\n", b"version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                b"version: STSv1\nmode: enforce\nmax_age: 1\n", b"version: STSv1\nmode: enforce\nmx: a\n",
                b"version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
                b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999\n", "version: STSv1\nmx: \xe9\n".encode()):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_mx_patterns():
    assert mx_matches("mx.example.net", "MX.example.net.")
    assert mx_matches("*.example.net", "mx1.example.net")
    assert not mx_matches("*.example.net", "a.b.example.net")  # one label only
    assert not mx_matches("*.example.net", "example.net")
    assert not mx_matches("mx.example.net", "mx.example.net.evil")


# -- MTA-STS: discovery, cache, refresh ------------------------------------------------------


class FakeDNS:
    def __init__(self) -> None:
        self.records: dict[str, list[list[bytes]]] = {}
        self.fail: set[str] = set()
        self.asked: list[str] = []

    async def txt(self, name: str) -> list[list[bytes]]:
        self.asked.append(name)
        if name in self.fail:
            raise RuntimeError("SERVFAIL")
        return self.records.get(name, [])


class FakeFetch:
    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.calls: list[str] = []

    def __call__(self, domain: str):
        self.calls.append(domain)
        if domain not in self.bodies:
            return defer.fail(PolicyError("HTTP status 404"))
        return defer.succeed(self.bodies[domain])


MAX_AGE = 3 * 86400
ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 259200\n"


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def sts(tmp_path, clock=None):
    if clock is None:
        clock = task.Clock()
        clock.advance(1_000_000)
    dns, fetch = FakeDNS(), FakeFetch()
    return MTASTS(clock, str(tmp_path / "mta-sts"), dns.txt, fetch), dns, fetch, clock


def test_policy_fetched_once_per_id_and_cached_on_disk(tmp_path):
    m, dns, fetch, clock = sts(tmp_path)
    dns.records["_mta-sts.sts.test"] = [[b"v=STSv1; id=1"]]
    fetch.bodies["sts.test"] = ENFORCE
    entry = result(m.policy("sts.test"))
    assert entry.policy.mode == "enforce" and entry.id == "1"
    assert result(m.policy("sts.test")) == entry
    assert fetch.calls == ["sts.test"]
    with open(tmp_path / "mta-sts" / "sts.test.json") as f:
        assert json.load(f)["policy"]["mx"] == ["mx.sts.test"]
    # a restart with the TXT lookup failing: the cache rules until max_age
    m2, dns2, fetch2, _ = sts(tmp_path, clock)
    dns2.fail.add("_mta-sts.sts.test")
    clock.advance(MAX_AGE - 10)
    assert result(m2.policy("sts.test")).policy.mode == "enforce"
    assert fetch2.calls == [] and dns2.asked == ["_mta-sts.sts.test"]
    clock.advance(20)  # expired
    assert result(m2.policy("sts.test")) is None


def test_txt_record_removed_keeps_the_cached_policy_and_a_new_id_refetches(tmp_path):
    m, dns, fetch, clock = sts(tmp_path)
    dns.records["_mta-sts.sts.test"] = [[b"v=STSv1; id=1"]]
    fetch.bodies["sts.test"] = ENFORCE
    result(m.policy("sts.test"))
    clock.advance(86400 + 100)  # due for a check, still valid
    del dns.records["_mta-sts.sts.test"]
    assert result(m.policy("sts.test")).id == "1"
    dns.records["_mta-sts.sts.test"] = [[b"v=STSv1; id=2"]]
    fetch.bodies["sts.test"] = b"version: STSv1\nmode: none\nmax_age: 86400\n"
    assert result(m.policy("sts.test")) is None  # mode none drops the cached policy
    assert not (tmp_path / "mta-sts" / "sts.test.json").exists()


def test_fetch_failure_keeps_the_cached_policy_and_bad_policy_gives_none(tmp_path):
    m, dns, fetch, clock = sts(tmp_path)
    dns.records["_mta-sts.new.test"] = [[b"v=STSv1; id=1"]]
    fetch.bodies["new.test"] = b"version: STSv1\nmode: enforce\nmax_age: 5\n"  # no mx
    assert result(m.policy("new.test")) is None
    dns.records["_mta-sts.sts.test"] = [[b"v=STSv1; id=1"]]
    fetch.bodies["sts.test"] = ENFORCE
    result(m.policy("sts.test"))
    dns.records["_mta-sts.sts.test"] = [[b"v=STSv1; id=2"]]
    del fetch.bodies["sts.test"]
    clock.advance(86400 + 100)
    assert result(m.policy("sts.test")).id == "1"


def test_proactive_refresh_before_expiry(tmp_path):
    m, dns, fetch, clock = sts(tmp_path)
    dns.records["_mta-sts.sts.test"] = [[b"v=STSv1; id=1"]]
    fetch.bodies["sts.test"] = ENFORCE
    start = clock.seconds()
    result(m.policy("sts.test"))
    m.startService()
    try:
        for _ in range(24):  # the refresh runs hourly
            clock.advance(3600)
        # checked again after a day (same id, more than half its life left): not fetched
        assert fetch.calls == ["sts.test"] and m.cached("sts.test").checked == start + 86400
        for _ in range(24):
            clock.advance(3600)
        # less than half of max_age left: fetched again before it expires
        assert fetch.calls == ["sts.test", "sts.test"] and m.cached("sts.test").fetched == start + 2 * 86400
    finally:
        m.stopService()


def test_unreadable_cache_file_is_ignored(tmp_path):
    (tmp_path / "mta-sts").mkdir()
    (tmp_path / "mta-sts" / "x.test.json").write_text("{not json")
    m, *_ = sts(tmp_path)
    assert m.cached("x.test") is None


# -- DANE ----------------------------------------------------------------------------------


def test_tlsa_parse_and_usability():
    rec = TLSA.parse(bytes([3, 1, 1]) + b"\x00" * 32)
    assert rec.usable and str(rec).startswith("3 1 1 00")
    assert not TLSA.parse(bytes([3, 1, 1]) + b"\x00" * 31).usable  # wrong digest length
    assert not TLSA.parse(bytes([1, 1, 1]) + b"\x00" * 32).usable  # PKIX-EE: not for SMTP
    assert not TLSA.parse(bytes([0, 0, 1]) + b"\x00" * 32).usable
    assert not TLSA.parse(bytes([3, 2, 1]) + b"\x00" * 32).usable
    with pytest.raises(ValueError):
        TLSA.parse(b"\x03\x01")


def test_tlsa_match_ee_and_ta(tmp_path):
    pki = PKI(tmp_path)
    leaf, _ = pki.issue("mx.dane.test")
    other, _ = PKI.self_signed("mx.dane.test")
    chain = [leaf, pki.cert]
    ee_key = TLSA(3, 1, 1, spki_sha256(leaf))
    ee_cert = TLSA(3, 0, 1, cert_sha256(leaf))
    ee_full = TLSA(3, 0, 0, leaf.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                                          fromlist=["Encoding"]).Encoding.DER))
    ee_512 = TLSA(3, 1, 2, hashlib.sha512(b"x").digest())
    assert tlsa_match(chain, [ee_key], ["anything"], NOW) == str(ee_key)
    assert tlsa_match(chain, [ee_cert], [], NOW) == str(ee_cert)
    assert tlsa_match(chain, [ee_full], [], NOW) == str(ee_full)
    assert tlsa_match(chain, [ee_512], [], NOW) is None
    assert tlsa_match([other], [ee_key], [], NOW) is None
    ta = TLSA(2, 0, 1, cert_sha256(pki.cert))
    assert tlsa_match(chain, [ta], ["mx.dane.test"], NOW) == str(ta)
    assert tlsa_match(chain, [ta], ["mx.other.test"], NOW) is None  # DANE-TA checks the name
    assert tlsa_match(chain, [ta], ["mx.dane.test"], NOW + datetime.timedelta(days=30)) is None  # and validity
    assert tlsa_match([leaf], [ta], ["mx.dane.test"], NOW) is None  # the anchor must be in the chain
    assert tlsa_match([], [ee_key], [], NOW) is None


def test_resolv_conf_servers_and_trust(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.org\nnameserver 127.0.0.53\nnameserver ::1\nnameserver bogus\n")
    assert resolv_conf_servers(str(conf)) == [("127.0.0.53", 53), ("::1", 53)]
    assert resolv_conf_servers(str(tmp_path / "missing")) == []
    clock = task.Clock()
    assert ValidatingResolver(servers=[("127.0.0.1", 53), ("::1", 5353)], reactor=clock).trusted()
    # one remote server is enough for the AD bit to be forgeable on the way: not believed
    assert not ValidatingResolver(servers=[("127.0.0.1", 53), ("192.0.2.53", 53)], reactor=clock).trusted()


# -- the policy decision -------------------------------------------------------------------


class FakeDane:
    def __init__(self, secure: bool = True, answers=None, trusted: bool = True, insecure_hosts=()) -> None:
        self.secure, self.answers, self.trusted = secure, answers or {}, trusted
        self.insecure_hosts = insecure_hosts

    async def mx_secure(self, domain):
        return self.secure

    async def host_secure(self, host):
        return host not in self.insecure_hosts

    async def tlsa(self, host, port):
        a = self.answers.get(host, DaneAnswer(True, ()))
        if isinstance(a, Exception):
            raise a
        return a


class FakeSTS:
    def __init__(self, entry) -> None:
        self.entry = entry

    def policy(self, domain):
        return defer.succeed(self.entry)


def cached(mode: str, *mx: str):
    from mailhub.relay.mtasts import CachedPolicy, STSPolicy

    return CachedPolicy("d.test", "1", STSPolicy(mode, mx, 86400), 0.0, 0.0)


def decide(policy: TLSPolicy, host: str = "mx.d.test", mx: bool = True) -> HostPolicy:
    async def go():
        dp = await policy.for_destination(Destination("d.test", 25, mx=mx))
        return await policy.for_host(dp, host, 25)

    return result(defer.ensureDeferred(go()))


REC = TLSA(3, 1, 1, b"\x00" * 32)


def test_precedence_table_dane_mtasts_default():
    dane = FakeDane(answers={"mx.d.test": DaneAnswer(True, (REC,))})
    enforce = FakeSTS(cached("enforce", "mx.d.test"))
    assert decide(TLSPolicy("may")) == HostPolicy("may", "default")
    assert decide(TLSPolicy("may", mtasts=enforce)) == HostPolicy("verify", "mta-sts")
    assert decide(TLSPolicy("may", dane=dane, mtasts=enforce)) == HostPolicy("encrypt", "dane", tlsa=(REC,))
    assert decide(TLSPolicy("may", {"d.test": "none"}, dane, enforce)) == HostPolicy("none", "table")
    assert decide(TLSPolicy("may", {".test": "verify"}, dane, enforce)) == HostPolicy("verify", "table")
    # insecure MX, or a resolver whose AD bit is not believed: no DANE
    assert decide(TLSPolicy("may", dane=FakeDane(secure=False, answers=dane.answers))).source == "default"
    assert decide(TLSPolicy("may", dane=FakeDane(trusted=False, answers=dane.answers))).source == "default"
    # an MX host whose addresses are not validated: its TLSA records are not used (RFC 7672 2.2.2)
    half = FakeDane(answers=dane.answers, insecure_hosts=("mx.d.test",))
    assert decide(TLSPolicy("may", dane=half, mtasts=enforce)) == HostPolicy("verify", "mta-sts")
    # no MX lookup (smarthost, [route]): nothing is discovered
    assert decide(TLSPolicy("may", dane=dane, mtasts=enforce), mx=False) == HostPolicy("may", "default")


def test_mtasts_enforce_refuses_other_mx_and_testing_only_warns():
    hp = decide(TLSPolicy("may", mtasts=FakeSTS(cached("enforce", "*.d.test"))), host="mx.evil.test")
    assert hp.refuse == "MX host mx.evil.test does not match the MTA-STS policy of d.test"
    hp = decide(TLSPolicy("none", mtasts=FakeSTS(cached("testing", "*.d.test"))), host="mx.evil.test")
    assert (hp.tls, hp.observe, hp.refuse, hp.report_type) == ("may", True, "", "sts")
    assert hp.warning.startswith("MX host mx.evil.test does not match")


def test_dane_levels_of_the_table():
    none = FakeDane()
    assert decide(TLSPolicy("may", {"d.test": "dane"}, none)) == HostPolicy("may", "table")
    hp = decide(TLSPolicy("may", {"d.test": "dane-only"}, none))
    assert hp.refuse.startswith("no usable DNSSEC-validated TLSA records") and hp.report_type == "tlsa"
    broken = FakeDane(answers={"mx.d.test": DNSFailure("timed out")})
    hp = decide(TLSPolicy("may", dane=broken))
    assert hp.refuse.startswith("TLSA lookup for _25._tcp.mx.d.test failed")
    with pytest.raises(ValueError):
        TLSPolicy("may", {"d.test": "sometimes"})


def test_table_key_and_verified_words():
    assert table_key({"a.test": "none", ".test": "may"}, "a.test") == "none"
    assert table_key({"a.test": "none", ".test": "may"}, "b.a.test") == "may"
    assert table_key({".a.test": "none"}, "a.test") is None
    info = {"version": "TLSv1.3", "cipher": "X", "pkix_error": None, "dane": None}
    assert verified(HostPolicy("verify", "mta-sts"), info) == "mta-sts"
    assert verified(HostPolicy("verify", "table"), info) == "pkix"
    assert verified(HostPolicy("may", "default"), info) == "none"
    assert verified(HostPolicy("encrypt", "dane"), {**info, "dane": "3 1 1 00"}) == "dane"
    assert verified(HostPolicy("verify", "mta-sts"), {**info, "version": ""}) == "none"


# -- TLS reports -----------------------------------------------------------------------------


def test_report_counts_json_and_mail(tmp_path):
    clock = task.Clock()
    clock.advance(86400 * 20000 + 3600)
    reports = TLSReports(clock, str(tmp_path), organization="relay.example.org", sender="postmaster@example.org")
    strings = ["version: STSv1", "mode: enforce", "mx: mx.d.test", "max_age: 86400"]
    for _ in range(3):
        reports.record("d.test", "sts", strings, ["mx.d.test"], True, mx_host="mx.d.test", ip="192.0.2.1")
    reports.record("d.test", "sts", strings, ["mx.d.test"], False, "certificate-expired", "mx.d.test", "192.0.2.1")
    reports.flush()
    day = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).strftime("%Y-%m-%d")
    report = build_report("d.test", day, load_day(str(tmp_path), day)["d.test"], "relay.example.org",
                          "postmaster@example.org", "rid")
    assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    [p] = report["policies"]
    assert p["policy"] == {"policy-type": "sts", "policy-domain": "d.test", "policy-string": strings,
                           "mx-host": ["mx.d.test"]}
    assert p["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
    assert p["failure-details"] == [{"result-type": "certificate-expired", "receiving-mx-hostname": "mx.d.test",
                                     "receiving-ip": "192.0.2.1", "failed-session-count": 1}]
    raw = report_message(report, "d.test", "relay.example.org", "postmaster@example.org", "rua@d.test")
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "d.test"
    att = [part for part in msg.walk() if part.get_content_type() == "application/tlsrpt+gzip"]
    assert json.loads(gzip.decompress(att[0].get_payload(decode=True))) == report


def test_reports_sent_once_per_finished_day(tmp_path):
    clock = task.Clock()
    clock.advance(86400 * 20000 + 3600)
    sent = []

    async def txt(name):
        return [[b"v=TLSRPTv1; rua=mailto:tlsrpt@d.test,https://r.d.test/x"]] if name == "_smtp._tls.d.test" else []

    def submit(sender, to, message):
        sent.append((sender, to, message))
        return defer.succeed(None)

    reports = TLSReports(clock, str(tmp_path), organization="o", sender="postmaster@example.org", txt=txt,
                         submit=submit, send=True)
    reports.record("d.test", "no-policy-found", [], [], True)
    reports.record("e.test", "no-policy-found", [], [], True)
    result(defer.maybeDeferred(reports.send_due) or defer.succeed(None))
    assert sent == []  # today is not finished
    clock.advance(86400)
    result(reports.send_due())
    assert [(s, t) for s, t, _ in sent] == [("postmaster@example.org", "tlsrpt@d.test")]
    result(reports.send_due())
    assert len(sent) == 1


def test_rua_and_result_types():
    assert parse_rua([[b"v=TLSRPTv1; rua=mailto:a@b.test, mailto:c@d.test"]]) == ["mailto:a@b.test", "mailto:c@d.test"]
    assert parse_rua([[b"v=TLSRPTv1;rua=mailto:a@b.test"], [b"v=TLSRPTv1;rua=mailto:x@y.test"]]) == []
    assert parse_rua([[b"v=spf1 -all"]]) == []
    assert result_type("TLS: certificate of mx has expired") == "certificate-expired"
    assert result_type("TLS: certificate of mx does not match its name (DNS name x)") == "certificate-host-mismatch"
    assert result_type("TLS: certificate of mx does not match its TLSA records") == "tlsa-invalid"
    assert result_type("TLS is required, but was not offered by host mx") == "starttls-not-supported"
    assert result_type("TLS: certificate of mx is not trusted (self-signed certificate)") == "certificate-not-trusted"


def test_relay_tls_metric():
    m = MailMetrics()
    m.observe({"mail_event": "relay_tls", "policy": "sts", "result": "delivered", "verified": "mta-sts", "count": 3})
    m.observe({"mail_event": "relay_tls", "policy": "tlsa", "result": "failed", "verified": "none", "count": 1})
    text = m.exposition().decode()
    assert 'mailhub_relay_tls_total{policy="sts",result="delivered",verified="mta-sts"} 3.0' in text
    assert 'mailhub_relay_tls_total{policy="tlsa",result="failed",verified="none"} 1.0' in text
