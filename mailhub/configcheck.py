"""
Configuration values: one checker per kind of value.

Owns: turning one raw TOML value into the typed value a configuration key
holds (a duration into seconds, a list of endpoint strings into a tuple,
a domain into its normalised form...) or refusing it with a L{BadValue}
whose text is the problem alone (C{must be a positive integer, got -3});
the loader adds the file and the key.  Also the value sets some keys
accept (L{LOCAL_MODES}, L{TLS_LEVELS}, L{SENDER_CHECKS}) and the pure
parsers other modules use (L{parse_duration}, L{check_endpoint},
L{check_maildir_name}).

Each checker is named in the C{metadata} of the dataclass field of its
key (L{mailhub.configschema}); a key's checker is written only there.

Must not touch: files (only C{local.pickup_group} asks the group
database), the reactor, the network.  Cross-key rules (C{min_backoff <=
max_backoff}, TLS pairs) belong to the loader, L{mailhub.config}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeGuard, cast

from mailhub.address import AddressError, normalize_domain

__all__ = [
    "BadValue",
    "Checker",
    "show",
    "parse_duration",
    "check_endpoint",
    "check_maildir_name",
    "LOCAL_MODES",
    "TLS_LEVELS",
    "SENDER_CHECKS",
    "LOG_LEVELS",
    "MAX_DELIVERY_PROCESSES",
]

#: A value checker: the raw TOML value in, the typed value out, or L{BadValue}.
Checker = Callable[[Any], Any]

#: local.mode values.
LOCAL_MODES = ("virtual", "system")
#: relay.tls values (Postfix smtp_tls_security_level).
TLS_LEVELS = ("none", "may", "encrypt", "verify")
#: submission.sender_check values: "strict" checks that an authenticated
#: user owns the envelope sender; "off" lets them use any.  The spelling
#: "none" is read as "off".
SENDER_CHECKS = ("strict", "off")
#: server.log_level values (mailhub.loglevel).
LOG_LEVELS = ("debug", "info", "warn", "error")
#: More delivery processes than this only add memory (each is a Python process).
MAX_DELIVERY_PROCESSES = 32


class BadValue(Exception):
    """A value problem, without the file and key (added by the caller)."""


def show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any) -> int:
    if not is_int(value) or value <= 0:
        raise BadValue(f"must be a positive integer, got {show(value)}")
    return value


def delivery_processes(value: Any) -> int:
    if not is_int(value) or value < 0:
        raise BadValue(
            f"must be a number of processes, 0 to {MAX_DELIVERY_PROCESSES} "
            f"(0: deliver in the daemon's threads), got {show(value)}"
        )
    n = value
    if n > MAX_DELIVERY_PROCESSES:
        raise BadValue(f"must be at most {MAX_DELIVERY_PROCESSES} (0: deliver in the daemon's threads), got {value}")
    return n


#: The most SMTP acceptor processes (server.processes).
MAX_PROCESSES = 64


def processes(value: Any) -> str | int:
    """C{server.processes}: C{"auto"} or 1 to L{MAX_PROCESSES}."""
    if value == "auto":
        return "auto"
    if not is_int(value) or not 1 <= value <= MAX_PROCESSES:
        raise BadValue(f'must be "auto" or a number of processes, 1 to {MAX_PROCESSES}, got {show(value)}')
    return value


def non_negative_int(value: Any) -> int:
    """A count or rate where 0 switches the limit off."""
    if not is_int(value) or value < 0:
        raise BadValue(f"must be a non-negative integer (0 disables), got {show(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadValue(f"must be true or false, got {show(value)}")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadValue(f"must be a non-empty string, got {show(value)}")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """
    Seconds from a number (C{300}, C{1.5}) or a Postfix-style string
    (C{"300s"}, C{"5m"}, C{"1h"}, C{"5d"}, C{"1w"}, C{"1h30m"}).

    @raise ValueError: anything else, or a negative number.
    """
    if is_int(value) or isinstance(value, float):
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(value)
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        pos, total = 0, 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if not m:
                raise ValueError(value)
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if not text:
            raise ValueError(value)
        return total
    raise ValueError(value)


def duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise BadValue(
            f'must be a duration (seconds, or a string like "300s", "5m", "1h", "5d"), got {show(value)}'
        )


def positive_duration(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise BadValue(f"must be a positive duration, got {show(value)}")
    return seconds


def string_list(value: Any, what: str = "strings") -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadValue(f"must be a list of {what}, got {show(value)}")
    return tuple(value)


def check_endpoint(description: str) -> None:
    """
    Check a Twisted server endpoint description (C{tcp:8025:interface=127.0.0.1},
    C{unix:/run/mailhub.sock}, C{tcp6:25}...) by building it against a
    memory reactor: nothing is bound.

    @raise ValueError: with a short explanation.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        endpoint = serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]  # Twisted: unannotated
    except Exception as e:  # the parser raises ValueError, TypeError, KeyError...
        hint = ""
        if "multiple values" in str(e) and "::" in description:
            hint = ' (escape colons in IPv6 addresses as "\\:")'
        if "invalid literal for int()" in str(e):
            raise ValueError(f"the port must be a number, got {str(e).rsplit(': ', 1)[-1]}")
        raise ValueError((str(e) or e.__class__.__name__) + hint)
    port = getattr(endpoint, "_port", None)
    if port is not None and is_int(port) and not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    interface = getattr(endpoint, "_interface", None)
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"interface must be an IP address, got {interface!r}")


