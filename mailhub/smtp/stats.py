"""
What a client did in one SMTP session, for the line logged when it ends.

Owns: L{CommandCounts}: per command verb, how many were given and how
many succeeded, and the verb the session was last busy with.  The server
logs them when the connection ends, the way Postfix's smtpd does::

    disconnect from [192.0.2.7] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6

C{rcpt=1/2}: one of two RCPT commands succeeded; a verb whose commands
all succeeded shows one number (C{commands=0/0}: a client that said
nothing, a scanner).  An operator sees at a glance which
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

__all__ = ["CommandCounts", "UNKNOWN", "END_OF_MESSAGE"]

#: The name under which unrecognised or unreadable command lines are counted.
UNKNOWN = "unknown"
#: Where a session is once a message's data ended (Postfix's name): a client
#: leaving now has nothing half-sent, so no "lost connection" is logged.
END_OF_MESSAGE = "END-OF-MESSAGE"

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
        #: Where the session is, as "lost connection after ..." and "timeout
        #: after ..." name it: the last verb given, upper case, C{"CONNECT"}
        #: before the first one, L{END_OF_MESSAGE} once a message's data ended.
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

    def end_of_message(self) -> None:
        """The data of a message (DATA's final dot, BDAT LAST) is all in."""
        self.last = END_OF_MESSAGE

    def replied(self, code: int) -> None:
        """A reply with C{code} was sent; the first final one settles the pending verb."""
        name = self._pending
        if name is None or 300 <= code < 400:
            return
        self._pending = None
        if code < 300:
            self._counts[name][0] += 1

    def ended_quietly(self) -> bool:
        """
        Whether a client that goes away now leaves nothing unfinished: its
        QUIT was answered, or the data of its last message is all in.
        """
        if self.last == END_OF_MESSAGE:
            return True
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
        # one number when all succeeded; "commands=0/0" for a client that said nothing, as Postfix
        whole = ok_total == given_total and given_total > 0
        parts.append(f"commands={ok_total}" if whole else f"commands={ok_total}/{given_total}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, list[int]]:
        """Per verb C{[succeeded, given]}: the event's C{commands} field (the event log's JSON)."""
        return {name: list(counts) for name, counts in self._counts.items()}
