"""
Each key's values: the one-line error, naming the file and the key, for
each kind of mistake in a value (the checkers of mailhub.configcheck, as
the loader reports them), and the duration syntax.
"""

from __future__ import annotations

import os

import pytest
from configfiles import error_of, write

from mailhub.config import parse_duration


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
    ('[server]\nsmtp = ["tcp:abc"]\n', "server.smtp: invalid endpoint 'tcp:abc': the port must be a number, got 'abc'"),
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
     "max_recipients, trusted_networks, timeout, starttls_timeout, max_connections, max_connections_per_ip, max_errors, "
     "soft_error_limit, max_hops, min_data_rate, vrfy, expn, tls_cert, tls_key, submission, smtps, hide_client_ip, "
     "http, http_max_body, http_admins, http_header_timeout, http_request_timeout, http_max_connections, "
     "http_max_connections_per_ip, event_log, event_log_max_size, event_log_keep, mail_log, log_level, user, processes, "
     "proxy_from, proxy_timeout)"),
    ("[srever]\nsmtp = []\n",
     "srever: unknown section or key (known: auth, data_dir, dkim, history, limits, local, mailauth, relay, server, spool, "
     "submission)"),
    ("server = 1\n", "server: must be a table ([server]), got 1"),
    ("[server]\nmax_hops = -1\n", "server.max_hops: must be a non-negative integer (0 disables), got -1"),
    ('[server]\nmin_data_rate = "fast"\n',
     "server.min_data_rate: must be a non-negative integer (0 disables), got 'fast'"),
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
    # -- outbound relay
    ('[relay]\nsmarthost = "[smtp.example.net"\n',
     "relay.smarthost: unbalanced brackets in next hop '[smtp.example.net'"),
    ('[relay]\nsmarthost = "2001:db8::1"\n', "relay.smarthost: IPv6 next hop must be bracketed: '2001:db8::1'"),
    ('[relay]\nsmarthost = "[smtp.example.net]:x"\n', "relay.smarthost: bad port in next hop '[smtp.example.net]:x'"),
    ("[relay]\nsmarthost = 25\n",
     'relay.smarthost: must be a next hop string like "[smtp.example.net]:587", got 25'),
    ('[relay.routes]\n"a.example" = "[mx.a.example]:99999"\n',
     "relay.routes: 'a.example': port out of range in next hop '[mx.a.example]:99999'"),
    ('[relay.routes]\n"bad domain" = "mx.example"\n', "relay.routes: invalid domain 'bad domain': invalid domain"),
    ('[relay.routes]\n"a.example" = 1\n',
     "relay.routes: 'a.example': must be a next hop string like \"[host]:25\" or \"\", got 1"),
    ('[relay]\nroutes = ["a"]\n', "relay.routes: must be a table of domain = \"next hop\", got ['a']"),
    ('[relay]\ndns_servers = ["dns.example"]\n',
     "relay.dns_servers: DNS server must be an IP address[:port], got 'dns.example'"),
    ('[relay]\ndns_servers = "192.0.2.53"\n',
     "relay.dns_servers: must be a list of DNS servers (\"ip\", \"ip:port\", \"[ipv6]:port\"), got '192.0.2.53'"),
    ("[relay]\nport = 0\n", "relay.port: must be a port number 1-65535, got 0"),
    ('[relay]\ntls = "required"\n',
     "relay.tls: must be one of 'none', 'may', 'encrypt', 'verify', got 'required'"),
    ('[relay]\ntls_ca_file = "nope.pem"\n', "relay.tls_ca_file: no such file {dir}/nope.pem"),
    ('[relay]\nhelo_name = "bad name"\n', "relay.helo_name: invalid domain 'bad name': invalid domain"),
    ('[relay]\nlocal_addresses = ["192.0.2.300"]\n', "relay.local_addresses: invalid IP address '192.0.2.300'"),
    ("[relay]\ndestination_concurrency = 0\n", "relay.destination_concurrency: must be a positive integer, got 0"),
    ("[relay]\nconnect_timeout = 0\n", "relay.connect_timeout: must be a positive duration, got 0"),
    ("[relay]\ndata_done_timeout = \"-1s\"\n", "relay.data_done_timeout: must be a duration (seconds, or a string "
     "like \"300s\", \"5m\", \"1h\", \"5d\"), got '-1s'"),
    ('[relay]\nsmarthost = "[smtp.example.net]:587"\nsmarthost_user = "me"\n',
     "relay.smarthost_user: needs relay.smarthost_password_file too"),
    ('[relay]\nsmarthost = "[smtp.example.net]:587"\nsmarthost_password_file = "pw"\n',
     "relay.smarthost_password_file: needs relay.smarthost_user too"),
    ('[relay]\nsmarthost_user = "me"\nsmarthost_password_file = "pw"\n',
     "relay.smarthost_user: credentials are only used for relay.smarthost, which is not set"),
    ('[relay]\nsmarthost = "[s.example]"\nsmarthost_user = "me"\nsmarthost_password_file = "pw"\n',
     "relay.smarthost_password_file: no such file {dir}/pw"),
    # -- submission, TLS, AUTH
    ('[server]\ntls_cert = "cert.pem"\n', "server.tls_cert: needs server.tls_key too (both or neither)"),
    ('[server]\ntls_key = "key.pem"\n', "server.tls_key: needs server.tls_cert too (both or neither)"),
    ('[server]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n',
     "server.tls_cert: {dir}/cert.pem: cannot read TLS certificate: No such file or directory"),
    ('[server]\nsubmission = ["tcp:587"]\n', "server.submission: needs server.tls_cert and server.tls_key"),
    ('[server]\nsmtps = ["tcp:465"]\n', "server.smtps: needs server.tls_cert and server.tls_key"),
    ('[server]\nsubmission = ["tcp:x"]\n',
     "server.submission: invalid endpoint 'tcp:x': the port must be a number, got 'x'"),
    ('[server]\nsmtps = ["ssl:465"]\n', "server.smtps: invalid endpoint 'ssl:465': give a plain endpoint "
     "(tcp:465...); mailhub adds TLS with server.tls_cert / server.tls_key"),
    ('[server]\nhide_client_ip = "yes"\n', "server.hide_client_ip: must be true or false, got 'yes'"),
    ('[auth]\nusers = ""\n', "auth.users: must be a non-empty string, got ''"),
    ("[auth]\nallow_plaintext_loopback = 1\n", "auth.allow_plaintext_loopback: must be true or false, got 1"),
    ("[auth]\nmax_failures = 0\n", "auth.max_failures: must be a positive integer, got 0"),
    ("[auth]\nfailure_window = 0\n", "auth.failure_window: must be a positive duration, got 0"),
    ('[auth]\npassword = "x"\n', "auth.password: unknown key (known: users, allow_plaintext_loopback, "
     "max_failures, failure_window, failure_delay)"),
    ('[submission]\nsender_check = "loose"\n', "submission.sender_check: must be one of 'strict', 'off', got 'loose'"),
    # HTTP and observability (docs/http.rst)
    ('[server]\nhttp = "tcp:8080"\n', "server.http: must be a list of endpoint strings, got 'tcp:8080'"),
    ('[server]\nhttp = ["tcp:x"]\n',
     "server.http: invalid endpoint 'tcp:x': the port must be a number, got 'x'"),
    ("[server]\nhttp_max_body = 0\n", "server.http_max_body: must be a positive integer, got 0"),
    ('[server]\nhttp_admins = "root@example.org"\n',
     "server.http_admins: must be a list of user addresses, got 'root@example.org'"),
    ('[server]\nhttp_admins = ["root"]\n',
     "server.http_admins: invalid user address 'root' (want e.g. \"root@example.org\")"),
    ('[server]\nhttp_admins = ["a b@example.org"]\n',
     "server.http_admins: invalid user address 'a b@example.org' (want e.g. \"root@example.org\")"),
    ("[server]\nevent_log = 1\n", "server.event_log: must be a string, got 1"),
    # system mailboxes (docs/delivery.rst)
    ('[local]\nmode = "unix"\n', "local.mode: must be one of 'virtual', 'system', got 'unix'"),
    ('[local]\nhome_maildir = "/var/mail"\n', "local.home_maildir: must be a relative path, not '/var/mail'"),
    ('[local]\nhome_maildir = "../x"\n',
     "local.home_maildir: must not contain '.' or '..' components: '../x'"),
    ('[local]\nhome_maildir = ""\n', "local.home_maildir: must be a non-empty string, got ''"),
    ("[local]\nmin_uid = 0\n", "local.min_uid: must be a user id 1-4294967294, got 0"),
    ('[local]\nmax_uid = "60000"\n', "local.max_uid: must be a user id 1-4294967294, got '60000'"),
    ("[local]\nmin_uid = 2000\nmax_uid = 1999\n", "local.min_uid: must not exceed local.max_uid (2000 > 1999)"),
    ('[local]\nmode = "system"\nusers = ["alice"]\n',
     'local.users: cannot be used with local.mode = "system" (the accounts are the users)'),
    # local delivery processes (docs/delivery.rst)
    ("[local]\ndelivery_processes = -1\n",
     "local.delivery_processes: must be a number of processes, 0 to 32 (0: deliver in the daemon's threads), got -1"),
    ("[local]\ndelivery_processes = true\n",
     "local.delivery_processes: must be a number of processes, 0 to 32 (0: deliver in the daemon's threads), got true"),
    ("[local]\ndelivery_processes = 33\n",
     "local.delivery_processes: must be at most 32 (0: deliver in the daemon's threads), got 33"),
]


@pytest.mark.parametrize("text, expected", ERRORS)
def test_errors_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_of(path, check_files=True)
    assert message == f"{path}: {expected.format(dir=tmp_path)}"
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
        "command line: server.smtp: invalid endpoint 'tcp:nope': the port must be a number, got 'nope'"
    )
    assert error_of(None, {"local.domains": ["-bad-"]}) == (
        "command line: local.domains: invalid domain '-bad-': invalid domain"
    )
    assert error_of(None, {"server.bogus": 1}).startswith("command line: server.bogus: unknown key")


def test_ipv6_endpoint_hint(tmp_path):
    path = write(tmp_path, '[server]\nsmtp = ["tcp6:25:interface=::1"]\n')
    assert error_of(path).endswith('(escape colons in IPv6 addresses as "\\:")')
