"""
8-bit to 7-bit MIME conversion, for a next hop that does not offer 8BITMIME
(RFC 6152 section 3: the client must convert the message to 7 bit, or not
deliver it and report a permanent error).

Owns: finding where a message's header section ends, telling whether a
message needs converting, and the conversion itself: each MIME leaf whose
body has 8-bit bytes and is labelled 7bit, 8bit, binary (or not at all) is
re-encoded -- quoted-printable for text/* (and the RFC 6532/6533
message/global* types, which may be encoded), base64 for everything else --
and its Content-Transfer-Encoding header replaced.  Multiparts and
message/rfc822 are walked recursively.  Everything else is kept byte for
byte: headers are never re-folded, delimiters, preambles, epilogues and
7-bit parts are copied as they are.  This is what Postfix does by default
(C{disable_mime_output_conversion = no}).

What cannot be converted raises L{ConversionError} (the caller reports
C{554 5.6.3}, RFC 3463 "Conversion required but not supported"): 8-bit bytes
in a header section (that is SMTPUTF8 territory, RFC 6532), in a multipart
preamble or epilogue, in a multipart without a usable boundary, in an
already base64/quoted-printable encoded part (corrupt), in a message/* type
that must not be encoded (RFC 2046 5.2), or nesting deeper than L{MAX_DEPTH}.

Must not touch: the network, the spool, the reactor (bytes in, bytes out;
L{mailhub.relay.prepare} reads the file and decides, the client sends the result).
"""

from __future__ import annotations

import base64
import binascii
import re
from email import message_from_bytes
from email.policy import compat32

from mailhub.rfc5322 import is_field_line

__all__ = ["ConversionError", "downgrade", "split_header", "MAX_DEPTH"]

#: Deepest MIME nesting we walk (a hostile message cannot recurse us to death).
MAX_DEPTH = 50

_CTE = re.compile(rb"content-transfer-encoding[ \t]*:", re.I)
_MIME_VERSION = re.compile(rb"mime-version[ \t]*:", re.I)
_CONTENT_TYPE = re.compile(rb"content-type[ \t]*:", re.I)
#: types whose body is a whole message we can convert inside
_MESSAGE_TYPES = ("message/rfc822",)
#: message/* types that may carry a quoted-printable / base64 encoding
_ENCODABLE_MESSAGE_TYPES = ("message/global", "message/global-headers", "message/global-delivery-status")
_IDENTITY_CTE = ("", "7bit", "8bit", "binary")


class ConversionError(Exception):
    """The message has 8-bit data that cannot be made 7-bit; the text says where."""


