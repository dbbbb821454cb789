"""
mailhub.relay.downgrade: 8-bit MIME to 7 bit for a next hop without 8BITMIME.
Exact bytes out; what is converted must decode back to the original.
"""

from __future__ import annotations

import email
import email.policy

import pytest

from mailhub.relay.downgrade import MAX_DEPTH, ConversionError, downgrade, split_header

# no CR or LF: line ends are normalised to CRLF on the way (as in the DATA stream)
JPEGISH = bytes(b for b in range(256) if b not in (10, 13)) * 2


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_seven_bit_message_unchanged_but_crlf():
    assert downgrade(b"Subject: x\n\nplain\r\n.\n") == b"Subject: x\r\n\r\nplain\r\n.\r\n"


def test_split_header():
    assert split_header(b"A: 1\r\n b\r\n\r\nbody") == (b"A: 1\r\n b\r\n", b"\r\n", b"body", True)
    assert split_header(b"A: 1\r\nnot a header\r\n") == (b"A: 1\r\n", b"", b"not a header\r\n", True)
    assert split_header(b"\r\nbody") == (b"", b"\r\n", b"body", True)
    assert split_header(b" A: 1\r\n") == (b"", b"", b" A: 1\r\n", True)  # no continuation of nothing
    assert split_header(b"A: 1\r\nB: 2") == (b"A: 1\r\nB: 2", b"", b"", False)


def test_multipart_text_and_binary_parts_converted_rest_kept_byte_for_byte():
    pdf = JPEGISH
    raw = (
        b"From: a@x.org\r\nSubject:  keep   spacing\r\n\tfolded\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"preamble\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße\r\nline two".encode() + b"\r\n"
        b"--b1 \r\n"  # trailing white space after a delimiter is allowed (RFC 2046 5.1.1)
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\nseven bit\r\n"
        b"--b1\r\n"
        b"Content-Type: application/pdf\r\n\r\n" + pdf + b"\r\n"
        b"--b1--\r\n"
        b"epilogue\r\n"
    )
    out = downgrade(raw)
    assert out.isascii()
    head, _, _ = out.partition(b"\r\n\r\n")
    assert head == raw.partition(b"\r\n\r\n")[0]  # top headers untouched (not re-folded)
    assert b"\r\npreamble\r\n--b1\r\n" in out
    assert (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Gr=C3=BC=C3=9Fe\r\nline two\r\n--b1 \r\n") in out
    assert b"--b1 \r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nseven bit\r\n--b1\r\n" in out
    assert out.endswith(b"--b1--\r\nepilogue\r\n")
    msg = parse(out)
    parts = list(msg.iter_parts())
    assert parts[0].get_content() == "Grüße\r\nline two"
    assert parts[1].get_content() == "seven bit"  # the CRLF before a delimiter is the delimiter's
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert parts[2].get_content() == pdf
    assert not any(p.defects for p in msg.walk())


def test_nested_message_rfc822_and_digest_default():
    inner = b"Subject: inner\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n"
    raw = (
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\n" + inner + b"--d\r\n"
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner + b"--d--\r\n"
    )
    out = downgrade(raw)
    assert out.isascii()
    # a digest part without Content-Type is message/rfc822: its inner body converted, its headers kept
    assert (b"--d\r\n\r\nSubject: inner\r\nContent-Type: text/plain; charset=latin-1\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n--d\r\n") in out
    # the 8bit label of the enclosing message/rfc822 part is now 7bit
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\nSubject: inner\r\n" in out
    for part in parse(out).iter_parts():
        (m,) = part.get_payload()
        assert m.get_content() == "café"


def test_unknown_charset_for_non_utf8_without_content_type():
    out = downgrade(b"Subject: x\r\n\r\ncaf\xe9\r\n")
    assert out == (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=unknown-8bit\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n")


def test_global_headers_part_of_a_bounce_is_encodable():
    raw = (b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"q\"\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n"
           b"--q\r\nContent-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           + "Subject: grüße\r\n".encode() + b"\r\n--q--\r\n")
    out = downgrade(raw)
    assert out.isascii()
    assert b"boundary=\"q\"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n--q\r\n" in out
    assert (b"Content-Type: message/global-headers\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Subject: gr=C3=BC=C3=9Fe\r\n\r\n--q--\r\n") in out


def test_base64_top_level_binary_keeps_final_line_end():
    out = downgrade(b"Content-Type: application/octet-stream\r\n\r\n\x00\xff\x80")
    assert out == (b"Content-Type: application/octet-stream\r\nMIME-Version: 1.0\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\nAP+A\r\n")


@pytest.mark.parametrize("raw, why", [
    ("Subject: ü\r\n\r\nx\r\n".encode(), "8-bit data in a message header"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + "X-Name: ü\r\n\r\nx\r\n--b--\r\n".encode(),
     "8-bit data in a message header"),
    (b"Content-Type: multipart/mixed\r\n\r\n\xff\r\n", "8-bit data in multipart/mixed without a boundary"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n\xff\r\n", "8-bit data in multipart/mixed with no part"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n\xff\r\n--b\r\n\r\nx\r\n--b--\r\n",
     "8-bit data in the preamble of multipart/mixed"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n\xff\r\n",
     "8-bit data in the epilogue of multipart/mixed"),
    (b"Content-Type: message/external-body; access-type=x\r\n\r\n\xff\r\n",
     "8-bit data in message/external-body, which must not be encoded"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\xff\r\n",
     "8-bit data in a part encoded as quoted-printable"),
    (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\r\n",
     "message/rfc822 with Content-Transfer-Encoding base64"),
])
def test_unconvertible(raw, why):
    with pytest.raises(ConversionError) as e:
        downgrade(raw)
    assert str(e.value) == why


def test_nesting_is_bounded():
    raw = b"\xff\r\n"
    for _ in range(MAX_DEPTH + 5):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    with pytest.raises(ConversionError, match="too deep"):
        downgrade(raw)


def test_no_close_delimiter_last_part_runs_to_the_end():
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n\xe9\r\n"
    out = downgrade(raw)
    assert out == (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                   b"Content-Type: text/plain; charset=unknown-8bit\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n")


def test_long_8bit_lines_are_wrapped_and_decode_back():
    text = ("é" * 500 + "\r\n") * 3
    out = downgrade(b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode())
    assert max(len(line) for line in out.split(b"\r\n")) <= 76
    assert parse(out).get_content() == text
