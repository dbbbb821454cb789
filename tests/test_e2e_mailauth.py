"""
End-to-end: the real daemon as an inbound MX checking SPF, DKIM and DMARC,
its DNS a twisted.names server on 127.0.0.1 (tests/dnsserve.py) named by
C{relay.dns_servers}.  The client (127.0.0.1) is not trusted.  Two
daemons: "report" (C{mailauth.verify}: the header only) and "enforce"
(C{dmarc_enforce}, C{temperror = "defer"}).  A spoof of bank.test
(SPF C{-all}, DMARC C{p=reject}) carrying a forged Authentication-Results
with the daemon's own authserv-id reaches the mailbox of "report" with the
daemon's verdict only, and is refused by "enforce"; a message signed by a
domain that authorises 127.0.0.1 passes; the mail log line and the
metrics carry the results.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from daemon import CLEAN_EXIT, ROOT, Daemon, read_maildir, wait_for
from peers import free_port, wait_listening

from mailhub.auth import keys
from mailhub.auth.sign import sign_bytes

_HTTP = re.compile(r"listening for HTTP on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")
FORGED = "Authentication-Results: mx.local.test; spf=pass smtp.mailfrom=ceo@bank.test; dkim=pass; dmarc=pass"


def config(dns_port: int, extra: str) -> str:
    return f"""
[server]
hostname = "mx.local.test"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = []
http = ["tcp:0:interface=127.0.0.1"]

[spool]
path = "spool"
fsync = false

[local]
domains = ["local.test"]
mailboxes = "mailboxes"
users = ["alice"]

[relay]
dns_servers = ["127.0.0.1:{dns_port}"]

