"""
The end-of-data stage: what looks at a message after its data ended and
before its commit (Postfix's cleanup with its milters and header checks).

Owns: L{StagedMessage} (the message as the checks see it: its envelope,
its content read back from the L{SpoolWriter}, the header fields to
prepend, the fields for the mail log's "accepted" line), the
L{MessageCheck} contract and L{run_checks}, which runs a listener's checks
in order and stops at the first refusal.

A check is any object with a C{name} and a C{check(message)} method that
returns a L{Reply} (refuse the message: 4xx or 5xx with its own text) or
C{None} (go on), directly or through a Deferred.  It may prepend header
fields (L{StagedMessage.prepend}: they go above everything, our
C{Received} included, as RFC 8601 and RFC 6376 want theirs), replace the
start of the content (L{StagedMessage.replace_start}: how header fields
are deleted, e.g. a forged Authentication-Results), add mail-log
fields, change the envelope's sender, recipients or hold flag, replace
the content (L{StagedMessage.rewrite}: a milter's header and body
changes) or discard the message (C{discard}: 250, nothing committed).  A check that
fails unexpectedly (an exception) makes the message 451 4.3.0, never 5xx:
nothing was accepted yet, the client tries again.

The prepended fields become part of the message only at the commit
(L{SpoolWriter.prepend}): "durable before 250" holds for the message as
the checks left it.

Must not touch: the spool's files (only through the writer), the reply
to the client (the session sends it), timers of the session.  Checks run
in the reactor thread: one that needs the network or the CPU returns a
Deferred and does its work asynchronously or in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.logger import Logger

from mailhub.envelope import Envelope
from mailhub.queue.spool import SpoolWriter
from mailhub.smtp.proto import Reply

__all__ = ["StagedMessage", "MessageCheck", "run_checks", "CHECK_FAILED", "HEADER_LIMIT"]

log = Logger()

#: The reply when a check raised instead of answering.
CHECK_FAILED = Reply(451, "4.3.0", "Error: message checks failed, try again later")

#: At most this many bytes are read back as the header section.
HEADER_LIMIT = 256 * 1024


@dataclass
class StagedMessage:
    """
    A message between the end of its data and its commit.

    @ivar envelope: the envelope to commit; checks may change its sender
        and recipients.
    @ivar writer: the message's content as received (our trace header
        first).
    @ivar trusted: the client may relay: it is in the trusted networks or
        authenticated ("us": authentication checks skip it, signing
        applies).
    @ivar log_fields: extra C{key=value} fields for the "accepted" line.
    @ivar session: the SMTP session the message came from (C{None}
        elsewhere); a check reads only what it documents (the milter
        check: C{session.milter}).
    @ivar discard: a check accepted the message to throw it away: the
        client gets its 250, nothing is committed (a milter's DISCARD).
    """

    envelope: Envelope
    writer: SpoolWriter
    trusted: bool
    log_fields: dict[str, str] = field(default_factory=dict)
    session: Any = None
    discard: bool = False

    @property
    def client(self) -> dict[str, Any]:
        """The envelope's client: C{addr}, C{helo}, C{user}, C{protocol}, C{listener}."""
        return self.envelope.client

    def content(self) -> Iterator[bytes]:
        """The message's bytes as received, in chunks (prepended fields not included)."""
        return self.writer.chunks()

    def header_section(self) -> bytes:
        """The header section, up to and including the empty line (at most L{HEADER_LIMIT} bytes)."""
        seen = bytearray()
        for chunk in self.content():
            seen += chunk
            end = seen.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(seen[: end + 4])
            if len(seen) >= HEADER_LIMIT:
                break
        return bytes(seen[:HEADER_LIMIT])

    def prepend(self, fields: bytes) -> None:
        """Add header field lines (each ending in CRLF) at the top of the message."""
        if not fields.endswith(b"\r\n"):
            raise ValueError("header fields must end with CRLF")
        self.writer.prepend(fields)

    def replace_start(self, length: int, data: bytes) -> None:
        """
        Put C{data} in place of the first C{length} bytes of L{content}
        (e.g. the header section without some fields); written at the commit.
        """
        self.writer.replace_start(length, data)

    def rewrite(self, chunks: Iterable[bytes]) -> None:
        """
        Replace the message's content (prepended fields stay) with
        C{chunks}, which may come from L{content}; file work, so call it
        in a thread.  Bounded in memory (L{SpoolWriter.rewrite}).
        """
        self.writer.rewrite(chunks)


class MessageCheck(Protocol):
    """One step of the end-of-data stage."""

    name: str

    def check(self, message: StagedMessage) -> defer.Deferred[Reply | None] | Reply | None:
        """Refuse the message (a L{Reply}) or let it go on (C{None})."""


def run_checks(checks: Sequence[MessageCheck], message: StagedMessage) -> defer.Deferred[Reply | None]:
    """
    Run C{checks} in order: the first L{Reply} refuses the message and
    stops; an exception is L{CHECK_FAILED}.  Fires with C{None} when every
    check let the message go on.
    """

    async def run() -> Reply | None:
        for one in checks:
            try:
                verdict = cast("Reply | None", await defer.maybeDeferred(one.check, message))
            except Exception:
                log.failure(
                    "{queue_id}: message check {name} failed", queue_id=message.envelope.queue_id, name=one.name
                )
                return CHECK_FAILED
            if verdict is not None:
                return verdict
        return None

    return defer.Deferred.fromCoroutine(run())
