"""
The recorder: every mail event into the history store, batched, off the
reactor thread; and the pruning.

Owns: the observer on L{mailhub.maillog.mail_publisher} (on the reactor
thread it only appends the event to a list: the event dictionaries are
never changed after they are emitted), the batches (every C{interval}
seconds, or at once when C{batch} events wait), the one writer thread
(a C{ThreadPool} of one: batches are written in order), what happens when
the database fails (the batch is kept and retried; at most C{max_pending}
events wait in memory, the oldest are dropped beyond; the failure is
logged once and counted, and recording resumes by itself), the pruning
every C{prune_interval} seconds in the same thread, and the counters
(L{HistoryCollector} shows them on C{/metrics}).

Mail never waits for the history: nothing here blocks the reactor or
raises into the code that emitted an event.  A process killed with
C{kill -9} loses the events of its last C{interval} (at most one batch);
the database itself stays consistent (SQLite WAL, PostgreSQL
transactions).

Every process that emits mail events may run its own recorder on the same
database (SQLite WAL with a busy timeout, or PostgreSQL): a worker process
needs nothing from the main one.

Must not touch: the mail events, the spool, the SMTP server.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailhub.history.rows import event_row
from mailhub.history.store import Store

__all__ = ["Recorder", "HistoryCollector", "recorder_for"]

log = Logger()


@implementer(ILogObserver)
class Recorder(service.Service):
    """
    @param store: where the events go.
    @param reactor: clock and (without C{run}) the thread pool's reactor.
    @param run: how a blocking call runs: C{run(f, *args) -> Deferred};
        the default is one dedicated thread.  Tests pass a synchronous one.
    @param retention: seconds events are kept (0: for ever).
    @param max_size: bytes the database may use (0: no cap).
    """

    def __init__(
        self,
        store: Store,
        reactor: Any,
        publisher: LogPublisher | None = None,
        run: Callable[..., defer.Deferred[Any]] | None = None,
        interval: float = 1.0,
        batch: int = 1000,
        max_pending: int = 100_000,
        retention: float = 30 * 86400.0,
        max_size: int = 0,
        prune_interval: float = 600.0,
    ) -> None:
        self.store = store
        self.clock: IReactorTime = reactor
        self.reactor = reactor
        self.publisher = publisher
        self._run = run
        self.interval = interval
        self.batch = batch
        self.max_pending = max_pending
        self.retention = retention
        self.max_size = max_size
        self.prune_interval = prune_interval
        self._pending: list[dict[str, Any]] = []
        self._writing: defer.Deferred[Any] | None = None
        self._soon: Any = None
        self._pool: ThreadPool | None = None
        self._loops: list[task.LoopingCall] = []
        self._failing = False
        # counters (read by HistoryCollector and the tests)
        self.recorded = 0
        self.write_failures = 0
        self.dropped = 0
        self.pruned = 0
        self.prune_failures = 0

    # -- the observer (reactor thread) ------------------------------------------------------

    def __call__(self, event: dict[str, Any]) -> None:
        if "mail_event" not in event:
            return
        pending = self._pending
        pending.append(event)
        if len(pending) >= self.batch and self._soon is None and self._writing is None and self.running:
            self._soon = self.clock.callLater(0, self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- running blocking work ----------------------------------------------------------------

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._run is not None:
            return self._run(f, *args)
        assert self._pool is not None
        return threads.deferToThreadPool(self.reactor, self._pool, f, *args)

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> defer.Deferred[Any]:
        """
        Write what waits (one batch at a time; another call while one is
        written waits for it).  Never fails: errors are logged and counted.
        """
        if self._writing is not None:
            return self._chain(self._writing)
        if not self._pending:
            return defer.succeed(None)
        taken = self._pending[: self.batch]
        del self._pending[: len(taken)]
        d = self.run(self._write, taken)
        d.addCallbacks(self._written, self._failed, callbackArgs=(taken,), errbackArgs=(taken,))
        self._writing = d
        d.addBoth(self._done)
        return self._chain(d)

    @staticmethod
    def _chain(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """A Deferred that fires (with None) when C{d} has, leaving C{d}'s result alone."""
        out: defer.Deferred[Any] = defer.Deferred()

        def fire(result: Any) -> Any:
            out.callback(None)
            return result

        d.addBoth(fire)
        return out

    def _write(self, events: list[dict[str, Any]]) -> int:
        """In the writer thread."""
        rows = []
        for e in events:
            try:
                r = event_row(e)
            except Exception:  # an event no row can be made of is skipped, never retried
                continue
            if r is not None:
                rows.append(r)
        try:
            self.store.write(rows)
        except Exception:
            self.store.reset()
            raise
        return len(rows)

    def _written(self, n: int, taken: list[dict[str, Any]]) -> None:
        self.recorded += n
        if self._failing:
            self._failing = False
            log.info("history: recording again ({n} events written)", n=n)

    def _failed(self, failure: Any, taken: list[dict[str, Any]]) -> None:
        self.write_failures += 1
        # put the batch back in front, bounded
        self._pending[:0] = taken
        over = len(self._pending) - self.max_pending
        if over > 0:
            del self._pending[:over]
            self.dropped += over
        if not self._failing:
            self._failing = True
            log.error(
                "history: cannot record events: {error}; mail goes on, {n} events wait in memory and are retried",
                error=_text(failure.value), n=len(self._pending),
            )

    def _done(self, result: Any) -> None:
        self._writing = None
        if len(self._pending) >= self.batch and not self._failing and self.running and self._soon is None:
            self._soon = self.clock.callLater(0, self._flush_soon)

    # -- pruning ----------------------------------------------------------------------------------

    def prune(self) -> defer.Deferred[Any]:
        """Delete what retention and the size cap say, in the writer thread; never fails."""
        if not self.retention and not self.max_size:
            return defer.succeed(0)
        now = self.clock.seconds()
        d = self.run(self._prune, now)

        def done(n: int) -> int:
            self.pruned += n
            if n:
                log.info("history: pruned {n} events", n=n)
            return n

        def failed(f: Any) -> int:
            self.prune_failures += 1
            log.warn("history: pruning failed: {error}", error=_text(f.value))
            return 0

        return d.addCallbacks(done, failed)

    def _prune(self, now: float) -> int:
        try:
            return self.store.prune(now, self.retention, self.max_size)
        except Exception:
            self.store.reset()
            raise

    # -- service ------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._run is None:
            self._pool = ThreadPool(1, 1, "mailhub-history")
            self._pool.start()
        if self.publisher is not None:
            self.publisher.addObserver(self)
        flush = task.LoopingCall(self.flush)
        flush.clock = self.clock
        flush.start(self.interval, now=False)
        prune = task.LoopingCall(self.prune)
        prune.clock = self.clock
        prune.start(self.prune_interval, now=True)
        self._loops = [flush, prune]

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[Any], Any, None]:
        super().stopService()
        if self.publisher is not None:
            self.publisher.removeObserver(self)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        # what waits is written once more (a failing database: it is lost, and said)
        for _ in range(1 + self.max_pending // max(1, self.batch)):
            if not self._pending and self._writing is None:
                break
            yield self.flush()
            if self._failing:
                break
        if self._pending:
            self.dropped += len(self._pending)
            log.warn("history: {n} events not recorded at shutdown", n=len(self._pending))
            self._pending = []
        pool, self._pool = self._pool, None
        if pool is not None:
            yield threads.deferToThreadPool(self.reactor, pool, self.store.close)
            pool.stop()
        else:
            self.store.close()


def _text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class HistoryCollector:
    """The recorder's counters for prometheus_client (C{registry.register(HistoryCollector(r))})."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        r = self.recorder
        yield CounterMetricFamily("mailhub_history_events_recorded", "Mail events written to the history", r.recorded)
        yield CounterMetricFamily(
            "mailhub_history_write_failures", "Batches the history database refused (kept and retried)",
            r.write_failures,
        )
        yield CounterMetricFamily(
            "mailhub_history_events_dropped", "Mail events never recorded (too many waiting, or shut down)", r.dropped,
        )
        yield CounterMetricFamily("mailhub_history_events_pruned", "Events deleted by retention or the size cap", r.pruned)
        yield GaugeMetricFamily("mailhub_history_events_pending", "Mail events waiting to be written", r.pending)

    def describe(self) -> list[Any]:
        return []



def recorder_for(history: Any, node: str, reactor: Any, publisher: LogPublisher | None = None) -> Recorder:
    """
    The recorder a process runs for configuration section C{history}
    (L{mailhub.config.HistoryConfig}) on C{publisher} (default: the mail
    events' publisher, L{mailhub.maillog.mail_publisher}).  The daemon's
    main process calls it in tap.py; an acceptor worker process calls it
    the same way to record the events its own sessions emit.

    @raise mailhub.history.store.StoreError: PostgreSQL without psycopg.
    """
    from mailhub.history.store import open_store
    from mailhub.maillog import mail_publisher

    store = open_store(history.database, node=node)
    return Recorder(
        store, reactor, publisher if publisher is not None else mail_publisher, interval=history.interval,
        retention=history.retention, max_size=history.max_size,
    )
