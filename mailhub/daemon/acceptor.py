"""
One SMTP acceptor process (C{python -m mailhub.daemon.acceptor ARGS}):
SMTP sessions on listening sockets the main process bound, with a reactor
of its own, committing into the shared spool.

Owns: the acceptor's program -- reading its settings (one JSON argument:
the configuration file, command-line overrides and data directory the
daemon started with, the listening sockets' descriptors, kinds and
endpoints, the AMP channel's descriptor), building the SMTP factories as
L{mailhub.tap} does for one process but with the anvil's
L{mailhub.daemon.anvil.RemoteGate} and L{mailhub.daemon.anvil.RemoteThrottle},
announcing each commit to the main process before its 250 (L{Channel.queued}),
sending its log events there (L{EventForwarder}), its reload and drain.

It never runs as root: the main process starts it after switching to
C{server.user}.  It reads the configuration file and the users file as
that user (the main process reloads them as that user too) and gets the
TLS certificate and key as bytes over the channel (the main process read
them before it gave up root), so a key readable only by root still works.
It listens only once that first message (L{Reload}) arrived.  When its
channel ends (the main process is gone) it stops listening, drains its
sessions and exits: an acceptor never outlives its daemon.  SIGTERM and
SIGINT drain and exit the same way; SIGHUP is ignored (the main process
forwards reloads).

Must not touch: the scheduler, delivery, the control socket, HTTP (the
main process keeps them).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.protocols import amp
from zope.interface import implementer

from mailhub.daemon.acceptors import MAX_VALUE, Drain, LogEvents, Queued, Ready, Reload
from mailhub.eagerwrite import write_now

__all__ = ["Channel", "EventForwarder", "FlushingCommitter", "event_to_wire", "send_now", "main"]

log = Logger()

#: Event keys that stay in this process (objects of its own).
_LOCAL_KEYS = ("log_logger", "log_source", "log_observer", "log_trace", "log_io", "log_failure", "log_legacy")


def event_to_wire(event: dict[str, Any]) -> bytes:
    """One log event as a JSON line for the main process (L{mailhub.daemon.acceptors.event_from_wire})."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in _LOCAL_KEYS:
            continue
        out[key] = value
    level = event.get("log_level")
    out["log_level"] = getattr(level, "name", "info")
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["log_traceback"] = failure.getTraceback()
        except Exception:
            out["log_traceback"] = repr(failure)
    return json.dumps(out, default=repr, ensure_ascii=False).encode("utf-8", "replace")


@implementer(ILogObserver)
class EventForwarder:
    """
    The acceptor's log observer: events are collected and sent to the main
    process in one L{LogEvents} per reactor turn (and at L{flush}).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.channel: amp.AMP | None = None
        self._pending: list[bytes] = []
        self._size = 0
        self._call: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = event_to_wire(event)
        except Exception:
            return
        if len(line) > MAX_VALUE:
            return
        self._pending.append(line)
        self._size += len(line) + 1
        if self._size > MAX_VALUE:
            self.flush()
        elif self._call is None:
            self._call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.channel is None or self.channel.transport is None:
            if len(self._pending) > 10_000:
                del self._pending[:-10_000]
            return
        batch: list[bytes] = []
        size = 0
        for line in self._pending:
            if size + len(line) + 1 > MAX_VALUE and batch:
                self._send(batch)
                batch, size = [], 0
            batch.append(line)
            size += len(line) + 1
        if batch:
            self._send(batch)
        self._pending, self._size = [], 0

    def _send(self, lines: list[bytes]) -> None:
        if self.channel is not None:
            send_now(self.channel, LogEvents, events=b"\n".join(lines))


def send_now(channel: amp.AMP, command: type[amp.Command], **arguments: Any) -> None:
    """
    Send C{command} (one that wants no answer) on C{channel}, written to
    the socket at once when nothing waits there (L{write_now}), so what is
    sent here is in the kernel before anything the caller writes next.
    """
    if channel.transport is None:
        return
    box = command.makeArguments(arguments, channel)
    box[b"_command"] = command.commandName
    write_now(channel.transport, box.serialize())


class Channel(amp.AMP):
    """The acceptor's end of its AMP channel with the main process."""

    def __init__(self, acceptor: Acceptor) -> None:
        super().__init__()
        self.acceptor = acceptor

    def queued(self, envelope: Any) -> None:
        """
        Announce a committed message.  Written to the socket at once when
        nothing else waits there (before the session writes its 250), so a
        kill right after the 250 cannot lose the notice.
        """
        raw = envelope.to_json()
        if len(raw) > MAX_VALUE:
            raw = b""  # the main process reads it from the spool
        # the events so far first ("accepted"): a message's story starts with its arrival
        self.acceptor.forwarder.flush()
        send_now(self, Queued, queue_id=envelope.queue_id, envelope=raw)

    @Reload.responder
    def _reload(self, cert: bytes | None = None, key: bytes | None = None) -> dict[str, Any]:
        applied, summary = self.acceptor.reload(cert, key)
        return {"applied": applied, "summary": summary}

    @Drain.responder
    def _drain(self, timeout: float) -> defer.Deferred[dict[str, Any]]:
        return self.acceptor.drain(timeout).addCallback(lambda _: {})

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.acceptor.channel_lost()


