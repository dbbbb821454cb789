"""
What a client did in one SMTP session, for the line logged when it ends.

Owns: L{CommandCounts}: per command verb, how many were given and how
many succeeded, and the verb the session was last busy with.  The server
logs them when the connection ends, the way Postfix's smtpd does::

    disconnect from [192.0.2.7] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6

C{rcpt=1/2}: one of two RCPT commands succeeded; a verb whose commands
all succeeded shows one number.  An operator sees at a glance which
clients only probe (C{rcpt=0/40}), which stop half-way (no C{quit}) and
which get their mail rejected after DATA, without reading every reply.

Why a verb's success is decided by the reply: a command succeeds when its
final reply is 2xx.  Intermediate replies (354 after DATA, 334 during
AUTH) leave the verb pending; the reply after the message, or the last
one of the AUTH exchange, decides.  A pending verb that never gets its
final reply (the connection was lost, the session timed out) counts as
given, not as succeeded.

Must not touch: replies, the session's state.  The server tells this
class what happened (L{start}, L{replied}); it decides nothing.
"""

from __future__ import annotations

__all__ = ["CommandCounts", "UNKNOWN"]

#: The name under which unrecognised or unreadable command lines are counted.
UNKNOWN = "unknown"

#: The order in which verbs are listed (Postfix's); others follow in first-use order.
_ORDER = {
    verb: rank
    for rank, verb in enumerate(
        ("helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset",
         "noop", "vrfy", "expn", "help", "quit", UNKNOWN)
    )
}


class CommandCounts:
    """Commands given and succeeded per verb in one session (see the module docstring)."""

    __slots__ = ("_counts", "_pending", "last")

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # verb -> [succeeded, given]
        self._pending: str | None = None
        #: The last verb given, upper case (C{"CONNECT"} before the first one):
        #: what "lost connection after ..." and "timeout after ..." name.
        self.last = "CONNECT"

    def start(self, verb: str) -> None:
        """
        A command line was read: C{verb} (as the client wrote it, any case;
        L{UNKNOWN} for a line that is not a command).  Its final reply decides
        whether it succeeded.
        """
        name = verb.lower()
        self.last = verb.upper()
        counts = self._counts.get(name)
        if counts is None:
            self._counts[name] = [0, 1]
        else:
            counts[1] += 1
        self._pending = name

    def replied(self, code: int) -> None:
        """A reply with C{code} was sent; the first final one settles the pending verb."""
        name = self._pending
        if name is None or 300 <= code < 400:
            return
        self._pending = None
        if code < 300:
            self._counts[name][0] += 1

    def ended_quietly(self) -> bool:
        """Whether the session ended the polite way: its last command was a QUIT that was answered."""
        counts = self._counts.get("quit")
        return self.last == "QUIT" and counts is not None and counts[0] > 0

    def summary(self) -> str:
        """C{"ehlo=1 mail=1 rcpt=1/2 ... commands=5/6"}: verbs in Postfix's order, then the total."""
        parts = []
        ok_total = given_total = 0
        for name in sorted(self._counts, key=lambda n: _ORDER.get(n, len(_ORDER))):
            ok, given = self._counts[name]
            ok_total += ok
            given_total += given
            parts.append(f"{name}={ok}" if ok == given else f"{name}={ok}/{given}")
        parts.append(f"commands={ok_total}" if ok_total == given_total else f"commands={ok_total}/{given_total}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, list[int]]:
        """Per verb C{[succeeded, given]}: the event's C{commands} field (the event log's JSON)."""
        return {name: list(counts) for name, counts in self._counts.items()}
