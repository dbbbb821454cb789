"""
SPF, DKIM and DMARC of inbound mail (mailhub.auth.check.evaluate) against a
twisted.names zone (tests/dnszone.py) answered through
L{mailhub.auth.dns.AuthDNS}: every SPF result, include/redirect and the
lookup limit; DKIM valid, revoked, wrong body hash, expired x=, missing
key, temporary failure, RSA and Ed25519; DMARC none/quarantine/reject, sp=
for a subdomain, strict and relaxed alignment.  Also the AuthDNS cache and
the Authentication-Results field.
"""

from __future__ import annotations

import base64
import os
import time

import dkim
import pytest
from authzone import TXT, ZoneDNS
from dkim.crypto import parse_pem_private_key
from dnszone import A, Zone
from twisted.internet import task

from mailhub.auth import keys
from mailhub.auth.check import evaluate
from mailhub.auth.dns import AuthDNS, DNSTempError
from mailhub.auth.results import authserv_id, results_field, strip_ours
from mailhub.auth.sign import sign_bytes

CLIENT = "192.0.2.10"


def make_key(tmp_path, domain: str, selector: str, kind: str) -> keys.DKIMKey:
    path = keys.key_path(str(tmp_path), domain, selector)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(keys.generate(kind))
    return keys.load_key(path, domain, selector)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    k = {
        "rsa": make_key(tmp, "signed.test", "rsa", keys.RSA),
        "ed": make_key(tmp, "signed.test", "ed", keys.ED25519),
        "revoked": make_key(tmp, "signed.test", "revoked", keys.RSA),
        "nokey": make_key(tmp, "signed.test", "nokey", keys.RSA),
        "strict": make_key(tmp, "strict.test", "s", keys.RSA),
        "other": make_key(tmp, "other.test", "o", keys.RSA),
    }
    records = {
        # SPF
        "pass.test": [TXT(f"v=spf1 ip4:{CLIENT} -all")],
        "fail.test": [TXT("v=spf1 ip4:198.51.100.1 -all")],
        "softfail.test": [TXT("v=spf1 ~all")],
        "neutral.test": [TXT("v=spf1 ?all")],
        "permerror.test": [TXT("v=spf1 ip4:300.1.1.1 -all")],
        "include.test": [TXT("v=spf1 include:pass.test -all")],
        "redirect.test": [TXT("v=spf1 redirect=pass.test")],
        "amech.test": [TXT("v=spf1 a -all"), A(CLIENT)],
        "toomany.test": [TXT("v=spf1 " + " ".join(f"include:l{i}.test" for i in range(11)) + " -all")],
        "helo.test": [TXT(f"v=spf1 ip4:{CLIENT} -all")],
        # DKIM keys
        "rsa._domainkey.signed.test": [TXT(keys.dns_record(k["rsa"]))],
        "ed._domainkey.signed.test": [TXT(keys.dns_record(k["ed"]))],
        "revoked._domainkey.signed.test": [TXT("v=DKIM1; k=rsa; p=")],
        "s._domainkey.strict.test": [TXT(keys.dns_record(k["strict"]))],
        "o._domainkey.other.test": [TXT(keys.dns_record(k["other"]))],
        # DMARC
        "_dmarc.signed.test": [TXT("v=DMARC1; p=reject")],
        "_dmarc.pass.test": [TXT("v=DMARC1; p=none")],
        "_dmarc.fail.test": [TXT("v=DMARC1; p=quarantine")],
        "_dmarc.softfail.test": [TXT("v=DMARC1; p=reject; sp=quarantine")],
        "_dmarc.strict.test": [TXT("v=DMARC1; p=reject; adkim=s; aspf=s")],
        "_dmarc.bad.test": [TXT("v=DMARC1; p=maybe")],
        "_dmarc.two.test": [TXT("v=DMARC1; p=reject"), TXT("v=DMARC1; p=none")],
    }
    for i in range(11):
        records[f"l{i}.test"] = [TXT("v=spf1 a:x.test -all")]
    zone = Zone("test", records, servfail=("slow.test", "_dmarc.slow.test", "sel._domainkey.slow.test"))
    clock = task.Clock()
    return {"keys": k, "dns": ZoneDNS(clock, zone), "zone": zone, "clock": clock}


