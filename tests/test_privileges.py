"""
mailhub.daemon.privileges: whom the daemon switches to, the switch itself (as
root, in a child process), and the start-up checks of the directories
that user owns -- one line for each problem.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailhub.daemon.privileges import NoDefaultUser, PrivilegeError, RunAs, prepare_directory, prepare_file, run_as


@pytest.fixture
def open_dir():
    """A directory under /tmp that other users may pass through (pytest's root directory is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mailhub-privileges-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def me() -> pwd.struct_passwd:
    return pwd.getpwuid(os.geteuid())


def test_not_root_nothing_changes_and_only_the_current_user_may_be_named():
    uid = 4242 if os.geteuid() == 0 else os.geteuid()
    assert run_as(None, euid=uid) is None
    if os.geteuid() != 0:
        assert run_as(me().pw_name, euid=uid) is None
    with pytest.raises(PrivilegeError) as e:
        run_as("root", euid=uid)
    assert str(e.value).startswith("server.user: cannot switch to 'root': mailhub runs as ")
    assert "\n" not in str(e.value)


def test_root_switches_to_server_user_default_mailhub():
    with pytest.raises(PrivilegeError) as e:
        run_as("no-such-user-here", euid=0)
    assert str(e.value) == "server.user: no such user 'no-such-user-here'"
    try:
        pwd.getpwnam("mailhub")
    except KeyError:
        with pytest.raises(PrivilegeError, match=r"no such user 'mailhub' \(create it: useradd --system"):
            run_as(None, euid=0)
    else:
        assert run_as(None, euid=0).name == "mailhub"
    nobody = pwd.getpwnam("nobody")
    assert run_as("nobody", euid=0) == RunAs("nobody", nobody.pw_uid, nobody.pw_gid)
    assert run_as("root", euid=0) is None  # keeps root


def test_a_missing_default_account_is_its_own_error(monkeypatch):
    getpwnam = pwd.getpwnam

    def no_mailhub(name):
        if name == "mailhub":
            raise KeyError(name)
        return getpwnam(name)

    monkeypatch.setattr("mailhub.daemon.privileges.pwd.getpwnam", no_mailhub)
    with pytest.raises(NoDefaultUser):
        run_as(None, euid=0)
    with pytest.raises(PrivilegeError) as e:
        run_as("no-such-user-here", euid=0)
    assert not isinstance(e.value, NoDefaultUser)  # a named user that is missing always stops the start


@pytest.mark.parametrize("source", [None, "/etc/mailhub/mailhub.toml"])
def test_without_the_default_account_only_a_trial_run_keeps_root(monkeypatch, source, events):
    """
    The embedded defaults (no configuration file) are a trial run on loopback:
    without a mailhub account it keeps root with a warning.  A configuration
    file makes the missing account a one-line stop.
    """
    import dataclasses

    from mailhub import tap
    from mailhub.config import load_config

    def missing(*args, **kwargs):
        raise NoDefaultUser("server.user: no such user 'mailhub'")

    failed: list[str] = []

    def fail(message, *args):
        failed.append(message)
        raise SystemExit(78)

    monkeypatch.setattr("mailhub.daemon.privileges.run_as", missing)
    monkeypatch.setattr(tap, "fail", fail)
    config = dataclasses.replace(load_config(None, None, "/tmp"), source=source)
    if source is None:
        assert tap._run_as(config, {}) is None
        assert failed == []
        assert any("mailhub runs as root" in str(e.get("log_format", "")) for e in events)
    else:
        with pytest.raises(SystemExit):
            tap._run_as(config, {})
        assert failed == ["/etc/mailhub/mailhub.toml: server.user: no such user 'mailhub'"]


def test_twistd_uid_wins_and_must_agree_with_server_user():
    nobody = pwd.getpwnam("nobody")
    user = run_as(None, nobody.pw_uid, None, euid=0)
    assert user == RunAs("nobody", nobody.pw_uid, nobody.pw_gid, by_twistd=True)
    assert run_as("nobody", nobody.pw_uid, 0, euid=0).gid == 0
    with pytest.raises(PrivilegeError, match=r"server.user: 'root' conflicts with twistd --uid"):
        run_as("root", nobody.pw_uid, None, euid=0)


def test_a_missing_directory_is_created_for_the_user(tmp_path):
    user = RunAs(me().pw_name, os.geteuid(), os.getegid())
    path = tmp_path / "data" / "spool"
    prepare_directory("spool.path", str(path), user, 0o700)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o700)
    prepare_directory("spool.path", str(path), user, 0o700)  # exists and is right: nothing to say


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_as_root_it_is_given_to_the_user(open_dir):
    nobody = pwd.getpwnam("nobody")
    user = RunAs("nobody", nobody.pw_uid, nobody.pw_gid)
    prepare_directory("local.mailboxes", str(open_dir / "mailboxes"), user, 0o750)
    st = os.stat(open_dir / "mailboxes")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o750)
    prepare_file("server.event_log", str(open_dir / "events.jsonl"), user)
    assert os.stat(open_dir / "events.jsonl").st_uid == nobody.pw_uid


def test_a_directory_of_someone_else_is_one_line(open_dir):
    other = RunAs("mailhub", os.geteuid() + 1, os.getegid())
    with pytest.raises(PrivilegeError) as e:
        prepare_directory("spool.path", str(open_dir), other)
    assert str(e.value) == (
        f"spool.path: {open_dir} is owned by {me().pw_name}, not by mailhub (mailhub runs as mailhub): "
        f"chown -R mailhub: {open_dir}"
    )


