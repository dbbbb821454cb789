"""
The content of a mail transaction: DATA / BDAT bytes into the spool file,
the trace header, the hop count and the commit.

Owns: L{Transaction} (one mail transaction: from MAIL to the end of
DATA / BDAT LAST, or RSET) and L{MessageMixin}, mixed into
L{mailhub.smtp.server.SMTPServer}: opening the spool file with its C{Received:}
header, writing message bytes (size limit, bare CR/LF, C{max_hops}
C{Received:} fields is a mail loop: C{554 5.4.6 Too many hops}, RFC 5321
6.3), and at the end of the data building the L{Envelope} and answering
250 only after L{SpoolWriter.commit} returned (house rule 1); any failure
before that is 451.

Anti-smuggling (CVE-2023-51764 family): a message ends only at
C{CRLF . CRLF} (L{mailhub.smtp.proto.DotDecoder}).  Data containing a bare
CR or bare LF is read up to that real end, discarded, and answered
C{550 5.6.0}.

Must not touch: command parsing, the relay decision (L{mailhub.smtp.policy}),
the spool's files (only through L{SpoolWriter}), delivery (the factory's
C{enqueue}).  The host protocol provides C{factory} (C{spool}, C{clock},
C{run}, C{enqueue}, C{max_hops}, C{received_auth_user},
C{hide_client_ip}), C{config}, C{session}, C{_buf}/C{_pos}, C{_mode},
C{_tx}, C{_held}, C{_busy}, C{_esmtp}, C{_errors}, C{_bdat_left},
C{_bdat_last}, C{_bdat_error}, and the methods C{reply}, C{_process},
C{_touch}, C{_extend}, C{_must_sleep}, C{_reset_transaction}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailhub.envelope import Envelope, Recipient
from mailhub.maillog import mail_event
from mailhub.smtp.proto import COMMAND, TOO_BIG, DotDecoder, HopCounter, Reply, received_header, with_protocol
from mailhub.queue.spool import SpoolWriter

__all__ = ["Transaction", "MessageMixin", "BARE_LINE_ENDING", "LOCAL_ERROR", "TOO_MANY_HOPS"]

log = Logger()

BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")


@dataclass
class Transaction:
    """One mail transaction: from MAIL to the end of DATA / BDAT LAST, or RSET."""

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

    @property
    def smtputf8(self) -> bool:
        return bool(self.esmtp.get("smtputf8"))


def _crlf(tx: "Transaction") -> dict[str, bool]:
    """
    C{{"crlf": True}} for a message received with DATA: every CR and LF
    in it is part of a CRLF (one with a bare one was refused), so local
    delivery may make its LF copy by deleting the CRs, three times faster
    than replacing each CRLF.  BDAT content is not checked: no key.
    """
    return {"crlf": True} if tx.decoder is not None and not tx.decoder.bare_line_ending else {}


class MessageMixin:
    """Message bytes of one SMTP session, from DATA / BDAT to the commit (see the module docstring)."""

    factory: Any
    config: Any
    session: Any
    _commands: Any  # mailhub.smtp.stats.CommandCounts
    _tx: Transaction | None
    _held: Transaction | None

    def _open_message(self, tx: Transaction) -> Reply | None:
        """Create the spool file and write the Received header; a 451 reply on trouble."""
        try:
            tx.writer = self.factory.spool.new_message()
            one = tx.accepted[0] if len(tx.accepted) == 1 else None
            user = self.session.authenticated_user
            tx.writer.write(
                received_header(
                    self.session.helo or "", self.session.client_ip, self.config.hostname,
                    self._protocol_name(tx), tx.writer.queue_id, one, self.factory.clock.seconds(),
                    auth_user=user if self.factory.received_auth_user else None,
                    hide_client=bool(user) and self.factory.hide_client_ip,
                )
            )
        except Exception:
            log.failure("cannot create a queue file")
            self._reset_transaction()
            return LOCAL_ERROR
        return None

    def _protocol_name(self, tx: Transaction) -> str:
        return with_protocol(self._esmtp, self.session.tls, bool(self.session.authenticated_user), tx.smtputf8)

    def _take(self, tx: Transaction, body: bytes) -> None:
        """Account C{body} to the message and write it unless it is already doomed."""
        tx.size += len(body)
        if tx.error is not None or not body:
            return
        limit = self.config.max_message_size
        if limit and tx.size > limit:
            self._fail(tx, TOO_BIG)
            return
        try:
            assert tx.writer is not None
            tx.writer.write(body)
        except Exception:
            log.failure("queue file write error")
            self._fail(tx, LOCAL_ERROR)

    def _fail(self, tx: Transaction, why: Reply) -> None:
        """Remember the first problem and stop writing; the reply waits for the end of the data."""
        tx.error = why
        if tx.writer is not None:
            tx.writer.abort()

    def _count_hops(self, tx: Transaction, body: bytes) -> None:
        """
        Count C{Received:} fields in the header section (RFC 5321 6.3): a
        message that would leave here with more than C{max_hops} of them
        (ours included) is looping and is refused at the end of the data.
        """
        hops = tx.hops
        if hops.done:
            return
        hops.feed(body)
        limit = self.factory.max_hops
        if limit and hops.count >= limit and tx.error is None:
            self._fail(tx, TOO_MANY_HOPS)

    def _data_chunk(self, data: bytes) -> None:
        tx = self._tx
        assert tx is not None and tx.decoder is not None
        tx.received += len(data)
        self._extend(len(data))
        body, rest = tx.decoder.feed(data)
        if tx.decoder.bare_line_ending and tx.error is None:
            self._fail(tx, BARE_LINE_ENDING)
        self._count_hops(tx, body)
        self._take(tx, body)
        if rest is not None:
            self._buf, self._pos = rest + self._buf[self._pos :], 0
            self._mode = COMMAND
            self._end_of_message(tx)

    def _bdat_chunk(self, data: bytes) -> None:
        self._bdat_left -= len(data)
        self._extend(len(data))
        tx = self._tx
        if tx is not None:
            tx.received += len(data)
        if self._bdat_error is None and tx is not None:
            self._count_hops(tx, data)
            self._take(tx, data)
        if self._bdat_left:
            return
        self._mode = COMMAND
        if self._bdat_error is not None:
            self.reply(self._bdat_error)
        elif tx is not None and tx.error is not None:
            self._end_of_message(tx)
        elif tx is not None and self._bdat_last:
            self._end_of_message(tx)
        elif tx is not None:
            self.reply(Reply(250, "2.0.0", f"Ok: {tx.size} octets received"))

    def _end_of_message(self, tx: Transaction) -> None:
        """The message is complete (after the error delay, if one is due): see L{_finish_message}."""
        self._tx = None
        self._commands.end_of_message()
        self._touch()
        if self._must_sleep():
            self._held = tx
            return
        self._finish_message(tx)

    def _finish_message(self, tx: Transaction) -> None:
        """Reject the message, or commit it and answer 250 only once it is durable."""
        if tx.error is not None:
            if tx.writer is not None:
                tx.writer.abort()
            if tx.error is TOO_MANY_HOPS:
                mail_event(
                    "reject",
                    "NOQUEUE: reject: DATA from [{client}]: {code} {enhanced} {text}; hops={hops} from=<{sender}>",
                    client=self.session.client_ip, code=tx.error.code, enhanced=tx.error.enhanced,
                    text=tx.error.text, hops=tx.hops.count, sender=tx.sender, reason="too_many_hops",
                )
            self.reply(tx.error)
            return
        writer = tx.writer
        assert writer is not None
        envelope = Envelope(
            queue_id=writer.queue_id,
            sender=tx.sender,
            recipients=list(tx.recipients.values()),
            arrival=self.factory.clock.seconds(),
            esmtp={k: v for k, v in tx.esmtp.items() if k != "declared_size"} | {"size": writer.size} | _crlf(tx),
            client={
                "helo": self.session.helo,
                "addr": self.session.client_ip,
                "protocol": self._protocol_name(tx),
                "user": self.session.authenticated_user or "",
                "listener": self.session.listener,
            },
        )
        self._busy = True
        d = defer.maybeDeferred(self.factory.run, writer.commit, envelope)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(envelope,), errbackArgs=(envelope,))
        self.factory.track_commit(self, d)

    def _committed(self, _: object, envelope: Envelope) -> None:
        self._busy = False
        # Logged before enqueue: enqueue may deliver at once, and the story
        # of a message in the log must start with its arrival.
        mail_event(
            "accepted",
            "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt} size={size} client=[{client}] proto={proto}"
            " listener={listener} sasl_username={user}",
            queue_id=envelope.queue_id, sender=envelope.sender, nrcpt=len(envelope.recipients),
            size=envelope.esmtp["size"], client=envelope.client["addr"], proto=envelope.client["protocol"],
            listener=envelope.client["listener"], user=envelope.client["user"],
            **{"from": envelope.sender},
        )
        try:
            self.factory.enqueue(envelope)
        except Exception:
            # Committed means queued: the scheduler finds it again at start.
            log.failure("enqueue failed for {queue_id}", queue_id=envelope.queue_id)
        self._errors = 0  # Postfix: the hard limit counts errors "without delivering mail"
        self.reply(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
        self._process()

    def _commit_failed(self, failure: Any, envelope: Envelope) -> None:
        self._busy = False
        log.failure("commit failed for {queue_id}", failure, queue_id=envelope.queue_id)
        self.reply(LOCAL_ERROR)
        self._process()
