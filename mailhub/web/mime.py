"""
Turning a C{POST /v1/messages} JSON object into a MIME message, safely.

Owns: the JSON submission format (which fields exist, their types and
limits), the header values mailhub writes from them, and the check that the
message it built parses back to exactly the header fields it meant to
write.  L{mailhub.web.api} calls L{build_message} and turns L{InvalidMessage}
into a 400.

Every value that ends up in a header field or a MIME parameter (subject,
reply-to display name and address, addresses, attachment file names and
content types) is checked twice: as given, and after decoding the RFC 2047
encoded words in it as often as the C{email} package would (an encoded word
whose text is itself an encoded word, up to L{MAX_DECODE} levels).  A
control character, a line or paragraph separator at any level is a 400:
the C{email} package re-emits a decoded CR/LF as a real line break, which
would forge header fields or a body.  mailhub then writes the fully decoded
text and lets the C{email} package encode it (RFC 2047 words, RFC 2231
parameters) itself.

Must not touch: the spool, the network, authentication, the envelope
(L{mailhub.web.api} checks sender ownership and recipients).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
import unicodedata
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from mailhub import address
from mailhub.rfc5322 import format_date, message_id

__all__ = ["InvalidMessage", "build_message", "check_header_text", "FIELDS", "ATTACHMENT_FIELDS", "MAX_DECODE"]

#: every field of the JSON object; any other is a 400
FIELDS = frozenset({"from", "to", "cc", "bcc", "subject", "text", "html", "attachments", "reply_to"})
#: every field of an attachment object
ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content_base64"})
#: levels of encoded words decoded (an encoded word inside the text of another); deeper is a 400
MAX_DECODE = 4
#: the longest subject or display name, in characters (RFC 5322's line limit)
MAX_TEXT = 998
#: the longest attachment file name, in characters
MAX_FILENAME = 255
_CTYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")
_FORBIDDEN_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}
_DECODE_POLICY = email.policy.default


class InvalidMessage(ValueError):
    """The JSON object cannot become a safe message; the text says why (a 400)."""


def _bad_char(text: str) -> str | None:
    for c in text:
        if unicodedata.category(c) in _FORBIDDEN_CATEGORIES:
            return c
    return None


def _no_controls(field: str, text: str) -> None:
    c = _bad_char(text)
    if c is not None:
        raise InvalidMessage(f"{field}: control character U+{ord(c):04X} not allowed")


def _decode_once(name: str, text: str) -> str:
    try:
        return str(_DECODE_POLICY.header_factory(name, text))
    except Exception as e:  # the parser's own errors on hostile input
        raise InvalidMessage(f"{name}: cannot be parsed as a header value ({type(e).__name__})")


def check_header_text(field: str, text: str, max_len: int = MAX_TEXT) -> str:
    """
    The text a reader will see for C{text} in an unstructured header field:
    C{text} with its encoded words decoded (repeatedly, up to L{MAX_DECODE}
    levels).  Raises L{InvalidMessage} for a control character, line or
    paragraph separator at any level, or for text longer than C{max_len}.
    """
    if len(text) > max_len:
        raise InvalidMessage(f"{field}: longer than {max_len} characters")
    _no_controls(field, text)
    current = text
    for _ in range(MAX_DECODE):
        if "=?" not in current:
            return current
        decoded = _decode_once("subject", current)
        _no_controls(field, decoded)
        if decoded == current:
            return current
        current = decoded
    if "=?" in current and _decode_once("subject", current) != current:
        raise InvalidMessage(f"{field}: encoded words nested more than {MAX_DECODE} levels")
    return current


def _check_address(field: str, value: Any) -> str:
    """A bare C{local@domain} that the C{email} package writes and reads back unchanged."""
    if not isinstance(value, str) or not value:
        raise InvalidMessage(f"{field}: expected an address (a non-empty string)")
    _no_controls(field, value)
    try:
        address.parse_mailbox(value)
    except address.AddressError as e:
        what = {"from": "invalid sender", "reply_to": "reply_to: invalid address"}.get(field, "invalid recipient")
        raise InvalidMessage(f"{what} {value[:100]!r}: {e}")
    try:
        parsed = _DECODE_POLICY.header_factory("to", value)
        addresses = parsed.addresses
    except Exception:
        addresses = ()
    if len(addresses) != 1 or addresses[0].display_name or addresses[0].addr_spec != value:
        raise InvalidMessage(f"{field}: address {value[:100]!r} cannot be written in a header field as given")
    return value


def _check_reply_to(value: Any) -> Address:
    """C{addr} or C{Name <addr>}, one mailbox, the name checked as header text."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessage("reply_to must be a non-empty string")
    _no_controls("reply_to", value)
    if len(value) > MAX_TEXT:
        raise InvalidMessage(f"reply_to: longer than {MAX_TEXT} characters")
    try:
        parsed = _DECODE_POLICY.header_factory("reply-to", value)
        groups, defects = parsed.groups, parsed.defects
    except Exception:
        groups, defects = (), ()
    if len(groups) != 1 or groups[0].display_name is not None or len(groups[0].addresses) != 1 or defects:
        raise InvalidMessage("reply_to: expected 'address' or 'Name <address>'")
    parsed_address = groups[0].addresses[0]
    addr = _check_address("reply_to", parsed_address.addr_spec)
    name = check_header_text("reply_to", parsed_address.display_name)
    try:
        return Address(display_name=name, addr_spec=addr)
    except (ValueError, IndexError) as e:
        raise InvalidMessage(f"reply_to: {e}")


