"""
One mail transaction and its message content: from MAIL to the end of
DATA / BDAT LAST (or RSET), in the manner of OpenSMTPD's C{smtp_tx_*}.

Owns: L{Transaction}, with its behaviour: L{Transaction.open} creates the
spool file and writes the trace header, L{Transaction.feed} /
L{Transaction.feed_chunk} take DATA / BDAT bytes (size limit, bare CR/LF,
the hop count: C{max_hops} C{Received:} fields is a mail loop, C{554 5.4.6
Too many hops}, RFC 5321 6.3), and L{Transaction.finish} returns either
the L{Envelope} to commit or the L{Reply} refusing the message.  The
session commits the envelope and answers 250 only after
L{SpoolWriter.commit} returned (durable before 250); any failure before
that is 451 (L{LOCAL_ERROR}).

Anti-smuggling (CVE-2023-51764 family): a message ends only at
C{CRLF . CRLF} (L{mailhub.smtp.proto.DotDecoder}).  Data containing a bare
CR or bare LF is read up to that real end, discarded, and answered
C{550 5.6.0}.

Must not touch: command parsing, replies' sending, the relay decision
(L{mailhub.smtp.policy}), the spool's files (only through
L{SpoolWriter}), timers, delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from mailhub.envelope import Envelope, Recipient
from mailhub.queue.spool import Spool, SpoolWriter
from mailhub.rfc5322 import after_trace_header
from mailhub.smtp.proto import TOO_BIG, DotDecoder, HopCounter, Reply

__all__ = ["Transaction", "BARE_LINE_ENDING", "LOCAL_ERROR", "TOO_MANY_HOPS"]

log = Logger()

BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")


@dataclass
class Transaction:
    """
    One mail transaction: from MAIL to the end of DATA / BDAT LAST, or RSET.

    The session fills C{recipients} and C{accepted} at RCPT; the message
    methods are called in order: L{open} once, then L{start_data} and
    L{feed} (DATA) or L{feed_chunk} (BDAT), then L{finish} once.
    """

    sender: str
    esmtp: dict[str, Any]
    recipients: dict[str, Recipient] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)  # RCPT TO addresses accepted, as given
    writer: SpoolWriter | None = None
    decoder: DotDecoder | None = None
    hops: HopCounter = field(default_factory=HopCounter)
    size: int = 0
    received: int = 0  # bytes read after DATA / in BDAT chunks, as sent (the "lost connection" line)
    error: Reply | None = None  # first problem found while reading the message
    bdat: bool = False
    max_size: int = 0  # max_message_size when the message was opened; 0: no limit
    max_hops: int = 0  # max_hops when the message was opened; 0: no limit
    _content_started: bool = False  # the first content bytes are written (after_trace_header)

    @property
    def smtputf8(self) -> bool:
        return bool(self.esmtp.get("smtputf8"))

    # -- open ------------------------------------------------------------------------------------------

    def open(self, spool: Spool, header: Callable[[str], bytes], max_size: int, max_hops: int) -> Reply | None:
        """
        Create the spool file and write the trace header C{header(queue_id)};
        L{LOCAL_ERROR} on trouble (the file is gone again; the session
        forgets the transaction).
        """
        self.max_size, self.max_hops = max_size, max_hops
        try:
            self.writer = spool.new_message()
            self.writer.write(header(self.writer.queue_id))
        except Exception:
            log.failure("cannot create a queue file")
            self.abort()
            return LOCAL_ERROR
        return None

    def start_data(self) -> None:
        """DATA: the content comes dot-stuffed and ends at CRLF . CRLF."""
        self.decoder = DotDecoder()

    # -- feed ------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes | None:
        """
        DATA bytes as received: the bytes after the end marker once it
        was seen (the next commands), else C{None}.
        """
        decoder = self.decoder
        assert decoder is not None
        self.received += len(data)
        body, rest = decoder.feed(data)
        if decoder.bare_line_ending and self.error is None:
            self._fail(BARE_LINE_ENDING)
        self._count_hops(body)
        self._take(body)
        return rest

    def feed_chunk(self, data: bytes, write: bool = True) -> None:
        """
        BDAT bytes (counted; C{write}: False while the BDAT command was
        refused, so they are only read, not kept).
        """
        self.received += len(data)
        if write:
            self._count_hops(data)
            self._take(data)

    def _take(self, body: bytes) -> None:
        """Account C{body} to the message and write it unless it is already doomed."""
        self.size += len(body)
        if self.error is not None or not body:
            return
        if self.max_size and self.size > self.max_size:
            self._fail(TOO_BIG)
            return
        try:
            assert self.writer is not None
            if not self._content_started:
                self._content_started = True
                self.writer.write(after_trace_header(body))
            self.writer.write(body)
        except Exception:
            log.failure("queue file write error")
            self._fail(LOCAL_ERROR)

    def _fail(self, why: Reply) -> None:
        """Remember the first problem and stop writing; the reply waits for the end of the data."""
        self.error = why
        if self.writer is not None:
            self.writer.abort()

    def _count_hops(self, body: bytes) -> None:
        """
        Count C{Received:} fields in the header section (RFC 5321 6.3): a
        message that would leave here with more than C{max_hops} of them
        (ours included) is looping and is refused at the end of the data.
        """
        hops = self.hops
        if hops.done:
            return
        hops.feed(body)
        if self.max_hops and hops.count >= self.max_hops and self.error is None:
            self._fail(TOO_MANY_HOPS)

    # -- finish ----------------------------------------------------------------------------------------

    def finish(self, arrival: float, client: dict[str, Any]) -> Envelope | Reply:
        """
        The data ended: the L{Envelope} to commit (arrived at C{arrival},
        from C{client}), or the reply refusing the message (its file is
        removed).
        """
        if self.error is not None:
            self.abort()
            return self.error
        writer = self.writer
        assert writer is not None
        return Envelope(
            queue_id=writer.queue_id,
            sender=self.sender,
            recipients=list(self.recipients.values()),
            arrival=arrival,
            esmtp={k: v for k, v in self.esmtp.items() if k != "declared_size"} | {"size": writer.size} | self._crlf(),
            client=client,
        )

    def _crlf(self) -> dict[str, bool]:
        """
        C{{"crlf": True}} for a message received with DATA: every CR and LF
        in it is part of a CRLF (one with a bare one was refused), so local
        delivery may make its LF copy by deleting the CRs, three times faster
        than replacing each CRLF.  BDAT content is not checked: no key.
        """
        return {"crlf": True} if self.decoder is not None and not self.decoder.bare_line_ending else {}

    def abort(self) -> None:
        """Forget the message's file, if one was opened (RSET, errors, disconnect)."""
        if self.writer is not None:
            self.writer.abort()
