"""
C{mailhub-sendmail -bs}: mailhub's own SMTP server on standard input and
output, committing each accepted message into the pickup area.

Owns: running L{mailhub.smtp.server.SMTPServerFactory}'s protocol over
L{twisted.internet.stdio.StandardIO} in a reactor of its own (one process
per session, as Postfix's C{sendmail -bs}), the sink that stands in for
the spool (L{PickupSink}: each committed message becomes a pickup file,
through L{mailhub.queue.pickupfile.write_pickup}) and the policy of a
local submitter (L{LocalSubmissionPolicy}).  There is one SMTP grammar
in the project: the daemon's listeners and C{-bs} parse commands, dot
stuffing, bare CR/LF and line lengths with the same code and give the
same replies.

What a C{-bs} session is, compared with the daemon's C{smtp} listener:

- the client is the local user who ran the command, trusted like a
  Postfix C{sendmail -bs} user: every recipient is accepted (the daemon's
  pickup resolves aliases and decides delivery), any envelope sender is
  allowed, no AUTH or STARTTLS is offered;
- the peer is reported as C{127.0.0.1} (as Postfix's stand-alone smtpd
  does), so the message's trace header reads C{Received: from HELO
  ([127.0.0.1]) by HOST (mailhub) with ESMTP id NAME}; the daemon adds its
  own C{from userid N} header when it picks the file up, and takes the
  submitter's identity from the file's owner, as for every pickup file;
- the message gets the header fix-ups of a local submission
  (L{mailhub.cli.sendmail_message.compose_message}) when it is committed;
- C{250 ... queued as NAME} names the pickup file, and means the file
  was fsync'd and renamed into C{pickup/new/}.

Must not touch: the SMTP server's internals (only its public factory
constructor), the queue (only the daemon's PickupService reads pickup
files), the network.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from twisted.internet.address import IPv4Address
from twisted.internet.stdio import StandardIO

from mailhub.address import Mailbox
from mailhub.cli.sendmail_message import compose_message, dedupe
from mailhub.cli.sendmail_options import EX_OK, Settings
from mailhub.envelope import Envelope
from mailhub.queue.pickupfile import clean_fullname, unique_name, write_pickup
from mailhub.smtp.factory import SMTPServerFactory
from mailhub.smtp.policy import Session
from mailhub.smtp.proto import Reply
from mailhub.smtp.server import SMTPServer
from mailhub.smtp.settings import SMTPSettings

__all__ = ["LocalSubmissionPolicy", "PickupSink", "PickupMessage", "make_factory", "serve_stdio", "LOCAL_PEER"]

#: The address a -bs client is reported as (Postfix's stand-alone smtpd uses 127.0.0.1 too).
LOCAL_PEER = "127.0.0.1"
#: A message larger than this is held in a temporary file rather than in memory until its commit.
_IN_MEMORY = 1024 * 1024
_READ = 65536


class LocalSubmissionPolicy:
    """
    The relay policy of a C{-bs} session (the interface of
    L{mailhub.smtp.policy.Policy}): the local user may submit from any
    sender to any recipient; a domain-less C{<postmaster>} is
    C{postmaster@ORIGIN}.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def check_mail(self, session: Session) -> Reply | None:
        return None

    def check_sender(self, session: Session, sender: str, owns: Any, sender_check: str = "strict") -> Reply | None:
        return None

    def postmaster(self) -> Mailbox:
        return Mailbox("postmaster", self.origin)

    def check_recipient(self, session: Session, mailbox: Mailbox) -> tuple[Reply, list[str]]:
        return Reply(250, "2.1.5", "Ok"), [str(mailbox)]