def _addresses(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidMessage(f"{key} must be a list of addresses")
    return [_check_address(key, v) for v in value]


def _attachment(msg: EmailMessage, i: int, att: Any) -> str:
    """Add attachment C{i}; returns its file name as written."""
    where = f"attachments[{i}]"
    if not isinstance(att, dict):
        raise InvalidMessage(f"{where} must be an object")
    unknown = sorted(set(att) - ATTACHMENT_FIELDS)
    if unknown:
        raise InvalidMessage(f"{where}: unknown field(s): {', '.join(u[:40] for u in unknown[:10])}")
    filename = att.get("filename")
    ctype = att.get("content_type", "application/octet-stream")
    content = att.get("content_base64")
    if not isinstance(filename, str) or not filename:
        raise InvalidMessage(f"{where}.filename missing or invalid")
    filename = check_header_text(f"{where}.filename", filename, MAX_FILENAME)
    if not filename.strip() or any(c in filename for c in "/\\"):
        raise InvalidMessage(f"{where}.filename missing or invalid")
    if not isinstance(ctype, str) or not _CTYPE.fullmatch(ctype):
        raise InvalidMessage(f"{where}.content_type invalid")
    if not isinstance(content, str):
        raise InvalidMessage(f"{where}.content_base64 missing")
    try:
        raw = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMessage(f"{where}.content_base64 is not base64")
    maintype, subtype = ctype.lower().split("/")
    if maintype == "text":
        try:
            msg.add_attachment(raw.decode("utf-8"), subtype=subtype, filename=filename)
            return filename
        except UnicodeDecodeError:
            maintype, subtype = "application", "octet-stream"
    if maintype in ("multipart", "message"):
        maintype, subtype = "application", "octet-stream"
    msg.add_attachment(raw, maintype=maintype, subtype=subtype, filename=filename)
    return filename


def build_message(data: Any, hostname: str, when: float) -> tuple[str, list[str], bytes]:
    """
    The envelope sender, the recipients and the message for one JSON
    submission (docs/http.rst), dated C{when} (its C{Date:} and
    C{Message-ID:} come from L{mailhub.rfc5322}).  Raises L{InvalidMessage} for anything that
    is not a well-typed, known field or cannot be written safely.
    """
    if not isinstance(data, dict):
        raise InvalidMessage("JSON body must be an object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise InvalidMessage(f"unknown field(s): {', '.join(u[:40] for u in unknown[:10])}")
    if not isinstance(data.get("from"), str) or not data.get("from"):
        raise InvalidMessage("missing sender (from)")
    sender = _check_address("from", data["from"])
    lists = {key: _addresses(data, key) for key in ("to", "cc", "bcc")}
    for key in ("subject", "text", "html", "reply_to"):
        if key in data and not isinstance(data[key], str):
            raise InvalidMessage(f"{key} must be a string")
    if "text" not in data and "html" not in data:
        raise InvalidMessage("give text or html")
    subject = check_header_text("subject", data.get("subject", ""))
    reply_to = _check_reply_to(data["reply_to"]) if data.get("reply_to") else None
    attachments = data.get("attachments", [])
    if not isinstance(attachments, list):
        raise InvalidMessage("attachments must be a list")

    msg = EmailMessage(policy=email.policy.SMTP)
    expected = {"from": [sender]}
    msg["From"] = sender
    if lists["to"]:
        msg["To"] = ", ".join(lists["to"])
        expected["to"] = lists["to"]
    if lists["cc"]:
        msg["Cc"] = ", ".join(lists["cc"])
        expected["cc"] = lists["cc"]
    if reply_to is not None:
        msg["Reply-To"] = reply_to
        expected["reply-to"] = [reply_to.addr_spec]
    msg["Subject"] = subject
    msg["Date"] = format_date(when)
    msg["Message-ID"] = message_id(hostname, when)
    msg["MIME-Version"] = "1.0"
    try:
        if "text" in data:
            msg.set_content(data["text"])
            if "html" in data:
                msg.add_alternative(data["html"], subtype="html")
        else:
            msg.set_content(data["html"], subtype="html")
        filenames = [_attachment(msg, i, att) for i, att in enumerate(attachments)]
        out = msg.as_bytes()
    except InvalidMessage:
        raise
    except (ValueError, TypeError, LookupError) as e:
        raise InvalidMessage(f"cannot build the message: {e}")
    _verify(out, expected, subject, reply_to, filenames)
    recipients = lists["to"] + lists["cc"] + lists["bcc"]
    return sender, recipients, out


def _verify(out: bytes, expected: dict[str, list[str]], subject: str, reply_to: Address | None, filenames: list[str]) -> None:
    """The message parses back to exactly the fields written: nothing forged, nothing lost."""
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    names = [k.lower() for k in parsed.keys()]
    want = ["from"] + [k for k in ("to", "cc", "reply-to") if k in expected] + [
        "subject", "date", "message-id", "mime-version", "content-type"]
    have = [n for n in names if n != "content-transfer-encoding"]
    if have != want:
        raise InvalidMessage("the header fields cannot be written safely")
    for key, addrs in expected.items():
        got = [a.addr_spec for a in parsed[key].addresses]
        if got != addrs:
            raise InvalidMessage(f"{key}: cannot be written safely")
    if str(parsed["subject"]) != subject:
        raise InvalidMessage("subject: cannot be written safely")
    if reply_to is not None and parsed["reply-to"].addresses[0].display_name != reply_to.display_name:
        raise InvalidMessage("reply_to: cannot be written safely")
    parts = list(parsed.iter_attachments()) if parsed.is_multipart() else []
    if [p.get_filename() for p in parts] != filenames:
        raise InvalidMessage("attachments: cannot be written safely")
