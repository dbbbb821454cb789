"""
End to end through the real daemon (C{twistd -n mailhub}): outbound TLS
policies when relaying to a real receiver.

Daemon "A" (trusts loopback) relays to daemon "B", which offers STARTTLS
with a certificate from a test CA for mx.dane.test, mx.bad.test and
mx.sts.test.  A's resolver is a twisted.names server on 127.0.0.1 playing
a local validating resolver (AD bit on dane.test and bad.test).  Routes
written C{domain:port} make A look up the domain's MX records (as for any
recipient domain) and connect on B's port.

- dane.test: TLSA 3 1 1 of B's key -> delivered, logged C{verified=dane};
- bad.test: TLSA of another key -> deferred 4.7.5, never sent;
- sts.test: an MTA-STS enforce policy in A's cache (written before the
  start: a restart), its TXT lookup failing -> the cached policy rules:
  delivered, C{verified=mta-sts};
- away.test: a cached enforce policy naming other MX hosts -> deferred,
  no connection;
- then C{mailhub tls report} prints the day's RFC 8460 report and
  C{mailhub tls check} what A would do for dane.test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import in_reactor
from daemon import CLEAN_EXIT, ROOT, Daemon, read_maildir, send, wait_for
from daemon import message as _message
from dnszone import MX, TLSA, A, ValidatingServerFactory, Zone
from peers import free_port
from tlspeers import PKI, spki_sha256
from twisted.names import dns

from mailhub.queue.spool import Spool


def config(hostname: str, smtp: str, trusted: str, domains: str, extra: str) -> str:
    return f"""
[server]
hostname = "{hostname}"
smtp = ["{smtp}"]
trusted_networks = {trusted}
{extra}

[spool]
path = "spool"
fsync = false

[local]
domains = {domains}
mailboxes = "mailboxes"
users = ["carol"]

[relay]
min_backoff = 600
max_backoff = 600
connect_timeout = 5
command_timeout = 20
greeting_timeout = 20
"""


def cached_policy(directory, domain: str, mx: list[str]) -> None:
    os.makedirs(directory, exist_ok=True)
    now = time.time()
    entry = {"domain": domain, "id": "1", "fetched": now, "checked": now - 2 * 86400,
             "policy": {"mode": "enforce", "mx": mx, "max_age": 604800}}
    with open(os.path.join(directory, f"{domain}.json"), "w") as f:
        json.dump(entry, f)


@pytest.fixture(scope="module")
def net(reactor, tmp_path_factory):
    base = tmp_path_factory.mktemp("daemontls")
    pki = PKI(base)
    cert, _ = pki.issue("mx.dane.test", "mx.bad.test", "mx.sts.test", "mx.away.test")
    key_pem = None
    # B's certificate and key files (the chain with the CA, for completeness)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki._leaf(["mx.dane.test", "mx.bad.test", "mx.sts.test", "mx.away.test"], pki.key, pki.cert.subject, key)
    (base / "b.crt").write_bytes(pki.pem(cert) + pki.pem(pki.cert))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (base / "b.key").write_bytes(key_pem)
    os.chmod(base / "b.key", 0o600)

    b_port = free_port()
    zone = Zone("test", {
        "dane.test": [MX(10, "mx.dane.test")], "mx.dane.test": [A("127.0.0.1")],
        f"_{b_port}._tcp.mx.dane.test": [TLSA(3, 1, 1, spki_sha256(cert))],
        "bad.test": [MX(10, "mx.bad.test")], "mx.bad.test": [A("127.0.0.1")],
        f"_{b_port}._tcp.mx.bad.test": [TLSA(3, 1, 1, b"\x01" * 32)],
        "sts.test": [MX(10, "mx.sts.test")], "mx.sts.test": [A("127.0.0.1")],
        "away.test": [MX(10, "mx.away.test")], "mx.away.test": [A("127.0.0.1")],
    }, servfail=("_mta-sts.sts.test", "_mta-sts.away.test"), failure=RuntimeError)  # RuntimeError: SERVFAIL

    def start_dns():
        factory = ValidatingServerFactory([zone], secure=("dane.test", "bad.test"))
        return reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")

    dns_port = in_reactor(reactor, start_dns)
    homes = {n: base / n for n in "AB"}
    for h in homes.values():
        h.mkdir()
    b = Daemon(homes["B"], config(
        "mx.dane.test", f"tcp:{b_port}:interface=127.0.0.1", "[]",
        '["dane.test", "bad.test", "sts.test", "away.test"]',
        f'tls_cert = "{base}/b.crt"\ntls_key = "{base}/b.key"'))
    routes = "\n".join(f'"{d}" = "{d}:{b_port}"' for d in ("dane.test", "bad.test", "sts.test", "away.test"))
    state = homes["A"] / "tlsstate"
    cached_policy(state / "mta-sts", "sts.test", ["mx.sts.test"])
    cached_policy(state / "mta-sts", "away.test", ["*.elsewhere.test"])
    a = Daemon(homes["A"], config("mx.example.test", "tcp:0:interface=127.0.0.1", '["127.0.0.0/8"]',
                                  '["example.test"]', "") + f"""dns_servers = ["127.0.0.1:{dns_port.getHost().port}"]