[mailauth]
verify = true
{extra}
"""


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    base = tmp_path_factory.mktemp("mailauth")
    keydir = str(base / "keys")
    path = keys.key_path(keydir, "good.test", "sel")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(keys.generate(keys.ED25519))
    [key] = keys.KeyStore(keydir).keys_for("good.test")
    zone = {
        "bank.test": ["v=spf1 ip4:192.0.2.1 -all"],
        "_dmarc.bank.test": ["v=DMARC1; p=reject"],
        "good.test": ["v=spf1 ip4:127.0.0.1 -all"],
        "_dmarc.good.test": ["v=DMARC1; p=reject; adkim=s"],
        "sel._domainkey.good.test": [keys.dns_record(key)],
        "slow.test": ["v=spf1 -all"],
        "_slow": ["slow.test"],  # answered after a minute
    }
    (base / "zone.json").write_text(json.dumps(zone))
    dns_port = free_port()
    queries = base / "queries.log"
    dns = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "dnsserve.py"), str(base / "zone.json"),
                            str(dns_port), str(queries)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    daemons = {}
    try:
        wait_listening(dns_port, dns, "the DNS server")
        for name, extra in [("report", "dns_timeout = 5\n"), ("enforce", 'dmarc_enforce = true\ntemperror = "defer"\n')]:
            (base / name).mkdir()
            d = Daemon(base / name, config(dns_port, extra))
            d.start()
            d.http_port = int(wait_for(lambda d=d: _HTTP.search(d.log()), 10, "the HTTP listener").group(1))
            daemons[name] = d
        yield {**daemons, "key": key, "queries": queries}
        for d in daemons.values():
            assert d.stop() == CLEAN_EXIT, d.stderr()
            assert "Traceback" not in d.log(), d.log()
    finally:
        dns.terminate()
        dns.wait(5)


def spoof(marker: str) -> bytes:
    return (f"{FORGED}\r\nFrom: The CEO <ceo@bank.test>\r\nTo: alice@local.test\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@bank.test>\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\n"
            "Please wire the money today.\r\n").encode()


def smtp(d: Daemon, sender: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        s.mail(sender)
        s.rcpt("alice@local.test")
        return s.data(data)


def in_mailbox(d: Daemon, marker: bytes) -> bytes:
    def find():
        return next((m for m in read_maildir(os.path.join(d.home, "mailboxes", "local.test", "alice")) if marker in m), None)

    return wait_for(find, 15, f"{marker!r} in alice's Maildir")  # type: ignore[return-value]


def test_spoof_reaches_the_mailbox_with_our_verdict_only(mx):
    d = mx["report"]
    code, reply = smtp(d, "ceo@bank.test", spoof("spoof-1"))
    assert code == 250
    queued = re.match(rb"2\.0\.0 .*queued as ([0-9A-Z]+)", reply)
    assert queued, reply
    qid = queued.group(1).decode()
    raw = in_mailbox(d, b"spoof-1")
    raw = raw.replace(b"\r\n", b"\n")  # the Maildir file has LF line ends
    head = raw[: raw.index(b"\n\n")].decode()
    ours = re.findall(r"^Authentication-Results: mx\.local\.test;(?:\n\t.*)*", head, re.M)
    print("\n".join(ours))
    assert ours == [
        "Authentication-Results: mx.local.test;\n"
        "\tspf=fail (SPF fail - not authorized) smtp.mailfrom=ceo@bank.test;\n"
        "\tdkim=none;\n"
        "\tdmarc=fail (p=reject) header.from=bank.test"
    ]
    assert FORGED not in head
    # this message's line: the daemon is shared with the other tests, which send the same spoof
    log = wait_for(lambda: re.search(rf"{qid}: accepted from=<ceo@bank\.test> .* spf=fail dkim=none dmarc=fail",
                                     d.log()), 10, "the accepted line")
    assert log


def test_enforcing_daemon_refuses_the_spoof(mx):
    d = mx["enforce"]
    code, text = smtp(d, "ceo@bank.test", spoof("spoof-2"))
    assert (code, text) == (550, b"5.7.1 Message rejected by the DMARC policy of bank.test")
    assert not [m for m in read_maildir(os.path.join(d.home, "mailboxes", "local.test", "alice")) if b"spoof-2" in m]


def test_signed_mail_from_an_authorised_host_passes(mx):
    d = mx["enforce"]
    raw = (b"From: Good <news@good.test>\r\nTo: alice@local.test\r\nSubject: good-1\r\n"
           b"Message-ID: <good-1@good.test>\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\nAll fine.\r\n")
    code, _ = smtp(d, "bounce@good.test", sign_bytes(raw, [mx["key"]]) + raw)
    assert code == 250
    got = in_mailbox(d, b"good-1").replace(b"\r\n", b"\n")
    assert (b"Authentication-Results: mx.local.test;\n\tspf=pass smtp.mailfrom=bounce@good.test;\n"
            b"\tdkim=pass header.d=good.test header.s=sel header.a=ed25519-sha256 header.b=") in got
    assert b"\tdmarc=pass (p=reject) header.from=good.test\n" in got


def test_metrics_count_the_results(mx):
    d = mx["report"]

    def counts() -> tuple[float, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        found = []
        for method in ("spf", "dmarc"):
            m = re.search(rf'^mailhub_auth_results_total{{method="{method}",result="fail"}} (\S+)$', text, re.M)
            found.append(float(m.group(1)) if m else 0.0)
        return found[0], found[1]

    spf, dmarc = counts()
    code, _ = smtp(d, "ceo@bank.test", spoof("spoof-metrics"))
    assert code == 250
    wait_for(lambda: counts() == (spf + 1, dmarc + 1), 10, "the spoof counted as spf=fail and dmarc=fail")


def test_a_slow_dns_answer_slows_one_message_not_the_server(mx):
    """One session's SPF query is not answered in time; another session meanwhile gets its 250."""
    d = mx["report"]
    slow: dict = {}

    def slow_session():
        data = (b"From: <a@slow.test>\r\nTo: alice@local.test\r\nSubject: slow-1\r\n"
                b"Date: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\nWaiting for DNS.\r\n")
        slow["reply"] = smtp(d, "a@slow.test", data)
        slow["done"] = time.monotonic()

    waiting = threading.Thread(target=slow_session)
    waiting.start()
    try:
        wait_for(lambda: "slow.test TXT" in mx["queries"].read_text(), 10, "the SPF query of slow.test")
        data = (b"From: <news@good.test>\r\nTo: alice@local.test\r\nSubject: meanwhile\r\n"
                b"Date: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\nNot waiting.\r\n")
        code, _ = smtp(d, "bounce@good.test", data)
        meanwhile = time.monotonic()
        assert code == 250
        assert "done" not in slow  # the other session still waits for its DNS answer
    finally:
        waiting.join(30)
    assert slow["reply"][0] == 250 and slow["done"] > meanwhile
    raw = in_mailbox(d, b"slow-1").replace(b"\r\n", b"\n")
    assert b"\n\tspf=temperror" in raw
