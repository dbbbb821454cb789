"""
End to end: a real HAProxy (started here with its own configuration on
127.0.0.1) in front of a real mailhub daemon whose server.proxy_from names
the proxy.  Clients connect to HAProxy from other loopback addresses
(127.0.0.2, 127.0.0.3); HAProxy sends a PROXY v1 (send-proxy) or v2
(send-proxy-v2) header.  The client's address is in the Received header
and in the log, and it decides the relay: the untrusted client behind the
trusted proxy cannot relay, a trusted one can.  A direct connection from
the proxy's address without a header is closed with a log line; a PROXY
header from a client that is no proxy is refused.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess

import pytest
from conftest import require_tool
from daemon import DOMAIN, Daemon, delivered_with, message, wait_for
from peers import free_port, wait_listening

HAPROXY_CONF = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend v1
    bind 127.0.0.1:{v1}
    default_backend mailhub_v1

frontend v2
    bind 127.0.0.1:{v2}
    default_backend mailhub_v2

backend mailhub_v1
    server mailhub 127.0.0.1:{port} send-proxy

backend mailhub_v2
    server mailhub 127.0.0.1:{port} send-proxy-v2
"""


@pytest.fixture
def proxied(tmp_path):
    """A daemon behind HAProxy: yields (daemon, v1 port, v2 port)."""
    binary = require_tool("haproxy")
    d = Daemon(tmp_path, f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = ["127.0.0.1/32", "127.0.0.3/32"]
proxy_from = ["127.0.0.1/32"]
proxy_timeout = 5

[spool]
path = "spool"

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice"]

[relay]
min_backoff = 60
max_backoff = 120
""").start()
    v1, v2 = free_port(), free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(v1=v1, v2=v2, port=d.port))
    proc = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(v1, proc, "haproxy")
        wait_listening(v2, proc, "haproxy")
        yield d, v1, v2
    finally:
        proc.terminate()
        proc.wait(10)
        d.stop()


def client(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20, source_address=(source, 0))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_address_through_haproxy(proxied, version):
    d, v1, v2 = proxied
    port = v1 if version == "v1" else v2
    msgid = f"proxy-{version}"
    with client(port, "127.0.0.2") as s:
        s.ehlo()
        assert s.mail("sender@client.test")[0] == 250
        # untrusted behind the trusted proxy: no relay
        code, reply = s.rcpt("someone@elsewhere.example")
        assert (code, reply[:5]) == (554, b"5.7.1"), reply
        assert s.rcpt(f"alice@{DOMAIN}")[0] == 250
        code, reply = s.data(message(f"alice@{DOMAIN}", msgid))
        assert code == 250, reply
    raw = delivered_with(d, "alice", msgid)
    header = raw.split(b"\n\n", 1)[0]
    assert b"\nReceived: from client.test ([127.0.0.2])\n\tby mx.example.test" in header, raw[:400]
    assert b"127.0.0.1" not in header
    log = wait_for(lambda: "client=[127.0.0.2]" in d.log() and d.log(), 10, "the accepted line")
    assert "connect from [127.0.0.2] listener=smtp tls=False proxy=[127.0.0.1]" in log
    assert "reject: RCPT from [127.0.0.2]: 554 5.7.1" in log
    assert "client=[127.0.0.2]" in log


def test_trusted_client_behind_haproxy_relays(proxied):
    d, v1, v2 = proxied
    with client(v2, "127.0.0.3") as s:
        s.ehlo()
        assert s.mail("sender@client.test")[0] == 250
        code, reply = s.rcpt("someone@elsewhere.example")
        assert (code, reply[:5]) == (250, b"2.1.5"), reply


def test_proxy_address_without_header_is_closed(proxied):
    d, _, _ = proxied
    with socket.create_connection(("127.0.0.1", d.port), timeout=20) as s:
        s.sendall(b"EHLO client.test\r\n")
        assert s.recv(1024) == b""  # closed without a greeting
    wait_for(lambda: "CONNECT from proxy [127.0.0.1]: the connection does not start with a PROXY header" in d.log(),
             10, "the log line")


def test_proxy_header_from_a_client_refused(proxied):
    d, _, _ = proxied
    with socket.create_connection(("127.0.0.1", d.port), timeout=20, source_address=("127.0.0.2", 0)) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 25\r\n")
        assert f.readline() == b"554 5.7.1 Error: PROXY header not accepted from your address\r\n"
        assert f.readline() == b""
    wait_for(lambda: "reject: PROXY from [127.0.0.2]: 554 5.7.1" in d.log(), 10, "the log line")


# -- implicit TLS (smtps): the header before the handshake ----------------------------------------

HAPROXY_SMTPS_CONF = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtps
    bind 127.0.0.1:{front}
    default_backend mailhub_smtps

backend mailhub_smtps
    server mailhub 127.0.0.1:{port} send-proxy-v2
"""


def test_smtps_through_haproxy(tmp_path):
    """
    HAProxy in TCP mode in front of the daemon's smtps listener sends a
    PROXY v2 header in clear, then the client's TLS bytes: the client's
    address is in the Received header and the log; a direct TLS
    connection from the proxy's address, without a header, is closed
    with a log line.
    """
    import re
    import ssl
    import sys

    from mailhub.tls import make_self_signed

    binary = require_tool("haproxy")
    make_self_signed(f"mx.{DOMAIN}", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    d = Daemon(tmp_path, f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
smtps = ["tcp:0:interface=127.0.0.1"]
tls_cert = "cert.pem"
tls_key = "key.pem"
proxy_from = ["127.0.0.1/32"]
proxy_timeout = 5

[auth]
users = "users"
failure_delay = 0

[spool]
path = "spool"

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice"]
""")
    r = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "-C", d.conf, "user", "add", f"alice@{DOMAIN}", "--password-stdin"],
        input="s3cret-Pa55\n", env=d.env(), cwd=d.home, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    d.start()
    proc = None
    try:
        m = re.search(r"listening for SMTPS on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)", d.log())
        assert m, d.log()
        smtps = int(m.group(1))
        front = free_port()
        conf = tmp_path / "haproxy.cfg"
        conf.write_text(HAPROXY_SMTPS_CONF.format(front=front, port=smtps))
        proc = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_listening(front, proc, "haproxy")
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP_SSL("127.0.0.1", front, local_hostname="client.test", context=insecure, timeout=20,
                              source_address=("127.0.0.2", 0)) as s:
            s.ehlo()
            assert s.login(f"alice@{DOMAIN}", "s3cret-Pa55")[0] == 235
            assert s.mail(f"alice@{DOMAIN}")[0] == 250
            assert s.rcpt(f"alice@{DOMAIN}")[0] == 250
            code, reply = s.data(message(f"alice@{DOMAIN}", "proxy-smtps"))
            assert code == 250, reply
        raw = delivered_with(d, "alice", "proxy-smtps")
        header = raw.split(b"\n\n", 1)[0]
        assert b"\nReceived: from client.test ([127.0.0.2])" in header, raw[:400]
        assert b"127.0.0.1" not in header
        log = wait_for(lambda: "connect from [127.0.0.2] listener=smtps" in d.log() and d.log(), 10, "the connect line")
        assert "connect from [127.0.0.2] listener=smtps tls=True proxy=[127.0.0.1]" in log
        # the proxy's own address without a header: TLS is never started, the connection is closed
        with socket.create_connection(("127.0.0.1", smtps), timeout=20) as raw_sock:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                insecure.wrap_socket(raw_sock, server_hostname="x").do_handshake()
        wait_for(lambda: "CONNECT from proxy [127.0.0.1]: the connection does not start with a PROXY header; "
                         "closing; listener=smtps" in d.log(), 10, "the log line")
        # a PROXY header from a client that is no proxy: closed, logged
        with socket.create_connection(("127.0.0.1", smtps), timeout=20, source_address=("127.0.0.2", 0)) as raw_sock:
            raw_sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 465\r\n")
            assert raw_sock.recv(1024) == b""
        wait_for(lambda: "reject: PROXY from [127.0.0.2]: PROXY header not accepted from your address" in d.log(),
                 10, "the log line")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        d.stop()
    assert "Traceback" not in d.log(), d.log()