class FlushingCommitter:
    """
    The acceptor's committer: C{committer}'s commit, then the log events so
    far are sent before the 250 (a message delivered on accept is never
    announced with L{Queued}, which flushes them for the spool path).
    """

    def __init__(self, committer: Any, forwarder: EventForwarder) -> None:
        self.committer = committer
        self.forwarder = forwarder

    def commit(self, envelope: Any, writer: Any, log_fields: dict[str, str]) -> defer.Deferred[None]:
        def flushed(result: Any) -> Any:
            self.forwarder.flush()
            return result

        d: defer.Deferred[None] = self.committer.commit(envelope, writer, log_fields)
        return d.addBoth(flushed)


class Acceptor:
    """The acceptor process's state: its configuration, factories and ports."""

    def __init__(self, reactor: Any, args: dict[str, Any], forwarder: EventForwarder) -> None:
        self.reactor = reactor
        self.args = args
        self.forwarder = forwarder
        self.channel: Channel | None = None
        self.config: Any = None
        self.live: Any = None
        self.reloader: Any = None
        self.server_tls: Any = None
        self.factories: list[Any] = []
        self.ports: list[Any] = []
        self.listening = False
        self.counter: Any = None
        self.auth: Any = None
        self._draining: defer.Deferred[None] | None = None

    def load(self) -> Any:
        from mailhub.config import load_config

        return load_config(self.args.get("config"), self.args.get("overrides") or None, self.args.get("data"))

    def start(self) -> None:
        """Read the configuration and connect the channel; listening waits for the first L{Reload}."""
        import socket

        from mailhub.daemon.components import build_components
        from mailhub.daemon.reload import Live, Reloader
        from mailhub.loglevel import set_level

        self.config = config = self.load()
        set_level(config.server.log_level)
        self.live = Live(config)
        self.live.swap(config, **build_components(config, self.reactor, self.live))

        def build(new: Any, running: Any) -> dict[str, Any]:
            components = build_components(new, self.reactor, running)
            set_level(new.server.log_level)
            return components

        self.reloader = Reloader(self.live, self.load, build)
        channel = self.channel = Channel(self)
        self.forwarder.channel = channel
        from twisted.internet.protocol import Factory

        self.reactor.adoptStreamConnection(self.args["channel"], socket.AF_UNIX, Factory.forProtocol(lambda: channel))

    def listen(self) -> None:
        """Build one SMTP factory per listener, as the daemon does for one process, and adopt its socket."""
        import os

        from twisted.internet import threads

        from mailhub.auth.service import AuthService
        from mailhub.daemon.anvil import AnvilCounter, RemoteGate, RemoteThrottle
        from mailhub.daemon.components import smtp_factory, smtps_factory
        from mailhub.daemon.reload import Delegate
        from mailhub.delivery.direct import committer_for
        from mailhub.queue.spool import Spool
        from mailhub.ratelimit.limits import RateLimits

        config, live, channel = self.config, self.live, self.channel
        assert channel is not None
        spool = Spool(config.spool.path, config.spool.fsync)
        throttle = RemoteThrottle(channel, self.reactor, delay=config.auth.failure_delay)
        gate = RemoteGate(channel)
        users = Delegate.of(live, "users") if config.auth.users is not None else None
        #: rate-limit counters shared by every process (the Counter protocol)
        self.counter = AnvilCounter(channel)
        ratelimit: RateLimits | None = RateLimits(config.limits, self.counter, self.reactor)
        if ratelimit is not None and not ratelimit.active:
            ratelimit = None
        # SPF/DKIM/DMARC checks at the end of data: their thread pool and DNS live here
        self.auth = AuthService(config, self.reactor)
        self.auth.startService()
        # deliver on accept writes the Maildirs from here; a spool commit is announced (Queued)
        committer = FlushingCommitter(
            committer_for(config, Delegate.of(live, "directory"), self.reactor, threads.deferToThread, channel.queued),
            self.forwarder,
        )
        for listener in self.args["listeners"]:
            kind = listener["kind"]
            factory = smtp_factory(
                config, live, kind, spool, channel.queued, self.reactor,
                tls=self.server_tls, users=users, throttle=throttle, gate=gate, gate_name=listener["description"],
                checks=self.auth.checks, ratelimit=ratelimit, committer=committer,
            )
            self.factories.append(factory)
            serving: Any = factory
            if kind == "smtps":
                serving = smtps_factory(factory, self.server_tls, config, self.reactor)
            port = self.reactor.adoptStreamPort(listener["fd"], listener["family"], serving)
            os.close(listener["fd"])
            self.ports.append(port)
        self.listening = True
        channel.callRemote(Ready)

    def reload(self, cert: bytes | None, key: bytes | None) -> tuple[bool, str]:
        """The first call: take the certificate and listen.  Later: reload the configuration."""
        from mailhub.tls import ServerTLS

        if not self.listening:
            if cert is not None and key is not None:
                server = self.config.server
                self.server_tls = ServerTLS.from_pem(cert, key, server.tls_cert or "", server.tls_key or "")
            self.listen()
            return True, "listening"
        if cert is not None and key is not None and self.server_tls is not None:
            self.server_tls.use_pem(cert, key)
        outcome = self.reloader.reload(quiet=True)
        return bool(outcome.applied), outcome.summary()

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Stop listening, 421 to idle sessions, finish commits; idempotent."""
        if self._draining is None:
            stopping = [defer.maybeDeferred(port.stopListening) for port in self.ports]
            self.ports = []

            def drained(_: Any) -> Any:
                return defer.DeferredList([f.drain(timeout) for f in self.factories])

            d = defer.DeferredList(stopping).addCallback(drained)
            d.addCallback(lambda _: self.forwarder.flush())
            self._draining = d
        result: defer.Deferred[None] = defer.Deferred()

        def done(r: Any) -> Any:
            result.callback(None)
            return r

        self._draining.addBoth(done)
        return result

    def channel_lost(self) -> None:
        """The main process is gone or done with this one: drain briefly and exit."""
        self.forwarder.channel = None
        self.drain(10.0).addBoth(lambda _: self.stop())

    def stop(self) -> None:
        if self.auth is not None and self.auth.pool.started:
            self.auth.pool.stop()  # sessions drained: no check left in its threads
        if self.reactor.running:
            self.reactor.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m mailhub.daemon.acceptor SETTINGS-JSON (started by the mailhub daemon)\n")
        return 64
    args = json.loads(argv[0])
    from twisted.internet import reactor as _reactor

    from mailhub.loglevel import predicate

    reactor: Any = _reactor

    forwarder = EventForwarder(reactor)
    from twisted.logger import FilteringLogObserver

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(forwarder, [predicate])], redirectStandardIO=False)
    acceptor = Acceptor(reactor, args, forwarder)

    def terminate(signum: int, frame: Any) -> None:
        reactor.callFromThread(lambda: acceptor.drain(30.0).addBoth(lambda _: acceptor.stop()))

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    acceptor.start()
    reactor.run(installSignalHandlers=False)
    forwarder.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
