"""
Tests for mailhub-sendmail: the real command in subprocesses
(C{python -m mailhub.cli.sendmail}) against a spool in tmp_path, with the
daemon stopped; the pickup file is parsed, then PickupService queues it.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import smtplib
import socket
import subprocess
import sys

import pytest
from twisted.internet import task

from mailhub.cli.sendmail import Invocation, UsageError, parse_args
from mailhub.queue.pickup import PickupService
from mailhub.queue.pickupfile import ensure_pickup_dirs, pickup_dirs, read_header
from mailhub.queue.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(tmp_path):
    """A config file and a spool with its pickup area; returns (config, spool)."""
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    ensure_pickup_dirs(spool.path)
    config = tmp_path / "mailhub.toml"
    config.write_text(
        '[server]\nhostname = "mx.example"\nmax_message_size = 2000\n'
        '[spool]\npath = "spool"\n'
        '[local]\ndomains = ["example.org", "localhost"]\nmailboxes = "mail"\n'
    )
    return str(config), spool


def sendmail(config, args, stdin=b"", extra_env=None, stdin_fd=None, **kw):
    environ = dict(os.environ, PYTHONPATH=ROOT)
    environ.pop("MAILHUB_CONFIG", None)
    environ.update(extra_env or {})
    cmd = [sys.executable, "-m", "mailhub.cli.sendmail"] + (["-C", config] if config else []) + args
    if stdin_fd is not None:
        kw["stdin"] = stdin_fd
    else:
        kw["input"] = stdin
    return subprocess.run(cmd, capture_output=True, cwd=ROOT, env=environ, timeout=30, **kw)


def pickup_files(spool):
    new_dir = pickup_dirs(spool.path)[1]
    out = []
    for name in sorted(os.listdir(new_dir)):
        with open(os.path.join(new_dir, name), "rb") as f:
            header = read_header(f)
            out.append((header, f.read()))
    return out


def only_pickup(spool):
    files = pickup_files(spool)
    assert len(files) == 1, files
    header, body = files[0]
    return header, body, email.message_from_bytes(body, policy=email.policy.default)


LOGIN = __import__("pwd").getpwuid(os.getuid()).pw_name


# -- submitting -------------------------------------------------------------------------


def test_message_lands_in_pickup_then_gets_queued(env):
    config, spool = env
    r = sendmail(config, ["-f", "alice@example.org", "-F", "Alice Liddell", "bob@example.com", "carol"],
                 b"Subject: hello\n\nline 1\nline 2\n")
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, msg = only_pickup(spool)
    assert header.sender == "alice@example.org"
    assert header.recipients == ("bob@example.com", "carol@example.org")
    assert header.fullname == "Alice Liddell"
    assert msg["Subject"] == "hello"
    assert msg["From"] == "Alice Liddell <alice@example.org>"
    assert msg["Message-ID"].endswith("@mx.example>")
    assert msg["Date"]
    assert body.endswith(b"\r\n\r\nline 1\r\nline 2\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"")

    clock = task.Clock()
    queued = []
    svc = PickupService(spool, queued.append, clock, max_size=2000, hostname="mx.example",
                        notifier_factory=lambda c: None)
    svc.startService()
    clock.advance(0)
    svc.stopService()
    assert len(queued) == 1
    envl = spool.load(queued[0].queue_id)
    assert envl.sender == "alice@example.org"
    assert [r.address for r in envl.recipients] == ["bob@example.com", "carol@example.org"]
    assert envl.client["uid"] == os.getuid() and envl.client["user"] == LOGIN
    assert pickup_files(spool) == []
    with spool.open_message(envl.queue_id) as f:
        data = f.read()
    assert data.startswith(b"Received: by mx.example (mailhub, from userid %d)\r\n" % os.getuid())
    assert data.endswith(body)


def test_cron_like_t(env):
    config, spool = env
    r = sendmail(config, ["-t"], b"To: a@localhost\nSubject: x\n\nbody")
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, msg = only_pickup(spool)
    assert header.sender == f"{LOGIN}@example.org"
    assert header.recipients == ("a@localhost",)
    assert msg["From"].endswith(f"<{LOGIN}@example.org>") or msg["From"] == f"{LOGIN}@example.org"
    assert body.endswith(b"\r\n\r\nbody\r\n")


def test_t_uses_to_cc_bcc_plus_arguments_and_removes_bcc(env):
    config, spool = env
    message = (
        b"From: Me <me@example.org>\nTo: A <a@example.com>, b@example.com\nCc: c@example.com,\n"
        b"  d@example.com\nBcc: secret@example.com\nSubject: s\n\nhi\n"
    )
    r = sendmail(config, ["-t", "-i", "extra@example.com", "a@example.com"], message)
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, msg = only_pickup(spool)
    assert header.recipients == (
        "extra@example.com", "a@example.com", "b@example.com", "c@example.com", "d@example.com",
        "secret@example.com",
    )
    assert b"secret" not in body and b"Bcc" not in body
    assert msg["From"] == "Me <me@example.org>"


def test_present_headers_not_added(env):
    config, spool = env
    message = (
        b"From: x@example.org\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <given@example.org>\n"
        b"Subject: s\n\nbody\n"
    )
    r = sendmail(config, ["x@example.org"], message)
    assert r.returncode == 0
    _, body, _ = only_pickup(spool)
    assert body == (
        b"From: x@example.org\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <given@example.org>\r\n"
        b"Subject: s\r\n\r\nbody\r\n"
    )


def test_lone_dot_ends_input_without_i(env):
    config, spool = env
    r = sendmail(config, ["a@example.org"], b"Subject: s\n\nbefore\n.\nafter\n")
    assert r.returncode == 0
    _, body, _ = only_pickup(spool)
    assert body.endswith(b"\r\n\r\nbefore\r\n")


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_lone_dot_kept_with_i(env, flag):
    config, spool = env
    r = sendmail(config, [flag, "a@example.org"], b"Subject: s\n\nbefore\n.\n..\nafter\n")
    assert r.returncode == 0
    _, body, _ = only_pickup(spool)
    assert body.endswith(b"\r\n\r\nbefore\r\n.\r\n..\r\nafter\r\n")


def test_ignored_options_accepted(env):
    config, spool = env
    r = sendmail(config, ["-odi", "-oem", "-B", "8BITMIME", "-N", "never", "-R", "hdrs", "-V", "id1",
                          "-X", "/dev/null", "-v", "-bm", "-ti", "--", "a@example.org"], b"To: b@example.org\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(b"mailhub-sendmail: queued as pickup file ")
    header, _, _ = only_pickup(spool)
    assert header.recipients == ("a@example.org", "b@example.org")


def test_config_from_environment(env):
    config, spool = env
    r = sendmail(None, ["a@example.org"], b"x\n", extra_env={"MAILHUB_CONFIG": config})
    assert r.returncode == 0, r.stderr
    assert len(pickup_files(spool)) == 1


def test_null_sender(env):
    config, spool = env
    r = sendmail(config, ["-f", "<>", "a@example.org"], b"x\n")
    assert r.returncode == 0
    header, _, msg = only_pickup(spool)
    assert header.sender == ""
    assert msg["From"] == "MAILER-DAEMON@example.org"


# -- exit codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, stdin, code, message",
    [
        (["-Z"], b"", 64, b"mailhub-sendmail: unknown option -Z\n"),
        (["-f"], b"", 64, b"mailhub-sendmail: option -f requires a value\n"),
        ([], b"x\n", 64, b"mailhub-sendmail: no recipients given (use -t or list addresses)\n"),
        (["-t"], b"Subject: x\n\nbody\n", 64,
         b"mailhub-sendmail: no recipients found (no To, Cc or Bcc header and no address given)\n"),
        (["bad@@example.org"], b"x\n", 67,
         b"mailhub-sendmail: invalid recipient address 'bad@@example.org': invalid local part\n"),
        (["-t"], b"To: a@exa mple.org\n\nx\n", 67, None),
        (["-f", "x@@y", "a@example.org"], b"x\n", 64, None),
        (["a@example.org"], b"x" * 3000, 65, b"mailhub-sendmail: message too large (limit 2000 bytes)\n"),
        (["-bd"], b"", 64, None),
    ],
)
def test_exit_codes(env, args, stdin, code, message):
    config, spool = env
    r = sendmail(config, args, stdin)
    assert r.returncode == code, r.stderr
    if message is not None:
        assert r.stderr == message
    else:
        assert r.stderr.startswith(b"mailhub-sendmail: ")
    assert pickup_files(spool) == []
    assert os.listdir(pickup_dirs(spool.path)[0]) == []


def test_missing_pickup_directory_is_cantcreat(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}/nospool"\n')
    r = sendmail(str(config), ["a@localhost"], b"x\n")
    assert r.returncode == 73
    assert r.stderr.startswith(b"mailhub-sendmail: cannot write to the pickup directory ")


def test_bad_config_is_ex_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_message_size = -1\n")
    r = sendmail(str(config), ["a@localhost"], b"x\n")
    assert r.returncode == 78
    assert b"server.max_message_size" in r.stderr


def test_newaliases_mode(env):
    config, _ = env
    r = sendmail(config, ["-bi"])
    assert r.returncode == 0


# -- -bs ----------------------------------------------------------------------------------------


class PipeSMTP(smtplib.SMTP):
    """smtplib over an already connected socket (one end of a socketpair)."""

    def __init__(self, sock):
        self._pipe = sock
        super().__init__()

    def _get_socket(self, host, port, timeout):
        return self._pipe


def test_bs_with_smtplib(env):
    config, spool = env
    ours, theirs = socket.socketpair()
    environ = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailhub.cli.sendmail", "-C", config, "-bs"],
        stdin=theirs, stdout=theirs, cwd=ROOT, env=environ,
    )
    theirs.close()
    try:
        s = PipeSMTP(ours)
        code, greeting = s.connect("pipe")
        assert (code, greeting) == (220, b"mx.example ESMTP mailhub")
        code, text = s.ehlo("client.example")
        assert code == 250
        assert s.has_extn("enhancedstatuscodes") and s.has_extn("8bitmime") and s.has_extn("pipelining")
        assert s.esmtp_features["size"] == "2000"
        assert s.docmd("DATA") == (503, b"5.5.1 Error: need RCPT command")
        assert s.docmd("RCPT TO:<a@example.org>") == (503, b"5.5.1 Error: need MAIL command")
        assert s.mail("<sender@example.org>") == (250, b"2.1.0 Ok")
        assert s.docmd("MAIL FROM:<x@example.org>") == (503, b"5.5.1 Error: nested MAIL command")
        assert s.rcpt("<bad@@x>") == (501, b"5.1.3 Error: bad recipient address: invalid local part")
        assert s.rcpt("<to@example.com>") == (250, b"2.1.5 Ok")
        assert s.rcpt("<root>") == (250, b"2.1.5 Ok")  # a bare name is qualified with the origin domain
        assert s.rcpt("<postmaster>") == (250, b"2.1.5 Ok")
        code, text = s.data(b"Subject: via bs\r\n\r\n.leading dot\r\n..\r\nend\r\n")
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
        assert s.noop() == (250, b"2.0.0 Ok")
        assert s.docmd("BOGUS") == (500, b"5.5.2 Error: command not recognized")
        assert s.mail("<s@example.org>", ["SIZE=5000"]) == (552, b"5.3.4 Error: message size exceeds fixed limit")
        assert s.rset() == (250, b"2.0.0 Ok")
        assert s.mail("<s@example.org>") == (250, b"2.1.0 Ok")
        assert s.rcpt("<to@example.com>") == (250, b"2.1.5 Ok")
        assert s.data(b"x" * 2500 + b"\r\n") == (552, b"5.3.4 Error: message size exceeds fixed limit")
        assert s.mail("<s@example.org>") == (250, b"2.1.0 Ok")
        assert s.quit() == (221, b"2.0.0 Bye")
    finally:
        ours.close()
        assert proc.wait(10) == 0
    header, body, msg = only_pickup(spool)
    assert header.sender == "sender@example.org"
    assert header.recipients == ("to@example.com", "root@example.org", "postmaster@example.org")
    assert msg["Subject"] == "via bs"
    assert body.endswith(b"\r\n\r\n.leading dot\r\n..\r\nend\r\n")
    assert msg["Message-ID"] and msg["Date"]
    assert os.listdir(pickup_dirs(spool.path)[0]) == []


# -- argument parsing (in process) ------------------------------------------------------------


def test_parse_args_grouped_and_attached():
    inv = parse_args(["-ti", "-fme@example.org", "-FMe Myself", "-C", "/c.toml", "a@b.example", "-x"])
    assert inv == Invocation(
        mode="m", recipients=["a@b.example", "-x"], extract=True, dots=False,
        sender="me@example.org", fullname="Me Myself", config="/c.toml",
    )


@pytest.mark.parametrize(
    "prog, argv, mode, qid",
    [("mailq", [], "p", None), ("newaliases", [], "i", None), ("sendmail", ["-q"], "q", None),
     ("sendmail", ["-qIABCDEFGH12"], "q", "ABCDEFGH12"), ("sendmail", ["-bp"], "p", None),
     ("sendmail", ["-q30m"], "q", None), ("sendmail", ["-I"], "i", None)],
)
def test_parse_modes(prog, argv, mode, qid):
    inv = parse_args(argv, prog)
    assert (inv.mode, inv.queue_id) == (mode, qid)


def test_parse_unsupported_b():
    with pytest.raises(UsageError):
        parse_args(["-bv", "a@b.example"])


# -- hostile input: full names, recipient arguments, crashes ----------------------------


@pytest.mark.parametrize(
    "fullname, cleaned",
    [
        ("Evil\r\nBcc: x", "Evil Bcc: x"),
        ("Evil\nTo: y@ok.test", "Evil To: y@ok.test"),
        ("Soh\x01and\x7fdel\x1b", "Soh and del"),
        ("Line\u2028sep\x85nel", "Line sep nel"),
    ],
)
def test_fullname_control_characters_replaced_by_spaces(env, fullname, cleaned):
    """Like Postfix, a full name cannot add header lines: controls become spaces."""
    config, spool = env
    r = sendmail(config, ["-f", "alice@example.org", "-F", fullname, "bob@example.com"], b"Subject: s\n\nx\n")
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, msg = only_pickup(spool)
    assert header.fullname == cleaned
    assert header.recipients == ("bob@example.com",)
    head = body.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert [line for line in head if not line.startswith((b"Subject:", b"Date:", b"Message-ID:"))] == [
        b"From: " + email.utils.formataddr((cleaned, "alice@example.org")).encode()
    ]
    assert msg["From"].addresses[0].display_name == cleaned


def test_fullname_control_characters_in_bs_mode(env):
    config, spool = env
    r = sendmail(config, ["-bs", "-F", "Evil\r\nBcc: x"],
                 b"HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                 b"DATA\r\nSubject: s\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert r.returncode == 0 and b"250 2.0.0 Ok: queued as" in r.stdout, r.stdout
    header, body, msg = only_pickup(spool)
    assert header.fullname == "Evil Bcc: x"
    assert msg["From"] == '"Evil Bcc: x" <a@example.org>'
    assert msg["Bcc"] is None


@pytest.mark.parametrize(
    "argument",
    ["carol\nBcc: inj2@ok.test", "carol\r\nBcc: inj2@ok.test", "a@example.org\r", "a\tb@example.org",
     "a@example.org,\x1bb@example.org", "a\u2028@example.org", "a\x85@example.org"],
)
def test_recipient_argument_with_control_character_refused(env, argument):
    """An argument is an address (list), never a header: no group parsing across a newline."""
    config, spool = env
    r = sendmail(config, ["-f", "alice@example.org", "ok@example.com", argument], b"Subject: s\n\nx\n")
    assert r.returncode == 67
    assert r.stderr == (
        f"mailhub-sendmail: invalid recipient address {argument!r}: control character in the address\n"
    ).encode()
    assert pickup_files(spool) == []
    assert os.listdir(pickup_dirs(spool.path)[0]) == []


def test_sender_argument_with_control_character_refused(env):
    config, spool = env
    r = sendmail(config, ["-f", "alice@example.org\nBcc: x@ok.test", "bob@example.com"], b"x\n")
    assert r.returncode == 64
    assert r.stderr == (
        b"mailhub-sendmail: invalid sender address 'alice@example.org\\nBcc: x@ok.test': "
        b"control character in the address\n"
    )
    assert pickup_files(spool) == []


def test_comma_separated_argument_still_accepted(env):
    config, spool = env
    r = sendmail(config, ["-f", "a@example.org", "Bob <bob@example.com>, carol", "dave@example.com"], b"x\n")
    assert (r.returncode, r.stderr) == (0, b"")
    header, _, _ = only_pickup(spool)
    assert header.recipients == ("bob@example.com", "carol@example.org", "dave@example.com")


# -- Resent- headers and -t -------------------------------------------------------------------


def test_t_with_resent_headers_uses_resent_recipients(env):
    """Postfix sendmail -t: with Resent-To/Cc/Bcc present those are the recipients, not To/Cc/Bcc."""
    config, spool = env
    message = (
        b"From: Orig <orig@example.com>\nTo: first@example.com\nCc: second@example.com\n"
        b"Bcc: hidden1@example.com\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <m1@example.com>\n"
        b"Resent-To: r1@example.com,\n r2\nResent-Cc: r3@example.com\nResent-Bcc: hidden2@example.com\n"
        b"Subject: fwd\n\nbody\n"
    )
    r = sendmail(config, ["-t", "-f", "me@example.org", "arg@example.com"], message)
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, msg = only_pickup(spool)
    assert header.recipients == (
        "arg@example.com", "r1@example.com", "r2@example.org", "r3@example.com", "hidden2@example.com",
    )
    assert b"hidden" not in body and b"Bcc" not in body
    # Resent mode: the Resent- trace headers are added, not Date / Message-ID / From.
    assert len(msg.get_all("Date")) == 1 and b"\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n" in body
    assert msg.get_all("Message-ID") == ["<m1@example.com>"]
    assert msg["Resent-From"].addresses[0].addr_spec == "me@example.org" and msg["From"] == "Orig <orig@example.com>"
    assert msg["Resent-Date"] and msg["Resent-Message-ID"].endswith("@mx.example>")
    assert msg["Resent-To"] == "r1@example.com, r2@example.org"


def test_t_without_resent_recipient_headers_uses_to_cc_bcc(env):
    config, spool = env
    message = b"From: a@example.org\nTo: first@example.com\nResent-Date: Mon, 1 Jan 2024 00:00:00 +0000\n\nx\n"
    r = sendmail(config, ["-t"], message)
    assert (r.returncode, r.stderr) == (0, b"")
    header, _, msg = only_pickup(spool)
    assert header.recipients == ("first@example.com",)
    assert msg["Resent-Message-ID"] and msg["Resent-From"] and msg["Date"] is None


def test_resent_bcc_removed_without_t(env):
    config, spool = env
    message = b"From: a@example.org\nResent-Bcc: hidden@example.com\nResent-From: a@example.org\n\nx\n"
    r = sendmail(config, ["b@example.com"], message)
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, _ = only_pickup(spool)
    assert header.recipients == ("b@example.com",)
    assert b"hidden" not in body and b"Resent-Bcc" not in body


# -- unqualified header addresses ---------------------------------------------------------------


def test_unqualified_header_addresses_get_the_origin_domain(env):
    config, spool = env
    message = (
        b"From: Alice (the boss) <alice>\n"
        b'To: bob, "Doe, J" <jdoe>, c@example.com, undisclosed-recipients:;\n'
        b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg>,\n   eve (Eve)\n"
        b"Reply-To: list (comment), Group: member, x@example.com;\n"
        b"Sender: <>\n"
        b"X-Other: bob\n"
        b"Resent-From: admin\n"
        b"Subject: To: nobody\n\nTo: body\n"
    )
    r = sendmail(config, ["-i", "-f", "a@example.org", "t@example.com"], message)
    assert (r.returncode, r.stderr) == (0, b"")
    _, body, _ = only_pickup(spool)
    head = body.split(b"\r\n\r\n", 1)
    assert head[0].split(b"\r\n")[:9] == [
        b"From: Alice (the boss) <alice@example.org>",
        b'To: bob@example.org, "Doe, J" <jdoe@example.org>, c@example.com, undisclosed-recipients:;',
        b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>,",
        b"   eve@example.org (Eve)",
        b"Reply-To: list@example.org (comment), Group: member@example.org, x@example.com;",
        b"Sender: <>",
        b"X-Other: bob",
        b"Resent-From: admin@example.org",
        b"Subject: To: nobody",
    ]
    assert head[1] == b"To: body\r\n"


def test_header_qualification_leaves_odd_values_alone(env):
    config, spool = env
    message = (
        b"To: =?utf-8?q?not_an_address?=\n"
        b"Cc: John Doe\n"
        b"From: \"unterminated <x>\n"
        b"\n\n"
    )
    r = sendmail(config, ["-f", "a@example.org", "t@example.com"], message)
    assert (r.returncode, r.stderr) == (0, b"")
    _, body, _ = only_pickup(spool)
    assert body.startswith(b"To: =?utf-8?q?not_an_address?=\r\nCc: John Doe\r\nFrom: \"unterminated <x>\r\n")


def test_t_bare_to_is_qualified_in_header_and_envelope(env):
    config, spool = env
    r = sendmail(config, ["-t"], b"To: alice\nSubject: s\n\nx\n")
    assert (r.returncode, r.stderr) == (0, b"")
    header, body, msg = only_pickup(spool)
    assert header.recipients == ("alice@example.org",)
    assert body.startswith(b"To: alice@example.org\r\n")
    assert msg["From"].addresses[0].addr_spec == f"{LOGIN}@example.org"


# -- never a traceback ----------------------------------------------------------------------------


def test_unexpected_error_is_tempfail_in_one_line(env, tmp_path):
    """Reading stdin fails (opened write-only): one line on stderr, exit 75, nothing left."""
    config, spool = env
    fd = os.open(str(tmp_path / "stdin"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        r = sendmail(config, ["bob@example.com"], stdin=None, stdin_fd=fd)
    finally:
        os.close(fd)
    assert r.returncode == 75, r.stderr
    assert b"Traceback" not in r.stderr
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"mailhub-sendmail: ")
    assert b"try again later" in r.stderr
    assert pickup_files(spool) == []
    assert os.listdir(pickup_dirs(spool.path)[0]) == []


def test_error_after_commit_exits_0(env):
    """stderr is a broken pipe: -v cannot report, but the message is in pickup, so exit 0."""
    config, spool = env
    read_end, write_end = os.pipe()
    os.close(read_end)
    environ = dict(os.environ, PYTHONPATH=ROOT)
    environ.pop("MAILHUB_CONFIG", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mailhub.cli.sendmail", "-C", config, "-v", "bob@example.com"],
            input=b"Subject: s\n\nx\n", stdout=subprocess.PIPE, stderr=write_end, cwd=ROOT, env=environ,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    header, _, _ = only_pickup(spool)
    assert header.recipients == ("bob@example.com",)


def test_closed_stderr_still_queues(env):
    """cron may run sendmail with descriptor 2 closed ("2>&-"): still exit 0, message queued."""
    config, spool = env
    environ = dict(os.environ, PYTHONPATH=ROOT)
    environ.pop("MAILHUB_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.sendmail", "-C", config, "-v", "bob@example.com"],
        input=b"Subject: s\n\nx\n", stdout=subprocess.PIPE, cwd=ROOT, env=environ, timeout=30,
        preexec_fn=lambda: os.close(2),
    )
    assert proc.returncode == 0
    assert len(pickup_files(spool)) == 1


def test_bs_input_ending_inside_data_queues_nothing(env):
    """A -bs client that disconnects before the final "." must not get a truncated message queued."""
    config, spool = env
    r = sendmail(config, ["-bs"], b"HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                                  b"DATA\r\nSubject: half\r\n\r\npartial body")
    assert r.returncode == 0
    assert r.stdout.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert pickup_files(spool) == []
    assert os.listdir(pickup_dirs(spool.path)[0]) == []
    r = sendmail(config, ["-bs"], b"HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubj")
    assert r.returncode == 0 and pickup_files(spool) == []


def test_bs_control_characters_in_paths_refused(env):
    config, spool = env
    r = sendmail(config, ["-bs"], "HELO x\r\nMAIL FROM:<a\u2028@example.org>\r\nMAIL FROM:<a@example.org>\r\n"
                                  "RCPT TO:<b\x85@example.com>\r\nQUIT\r\n".encode())
    assert r.returncode == 0
    assert r.stdout.split(b"\r\n")[2:5] == [
        b"501 5.1.7 Bad sender address syntax: control characters in address",
        b"250 2.1.0 Ok",
        b"501 5.1.3 Error: bad recipient address: control characters in address",
    ]


def test_help_and_version_print_usage_not_an_error():
    import io

    from mailhub.cli.sendmail import run

    for flag, expected in (("--help", b"usage: mailhub-sendmail"), ("--version", b"mailhub-sendmail (mailhub ")):
        out, err = io.BytesIO(), io.StringIO()
        assert run([flag], io.BytesIO(b""), out, err) == 0
        assert out.getvalue().startswith(expected)
        assert err.getvalue() == ""


# -- -bs speaks the daemon's SMTP grammar ---------------------------------------------------------

_BS_ENVELOPE = b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"


def test_bs_bare_lf_dot_does_not_end_the_message(env):
    """A bare-LF "." inside DATA is not an end of data: nothing is smuggled, the message is refused."""
    config, spool = env
    r = sendmail(config, ["-bs"], _BS_ENVELOPE + b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@example.org>\r\n"
                 b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert r.returncode == 0
    replies = r.stdout.split(b"\r\n")
    assert b"550 5.6.0 Message contains bare CR or LF; lines must end with CRLF" in replies
    assert not any(line.startswith(b"250 2.0.0 Ok: queued") for line in replies), replies
    assert replies[-2:] == [b"221 2.0.0 Bye", b""]
    assert pickup_files(spool) == []


def test_bs_pipelined_transactions_are_all_answered_in_order(env):
    """A whole pipelined session in one write: every command answered, both messages committed."""
    config, spool = env
    one = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: %d\r\n\r\n..dot\r\n.\r\n"
    r = sendmail(config, ["-bs"], b"EHLO x\r\n" + one % 1 + b"RSET\r\n" + one % 2 + b"QUIT\r\n")
    codes = [line[:3] for line in r.stdout.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"250", b"354", b"250", b"221"]
    queued = [line.split()[-1].decode() for line in r.stdout.split(b"\r\n") if line.startswith(b"250 2.0.0 Ok: queued")]
    files = pickup_files(spool)
    assert sorted(queued) == sorted(os.listdir(pickup_dirs(spool.path)[1]))
    assert sorted(email.message_from_bytes(body)["Subject"] for _, body in files) == ["1", "2"]
    assert all(b"\r\n.dot\r\n" in body for _, body in files)


def test_bs_long_command_line_refused_and_session_goes_on(env):
    config, spool = env
    r = sendmail(config, ["-bs"], b"EHLO x\r\nNOOP " + b"x" * 5000 + b"\r\nMAIL FROM:<" + b"a" * 3000
                 + b"@example.org>\r\nNOOP\r\nQUIT\r\n")
    replies = r.stdout.split(b"\r\n")
    assert b"500 5.5.2 Error: line too long" in replies
    assert replies[-3:] == [b"250 2.0.0 Ok", b"221 2.0.0 Bye", b""]
    assert max(len(line) for line in replies) < 600  # the long input is never echoed
    assert pickup_files(spool) == []


def test_bs_message_carries_the_session_trace_and_the_pickup_name(env):
    config, spool = env
    r = sendmail(config, ["-bs"], _BS_ENVELOPE + b"Subject: t\r\n\r\nx\r\n.\r\nQUIT\r\n")
    name = [line for line in r.stdout.split(b"\r\n") if line.startswith(b"250 2.0.0 Ok: queued as ")][0].split()[-1]
    assert os.listdir(pickup_dirs(spool.path)[1]) == [name.decode()]
    _, body, msg = only_pickup(spool)
    assert body.startswith(b"Received: from x ([127.0.0.1])\r\n\tby mx.example (mailhub) with ESMTP id " + name)
    assert msg["From"] and msg["Date"] and msg["Message-ID"]
