"""
End-to-end: outbound relay through the real daemon (C{twistd -n mailhub}).

A first daemon ("A", local domain example.test, loopback trusted) routes
three domains with C{relay.routes} to receivers on 127.0.0.1:

- C{sink.test}   -> Postfix's smtp-sink, which dumps what it receives;
- C{remote.test} -> a second mailhub daemon ("B") whose local domain it is;
- C{reject.test} -> smtp-sink answering every RCPT with 500 5.3.0, so the
  local sender gets exactly one RFC 3464 bounce from A.

A third daemon ("C") has the same routes but C{trusted_networks = []}:
routes never open the relay, a foreign recipient gets 554 5.7.1.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys

import pytest
from daemon import BODY, CLEAN_EXIT, Daemon, read_maildir, send, split_message, wait_for
from daemon import message as _message
from peers import Sink, free_port, sink_message


def message(to: str, msgid: str, sender: str = "sender@client.test") -> bytes:
    return _message(to, msgid, sender, topic="relay")


def config(hostname: str, domain: str, smtp: str, trusted: str, routes: dict[str, str], users: str) -> str:
    table = "\n".join(f'"{k}" = "{v}"' for k, v in routes.items())
    return f"""
[server]
hostname = "{hostname}"
smtp = ["{smtp}"]
trusted_networks = {trusted}

[spool]
path = "spool"
fsync = false

[local]
domains = ["{domain}"]
mailboxes = "mailboxes"
users = {users}

[relay]
min_backoff = 1
max_backoff = 2
connect_timeout = 5
command_timeout = 20
greeting_timeout = 20

[relay.routes]
{table}
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    base = tmp_path_factory.mktemp("relay")
    sink = Sink(base / "sink", free_port())
    reject = Sink(base / "reject", free_port(), "-f", "RCPT")
    b_port = free_port()
    routes = {
        "sink.test": f"[127.0.0.1]:{sink.port}",
        "remote.test": f"[127.0.0.1]:{b_port}",
        "reject.test": f"[127.0.0.1]:{reject.port}",
    }
    homes = {name: base / name for name in "ABC"}
    for home in homes.values():
        home.mkdir()
    b = Daemon(homes["B"], config("mx.remote.test", "remote.test", f"tcp:{b_port}:interface=127.0.0.1",
                                  "[]", {}, '["carol"]'))
    a = Daemon(homes["A"], config("mx.example.test", "example.test", "tcp:0:interface=127.0.0.1",
                                  '["127.0.0.0/8"]', routes, '["alice"]'))
    c = Daemon(homes["C"], config("mx.closed.test", "closed.test", "tcp:0:interface=127.0.0.1",
                                  "[]", routes, '["dave"]'))
    started = []
    try:
        for d in (b, a, c):
            d.start()
            started.append(d)
        yield {"A": a, "B": b, "C": c, "sink": sink, "reject": reject}
    finally:
        for d in started:
            assert d.stop() == CLEAN_EXIT, d.stderr()
        sink.stop()
        reject.stop()
    for d in started:
        assert "Traceback" not in d.log(), d.log()
        assert d.stderr() == ""


def gone_from_spool(d: Daemon, qid: str) -> None:
    wait_for(lambda: qid + ".json" not in d.queued(), 10, f"{qid} to leave the spool")


def test_startup_log_names_the_relay_and_control_listener(net):
    a = net["A"]
    log = a.log()
    assert f"listening for SMTP on tcp:0:interface=127.0.0.1 (127.0.0.1:{a.port})" in log
    assert f"listening for CONTROL on {a.spool}/control.sock ({a.spool}/control.sock)\n" in log
    assert "b'" not in log  # paths are logged as text, never as bytes reprs
    assert "Starting factory" not in log


def test_route_to_smtp_sink_exact_bytes(net):
    a, sink = net["A"], net["sink"]
    data = message("user@sink.test", "r1")
    qid = send(a, "user@sink.test", data, sender="sender@client.test")

    def received():
        for dump in sink.dumps():
            if b"<r1@client.test>" in dump and dump.endswith(b"last line\n\n"):
                return dump
        return None

    headers, msg = sink_message(wait_for(received, 15, "smtp-sink to receive r1"))
    assert headers["X-Mail-Args"][0].startswith("<sender@client.test>")
    assert headers["X-Rcpt-Args"] == ["<user@sink.test>"]
    assert headers["X-Helo-Args"] == ["mx.example.test"]
    # A adds its Received: header on top; the rest is byte for byte the
    # original (smtp-sink stores LF line ends and adds one empty line).
    assert msg.startswith(b"Received: from client.test")
    assert msg.endswith(b"\n" + data.replace(b"\r\n", b"\n") + b"\n")
    assert f"id {qid}".encode() in msg.split(b"\nFrom: ", 1)[0]
    gone_from_spool(a, qid)


