"""
Tests for mailhub.config: defaults, every key, overrides, lookup order,
relative paths, the rules that involve more than one key and the files
the daemon opens, each with its exact one-line error.  The errors of
single values are in test_config_values.py.
"""

from __future__ import annotations

import os

import pytest
from configfiles import error_of, write

from mailhub import config as cfg
from mailhub.config import (
    AuthConfig,
    Config,
    ConfigError,
    HistoryConfig,
    LocalConfig,
    RelayConfig,
    ServerConfig,
    SpoolConfig,
    SubmissionConfig,
    default_hostname,
    find_config_file,
    format_config,
    load_config,
)
from mailhub.configschema import SCHEMA

# -- defaults -----------------------------------------------------------------------


def test_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    data = os.path.join(str(tmp_path), "mailhub-data")
    assert c == Config(
        server=ServerConfig(hostname=default_hostname(), event_log=os.path.join(data, "events.jsonl")),
        spool=SpoolConfig(path=os.path.join(data, "spool")),
        local=LocalConfig(mailboxes=os.path.join(data, "mailboxes")),
        relay=RelayConfig(),
        source=None,
        history=HistoryConfig(database=os.path.join(data, "history.sqlite")),
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
    assert (c.local.mode, c.local.home_maildir, c.local.min_uid, c.local.max_uid) == ("virtual", "Maildir", 1000, 60000)
    assert (c.server.http, c.server.http_max_body, c.server.http_admins) == ((), 14680064, ())
    assert c.server.event_log == os.path.join(data, "events.jsonl")
    assert (c.server.event_log_max_size, c.server.event_log_keep) == (67108864, 3)
    assert (c.server.http_header_timeout, c.server.http_request_timeout) == (60.0, 300.0)
    assert (c.server.http_max_connections, c.server.http_max_connections_per_ip) == (100, 50)


def test_empty_file_is_defaults(tmp_path, monkeypatch):
    # the embedded default data directory is relative to the working directory
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write(tmp_path, "")
    c = load_config(path)
    assert c.source == path
    assert c.spool.path == str(work / "mailhub-data" / "spool")
    assert c.server == ServerConfig(hostname=default_hostname(), event_log=str(work / "mailhub-data" / "events.jsonl"))


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
        event_log="/var/lib/mailhub/events.jsonl",
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
    assert c.server.hostname == default_hostname()


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
    for part in (ServerConfig, SpoolConfig, LocalConfig, RelayConfig, AuthConfig, SubmissionConfig):
        for name in part.__dataclass_fields__:
            assert f"\n{name} = " in text or f"\n# {name} is not set" in text, name
    assert "# users is not set" in text and "# aliases is not set" in text


# -- relay, submission, TLS and AUTH keys ----------------------------------------------------


def test_relay_tls_and_auth_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    assert (c.server.tls_cert, c.server.tls_key) == (None, None)
    assert (c.server.submission, c.server.smtps, c.server.hide_client_ip) == ((), (), False)
    r = c.relay
    assert (r.smarthost, r.smarthost_user, r.smarthost_password_file) == (None, None, None)
    assert dict(r.routes) == {} and r.dns_servers == () and r.local_addresses == ()
    assert (r.port, r.tls, r.tls_ca_file, r.helo_name) == (25, "may", None, None)
    assert (r.destination_concurrency, r.concurrency, r.connection_cache_time) == (20, 100, 5.0)
    assert (r.connect_timeout, r.greeting_timeout, r.command_timeout) == (30.0, 300.0, 300.0)
    assert (r.data_init_timeout, r.data_xfer_timeout, r.data_done_timeout) == (120.0, 180.0, 600.0)
    assert c.auth == AuthConfig(
        users=None, allow_plaintext_loopback=False, max_failures=5, failure_window=300.0, failure_delay=1.0
    )
    assert c.submission == SubmissionConfig(sender_check="strict")


RELAY_AND_SUBMISSION = """
[server]
hostname = "mail.example.org"
smtp = ["tcp:25"]
submission = ["tcp:587", "tcp6:587:interface=\\\\:\\\\:1"]
smtps = ["tcp:465"]
tls_cert = "cert.pem"
tls_key = "key.pem"
hide_client_ip = true

[auth]
users = "users"
allow_plaintext_loopback = true
max_failures = 3
failure_window = "10m"
failure_delay = 0

[submission]
sender_check = "off"

[relay]
smarthost = "[smtp.provider.example]:587"
smarthost_user = "mailhub@example.org"
smarthost_password_file = "smarthost.password"
dns_servers = ["192.0.2.53", "127.0.0.1:5353", "[2001:db8::53]:53"]
port = 2525
tls = "verify"
tls_ca_file = "ca.pem"
helo_name = "Out.Example.ORG"
local_addresses = ["192.0.2.1", "2001:db8::1"]
destination_concurrency = 4
concurrency = 50
connection_cache_time = "10s"
connect_timeout = "15s"
greeting_timeout = "1m"
command_timeout = "2m"
data_init_timeout = 60
data_xfer_timeout = 90
data_done_timeout = "5m"

[relay.routes]
"Partner.Example" = "[mx.partner.example]:2525"
".corp.example" = "relay.corp.example"
"direct.example" = ""
"[192.0.2.7]" = "[127.0.0.1]:10025"
"""


def relay_files(tmp_path):
    from mailhub.tls import make_self_signed

    make_self_signed("mail.example.org", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    (tmp_path / "ca.pem").write_bytes((tmp_path / "cert.pem").read_bytes())
    (tmp_path / "smarthost.password").write_text("s3cret pass\nignored second line\n")


def test_relay_and_submission_keys(tmp_path):
    relay_files(tmp_path)
    path = write(tmp_path, RELAY_AND_SUBMISSION)
    c = load_config(path, check_files=True)
    assert c.server.submission == ("tcp:587", "tcp6:587:interface=\\:\\:1")
    assert c.server.smtps == ("tcp:465",)
    assert (c.server.tls_cert, c.server.tls_key) == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    assert c.server.hide_client_ip is True
    assert c.auth == AuthConfig(str(tmp_path / "users"), True, 3, 600.0, 0.0)
    assert c.submission.sender_check == "off"
    r = c.relay
    assert r.smarthost == "[smtp.provider.example]:587"
    assert r.smarthost_user == "mailhub@example.org"
    assert r.smarthost_password_file == str(tmp_path / "smarthost.password")
    assert cfg.read_secret(r.smarthost_password_file) == "s3cret pass"
    assert dict(r.routes) == {
        "partner.example": "[mx.partner.example]:2525",
        ".corp.example": "relay.corp.example",
        "direct.example": "",
        "[192.0.2.7]": "[127.0.0.1]:10025",
    }
    assert r.dns_servers == ("192.0.2.53", "127.0.0.1:5353", "[2001:db8::53]:53")
    assert (r.port, r.tls, r.tls_ca_file) == (2525, "verify", str(tmp_path / "ca.pem"))
    assert r.helo_name == "Out.Example.ORG"
    assert r.local_addresses == ("192.0.2.1", "2001:db8::1")
    assert (r.destination_concurrency, r.concurrency, r.connection_cache_time) == (4, 50, 10.0)
    assert (r.connect_timeout, r.greeting_timeout, r.command_timeout) == (15.0, 60.0, 120.0)
    assert (r.data_init_timeout, r.data_xfer_timeout, r.data_done_timeout) == (60.0, 90.0, 300.0)
    # the config is frozen, routes included
    with pytest.raises(TypeError):
        r.routes["x.example"] = "y"  # type: ignore[index]
    # and round-trips through check-config's output
    again = load_config(write(tmp_path, format_config(c), "again.toml"))
    assert again == dataclass_replace(c, source=again.source)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_empty_strings_mean_unset(tmp_path):
    path = write(tmp_path, '[relay]\nsmarthost = ""\ntls_ca_file = ""\nhelo_name = ""\nsmarthost_user = ""\n')
    r = load_config(path).relay
    assert (r.smarthost, r.tls_ca_file, r.helo_name, r.smarthost_user) == (None, None, None, None)


def test_tls_files_must_belong_together(tmp_path):
    from mailhub.tls import make_self_signed

    make_self_signed("a.example", str(tmp_path / "a.pem"), str(tmp_path / "a.key"))
    make_self_signed("b.example", str(tmp_path / "b.pem"), str(tmp_path / "b.key"))
    path = write(tmp_path, '[server]\ntls_cert = "a.pem"\ntls_key = "b.key"\n')
    message = error_of(path, check_files=True)
    assert message.startswith(f"{path}: server.tls_")
    assert "\n" not in message
    assert "a.pem" in message or "b.key" in message


def test_submission_needs_users_file(tmp_path):
    from mailhub.tls import make_self_signed

    make_self_signed("a.example", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    path = write(tmp_path, '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\nsubmission = ["tcp:587"]\n')
    assert error_of(path) == f"{path}: server.submission: needs auth.users (AUTH is required there)"
    # STARTTLS on the MX listener alone needs no users file
    path = write(tmp_path, '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n', "ok.toml")
    assert load_config(path).server.tls_cert == str(tmp_path / "c.pem")


def test_read_secret_errors(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError) as e:
        cfg.read_secret(str(tmp_path / "empty"))
    assert str(e.value) == f"{tmp_path}/empty: relay.smarthost_password_file: the first line of {tmp_path}/empty is empty"
    with pytest.raises(ConfigError) as e:
        cfg.read_secret(str(tmp_path / "gone"), "m.toml")
    assert str(e.value) == (
        f"m.toml: relay.smarthost_password_file: cannot read {tmp_path}/gone: No such file or directory"
    )


def test_tools_do_not_need_the_daemons_secrets(tmp_path):
    """
    mailhub-sendmail and mailhub queue run as any user: they load the same
    file without reading the certificate, key or password file (root-only
    in practice); the daemon and check-config (check_files=True) do.
    """
    path = write(
        tmp_path,
        '[server]\ntls_cert = "gone.pem"\ntls_key = "gone.key"\n'
        '[relay]\nsmarthost = "[s.example]:587"\nsmarthost_user = "me"\nsmarthost_password_file = "pw"\n',
    )
    c = load_config(path)
    assert c.server.tls_cert == str(tmp_path / "gone.pem")
    assert error_of(path, check_files=True) == (
        f"{path}: relay.smarthost_password_file: no such file {tmp_path}/pw"
    )
    # the pairing rules are checked either way
    path = write(tmp_path, '[server]\ntls_cert = "gone.pem"\n', "half.toml")
    assert error_of(path) == f"{path}: server.tls_cert: needs server.tls_key too (both or neither)"


def test_sender_check_none_is_off(tmp_path):
    path = write(tmp_path, '[submission]\nsender_check = "none"\n')
    assert load_config(path).submission.sender_check == "off"


# -- HTTP, event log, system mailboxes ----------------------------------------------------------


def test_http_and_event_log_keys(tmp_path):
    path = write(
        tmp_path,
        '[server]\nhttp = ["tcp:8080:interface=127.0.0.1", "unix:http.sock"]\nhttp_max_body = 1000\n'
        'http_admins = ["Root@Example.ORG", "admin@bücher.example"]\nevent_log = "log/events.jsonl"\n',
    )
    c = load_config(path)
    assert c.server.http == ("tcp:8080:interface=127.0.0.1", "unix:http.sock")
    assert c.server.http_max_body == 1000
    # normalised as the users file stores its users
    assert c.server.http_admins == ("root@example.org", "admin@xn--bcher-kva.example")
    assert c.server.event_log == str(tmp_path / "log" / "events.jsonl")


def test_http_limit_and_event_log_rotation_keys(tmp_path):
    c = load_config(write(tmp_path, "[server]\nhttp_header_timeout = \"30s\"\nhttp_request_timeout = 120\n"
                                    "http_max_connections = 20\nhttp_max_connections_per_ip = 5\n"
                                    "event_log_max_size = 0\nevent_log_keep = 9\n"))
    assert (c.server.http_header_timeout, c.server.http_request_timeout) == (30.0, 120.0)
    assert (c.server.http_max_connections, c.server.http_max_connections_per_ip) == (20, 5)
    assert (c.server.event_log_max_size, c.server.event_log_keep) == (0, 9)
    assert "server.http_max_connections_per_ip: must be" in error_of(
        write(tmp_path, "[server]\nhttp_max_connections_per_ip = 0\n")
    )


def test_event_log_empty_string_is_off(tmp_path):
    c = load_config(write(tmp_path, '[server]\nevent_log = ""\n'))
    assert c.server.event_log is None


def test_system_mode_keys(tmp_path, monkeypatch):
    monkeypatch.setattr("mailhub.config.DEFAULT_ALIASES", str(tmp_path / "no-etc-aliases"))
    path = write(tmp_path, '[local]\nmode = "system"\nhome_maildir = "Mail/inbox"\nmin_uid = 500\nmax_uid = 999\n')
    c = load_config(path)
    assert (c.local.mode, c.local.home_maildir, c.local.min_uid, c.local.max_uid) == ("system", "Mail/inbox", 500, 999)
    assert c.local.aliases is None  # no /etc/aliases: none


def test_system_mode_uses_etc_aliases_when_it_exists(tmp_path, monkeypatch):
    etc_aliases = tmp_path / "etc-aliases"
    etc_aliases.write_text("postmaster: root\n")
    monkeypatch.setattr("mailhub.config.DEFAULT_ALIASES", str(etc_aliases))
    c = load_config(write(tmp_path, '[local]\nmode = "system"\n'))
    assert c.local.aliases == str(etc_aliases)
    # an explicit aliases file wins
    (tmp_path / "mine").write_text("")
    c = load_config(write(tmp_path, '[local]\nmode = "system"\naliases = "mine"\n'))
    assert c.local.aliases == str(tmp_path / "mine")
    # virtual mode never picks it up
    assert load_config(write(tmp_path, "")).local.aliases is None


def test_system_mode_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr("mailhub.config.DEFAULT_ALIASES", str(tmp_path / "absent"))
    c = load_config(write(tmp_path, '[local]\nmode = "system"\n[server]\nhttp = ["tcp:0"]\nhttp_admins = ["a@b.example"]\n'))
    again = load_config(write(tmp_path, format_config(c), "again.toml"))
    assert (again.server, again.local) == (c.server, c.local)


def test_every_key_is_documented():
    # README.rst's key table and docs/configuration.rst name every key config.py accepts
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.rst"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(root, "docs", "configuration.rst"), encoding="utf-8") as f:
        reference = f.read()
    missing = []
    for section, keys in SCHEMA.items():
        for key in keys:
            if f"\n``{section}.{key}`` " not in readme:
                missing.append(f"README.rst: {section}.{key}")
            if f"``{key}``" not in reference:
                missing.append(f"docs/configuration.rst: {section}.{key}")
    assert missing == []


# -- paths the daemon opens (check_files=True: the daemon and check-config) ------------------


def test_event_log_in_missing_directory(tmp_path):
    path = write(tmp_path, '[server]\nevent_log = "nodir/events.log"\n')
    load_config(path)  # the user tools do not care
    assert error_of(path, check_files=True) == (
        f"{path}: server.event_log: no such directory {tmp_path / 'nodir'}"
    )


def test_event_log_that_is_a_directory(tmp_path):
    (tmp_path / "events.log").mkdir()
    path = write(tmp_path, '[server]\nevent_log = "events.log"\n')
    assert error_of(path, check_files=True) == (
        f"{path}: server.event_log: not a regular file {tmp_path / 'events.log'}"
    )


def test_event_log_in_an_existing_directory_passes(tmp_path):
    path = write(tmp_path, f'data_dir = "{tmp_path}/data"\n[server]\nevent_log = "events.log"\n')
    assert load_config(path, check_files=True).server.event_log == str(tmp_path / "events.log")


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("")
    path = write(tmp_path, f'data_dir = "{tmp_path}/data"\n')
    load_config(path)
    assert error_of(path, check_files=True) == (
        f"{path}: spool.path: cannot create {tmp_path}/data/spool: {tmp_path}/data is not a directory"
    )


def test_mailboxes_that_is_a_file(tmp_path):
    (tmp_path / "boxes").write_text("")
    path = write(tmp_path, f'data_dir = "{tmp_path}/data"\n[local]\nmailboxes = "boxes"\n')
    assert error_of(path, check_files=True) == f"{path}: local.mailboxes: not a directory {tmp_path}/boxes"


def test_missing_data_dir_is_created_by_the_daemon(tmp_path):
    path = write(tmp_path, f'data_dir = "{tmp_path}/a/b/data"\n')
    assert load_config(path, check_files=True).spool.path == f"{tmp_path}/a/b/data/spool"


def test_aliases_that_is_a_directory(tmp_path):
    path = write(tmp_path, f'[local]\naliases = "{tmp_path}"\n')
    assert error_of(path) == f"{path}: local.aliases: not a regular file {tmp_path}"


@pytest.mark.parametrize(
    "fqdn,host,expected",
    [
        ("mx.example.org", "mx", "mx.example.org"),
        ("localhost", "vm", "vm"),  # /etc/hosts lists 127.0.0.1 localhost first
        ("localhost.localdomain", "vm.example.org", "vm.example.org"),
        ("localhost", "localhost", "localhost"),
    ],
)
def test_default_hostname_is_never_localhost_when_the_host_has_a_name(monkeypatch, fqdn, host, expected):
    from mailhub.config import default_hostname

    monkeypatch.setattr("mailhub.config.socket.getfqdn", lambda: fqdn)
    monkeypatch.setattr("mailhub.config.socket.gethostname", lambda: host)
    assert default_hostname() == expected
