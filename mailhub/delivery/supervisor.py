"""
The privileged local delivery supervisor of system mode, and the checks
every local delivery process applies to what it is asked.

Owns: L{check_request} (the one definition of a well-formed delivery
request: exact keys, types, sizes, a queue id, the queue file's path),
L{open_queued} (how a process running as root opens the queued message
without following anything the spool's user could plant), the
supervisor program (L{main}: C{python -m mailhub.delivery.supervisor}) and the
daemon's side of it (L{PrivilegedDelivery}).

Why a supervisor (Postfix's master(8) for local(8)): in system mode the
Maildir writes need root, but the daemon drops to C{server.user} once its
ports are bound (L{mailhub.daemon.privileges}).  An unprivileged daemon cannot
start a root process, so it starts this one while still root; the
supervisor starts the L{mailhub.delivery.localproc} delivery processes (root too)
and starts them again when one ends, for the daemon's whole life.  It
takes its settings (mailbox rules, uid range, spool) from its command
line, fixed while the daemon was still root; the daemon's requests can
only name a queued message and final addresses, and anything else is
refused.  If the supervisor itself ends, local mail stays queued (451)
until mailhub is restarted as root, and the log says so.

Protocol with the daemon: as L{mailhub.delivery.localproc}'s, without the settings
line; answers carry the request's id and may come in any order; a request
that is not well-formed is answered C{{"id": N, "refused": "why"}}
(without a usable id: logged on stderr and dropped).

Must not touch: the Maildir code (L{mailhub.delivery.local}), retry decisions.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.delivery.localproc import _PACKAGE_ROOT, LocalDeliveryProcesses
from mailhub.envelope import Outcome

__all__ = [
    "BadRequest",
    "check_request",
    "open_queued",
    "PrivilegedDelivery",
    "main",
    "MAX_REQUEST_LINE",
    "MAX_ADDRESS",
]

log = Logger()

#: A request line longer than this is refused (16 MiB: about 200,000
#: recipients of a usual length in one delivery round).
MAX_REQUEST_LINE = 16 * 1024 * 1024
#: Characters in the sender or one recipient address.
MAX_ADDRESS = 1024
#: The descriptors a delivery process may have open (it needs a handful).
MAX_OPEN_FILES = 256

_KEYS = {"id", "queue_id", "arrival", "sender", "addresses", "message_path", "crlf"}

_SUPERVISOR_MAIN = (
    "import sys; sys.path.append(sys.argv[1]); from mailhub.delivery.supervisor import main; sys.exit(main(sys.argv[2:]))"
)


class BadRequest(ValueError):
    """A request that is refused; C{str()} says why, C{id} is its id when it had a usable one."""

    def __init__(self, why: str, id: int | None = None) -> None:
        super().__init__(why)
        self.id = id


def _text(value: Any, what: str, limit: int, id: int | None) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} is not a string", id)
    if len(value) > limit:
        raise BadRequest(f"{what} is longer than {limit} characters", id)
    if any(c in value for c in "\x00\r\n"):
        raise BadRequest(f"{what} contains NUL, CR or LF", id)
    return value


def check_request(data: Any, spool: str | None = None) -> dict[str, Any]:
    """
    The request C{data} (a parsed JSON line) if it is well-formed, else
    L{BadRequest}.  With C{spool} (the privileged processes), the message
    must be the queue file C{SPOOL/queue/QUEUE_ID} and nothing else.
    """
    from mailhub.queue.queuefile import is_queue_id

    if not isinstance(data, dict):
        raise BadRequest("not a JSON object")
    raw_id = data.get("id")
    id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 < raw_id < 2**63 else None
    if id is None:
        raise BadRequest("no valid id")
    unknown = set(data) - _KEYS
    missing = _KEYS - {"crlf"} - set(data)
    if unknown or missing:
        raise BadRequest(f"unknown keys {sorted(unknown)}" if unknown else f"missing keys {sorted(missing)}", id)
    queue_id = data["queue_id"]
    if not isinstance(queue_id, str) or not is_queue_id(queue_id):
        raise BadRequest("queue_id is not a queue id", id)
    arrival = data["arrival"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
        math.isfinite(arrival) and 0 <= arrival < 2**40
    ):
        raise BadRequest("arrival is not a time", id)
    sender = _text(data["sender"], "sender", MAX_ADDRESS, id)
    addresses = data["addresses"]
    if not isinstance(addresses, list) or not addresses:
        raise BadRequest("addresses is not a non-empty list", id)
    for a in addresses:
        _text(a, "an address", MAX_ADDRESS, id)
        if "@" not in a:
            raise BadRequest("an address has no domain", id)
    path = _text(data["message_path"], "message_path", 4096, id)
    if not os.path.isabs(path):
        raise BadRequest("message_path is not absolute", id)
    if spool is not None and path != os.path.join(spool, "queue", queue_id):
        raise BadRequest("message_path is not the queue file of queue_id", id)
    crlf = data.get("crlf", False)
    if not isinstance(crlf, bool):
        raise BadRequest("crlf is not a boolean", id)
    return {
        "id": id, "queue_id": queue_id, "arrival": float(arrival), "sender": sender,
        "addresses": list(addresses), "message_path": path, "crlf": crlf,
    }


def open_queued(spool: str, spool_uid: int, queue_id: str) -> int:
    """
    Open C{SPOOL/queue/QUEUE_ID} for reading, as root, safely: C{queue}
    and the file are opened with C{O_NOFOLLOW} relative to their parent,
    and the file must be a regular file owned by the spool's user with one
    link (a hard link to a file the spool's user may not read is refused).
    Returns the descriptor; read it through C{/proc/self/fd/N}.

    @raise OSError: it cannot be opened, or it is not such a file.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    top = os.open(spool, flags | os.O_DIRECTORY)
    try:
        queue = os.open("queue", flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
    finally:
        os.close(top)
    try:
        fd = os.open(queue_id, flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=queue)
    finally:
        os.close(queue)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != spool_uid or st.st_nlink != 1:
        os.close(fd)
        raise PermissionError(1, "queue file is not a regular file of the spool's user with one link")
    return fd


# -- the daemon's side ------------------------------------------------------------------


class PrivilegedDelivery(LocalDeliveryProcesses):
    """
    The local delivery agent of a daemon that drops root: one supervisor
    process (started in C{privilegedStartService}, before the switch) in
    front of C{count} delivery processes.  When the supervisor ends after
    the switch it cannot be started again: local deliveries are answered
    451 and the log says to restart mailhub.

    @param settings: L{mailhub.delivery.localproc.settings_for}'s dictionary, with
        C{"spool": {"path", "uid"}}.
    """

    def __init__(self, settings: dict[str, Any], count: int, reactor: Any, python: str | None = None) -> None:
        super().__init__(settings, 1, reactor, python)
        self.settings_line = b""  # the supervisor's settings are on its command line
        self.supervisor_args = [json.dumps(settings), str(count)]
        self.orphaned = False

    def child_argv(self) -> list[str]:
        return [self.python, "-c", _SUPERVISOR_MAIN, _PACKAGE_ROOT, *self.supervisor_args]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.stopping = False
        self._spawn(0)

    def startService(self) -> None:
        self.running = 1  # started already, in privilegedStartService

    def _spawn(self, slot: int) -> None:
        if os.geteuid() != 0 and self.children[slot] is None and self.orphaned is False and self.running:
            self._orphan()
            return
        super()._spawn(slot)

    def _ended(self, child: Any) -> None:
        if not self.stopping and os.geteuid() != 0:
            if self.children[child.slot] is child:
                self.children[child.slot] = None
            self._orphan()
            return
        super()._ended(child)

    def _orphan(self) -> None:
        self.orphaned = True
        log.critical(
            "the local delivery supervisor ended and cannot be started again without root: "
            "local mail stays queued (451) until mailhub is restarted"
        )
        self._fail_waiting_if_none_running()

    def deliver(self, envelope: Any, recipients: Any, message_path: str, report: Any) -> Any:
        if self.orphaned:
            from twisted.internet import defer

            return defer.succeed([
                Outcome.temporary(r.address, "no local delivery process is running", 451, "4.3.0") for r in recipients
            ])
        return super().deliver(envelope, recipients, message_path, report)


# -- the supervisor ---------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _Supervisor(protocol.Protocol):
    """Reads requests on stdin, checks them, hands them to the pool, answers on stdout."""

    def __init__(self, pool: LocalDeliveryProcesses, spool: str | None, reactor: Any) -> None:
        self.pool = pool
        self.spool = spool
        self.reactor = reactor
        self._buffer = b""
        self._skipping = False
        self.pending = 0
        self.ending = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                if len(self._buffer) > MAX_REQUEST_LINE:
                    self._skipping = True
                    self._buffer = b""
                return
            self._buffer = rest
            if self._skipping:
                self._skipping = False
                self._refuse(BadRequest(f"request longer than {MAX_REQUEST_LINE} bytes"))
                continue
            self.lineReceived(line)

    def lineReceived(self, line: bytes) -> None:
        if len(line) > MAX_REQUEST_LINE:
            self._refuse(BadRequest(f"request longer than {MAX_REQUEST_LINE} bytes"))
            return
        try:
            request = check_request(json.loads(line), self.spool)
        except BadRequest as e:
            self._refuse(e)
            return
        except (ValueError, RecursionError):
            self._refuse(BadRequest("not JSON"))
            return
        fields = {k: v for k, v in request.items() if k != "id"}
        self.pending += 1
        d = self.pool.submit(fields, request["addresses"])
        d.addCallback(self._answer, request["id"])

    def _answer(self, outcomes: list[Outcome], id: int) -> None:
        from mailhub.delivery.localchild import outcome_to_json

        self.pending -= 1
        self._write({"id": id, "outcomes": [outcome_to_json(o) for o in outcomes]})
        self._maybe_end()

    def _refuse(self, e: BadRequest) -> None:
        sys.stderr.write(f"refused a request: {e}\n")
        sys.stderr.flush()
        if e.id is not None:
            self._write({"id": e.id, "refused": str(e)})

    def _write(self, answer: dict[str, Any]) -> None:
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self.transport.write(json.dumps(answer).encode("ascii") + b"\n")

    # -- the end: the daemon closed our stdin --------------------------------------------

    def readConnectionLost(self) -> None:
        self.ending = True
        self.pool.stopService().addBoth(lambda _: self._maybe_end())

    def _maybe_end(self) -> None:
        if self.ending and self.pending == 0 and not self.pool.running and self.transport is not None:
            transport, self.transport = self.transport, None
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.reactor.running:
            self.reactor.stop()


def limit_open_files() -> None:
    """At most L{MAX_OPEN_FILES} descriptors in this process (a delivery needs a handful)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(MAX_OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, limit) if soft != resource.RLIM_INFINITY else limit, limit))


def main(argv: Sequence[str] | None = None) -> int:
    """C{python -m mailhub.delivery.supervisor SETTINGS COUNT}: started by the daemon, not by hand."""
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    args = list(sys.argv[1:] if argv is None else argv)
    if os.isatty(0) or len(args) != 2:
        print("mailhub.delivery.supervisor: started by the mailhub daemon, not by hand", file=sys.stderr)
        return 64
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr, timeFormat=None)], redirectStandardIO=False)
    settings = json.loads(args[0])
    spool = settings.get("spool", {}).get("path")
    pool = LocalDeliveryProcesses(settings, int(args[1]), reactor)
    supervisor = _Supervisor(pool, spool, reactor)
    stdio.StandardIO(supervisor, reactor=reactor)
    pool.startService()
    # SIGTERM (the whole service being stopped): finish what the processes have
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", lambda: pool.stopService() if pool.running else None
    )
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
