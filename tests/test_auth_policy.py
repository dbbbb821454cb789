"""
The inbound authentication check in an SMTP session (mailhub.auth.check.AuthCheck
in the end-of-data stage, tests/smtpharness.py): Authentication-Results
prepended, forged ones with our authserv-id deleted from the message on
disk (kept in memory or spilled to tmp/), mail-log fields, DMARC
enforcement (550 5.7.1 for p=reject, a header for p=quarantine, nothing
when off), temporary DNS errors (451 4.7.0 or accepted and marked), and
trusted clients (not checked, marked as ours for signing).
"""

from __future__ import annotations

from typing import Any

import pytest
from authzone import TXT, ZoneDNS
from dnszone import Zone
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mailhub.auth.check import ACCEPT, DEFER, AuthCheck, AuthSettings
from mailhub.queue import spool as spool_module
from tests.smtpharness import FOREIGN, HOST, Harness, queued_id, send_message

ZONE = {
    "pass.test": [TXT(f"v=spf1 ip4:{FOREIGN} -all")],
    "_dmarc.pass.test": [TXT("v=DMARC1; p=reject")],
    "bank.test": [TXT("v=spf1 ip4:192.0.2.1 -all")],
    "_dmarc.bank.test": [TXT("v=DMARC1; p=reject")],
    "shop.test": [TXT("v=spf1 ip4:192.0.2.1 -all")],
    "_dmarc.shop.test": [TXT("v=DMARC1; p=quarantine")],
}
FORGED = f"Authentication-Results: {HOST}; spf=pass smtp.mailfrom=ceo@bank.test; dmarc=pass\r\n".encode()
FOREIGN_AR = b"Authentication-Results: mx.elsewhere.test; spf=pass\r\n"


def run_now(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def serve(tmp_path, trusted=(), **settings: Any) -> Harness:
    h = Harness(tmp_path, trusted_networks=trusted)
    dns = ZoneDNS(task.Clock(), Zone("test", ZONE, servfail=("slow.test",)))
    check = AuthCheck(AuthSettings(HOST, **settings), dns, run_now)
    h.serve(checks=[check])
    return h


def deliver(h: Harness, sender: str, author: str, extra: bytes = b"", body: bytes = b"hello\r\n", ip: str = FOREIGN) -> str:
    c = h.connect(ip)
    c.send("EHLO client.test\r\n")
    data = extra + f"From: <{author}>\r\nSubject: s\r\n\r\n".encode() + body + b".\r\n"
    return send_message(c, data, mail=f"MAIL FROM:<{sender}>")


@pytest.fixture
def mail_log():
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_pass_gets_our_header_and_log_fields(tmp_path, mail_log):
    h = serve(tmp_path)
    qid = queued_id(deliver(h, "a@pass.test", "a@pass.test"))
    raw = h.message(qid)
    assert raw.startswith(
        f"Authentication-Results: {HOST};\r\n\tspf=pass smtp.mailfrom=a@pass.test;\r\n\tdkim=none;\r\n"
        "\tdmarc=pass (p=reject) header.from=pass.test\r\nReceived: ".encode())
    [accepted] = [e for e in mail_log if e.get("mail_event") == "accepted"]
    assert (accepted["spf"], accepted["dkim"], accepted["dmarc"]) == ("pass", "none", "pass")


@pytest.mark.parametrize("spilled", [False, True])
def test_forged_results_with_our_id_never_reach_the_spool(tmp_path, spilled):
    h = serve(tmp_path)
    body = (b"x" * 78 + b"\r\n") * (spool_module.MEMORY_LIMIT // 80 * 2) if spilled else b"hello\r\n"
    qid = queued_id(deliver(h, "ceo@bank.test", "ceo@bank.test", extra=FORGED + FOREIGN_AR, body=body))
    raw = h.message(qid)
    head = raw[: raw.index(b"\r\n\r\n") + 4]
    assert FORGED not in raw
    assert head.count(b"Authentication-Results: " + HOST.encode()) == 1
    assert b"\tspf=fail" in head and b"\tdmarc=fail (p=reject) header.from=bank.test" in head
    assert FOREIGN_AR in head  # another server's results stay
    assert raw.endswith(b"\r\n\r\n" + body)
    [envelope] = h.queued
    assert envelope.esmtp["size"] == len(raw)


def test_dmarc_reject_is_550_only_when_enforced(tmp_path):
    assert queued_id(deliver(serve(tmp_path / "a"), "ceo@bank.test", "ceo@bank.test"))
    h = serve(tmp_path / "b", dmarc_enforce=True)
    assert deliver(h, "ceo@bank.test", "ceo@bank.test") == (
        "550 5.7.1 Message rejected by the DMARC policy of bank.test\r\n")
    assert h.queued == []


def test_dmarc_quarantine_is_a_header_and_a_log_field(tmp_path, mail_log):
    h = serve(tmp_path, dmarc_enforce=True)
    raw = h.message(queued_id(deliver(h, "x@shop.test", "x@shop.test")))
    assert raw.startswith(b"X-Mailhub-Quarantine: DMARC policy quarantine of shop.test\r\n")
    [accepted] = [e for e in mail_log if e.get("mail_event") == "accepted"]
    assert accepted["quarantine"] == "dmarc"


@pytest.mark.parametrize(("mode", "expected"), [(DEFER, "451 4.7.0"), (ACCEPT, "250 2.0.0")])
def test_temporary_dns_errors_are_never_permanent(tmp_path, mode, expected):
    h = serve(tmp_path, temperror=mode, dmarc_enforce=True)
    reply = deliver(h, "a@slow.test", "a@slow.test")
    assert reply.startswith(expected)
    if mode == ACCEPT:
        assert b"\tspf=temperror" in h.message(queued_id(reply))


def test_trusted_clients_are_not_checked_but_forgeries_go(tmp_path):
    h = serve(tmp_path, trusted=("127.0.0.0/8",))
    qid = queued_id(deliver(h, "ceo@bank.test", "ceo@bank.test", extra=FORGED, ip="127.0.0.1"))
    raw = h.message(qid)
    assert raw.startswith(b"Received: ")
    assert FORGED not in raw
    [envelope] = h.queued
    assert envelope.client["relay_allowed"] is True


def test_checks_off_only_marks_trusted_mail(tmp_path):
    h = serve(tmp_path, trusted=("127.0.0.0/8",), verify=False)
    raw = h.message(queued_id(deliver(h, "ceo@bank.test", "ceo@bank.test", extra=FORGED)))
    assert FORGED in raw  # nothing is checked or removed when verify is off
    assert "relay_allowed" not in h.queued[0].client


def test_spf_fail_is_550_only_when_configured(tmp_path):
    assert queued_id(deliver(serve(tmp_path / "a"), "ceo@bank.test", "x@pass.test"))
    h = serve(tmp_path / "b", spf_reject=True)
    assert deliver(h, "ceo@bank.test", "x@pass.test") == (
        "550 5.7.23 SPF validation failed: the sender's domain does not allow this host\r\n")
    assert queued_id(deliver(h, "a@pass.test", "a@pass.test"))  # pass is accepted


def test_a_hostile_from_domain_is_not_echoed(tmp_path):
    h = serve(tmp_path, dmarc_enforce=True)
    reply = deliver(h, "ceo@bank.test", "ceo@bank.test\u00e9")
    assert reply.isascii() and len(reply) < 512
