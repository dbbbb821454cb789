"""
What the resolver answers for a recipient it cannot accept: L{RecipientError}
and its kinds, each carrying its SMTP reply (code, enhanced status, text) as
data.

Owns: the reply of each kind (tests pin them).  The resolver
(L{mailhub.delivery.directory}) raises them; the SMTP policy turns them into
RCPT replies and the scheduler into outcomes of a queued recipient, without
needing the resolver to know what they are.

Must not touch: anything else (no imports beyond the standard library).
"""

from __future__ import annotations

__all__ = [
    "RecipientError",
    "UnknownRecipient",
    "AliasLoop",
    "InvalidMailbox",
    "UnsafeMailbox",
    "UnsupportedAlias",
    "AliasUnavailable",
]


class RecipientError(Exception):
    """
    A recipient cannot be accepted.  Carries the SMTP reply as data so the
    server answers with exactly these codes.

    @ivar code: SMTP reply code, e.g. 550.
    @ivar enhanced: RFC 3463 enhanced status code, e.g. C{"5.1.1"}.
    @ivar text: human-readable reply text.
    """

    code = 550
    enhanced = "5.1.1"
    text = "recipient rejected"

    def __init__(self, code: int | None = None, enhanced: str | None = None, text: str | None = None) -> None:
        if code is not None:
            self.code = code
        if enhanced is not None:
            self.enhanced = enhanced
        if text is not None:
            self.text = text
        super().__init__(f"{self.code} {self.enhanced} {self.text}")


class UnknownRecipient(RecipientError):
    """No such mailbox or alias (Postfix: "User unknown in local recipient table")."""

    code = 550
    enhanced = "5.1.1"
    text = "User unknown in local recipient table"


class AliasLoop(RecipientError):
    """Alias expansion loops without reaching a mailbox, or nests too deep."""

    code = 550
    enhanced = "5.4.6"
    text = "alias loop"


class InvalidMailbox(RecipientError):
    """A local part that can never be a directory name (C{..}, C{/}, NUL...)."""

    code = 550
    enhanced = "5.1.3"
    text = "invalid mailbox name"


class UnsafeMailbox(RecipientError):
    """
    The domain or mailbox directory is a symlink (never followed below the
    mailbox root, wherever it points).  Temporary
    on purpose: it is a configuration problem an operator can fix, and mail
    waiting for that fix must not bounce.
    """

    code = 451
    enhanced = "4.3.5"
    text = "mailbox location not allowed"


class UnsupportedAlias(RecipientError):
    """
    The alias has a C{|command} or C{/file} target.  mailhub never runs
    those, and never delivers an alias partly, so the whole alias is refused.
    """

    code = 550
    enhanced = "5.3.0"
    text = "alias target type not supported"


class AliasUnavailable(RecipientError):
    """An C{:include:} file an alias depends on cannot be used right now (logged)."""

    code = 451
    enhanced = "4.3.0"
    text = "alias temporarily unavailable"
