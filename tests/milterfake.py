"""
An in-memory milter for unit tests of mailhub.milter: it reads the
packets the MTA writes and answers as its script says.  A helper module,
not a test file.  The real milters (OpenDKIM, rspamd) are in
test_e2e_milter.py.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from mailhub.milter import codec
from mailhub.milter.session import Milters, MilterSpec

__all__ = ["FakeMilter", "milters", "reply", "replycode"]


def reply(command: bytes, data: bytes = b"") -> bytes:
    return codec.packet(command, data)


def replycode(text: str) -> bytes:
    return codec.packet(codec.REPLYCODE, text.encode() + b"\0")


class _Transport(StringTransport):
    def __init__(self, milter: FakeMilter) -> None:
        super().__init__()
        self.milter = milter
        self.reader = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.reader += data
        while len(self.reader) >= 4:
            (length,) = struct.unpack_from("!I", self.reader)
            if len(self.reader) < 4 + length:
                break
            command, payload = self.reader[4:5], self.reader[5 : 4 + length]
            self.reader = self.reader[4 + length :]
            self.milter.received(self, command, payload)

    def abortConnection(self) -> None:
        self.loseConnection()


class FakeMilter:
    """
    C{answers}: command byte -> the bytes to answer with (a list: one per
    time, the last one repeats); a command not listed gets CONTINUE unless
    the milter said it does not answer it (C{protocol} NR flags).  C{None}
    as an answer: say nothing (a milter that hangs).  C{"close"}: drop the
    connection.
    """

    def __init__(self, actions: int = codec.MTA_ACTIONS, protocol: int = 0, macros: bytes = b"",
                 answers: dict[bytes, Any] | None = None, version: int = 6) -> None:
        self.actions = actions
        self.protocol = protocol
        self.macros = macros
        self.answers = answers or {}
        self.version = version
        self.seen: list[tuple[bytes, bytes]] = []
        self.connections: list[Any] = []
        self.refuse = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refuse:
            return defer.fail(ConnectionRefusedError("refused"))
        proto = factory.buildProtocol(None)
        transport = _Transport(self)
        transport.protocol = proto
        proto.makeConnection(transport)
        self.connections.append(transport)
        return defer.succeed(proto)

    def commands(self) -> list[bytes]:
        return [c for c, _ in self.seen]

    def received(self, transport: _Transport, command: bytes, payload: bytes) -> None:
        self.seen.append((command, payload))
        proto = transport.protocol
        if command == codec.OPTNEG:
            answer = reply(codec.OPTNEG, struct.pack("!III", self.version, self.actions, self.protocol) + self.macros)
        elif command in (codec.MACRO, codec.ABORT, codec.QUIT):
            return
        elif command in self.answers:
            script = self.answers[command]
            answer = script[0] if len(script) == 1 else script.pop(0)
        elif self.protocol & _NO_REPLY.get(command, 0):
            return
        else:
            answer = reply(codec.CONTINUE)
        if answer is None:
            return
        if answer == "close":
            transport.loseConnection()
            proto.connectionLost(None)
            return
        proto.dataReceived(answer)


_NO_REPLY = {
    codec.CONNECT: codec.P_NR_CONN, codec.HELO: codec.P_NR_HELO, codec.MAIL: codec.P_NR_MAIL,
    codec.RCPT: codec.P_NR_RCPT, codec.DATA: codec.P_NR_DATA, codec.HEADER: codec.P_NR_HDR,
    codec.EOH: codec.P_NR_EOH, codec.BODY: codec.P_NR_BODY,
}


def milters(clock: Any, *fakes: FakeMilter, default_action: str = "tempfail", max_body: int = 10_000_000,
            **timeouts: float) -> Milters:
    """L{Milters} over fake milters, one C{[[milter]]} each (socket names C{inet:127.0.0.1:1}, ...)."""
    specs = [MilterSpec(socket=f"inet:127.0.0.1:{n}", default_action=default_action, **timeouts)
             for n, _ in enumerate(fakes, 1)]
    by_socket = {spec.socket: fake for spec, fake in zip(specs, fakes, strict=True)}
    return Milters(specs, clock, lambda spec: by_socket[spec.socket].connect, max_body=max_body)
