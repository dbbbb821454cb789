"""
Who may send what where: the relay decision, recipient checks, and the
submission rules (AUTH before MAIL, sender ownership).

Owns: the one place where mailhub decides whether a recipient is accepted
(no open relay, by construction).  The rule, the same on
every listener kind (smtp, submission, smtps)::

    anyone (authenticated or not)     -> may send to the local domains;
                                         the Directory answers (aliases,
                                         users); its RecipientError becomes
                                         the reply (550 5.1.1, ...)
    authenticated users               -> may also relay (any domain)
                                         (Postfix permit_sasl_authenticated)
    clients in trusted_networks       -> may also relay without AUTH
                                         (permit_mynetworks)
    nobody else                       -> 554 5.7.1 Relay access denied
                                         (defer_unauth_destination, but final)

A listener, TLS or the HELO name never widen relaying.  IPv4-mapped IPv6
client addresses (``::ffff:192.0.2.1``) are compared as the IPv4 address
they carry.

Submission (RFC 6409) and implicit-TLS submission (RFC 8314) listeners
additionally require AUTH before MAIL (L{Policy.check_mail}: 530 5.7.0,
trusted networks included), and with C{sender_check = "strict"} an
authenticated user may only use envelope senders they own
(L{Policy.check_sender}: 553 5.7.1), on every listener.

Replies are data (L{mailhub.smtp.proto.Reply}: code, RFC 3463 enhanced
code, text); the SMTP server only formats them.

Must not touch: sockets, the spool, configuration files, the users file
(ownership is asked through the callable the server passes in).  It gets a
L{mailhub.delivery.directory.Directory} and the trusted networks from its caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailhub.address import AddressError, Mailbox
from mailhub.config import SENDER_CHECKS
from mailhub.delivery.directory import Directory
from mailhub.delivery.errors import RecipientError
from mailhub.smtp.proto import Reply

__all__ = ["Session", "Policy", "LISTENERS", "SUBMISSION_LISTENERS", "SENDER_CHECKS", "is_loopback"]

#: Listener kinds a session can arrive on.
LISTENERS = ("smtp", "submission", "smtps")
#: Listener kinds on which MAIL requires AUTH first (RFC 6409, RFC 8314).
SUBMISSION_LISTENERS = ("submission", "smtps")


@dataclass
class Session:
    """
    What policy needs to know about an SMTP session.  The server owns and
    updates it (HELO, STARTTLS, AUTH); policy only reads it.
    """

    client_ip: str
    helo: str | None = None
    authenticated_user: str | None = None
    tls: bool = False
    listener: str = "smtp"


def _parse_networks(networks: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def _client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(ip: str) -> bool:
    """
    Whether C{ip} is I{the} loopback address: exactly C{127.0.0.1} or
    C{::1} (or C{::ffff:127.0.0.1}).  Used for
    C{auth.allow_plaintext_loopback}.  Deliberately narrower than
    127.0.0.0/8: every 127/8 address is local on Linux, so nothing is
    lost, and other 127/8 addresses (127.0.0.2) can stand for a remote
    client in tests.
    """
    addr = _client_address(ip)
    return addr is not None and addr in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class Policy:
    """
    Recipient acceptance for the SMTP server.

    @param directory: answers which domains are local and resolves local
        recipients to final delivery addresses.
    @param trusted_networks: networks (C{"127.0.0.0/8"}) whose clients may
        relay without authentication.
    @param postmaster_domain: the domain a bare C{RCPT TO:<postmaster>}
        (RFC 5321 4.5.1) is delivered to; the first local domain.  When
        C{None} it is C{directory.primary_domain}.
    """

    def __init__(
        self,
        directory: Directory,
        trusted_networks: Sequence[str],
        postmaster_domain: str | None = None,
    ) -> None:
        self.directory = directory
        self.trusted_networks = _parse_networks(trusted_networks)
        if postmaster_domain is None:
            postmaster_domain = directory.primary_domain
        self.postmaster_domain = postmaster_domain

    def is_trusted(self, client_ip: str) -> bool:
        """Whether C{client_ip} lies inside one of the trusted networks."""
        addr = _client_address(client_ip)
        if addr is None:
            return False
        return any(addr.version == net.version and addr in net for net in self.trusted_networks)

    def may_relay(self, session: Session) -> bool:
        """
        The relay decision, on every listener kind: an authenticated
        session, or a client inside the trusted networks.  Nothing else
        (not the listener, not TLS, not HELO) ever allows relaying;
        local domains need no relay permission (L{check_recipient}).
        """
        if session.authenticated_user:
            return True
        return self.is_trusted(session.client_ip)

    def check_mail(self, session: Session) -> Reply | None:
        """
        Whether the session may start a mail transaction at all: on the
        submission listeners only after AUTH (530 5.7.0), whoever the
        client is.  C{None} means yes.
        """
        if session.listener in SUBMISSION_LISTENERS and not session.authenticated_user:
            return Reply(530, "5.7.0", "Authentication required")
        return None

    def check_sender(
        self,
        session: Session,
        sender: str,
        owns: Callable[[str, str], bool],
        sender_check: str = "strict",
    ) -> Reply | None:
        """
        Whether an authenticated user may use envelope sender C{sender}
        (C{""} for the null sender).  With C{sender_check} C{"strict"},
        C{owns(user, sender)} must say so (L{mailhub.users.UsersFile.may_send_as}),
        else 553 5.7.1.  Unauthenticated sessions are not checked here
        (they cannot relay; on submission listeners L{check_mail} already
        refused them).  C{None} means accepted.
        """
        user = session.authenticated_user
        if not user or sender_check != "strict" or owns(user, sender):
            return None
        return Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {user}")

    def postmaster(self) -> Mailbox:
        """The mailbox a domain-less C{<postmaster>} recipient means."""
        return Mailbox("postmaster", self.postmaster_domain)

    def check_recipient(self, session: Session, mailbox: Mailbox) -> tuple[Reply, list[str]]:
        """
        Decide one RCPT TO.  Returns the reply and, when it is a success,
        the final delivery addresses (after aliases); on failure the list
        is empty.
        """
        try:
            local = self.directory.is_local(mailbox.domain_key)
        except AddressError as e:
            return Reply(501, e.enhanced, f"<{mailbox}>: {e}"), []
        if local:
            try:
                addresses = self.directory.resolve(mailbox)
            except RecipientError as e:
                return Reply(e.code, e.enhanced, e.text), []
            if not addresses:
                return Reply(550, "5.1.1", f"<{mailbox}>: Recipient address rejected: User unknown"), []
            return Reply(250, "2.1.5", "Ok"), list(addresses)
        if self.may_relay(session):
            return Reply(250, "2.1.5", "Ok"), [f"{mailbox.local}@{mailbox.domain}"]
        return Reply(554, "5.7.1", f"<{mailbox}>: Relay access denied"), []
