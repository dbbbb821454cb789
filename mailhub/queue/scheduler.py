"""
The queue manager: when each queued message is tried, how many at once,
and what an attempt's outcomes mean (retry, bounce, expire, done).

Owns: time.  A heap of C{(due, seq, queue_id)} and one C{callLater} on the
injected C{IReactorTime}, armed for the earliest due time; the concurrency
limits (messages in flight in all, and per destination, so one slow or
dead destination cannot take every slot); the retry policy (backoff from attempts, clamped, jittered, capped
by the queue lifetime); deciding, at the end of a round, which recipients
bounce, expire or get a delay warning or success notice (the notices
themselves are composed and queued by L{mailhub.queue.notices.Notifier});
operator actions on a message in flight (a removal ignores that round's
outcomes); the per-recipient delivery log lines.

Outcomes are recorded as soon as a destination answers, not when the
whole round has ended: C{deliver} is always given a C{report} callback
(L{mailhub.envelope.DeliverFunction}) and calls it with the outcomes
of each transaction as it ends (the router: each agent's batch; the
remote agent: each next hop's transaction).  A delivered (or temporarily
failed) recipient is applied to the envelope at once, and a report with
a delivery is written (one C{spool.update}) while another destination of
the round is still busy, so a crash while that slow destination is in
its DATA timeout never sends the delivered recipient again (Postfix
qmgr/smtp update the queue file per recipient the same way).  A permanent failure is only recorded in memory then and
applied at the end of the round, together with its bounce: written as
C{failed} before its DSN is queued, a crash would lose the bounce.
Everything that is decided per message -- bounces, delay warnings,
success notices, expiry, the log lines, the next attempt -- still happens
once, at the end of the round, when C{deliver}'s Deferred fires with the
final list; outcomes already reported are not applied twice (the first
outcome for a recipient wins).  A message removed in flight is never
written: its reported outcomes are kept for the round's log lines only.

Must not touch: message bytes or the network (the delivery agents do),
the spool's files (only through L{Spool}'s methods), configuration files.
Nothing here polls: a message is looked at when it is due, never before.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.envelope import (
    DELIVERED_OUTCOME,
    FAILED,
    PENDING,
    PERMANENT,
    TEMPORARY,
    DeliverFunction,
    Envelope,
    Outcome,
    Recipient,
)
from mailhub.maillog import mail_event
from mailhub.queue.notices import DELAYED_ACTION, FAILED_ACTION, Notifier
from mailhub.queue.spool import Spool
from mailhub.queue.status import FLUSHED, HELD, REMOVE_PENDING, REMOVED

__all__ = [
    "RetryPolicy",
    "Scheduler",
    "log_delivery",
    "EXPIRED_STATUS",
    "recipient_domain",
]

log = Logger()

#: RFC 3463 "delivery time expired".
EXPIRED_STATUS = "4.4.7"

ResolveFunction = Callable[[str], list[str]]


@dataclass(eq=False)
class _Round:
    """
    One delivery round of one message: what was given, and the outcomes
    known so far.  C{first} holds the first outcome per recipient, from a
    report or from the final list, and is what the round records;
    C{applied} are the recipients whose outcome is on the envelope already.
    """

    env: Envelope
    recipients: list[Recipient]
    given: frozenset[str]
    first: dict[str, Outcome] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    open: bool = True


def recipient_domain(r: Recipient) -> str:
    """
    The default destination of a recipient for the per-destination limit:
    its domain, lower-cased.  A domain is either local or remote, so this
    also separates the transports.
    """
    at = r.address.rfind("@")
    return r.address[at + 1 :].lower().rstrip(".") if at >= 0 else ""


@dataclass(frozen=True)
class RetryPolicy:
    """
    When to try again (Postfix minimal_backoff_time, maximal_backoff_time,
    maximal_queue_lifetime, delay_warning_time).

    The backoff doubles with each attempt from C{min_backoff} up to
    C{max_backoff}, varied by +-C{jitter} (a fraction) so that messages
    deferred together (a destination down) do not come back together, and
    never scheduled past the message's expiry, so the last attempt happens
    exactly when the lifetime ends.
    """

    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_queue_lifetime: float = 432000.0
    delay_warning: float = 0.0
    jitter: float = 0.1

    def backoff(self, attempts: int, random: Callable[[], float] = _random.random) -> float:
        """Seconds to wait after the C{attempts}-th failed round (1 for the first)."""
        base = min(self.max_backoff, self.min_backoff * 2.0 ** min(max(attempts - 1, 0), 60))
        if self.jitter:
            base *= 1.0 + self.jitter * (2.0 * random() - 1.0)
        return max(0.0, min(base, self.max_backoff))

    def expires(self, envelope: Envelope) -> float:
        """When the message's pending recipients are given up."""
        return envelope.arrival + self.max_queue_lifetime

    def next_attempt(self, envelope: Envelope, now: float, random: Callable[[], float] = _random.random) -> float:
        """The time of the next round after a round that ended at C{now}."""
        return min(now + self.backoff(envelope.attempts, random), max(now, self.expires(envelope)))