class PickupMessage:
    """
    One message on its way into the pickup area, with the interface of
    L{mailhub.queue.spool.SpoolWriter} that the SMTP server uses
    (C{queue_id}, C{write}, C{size}, C{abort}, C{commit}).  The bytes are
    held (in memory, then in an unnamed temporary file) until C{commit},
    which composes the local-submission header and writes the pickup file
    named C{queue_id}: nothing appears in C{pickup/} before that.
    """

    def __init__(self, sink: PickupSink) -> None:
        self.sink = sink
        self.queue_id = unique_name()
        self.size = 0
        self._file: Any = tempfile.SpooledTemporaryFile(max_size=_IN_MEMORY)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def abort(self) -> None:
        self._file.close()

    def _lines(self) -> Iterator[bytes]:
        f = self._file
        f.seek(0)
        while True:
            line = f.readline(_READ)
            if not line:
                return
            yield line

    def commit(self, envelope: Envelope) -> None:
        """
        Write the pickup file (fsync'd and renamed before this returns).

        @raise mailhub.queue.pickupfile.MessageTooLarge: the composed
            message exceeds C{max_message_size} (the server answers 451).
        @raise OSError: the pickup area cannot take it (451).
        """
        sink = self.sink
        settings = sink.settings
        try:
            composed = compose_message(
                self._lines(), envelope.sender, sink.fullname, settings.hostname, settings.origin
            )
            write_pickup(
                settings.spool_path, envelope.sender, dedupe([r.address for r in envelope.recipients]),
                composed.chunks, sink.fullname, settings.max_size, name=self.queue_id,
            )
        finally:
            self._file.close()
        sink.progress.committed = True


class PickupSink:
    """
    What the SMTP server factory calls its spool, for a C{-bs} session:
    C{new_message()} gives a L{PickupMessage}; C{path} is the spool
    directory that holds the pickup area.
    """

    def __init__(self, settings: Settings, fullname: str | None, progress: Any) -> None:
        self.settings = settings
        self.path = settings.spool_path
        self.fullname = clean_fullname(fullname)
        self.progress = progress

    def new_message(self) -> PickupMessage:
        return PickupMessage(self)


class _StdioSession(SMTPServer):
    """A session that stops the command's reactor when it ends."""

    def on_lost(self) -> None:
        """Called once the session is over (set by L{serve_stdio})."""

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.on_lost()


class _LocalStdio(StandardIO):
    """Standard input and output as the transport of a session with the local user."""

    def getPeer(self) -> IPv4Address:  # type: ignore[override]
        return IPv4Address("TCP", LOCAL_PEER, 0)

    def getHost(self) -> IPv4Address:  # type: ignore[override]
        return IPv4Address("TCP", LOCAL_PEER, 0)


def _reactor() -> Any:
    """
    A poll reactor of this process's own: C{poll} works on every kind of
    standard input (a regular file too, which epoll refuses), and no
    global reactor is installed.
    """
    from twisted.internet.pollreactor import PollReactor

    return PollReactor()


def make_factory(settings: Settings, fullname: str | None, progress: Any, clock: Any) -> SMTPServerFactory:
    """
    The SMTP server factory of a C{-bs} session: mailhub's own, with the
    C{[server]} settings, L{PickupSink} as its spool, nothing to enqueue
    (the daemon's pickup takes the file from there), L{LocalSubmissionPolicy},
    no sender ownership check and no free-space check (the pickup area is
    written by the user, under the user's quota).
    """
    return SMTPServerFactory(
        SMTPSettings(
            server=settings.server, listener="smtp", sender_check="off", min_free_space=0, qualify_domain=settings.origin
        ),
        PickupSink(settings, fullname, progress),  # type: ignore[arg-type]
        lambda envelope: None,
        LocalSubmissionPolicy(settings.origin),  # type: ignore[arg-type]
        clock,
    )


def serve_stdio(
    settings: Settings,
    fullname: str | None,
    stdin: BinaryIO,
    stdout: BinaryIO,
    progress: Any,
    reactor: Any = None,
) -> int:
    """
    Run one SMTP session on C{stdin} / C{stdout} (their file descriptors)
    until the client quits or its input ends; return the exit status.

    The factory is mailhub's own (L{mailhub.smtp.server.SMTPServerFactory})
    with the C{[server]} settings of the configuration, L{PickupSink} as
    its spool and L{LocalSubmissionPolicy}; a message whose input ends
    before its final C{.} leaves nothing behind.
    """
    if reactor is None:
        reactor = _reactor()
    factory = make_factory(settings, fullname, progress, reactor)
    session = _StdioSession(factory)
    session.on_lost = lambda: reactor.stop() if reactor.running else None  # type: ignore[method-assign]
    _LocalStdio(session, stdin=stdin.fileno(), stdout=stdout.fileno(), reactor=reactor)  # type: ignore[call-arg]
    reactor.run(installSignalHandlers=False)
    return EX_OK
