"""
The state the SMTP acceptor processes share, kept in the main process and
asked over AMP (Postfix's anvil).

Owns: the AMP commands of that shared state (L{Admit}, L{Release},
L{AuthBegin}, L{AuthFinish}, L{AuthBlocked}, L{Hit}); L{Anvil}, the state
itself in the main process -- connections per listener and client IP
(C{server.max_connections}, C{max_connections_per_ip}) counted over every
process, the AUTH failure throttle (one L{mailhub.smtp.sasl.AuthThrottle}
for the whole daemon), rate-limit counters (the daemon's C{[limits]} counter,
L{mailhub.ratelimit.counter.MemoryCounter} or Redis, or L{WindowCounter}) and who holds how many sessions;
L{AnvilResponder}, its AMP face for one acceptor process; and the
acceptor's side of it, shaped as the single-process objects are so the
SMTP server does not know the difference: L{RemoteGate} (admission),
L{RemoteThrottle} (AUTH) and L{AnvilCounter} (rate limits:
C{hit(key, window, cost) -> Deferred[int]}).

Every answer is computed at once from memory (a Redis counter adds its
own round trip; its failure reaches the acceptor as
L{mailhub.ratelimit.counter.CounterUnavailable}): an acceptor waits one round
trip on a local socket for it, never for a timer in the main process (the
failed-AUTH delay runs in the acceptor).  When an acceptor's connection
ends, L{Anvil.forget} gives back everything it held (its sessions, its
AUTH checks in flight), so a killed acceptor leaves no counts behind.

Must not touch: SMTP sessions, processes (L{mailhub.daemon.acceptors}
starts them), the spool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from mailhub.ratelimit.counter import CounterUnavailable
from mailhub.smtp.sasl import AuthThrottle

__all__ = [
    "AnvilError",
    "Admit",
    "Release",
    "AuthBegin",
    "AuthFinish",
    "AuthBlocked",
    "Hit",
    "Anvil",
    "AnvilResponder",
    "WindowCounter",
    "RemoteGate",
    "RemoteThrottle",
    "AnvilCounter",
    "MAX_KEY",
]

#: Longest listener name, IP or counter key taken (bytes of UTF-8); longer is refused.
MAX_KEY = 512


class AnvilError(Exception):
    """A question the anvil does not take (an overlong key, a window that is not positive)."""


_ERRORS: dict[type[Exception], bytes] = {AnvilError: b"ANVIL_ERROR"}


class Admit(amp.Command):
    """A connection to C{listener} from C{ip}: C{limit} is "" (admitted) or the limit reached."""

    arguments = [(b"listener", amp.Unicode()), (b"ip", amp.Unicode())]
    response = [(b"limit", amp.Unicode())]
    errors = _ERRORS


class Release(amp.Command):
    """An admitted connection ended."""

    arguments = [(b"listener", amp.Unicode()), (b"ip", amp.Unicode())]
    requiresAnswer = False


class AuthBegin(amp.Command):
    """Reserve a slot for one credential check (L{AuthThrottle.begin})."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"ok", amp.Boolean())]
    errors = _ERRORS


class AuthFinish(amp.Command):
    """Give the slot back; C{ok} false counts a failure.  C{blocked}: the IP is blocked now."""

    arguments = [(b"ip", amp.Unicode()), (b"ok", amp.Boolean())]
    response = [(b"blocked", amp.Boolean())]


class AuthBlocked(amp.Command):
    """Whether C{ip} must get 421 4.7.0 at AUTH (L{AuthThrottle.blocked})."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"blocked", amp.Boolean())]
    errors = _ERRORS


class Hit(amp.Command):
    """Add C{cost} to C{key}'s counter for C{window} seconds; C{count}: its total in the window."""

    arguments = [(b"key", amp.Unicode()), (b"window", amp.Float()), (b"cost", amp.Integer())]
    response = [(b"count", amp.Integer())]
    # the main process's counter (Redis) did not answer: the acceptor's limits fail open or closed
    errors = {**_ERRORS, CounterUnavailable: b"COUNTER_UNAVAILABLE"}


