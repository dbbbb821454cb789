"""
DKIM signing (mailhub.auth.sign, mailhub.auth.keys) and how the relay sends
the signatures (mailhub.relay.prepare): which mail is ours, the keys of a
domain and of its parent, both signatures of a domain with an RSA and an
Ed25519 key, signing once (a retry sends the same bytes), the signature
of the 7-bit form for a peer without 8BITMIME, a key that cannot be read
(4.7.0, nothing sent), and the envelope field that keeps them.
"""

from __future__ import annotations

import os

import dkim
import pytest
from twisted.internet import defer

from mailhub.auth import keys
from mailhub.auth.sign import Signer, SigningDelivery, is_ours
from mailhub.envelope import Envelope, EnvelopeFormatError, Outcome, Recipient
from mailhub.queue.queuefile import open_message, queue_file_bytes
from mailhub.relay.downgrade import downgrade
from mailhub.relay.prepare import Prepared, prepare

ASCII = (b"Received: from a by b; Sun, 6 Dec 2026 10:00:00 +0000\r\nFrom: Alice <alice@example.test>\r\n"
         b"To: bob@remote.test\r\nSubject: hi\r\nMessage-ID: <1@example.test>\r\n\r\nHello.\r\n")
EIGHTBIT = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: caf\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCaf\xc3\xa9.\r\n")


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def keydir(tmp_path):
    base = tmp_path / "keys"
    for domain, selector, kind in [("example.test", "r", keys.RSA), ("example.test", "e", keys.ED25519)]:
        path = keys.key_path(str(base), domain, selector)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(keys.generate(kind))
    return str(base)


def records(keydir: str) -> dict[bytes, bytes]:
    store = keys.KeyStore(keydir)
    return {f"{k.record_name}.".encode(): keys.dns_record(k).encode() for k in store.keys_for("example.test")}


def verify_all(raw: bytes, txt: dict[bytes, bytes]) -> list[bool]:
    d = dkim.DKIM(raw)
    n = sum(1 for k, _v in d.headers if k.lower() == b"dkim-signature")

    def one(i: int) -> bool:
        try:
            return bool(d.verify(idx=i, dnsfunc=lambda name, timeout=5: txt.get(name)))
        except dkim.DKIMException:
            return False

    return [one(i) for i in range(n)]


def queued(tmp_path, raw: bytes, client: dict, name: str = "m") -> tuple[Envelope, str]:
    env = Envelope("Q1", "alice@example.test", [Recipient("bob@remote.test")], 1.0, client=client)
    path = tmp_path / name
    path.write_bytes(queue_file_bytes(raw, env))
    return env, str(path)


@pytest.mark.parametrize(
    ("client", "ours"),
    [
        ({"protocol": "ESMTPSA", "user": "alice@example.test", "addr": "203.0.113.5"}, True),
        ({"protocol": "ESMTP", "user": "", "addr": "10.0.0.5", "relay_allowed": True}, True),
        ({"protocol": "local", "user": "alice", "pickup": "x"}, True),
        ({"protocol": "HTTP", "user": "alice@example.test"}, True),
        ({"protocol": "dsn", "bounce_of": "Q0"}, True),
        ({"protocol": "ESMTP", "user": "", "addr": "203.0.113.5"}, False),
    ],
)
def test_only_our_mail_is_signed(client, ours):
    assert is_ours(Envelope("Q", "", [Recipient("a@b.test")], 1.0, client=client)) is ours


class Remote:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def deliver(self, envelope, recipients, path, report):
        with open_message(path) as f:
            p = prepare(f, envelope, recipients, {"8BITMIME": ""}, "peer")
            assert isinstance(p, Prepared)
            self.sent.append(p.body.read())
        return defer.succeed([Outcome.temporary(r.address, "try later", 451, "4.0.0") for r in recipients])


def test_rsa_and_ed25519_signatures_verify_and_a_retry_sends_the_same_bytes(tmp_path, keydir):
    env, path = queued(tmp_path, ASCII, {"protocol": "ESMTPA", "user": "alice@example.test"})
    remote = Remote()
    runs: list = []

    def counted(f, *args):
        runs.append(f)
        return run_now(f, *args)

    agent = SigningDelivery(remote, Signer(keys.KeyStore(keydir), counted))
    for _ in range(2):
        agent.deliver(env, env.recipients, path, lambda outcomes: None)
    assert len(runs) == 1  # signed at the first attempt only
    assert set(env.dkim) == {"original"}  # a 7-bit message has one form
    assert remote.sent[0] == remote.sent[1]
    assert remote.sent[0].startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.test;")
    assert remote.sent[0].endswith(ASCII)
    assert verify_all(remote.sent[0], records(keydir)) == [True, True]
    # the signatures outlive a restart: they are in the envelope's JSON
    again = Envelope.from_json(env.to_json())
    assert again.dkim == env.dkim


