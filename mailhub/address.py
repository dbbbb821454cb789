"""
Mailbox and domain syntax (RFC 5321 section 4.1.2, RFC 6531 for UTF-8).

Owns: turning the text of a MAIL FROM / RCPT TO path into a L{Mailbox},
normalising domains for comparison (lower case, IDNA A-labels) and deciding
whether a local part is safe to use as a directory name.

Must not touch: configuration, the network, the file system.  Everything
here is pure so that the server, the sendmail command and the queue tools
all parse addresses the same way.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = [
    "AddressError",
    "Mailbox",
    "parse_path",
    "parse_mailbox",
    "normalize_domain",
    "is_safe_local_part",
    "MAX_LOCAL_PART",
    "MAX_DOMAIN",
    "MAX_PATH",
]

#: RFC 5321 4.5.3.1.1 to 4.5.3.1.3, in octets.  MAX_PATH counts the
#: angle brackets ("<" local "@" domain ">"), as 4.5.3.1.3 says.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """
    A path or mailbox is syntactically invalid.

    @ivar enhanced: the RFC 3463 code a server should answer with.
    """

    def __init__(self, message: str, enhanced: str = "5.1.3") -> None:
        super().__init__(message)
        self.enhanced = enhanced


# atext of RFC 5322, plus every non-ASCII character (RFC 6531 UTF8-non-ascii).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u00a0-\u2027\u202a-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# qtextSMTP / quoted-pairSMTP (RFC 5321 4.1.2), UTF-8 allowed.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u00a0-\u2027\u202a-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_SOURCE_ROUTE = re.compile(r"@[^:,]+(?:,@[^:,]+)*:")


def _is_ascii(text: str) -> bool:
    return text.isascii()


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """
    Return the form of C{domain} used for comparisons and DNS: lower case,
    IDNA A-labels, no trailing dot.  Address literals are returned in
    canonical form with their brackets.

    Remembered for the last 4096 domains (a pure function asked about the
    same few domains several times per message: RCPT, routing, delivery);
    errors are not remembered.

    @raise AddressError: if the domain is not a valid host name or literal.
    """
    if not domain:
        raise AddressError("empty domain", "5.1.2")
    if domain.startswith("["):
        return _normalize_literal(domain)
    if domain.endswith("."):
        domain = domain[:-1]
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long", "5.1.2")
    if _is_ascii(domain):
        labels = domain.lower().split(".")
    else:
        try:
            labels = idna.encode(domain, uts46=True).decode("ascii").split(".")
        except (idna.IDNAError, UnicodeError) as e:
            raise AddressError(f"invalid internationalized domain: {e}", "5.1.2")
    for label in labels:
        if not _LDH_LABEL.match(label):
            raise AddressError("invalid domain", "5.1.2")
    result = ".".join(labels)
    if len(result) > MAX_DOMAIN:
        raise AddressError("domain too long", "5.1.2")
    return result


def _normalize_literal(literal: str) -> str:
    if not literal.endswith("]"):
        raise AddressError("invalid address literal", "5.1.2")
    body = literal[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            return "[IPv6:%s]" % (ipaddress.IPv6Address(body[5:]).compressed,)
        return "[%s]" % (ipaddress.IPv4Address(body),)
    except ValueError:
        raise AddressError("invalid address literal", "5.1.2")


@dataclass(frozen=True)
class Mailbox:
    """
    An address as C{local@domain}.  C{local} is kept exactly as the client
    wrote it (quoted strings keep their quotes, UTF-8 is kept intact);
    C{domain} is kept as written and L{Mailbox.domain_key} is the normalised
    form for comparisons.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def domain_key(self) -> str:
        """The normalised domain, for comparing with configured domains."""
        return normalize_domain(self.domain)

    @property
    def local_key(self) -> str:
        """
        The local part used for lookups: unquoted, case-folded (as
        Postfix's local(8) folds local parts to lower case) and in Unicode
        NFC, so a UTF-8 local part composed differently by two clients
        (C{"e\\u0301"} or C{"\\u00e9"}) names one mailbox (RFC 6532 3.1 recommends NFC).
        Domains need no such step: IDNA (UTS 46) normalises U-labels.
        """
        local = self.local
        if local.startswith('"'):
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        local = local.lower()
        return local if local.isascii() else unicodedata.normalize("NFC", local)

    @property
    def is_ascii(self) -> bool:
        """Whether the address can be sent without SMTPUTF8."""
        return _is_ascii(self.local) and _is_ascii(self.domain)

    def key(self) -> str:
        """A canonical string for de-duplicating recipients."""
        return f"{self.local_key}@{self.domain_key}"


#: C0, DEL, C1 and the Unicode line/paragraph separators: none of them may
#: reach a header, a log line or a file name.  (A regular expression: a
#: generator over the characters cost 20 us per address, two per message.)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _utf8_len(text: str) -> int:
    """Octets of C{text} in UTF-8; a lone surrogate (JSON C{"\\udcff"} from the HTTP API) is an AddressError."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise AddressError("invalid characters in address", "5.1.3") from None


def parse_mailbox(text: str, allow_utf8: bool = True) -> Mailbox:
    """
    Parse C{local@domain} (no angle brackets).

    @param allow_utf8: whether non-ASCII characters are allowed (the client
        announced SMTPUTF8, RFC 6531 3.4).
    @raise AddressError: on any syntax problem.
    """
    if _CONTROL.search(text):
        raise AddressError("control characters in address", "5.1.3")
    _utf8_len(text)
    if not allow_utf8 and not _is_ascii(text):
        raise AddressError("non-ASCII address requires SMTPUTF8", "5.6.7")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address must be local-part@domain", "5.1.3")
    local, domain = text[:at], text[at + 1 :]
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise AddressError("invalid local part", "5.1.3")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long", "5.1.3")
    normalize_domain(domain)  # validate
    return Mailbox(local, domain)


def parse_path(text: str, allow_utf8: bool = True) -> Mailbox | None:
    """
    Parse a reverse-path or forward-path as it follows C{MAIL FROM:} or
    C{RCPT TO:}.  Returns C{None} for the null path C{<>}.

    Like Postfix (strict_rfc821_envelopes = no) a path without angle
    brackets is accepted; a source route (C{<@a,@b:user@c>}) is accepted and
    ignored, as RFC 5321 4.1.2 requires.

    @raise AddressError: on any syntax problem.
    """
    text = text.strip()
    if text.startswith("<"):
        if not text.endswith(">"):
            raise AddressError("unbalanced angle brackets", "5.1.3")
        text = text[1:-1]
    elif text.endswith(">"):
        raise AddressError("unbalanced angle brackets", "5.1.3")
    if text == "":
        return None
    if _utf8_len(text) + 2 > MAX_PATH:  # with its "<" and ">"
        raise AddressError("path too long", "5.1.3")
    route = _SOURCE_ROUTE.match(text)
    if route:
        text = text[route.end() :]
    return parse_mailbox(text, allow_utf8)


# Characters that may never reach a file name, whatever the syntax allowed.
_UNSAFE_IN_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


def is_safe_local_part(name: str) -> bool:
    """
    Whether C{name} (an unquoted, folded local part) can be used as one path
    component under the mailbox root: it cannot be empty, C{.} or C{..},
    start with a dot, or contain a slash, a backslash, NUL or any other
    control character.
    """
    if not name or name.startswith(".") or ".." in name:
        return False
    if _UNSAFE_IN_NAME.search(name):
        return False
    return len(name.encode("utf-8")) <= MAX_LOCAL_PART
