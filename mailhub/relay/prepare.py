"""
Message preparation for one outbound transaction, before anything is sent.

Owns: deciding, from the envelope, the message file and the extensions the
peer offered, what the transaction looks like -- the MAIL FROM command and
its parameters (SIZE, BODY=8BITMIME, SMTPUTF8, RET, ENVID), the RCPT TO
commands (NOTIFY, ORCPT), and the body to stream -- or the outcome every
recipient gets without a transaction (SMTPUTF8 required but not offered,
conversion impossible, message larger than the peer's SIZE, queue file
unreadable).

8BITMIME: C{BODY=8BITMIME} is sent when the envelope says so and the peer
offers 8BITMIME.  When the peer does not offer it and the message has 8-bit
bytes, the message is converted to 7 bit before it is sent (RFC 6152 3;
Postfix's default, C{disable_mime_output_conversion = no}): 8-bit MIME
bodies become quoted-printable (text) or base64 (others), everything else
is kept byte for byte (L{mailhub.relay.downgrade}).  What cannot be converted
(8-bit headers, 8-bit in a part that must not be encoded) fails for every
recipient of the transaction with status C{5.6.3} (RFC 3463 "Conversion
required but not supported").  A peer that offers SMTPUTF8 is taken to
accept 8-bit data in an SMTPUTF8 transaction (RFC 6531 3.1 requires it to
offer 8BITMIME too).

DKIM: a message signed when it first left (L{mailhub.auth.sign}) carries
its signatures in the envelope, one set over the bytes as queued and one
over their 7-bit form; the set of the form being sent goes above the
message (a converted message without its own set goes unsigned, never
with a signature over other bytes).

SMTPUTF8: required (C{5.6.7} at a peer without it) only when the envelope
addresses are not ASCII, or the message was received with SMTPUTF8 I{and}
its header section really has non-ASCII bytes (RFC 6531 3.2, as Postfix):
an ASCII-only message flagged SMTPUTF8 goes out without the parameter.

Must not touch: the connection (nothing here writes or reads the wire; the
client protocol sends what L{prepare} returns), the spool (the message file
is only read), routing and retry decisions.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.logger import Logger

from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.relay.dotstuff import CHUNK_SIZE
from mailhub.relay.downgrade import ConversionError, downgrade, split_header
from mailhub.relay.reply import LOCAL_CODE

if TYPE_CHECKING:
    from mailhub.queue.queuefile import MessageFile

__all__ = ["MAX_HEADER_SCAN", "Prepared", "prepare", "needs_smtputf8"]

log = Logger()

#: Most bytes read to find the end of a message's header section (for the
#: SMTPUTF8 decision); past it the headers count as possibly non-ASCII.
MAX_HEADER_SCAN = 1024 * 1024


@dataclass(frozen=True)
class Prepared:
    """
    A transaction ready to go: the MAIL command, one RCPT command per
    recipient (in order), and the body to stream with its size.
    """

    mail: str
    rcpts: list[str]
    body: IO[bytes]
    size: int


def needs_smtputf8(envelope: Envelope, recipients: list[Recipient], header: bytes | None) -> bool:
    """
    Whether this transaction cannot go without SMTPUTF8 (RFC 6531 3.2,
    as Postfix): the envelope addresses are not ASCII, or the message
    came in with SMTPUTF8 and its header section (C{header}; None when
    it could not be read within bounds) is not ASCII.  A message flagged
    SMTPUTF8 whose envelope and headers are all ASCII does not need it.
    """
    if not envelope.sender.isascii() or any(not r.address.isascii() for r in recipients):
        return True
    if envelope.esmtp.get("smtputf8"):
        return header is None or not header.isascii()
    return False


def prepare(
    f: MessageFile, envelope: Envelope, recipients: list[Recipient], extensions: dict[str, str], mta: str
) -> Prepared | list[Outcome]:
    """
    The transaction for C{recipients} of the open message C{f} at the peer
    C{mta} that offered C{extensions}, or the outcome of every recipient
    when it cannot be sent there.
    """

    def all_(make: Callable[[Recipient], Outcome]) -> list[Outcome]:
        return [make(r) for r in recipients]

    try:
        size = f.length
        header = _read_header(f) if envelope.esmtp.get("smtputf8") else b""
    except OSError as e:
        unreadable = f"cannot read queue file: {e}"
        return all_(lambda r: Outcome.temporary(r.address, unreadable, LOCAL_CODE, "4.3.0", mta))
    utf8 = needs_smtputf8(envelope, recipients, header)
    if utf8 and "SMTPUTF8" not in extensions:
        return all_(lambda r: Outcome.permanent(
            r.address, f"SMTPUTF8 is required, but was not offered by host {mta}", LOCAL_CODE, "5.6.7", mta))
    # Flagged at MAIL and the peer can take it: pass the flag on.
    utf8 = utf8 or bool(envelope.esmtp.get("smtputf8") and "SMTPUTF8" in extensions)
    body: IO[bytes] = f
    if "8BITMIME" not in extensions and not utf8:
        # RFC 6152 3: no 8-bit data to a peer that did not offer
        # 8BITMIME.  Rare, so the message (at most the size limit)
        # is converted in memory.
        try:
            raw = _read_if_8bit(f)
        except OSError as e:
            unreadable = f"cannot read queue file: {e}"
            return all_(lambda r: Outcome.temporary(r.address, unreadable, LOCAL_CODE, "4.3.0", mta))
        if raw is not None:
            try:
                converted = downgrade(raw)
            except ConversionError as e:
                text = (f"Conversion required but not supported: host {mta} does not offer 8BITMIME "
                        f"and the message cannot be converted to 7 bit ({e})")
                log.info("{text}", text=text)
                return all_(lambda r: Outcome.permanent(r.address, text, LOCAL_CODE, "5.6.3", mta))
            log.info("converted 8-bit message to 7 bit for {mta} ({old} -> {new} bytes)",
                     mta=mta, old=size, new=len(converted))
            body = io.BytesIO(converted)
            size = len(converted)
    signatures = envelope.dkim.get("7bit" if body is not f else "original", "").encode("ascii")
    if signatures:
        body = cast("IO[bytes]", _Prefixed(signatures, body))
        size += len(signatures)
    limit = extensions.get("SIZE", "").strip()
    if limit.isdigit() and int(limit) > 0 and size > int(limit):
        return all_(lambda r: Outcome.permanent(
            r.address, f"message too large for {mta} ({size} > {limit} bytes)", LOCAL_CODE, "5.3.4", mta))

    mail = f"MAIL FROM:<{envelope.sender}>"
    if "SIZE" in extensions:
        mail += f" SIZE={size}"
    if str(envelope.esmtp.get("body", "")).upper() == "8BITMIME" and "8BITMIME" in extensions:
        mail += " BODY=8BITMIME"
    if utf8:
        mail += " SMTPUTF8"
    dsn = "DSN" in extensions
    if dsn:
        ret = str(envelope.esmtp.get("ret", "") or "").upper()
        if ret in ("FULL", "HDRS"):
            mail += f" RET={ret}"
        envid = envelope.esmtp.get("envid")
        if envid:
            # Stored decoded by the server (mailhub.smtp.proto.parse_mail_params): encode again.
            mail += f" ENVID={_xtext(str(envid))}"
    rcpts = []
    for r in recipients:
        cmd = f"RCPT TO:<{r.address}>"
        if dsn:
            if r.notify:
                cmd += " NOTIFY=" + ",".join(n.upper() for n in r.notify)
            orcpt = _orcpt(r)
            if orcpt:
                cmd += " ORCPT=" + orcpt
        rcpts.append(cmd)
    return Prepared(mail, rcpts, body, size)


class _Prefixed(io.RawIOBase):
    """C{prefix}, then what C{rest} reads (from where it is)."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self._prefix:
            if size is None or size < 0:
                out, self._prefix = self._prefix + self._rest.read(), b""
                return out
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            return out
        return self._rest.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_header(f: IO[bytes]) -> bytes | None:
    """
    The header section of the open message file (read from the start, at
    most L{MAX_HEADER_SCAN} bytes; None when it does not end within that),
    leaving the file at its start.
    """
    f.seek(0)
    data = f.read(MAX_HEADER_SCAN + 1)
    f.seek(0)
    eof = len(data) <= MAX_HEADER_SCAN
    data = data[:MAX_HEADER_SCAN]
    norm = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    head, sep, rest, _complete = split_header(norm)
    if sep or rest or eof:
        return head
    return None  # the prefix ended inside the header section: the rest is unknown


def _read_if_8bit(f: IO[bytes]) -> bytes | None:
    """
    The whole message when it has any 8-bit byte, else None; scanned in
    chunks so a 7-bit message is never held in memory.  Leaves the file at
    its start.
    """
    f.seek(0)
    try:
        while True:
            chunk = f.read(CHUNK_SIZE)
            if not chunk:
                return None
            if not chunk.isascii():
                f.seek(0)
                return f.read()
    finally:
        f.seek(0)


def _xtext(value: str) -> str:
    """RFC 3461 4 xtext encoding."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8"))
        for c in value
    )


def _orcpt(r: Recipient) -> str:
    """
    The ORCPT to pass on: the value given at RCPT if there was one, else none.
    The server stores it as "addr-type;address" with the xtext decoded
    (mailhub.smtp.proto.parse_rcpt_params), so the address is always encoded again
    here: an address with "+" or "=" must not go out raw (RFC 3461 4.2).
    """
    if not r.orcpt:
        return ""
    kind, semi, addr = r.orcpt.partition(";")
    if not semi:
        kind, addr = "rfc822", r.orcpt
    if not kind.isascii() or not addr.isascii() or not kind.strip():
        return ""
    return f"{kind.strip()};{_xtext(addr)}"