class Scheduler(service.Service):
    """
    Dispatches due messages to C{deliver} and acts on the outcomes.

    Invariants: a queue id is at most once in flight; at most
    C{concurrency} messages are in flight; at most C{destination_concurrency}
    of them have a pending recipient at any one destination (Postfix
    default_destination_concurrency_limit); a message's state is on disk
    (C{spool.update}) before its next attempt is armed; a spool error never
    drops a message from the queue, it only postpones it.

    Per-destination limit: a message is in flight for every destination
    of its pending recipients (C{destination(recipient)}, by default the
    domain).  A due message with a destination at its limit is parked on
    that destination -- a small heap per destination, ordered by due time
    -- instead of taking a global slot, and the heap goes on to the next
    due message; so 150 messages stuck on a dead domain hold 20 slots and
    mail for other domains still leaves at once.  When a round ends, each
    of its destinations wakes its earliest parked message.  A woken
    message that finds another of its destinations full parks there and
    passes the wake-up on to the destinations it did not use, so a free
    slot never waits behind it.  A message goes out whole (all its pending
    recipients in one round), so one with a recipient at a full
    destination waits for that destination.
    """

    def __init__(
        self,
        spool: Spool,
        deliver: DeliverFunction,
        clock: IReactorTime,
        policy: RetryPolicy,
        concurrency: int = 100,
        hostname: str = "localhost",
        random: Callable[[], float] = _random.random,
        postmaster: str | None = None,
        destination_concurrency: int = 20,
        destination: Callable[[Recipient], str] = recipient_domain,
        resolve: ResolveFunction | None = None,
        is_local: Callable[[str], bool] | None = None,
    ) -> None:
        if concurrency < 1 or destination_concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.spool = spool
        self.deliver = deliver
        self.clock = clock
        self.policy = policy
        self.concurrency = concurrency
        self.destination_concurrency = destination_concurrency
        self.destination = destination
        self.hostname = hostname
        self.random = random
        #: where undeliverable bounces go, once
        self.postmaster = postmaster or f"postmaster@{hostname}"
        #: the final addresses of a notification's recipient: local ones
        #: through the directory (aliases, extensions), others as given --
        #: the resolver the pickup service uses; None: addresses as given
        self.resolve = resolve
        #: whether a domain is ours, for the log's relay= field: an outcome
        #: without a remote host is "local" for our domains, "none" (as
        #: Postfix) for a remote one whose next hop was never reached;
        #: None: always "local"
        self.is_local = is_local
        #: composes and queues bounces, delay warnings and success notices
        self.notices = Notifier(spool, self.enqueue, hostname, self.postmaster, policy.expires, resolve)
        self._queue: dict[str, Envelope] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, tuple[int, float]] = {}  # qid -> (seq, due) of its live heap entry
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._in_flight: dict[str, Deferred] = {}
        self._after: dict[str, float] = {}  # enqueue/flush that arrived while in flight
        self._removed: set[str] = set()  # remove() that arrived while in flight
        self._idle: list[Deferred] = []
        self._busy: dict[str, int] = {}  # destination -> messages in flight for it
        self._flight_keys: dict[str, frozenset[str]] = {}  # qid in flight -> its destinations
        self._parked: dict[str, list[tuple[float, int, str]]] = {}  # destination -> heap of waiting entries
        self._parked_ids: dict[str, int] = {}  # qid -> seq of its parked entry
        self._pumping = False
        self._repump = False

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        """Recover the spool and queue every pending message at its persisted time."""
        service.Service.startService(self)
        self._enqueue_many(self.spool.recover())
        log.info("scheduler: {count} message(s) in the queue", count=len(self._queue))

    def stopService(self) -> Deferred:
        """Stop dispatching; fires when every delivery in flight has finished and been recorded."""
        service.Service.stopService(self)
        self._cancel_timer()
        if not self._in_flight:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d

    # -- public queue operations ---------------------------------------------------

    def enqueue(self, envelope: Envelope) -> None:
        """A committed message: due at C{envelope.next_attempt} (at once when that is past)."""
        if self._add(envelope):
            self._pump()

    def _add(self, envelope: Envelope) -> bool:
        """L{enqueue} without the pump; True when the message was scheduled."""
        qid = envelope.queue_id
        if qid in self._in_flight:
            self._after[qid] = min(self._after.get(qid, math.inf), envelope.next_attempt)
            return False
        self._queue[qid] = envelope
        if envelope.held:
            self._unschedule(qid)
            return False
        # a persisted time further away than any backoff means the clock
        # was set back: never wait longer than max_backoff
        due = min(envelope.next_attempt, self.clock.seconds() + self.policy.max_backoff)
        self._schedule(qid, due)
        return True

    def _enqueue_many(self, envelopes: list[Envelope]) -> None:
        """
        L{enqueue} for the whole queue at startup: one pump (and one timer)
        at the end instead of a pump and a timer reset per message
        (100 000 queued messages cost seconds the other way).
        """
        for envelope in envelopes:
            self._add(envelope)
        self._pump()

    def flush(self, queue_id: str | None = None) -> str:
        """
        Make one message (or every queued one) due now.  Held messages stay
        held.  A message in flight is tried again as soon as its round ends.

        @return: L{HELD} when the one message named is on hold (nothing
            done), else L{FLUSHED}.
        @raise KeyError: C{queue_id} is not queued.
        """
        now = self.clock.seconds()
        if queue_id is not None:
            ids = [queue_id]
            if queue_id not in self._queue:
                raise KeyError(queue_id)
        else:
            ids = sorted(self._queue)  # queue ids sort by arrival
        held = queue_id is not None and self._queue[queue_id].held
        for qid in ids:
            if self._queue[qid].held:
                continue  # a flush asked while it was in flight would undo the hold
            if qid in self._in_flight:
                self._after[qid] = now
            else:
                self._schedule(qid, now)
        self._pump()
        return HELD if held else FLUSHED

    def hold(self, queue_id: str) -> None:
        """Put a message on hold: kept, persisted as held, never dispatched until released."""
        env = self._queue[queue_id]
        env.held = True
        self._unschedule(queue_id)
        self._persist(env)
        mail_event("hold", "{queue_id}: held", queue_id=queue_id)
        self._arm()

    def release(self, queue_id: str) -> None:
        """Release a held message to its normal schedule."""
        env = self._queue[queue_id]
        env.held = False
        self._persist(env)
        mail_event("release", "{queue_id}: released from hold", queue_id=queue_id)
        if queue_id not in self._in_flight:
            self._schedule(queue_id, env.next_attempt)
            self._pump()

    def remove(self, queue_id: str) -> str:
        """
        Delete a message from the queue, like C{postsuper -d}: no notices.

        A message in flight cannot be taken from the delivery agent that is
        reading it: it is marked, and when its round ends the outcomes are
        ignored (logged, but no bounce, delay or success notice and no
        envelope update) and it is removed from the spool.

        @return: L{REMOVED}, or L{REMOVE_PENDING} for a message in flight.
        @raise KeyError: C{queue_id} is not queued.
        @raise OSError: the spool could not remove it (it stays queued).
        """
        if queue_id not in self._queue:
            raise KeyError(queue_id)
        if queue_id in self._in_flight:
            self._removed.add(queue_id)
            self._after.pop(queue_id, None)
            return REMOVE_PENDING
        self._drop(queue_id, "removed by operator")
        return REMOVED

    def next_due(self, queue_id: str) -> float | None:
        """When C{queue_id} is next dispatched, or C{None} (held, in flight, unknown)."""
        entry = self._scheduled.get(queue_id)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, queue_id: object) -> bool:
        """Whether C{queue_id} is queued here (waiting, held or in flight)."""
        return queue_id in self._queue or queue_id in self._in_flight

    def queue_stats(self) -> tuple[int, float | None]:
        """
        (queued messages, arrival time of the oldest or None), from memory:
        the metrics' gauges and the status page ask this every minute and
        at every scrape; listing and sorting C{queue/} instead cost the
        event loop a pause proportional to the queue (100 000 files).
        Queue ids sort by arrival, so the oldest is the smallest id.
        """
        if not self._queue:
            return 0, None
        return len(self._queue), float(self._queue[min(self._queue)].arrival)

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    @property
    def waiting(self) -> int:
        """Due messages parked because a destination of theirs is at its limit."""
        return len(self._parked_ids)

    # -- heap and timer ------------------------------------------------------------

    def _schedule(self, qid: str, due: float) -> None:
        seq = next(self._seq)
        self._scheduled[qid] = (seq, due)
        self._parked_ids.pop(qid, None)  # a parked entry of it is stale now
        heapq.heappush(self._heap, (due, seq, qid))
        if len(self._heap) > 2 * len(self._scheduled) + 1024:
            # too many stale entries (flushes, holds): rebuild, O(n); parked
            # entries stay parked
            self._heap = [
                (due, seq, q) for q, (seq, due) in self._scheduled.items() if self._parked_ids.get(q) != seq
            ]
            heapq.heapify(self._heap)

    def _unschedule(self, qid: str) -> None:
        self._scheduled.pop(qid, None)
        self._parked_ids.pop(qid, None)

    def _peek(self) -> tuple[float, int, str] | None:
        """The earliest live entry, dropping stale ones (lazy deletion)."""
        heap = self._heap
        while heap:
            due, seq, qid = heap[0]
            live = self._scheduled.get(qid)
            if live is not None and live[0] == seq:
                return heap[0]
            heapq.heappop(heap)
        return None

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self) -> None:
        """Keep the one timer on the earliest due time (or none when nothing can run)."""
        entry = self._peek()
        if not self.running or entry is None or len(self._in_flight) >= self.concurrency:
            # at the limit, the end of a round pumps and re-arms
            self._cancel_timer()
            return
        due = entry[0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() != due:
                self._timer.reset(max(0.0, due - self.clock.seconds()))
            return
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        """Dispatch every due message a free slot allows, earliest first; then re-arm."""
        if self._pumping:
            self._repump = True
            return
        self._pumping = True
        try:
            while True:
                self._repump = False
                now = self.clock.seconds()
                while self.running and len(self._in_flight) < self.concurrency:
                    entry = self._peek()
                    if entry is None or entry[0] > now:
                        break
                    heapq.heappop(self._heap)
                    qid = entry[2]
                    if self._park_if_full(entry):
                        continue
                    del self._scheduled[qid]
                    self._parked_ids.pop(qid, None)
                    self._dispatch(qid)
                if not self._repump:
                    break
        finally:
            self._pumping = False
        self._arm()

    # -- per-destination limit ---------------------------------------------------------

    def _destinations(self, recipients: list[Recipient]) -> frozenset[str]:
        return frozenset(self.destination(r) for r in recipients)

    def _park_if_full(self, entry: tuple[float, int, str]) -> bool:
        """Park a due entry whose message has a destination at its limit; True if parked."""
        qid = entry[2]
        env = self._queue.get(qid)
        if env is None or env.held:
            return False  # _dispatch drops it
        keys = self._destinations(env.pending_recipients())
        limit = self.destination_concurrency
        full = next((k for k in sorted(keys) if self._busy.get(k, 0) >= limit), None)
        if full is None:
            return False
        heapq.heappush(self._parked.setdefault(full, []), entry)
        self._parked_ids[qid] = entry[1]
        # it may have been woken by a destination it does not use now:
        # pass that wake-up on, or the free slot would wait behind it
        for k in keys:
            if k != full and k in self._parked and self._busy.get(k, 0) < limit:
                self._wake(k)
        return True

    def _wake(self, key: str) -> None:
        """Move the earliest live message parked on C{key} back to the ready heap."""
        parked = self._parked.get(key)
        while parked:
            due, seq, qid = heapq.heappop(parked)
            if self._parked_ids.get(qid) != seq:
                continue  # flushed, held, removed or dispatched since
            del self._parked_ids[qid]
            live = self._scheduled.get(qid)
            if live is None or live[0] != seq:
                continue
            heapq.heappush(self._heap, (due, seq, qid))
            break
        if not parked:
            self._parked.pop(key, None)

    def _release(self, qid: str) -> None:
        """A round ended: free its destinations and wake one waiter on each."""
        for key in self._flight_keys.pop(qid, ()):
            n = self._busy.get(key, 0) - 1
            if n > 0:
                self._busy[key] = n
            else:
                self._busy.pop(key, None)
            if key in self._parked:
                self._wake(key)

    # -- one round -------------------------------------------------------------------

    def _dispatch(self, qid: str) -> None:
        env = self._queue.get(qid)
        if env is None or env.held:
            return
        if qid in self._in_flight:  # cannot happen; never deliver twice at once
            self._after[qid] = self.clock.seconds()
            return
        recipients = env.pending_recipients()
        if not recipients:
            retry = self._finish(env)
            if retry is not None:
                self._schedule(qid, retry)
            return
        env.attempts += 1
        keys = self._destinations(recipients)
        self._flight_keys[qid] = keys
        for key in keys:
            self._busy[key] = self._busy.get(key, 0) + 1
        rnd = _Round(env, recipients, frozenset(r.address for r in recipients))
        d = defer.maybeDeferred(self.deliver, env, list(recipients), report=functools.partial(self._report, rnd))
        self._in_flight[qid] = d
        (
            d.addErrback(self._deliver_failed, env, recipients)
            .addCallback(self._round_done, rnd)
            .addErrback(self._round_failed, rnd)
            .addCallback(self._round_over, qid)
        )

    def _report(self, rnd: _Round, outcomes: list[Outcome]) -> None:
        """
        Progress from C{deliver}: some recipients' outcomes, as soon as their
        destination has answered.  Delivered and temporary outcomes are
        applied at once, and written (one C{spool.update}) when one of them
        is a delivery -- the only outcome whose loss in a crash would send
        mail twice -- and some recipient of the round is still unanswered
        (otherwise the end of the round, which follows, writes or removes
        the envelope: a message to one destination costs no extra write).
        Permanent ones wait for the end of the round and their bounce.
        Nothing is written for a message removed in flight; nothing
        at all happens after the round has ended.  Never raises into the
        delivery agent.
        """
        env = rnd.env
        if not rnd.open:
            log.warn("{queue_id}: outcomes reported after the round ended, ignored", queue_id=env.queue_id)
            return
        try:
            now = self.clock.seconds()
            removed = env.queue_id in self._removed
            delivered = False
            for o in outcomes:
                if o.recipient not in rnd.given:
                    log.warn("{queue_id}: ignoring outcome for {rcpt}", queue_id=env.queue_id, rcpt=o.recipient)
                    continue
                if o.recipient in rnd.first:
                    continue  # the first outcome of a recipient wins
                rnd.first[o.recipient] = o
                if removed or o.kind == PERMANENT:
                    continue
                if o.retry_after > 0:  # postponed: not tried, nothing to record
                    rnd.applied.add(o.recipient)
                    continue
                env.apply(o, now)
                rnd.applied.add(o.recipient)
                delivered = delivered or o.kind == DELIVERED_OUTCOME
            if delivered and len(rnd.first) < len(rnd.given):
                # with every recipient answered the round ends right after
                # (same reactor turn) and writes or removes the envelope
                # itself: no extra write for a one-destination message
                self._persist(env)
        except Exception:
            # a bug here must not break the agent's delivery; the end of the
            # round records whatever is not applied yet
            log.failure("{queue_id}: error recording reported outcomes", queue_id=env.queue_id)

    def _deliver_failed(self, failure: Failure, env: Envelope, recipients: list[Recipient]) -> list[Outcome]:
        """An exception from deliver() is a temporary failure of every recipient given."""
        log.failure("{queue_id}: delivery failed with an exception", failure, queue_id=env.queue_id)
        text = f"delivery error: {failure.getErrorMessage()}"
        return [Outcome.temporary(r.address, text, 451, "4.3.0") for r in recipients]

    def _round_done(self, outcomes: list[Outcome], rnd: _Round) -> float | None:
        """
        Record the outcomes not reported yet, bounce, warn, persist.  Returns
        the next due time, or None when finished.
        """
        rnd.open = False
        env, recipients = rnd.env, rnd.recipients
        now = self.clock.seconds()
        seen: set[str] = set()
        for o in outcomes:
            if o.recipient not in rnd.given or o.recipient in seen:
                log.warn("{queue_id}: ignoring outcome for {rcpt}", queue_id=env.queue_id, rcpt=o.recipient)
                continue
            seen.add(o.recipient)
            rnd.first.setdefault(o.recipient, o)  # a reported outcome wins
        for r in recipients:
            if r.address in rnd.applied:
                continue
            first = rnd.first.get(r.address)
            if first is None:
                first = rnd.first[r.address] = Outcome.temporary(
                    r.address, "delivery agent reported no outcome", 451, "4.3.0"
                )
            if first.retry_after <= 0:
                env.apply(first, now)
            rnd.applied.add(r.address)
        outcomes = list(rnd.first.values())
        # postponed (a relay rate limit): not tried; retried after the limit's
        # window, not after a backoff, and a round of nothing else is no attempt
        postponed = {o.recipient: o for o in outcomes if o.retry_after > 0}
        only_postponed = bool(postponed) and not any(
            o.kind == TEMPORARY and o.retry_after <= 0 for o in outcomes
        )
        if postponed and len(postponed) == len(outcomes):
            env.attempts -= 1

        if env.queue_id in self._removed:
            # deleted by the operator during the round (postsuper -d): what
            # the agents did is logged; nothing is persisted, retried or
            # notified -- _round_over removes it
            for r in recipients:
                self._log_delivery(env, r, now, False)
            return None

        self.notices.success(env, recipients, outcomes, now)

        failed = [r for r in recipients if r.state == FAILED]
        expired = []
        if now - env.arrival >= self.policy.max_queue_lifetime:
            for r in env.pending_recipients():
                # the DSN says 4.4.7; the last real error stays readable in
                # the text (and so in Diagnostic-Code)
                if r.last_status and not r.last_text.startswith(r.last_status):
                    r.last_text = f"{r.last_status} {r.last_text}"
                r.state = FAILED
                r.last_status = EXPIRED_STATUS
                expired.append(r)
        for r in recipients:
            if r.address in postponed and r not in expired:
                self._log_postponed(env, r, postponed[r.address], now)
            else:
                self._log_delivery(env, r, now, r in expired)

        bounced = failed + expired
        if bounced and not self.notices.notify(env, bounced, now, FAILED_ACTION):
            # the bounce could not be queued: do not lose it, try again later
            for r in bounced:
                r.state = PENDING
        pending = env.pending_recipients()
        if (
            pending
            and self.policy.delay_warning > 0
            and not env.warned
            and env.sender
            and now - env.arrival >= self.policy.delay_warning
            and not only_postponed
        ):
            if self.notices.notify(env, pending, now, DELAYED_ACTION):
                env.warned = True

        if env.done:
            return self._finish(env)
        if only_postponed:
            env.next_attempt = due = now + min(o.retry_after for o in postponed.values())
            if len(postponed) == len(outcomes):
                return due  # nothing on the envelope changed: no write
        else:
            due = self.policy.next_attempt(env, now, self.random)
            env.next_attempt = due
        if not self._persist(env):
            due = max(due, now + self.policy.min_backoff)
        return due

    def _round_failed(self, failure: Failure, rnd: _Round) -> float | None:
        """A bug while recording a round: log it, keep the message, try later."""
        rnd.open = False
        env = rnd.env
        log.failure("{queue_id}: error recording delivery outcomes", failure, queue_id=env.queue_id)
        if env.queue_id in self._removed:
            return None
        now = self.clock.seconds()
        env.next_attempt = now + self.policy.min_backoff
        self._persist(env)
        return env.next_attempt

    def _round_over(self, due: float | None, qid: str) -> None:
        """Free the slot, apply what arrived meanwhile (flush, remove, hold), pump."""
        del self._in_flight[qid]
        self._release(qid)
        after = self._after.pop(qid, None)
        env = self._queue.get(qid)
        if qid in self._removed:
            self._removed.discard(qid)
            if env is not None:
                try:
                    self._drop(qid, "removed by operator")
                except KeyError:
                    self._queue.pop(qid, None)  # already gone from the spool
                    self._unschedule(qid)
                except OSError as e:
                    # kept (unscheduled, so never retried on its own): the
                    # operator sees it in the queue and deletes it again
                    log.error("{queue_id}: cannot remove from the spool: {error}", queue_id=qid, error=e)
        elif env is not None and due is not None and not env.held:
            if after is not None:
                due = min(due, after)
            self._schedule(qid, due)
        if not self._in_flight and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)
        self._pump()

    # -- persistence --------------------------------------------------------------------

    def _persist(self, env: Envelope) -> bool:
        try:
            self.spool.update(env)
        except (OSError, KeyError) as e:
            log.error("{queue_id}: cannot update the envelope: {error}", queue_id=env.queue_id, error=e)
            return False
        return True

    def _finish(self, env: Envelope) -> float | None:
        """Every recipient is final: dequeue.  On a spool error, retry the removal later."""
        qid = env.queue_id
        try:
            self.spool.remove(qid)
        except (OSError, KeyError) as e:
            log.error("{queue_id}: cannot remove from the spool: {error}", queue_id=qid, error=e)
            self._persist(env)  # at least never deliver the done recipients again
            return self.clock.seconds() + self.policy.min_backoff
        del self._queue[qid]
        self._unschedule(qid)
        mail_event("removed", "{queue_id}: removed", queue_id=qid)
        return None

    def _drop(self, qid: str, why: str) -> None:
        self.spool.remove(qid)
        self._queue.pop(qid, None)
        self._unschedule(qid)
        mail_event("removed", "{queue_id}: removed ({why})", queue_id=qid, why=why)

    # -- logging ---------------------------------------------------------------------------

    def _no_relay(self, r: Recipient) -> str:
        if self.is_local is None or self.is_local(recipient_domain(r)):
            return "local"
        return "none"

    def _log_postponed(self, env: Envelope, r: Recipient, o: Outcome, now: float) -> None:
        mail_event(
            "postponed",
            "{queue_id}: to=<{to}>, orig_to=<{orig_to}>, delay={delay}, attempts={attempts}, "
            "status=rate-limited ({text}); next try in {retry}s",
            queue_id=env.queue_id, to=r.address, orig_to=r.original,
            delay=("%.2f" % max(0.0, now - env.arrival)).rstrip("0").rstrip("."),
            attempts=r.attempts, text=o.text, retry=("%.2f" % o.retry_after).rstrip("0").rstrip("."),
        )

    def _log_delivery(self, env: Envelope, r: Recipient, now: float, expired: bool) -> None:
        log_delivery(env, r, now, r.remote_mta or self._no_relay(r), expired)


def log_delivery(env: Envelope, r: Recipient, now: float, relay: str, expired: bool = False) -> None:
    """
    The mail log's C{delivery} line of recipient C{r} after an attempt
    (status sent, bounced or deferred): the scheduler's, and deliver on
    accept's (L{mailhub.delivery.direct}), which must read the same.
    """
    if r.state == PENDING:
        status, text = "deferred", r.last_text
    elif r.state == FAILED:
        status = "bounced"
        text = f"delivery time expired; last error: {r.last_text}" if expired else r.last_text
    else:
        status, text = "sent", r.last_text
    mail_event(
        "delivery",
        "{queue_id}: to=<{to}>, orig_to=<{orig_to}>, relay={relay}, delay={delay}, "
        "attempts={attempts}, dsn={dsn}, status={status} ({text})",
        queue_id=env.queue_id,
        to=r.address,
        orig_to=r.original,
        relay=relay,
        delay=("%.2f" % max(0.0, now - env.arrival)).rstrip("0").rstrip("."),
        attempts=r.attempts,
        dsn=r.last_status,
        status=status,
        text=text,
        # for GET /v1/messages/ID after it left the queue
        code=r.last_code, remote_mta=r.remote_mta, last_attempt=r.last_attempt,
        expired=expired,
    )
