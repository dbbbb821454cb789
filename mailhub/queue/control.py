"""
The control channel: AMP over a UNIX socket (C{SPOOL/control.sock}, mode
0600) through which the queue tools ask the running daemon to flush, hold,
release or delete messages, so the scheduler's in-memory state and the
spool files never disagree.

Owns: the AMP commands (L{Flush}, L{Hold}, L{Release}, L{Delete},
L{Reload}), the server protocol that maps them onto the scheduler (and
L{Reload} onto the daemon's reload, L{mailhub.daemon.reload}), and a small blocking
client (L{ControlClient}) for command-line tools, which have no reactor.

Must not touch: the spool files (the scheduler does the changes), the
network (UNIX socket only; its mode restricts it to the daemon's user and
root).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.application import internet
from twisted.internet import endpoints, protocol
from twisted.protocols import amp

__all__ = [
    "Flush",
    "Hold",
    "Release",
    "Delete",
    "Reload",
    "NoSuchMessage",
    "ControlProtocol",
    "ControlFactory",
    "control_service",
    "ControlClient",
    "socket_path",
]


class NoSuchMessage(Exception):
    """The queue id is not in the queue."""


_ERRORS = {NoSuchMessage: b"NO_SUCH_MESSAGE", KeyError: b"NO_SUCH_MESSAGE"}


#: What a Flush or Delete answer may say beyond "done": the scheduler's
#: word for it (Flush: "flushed" or "held"; Delete: "removed" or "pending",
#: the message being in flight).  Optional, so an old daemon's empty answer
#: still parses.
_STATUS: list[tuple[bytes, amp.Argument]] = [(b"status", amp.Unicode(optional=True))]


class Flush(amp.Command):
    """Try deferred messages now: all of them, or one."""

    arguments = [(b"queue_id", amp.Unicode(optional=True))]
    response = _STATUS
    errors = _ERRORS


class Hold(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response = []
    errors = _ERRORS


class Release(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response = []
    errors = _ERRORS


class Delete(amp.Command):
    """Remove a message without notices; "pending" while it is being delivered."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = _STATUS
    errors = _ERRORS


class Reload(amp.Command):
    """
    Re-read the configuration file and apply it (as SIGHUP does).
    C{applied}: whether it was applied; C{summary}: the daemon's log line;
    C{restart}: the changed keys that need a restart, comma-separated.
    """

    arguments = []
    response = [
        (b"applied", amp.Boolean()),
        (b"summary", amp.Unicode()),
        (b"restart", amp.Unicode(optional=True)),
    ]


def socket_path(spool_path: str) -> str:
    return os.path.join(spool_path, "control.sock")


class ControlProtocol(amp.AMP):
    """Answers control commands by calling the scheduler (flush/hold/release/remove)."""

    def __init__(self, scheduler: Any, reload: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.scheduler = scheduler
        self._reload = reload

    @staticmethod
    def _status(result: Any) -> dict:
        return {"status": result} if isinstance(result, str) else {}

    @Flush.responder
    def flush(self, queue_id: str | None = None) -> dict:
        return self._status(self.scheduler.flush(queue_id))

    @Hold.responder
    def hold(self, queue_id: str) -> dict:
        self.scheduler.hold(queue_id)
        return {}

    @Release.responder
    def release(self, queue_id: str) -> dict:
        self.scheduler.release(queue_id)
        return {}

    @Reload.responder
    def reload(self) -> dict:
        if self._reload is None:
            return {"applied": False, "summary": "this daemon cannot reload", "restart": ""}
        outcome = self._reload()
        return {"applied": outcome.applied, "summary": outcome.summary(), "restart": ",".join(outcome.restart)}

    @Delete.responder
    def delete(self, queue_id: str) -> dict:
        return self._status(self.scheduler.remove(queue_id))


class ControlFactory(protocol.Factory):
    noisy = False  # no "Starting factory" line at start and stop (mailhub/loglevel.py)

    def __init__(self, scheduler: Any, reload: Callable[[], Any] | None = None) -> None:
        self.scheduler = scheduler
        self.reload = reload

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.scheduler, self.reload)


def control_service(
    scheduler: Any, spool_path: str, reactor: Any, reload: Callable[[], Any] | None = None,
) -> internet.StreamServerEndpointService:
    """
    The service listening on C{SPOOL/control.sock} (mode 0600).  C{wantPID}
    makes Twisted remove a stale socket left by a crashed daemon.
    """
    endpoint = endpoints.UNIXServerEndpoint(reactor, socket_path(spool_path), mode=0o600, wantPID=True)
    return internet.StreamServerEndpointService(endpoint, ControlFactory(scheduler, reload))


# -- the blocking client -------------------------------------------------------------------

_COMMANDS = {"flush": b"Flush", "hold": b"Hold", "release": b"Release", "delete": b"Delete", "reload": b"Reload"}


class ControlClient:
    """
    A blocking AMP client for the queue tools.  Connecting raises
    C{OSError} when no daemon listens (stale or missing socket).
    """

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._tags = itertools.count(1)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the control connection")
            self._buffer += data
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _read_box(self) -> dict[bytes, bytes]:
        box: dict[bytes, bytes] = {}
        while True:
            (klen,) = struct.unpack("!H", self._read(2))
            if klen == 0:
                return box
            key = self._read(klen)
            (vlen,) = struct.unpack("!H", self._read(2))
            box[key] = self._read(vlen)

    def reload(self) -> tuple[bool, str, list[str]]:
        """Ask the daemon to reload: (applied, its summary line, keys that need a restart)."""
        tag = str(next(self._tags)).encode()
        self.sock.sendall(amp.AmpBox(_command=b"Reload", _ask=tag).serialize())
        answer = self._read_box()
        if answer.get(b"_answer") != tag:
            text = answer.get(b"_error_description", b"reload failed").decode("utf-8", "replace")
            return False, text, []
        restart = answer.get(b"restart", b"").decode("utf-8", "replace")
        return (
            answer.get(b"applied") == b"True",
            answer.get(b"summary", b"").decode("utf-8", "replace"),
            [k for k in restart.split(",") if k],
        )

    def call(self, command: str, queue_id: str | None) -> str | None:
        """Run C{command} (flush, hold, release, delete); return an error text or C{None}."""
        return self.ask(command, queue_id)[0]

    def ask(self, command: str, queue_id: str | None) -> tuple[str | None, str]:
        """
        Run C{command}; return (error text or C{None}, status).  The status
        is the daemon's word on a flush ("flushed", "held") or a delete
        ("removed", or "pending" for a message being delivered), else "".
        """
        tag = str(next(self._tags)).encode()
        box = amp.AmpBox(_command=_COMMANDS[command], _ask=tag)
        if queue_id is not None:
            box[b"queue_id"] = queue_id.encode("utf-8")
        self.sock.sendall(box.serialize())
        answer = self._read_box()
        if answer.get(b"_answer") == tag:
            return None, answer.get(b"status", b"").decode("utf-8", "replace")
        if answer.get(b"_error_code") == b"NO_SUCH_MESSAGE":
            return "no such message", ""
        return answer.get(b"_error_description", b"control command failed").decode("utf-8", "replace"), ""
