"""
The milters of one SMTP session: each stage of the session asked of
every milter in order, and the milter's answer turned into what the
session does (Postfix's C{milter.c} over C{milter8.c}).

Owns: L{Milters} (a listener's milters: their configuration, how to
reach them) and L{MilterSession} (one SMTP session's conversations, one
per milter): opening each conversation when first needed (options
negotiation, CONNECT, HELO replayed after a reconnection), the macros each
stage carries (C{j}, C{_}, C{{daemon_name}}, C{{client_addr}},
C{{auth_authen}}, C{i}, ...), skipping the steps a milter negotiated away,
the verdicts of the SMTP stages (HELO, MAIL, RCPT) and the default action
(C{tempfail}, C{reject}, C{accept}) when a milter is down, too slow or
breaks the protocol -- for the current message only: the next MAIL opens
a new conversation.  The end of message (headers, body, the milter's
changes) is L{mailhub.milter.check}'s, through L{MilterSession.conversations}.

A verdict is C{None} (go on), a L{Reply} (refuse this step: the milter's
own code and text, bounded and plain) or L{DISCARD} (accept the message
and throw it away).

Must not touch: the SMTP session's state (it reads the session's facts
through its host and answers with verdicts), the message store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.configschema import MilterConfig
from mailhub.maillog import mail_event
from mailhub.milter import codec
from mailhub.milter.client import MilterFailure, MilterProtocol, open_milter
from mailhub.milter.codec import Response
from mailhub.smtp.proto import Reply

__all__ = ["Milters", "MilterSession", "MilterSpec", "DISCARD", "TEMPFAIL", "REJECT", "Conversation"]

log = Logger()

#: The verdict "accept the message and drop it" (SMFIR_DISCARD).
DISCARD = Reply(250, "2.0.0", "Ok: discarded")
#: A milter's tempfail, or the default action C{tempfail} (Postfix's texts).
TEMPFAIL = Reply(451, "4.7.1", "Service unavailable - try again later")
#: A milter's reject, or the default action C{reject}.
REJECT = Reply(550, "5.7.1", "Command rejected")


#: One C{[[milter]]} table.
MilterSpec = MilterConfig


class Milters:
    """
    The milters of one listener.  C{connector(spec)} returns a function
    that connects a protocol factory to the milter (an endpoint's
    C{connect}); C{max_body} bounds a replacement body, C{spill_dir} is
    where a large one is kept while it arrives.
    """

    def __init__(self, specs: Sequence[MilterSpec], clock: IReactorTime,
                 connector: Callable[[MilterSpec], Callable[[Any], defer.Deferred[Any]]],
                 max_body: int, spill_dir: str | None = None) -> None:
        self.specs = list(specs)
        self.clock = clock
        self.connector = connector
        self.max_body = max_body
        self.spill_dir = spill_dir

    def session(self, host: Any) -> MilterSession:
        """The conversations of one SMTP session (C{host}: the L{mailhub.smtp.server.SMTPServer})."""
        return MilterSession(self, host)


class Conversation:
    """One milter within one SMTP session."""

    def __init__(self, spec: MilterSpec) -> None:
        self.spec = spec
        self.proto: MilterProtocol | None = None
        self.done = ""  # "session" / "message": the milter accepted, ask it nothing more until then
        self.connect_reply: Reply | None = None  # refused at CONNECT/HELO: for the whole session
        self.broken: Reply | None = None  # failed during this message: its default action
        self.broken_at_all = False  # failed: accept-by-default, skip for this message

    @property
    def name(self) -> str:
        return self.spec.socket


class MilterSession:
    """The milter conversations of one SMTP session (see the module docstring)."""

    def __init__(self, milters: Milters, host: Any) -> None:
        self.milters = milters
        self.host = host
        self.conversations = [Conversation(spec) for spec in milters.specs]
        self.discard = False  # a milter said DISCARD for this message
        self.quarantine: str | None = None
        self._helo: str | None = None
        self._in_message = False

    # -- facts of the session ---------------------------------------------------------------

    def macros(self, queue_id: str = "") -> dict[str, str]:
        """The macros mailhub defines, by name (Postfix's defaults for milters)."""
        host = self.host
        session = host.session
        addr = session.client_ip or ""
        values = {
            "j": host.config.hostname,
            "{daemon_name}": session.listener,
            "v": "mailhub",
            "{client_addr}": addr,
            "{client_name}": f"[{addr}]" if addr else "unknown",
            "_": f"[{addr}] [{addr}]" if addr else "unknown",
            "{client_port}": str(self._client_port()),
        }
        if session.helo:
            values["s"] = session.helo
        if session.authenticated_user:
            values["{auth_authen}"] = session.authenticated_user
            values["{auth_type}"] = "PLAIN"
        if session.tls:
            values["{tls_version}"] = "TLS"
        if queue_id:
            values["i"] = queue_id
        return values

    def _client_port(self) -> int:
        try:
            return int(getattr(self.host.transport.getPeer(), "port", 0) or 0)
        except Exception:
            return 0

    def macro_packets(self, conv: Conversation, command: bytes, values: dict[str, str]) -> list[bytes]:
        proto = conv.proto
        assert proto is not None and proto.negotiated is not None
        names = proto.negotiated.macros.get(command)
        default = _DEFAULT_MACROS.get(command, ())
        one = codec.macro_packet(command, names if names is not None else default, values)
        return [one] if one is not None else []

    # -- conversations ------------------------------------------------------------------------

    async def ready(self, conv: Conversation) -> MilterProtocol:
        """The conversation's connection, opened (negotiated, CONNECT and HELO said) if needed."""
        if conv.proto is not None:
            return conv.proto
        spec = self.milters
        proto = MilterProtocol(
            spec.clock, conv.name, conv.spec.command_timeout, conv.spec.content_timeout,
            spec.max_body, spec.spill_dir,
        )
        await open_milter(spec.connector(conv.spec), proto, conv.spec.connect_timeout)
        conv.proto = proto
        values = self.macros()
        negotiated = proto.negotiated
        assert negotiated is not None
        session = self.host.session
        if not negotiated.skips(codec.P_NOCONNECT):
            packets = [*self.macro_packets(conv, codec.CONNECT, values),
                       codec.packet(codec.CONNECT, codec.connect_data(values["{client_name}"], session.client_ip or "",
                                                                      self._client_port()))]
            verdict = await self.exchange(conv, packets, codec.P_NR_CONN)
            self._connect_verdict(conv, verdict)
        if self._helo is not None and not conv.done and conv.connect_reply is None:
            await self._say_helo(conv)
        return proto

    async def _say_helo(self, conv: Conversation) -> None:
        proto = conv.proto
        assert proto is not None and proto.negotiated is not None and self._helo is not None
        if proto.negotiated.skips(codec.P_NOHELO):
            return
        packets = [*self.macro_packets(conv, codec.HELO, self.macros()), codec.packet(codec.HELO, codec.strings(self._helo))]
        self._connect_verdict(conv, await self.exchange(conv, packets, codec.P_NR_HELO))

    def _connect_verdict(self, conv: Conversation, verdict: Response | None) -> None:
        if verdict is None or verdict.kind in ("continue", "skip"):
            return
        if verdict.kind == "accept":
            conv.done = "session"
        elif verdict.kind == "discard":
            conv.connect_reply = DISCARD
        else:
            conv.connect_reply = reply_of(verdict, REJECT)

    async def exchange(self, conv: Conversation, packets: list[bytes], no_reply: int,
                        content: bool = False) -> Response | None:
        proto = conv.proto
        assert proto is not None and proto.negotiated is not None
        if proto.negotiated.skips(no_reply):
            proto.send(packets)
            return None
        return await proto.ask(packets, content)

    def failed(self, conv: Conversation, why: str, stage: str) -> Reply | None:
        """A milter failed at C{stage}: log it, drop its connection, return its default action's verdict."""
        proto, conv.proto = conv.proto, None
        if proto is not None:
            proto.close()
        action = conv.spec.default_action
        mail_event(
            "milter", "milter {milter}: {stage}: {why}; default action {action} client=[{client}]",
            milter=conv.name, stage=stage, why=why, action=action, client=self.host.session.client_ip,
        )
        if action == "accept":
            conv.broken_at_all = True
            return None
        conv.broken = TEMPFAIL if action == "tempfail" else REJECT
        return conv.broken

    # -- the stages -------------------------------------------------------------------------------

    def helo(self, helo: str) -> defer.Deferred[Reply | None]:
        """HELO/EHLO: every milter is told (connecting first); the first refusal is the verdict."""
        self._helo = helo

        async def run() -> Reply | None:
            for conv in self.conversations:
                if conv.done or conv.connect_reply is not None:
                    continue
                try:
                    if conv.proto is None:
                        await self.ready(conv)  # says HELO too
                    else:
                        await self._say_helo(conv)
                except MilterFailure as e:
                    verdict = self.failed(conv, str(e), "HELO")
                    conv.broken = None  # a later MAIL tries again
                    if verdict is not None:
                        return verdict
                if conv.connect_reply is not None:
                    return conv.connect_reply if conv.connect_reply is not DISCARD else None
            return None

        return defer.Deferred.fromCoroutine(run())

    def mail(self, sender: str, args: Sequence[str]) -> defer.Deferred[Reply | None]:
        """MAIL FROM: a new message; milters that failed before get a new conversation."""
        self.reset()
        self._in_message = True
        for conv in self.conversations:
            conv.broken, conv.broken_at_all = None, False
            if conv.proto is not None and conv.proto.failed is not None:
                conv.proto = None  # closed while idle: a new conversation for the new message
            if conv.done == "message":
                conv.done = ""
        packet = codec.packet(codec.MAIL, codec.strings(f"<{sender}>", *args))
        return self._stage(codec.MAIL, packet, codec.P_NOMAIL, codec.P_NR_MAIL, "MAIL")

    def rcpt(self, rcpt: str, args: Sequence[str]) -> defer.Deferred[Reply | None]:
        """RCPT TO: a refusal refuses this recipient only."""
        packet = codec.packet(codec.RCPT, codec.strings(f"<{rcpt}>", *args))
        return self._stage(codec.RCPT, packet, codec.P_NORCPT, codec.P_NR_RCPT, "RCPT")

    def _stage(self, command: bytes, packet: bytes, skip: int, no_reply: int, stage: str) -> defer.Deferred[Reply | None]:
        async def run() -> Reply | None:
            for conv in self.conversations:
                if conv.connect_reply is not None and conv.connect_reply is not DISCARD:
                    return conv.connect_reply
                if conv.connect_reply is DISCARD:
                    self.discard = True
                if conv.done or conv.broken_at_all:
                    continue
                if conv.broken is not None:
                    return conv.broken
                try:
                    proto = await self.ready(conv)
                    if conv.done or conv.connect_reply is not None:
                        if conv.connect_reply is not None and conv.connect_reply is not DISCARD:
                            return conv.connect_reply
                        continue
                    assert proto.negotiated is not None
                    if proto.negotiated.skips(skip):
                        continue
                    values = self.macros()
                    values["{mail_addr}" if command == codec.MAIL else "{rcpt_addr}"] = packet[5:].split(b"\0")[0].decode(
                        "utf-8", "replace").strip("<>")
                    verdict = await self.exchange(conv, [*self.macro_packets(conv, command, values), packet], no_reply)
                except MilterFailure as e:
                    refusal = self.failed(conv, str(e), stage)
                    if refusal is not None:
                        return refusal
                    continue
                if verdict is None or verdict.kind in ("continue", "skip"):
                    continue
                if verdict.kind == "accept":
                    conv.done = "message"
                elif verdict.kind == "discard":
                    self.discard = True
                else:
                    refusal = reply_of(verdict, REJECT)
                    self._log_refusal(conv, stage, refusal)
                    return refusal
            return None

        return defer.Deferred.fromCoroutine(run())

    def _log_refusal(self, conv: Conversation, stage: str, reply: Reply) -> None:
        mail_event(
            "reject", "milter-reject: {stage} from [{client}]: {code} {enhanced} {text}; milter={milter}",
            stage=stage, client=self.host.session.client_ip, code=reply.code, enhanced=reply.enhanced,
            text=reply.text, milter=conv.name, reason="milter",
        )

    def reset(self) -> None:
        """The message ended or was abandoned (RSET, a new EHLO, a refusal): milters forget it (ABORT)."""
        if self._in_message:
            for conv in self.conversations:
                if conv.proto is not None and conv.proto.failed is None:
                    conv.proto.send([codec.packet(codec.ABORT)])
        self._in_message = False
        self.discard = False
        self.quarantine = None

    def message_done(self) -> None:
        """The end of message was answered: the milters start afresh at the next MAIL."""
        self._in_message = False

    def close(self) -> None:
        """The SMTP session ended: QUIT to every milter."""
        for conv in self.conversations:
            proto, conv.proto = conv.proto, None
            if proto is not None:
                proto.close()


def reply_of(verdict: Response, reject: Reply) -> Reply:
    """The SMTP reply for a refusing verdict (C{reject}, C{tempfail}, C{replycode})."""
    if verdict.kind == "replycode":
        return Reply(verdict.code, verdict.enhanced, verdict.text)
    if verdict.kind == "tempfail":
        return TEMPFAIL
    return reject


#: Macros sent when a milter gives no list of its own (Postfix's milter_*_macros).
_DEFAULT_MACROS: dict[bytes, tuple[str, ...]] = {
    codec.CONNECT: ("j", "{daemon_name}", "v", "{client_addr}", "{client_name}", "_", "{client_port}"),
    codec.HELO: ("{tls_version}",),
    codec.MAIL: ("i", "{auth_authen}", "{auth_type}", "{mail_addr}"),
    codec.RCPT: ("i", "{rcpt_addr}"),
    codec.DATA: ("i",),
    codec.EOH: ("i",),
    codec.BODYEOB: ("i", "j", "{daemon_name}", "{auth_authen}", "{client_addr}", "_"),
}