def test_group_writable_and_not_a_directory_are_refused(tmp_path):
    user = RunAs(me().pw_name, os.geteuid(), os.getegid())
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o775)
    with pytest.raises(PrivilegeError, match=r"is writable by group or others \(mode 0775\): chmod go-w"):
        prepare_directory("spool.path", str(tmp_path / "open"), user)
    (tmp_path / "file").write_text("")
    with pytest.raises(PrivilegeError, match=r"spool.path: .*/file is not a directory"):
        prepare_directory("spool.path", str(tmp_path / "file"), user)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_the_switch_leaves_no_way_back_and_no_capability():
    nobody = pwd.getpwnam("nobody")
    code = (
        "import json, os, sys; from mailhub.daemon.privileges import RunAs, drop_privileges, capabilities;"
        f"drop_privileges(RunAs('nobody', {nobody.pw_uid}, {nobody.pw_gid}));"
        "print(json.dumps([os.getresuid(), os.getresgid(), capabilities()]))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    uids, gids, caps = json.loads(r.stdout)
    assert uids == [nobody.pw_uid] * 3 and gids == [nobody.pw_gid] * 3
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory closed to another user needs root to set up")
def test_a_spool_the_user_cannot_reach_is_one_line(open_dir):
    nobody = pwd.getpwnam("nobody")
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(PrivilegeError) as e:
        prepare_directory("spool.path", str(closed / "spool"), RunAs("nobody", nobody.pw_uid, nobody.pw_gid))
    assert str(e.value) == (
        f"spool.path: nobody cannot reach {closed}/spool: {closed} is mode 0700 owned by root "
        f"(chmod o+x {closed}, or choose another place)"
    )
    assert not (closed / "spool").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_the_event_logs_directory_is_the_users_where_mailhub_rotates_it(open_dir, monkeypatch):
    """
    The default event log (DATA/events.jsonl) is rotated by the daemon after
    it switched users: a missing data directory is created for the user
    before the spool inside it, and an existing one the user cannot write
    in is a one-line stop, unless rotation is left to logrotate.
    """
    import dataclasses

    from mailhub.config import load_config
    from mailhub.daemon.privileges import prepare_for

    monkeypatch.setattr("mailhub.daemon.privileges.check_runnable", lambda user: None)  # not what is tested here
    nobody = pwd.getpwnam("nobody")
    user = RunAs("nobody", nobody.pw_uid, nobody.pw_gid)
    data = open_dir / "data"
    config = load_config(None, None, str(data))
    assert config.server.event_log == str(data / "events.jsonl")
    prepare_for(config, user)
    assert os.stat(data).st_uid == nobody.pw_uid and os.stat(data / "spool").st_uid == nobody.pw_uid

    root_owned = open_dir / "root-owned"
    root_owned.mkdir(mode=0o755)
    other = load_config(None, {"server.event_log": str(root_owned / "events.jsonl")}, str(data))
    with pytest.raises(PrivilegeError) as e:
        prepare_for(other, user)
    assert str(e.value) == (
        f"server.event_log: nobody cannot write in {root_owned}, where the event log is rotated: "
        f"chown nobody: {root_owned}, or set server.event_log_max_size = 0 and rotate it with "
        "logrotate's copytruncate"
    )
    by_logrotate = dataclasses.replace(other, server=dataclasses.replace(other.server, event_log_max_size=0))
    prepare_for(by_logrotate, user)
    assert os.stat(root_owned / "events.jsonl").st_uid == nobody.pw_uid  # the file itself is the user's


@pytest.mark.skipif(os.geteuid() != 0, reason="needs files the other user cannot use")
def test_an_interpreter_or_package_the_user_cannot_use_stops_the_start(open_dir):
    """
    The daemon imports modules and starts delivery processes after the
    switch: an interpreter behind a 0700 directory, or not executable by
    the user, or a package it cannot read, is one line at start, not mail
    accepted and never delivered.
    """
    from mailhub.daemon.privileges import check_runnable

    nobody = pwd.getpwnam("nobody")
    user = RunAs("nobody", nobody.pw_uid, nobody.pw_gid)
    public, private = open_dir / "public", open_dir / "private"
    public.mkdir(mode=0o755)
    private.mkdir(mode=0o700)
    for d in (public, private):
        (d / "python").write_bytes(b"")
        os.chmod(d / "python", 0o755)
        (d / "__init__.py").write_bytes(b"")
        os.chmod(d / "__init__.py", 0o644)
    check_runnable(user, str(public / "python"), str(public / "__init__.py"))
    with pytest.raises(PrivilegeError, match=r"nobody cannot reach .*private/python: .*private is mode 0700"):
        check_runnable(user, str(private / "python"), str(public / "__init__.py"))
    os.chmod(public / "python", 0o700)
    with pytest.raises(PrivilegeError, match=r"nobody cannot run .*public/python \(mode 0700\)"):
        check_runnable(user, str(public / "python"), str(public / "__init__.py"))
    os.chmod(public / "python", 0o755)
    os.chmod(public / "__init__.py", 0o600)
    with pytest.raises(PrivilegeError, match=r"nobody cannot read .*public/__init__.py \(mode 0600\)"):
        check_runnable(user, str(public / "python"), str(public / "__init__.py"))