class WindowCounter:
    """
    Rate-limit counters in memory: the total cost of C{key} in the current
    fixed window of C{window} seconds.  At most C{max_keys} keys are kept
    (windows that ended are dropped first, then the oldest).
    """

    def __init__(self, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._counts: dict[tuple[str, float], tuple[int, int]] = {}  # (key, window) -> (window number, total)

    def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
        now = self.clock.seconds()
        number = int(now // window) if window > 0 else 0
        slot = (key, window)
        current = self._counts.get(slot)
        total = cost if current is None or current[0] != number else current[1] + cost
        if current is None and len(self._counts) >= self.max_keys:
            self._prune(now)
        self._counts[slot] = (number, total)
        return defer.succeed(total)

    def _prune(self, now: float) -> None:
        for slot, (number, _) in list(self._counts.items()):
            if slot[1] <= 0 or number != int(now // slot[1]):
                del self._counts[slot]
        while len(self._counts) >= self.max_keys:
            del self._counts[next(iter(self._counts))]


class Anvil:
    """
    The shared state (see the module docstring).

    @param limits: returns C{(max_connections, max_connections_per_ip)}
        now (the live C{[server]} table, so a reload reaches it).
    @param throttle: the daemon's one AUTH throttle.
    @param counter: the rate-limit counters (default L{WindowCounter}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        limits: Callable[[], tuple[int, int]],
        throttle: AuthThrottle | None = None,
        counter: Any = None,
    ) -> None:
        self.clock = clock
        self.limits = limits
        self.throttle = throttle if throttle is not None else AuthThrottle(clock)
        self.counter = counter if counter is not None else WindowCounter(clock)
        self._listeners: dict[str, tuple[int, dict[str, int]]] = {}  # listener -> (total, per IP)
        self._held: dict[Any, dict[tuple[str, str], int]] = {}  # holder -> (listener, ip) -> connections
        self._auth: dict[Any, dict[str, int]] = {}  # holder -> ip -> AUTH checks in flight

    # -- connections ---------------------------------------------------------

    def admit(self, holder: Any, listener: str, ip: str) -> str:
        """Count a connection for C{holder}; "" when admitted, else the name of the limit reached."""
        max_total, max_per_ip = self.limits()
        total, per_ip = self._listeners.get(listener, (0, {}))
        if total >= max_total:
            return "max_connections"
        if per_ip.get(ip, 0) >= max_per_ip:
            return "max_connections_per_ip"
        per_ip[ip] = per_ip.get(ip, 0) + 1
        self._listeners[listener] = (total + 1, per_ip)
        held = self._held.setdefault(holder, {})
        held[(listener, ip)] = held.get((listener, ip), 0) + 1
        return ""

    def release(self, holder: Any, listener: str, ip: str, count: int = 1) -> None:
        """C{count} connections of C{holder} ended (more than it holds is ignored)."""
        held = self._held.get(holder, {})
        count = min(count, held.get((listener, ip), 0))
        if count <= 0:
            return
        left = held[(listener, ip)] - count
        if left:
            held[(listener, ip)] = left
        else:
            del held[(listener, ip)]
        total, per_ip = self._listeners[listener]
        n = per_ip.get(ip, 0) - count
        if n > 0:
            per_ip[ip] = n
        else:
            per_ip.pop(ip, None)
        self._listeners[listener] = (total - count, per_ip)

    def sessions(self) -> dict[Any, int]:
        """Open sessions per holder (the acceptors' pids)."""
        return {holder: sum(held.values()) for holder, held in self._held.items()}

    def connections(self, listener: str, ip: str | None = None) -> int:
        """Connections counted on C{listener} (from C{ip}), over every holder."""
        total, per_ip = self._listeners.get(listener, (0, {}))
        return total if ip is None else per_ip.get(ip, 0)

    # -- AUTH ------------------------------------------------------------------

    def auth_begin(self, holder: Any, ip: str) -> bool:
        ok = self.throttle.begin(ip)
        if ok:
            mine = self._auth.setdefault(holder, {})
            mine[ip] = mine.get(ip, 0) + 1
        return ok

    def auth_finish(self, holder: Any, ip: str, ok: bool) -> bool:
        """The check of L{auth_begin} ended; returns whether C{ip} is blocked now."""
        mine = self._auth.get(holder, {})
        if mine.get(ip, 0) <= 0:
            return self.throttle.blocked(ip)  # not begun here: nothing to give back or count
        mine[ip] -= 1
        if not mine[ip]:
            del mine[ip]
        self.throttle.finish(ip, ok=True)  # the slot back, without the delay timer
        if ok:
            return False
        return self.throttle.record_failure(ip)

    # -- the end of a holder ---------------------------------------------------------

    def forget(self, holder: Any) -> None:
        """C{holder} is gone: its sessions and AUTH checks in flight are given back."""
        for (listener, ip), count in list(self._held.get(holder, {}).items()):
            self.release(holder, listener, ip, count)
        self._held.pop(holder, None)
        for ip, count in self._auth.pop(holder, {}).items():
            for _ in range(count):
                self.throttle.finish(ip, ok=True)


def _key(value: str) -> str:
    if len(value.encode("utf-8", "replace")) > MAX_KEY:
        raise AnvilError("key too long")
    return value


class AnvilResponder(amp.AMP):
    """
    The main process's end of one acceptor's AMP connection: answers the
    anvil commands from L{Anvil}.  C{holder} names the acceptor (its pid,
    once known); L{connectionLost} makes the anvil L{Anvil.forget} it.
    """

    def __init__(self, anvil: Anvil, holder: Any = None) -> None:
        super().__init__()
        self.anvil = anvil
        self.holder: Any = holder if holder is not None else self

    @Admit.responder
    def _admit(self, listener: str, ip: str) -> dict[str, Any]:
        return {"limit": self.anvil.admit(self.holder, _key(listener), _key(ip))}

    @Release.responder
    def _release(self, listener: str, ip: str) -> dict[str, Any]:
        self.anvil.release(self.holder, listener, ip)
        return {}

    @AuthBegin.responder
    def _auth_begin(self, ip: str) -> dict[str, Any]:
        return {"ok": self.anvil.auth_begin(self.holder, _key(ip))}

    @AuthFinish.responder
    def _auth_finish(self, ip: str, ok: bool) -> dict[str, Any]:
        return {"blocked": self.anvil.auth_finish(self.holder, ip, ok)}

    @AuthBlocked.responder
    def _auth_blocked(self, ip: str) -> dict[str, Any]:
        return {"blocked": self.anvil.throttle.blocked(_key(ip))}

    @Hit.responder
    def _hit(self, key: str, window: float, cost: int) -> defer.Deferred[dict[str, Any]]:
        if not window > 0 or cost < 0:
            raise AnvilError("window must be positive and cost at least 0")
        d = defer.maybeDeferred(self.anvil.counter.hit, _key(key), window, cost)
        return d.addCallback(lambda count: {"count": int(count)})

    def connectionLost(self, reason: Any = None) -> None:
        self.anvil.forget(self.holder)
        super().connectionLost(reason)


# -- the acceptor's side --------------------------------------------------------------


class RemoteGate:
    """
    Admission through the anvil, for L{mailhub.smtp.factory.SMTPServerFactory}'s
    C{gate}: C{admit} fires with "" or the name of the limit reached; a
    failed call (the main process is gone) refuses with C{"anvil"}.
    """

    def __init__(self, amp_protocol: amp.AMP) -> None:
        self.amp = amp_protocol

    def admit(self, listener: str, ip: str) -> defer.Deferred[str]:
        d = self.amp.callRemote(Admit, listener=listener, ip=ip)
        d.addCallbacks(lambda r: str(r["limit"]), lambda f: "anvil")
        return d

    def release(self, listener: str, ip: str) -> None:
        try:
            self.amp.callRemote(Release, listener=listener, ip=ip)
        except Exception:  # the main process is gone: it forgets this process anyway
            pass


class RemoteThrottle:
    """
    The daemon's AUTH throttle seen from an acceptor, with the shape of
    L{AuthThrottle} that L{mailhub.smtp.tlsauth} uses: C{blocked} and
    C{begin} answer with a Deferred; C{finish} fires, after C{delay} for a
    failure (the timer runs here), with whether to close.  Failures are
    counted in the main process over every acceptor.
    """

    def __init__(self, amp_protocol: amp.AMP, clock: IReactorTime, delay: float = 1.0) -> None:
        self.amp = amp_protocol
        self.clock = clock
        self.delay = delay

    def blocked(self, client_ip: str) -> defer.Deferred[bool]:
        d = self.amp.callRemote(AuthBlocked, ip=client_ip)
        return d.addCallback(lambda r: bool(r["blocked"]))

    def begin(self, client_ip: str) -> defer.Deferred[bool]:
        d = self.amp.callRemote(AuthBegin, ip=client_ip)
        return d.addCallback(lambda r: bool(r["ok"]))

    def finish(self, client_ip: str, ok: bool) -> defer.Deferred[bool]:
        d = self.amp.callRemote(AuthFinish, ip=client_ip, ok=ok)
        if ok:
            d.addErrback(lambda f: None)
            return defer.succeed(False)

        def wait(r: dict[str, Any]) -> defer.Deferred[bool]:
            blocked = bool(r["blocked"])
            return task.deferLater(self.clock, self.delay, lambda: blocked)

        return d.addCallback(wait)


class AnvilCounter:
    """
    Rate-limit counters kept in the main process: C{hit(key, window, cost)}
    fires with C{key}'s total in its window, counted over every process
    (the C{Counter} protocol of the rate limits).
    """

    def __init__(self, amp_protocol: amp.AMP) -> None:
        self.amp = amp_protocol

    def hit(self, key: str, window: float, cost: int = 1) -> defer.Deferred[int]:
        d = self.amp.callRemote(Hit, key=key, window=float(window), cost=cost)
        return d.addCallback(lambda r: int(r["count"]))
