"""
Configuration keys: the frozen dataclasses, one field per key.

Owns: every configuration key, each written once, as one dataclass field
made by L{key}: its type, its default and, in the field's C{metadata}, the
checker of its values (L{mailhub.configcheck}), whether it is a path (made
absolute relative to the file that sets it) and, for the keys whose
default lives in the data directory, the name below it.  From these
fields come L{SCHEMA} and L{TOP_KEYS} (what the loader accepts, in field
order), the sections of a L{Config}, and the defaults that
docs/configuration.rst must show (tests/test_config_docs.py compares
them).  Also the constants other modules share with the keys
(L{DEFAULT_HOME_MAILDIR}, L{MIN_UID}, L{MAX_UID}, L{DEFAULT_DATA_DIR}).

Must not touch: files, the environment, the reactor.  Reading and merging
files and overrides and the rules that involve more than one key belong to
L{mailhub.config}, which is also the import point for everything here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any, get_type_hints

from mailhub import configcheck as check

__all__ = [
    "key",
    "ServerConfig",
    "SpoolConfig",
    "LocalConfig",
    "RelayConfig",
    "AuthConfig",
    "SubmissionConfig",
    "MilterConfig",
    "MILTER_KEYS",
    "LimitsConfig",
    "DKIMConfig",
    "MailAuthConfig",
    "HistoryConfig",
    "TopLevel",
    "Config",
    "SECTIONS",
    "SCHEMA",
    "TOP_KEYS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOME_MAILDIR",
    "MIN_UID",
    "MAX_UID",
    "data_dir_defaults",
    "key_field",
]

#: Data directory of the embedded defaults, relative to the working directory.
DEFAULT_DATA_DIR = "mailhub-data"
#: The Maildir below each home directory (Postfix C{home_mailbox = Maildir/}).
DEFAULT_HOME_MAILDIR = "Maildir"
#: Accounts in [MIN_UID, MAX_UID] receive mail, plus root (login.defs UID_MIN / UID_MAX).
MIN_UID = 1000
MAX_UID = 60000


def key(
    default: Any = MISSING,
    checker: check.Checker | None = None,
    *,
    path: bool = False,
    factory: Callable[[], Any] | None = None,
    data_dir: str | None = None,
) -> Any:
    """
    One configuration key: a dataclass field.

    @param default: the default value (none: the field is required when the
        dataclass is built by hand; the loader fills it in).
    @param checker: turns the raw TOML value into the field's value.
    @param path: the value is a path, made absolute relative to the
        directory of the file that set it.
    @param factory: builds the default (for a mapping).
    @param data_dir: the default is this name inside the data directory
        (docs: C{DATA/name}); the loader fills it in.
    """
    if checker is None:
        raise TypeError("a configuration key needs a checker")
    metadata = {"check": checker, "path": path, "data_dir": data_dir}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = key(checker=check.domain)  # the loader's default: config.default_hostname()
    smtp: tuple[str, ...] = key(("tcp:8025:interface=127.0.0.1",), check.endpoints)
    max_message_size: int = key(10240000, check.positive_int)  # bytes, Postfix message_size_limit
    max_recipients: int = key(1000, check.positive_int)  # Postfix smtpd_recipient_limit
    trusted_networks: tuple[str, ...] = key(("127.0.0.0/8", "::1/128"), check.networks)
    timeout: float = key(300.0, check.positive_duration)  # idle timeout, seconds
    # a TLS handshake (STARTTLS, smtps) must end within; Postfix smtpd_starttls_timeout
    starttls_timeout: float = key(300.0, check.positive_duration)
    max_connections: int = key(100, check.positive_int)  # all clients together
    max_connections_per_ip: int = key(50, check.positive_int)  # Postfix smtpd_client_connection_count_limit
    max_errors: int = key(20, check.positive_int)  # Postfix smtpd_hard_error_limit -> 421 and close
    soft_error_limit: int = key(10, check.positive_int)  # Postfix smtpd_soft_error_limit
    # Received: fields that make a mail loop; 0 = off (Postfix hopcount_limit)
    max_hops: int = key(50, check.non_negative_int)
    min_data_rate: int = key(500, check.non_negative_int)  # bytes/s in DATA/BDAT; 0 = off (Postfix smtpd_min_data_rate)
    vrfy: bool = key(True, check.boolean)  # VRFY answers 252 (never reveals); False -> 502
    expn: bool = key(False, check.boolean)  # EXPN 502 by default
    tls_cert: str | None = key(None, check.string, path=True)  # PEM chain; with tls_key: STARTTLS offered
    tls_key: str | None = key(None, check.string, path=True)
    submission: tuple[str, ...] = key((), check.optional_endpoints)  # RFC 6409 listeners (STARTTLS, AUTH required)
    smtps: tuple[str, ...] = key((), check.plain_endpoints)  # RFC 8314 implicit TLS listeners (plain endpoint strings)
    hide_client_ip: bool = key(False, check.boolean)  # no client address in Received: for authenticated sessions
    # -- HTTP API, metrics, status page, event log (docs/http.rst)
    http: tuple[str, ...] = key((), check.optional_endpoints)  # HTTP listeners; () = none
    http_max_body: int = key(14680064, check.positive_int)  # bytes per request body (message_size_limit as base64 in JSON)
    http_admins: tuple[str, ...] = key((), check.admins)  # users that may list the whole queue and flush it
    # seconds for a request's whole header (nginx client_header_timeout)
    http_header_timeout: float = key(60.0, check.positive_duration)
    http_request_timeout: float = key(300.0, check.positive_duration)  # seconds for a whole request, header and body
    http_max_connections: int = key(100, check.positive_int)  # open HTTP connections, all clients together
    http_max_connections_per_ip: int = key(50, check.positive_int)  # open HTTP connections from one address
    # JSON-lines event log; "" = off
    event_log: str | None = key(None, check.optional_string, path=True, data_dir="events.jsonl")
    event_log_max_size: int = key(67108864, check.non_negative_int)  # bytes; rotated at this size; 0 = never
    event_log_keep: int = key(3, check.non_negative_int)  # rotated event log files kept (events.jsonl.1 ... .N)
    mail_log: str | None = key(None, check.optional_string, path=True)  # mail lines to this file; None = twistd's log
    log_level: str = key("info", check.choice(*check.LOG_LEVELS))  # mailhub/loglevel.py
    # -- the user the daemon runs as once its ports are bound (docs/architecture.rst)
    user: str | None = key(None, check.optional_string)  # None: "mailhub" when started as root, else the current user
    # SMTP sessions in this many acceptor processes; "auto": one per CPU; 1: in the daemon itself
    processes: str | int = key("auto", check.processes)
    # -- PROXY protocol (docs/ratelimits.rst): connections from these networks must start with a PROXY header
    proxy_from: tuple[str, ...] = key((), check.networks)
    proxy_timeout: float = key(10.0, check.positive_duration)  # seconds for the PROXY header to arrive


@dataclass(frozen=True)
class SpoolConfig:
    path: str = key(checker=check.string, path=True, data_dir="spool")
    fsync: bool = key(True, check.boolean)
    # bytes; below (or 1.5 x max_message_size) MAIL gets 452 4.3.1; 0 = off (Postfix queue_minfree)
    min_free_space: int = key(51200000, check.non_negative_int)
    # only this group may submit (Postfix's postdrop); None: every local user
    pickup_group: str | None = key(None, check.group)
    # "fsync": each file and its directory; "syncfs": one syncfs() of the file system per batch (docs/spool.rst)
    sync: str = key("fsync", check.sync_mode)


@dataclass(frozen=True)
class LocalConfig:
    domains: tuple[str, ...] = key(("localhost",), check.domains)
    mailboxes: str = key("", check.string, path=True, data_dir="mailboxes")
    # addresses/local parts that exist without a directory entry
    users: tuple[str, ...] | None = key(None, check.users)
    aliases: str | None = key(None, check.string, path=True)  # aliases(5) file path
    extension_separator: str = key("+", check.separator)  # "" disables address extensions
    # -- system mailboxes (docs/delivery.rst "System mailboxes")
    # "virtual": DOMAIN/USER under mailboxes; "system": ~account/home_maildir
    mode: str = key("virtual", check.choice(*check.LOCAL_MODES))
    home_maildir: str = key(DEFAULT_HOME_MAILDIR, check.home_maildir)  # system mode: relative to the home directory
    min_uid: int = key(MIN_UID, check.uid)  # system mode: accounts with a mailbox are root and min_uid..max_uid
    max_uid: int = key(MAX_UID, check.uid)
    # Maildir delivery in this many processes of their own (mailhub.delivery.localproc);
    # 0: in the daemon's threads.  See docs/delivery.rst.
    delivery_processes: int = key(1, check.delivery_processes)
    # "maildir" (written here), "lmtp:unix:/path" or "lmtp:inet:host:port" (docs/delivery.rst, LMTP)
    transport: str = key("maildir", check.local_transport)
    # all-local messages written into the Maildirs before the 250 (mailhub.delivery.direct)
    deliver_on_accept: bool = key(True, check.boolean)


@dataclass(frozen=True)
class RelayConfig:  # retry policy for ALL deliveries (local too)
    min_backoff: float = key(300.0, check.positive_duration)
    max_backoff: float = key(4000.0, check.positive_duration)
    max_queue_lifetime: float = key(432000.0, check.positive_duration)  # 5 days
    delay_warning: float = key(0.0, check.duration)  # 0 = off
    concurrency: int = key(100, check.positive_int)  # deliveries in flight, all destinations
    # -- outbound SMTP (mailhub.relay); see docs/relay.rst
    smarthost: str | None = key(None, check.nexthop)  # next hop for every non-routed domain
    smarthost_user: str | None = key(None, check.optional_string)
    smarthost_password_file: str | None = key(None, check.string, path=True)  # first line is the password
    routes: Mapping[str, str] = key(checker=check.routes, factory=lambda: MappingProxyType({}))
    dns_servers: tuple[str, ...] = key((), check.dns_servers)  # () = system resolver
    port: int = key(25, check.port)
    tls: str = key("may", check.choice(*check.TLS_LEVELS))  # smtp_tls_security_level
    tls_ca_file: str | None = key(None, check.optional_string, path=True)  # for "verify"; None = system trust store
    helo_name: str | None = key(None, check.optional_string)  # None = server.hostname
    local_addresses: tuple[str, ...] = key((), check.ip_addresses)  # our public addresses, for loop detection
    destination_concurrency: int = key(20, check.positive_int)  # default_destination_concurrency_limit
    connection_cache_time: float = key(5.0, check.duration)  # smtp_connection_cache_time_limit
    connect_timeout: float = key(30.0, check.positive_duration)  # smtp_connect_timeout
    greeting_timeout: float = key(300.0, check.positive_duration)  # smtp_helo_timeout
    command_timeout: float = key(300.0, check.positive_duration)
    data_init_timeout: float = key(120.0, check.positive_duration)
    data_xfer_timeout: float = key(180.0, check.positive_duration)
    data_done_timeout: float = key(600.0, check.positive_duration)
    # -- outbound TLS policies (mailhub.relay.tlspolicy); see docs/relay.rst
    mta_sts: bool = key(True, check.boolean)  # honour published MTA-STS policies (RFC 8461)
    dane: bool = key(True, check.boolean)  # DANE (RFC 7672) when the configured resolver is local and validates
    tls_policy: Mapping[str, str] = key(checker=check.tls_policy, factory=lambda: MappingProxyType({}))
    tls_reports: bool = key(False, check.boolean)  # send daily RFC 8460 TLS reports to the domains asking for them
    # MTA-STS policy cache and TLS report counts; None: SPOOL/tls
    tls_state: str | None = key(None, check.optional_string, path=True)


@dataclass(frozen=True)
class AuthConfig:  # SMTP AUTH (docs/submission.rst)
    users: str | None = key(None, check.string, path=True)  # users file; None: no AUTH offered
    allow_plaintext_loopback: bool = key(False, check.boolean)  # AUTH without TLS from 127.0.0.0/8, ::1
    max_failures: int = key(5, check.positive_int)  # per client IP within failure_window -> 421
    failure_window: float = key(300.0, check.positive_duration)
    failure_delay: float = key(1.0, check.duration)  # every failed AUTH is answered this late


@dataclass(frozen=True)
class SubmissionConfig:
    sender_check: str = key("strict", check.sender_check)  # "strict": sender must belong to the user; "off"


@dataclass(frozen=True)
class MilterConfig:  # one [[milter]] table (docs/milter.rst); the tables apply in order
    socket: str = key(checker=check.socket_address)  # "unix:/path" or "inet:host:port"; required
    # when the milter is down, too slow or breaks the protocol (Postfix milter_default_action)
    default_action: str = key("tempfail", check.choice(*check.MILTER_ACTIONS))
    connect_timeout: float = key(30.0, check.positive_duration)  # Postfix milter_connect_timeout
    command_timeout: float = key(30.0, check.positive_duration)  # each SMTP stage; milter_command_timeout
    content_timeout: float = key(300.0, check.positive_duration)  # body and end of message; milter_content_timeout
    listeners: tuple[str, ...] = key(check.SMTP_LISTENERS, check.smtp_listeners)  # the listeners it filters


#: The keys of a [[milter]] table: key -> (checker, is_path).
MILTER_KEYS: dict[str, tuple[check.Checker, bool]] = {}


@dataclass(frozen=True)
class LimitsConfig:  # rate limits (docs/ratelimits.rst); 0 = no limit
    client_connections_per_min: int = key(0, check.non_negative_int)  # per client address
    client_messages_per_min: int = key(0, check.non_negative_int)  # MAIL commands per client address
    client_recipients_per_min: int = key(0, check.non_negative_int)  # RCPT commands per client address
    user_messages_per_hour: int = key(0, check.non_negative_int)  # per authenticated SMTP user
    user_recipients_per_hour: int = key(0, check.non_negative_int)
    token_messages_per_hour: int = key(0, check.non_negative_int)  # per HTTP API token
    token_recipients_per_hour: int = key(0, check.non_negative_int)
    domain_messages_per_sec: int = key(0, check.non_negative_int)  # relay transactions per domain
    exempt_networks: tuple[str, ...] = key((), check.networks)  # no per-address limits for these clients
    redis: str | None = key(None, check.redis_url)  # counters shared in Redis; None: in memory
    redis_timeout: float = key(1.0, check.positive_duration)  # seconds per Redis command
    redis_failure: str = key("open", check.choice(*check.REDIS_FAILURES))  # Redis down: "open" or "closed"


@dataclass(frozen=True)
class DKIMConfig:  # DKIM signing (docs/authentication.rst)
    keys: str | None = key(None, check.optional_string, path=True)  # KEYS/DOMAIN/SELECTOR.key; None: no signing
    sign_subdomains: bool = key(False, check.boolean)  # a subdomain without keys uses its parent's


@dataclass(frozen=True)
class MailAuthConfig:  # SPF/DKIM/DMARC checks of inbound mail (docs/authentication.rst)
    verify: bool = key(False, check.boolean)  # check mail from untrusted clients, add Authentication-Results
    authserv_id: str | None = key(None, check.optional_string)  # None: server.hostname
    dmarc_enforce: bool = key(False, check.boolean)  # p=reject -> 550 5.7.1, p=quarantine -> header
    temperror: str = key("accept", check.choice("accept", "defer"))  # DNS trouble: mark and accept, or 451 4.7.0
    spf_reject: bool = key(False, check.boolean)  # SPF fail (-all) -> 550 5.7.23 at the end of DATA
    dns_timeout: float = key(10.0, check.positive_duration)  # seconds per query
    threads: int = key(4, check.positive_int)  # worker threads for checks and signing


@dataclass(frozen=True)
class HistoryConfig:  # docs/history.rst
    # a SQLite file, or postgresql://user@host:port/db shared by several nodes
    database: str = key(checker=check.string, path=True, data_dir="history.sqlite")
    enabled: bool = key(True, check.boolean)
    retention: float = key(2592000.0, check.duration)  # "30d"; 0 = kept for ever
    max_size: int = key(1073741824, check.non_negative_int)  # bytes; 0 = no cap
    interval: float = key(1.0, check.positive_duration)  # seconds between batches written


@dataclass(frozen=True)
class TopLevel:
    """The keys outside any section.  Not part of L{Config}: the loader uses them."""

    data_dir: str = key(DEFAULT_DATA_DIR, check.string, path=True)  # relative to the working directory


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    spool: SpoolConfig
    local: LocalConfig
    relay: RelayConfig
    source: str | None  # the config file read, or None for embedded defaults
    auth: AuthConfig = AuthConfig()
    submission: SubmissionConfig = SubmissionConfig()
    milters: tuple[MilterConfig, ...] = ()  # the [[milter]] tables, in order
    limits: LimitsConfig = LimitsConfig()
    dkim: DKIMConfig = DKIMConfig()
    mailauth: MailAuthConfig = MailAuthConfig()
    history: HistoryConfig = HistoryConfig(database="history.sqlite")


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if is_dataclass(hints[f.name])}


#: Section name -> its dataclass, in the order of L{Config}'s fields.
SECTIONS: dict[str, type] = _sections()


def _keys(cls: type) -> dict[str, tuple[check.Checker, bool]]:
    return {f.name: (f.metadata["check"], f.metadata["path"]) for f in fields(cls)}


#: section -> key -> (checker, is_path), in field order: what a file may
#: say.  Paths are made absolute relative to the directory of the file
#: that set them.
SCHEMA: dict[str, dict[str, tuple[check.Checker, bool]]] = {name: _keys(cls) for name, cls in SECTIONS.items()}
#: Top-level keys that are not sections.
TOP_KEYS: dict[str, tuple[check.Checker, bool]] = _keys(TopLevel)
MILTER_KEYS.update(_keys(MilterConfig))


def data_dir_defaults(cls: type) -> dict[str, str]:
    """The keys of section C{cls} whose default is a name in the data directory: key -> name."""
    return {f.name: f.metadata["data_dir"] for f in fields(cls) if f.metadata["data_dir"]}


def key_field(section: str, name: str) -> Field[Any]:
    """The dataclass field of key C{name} in C{section} (C{""}: top level)."""
    cls = MilterConfig if section == "milter" else SECTIONS[section] if section else TopLevel
    return {f.name: f for f in fields(cls)}[name]
