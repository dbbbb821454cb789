"""
Outbound connections: how many, and keeping idle ones for reuse.

Owns: the connection slots -- at most C{destination_concurrency} per next
hop and C{total_concurrency} in all, a slot held by a delivery in progress
or by an idle connection, granted first come first served -- and the idle
connections: kept C{idle_timeout} seconds after a delivery for the next
one to the same next hop (RSET first), closed (QUIT) when they expire, when
a slot is needed elsewhere and only idle ones are left, and when the pool
is closed.

Must not touch: which next hop or address (L{mailhub.relay.mx}), how a
connection is made or what is said on it (L{mailhub.relay.client}; a
connection here is anything with C{usable}, C{remote_mta}, C{reset()} and
C{quit()}), outcomes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailhub.relay.nexthop import Destination

__all__ = ["ConnectionPool"]

log = Logger()


class ConnectionPool:
    """
    Connection slots and idle connections of the relay agent.

    A delivery takes a slot with an idle connection (L{pop_idle}, then
    L{reuse}) or waits for one (L{acquire}), and gives it back with
    L{release}, which keeps a still usable connection idle.

    @param reactor: IReactorTime for the idle timers.
    @ivar total: slots held now (deliveries in progress plus idle
        connections).
    """

    def __init__(
        self, reactor: Any, destination_concurrency: int, total_concurrency: int, idle_timeout: float
    ) -> None:
        if destination_concurrency < 1 or total_concurrency < 1:
            raise ValueError("concurrency limits must be positive")
        self._reactor = reactor
        self._dest_limit = destination_concurrency
        self._total_limit = total_concurrency
        self._idle_timeout = idle_timeout
        self._count: dict[Destination, int] = {}
        self.total = 0
        self._idle: dict[Destination, list[tuple[Any, Any]]] = {}
        self._waiters: list[tuple[Destination, Deferred]] = []
        self._stopped = False

    def close(self) -> Deferred:
        """Close every idle connection; connections released later are closed too."""
        self._stopped = True
        ds = []
        for dest, entries in list(self._idle.items()):
            for conn, call in entries:
                if call.active():
                    call.cancel()
                ds.append(self.quit(dest, conn))
                self._free(dest)
        self._idle.clear()
        return defer.DeferredList(ds, consumeErrors=True)

    def pop_idle(self, dest: Destination) -> Any:
        """Take an idle connection to C{dest} with its slot, or None."""
        entries = self._idle.get(dest)
        while entries:
            conn, call = entries.pop()
            if call.active():
                call.cancel()
            if conn.usable:
                if not entries:
                    del self._idle[dest]
                return conn
            self.quit(dest, conn)
            self._free(dest)
        self._idle.pop(dest, None)
        return None

    async def reuse(self, dest: Destination, conn: Any) -> Any:
        """RSET a kept connection; None (slot still held) if it is dead."""
        if not conn.usable:
            self.quit(dest, conn)
            return None
        try:
            await conn.reset()
        except Exception as e:
            log.info("cached connection to {remote} failed RSET: {error}", remote=conn.remote_mta, error=str(e))
            self.quit(dest, conn)
            return None
        if not conn.usable:
            self.quit(dest, conn)
            return None
        log.info("reusing connection to {remote} for {dest}", remote=conn.remote_mta, dest=str(dest))
        return conn

    def acquire(self, dest: Destination) -> Deferred:
        """Fires (with an idle connection or None) when a slot for C{dest} is ours."""
        d: Deferred = Deferred()
        self._waiters.append((dest, d))
        self._wake()
        return d

    def _try_grant(self, dest: Destination) -> bool:
        if self._count.get(dest, 0) >= self._dest_limit:
            return False
        if self.total >= self._total_limit:
            victim = next(((vd, entries) for vd, entries in self._idle.items() if entries), None)
            if victim is None:
                return False
            vdest, entries = victim
            conn, call = entries.pop(0)
            if not entries:
                del self._idle[vdest]
            if call.active():
                call.cancel()
            self.quit(vdest, conn)
            self._free(vdest)
            if self._count.get(dest, 0) >= self._dest_limit:
                return False
        self._count[dest] = self._count.get(dest, 0) + 1
        self.total += 1
        return True

    def _wake(self) -> None:
        """Grant slots (or idle connections) to waiters, first come first served."""
        progress = True
        while progress:
            progress = False
            for i, (dest, d) in enumerate(self._waiters):
                conn = self.pop_idle(dest)
                if conn is not None or self._try_grant(dest):
                    del self._waiters[i]
                    d.callback(conn)
                    progress = True
                    break

    def _free(self, dest: Destination) -> None:
        n = self._count.get(dest, 0) - 1
        if n > 0:
            self._count[dest] = n
        else:
            self._count.pop(dest, None)
        self.total -= 1

    def release(self, dest: Destination, conn: Any) -> None:
        """The delivery is done with its slot; keep C{conn} idle if it still works."""
        if conn is not None and conn.usable and not self._stopped:
            call = self._reactor.callLater(self._idle_timeout, self._expire, dest, conn)
            self._idle.setdefault(dest, []).append((conn, call))
        else:
            if conn is not None:
                self.quit(dest, conn)
            self._free(dest)
        self._wake()

    def _expire(self, dest: Destination, conn: Any) -> None:
        entries = self._idle.get(dest, [])
        for i, (c, _call) in enumerate(entries):
            if c is conn:
                del entries[i]
                break
        else:
            return
        if not entries:
            self._idle.pop(dest, None)
        self.quit(dest, conn)
        self._free(dest)
        self._wake()

    def quit(self, dest: Destination, conn: Any) -> Deferred:
        log.debug("closing connection to {remote} ({dest})", remote=getattr(conn, "remote_mta", "?"), dest=str(dest))
        try:
            d = defer.maybeDeferred(conn.quit)
        except Exception:  # pragma: no cover - maybeDeferred catches
            return defer.succeed(None)
        return d.addErrback(lambda f: None)
