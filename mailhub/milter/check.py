"""
The milters at end of message: the L{MessageCheck} that shows each
milter the message (DATA, header fields, end of header, body, end of
message) and carries out its answer before the commit.

Owns: L{MilterCheck}: the content stages in order, one milter after the
other, each seeing the message as the ones before it left it; the
verdicts (accept, continue, reject and tempfail with the milter's own
reply, discard: 250 and dropped, quarantine: committed on hold until
C{mailhub queue release}); the changes (header fields through
L{mailhub.milter.rewrite.Header}, a replacement body, recipients added
and removed, the sender changed), written through
L{mailhub.smtp.checks.StagedMessage.rewrite} so the message committed is
the filtered one and "durable before 250" still holds.

Must not touch: the SMTP session beyond its milter conversations
(C{message.session.milter}), the spool's files (only through the staged
message), the reply to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailhub import address
from mailhub.envelope import Recipient
from mailhub.maillog import mail_event
from mailhub.milter import codec
from mailhub.milter.client import EndOfMessage, MilterFailure
from mailhub.milter.codec import Modification, Response
from mailhub.milter.rewrite import Header, body_chunks, crlf_body, skip_bytes
from mailhub.milter.session import REJECT, Conversation, MilterSession, reply_of
from mailhub.smtp.checks import StagedMessage
from mailhub.smtp.proto import Reply

__all__ = ["MilterCheck"]

log = Logger()

_HEADER_CHANGES = (codec.ADDHEADER, codec.INSHEADER, codec.CHGHEADER)


def _call(f: Callable[..., Any], *args: Any) -> Any:
    return f(*args)


class _Stop(Exception):
    """A milter's verdict ends its part (C{reply}: refuse; C{None}: it accepted)."""

    def __init__(self, reply: Reply | None) -> None:
        self.reply = reply


