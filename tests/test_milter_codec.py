"""
The milter protocol's wire format (mailhub.milter.codec) and one
connection's deadlines and checks (mailhub.milter.client), in memory with
task.Clock.
"""

from __future__ import annotations

import struct

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mailhub.milter import codec
from mailhub.milter.client import MilterFailure, MilterProtocol, open_milter
from mailhub.milter.codec import MilterProtocolError, Modification, PacketReader, Response
from mailhub.milter.rewrite import Header


def test_packets_are_cut_from_a_stream_in_any_pieces() -> None:
    data = codec.packet(b"c") + codec.packet(b"h", b"X-A\0v\0") + codec.packet(b"a")
    reader = PacketReader()
    got = []
    for i in range(len(data)):
        got += reader.feed(data[i : i + 1])
    assert got == [(b"c", b""), (b"h", b"X-A\0v\0"), (b"a", b"")]


@pytest.mark.parametrize("bad", [
    struct.pack("!I", 0),  # no command byte
    struct.pack("!I", codec.MAX_PACKET + 1) + b"b",  # a huge length: refused before it is buffered
    codec.packet(b"Z"),  # no such reply
])
def test_broken_packets_are_protocol_errors(bad: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        PacketReader().feed(bad)


def test_options_negotiation_with_macro_lists() -> None:
    data = struct.pack("!III", 6, codec.F_ADDHDRS, codec.P_NOHELO | codec.P_NR_HDR)
    data += struct.pack("!I", 0) + b"j {client_addr}\0" + struct.pack("!I", 5) + b"i\0"
    neg = codec.parse_optneg(data)
    assert (neg.version, neg.actions) == (6, codec.F_ADDHDRS)
    assert neg.skips(codec.P_NOHELO) and neg.skips(codec.P_NR_HDR) and not neg.skips(codec.P_NOBODY)
    assert neg.macros == {codec.CONNECT: ("j", "{client_addr}"), codec.BODYEOB: ("i",)}


@pytest.mark.parametrize("data", [
    struct.pack("!III", 7, 0, 0),  # a version we do not speak
    struct.pack("!III", 6, 0x10000, 0),  # an action we do not offer
    struct.pack("!III", 6, 0, 0) + struct.pack("!I", 9) + b"j\0",  # no such macro stage
    struct.pack("!II", 6, 0),  # too short
])
def test_bad_negotiation_is_refused(data: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        codec.parse_optneg(data)


def test_reply_codes_keep_the_milters_code_and_are_cleaned_and_bounded() -> None:
    assert codec.parse_reply(b"y", b"550 5.7.1 Spam message rejected\0") == Response(
        "replycode", 550, "5.7.1", "Spam message rejected")
    got = codec.parse_reply(b"y", b"451 try \x1b[31mlater\r\n" + b"x" * 5000 + b"\0")
    assert isinstance(got, Response) and got.code == 451 and got.enhanced == "4.7.1"
    assert "\x1b" not in got.text and len(got.text) <= codec.MAX_TEXT
    multi = codec.parse_reply(b"y", b"554-5.7.1 first\r\n554 5.7.1 second\0")
    assert multi == Response("replycode", 554, "5.7.1", "first second")


@pytest.mark.parametrize("data", [b"250 2.0.0 ok\0", b"5x0 no\0", b"550 no"])
def test_reply_codes_that_are_no_refusal_are_errors(data: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        codec.parse_reply(b"y", data)


def test_modifications_are_decoded() -> None:
    assert codec.parse_reply(b"h", b"X-Spam\0yes\0") == Modification(b"h", name="X-Spam", value="yes")
    assert codec.parse_reply(b"m", struct.pack("!I", 2) + b"Subject\0\0") == Modification(
        b"m", name="Subject", value="", index=2)
    assert codec.parse_reply(b"e", b"<new@x.test>\0SIZE=10\0") == Modification(b"e", value="<new@x.test>", name="SIZE=10")
    with pytest.raises(MilterProtocolError):
        codec.parse_reply(b"h", b"Bad Name\0v\0")  # a field name with a space
    assert codec.parse_reply(b"p", b"") is None


def test_macros_are_sent_as_the_milter_asked() -> None:
    values = {"j": "mx.test", "{client_addr}": "192.0.2.1", "i": "QID"}
    packet = codec.macro_packet(codec.CONNECT, ["j", "client_addr", "{nothing}"], values)
    assert packet == codec.packet(codec.MACRO, b"C" + b"j\0mx.test\0client_addr\x00192.0.2.1\0")
    assert codec.macro_packet(codec.CONNECT, ["{nothing}"], values) is None


def test_connect_data_for_each_family() -> None:
    assert codec.connect_data("[192.0.2.1]", "192.0.2.1", 25) == b"[192.0.2.1]\x004\x00\x19192.0.2.1\0"
    assert codec.connect_data("h", "2001:db8::1", 25)[2:3] == b"6"
    assert codec.connect_data("h", "", 0) == b"h\0U"


def test_header_values_as_milters_see_them_and_lines_they_add() -> None:
    header = Header(b"Received: from a\r\n\tby b\r\nSubject:  hi\r\n\r\n")
    assert header.for_milter(False) == [("Received", "from a\n\tby b"), ("Subject", "hi")]
    assert header.for_milter(True)[1] == ("Subject", "  hi")
    assert Header.line("DKIM-Signature", "v=1;\n\tb=x\r\nunindented", False) == (
        b"DKIM-Signature: v=1;\r\n\tb=x\r\n\tunindented\r\n")


# -- one connection, with its deadlines ---------------------------------------------------------


def _connected(clock: task.Clock, **kw: float) -> tuple[MilterProtocol, StringTransport]:
    proto = MilterProtocol(clock, "m", kw.get("command", 10.0), kw.get("content", 100.0), 1000)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def _negotiated(clock: task.Clock, actions: int = 0, **kw: float) -> tuple[MilterProtocol, StringTransport]:
    proto, transport = _connected(clock, **kw)
    d = proto.negotiate()
    proto.dataReceived(codec.packet(codec.OPTNEG, struct.pack("!III", 6, actions, 0)))
    assert d.called
    transport.clear()
    return proto, transport


def test_a_command_without_answer_fails_at_its_deadline() -> None:
    clock = task.Clock()
    proto, transport = _negotiated(clock, command=10.0)
    d = proto.ask([codec.packet(codec.HELO, b"x\0")])
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.2)
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(MilterFailure) and "10s" in str(failure[0].value)
    assert transport.disconnecting
    assert proto.ask([codec.packet(codec.HELO, b"x\0")]).addErrback(lambda f: f.check(MilterFailure)).result


def test_progress_restarts_the_content_deadline() -> None:
    clock = task.Clock()
    proto, _ = _negotiated(clock, content=5.0)
    d = proto.end_of_message([codec.packet(codec.BODYEOB)])
    for _ in range(4):
        clock.advance(4)
        proto.dataReceived(codec.packet(codec.PROGRESS))
    proto.dataReceived(codec.packet(codec.ACCEPT))
    assert d.result.response == Response("accept")


def test_an_unsolicited_or_unnegotiated_packet_breaks_the_connection() -> None:
    clock = task.Clock()
    proto, transport = _negotiated(clock, actions=codec.F_ADDHDRS)
    proto.dataReceived(codec.packet(codec.CONTINUE))
    assert proto.failed and "unsolicited" in proto.failed and transport.disconnecting
    proto, transport = _negotiated(clock, actions=codec.F_ADDHDRS)
    d = proto.end_of_message([codec.packet(codec.BODYEOB)])
    proto.dataReceived(codec.packet(codec.DELRCPT, b"<a@b>\0"))  # a change it did not ask for
    failures: list = []
    d.addErrback(failures.append)
    assert failures and "not negotiated" in str(failures[0].value)


def test_a_replacement_body_is_bounded() -> None:
    clock = task.Clock()
    proto, _ = _negotiated(clock, actions=codec.F_CHGBODY)
    d = proto.end_of_message([codec.packet(codec.BODYEOB)])
    proto.dataReceived(codec.packet(codec.REPLBODY, b"x" * 600))
    proto.dataReceived(codec.packet(codec.REPLBODY, b"x" * 600))  # 1200 > max_body 1000
    failures: list = []
    d.addErrback(failures.append)
    assert failures and "larger than" in str(failures[0].value)


def test_the_milter_closing_fails_the_waiting_command() -> None:
    clock = task.Clock()
    proto, _ = _negotiated(clock)
    d = proto.ask([codec.packet(codec.MAIL, b"<a@b>\0")])
    proto.connectionLost(None)
    failures: list = []
    d.addErrback(failures.append)
    assert failures and "closed" in str(failures[0].value)


def test_connecting_has_its_own_deadline() -> None:
    clock = task.Clock()
    proto = MilterProtocol(clock, "m", 10.0, 100.0, 1000)
    pending: defer.Deferred = defer.Deferred()
    d = open_milter(lambda factory: pending, proto, 3.0)
    clock.advance(3.0)
    failures: list = []
    d.addErrback(failures.append)
    assert failures and "cannot connect within 3s" in str(failures[0].value)
