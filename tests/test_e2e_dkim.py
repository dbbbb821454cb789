"""
End-to-end: DKIM signing by the real daemon, verified by OpenDKIM.

Keys are made with C{mailhub dkim keygen} (RSA and Ed25519 for
example.test); the zone the verifier asks is built from the records the
command printed.  The daemon relays to Postfix's smtp-sink with
C{relay.routes}: C{sink.test} (8BITMIME offered), C{old.test} (smtp-sink
C{-8}: no 8BITMIME, so 8-bit mail is converted), C{reject.test} (every
RCPT refused, so a remote sender gets a bounce).  Mail enters by SMTP from
the trusted network, by C{mailhub-sendmail}, by the HTTP API; the bounce is
mailhub's own, From MAILER-DAEMON@mx.example.test (signed with the parent
domain's keys: C{dkim.sign_subdomains}).  Every message smtp-sink received
is checked with C{opendkim-testmsg}, once with only its RSA signature and
once with only its Ed25519 signature (tests/dkimtools.py), and once with
C{opendkim -t} against a key file.  C{mailhub dkim check} is run against a
twisted.names server on loopback.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys

import pytest
from daemon import CLEAN_EXIT, Daemon, wait_for
from dkimtools import crlf, only_signatures, opendkim_test, run_testmsg, zone_from_keygen
from peers import Sink, free_port, sink_message, wait_listening

_HTTP = re.compile(r"listening for HTTP on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")


def config(routes: dict[str, str], dns_port: int) -> str:
    """Trusted: 127.0.0.1 only (a client at 127.0.0.2 is someone else)."""
    table = "\n".join(f'"{k}" = "{v}"' for k, v in routes.items())
    return f"""
[server]
hostname = "mx.example.test"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = ["127.0.0.1/32"]
http = ["tcp:0:interface=127.0.0.1"]

[spool]
path = "spool"
fsync = false

[local]
domains = ["example.test"]
mailboxes = "mailboxes"
users = ["alice"]
aliases = "aliases"

[auth]
users = "users"

[dkim]
keys = "dkim"
sign_subdomains = true

[relay]
min_backoff = 1
max_backoff = 2
connect_timeout = 5
dns_servers = ["127.0.0.1:{dns_port}"]