class MilterCheck:
    """
    The end-of-data check of a listener with milters.  C{run} calls the
    content rewrite (file work): C{deferToThread} in the daemon.
    """

    name = "milter"

    def __init__(self, run: Callable[..., Any] = _call) -> None:
        self.run = run

    def check(self, message: StagedMessage) -> defer.Deferred[Reply | None] | None:
        session = getattr(message.session, "milter", None)
        if session is None:
            return None
        return defer.Deferred.fromCoroutine(self._all(session, message))

    async def _all(self, session: MilterSession, message: StagedMessage) -> Reply | None:
        try:
            if session.discard:
                message.discard = True
                return None
            for conv in session.conversations:
                if conv.connect_reply is not None and conv.connect_reply.code >= 400:
                    return conv.connect_reply
                if conv.done or conv.broken_at_all:
                    continue
                if conv.broken is not None:
                    return conv.broken
                try:
                    refusal = await self._one(session, conv, message)
                except MilterFailure as e:
                    refusal = session.failed(conv, str(e), "END-OF-MESSAGE")
                if refusal is not None:
                    return refusal
                if message.discard:
                    return None
            return None
        finally:
            session.message_done()

    async def _one(self, session: MilterSession, conv: Conversation, message: StagedMessage) -> Reply | None:
        proto = await session.ready(conv)
        negotiated = proto.negotiated
        assert negotiated is not None
        leadspc = negotiated.skips(codec.P_HDR_LEADSPC)
        values = session.macros(message.envelope.queue_id)

        async def step(command: bytes, packets: list[bytes], no_reply: int, content: bool = False) -> bool:
            """Send one step; C{False}: the milter said SKIP (no more body)."""
            macros = session.macro_packets(conv, command, values) if command in (codec.DATA, codec.EOH) else []
            verdict = await session.exchange(conv, [*macros, *packets], no_reply, content)
            if verdict is None or verdict.kind == "continue":
                return True
            if verdict.kind == "skip":
                return False
            raise _Stop(self._refusal(session, conv, message, verdict))

        section = message.header_section()
        header = Header(section)
        try:
            if not negotiated.skips(codec.P_NODATA) and negotiated.version >= 4:
                await step(codec.DATA, [codec.packet(codec.DATA)], codec.P_NR_DATA)
            if not negotiated.skips(codec.P_NOHDRS):
                for name, value in header.for_milter(leadspc):
                    await step(codec.HEADER, [codec.packet(codec.HEADER, codec.strings(name, value))], codec.P_NR_HDR)
            if not negotiated.skips(codec.P_NOEOH):
                await step(codec.EOH, [codec.packet(codec.EOH)], codec.P_NR_EOH)
            if not negotiated.skips(codec.P_NOBODY):
                for chunk in body_chunks(skip_bytes(message.content(), len(section))):
                    if not await step(codec.BODY, [codec.packet(codec.BODY, chunk)], codec.P_NR_BODY, content=True):
                        break
            eom = await proto.end_of_message([*session.macro_packets(conv, codec.BODYEOB, values), codec.packet(codec.BODYEOB)])
        except _Stop as stop:
            return stop.reply
        try:
            if eom.response.kind not in ("continue", "accept"):
                return self._refusal(session, conv, message, eom.response)
            await self._apply(eom, header, section, leadspc, message, conv)
        finally:
            if eom.body is not None:
                eom.body.close()
        return None

    def _refusal(self, session: MilterSession, conv: Conversation, message: StagedMessage,
                 verdict: Response) -> Reply | None:
        """A verdict before or at end of message: C{None} to stop asking this milter, else the refusal."""
        qid = message.envelope.queue_id
        if verdict.kind == "accept":
            return None
        if verdict.kind == "discard":
            message.discard = True
            mail_event("milter", "{queue_id}: milter-discard: END-OF-MESSAGE; milter={milter}",
                       queue_id=qid, milter=conv.name)
            return None
        reply = reply_of(verdict, REJECT)
        mail_event(
            "milter", "{queue_id}: milter-reject: END-OF-MESSAGE from [{client}]: {code} {enhanced} {text}; milter={milter}",
            queue_id=qid, client=message.client.get("addr", ""), code=reply.code, enhanced=reply.enhanced,
            text=reply.text, milter=conv.name,
        )
        return reply

    async def _apply(self, eom: EndOfMessage, header: Header, section: bytes, leadspc: bool,
                     message: StagedMessage, conv: Conversation) -> None:
        envelope = message.envelope
        qid = envelope.queue_id
        edited = False
        for change in eom.modifications:
            if change.kind in _HEADER_CHANGES:
                header.apply(change, leadspc)
                edited = True
            elif change.kind in (codec.ADDRCPT, codec.ADDRCPT_PAR):
                self._add_recipient(message, change, conv)
            elif change.kind == codec.DELRCPT:
                gone = _bare(change.value).lower()
                envelope.recipients = [r for r in envelope.recipients
                                       if r.address.lower() != gone and (r.original or "").lower() != gone]
            elif change.kind == codec.CHGFROM:
                try:
                    sender = address.parse_path(f"<{_bare(change.value)}>")
                except address.AddressError:
                    log.warn("{queue_id}: milter {milter}: bad sender {value!r} ignored", queue_id=qid,
                             milter=conv.name, value=change.value[:100])
                    continue
                envelope.sender = "" if sender is None else str(sender)
            elif change.kind == codec.QUARANTINE:
                envelope.held = True
                reason = codec.clean(change.value.encode("utf-8", "replace"))[:100] or "milter"
                message.log_fields["quarantine"] = reason.replace(" ", "_")
                mail_event("milter", "{queue_id}: milter-hold: {reason}; milter={milter}",
                           queue_id=qid, reason=reason, milter=conv.name)
        if not envelope.recipients:
            message.discard = True  # every recipient removed: nothing to deliver
        if edited or eom.body is not None:
            body = eom.body
            content = message.content

            def chunks() -> Iterator[bytes]:
                yield header.bytes()
                if body is not None:
                    yield from crlf_body(body)
                else:
                    yield from skip_bytes(content(), len(section))

            await defer.maybeDeferred(self.run, message.rewrite, chunks())
            message.log_fields["milter"] = "changed"

    def _add_recipient(self, message: StagedMessage, change: Modification, conv: Conversation) -> None:
        try:
            mailbox = address.parse_mailbox(_bare(change.value))
        except address.AddressError:
            log.warn("{queue_id}: milter {milter}: bad recipient {value!r} ignored",
                     queue_id=message.envelope.queue_id, milter=conv.name, value=change.value[:100])
            return
        text = str(mailbox)
        if all(r.address.lower() != text.lower() for r in message.envelope.recipients):
            message.envelope.recipients.append(Recipient(address=text, original=text))


def _bare(value: str) -> str:
    value = value.strip()
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value