def _crlf(data: bytes) -> bytes:
    """CR LF line ends throughout (bare CR and bare LF become CR LF, as the DATA stream does)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def split_header(data: bytes) -> tuple[bytes, bytes, bytes, bool]:
    """
    (header section, separator, body, complete) of a CRLF entity.  The
    header section ends at the first line that is neither a header field
    nor a continuation line (as the email package reads it): an empty line
    is the separator; any other line starts the body, with no separator.
    C{complete} is False when C{data} ended inside the header section with
    no final line end (a truncated prefix: the caller cannot know what
    follows).
    """
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\r\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        if line == b"":
            return data[:pos], b"\r\n", data[pos + 2 :], True
        is_field = is_field_line(line) or (pos > 0 and line[:1] in (b" ", b"\t"))
        if not is_field:
            return data[:pos], b"", data[pos:], True
        if end < 0:
            return data, b"", b"", False
        pos = end + 2
    return data, b"", b"", True


def _fields(headers: bytes) -> list[bytes]:
    """The raw header fields, each with its continuation lines and CRLFs."""
    out: list[bytes] = []
    if not headers:
        return out
    for line in headers.split(b"\r\n")[:-1] if headers.endswith(b"\r\n") else headers.split(b"\r\n"):
        if out and line[:1] in (b" ", b"\t"):
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


def downgrade(message: bytes) -> bytes:
    """
    The message with every 8-bit body made 7-bit, line ends CRLF.  A message
    that is already 7-bit comes back unchanged (apart from line ends).

    @raise ConversionError: 8-bit data that cannot be converted (5.6.3).
    """
    data = _crlf(message)
    if data.isascii():
        return data
    return _entity(data, "text/plain", top=True, depth=0)


def _entity(data: bytes, default_type: str, top: bool, depth: int) -> bytes:
    if data.isascii():
        return data
    if depth > MAX_DEPTH:
        raise ConversionError("MIME nesting too deep")
    headers, sep, body, _ = split_header(data)
    if not headers.isascii():
        raise ConversionError("8-bit data in a message header")
    info = message_from_bytes(headers + b"\r\n", policy=compat32)
    info.set_default_type(default_type)
    ctype = info.get_content_type()
    cte = str(info.get("Content-Transfer-Encoding", "")).strip().lower()
    if ctype.startswith("multipart/"):
        if cte not in _IDENTITY_CTE:
            raise ConversionError(f"{ctype} with Content-Transfer-Encoding {cte}")
        inner = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        new_body = _multipart(body, info.get_boundary(), ctype, inner, depth)
        return _relabel(headers, "7bit" if cte not in ("", "7bit") else None) + (sep or b"\r\n") + new_body
    if ctype in _MESSAGE_TYPES:
        if cte not in _IDENTITY_CTE:
            raise ConversionError(f"{ctype} with Content-Transfer-Encoding {cte}")
        new_body = _entity(body, "text/plain", top=False, depth=depth + 1)
        return _relabel(headers, "7bit" if cte not in ("", "7bit") else None) + (sep or b"\r\n") + new_body
    if ctype.startswith("message/") and ctype not in _ENCODABLE_MESSAGE_TYPES:
        raise ConversionError(f"8-bit data in {ctype}, which must not be encoded")
    if cte not in _IDENTITY_CTE:
        raise ConversionError(f"8-bit data in a part encoded as {cte}")
    if ctype.startswith("text/") or ctype in _ENCODABLE_MESSAGE_TYPES:
        encoding = "quoted-printable"
        encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
        if not encoded.isascii() or b"\n" in encoded.replace(b"\r\n", b""):  # pragma: no cover - b2a_qp guarantees
            raise ConversionError("quoted-printable encoding failed")
    else:
        encoding = "base64"
        encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
        if top:
            pass  # the message's own last line end
        elif encoded.endswith(b"\r\n"):
            encoded = encoded[:-2]  # the CRLF before the next delimiter is the delimiter's
    extra = b""
    if top and not any(_MIME_VERSION.match(f) for f in _fields(headers)):
        extra += b"MIME-Version: 1.0\r\n"
    if not any(_CONTENT_TYPE.match(f) for f in _fields(headers)) and default_type == "text/plain":
        # text/plain's default charset is us-ascii: say what the bytes are.
        try:
            body.decode("utf-8")
            charset = "utf-8"
        except UnicodeDecodeError:
            charset = "unknown-8bit"  # RFC 1428
        extra += f"Content-Type: text/plain; charset={charset}\r\n".encode("ascii")
    return _relabel(headers, encoding, extra) + b"\r\n" + encoded


def _relabel(headers: bytes, cte: str | None, extra: bytes = b"") -> bytes:
    """
    The header section with C{extra} fields added and its
    Content-Transfer-Encoding set to C{cte} (None: unchanged); the other
    fields keep their bytes and order.
    """
    if cte is None:
        return headers
    fields = _fields(headers)
    if fields and not fields[-1].endswith(b"\r\n"):
        fields[-1] += b"\r\n"
    kept = [f for f in fields if not _CTE.match(f)]
    return b"".join(kept) + extra + f"Content-Transfer-Encoding: {cte}\r\n".encode("ascii")


def _multipart(body: bytes, boundary: str | None, ctype: str, inner: str, depth: int) -> bytes:
    """The body of a multipart with each part converted; delimiters and the rest kept as they are."""
    if not boundary or not boundary.isascii():
        raise ConversionError(f"8-bit data in {ctype} without a boundary")
    delim = re.compile(rb"(?m)^--" + re.escape(boundary.encode("ascii")) + rb"(--)?[ \t]*\r?$")
    spans: list[tuple[int, int]] = []  # (start, end) of each part's content
    start: int | None = None
    last_end = 0
    closed = False
    for m in delim.finditer(body):
        if start is None and not spans:
            if m.group(1):
                continue  # a close delimiter before any part: not one of ours
            if not body[: max(0, m.start() - 2)].isascii():
                raise ConversionError(f"8-bit data in the preamble of {ctype}")
        else:
            assert start is not None
            end = m.start() - 2 if m.start() - 2 >= start else start
            spans.append((start, end))
        after = m.end() + 1 if body[m.end() : m.end() + 1] == b"\n" else m.end()
        last_end = after
        if m.group(1):
            closed = True
            start = None
            break
        start = after
    if not spans and start is None:
        raise ConversionError(f"8-bit data in {ctype} with no part")
    if start is not None:  # no close delimiter: the last part runs to the end
        spans.append((start, len(body)))
        last_end = len(body)
    if closed and not body[last_end:].isascii():
        raise ConversionError(f"8-bit data in the epilogue of {ctype}")
    out = []
    pos = 0
    for s, e in spans:
        out.append(body[pos:s])
        out.append(_entity(body[s:e], inner, top=False, depth=depth + 1))
        pos = e
    out.append(body[pos:])
    return b"".join(out)
