"""
Tests for the -bs session in memory: mailhub's SMTP server built by
L{mailhub.cli.sendmail_bs.make_factory} on a StringTransport and a
task.Clock, committing into a pickup area in tmp_path.
"""

from __future__ import annotations

import os

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailhub.cli.sendmail import Progress
from mailhub.cli.sendmail_bs import make_factory
from mailhub.cli.sendmail_options import load_settings
from mailhub.queue.pickupfile import ensure_pickup_dirs, pickup_dirs, read_header


@pytest.fixture
def session(tmp_path):
    config = tmp_path / "mailhub.toml"
    config.write_text(
        '[server]\nhostname = "mx.example"\nmax_message_size = 400\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        '[local]\ndomains = ["example.org"]\nmailboxes = "mail"\n'
    )
    settings = load_settings(str(config))
    os.makedirs(settings.spool_path, exist_ok=True)
    ensure_pickup_dirs(settings.spool_path)
    progress = Progress()
    factory = make_factory(settings, "Alice", progress, task.Clock())
    peer = IPv4Address("TCP", "127.0.0.1", 0)
    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport, settings, progress


def _files(settings):
    tmp, new = pickup_dirs(settings.spool_path)
    return sorted(os.listdir(new)), os.listdir(tmp)


def _replies(transport):
    return transport.value().decode().split("\r\n")


def test_any_sender_and_recipient_accepted_and_committed(session):
    proto, transport, settings, progress = session
    proto.dataReceived(b"EHLO x\r\nMAIL FROM:<someone@else.test>\r\nRCPT TO:<far@away.test>\r\n"
                       b"RCPT TO:<Postmaster>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
    replies = _replies(transport)
    assert replies[-6:-1] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                              "354 End data with <CR><LF>.<CR><LF>", replies[-2]]
    name = replies[-2].removeprefix("250 2.0.0 Ok: queued as ")
    assert _files(settings) == ([name], [])
    assert progress.committed
    with open(os.path.join(pickup_dirs(settings.spool_path)[1], name), "rb") as f:
        header = read_header(f)
        body = f.read()
    assert header.sender == "someone@else.test"
    assert header.recipients == ("far@away.test", "postmaster@example.org")
    assert header.fullname == "Alice"
    assert b"\r\nFrom: Alice <someone@else.test>\r\n" in body


def test_bare_names_are_qualified_with_the_origin_domain(session):
    """As Postfix's append_at_myorigin and the sendmail -bs of old: <root> is root@ORIGIN, sender too."""
    proto, transport, settings, progress = session
    proto.dataReceived(b"EHLO x\r\nMAIL FROM:<alice>\r\nRCPT TO:<root>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
    replies = _replies(transport)
    assert replies[-5:-2] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    name = replies[-2].removeprefix("250 2.0.0 Ok: queued as ")
    with open(os.path.join(pickup_dirs(settings.spool_path)[1], name), "rb") as f:
        header = read_header(f)
    assert (header.sender, header.recipients) == ("alice@example.org", ("root@example.org",))


def test_rset_and_cut_off_data_leave_nothing(session):
    proto, transport, settings, progress = session
    proto.dataReceived(b"HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\npart\r\n")
    proto.readConnectionLost()
    assert _files(settings) == ([], [])
    assert not progress.committed


def test_header_fix_ups_over_the_size_limit_are_a_temporary_failure(session):
    """The data fits max_message_size, the added From/Date/Message-ID do not: 451, nothing in pickup."""
    proto, transport, settings, progress = session
    proto.dataReceived(b"HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                       + b"x" * 300 + b"\r\n.\r\n")
    assert _replies(transport)[-2] == "451 4.3.0 Error: queue file write error"
    assert _files(settings) == ([], [])
    assert not progress.committed
