"""
The SMTP acceptor processes, seen from the main process: starting them on
the listening sockets the main process bound, talking to them over AMP,
restarting one that ends, reloading and stopping them.

Owns: the AMP commands between the main process and an acceptor
(L{Queued}, L{LogEvents}, L{Ready} one way; L{Reload}, L{Drain} the
other), L{AcceptorPool} (the service that runs C{server.processes}
acceptors) and L{processes_for} (what C{"auto"} means).  Each acceptor
is C{python -m mailhub.daemon.acceptor}, given the listening sockets and
one end of a UNIX socket pair (its AMP channel) as file descriptors, and
it runs as the user the main process switched to (it is started after
the switch), so network input is never parsed as root.  The TLS
certificate and key go to it over the channel: the main process read
them before it gave up root.

What reaches the main process: every committed message at once
(L{Queued}, written to the channel before the client's 250, so a killed
acceptor cannot lose the notice of a message it acknowledged), the
acceptor's log events and mail events (L{LogEvents}: the metrics, the
event log and the mail log see every process), and the anvil's
questions (L{mailhub.daemon.anvil}).  When an acceptor ends without
being asked to, the main process restarts it after a backoff (doubling
from 1 s to 60 s while it keeps dying within 30 s of its start) and
looks for queue files that no notice announced (a message committed
just before the kill, whose client got no 250): the scheduler gets them.

Must not touch: SMTP sessions (the acceptor runs them), the spool's
files (only reads envelopes it is told about), the scheduler's state
(only L{enqueue}).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.protocols import amp

from mailhub.daemon.anvil import Anvil, AnvilResponder
from mailhub.envelope import Envelope
from mailhub.maillog import mail_publisher

__all__ = [
    "Queued",
    "LogEvents",
    "Ready",
    "Reload",
    "Drain",
    "AcceptorPool",
    "processes_for",
    "event_from_wire",
    "MIN_BACKOFF",
    "MAX_BACKOFF",
    "STABLE",
]

log = Logger()

#: Restart delays of an acceptor that ended (seconds), and how long it must
#: have run for the delay to start again from the shortest.
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
STABLE = 30.0

#: The most of one AMP value (64 KiB minus a margin).
MAX_VALUE = 60_000


class Queued(amp.Command):
    """A message was committed: its id, and its envelope (JSON) when it fits in one value."""

    arguments = [(b"queue_id", amp.Unicode()), (b"envelope", amp.String())]
    requiresAnswer = False


class LogEvents(amp.Command):
    """Log events of an acceptor, one JSON object per line."""

    arguments = [(b"events", amp.String())]
    requiresAnswer = False


class Ready(amp.Command):
    """The acceptor listens on every socket it was given."""

    arguments = []  # type: ignore[var-annotated]
    requiresAnswer = False


class Reload(amp.Command):
    """Reload the configuration (and take this certificate and key, if any)."""

    arguments = [(b"cert", amp.String(optional=True)), (b"key", amp.String(optional=True))]
    response = [(b"applied", amp.Boolean()), (b"summary", amp.Unicode())]


class Drain(amp.Command):
    """Stop listening, tell idle sessions 421, finish the commits in flight (at most C{timeout} s)."""

    arguments = [(b"timeout", amp.Float())]
    response = []  # type: ignore[var-annotated]


def processes_for(value: str | int) -> int:
    """C{server.processes}: a number, or C{"auto"} (the CPUs this process may run on)."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)
    return int(value)


def event_from_wire(line: bytes, pid: int) -> dict[str, Any] | None:
    """
    One log event an acceptor sent, made whole again for this process's
    log: its level, its text (a failure's traceback appended), and the
    acceptor's pid in C{acceptor_pid}.  C{None} for what is not an event.
    """
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    try:
        event["log_level"] = LogLevel.levelWithName(str(event.get("log_level", "info")))
    except Exception:
        event["log_level"] = LogLevel.info
    traceback = event.pop("log_traceback", None)
    if traceback:
        text = str(traceback).replace("{", "{{").replace("}", "}}")
        event["log_format"] = str(event.get("log_format") or "") + "\n" + text
    event.setdefault("log_format", "")
    event.setdefault("log_namespace", "mailhub.acceptor")
    event["log_logger"] = log
    event["log_source"] = None
    event["acceptor_pid"] = pid
    return event


