"""
Property-based tests of the parsers of what hostile peers send: a
milter's packets, a PROXY header, an LMTP server's replies, an MTA-STS
policy file, TLSA rdata.  Whatever the bytes, each parser either accepts
or refuses with its own error: no other exception, nothing unbounded,
and what it lets through is well-formed.  Profiles: tests/fuzzing.py.
"""

from __future__ import annotations

import ipaddress
import struct

from fuzzing import LogCapture  # noqa: F401 -- loads the profile
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport

from mailhub.delivery.lmtpclient import LMTPClient
from mailhub.milter import codec
from mailhub.milter.rewrite import Header
from mailhub.relay.dane import TLSA
from mailhub.relay.mtasts import PolicyError, parse_policy
from mailhub.smtp.proxyheader import ProxyHeaderReader

_REPLIES = sorted(codec._KNOWN_REPLIES)


@st.composite
def milter_packets(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from([*_REPLIES, b"\x00", b"z"]))
    data = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(data) + 1), st.integers(0, 2**32 - 1)))
    return struct.pack("!I", length) + command + data


@given(st.lists(milter_packets(), max_size=8), st.integers(1, 7))
def test_milter_replies_parse_or_are_protocol_errors(packets, cut):
    reader = codec.PacketReader()
    stream = b"".join(packets)
    try:
        for start in range(0, len(stream), cut):
            for command, data in reader.feed(stream[start : start + cut]):
                reply = codec.parse_reply(command, data) if command != codec.OPTNEG else codec.parse_optneg(data)
                if isinstance(reply, codec.Modification) and reply.kind in (codec.ADDHEADER, codec.CHGHEADER):
                    line = Header.line(reply.name, reply.value, False)
                    body = line[:-2]
                    assert b"\0" not in line and body.count(b"\r") == body.count(b"\r\n") == body.count(b"\n")
                    assert all(fold[:1] in (b" ", b"\t") for fold in body.split(b"\r\n")[1:])
                if isinstance(reply, codec.Response) and reply.kind == "replycode":
                    assert 400 <= reply.code < 600 and len(reply.text) <= codec.MAX_TEXT
                    assert all(" " <= c <= "~" for c in reply.text)
    except codec.MilterProtocolError:
        pass


@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda rest: b"PROXY " + rest, st.binary(max_size=120)),
    st.builds(lambda rest: codec_v2_prefix() + rest, st.binary(max_size=80)),
), st.integers(1, 9))
def test_proxy_headers_name_an_ip_address_or_fail(data, cut):
    out: list = []
    reader = ProxyHeaderReader("192.0.2.5", task.Clock(), 10, lambda c, rest: out.append(("ok", c, rest)),
                               lambda why: out.append(("fail", why)))
    for start in range(0, len(data), cut):
        reader.feed(data[start : start + cut])
    assert len(out) <= 1
    if out and out[0][0] == "ok":
        addr = ipaddress.ip_address(out[0][1])
        assert str(addr) == out[0][1] and "%" not in out[0][1]
        assert not (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped)
        assert data.endswith(out[0][2])


def codec_v2_prefix() -> bytes:
    return b"\r\n\r\n\x00\r\nQUIT\n"


@given(st.binary(max_size=3000), st.integers(1, 50))
def test_lmtp_replies_never_raise(data, cut):
    client = LMTPClient(task.Clock(), "mx.example.test", "lmtp", 10.0, 20.0)
    client.makeConnection(StringTransport())
    for start in range(0, len(data), cut):
        client.dataReceived(data[start : start + cut])
    assert client.ready.called or len(client._buf) <= 2048


@given(st.lists(st.one_of(
    st.sampled_from(["version: STSv1", "mode: enforce", "mode: testing", "mode: none", "max_age: 86400"]),
    st.builds(lambda v: "mx: " + v, st.text(max_size=30)),
    st.text(max_size=40),
), max_size=12), st.sampled_from(["\n", "\r\n", "\r"]))
def test_policy_files_parse_to_bounded_patterns_or_fail(lines, end):
    try:
        policy = parse_policy(end.join(lines).encode("utf-8"))
    except PolicyError:
        return
    assert 0 <= policy.max_age <= 31557600
    for pattern in policy.mx:
        assert pattern.isascii() and pattern.isprintable() and " " not in pattern and "*" not in pattern[1:]


@given(st.binary(max_size=100))
def test_tlsa_rdata_parses_or_is_refused(raw):
    try:
        rec = TLSA.parse(raw)
    except ValueError:
        assert len(raw) < 4
        return
    if rec.usable:
        assert rec.usage in (2, 3) and rec.selector in (0, 1) and rec.data
