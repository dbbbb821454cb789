"""
The settings of one SMTP listener, as one frozen object.

Owns: L{SMTPSettings}: the C{[server]} table (L{mailhub.config.ServerConfig}:
hostname, limits, deadlines) and the values that belong to one listener
(its name, the sender check, AUTH over plain text from loopback, the
Received header's AUTH note, the address extension separator, the spool's
minimum free space).  L{SMTPSettings.of} takes them from a whole
L{mailhub.config.Config}, so every key has one default: the one in
C{mailhub.config}.

The C{server} field may be a stand-in that reads the current C{[server]}
table at each access (L{mailhub.daemon.reload.Delegate}): a reload then
reaches open sessions' next commands.  The per-listener values are fixed
when the listener is built.

Must not touch: parsing or validating the configuration file
(L{mailhub.config}), sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailhub.config import AuthConfig, Config, LocalConfig, ServerConfig, SpoolConfig, SubmissionConfig
from mailhub.smtp.policy import SENDER_CHECKS

__all__ = ["SMTPSettings"]


@dataclass(frozen=True)
class SMTPSettings:
    """
    What one listener's sessions are told to do (see the module docstring).

    @ivar server: the C{[server]} table (or a live stand-in for it).
    @ivar listener: C{"smtp"}, C{"submission"} or C{"smtps"}.
    @ivar sender_check: C{"strict"}: an authenticated user may only use
        envelope senders they own (553 5.7.1); C{"off"} (or C{"none"}).
    @ivar allow_plaintext_loopback: offer AUTH without TLS to clients at
        exactly 127.0.0.1 or ::1 (L{mailhub.smtp.policy.is_loopback}).
    @ivar received_auth_user: add C{(Authenticated sender: USER)} to the
        Received header of authenticated sessions (not with the server's
        C{hide_client_ip}).
    @ivar extension_separator: the address extension separator the sender
        check allows (C{alice+x@...} is alice's); C{""} disables.
    @ivar min_free_space: bytes the spool's file system must keep free;
        below it (or below 1.5 x C{max_message_size}, or when SIZE= does
        not fit) MAIL is answered C{452 4.3.1} (Postfix queue_minfree).
        0: no check.
    @ivar qualify_domain: a path without a domain (C{<root>}) gets
        C{@qualify_domain} appended before it is parsed, as Postfix's
        C{append_at_myorigin} does for local submission; C{None} (every
        network listener): such a path is a syntax error.
    """

    server: ServerConfig
    listener: str = "smtp"
    sender_check: str = SubmissionConfig.sender_check
    allow_plaintext_loopback: bool = AuthConfig.allow_plaintext_loopback
    received_auth_user: bool = False
    extension_separator: str = LocalConfig.extension_separator
    min_free_space: int = 0
    qualify_domain: str | None = None

    def __post_init__(self) -> None:
        if self.sender_check not in SENDER_CHECKS:
            raise ValueError(f"sender_check must be one of {', '.join(SENDER_CHECKS)}, not {self.sender_check!r}")

    @classmethod
    def of(cls, config: Config, listener: str, server: Any = None) -> SMTPSettings:
        """
        The settings of C{listener} from a loaded configuration; C{server}:
        what stands for C{config.server} (the daemon passes its live
        stand-in), default C{config.server}.
        """
        spool: SpoolConfig = config.spool
        return cls(
            server=config.server if server is None else server,
            listener=listener,
            sender_check=config.submission.sender_check,
            allow_plaintext_loopback=config.auth.allow_plaintext_loopback,
            extension_separator=config.local.extension_separator,
            min_free_space=spool.min_free_space,
        )