def test_route_to_second_mailhub_daemon(net):
    a, b = net["A"], net["B"]
    data = message("carol@remote.test", "r2")
    qid = send(a, "Carol@Remote.Test", data, sender="sender@client.test")
    box = os.path.join(b.home, "mailboxes", "remote.test", "carol")

    def delivered():
        return next((raw for raw in read_maildir(box) if b"<r2@client.test>" in raw), None)

    raw = wait_for(delivered, 15, "r2 in carol's Maildir on B")
    head, body = split_message(raw)
    assert body == BODY.replace(b"\r\n", b"\n")
    received = [line for line in head.split(b"\n") if line.startswith(b"Received: ")]
    assert len(received) == 2
    assert received[0].startswith(b"Received: from mx.example.test (")  # B's, about A
    assert received[1].startswith(b"Received: from client.test (")  # A's, about the client
    gone_from_spool(a, qid)
    # B delivered it: its queue lets go of the message too
    wait_for(lambda: b.queued() == [], 10, "B's queue to be empty")


def test_rejected_recipient_bounces_once_to_local_sender(net):
    a, reject = net["A"], net["reject"]
    data = message("bob@reject.test", "r3", sender="alice@example.test")
    qid = send(a, "bob@reject.test", data, sender="alice@example.test")
    box = a.maildir("alice")

    def bounces():
        return [raw for raw in read_maildir(box) if b"<r3@client.test>" in raw] or None

    found = wait_for(bounces, 15, "a bounce in alice's Maildir")
    gone_from_spool(a, qid)
    # the original left the queue; no second bounce can follow it
    wait_for(lambda: a.queued() == [], 10, "A's queue to be empty")
    found = bounces()
    assert len(found) == 1
    assert reject.dumps() == []  # no DATA was ever sent
    msg = email.message_from_bytes(found[0], policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "alice@example.test" or "alice@example.test" in msg["To"]
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    status = parts[1]
    # message/delivery-status: per-message block, then one per recipient
    blocks = [dict(b.items()) for b in status.get_payload()]
    per_rcpt = blocks[1]
    assert per_rcpt["Final-Recipient"].lower() == "rfc822; bob@reject.test"
    assert per_rcpt["Action"] == "failed"
    assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", per_rcpt["Status"]), per_rcpt["Status"]
    assert per_rcpt["Status"] == "5.3.0"  # smtp-sink -f RCPT: "500 5.3.0 Error: command failed"
    assert per_rcpt["Remote-MTA"] == "dns; 127.0.0.1"  # the route's host, not "127.0.0.1[127.0.0.1]:port"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 500")
    # the envelope sender of a bounce is <>: Return-Path says so
    assert msg["Return-Path"] == "<>"


def test_untrusted_client_may_not_relay_even_to_routed_domains(net):
    c = net["C"]
    with c.smtp() as s:
        s.ehlo()
        assert s.mail("someone@client.test")[0] == 250
        for rcpt in ("user@sink.test", "carol@remote.test", "x@elsewhere.example"):
            code, reply = s.rcpt(rcpt)
            assert (code, reply[:6]) == (554, b"5.7.1 "), (rcpt, reply)
            assert b"Relay access denied" in reply
        # its own domain is still accepted
        code, reply = s.rcpt("dave@closed.test")
        assert (code, reply[:5]) == (250, b"2.1.5"), reply



def test_submission_and_smtps_listeners_authenticated_relay(net, tmp_path):
    """
    The daemon with a certificate, a users file, a submission and an smtps
    listener: each is logged with its kind; AUTH is required on submission;
    an authenticated user relays through the route to smtp-sink.
    """
    import smtplib
    import ssl
    import sys

    from mailhub.tls import make_self_signed

    sink = net["sink"]
    make_self_signed("mx.sub.test", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    text = config("mx.sub.test", "sub.test", "tcp:0:interface=127.0.0.1", "[]",
                  {"sink.test": f"[127.0.0.1]:{sink.port}"}, '["alice"]')
    text = text.replace(
        "[spool]",
        'submission = ["tcp:0:interface=127.0.0.1"]\nsmtps = ["tcp:0:interface=127.0.0.1"]\n'
        'tls_cert = "cert.pem"\ntls_key = "key.pem"\n\n[auth]\nusers = "users"\nfailure_delay = 0\n\n[spool]',
    )
    d = Daemon(tmp_path, text)
    r = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "-C", d.conf, "user", "add", "alice@sub.test", "--password-stdin"],
        input="s3cret-Pa55\n", env=d.env(), cwd=d.home, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    d.start()
    try:
        log = d.log()
        ports = {
            kind: int(m.group(1))
            for kind in ("SUBMISSION", "SMTPS")
            for m in [re.search(rf"listening for {kind} on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)", log)]
            if m
        }
        assert set(ports) == {"SUBMISSION", "SMTPS"}, log
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        # submission: STARTTLS offered, MAIL before AUTH refused
        with smtplib.SMTP("127.0.0.1", ports["SUBMISSION"], local_hostname="client.test", timeout=20) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            s.starttls(context=insecure)
            s.ehlo()
            assert "PLAIN" in s.esmtp_features.get("auth", "")
            code, reply = s.mail("alice@sub.test")
            assert (code, reply[:5]) == (530, b"5.7.0"), reply
        # smtps: TLS from the first byte; AUTH; relay to the routed domain
        data = message("user@sink.test", "sub1", sender="alice@sub.test")
        with smtplib.SMTP_SSL("127.0.0.1", ports["SMTPS"], local_hostname="client.test", context=insecure,
                              timeout=20) as s:
            s.ehlo()
            code, _ = s.login("alice@sub.test", "s3cret-Pa55")
            assert code == 235
            assert s.mail("alice@sub.test")[0] == 250
            code, reply = s.rcpt("user@sink.test")
            assert (code, reply[:5]) == (250, b"2.1.5"), reply
            code, reply = s.data(data)
            assert code == 250, reply

        def received():
            return next((x for x in sink.dumps() if b"<sub1@client.test>" in x and x.endswith(b"last line\n\n")), None)

        _, msg = sink_message(wait_for(received, 15, "smtp-sink to receive the submitted message"))
        assert msg.endswith(b"\n" + data.replace(b"\r\n", b"\n") + b"\n")
    finally:
        assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log(), d.log()



# -- a next hop that refuses connections ---------------------------------------------------


def test_refused_connection_is_reported_as_no_reply_everywhere(tmp_path):
    """
    A route to a port where nothing listens: no server said anything, so
    the mail log, the delay notice (text and RFC 3464 fields), mailq and
    the HTTP API all give Postfix's "connect to HOST[IP]:PORT: Connection
    refused", with no reply code, no Remote-MTA and no smtp Diagnostic-Code.
    """
    import io
    import json
    import urllib.request

    from mailhub.cli.queue import QueueOptions, run_queue

    dead = free_port()
    text = config("mx.example.test", "example.test", "tcp:0:interface=127.0.0.1", '["127.0.0.0/8"]',
                  {"dead.test": f"[127.0.0.1]:{dead}"}, '["alice"]')
    text = text.replace("[relay]\n", "[relay]\ndelay_warning = 1\n").replace(
        "[server]\n", '[server]\nhttp = ["tcp:0:interface=127.0.0.1"]\nhttp_admins = ["alice@example.test"]\n'
    ) + '[auth]\nusers = "users"\n'
    d = Daemon(tmp_path, text)
    d.start()
    try:
        cli = [sys.executable, "-m", "mailhub.cli.main", "--config", d.conf, "user"]
        subprocess.run([*cli, "add", "alice@example.test", "--password-stdin"], input="correct horse\n",
                       cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=60, check=True)
        token = subprocess.run([*cli, "token", "alice@example.test"], cwd=d.home, env=d.env(),
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        qid = send(d, "bob@dead.test", message("bob@dead.test", "dead1", sender="alice@example.test"),
                   sender="alice@example.test")
        reason = f"connect to 127.0.0.1[127.0.0.1]:{dead}: Connection refused"
        notices = lambda: [raw for raw in read_maildir(d.maildir("alice")) if b"<dead1@client.test>" in raw] or None
        [raw] = wait_for(notices, 20, "a delay notice in alice's Maildir")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg["Subject"] == "Delayed Mail (still being retried)"
        human, status = list(msg.iter_parts())[:2]
        assert f"<bob@dead.test>: {reason}\n" in human.get_content()
        per_rcpt = dict(status.get_payload()[1].items())
        assert per_rcpt["Action"] == "delayed"
        assert per_rcpt["Status"] == "4.4.1"
        assert per_rcpt["Diagnostic-Code"] == f"X-Mailhub; {reason}"
        assert "Remote-MTA" not in per_rcpt

        line = re.search(rf"{qid}: to=<bob@dead.test>, .*", d.log()).group(0)
        assert ", relay=none, " in line
        assert line.endswith(f"dsn=4.4.1, status=deferred ({reason})")

        options = QueueOptions()
        options.parseOptions(["list"])
        out = io.StringIO()
        run_queue(options, d.spool, out=out, err=io.StringIO())
        assert f"({reason})\n" in out.getvalue()

        port = int(re.search(r"listening for HTTP on \S+ \(127\.0\.0\.1:(\d+)\)", d.log()).group(1))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/messages/{qid}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            [rcpt] = json.loads(r.read())["recipients"]
        assert (rcpt["last_code"], rcpt["last_status"], rcpt["last_text"], rcpt["remote_mta"]) == (
            0, "4.4.1", reason, "")
    finally:
        assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Starting factory" not in d.log()
    assert "Traceback" not in d.log()
