"""
Configuration: one TOML file turned into frozen, validated dataclasses.

Owns: finding the configuration file (C{--config FILE} > C{$MAILHUB_CONFIG}
> C{/etc/mailhub/mailhub.toml} > embedded defaults), reading it with
C{tomllib}, applying command-line overrides, the embedded defaults, and
validating every key.  Every problem is a L{ConfigError} whose message is
one line naming the file and the key, e.g.::

    /etc/mailhub/mailhub.toml: server.max_recipients: must be a positive integer, got -3

Must not touch: the reactor, the network, the spool or mailboxes.  This is
the only module that reads configuration files; everything else receives a
L{Config}.  See docs/configuration.rst for every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable

from mailhub.address import AddressError, normalize_domain

__all__ = [
    "ConfigError",
    "check_maildir_name",
    "ServerConfig",
    "SpoolConfig",
    "LocalConfig",
    "RelayConfig",
    "AuthConfig",
    "SubmissionConfig",
    "Config",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_DATA_DIR",
    "ENV_VAR",
    "find_config_file",
    "load_config",
    "format_config",
    "parse_duration",
    "read_secret",
    "TLS_LEVELS",
    "SENDER_CHECKS",
    "LOCAL_MODES",
]

#: aliases(5) file used in system mode when C{local.aliases} is not set and it exists.
DEFAULT_ALIASES = "/etc/aliases"
#: The Maildir below each home directory (Postfix C{home_mailbox = Maildir/}).
DEFAULT_HOME_MAILDIR = "Maildir"
#: Accounts in [MIN_UID, MAX_UID] receive mail, plus root (login.defs UID_MIN / UID_MAX).
MIN_UID = 1000
MAX_UID = 60000

#: Where the daemon looks when neither C{--config} nor C{$MAILHUB_CONFIG} is given.
DEFAULT_CONFIG_FILE = "/etc/mailhub/mailhub.toml"
#: The environment variable naming a configuration file.
ENV_VAR = "MAILHUB_CONFIG"
#: Data directory of the embedded defaults, relative to the working directory.
DEFAULT_DATA_DIR = "mailhub-data"

#: How errors name overrides given on the command line.
OVERRIDES_SOURCE = "command line"
#: How errors name the embedded defaults.
DEFAULTS_SOURCE = "embedded defaults"


class ConfigError(Exception):
    """
    The configuration cannot be used.  C{str(error)} is one line naming the
    file (or C{command line}) and the key.
    """


@dataclass(frozen=True)
class ServerConfig:
    hostname: str  # default socket.getfqdn()
    smtp: tuple[str, ...] = ("tcp:8025:interface=127.0.0.1",)
    max_message_size: int = 10240000  # bytes, Postfix message_size_limit
    max_recipients: int = 1000  # Postfix smtpd_recipient_limit
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    timeout: float = 300.0  # idle timeout, seconds
    starttls_timeout: float = 300.0  # a TLS handshake (STARTTLS, smtps) must end within; Postfix smtpd_starttls_timeout
    max_connections: int = 100  # all clients together
    max_connections_per_ip: int = 50  # Postfix smtpd_client_connection_count_limit
    max_errors: int = 20  # Postfix smtpd_hard_error_limit -> 421 and close
    soft_error_limit: int = 10  # Postfix smtpd_soft_error_limit
    max_hops: int = 50  # Received: fields that make a mail loop; 0 = off (Postfix hopcount_limit)
    min_data_rate: int = 500  # bytes/s in DATA/BDAT; 0 = off (Postfix smtpd_min_data_rate)
    vrfy: bool = True  # VRFY answers 252 (never reveals); False -> 502
    expn: bool = False  # EXPN 502 by default
    tls_cert: str | None = None  # PEM chain; with tls_key: STARTTLS offered
    tls_key: str | None = None
    submission: tuple[str, ...] = ()  # RFC 6409 listeners (STARTTLS, AUTH required)
    smtps: tuple[str, ...] = ()  # RFC 8314 implicit TLS listeners (plain endpoint strings)
    hide_client_ip: bool = False  # no client address in Received: for authenticated sessions
    # -- HTTP API, metrics, status page, event log (docs/http.rst)
    http: tuple[str, ...] = ()  # HTTP listeners; () = none
    http_max_body: int = 14680064  # bytes per request body (message_size_limit as base64 in JSON)
    http_admins: tuple[str, ...] = ()  # users that may list the whole queue and flush it
    http_header_timeout: float = 60.0  # seconds for a request's whole header (nginx client_header_timeout)
    http_request_timeout: float = 300.0  # seconds for a whole request, header and body
    http_max_connections: int = 100  # open HTTP connections, all clients together
    http_max_connections_per_ip: int = 50  # open HTTP connections from one address
    event_log: str | None = None  # JSON-lines event log; load() defaults it to <data_dir>/events.jsonl, "" = off
    event_log_max_size: int = 67108864  # bytes; the event log is rotated at this size; 0 = never
    event_log_keep: int = 3  # rotated event log files kept (events.jsonl.1 ... .N)
    mail_log: str | None = None  # mail lines to this file instead of twistd's log; None = off
    log_level: str = "info"  # debug, info, warn, error (mailhub/loglevel.py)
    # -- the user the daemon runs as once its ports are bound (docs/architecture.rst)
    user: str | None = None  # None: "mailhub" when started as root, else the current user


@dataclass(frozen=True)
class SpoolConfig:
    path: str  # default <data_dir>/spool
    fsync: bool = True
    min_free_space: int = 51200000  # bytes; below (or 1.5 x max_message_size) MAIL gets 452 4.3.1; 0 = off (Postfix queue_minfree)
    pickup_group: str | None = None  # only this group may submit (Postfix's postdrop); None: every local user


@dataclass(frozen=True)
class LocalConfig:
    domains: tuple[str, ...] = ("localhost",)
    mailboxes: str = ""  # default <data_dir>/mailboxes
    users: tuple[str, ...] | None = None  # addresses/local parts that exist without a directory entry
    aliases: str | None = None  # aliases(5) file path
    extension_separator: str = "+"  # "" disables address extensions
    # -- system mailboxes (docs/delivery.rst "System mailboxes")
    mode: str = "virtual"  # "virtual": DOMAIN/USER under mailboxes; "system": ~account/home_maildir
    home_maildir: str = DEFAULT_HOME_MAILDIR  # system mode: relative to the home directory
    min_uid: int = 1000  # system mode: accounts with a mailbox are root and min_uid..max_uid
    max_uid: int = 60000
    # Maildir delivery in this many processes of their own (mailhub.delivery.localproc);
    # 0: in the daemon's threads.  See docs/delivery.rst.
    delivery_processes: int = 1


@dataclass(frozen=True)
class RelayConfig:  # retry policy for ALL deliveries (local too)
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_queue_lifetime: float = 432000.0  # 5 days
    delay_warning: float = 0.0  # 0 = off
    concurrency: int = 100  # deliveries in flight, all destinations
    # -- outbound SMTP (remote.py / smtpclient.py); see docs/relay.rst
    smarthost: str | None = None  # next hop for every non-routed domain
    smarthost_user: str | None = None
    smarthost_password_file: str | None = None  # first line is the password
    routes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    dns_servers: tuple[str, ...] = ()  # () = system resolver
    port: int = 25
    tls: str = "may"  # none | may | encrypt | verify (smtp_tls_security_level)
    tls_ca_file: str | None = None  # for "verify"; None = system trust store
    helo_name: str | None = None  # None = server.hostname
    local_addresses: tuple[str, ...] = ()  # our public addresses, for loop detection
    destination_concurrency: int = 20  # default_destination_concurrency_limit
    connection_cache_time: float = 5.0  # smtp_connection_cache_time_limit
    connect_timeout: float = 30.0  # smtp_connect_timeout
    greeting_timeout: float = 300.0  # smtp_helo_timeout
    command_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_xfer_timeout: float = 180.0
    data_done_timeout: float = 600.0


@dataclass(frozen=True)
class AuthConfig:  # SMTP AUTH (docs/submission.rst)
    users: str | None = None  # users file; None: no AUTH offered
    allow_plaintext_loopback: bool = False  # AUTH without TLS from 127.0.0.0/8, ::1
    max_failures: int = 5  # per client IP within failure_window -> 421
    failure_window: float = 300.0
    failure_delay: float = 1.0  # every failed AUTH is answered this late


@dataclass(frozen=True)
class SubmissionConfig:
    sender_check: str = "strict"  # "strict": sender must belong to the user; "off"


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    spool: SpoolConfig
    local: LocalConfig
    relay: RelayConfig
    source: str | None  # the config file read, or None for embedded defaults
    auth: AuthConfig = AuthConfig()
    submission: SubmissionConfig = SubmissionConfig()


# -- finding the file ------------------------------------------------------------


def find_config_file(explicit: str | None) -> str | None:
    """
    Which configuration file to read: C{explicit} (C{--config FILE}) if
    given, else C{$MAILHUB_CONFIG} if set and non-empty, else
    L{DEFAULT_CONFIG_FILE} if it exists, else C{None} (embedded defaults).

    An explicit or environment path is returned even if it does not exist,
    so that L{load_config} reports it instead of silently using defaults.
    """
    if explicit:
        return explicit
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    if os.path.exists(DEFAULT_CONFIG_FILE):
        return DEFAULT_CONFIG_FILE
    return None


# -- value checkers ------------------------------------------------------------------
# Each takes the raw value and returns the typed value or raises _Bad(problem).


class _Bad(Exception):
    """A value problem, without the file and key (added by the caller)."""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise _Bad(f"must be a positive integer, got {_show(value)}")
    return value


def _delivery_processes(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise _Bad(f"must be a number of processes, 0 to {MAX_DELIVERY_PROCESSES} (0: deliver in the daemon's threads), got {_show(value)}")
    n = value
    if n > MAX_DELIVERY_PROCESSES:
        raise _Bad(f"must be at most {MAX_DELIVERY_PROCESSES} (0: deliver in the daemon's threads), got {value}")
    return n


#: More delivery processes than this only add memory (each is a Python process).
MAX_DELIVERY_PROCESSES = 32


def _non_negative_int(value: Any) -> int:
    """A count or rate where 0 switches the limit off."""
    if not _is_int(value) or value < 0:
        raise _Bad(f"must be a non-negative integer (0 disables), got {_show(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, got {_show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"must be a non-empty string, got {_show(value)}")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """
    Seconds from a number (C{300}, C{1.5}) or a Postfix-style string
    (C{"300s"}, C{"5m"}, C{"1h"}, C{"5d"}, C{"1w"}, C{"1h30m"}).

    @raise ValueError: anything else, or a negative number.
    """
    if _is_int(value) or isinstance(value, float):
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


def _duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise _Bad(
            f'must be a duration (seconds, or a string like "300s", "5m", "1h", "5d"), got {_show(value)}'
        )


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise _Bad(f"must be a positive duration, got {_show(value)}")
    return seconds


def _string_list(value: Any, what: str = "strings") -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f"must be a list of {what}, got {_show(value)}")
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
        endpoint = serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parser raises ValueError, TypeError, KeyError...
        hint = ""
        if "multiple values" in str(e) and "::" in description:
            hint = ' (escape colons in IPv6 addresses as "\\:")'
        if "invalid literal for int()" in str(e):
            raise ValueError(f"the port must be a number, got {str(e).rsplit(': ', 1)[-1]}")
        raise ValueError((str(e) or e.__class__.__name__) + hint)
    port = getattr(endpoint, "_port", None)
    if port is not None and _is_int(port) and not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    interface = getattr(endpoint, "_interface", None)
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"interface must be an IP address, got {interface!r}")


def _endpoints(value: Any) -> tuple[str, ...]:
    items = _optional_endpoints(value)
    if not items:
        raise _Bad("must list at least one endpoint")
    return items


def _networks(value: Any) -> tuple[str, ...]:
    items = _string_list(value, "networks")
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _Bad(f"invalid network {item!r} (want e.g. \"192.0.2.0/24\" or \"::1/128\")")
    return items


def _domain(value: Any) -> str:
    text = _string(value)
    try:
        return normalize_domain(text)
    except AddressError as e:
        raise _Bad(f"invalid domain {text!r}: {e}")


def _domains(value: Any) -> tuple[str, ...]:
    items = _string_list(value, "domains")
    out = []
    for item in items:
        try:
            out.append(normalize_domain(item))
        except AddressError as e:
            raise _Bad(f"invalid domain {item!r}: {e}")
    return tuple(out)


def _users(value: Any) -> tuple[str, ...]:
    items = _string_list(value, "user names or addresses")
    for item in items:
        if not item or any(c.isspace() for c in item):
            raise _Bad(f"invalid user {item!r}")
    return items


def _separator(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 1 or value in ("@",) or value.isspace() or value.isalnum():
        raise _Bad(f'must be "" or one punctuation character such as "+" or "-", got {_show(value)}')
    return value


def _admins(value: Any) -> tuple[str, ...]:
    """User addresses, normalised as the users file stores them (L{mailhub.users.normalize_user})."""
    from mailhub.address import parse_mailbox

    items = _string_list(value, "user addresses")
    out = []
    for item in items:
        try:
            if any(c in item for c in ':"\\') or any(c.isspace() for c in item):
                raise AddressError("invalid user address")
            mailbox = parse_mailbox(item)
        except AddressError:
            raise _Bad(f"invalid user address {item!r} (want e.g. \"root@example.org\")")
        out.append(f"{mailbox.local_key}@{mailbox.domain_key}")
    return tuple(out)


def _group(value: Any) -> str | None:
    """A Unix group name that must exist; C{""} means "not set"."""
    import grp

    text = _optional_string(value)
    if text is not None:
        try:
            grp.getgrnam(text)
        except KeyError:
            raise _Bad(f"no such group: {text!r}")
    return text


def _home_maildir(value: Any) -> str:

    text = _string(value)
    try:
        check_maildir_name(text)
    except ValueError as e:
        raise _Bad(str(e).replace("home_maildir ", "", 1))
    return text


def _uid(value: Any) -> int:
    if not _is_int(value) or not 0 < value < 2**32 - 1:
        raise _Bad(f"must be a user id 1-4294967294, got {_show(value)}")
    return value


#: local.mode values.
LOCAL_MODES = ("virtual", "system")
#: relay.tls values (Postfix smtp_tls_security_level).
TLS_LEVELS = ("none", "may", "encrypt", "verify")
#: submission.sender_check values.
SENDER_CHECKS = ("strict", "off")


def _port(value: Any) -> int:
    if not _is_int(value) or not 0 < value < 65536:
        raise _Bad(f"must be a port number 1-65535, got {_show(value)}")
    return value


def _optional_string(value: Any) -> str | None:
    """A string where C{""} means "not set" (as in the documented examples)."""
    if not isinstance(value, str):
        raise _Bad(f"must be a string, got {_show(value)}")
    return value or None


def _optional_endpoints(value: Any) -> tuple[str, ...]:
    items = _string_list(value, "endpoint strings")
    for item in items:
        try:
            check_endpoint(item)
        except ValueError as e:
            raise _Bad(f"invalid endpoint {item!r}: {e}")
    return items


def _plain_endpoints(value: Any) -> tuple[str, ...]:
    """Endpoints that mailhub wraps in TLS itself: C{ssl:} would bring its own certificate."""
    items = _string_list(value, "endpoint strings")
    for item in items:
        if item.split(":", 1)[0].strip().lower() in ("ssl", "tls", "le", "lets"):
            raise _Bad(
                f"invalid endpoint {item!r}: give a plain endpoint (tcp:465...); "
                "mailhub adds TLS with server.tls_cert / server.tls_key"
            )
    return _optional_endpoints(value)


def _nexthop(value: Any) -> str | None:
    from mailhub.relay.nexthop import parse_nexthop

    if not isinstance(value, str):
        raise _Bad(f'must be a next hop string like "[smtp.example.net]:587", got {_show(value)}')
    try:
        parse_nexthop(value)
    except ValueError as e:
        raise _Bad(str(e))
    return value.strip() or None


def _routes(value: Any) -> Mapping[str, str]:
    from mailhub.relay.nexthop import parse_nexthop

    if not isinstance(value, dict):
        raise _Bad(f'must be a table of domain = "next hop", got {_show(value)}')
    out: dict[str, str] = {}
    for key, target in value.items():
        dot = "." if key.startswith(".") else ""
        try:
            domain = dot + normalize_domain(key[len(dot):])
        except AddressError as e:
            raise _Bad(f"invalid domain {key!r}: {e}")
        if not isinstance(target, str):
            raise _Bad(f'{key!r}: must be a next hop string like "[host]:25" or "", got {_show(target)}')
        try:
            parse_nexthop(target)
        except ValueError as e:
            raise _Bad(f"{key!r}: {e}")
        out[domain] = target.strip()
    return MappingProxyType(out)


def _dns_servers(value: Any) -> tuple[str, ...]:
    from mailhub.relay.nexthop import parse_dns_server

    items = _string_list(value, 'DNS servers ("ip", "ip:port", "[ipv6]:port")')
    for item in items:
        try:
            parse_dns_server(item)
        except ValueError as e:
            raise _Bad(str(e))
    return items


def _ip_addresses(value: Any) -> tuple[str, ...]:
    items = _string_list(value, "IP addresses")
    for item in items:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            raise _Bad(f"invalid IP address {item!r}")
    return items


def _choice(*allowed: str) -> _Checker:
    def check(value: Any) -> str:
        if value not in allowed:
            raise _Bad(f"must be one of {', '.join(repr(a) for a in allowed)}, got {_show(value)}")
        return value

    return check


def _sender_check(value: Any) -> str:
    # "none" is how docs/submission.rst first spelled "off"; both are accepted.
    if value == "none":
        return "off"
    return _choice(*SENDER_CHECKS)(value)


#: section -> key -> (checker, is_path).  Paths are made absolute relative
#: to the directory of the file that set them.
_Checker = Callable[[Any], Any]
_SCHEMA: dict[str, dict[str, tuple[_Checker, bool]]] = {
    "server": {
        "hostname": (_domain, False),
        "smtp": (_endpoints, False),
        "max_message_size": (_positive_int, False),
        "max_recipients": (_positive_int, False),
        "trusted_networks": (_networks, False),
        "timeout": (_positive_duration, False),
        "starttls_timeout": (_positive_duration, False),
        "max_connections": (_positive_int, False),
        "max_connections_per_ip": (_positive_int, False),
        "max_errors": (_positive_int, False),
        "soft_error_limit": (_positive_int, False),
        "max_hops": (_non_negative_int, False),
        "min_data_rate": (_non_negative_int, False),
        "vrfy": (_boolean, False),
        "expn": (_boolean, False),
        "tls_cert": (_string, True),
        "tls_key": (_string, True),
        "submission": (_optional_endpoints, False),
        "smtps": (_plain_endpoints, False),
        "hide_client_ip": (_boolean, False),
        "http": (_optional_endpoints, False),
        "http_max_body": (_positive_int, False),
        "http_admins": (_admins, False),
        "http_header_timeout": (_positive_duration, False),
        "http_request_timeout": (_positive_duration, False),
        "http_max_connections": (_positive_int, False),
        "http_max_connections_per_ip": (_positive_int, False),
        "event_log": (_optional_string, True),
        "event_log_max_size": (_non_negative_int, False),
        "event_log_keep": (_non_negative_int, False),
        "mail_log": (_optional_string, True),
        "log_level": (_choice("debug", "info", "warn", "error"), False),
        "user": (_optional_string, False),
    },
    "spool": {
        "path": (_string, True),
        "fsync": (_boolean, False),
        "min_free_space": (_non_negative_int, False),
        "pickup_group": (_group, False),
    },
    "local": {
        "domains": (_domains, False),
        "mailboxes": (_string, True),
        "users": (_users, False),
        "aliases": (_string, True),
        "extension_separator": (_separator, False),
        "mode": (_choice(*LOCAL_MODES), False),
        "home_maildir": (_home_maildir, False),
        "min_uid": (_uid, False),
        "max_uid": (_uid, False),
        "delivery_processes": (_delivery_processes, False),
    },
    "relay": {
        "min_backoff": (_positive_duration, False),
        "max_backoff": (_positive_duration, False),
        "max_queue_lifetime": (_positive_duration, False),
        "delay_warning": (_duration, False),
        "concurrency": (_positive_int, False),
        "smarthost": (_nexthop, False),
        "smarthost_user": (_optional_string, False),
        "smarthost_password_file": (_string, True),
        "routes": (_routes, False),
        "dns_servers": (_dns_servers, False),
        "port": (_port, False),
        "tls": (_choice(*TLS_LEVELS), False),
        "tls_ca_file": (_optional_string, True),
        "helo_name": (_optional_string, False),
        "local_addresses": (_ip_addresses, False),
        "destination_concurrency": (_positive_int, False),
        "connection_cache_time": (_duration, False),
        "connect_timeout": (_positive_duration, False),
        "greeting_timeout": (_positive_duration, False),
        "command_timeout": (_positive_duration, False),
        "data_init_timeout": (_positive_duration, False),
        "data_xfer_timeout": (_positive_duration, False),
        "data_done_timeout": (_positive_duration, False),
    },
    "auth": {
        "users": (_string, True),
        "allow_plaintext_loopback": (_boolean, False),
        "max_failures": (_positive_int, False),
        "failure_window": (_positive_duration, False),
        "failure_delay": (_duration, False),
    },
    "submission": {
        "sender_check": (_sender_check, False),
    },
}
#: Top-level keys that are not sections.
_TOP_KEYS = {"data_dir": (_string, True)}


# -- loading ----------------------------------------------------------------------


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8: {e}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}")


def _check_value(source: str, base: str, key: str, checker: _Checker, is_path: bool, raw: Any) -> Any:
    try:
        value = checker(raw)
    except _Bad as e:
        raise ConfigError(f"{source}: {key}: {e}")
    if is_path and value is not None:
        value = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
    return value


def _collect(source: str, base: str, data: Mapping[str, Any], into: dict[str, dict[str, Any]], top: dict[str, Any]) -> None:
    """Check the tables of one file into C{into[section][key]}."""
    for name, value in data.items():
        if name in _TOP_KEYS:
            checker, is_path = _TOP_KEYS[name]
            top[name] = _check_value(source, base, name, checker, is_path, value)
            continue
        if name not in _SCHEMA:
            raise ConfigError(
                f"{source}: {name}: unknown section or key (known: {', '.join(sorted([*_SCHEMA, *_TOP_KEYS]))})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name}: must be a table ([{name}]), got {_show(value)}")
        schema = _SCHEMA[name]
        for key, raw in value.items():
            dotted = f"{name}.{key}"
            if key not in schema:
                raise ConfigError(f"{source}: {dotted}: unknown key (known: {', '.join(schema)})")
            checker, is_path = schema[key]
            into[name][key] = _check_value(source, base, dotted, checker, is_path, raw)


def _overrides_as_tables(overrides: Mapping[str, Any]) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        if "." not in dotted:
            tables[dotted] = value
            continue
        section, key = dotted.split(".", 1)
        table = tables.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{OVERRIDES_SOURCE}: {section}: must be a table")
        if isinstance(value, tuple):
            value = list(value)
        table[key] = value
    return tables


def load_config(
    path: str | None,
    overrides: Mapping[str, Any] | None = None,
    data_dir: str | None = None,
    check_files: bool = False,
) -> Config:
    """
    Read and validate the configuration.

    @param path: the file to read (see L{find_config_file}), or C{None} for
        the embedded defaults.
    @param overrides: values from the command line, by dotted key
        (C{{"server.smtp": ["tcp:2525"]}}); they win over the file.  Relative
        paths in them are relative to the working directory.
    @param data_dir: the data directory (C{--data}); wins over the file's
        top-level C{data_dir}.  C{spool.path} defaults to C{DATA/spool} and
        C{local.mailboxes} to C{DATA/mailboxes}, unless set explicitly.
    @param check_files: also read the files the configuration names for
        the daemon: load the TLS certificate and key, read the smarthost
        password file, check that C{relay.tls_ca_file} is readable.  The
        daemon and C{mailhub check-config} pass C{True}; the tools any user
        runs (C{mailhub-sendmail}, C{mailhub queue}) leave it off, since
        they need none of these and must not fail on root-only secrets.
    @raise ConfigError: one line naming the file and the key.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in _SCHEMA}
    top: dict[str, Any] = {}
    cwd = os.getcwd()
    source = path
    if path is not None:
        data = _read_file(path)
        base = os.path.dirname(os.path.abspath(path))
        _collect(path, base, data, values, top)
    if overrides:
        _collect(OVERRIDES_SOURCE, cwd, _overrides_as_tables(overrides), values, top)
    if data_dir is not None:
        top["data_dir"] = _check_value(OVERRIDES_SOURCE, cwd, "data_dir", _string, True, data_dir)
    where = source if source is not None else DEFAULTS_SOURCE

    data_root = top.get("data_dir") or os.path.abspath(os.path.join(cwd, DEFAULT_DATA_DIR))
    server = dict(values["server"])
    server.setdefault("hostname", socket.getfqdn())
    server.setdefault("event_log", os.path.join(data_root, "events.jsonl"))
    spool = dict(values["spool"])
    spool.setdefault("path", os.path.join(data_root, "spool"))
    local = dict(values["local"])
    local.setdefault("mailboxes", os.path.join(data_root, "mailboxes"))
    relay = dict(values["relay"])

    _check_local(where, local)
    _readable_file(where, "local.aliases", local.get("aliases"))
    relay_cfg = RelayConfig(**relay)
    if relay_cfg.min_backoff > relay_cfg.max_backoff:
        raise ConfigError(
            f"{where}: relay.min_backoff: must not exceed relay.max_backoff "
            f"({relay_cfg.min_backoff:g}s > {relay_cfg.max_backoff:g}s)"
        )
    _check_relay(where, relay_cfg, check_files)
    server_cfg = ServerConfig(**server)
    auth_cfg = AuthConfig(**values["auth"])
    _check_listeners(where, server_cfg, auth_cfg, check_files)
    if check_files:
        _creatable_dir(where, "spool.path", spool["path"])
        _creatable_dir(where, "local.mailboxes", local["mailboxes"])
        if server_cfg.event_log == os.path.join(data_root, "events.jsonl") and not os.path.isdir(data_root):
            _creatable_dir(where, "data_dir", data_root)  # the daemon creates it, then the log
        else:
            _writable_log(where, "server.event_log", server_cfg.event_log)
        _writable_log(where, "server.mail_log", server_cfg.mail_log)
    return Config(
        server=server_cfg,
        spool=SpoolConfig(**spool),
        local=LocalConfig(**local),
        relay=relay_cfg,
        source=os.path.abspath(path) if path is not None else None,
        auth=auth_cfg,
        submission=SubmissionConfig(**values["submission"]),
    )


