"""
End-to-end tests of STARTTLS, AUTH and submission on real loopback sockets:
a self-signed certificate made in the test (tls.make_self_signed), a real
users file (bcrypt, checked in a thread), smtplib / raw sockets / msmtp as
clients.  Relay-denied tests use a client bound to 127.0.0.2, which is
neither trusted (trusted_networks = 127.0.0.1/32) nor "loopback" for
allow_plaintext_loopback (exactly 127.0.0.1 / ::1).
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import socket
import ssl
import subprocess

import pytest
from conftest import in_reactor, require_tool
from twisted.internet.endpoints import serverFromString

from mailhub import tls
from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.queue.spool import Spool
from mailhub.smtp import sasl as auth
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy
from mailhub.users import UsersChecker, UsersFile

HOST = "mx.example.com"
USER, PASSWORD = "alice@example.com", "s3cret-Pa55"
MESSAGE = b"From: alice@example.com\r\nTo: friend@elsewhere.test\r\nSubject: e2e submission\r\n\r\nhello\r\n"
OTHER_CLIENT = "127.0.0.2"


class Servers:
    """smtp (STARTTLS), submission (STARTTLS + AUTH required) and smtps listeners sharing one spool."""

    def __init__(self, reactor, tmp_path) -> None:
        self.reactor = reactor
        self.cert = str(tmp_path / "cert.pem")
        key = str(tmp_path / "key.pem")
        tls.make_self_signed("127.0.0.1", self.cert, key)
        server_tls = tls.ServerTLS(self.cert, key)
        self.spool = Spool(str(tmp_path / "spool"), fsync=False)
        self.queued: list = []
        users = UsersFile(str(tmp_path / "users"), rounds=4)
        users.add(USER, PASSWORD)
        directory = Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice", "bob"])
        cfg = ServerConfig(hostname=HOST, trusted_networks=("127.0.0.1/32",))
        policy = Policy(directory, cfg.trusted_networks)
        throttle = auth.AuthThrottle(reactor, delay=0.05, max_failures=20, window=300)
        self.ports = {}
        self.addresses = {}
        for listener in ("smtp", "submission", "smtps"):
            factory = SMTPServerFactory(
                SMTPSettings(cfg, listener, allow_plaintext_loopback=True), self.spool, self.queued.append, policy,
                reactor, tls=server_tls, users=users, throttle=throttle,
            )
            if listener == "smtps":
                endpoint = tls.implicit_tls_endpoint(reactor, "tcp:0:interface=127.0.0.1", server_tls)
            else:
                endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
            port = in_reactor(reactor, endpoint.listen, factory)
            self.ports[listener] = port
            self.addresses[listener] = ("127.0.0.1", port.getHost().port)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)

    def stop(self) -> None:
        for port in self.ports.values():
            in_reactor(self.reactor, port.stopListening)

    def stored(self, qid: str) -> bytes:
        with self.spool.open_message(qid) as f:
            return f.read()


@pytest.fixture
def servers(reactor, tmp_path):
    s = Servers(reactor, tmp_path)
    yield s
    s.stop()


def received(raw: bytes) -> str:
    m = re.match(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", raw)
    assert m is not None, raw[:200]
    return m.group(0).decode()


def test_starttls_login_sendmail_relays(servers):
    with smtplib.SMTP(*servers.addresses["submission"], timeout=10, source_address=(OTHER_CLIENT, 0)) as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls") and not c.has_extn("auth")
        c.starttls(context=servers.context())
        c.ehlo("client.test")
        assert c.esmtp_features["auth"] == " PLAIN LOGIN" and not c.has_extn("starttls")
        assert c.login(USER, PASSWORD) == (235, b"2.7.0 Authentication successful")
        assert c.sendmail(USER, ["friend@elsewhere.test"], MESSAGE) == {}
    [env] = servers.queued
    assert env.sender == USER and [r.address for r in env.recipients] == ["friend@elsewhere.test"]
    assert env.client["user"] == USER and env.client["protocol"] == "ESMTPSA"
    raw = servers.stored(env.queue_id)
    assert received(raw).startswith(f"Received: from client.test ([{OTHER_CLIENT}])\r\n\tby {HOST} (mailhub) "
                                    f"with ESMTPSA id {env.queue_id}\r\n")
    assert raw.endswith(MESSAGE)


def test_smtps_implicit_tls(servers):
    with smtplib.SMTP_SSL(*servers.addresses["smtps"], timeout=10, context=servers.context()) as c:
        c.ehlo("client.test")
        assert not c.has_extn("starttls") and c.has_extn("auth")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail(USER, ["friend@elsewhere.test"], MESSAGE)
        assert (e.value.smtp_code, e.value.smtp_error) == (530, b"5.7.0 Authentication required")
        c.login(USER, PASSWORD)
        c.sendmail(USER, ["friend@elsewhere.test"], MESSAGE)
    [env] = servers.queued
    assert env.client["listener"] == "smtps" and env.client["protocol"] == "ESMTPSA"


def test_wrong_password_and_sender_not_owned(servers):
    with smtplib.SMTP(*servers.addresses["submission"], timeout=10) as c:
        c.starttls(context=servers.context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login(USER, "wrong")
        assert (e.value.smtp_code, e.value.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")
        c.login(USER, PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("bob@example.com", ["friend@elsewhere.test"], MESSAGE)
        assert e.value.smtp_code == 553
        assert e.value.smtp_error == b"5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice@example.com"
    assert servers.queued == []


def test_auth_refused_in_clear_from_non_loopback(servers):
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with smtplib.SMTP(*servers.addresses["submission"], timeout=10, source_address=(OTHER_CLIENT, 0)) as c:
        c.ehlo("client.test")
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", f"PLAIN {plain}") == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
    # From 127.0.0.1 plaintext AUTH is allowed (allow_plaintext_loopback).
    with smtplib.SMTP(*servers.addresses["submission"], timeout=10) as c:
        c.ehlo("client.test")
        assert c.has_extn("auth")
        assert c.docmd("AUTH", f"PLAIN {plain}") == (235, b"2.7.0 Authentication successful")


def test_open_relay_refused_for_untrusted_client(servers):
    # smtp listener, even over TLS: 554 5.7.1 for a foreign recipient; local ones are fine.
    with smtplib.SMTP(*servers.addresses["smtp"], timeout=10, source_address=(OTHER_CLIENT, 0)) as c:
        c.starttls(context=servers.context())
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("x@elsewhere.test", ["victim@elsewhere.test"], MESSAGE)
        assert e.value.recipients == {
            "victim@elsewhere.test": (554, b"5.7.1 <victim@elsewhere.test>: Relay access denied")}
        c.sendmail("x@elsewhere.test", ["bob@example.com"], MESSAGE)
    # submission: no transaction at all without AUTH.
    with smtplib.SMTP(*servers.addresses["submission"], timeout=10, source_address=(OTHER_CLIENT, 0)) as c:
        c.starttls(context=servers.context())
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("x@elsewhere.test", ["victim@elsewhere.test"], MESSAGE)
        assert e.value.smtp_code == 530
    assert [[r.address for r in env.recipients] for env in servers.queued] == [["bob@example.com"]]
    assert servers.queued[0].client["protocol"] == "ESMTPS"


def read_reply(f) -> list[bytes]:
    lines = []
    while True:
        line = f.readline()
        assert line, lines
        lines.append(line)
        if line[3:4] == b" ":
            return lines


def test_starttls_injection_over_real_tls(servers):
    """CVE-2011-0411: "STARTTLS\\r\\nRSET\\r\\n" in one write; RSET must never be answered."""
    sock = socket.create_connection(servers.addresses["smtp"], timeout=10)
    try:
        f = sock.makefile("rb", buffering=0)
        assert read_reply(f) == [f"220 {HOST} ESMTP mailhub\r\n".encode()]
        sock.sendall(b"EHLO client.test\r\n")
        assert b"250-STARTTLS\r\n" in read_reply(f)
        sock.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@elsewhere.test>\r\n")
        assert read_reply(f) == [b"220 2.0.0 Ready to start TLS\r\n"]
        tls_sock = servers.context().wrap_socket(sock, server_hostname="127.0.0.1")
        tf = tls_sock.makefile("rb")
        tls_sock.sendall(b"EHLO client.test\r\n")
        first = read_reply(tf)
        assert first[0] == f"250-{HOST}\r\n".encode()
        assert b"250-AUTH PLAIN LOGIN\r\n" in first and b"250-STARTTLS\r\n" not in first
        tls_sock.sendall(b"RCPT TO:<bob@example.com>\r\nQUIT\r\n")
        # No transaction survived the handshake, and nothing else is pending.
        assert read_reply(tf) == [b"503 5.5.1 Error: need MAIL command\r\n"]
        assert read_reply(tf) == [b"221 2.0.0 Bye\r\n"]
        tls_sock.close()
    finally:
        sock.close()


def test_replies_pipelined_before_starttls_are_sent_in_clear_before_the_handshake(servers):
    """Replies to a pipelined group are held back and sent together; STARTTLS must flush them in clear first."""
    sock = socket.create_connection(servers.addresses["smtp"], timeout=10)
    try:
        f = sock.makefile("rb", buffering=0)
        assert read_reply(f) == [f"220 {HOST} ESMTP mailhub\r\n".encode()]
        sock.sendall(b"EHLO client.test\r\nNOOP\r\nSTARTTLS\r\n")
        assert b"250-STARTTLS\r\n" in read_reply(f)
        assert read_reply(f) == [b"250 2.0.0 Ok\r\n"]
        assert read_reply(f) == [b"220 2.0.0 Ready to start TLS\r\n"]
        tls_sock = servers.context().wrap_socket(sock, server_hostname="127.0.0.1")
        tf = tls_sock.makefile("rb")
        tls_sock.sendall(b"EHLO client.test\r\nNOOP\r\nQUIT\r\n")
        assert read_reply(tf)[0] == f"250-{HOST}\r\n".encode()
        assert read_reply(tf) == [b"250 2.0.0 Ok\r\n"]
        assert read_reply(tf) == [b"221 2.0.0 Bye\r\n"]
        tls_sock.close()
    finally:
        sock.close()


def test_msmtp_submission_starttls_auth(servers, tmp_path):
    msmtp = require_tool("msmtp")
    host, port = servers.addresses["submission"]
    config = tmp_path / "msmtprc"
    config.write_text(
        "account default\n"
        f"host {host}\nport {port}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {servers.cert}\n"
        "auth plain\n"
        f"user {USER}\npassword {PASSWORD}\n"
        f"from {USER}\n"
        "domain client.test\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
    )
    os.chmod(config, 0o600)
    done = subprocess.run(
        [msmtp, "-C", str(config), "friend@elsewhere.test"],
        input=MESSAGE.replace(b"\r\n", b"\n"), capture_output=True, timeout=30,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    [env] = servers.queued
    assert env.sender == USER and [r.address for r in env.recipients] == ["friend@elsewhere.test"]
    assert env.client["user"] == USER and env.client["listener"] == "submission"
    raw = servers.stored(env.queue_id)
    assert f"with ESMTPSA id {env.queue_id}" in received(raw)
    assert raw.endswith(MESSAGE)


class CountingChecker:
    """The real bcrypt checker (in a thread), recording which passwords it was asked to check."""

    def __init__(self, checker: UsersChecker) -> None:
        self.checker = checker
        self.passwords: list[bytes] = []

    def requestAvatarId(self, credentials):
        self.passwords.append(credentials.password)
        return self.checker.requestAvatarId(credentials)


def test_parallel_auth_guesses_are_capped_over_real_sockets(reactor, tmp_path):
    """40 STARTTLS sessions from one IP send AUTH PLAIN at once: at most max_failures (3) wrong guesses are checked."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls.make_self_signed("127.0.0.1", cert, key)
    users = UsersFile(str(tmp_path / "users"), rounds=10)  # a check takes a while, as in production
    users.add(USER, PASSWORD)
    checker = CountingChecker(UsersChecker(users))
    cfg = ServerConfig(hostname=HOST, trusted_networks=("127.0.0.1/32",))
    policy = Policy(Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice"]), cfg.trusted_networks)
    factory = SMTPServerFactory(
        SMTPSettings(cfg, "submission"), Spool(str(tmp_path / "spool"), fsync=False), lambda env: None, policy, reactor,
        tls=tls.ServerTLS(cert, key), users=users, checker=checker,
        throttle=auth.AuthThrottle(reactor, delay=0.05, max_failures=3, window=300),
    )
    port = in_reactor(reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen, factory)
    address = ("127.0.0.1", port.getHost().port)
    context = ssl.create_default_context(cafile=cert)
    n = 40
    ready = threading.Barrier(n, timeout=30)

    def guess(i: int) -> int:
        password = PASSWORD if i == n - 1 else f"wrong-{i}"
        with smtplib.SMTP(*address, timeout=20, source_address=("127.0.0.3", 0)) as c:
            c.starttls(context=context)
            c.ehlo("client.test")
            ready.wait()
            code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{password}".encode()).decode())
            try:
                c.quit()
            except smtplib.SMTPServerDisconnected:
                pass
            return code

    try:
        with ThreadPoolExecutor(n) as pool:
            codes = list(pool.map(guess, range(n)))
    finally:
        in_reactor(reactor, port.stopListening)
    wrong_checked = [p for p in checker.passwords if p != PASSWORD.encode()]
    assert len(wrong_checked) <= 3, (len(wrong_checked), codes)
    assert codes.count(535) <= 2 and codes.count(235) <= 1
    assert codes.count(421) + codes.count(535) + codes.count(235) == n, codes
    if codes[-1] == 235:  # the right password was among the first checks
        assert PASSWORD.encode() in checker.passwords