tls_ca_file = "{pki.ca_file}"
tls_state = "tlsstate"

[relay.routes]
{routes}
""")
    started = []
    try:
        for d in (b, a):
            d.start()
            started.append(d)
        yield {"A": a, "B": b}
    finally:
        for d in started:
            assert d.stop() == CLEAN_EXIT, d.stderr()
        in_reactor(reactor, dns_port.stopListening)
    for d in started:
        assert "Traceback" not in d.log(), d.log()


def in_box(b: Daemon, domain: str, msgid: str):
    box = os.path.join(b.home, "mailboxes", domain, "carol")
    return next((raw for raw in read_maildir(box) if f"<{msgid}@client.test>".encode() in raw), None)


def log_line(d: Daemon, qid: str, needle: str) -> str:
    def find():
        return next((line for line in d.log().splitlines() if qid in line and needle in line), None)

    return wait_for(find, 20, f"a log line of {qid} with {needle!r}")


def connections(b: Daemon) -> int:
    """The connections B accepted: its "connect from" lines (a "disconnect from" line of an earlier test's
    session may still be written after the count is taken)."""
    return len(re.findall(r"(?<!dis)connect from \[", b.log()))


def test_dane_match_delivers_and_the_log_says_how(net):
    a, b = net["A"], net["B"]
    qid = send(a, "carol@dane.test", _message("carol@dane.test", "d1", topic="tls"))
    wait_for(lambda: in_box(b, "dane.test", "d1"), 20, "d1 in carol's Maildir on B")
    line = log_line(a, qid, "status=sent")
    assert " tls=TLSv1.3 " in line and " cipher=TLS_" in line and " verified=dane" in line, line


def test_dane_mismatch_defers_and_sends_nothing(net):
    a, b = net["A"], net["B"]
    qid = send(a, "carol@bad.test", _message("carol@bad.test", "d2", topic="tls"))
    line = log_line(a, qid, "status=deferred")
    assert "dsn=4.7.5" in line and "does not match its TLSA records" in line, line
    assert in_box(b, "bad.test", "d2") is None
    wait_for(lambda: Spool(a.spool).load(qid).recipients[0].last_status == "4.7.5", 20,
             "the deferral in the envelope")  # written after the log line


def test_cached_mta_sts_policy_rules_after_a_restart_when_txt_fails(net):
    a, b = net["A"], net["B"]
    qid = send(a, "carol@sts.test", _message("carol@sts.test", "d3", topic="tls"))
    wait_for(lambda: in_box(b, "sts.test", "d3"), 20, "d3 in carol's Maildir on B")
    assert " verified=mta-sts" in log_line(a, qid, "status=sent")


def test_cached_mta_sts_policy_keeps_mail_from_an_mx_outside_it(net):
    a = net["A"]
    before = connections(net["B"])
    qid = send(a, "carol@away.test", _message("carol@away.test", "d4", topic="tls"))
    line = log_line(a, qid, "status=deferred")
    assert "dsn=4.7.5" in line and "does not match the MTA-STS policy of away.test" in line, line
    assert connections(net["B"]) == before


def mailhub(a: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailhub.cli.main", "--config", a.conf, *args], cwd=a.home,
                          env={**a.env(), "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)


def test_tls_report_and_check_commands(net):
    a = net["A"]
    qid = send(a, "carol@dane.test", _message("carol@dane.test", "d5", topic="tls"))
    log_line(a, qid, "status=sent")
    a.stop()  # the counts are written when the daemon stops (and every minute)
    a.start()
    r = mailhub(a, "tls", "report", "dane.test")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "tlsa"
    assert policy["policy"]["policy-string"][0].startswith("3 1 1 ")
    assert policy["summary"]["total-successful-session-count"] >= 1
    assert report["date-range"]["start-datetime"].endswith("T00:00:00Z")
    r = mailhub(a, "tls", "report", "nothing.test")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith("mailhub: tls report: no TLS sessions with nothing.test recorded")
    r = mailhub(a, "tls", "check", "dane.test")
    assert r.returncode == 0, r.stderr
    assert "MX records DNSSEC-secure" in r.stdout
    assert "source=dane" in r.stdout and "tlsa 3 1 1 " in r.stdout
    r = mailhub(a, "tls", "check", "away.test")
    assert r.returncode == 0, r.stderr
    assert "mta-sts: mode=enforce" in r.stdout and "REFUSED: MX host mx.away.test" in r.stdout
    r = mailhub(a, "tls", "check", "bad domain!")
    assert r.returncode == 64 and r.stderr.startswith("mailhub: tls: bad domain") and "Traceback" not in r.stderr
