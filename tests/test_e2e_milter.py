"""
Milters end to end: a real mailhub daemon (twistd) with real milters from
Debian's packages on 127.0.0.1 and a Unix socket: OpenDKIM signing, then
OpenDKIM verifying what the first signed (Authentication-Results: dkim=pass),
rspamd's milter proxy refusing GTUBE and adding its headers to a clean
message, an OpenDKIM killed in the middle of a message and one that stops
answering.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest
from daemon import DOMAIN, Daemon, config_text, delivered_with, message, read_maildir, send, wait_for
from milterpeers import OpenDKIM, Rspamd, dkim_key

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SENDER = f"carol@{DOMAIN}"


def milter_config(*tables: str) -> str:
    return config_text(trusted='["127.0.0.0/8"]') + "".join(f"\n[[milter]]\n{t}\n" for t in tables)


def _home(tmp_path) -> str:
    home = tmp_path / "mh"
    home.mkdir(parents=True)
    return str(home)


def signed_message(msgid: str) -> bytes:
    return message(f"alice@{DOMAIN}", msgid, sender=SENDER).replace(
        b"From: " + SENDER.encode(), b"From: Carol <" + SENDER.encode() + b">", 1)


@pytest.fixture
def dkim(tmp_path):
    key, record = dkim_key(str(tmp_path), DOMAIN)
    started: list[OpenDKIM] = []

    def start(mode: str, **kw) -> OpenDKIM:
        milter = OpenDKIM(str(tmp_path / f"opendkim-{len(started)}"), mode, DOMAIN, key=key, record=record, **kw)
        started.append(milter.start())
        return milter

    yield start
    for milter in started:
        milter.stop()


def test_opendkim_signs_and_a_second_opendkim_verifies_the_signature(tmp_path, dkim) -> None:
    signer = dkim("s")
    verifier = dkim("v", unix=True, authserv_id=f"mx.{DOMAIN}")
    d = Daemon(_home(tmp_path), milter_config(
        f'socket = "{signer.socket}"\ndefault_action = "tempfail"',
        f'socket = "{verifier.socket}"\ndefault_action = "tempfail"',
    )).start()
    try:
        send(d, f"alice@{DOMAIN}", signed_message("<dkim1@client.test>"), sender=SENDER)
        raw = delivered_with(d, "alice", "<dkim1@client.test>")
    finally:
        d.stop()
    header = raw.partition(b"\r\n\r\n")[0] if b"\r\n\r\n" in raw else raw.partition(b"\n\n")[0]
    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test; s=sel;" in header
    unfolded = header.replace(b"\r\n", b"\n").replace(b"\n\t", b" ").replace(b"\n ", b" ")
    assert f"Authentication-Results: mx.{DOMAIN};".encode() in unfolded
    assert b"dkim=pass" in unfolded and b"header.d=example.test" in unfolded


def test_a_tampered_message_fails_verification(tmp_path, dkim) -> None:
    verifier = dkim("v", authserv_id=f"mx.{DOMAIN}")
    # a signature over another body: OpenDKIM says so in its header
    forged = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test; s=sel;\r\n"
        b"\tt=1; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; h=From:To:Subject;\r\n"
        b"\tb=AAAA\r\n"
    ) + signed_message("<dkim2@client.test>")
    d = Daemon(_home(tmp_path), milter_config(f'socket = "{verifier.socket}"')).start()
    try:
        send(d, f"alice@{DOMAIN}", forged, sender=SENDER)
        raw = delivered_with(d, "alice", "<dkim2@client.test>")
    finally:
        d.stop()
    unfolded = raw.replace(b"\r\n", b"\n").replace(b"\n\t", b" ").replace(b"\n ", b" ")
    assert b"dkim=fail" in unfolded or b"dkim=neutral" in unfolded or b"dkim=permerror" in unfolded


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    milter = Rspamd(str(tmp_path_factory.mktemp("rspamd"))).start()
    yield milter
    milter.stop()


def test_rspamd_rejects_gtube_and_adds_its_headers_to_a_clean_message(tmp_path, rspamd) -> None:
    d = Daemon(_home(tmp_path), milter_config(f'socket = "{rspamd.socket}"')).start()
    try:
        clean = message(f"alice@{DOMAIN}", "<clean@client.test>")
        send(d, f"alice@{DOMAIN}", clean)
        raw = delivered_with(d, "alice", "<clean@client.test>")
        spam = message(f"alice@{DOMAIN}", "<gtube@client.test>").replace(b"\r\n\r\n", b"\r\n\r\n" + GTUBE + b"\r\n", 1)
        with d.smtp() as s:
            s.ehlo("client.test")
            s.mail("sender@client.test")
            s.rcpt(f"alice@{DOMAIN}")
            refused = s.data(spam)
        log = d.log_with("milter-reject: END-OF-MESSAGE")
    finally:
        d.stop()
    assert b"X-Spamd-Result: default: False" in raw and b"X-Spam-Status: No" in raw
    assert refused == (554, b"5.7.1 Gtube pattern")
    assert "milter-reject: END-OF-MESSAGE" in log and "Gtube pattern" in log
    assert len(d.queued()) == 0


def test_rspamd_quarantines_and_mailhub_queue_release_frees_the_message(tmp_path) -> None:
    quarantining = Rspamd(str(tmp_path / "rspamd"), quarantine=True).start()
    d = Daemon(_home(tmp_path), milter_config(f'socket = "{quarantining.socket}"')).start()
    try:
        spam = message(f"alice@{DOMAIN}", "<held@client.test>").replace(b"\r\n\r\n", b"\r\n\r\n" + GTUBE + b"\r\n", 1)
        qid = send(d, f"alice@{DOMAIN}", spam)
        listing = subprocess.run(
            [sys.executable, "-m", "mailhub.cli.main", "-c", d.conf, "queue", "list"],
            capture_output=True, text=True, env=d.env(), cwd=d.home, timeout=60,
        )
        assert f"{qid}!" in listing.stdout, listing.stdout + listing.stderr
        assert read_maildir(d.maildir("alice")) == []
        released = subprocess.run(
            [sys.executable, "-m", "mailhub.cli.main", "-c", d.conf, "queue", "release", qid],
            capture_output=True, text=True, env=d.env(), cwd=d.home, timeout=60,
        )
        assert released.returncode == 0, released.stderr
        raw = delivered_with(d, "alice", "<held@client.test>")
        log = d.log_with(f"{qid}: released from hold", "quarantine=Spam_message_quarantined")
    finally:
        d.stop()
        quarantining.stop()
    assert GTUBE in raw
    assert f"{qid}: milter-hold: Spam message quarantined" in log and "quarantine=Spam_message_quarantined" in log
    assert f"{qid}: released from hold" in log


def _session(d: Daemon) -> smtplib.SMTP:
    s = d.smtp()
    s.ehlo("client.test")
    return s


def _data_without_end(s: smtplib.SMTP, msgid: str) -> None:
    assert s.mail(SENDER)[0] == 250
    assert s.rcpt(f"alice@{DOMAIN}")[0] == 250
    assert s.docmd("DATA")[0] == 354
    s.send(signed_message(msgid))


def test_a_milter_killed_mid_message_gets_the_default_action_for_that_message_only(tmp_path, dkim) -> None:
    signer = dkim("s")
    d = Daemon(_home(tmp_path), milter_config(f'socket = "{signer.socket}"\ndefault_action = "tempfail"')).start()
    try:
        s = _session(d)
        _data_without_end(s, "<killed@client.test>")
        signer.signal(signal.SIGSTOP)  # it will never see the end of this message
        s.send(b".\r\n")
        signer.signal(signal.SIGKILL)
        code, text = s.getreply()
        assert (code, text) == (451, b"4.7.1 Service unavailable - try again later")
        # the same session, a restarted milter: the next message is signed
        signer.proc.wait(10)
        signer.start()
        _data_without_end(s, "<after@client.test>")
        s.send(b".\r\n")
        assert s.getreply()[0] == 250
        s.quit()
        raw = delivered_with(d, "alice", "<after@client.test>")
        log = d.log_with("default action tempfail")
    finally:
        d.stop()
    assert b"DKIM-Signature:" in raw
    assert "milter inet:127.0.0.1" in log and "default action tempfail" in log
    assert not any(b"killed@client.test" in open(os.path.join(d.spool, "queue", q[:-5]), "rb").read()
                   for q in d.queued())


def test_a_milter_that_never_answers_times_out_and_blocks_no_one_else(tmp_path, dkim) -> None:
    signer = dkim("s")
    d = Daemon(_home(tmp_path), milter_config(
        f'socket = "{signer.socket}"\ndefault_action = "reject"\ncontent_timeout = 3\ncommand_timeout = 3'
    )).start()
    try:
        s = _session(d)
        _data_without_end(s, "<silent@client.test>")
        signer.signal(signal.SIGSTOP)
        started = time.monotonic()
        s.send(b".\r\n")
        answered: list = []
        waiter = threading.Thread(target=lambda: answered.append(s.getreply()))
        waiter.start()
        # meanwhile another client is served at once
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as other:
            other.sendall(b"NOOP\r\n")
            got = b""
            while b"250 2.0.0 Ok" not in got:
                got += other.recv(1024)
        assert not answered
        waiter.join(30)
        elapsed = time.monotonic() - started
        assert answered == [(550, b"5.7.1 Command rejected")]
        assert elapsed >= 2.5
        # the daemon's log follows the acceptor process's reply
        wait_for(lambda: "no answer within 3s; default action reject" in d.log(), 10, "the timeout line")
    finally:
        signer.signal(signal.SIGCONT)
        d.stop()


def test_a_milter_filters_only_its_listeners(tmp_path) -> None:
    from peers import free_port

    down = f"inet:127.0.0.1:{free_port()}"  # nothing listens there
    d = Daemon(_home(tmp_path), milter_config(
        f'socket = "{down}"\ndefault_action = "reject"\nlisteners = ["submission"]',
    )).start()
    try:
        send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "<mx@client.test>"))  # smtp: not filtered
        delivered_with(d, "alice", "<mx@client.test>")
    finally:
        d.stop()
    d = Daemon(_home(tmp_path / "2"), milter_config(f'socket = "{down}"\ndefault_action = "reject"')).start()
    try:
        with d.smtp() as s:
            assert s.ehlo("client.test") == (550, b"5.7.1 Command rejected")
        log = d.log_with("HELO: cannot connect", "default action reject")
    finally:
        d.stop()
    assert f"milter {down}: HELO: cannot connect" in log and "default action reject" in log
