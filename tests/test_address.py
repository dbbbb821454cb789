"""Tests for mailhub.address: path syntax, domains, safe local parts."""

import pytest

from mailhub.address import (
    AddressError,
    Mailbox,
    is_safe_local_part,
    normalize_domain,
    parse_mailbox,
    parse_path,
)


@pytest.mark.parametrize(
    "text, local, domain",
    [
        ("<user@example.com>", "user", "example.com"),
        ("user@example.com", "user", "example.com"),
        (" <user@example.com> ", "user", "example.com"),
        ("<First.Last@Example.COM>", "First.Last", "Example.COM"),
        ("<@relay.example,@other.example:user@example.com>", "user", "example.com"),
        ('<"john doe"@example.com>', '"john doe"', "example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"', "example.com"),
        ("<user+tag@example.com>", "user+tag", "example.com"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
        ("<üser@bücher.example>", "üser", "bücher.example"),
        ("<user@example.com.>", "user", "example.com."),
    ],
)
def test_parse_valid(text, local, domain):
    mb = parse_path(text)
    assert mb == Mailbox(local, domain)


def test_null_path():
    assert parse_path("<>") is None
    assert parse_path(" <> ") is None


@pytest.mark.parametrize(
    "text, enhanced",
    [
        ("<user@example.com", "5.1.3"),
        ("user@example.com>", "5.1.3"),
        ("<user>", "5.1.3"),
        ("<@example.com>", "5.1.3"),
        ("<a..b@example.com>", "5.1.3"),
        ("<.a@example.com>", "5.1.3"),
        ("<a.@example.com>", "5.1.3"),
        ("<a b@example.com>", "5.1.3"),
        ("<a\x00b@example.com>", "5.1.3"),
        ("<a\r\nb@example.com>", "5.1.3"),
        ("<a\x85b@example.com>", "5.1.3"),
        ("<a\u2028b@example.com>", "5.1.3"),
        ('<"a\x9bb"@example.com>', "5.1.3"),
        ("<user@-bad.example>", "5.1.2"),
        ("<user@bad-.example>", "5.1.2"),
        ("<user@exa_mple.com>", "5.1.2"),
        ("<user@>", "5.1.2"),
        ("<user@[999.1.1.1]>", "5.1.2"),
        ("<user@[IPv6:zz::1]>", "5.1.2"),
        ("<" + "a" * 65 + "@example.com>", "5.1.3"),
        ("<a@" + ("b" * 60 + ".") * 5 + "com>", "5.1.3"),
    ],
)
def test_parse_invalid(text, enhanced):
    with pytest.raises(AddressError) as e:
        parse_path(text)
    assert e.value.enhanced == enhanced


def test_utf8_requires_smtputf8():
    with pytest.raises(AddressError) as e:
        parse_path("<üser@example.com>", allow_utf8=False)
    assert e.value.enhanced == "5.6.7"
    assert parse_path("<user@example.com>", allow_utf8=False) == Mailbox("user", "example.com")


def test_keys():
    mb = parse_mailbox("User.Name@Bücher.Example")
    assert mb.local_key == "user.name"
    assert mb.domain_key == "xn--bcher-kva.example"
    assert mb.key() == "user.name@xn--bcher-kva.example"
    assert not mb.is_ascii
    assert parse_mailbox('"Odd\\"Name"@x.org').local_key == 'odd"name'
    assert str(mb) == "User.Name@Bücher.Example"


def test_local_key_is_nfc():
    """Composed and decomposed forms of one UTF-8 local part name one mailbox (and one directory)."""
    composed = parse_mailbox("J\u00f6rg@example.com")  # o with diaeresis, one code point
    decomposed = parse_mailbox("Jo\u0308rg@example.com")  # o + combining diaeresis
    assert composed.local_key == decomposed.local_key == "j\u00f6rg"
    assert decomposed.key() == composed.key()
    assert parse_mailbox('"Jo\u0308rg X"@example.com').local_key == "j\u00f6rg x"
    assert decomposed.local == "Jo\u0308rg"  # kept as written


def _path_of(length: int) -> str:
    """A valid <local@domain> path of exactly C{length} octets, brackets included."""
    local = "l" * 64
    labels, left = [], length - 2 - len(local) - 1 - len(".com")
    while left > 0:
        n = min(63, left)
        if left - n == 1:  # never leave a one-octet remainder for "."+label
            n -= 2
        labels.append("d" * n)
        left -= n + 1 if left - n > 0 else n
    domain = ".".join(labels) + ".com"
    path = f"<{local}@{domain}>"
    assert len(path) == length, (len(path), length)
    return path


def test_path_length_counts_the_brackets():
    """RFC 5321 4.5.3.1.3: the path, "<" and ">" included, is at most 256 octets."""
    ok = _path_of(256)
    assert parse_path(ok) is not None
    assert parse_path(ok[1:-1]) is not None  # without brackets: counted as if they were there
    with pytest.raises(AddressError) as e:
        parse_path(_path_of(257))
    assert e.value.enhanced == "5.1.3" and str(e.value) == "path too long"
    with pytest.raises(AddressError):
        parse_path(_path_of(257)[1:-1])


def test_normalize_domain():
    assert normalize_domain("EXAMPLE.com.") == "example.com"
    assert normalize_domain("[IPv6:2001:DB8:0:0::1]") == "[IPv6:2001:db8::1]"
    assert normalize_domain("[192.0.2.1]") == "[192.0.2.1]"
    with pytest.raises(AddressError):
        normalize_domain("")


@pytest.mark.parametrize(
    "name, safe",
    [
        ("user", True),
        ("first.last", True),
        ("üser", True),
        ("user+tag", True),
        ("..", False),
        (".", False),
        ("", False),
        (".hidden", False),
        ("a..b", False),
        ("a/b", False),
        ("../etc", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("a\nb", False),
        ("a\x7fb", False),
        ("x" * 65, False),
    ],
)
def test_safe_local_part(name, safe):
    assert is_safe_local_part(name) is safe


@pytest.mark.parametrize("text", ["\udcff@example.test", "a@\udcffexample.test", "<\ud800@x.test>"])
def test_lone_surrogates_are_an_address_error(text):
    """Not UnicodeEncodeError: callers (SMTP, HTTP API, sendmail) only expect AddressError."""
    with pytest.raises(AddressError) as e:
        parse_path(text, allow_utf8=True)
    assert e.value.enhanced == "5.1.3"