def test_mail_of_others_and_domains_without_keys_leave_unsigned(tmp_path, keydir):
    agent = SigningDelivery(Remote(), Signer(keys.KeyStore(keydir), run_now))
    env, path = queued(tmp_path, ASCII, {"protocol": "ESMTP", "user": "", "addr": "203.0.113.5"})
    agent.deliver(env, env.recipients, path, lambda outcomes: None)
    assert env.dkim == {}
    other = ASCII.replace(b"alice@example.test", b"alice@elsewhere.test")
    env, path = queued(tmp_path, other, {"protocol": "local", "user": "alice"}, "m2")
    agent.deliver(env, env.recipients, path, lambda outcomes: None)
    assert env.dkim == {}
    assert b'"dkim"' not in env.to_json()  # an envelope without signatures is written as before


def test_8bit_message_has_a_signature_for_its_7bit_form(tmp_path, keydir):
    env, path = queued(tmp_path, EIGHTBIT, {"protocol": "HTTP", "user": "alice@example.test"})
    signer = Signer(keys.KeyStore(keydir), run_now)
    defer.ensureDeferred(signer.ensure(env, path))
    assert set(env.dkim) == {"original", "7bit"}
    txt = records(keydir)
    with open_message(path) as f:
        p7 = prepare(f, env, env.recipients, {}, "old-peer")  # no 8BITMIME: converted
        assert isinstance(p7, Prepared)
        sent7 = p7.body.read()
    assert sent7.endswith(downgrade(EIGHTBIT)) and sent7.isascii()
    assert p7.size == len(sent7)
    assert verify_all(sent7, txt) == [True, True]
    with open_message(path) as f:
        p8 = prepare(f, env, env.recipients, {"8BITMIME": ""}, "new-peer")
        assert isinstance(p8, Prepared)
        sent8 = p8.body.read()
    assert sent8.endswith(EIGHTBIT)
    assert verify_all(sent8, txt) == [True, True]
    # the signature of one form does not verify the other
    swapped = sent8[: len(sent8) - len(EIGHTBIT)] + downgrade(EIGHTBIT)
    assert verify_all(swapped, txt) == [False, False]


def test_a_key_that_cannot_be_read_defers_and_sends_nothing(tmp_path, keydir):
    with open(keys.key_path(keydir, "example.test", "r"), "wb") as f:
        f.write(b"not a key")
    remote = Remote()
    env, path = queued(tmp_path, ASCII, {"protocol": "local", "user": "alice"})
    got: list = []
    reported: list = []
    SigningDelivery(remote, Signer(keys.KeyStore(keydir), run_now)).deliver(
        env, env.recipients, path, reported.extend).addCallback(got.append)
    [[outcome]] = got
    assert (outcome.kind, outcome.status) == ("temporary", "4.7.0")
    assert "not an unencrypted PEM private key" in outcome.text
    assert reported == [outcome] and remote.sent == [] and env.dkim == {}


def test_subdomains_use_the_parents_keys_when_configured(keydir):
    assert keys.KeyStore(keydir).keys_for("news.example.test") == []
    found = keys.KeyStore(keydir, sign_subdomains=True).keys_for("news.example.test")
    assert sorted(k.selector for k in found) == ["e", "r"] and {k.domain for k in found} == {"example.test"}
    assert keys.KeyStore(keydir, sign_subdomains=True).keys_for("test") == []  # never a bare TLD


def test_a_changed_key_file_is_read_again(keydir):
    store = keys.KeyStore(keydir)
    before = {k.selector: k.public for k in store.keys_for("example.test")}
    path = keys.key_path(keydir, "example.test", "r")
    with open(path, "wb") as f:
        f.write(keys.generate(keys.RSA))
    os.utime(path, (1, 1))
    after = {k.selector: k.public for k in store.keys_for("example.test")}
    assert after["r"] != before["r"] and after["e"] == before["e"]


@pytest.mark.parametrize("value", [{"original": 5}, {"other": "x"}, {"original": "caf\u00e9"}, []])
def test_envelope_rejects_bad_signature_fields(value):
    env = Envelope("Q", "a@b.test", [Recipient("c@d.test")], 1.0, dkim={"original": "DKIM-Signature: x\r\n"})
    data = env.to_json().replace(b'{"original": "DKIM-Signature: x\\r\\n"}', __import__("json").dumps(value).encode())
    with pytest.raises(EnvelopeFormatError, match="dkim"):
        Envelope.from_json(data)


def test_compare_record_says_why():
    store_key = keys.DKIMKey("example.test", "s", keys.RSA, b"", "QUJD", "/k")
    assert keys.compare_record(store_key, [b"v=DKIM1; k=rsa; p=QUJD"]) is None
    assert "no TXT record" in keys.compare_record(store_key, [])
    assert "revoked" in keys.compare_record(store_key, [b"v=DKIM1; k=rsa; p="])
    assert "another public key" in keys.compare_record(store_key, [b"v=DKIM1; k=rsa; p=WFla"])
    assert "k=ed25519" in keys.compare_record(store_key, [b"v=DKIM1; k=ed25519; p=QUJD"])
    assert "2 TXT records" in keys.compare_record(store_key, [b"a", b"b"])
