"""
Configuration: one TOML file turned into frozen, validated dataclasses.

Owns: finding the configuration file (C{--config FILE} > C{$MAILHUB_CONFIG}
> C{/etc/mailhub/mailhub.toml} > embedded defaults), reading it with
C{tomllib}, applying command-line overrides and the defaults that depend
on the data directory or the host, the rules that involve more than one
key, checking the files the daemon opens, and showing the effective
configuration (C{mailhub check-config}).  Every problem is a
L{ConfigError} whose message is one line naming the file and the key,
e.g.::

    /etc/mailhub/mailhub.toml: server.max_recipients: must be a positive integer, got -3

The keys themselves (type, default, checker) are the dataclass fields of
L{mailhub.configschema}; the checkers of single values are
L{mailhub.configcheck}.  This module is the import point for all of it:
other modules import L{Config}, L{load_config} and the constants from
here.

Must not touch: the reactor, the network, the spool or mailboxes.  This is
the only module that reads configuration files; everything else receives a
L{Config}.  See docs/configuration.rst for every key.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from mailhub.address import AddressError, normalize_domain
from mailhub.configcheck import (
    SENDER_CHECKS,
    BadValue,
    Checker,
    check_maildir_name,
    parse_duration,
    show,
)
from mailhub.configschema import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOME_MAILDIR,
    MAX_UID,
    MILTER_KEYS,
    MIN_UID,
    SCHEMA,
    SECTIONS,
    TOP_KEYS,
    AuthConfig,
    Config,
    DKIMConfig,
    HistoryConfig,
    LimitsConfig,
    LocalConfig,
    MailAuthConfig,
    MilterConfig,
    RelayConfig,
    ServerConfig,
    SpoolConfig,
    SubmissionConfig,
    data_dir_defaults,
)

__all__ = [
    "ConfigError",
    "check_maildir_name",
    "default_hostname",
    "ServerConfig",
    "SpoolConfig",
    "LocalConfig",
    "RelayConfig",
    "AuthConfig",
    "SubmissionConfig",
    "LimitsConfig",
    "HistoryConfig",
    "Config",
    "DEFAULT_ALIASES",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOME_MAILDIR",
    "DEFAULTS_SOURCE",
    "ENV_VAR",
    "MIN_UID",
    "MAX_UID",
    "find_config_file",
    "load_config",
    "format_config",
    "parse_duration",
    "read_secret",
    "SENDER_CHECKS",
]

#: aliases(5) file used in system mode when C{local.aliases} is not set and it exists.
DEFAULT_ALIASES = "/etc/aliases"
#: Where the daemon looks when neither C{--config} nor C{$MAILHUB_CONFIG} is given.
DEFAULT_CONFIG_FILE = "/etc/mailhub/mailhub.toml"
#: The environment variable naming a configuration file.
ENV_VAR = "MAILHUB_CONFIG"

#: How errors name overrides given on the command line.
OVERRIDES_SOURCE = "command line"
#: How errors name the embedded defaults.
DEFAULTS_SOURCE = "embedded defaults"


class ConfigError(Exception):
    """
    The configuration cannot be used.  C{str(error)} is one line naming the
    file (or C{command line}) and the key.
    """


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


def _check_value(source: str, base: str, key: str, checker: Checker, is_path: bool, raw: Any) -> Any:
    try:
        value = checker(raw)
    except BadValue as e:
        raise ConfigError(f"{source}: {key}: {e}")
    if is_path and value is not None and "://" not in value:  # a URL (history.database) is no path
        value = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
    return value


def _collect(source: str, base: str, data: Mapping[str, Any], into: dict[str, dict[str, Any]], top: dict[str, Any]) -> None:
    """Check the tables of one file into C{into[section][key]}."""
    for name, value in data.items():
        if name == "milter":
            top["milter"] = _milters(source, base, value)
            continue
        if name in TOP_KEYS:
            checker, is_path = TOP_KEYS[name]
            top[name] = _check_value(source, base, name, checker, is_path, value)
            continue
        if name not in SCHEMA:
            raise ConfigError(
                f"{source}: {name}: unknown section or key (known: {', '.join(sorted([*SCHEMA, *TOP_KEYS]))})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name}: must be a table ([{name}]), got {show(value)}")
        schema = SCHEMA[name]
        for key, raw in value.items():
            dotted = f"{name}.{key}"
            if key not in schema:
                raise ConfigError(f"{source}: {dotted}: unknown key (known: {', '.join(schema)})")
            checker, is_path = schema[key]
            into[name][key] = _check_value(source, base, dotted, checker, is_path, raw)


def _milters(source: str, base: str, value: Any) -> tuple[MilterConfig, ...]:
    """The [[milter]] tables of one file, in order (a later file's list replaces an earlier one's)."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{source}: milter: must be tables ([[milter]]), got {show(value)}")
    milters = []
    for n, table in enumerate(value, 1):
        checked = {}
        for key, raw in table.items():
            where = f"milter[{n}].{key}"
            if key not in MILTER_KEYS:
                raise ConfigError(f"{source}: {where}: unknown key (known: {', '.join(MILTER_KEYS)})")
            checked[key] = _check_value(source, base, where, *MILTER_KEYS[key], raw)
        if "socket" not in checked:
            raise ConfigError(f"{source}: milter[{n}]: socket is required")
        milters.append(MilterConfig(**checked))
    return tuple(milters)


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
    values: dict[str, dict[str, Any]] = {name: {} for name in SCHEMA}
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
        top["data_dir"] = _check_value(OVERRIDES_SOURCE, cwd, "data_dir", *TOP_KEYS["data_dir"], data_dir)
    where = source if source is not None else DEFAULTS_SOURCE

    data_root = top.get("data_dir") or os.path.abspath(os.path.join(cwd, DEFAULT_DATA_DIR))
    for name, cls in SECTIONS.items():
        for key, below in data_dir_defaults(cls).items():
            values[name].setdefault(key, os.path.join(data_root, below))
    server, spool, local, relay = values["server"], values["spool"], values["local"], values["relay"]
    server.setdefault("hostname", default_hostname())

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
        default_log = os.path.join(data_root, data_dir_defaults(ServerConfig)["event_log"])
        if server_cfg.event_log == default_log and not os.path.isdir(data_root):
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
        milters=top.get("milter", ()),
        limits=LimitsConfig(**values["limits"]),
        dkim=DKIMConfig(**values["dkim"]),
        mailauth=MailAuthConfig(**values["mailauth"]),
        history=HistoryConfig(**values["history"]),
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
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        part = getattr(config, section)
        for f in fields(part):
            value = getattr(part, f.name)
            if value is None:
                lines.append(f"# {f.name} is not set")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    for milter in config.milters:
        lines += ["", "[[milter]]"]
        lines += [f"{f.name} = {_toml_value(getattr(milter, f.name))}" for f in fields(milter)]
    return "\n".join(lines) + "\n"


def default_hostname() -> str:
    """
    The host's name for C{server.hostname}: its fully qualified name, or
    its plain host name where name resolution gives only C{localhost} (an
    /etc/hosts that lists C{127.0.0.1 localhost} first), as Postfix's
    C{myhostname} comes from C{gethostname()}.  A greeting, trace header or
    HELO saying C{localhost} is refused by many mail exchangers.
    """
    fqdn = socket.getfqdn()
    if fqdn.split(".", 1)[0] != "localhost":
        return fqdn
    name = socket.gethostname()
    return name if name and name.split(".", 1)[0] != "localhost" else fqdn
