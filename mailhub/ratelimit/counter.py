"""
The counter of rate limits: how many events a key saw in its current
window.

Owns: the L{Counter} interface (C{hit(key, window, cost)} fires with the
count in the key's current window after adding C{cost}), the error a
counter fails with when its store cannot answer (L{CounterUnavailable}),
and L{MemoryCounter}, the counter of one process.

A window starts at the first hit of a key and lasts C{window} seconds;
the first hit after it ends starts the next one (a fixed window, as
Postfix's anvil counts, and as the Redis counter counts with a key that
expires).  Every implementation keeps these semantics, so a limit means
the same whichever counter it is counted on.

Must not touch: what a count means (the limits decide, L{mailhub.ratelimit.limits}),
the network, the wall clock (time is injected).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

__all__ = ["Counter", "CounterUnavailable", "MemoryCounter", "PRUNE_EVERY"]

#: A memory counter forgets the keys whose window ended every this many hits.
PRUNE_EVERY = 1024


class CounterUnavailable(Exception):
    """The counter's store did not answer (Redis down, a timeout): nothing was counted."""


class Counter(Protocol):
    """Counts events per key and window."""

    def hit(self, key: str, window: float, cost: int = 1) -> Deferred[int]:
        """
        Add C{cost} events to C{key}'s current window of C{window} seconds
        (one starts at this hit if none is running) and fire with the
        count in that window, C{cost} included; fail with
        L{CounterUnavailable} when the count is unknown.
        """
        ...


class MemoryCounter:
    """
    A L{Counter} in this process's memory: exact, synchronous (the
    Deferred has fired on return), forgotten on restart.

    @param clock: the time windows are measured on.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: key -> (end of its window, count)
        self._windows: dict[str, tuple[float, int]] = {}
        self._hits = 0

    def __len__(self) -> int:
        """Keys whose window is remembered (ended ones are forgotten now and then)."""
        return len(self._windows)

    def hit(self, key: str, window: float, cost: int = 1) -> Deferred[int]:
        now = self.clock.seconds()
        self._hits += 1
        if self._hits >= PRUNE_EVERY:
            self._hits = 0
            self._prune(now)
        current = self._windows.get(key)
        if current is None or current[0] <= now:
            current = (now + window, 0)
        count = current[1] + cost
        self._windows[key] = (current[0], count)
        return defer.succeed(count)

    def _prune(self, now: float) -> None:
        for key in [k for k, (end, _) in self._windows.items() if end <= now]:
            del self._windows[key]
