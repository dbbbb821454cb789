"""
The envelope of a queued message and the outcome of a delivery attempt.

Owns: the in-memory L{Envelope} / L{Recipient} records, their per-recipient
state machine, and their versioned JSON form on disk ("state on disk is
text": never pickles; C{cat} can read an envelope), which is checked field by
field when it is read (L{validate_envelope}), so a damaged file is an
L{EnvelopeFormatError} and never a wrong type further on.  Also L{Outcome}, the data a
delivery agent returns for one recipient ("outcomes are data, retrying is policy"), and the contract
of a delivery agent (L{DeliveryAgent}, L{DeliverFunction},
L{ReportFunction}): one outcome per recipient given, progress reported
through C{report} (always passed) as transactions end.

Must not touch: files, clocks, the network.  The spool decides where the
JSON goes; the scheduler decides what an outcome means for retrying.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mailhub.address import AddressError, parse_mailbox

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred

__all__ = [
    "ENVELOPE_VERSION",
    "EnvelopeFormatError",
    "validate_envelope",
    "Envelope",
    "Recipient",
    "Outcome",
    "PENDING",
    "DELIVERED",
    "FAILED",
    "STATES",
    "DELIVERED_OUTCOME",
    "TEMPORARY",
    "PERMANENT",
    "ReportFunction",
    "DeliveryAgent",
    "DeliverFunction",
]

ENVELOPE_VERSION = 1

#: Recipient states.  C{pending} may be tried (again); the others are final.
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)

#: Outcome kinds.
DELIVERED_OUTCOME = "delivered"
TEMPORARY = "temporary"
PERMANENT = "permanent"
_KINDS = (DELIVERED_OUTCOME, TEMPORARY, PERMANENT)


class EnvelopeFormatError(ValueError):
    """Bytes on disk are not an envelope this version understands."""


@dataclass
class Recipient:
    """
    One recipient of a message.

    @ivar address: where to deliver (after alias expansion), C{local@domain}.
    @ivar original: the address the client gave in RCPT TO (RFC 3461 ORCPT
        in spirit); equal to C{address} unless an alias was expanded.
    @ivar state: one of L{STATES}.
    @ivar attempts: delivery attempts made for this recipient.
    @ivar last_code: the last SMTP reply code (e.g. 451), or 0 when no
        server replied (connection refused, DNS failure, TLS failure...).
    @ivar last_status: the last enhanced status code (e.g. C{"4.2.2"}).
    @ivar last_text: the last reply or error text, for mailq and bounces.
    @ivar remote_mta: the host the last attempt talked to, if any; it
        replied when L{replied} is true.
    @ivar notify: RFC 3461 NOTIFY keywords given at RCPT, if any.
    @ivar orcpt: RFC 3461 ORCPT value given at RCPT, if any.
    """

    address: str
    original: str = ""
    state: str = PENDING
    attempts: int = 0
    last_code: int = 0
    last_status: str = ""
    last_text: str = ""
    last_attempt: float = 0.0
    remote_mta: str = ""
    notify: list[str] = field(default_factory=list)
    orcpt: str = ""

    def __post_init__(self) -> None:
        if not self.original:
            self.original = self.address
        if self.state not in STATES:
            raise EnvelopeFormatError(f"unknown recipient state {self.state!r}")

    @property
    def pending(self) -> bool:
        return self.state == PENDING

    @property
    def replied(self) -> bool:
        """The last attempt got a reply from C{remote_mta} (see L{Outcome.replied})."""
        return bool(self.remote_mta) and self.last_code != 0


@dataclass
class Envelope:
    """
    Everything the queue knows about a message besides its bytes.

    @ivar queue_id: the spool's name for the message; file-name safe.
    @ivar sender: the reverse-path without brackets; C{""} is the null
        sender C{<>} (bounces), which never receives a bounce itself.
    @ivar arrival: when the 250 was given (POSIX time).
    @ivar next_attempt: when the scheduler should next try the pending
        recipients (POSIX time); persisted so a restart keeps the schedule.
    @ivar attempts: delivery rounds made for this message.
    @ivar esmtp: MAIL FROM parameters that matter later: C{size},
        C{body} (7BIT/8BITMIME/BINARYMIME), C{smtputf8}, C{ret}, C{envid}.
    @ivar client: where it came from: C{helo}, C{addr}, C{protocol},
        C{user} (authenticated user or local uid), for logs and trace.
    @ivar held: an operator put the message on hold; the scheduler skips it.
    @ivar warned: a delay warning was sent already.
    @ivar dkim: the DKIM-Signature fields made for the message when it
        first left (L{mailhub.auth.sign}): C{original} over the queued
        bytes, C{7bit} over their 8BITMIME-downgraded form; kept so a retry
        sends the same bytes.  Written to disk only when not empty.
    """

    queue_id: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    next_attempt: float = 0.0
    attempts: int = 0
    esmtp: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    held: bool = False
    warned: bool = False
    dkim: dict[str, str] = field(default_factory=dict)

    # -- state --------------------------------------------------------------

    def pending_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def done(self) -> bool:
        """True when no recipient is left to try: the message can go."""
        return not any(r.state == PENDING for r in self.recipients)

    def apply(self, outcome: Outcome, when: float) -> Recipient:
        """
        Record C{outcome} on the matching pending recipient and return it.
        A temporary outcome leaves the recipient pending; the scheduler
        decides whether it has expired.
        """
        for r in self.recipients:
            if r.address == outcome.recipient and r.state == PENDING:
                break
        else:
            raise KeyError(outcome.recipient)
        r.attempts += 1
        r.last_attempt = when
        r.last_code = outcome.code
        r.last_status = outcome.status
        r.last_text = outcome.text
        r.remote_mta = outcome.remote_mta
        if outcome.kind == DELIVERED_OUTCOME:
            r.state = DELIVERED
        elif outcome.kind == PERMANENT:
            r.state = FAILED
        return r

    # -- serialisation ----------------------------------------------------------

    def to_json(self) -> bytes:
        """The on-disk form: one UTF-8 JSON object with a C{version} key."""
        # Built by hand and written on one line: dataclasses.asdict deep-copies
        # and an indented dump runs json's pure-Python encoder; together they
        # cost 80 us per commit on the reactor's worker threads, this 10 us.
        data = dict(self.__dict__)
        data["recipients"] = [dict(r.__dict__) for r in self.recipients]
        data["version"] = ENVELOPE_VERSION
        if not data["dkim"]:
            del data["dkim"]
        return (json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """
        Parse the on-disk form, checking every field (L{validate_envelope}):
        whatever the file says, the result is an envelope the scheduler,
        the delivery agents and the queue tools can use.

        @raise EnvelopeFormatError: if C{raw} is not a valid envelope.
        """
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise EnvelopeFormatError(f"not JSON: {e}")
        validate_envelope(data)
        del data["version"]
        recipients = [Recipient(**r) for r in data.pop("recipients")]
        return cls(recipients=recipients, **data)


# -- validation of envelopes read from disk ---------------------------------------

#: Times are POSIX seconds from 1970 to the end of year 9999 (what
#: C{time.localtime} and the queue tools can show).
MAX_TIME = 253402300799.0
#: Upper bound of the counters (attempts).
MAX_COUNT = 2**31 - 1
#: Upper bound of a message size (bytes).
MAX_SIZE = 2**53
_BODIES = ("7BIT", "8BITMIME", "BINARYMIME")
_RETS = ("FULL", "HDRS")
_NOTIFY = ("NEVER", "SUCCESS", "FAILURE", "DELAY")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _time(value: Any) -> str | None:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        return "must be a finite number of seconds"
    if not 0 <= value <= MAX_TIME:
        return f"must be between 0 and {MAX_TIME:.0f}"
    return None


def _counter(limit: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not _is_int(value):
            return "must be an integer"
        if not 0 <= value <= limit:
            return f"must be between 0 and {limit}"
        return None

    return check


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _text_or_null(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "must be a string or null"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed and isinstance(value, str) else f"must be one of {', '.join(allowed)}"

    return check


def _address(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    try:
        parse_mailbox(value)
    except AddressError as e:
        return f"is not an address ({e})"
    return None


def _sender(value: Any) -> str | None:
    return None if value == "" else _address(value)


def _notify(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v in _NOTIFY for v in value):
        return f"must be a list of {', '.join(_NOTIFY)}"
    return None


def _signatures(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(
        k in ("original", "7bit") and isinstance(v, str) and v.isascii() and len(v) < 16384 for k, v in value.items()
    ):
        return "must map original/7bit to DKIM-Signature fields"
    return None


#: key: (required, check) for the envelope, a recipient, and the known
#: keys of C{esmtp} and C{client} (which may hold other keys too).
_ENVELOPE_FIELDS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "version": (True, lambda v: None if v == ENVELOPE_VERSION and _is_int(v) else f"must be {ENVELOPE_VERSION}"),
    "queue_id": (True, lambda v: None if isinstance(v, str) and v else "must be a non-empty string"),
    "sender": (True, _sender),
    "recipients": (True, lambda v: None if isinstance(v, list) and v else "must be a non-empty list"),
    "arrival": (True, _time),
    "next_attempt": (False, _time),
    "attempts": (False, _counter(MAX_COUNT)),
    "esmtp": (False, lambda v: None if isinstance(v, dict) else "must be an object"),
    "client": (False, lambda v: None if isinstance(v, dict) else "must be an object"),
    "held": (False, _flag),
    "warned": (False, _flag),
    "dkim": (False, _signatures),
}
_RECIPIENT_FIELDS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "address": (True, _address),
    "original": (False, _text),
    "state": (False, _one_of(STATES)),
    "attempts": (False, _counter(MAX_COUNT)),
    "last_code": (False, _counter(999)),
    "last_status": (False, _text),
    "last_text": (False, _text),
    "last_attempt": (False, _time),
    "remote_mta": (False, _text),
    "notify": (False, _notify),
    "orcpt": (False, _text),
}
_ESMTP_FIELDS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "size": (False, _counter(MAX_SIZE)),
    "declared_size": (False, _counter(MAX_SIZE)),
    "body": (False, _one_of(_BODIES)),
    "smtputf8": (False, _flag),
    "ret": (False, _one_of(_RETS)),
    "envid": (False, _text),
    "crlf": (False, _flag),
}
_CLIENT_FIELDS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "helo": (False, _text_or_null),
    "addr": (False, _text_or_null),
    "protocol": (False, _text_or_null),
    "user": (False, _text_or_null),
    "listener": (False, _text_or_null),
    "uid": (False, _counter(MAX_COUNT)),
    "pickup": (False, _text),
    "bounce_of": (False, _text),
    "double_bounce": (False, _flag),
}


def _check(where: str, data: dict[str, Any], fields: dict[str, tuple[bool, Callable[[Any], str | None]]],
           closed: bool) -> None:
    for key, (required, check) in fields.items():
        if key not in data:
            if required:
                raise EnvelopeFormatError(f"{where}{key} is missing")
            continue
        problem = check(data[key])
        if problem is not None:
            raise EnvelopeFormatError(f"{where}{key} {problem}")
    if closed:
        unknown = sorted(k for k in data if k not in fields)
        if unknown:
            raise EnvelopeFormatError(f"{where}unknown field {unknown[0]!r}"[:200])


def validate_envelope(data: Any) -> None:
    """
    Check the parsed JSON of an envelope: every field present when
    required, of its type and in its range (times finite and between 1970
    and 9999, counters non-negative integers, addresses that parse, states
    and keywords from their sets), no unknown field.  C{esmtp} and
    C{client} may carry keys this version does not know; the ones it
    knows are checked.

    @raise EnvelopeFormatError: the first problem found, naming the field.
    """
    if not isinstance(data, dict):
        raise EnvelopeFormatError("not a JSON object")
    _check("", data, _ENVELOPE_FIELDS, closed=True)
    for n, r in enumerate(data["recipients"]):
        if not isinstance(r, dict):
            raise EnvelopeFormatError(f"recipients[{n}] must be an object")
        _check(f"recipients[{n}].", r, _RECIPIENT_FIELDS, closed=True)
    for name, fields in (("esmtp", _ESMTP_FIELDS), ("client", _CLIENT_FIELDS)):
        if name in data:
            _check(f"{name}.", data[name], fields, closed=False)


@dataclass(frozen=True)
class Outcome:
    """
    What one delivery attempt did for one recipient: data, not a decision.

    @ivar recipient: L{Recipient.address} it is about.
    @ivar kind: L{DELIVERED_OUTCOME}, L{TEMPORARY} or L{PERMANENT}.
    @ivar code: SMTP reply code (250, 451, 550...), real or equivalent;
        0 when the outcome is not a reply at all (nothing was said: the
        connection was refused or lost, a name did not resolve, TLS failed).
    @ivar status: RFC 3463 enhanced status code, e.g. C{"5.1.1"}.
    @ivar text: human-readable reply or error.
    @ivar remote_mta: the host the attempt talked to, if any
        (C{"mx.example[192.0.2.1]:25"}); empty when no connection was made.
    @ivar dsn_passed: the next hop supports RFC 3461 DSN and was given the
        NOTIFY/ORCPT/ENVID parameters, so success notices are its job
        (otherwise a SUCCESS request gets a "relayed" DSN from us).
    @ivar retry_after: more than 0 for a recipient that was not tried at
        all (a relay rate limit, L{postponed}): no attempt, no failure; the
        scheduler tries it again after this many seconds instead of its
        backoff.
    """

    recipient: str
    kind: str
    code: int
    status: str
    text: str
    remote_mta: str = ""
    dsn_passed: bool = False
    retry_after: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown outcome kind {self.kind!r}")

    @property
    def replied(self) -> bool:
        """
        C{remote_mta} replied with C{code}: a DSN names it (Remote-MTA) and
        quotes the reply (Diagnostic-Code of type smtp).  Otherwise nobody
        said anything and C{text} is our own account of what happened.
        """
        return bool(self.remote_mta) and self.code != 0

    @classmethod
    def delivered(cls, recipient: str, text: str = "delivered", remote_mta: str = "", dsn_passed: bool = False) -> Outcome:
        return cls(recipient, DELIVERED_OUTCOME, 250, "2.0.0", text, remote_mta, dsn_passed)

    @classmethod
    def temporary(cls, recipient: str, text: str, code: int = 451, status: str = "4.3.0", remote_mta: str = "") -> Outcome:
        return cls(recipient, TEMPORARY, code, status, text, remote_mta)

    @classmethod
    def permanent(cls, recipient: str, text: str, code: int = 550, status: str = "5.0.0", remote_mta: str = "") -> Outcome:
        return cls(recipient, PERMANENT, code, status, text, remote_mta)

    @classmethod
    def postponed(cls, recipient: str, text: str, retry_after: float) -> Outcome:
        """Not tried (a rate limit): try again in C{retry_after} seconds, without counting an attempt."""
        return cls(recipient, TEMPORARY, 0, "4.4.5", text, retry_after=max(retry_after, 0.001))


#: C{report(outcomes)}: some recipients' outcomes, as soon as they are known.
ReportFunction = Callable[[list[Outcome]], None]


class DeliveryAgent(Protocol):
    """
    What delivers a queued message to some of its recipients (the local
    agent, its worker processes, the remote agent).

    C{deliver} fires with one L{Outcome} per recipient given (delivered,
    temporary or permanent: data, never a decision to retry) and never
    with a failure.  Before that it may call C{report} -- always passed --
    with the outcomes of some of the recipients as soon as they are known
    (the remote agent: each next hop's transaction), each recipient at
    most once; the final list repeats them.  An agent that answers all at
    once need not call it.  The message is read from C{message_path}, a
    queue file (L{mailhub.queue.queuefile.open_message}).
    """

    def deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> Deferred[list[Outcome]]:
        ...


class DeliverFunction(Protocol):
    """
    What the scheduler hands a due message to (the router): the same
    contract as L{DeliveryAgent.deliver}, with the message named by its
    envelope's queue id.
    """

    def __call__(
        self, envelope: Envelope, recipients: list[Recipient], report: ReportFunction
    ) -> Deferred[list[Outcome]]:
        ...
