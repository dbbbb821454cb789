"""
Tests for mailhub.config: defaults, every key, overrides, lookup order,
relative paths, and the exact one-line error for each kind of mistake.
"""

from __future__ import annotations

import os
import socket

import pytest

from mailhub import config as cfg
from mailhub.config import (
    Config,
    ConfigError,
    LocalConfig,
    RelayConfig,
    ServerConfig,
    SpoolConfig,
    find_config_file,
    format_config,
    load_config,
    parse_duration,
)


def write(tmp_path, text: str, name: str = "mailhub.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kwargs)
    return str(e.value)


# -- defaults -----------------------------------------------------------------------


def test_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    data = os.path.join(str(tmp_path), "mailhub-data")
    assert c == Config(
        server=ServerConfig(hostname=socket.getfqdn()),
        spool=SpoolConfig(path=os.path.join(data, "spool")),
        local=LocalConfig(mailboxes=os.path.join(data, "mailboxes")),
        relay=RelayConfig(),
        source=None,
    )
    assert c.server.smtp == ("tcp:8025:interface=127.0.0.1",)
    assert c.server.max_message_size == 10240000
    assert c.server.max_recipients == 1000
    assert c.server.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert c.server.timeout == 300.0
    assert (c.server.max_connections, c.server.max_connections_per_ip) == (100, 50)
    assert (c.server.max_errors, c.server.soft_error_limit) == (20, 10)
    assert (c.server.vrfy, c.server.expn) == (True, False)
    assert c.spool.fsync is True
    assert c.local.domains == ("localhost",)
    assert c.local.users is None and c.local.aliases is None
    assert c.local.extension_separator == "+"
    assert (c.relay.min_backoff, c.relay.max_backoff) == (300.0, 4000.0)
    assert c.relay.max_queue_lifetime == 5 * 86400
    assert c.relay.delay_warning == 0.0 and c.relay.concurrency == 100


def test_empty_file_is_defaults(tmp_path, monkeypatch):
    # the embedded default data directory is relative to the working directory
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write(tmp_path, "")
    c = load_config(path)
    assert c.source == path
    assert c.spool.path == str(work / "mailhub-data" / "spool")
    assert c.server == ServerConfig(hostname=socket.getfqdn())


FULL = """
data_dir = "/var/lib/mailhub"

[server]
hostname = "MX.Example.ORG"
smtp = ["tcp:25:interface=192.0.2.1", "tcp6:25:interface=\\\\:\\\\:1", "unix:/run/mailhub/smtp.sock"]
max_message_size = 52428800
max_recipients = 100
trusted_networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
timeout = "5m"
max_connections = 200
max_connections_per_ip = 10
max_errors = 5
soft_error_limit = 3
vrfy = false
expn = true

[spool]
path = "queue"
fsync = false

[local]
domains = ["Example.ORG", "bücher.example"]
mailboxes = "/srv/mail"
users = ["alice", "bob@example.org"]
aliases = "aliases"
extension_separator = "-"

[relay]
min_backoff = 60
max_backoff = "1h"
max_queue_lifetime = "2d"
delay_warning = "4h"
concurrency = 7
"""


def test_every_key(tmp_path):
    (tmp_path / "aliases").write_text("postmaster: alice\n")
    path = write(tmp_path, FULL)
    c = load_config(path)
    assert c.source == path
    assert c.server == ServerConfig(
        hostname="mx.example.org",
        smtp=("tcp:25:interface=192.0.2.1", "tcp6:25:interface=\\:\\:1", "unix:/run/mailhub/smtp.sock"),
        max_message_size=52428800,
        max_recipients=100,
        trusted_networks=("10.0.0.0/8", "2001:db8::/32", "192.0.2.7"),
        timeout=300.0,
        max_connections=200,
        max_connections_per_ip=10,
        max_errors=5,
        soft_error_limit=3,
        vrfy=False,
        expn=True,
    )
    # relative paths are relative to the file's directory
    assert c.spool == SpoolConfig(path=str(tmp_path / "queue"), fsync=False)
    assert c.local == LocalConfig(
        domains=("example.org", "xn--bcher-kva.example"),
        mailboxes="/srv/mail",
        users=("alice", "bob@example.org"),
        aliases=str(tmp_path / "aliases"),
        extension_separator="-",
    )
    assert c.relay == RelayConfig(
        min_backoff=60.0, max_backoff=3600.0, max_queue_lifetime=172800.0, delay_warning=14400.0, concurrency=7
    )


def test_data_dir_in_file_relative_to_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, 'data_dir = "../data"\n')
    c = load_config(path)
    assert c.spool.path == str(tmp_path / "data" / "spool")
    assert c.local.mailboxes == str(tmp_path / "data" / "mailboxes")


