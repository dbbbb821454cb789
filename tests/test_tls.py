"""
Tests for mailhub.tls: self-signed certificates, TLS versions, reload
without dropping listeners, implicit TLS endpoints.  The servers run in the
real reactor (conftest C{reactor} fixture) on 127.0.0.1; clients use
Python's ssl module from the test thread.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import stat
import threading

import pytest
from conftest import in_reactor
from cryptography import x509
from twisted.internet import protocol
from twisted.logger import globalLogPublisher

from mailhub import tls

HOST = "mail.example"

# The refusal tests must configure the deprecated versions on the client.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")


class Echo(protocol.Protocol):
    """Greets (after starting TLS, if asked to) and echoes."""

    def connectionMade(self) -> None:
        if self.factory.starttls is not None:
            self.transport.startTLS(self.factory.starttls.options())
        self.transport.write(b"220 hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def echo_factory(starttls: tls.ServerTLS | None) -> protocol.Factory:
    factory = protocol.Factory.forProtocol(Echo)
    factory.starttls = starttls
    return factory


@pytest.fixture
def certs(tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls.make_self_signed(HOST, cert, key, days=30)
    return cert, key


def serial_of(path: str) -> int:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def client_context(cafile: str | None = None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        # Let the client really offer old versions, so that a refusal comes
        # from the server and not from the client's own OpenSSL policy.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=HOST)


def peer_serial(sock: ssl.SSLSocket) -> int:
    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number


def read_line(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def starttls_server(reactor, certs):
    """A plain TCP listener whose protocol calls startTLS at once."""
    server_tls = tls.ServerTLS(*certs)
    port = in_reactor(reactor, reactor.listenTCP, 0, echo_factory(server_tls), interface="127.0.0.1")
    yield server_tls, port.getHost().port
    in_reactor(reactor, port.stopListening)


# -- make_self_signed ---------------------------------------------------------


def test_make_self_signed(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    tls.make_self_signed("Mail.Example.ORG", cert, key, days=10)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with open(cert, "rb") as f:
        c = x509.load_pem_x509_certificate(f.read())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["Mail.Example.ORG"]
    lifetime = c.not_valid_after_utc - c.not_valid_before_utc
    assert datetime.timedelta(days=10) <= lifetime <= datetime.timedelta(days=10, minutes=10)
    assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # The pair loads.
    assert tls.ServerTLS(cert, key).certificate.serial_number == c.serial_number


def test_make_self_signed_ip_literal_and_replaces_key_mode(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    with open(key, "w") as f:
        f.write("old")
    os.chmod(key, 0o644)
    tls.make_self_signed("127.0.0.1", cert, key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with open(cert, "rb") as f:
        c = x509.load_pem_x509_certificate(f.read())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_make_self_signed_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        tls.make_self_signed("", str(tmp_path / "c"), str(tmp_path / "k"))
    with pytest.raises(ValueError):
        tls.make_self_signed("h", str(tmp_path / "c"), str(tmp_path / "k"), days=0)


# -- startup errors name the file ---------------------------------------------


def test_missing_certificate_names_file(tmp_path, certs):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="nope.pem: cannot read TLS certificate"):
        tls.ServerTLS(missing, certs[1])
    with pytest.raises(ValueError, match="nope.pem: cannot read TLS private key"):
        tls.ServerTLS(certs[0], missing)


def test_garbage_files_name_file(tmp_path, certs):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem file\n")
    with pytest.raises(ValueError, match="junk.pem: not a PEM certificate"):
        tls.ServerTLS(str(junk), certs[1])
    with pytest.raises(ValueError, match="junk.pem: not a PEM private key"):
        tls.ServerTLS(certs[0], str(junk))


def test_mismatched_key(tmp_path, certs):
    other_cert, other_key = str(tmp_path / "o.crt"), str(tmp_path / "o.key")
    tls.make_self_signed(HOST, other_cert, other_key)
    with pytest.raises(ValueError, match="o.key: private key does not match certificate"):
        tls.ServerTLS(certs[0], other_key)


def test_chain_file_is_accepted(tmp_path, certs):
    """A fullchain.pem (leaf + intermediates) loads; the leaf is served."""
    other_cert, other_key = str(tmp_path / "o.crt"), str(tmp_path / "o.key")
    tls.make_self_signed("ca.example", other_cert, other_key)
    chain = tmp_path / "fullchain.pem"
    chain.write_bytes(open(certs[0], "rb").read() + open(other_cert, "rb").read())
    server_tls = tls.ServerTLS(str(chain), certs[1])
    assert server_tls.certificate.serial_number == serial_of(certs[0])


def test_options_is_the_reloadable_object(certs):
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

    server_tls = tls.ServerTLS(*certs)
    assert server_tls.options() is server_tls
    assert IOpenSSLServerConnectionCreator.providedBy(server_tls.options())


# -- real handshakes ----------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_refused(starttls_server, version):
    _, port = starttls_server
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|unsupported protocol"):
        tls_connect(port, client_context(version=version))


@pytest.mark.parametrize(
    "version,name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")]
)
def test_modern_tls_accepted_and_verifies(starttls_server, certs, version, name):
    _, port = starttls_server
    ctx = client_context(cafile=certs[0])  # verifies the chain and the host name
    ctx.minimum_version = ctx.maximum_version = version
    with tls_connect(port, ctx) as s:
        assert s.version() == name
        assert read_line(s) == b"220 hello\r\n"
        s.sendall(b"ping\r\n")
        assert read_line(s) == b"ping\r\n"


def test_reload_swaps_certificate_for_new_connections(reactor, starttls_server, certs):
    server_tls, port = starttls_server
    first = serial_of(certs[0])
    old = tls_connect(port, client_context())
    try:
        assert read_line(old) == b"220 hello\r\n"
        assert peer_serial(old) == first

        tls.make_self_signed(HOST, *certs)
        second = serial_of(certs[0])
        assert second != first
        assert in_reactor(reactor, server_tls.reload) is True
        assert server_tls.certificate.serial_number == second

        with tls_connect(port, client_context(cafile=certs[0])) as new:
            assert read_line(new) == b"220 hello\r\n"
            assert peer_serial(new) == second
        # The session opened before the reload goes on with its certificate.
        old.sendall(b"still here\r\n")
        assert read_line(old) == b"still here\r\n"
        assert peer_serial(old) == first
    finally:
        old.close()


def test_reload_with_bad_file_keeps_old_certificate(reactor, starttls_server, certs, tmp_path):
    server_tls, port = starttls_server
    first = serial_of(certs[0])
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with open(certs[0], "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\ntruncated\n")
        assert in_reactor(reactor, server_tls.reload) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    errors = [e for e in events if e.get("log_format", "").startswith("TLS reload failed")]
    assert len(errors) == 1
    assert "cert.pem: not a PEM certificate file" in errors[0]["reason"]
    with tls_connect(port, client_context()) as s:
        assert read_line(s) == b"220 hello\r\n"
        assert peer_serial(s) == first

    # A key that does not match the (new) certificate is refused as well.
    other = str(tmp_path / "other")
    tls.make_self_signed(HOST, other + ".crt", other + ".key")
    os.replace(other + ".crt", certs[0])
    assert in_reactor(reactor, server_tls.reload) is False
    assert server_tls.certificate.serial_number == first


def test_sighup_reloads(reactor, starttls_server, certs):
    server_tls, port = starttls_server
    done = threading.Event()
    uninstall = tls.install_sighup_reload(server_tls, reactor, also=done.set)
    try:
        tls.make_self_signed(HOST, *certs)
        os.kill(os.getpid(), signal.SIGHUP)
        assert done.wait(10)
    finally:
        uninstall()
    assert server_tls.certificate.serial_number == serial_of(certs[0])
    with tls_connect(port, client_context()) as s:
        assert peer_serial(s) == serial_of(certs[0])


# -- implicit TLS -------------------------------------------------------------


def test_implicit_tls_endpoint(reactor, certs):
    server_tls = tls.ServerTLS(*certs)
    endpoint = tls.implicit_tls_endpoint(reactor, "tcp:0:interface=127.0.0.1", server_tls)
    port = in_reactor(reactor, endpoint.listen, echo_factory(None))
    try:
        number = port.getHost().port
        with tls_connect(number, client_context(cafile=certs[0])) as s:
            assert read_line(s) == b"220 hello\r\n"
            s.sendall(b"EHLO x\r\n")
            assert read_line(s) == b"EHLO x\r\n"
            assert peer_serial(s) == serial_of(certs[0])
        # Plain text is not spoken there: a TLS server waits for a
        # ClientHello and answers garbage with an alert, never a greeting.
        with socket.create_connection(("127.0.0.1", number), timeout=10) as raw:
            raw.sendall(b"EHLO x\r\n" * 10)
            reply = raw.recv(100)
            assert not reply.startswith(b"220")
        with pytest.raises(ssl.SSLError):
            tls_connect(number, client_context(version=ssl.TLSVersion.TLSv1_1))
        # Reload reaches the implicit listener too.
        tls.make_self_signed(HOST, *certs)
        assert in_reactor(reactor, server_tls.reload) is True
        with tls_connect(number, client_context(cafile=certs[0])) as s:
            assert peer_serial(s) == serial_of(certs[0])
    finally:
        in_reactor(reactor, port.stopListening)


def test_implicit_tls_endpoint_refuses_ssl_strings(reactor, certs):
    server_tls = tls.ServerTLS(*certs)
    with pytest.raises(ValueError, match="plain endpoint"):
        tls.implicit_tls_endpoint(reactor, "ssl:465:privateKey=k.pem", server_tls)
