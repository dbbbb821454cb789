"""
AUTH from a client address the failed-login throttle has blocked: the
refusal (421 4.7.0, then the connection is closed) comes at once, before
any SASL exchange, whatever the mechanism.  A 334 prompt would invite the
client to send a password the server will never check.  In memory: the
smtpharness fakes (StringTransport with a recording startTLS, task.Clock),
a real UsersFile and AuthThrottle.
"""

from __future__ import annotations

import pytest
from smtpharness import (
    AUTH_FAILED,
    FOREIGN,
    Harness,
    b64,
    serve_with_auth,
    tls_session,
)
from smtpharness import (
    AUTH_PASSWORD as PASSWORD,
)
from smtpharness import (
    AUTH_USER as USER,
)
from smtpharness import (
    TOO_MANY_AUTH_FAILURES as TOO_MANY,
)

OTHER = "203.0.113.9"


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path)
    serve_with_auth(h, tmp_path)
    return h


def block(h: Harness, ip: str = FOREIGN) -> None:
    """Three wrong passwords from C{ip}: the throttle blocks it."""
    c = tls_session(h, ip)
    wrong = b64(f"\0{USER}\0wrong")
    for reply in (AUTH_FAILED, AUTH_FAILED, TOO_MANY):
        assert c.send(f"AUTH PLAIN {wrong}\r\n") == ""
        h.clock.advance(1)
        assert c.read() == reply
    c.lose()
    assert h.factory.throttle.blocked(ip)


@pytest.mark.parametrize(
    "command",
    ["AUTH LOGIN", f"AUTH LOGIN {b64(USER)}", "AUTH PLAIN", f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + PASSWORD)}"],
    ids=["login", "login-initial-response", "plain", "plain-initial-response"],
)
def test_blocked_address_is_refused_at_once_without_a_prompt(h, command):
    block(h)
    c = tls_session(h)
    assert c.send(command + "\r\n") == TOO_MANY  # no 334, nothing else first
    assert c.closed and c.user is None
    # Whatever the client pipelined after it is not read as SASL responses.
    assert c.send(f"{b64(PASSWORD)}\r\nNOOP\r\n") == ""


def test_other_addresses_still_get_the_login_prompt(h):
    block(h)
    c = tls_session(h, OTHER)
    assert c.send("AUTH LOGIN\r\n") == f"334 {b64('Username:')}\r\n"
    assert c.send(b64(USER) + "\r\n") == f"334 {b64('Password:')}\r\n"
    assert c.send(b64(PASSWORD) + "\r\n") == "235 2.7.0 Authentication successful\r\n"
