"""
Host accounts for the end-to-end tests that run the daemon as root (not a
test file): L{daemon_user}, a throwaway system user for C{server.user} or
twistd's C{--uid} (created with C{useradd --system}, removed with
C{userdel} afterwards), L{free_uid} for the accounts the tests create,
and L{status}, a process's C{/proc/PID/status} as a dict (its Uid and
CapEff lines show what a process runs as).

Used by test_e2e_system_mode and test_e2e_privileges; conftest.py loads
this module as a plugin (C{pytest_plugins}), so the fixture is there for
every test without an import.  Needs root: the fixture skips without it,
and without a user that can run this Python and import mailhub.  Holds no
assertions about the daemon.
"""

from __future__ import annotations

import os
import pwd
import random
import subprocess
import sys

import pytest
from conftest import require_tool

__all__ = ["daemon_user", "free_uid", "status"]


def free_uid() -> int:
    for _ in range(1000):
        uid = random.randint(20000, 59000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("no free uid found")


@pytest.fixture(scope="module")
def daemon_user():
    """A throwaway system user for server.user (useradd --system), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("system mode end-to-end needs root (useradd, files given to the account)")
    useradd = require_tool("useradd")
    userdel = require_tool("userdel")
    name = f"mhd{random.randrange(16**6):06x}"
    r = subprocess.run(
        [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent", "-s", "/usr/sbin/nologin", name],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    try:
        from daemon import ROOT  # imported when used: loading this plugin does not import daemon.py

        pw = pwd.getpwnam(name)
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import mailhub.tap, twisted.internet.reactor"],
                env=dict(os.environ, PYTHONPATH=ROOT), cwd="/", user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                capture_output=True, text=True, timeout=60,
            )
            problem = probe.stderr.strip()[-200:] if probe.returncode else None
        except PermissionError as e:
            problem = str(e)
        if problem:
            pytest.skip(f"user {name} cannot run {sys.executable} with mailhub: {problem}")
        yield pw
    finally:
        subprocess.run([userdel, name], capture_output=True, timeout=30)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