class _Channel(AnvilResponder):
    """The main process's end of one acceptor's AMP channel."""

    def __init__(self, pool: AcceptorPool, worker: _Worker) -> None:
        super().__init__(pool.anvil)
        self.pool = pool
        self.worker = worker

    @Queued.responder
    def _queued(self, queue_id: str, envelope: bytes) -> dict[str, Any]:
        self.pool.queued(queue_id, envelope)
        return {}

    @LogEvents.responder
    def _log_events(self, events: bytes) -> dict[str, Any]:
        for line in events.splitlines():
            event = event_from_wire(line, self.worker.pid)
            if event is None:
                continue
            if "mail_event" in event:
                mail_publisher(event)
            else:
                globalLogPublisher(event)
        return {}

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.worker.channel_lost.called:
            self.worker.channel_lost.callback(None)

    @Ready.responder
    def _ready(self) -> dict[str, Any]:
        self.worker.ready = True
        log.info("acceptor process {pid} serves SMTP", pid=self.worker.pid)
        return {}


class _Worker(protocol.ProcessProtocol):
    """One acceptor process: its pid, channel, output lines and end."""

    def __init__(self, pool: AcceptorPool, started: float) -> None:
        self.pool = pool
        self.started = started
        self.pid = 0
        self.channel: _Channel | None = None
        self.ready = False
        self.stopping = False
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: fires once everything the acceptor wrote to its channel was read
        self.channel_lost: defer.Deferred[None] = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # What the acceptor printed itself (its log goes over the channel):
        # a traceback at start, an interpreter error.
        buf = self._partial.get(childFD, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[childFD] = rest[-4096:]
        for line in lines:
            log.warn("acceptor process {pid}: {line}", pid=self.pid, line=line.decode("utf-8", "replace")[:2000])

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.childDataReceived(fd, b"\n")
        # its end of the channel is closed now: the main process reads what
        # is left in the socket, then sees the end (channel_lost)
        if self.channel is None:
            self.channel_lost.callback(None)
        self.pool.ended(self, reason)
        self.ended.callback(None)


class AcceptorPool(service.Service):
    """
    Runs C{count} acceptor processes on the listeners' sockets (see the
    module docstring).

    @param listeners: the main process's bound listeners: objects with
        C{port} (the listening port, bound and not read from), C{kind}
        (C{smtp}, C{submission}, C{smtps}) and C{description}.
    @param settings: what every acceptor is told at start (configuration
        file, overrides, data directory); see L{mailhub.daemon.acceptor}.
    @param enqueue: the scheduler's C{enqueue}.
    @param load: reads an envelope from the spool (C{Spool.load}).
    @param recover: returns the envelopes of the spool nobody announced
        (called after an acceptor ended unasked).
    @param tls: the main process's L{mailhub.tls.ServerTLS}, or C{None}.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        listeners: list[Any],
        settings: dict[str, Any],
        anvil: Anvil,
        enqueue: Callable[[Envelope], None],
        load: Callable[[str], Envelope],
        recover: Callable[[], list[Envelope]] | None = None,
        tls: Any = None,
        drain_timeout: float = 30.0,
        executable: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.count = count
        self.listeners = listeners
        self.settings = settings
        self.anvil = anvil
        self.enqueue = enqueue
        self.load = load
        self.recover = recover
        self.tls = tls
        self.drain_timeout = drain_timeout
        self.executable = executable
        self.workers: list[_Worker] = []
        self.restarts = 0
        self._failures = 0  # consecutive acceptors that ended soon after their start
        self._timers: list[Any] = []

    # -- start ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # once the reactor runs: its signal handlers are in place before
        # the first fork, so a SIGTERM at any time is a clean stop
        self.reactor.callWhenRunning(self._spawn_all)

    def _spawn_all(self) -> None:
        if not self.running:
            return
        while len(self.workers) < self.count:
            self.spawn()

    def spawn(self) -> _Worker:
        """Start one acceptor process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = _Worker(self, self.clock.seconds())
        try:
            fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", 3: theirs.fileno()}
            listeners = []
            for i, listener in enumerate(self.listeners):
                port = listener.port
                fds[4 + i] = port.fileno()
                listeners.append({
                    "fd": 4 + i, "family": int(port.addressFamily), "kind": listener.kind,
                    "description": listener.description,
                })
            args = dict(self.settings, listeners=listeners, channel=3)
            self.reactor.spawnProcess(
                worker, self.executable,
                [self.executable, "-m", "mailhub.daemon.acceptor", json.dumps(args)],
                env=dict(os.environ), childFDs=fds,
            )
            transport: Any = worker.transport
            worker.pid = transport.pid
            transport.closeStdin()
            channel = _Channel(self, worker)
            channel.holder = worker.pid
            worker.channel = channel
            factory = protocol.Factory.forProtocol(lambda: channel)
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        finally:
            ours.close()
            theirs.close()
        self.workers.append(worker)
        # The certificate and key before the first handshake: the acceptor
        # waits for this first Reload before it listens.
        self._reload(worker)
        return worker

    def _reload(self, worker: _Worker) -> defer.Deferred[Any]:
        """Send L{Reload} with the current certificate and key; fires with its answer or None."""
        assert worker.channel is not None
        cert, key = self.tls.pem if self.tls is not None else (None, None)
        try:
            d = worker.channel.callRemote(Reload, cert=cert, key=key)
        except amp.TooLong:
            log.error("the TLS certificate and key are over 64 KiB: the acceptor processes cannot get them")
            return defer.succeed(None)
        return d.addErrback(lambda f: None)  # it ended: ended() says so

    # -- one that ends ---------------------------------------------------------------

    def ended(self, worker: _Worker, reason: Any) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.stopping or not self.running:
            return
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"killed by signal {sig}" if sig else f"exit status {status}"
        ran = self.clock.seconds() - worker.started
        self._failures = self._failures + 1 if ran < STABLE else 1
        delay = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (self._failures - 1))
        log.error(
            "acceptor process {pid} ended ({how}) after {ran:.1f} s; another starts in {delay:g} s",
            pid=worker.pid, how=how, ran=ran, delay=delay,
        )
        worker.channel_lost.addCallback(lambda _: self._catch_up())
        timer = self.clock.callLater(delay, self._respawn)
        self._timers.append(timer)

    def _respawn(self) -> None:
        self._timers = [t for t in self._timers if t.active()]
        if self.running and len(self.workers) < self.count:
            self.restarts += 1
            self.spawn()

    def _catch_up(self) -> None:
        """Queue what an acceptor committed but did not announce before it ended."""
        if self.recover is None:
            return
        try:
            for envelope in self.recover():
                self.enqueue(envelope)
        except Exception:
            log.failure("looking for messages an acceptor committed")

    # -- what they say ---------------------------------------------------------------

    def queued(self, queue_id: str, raw: bytes) -> None:
        """An acceptor committed C{queue_id}: the scheduler gets it now."""
        try:
            envelope = Envelope.from_json(raw) if raw else self.load(queue_id)
            if envelope.queue_id != queue_id:
                raise ValueError(f"envelope of {envelope.queue_id} announced as {queue_id}")
        except Exception:
            log.failure("cannot read the envelope of {queue_id} (it stays in the spool)", queue_id=queue_id)
            return
        self.enqueue(envelope)

    def sessions(self) -> dict[str, int]:
        """Open SMTP sessions per acceptor pid (those the anvil admitted)."""
        counts = {str(w.pid): 0 for w in self.workers}
        for holder, n in self.anvil.sessions().items():
            if str(holder) in counts:
                counts[str(holder)] = n
        return counts

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> defer.Deferred[Any]:
        """Every acceptor reloads its configuration (and takes the current certificate)."""
        calls = []
        for worker in list(self.workers):
            if worker.channel is None:
                continue
            d = self._reload(worker)

            def said(result: dict[str, Any] | None, pid: int = worker.pid) -> None:
                if result is not None and not result["applied"]:
                    log.error("acceptor process {pid}: {summary}", pid=pid, summary=result["summary"])

            d.addCallback(said)
            calls.append(d)
        return defer.DeferredList(calls)

    # -- stop --------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[Any]:
        """
        Every acceptor stops listening, says 421 to its idle sessions and
        finishes its commits (L{Drain}); fires once all have ended.  One
        that does not end within the drain timeout and 10 s more is killed.
        """
        super().stopService()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        waits = []
        for worker in list(self.workers):
            worker.stopping = True
            waits.append(worker.ended)
            self._stop(worker)
        return defer.DeferredList(waits).addCallback(lambda _: None)

    def _stop(self, worker: _Worker) -> None:
        channel = worker.channel
        killer = self.clock.callLater(self.drain_timeout + 10, self._kill, worker)
        worker.ended.addBoth(lambda r: killer.cancel() if killer.active() else None)
        if channel is None or channel.transport is None:
            return  # ending already (a SIGTERM of its own drains too)
        d = channel.callRemote(Drain, timeout=self.drain_timeout)
        # drained: closing the channel ends the acceptor
        d.addBoth(lambda _: channel.transport.loseConnection() if channel.transport is not None else None)

    def _kill(self, worker: _Worker) -> None:
        if worker.ended.called:
            return
        log.warn("acceptor process {pid} did not stop: killing it", pid=worker.pid)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except OSError:
            pass
