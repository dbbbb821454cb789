"""
Who may send what where: the relay decision and recipient checks.

Owns: the one place where mailhub decides whether a recipient is accepted
(house rule 2: no open relay by construction).  The rule is::

    recipient domain is local        -> ask the Directory (aliases, users);
                                        its RecipientError becomes the reply
    recipient domain is not local    -> accepted only if may_relay(session):
                                          * the client IP is inside one of
                                            trusted_networks (Postfix
                                            permit_mynetworks), or
                                          * the session is authenticated
                                            (permit_sasl_authenticated);
                                        otherwise 554 5.7.1 Relay access denied
                                        (defer_unauth_destination, but final).

The rule is the same on every listener kind (smtp, submission, smtps):
a listener never widens relaying.  IPv4-mapped IPv6 client addresses
(``::ffff:192.0.2.1``) are compared as the IPv4 address they carry.

Replies are data (L{Reply}: code, RFC 3463 enhanced code, text); the SMTP
server only formats them.

Must not touch: sockets, the spool, configuration files.  It gets a
L{mailhub.directory.Directory} and the trusted networks from its caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .address import AddressError, Mailbox

from .directory import Directory, RecipientError

__all__ = ["Reply", "Session", "Policy", "LISTENERS"]

#: Listener kinds a session can arrive on.
LISTENERS = ("smtp", "submission", "smtps")


@dataclass(frozen=True)
class Reply:
    """An SMTP reply as data: C{550}, C{"5.1.1"}, C{"User unknown"}."""

    code: int
    enhanced: str
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


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
        The relay decision: an authenticated session, or a client inside
        the trusted networks.  Nothing else (not the listener, not TLS,
        not HELO) ever allows relaying.
        """
        if session.authenticated_user:
            return True
        return self.is_trusted(session.client_ip)

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
