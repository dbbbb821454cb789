"""
Tests for C{mailhub user} (mailhub.cli.user) and C{mailhub make-cert}
(mailhub.cli.certs): direct calls with fake stdin/stderr, plus one real
subprocess per command for the stand-alone entry point.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import pytest
from twisted.python import usage

from mailhub import users as auth
from mailhub.cli.certs import MakeCertOptions, run_make_cert
from mailhub.cli.user import UserOptions, run_user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    monkeypatch.setattr(auth, "DEFAULT_ROUNDS", 4)
    monkeypatch.setattr(auth.UsersFile.__init__, "__defaults__", (None, 1.0, 4))


def run(argv, path, stdin="", getpass=None, is_tty=False):
    options = UserOptions()
    options.parseOptions(argv)
    err, out = io.StringIO(), io.StringIO()
    code = run_user(
        options,
        path,
        stdin=io.StringIO(stdin),
        stdout=out,
        stderr=err,
        getpass=getpass or (lambda prompt: pytest.fail("unexpected prompt")),
        is_tty=is_tty,
    )
    return code, out.getvalue(), err.getvalue()


def check(path, address, password):
    entry = auth.UsersFile(path).get(address)
    return entry is not None and auth._check_hash(password.encode(), entry.password_hash)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "users")


def test_add_with_password_stdin(path):
    code, out, err = run(["add", "Alice@Example.COM", "--password-stdin"], path, "s3cret\n")
    assert (code, err) == (0, "mailhub: added user alice@example.com\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert check(path, "alice@example.com", "s3cret")
    assert not check(path, "alice@example.com", "s3cret\n")


def test_password_stdin_strips_only_the_line_end(path):
    assert run(["add", "a@example.com", "--password-stdin"], path, " with spaces \r\nsecond line\n")[0] == 0
    assert check(path, "a@example.com", " with spaces ")


def test_passwd_and_del(path):
    run(["add", "a@example.com", "--password-stdin"], path, "one\n")
    code, _, err = run(["passwd", "A@EXAMPLE.COM", "--password-stdin"], path, "two\n")
    assert (code, err) == (0, "mailhub: changed password of a@example.com\n")
    assert check(path, "a@example.com", "two")
    code, _, err = run(["del", "a@example.com"], path)
    assert (code, err) == (0, "mailhub: deleted user a@example.com\n")
    assert auth.UsersFile(path).addresses() == []


def test_unknown_user(path):
    run(["add", "a@example.com", "--password-stdin"], path, "one\n")
    assert run(["passwd", "b@example.com", "--password-stdin"], path, "x\n") == (
        67,
        "",
        "mailhub: no such user: b@example.com\n",
    )
    assert run(["del", "b@example.com"], path) == (67, "", "mailhub: no such user: b@example.com\n")


@pytest.mark.parametrize("bad", ["alice", "a b@example.com", "a:b@example.com", "a@", "a@exa_mple.com"])
def test_invalid_address(path, bad):
    code, _, err = run(["add", bad, "--password-stdin"], path, "pw\n")
    assert code == 65
    assert err.startswith(f"mailhub: invalid address: {bad}: ")
    assert not os.path.exists(path)


def test_user_exists(path):
    run(["add", "a@example.com", "--password-stdin"], path, "one\n")
    code, _, err = run(["add", "A@example.com", "--password-stdin"], path, "two\n")
    assert code == 65
    assert err == "mailhub: user exists: a@example.com (use 'mailhub user passwd')\n"
    assert check(path, "a@example.com", "one")


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_empty_password_refused(path, stdin):
    code, _, err = run(["add", "a@example.com", "--password-stdin"], path, stdin)
    assert (code, err) == (65, "mailhub: empty password refused\n")
    assert not os.path.exists(path)


def test_interactive_prompts_twice(path):
    prompts = []
    answers = iter(["pw", "pw"])

    def getpass(prompt):
        prompts.append(prompt)
        return next(answers)

    assert run(["add", "a@example.com"], path, getpass=getpass, is_tty=True)[0] == 0
    assert prompts == ["New password: ", "Retype new password: "]
    assert check(path, "a@example.com", "pw")


def test_interactive_mismatch(path):
    answers = iter(["pw", "other"])
    code, _, err = run(["add", "a@example.com"], path, getpass=lambda p: next(answers), is_tty=True)
    assert (code, err) == (65, "mailhub: passwords do not match\n")
    assert not os.path.exists(path)


def test_no_terminal_without_password_stdin(path):
    code, _, err = run(["add", "a@example.com"], path, "pw\n", is_tty=False)
    assert code == 64
    assert "--password-stdin" in err


def test_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(["add", "a@example.com", "--password-stdin"], str(blocker / "users"), "pw\n")
    assert code == 73
    assert err.startswith("mailhub: cannot write ")


def test_file_option_and_list(tmp_path, path):
    other = str(tmp_path / "other")
    assert run(["--file", other, "add", "b@example.com", "--password-stdin"], path, "pw\n")[0] == 0
    assert run(["-f", other, "add", "a@example.com", "--password-stdin"], None, "pw\n")[0] == 0
    assert not os.path.exists(path)
    assert run(["--file", other, "list"], None) == (0, "a@example.com\nb@example.com\n", "")
    assert run(["list"], None)[0] == 64


def test_usage_errors():
    for argv in [[], ["add"], ["add", "a@b", "c@d"], ["frob"], ["del", "a@b", "--password-stdin"]]:
        with pytest.raises(usage.UsageError):
            UserOptions().parseOptions(argv)


def test_subprocess_entry_point(path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "mailhub.cli.user", "--file", path]
    p = subprocess.run(cmd + ["add", "x@example.com", "--password-stdin"], input="pw\n", env=env,
                       capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stderr) == (0, "mailhub: added user x@example.com\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    p = subprocess.run(cmd + ["del", "y@example.com"], env=env, capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stderr) == (67, "mailhub: no such user: y@example.com\n")
    p = subprocess.run(cmd + ["add", "nope", "--password-stdin"], input="pw\n", env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 65


# -- make-cert --------------------------------------------------------------------


def test_make_cert(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    options = MakeCertOptions()
    options.parseOptions(["--hostname", "mail.example", "--cert", cert, "--key", key, "--days", "7"])
    err = io.StringIO()
    assert run_make_cert(options, stderr=err) == 0
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    from mailhub.tls import ServerTLS

    assert ServerTLS(cert, key).certificate.subject.rfc4514_string() == "CN=mail.example"
    # Existing files are kept without --force.
    err = io.StringIO()
    assert run_make_cert(options, stderr=err) == 73
    assert "exists (use --force" in err.getvalue()
    options = MakeCertOptions()
    options.parseOptions(["--hostname", "mail.example", "--cert", cert, "--key", key, "--force"])
    assert run_make_cert(options, stderr=io.StringIO()) == 0


def test_make_cert_usage():
    for argv in [[], ["--hostname", "h", "--cert", "c"], ["--hostname", "h", "--cert", "c", "--key", "k", "--days", "0"]]:
        with pytest.raises(usage.UsageError):
            MakeCertOptions().parseOptions(argv)