def message(sender_domain: str = "signed.test", body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"Received: from client.test by mx.local.test; Sun, 6 Dec 2026 10:00:00 +0000\r\n"
        + extra
        + f"From: Someone <someone@{sender_domain}>\r\n".encode()
        + b"To: user@local.test\r\nSubject: test\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n"
        + b"Message-ID: <m1@x.test>\r\n\r\n"
        + body
    )


def signed(raw: bytes, *ks: keys.DKIMKey) -> bytes:
    return sign_bytes(raw, list(ks)) + raw


# -- SPF ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("a@pass.test", "pass"),
        ("a@fail.test", "fail"),
        ("a@softfail.test", "softfail"),
        ("a@neutral.test", "neutral"),
        ("a@nothing.test", "none"),
        ("a@permerror.test", "permerror"),
        ("a@include.test", "pass"),
        ("a@redirect.test", "pass"),
        ("a@amech.test", "pass"),
        ("a@toomany.test", "permerror"),
        ("a@slow.test", "temperror"),
    ],
)
def test_spf_results(world, sender, expected):
    v = evaluate(world["dns"], message("x.test"), CLIENT, sender, "client.test")
    assert (v.spf.result, v.spf.identity, v.spf.domain) == (expected, "mailfrom", sender.split("@")[1])


def test_spf_of_the_null_sender_is_the_helo_name(world):
    v = evaluate(world["dns"], message("x.test"), CLIENT, "", "helo.test")
    assert (v.spf.result, v.spf.identity, v.spf.value) == ("pass", "helo", "helo.test")


def test_spf_too_many_lookups_says_why(world):
    v = evaluate(world["dns"], message("x.test"), CLIENT, "a@toomany.test", "h.test")
    assert "10" in v.spf.reason or "limit" in v.spf.reason.lower()


# -- DKIM -------------------------------------------------------------------------


def test_dkim_rsa_and_ed25519_pass(world):
    k = world["keys"]
    v = evaluate(world["dns"], signed(message(), k["rsa"], k["ed"]), CLIENT, "a@x.test", "h.test")
    assert [(r.result, r.selector, r.algorithm) for r in v.dkim] == [
        ("pass", "rsa", "rsa-sha256"), ("pass", "ed", "ed25519-sha256")]
    assert v.dkim_summary == "pass"
    assert (v.dmarc.result, v.dmarc.policy) == ("pass", "reject")


def test_dkim_wrong_body_hash_fails(world):
    raw = signed(message(), world["keys"]["rsa"]).replace(b"Hello.", b"Hello!")
    v = evaluate(world["dns"], raw, CLIENT, "a@x.test", "h.test")
    assert v.dkim[0].result == "fail"
    assert "body hash" in v.dkim[0].reason


def test_dkim_header_change_fails(world):
    raw = signed(message(), world["keys"]["rsa"]).replace(b"Subject: test", b"Subject: pay now")
    v = evaluate(world["dns"], raw, CLIENT, "a@x.test", "h.test")
    assert v.dkim[0].result == "fail"


def test_dkim_revoked_key_fails(world):
    v = evaluate(world["dns"], signed(message(), world["keys"]["revoked"]), CLIENT, "a@x.test", "h.test")
    assert (v.dkim[0].result, v.dkim[0].reason) == ("fail", "key revoked")
    assert v.dmarc.result == "fail"


def test_dkim_missing_key_is_permerror(world):
    v = evaluate(world["dns"], signed(message(), world["keys"]["nokey"]), CLIENT, "a@x.test", "h.test")
    assert (v.dkim[0].result, v.dkim[0].reason) == ("permerror", "no key record")


