"""
Replies and errors of the outbound SMTP client, as data.

Owns: L{SMTPReply} (one reply, parsed from its lines, with the server's own
enhanced status code kept apart from one we fill in), L{parse_reply},
L{SessionError} (a connection that could not be set up, handed to the
relay agent) and L{ConnectionBroken} (a connection lost or aborted in the
middle of a conversation).  C{LOCAL_CODE} is the reply code of an error no
server said.

Must not touch: bytes on the wire (L{mailhub.relay.client} reads the lines
and bounds them), outcomes per recipient, routing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["LOCAL_CODE", "SMTPReply", "parse_reply", "SessionError", "ConnectionBroken"]

# The "reply code" of an outcome or SessionError that no server said
# (connection refused or lost, TLS failure, a local decision): 0, so that
# reports never present our own words as a server's reply.
LOCAL_CODE = 0

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class SessionError(Exception):
    """
    The connection as a whole failed (refused, timed out, greeting / EHLO /
    STARTTLS / AUTH rejected, TLS required but missing).  The caller
    decides whether to try another host (L{mailhub.relay.agent}) and turns it into
    outcomes for the recipients.

    @ivar code: the reply code, or 0 when no server said one.
    @ivar enhanced: RFC 3463 status, e.g. C{"4.4.1"}.
    @ivar text: what happened, Postfix style.
    @ivar permanent: True for 5xx.
    @ivar remote_mta: C{"host[ip]:port"}.
    @ivar tls_failed: the TLS handshake (or certificate check) failed; under
        C{"may"} the caller may try again with C{tls="none"}.
    """

    def __init__(
        self,
        code: int,
        enhanced: str,
        text: str,
        permanent: bool = False,
        remote_mta: str = "",
        tls_failed: bool = False,
    ) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.permanent = permanent
        self.remote_mta = remote_mta
        self.tls_failed = tls_failed


@dataclass(frozen=True)
class SMTPReply:
    """
    One (possibly multi-line) reply.  C{enhanced} is the reply's own RFC
    3463 code when it has one of the right class, else C{X.0.0}; C{text} is
    the lines without code and enhanced code, joined with spaces.
    C{has_enhanced} says whether the server gave the enhanced code.
    """

    code: int
    enhanced: str
    text: str
    lines: tuple[str, ...] = field(default=(), compare=False)
    has_enhanced: bool = field(default=False, compare=False)

    @property
    def said(self) -> str:
        """
        The reply as the server said it, for "host X said: ...": code, the
        server's own enhanced code (never one we made up) and text.
        """
        if self.has_enhanced:
            return f"{self.code} {self.enhanced} {self.text}".rstrip()
        return f"{self.code} {self.text}".rstrip()


def parse_reply(lines: list[tuple[int, str]]) -> SMTPReply:
    code = lines[0][0]
    enhanced = ""
    texts = []
    for _, text in lines:
        m = _ENHANCED.match(text)
        if m and int(m.group(1)) == code // 100:
            enhanced = enhanced or f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
            text = text[m.end() :]
        texts.append(text)
    has_enhanced = bool(enhanced)
    if not enhanced:
        cls = code // 100
        enhanced = f"{cls}.0.0" if cls in (2, 4, 5) else "4.5.0"
    return SMTPReply(
        code, enhanced, " ".join(t for t in texts if t).strip(), tuple(t for _, t in lines), has_enhanced
    )


class ConnectionBroken(Exception):
    """The connection is gone or unusable; C{text} says why (Postfix style)."""

    def __init__(self, text: str, enhanced: str = "4.4.2", tls_failed: bool = False, code: int = 0) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.enhanced = enhanced
        self.tls_failed = tls_failed