def _check_local(where: str, local: dict[str, Any]) -> None:
    """
    System mode: no C{users} (the accounts are the users), a sane uid
    range, and C{/etc/aliases} as the aliases file when none is set and it
    exists (as Postfix's C{alias_maps} default).
    """

    if local.get("min_uid", MIN_UID) > local.get("max_uid", MAX_UID):
        raise ConfigError(
            f"{where}: local.min_uid: must not exceed local.max_uid "
            f"({local.get('min_uid', MIN_UID)} > {local.get('max_uid', MAX_UID)})"
        )
    if local.get("mode", "virtual") != "system":
        return
    if local.get("users") is not None:
        raise ConfigError(f'{where}: local.users: cannot be used with local.mode = "system" (the accounts are the users)')
    if local.get("aliases") is None and os.path.isfile(DEFAULT_ALIASES):
        local["aliases"] = DEFAULT_ALIASES


def _readable_file(where: str, key: str, path: str | None) -> None:
    if path is None:
        return
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"{where}: {key}: not a regular file {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: {key}: no such file {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: {key}: cannot read {path}")


def _creatable_dir(where: str, key: str, path: str) -> None:
    """
    The daemon creates C{path} with its missing parents (os.makedirs): it
    must be a directory already, or the nearest existing ancestor must be.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: {key}: not a directory {path}")
        return
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"{where}: {key}: cannot create {path}: {ancestor} is not a directory")


def _writable_log(where: str, key: str, path: str | None) -> None:
    """The event log is opened for appending (and created) in an existing directory."""
    if path is None:
        return
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise ConfigError(f"{where}: {key}: not a regular file {path}")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{where}: {key}: cannot write {path}")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{where}: {key}: no such directory {parent}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{where}: {key}: cannot create {path}: directory {parent} is not writable")


def _check_relay(where: str, relay: RelayConfig, check_files: bool) -> None:
    """Checks that involve more than one relay key (single values are checked already)."""
    if relay.helo_name is not None:
        try:
            normalize_domain(relay.helo_name)
        except AddressError as e:
            raise ConfigError(f"{where}: relay.helo_name: invalid domain {relay.helo_name!r}: {e}")
    if (relay.smarthost_user is None) != (relay.smarthost_password_file is None):
        missing = "relay.smarthost_password_file" if relay.smarthost_password_file is None else "relay.smarthost_user"
        have = "relay.smarthost_user" if relay.smarthost_password_file is None else "relay.smarthost_password_file"
        raise ConfigError(f"{where}: {have}: needs {missing} too")
    if relay.smarthost_user is not None and relay.smarthost is None:
        raise ConfigError(f"{where}: relay.smarthost_user: credentials are only used for relay.smarthost, which is not set")
    if not check_files:
        return
    _readable_file(where, "relay.smarthost_password_file", relay.smarthost_password_file)
    if relay.smarthost_password_file is not None:
        read_secret(relay.smarthost_password_file, where, "relay.smarthost_password_file")
    _readable_file(where, "relay.tls_ca_file", relay.tls_ca_file)


def _check_listeners(where: str, server: ServerConfig, auth: AuthConfig, check_files: bool) -> None:
    """TLS files load, and submission listeners have what they need."""
    if (server.tls_cert is None) != (server.tls_key is None):
        have, missing = ("server.tls_cert", "server.tls_key") if server.tls_key is None else ("server.tls_key", "server.tls_cert")
        raise ConfigError(f"{where}: {have}: needs {missing} too (both or neither)")
    if server.tls_cert is not None and check_files:
        from mailhub.tls import ServerTLS

        try:
            ServerTLS(server.tls_cert, server.tls_key)  # type: ignore[arg-type]
        except ValueError as e:  # names the file
            key = "server.tls_key" if server.tls_key and server.tls_key in str(e) else "server.tls_cert"
            raise ConfigError(f"{where}: {key}: {e}")
    for key in ("submission", "smtps"):
        if getattr(server, key) and server.tls_cert is None:
            raise ConfigError(f"{where}: server.{key}: needs server.tls_cert and server.tls_key")
        if getattr(server, key) and auth.users is None:
            raise ConfigError(f"{where}: server.{key}: needs auth.users (AUTH is required there)")


def read_secret(path: str, where: str | None = None, key: str = "relay.smarthost_password_file") -> str:
    """
    The first line of a secret file (a password), without its line end.
    Secrets live in their own files so the configuration file can stay
    world-readable (mailhub-sendmail reads it).

    @raise ConfigError: the file cannot be read or its first line is empty.
    """
    where = where or path
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError as e:
        raise ConfigError(f"{where}: {key}: cannot read {path}: {e.strerror or e}")
    text = first.rstrip(b"\r\n")
    if not text:
        raise ConfigError(f"{where}: {key}: the first line of {path} is empty")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {key}: {path} is not UTF-8")


# -- showing ------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def format_config(config: Config) -> str:
    """
    The effective configuration as TOML, every key, for C{mailhub
    check-config}.  Keys whose value is unset are shown as comments.
    """
    lines = [f"# source: {config.source or DEFAULTS_SOURCE}"]
    for section in ("server", "spool", "local", "relay", "auth", "submission"):
        lines.append("")
        lines.append(f"[{section}]")
        part = getattr(config, section)
        for f in fields(part):
            value = getattr(part, f.name)
            if value is None:
                lines.append(f"# {f.name} is not set")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


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