def test_dkim_expired_signature_fails(world):
    key = world["keys"]["rsa"]
    raw = message()
    d = dkim.DKIM(raw)
    old = int(time.time()) - 3 * 86400  # dkimpy allows 10 hours of clock skew
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"from"]
    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bh = base64.b64encode(dkim.HASH_ALGORITHMS[b"rsa-sha256"](canon.canonicalize_body(d.body)).digest())
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"), (b"d", b"signed.test"),
              (b"s", b"rsa"), (b"t", str(old).encode()), (b"x", str(old + 60).encode()),
              (b"h", b":".join(include)), (b"bh", bh), (b"b", b"0" * 60)]
    d.signature_algorithm = b"rsa-sha256"
    d.hasher = dkim.HASH_ALGORITHMS[b"rsa-sha256"]
    header = b"DKIM-Signature: " + d.gen_header(fields, include, canon, b"DKIM-Signature",
                                                parse_pem_private_key(key.private))
    v = evaluate(world["dns"], header + raw, CLIENT, "a@x.test", "h.test")
    assert v.dkim[0].result == "fail"
    assert "expired" in v.dkim[0].reason


def test_dkim_key_lookup_failure_is_temperror(world):
    sig = sign_bytes(message(), [world["keys"]["rsa"]]).replace(b"signed.test", b"slow.test").replace(b"s=rsa;", b"s=sel;")
    raw = sig + message()
    v = evaluate(world["dns"], raw, CLIENT, "a@x.test", "h.test")
    assert v.dkim[0].result == "temperror"


def test_no_signature_is_none(world):
    v = evaluate(world["dns"], message(), CLIENT, "a@x.test", "h.test")
    assert [r.result for r in v.dkim] == ["none"]


# -- DMARC ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_domain", "sender", "key", "expected"),
    [
        ("signed.test", "a@x.test", "rsa", ("pass", "reject")),  # DKIM aligned
        ("signed.test", "a@x.test", "other", ("fail", "reject")),  # DKIM of another domain
        ("pass.test", "a@pass.test", None, ("pass", "none")),  # SPF aligned
        ("pass.test", "a@include.test", None, ("fail", "none")),  # SPF passed, not aligned
        ("fail.test", "a@fail.test", None, ("fail", "quarantine")),
        ("softfail.test", "a@softfail.test", None, ("fail", "reject")),
        ("sub.softfail.test", "a@softfail.test", None, ("fail", "quarantine")),  # sp= for a subdomain
        ("nothing.test", "a@nothing.test", None, ("none", "")),
        ("bad.test", "a@x.test", None, ("permerror", "")),
        ("two.test", "a@x.test", None, ("none", "")),  # two records: no policy
        ("slow.test", "a@x.test", None, ("temperror", "")),
    ],
)
def test_dmarc_policies(world, from_domain, sender, key, expected):
    raw = message(from_domain)
    if key:
        raw = signed(raw, world["keys"][key])
    v = evaluate(world["dns"], raw, CLIENT, sender, "h.test")
    assert (v.dmarc.result, v.dmarc.policy) == expected
    assert v.dmarc.from_domain == from_domain


def test_dmarc_relaxed_alignment_accepts_a_subdomain(world):
    # From: sub.signed.test, signature d=signed.test: relaxed (p=reject at the organizational domain)
    raw = signed(message("signed.test"), world["keys"]["rsa"]).replace(
        b"someone@signed.test", b"someone@news.signed.test")
    raw = sign_bytes(message("news.signed.test"), [world["keys"]["rsa"]]) + message("news.signed.test")
    v = evaluate(world["dns"], raw, CLIENT, "a@x.test", "h.test")
    assert (v.dmarc.result, v.dmarc.policy) == ("pass", "reject")


def test_dmarc_strict_alignment_refuses_a_subdomain(world):
    raw = sign_bytes(message("news.strict.test"), [world["keys"]["strict"]]) + message("news.strict.test")
    v = evaluate(world["dns"], raw, CLIENT, "a@strict.test", "h.test")
    assert v.dkim[0].result == "pass"
    assert (v.dmarc.result, v.dmarc.policy) == ("fail", "reject")
    same = sign_bytes(message("strict.test"), [world["keys"]["strict"]]) + message("strict.test")
    assert evaluate(world["dns"], same, CLIENT, "a@x.test", "h.test").dmarc.result == "pass"