def endpoints(value: Any) -> tuple[str, ...]:
    items = optional_endpoints(value)
    if not items:
        raise BadValue("must list at least one endpoint")
    return items


def networks(value: Any) -> tuple[str, ...]:
    items = string_list(value, "networks")
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise BadValue(f"invalid network {item!r} (want e.g. \"192.0.2.0/24\" or \"::1/128\")")
    return items


def domain(value: Any) -> str:
    text = string(value)
    try:
        return normalize_domain(text)
    except AddressError as e:
        raise BadValue(f"invalid domain {text!r}: {e}")


def domains(value: Any) -> tuple[str, ...]:
    items = string_list(value, "domains")
    out = []
    for item in items:
        try:
            out.append(normalize_domain(item))
        except AddressError as e:
            raise BadValue(f"invalid domain {item!r}: {e}")
    return tuple(out)


def users(value: Any) -> tuple[str, ...]:
    items = string_list(value, "user names or addresses")
    for item in items:
        if not item or any(c.isspace() for c in item):
            raise BadValue(f"invalid user {item!r}")
    return items


def separator(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 1 or value in ("@",) or value.isspace() or value.isalnum():
        raise BadValue(f'must be "" or one punctuation character such as "+" or "-", got {show(value)}')
    return value


def admins(value: Any) -> tuple[str, ...]:
    """User addresses, normalised as the users file stores them (L{mailhub.users.normalize_user})."""
    from mailhub.address import parse_mailbox

    items = string_list(value, "user addresses")
    out = []
    for item in items:
        try:
            if any(c in item for c in ':"\\') or any(c.isspace() for c in item):
                raise AddressError("invalid user address")
            mailbox = parse_mailbox(item)
        except AddressError:
            raise BadValue(f"invalid user address {item!r} (want e.g. \"root@example.org\")")
        out.append(f"{mailbox.local_key}@{mailbox.domain_key}")
    return tuple(out)


def group(value: Any) -> str | None:
    """A Unix group name that must exist; C{""} means "not set"."""
    import grp

    text = optional_string(value)
    if text is not None:
        try:
            grp.getgrnam(text)
        except KeyError:
            raise BadValue(f"no such group: {text!r}")
    return text


def home_maildir(value: Any) -> str:

    text = string(value)
    try:
        check_maildir_name(text)
    except ValueError as e:
        raise BadValue(str(e).replace("home_maildir ", "", 1))
    return text


def uid(value: Any) -> int:
    if not is_int(value) or not 0 < value < 2**32 - 1:
        raise BadValue(f"must be a user id 1-4294967294, got {show(value)}")
    return value


def port(value: Any) -> int:
    if not is_int(value) or not 0 < value < 65536:
        raise BadValue(f"must be a port number 1-65535, got {show(value)}")
    return value


def optional_string(value: Any) -> str | None:
    """A string where C{""} means "not set" (as in the documented examples)."""
    if not isinstance(value, str):
        raise BadValue(f"must be a string, got {show(value)}")
    return value or None


def optional_endpoints(value: Any) -> tuple[str, ...]:
    items = string_list(value, "endpoint strings")
    for item in items:
        try:
            check_endpoint(item)
        except ValueError as e:
            raise BadValue(f"invalid endpoint {item!r}: {e}")
    return items


def plain_endpoints(value: Any) -> tuple[str, ...]:
    """Endpoints that mailhub wraps in TLS itself: C{ssl:} would bring its own certificate."""
    items = string_list(value, "endpoint strings")
    for item in items:
        if item.split(":", 1)[0].strip().lower() in ("ssl", "tls", "le", "lets"):
            raise BadValue(
                f"invalid endpoint {item!r}: give a plain endpoint (tcp:465...); "
                "mailhub adds TLS with server.tls_cert / server.tls_key"
            )
    return optional_endpoints(value)


def nexthop(value: Any) -> str | None:
    from mailhub.relay.nexthop import parse_nexthop

    if not isinstance(value, str):
        raise BadValue(f'must be a next hop string like "[smtp.example.net]:587", got {show(value)}')
    try:
        parse_nexthop(value)
    except ValueError as e:
        raise BadValue(str(e))
    return value.strip() or None


def _table_domain(key: str) -> str:
    """A domain key of a per-domain table: C{example.com}, or C{.example.com} for its subdomains."""
    dot = "." if key.startswith(".") else ""
    try:
        return dot + normalize_domain(key[len(dot):])
    except AddressError as e:
        raise BadValue(f"invalid domain {key!r}: {e}")


def routes(value: Any) -> Mapping[str, str]:
    from mailhub.relay.nexthop import parse_nexthop

    if not isinstance(value, dict):
        raise BadValue(f'must be a table of domain = "next hop", got {show(value)}')
    out: dict[str, str] = {}
    for key, target in value.items():
        domain = _table_domain(key)
        if not isinstance(target, str):
            raise BadValue(f'{key!r}: must be a next hop string like "[host]:25" or "", got {show(target)}')
        try:
            parse_nexthop(target)
        except ValueError as e:
            raise BadValue(f"{key!r}: {e}")
        out[domain] = target.strip()
    return MappingProxyType(out)


#: Levels of the [relay.tls_policy] table (mailhub.relay.tlspolicy.TABLE_LEVELS).
TLS_POLICY_LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")


def tls_policy(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise BadValue(f'must be a table of domain = "level", got {show(value)}')
    out: dict[str, str] = {}
    for key, level in value.items():
        domain = _table_domain(key)
        if level not in TLS_POLICY_LEVELS:
            raise BadValue(f"{key!r}: must be one of {', '.join(TLS_POLICY_LEVELS)}, got {show(level)}")
        out[domain] = level
    return MappingProxyType(out)


def dns_servers(value: Any) -> tuple[str, ...]:
    from mailhub.relay.nexthop import parse_dns_server

    items = string_list(value, 'DNS servers ("ip", "ip:port", "[ipv6]:port")')
    for item in items:
        try:
            parse_dns_server(item)
        except ValueError as e:
            raise BadValue(str(e))
    return items


def ip_addresses(value: Any) -> tuple[str, ...]:
    items = string_list(value, "IP addresses")
    for item in items:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            raise BadValue(f"invalid IP address {item!r}")
    return items


def choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise BadValue(f"must be one of {', '.join(repr(a) for a in allowed)}, got {show(value)}")
        return cast(str, value)  # equal to one of the allowed strings

    return check


#: The values of spool.sync.
SYNC_MODES = ("fsync", "syncfs")


def sync_mode(value: Any) -> str:
    """C{spool.sync}: C{"fsync"}, or C{"syncfs"} where the system has syncfs()."""
    mode = choice(*SYNC_MODES)(value)
    if mode == "syncfs":
        from mailhub import syncfs

        if not syncfs.available():
            raise BadValue(f'"syncfs": {syncfs.UNAVAILABLE}; use "fsync"')
    return mode


def sender_check(value: Any) -> str:
    """One of L{SENDER_CHECKS}; "none" is another spelling of "off"."""
    if value == "none":
        return "off"
    return choice(*SENDER_CHECKS)(value)


def check_maildir_name(name: str) -> tuple[str, ...]:
    """
    The path components of C{local.home_maildir} (relative to the home
    directory).  Refuses what could leave the home directory.

    @raise ValueError: absolute, empty, or with C{.} / C{..} components.
    """
    if not name or name.startswith("/"):
        raise ValueError(f"home_maildir must be a relative path, not {name!r}")
    parts = tuple(p for p in name.split("/") if p)
    if not parts or any(p in (".", "..") or "\x00" in p for p in parts):
        raise ValueError(f"home_maildir must not contain '.' or '..' components: {name!r}")
    return parts


# -- milters ([[milter]] tables, docs/milter.rst)

MILTER_ACTIONS = ("tempfail", "accept", "reject")
SMTP_LISTENERS = ("smtp", "submission", "smtps")


def socket_address(value: Any) -> str:
    """
    C{unix:/absolute/path} or C{inet:host:port} (C{inet:[::1]:port} for
    IPv6), as Postfix writes them: a milter's socket, an LMTP server's.
    """
    text = string(value)
    kind, _, rest = text.partition(":")
    if kind == "unix":
        if not rest.startswith("/"):
            raise BadValue(f"unix: needs an absolute path, got {show(value)}")
        return text
    if kind == "inet":
        host, _, port_text = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadValue(f"must be inet:host:port, got {show(value)}")
        return text
    raise BadValue(f'must be "unix:/path" or "inet:host:port", got {show(value)}')


def smtp_listeners(value: Any) -> tuple[str, ...]:
    """A list of SMTP listener kinds (smtp, submission, smtps)."""
    names = string_list(value, "listener names")
    for name in names:
        if name not in SMTP_LISTENERS:
            raise BadValue(f"unknown listener {show(name)} (known: {', '.join(SMTP_LISTENERS)})")
    return names
#: What C{[limits] redis_failure} may say.
REDIS_FAILURES = ("open", "closed")


def redis_url(value: Any) -> str | None:
    """C{[limits] redis}: C{""} (no Redis) or a URL redis-py reads (redis://, rediss://, unix://)."""
    text = optional_string(value)
    if text is None:
        return None
    if not text.startswith(("redis://", "rediss://", "unix://")) or len(text) > 1000:
        raise BadValue(f"invalid Redis URL {text[:100]!r} (want e.g. \"redis://127.0.0.1:6379/0\")")
    return text


def local_transport(value: Any) -> str:
    """C{local.transport}: C{"maildir"}, C{"lmtp:unix:/path"} or C{"lmtp:inet:host:port"}."""
    text = string(value)
    if text == "maildir":
        return text
    if text.startswith("lmtp:"):
        try:
            socket_address(text[len("lmtp:"):])
        except BadValue:
            pass
        else:
            return text
    raise BadValue(
        f"invalid transport {text[:100]!r} (want \"maildir\", \"lmtp:unix:/path\" or \"lmtp:inet:host:port\")"
    )