[relay.routes]
{table}
"""


def mailhub(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailhub.cli.main", "--config", d.conf, *args],
                          cwd=d.home, env=d.env(), input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    base = tmp_path_factory.mktemp("dkim")
    sink = Sink(base / "sink", free_port())
    old = Sink(base / "old", free_port(), "-8")
    reject = Sink(base / "reject", free_port(), "-f", "RCPT")
    dns_port = free_port()
    later_port = free_port()  # nothing listens there until the retry test starts a sink
    routes = {"sink.test": f"[127.0.0.1]:{sink.port}", "old.test": f"[127.0.0.1]:{old.port}",
              "reject.test": f"[127.0.0.1]:{reject.port}", "later.test": f"[127.0.0.1]:{later_port}"}
    home = base / "A"
    home.mkdir()
    (home / "aliases").write_text("fwd: user@sink.test\n")
    d = Daemon(home, config(routes, dns_port))
    made = [mailhub(d, "dkim", "keygen", "example.test", "--type", kind, "--selector", f"{kind}1")
            for kind in ("rsa", "ed25519")]
    assert [r.returncode for r in made] == [0, 0], [r.stderr for r in made]
    zone = {}
    for r in made:
        zone.update(zone_from_keygen(r.stdout))
    assert sorted(zone) == ["ed255191._domainkey.example.test", "rsa1._domainkey.example.test"]
    (home / "zone.json").write_text(json.dumps(zone))
    dns = subprocess.Popen([sys.executable, "tests/dnsserve.py", str(home / "zone.json"), str(dns_port)],
                           cwd=d.env()["PYTHONPATH"].split(":")[0], env=d.env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(dns_port, dns, "the DNS server")
        d.start()
        http_port = int(wait_for(lambda: _HTTP.search(d.log()), 10, "the HTTP listener").group(1))
        yield {"d": d, "zone": zone, "sink": sink, "old": old, "reject": reject, "keygen": made,
               "http": http_port, "home": home, "later_port": later_port, "base": base}
        assert d.stop() == CLEAN_EXIT, d.stderr()
        assert "Traceback" not in d.log(), d.log()
    finally:
        dns.terminate()
        dns.wait(5)
        for s in (sink, old, reject):
            s.stop()


def received(sink: Sink, marker: bytes) -> bytes:
    def find():
        for dump in sink.dumps():
            if marker in dump:
                return sink_message(dump)[1]
        return None

    return wait_for(find, 20, f"{marker!r} at smtp-sink")  # type: ignore[return-value]


def smtp_send(d: Daemon, sender: str, rcpt: str, data: bytes) -> None:
    with d.smtp() as s:
        s.ehlo()
        s.sendmail(sender, [rcpt], data)


def message(marker: str, author: str = "alice@example.test", to: str = "user@sink.test") -> bytes:
    return (f"From: Alice <{author}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.test>\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\n"
            f"Hello from {marker}.\r\n.leading dot\r\n").encode()


@pytest.fixture(scope="module")
def signed(net):
    """Every path's message as smtp-sink received it."""
    d = net["d"]
    out = {}
    smtp_send(d, "alice@example.test", "user@sink.test", message("via-smtp"))
    out["smtp"] = received(net["sink"], b"via-smtp")
    r = subprocess.run([sys.executable, "-m", "mailhub.cli.sendmail", "-C", d.conf, "-i", "-f", "alice@example.test",
                        "user@sink.test"], input=message("via-sendmail"), env=d.env(), cwd=d.home,
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out["sendmail"] = received(net["sink"], b"via-sendmail")
    assert mailhub(d, "user", "add", "alice@example.test", "--password-stdin", stdin="pw-for-alice\n").returncode == 0
    token = mailhub(d, "user", "token", "alice@example.test").stdout.strip()
    import urllib.request

    body = json.dumps({"from": "alice@example.test", "to": ["user@sink.test"], "subject": "via-http",
                       "text": "Sent through the API.\n"}).encode()

    def post():
        req = urllib.request.Request(f"http://127.0.0.1:{net['http']}/v1/messages", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status == 202
        except OSError:
            return False

    wait_for(post, 10, "the HTTP API to take the message")
    out["http"] = received(net["sink"], b"via-http")
    smtp_send(d, "someone@sink.test", "user@reject.test", message("to-bounce", "someone@sink.test", "user@reject.test"))
    out["bounce"] = received(net["sink"], b"MAILER-DAEMON@mx.example.test")
    eight = message("eight-bit", to="user@old.test").replace(b"Hello from", "Grüße von".encode())
    eight = eight.replace(b"\r\n\r\n", b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                          b"Content-Transfer-Encoding: 8bit\r\n\r\n", 1)
    smtp_send(d, "alice@example.test", "user@old.test", eight)
    out["downgraded"] = received(net["old"], b"eight-bit")
    return out


PATHS = ["smtp", "sendmail", "http", "bounce", "downgraded"]


def test_every_path_is_signed_with_both_keys(signed):
    for path in PATHS:
        head = signed[path][: signed[path].index(b"\n\n")]
        assert head.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.test;"), path
        assert head.count(b"DKIM-Signature:") == 2, path
        assert b"a=rsa-sha256" in head, path


def test_downgraded_message_was_converted(signed):
    raw = signed["downgraded"]
    assert raw.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable" in raw
    assert b"Gr=C3=BC=C3=9Fe von eight-bit." in raw


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_opendkim_testmsg_verifies_every_path(net, signed, tmp_path, algorithm):
    messages = [only_signatures(signed[p], algorithm) for p in PATHS]
    assert all(m.count(b"DKIM-Signature:") == 1 and f"a={algorithm};".encode() in m for m in messages)
    results = run_testmsg(tmp_path, messages, net["zone"])
    assert results == [(0, "")] * len(PATHS), dict(zip(PATHS, results, strict=True))


def test_opendkim_testmsg_rejects_a_changed_message(net, signed, tmp_path):
    changed = signed["smtp"].replace(b"Hello from via-smtp", b"Hello from via-smtq")
    wrong_key = {name: [t.replace("p=MII", "p=MIJ") for t in texts] for name, texts in net["zone"].items()}
    [(body_status, body_out)] = run_testmsg(tmp_path, [only_signatures(changed, "rsa-sha256")], net["zone"])
    assert body_status != 0 and "Bad signature" in body_out
    [(key_status, _)] = run_testmsg(tmp_path, [only_signatures(signed["smtp"], "rsa-sha256")], wrong_key)
    assert key_status != 0


def test_opendkim_with_a_key_file_passes_both_signatures(net, signed, tmp_path):
    out = opendkim_test(tmp_path, signed["smtp"], net["zone"])
    assert re.search(r"dkim=pass \(2048-bit key\) header\.d=example\.test .*header\.a=rsa-sha256 header\.s=rsa1", out), out
    assert re.search(r"dkim=pass header\.d=example\.test .*header\.a=ed25519-sha256 header\.s=ed255191", out), out


def test_keygen_writes_a_private_key_and_the_lines_to_paste(net):
    r = net["keygen"][0]
    key = net["home"] / "dkim" / "example.test" / "rsa1.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert key.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert f'[dkim]\nkeys = "{net["home"] / "dkim"}"\n' in r.stdout
    again = mailhub(net["d"], "dkim", "keygen", "example.test", "--type", "rsa", "--selector", "rsa1")
    assert again.returncode == 73 and "exists (use --force to replace it)" in again.stderr


def test_dkim_check_against_the_published_records(net):
    r = mailhub(net["d"], "dkim", "check", "example.test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rsa1._domainkey.example.test: ok (rsa," in r.stdout
    assert "ed255191._domainkey.example.test: ok (ed25519," in r.stdout
    extra = net["home"] / "dkim" / "example.test" / "new.key"
    made = mailhub(net["d"], "dkim", "keygen", "example.test", "--type", "ed25519", "--selector", "new")
    assert made.returncode == 0
    try:
        r = mailhub(net["d"], "dkim", "check", "example.test")
        assert r.returncode == 1
        assert "new._domainkey.example.test: no TXT record at new._domainkey.example.test" in r.stdout
        assert "  publish: new._domainkey.example.test. IN TXT " in r.stdout
    finally:
        extra.unlink()
    r = mailhub(net["d"], "dkim", "check", "nokeys.test")
    assert (r.returncode, r.stderr.count("\n")) == (69, 1)


def test_mail_relayed_for_others_is_not_signed(net):
    # someone else's message (a client outside the trusted networks) to a
    # local alias that forwards to another host: the From domain has keys,
    # but the message is not ours
    with smtplib.SMTP("127.0.0.1", net["d"].port, source_address=("127.0.0.2", 0), timeout=30) as s:
        s.ehlo()
        s.sendmail("alice@example.test", ["fwd@example.test"], message("not-ours", to="fwd@example.test"))
    raw = received(net["sink"], b"not-ours")
    assert b"DKIM-Signature" not in raw
    assert b"From: Alice <alice@example.test>" in raw


def test_a_retry_sends_the_signature_made_at_the_first_attempt(net, tmp_path):
    d = net["d"]
    smtp_send(d, "alice@example.test", "user@later.test", message("retried", to="user@later.test"))
    envelopes = net["home"] / "spool" / "envelopes"

    def stored():
        for f in envelopes.glob("*.json") if envelopes.exists() else []:
            env = json.loads(f.read_text())
            if env.get("dkim") and env["recipients"][0]["address"] == "user@later.test":
                return env
        return None

    first = wait_for(stored, 20, "the envelope written back with its signatures after a failed attempt")
    assert first["recipients"][0]["attempts"] >= 1 and first["recipients"][0]["state"] == "pending"
    later = Sink(tmp_path / "later", net["later_port"])
    try:
        assert mailhub(d, "queue", "flush").returncode == 0
        raw = received(later, b"retried")
    finally:
        later.stop()
    sent = crlf(raw)
    assert sent.startswith(first["dkim"]["original"].encode())
    [(status, _)] = run_testmsg(tmp_path, [only_signatures(sent, "rsa-sha256")], net["zone"])
    assert status == 0
