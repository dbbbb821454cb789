"""Tests for mailhub.smtp.policy: the relay decision and recipient checks."""

from __future__ import annotations

import pytest

from mailhub.address import Mailbox, parse_mailbox
from mailhub.delivery.directory import Directory
from mailhub.smtp.policy import LISTENERS, Policy, Session, is_loopback
from mailhub.smtp.proto import Reply


@pytest.fixture
def directory(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("list: alice, bob\nfwd: someone@remote.test\nloop1: loop2\nloop2: loop1\n")
    return Directory(
        ["example.com", "example.org"], str(tmp_path / "mailboxes"), users=["alice", "bob"],
        aliases_path=str(aliases),
    )


@pytest.fixture
def policy(directory):
    return Policy(directory, ("127.0.0.0/8", "::1/128", "192.0.2.0/24"))


def session(ip: str, user: str | None = None, listener: str = "smtp") -> Session:
    return Session(client_ip=ip, helo="client.test", authenticated_user=user, tls=False, listener=listener)


@pytest.mark.parametrize(
    "ip, user, expected",
    [
        ("127.0.0.1", None, True),
        ("127.200.3.4", None, True),
        ("::1", None, True),
        ("::ffff:127.0.0.1", None, True),  # IPv4-mapped
        ("192.0.2.77", None, True),
        ("198.51.100.1", None, False),
        ("2001:db8::1", None, False),
        ("198.51.100.1", "alice@example.com", True),
        ("", None, False),
        ("not-an-ip", None, False),
    ],
)
def test_may_relay(policy, ip, user, expected):
    for listener in LISTENERS:
        assert policy.may_relay(session(ip, user, listener)) is expected


@pytest.mark.parametrize("listener", LISTENERS)
def test_no_open_relay_on_any_listener(policy, listener):
    """No open relay by construction: an unauthenticated foreign client never relays."""
    reply, addresses = policy.check_recipient(
        session("203.0.113.9", None, listener), Mailbox("victim", "elsewhere.test")
    )
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert "Relay access denied" in reply.text
    assert addresses == []


def test_relay_for_trusted_and_authenticated(policy):
    for s in (session("127.0.0.1"), session("203.0.113.9", "alice@example.com")):
        reply, addresses = policy.check_recipient(s, Mailbox("bob", "elsewhere.test"))
        assert reply == Reply(250, "2.1.5", "Ok")
        assert addresses == ["bob@elsewhere.test"]


@pytest.mark.parametrize(
    "rcpt, code, enhanced, addresses",
    [
        ("alice@example.com", 250, "2.1.5", ["alice@example.com"]),
        ("ALICE@Example.COM", 250, "2.1.5", ["alice@example.com"]),
        ("alice+tag@example.org", 250, "2.1.5", ["alice@example.org"]),
        ("list@example.com", 250, "2.1.5", ["alice@example.com", "bob@example.com"]),
        ("fwd@example.com", 250, "2.1.5", ["someone@remote.test"]),
        ("postmaster@example.org", 250, "2.1.5", ["postmaster@example.org"]),
        ("nobody@example.com", 550, "5.1.1", []),
        ("loop1@example.com", 550, "5.4.6", []),
    ],
)
def test_local_recipients(policy, rcpt, code, enhanced, addresses):
    # A foreign, unauthenticated client may still send to local users.
    reply, got = policy.check_recipient(session("203.0.113.9"), parse_mailbox(rcpt))
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert got == addresses


def test_postmaster_is_first_domain(policy, directory):
    assert policy.postmaster() == Mailbox("postmaster", "example.com")
    assert Policy(directory, (), postmaster_domain="example.org").postmaster() == Mailbox("postmaster", "example.org")


def test_reply_ok():
    assert Reply(250, "2.1.5", "Ok").ok
    assert not Reply(451, "4.3.0", "x").ok


@pytest.mark.parametrize(
    "ip, expected",
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("127.0.0.2", False),  # deliberately: only THE loopback address
        ("192.0.2.1", False),
        ("", False),
        ("junk", False),
    ],
)
def test_is_loopback(ip, expected):
    assert is_loopback(ip) is expected


@pytest.mark.parametrize("listener", LISTENERS)
def test_check_mail_requires_auth_on_submission_listeners(policy, listener):
    expected = None if listener == "smtp" else Reply(530, "5.7.0", "Authentication required")
    # Trusted networks do not exempt a submission client from AUTH.
    assert policy.check_mail(session("127.0.0.1", None, listener)) == expected
    assert policy.check_mail(session("203.0.113.9", None, listener)) == expected
    assert policy.check_mail(session("203.0.113.9", "alice@example.com", listener)) is None


def test_check_sender(policy):
    owned = {("alice@example.com", "alice@example.com"), ("alice@example.com", "")}
    owns = lambda user, sender: (user, sender) in owned  # noqa: E731
    alice = session("203.0.113.9", "alice@example.com", "submission")
    assert policy.check_sender(alice, "alice@example.com", owns) is None
    assert policy.check_sender(alice, "", owns) is None
    assert policy.check_sender(alice, "bob@example.com", owns) == Reply(
        553, "5.7.1", "<bob@example.com>: Sender address rejected: not owned by user alice@example.com")
    assert policy.check_sender(alice, "bob@example.com", owns, "off") is None
    assert policy.check_sender(alice, "bob@example.com", owns, "none") is None
    # Unauthenticated sessions are not sender-checked.
    assert policy.check_sender(session("203.0.113.9"), "bob@example.com", owns) is None


class _StubDirectory:
    """A directory that breaks its contract in the two ways check_recipient guards against."""

    primary_domain = "example.com"

    def is_local(self, domain: str) -> bool:
        if domain.startswith("bad"):
            from mailhub.address import AddressError

            raise AddressError("bad domain", "5.1.2")
        return True

    def resolve(self, mailbox: Mailbox) -> list[str]:
        return []


def test_check_recipient_never_accepts_a_local_recipient_that_resolves_to_nothing():
    policy = Policy(_StubDirectory(), ())
    reply, addresses = policy.check_recipient(session("198.51.100.1"), parse_mailbox("ghost@example.com"))
    assert (reply, addresses) == (
        Reply(550, "5.1.1", "<ghost@example.com>: Recipient address rejected: User unknown"), []
    )
    reply, addresses = policy.check_recipient(session("127.0.0.1"), parse_mailbox("a@bad.example"))
    assert (reply, addresses) == (Reply(501, "5.1.2", "<a@bad.example>: bad domain"), [])
