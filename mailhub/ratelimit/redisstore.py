"""
The rate-limit counter shared by several mailhub nodes: counts in Redis.

Owns: L{RedisCounter} (a L{mailhub.ratelimit.counter.Counter} whose
windows are Redis keys: C{INCRBY} and C{PEXPIRE ... NX} in one
C{MULTI}/C{EXEC}, so the window starts at the first hit of any node and
ends when the key expires: no node's clock matters), its thread pool and
the mapping of every Redis or socket error to
L{mailhub.ratelimit.counter.CounterUnavailable}.

The client is redis-py (the Redis project's own Python client) called in
a small thread pool of this counter's own, never in the reactor thread
and never in the reactor's shared pool (which the spool's commits use): a
Redis that hangs costs at most C{timeout} seconds per hit and holds up
no commit.

Must not touch: what a count means (L{mailhub.ratelimit.limits}), what
happens when Redis is down (the limits' C{[limits] redis_failure}).
"""

from __future__ import annotations

import math
from typing import Any

from twisted.application import service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailhub.ratelimit.counter import CounterUnavailable

__all__ = ["RedisCounter", "KEY_PREFIX", "THREADS"]

log = Logger()

#: Every key this counter writes starts with this (one Redis may serve other programs too).
KEY_PREFIX = "mailhub:rl:"
#: Threads talking to Redis at once.
THREADS = 4
#: Longest key part kept (keys come from client input: addresses, user names).
MAX_KEY = 300


class RedisCounter(service.Service):
    """
    A L{mailhub.ratelimit.counter.Counter} in Redis.  A service: its thread
    pool runs while it runs (a hit before L{startService} fails with
    L{CounterUnavailable}).

    @param url: C{redis://[:password@]host:port/db}, C{rediss://...} or
        C{unix:///path}, as redis-py reads it.
    @param reactor: the reactor the answers are delivered in.
    @param timeout: seconds for connecting and for each command.
    """

    def __init__(self, url: str, reactor: Any, timeout: float = 1.0, client: Any = None) -> None:
        self.url = url
        self.reactor = reactor
        self.timeout = timeout
        if client is None:
            import redis

            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=THREADS,
                retry_on_timeout=False,
            )
        self.client = client
        self.pool: ThreadPool | None = None

    def startService(self) -> None:
        super().startService()
        self.pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="mailhub-redis")
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop()
        try:
            self.client.close()
        except Exception:  # closing a broken connection may fail too; nothing to do about it
            log.debug("closing the Redis client failed")

    def hit(self, key: str, window: float, cost: int = 1) -> Deferred[int]:
        if self.pool is None:
            from twisted.internet import defer

            return defer.fail(CounterUnavailable("the Redis counter is not running"))
        name = KEY_PREFIX + key[:MAX_KEY]
        ms = max(1, math.ceil(window * 1000))
        d = threads.deferToThreadPool(self.reactor, self.pool, self._hit, name, ms, cost)
        d.addErrback(self._unavailable)
        return d

    def _hit(self, name: str, ms: int, cost: int) -> int:
        """In a pool thread: one MULTI/EXEC."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incrby(name, cost)
        pipe.pexpire(name, ms, nx=True)
        count, _ = pipe.execute()
        return int(count)

    @staticmethod
    def _unavailable(failure: Failure) -> int:
        if failure.check(CounterUnavailable):
            failure.raiseException()
        raise CounterUnavailable(f"redis: {failure.getErrorMessage()}"[:200])
