"""
Local delivery in processes of its own (Postfix's local(8) beside qmgr).

Owns: the pool of local delivery processes (L{LocalDeliveryProcesses}, a
delivery agent and a service of the daemon: starting, feeding, restarting
and stopping them) and the protocol between the daemon and them.  The
program each of them runs is L{mailhub.delivery.localchild}.

Why: Maildir delivery is file work -- read the queued message, write a
copy, fsync it, link it, fsync the directory -- plus the Python around
it.  Done in the daemon's threads it competes for the one interpreter
lock with the SMTP sessions and the commits, and every syscall of a
delivery thread hands that lock back and forth with the reactor thread
(hundreds of futex calls per message were measured).  A process of its
own runs on the other core and costs the daemon one line out and one line
in per message.

Protocol, over the child's stdin and stdout, one JSON object per line:

 - first line, parent to child: the settings (L{settings_for}): the
   L{mailhub.delivery.directory.Directory} arguments, the host name and the fsync
   switch.  The child builds its own Directory and
   L{mailhub.delivery.local.LocalDelivery} from them (without the aliases
   file: see L{settings_for}).
 - then requests: C{{"id": N, "queue_id", "arrival", "sender",
   "addresses": [...], "message_path", "crlf"}} (crlf: see
   L{mailhub.delivery.local.QueuedMessage});
 - answers, matched by id (a child answers in order; the root supervisor
   of system mode, L{mailhub.delivery.supervisor}, which speaks the same protocol
   without the settings line, in any order): C{{"id": N, "outcomes":
   [{"recipient", "kind", "code", "status", "text"}, ...]}}:
   L{mailhub.delivery.local.LocalDelivery}'s outcomes, one per address, or
   C{{"id": N, "refused": "why"}} for a request that is not well-formed
   (L{mailhub.delivery.supervisor.check_request}): 451 4.3.0 and a log line.

The child logs to its stderr; the parent logs each line.  A child that
exits or sends garbage fails its requests in flight with a temporary
outcome (451 4.3.0: tried again later; Maildir file names are derived
from the queue id and the recipient, so a delivery that had in fact
completed is not duplicated) and is started again after a pause.
Requests queue in the parent while no child is running.

Must not touch: the spool (only the message file named in a request is
read), the Maildir code (the children's), retry decisions (the scheduler's).
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import mailhub
from mailhub.envelope import Envelope, Outcome, Recipient, ReportFunction

__all__ = ["LocalDeliveryProcesses", "settings_for", "MAX_LINE"]

log = Logger()

#: A line longer than this from a child is garbage (answers are small).
MAX_LINE = 1024 * 1024

#: Seconds before a child that exited is started again; doubled for each
#: child of the slot that ended without answering anything (a child that
#: dies at once must not become a fork loop), up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0

#: The directory that holds the mailhub package (for the children's PYTHONPATH).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mailhub.__file__)))

#: The child's program: mailhub is imported from where this process found it
#: (appended to sys.path, so an installed mailhub still comes first).
_CHILD_MAIN = "import sys; sys.path.append(sys.argv[1]); from mailhub.delivery.localchild import main; sys.exit(main())"

#: Seconds stopService waits for the children to finish what they were given.
STOP_TIMEOUT = 30.0


def settings_for(directory_args: dict[str, Any], hostname: str, fsync: bool, sync: str = "fsync") -> dict[str, Any]:
    """
    The first line sent to each child: what it needs to deliver like the
    daemon.  C{directory_args} are the keyword arguments the daemon built
    its L{mailhub.delivery.directory.Directory} with (JSON values only; no clock);
    C{sync} is C{spool.sync}.

    Without the aliases file: aliases are expanded by the daemon when a
    message is accepted, and delivery only maps final addresses to
    Maildirs.  So a child never reads it -- and an aliases file broken
    while the daemon runs (the daemon keeps its previous table) cannot
    stop a child from starting.
    """
    return {"directory": dict(directory_args, aliases_path=None), "hostname": hostname, "fsync": fsync, "sync": sync}


def _outcome_from_json(d: Any) -> Outcome:
    return Outcome(str(d["recipient"]), str(d["kind"]), int(d["code"]), str(d["status"]), str(d["text"]))


class _Request:
    __slots__ = ("id", "line", "addresses", "deferred")

    def __init__(self, id: int, line: bytes, addresses: list[str]) -> None:
        self.id = id
        self.line = line
        self.addresses = addresses
        self.deferred: defer.Deferred[list[Outcome]] = defer.Deferred()


class _Child(protocol.ProcessProtocol):
    """One delivery process, seen from the daemon."""

    def __init__(self, pool: LocalDeliveryProcesses, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.inflight: dict[int, _Request] = {}  # by id: answers may come in any order
        self._out = b""
        self._err = b""
        self.running = False
        self.retiring = False  # reconfigured: answers what it has, gets nothing new
        self.answered = 0
        self.ended: defer.Deferred[None] = defer.Deferred()

    # -- parent to child ------------------------------------------------------------------

    def send(self, request: _Request) -> None:
        self.inflight[request.id] = request
        assert self.transport is not None
        # Imported here, when the first request is sent: importing this
        # module must not pull in eagerwrite's twisted.internet.tcp (with
        # TLS), about 10 MB per process.
        from mailhub.eagerwrite import write_to_child

        write_to_child(self.transport, request.line)

    def connectionMade(self) -> None:
        self.running = True
        assert self.transport is not None
        self.transport.write(self.pool.settings_line)
        # what waited while no process ran (a restart) goes to this one now
        self.pool._dispatch()

    # -- child to parent ------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        if not self.running:
            return  # broken and being killed: nothing it says counts any more
        buf = self._out + data
        lines = buf.split(b"\n")
        self._out = lines.pop()
        if len(self._out) > MAX_LINE:
            self._broken("answer line too long")
            return
        for line in lines:
            if not self._answer(line):
                return

    def _answer(self, line: bytes) -> bool:
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            request = self.inflight.get(data["id"]) if isinstance(data.get("id"), int) else None
            if request is None:
                raise ValueError(f"unexpected answer id {data.get('id')!r}")
            if "refused" in data:
                why = str(data["refused"])[:200]
                log.error("local delivery process {pid} refused a request: {why}", pid=self._pid(), why=why)
                outcomes = [
                    Outcome.temporary(a, "local delivery refused the request", 451, "4.3.0") for a in request.addresses
                ]
            else:
                outcomes = [_outcome_from_json(o) for o in data["outcomes"]]
            if [o.recipient for o in outcomes] != request.addresses:
                raise ValueError("answer is not about the recipients asked for")
        except (ValueError, KeyError, TypeError) as e:
            self._broken(f"bad answer: {e}")
            return False
        del self.inflight[request.id]
        self.answered += 1
        request.deferred.callback(outcomes)
        self.pool._idle(self)
        return True

    def errReceived(self, data: bytes) -> None:
        buf = self._err + data
        lines = buf.split(b"\n")
        self._err = lines.pop()[-MAX_LINE:]
        for line in lines:
            if line.strip():
                log.warn("local delivery process {pid}: {line}", pid=self._pid(), line=line.decode("utf-8", "replace"))

    def _pid(self) -> Any:
        return getattr(self.transport, "pid", None)

    def _broken(self, why: str) -> None:
        if not self.pool.stopping:
            log.error("local delivery process {pid}: {why}; restarting it", pid=self._pid(), why=why)
        self.running = False
        try:
            assert self.transport is not None
            self.transport.signalProcess("KILL")
        except (error.ProcessExitedAlready, AttributeError):
            pass

    def outConnectionLost(self) -> None:
        # The child closed its stdout: it has exited (or is exiting).  This,
        # not processEnded, is when its requests are failed and it is
        # replaced: processEnded needs the child reaped, which without a
        # SIGCHLD handler (a reactor not in the main thread) may be late.
        self._gone("its output ended")

    def processEnded(self, reason: Failure) -> None:
        self._gone(reason.getErrorMessage())

    def _gone(self, why: str) -> None:
        if self.ended.called:
            return
        self.running = False
        if self._err.strip():
            self.errReceived(b"\n")
        failed, self.inflight = list(self.inflight.values()), {}
        if self.retiring and not failed:
            log.info("local delivery process {pid} ended: replaced for new settings", pid=self._pid())
        elif failed or not self.pool.stopping:
            log.error(
                "local delivery process {pid} ended ({why}); {count} delivery attempt(s) in flight tried again later",
                pid=self._pid(), why=why, count=len(failed),
            )
        for request in failed:
            request.deferred.callback(
                [Outcome.temporary(a, "local delivery process ended unexpectedly", 451, "4.3.0") for a in request.addresses]
            )
        self.ended.callback(None)
        self.pool._ended(self)


class LocalDeliveryProcesses(service.Service):
    """
    A delivery agent (see L{mailhub.delivery.router.DeliveryAgent}) that hands each
    local delivery to one of C{count} child processes, the least busy.

    @param settings: L{settings_for}'s dictionary.
    @param reactor: spawns the children and times their restarts.
    @param python: the interpreter for the children (default: this one).
    """

    def __init__(
        self,
        settings: dict[str, Any],
        count: int,
        reactor: Any,
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.settings_line = json.dumps(settings).encode("utf-8") + b"\n"
        self.count = count
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.python = python or sys.executable
        self.env = env
        self.children: list[_Child | None] = [None] * count
        self.waiting: deque[_Request] = deque()
        self.stopping = False
        self._next_id = 0
        self._restarts: dict[int, Any] = {}
        self._failures: dict[int, int] = {}  # per slot: children in a row that answered nothing

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        for slot in range(self.count):
            self._spawn(slot)

    def stopService(self) -> defer.Deferred[None]:
        """Close the children's input: each ends once it has answered what it was given."""
        super().stopService()
        self.stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        for request in list(self.waiting):
            request.deferred.callback(
                [Outcome.temporary(a, "mail system is shutting down", 451, "4.3.0") for a in request.addresses]
            )
        self.waiting.clear()
        ends = []
        for child in self.children:
            if child is not None and child.running:
                ends.append(child.ended)
                assert child.transport is not None
                child.transport.closeStdin()
        if not ends:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.DeferredList(ends).addCallback(lambda _: None)

        def kill() -> None:
            for child in self.children:
                if child is not None and child.running:
                    log.warn("local delivery process {pid} did not end in time: killed", pid=child._pid())
                    child._broken("stopping")

        timer = self.clock.callLater(STOP_TIMEOUT, kill)

        def stop_timer(result: Failure | None) -> Failure | None:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(stop_timer)

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self.stopping:
            return
        child = _Child(self, slot)
        self.children[slot] = child
        reactor: IReactorProcess = self.reactor
        try:
            reactor.spawnProcess(
                child,
                self.python,
                self.child_argv(),
                env=dict(os.environ) if self.env is None else self.env,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except Exception as e:  # OSError (EMFILE, EAGAIN, ENOENT...), whatever the reactor raises
            self.children[slot] = None
            delay = self._backoff(slot, failed=True)
            log.error(
                "cannot start a local delivery process: {error}; trying again in {delay:.0f} s",
                error=e, delay=delay,
            )
            self._restarts[slot] = self.clock.callLater(delay, self._spawn, slot)
            self._fail_waiting_if_none_running()

    def child_argv(self) -> list[str]:
        """The command line of a child process."""
        return [self.python, "-c", _CHILD_MAIN, _PACKAGE_ROOT]

    def _backoff(self, slot: int, failed: bool) -> float:
        """The delay before the next start of C{slot}: doubled per failure in a row, reset by success."""
        n = self._failures.get(slot, 0) + 1 if failed else 0
        self._failures[slot] = n
        return min(MAX_RESTART_DELAY, RESTART_DELAY * (2 ** max(0, n - 1)))

    def _fail_waiting_if_none_running(self) -> None:
        """
        With no process running and none that got work since it started,
        waiting deliveries are answered "try later" instead of waiting for
        a start that may not come (the scheduler retries them).
        """
        if any(c is not None and c.running for c in self.children):
            return
        waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            request.deferred.callback(
                [Outcome.temporary(a, "no local delivery process is running", 451, "4.3.0") for a in request.addresses]
            )

    def _ended(self, child: _Child) -> None:
        if self.children[child.slot] is not child:
            # a retired child (reconfigure): its slot has its replacement already
            self._dispatch()
            return
        self.children[child.slot] = None
        if not self.stopping:
            # a child that answered nothing (crashed at start, or on its
            # first request) restarts later and later
            delay = self._backoff(child.slot, failed=child.answered == 0)
            self._restarts[child.slot] = self.clock.callLater(delay, self._spawn, child.slot)
            if child.answered == 0:
                self._fail_waiting_if_none_running()
        # whatever waited for a free child may go to another one
        self._dispatch()

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """
        New settings (a configuration reload): every running process gets
        no new work, ends once it has answered what it was given (its
        stdin is closed), and a new one started with C{settings} takes its
        slot at once.
        """
        self.settings_line = json.dumps(settings).encode("utf-8") + b"\n"
        for slot, child in enumerate(self.children):
            if child is not None and child.running and child.transport is not None:
                child.retiring = True
                child.transport.closeStdin()
                restart = self._restarts.pop(slot, None)
                if restart is not None and restart.active():
                    restart.cancel()
                self._spawn(slot)

    def _idle(self, child: _Child) -> None:
        self._dispatch()

    # -- the DeliveryAgent interface ------------------------------------------------------------

    def deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> defer.Deferred[list[Outcome]]:
        """Fires with one L{Outcome} per recipient, in order; never errbacks."""
        addresses = [r.address for r in recipients]
        return self.submit(
            {
                "queue_id": envelope.queue_id,
                "arrival": envelope.arrival,
                "sender": envelope.sender,
                "addresses": addresses,
                "message_path": message_path,
                "crlf": bool(envelope.esmtp.get("crlf")),
            },
            addresses,
        )

    def submit(self, fields: dict[str, Any], addresses: list[str]) -> defer.Deferred[list[Outcome]]:
        """Send one request (L{deliver}'s fields, without the id) to a child; fires with its outcomes."""
        if self.stopping:
            return defer.succeed(
                [Outcome.temporary(a, "mail system is shutting down", 451, "4.3.0") for a in addresses]
            )
        self._next_id += 1
        line = json.dumps(dict(fields, id=self._next_id)).encode("ascii") + b"\n"
        # \u escapes: any str, lone surrogates too, round-trips
        request = _Request(self._next_id, line, addresses)
        self.waiting.append(request)
        self._dispatch()
        return request.deferred

    def _dispatch(self) -> None:
        """
        Give waiting requests to running children, the least busy first.
        A child may be given several (they wait in its pipe): the scheduler
        already bounds how many deliveries are in flight.
        """
        while self.waiting:
            running = [c for c in self.children if c is not None and c.running and not c.retiring]
            if not running:
                return
            child = min(running, key=lambda c: len(c.inflight))
            child.send(self.waiting.popleft())
