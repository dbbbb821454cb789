"""
End-to-end: the real daemon (C{twistd -n mailhub}) in a subprocess, on a
free port on 127.0.0.1, with a temporary configuration; mail sent with
smtplib is read back from the Maildir with C{mailbox.Maildir}.

The daemon, its configuration and the send/read helpers are in
tests/daemon.py (shared with the other test_e2e_daemon* files).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from daemon import BODY, CLEAN_EXIT, DOMAIN, Daemon, delivered_with, message, send, split_message, wait_for


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon")).start()
    yield d
    assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()
    assert d.stderr() == ""


def test_startup_log_says_where(daemon):
    log = daemon.log()
    assert f"configuration: {daemon.conf}" in log
    assert f"spool {daemon.spool};" in log
    assert f"mailboxes {os.path.join(daemon.home, 'mailboxes')};" in log
    assert f"local domains {DOMAIN}" in log
    assert f"listening for SMTP on tcp:0:interface=127.0.0.1 (127.0.0.1:{daemon.port})" in log
    assert daemon.stderr() == ""


def test_deliver_to_local_user(daemon):
    data = message(f"alice@{DOMAIN}", "m1")
    qid = send(daemon, f"alice@{DOMAIN}", data)
    raw = delivered_with(daemon, "alice", "m1")
    head, body = split_message(raw)
    assert body == BODY.replace(b"\r\n", b"\n")
    assert b"Subject: e2e m1\n" in head
    assert b"From: sender@client.test\n" in head
    # the spool lets go of the message once it is delivered
    wait_for(lambda: qid + ".json" not in daemon.queued(), 10, "the spool to drop " + qid)


def test_deliver_to_postmaster_any_case(daemon):
    data = message(f"PostMaster@{DOMAIN}", "m2")
    send(daemon, f"PostMaster@{DOMAIN}", data)
    _, body = split_message(delivered_with(daemon, "postmaster", "m2"))
    assert body == BODY.replace(b"\r\n", b"\n")


def test_address_extension(daemon):
    send(daemon, f"bob+lists@{DOMAIN}", message(f"bob+lists@{DOMAIN}", "m3"))
    _, body = split_message(delivered_with(daemon, "bob", "m3"))
    assert body == BODY.replace(b"\r\n", b"\n")


def test_unknown_user_550(daemon):
    with daemon.smtp() as s:
        s.ehlo()
        s.mail("sender@client.test")
        code, reply = s.rcpt(f"nobody@{DOMAIN}")
        assert code == 550
        assert reply.startswith(b"5.1.1 "), reply


def test_relay_denied_554(daemon):
    # trusted_networks = []: even 127.0.0.1 may not relay
    with daemon.smtp() as s:
        s.ehlo()
        s.mail("sender@client.test")
        code, reply = s.rcpt("someone@elsewhere.example")
        assert code == 554
        assert reply.startswith(b"5.7.1 "), reply


def test_bad_config_one_clean_line(tmp_path):
    d = Daemon(tmp_path, "[server]\nmax_recipients = -3\n")
    r = subprocess.run(d.command(), cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 78
    assert r.stderr == f"mailhub: {d.conf}: server.max_recipients: must be a positive integer, got -3\n"
    assert "Traceback" not in r.stdout


def test_bad_endpoint_option_one_clean_line(tmp_path):
    d = Daemon(tmp_path)
    r = subprocess.run(
        d.command("--smtp", "tcp:notaport"), cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 78
    assert r.stderr == (
        "mailhub: command line: server.smtp: invalid endpoint 'tcp:notaport': "
        "the port must be a number, got 'notaport'\n"
    )


def test_port_in_use_one_clean_line(tmp_path, daemon):
    d = Daemon(tmp_path)
    r = subprocess.run(
        d.command("--smtp", f"tcp:{daemon.port}:interface=127.0.0.1"),
        cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 71
    assert r.stderr == (
        f"mailhub: cannot listen on tcp:{daemon.port}:interface=127.0.0.1: Address already in use\n"
    )


def test_sigterm_tells_open_sessions_421(tmp_path):
    """RFC 5321 3.8: an idle session hears 421 before the daemon stops, then the connection ends."""
    import signal
    import socket

    d = Daemon(tmp_path).start()
    try:
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        d.proc.send_signal(signal.SIGTERM)
        assert f.readline() == f"421 4.3.2 mx.{DOMAIN} Service shutting down, closing transmission channel\r\n".encode()
        assert f.read() == b""
        sock.close()
        assert d.proc.wait(20) == CLEAN_EXIT, d.stderr()
    finally:
        if d.proc.poll() is None:
            d.kill()