def test_dmarc_two_from_addresses_is_permerror(world):
    raw = message("signed.test", extra=b"From: other@other.test\r\n")
    assert evaluate(world["dns"], raw, CLIENT, "a@x.test", "h.test").dmarc.result == "permerror"


# -- DNS cache ----------------------------------------------------------------------------


def test_answers_are_cached_for_their_ttl(world):
    zone = Zone("test", {"ttl.test": [TXT("v=spf1 -all", ttl=30)]})
    clock = task.Clock()
    d = ZoneDNS(clock, zone)
    for _ in range(3):
        assert d.blocking("ttl.test", "TXT")[0][2] == [b"v=spf1 -all"]
    assert d.queries == 1
    clock.advance(31)
    d.blocking("ttl.test", "TXT")
    assert d.queries == 2


def test_temporary_failures_are_not_cached(world):
    zone = Zone("test", {}, servfail=("down.test",))
    d = ZoneDNS(task.Clock(), zone)
    for _ in range(2):
        with pytest.raises(DNSTempError):
            d.blocking("down.test", "TXT")
    assert d.queries == 2


def test_a_query_that_does_not_answer_times_out():
    from twisted.internet import defer

    class Silent:
        def query(self, q, timeout=None):
            return defer.Deferred()

    clock = task.Clock()
    d = AuthDNS(clock, Silent(), timeout=5)
    got: list = []
    d.lookup("slow.test", "TXT").addErrback(got.append)
    clock.advance(4.9)
    assert got == []
    clock.advance(0.2)
    assert got and got[0].check(DNSTempError)


# -- Authentication-Results ------------------------------------------------------------------


def test_results_field_names_every_result(world):
    k = world["keys"]
    v = evaluate(world["dns"], signed(message(), k["rsa"]), CLIENT, "a@pass.test", "h.test")
    field = results_field("mx.local.test", v.spf, v.dkim, v.dmarc).decode()
    assert field.startswith("Authentication-Results: mx.local.test;\r\n\tspf=pass smtp.mailfrom=a@pass.test;\r\n")
    assert "\tdkim=pass header.d=signed.test header.s=rsa header.a=rsa-sha256 header.b=" in field
    assert field.endswith("\tdmarc=pass (p=reject) header.from=signed.test\r\n")
    assert authserv_id(field.split(":", 1)[1].encode()) == "mx.local.test"


@pytest.mark.parametrize(
    "forged",
    [
        b"Authentication-Results: mx.local.test; dkim=pass\r\n",
        b"authentication-results:MX.LOCAL.TEST.;spf=pass\r\n",
        b"Authentication-Results: (comment) mx.local.test (x);\r\n\tdmarc=pass\r\n",
        b"Authentication-Results: mx.local.test 1; dkim=pass\r\n",
    ],
)
def test_strip_ours_removes_fields_with_our_authserv_id(forged):
    other = b"Authentication-Results: mx.elsewhere.test; spf=pass\r\n"
    header = b"Received: x\r\n" + forged + other + b"Subject: s\r\n\r\n"
    clean, removed = strip_ours(header, "mx.local.test")
    assert removed == 1
    assert clean == b"Received: x\r\n" + other + b"Subject: s\r\n\r\n"


def test_strip_ours_keeps_a_clean_header():
    header = b"Received: x\r\nSubject: mx.local.test\r\n\r\n"
    assert strip_ours(header, "mx.local.test") == (header, 0)


def test_a_name_dns_cannot_hold_is_an_empty_answer(world):
    assert world["dns"].blocking("\u00e9" * 70 + ".test", "TXT") == []
    raw = message("x.test").replace(b"someone@x.test", "someone@\u00e9\u00e9.\u00e9-".encode())
    v = evaluate(world["dns"], raw, CLIENT, "a@x.test", "h.test")
    assert v.dmarc.result in ("none", "permerror")
