"""
The users file as the SMTP AUTH and users-file tests use it: bcrypt with
few rounds, a clock, and a synchronous stand-in for deferToThread.  A
helper module registered in conftest.py (its fixtures need no import), not
a test file.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task

from mailhub.users import UsersFile

__all__ = ["ROUNDS", "sync_run", "result_of", "clock", "users"]

ROUNDS = 4


def sync_run(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """deferToThread stand-in: runs at once, in this thread."""
    return defer.maybeDeferred(f, *args, **kwargs)


def result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    failures: list[Any] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "Deferred has not fired"
    return results[0]


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(1000)
    return c


@pytest.fixture
def users(tmp_path: Any, clock: task.Clock) -> UsersFile:
    return UsersFile(str(tmp_path / "users"), clock=clock, rounds=ROUNDS)