def test_data_dir_argument_wins_and_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, 'data_dir = "/elsewhere"\n[spool]\npath = "/explicit/spool"\n')
    c = load_config(path, data_dir="d")
    # an explicit spool.path stays; the mailbox root follows --data
    assert c.spool.path == "/explicit/spool"
    assert c.local.mailboxes == str(tmp_path / "d" / "mailboxes")


def test_overrides_win_over_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, '[server]\nsmtp = ["tcp:25"]\nmax_recipients = 5\n[local]\ndomains = ["a.example"]\n')
    c = load_config(
        path,
        {"server.smtp": ["tcp:2525:interface=127.0.0.1"], "local.domains": ("b.example",), "local.mailboxes": "mb"},
    )
    assert c.server.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert c.server.max_recipients == 5  # untouched key keeps the file's value
    assert c.local.domains == ("b.example",)
    assert c.local.mailboxes == str(tmp_path / "mb")  # override paths: relative to cwd


def test_overrides_none_ignored(tmp_path):
    c = load_config(None, {"server.hostname": None})
    assert c.server.hostname == socket.getfqdn()


@pytest.mark.parametrize(
    "text, seconds",
    [(300, 300.0), (1.5, 1.5), ("300s", 300.0), ("300", 300.0), ("5m", 300.0), ("1h", 3600.0),
     ("5d", 432000.0), ("1w", 604800.0), ("1h30m", 5400.0), (0, 0.0)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", [-1, "", "5x", "h", "-5s", True, [1], float("inf")])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


# -- errors: one line naming the file and the key ----------------------------------------

ERRORS = [
    ("[server]\nmax_recipients = -3\n", "server.max_recipients: must be a positive integer, got -3"),
    ("[server]\nmax_message_size = -1\n", "server.max_message_size: must be a positive integer, got -1"),
    ("[server]\nmax_message_size = 1.5\n", "server.max_message_size: must be a positive integer, got 1.5"),
    ('[server]\nmax_connections = "100"\n', "server.max_connections: must be a positive integer, got '100'"),
    ("[server]\nmax_connections_per_ip = 0\n", "server.max_connections_per_ip: must be a positive integer, got 0"),
    ("[server]\nmax_errors = true\n", "server.max_errors: must be a positive integer, got true"),
    ("[server]\nsoft_error_limit = -2\n", "server.soft_error_limit: must be a positive integer, got -2"),
    ('[server]\nvrfy = "yes"\n', "server.vrfy: must be true or false, got 'yes'"),
    ("[server]\nexpn = 1\n", "server.expn: must be true or false, got 1"),
    ("[server]\ntimeout = 0\n", "server.timeout: must be a positive duration, got 0"),
    (
        '[server]\ntimeout = "soon"\n',
        "server.timeout: must be a duration (seconds, or a string like \"300s\", \"5m\", \"1h\", \"5d\"), got 'soon'",
    ),
    ('[server]\nhostname = ""\n', "server.hostname: must be a non-empty string, got ''"),
    ('[server]\nhostname = "bad_host!"\n', "server.hostname: invalid domain 'bad_host!': invalid domain"),
    ('[server]\nsmtp = "tcp:25"\n', "server.smtp: must be a list of endpoint strings, got 'tcp:25'"),
    ("[server]\nsmtp = []\n", "server.smtp: must list at least one endpoint"),
    ('[server]\nsmtp = ["bogus:25"]\n', "server.smtp: invalid endpoint 'bogus:25': Unknown endpoint type: 'bogus'"),
    ('[server]\nsmtp = ["tcp:70000"]\n', "server.smtp: invalid endpoint 'tcp:70000': port 70000 out of range"),
    (
        '[server]\nsmtp = ["tcp:25:interface=localhost"]\n',
        "server.smtp: invalid endpoint 'tcp:25:interface=localhost': interface must be an IP address, got 'localhost'",
    ),
    (
        '[server]\ntrusted_networks = ["10.0.0.0/33"]\n',
        "server.trusted_networks: invalid network '10.0.0.0/33' (want e.g. \"192.0.2.0/24\" or \"::1/128\")",
    ),
    ('[server]\ntrusted_networks = "10.0.0.0/8"\n', "server.trusted_networks: must be a list of networks, got '10.0.0.0/8'"),
    ("[server]\nlisten = 25\n", "server.listen: unknown key (known: hostname, smtp, max_message_size, "
     "max_recipients, trusted_networks, timeout, max_connections, max_connections_per_ip, max_errors, "
     "soft_error_limit, vrfy, expn)"),
    ("[srever]\nsmtp = []\n", "srever: unknown section or key (known: data_dir, local, relay, server, spool)"),
    ("server = 1\n", "server: must be a table ([server]), got 1"),
    ('[spool]\npath = ""\n', "spool.path: must be a non-empty string, got ''"),
    ('[spool]\nfsync = "no"\n', "spool.fsync: must be true or false, got 'no'"),
    ('[local]\ndomains = ["ex ample.org"]\n', "local.domains: invalid domain 'ex ample.org': invalid domain"),
    ('[local]\ndomains = "example.org"\n', "local.domains: must be a list of domains, got 'example.org'"),
    ("[local]\nmailboxes = 5\n", "local.mailboxes: must be a non-empty string, got 5"),
    ('[local]\nusers = ["a b"]\n', "local.users: invalid user 'a b'"),
    (
        '[local]\nextension_separator = "++"\n',
        "local.extension_separator: must be \"\" or one punctuation character such as \"+\" or \"-\", got '++'",
    ),
    ("[relay]\nconcurrency = 0\n", "relay.concurrency: must be a positive integer, got 0"),
    ("[relay]\nmin_backoff = -5\n", "relay.min_backoff: must be a duration (seconds, or a string like \"300s\", "
     "\"5m\", \"1h\", \"5d\"), got -5"),
    ("[relay]\nmax_queue_lifetime = 0\n", "relay.max_queue_lifetime: must be a positive duration, got 0"),
    ('[relay]\ndelay_warning = "x"\n', "relay.delay_warning: must be a duration (seconds, or a string like \"300s\", "
     "\"5m\", \"1h\", \"5d\"), got 'x'"),
    ("[relay]\nmin_backoff = 5000\n", "relay.min_backoff: must not exceed relay.max_backoff (5000s > 4000s)"),
    ("data_dir = 3\n", "data_dir: must be a non-empty string, got 3"),
]


@pytest.mark.parametrize("text, expected", ERRORS)
def test_errors_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message == f"{path}: {expected}"
    assert "\n" not in message


def test_missing_aliases_file(tmp_path):
    path = write(tmp_path, '[local]\naliases = "nope"\n')
    assert error_of(path) == f"{path}: local.aliases: no such file {tmp_path / 'nope'}"


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    assert error_of(path) == f"{path}: cannot read: No such file or directory"


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        # root reads anything: use a directory, which open() cannot read either
        path = str(tmp_path / "dir.toml")
        os.mkdir(path)
        assert error_of(path) == f"{path}: cannot read: Is a directory"
    else:
        path = write(tmp_path, "")
        os.chmod(path, 0)
        assert error_of(path) == f"{path}: cannot read: Permission denied"


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[server\nsmtp = 1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 1" in message and "\n" not in message


def test_not_utf8(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(b"# \xff\n")
    assert error_of(str(path)).startswith(f"{path}: not UTF-8: ")


def test_override_errors_name_command_line():
    assert error_of(None, {"server.smtp": ["tcp:nope"]}) == (
        "command line: server.smtp: invalid endpoint 'tcp:nope': invalid literal for int() with base 10: 'nope'"
    )
    assert error_of(None, {"local.domains": ["-bad-"]}) == (
        "command line: local.domains: invalid domain '-bad-': invalid domain"
    )
    assert error_of(None, {"server.bogus": 1}).startswith("command line: server.bogus: unknown key")


def test_ipv6_endpoint_hint(tmp_path):
    path = write(tmp_path, '[server]\nsmtp = ["tcp6:25:interface=::1"]\n')
    assert error_of(path).endswith('(escape colons in IPv6 addresses as "\\:")')


# -- finding the file ----------------------------------------------------------------------


def test_find_order(tmp_path, monkeypatch):
    etc = tmp_path / "etc.toml"
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_FILE", str(etc))
    monkeypatch.delenv("MAILHUB_CONFIG", raising=False)
    assert find_config_file(None) is None  # nothing anywhere: embedded defaults
    etc.write_text("")
    assert find_config_file(None) == str(etc)
    monkeypatch.setenv("MAILHUB_CONFIG", "/from/env.toml")
    assert find_config_file(None) == "/from/env.toml"
    assert find_config_file("/explicit.toml") == "/explicit.toml"
    monkeypatch.setenv("MAILHUB_CONFIG", "")
    assert find_config_file(None) == str(etc)


def test_env_file_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MAILHUB_CONFIG", str(tmp_path / "gone.toml"))
    path = find_config_file(None)
    assert error_of(path) == f"{tmp_path / 'gone.toml'}: cannot read: No such file or directory"


# -- showing -------------------------------------------------------------------------------------


def test_format_config_round_trips(tmp_path):
    (tmp_path / "aliases").write_text("")
    path = write(tmp_path, FULL)
    c = load_config(path)
    text = format_config(c)
    assert text.startswith(f"# source: {path}\n")
    again = load_config(write(tmp_path, text, "again.toml"))
    assert (again.server, again.spool, again.local, again.relay) == (c.server, c.spool, c.local, c.relay)


def test_format_config_shows_every_key(tmp_path):
    text = format_config(load_config(None))
    for part in (ServerConfig, SpoolConfig, LocalConfig, RelayConfig):
        for name in part.__dataclass_fields__:
            assert f"\n{name} = " in text or f"\n# {name} is not set" in text, name
    assert "# users is not set" in text and "# aliases is not set" in text
